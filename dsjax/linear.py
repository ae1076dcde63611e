"""The one projection every module uses: y = x W (no bias), W annotated with logical axis names."""

import flax.linen as nn
import jax.numpy as jnp

from dsjax.config import ModelConfig


def linear(cfg: ModelConfig, features, axes: tuple[str, ...], name: str, axis=-1) -> nn.DenseGeneral:
    """A bias-free projection whose kernel is [*in, *out], normal(initializer_range) initialised."""
    init = nn.initializers.normal(cfg.initializer_range)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=False,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(init, axes),
        name=name,
    )
