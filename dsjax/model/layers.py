"""The small layers every model is built from: RMSNorm, the one projection helper, SwiGLU, the token
embedding and its lookup.

RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)            statistics in fp32
linear:      y = x W (no bias), W [*in, *out] annotated with logical axis names
MLP(x)     = W_down (silu(W_gate x) * (W_up x))        (DeepSeek-V3 §2.1.2: every expert is one;
                                                     V4 clamps gate and up at swiglu_limit)
"""

import flax.linen as nn
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.fp8 import Fp8Linear, Fp8Recipe, fp8_dense_general
from dsjax.parallel.rules import constrain


class RMSNorm(nn.Module):
    eps: float
    axis_name: str = "norm"  # logical axis of the scale, for sharding rules
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return scale.astype(x.dtype) * y.astype(x.dtype)


def linear(cfg: ModelConfig, features, axes: tuple[str, ...], name: str, axis=-1, quantize: bool = True) -> nn.Module:
    """A bias-free projection whose kernel is [*in, *out], normal(initializer_range) initialised.

    With ``cfg.fp8`` and ``quantize`` its GEMMs run in FP8 (``dsjax.model.fp8``); V3 keeps the output
    head (and MTP's eh_proj) unquantized: pass ``quantize=False`` there. The parameter is the same.
    With ``cfg.fp8_weights`` and ``quantize`` the kernel is stored in e4m3 + block scales instead
    (``Fp8Linear``, inference)."""
    if cfg.fp8_weights and quantize:
        return Fp8Linear(
            features, axis, axes, cfg.initializer_range, jnp.dtype(cfg.dtype), Fp8Recipe.of(cfg), name=name
        )
    init = nn.initializers.normal(cfg.initializer_range)
    kwargs = dict(
        features=features,
        axis=axis,
        use_bias=False,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(init, axes),
        name=name,
    )
    if cfg.fp8 and quantize:
        return fp8_dense_general(Fp8Recipe.of(cfg), **kwargs)
    return nn.DenseGeneral(**kwargs)


def token_embedding(cfg: ModelConfig) -> nn.Embed:
    """The [vocab, hidden] embedding table (the models' ``embed_tokens``), normal(initializer_range)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("vocab", "embed"))
    return nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=init,
    )


def embed_lookup(embed: nn.Embed, tokens, dtype):
    """Embedding lookup, split like the activations: the table (FSDP-sharded like every weight) is
    gathered for the lookup, so rows come out split over the batch (a lookup split over the hidden
    dim could only be turned into that by replicating it)."""
    table = constrain(embed.embedding.astype(dtype), ("vocab", None))
    return constrain(jnp.take(table, tokens, axis=0), ("batch", None, None))


class MLP(nn.Module):
    cfg: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x):
        c, i = self.cfg, self.intermediate_size
        gate = linear(c, i, ("embed", "mlp"), "gate_proj")(x)
        up = linear(c, i, ("embed", "mlp"), "up_proj")(x)
        return linear(c, c.hidden_size, ("mlp", "embed"), "down_proj")(swiglu(gate, up, c.swiglu_limit))


def swiglu(gate, up, limit: float = 0.0):
    """silu(gate) * up; with ``limit`` > 0 (V4's swiglu_limit) gate is clamped above and up both sides."""
    if limit:
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return nn.silu(gate) * up
