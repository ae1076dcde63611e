"""Rollouts: G sampled completions per prompt from the latent cache (``dsjax.infer.generate``), laid
out as the sequences the GRPO update trains on.

Prompts are right-padded to a bucket length (a multiple of ``BUCKET`` tokens) and every rollout
batch has prompts_per_step x G rows, so the decoder and the update compile once per bucket, not once
per batch. Sequence i of the update is prompt_i then completion_i (EOS included when sampled) at
positions 0, 1, ..., padded to bucket + max_completion_length.
"""

from __future__ import annotations

import dataclasses

import numpy as np

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
) -> Rollout:
    """Each prompt's ``num_generations`` completions (adjacent rows), sampled in one batch; temperature
    0 decodes greedily (evaluation)."""
    ids = [encode_prompt(tokenizer, p) for p in prompts for _ in range(num_generations)]
    lens = np.asarray([len(x) for x in ids], np.int32)
    arr = np.zeros((len(ids), bucket_length(int(lens.max()))), np.int32)
    for row, x in zip(arr, ids):
        row[: len(x)] = x
    out = generate(
        model_cfg,
        variables,
        (arr, lens),
        max_new_tokens,
        temperature=temperature,
        top_p=top_p if temperature > 0 else None,
        top_k=top_k or None,
        eos_id=tokenizer.eos_id,
        rng=rng,
        speculative=speculative,
        record_routes=record_routes and model_cfg.num_moe_layers > 0,
    )
    n, width = len(ids), arr.shape[1] + max_new_tokens
    tokens = np.zeros((n, width), np.int32)
    tokens[:, : arr.shape[1]] = arr
    for i in range(n):
        tokens[i, lens[i] : lens[i] + out.lengths[i]] = out.tokens[i, : out.lengths[i]]
    ended = np.asarray([out.lengths[i] > 0 and out.tokens[i, out.lengths[i] - 1] == tokenizer.eos_id for i in range(n)])
    texts = [tokenizer.decode(out.tokens[i, : out.lengths[i] - int(ended[i])]) for i in range(n)]
    routes = None if out.routes is None else np.ascontiguousarray(np.moveaxis(out.routes, 0, 1))
    seconds = out.stats["prefill_s"] + out.stats["decode_s"]
    stats = {**out.stats, "rollout_tokens_per_s": round(out.stats["new_tokens"] / max(seconds, 1e-9), 1)}
    return Rollout(tokens, lens, np.asarray(out.lengths, np.int32), texts, ~ended, routes, stats)
