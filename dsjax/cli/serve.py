"""Serve a checkpoint over HTTP with OpenAI's API (vLLM's conventions): /v1/completions, /v1/chat/completions.

    dsjax-serve --checkpoint runs/tiny [--host 127.0.0.1] [--port 8000] [--served-model-name tiny]
                [--max-model-len 512] [--max-batch 16] [--page-size 16] [--num-pages N] [--api-key KEY]
    python -m dsjax.cli.serve --checkpoint path/to/hub-dir --port 0      # port 0: a free one

Loads the checkpoint (a training run or a hub-format directory with a tokenizer.json), compiles the
engine's two shapes, prints one line saying where it listens, and serves until SIGTERM / Ctrl-C,
which abort the running requests (their streams end with finish_reason "abort") and exit with 0.
The chat template is the checkpoint's (tokenizer_config.json, chat_template.jinja) when it has one,
else ``--chat-template FILE``, else dsjax.infer.chat.DEFAULT_CHAT_TEMPLATE. Needs the serve extra:
``pip install -e ".[serve]"``. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from dsjax.cli import UsageError, reports_errors
from dsjax.train.checkpoint import load_checkpoint


def _exit_cleanly(sig, frame):
    raise SystemExit(0)


@reports_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsjax-serve", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training run directory or hub-format HF directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0: any free port (the line printed names it)")
    ap.add_argument("--served-model-name", help="the name clients pass as `model` (default: --checkpoint as given)")
    ap.add_argument("--max-model-len", type=int, help="prompt + completion tokens (default: the model's context)")
    ap.add_argument("--max-batch", "--max-num-seqs", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--page-size", "--block-size", type=int, default=16, help="tokens per cache page")
    ap.add_argument("--num-pages", type=int, help="cache pages (default: every sequence at full length)")
    ap.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens per prefill step")
    ap.add_argument("--chat-template", help="a Jinja chat template file, for a checkpoint without one")
    ap.add_argument("--api-key", help="clients must send `Authorization: Bearer KEY`")
    ap.add_argument("--fp8-weights", action="store_true", help="FP8 inference (as dsjax-generate)")
    ap.add_argument(
        "--speculative", action="store_true", help="keep MTP caches; requests draft with the MTP modules by default"
    )
    ap.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    a = ap.parse_args(argv)
    try:
        import uvicorn

        from dsjax.infer import chat as chats
        from dsjax.infer import server
    except ImportError as e:
        raise UsageError(f'dsjax-serve needs FastAPI, uvicorn and jinja2 ({e}): pip install -e ".[serve]"') from None
    from dsjax.infer.engine import Engine

    chat = {"chat_template": None, "special_tokens": {}}
    if (Path(a.checkpoint) / "config.json").is_file():  # a hub directory; a training run has no tokenizer config
        try:
            chat = chats.chat_settings(a.checkpoint)
        except ValueError as e:
            raise UsageError(f"--checkpoint {a.checkpoint}: {e}") from None
    if a.chat_template is not None and chat["chat_template"] is None:
        chat["chat_template"] = Path(a.chat_template).read_text()
    try:
        chats.compile_chat_template(chat["chat_template"] or chats.DEFAULT_CHAT_TEMPLATE)
    except Exception as e:  # jinja2's TemplateSyntaxError
        raise UsageError(f"the chat template does not compile: {e}") from None

    cfg, variables, tokenizer = load_checkpoint(a.checkpoint, a.fp8_weights)
    if tokenizer is None:
        raise UsageError(f"--checkpoint {a.checkpoint} has no tokenizer.json: the server needs one for text")
    try:
        sizes = {"max_batch": a.max_batch, "page_size": a.page_size, "num_pages": a.num_pages}
        engine = Engine(
            cfg, variables, tokenizer, **sizes, max_model_len=a.max_model_len, prefill_chunk=a.prefill_chunk,
            speculative=a.speculative,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    server.warm_up(engine)
    name = a.served_model_name or a.checkpoint
    app = server.make_app(
        engine, name, chat["chat_template"], chat["special_tokens"], api_key=a.api_key, root=str(a.checkpoint)
    )
    sock = server.listening_socket(a.host, a.port)
    host, port = sock.getsockname()[:2]
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def started(_):
        print(
            f"dsjax-serve: {name} on {where}/v1 (max_model_len {engine.max_model_len}, max_batch {engine.max_batch})",
            flush=True,
        )

    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = uvicorn.Config(app, log_level=a.log_level, timeout_graceful_shutdown=30)
    # uvicorn catches SIGTERM / SIGINT while it serves and raises them again once it has stopped:
    # these handlers make that a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    try:
        server.Server(config, on_started=started).run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
