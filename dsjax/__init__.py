"""dsjax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX/Flax.

The names below are imported on first use, so ``python -m dsjax.config`` / ``dsjax.convert`` run
their module once (no runpy double-import warning) and ``import dsjax`` stays cheap.
"""

import importlib

_EXPORTS = {
    "Config": "dsjax.config", "ConfigError": "dsjax.config", "DataConfig": "dsjax.config",
    "ModelConfig": "dsjax.config", "RopeScaling": "dsjax.config", "TrainConfig": "dsjax.config",
    "load_config": "dsjax.config",
    "CheckpointError": "dsjax.convert", "from_hf_state_dict": "dsjax.convert",
    "load_hf": "dsjax.convert", "save_hf": "dsjax.convert",
    "ModelOutput": "dsjax.model", "Transformer": "dsjax.model", "count_params": "dsjax.model",
    "RouterStats": "dsjax.moe",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsjax' has no attribute {name!r}")
