"""Grouped matmul for dropless MoE: rows sorted by expert, out[g-rows] = lhs[g-rows] @ rhs[g].

One dispatch, ``grouped_matmul``, over the implementations:
- ``ragged_dot``: ``jax.lax.ragged_dot``, XLA's grouped GEMM (native on TPU). On CPU XLA lowers it
  to work over every group, so its cost grows with the number of experts.
- ``rows``: plain jnp, each row times a gathered copy of its group's matrix; for a handful of rows
  (decoding) it reads only the experts in use.
- ``blocked``: plain jnp. Each group is padded to a multiple of a row block, every block then
  belongs to one expert, and one batched matmul multiplies each block by its expert's weight.
  Cost grows with rows (tokens x top-k) plus at most one partial block per expert.
"""

import jax
import jax.numpy as jnp


def block_rows(m: int, num_groups: int) -> int:
    """Rows per block: a power of two in [8, 128] leaving padding (<= one block per group) <= m/2."""
    b = 128
    while b > 8 and num_groups * b > m // 2:
        b //= 2
    return b


def gmm_blocked(lhs, rhs, group_sizes):
    """lhs [m, k] sorted by group, rhs [g, k, n], group_sizes [g] (sum = m) -> [m, n]."""
    m, k = lhs.shape
    g, _, n = rhs.shape
    b = block_rows(m, g)
    num_blocks = -(-m // b) + g  # sum_g ceil(size_g / b) can never exceed this
    padded = -(-group_sizes // b) * b
    pad_end = jnp.cumsum(padded)
    row_group = jnp.repeat(jnp.arange(g), group_sizes, total_repeat_length=m)
    rank_in_group = jnp.arange(m) - (jnp.cumsum(group_sizes) - group_sizes)[row_group]
    dest = (pad_end - padded)[row_group] + rank_in_group  # row position in the padded layout
    x = jnp.zeros((num_blocks * b, k), lhs.dtype).at[dest].set(lhs, unique_indices=True)
    block_group = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(num_blocks) * b, side="right"), g - 1)
    y = jnp.einsum("bmk,bkn->bmn", x.reshape(num_blocks, b, k), rhs[block_group])
    return y.reshape(num_blocks * b, n)[dest]


def gmm_rows(lhs, rhs, group_sizes):
    """Each row times its own group's matrix: reads only the groups in use (decode: few rows)."""
    m, g = lhs.shape[0], rhs.shape[0]
    row_group = jnp.repeat(jnp.arange(g), group_sizes, total_repeat_length=m)
    return jnp.einsum("mk,mkn->mn", lhs, rhs[row_group])


def gmm_ragged(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


IMPLS = {"ragged_dot": gmm_ragged, "blocked": gmm_blocked, "rows": gmm_rows}


def grouped_matmul(lhs, rhs, group_sizes, impl: str = "auto", fp8: str | None = None):
    """Dispatch. ``auto``: ``ragged_dot`` on TPU (native grouped GEMM); elsewhere ``rows`` when there
    are no more rows than groups (decoding), else ``blocked``."""
    if fp8 is not None:
        raise NotImplementedError("grouped_matmul: FP8 grouped GEMM not built yet (issue 6)")
    if impl == "auto":
        if jax.default_backend() == "tpu":
            impl = "ragged_dot"
        else:
            impl = "rows" if lhs.shape[0] <= rhs.shape[0] else "blocked"
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl={impl!r}: expected auto, {', '.join(IMPLS)}")
    return IMPLS[impl](lhs, rhs, group_sizes)
