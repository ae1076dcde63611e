"""MLA's attention: the jnp references and, beside each, the one dispatch to its Pallas kernel.

    expanded (training, full forward):  softmax((q_nope.k_nope + q_pe.k_pe) * scale + mask) v
    latent (generation, absorbed form): softmax((q_lat.c_kv + q_pe.k_pe) * scale + mask) c_kv,
                                        q_lat = q_nope W_UK (the caller folds W_UK in, applies W_UV)
    sparse (DSA, V3.2 report §2.1):     the latent form over the k slots each query's indexer chose

Softmax in fp32; masked scores are finfo(f32).min. ``impl`` (``cfg.attention_impl``) follows the
kernels' one dispatch rule (``pallas_kernels.platform.resolve_impl``): "xla" = the jnp reference,
"pallas" = the kernel compiled for this backend (Mosaic on TPU, Triton on GPU), "interpret" = the
kernel run by the Pallas interpreter, "auto" = pallas on TPU / GPU (Ampere or newer), xla elsewhere.
Under a mesh the kernels run per shard: sequences over the batch axes, heads over theirs. Kernels:
``pallas_kernels.flash_mla`` (forward + backward), ``pallas_kernels.mla_decode``,
``pallas_kernels.paged_mla_decode`` (the serving engine's paged cache), ``pallas_kernels.sparse_mla``
(DSA: forward + backward over gathered slots).
"""

import flax.struct
import jax
import jax.numpy as jnp

from dsjax.parallel.collectives import per_shard
from dsjax.parallel.rules import partition_spec
from pallas_kernels.platform import resolve_impl as resolve_kernel_impl
from pallas_kernels.platform import target_platform


@flax.struct.dataclass
class AttentionMask:
    """Which keys a query sees, as structure a kernel can use (``dense`` for the reference). One of:

    segment_ids [B, S]: self-attention among S tokens, causal and within a segment (training);
    positions [B, S]:   queries over the T slots of a cache, slot j visible to position p iff j <= p.
    """

    segment_ids: jax.Array | None = None
    positions: jax.Array | None = None

    @classmethod
    def causal(cls, segment_ids):
        return cls(segment_ids=segment_ids)

    @classmethod
    def cache(cls, positions):
        return cls(positions=positions)

    def dense(self, num_keys: int):
        """[B, S, T] bool, True = may attend."""
        return self.visible(*self.query_limits(), num_keys)

    def query_limits(self):
        """Per query [B, S]: the last slot it may see, and its segment id (0s for a cache mask); a
        block of queries' ``visible`` keys need only their slice of these."""
        if self.positions is not None:
            return self.positions, jnp.zeros_like(self.positions)
        s = self.segment_ids.shape[-1]
        return jnp.broadcast_to(jnp.arange(s, dtype=self.segment_ids.dtype), self.segment_ids.shape), self.segment_ids

    def visible(self, limit, segment, num_keys: int):
        """[B, q, T] bool for the queries with ``query_limits`` (limit, segment) [B, q]."""
        keys = jnp.arange(num_keys) <= limit[..., None]
        if self.segment_ids is None:
            return keys
        return keys & (segment[:, :, None] == self.segment_ids[:, None, :])


def _dense(mask, num_keys: int):
    return mask.dense(num_keys) if isinstance(mask, AttentionMask) else mask


