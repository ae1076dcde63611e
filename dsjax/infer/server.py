"""An OpenAI-compatible HTTP server for the serving engine, with vLLM's conventions (FastAPI + uvicorn).

    dsjax-serve --checkpoint DIR [--port 8000]          # dsjax/cli/serve.py

    GET  /health                 200 (503 once the engine has failed)
    GET  /v1/models              {"object": "list", "data": [{"id", "object": "model", "created", "owned_by", ...}]}
    POST /v1/completions         prompt: a string, a list of token ids, or a list of either (one request each)
    POST /v1/chat/completions    messages rendered by the checkpoint's chat template (or DEFAULT_CHAT_TEMPLATE)

Both POST endpoints take the OpenAI parameters max_tokens (chat: also max_completion_tokens), n,
temperature, top_p, stop, seed, stream, stream_options.include_usage, vLLM's extras top_k (0 or -1:
off) and ignore_eos, and dsjax's ``speculative`` (MTP drafting; default: on when the engine keeps
MTP caches, ``dsjax-serve --speculative``); ``stream: true`` answers with server-sent events
(``data: {json}`` chunks, then ``data: [DONE]``). Errors are ``{"error": {"message", "type",
"param", "code"}}`` with a 4xx status (a body that is not JSON, a wrong type or value, a request
that does not fit the context: 400 BadRequestError; a model name other than the served one: 404
NotFoundError); a parameter the engine cannot honour (logprobs, echo, suffix, penalties, logit_bias,
tools) is a 400, not ignored.

Text prompts (a completion's prompt, a rendered chat) start with one BOS token: it is prepended
when the tokenizer or the template did not put it there. Token-id prompts are used as they are.

``EngineLoop`` owns the engine in a thread of its own: it waits for work, calls ``step()``, and hands
each step's outputs to the asyncio queue of the HTTP request that asked for them (one
``call_soon_threadsafe`` per step). A client that disconnects aborts its request in the engine. On
SIGTERM / SIGINT (``Server``, uvicorn's server) every running request is aborted at once: streams
end with a chunk whose finish_reason is "abort" and ``[DONE]``, unary responses carry what was
generated; then uvicorn's graceful shutdown finds no open request and the app's lifespan stops the
loop. If ``step()`` raises, the loop ends every request with a 500 and ``/health`` answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsjax.infer.chat import DEFAULT_CHAT_TEMPLATE, compile_chat_template
from dsjax.infer.engine import Engine, RequestOutput, SamplingParams

log = logging.getLogger("dsjax.serve")


# -- errors -------------------------------------------------------------------------------------


class APIError(Exception):
    """An OpenAI-style error response: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or error_type(status)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status)


def error_type(status: int) -> str:
    """The OpenAI client's exception name for a status: 400 BadRequestError, 404 NotFoundError, ..."""
    try:
        name = http.HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        name = "Unknown"
    return name if name.endswith("Error") else name + "Error"


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


class EngineDead(RuntimeError):
    """The engine loop stopped because ``step()`` raised; every request after that fails."""


# -- the engine's thread ------------------------------------------------------------------------


