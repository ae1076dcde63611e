"""Compile-only planning: will this training step fit on that TPU slice or GPU? No TPU or GPU needed.

AOT-compiles the real train step (``dsjax.train.step.make_train_step``, the one ``train`` runs) --
or, for a config with a ``grpo:`` section, GRPO's update (``grpo_update``: the frozen reference
policy's log-probs, then ``dsjax.rl.grpo.make_grpo_step``) -- for the topology's devices
(``dsjax.parallel.topology``) and reports the per-chip memory the compiler plans -- arguments
(parameters, optimizer state, reference policy, batch), temporaries (activations, gradients,
buffers), total against the chip's HBM -- and the compiled FLOPs per chip per step. For GPUs the
Triton kernels compile to the GPU's code and the Mosaic GPU kernels as far as lowering (their PTX
is built when the program loads on the GPU).

``plan_decode`` compiles a decode step instead: one new token for each of ``batch`` sequences whose
cache holds ``context`` positions (weights in model.dtype, as served), and reports the cache per
sequence beside the per-chip memory.
"""

from __future__ import annotations

import dataclasses
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import Config
from dsjax.model.params import training_flops_per_token
from dsjax.model.transformer import abstract_variables, build_model, init_cache
from dsjax.model.v4_block import layer_plan
from dsjax.parallel.mesh import check_divisible, make_mesh
from dsjax.parallel.rules import BATCH, batch_sharding, logical_shardings
from dsjax.parallel.topology import GIB, HBM_GIB, topology_devices
from dsjax.rl.grpo import make_grpo_step, make_logps_fn, rl_train_config
from dsjax.train.step import abstract_state, make_train_step, state_shardings

KERNEL_CALLS = ("@tpu_custom_call(", "@mosaic_gpu_v2(", "@__gpu$xla.gpu.triton(")  # Pallas kernels in lowered StableHLO


def plan(cfg: Config, topology: str) -> dict:
    """Compiles the train step (GRPO's update if ``cfg.grpo``) for ``topology`` (e.g. 'v5e:2x2',
    'v5p:8x8x8', 'h100:8'); returns the figures."""
    devices = topology_devices(topology)
    mesh = make_mesh(cfg.mesh, devices)
    model = build_model(cfg.model)
    batch_sh = batch_sharding(mesh)
    if cfg.grpo is not None:
        cfg = dataclasses.replace(cfg, train=rl_train_config(cfg))  # GRPO's optimizer schedule
    state_sh = state_shardings(cfg, model, mesh)
    state = abstract_state(cfg, model, state_sh)
    shape = _batch_shape(cfg)
    check_divisible(mesh, cfg.model, shape[0] // shape[2])
    tokens = jax.ShapeDtypeStruct(shape[:2], jnp.int32, sharding=batch_sh)
    if cfg.grpo is None:
        step, inputs = (
            make_train_step(cfg, model),
            (state, {"tokens": tokens, "segment_ids": tokens, "positions": tokens}),
        )
        in_shardings = (state_sh, batch_sh)
    else:
        step, inputs = grpo_update(cfg, model), (state, _reference(cfg, state, state_sh), _rollout_batch(cfg, tokens))
        in_shardings = (state_sh, None if inputs[1] is None else (state_sh.params, state_sh.bias), batch_sh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        step = jax.jit(step, in_shardings=in_shardings, out_shardings=(state_sh, None), donate_argnums=0)
        lowered = step.trace(*inputs).lower()
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
    flops = training_flops_per_token(cfg.model, shape[1]) * shape[0] * shape[1]
    if cfg.grpo is not None and cfg.grpo.beta > 0:
        flops *= 4 / 3  # + the reference's forward pass (a third of forward + backward)
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
        "model_flops_per_chip": flops / len(devices),
        "compile_s": time.perf_counter() - start,
        "pallas_kernel_calls": sum(lowered.as_text().count(call) for call in KERNEL_CALLS),
    }


def plan_decode(cfg: Config, topology: str, context: int, batch: int) -> dict:
    """Compiles ``decode`` for one new token per sequence over a cache of ``context`` positions for
    ``batch`` sequences (split over the batch axes of the mesh) on ``topology``; returns the figures,
    with the cache's bytes per sequence (every layer's, the MTP modules aside)."""
    devices = topology_devices(topology)
    mesh = make_mesh(cfg.mesh, devices)
    model, m = build_model(cfg.model), cfg.model
    check_divisible(mesh, m, batch)
    boxed = abstract_variables(m)

    def served(a, sharding):  # weights in the compute dtype; the hash tables stay integers
        dtype = m.dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype
        return jax.ShapeDtypeStruct(a.shape, dtype, sharding=sharding)

    variables = jax.tree.map(served, nn.meta.unbox(boxed), logical_shardings(mesh, boxed))
    cache = jax.eval_shape(lambda: init_cache(m, batch, context))
    cache_sh = {k: jax.tree.map(lambda a, k=k: _batch_split(mesh, a, _cache_lead(m, k)), c) for k, c in cache.items()}
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache, cache_sh)
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=batch_sharding(mesh))

    def step(variables, tokens, positions, cache):
        _, normed, cache, _ = model.apply(variables, tokens, positions, cache, method="decode")
        return jnp.argmax(model.apply(variables, normed, method="logits"), -1), cache

    start = time.perf_counter()
    with jax.set_mesh(mesh):
        jitted = jax.jit(step, out_shardings=(batch_sharding(mesh), cache_sh), donate_argnums=3)
        compiled = jitted.trace(variables, tokens, tokens, cache).lower().compile()
    mem = compiled.memory_analysis()
    kind = devices[0].device_kind
    args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    total = args + temp + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.generated_code_size_in_bytes
    cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return {
        "topology": topology,
        "device_kind": kind,
        "chips": len(devices),
        "mesh": dict(mesh.shape),
        "step": "decode",
        "batch_size": batch,
        "context": context,
        "cache_gib_per_sequence": cache_bytes / batch / GIB,
        "cache_bytes_per_token": cache_bytes / batch / context,
        "arguments_gib": args / GIB,
        "temporaries_gib": temp / GIB,
        "total_gib": total / GIB,
        "hbm_gib": HBM_GIB.get(kind),
        "fits": HBM_GIB.get(kind) is not None and total <= HBM_GIB[kind] * GIB,
        "compile_s": time.perf_counter() - start,
    }


