"""Multi-Token Prediction module k (DeepSeek-V3 §2.2, eq. 21-23).

    h'_i = W_eh [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]     (embedding first, as the released weights)
    h^k = Block(h'),   logits^k = Head(shared_head_norm(h^k))

h^0 is the main model's last hidden state before its final norm; embedding and head are the main
model's (shared), passed in by the caller.
"""

import flax.linen as nn
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.block import Block
from dsjax.model.layers import RMSNorm, linear


class MTPModule(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_prev, emb_next, cos, sin, mask, token_mask, cache=None, positions=None):
        """Returns (h^k for the next depth, normalised h^k for the head, RouterStats, cache, the DSA
        indexer's KL per token or None).

        ``cache`` (the block's ``LatentCache``) and ``positions``: decoding, see ``MLA``."""
        c = self.cfg
        pdt = jnp.dtype(c.param_dtype)
        e = RMSNorm(c.rms_norm_eps, "norm", pdt, name="enorm")(emb_next)
        h = RMSNorm(c.rms_norm_eps, "norm", pdt, name="hnorm")(h_prev)
        x = linear(c, c.hidden_size, ("mtp_in", "embed"), "eh_proj", quantize=False)(
            jnp.concatenate([e, h], axis=-1)
        )  # bf16 in the V3 release
        # The MTP block sits at index num_hidden_layers >= first_k_dense_replace: always MoE.
        x, (stats, cache, index_kl) = Block(c, moe=True, name="block")(x, cos, sin, mask, token_mask, cache, positions)
        return x, RMSNorm(c.rms_norm_eps, "norm", pdt, name="shared_head_norm")(x), stats, cache, index_kl
