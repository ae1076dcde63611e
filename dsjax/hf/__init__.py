"""Hugging Face hub checkpoints: config.json mapping, the tensor-name table, safetensors IO."""

from dsjax.hf.checkpoint import from_hf_state_dict, load_hf, save_hf, summary, to_fp8_weights
from dsjax.hf.config import from_hf_config, to_hf_config
from dsjax.hf.tensors import CheckpointError

__all__ = [
    "CheckpointError",
    "from_hf_config",
    "from_hf_state_dict",
    "load_hf",
    "save_hf",
    "summary",
    "to_fp8_weights",
    "to_hf_config",
]
