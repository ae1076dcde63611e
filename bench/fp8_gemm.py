"""Block-scaled FP8 GEMM throughput (TFLOP/s) at DeepSeek-V3 shapes, next to XLA's dots.

Rows per (N, K): ``pallas`` (this backend's kernel through the dispatch, TPU / GPU only; on a GPU
also each GPU kernel by name: ``mosaic_gpu`` (Hopper wgmma) and ``triton``), ``xla`` (the jnp
reference: a scan over K blocks), and XLA's own ``bf16_dot`` and ``fp8_per_tensor_dot`` (e4m3
operands, one scale each: what XLA can fuse into an FP8 GEMM itself) on the same device, each with
its ratio to ``bf16_dot`` (the target on an H100: >= 1.3x), and each row's ``rel_err``: max |C -
C_ref| / max |C_ref| against the ``xla`` reference's output (the block-scaled rows take the same e4m3
operands, so theirs is bf16 rounding, and ``matches_reference`` is ``rel_err <= 1e-2``; the bf16 and
per-tensor dots show their own quantization's distance). A kernel that fails to compile or run is
recorded with its error, the other rows still measured. Operands are quantized
before timing (GEMM only); output bf16. M = 4096, (N, K) as in V3 (DeepGEMM's README: 1520 TFLOP/s at
4096 x 7168 x 16384 on an H800). ``--sweep`` adds a row per Mosaic GPU tile
configuration (``mosaic_gpu_tn{N tile}_s{TMA ring depth}``): one run on a lent H100 tunes it.

    python -m bench.fp8_gemm [--quick] [--sweep] [--repeats 10]
        [--impls pallas mosaic_gpu triton xla bf16_dot fp8_per_tensor_dot]
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from bench.common import environment
from pallas_kernels.fp8_gemm import fp8_gemm, fp8_gemm_gpu, fp8_gemm_mgpu
from pallas_kernels.quant import E4M3, quantize_blocks, quantize_tiles, scale_from_amax, to_e4m3

DEEPSEEK_NK = [(7168, 16384), (4096, 7168), (7168, 2048), (2112, 7168)]
QUICK_NK = [(512, 1024), (256, 512)]  # CPU: exercise the script, not the hardware
MGPU_SWEEP = {f"mosaic_gpu_tn{tn}_s{stages}": (tn, stages) for tn in (64, 128, 256) for stages in (2, 3, 4, 6)}
BLOCK_SCALED = (
    "pallas",
    "mosaic_gpu",
    "triton",
    "interpret",
    "xla",
    *MGPU_SWEEP,
)  # rows that must equal the jnp reference


def gemms(x, w):
    """name -> (jitted GEMM, its operands) for x [M, K], w [K, N]."""
    qa, sa = quantize_tiles(x)
    qb, sb = quantize_blocks(w)
    ta, tb = scale_from_amax(jnp.abs(x).max()), scale_from_amax(jnp.abs(w).max())
    pa, pb = to_e4m3(x, ta), to_e4m3(w, tb)
    per_tensor = lambda a, b, sa, sb: (jnp.dot(a, b, preferred_element_type=jnp.float32) * (sa * sb)).astype(
        jnp.bfloat16
    )  # noqa: E731
    return {
        "pallas": (jax.jit(lambda *o: fp8_gemm(*o, impl="pallas")), (qa, sa, qb, sb)),
        "mosaic_gpu": (jax.jit(lambda *o: fp8_gemm_mgpu(*o)), (qa, sa, qb, sb)),
        "triton": (jax.jit(lambda *o: fp8_gemm_gpu(*o)), (qa, sa, qb, sb)),
        "interpret": (jax.jit(lambda *o: fp8_gemm(*o, impl="interpret")), (qa, sa, qb, sb)),
        "xla": (jax.jit(lambda *o: fp8_gemm(*o, impl="xla")), (qa, sa, qb, sb)),
        "bf16_dot": (
            jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)),
            (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)),
        ),
        "fp8_per_tensor_dot": (jax.jit(per_tensor), (pa.astype(E4M3), pb.astype(E4M3), ta, tb)),
        **{
            name: (jax.jit(lambda *o, tn=tn, st=st: fp8_gemm_mgpu(*o, tn=tn, stages=st)), (qa, sa, qb, sb))
            for name, (tn, st) in MGPU_SWEEP.items()
        },
    }


def time_it(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))  # compile + warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (M=256) for a CPU")
    ap.add_argument(
        "--impls",
        nargs="+",
        default=None,
        help="default: pallas (TPU/GPU), mosaic_gpu and triton (GPU), xla, bf16_dot, fp8_per_tensor_dot",
    )
    ap.add_argument("--sweep", action="store_true", help="also each Mosaic GPU tile configuration (MGPU_SWEEP)")
    ap.add_argument("--m", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    backend = jax.default_backend()
    kernels = {"tpu": ["pallas"], "gpu": ["pallas", "mosaic_gpu", "triton"]}.get(backend, [])
    impls = (a.impls or kernels + ["xla", "bf16_dot", "fp8_per_tensor_dot"]) + (list(MGPU_SWEEP) if a.sweep else [])
    m = a.m or (256 if a.quick else 4096)
    rows = []
    for n, k in QUICK_NK if a.quick else DEEPSEEK_NK:
        kx, kw = jax.random.split(jax.random.key(n + k))
        x, w = jax.random.normal(kx, (m, k)), jax.random.normal(kw, (k, n)) * 0.02
        fns = gemms(x, w)
        ref = fns["xla"][0](*fns["xla"][1]).astype(jnp.float32)
        row = {"m": m, "n": n, "k": k}
        for name in impls:
            try:
                t = time_it(*fns[name], a.repeats)
                err = float(jnp.abs(fns[name][0](*fns[name][1]).astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
            except Exception as e:  # noqa: BLE001 -- a kernel that does not compile here is a result too
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                continue
            row[name] = {
                "ms": round(1e3 * t, 3),
                "tflops": round(2 * m * n * k / t / 1e12, 3),
                "rel_err": float(f"{err:.2e}"),
            }
            if name in BLOCK_SCALED:  # the same e4m3 operands and scales as the reference: bf16 rounding apart
                row[name]["matches_reference"] = err <= 1e-2
        if "ms" in row.get("bf16_dot", {}):
            for name in impls:
                if "ms" in row[name]:
                    row[name]["vs_bf16_dot"] = round(row["bf16_dot"]["ms"] / row[name]["ms"], 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # each row as it lands, should the run be cut short
    print(json.dumps({"benchmark": "fp8_gemm", **environment(), "out_dtype": "bfloat16", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
