"""Code that runs per shard: Pallas kernels under a mesh, and the FSDP weight gather inside a shard_map."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_shard(kernel, in_specs, out_specs):
    """``kernel`` run on each device's shard under the mesh set with ``jax.set_mesh`` (XLA cannot
    partition a Pallas call by itself); the kernel itself without a mesh or on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def gather_along(x, axis: str, dim: int):
    """``all_gather(x, axis, axis=dim, tiled=True)`` inside a shard_map (FSDP's weight gather), gathered
    along a new leading dim and only then put in place. Gathered in place along an inner dim, the
    TPU compiler gave the collective a layout with that dim outermost and met it by copying the
    whole layer-stacked weight into that layout once per step, outside the layer loop: one more
    stacked weight per device (docs/planning.md)."""
    dim %= x.ndim
    pieces = jnp.moveaxis(jax.lax.all_gather(x, axis, axis=0, tiled=False), 0, dim)  # [.., n, x.shape[dim], ..]
    return pieces.reshape(*x.shape[:dim], -1, *x.shape[dim + 1 :])
