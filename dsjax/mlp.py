"""SwiGLU feed-forward: y = W_down (silu(W_gate x) * (W_up x))."""

import flax.linen as nn

from dsjax.config import ModelConfig
from dsjax.linear import linear


class MLP(nn.Module):
    cfg: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x):
        c, i = self.cfg, self.intermediate_size
        gate = linear(c, i, ("embed", "mlp"), "gate_proj")(x)
        up = linear(c, i, ("embed", "mlp"), "up_proj")(x)
        return linear(c, c.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)