class _Consumer:
    __slots__ = ("loop", "queue", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, remaining: int):
        self.loop, self.queue, self.remaining = loop, queue, remaining


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class EngineLoop:
    """A thread that owns ``engine``: it waits for work, calls ``step()``, and delivers each step's
    outputs to the asyncio queue of the request they belong to (``submit``).

    ``request_stop()`` (safe from a signal handler: it only sets a flag) makes the thread abort
    every running request, refuse new ones, and exit once the engine has drained; ``stop()`` also
    waits for that. If ``step()`` raises, ``error`` holds the exception, every waiting queue gets an
    ``EngineDead``, and the thread exits."""

    def __init__(self, engine: Engine, idle_wait: float = 0.05):
        self.engine = engine
        self.error: BaseException | None = None
        self.idle_wait = idle_wait  # how often an idle loop looks at the stop flag
        self._stop_requested = False
        self._aborted_all = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._consumers: dict[str, _Consumer] = {}
        self._thread: threading.Thread | None = None
        self.steps, self.step_seconds = 0, 0.0  # engine.step() calls and the time spent in them

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def accepting(self) -> bool:
        return self.alive and not self._stop_requested

    def start(self) -> EngineLoop:
        self._thread = threading.Thread(target=self._run, name="dsjax-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt: list[int], params: SamplingParams, request_id: str, queue: asyncio.Queue) -> None:
        """Queues a request whose outputs go to ``queue`` (of the running event loop). ValueError
        from the engine if the request cannot fit; EngineDead / RuntimeError when not accepting."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.error is not None:
                raise EngineDead(f"the engine failed: {self.error!r}")
            if not self.accepting:
                raise RuntimeError("the server is shutting down")
            self._consumers[request_id] = _Consumer(loop, queue, params.n)
            try:
                self.engine.add_request(prompt, params, request_id=request_id)
            except BaseException:
                del self._consumers[request_id]
                raise
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Ends a request; its last outputs (finish_reason "abort") still reach its queue."""
        with self._lock:
            if request_id not in self._consumers:
                return  # finished already
        self.engine.abort(request_id)
        self._wake.set()

    def request_stop(self) -> None:
        self._stop_requested = True

    def stop(self, timeout: float = 30.0) -> None:
        """Aborts every running request, lets the engine drain, and joins the thread."""
        self.request_stop()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if self._stop_requested and not self._aborted_all:
                    with self._lock:
                        self._aborted_all = True
                        running = list(self._consumers)
                    for rid in running:  # their outputs still reach the queues: finish_reason "abort"
                        engine.abort(rid)
                self._wake.clear()
                if not engine.has_work():
                    if self._stop_requested:
                        return
                    self._wake.wait(self.idle_wait)
                    continue
                t = time.perf_counter()
                outputs = engine.step()
                self.steps += 1
                self.step_seconds += time.perf_counter() - t
                if outputs:
                    self._deliver(outputs)
        except BaseException as e:  # noqa: BLE001 - whatever it is, the requests waiting must hear of it
            log.exception("the engine loop failed")
            self.error = e
            with self._lock:
                consumers, self._consumers = list(self._consumers.values()), {}
            dead = EngineDead(f"the engine failed: {e!r}")
            for c in consumers:
                with contextlib.suppress(RuntimeError):  # that event loop has closed
                    c.loop.call_soon_threadsafe(c.queue.put_nowait, dead)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for out in outputs:
                c = self._consumers.get(out.request_id)
                if c is None:
                    continue  # not submitted here, or its consumer has gone
                if out.finished:
                    c.remaining -= 1
                    if c.remaining == 0:
                        del self._consumers[out.request_id]
                batches.setdefault(c.loop, []).append((c.queue, out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop has closed: nobody is waiting for these
                for _, out in items:
                    self.abort(out.request_id)


# -- request bodies -----------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Common(BaseModel):
    """What both endpoints take. Unknown fields are ignored (as vLLM does); fields the engine
    cannot honour are refused in ``unsupported``."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    n: int | None = None  # None: 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extra: 0 or -1 turns it off
    stop: Any = None  # a string or a list of strings (checked in stop_strings)
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # vLLM's extra: keep generating past EOS
    speculative: bool | None = None  # dsjax's extra: MTP drafting (None: on when the server drafts)
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        out = [name for name in ("presence_penalty", "frequency_penalty") if getattr(self, name)]
        return out + (["logit_bias"] if self.logit_bias else [])


class CompletionRequest(_Common):
    prompt: Any = None  # a string, token ids, or a list of either (checked in completion_prompts)
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> list[str]:
        out = super().unsupported() + (["echo"] if self.echo else [])
        out += [name for name in ("logprobs", "suffix") if getattr(self, name) is not None]
        return out + (["best_of"] if self.best_of not in (None, 1, self.n) else [])


class ChatRequest(_Common):
    messages: Any = None  # a list of {"role", "content"} (checked in chat_messages)
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True  # vLLM's extra
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> list[str]:
        out = super().unsupported() + (["logprobs"] if self.logprobs or self.top_logprobs else [])
        out += ["tools"] if self.tools else []
        if self.response_format and self.response_format.get("type") != "text":
            out.append("response_format")
        return out


def stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise bad_request("stop: expected a string or a list of strings", "stop")


def sampling_params(req: _Common, max_tokens: int, speculative: bool = False) -> SamplingParams:
    """The request's settings; ``speculative``: the server's default for MTP drafting."""
    top_k = req.top_k if req.top_k is not None else 0
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if top_k == -1 else top_k,
            stop=stop_strings(req.stop),
            seed=req.seed,
            n=1 if req.n is None else req.n,
            ignore_eos=bool(req.ignore_eos),
            speculative=speculative if req.speculative is None else req.speculative,
        )
    except ValueError as e:
        name = str(e).split("=")[0].split(":")[0]
        raise bad_request(str(e), name if name.isidentifier() else None) from None


# -- chat templates -----------------------------------------------------------------------------


def chat_messages(messages: Any) -> list[dict]:
    """The request's messages as the template sees them: dicts with a string ``content`` (a list of
    text parts is joined with newlines, as vLLM does for string templates)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: expected a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}]: expected an object with a string role", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "\n".join(p["text"] for p in content)
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"messages[{i}].content: expected a string or a list of text parts", "messages")
        out.append({**m, "content": content})
    return out


