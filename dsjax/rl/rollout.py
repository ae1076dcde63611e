"""Rollouts: G sampled completions per prompt from the latent cache, laid out as the sequences the
GRPO update trains on. Sampled by ``dsjax.infer.generate`` (one batch of prompts x G rows decoded to
its end) or, ``paged``, by the serving engine (``dsjax.infer.engine``: each prompt read once, its G
completions forked over its cache pages; rows leave as they end).

Prompts are right-padded to a bucket length (a multiple of ``BUCKET`` tokens) and every rollout
batch has prompts_per_step x G rows, so the decoder and the update compile once per bucket, not once
per batch. Sequence i of the update is prompt_i then completion_i (EOS included when sampled) at
positions 0, 1, ..., padded to bucket + max_completion_length.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from dsjax.infer.engine import Engine, SamplingParams
from dsjax.infer.generate import generate

BUCKET = 32  # prompt lengths are padded to a multiple of this


@dataclasses.dataclass
class Rollout:
    tokens: np.ndarray  # [N, T] int32: prompt, completion, then 0
    prompt_lengths: np.ndarray  # [N]
    completion_lengths: np.ndarray  # [N] sampled tokens (EOS included)
    completions: list[str]  # decoded, EOS dropped
    truncated: np.ndarray  # [N] bool: stopped by max_completion_length, not EOS
    routes: np.ndarray | None  # [N, L_moe, T, K] experts the rollout chose (-1: none), or None
    stats: dict

    @property
    def segment_ids(self) -> np.ndarray:
        """1 on prompt and completion tokens, 0 on padding."""
        pos = np.arange(self.tokens.shape[1])
        return (pos[None] < (self.prompt_lengths + self.completion_lengths)[:, None]).astype(np.int32)

    @property
    def completion_mask(self) -> np.ndarray:
        """[N, T] 1 on the sampled tokens: the ones the policy gradient acts on."""
        pos = np.arange(self.tokens.shape[1])[None]
        start = self.prompt_lengths[:, None]
        return ((pos >= start) & (pos < start + self.completion_lengths[:, None])).astype(np.int32)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(prompt.encode()).tolist()]


def bucket_length(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def sample_completions(
    model_cfg,
    variables,
    tokenizer,
    prompts: list[str],
    num_generations: int,
    max_new_tokens: int,
    *,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    rng=None,
    speculative: bool = False,
    record_routes: bool = False,
    paged: bool = False,
) -> Rollout:
    """Each prompt's ``num_generations`` completions (adjacent rows), sampled in one batch; temperature
    0 decodes greedily (evaluation). ``paged``: through the serving engine (no MTP drafting)."""
    ids = [encode_prompt(tokenizer, p) for p in prompts for _ in range(num_generations)]
    lens = np.asarray([len(x) for x in ids], np.int32)
    width = bucket_length(int(lens.max()))
    record_routes = record_routes and model_cfg.num_moe_layers > 0
    sample = _paged if paged else _generated
    new, routes, stats = sample(
        model_cfg, variables, tokenizer, ids, num_generations, max_new_tokens, width,
        dict(temperature=temperature, top_p=top_p, top_k=top_k), rng, speculative, record_routes,
    )  # fmt: skip
    n = len(ids)
    tokens = np.zeros((n, width + max_new_tokens), np.int32)
    for i in range(n):
        tokens[i, : lens[i]] = ids[i]
        tokens[i, lens[i] : lens[i] + len(new[i])] = new[i]
    ended = np.asarray([len(t) > 0 and t[-1] == tokenizer.eos_id for t in new])
    texts = [tokenizer.decode(t[: len(t) - int(e)]) for t, e in zip(new, ended)]
    stats = {**stats, "rollout_tokens_per_s": round(sum(map(len, new)) / max(stats["sampling_s"], 1e-9), 1)}
    return Rollout(tokens, lens, np.asarray([len(t) for t in new], np.int32), texts, ~ended, routes, stats)


def _generated(cfg, variables, tokenizer, ids, group, max_new, width, sampling, rng, speculative, record_routes):
    """(new tokens per row, routes [N, L, T, K] or None, stats) from one ``generate`` batch."""
    lens = np.asarray([len(x) for x in ids], np.int32)
    arr = np.zeros((len(ids), width), np.int32)
    for row, x in zip(arr, ids):
        row[: len(x)] = x
    t = sampling["temperature"]
    out = generate(
        cfg, variables, (arr, lens), max_new, temperature=t, top_p=sampling["top_p"] if t > 0 else None,
        top_k=sampling["top_k"] or None, eos_id=tokenizer.eos_id, rng=rng, speculative=speculative,
        record_routes=record_routes,
    )  # fmt: skip
    new = [out.tokens[i, : out.lengths[i]].tolist() for i in range(len(ids))]
    routes = None if out.routes is None else np.ascontiguousarray(np.moveaxis(out.routes, 0, 1))
    return new, routes, {**out.stats, "sampling_s": out.stats["prefill_s"] + out.stats["decode_s"]}


def _paged(cfg, variables, tokenizer, ids, group, max_new, width, sampling, rng, speculative, record_routes):
    """The same from the serving engine: one request with n = ``group`` per prompt."""
    if speculative:
        raise ValueError("paged rollouts do not draft with the MTP modules yet: set speculative off")
    n_prompts = len(ids) // group
    seeds = np.asarray(jax.random.randint(rng if rng is not None else jax.random.key(0), (n_prompts,), 0, 2**31 - 1))
    engine = Engine(
        cfg, variables, tokenizer, max_batch=len(ids), page_size=16, max_model_len=width + max_new,
        prefill_chunk=width, prefill_rows=n_prompts, record_routes=record_routes,
    )  # fmt: skip
    t0 = time.perf_counter()
    rids = [
        engine.add_request(ids[i * group], SamplingParams(max_new, n=group, seed=int(seeds[i]), **sampling))
        for i in range(n_prompts)
    ]
    done = engine.run()
    seconds = time.perf_counter() - t0
    new, routes = [], None
    if record_routes:
        routes = np.full((len(ids), cfg.num_moe_layers, width + max_new, cfg.num_experts_per_tok), -1, np.int32)
    for p, rid in enumerate(rids):
        seqs: dict[int, list[int]] = {}
        for out in done[rid]:
            seqs.setdefault(out.index, []).extend(out.token_ids)
            if out.finished and routes is not None:
                routes[p * group + out.index, :, : out.routes.shape[1]] = out.routes
        new += [seqs[i] for i in range(group)]
    return new, routes, {"sampling_s": seconds, "decode_steps": engine.stats["decode_steps"]}
