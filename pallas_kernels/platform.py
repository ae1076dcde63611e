"""Which platform a program is being compiled for, and which implementation of a kernel family runs
there: the one dispatch rule (``resolve_impl``) every kernel family follows, and the tile-size
checks they share (``check_blocks``)."""

import os
import re

import jax

IMPLS = ("auto", "pallas", "interpret", "xla")


def target_platform() -> str:
    """The mesh's devices' platform (also a TPU topology compiled for ahead of time from a CPU host,
    ``jax.set_mesh`` / ``use_abstract_mesh``), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


# What a GPU can do, read from its device kind where no local GPU gives its compute capability (an
# abstract mesh's device: compiling for a GPU from a host without it).
HOPPER_KINDS = r"\bG?H(100|200|800|20)\b"  # sm_90: wgmma
FP8_KINDS = (
    HOPPER_KINDS + r"|\b(L4|L40S?|RTX (40|50)\d0( Ti)?|RTX \d+ Ada|G?B(100|200|300))\b"
)  # sm_89+: Ada, Hopper, Blackwell
AMPERE_ON_KINDS = FP8_KINDS + r"|\b(A100|A800|A30|A40|A10G?|A16|A2|RTX A\d+|RTX 30\d0( Ti)?)\b"  # sm_80+
BIG_SMEM_KINDS = HOPPER_KINDS + r"|\b(G?B(100|200|300)|A100|A800|A30)\b"  # >= 160 KiB shared memory per block


def _target_gpu() -> tuple[tuple[int, int] | None, str | None]:
    """(compute capability, device kind) of the GPU compiled for: the mesh's abstract device (kind
    only) or the local GPU; (None, None) with neither (a CPU host)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is None and jax.default_backend() == "gpu":
        device = jax.devices()[0]
        try:
            return tuple(int(c) for c in str(device.compute_capability).split(".")[:2]), device.device_kind
        except (AttributeError, ValueError):  # no NVIDIA capability (e.g. ROCm's gfx names): go by the kind
            pass
    return None, device.device_kind if device is not None else None


def gpu_is_hopper() -> bool:
    """Whether the target GPU has wgmma (sm_90: H100 / H200 / H800 / H20 / GH200). With no GPU known
    (a CPU host), Hopper: V3's FP8 recipe's GPU."""
    capability, kind = _target_gpu()
    if capability is not None:
        return capability[0] == 9
    return kind is None or re.search(HOPPER_KINDS, kind) is not None


def gpu_has_fp8() -> bool:
    """Whether the target GPU converts e4m3 (sm_89+: Ada, Hopper, Blackwell). Older ones (A100: sm_80)
    cannot compile the FP8 kernels -- Triton aborts the process there -- so their ``auto`` is jnp."""
    capability, kind = _target_gpu()
    if capability is not None:
        return capability >= (8, 9)
    return kind is None or re.search(FP8_KINDS, kind) is not None


def gpu_runs_triton() -> bool:
    """Whether XLA compiles Triton kernels for the target GPU: an NVIDIA one from sm_80 (Ampere) on --
    a T4 or V100 is refused ("Triton support is only enabled for Ampere GPUs") -- or a non-NVIDIA one."""
    capability, kind = _target_gpu()
    if capability is not None:
        return capability >= (8, 0)
    if kind is None or not re.search(r"NVIDIA|Tesla|Quadro", kind):
        return True
    return re.search(AMPERE_ON_KINDS, kind) is not None


def gpu_big_shared_memory() -> bool:
    """Whether a block on the target GPU can use >= 160 KiB of shared memory (sm_80 / sm_87 / sm_90 /
    sm_100: A100, A30, H100, B200) rather than ~99 KiB (sm_86 / sm_89 / sm_120: A10, L4, L40S, RTX).
    With no GPU known (a CPU host), big: Hopper's."""
    capability, kind = _target_gpu()
    if capability is not None:
        return capability in ((8, 0), (8, 7)) or capability[0] in (9, 10)
    return kind is None or re.search(BIG_SMEM_KINDS, kind) is not None


# Each kernel family: what a GPU needs to compile its kernels, the check, the config field that
# chooses the implementation, and an environment variable that overrides the config (or None).
FAMILIES = {
    "fp8": (
        "a GPU with FP8 (compute capability >= 8.9: Ada, Hopper, Blackwell)",
        gpu_has_fp8,
        "fp8_impl",
        "DSJAX_FP8_IMPL",
    ),
    "attention": ("an Ampere or newer GPU (sm_80+: its kernels are Triton's)", gpu_runs_triton, "attention_impl", None),
}