# -- the app ------------------------------------------------------------------------------------


class _Call:
    """The engine requests of one API call (each prompt x n choices); their outputs in one queue,
    each as (choice index, output)."""

    def __init__(self, engine_loop: EngineLoop, prompts: list[list[int]], params: SamplingParams, call_id: str):
        self.engine_loop, self.n = engine_loop, params.n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rids: dict[str, int] = {}
        self.left = len(prompts) * params.n
        self.prompt_tokens, self.completion_tokens = sum(map(len, prompts)), 0
        try:
            for i, prompt in enumerate(prompts):
                rid = call_id if len(prompts) == 1 else f"{call_id}-{i}"
                engine_loop.submit(prompt, params, rid, self.queue)
                self.rids[rid] = i
        except ValueError as e:  # the engine's checks: the request cannot fit
            self.abort()
            raise bad_request(str(e), "max_tokens" if "max_tokens" in str(e) else None) from None
        except RuntimeError as e:  # EngineDead, or the server is stopping
            self.abort()
            raise APIError(503, str(e)) from None

    def abort(self) -> None:
        for rid in self.rids:
            self.engine_loop.abort(rid)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            while self.left:
                out = await self.queue.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    self.left -= 1
                    self.completion_tokens += out.completion_tokens
                yield self.rids[out.request_id] * self.n + out.index, out
        finally:
            if self.left:  # the client went away (or the server is stopping)
                self.abort()

    def usage(self) -> dict:
        p, c = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _until_disconnected(request: Request, call: _Call) -> None:
    """Aborts ``call`` if the client disconnects before its response is sent (as vLLM does)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            call.abort()
            return


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def make_app(
    engine: Engine,
    model_name: str,
    chat_template: str | None = None,
    special_tokens: dict[str, str] | None = None,
    *,
    api_key: str | None = None,
    root: str | None = None,
    engine_loop: EngineLoop | None = None,
) -> FastAPI:
    """The OpenAI-compatible app serving ``engine`` as ``model_name``. ``chat_template``: a Jinja
    chat template (the checkpoint's, ``dsjax.infer.chat.chat_settings``), else ``DEFAULT_CHAT_TEMPLATE``;
    ``special_tokens``: the strings the template sees as bos_token, eos_token, ... . ``api_key``:
    required as ``Authorization: Bearer KEY`` on /v1/ routes. The app's lifespan starts the engine
    loop (``app.state.engine_loop``) and stops it (running requests aborted)."""
    template = compile_chat_template(chat_template or DEFAULT_CHAT_TEMPLATE)
    special = {"bos_token": "", "eos_token": "", **(special_tokens or {})}
    tokenizer = engine.tokenizer
    bos_id = getattr(tokenizer, "bos_id", None)
    loop_ = engine_loop or EngineLoop(engine)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if loop_._thread is None:
            loop_.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop_.stop)

    app = FastAPI(title="dsjax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine_loop = loop_

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            error = (first.get("ctx") or {}).get("error", "")
            message, param = f"the request body is not valid JSON ({error})".replace(" ()", ""), None
        else:
            param = loc[0] if loc else None
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
            if "input" in first and loc:
                got = repr(first["input"])
                message += f" (got {got if len(got) <= 80 else got[:77] + '...'})"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return APIError(400, message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        response = APIError(e.status_code, str(e.detail)).response()
        for k, v in (e.headers or {}).items():
            response.headers[k] = v
        return response

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unexpected error")
        return APIError(500, f"internal error: {e!r}").response()

    if api_key is not None:

        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            if request.url.path.startswith("/v1/") and request.headers.get("authorization") != f"Bearer {api_key}":
                return APIError(401, "missing or wrong API key (Authorization: Bearer KEY)").response()
            return await call_next(request)

    @app.get("/health")
    async def health():
        if not loop_.alive:
            why = f"the engine failed: {loop_.error!r}" if loop_.error is not None else "the engine is not running"
            return APIError(503, why).response()
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "dsjax"}
        card |= {"root": root or model_name, "parent": None, "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    def check(req: _Common) -> None:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", "model")
        if req.unsupported():
            names = ", ".join(req.unsupported())
            raise bad_request(f"not supported by this server: {names}", req.unsupported()[0])
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options: only with stream=true", "stream_options")

    def encode_text(text: str) -> list[int]:
        ids = [int(t) for t in tokenizer.encode(text.encode())]
        if bos_id is not None:
            if not ids or ids[0] != bos_id:
                ids.insert(0, bos_id)
            while len(ids) > 1 and ids[1] == bos_id:  # a template's BOS and the tokenizer's own
                del ids[1]
        return ids

    def completion_prompts(prompt: Any) -> list[list[int]]:
        def is_ids(p):
            return isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

        if isinstance(prompt, str):
            return [encode_text(prompt)]
        if is_ids(prompt):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
            return [encode_text(p) if isinstance(p, str) else p for p in prompt]
        raise bad_request(
            "prompt: expected a string, a list of token ids, or a non-empty list of strings or of token-id lists",
            "prompt",
        )

    async def respond(request: Request, call: _Call, stream: bool, include_usage: bool, shape) -> Response:
        """Collects the call's outputs into one response, or streams them (``shape``: the endpoint's
        chunk / response builders)."""
        if stream:
            return StreamingResponse(_stream(call, include_usage, shape), media_type="text/event-stream")
        watcher = asyncio.create_task(_until_disconnected(request, call))
        choices: dict[int, dict] = {}
        try:
            async for index, out in call.outputs():
                choice = choices.setdefault(index, {"text": [], "finish_reason": None})
                choice["text"].append(out.text)
                if out.finished:
                    choice["finish_reason"] = out.finish_reason
        except EngineDead as e:
            raise APIError(500, str(e)) from None
        finally:
            watcher.cancel()
        done = [(i, "".join(c["text"]), c["finish_reason"]) for i, c in sorted(choices.items())]
        return JSONResponse(shape.response(done, call.usage()))

    async def _stream(call: _Call, include_usage: bool, shape) -> AsyncIterator[bytes]:
        outputs = call.outputs()
        try:
            for chunk in shape.start(call.left, include_usage):
                yield _sse(chunk)
            async for index, out in outputs:
                if out.text or out.finished:
                    yield _sse(shape.chunk(index, out.text, out.finish_reason, include_usage))
            if include_usage:
                yield _sse(shape.usage_chunk(call.usage()))
        except EngineDead as e:
            yield _sse({"error": {"message": str(e), "type": "InternalServerError", "param": None, "code": 500}})
        finally:
            await outputs.aclose()
        yield _sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check(req)
        prompts = completion_prompts(req.prompt)
        params = sampling_params(req, 16 if req.max_tokens is None else req.max_tokens, engine.depth > 0)
        call_id = f"cmpl-{uuid.uuid4().hex}"
        call = _Call(loop_, prompts, params, call_id)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await respond(request, call, bool(req.stream), include_usage, _CompletionShape(call_id, model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check(req)
        messages = chat_messages(req.messages)
        try:
            text = template.render(messages=messages, add_generation_prompt=req.add_generation_prompt, **special)
        except jinja2.exceptions.TemplateError as e:
            raise bad_request(f"the chat template cannot render these messages: {e}", "messages") from None
        prompt = encode_text(text)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = engine.max_model_len - len(prompt)
            if max_tokens < 1:
                raise bad_request(
                    f"the prompt ({len(prompt)} tokens) fills the context of {engine.max_model_len} tokens", "messages"
                )
        params = sampling_params(req, max_tokens, engine.depth > 0)
        call_id = f"chatcmpl-{uuid.uuid4().hex}"
        call = _Call(loop_, [prompt], params, call_id)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await respond(request, call, bool(req.stream), include_usage, _ChatShape(call_id, model_name))

    return app


class _CompletionShape:
    """The JSON of /v1/completions: chunks of object "text_completion", ids cmpl-..."""

    object = "text_completion"

    def __init__(self, call_id: str, model: str):
        self.head = {"id": call_id, "object": self.object, "created": int(time.time()), "model": model}

    def start(self, choices: int, include_usage: bool) -> list[dict]:
        return []

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}

    def chunk(self, index: int, text: str, finish_reason: str | None, include_usage: bool) -> dict:
        out = {**self.head, "choices": [self.choice(index, text, finish_reason)]}
        return {**out, "usage": None} if include_usage else out

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head, "choices": [], "usage": usage}

    def response(self, choices: list[tuple[int, str, str | None]], usage: dict) -> dict:
        return {**self.head, "choices": [self.choice(*c) for c in choices], "usage": usage}


class _ChatShape(_CompletionShape):
    """The JSON of /v1/chat/completions: "chat.completion" / "chat.completion.chunk", ids chatcmpl-..."""

    object = "chat.completion.chunk"

    def start(self, choices: int, include_usage: bool) -> list[dict]:  # each choice's first chunk names the role
        chunks = [{**self.head, "choices": [self._delta(i, {"role": "assistant", "content": ""}, None)]}
                  for i in range(choices)]  # fmt: skip
        return [{**c, "usage": None} for c in chunks] if include_usage else chunks

    @staticmethod
    def _delta(index: int, delta: dict, finish_reason: str | None) -> dict:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def chunk(self, index: int, text: str, finish_reason: str | None, include_usage: bool) -> dict:
        out = {**self.head, "choices": [self._delta(index, {"content": text} if text else {}, finish_reason)]}
        return {**out, "usage": None} if include_usage else out

    def response(self, choices: list[tuple[int, str, str | None]], usage: dict) -> dict:
        head = {**self.head, "object": "chat.completion"}
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
            for i, text, reason in choices
        ]
        return {**head, "choices": choices, "usage": usage}


# -- running it ---------------------------------------------------------------------------------


def warm_up(engine: Engine) -> None:
    """Compiles every shape the engine's steps use (``Engine.warm_up``) before the server listens."""
    engine.warm_up()


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: a free one), for ``Server.run(sockets=[...])``; OSError if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server for an app of ``make_app``: a SIGTERM / SIGINT (``handle_exit``) first aborts
    the engine's running requests, so the graceful shutdown that follows has no long request to wait
    for. ``on_started(server)`` runs once it listens."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[Server], None] | None = None):
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started(self)

    def handle_exit(self, sig, frame) -> None:
        engine_loop = getattr(self.config.app.state, "engine_loop", None) if hasattr(self.config, "app") else None
        if engine_loop is not None:
            engine_loop.request_stop()  # a flag only: safe in a signal handler
        super().handle_exit(sig, frame)