def _softmax(scores, mask, scale, dtype):
    """softmax(scores * scale + mask) over keys in fp32; scores [b,h,s,t], mask [b,s,t]."""
    scores = jnp.where(mask[:, None], scores * scale, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def mla_attention_reference(q_nope, q_pe, k_nope, k_pe, v, mask, scale):
    """softmax((q_nope.k_nope + q_pe.k_pe) * scale + mask) v, softmax in fp32.

    q_nope [b,s,h,dn], q_pe [b,s,h,dr], k_nope [b,t,h,dn], k_pe [b,t,dr] (shared by all heads),
    v [b,t,h,dv], mask [b,s,t] bool (True = may attend) or an AttentionMask. Returns [b,s,h,dv]."""
    scores = jnp.einsum("bshd,bthd->bhst", q_nope, k_nope, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bshd,btd->bhst", q_pe, k_pe, preferred_element_type=jnp.float32)
    return jnp.einsum("bhst,bthd->bshd", _softmax(scores, _dense(mask, k_pe.shape[1]), scale, v.dtype), v)


def latent_attention_reference(q_lat, q_pe, c_kv, k_pe, mask, scale):
    """softmax((q_lat.c_kv + q_pe.k_pe) * scale + mask) c_kv: one 'KV head' of dim r + dr for scores,
    r for values. q_lat [b,s,h,r], q_pe [b,s,h,dr], c_kv [b,t,r], k_pe [b,t,dr], mask [b,s,t] or an
    AttentionMask. Returns [b,s,h,r]."""
    scores = jnp.einsum("bshr,btr->bhst", q_lat, c_kv, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bshd,btd->bhst", q_pe, k_pe, preferred_element_type=jnp.float32)
    return jnp.einsum("bhst,btr->bshr", _softmax(scores, _dense(mask, c_kv.shape[1]), scale, c_kv.dtype), c_kv)


def paged_latent_reference(q_lat, q_pe, c_kv_pages, k_pe_pages, page_table, mask, scale):
    """``latent_attention_reference`` over each sequence's pages gathered into a row of slots:
    c_kv_pages [P, page_size, r], k_pe_pages [P, page_size, dr], page_table [b, n] (slot j at page
    page_table[b, j // page_size], offset j % page_size)."""
    b, n = page_table.shape
    c_kv, k_pe = (x[page_table].reshape(b, n * x.shape[1], x.shape[2]) for x in (c_kv_pages, k_pe_pages))
    return latent_attention_reference(q_lat, q_pe, c_kv, k_pe, mask, scale)


def gather_slots(x, indices):
    """x [b, t, d] at indices [b, s, k] (-1 reads slot 0): [b, s, k, d]."""
    return jnp.asarray(x)[jnp.arange(x.shape[0])[:, None, None], jnp.maximum(indices, 0)]


def sparse_latent_attention_reference(q_lat, q_pe, c_kv, k_pe, indices, scale):
    """``latent_attention_reference`` over the selected slots only: slot indices[b, s, j] of c_kv
    [b, t, r] / k_pe [b, t, dr] for query (b, s), -1 = no slot (masked). q_lat [b,s,h,r], q_pe
    [b,s,h,dr], indices [b,s,k] int32. Returns [b,s,h,r]. Gathers [b, s, k, r + dr]: for long
    sequences call it on blocks of queries (``sparse_latent_attention`` does)."""
    c_sel, pe_sel = gather_slots(c_kv, indices), gather_slots(k_pe, indices)
    scores = jnp.einsum("bshr,bskr->bhsk", q_lat, c_sel, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bshd,bskd->bhsk", q_pe, pe_sel, preferred_element_type=jnp.float32)
    return jnp.einsum("bhsk,bskr->bshr", _softmax(scores, indices >= 0, scale, c_kv.dtype), c_sel)


def query_blocks(fn, block: int, per_query, shared):
    """fn(*per_query_block, *shared) over blocks of ``block`` queries (axis 1 of every per_query
    array; the last block padded), concatenated along axis 1: a ``lax.map`` of a ``jax.checkpoint``,
    so only one block's intermediates live at a time, in the backward pass too (it recomputes them
    block by block instead of saving every block's gathers). One block when the queries fit in one."""
    s = per_query[0].shape[1]
    if s <= block:
        return fn(*per_query, *shared)
    n = -(-s // block)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, n * block - s)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    split = [jnp.moveaxis(pad(a).reshape(a.shape[0], n, block, *a.shape[2:]), 1, 0) for a in per_query]
    out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs, *shared)), split)
    return jax.tree.map(lambda o: jnp.moveaxis(o, 0, 1).reshape(o.shape[1], n * block, *o.shape[3:])[:, :s], out)


def resolve_impl(impl: str) -> str:
    """ "xla", "pallas" or "interpret" for this platform (``pallas_kernels.platform.resolve_impl``);
    the kernels run per shard under a mesh. ValueError naming a choice the devices cannot run."""
    return resolve_kernel_impl(impl, "attention", per_shard=True)


def _backend(impl: str) -> str:
    return "interpret" if impl == "interpret" else target_platform()


def _kernel_mask(mask, field: str, kernel: str):
    """The mask's structure the kernel needs (``field``), or a ValueError saying what it got instead."""
    if not isinstance(mask, AttentionMask) or getattr(mask, field) is None:
        got = "a dense array" if not isinstance(mask, AttentionMask) else "an AttentionMask without " + field
        raise ValueError(
            f"{kernel} needs AttentionMask.{'causal' if field == 'segment_ids' else 'cache'}(...), got {got}"
        )
    return getattr(mask, field)


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, mask, scale, impl: str = "xla"):
    """``mla_attention_reference`` (impl "xla") or the flash kernel (causal mask within segments)."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return mla_attention_reference(q_nope, q_pe, k_nope, k_pe, v, mask, scale)
    from pallas_kernels.flash_mla import flash_mla

    seg = _kernel_mask(mask, "segment_ids", "the flash MLA kernel")
    heads, tok, ids = (
        partition_spec(a) for a in (("batch", None, "heads", None), ("batch", None, None), ("batch", None))
    )
    kernel = per_shard(
        lambda *a: flash_mla(*a, scale, backend=_backend(impl)), (heads, heads, heads, tok, heads, ids), heads
    )
    return kernel(q_nope, q_pe, k_nope, k_pe, v, seg)


def latent_attention(q_lat, q_pe, c_kv, k_pe, mask, scale, impl: str = "xla"):
    """``latent_attention_reference`` (impl "xla") or the split-K decode kernel (cache mask: slots <= position)."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return latent_attention_reference(q_lat, q_pe, c_kv, k_pe, mask, scale)
    from pallas_kernels.mla_decode import mla_decode

    positions = _kernel_mask(mask, "positions", "the MLA decode kernel")
    b, s, h, r = q_lat.shape
    if positions.shape != (b, s):
        raise ValueError(f"latent_attention: mask positions have shape {positions.shape}, expected {(b, s)}")
    lengths = jnp.broadcast_to(jnp.clip(positions + 1, 0, c_kv.shape[1])[:, :, None], (b, s, h))  # a row per head
    rows, ids = partition_spec(("batch", None, None)), partition_spec(("batch", None))
    kernel = per_shard(lambda *a: mla_decode(*a, scale, backend=_backend(impl)), (rows, rows, rows, rows, ids), rows)
    out = kernel(q_lat.reshape(b, s * h, r), q_pe.reshape(b, s * h, -1), c_kv, k_pe, lengths.reshape(b, s * h))
    return out.reshape(b, s, h, r)


def paged_latent_attention(q_lat, q_pe, c_kv_pages, k_pe_pages, page_table, mask, scale, impl: str = "xla"):
    """``paged_latent_reference`` (impl "xla") or the paged decode kernel, which reads each
    sequence's pages through the table (cache mask: slots <= position). Table entries outside the
    pool (the engine's padding) read page P - 1 at weight 0; writes to them are dropped."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return paged_latent_reference(q_lat, q_pe, c_kv_pages, k_pe_pages, page_table, mask, scale)
    from pallas_kernels.paged_mla_decode import paged_mla_decode

    positions = _kernel_mask(mask, "positions", "the paged MLA decode kernel")
    b, s, h, r = q_lat.shape
    if positions.shape != (b, s):
        raise ValueError(f"paged_latent_attention: mask positions have shape {positions.shape}, expected {(b, s)}")
    slots = page_table.shape[1] * c_kv_pages.shape[1]
    lengths = jnp.broadcast_to(jnp.clip(positions + 1, 0, slots)[:, :, None], (b, s, h)).reshape(b, s * h)
    table = jnp.clip(page_table, 0, c_kv_pages.shape[0] - 1)
    rows, ids, pool = (
        partition_spec(("batch", None, None)),
        partition_spec(("batch", None)),
        partition_spec((None,) * 3),
    )
    kernel = per_shard(
        lambda *a: paged_mla_decode(*a, scale, backend=_backend(impl)), (rows, rows, pool, pool, ids, ids), rows
    )
    out = kernel(q_lat.reshape(b, s * h, r), q_pe.reshape(b, s * h, -1), c_kv_pages, k_pe_pages, table, lengths)
    return out.reshape(b, s, h, r)


# Queries per block of the jnp sparse path: [b, block, h, k] fp32 scores at a time.
SPARSE_QUERY_BLOCK = 256


def sparse_latent_attention(q_lat, q_pe, c_kv, k_pe, indices, scale, impl: str = "xla"):
    """``sparse_latent_attention_reference`` (impl "xla", on blocks of ``SPARSE_QUERY_BLOCK``
    queries) or the sparse MLA kernel (forward + backward), which reads only the selected slots.
    Time and memory grow with k = indices.shape[-1], not with the t slots."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return query_blocks(
            lambda ql, qp, ix, c, p: sparse_latent_attention_reference(ql, qp, c, p, ix, scale),
            SPARSE_QUERY_BLOCK,
            (q_lat, q_pe, indices),
            (c_kv, k_pe),
        )
    from pallas_kernels.sparse_mla import sparse_mla

    rows, slots, ids = (
        partition_spec(a) for a in (("batch", None, "heads", None), ("batch", None, None), ("batch", None, None))
    )
    kernel = per_shard(lambda *a: sparse_mla(*a, scale, backend=_backend(impl)), (rows, rows, slots, slots, ids), rows)
    return kernel(q_lat, q_pe, c_kv, k_pe, indices)