def requested_impl(impl: str = "auto", family: str = "fp8") -> str:
    """The family's environment override (``DSJAX_FP8_IMPL``) over ``impl`` (its config field), checked."""
    _, _, field, env = FAMILIES[family]
    impl = (env and os.environ.get(env)) or impl
    if impl not in IMPLS:
        where = f" (config {field} or {env})" if env else ""
        raise ValueError(f"{field}={impl!r}: expected one of {', '.join(IMPLS)}{where}")
    return impl


def auto_partitioned() -> bool:
    """Whether the current mesh has an axis XLA partitions by itself (size > 1, not Manual). XLA
    cannot partition a Pallas call: there a kernel must run per shard, inside ``jax.shard_map``."""
    mesh = jax.sharding.get_abstract_mesh()
    return any(n > 1 and t != jax.sharding.AxisType.Manual for n, t in zip(mesh.axis_sizes, mesh.axis_types))


def resolve_impl(impl: str = "auto", family: str = "fp8", platform: str | None = None, per_shard: bool = False) -> str:
    """The one dispatch rule of every kernel family: "xla" (the jnp reference), "pallas" (the kernel
    compiled for this platform) or "interpret" (the Pallas interpreter, any backend: how CPU tests
    check a kernel). ``auto`` -> pallas on a TPU, or on a GPU that can compile the family's kernels;
    xla elsewhere. Under a mesh XLA partitions, a kernel needs a caller that runs it per shard
    (``per_shard``, as ``dsjax.model.fp8`` and the attention dispatch do); for anyone else ``auto``
    is xla there and an explicit kernel is an error. A choice the devices cannot run: ValueError."""
    needs, gpu_can, field, _ = FAMILIES[family]
    impl = requested_impl(impl, family)
    platform = platform or target_platform()
    partitioned = auto_partitioned() and not per_shard
    if partitioned and impl in ("pallas", "interpret"):
        raise ValueError(
            f"{field}={impl!r}: under a multi-device mesh the Pallas kernels run per shard, "
            "inside jax.shard_map (dsjax.model does this); called directly, use 'xla' or 'auto'"
        )
    gpu_ok = platform != "gpu" or gpu_can()
    if impl == "auto":
        impl = "pallas" if platform in ("tpu", "gpu") and gpu_ok and not partitioned else "xla"
    if impl == "pallas" and platform not in ("tpu", "gpu"):
        raise ValueError(f"{field}='pallas' needs a TPU or GPU, this is {platform!r}: use 'interpret' or 'xla'")
    if impl == "pallas" and not gpu_ok:
        raise ValueError(f"{field}='pallas' needs {needs}, this one is {_target_gpu()[1]!r}: use 'xla' or 'auto'")
    return impl


def check_blocks(kernel: str, backend: str, lane_dense: bool = False, **blocks: int) -> None:
    """ValueError, before anything is traced, for tile sizes the backend cannot lower: every block a
    positive multiple of 8; Triton (gpu) wants powers of two >= 16; Mosaic (tpu) wants multiples of
    128 for blocks sliced along lanes (``lane_dense``)."""
    for name, blk in blocks.items():
        if blk <= 0 or blk % 8:
            raise ValueError(f"{kernel}: {name}={blk} must be a positive multiple of 8")
        if backend == "gpu" and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{kernel}: {name}={blk}: Triton wants a power of two >= 16")
        if backend == "tpu" and lane_dense and blk % 128:
            raise ValueError(f"{kernel}: {name}={blk}: Mosaic slices it along lanes, needs a multiple of 128")


def kernel_for(platform: str):
    """The Pallas kernel family for a platform: ``mgpu`` (Mosaic GPU, wgmma) on Hopper, ``triton`` on
    other GPUs, ``tpu`` (Mosaic TPU) on TPU and for interpret mode on CPU."""
    if platform == "rocm" or (platform in ("gpu", "cuda") and not gpu_is_hopper()):
        return "triton"
    return "mgpu" if platform in ("gpu", "cuda") else "tpu"


def forward_only(name: str, kernel, *args):
    """``kernel(*args)``: a Pallas call that nothing differentiates (the FP8 GEMMs inside
    ``dsjax.model.fp8``'s own custom_vjp, FP8 inference, latent decoding), wrapped so that dead-code
    elimination drops it when its outputs go unused. JAX 0.11's DCE keeps every pallas_call, and Flax's
    ``nn.scan`` refuses a layer body whose kept ops read the carry ("broadcasted variable has a data
    dependency on the scan body"); a custom_vjp call is dropped whole. Its gradient is an error naming it."""

    def no_gradient(*_):
        raise TypeError(
            f"{name}: a Pallas kernel without a gradient rule was differentiated; use impl='xla' "
            "(the jnp reference) to differentiate through it"
        )

    call = jax.custom_vjp(kernel)
    call.defvjp(lambda *a: (kernel(*a), None), no_gradient)
    return call(*args)
