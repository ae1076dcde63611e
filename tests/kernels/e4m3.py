"""Numpy restatements of e4m3 quantization (DeepSeek-V3 §3.3.2) and the lowering helpers the FP8
kernel and FP8 model tests share."""

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.parallel.rules import MESH_AXES
from pallas_kernels.platform import gpu_is_hopper

E4M3_MAX, HALF_ULP, SUBNORMAL_STEP = 448.0, 2.0**-4, 2.0**-9  # e4m3: 3 mantissa bits, min subnormal 2^-9

# Each kernel family runs compiled on its own hardware (on a lent GPU: `pytest -m accelerator
# tests/kernels tests/model`) and in interpret mode elsewhere (Mosaic GPU's interpret mode checks
# wgmma's layouts and TMA too). The other tests assume the CPU backend (its 8 simulated devices).
ON_TPU = jax.default_backend() == "tpu"
ON_GPU = jax.default_backend() == "gpu"
ON_HOPPER = ON_GPU and gpu_is_hopper()
KERNEL_IMPL = "pallas" if ON_TPU or ON_GPU else "interpret"  # the dispatch's kernel on this machine


def np_scales(amax, amax_min=1e-4):
    return np.maximum(amax, amax_min) / 448.0


def tiles_view(x, axis):
    """numpy restatement: [.., K] padded to 128 and cut into [..., K/128, 128] along ``axis``."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    x = np.concatenate([x, np.zeros((*x.shape[:-1], -x.shape[-1] % 128))], -1)
    return x.reshape(*x.shape[:-1], -1, 128)


def assert_within_e4m3(x_tiles, q_tiles, s):
    """|q s - x| <= max(2^-4 |x|, 2^-10 s): half an ulp (normal) or half a subnormal step."""
    deq = q_tiles * s[..., None]
    bound = np.maximum(HALF_ULP * np.abs(x_tiles), SUBNORMAL_STEP / 2 * s[..., None]) * (1 + 1e-6)
    assert np.all(np.abs(deq - x_tiles) <= bound)


def varied(shape, seed=0):
    """Normal values times a per-row magnitude spanning 1e-6 .. 1e6."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 6, (shape[0],) + (1,) * (len(shape) - 1))).astype(
        np.float32
    )


def dequantized(q, s, tiles_axis=None):
    """numpy: q times its scale repeated over tiles (tiles_axis) or over 128x128 blocks (None)."""
    q, s = np.asarray(q.astype(jnp.float32), np.float64), np.asarray(s, np.float64)
    if tiles_axis is not None:
        return q * np.repeat(s, 128, tiles_axis)[: q.shape[0], : q.shape[1]]
    return q * np.repeat(np.repeat(s, 128, -2), 128, -1)[..., : q.shape[-2], : q.shape[-1]]


def lower(f, args, platform):
    """f(*args) lowered for ``platform``'s compiler from this host: the StableHLO text."""
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def abstract_mesh(kind: str, platform: str, shape=(2, 1, 2, 2)):
    """A (data, fsdp, expert, tensor) mesh of devices of ``kind``, to trace and lower for without them."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    return AbstractMesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4, abstract_device=AbstractDevice(kind, 132, platform)
    )
