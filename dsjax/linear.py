"""The one projection every module uses: y = x W (no bias), W annotated with logical axis names."""

import flax.linen as nn
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.fp8 import Fp8Linear, Fp8Recipe, fp8_dense_general


def linear(cfg: ModelConfig, features, axes: tuple[str, ...], name: str, axis=-1, quantize: bool = True) -> nn.Module:
    """A bias-free projection whose kernel is [*in, *out], normal(initializer_range) initialised.

    With ``cfg.fp8`` and ``quantize`` its GEMMs run in FP8 (``dsjax.fp8``); V3 keeps the output
    head (and MTP's eh_proj) unquantized: pass ``quantize=False`` there. The parameter is the same.
    With ``cfg.fp8_weights`` and ``quantize`` the kernel is stored in e4m3 + block scales instead
    (``Fp8Linear``, inference)."""
    if cfg.fp8_weights and quantize:
        return Fp8Linear(features, axis, axes, cfg.initializer_range, jnp.dtype(cfg.dtype), Fp8Recipe.of(cfg), name=name)
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
