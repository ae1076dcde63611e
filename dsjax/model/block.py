"""Pre-norm decoder block: x += MLA(norm(x)); x += FFN(norm(x)), FFN = dense SwiGLU or DeepSeekMoE."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import MLP, RMSNorm
from dsjax.model.mla import MLA
from dsjax.model.moe import BIAS, MoE
from dsjax.parallel.rules import constrain

# Activation checkpointing per layer (ModelConfig.remat): what the backward pass may keep.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the layer's input
    "save_projections": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # x W outputs
}


class Block(nn.Module):
    cfg: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x, cos, sin, mask, token_mask, cache=None, positions=None, routes=None):
        """Returns (x, (RouterStats or None, cache, the DSA indexer's KL per token [B, S] or None)).
        Signature fits ``nn.scan`` (carry first).

        ``cache`` (a ``LatentCache``) and ``positions``: decoding, see ``MLA``. ``routes`` [B, S, K]:
        routing replay (``dsjax.model.moe.route``)."""
        c = self.cfg
        pdt = jnp.dtype(c.param_dtype)
        seq = "seq" if c.sequence_parallel and cache is None else None  # Megatron-SP: split between the two
        x = constrain(x, ("batch", seq, None))  # sequences stay split over the batch axes
        h = RMSNorm(c.rms_norm_eps, "norm", pdt, name="input_layernorm")(x)
        h = constrain(h, ("batch", None, None))  # attention sees the whole sequence (gathered under SP)
        y, cache, index_kl = MLA(c, name="self_attn")(h, cos, sin, mask, cache, positions)
        x = x + constrain(y, ("batch", seq, None))
        h = RMSNorm(c.rms_norm_eps, "norm", pdt, name="post_attention_layernorm")(x)
        if self.moe:
            y, stats = MoE(c, name="mlp")(h, token_mask, routes, seq_split=seq is not None)
            return x + y, (stats, cache, index_kl)
        return x + MLP(c, c.intermediate_size, name="mlp")(h), (None, cache, index_kl)


class Stack(nn.Module):
    """``num_layers`` blocks: one ``nn.scan`` over stacked weights (compile time independent of
    depth), or unrolled as ``layer_0 ... layer_{n-1}`` when ``cfg.scan_layers`` is false. A decode
    cache is stacked along its leading (layer) axis either way."""

    cfg: ModelConfig
    moe: bool
    num_layers: int

    @nn.compact
    def __call__(self, x, cos, sin, mask, token_mask, cache=None, positions=None, routes=None):
        """Returns (x, RouterStats stacked over layers or None, cache, indexer KL [L, B, S] or None).
        ``routes``: [L, B, S, K]."""
        block = Block
        if self.cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, BIAS: 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast, 0),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, (stats, cache, index_kl) = scanned(self.cfg, self.moe, name="layers")(
                x, cos, sin, mask, token_mask, cache, positions, routes
            )
            return x, stats, cache, index_kl
        outs = []
        for i in range(self.num_layers):
            layer_cache, layer_routes = (
                None if a is None else jax.tree.map(lambda a: a[i], a) for a in (cache, routes)
            )
            x, out = block(self.cfg, self.moe, name=f"layer_{i}")(
                x, cos, sin, mask, token_mask, layer_cache, positions, layer_routes
            )
            outs.append(out)
        stats, cache, index_kl = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return x, stats, cache, index_kl
