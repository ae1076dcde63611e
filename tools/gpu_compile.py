"""Compile the GPU kernels for real NVIDIA targets on a machine without a GPU (deviceless AOT).

XLA's CUDA plugin compiles for a described GPU (a ``GpuTargetConfig``) without one present: the
Triton kernels (flash MLA, latent decode, the FP8 GEMMs for Ada / Blackwell) go through Triton and
LLVM to the target's code, and the thunk sequence gives each kernel's shared memory -- so a kernel
that exceeds a GPU's shared memory, or uses an instruction it lacks, fails here as it would there.
Mosaic GPU kernels (Hopper's FP8 GEMMs) are lowered and embedded; their PTX is built when the
program loads on the device, so here they are checked only as far as lowering. The FP8 GEMMs go
through the dispatch (``impl="pallas"``), which refuses GPUs without e4m3 by name.

Needs the CUDA plugin (``pip install "jax[cuda13]"``, ~4.5 GB; not in the test extra), no GPU. The
GPUs are ``dsjax.parallel.topology.GPUS`` (``dsjax-aot --topology h100:1`` compiles a whole train step):

    python tools/gpu_compile.py [--gpus h100 a100 l4 t4] > gpu_compile.json
"""

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cases():
    """name -> (function, argument shapes): V3's head dims and FP8 GEMM shapes, bf16 attention."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.flash_mla import flash_mla
    from pallas_kernels.fp8_gemm import fp8_gemm
    from pallas_kernels.fp8_gmm import fp8_gmm, fp8_gmm_wgrad
    from pallas_kernels.mla_decode import mla_decode
    from pallas_kernels.quant import quantize_blocks, quantize_tiles

    sds = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    b, s, h = 2, 2048, 16

    def flash_train(*a):
        loss = lambda *x: flash_mla(*x, a[5], 0.1, backend="gpu").astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=range(5))(*a[:5])

    tiles = lambda m, k, axis=-1: jax.eval_shape(lambda x: quantize_tiles(x, axis), sds(m, k, dt=jnp.float32))  # noqa: E731
    blocks = lambda *shape: jax.eval_shape(quantize_blocks, sds(*shape, dt=jnp.float32))  # noqa: E731
    groups = sds(32, dt=jnp.int32)  # 4096 rows in 128-row blocks
    fp8 = dict(impl="pallas", platform="gpu")
    return {
        "flash_mla fwd+bwd": (
            flash_train,
            (
                sds(b, s, h, 128),
                sds(b, s, h, 64),
                sds(b, s, h, 128),
                sds(b, s, 64),
                sds(b, s, h, 128),
                sds(b, s, dt=jnp.int32),
            ),
        ),
        "mla_decode": (
            lambda *a: mla_decode(*a, 0.1, backend="gpu"),
            (sds(64, 128, 512), sds(64, 128, 64), sds(64, 4096, 512), sds(64, 4096, 64), sds(64, 128, dt=jnp.int32)),
        ),
        "fp8_gemm": (lambda *o: fp8_gemm(*o, **fp8), (*tiles(4096, 7168), *blocks(7168, 2048))),
        "fp8_gmm": (lambda *o: fp8_gmm(*o, **fp8), (*tiles(4096, 7168), *blocks(8, 7168, 2048), groups)),
        "fp8_gmm_wgrad": (
            lambda *o: fp8_gmm_wgrad(*o, 8, **fp8),
            (*tiles(4096, 7168, 0), *tiles(4096, 2048, 0), groups),
        ),
    }


KERNEL = re.compile(
    r"kCustomKernel .*?\] (\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes"
)


def compile_for(name: str, dump: Path) -> dict:
    import jax
    from jax.sharding import AbstractDevice, AbstractMesh, SingleDeviceSharding

    from dsjax.parallel.topology import GPUS, gpu_devices

    on_target = SingleDeviceSharding(gpu_devices(f"{name}:1")[0])
    kind, _, sms = GPUS[name][:3]
    results = {}
    for case, (f, shapes) in cases().items():
        args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_target) for x in shapes]
        before = set(dump.glob("*thunk_sequence.txt"))
        try:
            with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=AbstractDevice(kind, sms, "gpu"))):
                lowered = jax.jit(f).trace(*args).lower()  # the abstract device gives Pallas the target's capability
            text = lowered.compile().as_text()
        except Exception as e:  # noqa: BLE001 -- a refusal or a compile error is the result
            results[case] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        kernels = [
            {"kernel": k, "grid": g, "threads": t, "shared_memory_bytes": int(m)}
            for path in set(dump.glob("*thunk_sequence.txt")) - before
            for k, g, t, m in KERNEL.findall(path.read_text())
            if not re.search(r"fusion|transpose|copy|wrapped_", k)
        ]
        results[case] = {
            "ok": True,
            "kernels": kernels,
            "mosaic_gpu_calls": text.count('custom_call_target="mosaic_gpu'),
        }
    return results


def main():
    dump = Path(tempfile.mkdtemp(prefix="gpu_compile_"))  # XLA's thunk sequences: each kernel's shared memory
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()  # before JAX starts
    import jax

    from bench.common import environment
    from dsjax.parallel.topology import GPUS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", nargs="+", choices=sorted(GPUS), default=sorted(GPUS))
    a = ap.parse_args()
    jax.config.update("jax_platforms", "cpu")  # no GPU runtime: compile-only devices from the target configs
    print(json.dumps({"tool": "gpu_compile", **environment(), **{g: compile_for(g, dump) for g in a.gpus}}, indent=2))


if __name__ == "__main__":
    main()
