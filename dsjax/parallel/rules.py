"""The one table of logical-axis rules: how every array dimension, and every collective, maps onto
the mesh axes ``data`` / ``fsdp`` / ``expert`` / ``tensor``.

Parameters carry logical axis names (``nn.with_logical_partitioning`` in the modules), activations
are constrained by them (``constrain``), and code that runs per shard names the axes of its
collectives by them too (``mesh_axes``): the FSDP gather runs over ``mesh_axes("embed")``, the MoE
all-to-all over ``mesh_axes("experts")``, the tensor-parallel partial sums over
``mesh_axes("mlp")``. No module outside ``dsjax.parallel`` spells a mesh axis.

    batch           -> (data, fsdp, expert)  sequences split over every batch-sharding axis
    embed           -> fsdp                  FSDP: parameters and optimizer state sharded, gathered per use
    q_lora, kv_lora -> fsdp                  where embed has not taken fsdp (q_b_proj, kv_b_proj)
    heads, mlp, expert_mlp, vocab -> tensor  tensor parallelism
    seq             -> tensor                sequence parallelism (ModelConfig.sequence_parallel): activations
    tokens          -> (data, fsdp, expert, tensor)   [batch * seq] rows, split over both
    experts         -> expert                expert parallelism: each routed expert on one device
    (*_dim, norm, layers, mtp_in: replicated)
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

RULES = (  # in order; an axis whose mesh axis is taken in that array falls through to the next rule
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("q_lora", "fsdp"),  # q_b_proj / kv_b_proj: their input dim is the LoRA rank, not embed
    ("kv_lora", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("expert_mlp", "tensor"),
    ("experts", "expert"),
    ("seq", "tensor"),
    ("tokens", ("data", "fsdp", "expert", "tensor")),
)


def mesh_axes(logical: str) -> str | tuple[str, ...]:
    """The mesh axis (or axes) a logical name maps to: what a collective over that dim runs over."""
    for name, axes in RULES:
        if name == logical:
            return axes
    raise KeyError(f"no sharding rule for logical axis {logical!r}")


BATCH = mesh_axes("batch")  # the batch-sharding mesh axes, for collectives over all of them


def partition_spec(logical: tuple[str | None, ...]) -> P:
    """Logical axis names -> a PartitionSpec over the mesh axes (RULES)."""
    return nn.logical_to_mesh_axes(logical, RULES)


def logical_shardings(mesh: jax.sharding.Mesh, boxed_tree):
    """NamedShardings for a tree of (abstract) values boxed with logical names; unboxed leaves replicate."""
    specs = nn.get_partition_spec(boxed_tree)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, partition_spec(tuple(s))), specs, is_leaf=lambda s: isinstance(s, P)
    )


def shardings_like_params(tree, params, params_shardings, default):
    """Shardings for ``tree`` (e.g. optimizer state): every subtree shaped like ``params`` gets
    ``params_shardings`` (Adam's moments are sharded as their parameters); every other leaf ``default``."""
    structure = jax.tree.structure(params)

    def pick(sub):
        return params_shardings if jax.tree.structure(sub) == structure else default

    return jax.tree.map(pick, tree, is_leaf=lambda sub: jax.tree.structure(sub) == structure)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[batch, ...] arrays: sequences split over the batch axes."""
    return NamedSharding(mesh, partition_spec(("batch",)))


def constrain(x, logical: tuple[str | None, ...]):
    """``with_sharding_constraint`` by logical names under the mesh set with ``jax.set_mesh``; a
    no-op without one (plain single-device use)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition_spec(logical)))
