"""Compile-only planning: will this training step fit on that TPU slice? No TPU needed.

    python -m dsjax.aot --config configs/deepseek_v3_671b.yaml --topology v5p:8x8x8 \
        mesh.fsdp=64 mesh.expert=8 train.seq_len=4096 train.batch_size=512 model.remat=full

AOT-compiles the real train step (``dsjax.trainer.make_train_step``, the same as ``train.py`` runs)
for the topology's devices through ``jax.experimental.topologies`` (needs ``pip install -e
".[tpu]"``: libtpu's compiler, run on this CPU host) and prints the per-chip memory the compiler
plans -- arguments (parameters, optimizer state, batch), temporaries (activations, gradients,
buffers), total against the chip's HBM -- and the compiled FLOPs per chip per step.
"""

from __future__ import annotations

import argparse
import json
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

# HBM per chip (GiB) by jax device_kind.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32, "TPU7x": 192}
GIB = 2**30


def plan(cfg: Config, topology: str) -> dict:
    """Compiles the train step for ``topology`` (e.g. 'v5e:2x2', 'v5p:8x8x8'); returns the figures."""
    devices = tpu_devices(topology)
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
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
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
        "pallas_kernel_calls": lowered.as_text().count("tpu_custom_call"),  # Mosaic kernels in the step
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
        f"  Pallas (Mosaic) kernel calls in the step: {r['pallas_kernel_calls']}; compiled in {r['compile_s']:.0f} s",
    ])  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x2, v5p:8x8x8, v6e:16x16")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. mesh.expert=8 model.remat=full")
    a = ap.parse_intermixed_args(argv)
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
