"""Compile-only planning: will this training step fit on that TPU slice or GPU? No TPU or GPU needed.

    python -m dsjax.aot --config configs/deepseek_v3_671b.yaml --topology v5p:8x8x8 \
        mesh.fsdp=64 mesh.expert=8 train.seq_len=4096 train.batch_size=512 model.remat=full
    python -m dsjax.aot --config configs/tiny.yaml --topology h100:1 model.fp8=true

AOT-compiles the real train step (``dsjax.trainer.make_train_step``, the same as ``train.py`` runs)
for the topology's devices through ``jax.experimental.topologies`` and prints the per-chip memory
the compiler plans -- arguments (parameters, optimizer state, batch), temporaries (activations,
gradients, buffers), total against the chip's HBM -- and the compiled FLOPs per chip per step.
TPU slices need libtpu's compiler (``pip install -e ".[tpu]"``); GPUs (``h100:N``, ``a100:N``,
``l4:N``, ``t4:N``: N GPUs of one host) XLA's CUDA plugin (``pip install "jax[cuda13]"``), which
compiles for a described GPU (``GPUS``) without one: the Triton kernels to the GPU's code, the Mosaic
GPU kernels as far as lowering (their PTX is built when the program loads on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp

from dsjax import sharding
from dsjax.config import Config, ConfigError, load_config
from dsjax.flops import training_flops_per_token
from dsjax.model import Transformer
from dsjax.trainer import init_state, make_train_step, state_shardings

GIB = 2**30
# GPUs to compile for: name -> (device kind, compute capability, SMs, shared memory per block (opt-in)
# and per SM, clock GHz, memory bytes, memory B/s, L2 bytes) -- what XLA's GpuTargetConfig describes.
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, 233472, 1.98, 84929347584, 3352320000000, 52428800),
    "a100": ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912, 167936, 1.41, 85095874560, 2039000000000, 41943040),
    "l4": ("NVIDIA L4", (8, 9), 58, 101376, 102400, 2.04, 23580639232, 300000000000, 50331648),
    "t4": ("Tesla T4", (7, 5), 40, 65536, 65536, 1.59, 15828320256, 320000000000, 4194304),
}
# HBM per chip (GiB) by jax device_kind.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32, "TPU7x": 192,
           **{g[0]: round(g[6] / GIB, 1) for g in GPUS.values()}}  # fmt: skip
KERNEL_CALLS = ("@tpu_custom_call(", "@mosaic_gpu_v2(", "@__gpu$xla.gpu.triton(")  # Pallas kernels in lowered StableHLO


def plan(cfg: Config, topology: str) -> dict:
    """Compiles the train step for ``topology`` (e.g. 'v5e:2x2', 'v5p:8x8x8'); returns the figures."""
    devices = gpu_devices(topology) if topology.partition(":")[0] in GPUS else tpu_devices(topology)
    t = cfg.train
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check(mesh, cfg.model, t.batch_size // t.microbatches)
    model = Transformer(cfg.model)
    state_sh, batch_sh = state_shardings(cfg, model, mesh), sharding.batch_sharding(mesh)
    shaped = lambda tree, sh: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)  # noqa: E731
    state = shaped(jax.eval_shape(lambda: init_state(cfg, model, jax.random.key(0))), state_sh)
    tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=batch_sh)
    batch = {"tokens": tokens, "segment_ids": tokens, "positions": tokens}
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        step = jax.jit(make_train_step(cfg, model), in_shardings=(state_sh, batch_sh),
                       out_shardings=(state_sh, None), donate_argnums=0)  # fmt: skip
        lowered = step.trace(state, batch).lower()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that cannot fit
            oom = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
            if not oom:
                raise
            compiled = None
    if compiled is None:
        return {**head(topology, devices, mesh, cfg), "fits": False, "temporaries_gib": float(oom[1]),
                "hbm_gib": float(oom[2]), "compile_s": time.perf_counter() - start,
                "note": "the TPU compiler stopped: temporaries alone exceed HBM"}  # fmt: skip
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # none from XLA's GPU compiler
    kind = devices[0].device_kind
    args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    out_new = mem.output_size_in_bytes - mem.alias_size_in_bytes  # donated state: outputs reuse inputs
    total = args + temp + out_new + mem.generated_code_size_in_bytes
    tokens_per_step = t.batch_size * t.seq_len
    return {
        **head(topology, devices, mesh, cfg),
        "arguments_gib": args / GIB, "temporaries_gib": temp / GIB, "outputs_not_aliased_gib": out_new / GIB,
        "code_gib": mem.generated_code_size_in_bytes / GIB, "total_gib": total / GIB,
        "hbm_gib": HBM_GIB.get(kind), "fits": HBM_GIB.get(kind) is not None and total <= HBM_GIB[kind] * GIB,
        "compiled_flops_per_chip": float(cost.get("flops", float("nan"))),
        "model_flops_per_chip": training_flops_per_token(cfg.model, t.seq_len) * tokens_per_step / len(devices),
        "compile_s": time.perf_counter() - start,
        "pallas_kernel_calls": sum(lowered.as_text().count(call) for call in KERNEL_CALLS),
    }  # fmt: skip


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology (e.g. 'v5e:1x1', 'v5p:8x8x8') to compile for, from a host without one."""
    from jax.experimental import topologies

    def devices(**kw):
        return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kw).devices

    try:
        return devices()
    except Exception as e:  # no libtpu, or a name it does not know
        error = e
    # libtpu <= 0.0.48 (JAX 0.11) lays every slice out in 2x2 hosts: a smaller slice is one host of its own.
    dims = topology.partition(":")[2].split("x")
    if "chips_per_host_bounds" in str(error) and all(d.isdigit() for d in dims):
        try:
            return devices(chips_per_host_bounds=tuple(int(d) for d in dims + ["1"] * (3 - len(dims))))
        except Exception as e:
            error = e
    raise ConfigError(f"--topology {topology!r}: {error} (the TPU compiler comes with pip install -e '.[tpu]')")


