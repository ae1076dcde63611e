"""Decode cost vs context length: absorbed MLA over the latent cache vs an expanded per-head K/V cache,
and MTP speculative vs plain decoding.

    python -m bench.decode [--contexts 512 1024 2048 4096 8192 16384 32768] [--repeats 10]

1. Per token, batch 1, at context C (the cache holds C tokens; content does not matter for time):
   one MLA layer's decode step (projections, cache write, attention, o_proj) reading the latent
   cache (the model's path: ``mla_attention_absorbed``) and reading an expanded per-head K/V cache
   (``ExpandedMLA`` below: k = [k_nope | k_pe], v per head, as an MHA cache); and the whole model's
   decode step (``Transformer.decode`` + head) with the latent cache. Cache bytes per token per
   layer are read from the cache arrays.
2. Greedy generation tokens/s (best of 3 warm runs; batch 1 and 4, 32-token prompts), plain vs
   speculative (1 MTP module), with random weights (drafts essentially never right) and with
   rigged weights (``echoing_variables``: drafts right 70-90% of the time).
3. DeepSeek-V3 dims: bytes per token per layer of both caches (576 vs 40960 values).
Prints JSON (device, date, jax version, ratios).
"""

import argparse
import json
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment
from dsjax.config import ModelConfig
from dsjax.infer.generate import generate
from dsjax.model import build_model, echoing_variables, init_cache, random_variables
from dsjax.model.mla import MLA, LatentCache
from dsjax.model.rope import rope_angles, softmax_scale


def bench_config() -> ModelConfig:
    """V3-shaped, CPU-sized: 16 heads, latent 256 + 32 (expanded: 16 x (96 + 64) = 2560 values)."""
    return ModelConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=16,
        q_lora_rank=256,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_position_embeddings=65536,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        num_nextn_predict_layers=1,
        initializer_range=0.02,
    )


@flax.struct.dataclass
class ExpandedCache:
    k: jax.Array  # [B, heads, T, qk_nope + qk_rope] (head-major: each head's keys contiguous)
    v: jax.Array  # [B, heads, T, v_head_dim]


class ExpandedMLA(MLA):
    """Baseline: the same layer decoding from an expanded per-head K/V cache (the usual MHA cache)."""

    def __call__(self, x, cos, sin, mask, cache: ExpandedCache, positions):
        """Writes k = [k_nope | k_pe] and v of the new tokens per head, then softmax(q.k * scale) v."""
        c = self.cfg
        _, q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        kv = self.kv_b_proj(c_kv)  # [B, S, h, dn + dv]
        k_pe = jnp.broadcast_to(k_pe[:, :, None], (*kv.shape[:3], c.qk_rope_head_dim))
        k, v = jnp.concatenate([kv[..., : c.qk_nope_head_dim], k_pe], -1), kv[..., c.qk_nope_head_dim :]
        b = jnp.arange(x.shape[0])[:, None]
        cache = ExpandedCache(cache.k.at[b, :, positions].set(k), cache.v.at[b, :, positions].set(v))
        q = jnp.concatenate([q_nope, q_pe], -1)
        scores = jnp.einsum("bshd,bhtd->bhst", q, cache.k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None], scores * softmax_scale(c), jnp.finfo(jnp.float32).min)
        out = jnp.einsum("bhst,bhtd->bshd", jax.nn.softmax(scores, -1).astype(cache.v.dtype), cache.v)
        return self.o_proj(out), cache, None  # MLA's outputs (no DSA indexer loss)


def time_ms(step, cache, repeats: int) -> float:
    """Best wall time of ``output, cache, _ = step(cache)`` (compiled and warmed up first)."""
    _, cache, _ = jax.block_until_ready(step(cache))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, cache, _ = jax.block_until_ready(step(cache))
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def nbytes_per_token_layer(cache, tokens: int, layers: int) -> float:
    """Bytes of the cache arrays per token slot per layer."""
    return sum(a.nbytes for a in jax.tree.leaves(cache)) / (tokens * layers)


