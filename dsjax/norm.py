"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), statistics in fp32."""

import flax.linen as nn
import jax.numpy as jnp


class RMSNorm(nn.Module):
    eps: float
    axis_name: str = "norm"  # logical axis of the scale, for sharding rules
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps))
        return scale.astype(x.dtype) * y.astype(x.dtype)
