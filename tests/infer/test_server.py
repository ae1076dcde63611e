"""dsjax-serve (dsjax.infer.server, dsjax.cli.serve) through the real ``openai`` client on localhost:
greedy completions and chats equal ``generate``'s tokens decoded; the chat template comes from a
tokenizer_config.json; streamed chunks add up to the unary response and end with [DONE]; n, stop
strings, EOS and usage; bad requests get OpenAI's error JSON with a 4xx status and the server keeps
serving; a client that disconnects aborts its request; a failed engine makes /health 503; the CLI
serves a hub directory and exits with 0 on SIGTERM mid-stream."""

from __future__ import annotations

import asyncio
import functools
import json
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from dsjax.config import load_config
from dsjax.infer import chat as chats
from dsjax.infer import generate
from dsjax.infer import server as srv
from dsjax.infer.engine import Engine
from dsjax.model import random_variables
from dsjax.train.data import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]
CFG = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_nextn_predict_layers=0"]).model
VARIABLES = random_variables(CFG, seed=3)
TOKENIZER = ByteTokenizer()
BOS = TOKENIZER.bos_id
MODEL = "tiny-test"

# A checkpoint's tokenizer_config.json with a chat template (and its rendering written out by hand).
TOKENIZER_CONFIG = {
    "chat_template": (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ),
    "eos_token": {"content": "</s>", "lstrip": False},
}
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": [{"type": "text", "text": "Count"}, {"type": "text", "text": "to 3"}]},
]
CHAT_TEXT = "<|system|>Be brief.<|user|>Hi<|assistant|>Hello</s><|user|>Count\nto 3<|assistant|>"


def text_ids(text: str) -> list[int]:
    return [BOS, *text.encode()]


PROMPTS = {  # every greedy comparison's prompt, as the server should tokenize it
    "hello": text_ids("Hello, world"),
    "fox": text_ids("The quick brown fox"),
    "eos": text_ids("x"),  # greedy: EOS as its third token
    "ids": [5, 77, 200, 31, 9],  # a token-id prompt: used as it is
    "chat": text_ids(CHAT_TEXT),
}
MAX_NEW = 24


@functools.cache
def reference() -> dict[str, list[int]]:
    """generate's greedy tokens for every prompt (one batch: its rows decode independently)."""
    out = generate(CFG, VARIABLES, list(PROMPTS.values()), MAX_NEW)
    return {name: out.tokens[i].tolist() for i, name in enumerate(PROMPTS)}


def ref_text(name: str, n: int) -> str:
    return TOKENIZER.decode(reference()[name][:n])


