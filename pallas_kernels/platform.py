"""Which platform a program is being compiled for -- what every "auto" kernel choice follows."""

import re

import jax


def target_platform() -> str:
    """The mesh's devices' platform (also a TPU topology compiled for ahead of time from a CPU host,
    ``jax.set_mesh`` / ``use_abstract_mesh``), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def gpu_is_hopper() -> bool:
    """Whether the target GPU has wgmma (sm_90: H100 / H200 / H800 / H20 / GH200), from the mesh's
    abstract device or the local GPU. With neither known (a CPU host), Hopper: V3's FP8 recipe's GPU."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is None and jax.default_backend() == "gpu":
        capability = getattr(jax.devices()[0], "compute_capability", None)
        if capability is not None:
            return str(capability).split(".")[0] == "9"
        device = jax.devices()[0]
    if device is None:
        return True
    return re.search(r"\b(G?H(100|200|800|20))\b", device.device_kind) is not None
