"""Devices to compile for without having them: a TPU slice's chips, or N GPUs of a described kind.

TPU slices come from libtpu's compiler (``pip install -e ".[tpu]"``); GPUs (``h100:N``, ``a100:N``,
``l4:N``, ``t4:N``: N GPUs of one host) from XLA's CUDA plugin (``pip install "jax[cuda13]"``),
which compiles for a described GPU (``GPUS``) without one.
"""

from __future__ import annotations

import os

from dsjax.config import ConfigError

GIB = 2**30
# GPUs to compile for: name -> (device kind, compute capability, SMs, shared memory per block (opt-in)
# and per SM, clock GHz, memory bytes, memory B/s, L2 bytes) -- what XLA's GpuTargetConfig describes.
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, 233472, 1.98, 84929347584, 3352320000000, 52428800),
    "a100": ("NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912, 167936, 1.41, 85095874560, 2039000000000, 41943040),
    "l4": ("NVIDIA L4", (8, 9), 58, 101376, 102400, 2.04, 23580639232, 300000000000, 50331648),
    "t4": ("Tesla T4", (7, 5), 40, 65536, 65536, 1.59, 15828320256, 320000000000, 4194304),
}
# HBM per chip (GiB) by jax device_kind.
HBM_GIB = {
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5": 95,
    "TPU v5p": 95,
    "TPU v6 lite": 32,
    "TPU7x": 192,
    **{g[0]: round(g[6] / GIB, 1) for g in GPUS.values()},
}


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology (e.g. 'v5e:1x1', 'v5p:8x8x8') to compile for, from a host without one."""
    from jax.experimental import topologies

    def devices(**kw):
        return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kw).devices

    try:
        return devices()
    except Exception as e:  # no libtpu, or a name it does not know
        error = e
    # libtpu <= 0.0.48 (JAX 0.11) lays every slice out in 2x2 hosts: a smaller slice is one host of its own.
    dims = topology.partition(":")[2].split("x")
    if "chips_per_host_bounds" in str(error) and all(d.isdigit() for d in dims):
        try:
            return devices(chips_per_host_bounds=tuple(int(d) for d in dims + ["1"] * (3 - len(dims))))
        except Exception as e:
            error = e
    raise ConfigError(f"--topology {topology!r}: {error} (the TPU compiler comes with pip install -e '.[tpu]')")


def gpu_target_config(name: str) -> str:
    """XLA's GpuTargetConfigProto (text) for one of ``GPUS``."""
    kind, (major, minor), sms, smem_block, smem_sm, ghz, mem, bw, l2 = GPUS[name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_sm} threads_per_core_limit: 2048 core_count: {sms} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bw} l2_cache_size: {l2} clock_rate_ghz: {ghz} device_memory_size: {mem}
  shared_memory_per_block_optin: {smem_block}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA" dnn_version_info {{ major: 9 minor: 10 }} runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{kind}"
"""


def gpu_devices(topology: str) -> list:
    """The devices of ``name:N`` (N GPUs of one host, e.g. 'h100:8') to compile for, from a host without them."""
    from jax.experimental import topologies

    name, _, count = topology.partition(":")
    if not (count or "1").isdigit():
        raise ConfigError(f"--topology {topology!r}: a GPU topology is NAME:COUNT, e.g. h100:8 ({', '.join(GPUS)})")
    # The CUDA plugin checks the local CUDA libraries when JAX first starts its backends, and on a
    # host without a GPU that check fails (cuPTI cannot load) and leaves the plugin out: skip it,
    # nothing here runs on a local GPU. (Too late if this process started its backends already.)
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    try:
        return topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(name), topology=f"1x1x{count or 1}"
        ).devices
    except Exception as e:  # no CUDA plugin, or it refuses
        raise ConfigError(
            f"--topology {topology!r}: {type(e).__name__}: {e} (compiling for a GPU without one needs "
            "XLA's CUDA plugin: pip install 'jax[cuda13]')"
        ) from None


def is_gpu_topology(topology: str) -> bool:
    """Whether ``topology`` names GPUs (``h100:8``) rather than a TPU slice (``v5p:8x8x8``)."""
    return topology.partition(":")[0] in GPUS


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice or of ``NAME:COUNT`` GPUs, to compile for."""
    return gpu_devices(topology) if is_gpu_topology(topology) else tpu_devices(topology)