class Live:
    """A server on a free localhost port, uvicorn in a background thread."""

    def __init__(self, app):
        self.app = app
        sock = srv.listening_socket("127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = srv.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self):
        self.server.handle_exit(signal.SIGTERM, None)
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    (d / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    chat = chats.chat_settings(d)
    engine = Engine(CFG, VARIABLES, TOKENIZER, max_batch=4, page_size=8, max_model_len=160, prefill_chunk=32)
    srv.warm_up(engine)
    server = Live(srv.make_app(engine, MODEL, chat["chat_template"], chat["special_tokens"]))
    yield server
    server.stop()
    assert not engine.has_work() and engine.allocator.num_free == engine.allocator.num_pages


def greedy(**kw) -> dict:
    return {"model": MODEL, "temperature": 0.0, "extra_body": {"ignore_eos": True}, **kw}


# -- completions --------------------------------------------------------------------------------


def test_greedy_completions_equal_generate_alone_and_together(live):
    """Four requests at once (a text prompt, a token-id prompt, and a list of two prompts) through
    the async client: each greedy text equals generate's tokens decoded; usage counts BOS."""
    client = openai.AsyncOpenAI(base_url=live.base + "/v1", api_key="none", max_retries=0, timeout=120)

    async def all_at_once():
        return await asyncio.gather(
            client.completions.create(prompt="Hello, world", max_tokens=12, **greedy()),
            client.completions.create(prompt=PROMPTS["ids"], max_tokens=MAX_NEW, **greedy()),
            client.completions.create(prompt=["The quick brown fox", "Hello, world"], max_tokens=7, **greedy()),
        )

    one, ids, pair = asyncio.run(all_at_once())
    assert one.id.startswith("cmpl-") and one.object == "text_completion" and one.model == MODEL
    assert one.choices[0].text == ref_text("hello", 12) and one.choices[0].finish_reason == "length"
    assert one.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) == {
        "prompt_tokens": 13,
        "completion_tokens": 12,
        "total_tokens": 25,
    }
    assert ids.choices[0].text == ref_text("ids", MAX_NEW) and ids.usage.prompt_tokens == 5
    assert [c.index for c in pair.choices] == [0, 1]
    assert [c.text for c in pair.choices] == [ref_text("fox", 7), ref_text("hello", 7)]
    assert pair.usage.prompt_tokens == 20 + 13 and pair.usage.completion_tokens == 14


def test_eos_ends_a_completion_unless_ignored(live):
    i = reference()["eos"].index(TOKENIZER.eos_id)
    r = live.client.completions.create(model=MODEL, prompt="x", max_tokens=MAX_NEW, temperature=0.0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == i + 1  # EOS counted, not shown
    assert r.choices[0].text == ref_text("eos", i)
    r = live.client.completions.create(prompt="x", max_tokens=MAX_NEW, **greedy())
    assert r.choices[0].finish_reason == "length" and r.choices[0].text == ref_text("eos", MAX_NEW)


def test_streamed_chunks_add_up_to_the_completion_and_end_with_done(live):
    """n = 2 seeded samples: streamed (the openai client) and unary give the same texts; each choice
    ends with its finish_reason, then a usage chunk; the raw stream is SSE ending with [DONE]."""
    kw = {
        "model": MODEL,
        "prompt": "Hello, world",
        "max_tokens": 16,
        "n": 2,
        "seed": 11,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    unary = live.client.completions.create(**kw)
    texts, reasons, chunks = {0: "", 1: ""}, {}, []
    for chunk in live.client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        chunks.append(chunk)
        for c in chunk.choices:
            assert c.index not in reasons, "a chunk after the choice's finish_reason"
            texts[c.index] += c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in unary.choices} and texts[0] != texts[1]
    assert reasons == {0: "length", 1: "length"}
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "total_tokens"}) == {
        "prompt_tokens": 13,
        "total_tokens": 45,
    }
    assert all(c.usage is None for c in chunks[:-1])

    body = {"model": MODEL, "prompt": "Hello, world", "max_tokens": 5, "temperature": 0.0, "stream": True}
    with httpx.stream("POST", live.base + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    streamed = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(s["object"] == "text_completion" for s in streamed)
    assert "".join(s["choices"][0]["text"] for s in streamed) == ref_text("hello", 5)


def test_stop_strings_cut_the_text(live):
    full = ref_text("hello", MAX_NEW)
    stop = full[8:10]
    cut = full.find(stop)
    for given in (stop, ["\x00never", stop]):
        r = live.client.completions.create(prompt="Hello, world", max_tokens=MAX_NEW, stop=given, **greedy())
        assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < MAX_NEW
    streamed = live.client.completions.create(
        prompt="Hello, world", max_tokens=MAX_NEW, stop=stop, stream=True, **greedy()
    )
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]


# -- chat ---------------------------------------------------------------------------------------


def test_chat_renders_the_checkpoint_template(live):
    """The template from tokenizer_config.json (its eos_token given as {"content": ...}), text parts
    joined with a newline, BOS put first: the greedy reply equals generate's on that exact prompt."""
    n = 10
    r = live.client.chat.completions.create(messages=CHAT, max_completion_tokens=n, **greedy())
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref_text("chat", n)
    assert r.usage.prompt_tokens == len(PROMPTS["chat"]) and r.usage.completion_tokens == n
    chunks = list(live.client.chat.completions.create(messages=CHAT, max_tokens=n, stream=True, **greedy()))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref_text("chat", n)
    assert chunks[-1].choices[0].finish_reason == "length"
    # without max_tokens the reply may fill the context
    r = live.client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert r.usage.total_tokens == 160 and r.choices[0].finish_reason == "length"


