"""dsjax: the DeepSeek model family (V2, V3, V3.2: MLA, DeepSeekMoE, MTP, FP8, DSA; V4: mHC, hybrid
compressed attention, hash routing) in JAX/Flax.

The package is layered, each layer importing only from those above it in this list:

    dsjax.config     typed configs, YAML loading
    dsjax.parallel   mesh, the one logical-axis rules table, per-shard code, the expert-parallel exchange
    dsjax.model      RoPE/YaRN, layers, attention + kernel dispatch, MLA, MoE, MTP, FP8 linear, transformer;
                     V4's mHC, compressors, hybrid attention
    dsjax.hf         hub checkpoints          dsjax.infer   generation, the serving engine (paged cache)
    dsjax.train      loss, step, optimizer, data, checkpoints, the loop
    dsjax.rl         R1's recipe: SFT, rollouts, GRPO
    dsjax.aot        compile-only planning for TPU slices and GPUs
    dsjax.cli        command-line entry points

The names below are imported on first use, so ``import dsjax`` stays cheap.
"""

import glob
import importlib
import importlib.util
import os
import sys

_EXPORTS = {
    "Config": "dsjax.config", "ConfigError": "dsjax.config", "DataConfig": "dsjax.config",
    "MeshConfig": "dsjax.config", "ModelConfig": "dsjax.config", "RopeScaling": "dsjax.config",
    "TrainConfig": "dsjax.config", "load_config": "dsjax.config",
    "CheckpointError": "dsjax.hf", "from_hf_config": "dsjax.hf", "from_hf_state_dict": "dsjax.hf",
    "load_hf": "dsjax.hf", "save_hf": "dsjax.hf", "to_hf_config": "dsjax.hf",
    "ModelOutput": "dsjax.model", "RouterStats": "dsjax.model", "Transformer": "dsjax.model",
    "build_model": "dsjax.model", "count_params": "dsjax.model", "init_cache": "dsjax.model",
    "Engine": "dsjax.infer", "SamplingParams": "dsjax.infer", "generate": "dsjax.infer",
    "restore_model": "dsjax.train", "train": "dsjax.train",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsjax' has no attribute {name!r}")


def _cpu_only_host() -> bool:
    """No TPU (Google PCI vendor id, /dev/accel*, /dev/vfio), no NVIDIA or AMD GPU device node."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return False
    if any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")):
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if open(vendor).read().strip() == "0x1ae0":
                return False
        except OSError:
            pass
    return True


def _quiet_on_cpu_hosts() -> None:
    """With libtpu installed (``.[tpu]``, the compile-only planner's TPU compiler) JAX tries to start a
    TPU runtime on every host, and on one without a TPU libtpu prints initialisation errors before JAX
    falls back to the CPU. There, the CPU is the only platform: say so (``JAX_PLATFORMS=cpu``), which
    changes nothing but the noise; planning for TPU slices still works. A JAX_PLATFORMS already set wins."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None or not _cpu_only_host():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # jax read the environment already; its backends start on first use
        sys.modules["jax"].config.update("jax_platforms", "cpu")


_quiet_on_cpu_hosts()
