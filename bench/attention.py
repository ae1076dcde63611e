"""MLA attention kernels vs XLA: prefill TFLOP/s and decode effective bandwidth.

    python -m bench.attention [--quick] [--repeats 10]

1. Prefill / training attention, causal, MLA head dims (q/k 192 = 128 nope + 64 rope, v 128), bf16:
   forward and forward + backward time of the flash kernel (``pallas_kernels.flash_mla``), the jnp
   reference compiled by XLA (``mla_attention_reference``: [b, h, s, s] scores in memory) and
   ``jax.nn.dot_product_attention`` (cuDNN on GPU, XLA elsewhere; it wants one head dim for k and v,
   so v is zero-padded 128 -> 192 and the output sliced). TFLOP/s count the causal half only:
   forward 2 * s^2 / 2 * (192 + 128) per head, backward 2.5x the forward.
2. Decode in absorbed form over the latent cache (c_kv 512 + k_pe 64 per token, bf16), one token
   per row at the last position: split-K kernel (``pallas_kernels.mla_decode``) vs the jnp
   reference; effective bandwidth = bytes of cache read / time (the acceptance shape: batch 64,
   context 4096, 128 heads).
Each row also gives the output's relative error (``rel_err``: ||out - ref|| / ||ref||) against the jnp
reference computed in fp32 on the same bf16 inputs, so a run on an accelerator checks the compiled
kernels as it times them (bf16 rounding alone gives ~3e-3; ``matches_reference``: <= 1e-2).
On CPU there is no compiled kernel: the kernel rows are Pallas interpret mode (a correctness path,
timed only so the benchmark runs end to end; its speed means nothing). Prints JSON.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from bench.common import environment
from dsjax.model.attention import AttentionMask, latent_attention_reference, mla_attention_reference
from pallas_kernels.flash_mla import flash_mla
from pallas_kernels.mla_decode import mla_decode

DN, DR, DV, R = 128, 64, 128, 512  # DeepSeek-V3 head dims and latent rank


def best_ms(fn, *args, repeats: int) -> float:
    """Best wall time of fn(*args) in ms (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def sig(x: float) -> float:
    """x to 3 significant digits."""
    return float(f"{x:.3g}")


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in fp32, to 3 significant digits."""
    out = out.astype(jnp.float32)
    return sig(float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)))


def prefill_fns(kernel_backend: str, on_gpu: bool):
    """name -> attention(q_nope, q_pe, k_nope, k_pe, v, segment_ids) -> [b, s, h, dv]."""
    scale = (DN + DR) ** -0.5

    def dot_product_attention(qn, qp, kn, kp, v, seg):
        h = qn.shape[2]
        q = jnp.concatenate([qn, qp], -1)
        k = jnp.concatenate([kn, jnp.broadcast_to(kp[:, :, None], (*kp.shape[:2], h, DR))], -1)
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, DN + DR - DV)))
        out = jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn" if on_gpu else "xla"
        )
        return out[..., :DV]

    return {
        f"flash_mla ({kernel_backend})": lambda *a: flash_mla(*a[:5], a[5], scale, backend=kernel_backend),
        "xla (jnp reference)": lambda *a: mla_attention_reference(*a[:5], AttentionMask.causal(a[5]), scale),
        f"jax.nn.dot_product_attention ({'cudnn' if on_gpu else 'xla'})": dot_product_attention,
    }


def prefill(b: int, s: int, h: int, kernel_backend: str, on_gpu: bool, repeats: int) -> dict:
    ks = jax.random.split(jax.random.key(0), 6)
    shapes = [(b, s, h, DN), (b, s, h, DR), (b, s, h, DN), (b, s, DR), (b, s, h, DV)]
    args = [jax.random.normal(k, sh, jnp.bfloat16) for k, sh in zip(ks, shapes)] + [jnp.ones((b, s), jnp.int32)]
    cot = jax.random.normal(ks[5], (b, s, h, DV), jnp.bfloat16)
    flops = 2 * b * h * s * s / 2 * (DN + DR + DV)  # causal half: q.k (192) and p.v (128)
    row = {"batch": b, "seq": s, "heads": h}
    f32 = [x.astype(jnp.float32) for x in args[:5]]
    ref = jax.jit(lambda *a: mla_attention_reference(*a, AttentionMask.causal(args[5]), (DN + DR) ** -0.5))(*f32)
    for name, fn in prefill_fns(kernel_backend, on_gpu).items():
        fwd = jax.jit(fn)
        fwd_bwd = jax.jit(lambda *a, fn=fn: jax.vjp(lambda *x: fn(*x, a[5]), *a[:5])[1](cot))
        try:
            f_ms, fb_ms = best_ms(fwd, *args, repeats=repeats), best_ms(fwd_bwd, *args, repeats=repeats)
        except Exception as e:  # e.g. cuDNN refusing a shape: report it, keep the others
            row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        err = rel_err(fwd(*args), ref)
        row[name] = {
            "fwd_ms": round(f_ms, 3),
            "fwd_tflops": sig(flops / f_ms / 1e9),
            "fwd_bwd_ms": round(fb_ms, 3),
            "fwd_bwd_tflops": sig(3.5 * flops / fb_ms / 1e9),
            "rel_err": err,
            "matches_reference": err <= 1e-2,
        }
    return row


def decode(b: int, t: int, h: int, kernel_backend: str, repeats: int) -> dict:
    ks = jax.random.split(jax.random.key(1), 4)
    q_lat, q_pe = (
        jax.random.normal(ks[0], (b, 1, h, R), jnp.bfloat16),
        jax.random.normal(ks[1], (b, 1, h, DR), jnp.bfloat16),
    )
    c_kv, k_pe = jax.random.normal(ks[2], (b, t, R), jnp.bfloat16), jax.random.normal(ks[3], (b, t, DR), jnp.bfloat16)
    positions = jnp.full((b, 1), t - 1)
    scale = (DN + DR) ** -0.5
    cache_bytes = c_kv.nbytes + k_pe.nbytes
    fns = {
        f"mla_decode ({kernel_backend})": lambda ql, qp, c, kp: mla_decode(
            ql[:, 0], qp[:, 0], c, kp, jnp.full((b, h), t), scale, backend=kernel_backend
        ),
        "xla (jnp reference)": lambda ql, qp, c, kp: latent_attention_reference(
            ql, qp, c, kp, AttentionMask.cache(positions), scale
        ),
    }
    row = {"batch": b, "context": t, "heads": h, "cache_bytes": cache_bytes}
    f32 = [x.astype(jnp.float32) for x in (q_lat, q_pe, c_kv, k_pe)]
    ref = jax.jit(lambda *a: latent_attention_reference(*a, AttentionMask.cache(positions), scale))(*f32)
    for name, fn in fns.items():
        ms = best_ms(jax.jit(fn), q_lat, q_pe, c_kv, k_pe, repeats=repeats)
        err = rel_err(jax.jit(fn)(q_lat, q_pe, c_kv, k_pe).reshape(ref.shape), ref)
        row[name] = {
            "ms": round(ms, 4),
            "effective_GB_per_s": sig(cache_bytes / ms / 1e6),
            "rel_err": err,
            "matches_reference": err <= 1e-2,
        }
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU: exercises the benchmark)")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    backend = jax.default_backend()
    kernel_backend = backend if backend in ("tpu", "gpu") else "interpret"
    if a.quick:
        prefills, decodes = [(1, 128, 2), (1, 256, 2)], [(2, 256, 8)]
    else:
        prefills = [(2, s, 16) for s in (1024, 2048, 4096, 8192)]
        decodes = [(64, 4096, 128), (8, 4096, 128), (64, 16384, 128)]
    rows = {"prefill": [], "decode": []}
    for shape in prefills:
        rows["prefill"].append(prefill(*shape, kernel_backend, backend == "gpu", a.repeats))
        print(json.dumps(rows["prefill"][-1]), flush=True)
    for shape in decodes:
        rows["decode"].append(decode(*shape, kernel_backend, a.repeats))
        print(json.dumps(rows["decode"][-1]), flush=True)
    print(
        json.dumps(
            {"benchmark": "attention", **environment(), "kernel_backend": kernel_backend, "dtype": "bfloat16", **rows},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
