"""MLA's attention: the jnp references and, beside each, the one dispatch to its Pallas kernel.

    expanded (training, full forward):  softmax((q_nope.k_nope + q_pe.k_pe) * scale + mask) v
    latent (generation, absorbed form): softmax((q_lat.c_kv + q_pe.k_pe) * scale + mask) c_kv,
                                        q_lat = q_nope W_UK (the caller folds W_UK in, applies W_UV)

Softmax in fp32; masked scores are finfo(f32).min. ``impl``: "xla" = the jnp reference, "pallas" =
the kernel compiled for this backend (Mosaic on TPU, Triton on GPU), "interpret" = the kernel run
by the Pallas interpreter (any backend: how CPU tests check it), "auto" = pallas on TPU / GPU
(Ampere or newer), xla elsewhere. Kernels: ``pallas_kernels.flash_mla`` (forward + backward), ``pallas_kernels.mla_decode``.
"""

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax.sharding import BATCH, platform
from pallas_kernels.platform import gpu_runs_triton

IMPLS = ("auto", "xla", "pallas", "interpret")


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


def resolve_impl(impl: str) -> str:
    """"xla", "pallas" or "interpret" for this platform; ValueError naming a bad choice."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    kernel_gpu = platform() != "gpu" or gpu_runs_triton()  # a T4 / V100 compiles no Triton kernel
    if impl == "auto":
        return "pallas" if platform() in ("tpu", "gpu") and kernel_gpu else "xla"
    if impl == "pallas" and platform() not in ("tpu", "gpu"):
        raise ValueError(f"attention_impl='pallas' needs a TPU or GPU, this is {platform()!r}: use 'interpret' or 'xla'")
    if impl == "pallas" and not kernel_gpu:
        raise ValueError("attention_impl='pallas' needs an Ampere or newer GPU (sm_80+: its kernels are Triton's), "
                         "this one is older: use 'xla' or 'auto'")  # fmt: skip
    return impl


def _backend(impl: str) -> str:
    return "interpret" if impl == "interpret" else platform()


def _kernel_mask(mask, field: str, kernel: str):
    """The mask's structure the kernel needs (``field``), or a ValueError saying what it got instead."""
    if not isinstance(mask, AttentionMask) or getattr(mask, field) is None:
        got = "a dense array" if not isinstance(mask, AttentionMask) else "an AttentionMask without " + field
        raise ValueError(f"{kernel} needs AttentionMask.{'causal' if field == 'segment_ids' else 'cache'}(...), got {got}")
    return getattr(mask, field)


def _per_shard(kernel, in_specs, out_specs):
    """Under a mesh (``jax.set_mesh``), run the kernel on each device's shard (sequences split over
    the batch axes, heads over ``tensor``): XLA cannot partition a Pallas call by itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, mask, scale, impl: str = "xla"):
    """``mla_attention_reference`` (impl "xla") or the flash kernel (causal mask within segments)."""
    impl = resolve_impl(impl)
    if impl == "xla":
        return mla_attention_reference(q_nope, q_pe, k_nope, k_pe, v, mask, scale)
    from pallas_kernels.flash_mla import flash_mla

    seg = _kernel_mask(mask, "segment_ids", "the flash MLA kernel")
    heads, tok = P(BATCH, None, "tensor", None), P(BATCH, None, None)
    return _per_shard(lambda *a: flash_mla(*a, scale, backend=_backend(impl)),
                      (heads, heads, heads, tok, heads, P(BATCH, None)), heads)(q_nope, q_pe, k_nope, k_pe, v, seg)  # fmt: skip


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
    rows, tok = P(BATCH, None, None), P(BATCH, None, None)
    out = _per_shard(lambda *a: mla_decode(*a, scale, backend=_backend(impl)), (rows, rows, tok, tok, P(BATCH, None)), rows)(
        q_lat.reshape(b, s * h, r), q_pe.reshape(b, s * h, -1), c_kv, k_pe, lengths.reshape(b, s * h))
    return out.reshape(b, s, h, r)
