"""Which platform a program is being compiled for -- what every "auto" kernel choice follows."""

import jax


def target_platform() -> str:
    """The mesh's devices' platform (also a TPU topology compiled for ahead of time from a CPU host,
    ``jax.set_mesh`` / ``use_abstract_mesh``), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()
