"""Paged absorbed MLA decode (pallas_kernels.paged_mla_decode) against a numpy float64 reference that
gathers the pages into a contiguous cache: Pallas interpret mode on CPU, both bodies (the TPU one,
pages chosen by scalar-prefetched index_maps; the GPU one, rows gathered through the table), ragged
lengths, shuffled tables whose padding points at other sequences' pages; the pages read inside the
kernel; lowering to Mosaic (TPU) and Triton (GPU) on CPU, and libtpu's compiler; named errors."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.paged_mla_decode as paged
from pallas_kernels.paged_mla_decode import paged_mla_decode
from tests.model.test_attention import lowered_kernels

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SCALE = 0.2


def reference(q_lat, q_pe, c_kv_pages, k_pe_pages, page_table, lengths, scale):
    """Gather the pages into [b, n * page_size, .], masked softmax in float64 (masked: finfo(f32).min)."""
    q_lat, q_pe, c_kv_pages, k_pe_pages = (np.asarray(x, np.float64) for x in (q_lat, q_pe, c_kv_pages, k_pe_pages))
    b, n = page_table.shape
    c_kv = c_kv_pages[page_table].reshape(b, n * c_kv_pages.shape[1], -1)
    k_pe = k_pe_pages[page_table].reshape(b, n * k_pe_pages.shape[1], -1)
    s = (np.einsum("bmr,btr->bmt", q_lat, c_kv) + np.einsum("bmd,btd->bmt", q_pe, k_pe)) * scale
    s = np.where(np.arange(c_kv.shape[1]) < np.asarray(lengths)[..., None], s, np.finfo(np.float32).min)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bmt,btr->bmr", w / w.sum(-1, keepdims=True), c_kv)


def paged_inputs(seed, b, rows, n, page_size, r=64, dr=16, dtype=jnp.float32):
    """A pool of b * n + 3 pages, each of the 3 sequences' n pages drawn at random from it (shuffled,
    neither contiguous nor monotonic); lengths ragged: sequence 0 has a row of length 0 and one ending
    mid-page (3 pages used), sequence 1 rows filling every page and past the end, sequence 2 rows of
    at most page_size + 1 (one slot into page 2) and one ending with page 1. Table entries past a
    sequence's longest row point at other sequences' pages."""
    assert b == 3 and n >= 4
    rng = np.random.default_rng(seed)
    num_pages = b * n + 3
    pool = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape), dtype)  # noqa: E731
    q_lat, q_pe = pool(b, rows, r), pool(b, rows, dr)
    c_kv, k_pe = pool(num_pages, page_size, r), pool(num_pages, page_size, dr)
    table = rng.permutation(num_pages)[: b * n].reshape(b, n).astype(np.int32)
    lengths = rng.integers(1, n * page_size, (b, rows)).astype(np.int32)
    lengths[0] = np.minimum(lengths[0], 2 * page_size + 3)
    lengths[2] = np.minimum(lengths[2], page_size + 1)
    lengths[0, :2], lengths[1, :2], lengths[2, 0] = (
        (0, 2 * page_size + 3),
        (n * page_size, n * page_size + 5),
        page_size,
    )
    used = -(-np.minimum(lengths.max(1), n * page_size) // page_size)  # pages a sequence's rows reach: 3, n, 2
    for i in range(b):
        table[i, used[i] :] = table[(i + 1) % b, used[i] :]  # padding: another sequence's pages
    return q_lat, q_pe, c_kv, k_pe, table, lengths


def decode(body, *args, **blocks):
    """paged_mla_decode in interpret mode, running ``body``'s kernel ("tpu": scalar prefetch, "gpu": gathers)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paged, "INTERPRET_BODY", body)
        return paged_mla_decode(*args, SCALE, backend="interpret", **blocks)


@pytest.mark.parametrize("body", ["tpu", "gpu"])
@pytest.mark.parametrize(
    "page_size,n,rows,block_m,pages_per_block,num_splits,dtype",
    [
        (8, 7, 12, 8, 2, 3, jnp.float32),  # 4 blocks of 2 pages in 2 chunks: the table padded by a page
        (16, 5, 20, 16, 1, 4, jnp.float32),  # 5 blocks in 3 chunks of 2
        (16, 6, 20, None, None, None, jnp.float32),  # the interpret defaults: 4 pages a block, 2 chunks
        (16, 5, 12, 8, 2, 2, jnp.bfloat16),
        (8, 6, 20, 16, 2, 3, jnp.bfloat16),
    ],
)
def test_paged_decode_equals_reference(body, page_size, n, rows, block_m, pages_per_block, num_splits, dtype):
    """Rows not a multiple of block_m, several chunks, a table not a whole number of blocks."""
    args = paged_inputs(page_size + n, 3, rows, n, page_size, dtype=dtype)
    got = decode(body, *args, block_m=block_m, pages_per_block=pages_per_block, num_splits=num_splits)
    assert got.shape == (3, rows, 64) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), reference(*args, SCALE), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("body", ["tpu", "gpu"])
