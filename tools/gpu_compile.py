"""Compile the GPU kernels for real NVIDIA targets on a machine without a GPU (deviceless AOT).

XLA's CUDA plugin compiles for a described GPU (a ``GpuTargetConfig``) without one present: the
Triton kernels (flash MLA, latent decode, the FP8 GEMMs for Ada / Blackwell) go through Triton and
LLVM to the target's code, and the thunk sequence gives each kernel's shared memory -- so a kernel
that exceeds a GPU's shared memory, or uses an instruction it lacks, fails here as it would there.
Mosaic GPU kernels (Hopper's FP8 GEMMs) are lowered and embedded; their PTX is built when the
program loads on the device, so here they are checked only as far as lowering. The FP8 GEMMs go
through the dispatch (``impl="pallas"``), which refuses GPUs without e4m3 by name.

Needs the CUDA plugin (``pip install "jax[cuda13]"``, ~4.5 GB; not in the test extra), no GPU:

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

# name -> (device kind, compute capability, SMs, shared memory per block opt-in / per SM, clock GHz, HBM bytes, HBM B/s, L2 bytes)
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, 233472, 1.98, 84929347584, 3352320000000, 52428800),
    "a100": ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912, 167936, 1.41, 85095874560, 2039000000000, 41943040),
    "l4": ("NVIDIA L4", (8, 9), 58, 101376, 102400, 2.04, 23580639232, 300000000000, 50331648),
    "t4": ("Tesla T4", (7, 5), 40, 65536, 65536, 1.59, 15828320256, 320000000000, 4194304),
}


def target_config(name: str) -> str:
    """The GpuTargetConfigProto text XLA compiles against."""
    kind, (major, minor), sms, smem_block, smem_sm, ghz, mem, bw, l2 = GPUS[name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_sm} threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bw} l2_cache_size: {l2} clock_rate_ghz: {ghz} device_memory_size: {mem}
  shared_memory_per_block_optin: {smem_block}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{kind}"
"""


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
        "flash_mla fwd+bwd": (flash_train, (sds(b, s, h, 128), sds(b, s, h, 64), sds(b, s, h, 128), sds(b, s, 64),
                                            sds(b, s, h, 128), sds(b, s, dt=jnp.int32))),
        "mla_decode": (lambda *a: mla_decode(*a, 0.1, backend="gpu"),
                       (sds(64, 128, 512), sds(64, 128, 64), sds(64, 4096, 512), sds(64, 4096, 64), sds(64, 128, dt=jnp.int32))),
        "fp8_gemm": (lambda *o: fp8_gemm(*o, **fp8), (*tiles(4096, 7168), *blocks(7168, 2048))),
        "fp8_gmm": (lambda *o: fp8_gmm(*o, **fp8), (*tiles(4096, 7168), *blocks(8, 7168, 2048), groups)),
        "fp8_gmm_wgrad": (lambda *o: fp8_gmm_wgrad(*o, 8, **fp8), (*tiles(4096, 7168, 0), *tiles(4096, 2048, 0), groups)),
    }  # fmt: skip


KERNEL = re.compile(r"kCustomKernel .*?\] (\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes")


def compile_for(name: str, dump: Path) -> dict:
    import jax
    from jax.experimental import topologies
    from jax.sharding import AbstractDevice, AbstractMesh, SingleDeviceSharding

    topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(name), topology="1x1x1")
    on_target = SingleDeviceSharding(topology.devices[0])
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
        kernels = [{"kernel": k, "grid": g, "threads": t, "shared_memory_bytes": int(m)}
                   for path in set(dump.glob("*thunk_sequence.txt")) - before
                   for k, g, t, m in KERNEL.findall(path.read_text()) if not re.search(r"fusion|transpose|copy|wrapped_", k)]  # fmt: skip
        results[case] = {"ok": True, "kernels": kernels, "mosaic_gpu_calls": text.count('custom_call_target="mosaic_gpu')}
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", nargs="+", choices=sorted(GPUS), default=sorted(GPUS))
    a = ap.parse_args()
    dump = Path(tempfile.mkdtemp(prefix="gpu_compile_"))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
    import jax

    jax.config.update("jax_platforms", "cpu")  # no GPU runtime: compile-only devices from the target configs
    from bench.common import environment

    print(json.dumps({"tool": "gpu_compile", **environment(), **{g: compile_for(g, dump) for g in a.gpus}}, indent=2))


if __name__ == "__main__":
    main()
