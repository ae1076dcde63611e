"""The DeepSeek-V2/V3/V3.2 model (MLA, DeepSeekMoE, MTP, V3's FP8 linear, V3.2's DSA) and DeepSeek-V4
(hybrid compressed attention, mHC, hash routing), as Flax linen modules whose parameters carry logical
axis names (``dsjax.parallel.rules`` maps them onto a mesh). ``build_model(cfg)`` picks the generation."""

from dsjax.model.moe import RouterStats
from dsjax.model.params import count_params, training_flops_per_token
from dsjax.model.transformer import (
    ModelOutput,
    Transformer,
    abstract_variables,
    build_model,
    echoing_variables,
    init_cache,
    random_variables,
)

__all__ = [
    "ModelOutput",
    "RouterStats",
    "Transformer",
    "abstract_variables",
    "build_model",
    "count_params",
    "echoing_variables",
    "init_cache",
    "random_variables",
    "training_flops_per_token",
]