def layer_decode(cfg: ModelConfig, params, context: int, repeats: int) -> dict:
    """One MLA layer, one token at position ``context`` over a cache of context + 1 slots."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 1, cfg.hidden_size)), jnp.float32)
    pos = jnp.full((1, 1), context)
    cos, sin = rope_angles(cfg, pos)
    mask = jnp.arange(context + 1) <= pos[..., None]
    h = cfg.num_attention_heads
    caches = {
        "latent": (MLA(cfg), LatentCache.zeros(cfg, 1, context + 1)),
        "expanded": (
            ExpandedMLA(cfg),
            ExpandedCache(
                jnp.zeros((1, h, context + 1, cfg.qk_head_dim)), jnp.zeros((1, h, context + 1, cfg.v_head_dim))
            ),
        ),
    }
    out = {}
    for name, (layer, cache) in caches.items():
        step = jax.jit(
            lambda c, layer=layer: layer.apply({"params": params}, x, cos, sin, mask, c, pos), donate_argnums=0
        )
        out[f"{name}_bytes"] = nbytes_per_token_layer(cache, context + 1, 1)
        out[f"{name}_ms"] = time_ms(step, cache, repeats)
    return out


def model_decode(cfg: ModelConfig, variables, context: int, repeats: int) -> float:
    """The whole model's decode step (one token, all layers, head) over a latent cache of context + 1 slots."""
    model = build_model(cfg)
    pos = jnp.full((1, 1), context)

    def step(variables, cache):
        _, normed, cache, _ = model.apply(variables, jnp.zeros((1, 1), jnp.int32), pos, cache, method="decode")
        return model.apply(variables, normed, method="logits"), cache, None

    step = jax.jit(step, donate_argnums=1)
    return time_ms(lambda c: step(variables, c), init_cache(cfg, 1, context + 1), repeats)


def speculative_vs_plain(cfg: ModelConfig, variables, batch: int, prompt_len: int, new: int, repeats: int) -> dict:
    """Greedy tokens/s (best of ``repeats`` warm runs), plain vs speculative, random and rigged weights."""
    prompts = np.random.default_rng(2).integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    out = {}
    for name, v in (("random", variables), ("rigged", echoing_variables(variables))):
        runs = {}
        for spec in (False, True):
            generate(cfg, v, prompts, new, speculative=spec)  # compile
            runs[spec] = max(
                (generate(cfg, v, prompts, new, speculative=spec) for _ in range(repeats)),
                key=lambda g: g.stats["decode_tokens_per_s"],
            )
        assert (runs[True].tokens == runs[False].tokens).all(), "speculative greedy != greedy"
        plain, spec = runs[False].stats, runs[True].stats
        out[name] = {
            "plain_tokens_per_s": plain["decode_tokens_per_s"],
            "speculative_tokens_per_s": spec["decode_tokens_per_s"],
            "speedup": round(spec["decode_tokens_per_s"] / plain["decode_tokens_per_s"], 3),
            "acceptance": spec["acceptance"],
            "tokens_per_step": spec["tokens_per_step"],
        }
    return out


def main():
    """The context sweep, speculative vs plain, V3 dims: prints one JSON line per context, then the summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="rows in the speculative vs plain runs")
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()

    cfg = bench_config()
    variables = jax.device_put(random_variables(cfg))
    layer_params = jax.tree.map(lambda w: w[0], variables["params"]["moe_layers"]["layers"]["self_attn"])
    rows = []
    for ctx in a.contexts:
        r = layer_decode(cfg, layer_params, ctx, a.repeats)
        rows.append(
            {
                "context": ctx,
                "layer_latent_ms": round(r["latent_ms"], 3),
                "layer_expanded_ms": round(r["expanded_ms"], 3),
                "layer_time_ratio_latent_vs_expanded": round(r["latent_ms"] / r["expanded_ms"], 3),
                "model_latent_ms_per_token": round(model_decode(cfg, variables, ctx, a.repeats), 3),
                "latent_bytes_per_token_layer": r["latent_bytes"],
                "expanded_bytes_per_token_layer": r["expanded_bytes"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    v3 = ModelConfig()
    latent, expanded = v3.kv_lora_rank + v3.qk_rope_head_dim, v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim)
    print(
        json.dumps(
            {
                "benchmark": "decode",
                **environment(),
                "config": {
                    k: getattr(cfg, k)
                    for k in (
                        "hidden_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "kv_lora_rank",
                        "qk_nope_head_dim",
                        "qk_rope_head_dim",
                        "v_head_dim",
                        "dtype",
                    )
                },
                "cache_bytes_ratio_latent_vs_expanded": round(
                    rows[0]["latent_bytes_per_token_layer"] / rows[0]["expanded_bytes_per_token_layer"], 4
                ),
                "contexts": rows,
                "speculative_vs_plain": [
                    {
                        "batch": b,
                        "prompt_len": 32,
                        "new_tokens": a.new_tokens,
                        **speculative_vs_plain(cfg, variables, b, 32, a.new_tokens, 3),
                    }
                    for b in a.batch
                ],
                "v3_dims_per_token_per_layer": {
                    "latent_values": latent,
                    "expanded_values": expanded,
                    "ratio": round(latent / expanded, 4),
                    "latent_bytes_bf16": 2 * latent,
                    "expanded_bytes_bf16": 2 * expanded,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