def gpu_target_config(name: str) -> str:
    """XLA's GpuTargetConfigProto (text) for one of ``GPUS``."""
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
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 10 }} runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{kind}"
"""


def gpu_devices(topology: str) -> list:
    """The devices of ``name:N`` (N GPUs of one host, e.g. 'h100:8') to compile for, from a host without them."""
    from jax.experimental import topologies

    name, _, count = topology.partition(":")
    if not (count or "1").isdigit():
        raise ConfigError(f"--topology {topology!r}: a GPU topology is NAME:COUNT, e.g. h100:8 ({', '.join(GPUS)})")
    # The CUDA plugin checks the local CUDA libraries when JAX first starts its backends, and on a
    # host without a GPU that check fails (cuPTI cannot load) and leaves the plugin out: skip it,
    # nothing here runs on a local GPU. (Too late if this process started its backends already.)
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        return topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(name),
                                            topology=f"1x1x{count or 1}").devices  # fmt: skip
    except Exception as e:  # no CUDA plugin, or it refuses
        raise ConfigError(f"--topology {topology!r}: {type(e).__name__}: {e} (compiling for a GPU without one needs "
                          "XLA's CUDA plugin: pip install 'jax[cuda13]')") from None  # fmt: skip


def head(topology, devices, mesh, cfg: Config) -> dict:
    t = cfg.train
    return {"topology": topology, "device_kind": devices[0].device_kind, "chips": len(devices), "mesh": dict(mesh.shape),
            "batch_size": t.batch_size, "seq_len": t.seq_len, "microbatches": t.microbatches, "remat": cfg.model.remat,
            "expert_capacity_factor": cfg.model.expert_capacity_factor}  # fmt: skip


def table(r: dict) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in r["mesh"].items())
    hbm = f"{r['hbm_gib']} GiB" if r["hbm_gib"] else "unknown"
    verdict = "fits" if r["fits"] else "does NOT fit"
    title = (f"{r['topology']} ({r['chips']} x {r['device_kind']}), mesh {mesh}, batch {r['batch_size']} x {r['seq_len']}"
             f" ({r['microbatches']} microbatch(es)), remat {r['remat']}, capacity factor {r['expert_capacity_factor'] or 'dropless'}")  # fmt: skip
    if "note" in r:
        return f"{title}\n  per chip: temporaries {r['temporaries_gib']:.2f} GiB of {hbm} HBM: {verdict} ({r['note']})"
    return "\n".join([
        title,
        f"  per chip: arguments {r['arguments_gib']:8.2f} GiB   (parameters, optimizer state, batch)",
        f"            temporaries {r['temporaries_gib']:6.2f} GiB   (activations, gradients, buffers)",
        f"            outputs {r['outputs_not_aliased_gib']:10.2f} GiB   (not aliased to donated inputs)",
        f"            total {r['total_gib']:12.2f} GiB   of {hbm} HBM: {verdict}",
        f"  FLOPs per chip per step: analytic model {r['model_flops_per_chip']:.3e}; XLA cost analysis "
        f"{r['compiled_flops_per_chip']:.3e} (counts a layer-scan body once, Pallas kernels not at all)",
        f"  Pallas kernel calls in the step: {r['pallas_kernel_calls']}; compiled in {r['compile_s']:.0f} s",
    ])  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True, help=f"TPU slice (v5e:2x2, v5p:8x8x8, v6e:16x16) or GPUs ({', '.join(GPUS)}: e.g. h100:8)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. mesh.expert=8 model.remat=full")
    a = ap.parse_intermixed_args(argv)
    if a.topology.partition(":")[0] in GPUS:  # a host without that GPU: its runtime stays down, its compiler is used
        jax.config.update("jax_platforms", "cpu")
    try:
        r = plan(load_config(a.config, a.overrides), a.topology)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(r))
    if a.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
