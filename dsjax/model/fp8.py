"""FP8 linear for training (DeepSeek-V3 §3.3, Fig. 6-7): all three GEMMs of y = x W in e4m3.

    forward  y  = x W       x: 1x128 tiles, W: 128x128 blocks
    dgrad    dx = dy W^T    dy: 1x128 tiles, W^T: the same blocks, transposed
    wgrad    dW = x^T dy    x and dy: 128x1 tiles (along the tokens, the contracted dim)

each promoted to fp32 every 128 elements of K (``pallas_kernels.fp8_gemm``). W is the fp32 master
weight (quantized from it on every call, "online"); y and dx come out in x's dtype, dW in fp32.
Under a mesh the kernels run per shard (``_gemm``, ``_tiles``).
``fp8_dense_general`` is the ``nn.DenseGeneral`` that uses it: same parameter, init and axes.

Low-precision communication (report §3.3.3): under expert parallelism the MoE dispatch sends each
token row as e4m3 1x128 tiles with their scales (``send_e4m3``), and the gradient that comes back to
the experts' down-projection travels the same way (``send_grad_e4m3``); the combine and the
dispatch's own gradient stay in the compute dtype. The tiles are the grouped GEMMs' own (row-local,
so moving rows moves them whole): the experts quantize what arrives to the same e4m3 values.

FP8 inference (``cfg.fp8_weights``) keeps W itself in e4m3 with one fp32 ``scale_inv`` per 128x128
block, as DeepSeek's FP8 release ships it (``Fp8Weight``): ``Fp8Linear`` runs the forward GEMM above
on the stored blocks, with no master weight and no backward.
"""

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsjax.parallel.collectives import gather_along
from dsjax.parallel.rules import BATCH, mesh_axes
from pallas_kernels.fp8_gemm import fp8_gemm, fp8_gemm_reference
from pallas_kernels.platform import auto_partitioned, requested_impl, resolve_impl
from pallas_kernels.quant import (
    AMAX_MIN,
    E4M3,
    E4M3_MAX,
    GRAD_AMAX_MIN,
    TILE,
    block_count,
    dequantize_blocks,
    dequantize_tiles,
    pad_to,
    quantize_blocks,
    quantize_tiles,
    scale_from_amax,
    to_e4m3,
)

FSDP, TENSOR = mesh_axes("embed"), mesh_axes("mlp")  # weights gathered over FSDP; columns split by tensor parallelism


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_matmul(x, w, impl: str = "auto", pow2: bool = False):
    """x [M, K] (bf16 / fp32) @ w [K, N] (master weight) with every GEMM in FP8 (module docstring)."""
    return _fwd(x, w, impl, pow2)[0]


def _fwd(x, w, impl, pow2):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"fp8_matmul: need x [M, K] and w [K, N], got {x.shape} and {w.shape}")
    return _x_times_blocks(x, *quantize_blocks(w, pow2), impl, pow2)[:, : w.shape[1]], (x, w)


def _x_times_blocks(x, qw, sw, impl, pow2=False):
    """x [M, K] in 1x128 tiles times padded e4m3 blocks qw [Kp, Np] with scales sw: the forward GEMM."""
    qx, sx = _tiles(x, -1, impl, pow2)
    return _gemm(qx, sx, qw, sw, x.dtype, impl)


def _bwd(impl, pow2, res, dy):
    x, w = res
    qw, sw = quantize_blocks(w, pow2)  # the forward's blocks again; W^T's scales are their transpose
    qg, sg = _tiles(dy, -1, impl, pow2, GRAD_AMAX_MIN)
    dx = _gemm(qg, sg, qw.T, sw.T, x.dtype, impl)[:, : x.shape[1]]
    qxt, sxt = _tiles(x, 0, impl, pow2)  # 128x1: tiles run along M, wgrad's K
    qgt, sgt = _tiles(dy, 0, impl, pow2, GRAD_AMAX_MIN)
    dw = _gemm(qxt.T, sxt.T, qgt, sgt, jnp.float32, impl, tokens_contracted=True)
    return like_primal(dx, x), like_primal(dw.astype(w.dtype), w)


