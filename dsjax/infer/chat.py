"""Chat templates as Hugging Face checkpoints ship them: read from a hub directory, rendered in a
Jinja sandbox set up as transformers sets it up (the server's /v1/chat/completions).

    settings = chat_settings("path/to/hub-dir")     # {"chat_template": str | None, "special_tokens": {...}}
    template = compile_chat_template(settings["chat_template"] or DEFAULT_CHAT_TEMPLATE)
    text = template.render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True,
                           **settings["special_tokens"])
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox

# The chat template used when the checkpoint has none: one line per message, then the assistant's
# turn. Rendered like the checkpoint's (variables messages, add_generation_prompt, bos_token, eos_token).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def chat_settings(directory: str | Path) -> dict:
    """What a hub checkpoint directory says about chat: ``{"chat_template", "special_tokens"}`` from
    its tokenizer_config.json (``chat_template``: a string, or a list of named templates of which
    "default" is taken; ``bos_token`` etc.: a string or {"content": ...}) and chat_template.jinja,
    which takes precedence as in transformers. Empty where it has none."""
    d = Path(directory)
    out: dict = {"chat_template": None, "special_tokens": {}}
    config_file = d / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not JSON ({e})") from None
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        out["chat_template"] = template if isinstance(template, str) else None
        for key, value in config.items():
            if key.endswith("_token") and isinstance(value, dict):
                value = value.get("content")
            if key.endswith("_token") and isinstance(value, str):
                out["special_tokens"][key] = value
    if (d / "chat_template.jinja").is_file():
        out["chat_template"] = (d / "chat_template.jinja").read_text()
    return out


def compile_chat_template(source: str) -> jinja2.Template:
    """The template in a sandbox, set up as transformers does (trim_blocks, lstrip_blocks, loop
    controls, ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII text)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)
