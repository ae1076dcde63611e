"""DeepSeek Sparse Attention (DSA) vs dense MLA attention in training: time vs context length L.

    python -m bench.sparse_attention [--lengths 2048 4096 8192 16384] [--topk 512] [--heads 16]
        [--sweep-length 8192] [--sweep-topk 256 512 1024 2048] [--repeats 3]

One sequence (batch 1), causal, bf16 inputs (softmax in fp32), DeepSeek head dims (nope / v 128, rope
64, latent 512); forward ("fwd") and forward + backward ("fwd_bwd": jax.grad of <output, a random
cotangent> w.r.t. the queries and the keys / latent cache), per path:

- dense, the baseline: MLA's training attention as XLA compiles the jnp references. ``expanded`` =
  ``mla_attention_reference`` (per-head k_nope / v, [h, L, L] scores in memory; skipped where its
  compiled buffers would pass --max-gb), ``expanded_blocked`` = the same on blocks of queries
  (``query_blocks``, each block under ``jax.checkpoint``: the memory-lean way, recomputing the
  block's scores in the backward), ``absorbed`` = ``latent_attention_reference`` (one 576-value
  latent KV head; about 3.4x the expanded form's FLOPs, so timed up to --absorbed-max-len only). The
  ratios use the fastest dense form measured at that L.
- sparse_core: ``sparse_latent_attention(impl="xla")`` over k = --topk random causal slots per query
  (sorted, -1 past the visible count of early queries): the attention over the selected slots only.
- indexer: ``select_top_k`` (lightning-indexer scores + top-k, forward only: the selection has no
  gradient), still O(L^2). whole_layer = indexer + sparse core, the two times added (the core needs
  the indexer's output, so they run one after the other anyway).
- sparse_bwd_parts: where the core's backward goes: its fwd_bwd with the gradient w.r.t. the queries
  only (no gradient w.r.t. c_kv / k_pe), and the scatter-adds that carry that gradient (the gathers'
  transpose) timed alone, in the core's query blocks.

Then the sparse core at L = --sweep-length for each k of --sweep-topk: its time grows with k, dense
attention's with L. Times are medians of --repeats runs after compiling ahead of time and one warm-up
run; a warm-up run over --slow-s seconds is itself the one sample ("runs": 1). ``temp_GB`` = XLA's
temporary buffers for the compiled function; one whose buffers would pass --max-gb is not run
("skipped", with what it needs). Read ``ratio``: dense / sparse, > 1 = DSA faster.
Prints one JSON object.
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import environment
from dsjax.config import ModelConfig
from dsjax.model.attention import (
    SPARSE_QUERY_BLOCK,
    AttentionMask,
    latent_attention_reference,
    mla_attention_reference,
    query_blocks,
    sparse_latent_attention,
)
from dsjax.model.indexer import select_top_k

DN, DR, DV, R = 128, 64, 128, 512  # DeepSeek-V3 head dims and latent rank
DT = jnp.bfloat16
SCALE = (DN + DR) ** -0.5


def timed(fn, *args, repeats: int, slow_s: float, max_gb: float) -> dict:
    """Median wall time (ms) of jitted fn(*args): compiled ahead of time, one warm-up run; not run
    (``skipped``) if its compiled buffers would need more than max_gb."""
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = round(mem.temp_size_in_bytes / 2**30, 2) if mem else None
    if mem and (need := (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30) > max_gb:
        return {"skipped": f"needs {need:.1f} GB > --max-gb {max_gb}", "temp_GB": temp}
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs = [time.perf_counter() - t0]
    if runs[0] < slow_s:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            runs.append(time.perf_counter() - t0)
    return {"ms": float(f"{1e3 * statistics.median(runs):.4g}"), "runs": len(runs), "temp_GB": temp}


def temp_gb(fn, *args) -> float:
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30 if mem else 0.0


def with_grad(fn, argnums):
    """(*args, cot) -> grads of <fn(*args), cot> w.r.t. args[argnums]."""

    def loss(*a):
        return jnp.vdot(fn(*a[:-1]).astype(jnp.float32), a[-1].astype(jnp.float32))

    return jax.grad(loss, argnums=argnums)


def causal_indices(length: int, topk: int, seed: int = 0) -> jax.Array:
    """[1, L, topk] int32: per query, topk random distinct slots <= its position, sorted; -1 past
    the position + 1 visible slots of early queries."""
    rng, out, block = np.random.default_rng(seed), np.full((length, topk), -1, np.int32), 512
    for s0 in range(0, length, block):
        pos = np.arange(s0, min(s0 + block, length))
        keys = rng.random((len(pos), length))
        keys[np.arange(length) > pos[:, None]] = np.inf  # not visible
        sel = np.argpartition(keys, topk - 1, axis=1)[:, :topk]
        sel = np.sort(np.where(np.take_along_axis(keys, sel, 1) < np.inf, sel, length), axis=1)
        out[pos] = np.where(sel < length, sel, -1)
    return jnp.asarray(out)[None]


def inputs(length: int, heads: int, index_heads: int, index_dim: int) -> dict:
    names = {
        "q_nope": (heads, DN), "q_pe": (heads, DR), "k_nope": (heads, DN), "k_pe": (DR,), "v": (heads, DV),
        "q_lat": (heads, R), "c_kv": (R,), "iq": (index_heads, index_dim), "ik": (index_dim,),
        "cot_expanded": (heads, DV), "cot_latent": (heads, R),
    }  # fmt: skip
    keys = jax.random.split(jax.random.key(length), len(names) + 1)
    x = {n: jax.random.normal(k, (1, length, *s), DT) for k, (n, s) in zip(keys, names.items())}
    x["iw"] = jax.random.normal(keys[-1], (1, length, index_heads), jnp.float32) * (index_heads * index_dim) ** -0.5
    return x


def dense_fns(length: int, block: int) -> dict:
    """name -> (attention fn, its argument names, cotangent name)."""
    mask = AttentionMask.causal(jnp.ones((1, length), jnp.int32))

    def expanded_block(qn, qp, limit, segment, kn, kp, v):
        return mla_attention_reference(qn, qp, kn, kp, v, mask.visible(limit, segment, length), SCALE)

    def expanded_blocked(qn, qp, kn, kp, v):
        return query_blocks(jax.checkpoint(expanded_block), block, (qn, qp, *mask.query_limits()), (kn, kp, v))

    expanded_args = ("q_nope", "q_pe", "k_nope", "k_pe", "v")
    return {
        "expanded": (lambda *a: mla_attention_reference(*a, mask, SCALE), expanded_args, "cot_expanded"),
        "expanded_blocked": (expanded_blocked, expanded_args, "cot_expanded"),
        "absorbed": (
            lambda *a: latent_attention_reference(*a, mask, SCALE),
            ("q_lat", "q_pe", "c_kv", "k_pe"),
            "cot_latent",
        ),
    }


def sparse_core(ql, qp, c, kp, indices):
    return sparse_latent_attention(ql, qp, c, kp, indices, SCALE, impl="xla")


def scatters_only(c, kp, indices):
    """The gathers' transpose alone: scatter-add of a [block, k, .] cotangent per query block into
    a gradient of c_kv / k_pe carried across blocks (what the core's backward does)."""
    b, s, k = indices.shape
    n = -(-s // SPARSE_QUERY_BLOCK)
    blocks = jnp.pad(indices, ((0, 0), (0, n * SPARSE_QUERY_BLOCK - s), (0, 0)), constant_values=-1)
    blocks = jnp.moveaxis(blocks.reshape(b, n, SPARSE_QUERY_BLOCK, k), 1, 0)

    def step(grads, ix):
        rows, slots = jnp.arange(b)[:, None, None], jnp.maximum(ix, 0)
        cot = (ix[..., None] % 7).astype(DT)  # a cheap stand-in for the cotangent of the gathered slots
        return (
            grads[0].at[rows, slots].add(jnp.broadcast_to(cot, (*ix.shape, R))),
            grads[1].at[rows, slots].add(jnp.broadcast_to(cot, (*ix.shape, DR))),
        ), None

    return jax.lax.scan(step, (jnp.zeros_like(c), jnp.zeros_like(kp)), blocks)[0]


def indexer_fn(cfg: ModelConfig, length: int, topk: int):
    mask = AttentionMask.causal(jnp.ones((1, length), jnp.int32))
    return lambda q, k, w: select_top_k(cfg, q, k, w, mask, topk)


def both(fn, x, names, cot, argnums, **kw) -> dict:
    args = [x[n] for n in names]
    return {"fwd": timed(fn, *args, **kw), "fwd_bwd": timed(with_grad(fn, argnums), *args, x[cot], **kw)}


def ratio(dense: dict, sparse: dict) -> float | None:
    return round(dense["ms"] / sparse["ms"], 2) if "ms" in dense and "ms" in sparse else None


def one_length(length: int, a, cfg: ModelConfig, kw: dict) -> dict:
    x = inputs(length, a.heads, cfg.index_n_heads, cfg.index_head_dim)
    indices = causal_indices(length, a.topk)
    row = {"L": length, "dense": {}}
    for name, (fn, names, cot) in dense_fns(length, a.dense_block).items():
        if name == "absorbed" and length > a.absorbed_max_len:
            row["dense"][name] = {"skipped": f"L > --absorbed-max-len {a.absorbed_max_len}"}
            continue
        if name != "expanded_blocked":
            need = temp_gb(with_grad(fn, tuple(range(len(names)))), *(x[n] for n in names), x[cot])
            if need > kw["max_gb"]:
                row["dense"][name] = {"skipped": f"fwd_bwd needs {need:.1f} GB > --max-gb {kw['max_gb']}"}
                continue
        row["dense"][name] = both(fn, x, names, cot, tuple(range(len(names))), **kw)
        print(json.dumps({"L": length, name: row["dense"][name]}), file=sys.stderr, flush=True)
    x["indices"] = indices
    core = ("q_lat", "q_pe", "c_kv", "k_pe", "indices")
    row["sparse_core"] = both(sparse_core, x, core, "cot_latent", (0, 1, 2, 3), **kw)
    row["indexer"] = {"fwd": timed(indexer_fn(cfg, length, a.topk), x["iq"], x["ik"], x["iw"], **kw)}
    idx_ms = row["indexer"]["fwd"]["ms"]
    row["whole_layer"] = {
        m: {"ms": round(t["ms"] + idx_ms, 1)} if "ms" in t else t for m, t in row["sparse_core"].items()
    }
    queries_only = with_grad(sparse_core, (0, 1))
    row["sparse_bwd_parts"] = {
        "fwd_bwd_queries_only_ms": timed(queries_only, *(x[n] for n in core), x["cot_latent"], **kw).get("ms"),
        "scatter_adds_ms": timed(scatters_only, x["c_kv"], x["k_pe"], indices, **kw).get("ms"),
    }
    row["ratio"] = {}
    for m in ("fwd", "fwd_bwd"):
        timings = {n: d[m] for n, d in row["dense"].items() if "ms" in d.get(m, {})}
        best = min(timings, key=lambda n: timings[n]["ms"])
        row["ratio"][m] = {
            "dense_baseline": best,
            "dense_over_sparse_core": ratio(timings[best], row["sparse_core"][m]),
            "dense_over_whole_layer": ratio(timings[best], row["whole_layer"][m]),
        }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--index-heads", type=int, default=16)
    ap.add_argument("--index-dim", type=int, default=64)
    ap.add_argument("--sweep-length", type=int, default=8192, help="L of the k sweep (0: no sweep)")
    ap.add_argument("--sweep-topk", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--dense-block", type=int, default=512, help="queries per block of expanded_blocked")
    ap.add_argument("--absorbed-max-len", type=int, default=2048)
    ap.add_argument("--max-gb", type=float, default=14.0, help="skip a function whose buffers need more")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow-s", type=float, default=10.0)
    a = ap.parse_args()
    cfg = ModelConfig(index_topk=a.topk, index_n_heads=a.index_heads, index_head_dim=a.index_dim)
    kw = {"repeats": a.repeats, "slow_s": a.slow_s, "max_gb": a.max_gb}
    t0 = time.perf_counter()
    rows = [one_length(length, a, cfg, kw) for length in a.lengths]
    sweep = {}
    if a.sweep_length:
        x = inputs(a.sweep_length, a.heads, a.index_heads, a.index_dim)
        for k in a.sweep_topk:
            x["indices"] = causal_indices(a.sweep_length, k)
            args = ("q_lat", "q_pe", "c_kv", "k_pe", "indices")
            sweep[k] = both(sparse_core, x, args, "cot_latent", (0, 1, 2, 3), **kw)
            print(json.dumps({"k": k, **sweep[k]}), file=sys.stderr, flush=True)
    sizes = {
        "batch": 1, "heads": a.heads, "qk_nope": DN, "qk_rope": DR, "v_head": DV, "kv_lora_rank": R,
        "index_heads": a.index_heads, "index_head_dim": a.index_dim, "topk": a.topk, "dtype": "bfloat16",
        "dense_block": a.dense_block, "sparse_query_block": SPARSE_QUERY_BLOCK,
    }  # fmt: skip
    notes = [
        "dense = fastest measured dense form per L; expanded_blocked recomputes each block's scores in the backward",
        "whole_layer = indexer fwd + sparse core; the indexer's own KL loss (O(L k)) is not timed",
        f"indexer {a.index_heads} x {a.index_dim} per pair vs {a.heads} heads x (192 + 128): DeepSeek-V3.2's "
        "ratio (64 x 128 vs 128 x 320, about 5x cheaper than dense)",
        "sparse_bwd_parts: the core's fwd_bwd without the latent gradient, and that gradient's scatter-adds alone",
    ]
    print(
        json.dumps(
            {
                "benchmark": "sparse_attention",
                **environment(),
                "command": " ".join(["python -m bench.sparse_attention", *sys.argv[1:]]),
                "sizes": sizes,
                "per_length": rows,
                "topk_sweep": {"L": a.sweep_length, "by_topk": sweep},
                "wall_s": round(time.perf_counter() - t0),
                "notes": notes,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
