"""The device mesh: its shape from ``MeshConfig``, sizes it must split evenly, and global arrays on it."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType

from dsjax.config import ConfigError, MeshConfig, ModelConfig
from dsjax.parallel.rules import BATCH, MESH_AXES, mesh_axes


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
    shape = tuple(sizes[a] for a in MESH_AXES)
    devices = devices[: math.prod(shape)]
    try:
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    except NotImplementedError:  # an axis size that is no product of the torus' axes: split one
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def check_divisible(mesh: jax.sharding.Mesh, model: ModelConfig, batch_size: int | None = None) -> None:
    """ConfigError, before anything compiles, for a size the mesh axis that splits it cannot divide."""
    n = mesh.shape
    sized = [
        (model.num_attention_heads, "heads", "model.num_attention_heads"),
        (model.intermediate_size, "mlp", "model.intermediate_size"),
        (model.moe_intermediate_size, "expert_mlp", "model.moe_intermediate_size"),
        (model.vocab_size, "vocab", "model.vocab_size"),
        (model.hidden_size, "embed", "model.hidden_size"),
        (model.n_routed_experts, "experts", "model.n_routed_experts"),
    ]
    if model.index_topk:  # DSA's indexer heads are split like the attention's
        sized.append((model.index_n_heads, "heads", "model.index_n_heads"))
    if model.is_v4:  # no dense FFN; the grouped output projection's groups are split like the heads
        sized = [s for s in sized if s[1] != "mlp"] + [(model.o_groups, "heads", "model.o_groups")]
    rules = [(size, n[mesh_axes(logical)], what, f"mesh.{mesh_axes(logical)}") for size, logical, what in sized]
    if batch_size is not None:
        shards = math.prod(n[a] for a in BATCH)
        rules.append(
            (
                batch_size,
                shards,
                "sequences per microbatch (train.batch_size / train.microbatches)",
                f"the batch-sharding axes {' x '.join(BATCH)} = {shards}",
            )
        )
    for size, parts, what, axis in rules:
        if size % parts:
            raise ConfigError(f"{what}={size} is not divisible by {axis}={parts}")


def global_arrays(tree, shardings_tree):
    """Host values -> global arrays with the given shardings (every process passes the whole value)."""

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings_tree)