def _cache_lead(cfg, name: str) -> int:
    """Leading layer axes of a cache entry: stacked V3 layers and scanned V4 runs have one."""
    if cfg.is_v4:
        return int(any(r.name == name and r.repeats > 1 for r in layer_plan(cfg)))
    return int(not name.startswith("mtp_"))


def _batch_split(mesh, a, lead: int):
    """A cache leaf's sharding: its batch axis (after ``lead`` layer axes) over the batch axes of the mesh."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*(None,) * lead, BATCH))


def grpo_update(cfg: Config, model):
    """(state, reference, batch) -> (state, metrics): the reference policy's token log-probs (``beta``
    > 0; ``reference`` = (params in ``model.dtype``, bias), else None), then one GRPO step -- what
    the recipe runs per policy update (``dsjax.rl.recipe.grpo_stage``: there as two programs), in
    one program, so that the plan holds the reference, the training state and the update's
    temporaries at once."""
    step, logps = make_grpo_step(cfg, model), make_logps_fn(model, cfg.grpo.temperature)

    def update(state, reference, batch):
        if reference is not None:
            batch = {**batch, "ref_logp": logps(*reference, batch)[0]}
        return step(state, batch)

    return update


def _batch_shape(cfg: Config) -> tuple[int, int, int]:
    """(sequences, length, microbatches) of one step: train.batch_size x train.seq_len, or for GRPO
    prompts_per_step x num_generations rollouts of train.seq_len tokens (prompt + completion)."""
    if cfg.grpo is None:
        return cfg.train.batch_size, cfg.train.seq_len, cfg.train.microbatches
    g = cfg.grpo
    return g.prompts_per_step * g.num_generations, cfg.train.seq_len, g.microbatches


def _reference(cfg: Config, state, shardings):
    """The frozen reference policy's abstract (params, bias): ``reference_copy``'s dtypes."""
    if cfg.grpo.beta == 0:
        return None

    def like(a, s, dtype):
        return jax.ShapeDtypeStruct(a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=s)

    params = jax.tree.map(lambda a, s: like(a, s, jnp.dtype(cfg.model.dtype)), state.params, shardings.params)
    return params, state.bias


def _rollout_batch(cfg: Config, tokens) -> dict:
    """make_grpo_step's abstract batch: the rollout sequences with their masks and advantages, the
    old log-probs (num_iterations > 1) and the rollout's experts (routing_replay)."""
    g, n, t = cfg.grpo, *tokens.shape
    like = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=tokens.sharding)  # noqa: E731
    batch = {"tokens": tokens, "segment_ids": tokens, "completion_mask": tokens, "advantages": like((n,), jnp.float32)}
    if g.num_iterations > 1:
        batch["old_logp"] = like((n, t), jnp.float32)
    if g.routing_replay and cfg.model.num_moe_layers:
        batch["routes"] = like((n, cfg.model.num_moe_layers, t, cfg.model.num_experts_per_tok), jnp.int32)
    return batch


def _head(topology, devices, mesh, cfg: Config) -> dict:
    sequences, length, micro = _batch_shape(cfg)
    return {
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "chips": len(devices),
        "mesh": dict(mesh.shape),
        "step": "pretrain" if cfg.grpo is None else "grpo",
        "batch_size": sequences,
        "seq_len": length,
        "microbatches": micro,
        "remat": cfg.model.remat,
        "expert_capacity_factor": cfg.model.expert_capacity_factor,
        **(
            {}
            if cfg.grpo is None
            else {"beta": cfg.grpo.beta, "reference_dtype": cfg.model.dtype if cfg.grpo.beta else None}
        ),
    }