def test_chat_settings_read_the_hub_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
                "bos_token": "<s>",
                "eos_token": {"content": "</s>"},
                "model_max_length": 10,
            }
        )
    )
    assert chats.chat_settings(tmp_path) == {
        "chat_template": "D",
        "special_tokens": {"bos_token": "<s>", "eos_token": "</s>"},
    }
    (tmp_path / "chat_template.jinja").write_text("J")
    assert chats.chat_settings(tmp_path)["chat_template"] == "J"
    assert chats.chat_settings(tmp_path / "absent") == {"chat_template": None, "special_tokens": {}}
    default = chats.compile_chat_template(chats.DEFAULT_CHAT_TEMPLATE)
    text = default.render(messages=CHAT[:2], add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert text == "<s>system: Be brief.\nuser: Hi\nassistant:"


# -- errors -------------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live):
    c = live.client
    cases = [
        (openai.NotFoundError, "NotFoundError", lambda: c.completions.create(model="gpt-4", prompt="x")),
        (openai.BadRequestError, "BadRequestError",
         lambda: c.completions.create(model=MODEL, prompt="x", max_tokens=200)),  # 2 + 200 > 160
        (openai.BadRequestError, "BadRequestError", lambda: c.completions.create(model=MODEL, prompt="x",
                                                                                  max_tokens="ten")),
        (openai.BadRequestError, "BadRequestError", lambda: c.completions.create(model=MODEL, prompt="x", n=0)),
        (openai.BadRequestError, "BadRequestError", lambda: c.completions.create(model=MODEL, prompt="x", n=9)),
        (openai.BadRequestError, "BadRequestError",
         lambda: c.completions.create(model=MODEL, prompt="x", temperature=-1)),
        (openai.BadRequestError, "BadRequestError", lambda: c.completions.create(model=MODEL, prompt=[])),
        (openai.BadRequestError, "BadRequestError", lambda: c.completions.create(model=MODEL, prompt="x", stop=[1])),
        (openai.BadRequestError, "BadRequestError", lambda: c.completions.create(model=MODEL, prompt="x", logprobs=2)),
        (openai.BadRequestError, "BadRequestError",
         lambda: c.completions.create(model=MODEL, prompt=[CFG.vocab_size + 5])),
        (openai.BadRequestError, "BadRequestError",
         lambda: c.completions.create(model=MODEL, prompt="x", stream_options={"include_usage": True})),
        (openai.NotFoundError, "NotFoundError", lambda: c.chat.completions.create(model="x", messages=CHAT)),
        (openai.BadRequestError, "BadRequestError", lambda: c.chat.completions.create(model=MODEL, messages=[])),
        (openai.BadRequestError, "BadRequestError",
         lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": 5}])),
        (openai.BadRequestError, "BadRequestError",
         lambda: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 200}])),
        (openai.BadRequestError, "BadRequestError",  # this server keeps no MTP caches
         lambda: c.completions.create(model=MODEL, prompt="x", extra_body={"speculative": True})),
    ]  # fmt: skip
    for error, name, call in cases:
        with pytest.raises(error) as e:
            call()
        err = e.value.body if "message" in e.value.body else e.value.body["error"]
        assert err["type"] == name and err["code"] == e.value.status_code and err["message"], err
        assert c.completions.create(prompt="x", max_tokens=2, **greedy()).usage.completion_tokens == 2
    r = httpx.post(
        live.base + "/v1/completions",
        content=b'{"model": "tiny-test", "prompt": ',
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"} and "JSON" in r.json()["error"]["message"]
    r = httpx.post(live.base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "ten"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert httpx.get(live.base + "/v1/nothing").json()["error"]["code"] == 404
    assert httpx.get(live.base + "/health").status_code == 200


def test_a_drafting_server_answers_as_generate():
    """An engine with MTP caches (dsjax-serve --speculative): requests draft by default, or not
    ("speculative": false); greedy text equals generate's either way, and drafts were accepted."""
    from dsjax.model import echoing_variables

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_nextn_predict_layers=1"]).model
    variables = echoing_variables(random_variables(cfg, seed=3), 30.0)
    engine = Engine(cfg, variables, TOKENIZER, max_batch=4, page_size=8, max_model_len=96, speculative=True)
    server = Live(srv.make_app(engine, MODEL))
    try:
        want = generate(cfg, variables, [text_ids("Hello")], 20).tokens[0].tolist()
        for extra in ({}, {"speculative": False}):
            r = server.client.completions.create(
                prompt="Hello", max_tokens=20, **{**greedy(), "extra_body": {"ignore_eos": True, **extra}}
            )
            assert r.choices[0].text == TOKENIZER.decode(want)
        assert engine.stats["accepted"] > 0
    finally:
        server.stop()


def test_health_and_models(live):
    r = httpx.get(live.base + "/health")
    assert r.status_code == 200 and r.content == b""
    models = live.client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    card = httpx.get(live.base + "/v1/models").json()
    assert card["object"] == "list" and card["data"][0]["max_model_len"] == 160
    assert {"id", "object", "created", "owned_by"} <= set(card["data"][0])


def test_a_client_that_disconnects_aborts_its_request(live, monkeypatch):
    """Streaming: the client closes after the first chunk; unary: the client gives up waiting."""
    engine = live.app.state.engine_loop.engine
    aborted = []
    abort, step = engine.abort, engine.step
    monkeypatch.setattr(engine, "abort", lambda rid: (aborted.append(rid), abort(rid)))
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.01), step())[1])  # 150 tokens: >= 1.5 s
    body = {"model": MODEL, "prompt": "x", "max_tokens": 150, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", live.base + "/v1/completions", json=body, timeout=60) as r:
        first = json.loads(next(r.iter_lines())[len("data: ") :])
    wait_until(lambda: first["id"] in aborted and not engine.has_work())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.base + "/v1/completions", json={**body, "stream": False}, timeout=0.3)
    wait_until(lambda: len(aborted) == 2 and aborted[1].startswith("cmpl-") and not engine.has_work())
    assert live.client.completions.create(prompt="x", max_tokens=2, **greedy()).usage.completion_tokens == 2


