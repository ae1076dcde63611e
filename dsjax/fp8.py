"""FP8 linear for training (V3 report §3.3, REFERENCE §7): all three GEMMs of y = x W in e4m3.

    forward  y  = x W       x: 1x128 tiles, W: 128x128 blocks
    dgrad    dx = dy W^T    dy: 1x128 tiles, W^T: the same blocks, transposed
    wgrad    dW = x^T dy    x and dy: 128x1 tiles (along the tokens, the contracted dim)

each promoted to fp32 every 128 elements of K (``pallas_kernels.fp8_gemm``). W is the fp32 master
weight (quantized from it on every call, "online"); y and dx come out in x's dtype, dW in fp32.
``fp8_dense_general`` is the ``nn.DenseGeneral`` that uses it: same parameter, init and axes.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels.fp8_gemm import fp8_gemm
from pallas_kernels.quant import quantize_blocks, quantize_tiles


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def fp8_matmul(x, w, impl: str = "auto", pow2: bool = False):
    """x [M, K] (bf16 / fp32) @ w [K, N] (master weight) with every GEMM in FP8 (module docstring)."""
    return _fwd(x, w, impl, pow2)[0]


def _fwd(x, w, impl, pow2):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"fp8_matmul: need x [M, K] and w [K, N], got {x.shape} and {w.shape}")
    qx, sx = quantize_tiles(x, -1, pow2)
    qw, sw = quantize_blocks(w, pow2)
    return fp8_gemm(qx, sx, qw, sw, x.dtype, impl)[:, : w.shape[1]], (x, w)


def _bwd(impl, pow2, res, dy):
    x, w = res
    qw, sw = quantize_blocks(w, pow2)  # the forward's blocks again; W^T's scales are their transpose
    qg, sg = quantize_tiles(dy, -1, pow2)
    dx = fp8_gemm(qg, sg, qw.T, sw.T, x.dtype, impl)[:, : x.shape[1]]
    qxt, sxt = quantize_tiles(x, 0, pow2)  # 128x1: tiles run along M, wgrad's K
    qgt, sgt = quantize_tiles(dy, 0, pow2)
    dw = fp8_gemm(qxt.T, sxt.T, qgt, sgt, jnp.float32, impl)
    return dx, dw.astype(w.dtype)


fp8_matmul.defvjp(_fwd, _bwd)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, impl="auto"):
    """``lax.dot_general`` as ``nn.DenseGeneral`` calls it (lhs [..., *in] . kernel [*in, *out]),
    computed as one 2-D ``fp8_matmul``."""
    del precision, preferred_element_type
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or tuple(rc) != tuple(range(len(rc))):
        raise ValueError(f"fp8_dot_general: only DenseGeneral's contraction (no batch dims), got {dimension_numbers}")
    lc = [d % lhs.ndim for d in lc]
    x = jnp.moveaxis(lhs, lc, range(lhs.ndim - len(lc), lhs.ndim))
    lead, k = x.shape[: lhs.ndim - len(lc)], math.prod(rhs.shape[: len(rc)])
    y = fp8_matmul(x.reshape(-1, k), rhs.reshape(k, -1), impl)
    return y.reshape(*lead, *rhs.shape[len(rc) :])


def keep_master_kernel(inputs, kernel, bias, dtype=None, inexact=True):
    """DenseGeneral's dtype promotion, except the kernel stays the fp32 master (quantized, not cast)."""
    del inexact
    return (inputs if dtype is None else inputs.astype(dtype)), kernel, bias


@functools.cache
def _dot_general(impl: str):
    return functools.partial(fp8_dot_general, impl=impl)  # one object per impl: hashable, stable


def fp8_dense_general(impl: str = "auto", **kwargs) -> nn.DenseGeneral:
    """``nn.DenseGeneral(**kwargs)`` whose product is ``fp8_matmul``; parameters unchanged."""
    return nn.DenseGeneral(**kwargs, dot_general=_dot_general(impl), promote_dtype=keep_master_kernel)