fp8_matmul.defvjp(_fwd, _bwd)


def like_primal(ct, primal):
    """A cotangent summed over the shard_map axes it varies along and its primal does not (a weight
    replicated over them): what JAX's own transposes do, and what check_vma asks of a custom_vjp."""
    extra = tuple(sorted(_varying(ct) - _varying(primal)))
    return jax.lax.psum(ct, extra) if extra else ct


def gathered_blocks(w, axis: str, dim: int, pow2: bool = False):
    """``quantize_blocks(all_gather(w, axis, axis=dim, tiled=True))`` inside a shard_map, sending e4m3.

    w [..., K, N] is this device's slice along ``dim`` (-2 or -1) of a weight split over mesh axis
    ``axis`` (FSDP). A 128-block may straddle slices: each device takes its rows' partial block amax,
    a pmax over ``axis`` completes it (one float per block), each device quantizes its own slice
    with those scales and only then is the slice gathered -- one byte per element instead of four,
    and the same q and s, bit for bit, as quantizing the gathered fp32 weight."""
    if dim not in (-1, -2):
        raise ValueError(f"gathered_blocks: dim must be -2 (K) or -1 (N), got {dim}")
    if dim == -1:
        q, s = gathered_blocks(w.swapaxes(-1, -2), axis, -2, pow2)
        return q.swapaxes(-1, -2), s.swapaxes(-1, -2)
    n_slices, rows = jax.lax.axis_size(axis), w.shape[-2]
    w = pad_to(w.astype(jnp.float32), -1)
    block = (jax.lax.axis_index(axis) * rows + jnp.arange(rows)) // TILE  # each row's block in the whole K
    row_amax = jnp.max(jnp.abs(w.reshape(*w.shape[:-1], -1, TILE)), axis=-1)  # [..., rows, Np/128]
    partial = jnp.zeros((*w.shape[:-2], block_count(rows * n_slices), w.shape[-1] // TILE), jnp.float32)
    s = scale_from_amax(jax.lax.pmax(partial.at[..., block, :].max(row_amax), axis), pow2)
    q = to_e4m3(w, jnp.repeat(s[..., block, :], TILE, axis=-1))
    return pad_to(gather_along(q, axis, -2), -2), s


def _varying(x) -> frozenset:
    """The shard_map axes along which x varies (its type's ``varying`` set; ``vma`` before JAX 0.12)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _kernels_per_shard(impl, tokens: int, what: str) -> bool:
    """Under a mesh XLA partitions: whether the FP8 kernels run per shard of the batch axes (else the
    jnp path, partitioned by XLA). ``tokens``: the rows' count in units that must not straddle shards
    (``what`` names them). Not where a shard_map already covers some axes, nor for tokens that do not
    split evenly: there ``auto`` takes the jnp path and an explicit kernel is an error."""
    mesh = jax.sharding.get_abstract_mesh()
    if resolve_impl(impl, per_shard=True) == "xla":
        return False
    manual = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Manual]
    if manual:  # inside a shard_map over some axes: XLA partitions the rest, and no kernel can run there
        if requested_impl(impl) == "auto":
            return False
        raise ValueError(
            f"fp8_impl={requested_impl(impl)!r}: inside a shard_map over only {', '.join(manual)} of the "
            "mesh, XLA partitions the other axes and cannot partition a Pallas kernel; shard_map over "
            "every axis, or use fp8_impl 'auto' or 'xla'"
        )
    shards = math.prod(mesh.shape[n] for n in BATCH)
    if tokens < 0 or tokens % shards:
        if requested_impl(impl) == "auto":
            return False
        raise ValueError(
            f"fp8_impl={requested_impl(impl)!r} under a mesh: {what} do not split over the batch axes "
            f"data x fsdp x expert = {shards} shards; use fp8_impl 'auto' or 'xla'"
        )
    return True


def _tiles(x, axis: int, impl, pow2, amax_min=AMAX_MIN):
    """``quantize_tiles`` of activations or gradients x [tokens, features]: axis -1 1x128 tiles, axis 0
    128x1 tiles along the tokens. Under a mesh XLA partitions, per shard of the batch axes as ``_gemm``
    runs its GEMMs, so the quantizer kernel runs there too (no tile straddles shards: same q and s)."""
    if not auto_partitioned():
        return quantize_tiles(x, axis, pow2, amax_min, impl)
    m = x.shape[0]
    if axis % 2:
        tokens, what = m, f"{m} tokens"
    elif m % TILE == 0:  # whole 128-token tiles per shard (a shard's own padding would move the tiles)
        tokens, what = m // TILE, f"{m // TILE} tiles of 128 tokens"
    else:
        tokens, what = -1, f"{m} tokens (not whole 128-token tiles)"
    if not _kernels_per_shard(impl, tokens, what):
        return quantize_tiles(x, axis, pow2, amax_min, "xla")
    rows = P(BATCH, None)
    local = functools.partial(quantize_tiles, axis=axis, pow2=pow2, amax_min=amax_min, impl=impl)
    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(local, mesh=mesh, in_specs=rows, out_specs=(rows, rows), check_vma=False)(x)


def _gemm(a, a_s, b, b_s, out_dtype, impl, tokens_contracted=False):
    """``fp8_gemm``; under a mesh XLA partitions, the kernel runs per shard (XLA cannot partition a
    Pallas call): the tokens split over the batch axes -- a's rows, or in wgrad (``tokens_contracted``)
    the contracted dim, partial products summed over the shards -- and b's columns over ``tensor``
    (b itself is gathered, as FSDP gathers a weight for its matmul). Tokens that do not split into
    whole scale tiles take the jnp path under ``auto`` and are an error for an explicit kernel. wgrad's
    sum over ``fsdp`` is a reduce-scatter where dW's rows or columns split over it."""
    if not auto_partitioned():
        return fp8_gemm(a, a_s, b, b_s, out_dtype, impl)
    tokens = a_s.shape[1] if tokens_contracted else a.shape[0]  # wgrad: one scale per 128 tokens
    what = f"{tokens} tiles of 128 tokens" if tokens_contracted else f"{tokens} tokens"
    if not _kernels_per_shard(impl, tokens, what):
        return fp8_gemm_reference(a, a_s, b, b_s, out_dtype)
    mesh = jax.sharding.get_abstract_mesh()
    t = mesh.shape[TENSOR]
    whole_blocks = b_s.shape[1] == b.shape[1] or b.shape[1] == b_s.shape[1] * TILE  # column scales, or padded blocks
    cols = TENSOR if t > 1 and whole_blocks and b_s.shape[1] % t == 0 else None
    scatter = None  # wgrad: the dim of dW its partial sums are reduce-scattered along over fsdp, as FSDP does
    if tokens_contracted:
        specs, out = (P(None, BATCH), P(None, BATCH), P(BATCH, cols), P(BATCH, cols)), P(None, cols)
        f = mesh.shape[FSDP]
        if f > 1 and a.shape[0] % f == 0:
            scatter, out = 0, P(FSDP, cols)
        elif f > 1 and b.shape[1] // (t if cols else 1) % f == 0:
            scatter, out = 1, P(None, (cols, FSDP) if cols else FSDP)
    else:
        specs, out = (P(BATCH, None), P(BATCH, None), P(None, cols), P(None, cols)), P(BATCH, cols)

    def local(a, a_s, b, b_s):
        c = fp8_gemm(a, a_s, b, b_s, out_dtype, impl)
        if not tokens_contracted:
            return c
        # summed over the other batch axes; over fsdp each device keeps its 1/fsdp (XLA moves that to the
        # weight's own sharding): a replicated fp32 dW, stacked by a layer scan, costs GiBs per device
        if scatter is None:
            return jax.lax.psum(c, BATCH)
        c = jax.lax.psum(c, tuple(n for n in BATCH if n != FSDP))
        return jax.lax.psum_scatter(c, FSDP, scatter_dimension=scatter, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out, check_vma=False)(a, a_s, b, b_s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def send_e4m3(move, x, aux=(), impl: str = "auto", pow2: bool = False):
    """``move(x, aux)`` -- a collective that moves whole rows of x [..., H] between devices (``aux``:
    its integer offsets and sizes) -- with x sent as e4m3 1x128 tiles and their fp32 scales, about a
    byte per value; it arrives dequantized, in x's dtype. Gradient: move's transpose, in x's dtype."""
    return _send_e4m3_fwd(move, x, aux, impl, pow2)[0]


def _send_e4m3_fwd(move, x, aux, impl, pow2):
    q, s = _row_tiles(x, impl, pow2, AMAX_MIN)
    return _from_tiles(move(q, aux), move(s, aux), x), (x[..., :0], aux)


def _send_e4m3_bwd(move, impl, pow2, res, ct):
    like, aux = res
    return _moved_back(move, aux, like, ct), None


send_e4m3.defvjp(_send_e4m3_fwd, _send_e4m3_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def send_grad_e4m3(move, x, aux=(), impl: str = "auto", pow2: bool = False):
    """``move(x, aux)`` as it is, while its gradient goes back (move's transpose) as e4m3 1x128 tiles
    with fp32 scales, arriving dequantized in the gradient's dtype."""
    return move(x, aux)


def _send_grad_e4m3_fwd(move, x, aux, impl, pow2):
    return move(x, aux), (x[..., :0], aux)


def _send_grad_e4m3_bwd(move, impl, pow2, res, ct):
    like, aux = res
    q, s = _row_tiles(ct, impl, pow2, GRAD_AMAX_MIN)
    return _from_tiles(_moved_back(move, aux, like, q), _moved_back(move, aux, like, s), ct), None


send_grad_e4m3.defvjp(_send_grad_e4m3_fwd, _send_grad_e4m3_bwd)


def _row_tiles(x, impl, pow2, amax_min):
    """1x128 tiles of x's rows (2-D for the quantizer kernel): q [..., Hp] e4m3, s [..., Hp/128]."""
    q, s = quantize_tiles(x.reshape(-1, x.shape[-1]), -1, pow2, amax_min, impl)
    return q.reshape(*x.shape[:-1], -1), s.reshape(*x.shape[:-1], -1)


def _from_tiles(q, s, like):
    return dequantize_tiles(q, s)[..., : like.shape[-1]].astype(like.dtype)


def _moved_back(move, aux, like, ct):
    """move's transpose applied to ct, whose rows arrived where x's ``like`` [..., 0] rows left."""
    aval = jax.ShapeDtypeStruct((*like.shape[:-1], ct.shape[-1]), ct.dtype)
    return jax.linear_transpose(lambda v: move(v, aux), aval)(ct)[0]


def fp8_dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, impl="auto", pow2=False
):
    """``lax.dot_general`` as ``nn.DenseGeneral`` calls it (lhs [..., *in] . kernel [*in, *out]),
    computed as one 2-D ``fp8_matmul``."""
    del precision, preferred_element_type
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or tuple(rc) != tuple(range(len(rc))):
        raise ValueError(f"fp8_dot_general: only DenseGeneral's contraction (no batch dims), got {dimension_numbers}")
    lc = [d % lhs.ndim for d in lc]
    x = jnp.moveaxis(lhs, lc, range(lhs.ndim - len(lc), lhs.ndim))
    lead, k = x.shape[: lhs.ndim - len(lc)], math.prod(rhs.shape[: len(rc)])
    y = fp8_matmul(x.reshape(-1, k), rhs.reshape(k, -1), impl, pow2)
    return y.reshape(*lead, *rhs.shape[len(rc) :])


def keep_master_kernel(inputs, kernel, bias, dtype=None, inexact=True):
    """DenseGeneral's dtype promotion, except the kernel stays the fp32 master (quantized, not cast)."""
    del inexact
    return (inputs if dtype is None else inputs.astype(dtype)), kernel, bias


class Fp8Recipe(NamedTuple):
    """How a model's FP8 GEMMs run: ``impl`` (``fp8_impl``: auto | xla | pallas | interpret) and
    ``pow2``, every scale rounded up to a power of two (``fp8_scale_fmt: ue8m0``, DeepSeek-V3.1's UE8M0
    scales: exact to apply, at most one bit of e4m3 range given up)."""

    impl: str = "auto"
    pow2: bool = False

    @classmethod
    def of(cls, cfg) -> "Fp8Recipe":  # cfg: a ModelConfig
        return cls(cfg.fp8_impl, cfg.fp8_scale_fmt == "ue8m0")


@functools.cache
def _dot_general(recipe: Fp8Recipe):
    return functools.partial(fp8_dot_general, impl=recipe.impl, pow2=recipe.pow2)  # one object per recipe: hashable


def fp8_dense_general(recipe: Fp8Recipe, **kwargs) -> nn.DenseGeneral:
    """``nn.DenseGeneral(**kwargs)`` whose product is ``fp8_matmul``; parameters unchanged."""
    return nn.DenseGeneral(**kwargs, dot_general=_dot_general(recipe), promote_dtype=keep_master_kernel)


# --- FP8 inference: weights stored in e4m3 -------------------------------------------------------


@flax.struct.dataclass
class Fp8Weight:
    """W ~= q x scale_inv of its 128x128 block, over the last two dims (leading dims: experts).

    q e4m3 [..., K, N] (unpadded, as stored), scale_inv fp32 [..., ceil(K/128), ceil(N/128)]."""

    q: jax.Array
    scale_inv: jax.Array

    @property
    def shape(self):
        return self.q.shape

    def padded(self):
        """q zero-padded to whole blocks [..., Kp, Np] (zeros stay exact), the GEMM kernels' layout."""
        return pad_to(pad_to(self.q, -2), -1)

    def dequantize(self, dtype=jnp.float32):
        k, n = self.q.shape[-2:]
        return dequantize_blocks(self.padded(), self.scale_inv)[..., :k, :n].astype(dtype)


def fp8_matmul_stored(x, w: Fp8Weight, impl: str = "auto", pow2: bool = False):
    """x [M, K] @ W [K, N] stored in e4m3 blocks: activations in 1x128 tiles, fp32 promotion per K
    block; out in x's dtype. Forward only (inference)."""
    return _x_times_blocks(x, w.padded(), w.scale_inv, impl, pow2)[:, : w.shape[-1]]


def fp8_init(std: float):
    """Initial (q, scale_inv) for a random e4m3 weight ~ normal(std): one scale for every block, the
    amax of a 4-sigma weight (beyond it clipped). Real weights come from a checkpoint (dsjax.hf)."""
    scale = 4.0 * std / E4M3_MAX

    def q_init(key, shape, dtype=E4M3):
        return jnp.clip(jax.random.normal(key, shape) * (std / scale), -E4M3_MAX, E4M3_MAX).astype(dtype)

    def s_init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, scale, dtype)

    return q_init, s_init


class Fp8Linear(nn.Module):
    """y = x W for ``linear`` under ``cfg.fp8_weights``: ``kernel`` e4m3 [*in, *out] (the same axes
    as the float kernel) and ``kernel_scale_inv`` fp32 [ceil(K/128), ceil(N/128)] for the 2-D view
    W [K = prod(in), N = prod(out)]. The contracted dims are x's trailing ``len(axis)`` dims."""

    features: int | tuple[int, ...]
    axis: int | tuple[int, ...]
    axes: tuple[str, ...]
    std: float
    dtype: jnp.dtype
    recipe: Fp8Recipe = Fp8Recipe()

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        contracted = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        n_in = len(contracted)
        if sorted(a % x.ndim for a in contracted) != list(range(x.ndim - n_in, x.ndim)):
            raise ValueError(f"Fp8Linear: axis={self.axis} must name x's trailing dims (x is {x.ndim}-D)")
        in_shape = x.shape[x.ndim - n_in :]
        k, n = math.prod(in_shape), math.prod(features)
        q_init, s_init = fp8_init(self.std)
        q = self.param("kernel", nn.with_logical_partitioning(q_init, self.axes), (*in_shape, *features), E4M3)
        s = self.param("kernel_scale_inv", s_init, (block_count(k), block_count(n)), jnp.float32)
        lead = x.shape[: x.ndim - n_in]
        y = fp8_matmul_stored(x.astype(self.dtype).reshape(-1, k), Fp8Weight(q.reshape(k, n), s), *self.recipe)
        return y.reshape(*lead, *features)
