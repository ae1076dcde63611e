"""The DeepSeek-V2/V3 model: MLA, DeepSeekMoE, MTP and V3's FP8 linear, as Flax linen modules whose
parameters carry logical axis names (``dsjax.parallel.rules`` maps them onto a mesh)."""

from dsjax.model.moe import RouterStats
from dsjax.model.params import count_params, training_flops_per_token
from dsjax.model.transformer import (
    ModelOutput,
    Transformer,
    abstract_variables,
    echoing_variables,
    init_cache,
    random_variables,
)

__all__ = [
    "ModelOutput",
    "RouterStats",
    "Transformer",
    "abstract_variables",
    "count_params",
    "echoing_variables",
    "init_cache",
    "random_variables",
    "training_flops_per_token",
]
