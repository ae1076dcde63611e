"""E4M3 quantizers (``pallas_kernels.quant``): tiles and blocks against the e4m3 rounding bound,
padding, extreme values, and the Mosaic TPU quantizer bit for bit against the jnp one."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant import GRAD_AMAX_MIN, quantize_blocks, quantize_tiles
from tests.kernels.e4m3 import E4M3_MAX, HALF_ULP, SUBNORMAL_STEP, assert_within_e4m3, np_scales, tiles_view, varied

QUANT_IMPLS = ["xla", "interpret"]  # the jnp quantizer, and the Mosaic TPU kernel in interpret mode


@pytest.mark.parametrize("impl", QUANT_IMPLS)
@pytest.mark.parametrize("amax_min", [1e-4, GRAD_AMAX_MIN], ids=["activations", "gradients"])
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("shape", [(256, 384), (70, 200)])
def test_quantize_tiles_round_trip(shape, axis, amax_min, impl):
    x = varied(shape) if axis == -1 else varied(shape[::-1]).T
    q, s = quantize_tiles(jnp.asarray(x), axis, amax_min=amax_min, impl=impl)
    xt, qt = (
        tiles_view(x, axis),
        tiles_view(np.asarray(q.astype(jnp.float32))[tuple(slice(0, d) for d in x.shape)], axis),
    )
    st = np.moveaxis(np.asarray(s, np.float64), axis, -1)
    np.testing.assert_allclose(st, np_scales(np.abs(xt).max(-1), amax_min), rtol=1e-6)
    assert_within_e4m3(xt, qt, st)
    assert np.abs(q.astype(jnp.float32)).max() == E4M3_MAX  # each tile's amax lands on 448


@pytest.mark.parametrize("impl", QUANT_IMPLS)
def test_quantize_padding_is_exact_zero(impl):
    x = np.full((3, 200), -2.0, np.float32)
    q, s = quantize_tiles(jnp.asarray(x), impl=impl)
    assert q.shape == (3, 256) and s.shape == (3, 2)
    assert np.all(np.asarray(q[:, 200:].astype(jnp.float32)) == 0.0)
    np.testing.assert_allclose(
        np.asarray(q[:, :200].astype(jnp.float32)) * np.repeat(np.asarray(s), 128, 1)[:, :200], x, rtol=1e-6
    )
    q, s = quantize_tiles(jnp.asarray(x.T), 0, impl=impl)  # 128x1 tiles: the 200 rows padded to 256
    assert q.shape == (256, 3) and s.shape == (2, 3) and np.all(np.asarray(q[200:].astype(jnp.float32)) == 0.0)
    np.testing.assert_allclose(
        np.asarray(q[:200].astype(jnp.float32)) * np.repeat(np.asarray(s), 128, 0)[:200], x.T, rtol=1e-6
    )
    w = np.full((130, 200), 3.0, np.float32)
    qw, sw = quantize_blocks(jnp.asarray(w))
    assert qw.shape == (256, 256) and sw.shape == (2, 2)
    deq = np.asarray(qw.astype(jnp.float32)) * np.repeat(np.repeat(np.asarray(sw), 128, 0), 128, 1)
    np.testing.assert_allclose(deq[:130, :200], w, rtol=1e-6)
    assert np.all(deq[130:] == 0) and np.all(deq[:, 200:] == 0)


@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_blocks_round_trip(pow2):
    w = varied((4, 256, 384), seed=1)  # leading expert dim
    q, s = quantize_blocks(jnp.asarray(w), pow2)
    assert q.shape == w.shape and s.shape == (4, 2, 3)
    b = w.reshape(4, 2, 128, 3, 128).transpose(0, 1, 3, 2, 4).reshape(4, 2, 3, -1).astype(np.float64)
    qb = np.asarray(q.astype(jnp.float32)).reshape(4, 2, 128, 3, 128).transpose(0, 1, 3, 2, 4).reshape(4, 2, 3, -1)
    s = np.asarray(s, np.float64)
    if pow2:  # a power of two >= amax / 448, less than twice it
        assert np.all(np.log2(s) == np.round(np.log2(s)))
        assert np.all((s >= np_scales(np.abs(b).max(-1))) & (s < 2 * np_scales(np.abs(b).max(-1))))
    else:
        np.testing.assert_allclose(s, np_scales(np.abs(b).max(-1)), rtol=1e-6)
    assert_within_e4m3(b, qb, s)


@pytest.mark.parametrize("impl", QUANT_IMPLS)
def test_quantize_extreme_tiles_are_finite(impl):
    x = np.zeros((2, 512), np.float32)
    x[:, :128] = 3e38  # huge
    x[:, 128:256] = 1e-30  # tiny (below the amax clamp)
    x[0, 384:] = np.where(np.arange(128) % 2, 3e38, 1e-38)  # both in one tile
    for pow2 in (False, True):
        q, s = quantize_tiles(jnp.asarray(x), pow2=pow2, impl=impl)
        qf, s = np.asarray(q.astype(jnp.float32)), np.asarray(s)
        assert np.all(np.isfinite(qf)) and np.all(np.isfinite(s)) and np.all(s > 0)
        assert np.all(qf[:, 256:384] == 0)  # the zero tile
        deq = qf * np.repeat(s, 128, 1)
        assert np.all(np.abs(deq[:, :128] - 3e38) <= 3e38 * HALF_ULP)
        assert np.all(np.abs(deq[:, 128:256]) <= SUBNORMAL_STEP / 2 * s[:, 1:2])  # flushed towards 0
        qw, sw = quantize_blocks(jnp.asarray(x.T), pow2)
        assert np.all(np.isfinite(np.asarray(qw.astype(jnp.float32)))) and np.all(np.isfinite(np.asarray(sw)))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape,axis", [((1100, 1792), -1), ((1100, 640), 0)], ids=["1x128", "128x1"])
def test_quantize_tiles_tpu_kernel_is_bitwise_the_jnp_quantizer(shape, axis, pow2):
    """The Mosaic TPU quantizer (interpret mode) over grids of several blocks -- ragged last row
    block (1x128), rows padded to whole 8-tile blocks and a ragged last 512-column block (128x1) --
    gives the jnp quantizer's q and s bit for bit, with per-row magnitudes across 12 decades and
    UE8M0 (pow2) scales or not; and the UE8M0 scales are the next power of two, as numpy says."""
    x = jnp.asarray(varied(shape if axis == -1 else shape[::-1], seed=3).T if axis == 0 else varied(shape, seed=3))
    x = x.at[:5].set(0).astype(jnp.bfloat16)  # zero rows: all-zero tiles
    q, s = quantize_tiles(x, axis, pow2, GRAD_AMAX_MIN, impl="interpret")
    qr, sr = quantize_tiles(x, axis, pow2, GRAD_AMAX_MIN, impl="xla")
    assert q.shape == qr.shape and s.shape == sr.shape
    np.testing.assert_array_equal(np.asarray(q.view(jnp.uint8)), np.asarray(qr.view(jnp.uint8)))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(sr))
    if pow2:
        amax = np.abs(tiles_view(np.asarray(x.astype(jnp.float32)), axis)).max(-1)
        expect = 2.0 ** np.ceil(np.log2(np_scales(amax, GRAD_AMAX_MIN)))
        np.testing.assert_array_equal(np.moveaxis(np.asarray(s, np.float64), axis, -1), expect)
