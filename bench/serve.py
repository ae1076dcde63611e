"""Serving throughput: dsjax-serve under a bounded load vs the same requests as sequential ``generate`` calls.

    python -m bench.serve [--requests 64] [--max-tokens 64] [--time-limit 300] [--checkpoint DIR]
                          [--concurrency 1,4,16] [--stream]

The model is configs/tiny.yaml with random weights (seed 0; no checkpoint needed) unless
``--checkpoint`` names one. The server (dsjax.infer.server: FastAPI + uvicorn, the engine in its own
thread) runs in this process on a free localhost port; the load comes from the async ``openai``
client in this process's main thread. A fixed set of ``--requests`` completion requests (prompts of
mixed lengths as token ids, seed 0; greedy; ``ignore_eos`` so each produces exactly ``--max-tokens``
tokens) is sent at each concurrency (that many requests in flight, each client taking the next
request when its last one returns). The baseline is the same requests as sequential
``dsjax.infer.generate`` calls, one at a time, every prompt length compiled first. Both warm up
(compile) before timing. Past ``--time-limit`` seconds (the whole run) no new request is started and
what completed is reported. Prints one JSON line: device, date, the sequential baseline, and per
concurrency output tokens/s, requests/s, p50 / p99 request latency and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import environment

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LENGTHS = (8, 24, 48, 96)  # mixed; few distinct lengths, as each is a compile for generate


def requests_of(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(n)]
    return [[int(t) for t in rng.integers(0, min(vocab, 256), length)] for length in lengths]


def load_model(checkpoint: str | None):
    if checkpoint is None:
        from dsjax.config import load_config
        from dsjax.model import random_variables
        from dsjax.train.data import ByteTokenizer

        cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_nextn_predict_layers=0"]).model
        return "configs/tiny.yaml (random weights, seed 0)", cfg, random_variables(cfg, seed=0), ByteTokenizer()
    from dsjax.train.checkpoint import load_checkpoint

    cfg, variables, tokenizer = load_checkpoint(checkpoint)
    if tokenizer is None:
        raise SystemExit(f"--checkpoint {checkpoint} has no tokenizer.json")
    return checkpoint, cfg, variables, tokenizer


def sequential(cfg, variables, prompts, max_tokens, deadline) -> dict:
    """The baseline: each request alone through ``generate`` (greedy, no EOS), compiled first."""
    import jax

    from dsjax.infer import generate

    for length in sorted({len(p) for p in prompts}):  # compile every shape
        if time.perf_counter() > deadline:
            break
        generate(cfg, variables, [next(p for p in prompts if len(p) == length)], max_tokens)
    latencies, tokens, compute = [], 0, 0.0
    t0 = time.perf_counter()
    for p in prompts:
        if time.perf_counter() > deadline:
            break
        t = time.perf_counter()
        out = generate(cfg, variables, [p], max_tokens)
        jax.block_until_ready(out.tokens)
        latencies.append(time.perf_counter() - t)
        tokens += int(out.lengths[0])
        compute += out.stats["prefill_s"] + out.stats["decode_s"]
    row = summary(tokens, time.perf_counter() - t0, latencies, len(prompts))
    # generate's own prefill + decode time, without its per-call tracing: the model's speed alone
    row["compute_only_tokens_per_s"] = round(tokens / max(compute, 1e-9), 1)
    return row


def summary(tokens: int, seconds: float, latencies: list[float], wanted: int) -> dict:
    lat = np.asarray(latencies, dtype=float)
    pct = lambda q: round(float(np.percentile(lat, q)), 4) if len(lat) else None  # noqa: E731
    return {
        "requests": len(latencies),
        "complete": len(latencies) == wanted,
        "seconds": round(seconds, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
        "requests_per_s": round(len(latencies) / max(seconds, 1e-9), 2),
        "p50_latency_s": pct(50),
        "p99_latency_s": pct(99),
    }


def profile(cfg, variables, tokenizer, prompts, max_tokens, sizes, max_model_len, concurrency) -> dict:
    """Where the time goes at ``concurrency``: the engine alone (no HTTP), ``concurrency`` requests
    in flight, its steps split into the decode forward [max_batch, 1], the prefill forwards [1,
    prefill_chunk], sampling and the rest (host-side Python); and ``generate``'s own decode step
    (contiguous cache, whole loop compiled) at batch 1 and at batch ``concurrency``."""
    from collections import Counter

    import jax

    import dsjax.infer.engine as engine_module
    from dsjax.infer import generate
    from dsjax.infer.engine import Engine, SamplingParams
    from dsjax.infer.server import warm_up

    engine = Engine(cfg, variables, tokenizer, **sizes, max_model_len=max_model_len)
    warm_up(engine)
    spent, forward, sample = Counter(), engine_module._forward, engine._sample

    def timed_forward(cfg, variables, cache, tokens, *rest):
        t = time.perf_counter()
        out = forward(cfg, variables, cache, tokens, *rest)
        jax.block_until_ready(out[0])
        spent["decode_forward" if tokens.shape[1] == 1 else "prefill_forward"] += time.perf_counter() - t
        return out

    def timed_sample(*args):
        t = time.perf_counter()
        out = sample(*args)
        spent["sample"] += time.perf_counter() - t
        return out

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    queue, in_flight, tokens, steps = list(prompts)[::-1], 0, 0, 0
    engine_module._forward, engine._sample = timed_forward, timed_sample
    try:
        t0 = time.perf_counter()
        while queue or engine.has_work():
            while queue and in_flight < concurrency:
                engine.add_request(queue.pop(), params)
                in_flight += 1
            for out in engine.step():
                tokens += len(out.token_ids)
                in_flight -= out.finished
            steps += 1
        seconds = time.perf_counter() - t0
    finally:
        engine_module._forward = forward
    ms = {k: round(1e3 * v / steps, 3) for k, v in spent.items()}
    gen = {}
    for b in (1, concurrency):
        batch = [prompts[i % len(prompts)] for i in range(b)]
        generate(cfg, variables, batch, max_tokens)  # compiled first
        stats = generate(cfg, variables, batch, max_tokens).stats
        gen[f"generate_decode_step_ms_batch_{b}"] = round(1e3 * stats["decode_s"] / stats["steps"], 3)
    return {
        "concurrency": concurrency,
        "engine_alone_tokens_per_s": round(tokens / seconds, 1),
        "engine_steps": steps,
        "ms_per_step": round(1e3 * seconds / steps, 3),
        "decode_forward_ms_per_step": ms.get("decode_forward", 0.0),
        "prefill_forward_ms_per_step": ms.get("prefill_forward", 0.0),
        "sample_ms_per_step": ms.get("sample", 0.0),
        "host_ms_per_step": round(1e3 * seconds / steps - sum(ms.values()), 3),
        **gen,
    }


async def load(base_url: str, model: str, prompts, max_tokens: int, concurrency: int, deadline: float, stream: bool):
    """``concurrency`` clients, each sending the next request of ``prompts`` when its last returns."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    queue = list(enumerate(prompts))[::-1]
    latencies, tokens = [], [0]

    async def one(prompt) -> int:
        kw = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, extra_body={"ignore_eos": True})
        if not stream:
            return (await client.completions.create(**kw)).usage.completion_tokens
        usage = None
        async for chunk in await client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def worker():
        while queue and time.perf_counter() < deadline:
            _, prompt = queue.pop()
            t = time.perf_counter()
            new = await one(prompt)
            tokens[0] += new
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    await client.close()
    return summary(tokens[0], seconds, latencies, len(prompts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds for the whole run")
    ap.add_argument("--checkpoint", help="a training run or hub directory (default: tiny, random weights)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=128)
    ap.add_argument("--stream", action="store_true", help="stream the completions (server-sent events)")
    ap.add_argument("--profile", action="store_true", help="also time the engine alone and its step's parts")
    a = ap.parse_args(argv)
    start = time.perf_counter()
    deadline = start + a.time_limit
    load_at_start = os.getloadavg()[0]  # other work on the machine shows in every figure
    levels = [int(c) for c in a.concurrency.split(",")]

    import uvicorn

    from dsjax.infer import server
    from dsjax.infer.engine import Engine

    name, cfg, variables, tokenizer = load_model(a.checkpoint)
    prompts = requests_of(a.requests, cfg.vocab_size)
    max_model_len = max(map(len, prompts)) + a.max_tokens
    baseline = sequential(cfg, variables, prompts, a.max_tokens, deadline)

    sizes = {"max_batch": a.max_batch, "page_size": a.page_size, "prefill_chunk": a.prefill_chunk}
    engine = Engine(cfg, variables, tokenizer, **sizes, max_model_len=max_model_len)
    server.warm_up(engine)
    app = server.make_app(engine, "bench")
    engine_loop = app.state.engine_loop
    sock = server.listening_socket("127.0.0.1", 0)
    srv = server.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    rows = {}
    try:  # past the deadline: load() starts no request and the loop below ends at once
        warm = [prompts[i] for i in range(len(PROMPT_LENGTHS))] * 4  # the HTTP path, every prompt length
        asyncio.run(load(base_url, "bench", warm, 4, max(levels), deadline, a.stream))
        for c in levels:
            if time.perf_counter() > deadline:
                break
            steps, busy = engine_loop.steps, engine_loop.step_seconds
            row = asyncio.run(load(base_url, "bench", prompts, a.max_tokens, c, deadline, a.stream))
            row["engine_steps"], busy = engine_loop.steps - steps, engine_loop.step_seconds - busy
            row["ms_per_engine_step"] = round(1e3 * busy / max(row["engine_steps"], 1), 2)
            row["engine_busy_fraction"] = round(busy / row["seconds"], 3)  # of the wall time: in engine.step()
            for key, base in (("", "tokens_per_s"), ("_compute_only", "compute_only_tokens_per_s")):
                ratio = row["tokens_per_s"] / baseline[base] if baseline[base] else None  # None: no baseline in time
                row[f"ratio_to_sequential{key}"] = None if ratio is None else round(ratio, 2)
            rows[str(c)] = row
    finally:
        srv.handle_exit(15, None)
        thread.join(30)
    out = {
        "benchmark": "serve",
        **environment(),
        "model": name,
        "requests": a.requests,
        "max_tokens": a.max_tokens,
        "prompt_lengths": list(PROMPT_LENGTHS),
        "stream": a.stream,
        "engine": {**sizes, "max_model_len": max_model_len},
        "sequential_generate": baseline,
        "concurrency": rows,
        "load_average_1min": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],  # at start, at end
        "time_limit_s": a.time_limit,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    if a.profile and time.perf_counter() < deadline:
        out["profile"] = profile(cfg, variables, tokenizer, prompts, a.max_tokens, sizes, max_model_len, max(levels))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