def test_pages_past_the_lengths_do_not_change_the_result(body):
    """Table entries past every row's length pointing at page 0, at other sequences' pages, or at a
    page of large values: the rows with something visible are bit-identical (their weight there is
    an exact 0); an empty row averages every gathered slot, as the reference does. A page of NaNs
    past every row of a sequence without an empty row is never read: that sequence stays finite."""
    q_lat, q_pe, c_kv, k_pe, table, lengths = paged_inputs(1, 3, 12, 6, 8)
    big, nan = np.setdiff1d(np.arange(c_kv.shape[0]), table)[:2]  # in no sequence's table
    c_kv, k_pe = c_kv.at[big].set(1e4).at[nan].set(np.nan), k_pe.at[big].set(-1e4).at[nan].set(np.nan)
    used = -(-np.minimum(lengths.max(1), 48) // 8)
    assert list(used) == [3, 6, 2] and (lengths[0] == 0).any() and (lengths[2] > 0).all()
    blocks = dict(block_m=8, pages_per_block=2, num_splits=2)
    padding = {  # what the table holds past each sequence's rows
        "zero": [0, 0, 0],
        "others": [table[(i + 1) % 3, used[i] :] for i in range(3)],
        "big": [big] * 3,
        "nan": [0, 0, nan],  # sequence 2: no empty row, 2 pages read
    }
    outs = {}
    for fill, values in padding.items():
        t = table.copy()
        for i, v in enumerate(values):
            t[i, used[i] :] = v
        outs[fill] = np.asarray(decode(body, q_lat, q_pe, c_kv, k_pe, t, lengths, **blocks))
        if fill != "nan":  # the reference reads the NaNs (weight 0 x NaN)
            want = reference(q_lat, q_pe, c_kv, k_pe, t, lengths, SCALE)
            np.testing.assert_allclose(outs[fill], want, atol=1e-5, rtol=1e-5)
    seen = lengths > 0
    for fill in ("others", "big"):
        np.testing.assert_array_equal(outs[fill][seen], outs["zero"][seen])
    np.testing.assert_array_equal(outs["nan"], outs["zero"])


# On a TPU or GPU this runs the real Mosaic / Triton kernel with the backend's default blocks
# (`pytest -m accelerator tests/kernels/test_paged_mla_decode.py` on a lent machine); on CPU, the interpreter.
ON_DEVICE = jax.default_backend() if jax.default_backend() in ("tpu", "gpu") else "interpret"


@pytest.mark.accelerator
def test_paged_decode_on_this_backend_equals_reference_at_v3_latent_dims():
    """Latent 512 + rope 64, bf16, 32 query rows a sequence (16 heads x 2 tokens), 20 pages of 16,
    default blocks and splits."""
    args = paged_inputs(7, 3, 32, 20, 16, r=512, dr=64, dtype=jnp.bfloat16)
    got = jax.jit(lambda *a: paged_mla_decode(*a, 0.07, backend=ON_DEVICE))(*args)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), reference(*args, 0.07), atol=2e-2, rtol=2e-2)


def kernel_calls(fn, *args):
    """The pallas_call equations of fn's program, and every primitive outside them."""
    calls, outside = [], set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                calls.append(eqn)
                continue
            outside.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return calls, outside


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pages_are_read_inside_the_kernel(backend):
    """No gather of the pool before the kernel: the whole pool goes in. On TPU the table and each row
    block's reach are the kernel's scalar-prefetch operands, on GPU ordinary inputs the body loads."""
    sds = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    args = (
        sds(2, 32, 512),
        sds(2, 32, 64),
        sds(100, 16, 512),
        sds(100, 16, 64),
        sds(2, 9, dt=jnp.int32),
        sds(2, 32, dt=jnp.int32),
    )
    calls, outside = kernel_calls(lambda *a: paged_mla_decode(*a, 0.1, backend=backend), *args)
    assert len(calls) == 1 and not outside & {"gather", "dynamic_slice"}, outside
    grid_mapping = calls[0].params["grid_mapping"]
    operands = [v.aval.shape for v in calls[0].invars]
    if backend == "tpu":
        assert grid_mapping.num_index_operands == 2  # 9 pages: 2 chunks of a block of 8; 1 row block
        assert operands[:2] == [(2 * 16,), (2 * 1,)]
        assert operands.count((100, 16, 512)) == 8  # one BlockSpec per page of a 128-slot block
    else:
        assert grid_mapping.num_index_operands == 0 and (1600, 512) in operands  # the pool, as rows


