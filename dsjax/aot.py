"""Compile-only planning: will this training step fit on that TPU slice or GPU? No TPU or GPU needed.

AOT-compiles the real train step (``dsjax.train.step.make_train_step``, the one ``train`` runs)
for the topology's devices (``dsjax.parallel.topology``) and reports the per-chip memory the
compiler plans -- arguments (parameters, optimizer state, batch), temporaries (activations,
gradients, buffers), total against the chip's HBM -- and the compiled FLOPs per chip per step. For
GPUs the Triton kernels compile to the GPU's code and the Mosaic GPU kernels as far as lowering
(their PTX is built when the program loads on the GPU).
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp

from dsjax.config import Config
from dsjax.model.params import training_flops_per_token
from dsjax.model.transformer import Transformer
from dsjax.parallel.mesh import check_divisible, make_mesh
from dsjax.parallel.rules import batch_sharding
from dsjax.parallel.topology import GIB, HBM_GIB, topology_devices
from dsjax.train.step import abstract_state, make_train_step, state_shardings

KERNEL_CALLS = ("@tpu_custom_call(", "@mosaic_gpu_v2(", "@__gpu$xla.gpu.triton(")  # Pallas kernels in lowered StableHLO


def plan(cfg: Config, topology: str) -> dict:
    """Compiles the train step for ``topology`` (e.g. 'v5e:2x2', 'v5p:8x8x8', 'h100:8'); returns the figures."""
    devices = topology_devices(topology)
    t = cfg.train
    mesh = make_mesh(cfg.mesh, devices)
    check_divisible(mesh, cfg.model, t.batch_size // t.microbatches)
    model = Transformer(cfg.model)
    state_sh, batch_sh = state_shardings(cfg, model, mesh), batch_sharding(mesh)
    state = abstract_state(cfg, model, state_sh)
    tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.int32, sharding=batch_sh)
    batch = {"tokens": tokens, "segment_ids": tokens, "positions": tokens}
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        step = jax.jit(
            make_train_step(cfg, model),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, None),
            donate_argnums=0,
        )
        lowered = step.trace(state, batch).lower()
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that cannot fit
            oom = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(e))
            if not oom:
                raise
            compiled = None
    if compiled is None:
        return {
            **_head(topology, devices, mesh, cfg),
            "fits": False,
            "temporaries_gib": float(oom[1]),
            "hbm_gib": float(oom[2]),
            "compile_s": time.perf_counter() - start,
            "note": "the TPU compiler stopped: temporaries alone exceed HBM",
        }
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # none from XLA's GPU compiler
    kind = devices[0].device_kind
    args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    out_new = mem.output_size_in_bytes - mem.alias_size_in_bytes  # donated state: outputs reuse inputs
    total = args + temp + out_new + mem.generated_code_size_in_bytes
    tokens_per_step = t.batch_size * t.seq_len
    return {
        **_head(topology, devices, mesh, cfg),
        "arguments_gib": args / GIB,
        "temporaries_gib": temp / GIB,
        "outputs_not_aliased_gib": out_new / GIB,
        "code_gib": mem.generated_code_size_in_bytes / GIB,
        "total_gib": total / GIB,
        "hbm_gib": HBM_GIB.get(kind),
        "fits": HBM_GIB.get(kind) is not None and total <= HBM_GIB[kind] * GIB,
        "compiled_flops_per_chip": float(cost.get("flops", float("nan"))),
        "model_flops_per_chip": training_flops_per_token(cfg.model, t.seq_len) * tokens_per_step / len(devices),
        "compile_s": time.perf_counter() - start,
        "pallas_kernel_calls": sum(lowered.as_text().count(call) for call in KERNEL_CALLS),
    }


def _head(topology, devices, mesh, cfg: Config) -> dict:
    t = cfg.train
    return {
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "chips": len(devices),
        "mesh": dict(mesh.shape),
        "batch_size": t.batch_size,
        "seq_len": t.seq_len,
        "microbatches": t.microbatches,
        "remat": cfg.model.remat,
        "expert_capacity_factor": cfg.model.expert_capacity_factor,
    }
