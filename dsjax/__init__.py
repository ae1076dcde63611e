"""dsjax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax."""

from dsjax.config import Config, ConfigError, DataConfig, ModelConfig, RopeScaling, TrainConfig, load_config
from dsjax.convert import CheckpointError, from_hf_state_dict
from dsjax.model import ModelOutput, Transformer, count_params
from dsjax.moe import RouterStats

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ModelOutput",
    "RopeScaling",
    "RouterStats",
    "TrainConfig",
    "Transformer",
    "count_params",
    "from_hf_state_dict",
    "load_config",
]