def v3_args(page_size, sharding=None):
    """DeepSeek-V3's latent dims (512 + 64), bf16, 16 heads x 8 tokens, a 1000-slot table (not whole blocks)."""
    sds = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
    b, rows, n = 2, 128, 1000 // page_size + 1
    return (
        sds(b, rows, 512),
        sds(b, rows, 64),
        sds(300, page_size, 512),
        sds(300, page_size, 64),
        sds(b, n, dt=jnp.int32),
        sds(b, rows, dt=jnp.int32),
    )


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("page_size", [16, 64])
def test_kernel_lowers_for_tpu_and_gpu(backend, page_size):
    fn = lambda *a: paged_mla_decode(*a, 0.1, backend=backend)  # noqa: E731
    assert lowered_kernels(fn, v3_args(page_size), backend) == 1


TPU_COMPILE = """
import sys, jax
from jax.sharding import SingleDeviceSharding
from dsjax.parallel.topology import tpu_devices
from pallas_kernels.paged_mla_decode import paged_mla_decode
from tests.kernels.test_paged_mla_decode import v3_args
for topology in sys.argv[1:]:
    on = SingleDeviceSharding(tpu_devices(topology)[0])
    for page_size, pages in ((16, None), (8, 4), (64, 1)):
        fn = lambda *a: paged_mla_decode(*a, 0.1, backend="tpu", pages_per_block=pages)
        jax.jit(fn).trace(*v3_args(page_size, on)).lower().compile()
        print("compiled")
"""


@pytest.mark.slow
def test_kernel_compiles_for_tpu():
    """Beyond lowering: libtpu's compiler (Mosaic's layouts, the scalar-prefetch pipeline) accepts the
    TPU kernel at V3's dims for a v5e and a v6e, on this CPU host."""
    pytest.importorskip("libtpu", reason="libtpu has no wheel for this platform (the test extra installs it on Linux)")
    out = subprocess.run(
        [sys.executable, "-c", TPU_COMPILE, "v5e:1x1", "v6e:1x1"],
        capture_output=True,
        text=True,
        env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"},
        cwd=Path(__file__).parents[2],
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.split() == ["compiled"] * 6, out.stderr[-3000:]


def test_bad_inputs_raise_named_errors():
    q_lat, q_pe, c_kv, k_pe, table, lengths = paged_inputs(0, 3, 4, 4, 8)
    args = [q_lat, q_pe, c_kv, k_pe, table, lengths]
    bad = {
        1: (q_pe[:, :3], r"q_pe has shape \(3, 3, 16\), expected \(3, 4, 16\)"),
        2: (c_kv[0], r"c_kv_pages has shape \(8, 64\), expected \[P, page_size, r\]"),
        3: (k_pe[:, :4], r"k_pe_pages has shape \(15, 4, 16\), expected \(15, 8, 16\)"),
        4: (table[:2], r"page_table has shape \(2, 4\), expected \(3, 4\)"),
        5: (lengths[:, :3], r"lengths has shape \(3, 3\), expected \(3, 4\)"),
    }
    for i, (x, message) in bad.items():
        with pytest.raises(ValueError, match=message) as e:
            paged_mla_decode(*args[:i], x, *args[i + 1 :], SCALE)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="page_table has dtype float32, expected int32"):
        paged_mla_decode(*args[:4], table.astype(np.float32), lengths, SCALE)
    with pytest.raises(ValueError, match=r"backend must be one of \('tpu', 'gpu', 'interpret'\), got 'cuda'"):
        paged_mla_decode(*args, SCALE, backend="cuda")
    with pytest.raises(ValueError, match="block_t=8: Triton wants a power of two >= 16"):
        paged_mla_decode(*args, SCALE, backend="gpu", pages_per_block=1)
    with pytest.raises(ValueError, match="page_size=12 must be a positive multiple of 8"):
        pool = jnp.zeros((15, 12, 64)), jnp.zeros((15, 12, 16))
        paged_mla_decode(q_lat, q_pe, *pool, table, lengths, SCALE, backend="tpu")
