"""Multi-head Latent Attention, training / prefill form (DeepSeek-V2 §2.1, REFERENCE §2).

    c_q = RMSNorm(W_DQ x)                q = W_UQ c_q   -> [q_nope | q_pe], RoPE on q_pe
    [c_kv | k_pe] = W_DKV x              c_kv <- RMSNorm(c_kv), RoPE on k_pe (one head, shared)
    [k_nope | v] = W_UKV c_kv            score = (q_nope.k_nope + q_pe.k_pe) * scale
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.linear import linear
from dsjax.norm import RMSNorm
from dsjax.rope import apply_rope, softmax_scale


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, mask, scale):
    """softmax((q_nope.k_nope + q_pe.k_pe) * scale + mask) v, softmax in fp32.

    q_nope [b,s,h,dn], q_pe [b,s,h,dr], k_nope [b,t,h,dn], k_pe [b,t,dr] (shared by all heads),
    v [b,t,h,dv], mask [b,s,t] bool (True = may attend). Returns [b,s,h,dv].
    """
    scores = jnp.einsum("bshd,bthd->bhst", q_nope, k_nope, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bshd,btd->bhst", q_pe, k_pe, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None], scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhst,bthd->bshd", probs, v)


class MLA(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask):
        c = self.cfg
        h, r = c.num_attention_heads, c.kv_lora_rank
        pdt = jnp.dtype(c.param_dtype)
        if c.q_lora_rank is None:
            q = linear(c, (h, c.qk_head_dim), ("embed", "heads", "qk_dim"), "q_proj")(x)
        else:
            q = linear(c, c.q_lora_rank, ("embed", "q_lora"), "q_a_proj")(x)
            q = RMSNorm(c.rms_norm_eps, "q_lora", pdt, name="q_a_layernorm")(q)
            q = linear(c, (h, c.qk_head_dim), ("q_lora", "heads", "qk_dim"), "q_b_proj")(q)
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]
        q_pe = apply_rope(q_pe, cos, sin)

        kv = linear(c, r + c.qk_rope_head_dim, ("embed", "kv_lora"), "kv_a_proj_with_mqa")(x)
        c_kv = RMSNorm(c.rms_norm_eps, "kv_lora", pdt, name="kv_a_layernorm")(kv[..., :r])
        k_pe = apply_rope(kv[..., r:], cos, sin)
        kv = linear(c, (h, c.qk_nope_head_dim + c.v_head_dim), ("kv_lora", "heads", "kv_dim"), "kv_b_proj")(c_kv)
        k_nope, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim :]

        out = mla_attention(q_nope, q_pe, k_nope, k_pe, v, mask, softmax_scale(c))
        return linear(c, c.hidden_size, ("heads", "v_dim", "embed"), "o_proj", axis=(-2, -1))(out)
