"""DeepSeek Sparse Attention (DSA) at decode: one new token per sequence over a long latent cache.

    python -m bench.sparse_decode [--contexts 4096 16384 65536] [--batch 4] [--topk 2048 512]
        [--heads 16] [--index-heads 16] [--index-dim 64] [--repeats 20]

Per decode step, batch B, each sequence's cache full to T slots (the new query at position T - 1),
bf16 cache, absorbed MLA (q_lat 512 + q_pe 64 per head over c_kv 512 + k_pe 64 per slot):

- dense: ``latent_attention_reference`` over every slot (``AttentionMask.cache(positions)``);
- dsa: the indexer's top-k over the cached indexer keys (``select_top_k`` with the cache mask) and
  ``sparse_latent_attention(impl="xla")`` over the k selected slots, in one jitted function; beside
  it its two parts timed apart: ``indexer`` (still reads all T index keys) and ``sparse_core``.

Times are medians of --repeats runs after compiling and one warm-up run (``bench.sparse_attention.timed``).
``ratio``: dense / dsa (and dense / core), > 1 = DSA faster. ``cache_bytes_per_token``: one layer's
LatentCache per token in bf16 without and with DSA's indexer key (576 vs 576 + index_head_dim
values), at these sizes and at DeepSeek-V3.2's (index_head_dim 128). Prints one JSON object.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from bench.common import environment
from bench.sparse_attention import DR, SCALE, R, timed
from dsjax.config import ModelConfig
from dsjax.model.attention import AttentionMask, latent_attention_reference, sparse_latent_attention
from dsjax.model.indexer import select_top_k
from dsjax.model.mla import LatentCache

DT = jnp.bfloat16


def cache_bytes(index_dim: int) -> dict:
    """Bytes per token of one layer's bf16 LatentCache: V3 (no indexer) and with DSA's index key."""
    per_token = {}
    for name, topk in (("v3", 0), ("dsa", 1)):
        cfg = ModelConfig(
            dtype="bfloat16", kv_lora_rank=R, qk_rope_head_dim=DR, index_topk=topk, index_head_dim=index_dim
        )
        per_token[name] = sum(a.nbytes for a in jax.tree.leaves(LatentCache.zeros(cfg, 1, 1)))
    return {**per_token, "dsa_over_v3": round(per_token["dsa"] / per_token["v3"], 3)}


def one_context(t: int, a, cfg: ModelConfig, kw: dict) -> dict:
    b, h = a.batch, a.heads
    keys = jax.random.split(jax.random.key(t), 7)
    q_lat, q_pe = jax.random.normal(keys[0], (b, 1, h, R), DT), jax.random.normal(keys[1], (b, 1, h, DR), DT)
    c_kv, k_pe = jax.random.normal(keys[2], (b, t, R), DT), jax.random.normal(keys[3], (b, t, DR), DT)
    iq = jax.random.normal(keys[4], (b, 1, a.index_heads, a.index_dim), DT)
    ik = jax.random.normal(keys[5], (b, t, a.index_dim), DT)
    iw = jax.random.normal(keys[6], (b, 1, a.index_heads), jnp.float32) * (a.index_heads * a.index_dim) ** -0.5
    mask = AttentionMask.cache(jnp.full((b, 1), t - 1))
    latent = (q_lat, q_pe, c_kv, k_pe)
    row = {"T": t, "dense": timed(lambda *x: latent_attention_reference(*x, mask, SCALE), *latent, **kw)}
    for k in a.topk:
        indexer = lambda q, kk, w, k=k: select_top_k(cfg, q, kk, w, mask, k)  # noqa: E731
        core = lambda ql, qp, c, kp, ix: sparse_latent_attention(ql, qp, c, kp, ix, SCALE, impl="xla")  # noqa: E731
        dsa = {
            "dsa": timed(lambda *x: core(*x[:4], indexer(*x[4:])), *latent, iq, ik, iw, **kw),
            "indexer": timed(indexer, iq, ik, iw, **kw),
            "sparse_core": timed(core, *latent, indexer(iq, ik, iw), **kw),
        }
        dsa["ratio"] = {
            "dense_over_dsa": round(row["dense"]["ms"] / dsa["dsa"]["ms"], 2),
            "dense_over_core": round(row["dense"]["ms"] / dsa["sparse_core"]["ms"], 2),
        }
        row[f"k={k}"] = dsa
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--topk", type=int, nargs="+", default=[2048, 512])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--index-heads", type=int, default=16)
    ap.add_argument("--index-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    cfg = ModelConfig(index_topk=max(a.topk), index_n_heads=a.index_heads, index_head_dim=a.index_dim)
    kw = {"repeats": a.repeats, "slow_s": 10.0, "max_gb": 14.0}
    t0 = time.perf_counter()
    rows = [one_context(t, a, cfg, kw) for t in a.contexts]
    sizes = {
        "batch": a.batch, "heads": a.heads, "kv_lora_rank": R, "qk_rope": DR, "index_heads": a.index_heads,
        "index_head_dim": a.index_dim, "topk": a.topk, "dtype": "bfloat16", "position": "T - 1 (cache full)",
    }  # fmt: skip
    print(
        json.dumps(
            {
                "benchmark": "sparse_decode",
                **environment(),
                "command": " ".join(["python -m bench.sparse_decode", *sys.argv[1:]]),
                "sizes": sizes,
                "cache_bytes_per_token": {
                    f"index_head_dim {a.index_dim}": cache_bytes(a.index_dim),
                    "index_head_dim 128 (V3.2)": cache_bytes(128),
                },
                "per_context": rows,
                "wall_s": round(time.perf_counter() - t0),
                "notes": [
                    "dsa = indexer top-k + sparse core in one jit; indexer and sparse_core are its parts timed apart",
                    "attention only: W_UK absorption, W_UV and the projections (the same in both) are not timed",
                ],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
