"""MLA's attention: the jnp references and, beside each, the one dispatch to its Pallas kernel.

    expanded (training, full forward):  softmax((q_nope.k_nope + q_pe.k_pe) * scale + mask) v
    latent (generation, absorbed form): softmax((q_lat.c_kv + q_pe.k_pe) * scale + mask) c_kv,
                                        q_lat = q_nope W_UK (the caller folds W_UK in, applies W_UV)

Softmax in fp32; masked scores are finfo(f32).min. ``impl`` (``cfg.attention_impl``) follows the
kernels' one dispatch rule (``pallas_kernels.platform.resolve_impl``): "xla" = the jnp reference,
"pallas" = the kernel compiled for this backend (Mosaic on TPU, Triton on GPU), "interpret" = the
kernel run by the Pallas interpreter, "auto" = pallas on TPU / GPU (Ampere or newer), xla elsewhere.
Under a mesh the kernels run per shard: sequences over the batch axes, heads over theirs. Kernels:
``pallas_kernels.flash_mla`` (forward + backward), ``pallas_kernels.mla_decode``,
``pallas_kernels.paged_mla_decode`` (the serving engine's paged cache).
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
        if self.positions is not None:
            return jnp.arange(num_keys) <= self.positions[..., None]
        s = self.segment_ids.shape[-1]
        return jnp.tril(jnp.ones((s, s), bool)) & (self.segment_ids[:, :, None] == self.segment_ids[:, None, :])


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
