"""Device meshes and the one table of logical-axis rules.

Every parameter carries logical axis names (``nn.with_logical_partitioning`` in the modules); RULES
maps them onto the mesh axes ``data`` / ``fsdp`` / ``expert`` / ``tensor``:

    batch      -> (data, fsdp, expert)   every batch-sharding axis splits the sequences
    embed      -> fsdp                   parameters (and optimizer state) sharded over fsdp
    q_lora, kv_lora -> fsdp              (where embed has not taken fsdp: q_b_proj, kv_b_proj)
    heads, mlp, expert_mlp, vocab -> tensor
    experts    -> expert                 routed experts live on their expert-parallel device
    (*_dim, norm, layers, mtp_in: replicated)

The modules never name a mesh axis; ``dsjax.moe`` reads the mesh set with ``jax.set_mesh`` to
run expert parallelism inside ``shard_map``.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from dsjax.config import ConfigError, MeshConfig, ModelConfig
from pallas_kernels.platform import target_platform as platform  # noqa: F401  (re-exported)

AXES = ("data", "fsdp", "expert", "tensor")
BATCH = ("data", "fsdp", "expert")

RULES = (  # in order; an axis whose mesh axis is taken in that array falls through to the next rule
    ("batch", BATCH),
    ("embed", "fsdp"),
    ("q_lora", "fsdp"),  # q_b_proj / kv_b_proj: their input dim is the LoRA rank, not embed
    ("kv_lora", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("expert_mlp", "tensor"),
    ("experts", "expert"),
)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved (to the devices left); their product may not exceed the device count."""
    sizes = dataclasses.asdict(cfg)
    fixed = math.prod(n for n in sizes.values() if n != -1)
    rest = [a for a, n in sizes.items() if n == -1]
    if rest:
        if num_devices % fixed:
            raise ConfigError(f"mesh {sizes}: the fixed axes ({fixed} devices) do not divide the {num_devices} devices")
        sizes[rest[0]] = num_devices // fixed
    if math.prod(sizes.values()) > num_devices:
        raise ConfigError(f"mesh {sizes}: needs {math.prod(sizes.values())} devices, but there are {num_devices}")
    return sizes  # fewer than all devices (no -1 axis): the mesh takes the first ones


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, expert, tensor) mesh over ``devices`` (default: all), topology-aware."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    devices = devices[: math.prod(shape)]
    try:
        return jax.make_mesh(shape, AXES, devices=devices, axis_types=(AxisType.Auto,) * len(AXES))
    except NotImplementedError:  # an axis size that is no product of the torus' axes: split one
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def check(mesh: jax.sharding.Mesh, model: ModelConfig, batch_size: int | None = None) -> None:
    """Errors, before anything compiles, for sizes the mesh cannot split evenly."""
    n = mesh.shape
    rules = [
        (model.num_attention_heads, n["tensor"], "model.num_attention_heads", "mesh.tensor"),
        (model.intermediate_size, n["tensor"], "model.intermediate_size", "mesh.tensor"),
        (model.moe_intermediate_size, n["tensor"], "model.moe_intermediate_size", "mesh.tensor"),
        (model.vocab_size, n["tensor"], "model.vocab_size", "mesh.tensor"),
        (model.hidden_size, n["fsdp"], "model.hidden_size", "mesh.fsdp"),
        (model.n_routed_experts, n["expert"], "model.n_routed_experts", "mesh.expert"),
    ]
    if batch_size is not None:
        shards = math.prod(n[a] for a in BATCH)
        rules.append((batch_size, shards, "sequences per microbatch (train.batch_size / train.microbatches)",
                      f"the batch-sharding axes data x fsdp x expert = {shards}"))  # fmt: skip
    for size, parts, what, axis in rules:
        if size % parts:
            raise ConfigError(f"{what}={size} is not divisible by {axis}={parts}")


def spec(logical: tuple[str | None, ...]) -> P:
    """Logical axis names -> a PartitionSpec over the mesh axes (RULES)."""
    return nn.logical_to_mesh_axes(logical, RULES)


def shardings(mesh: jax.sharding.Mesh, boxed_tree):
    """NamedShardings for a tree of (abstract) values boxed with logical names; unboxed leaves replicate."""
    specs = nn.get_partition_spec(boxed_tree)
    return jax.tree.map(lambda s: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(s), RULES)), specs,
                        is_leaf=lambda s: isinstance(s, P))  # fmt: skip


def like(tree, template, template_shardings, default):
    """Shardings for ``tree`` (e.g. optimizer state): every subtree shaped like ``template`` (the
    params) gets ``template_shardings``; every other leaf ``default``."""
    structure = jax.tree.structure(template)

    def pick(sub):
        return template_shardings if jax.tree.structure(sub) == structure else default

    return jax.tree.map(pick, tree, is_leaf=lambda sub: jax.tree.structure(sub) == structure)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[batch, ...] arrays: sequences split over data x fsdp x expert."""
    return NamedSharding(mesh, P(BATCH))


def constrain(x, logical: tuple[str | None, ...]):
    """``with_sharding_constraint`` by logical names under the mesh set with ``jax.set_mesh``; a
    no-op without one (plain single-device use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(logical)))


def gather_along(x, axis: str, dim: int):
    """``all_gather(x, axis, axis=dim, tiled=True)`` inside a shard_map (FSDP's weight gather), gathered
    along a new leading dim and only then put in place. Gathered in place along an inner dim, the
    TPU compiler gave the collective a layout with that dim outermost and met it by copying the
    whole layer-stacked weight into that layout once per step, outside the layer loop: one more
    stacked weight per device, 1.6 GiB per routed-expert matrix at V3's depth (bench/RESULTS.md)."""
    dim %= x.ndim
    pieces = jnp.moveaxis(jax.lax.all_gather(x, axis, axis=0, tiled=False), 0, dim)  # [.., n, x.shape[dim], ..]
    return pieces.reshape(*x.shape[:dim], -1, *x.shape[dim + 1 :])


def put(tree, shardings_tree):
    """Host values -> global arrays with the given shardings (every process passes the whole value)."""

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings_tree)
