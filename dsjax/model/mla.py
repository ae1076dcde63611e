"""Multi-head Latent Attention (DeepSeek-V2 §2.1; as restated in DeepSeek-V3 §2.1.1, eq. 1-11).

    c_q = RMSNorm(W_DQ x)                q = W_UQ c_q   -> [q_nope | q_pe], RoPE on q_pe
    [c_kv | k_pe] = W_DKV x              c_kv <- RMSNorm(c_kv), RoPE on k_pe (one head, shared)
    [k_nope | v] = W_UKV c_kv            score = (q_nope.k_nope + q_pe.k_pe) * scale

Without a cache (training, full forward; ``mla_attention``): k_nope and v expanded per head. With
one (generation: prefill and every decode step; ``mla_attention_absorbed``): only c_kv and k_pe are
cached per token (``LatentCache``: a row of slots per sequence; ``PagedLatentCache``: fixed-size
pages of a shared pool, found through each sequence's page table, for serving), W_UK is folded into
the query and W_UV applied after the attention: q_nope.k_nope = (q_nope W_UK).c_kv, p.v = (p.c_kv)
W_UV. The attention itself (jnp references and their Pallas kernels, chosen by
``cfg.attention_impl``) is in ``dsjax.model.attention``.

DeepSeek Sparse Attention (V3.2, ``cfg.index_topk`` > 0): a lightning indexer (``dsjax.model.indexer``)
picks each query's top-k keys and the attention, in absorbed form, reads only those
(``sparse_latent_attention``), in training and from the cache alike; the cache also holds the
indexer's key per token. With no more keys than k (or in the indexer's dense warm-up) every visible
key is selected, which is dense attention: that path runs instead, with the same result.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.attention import (
    AttentionMask,
    latent_attention,
    mla_attention,
    paged_latent_attention,
    sparse_latent_attention,
)
from dsjax.model.fp8 import Fp8Weight
from dsjax.model.indexer import Indexer, dense_indexer_kl, select_top_k, sparse_indexer_kl
from dsjax.model.layers import RMSNorm, linear
from dsjax.model.rope import apply_rope, softmax_scale


@flax.struct.dataclass
class LatentCache:
    """Per token: c_kv (after its norm) and k_pe (after RoPE), shared by all heads; slot = position.

    c_kv [..., B, T, kv_lora_rank], k_pe [..., B, T, qk_rope_head_dim]; leading axis = layer when
    stacked for a layer stack. With DSA also index_k [..., B, T, index_head_dim], the indexer's key.
    """

    c_kv: jax.Array
    k_pe: jax.Array
    index_k: jax.Array | None = None

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int, layers: tuple[int, ...] = ()):
        """An empty cache of ``max_len`` slots (dtype = cfg.dtype)."""
        shape = (*layers, batch, max_len)
        dt = jnp.dtype(cfg.dtype)
        index_k = jnp.zeros((*shape, cfg.index_head_dim), dt) if cfg.index_topk else None
        return cls(jnp.zeros((*shape, cfg.kv_lora_rank), dt), jnp.zeros((*shape, cfg.qk_rope_head_dim), dt), index_k)

    def write(self, positions, c_kv, k_pe, index_k=None):
        """Stores the entries of tokens at ``positions`` [B, S] in their slots (out of range: dropped)."""
        b = jnp.arange(positions.shape[0])[:, None]
        slot = jnp.where(positions < 0, self.c_kv.shape[-2], positions)  # negative: dropped, not wrapped
        put = lambda cache, x: cache.at[b, slot].set(x.astype(cache.dtype), mode="drop")  # noqa: E731
        keys = None if self.index_k is None else put(self.index_k, index_k)
        return LatentCache(put(self.c_kv, c_kv), put(self.k_pe, k_pe), keys)

    def attend(self, q_lat, q_pe, mask, scale, impl):
        """Absorbed attention of q_lat [b,s,h,r], q_pe [b,s,h,dr] over every slot (``latent_attention``)."""
        return latent_attention(q_lat, q_pe, self.c_kv, self.k_pe, mask, scale, impl)


@flax.struct.dataclass
class PagedLatentCache:
    """The same entries in pages: a pool c_kv [..., P, page_size, kv_lora_rank], k_pe [..., P,
    page_size, qk_rope_head_dim] shared by every sequence, and ``pages`` [..., B, n]: sequence b's
    slot j (= position j) is at page pages[b, j // page_size], offset j % page_size. The page table
    is repeated along the leading layer axis, so a layer scan hands each layer its own view.
    """

    c_kv: jax.Array
    k_pe: jax.Array
    pages: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, num_pages: int, page_size: int, layers: tuple[int, ...] = ()):
        """An empty pool of ``num_pages`` pages (dtype = cfg.dtype) and an empty page table ([..., 0, 0])."""
        shape = (*layers, num_pages, page_size)
        dt = jnp.dtype(cfg.dtype)
        return cls(
            jnp.zeros((*shape, cfg.kv_lora_rank), dt),
            jnp.zeros((*shape, cfg.qk_rope_head_dim), dt),
            jnp.zeros((*layers, 0, 0), jnp.int32),
        )

    def write(self, positions, c_kv, k_pe, index_k=None):
        """Stores the entries of tokens at ``positions`` [B, S] in their pages (negative or past the
        table: dropped). No DSA: ``index_k`` must be None."""
        if index_k is not None:
            raise NotImplementedError("the paged cache does not hold DSA's indexer keys yet (index_topk > 0)")
        num_pages, size = self.c_kv.shape[-3:-1]
        index = positions // size
        page = jnp.take_along_axis(self.pages, jnp.clip(index, 0, self.pages.shape[-1] - 1), axis=1)
        page = jnp.where((positions >= 0) & (index < self.pages.shape[-1]), page, num_pages)
        offset = positions % size
        return self.replace(
            c_kv=self.c_kv.at[page, offset].set(c_kv.astype(self.c_kv.dtype), mode="drop"),
            k_pe=self.k_pe.at[page, offset].set(k_pe.astype(self.k_pe.dtype), mode="drop"),
        )

    def attend(self, q_lat, q_pe, mask, scale, impl):
        """Absorbed attention over each sequence's pages (``paged_latent_attention``)."""
        return paged_latent_attention(q_lat, q_pe, self.c_kv, self.k_pe, self.pages, mask, scale, impl)


def mla_attention_absorbed(q_nope, q_pe, cache, w_uk, w_uv, mask, scale, impl: str = "xla"):
    """softmax(((q_nope W_UK).c_kv + q_pe.k_pe) * scale + mask) c_kv W_UV: the same attention,
    read from the latent cache (one 'KV head' of dim kv_lora + dr for scores, kv_lora for values).

    q_nope [b,s,h,dn], q_pe [b,s,h,dr], cache a ``LatentCache`` (c_kv [b,t,r], k_pe [b,t,dr]) or a
    ``PagedLatentCache``, w_uk [r,h,dn], w_uv [r,h,dv] (the two blocks of kv_b_proj), mask [b,s,t]
    or an AttentionMask. Returns [b,s,h,dv]."""
    q_lat = jnp.einsum("bshd,rhd->bshr", q_nope, w_uk)
    out_lat = cache.attend(q_lat, q_pe, mask, scale, impl)
    return jnp.einsum("bshr,rhd->bshd", out_lat, w_uv)


class MLA(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        h, pdt = c.num_attention_heads, jnp.dtype(c.param_dtype)
        if c.q_lora_rank is None:
            self.q_proj = linear(c, (h, c.qk_head_dim), ("embed", "heads", "qk_dim"), "q_proj")
        else:
            self.q_a_proj = linear(c, c.q_lora_rank, ("embed", "q_lora"), "q_a_proj")
            self.q_a_layernorm = RMSNorm(c.rms_norm_eps, "q_lora", pdt)
            self.q_b_proj = linear(c, (h, c.qk_head_dim), ("q_lora", "heads", "qk_dim"), "q_b_proj")
        self.kv_a_proj_with_mqa = linear(
            c, c.kv_lora_rank + c.qk_rope_head_dim, ("embed", "kv_lora"), "kv_a_proj_with_mqa"
        )
        self.kv_a_layernorm = RMSNorm(c.rms_norm_eps, "kv_lora", pdt)
        self.kv_b_proj = linear(c, (h, c.qk_nope_head_dim + c.v_head_dim), ("kv_lora", "heads", "kv_dim"), "kv_b_proj")
        self.o_proj = linear(c, c.hidden_size, ("heads", "v_dim", "embed"), "o_proj", axis=(-2, -1))
        if c.index_topk:
            self.indexer = Indexer(c)

    def kv_b_weight(self):
        """W_UKV [r, h, dn + dv] in the compute dtype (dequantized when stored in FP8)."""
        if self.is_initializing():  # create the projection's parameters before reading them
            self.kv_b_proj(jnp.zeros((1, self.cfg.kv_lora_rank), self.cfg.dtype))
        c, p = self.cfg, nn.meta.unbox(self.kv_b_proj.variables["params"])
        if not c.fp8_weights:
            return p["kernel"].astype(c.dtype)
        r, h, d = p["kernel"].shape
        return Fp8Weight(p["kernel"].reshape(r, h * d), p["kernel_scale_inv"]).dequantize(c.dtype).reshape(r, h, d)

    def project(self, x, cos, sin):
        """c_q = RMSNorm(W_DQ x) (None without q LoRA), q = W_UQ c_q -> (q_nope, RoPE(q_pe));
        W_DKV x -> (RMSNorm(c_kv), RoPE(k_pe))."""
        c = self.cfg
        c_q = None if c.q_lora_rank is None else self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_proj(x) if c_q is None else self.q_b_proj(c_q)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv[..., : c.kv_lora_rank], kv[..., c.kv_lora_rank :]
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]
        return c_q, q_nope, apply_rope(q_pe, cos, sin), self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    def __call__(self, x, cos, sin, mask: AttentionMask, cache: LatentCache | None = None, positions=None):
        """Returns (attention output, cache, the indexer's KL per query [B, S] or None). Without a
        cache: among the S tokens of x (mask ``AttentionMask.causal``). With one: the tokens' latents
        are written at ``positions`` [B, S], then attention runs in absorbed form over all cache
        slots (``AttentionMask.cache``). A dense [B, S, T] bool mask also works with
        ``attention_impl`` xla, without DSA. Kernels: ``dsjax.model.attention``."""
        c = self.cfg
        c_q, q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        if c.index_topk:
            # The indexer's input is detached from the main model's graph (V3.2 §2.1.1).
            index_q, index_k, index_w = self.indexer(*map(jax.lax.stop_gradient, (x, c_q)), cos, sin)
        if cache is None and not c.index_topk:
            kv = self.kv_b_proj(c_kv)
            k_nope, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim :]
            out = mla_attention(q_nope, q_pe, k_nope, k_pe, v, mask, softmax_scale(c), c.attention_impl)
            return self.o_proj(out), cache, None
        w = self.kv_b_weight()  # [r, h, dn + dv]
        w_uk, w_uv = w[..., : c.qk_nope_head_dim], w[..., c.qk_nope_head_dim :]
        if cache is None:
            return self._indexed_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, index_q, index_k, index_w)
        cache = cache.write(positions, c_kv, k_pe, index_k if c.index_topk else None)
        if c.index_topk and cache.c_kv.shape[-2] > c.index_topk:
            q_lat = jnp.einsum("bshd,rhd->bshr", q_nope, w_uk)
            indices = select_top_k(c, index_q, cache.index_k, index_w, mask, c.index_topk)
            out = sparse_latent_attention(
                q_lat, q_pe, cache.c_kv, cache.k_pe, indices, softmax_scale(c), c.attention_impl
            )
            out = jnp.einsum("bshr,rhd->bshd", out, w_uv)
        else:
            out = mla_attention_absorbed(q_nope, q_pe, cache, w_uk, w_uv, mask, softmax_scale(c), c.attention_impl)
        return self.o_proj(out), cache, None

    def _indexed_attention(self, q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, mask, index_q, index_k, index_w):
        """DSA without a cache (training): sparse attention over each query's top-k keys and the
        indexer's KL on them; dense attention and the KL over every visible key in the warm-up, or
        when the S keys are no more than k (then the top-k hold every visible key)."""
        c, scale = self.cfg, softmax_scale(self.cfg)
        q_lat = jnp.einsum("bshd,rhd->bshr", q_nope, w_uk)
        fixed = [jax.lax.stop_gradient(a) for a in (q_lat, q_pe, c_kv, k_pe)]  # the KL's target p
        if c.indexer_warmup or q_nope.shape[1] <= c.index_topk:
            kv = self.kv_b_proj(c_kv)
            k_nope, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim :]
            out = mla_attention(q_nope, q_pe, k_nope, k_pe, v, mask, scale, c.attention_impl)
            kl = dense_indexer_kl(c, *fixed, scale, index_q, index_k, index_w, mask)
            return self.o_proj(out), None, kl
        indices = select_top_k(c, index_q, index_k, index_w, mask, c.index_topk)
        out = sparse_latent_attention(q_lat, q_pe, c_kv, k_pe, indices, scale, c.attention_impl)
        kl = sparse_indexer_kl(c, *fixed, scale, index_q, index_k, index_w, indices)
        return self.o_proj(jnp.einsum("bshr,rhd->bshd", out, w_uv)), None, kl