def wait_until(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)


class BrokenEngine:
    """Takes requests; its step raises (a device lost, a bug)."""

    max_model_len, max_batch, depth = 64, 4, 0
    tokenizer = TOKENIZER

    def __init__(self):
        self.queued = []

    def add_request(self, prompt, params, request_id=None, on_output=None):
        self.queued.append(request_id)
        return request_id

    def abort(self, request_id):
        pass

    def has_work(self):
        return bool(self.queued)

    def step(self):
        raise RuntimeError("device lost")


def test_a_failed_engine_fails_its_requests_and_health_says_503():
    live = Live(srv.make_app(BrokenEngine(), "broken", api_key="secret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            live.client.models.list()
        client = openai.OpenAI(base_url=live.base + "/v1", api_key="secret", max_retries=0)
        assert httpx.get(live.base + "/health").status_code == 200
        with pytest.raises(openai.InternalServerError, match="device lost"):
            client.completions.create(model="broken", prompt="x", max_tokens=2)
        r = httpx.get(live.base + "/health")
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="broken", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        live.stop()


# -- the command line ---------------------------------------------------------------------------


def byte_level_tokenizer_json(path: Path) -> None:
    """A Hugging Face tokenizer.json of the 256 bytes (GPT-2's byte-level alphabet) + <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path))


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(0.2):
            return proc.stdout.readline()
    raise AssertionError(f"no line from the server (exit status {proc.poll()})")


@pytest.mark.slow
def test_cli_serves_a_hub_checkpoint_and_exits_cleanly_on_sigterm(tmp_path):
    """A hub directory (dsjax.hf.save_hf + a byte-level tokenizer.json + a chat template); SIGTERM
    while a completion streams: the stream ends with finish_reason "abort" and [DONE], exit 0."""
    from dsjax.hf import save_hf

    hub = tmp_path / "hub"
    save_hf(hub, CFG, VARIABLES)
    byte_level_tokenizer_json(hub / "tokenizer.json")
    (hub / "tokenizer_config.json").write_text(json.dumps({**TOKENIZER_CONFIG, "bos_token": "<s>"}))
    cmd = [
        sys.executable,
        "-m",
        "dsjax.cli.serve",
        "--checkpoint",
        str(hub),
        "--port",
        "0",
        "--served-model-name",
        "hub",
        "--max-model-len",
        "256",
        "--max-batch",
        "2",
        "--page-size",
        "8",
        "--prefill-chunk",
        "16",
    ]
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        try:
            line = read_line(proc, 240)
            assert line.startswith("dsjax-serve: hub on http://127.0.0.1:"), line
            base = line.split(" on ")[1].split()[0]
            client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)
            r = client.chat.completions.create(model="hub", messages=CHAT[:2], max_tokens=3, temperature=0.0)
            assert r.usage.prompt_tokens == 1 + len("<|system|>Be brief.<|user|>Hi<|assistant|>")  # <s>: one token
            stream = client.completions.create(
                model="hub",
                prompt="Hello",
                max_tokens=240,
                temperature=0.0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            chunks = [next(iter(stream))]
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            chunks += list(stream)
            assert chunks[-1].choices[0].finish_reason == "abort"
            assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
            assert proc.wait(30) == 0 and time.monotonic() - t0 < 10
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.seek(0)
            stderr = err.read()
    assert "Traceback" not in stderr, stderr


def test_cli_names_the_extra_to_install_and_refuses_a_bad_checkpoint(tmp_path, monkeypatch, capsys):
    from dsjax.cli.serve import main

    assert main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: --checkpoint {tmp_path / 'nope'}: no such directory\n"
    hub = ROOT / "tests" / "fixtures" / "v3_no_qlora"  # no tokenizer.json; max_position_embeddings 64
    assert main(["--checkpoint", str(hub)]) == 2
    assert capsys.readouterr().err.endswith("has no tokenizer.json: the server needs one for text\n")
    (tmp_path / "hub").mkdir()
    for f in hub.iterdir():
        (tmp_path / "hub" / f.name).symlink_to(f)
    byte_level_tokenizer_json(tmp_path / "hub" / "tokenizer.json")
    assert main(["--checkpoint", str(tmp_path / "hub"), "--max-model-len", "65"]) == 2
    assert capsys.readouterr().err == "error: max_model_len=65: must be in 1 .. max_position_embeddings=64\n"
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    monkeypatch.delitem(sys.modules, "dsjax.infer.server")
    monkeypatch.delattr(sys.modules["dsjax.infer"], "server")
    assert main(["--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[serve]"' in err
