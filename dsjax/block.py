"""Pre-norm decoder block: x += MLA(norm(x)); x += FFN(norm(x)), FFN = dense SwiGLU or DeepSeekMoE."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.mla import MLA
from dsjax.mlp import MLP
from dsjax.moe import BIAS, MoE
from dsjax.norm import RMSNorm


class Block(nn.Module):
    cfg: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x, cos, sin, mask, token_mask):
        """Returns (x, RouterStats or None). Signature fits ``nn.scan`` (carry first)."""
        c = self.cfg
        pdt = jnp.dtype(c.param_dtype)
        x = x + MLA(c, name="self_attn")(RMSNorm(c.rms_norm_eps, "embed", pdt, name="input_layernorm")(x), cos, sin, mask)
        h = RMSNorm(c.rms_norm_eps, "embed", pdt, name="post_attention_layernorm")(x)
        if self.moe:
            y, stats = MoE(c, name="mlp")(h, token_mask)
            return x + y, stats
        return x + MLP(c, c.intermediate_size, name="mlp")(h), None


class Stack(nn.Module):
    """``num_layers`` blocks: one ``nn.scan`` over stacked weights (compile time independent of
    depth), or unrolled as ``layer_0 ... layer_{n-1}`` when ``cfg.scan_layers`` is false."""

    cfg: ModelConfig
    moe: bool
    num_layers: int

    @nn.compact
    def __call__(self, x, cos, sin, mask, token_mask):
        if self.cfg.scan_layers:
            scanned = nn.scan(
                Block,
                variable_axes={"params": 0, BIAS: 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 4,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(self.cfg, self.moe, name="layers")(x, cos, sin, mask, token_mask)
        stats = []
        for i in range(self.num_layers):
            x, s = Block(self.cfg, self.moe, name=f"layer_{i}")(x, cos, sin, mask, token_mask)
            stats.append(s)
        if not self.moe:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.stack(a), *stats)
