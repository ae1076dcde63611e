"""FP8 GEMM and grouped GEMM kernels (``pallas_kernels.fp8_gemm``, ``.fp8_gmm``) against numpy's
dequantize-then-matmul, the one kernel dispatch (``pallas_kernels.platform.resolve_impl``) and its
errors, and lowering for TPU and CUDA from this CPU host."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import dsjax.model.fp8 as fp8_mod
from pallas_kernels import fp8_gemm as fg
from pallas_kernels import fp8_gmm as fgg
from pallas_kernels.fp8_gemm import fp8_gemm, fp8_gemm_gpu, fp8_gemm_mgpu, fp8_gemm_reference, fp8_gemm_tpu
from pallas_kernels.fp8_gmm import fp8_gmm, fp8_gmm_wgrad
from pallas_kernels.platform import gpu_is_hopper
from pallas_kernels.quant import quantize_blocks, quantize_tiles
from tests.kernels.e4m3 import ON_GPU, ON_HOPPER, ON_TPU, abstract_mesh, dequantized, lower

KERNELS = {
    "reference": lambda *a: fp8_gemm_reference(*a),
    "tpu": lambda *a: fp8_gemm_tpu(*a, interpret=not ON_TPU),
    "triton": lambda *a: fp8_gemm_gpu(*a, interpret=not ON_GPU),
    "mosaic_gpu": lambda *a: fp8_gemm_mgpu(*a, interpret=not ON_HOPPER),
}


@pytest.mark.accelerator
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mkn", [(256, 512, 256), (100, 300, 200)], ids=["aligned", "ragged"])
@pytest.mark.parametrize("b_tiles", ["blocks", "columns"])
def test_fp8_gemm_matches_dequantized_matmul(kernel, mkn, b_tiles):
    m, k, n = mkn
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)) * rng.uniform(0.01, 100, (m, 1))
    w = rng.standard_normal((k, n)) * rng.uniform(0.01, 100, (1, n))
    qa, sa = quantize_tiles(jnp.asarray(x, jnp.float32))
    if b_tiles == "blocks":
        qb, sb = quantize_blocks(jnp.asarray(w, jnp.float32))
        b = dequantized(qb, sb)
    else:  # 128x1 tiles along K (the wgrad operand)
        qb, sb = quantize_tiles(jnp.asarray(w, jnp.float32), 0)
        b = dequantized(qb, sb, 0)
    ref = dequantized(qa, sa, 1) @ b
    for out_dtype, tol in ((jnp.bfloat16, 1e-2), (jnp.float32, 1e-5)):
        y = np.asarray(KERNELS[kernel](qa, sa, qb, sb, out_dtype).astype(jnp.float32), np.float64)
        assert y.shape == ref.shape
        assert np.abs(y - ref).max() <= tol * np.abs(ref).max()
        assert np.all(np.abs(y - ref) <= tol * np.abs(ref) + 2 * tol * np.abs(ref).mean())  # elementwise too


GROUPED = {  # each kernel family's grouped GEMM and wgrad, compiled on its hardware, else interpreted
    "xla": (fgg.fp8_gmm_reference, fgg.fp8_gmm_wgrad_reference),
    "tpu": (
        lambda *a: fgg.fp8_gmm_tpu(*a, interpret=not ON_TPU),
        lambda *a: fgg.fp8_gmm_wgrad_tpu(*a, interpret=not ON_TPU),
    ),
    "mosaic_gpu": (
        lambda *a: fgg.fp8_gmm_mgpu(*a, interpret=not ON_HOPPER),
        lambda *a: fgg.fp8_gmm_wgrad_mgpu(*a, interpret=not ON_HOPPER),
    ),
    "triton": (
        lambda *a: fgg.fp8_gmm_gpu(*a, interpret=not ON_GPU),
        lambda *a: fgg.fp8_gmm_wgrad_gpu(*a, interpret=not ON_GPU),
    ),
}


@pytest.mark.accelerator
@pytest.mark.parametrize("family", GROUPED)
def test_fp8_grouped_gemms_match_dequantized(family):
    gmm, wgrad = GROUPED[family]
    rng = np.random.default_rng(3)
    block_group = np.array([0, 0, 1, 3, 3, 3, 3])  # expert 2 has no rows
    r, k, n, g = 128 * len(block_group), 256, 200, 4
    x, w, dy = rng.standard_normal((r, k)), rng.standard_normal((g, k, n)), rng.standard_normal((r, n))
    qa, sa = quantize_tiles(jnp.asarray(x, jnp.float32))
    qb, sb = quantize_blocks(jnp.asarray(w, jnp.float32))
    a, b = dequantized(qa, sa, 1), dequantized(qb, sb)[:, :, :n]
    ref = np.concatenate([a[i * 128 : (i + 1) * 128] @ b[e] for i, e in enumerate(block_group)])
    y = np.asarray(gmm(qa, sa, qb, sb, jnp.asarray(block_group), jnp.float32))[:, :n]
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    qxt, sxt = quantize_tiles(jnp.asarray(x, jnp.float32), 0)
    qgt, sgt = quantize_tiles(jnp.asarray(dy, jnp.float32), 0)
    xt, gt = dequantized(qxt, sxt, 0), dequantized(qgt, sgt, 0)
    ref_w = np.zeros((g, k, n))
    for i, e in enumerate(block_group):
        ref_w[e] += xt[i * 128 : (i + 1) * 128].T @ gt[i * 128 : (i + 1) * 128]
    dw = np.asarray(wgrad(qxt, sxt, qgt, sgt, jnp.asarray(block_group), g))
    present = [0, 1, 3]  # the dispatch zeroes empty experts (fp8_gmm_wgrad); compare the others
    assert np.abs(dw[present] - ref_w[present]).max() <= 1e-5 * np.abs(ref_w).max()
    if family == "xla":
        assert np.all(dw[2] == 0)
        dw = np.asarray(fp8_gmm_wgrad(qxt, sxt, qgt, sgt, jnp.asarray(block_group), g, "interpret"))  # dispatch
        assert np.all(dw[2] == 0) and np.abs(dw - ref_w).max() <= 1e-5 * np.abs(ref_w).max()


def test_mosaic_gpu_kernels_are_race_free():
    """The warp-specialized Hopper kernels (a TMA memory warpgroup feeding two compute warpgroups
    through a ring of SMEM slots and barriers) under GPU interpret mode's happens-before race
    detector, which simulates the warpgroups as threads: no data race in the GEMM, the grouped GEMM
    or the grouped wgrad (the race detector's own test: a shared epilogue tile makes it fire)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret

    params = plgpu.InterpretGPUParams(detect_races=True)
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((256, 384)), rng.standard_normal((384, 200))
    qa, sa = quantize_tiles(jnp.asarray(x, jnp.float32))
    qb, sb = quantize_blocks(jnp.asarray(w, jnp.float32))
    qg, sg = quantize_blocks(jnp.asarray(np.stack([w, -w, 2 * w]), jnp.float32))
    qxt, sxt = quantize_tiles(jnp.asarray(x, jnp.float32), 0)
    qdt, sdt = quantize_tiles(jnp.asarray(x[:, :200], jnp.float32), 0)
    groups = jnp.array([0, 2])  # two 128-row blocks; expert 1 has none
    gpu_interpret.reset_gpu_interpret_mode_state()
    runs = [
        (fp8_gemm_mgpu(qa, sa, qb, sb, jnp.float32, interpret=params), fp8_gemm_reference(qa, sa, qb, sb, jnp.float32)),
        (
            fgg.fp8_gmm_mgpu(qa, sa, qg, sg, groups, jnp.float32, interpret=params),
            fgg.fp8_gmm_reference(qa, sa, qg, sg, groups, jnp.float32),
        ),
        (
            fgg.fp8_gmm_wgrad_mgpu(qxt, sxt, qdt, sdt, groups, 3, interpret=params)[::2],
            fgg.fp8_gmm_wgrad_reference(qxt, sxt, qdt, sdt, groups, 3)[::2],
        ),
    ]
    assert not gpu_interpret.get_races().races_found
    for got, want in runs:
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_tpu_kernels_pick_each_blocks_scales_past_128_blocks():
    """The TPU kernels read scales lane-dense, 128 K blocks (or 128-row blocks) to a block and 8 to a
    sublane tile, picking one per step: with 136 K blocks -- and a grouped wgrad over 136 row
    blocks -- whose magnitudes span 1e-4 .. 1e4 block by block, a wrong pick shows in the outputs."""
    rng = np.random.default_rng(11)
    nb = 136
    mag = lambda rows: np.repeat(10.0 ** rng.uniform(-4, 4, (rows, nb)), 128, axis=1)  # noqa: E731  [rows, nb * 128]
    x, w = rng.standard_normal((128, nb * 128)) * mag(128), rng.standard_normal((nb * 128, 256)) * mag(256).T
    qa, sa = quantize_tiles(jnp.asarray(x, jnp.float32))
    qb, sb = quantize_blocks(jnp.asarray(np.stack([w, -w]), jnp.float32))
    ref = dequantized(qa, sa, 1) @ dequantized(qb[0], sb[0])
    y = np.asarray(fp8_gemm_tpu(qa, sa, qb[0], sb[0], jnp.float32, interpret=True), np.float64)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    y = np.asarray(fgg.fp8_gmm_tpu(qa, sa, qb, sb, jnp.array([1]), jnp.float32, interpret=True), np.float64)
    assert np.abs(y + ref).max() <= 1e-5 * np.abs(ref).max()  # expert 1 holds -w
    block_group = np.repeat(np.arange(4), [30, 40, 0, 66])  # 136 row blocks, sorted by expert
    qxt, sxt = quantize_tiles(jnp.asarray(rng.standard_normal((nb * 128, 128)) * mag(128).T, jnp.float32), 0)
    qgt, sgt = quantize_tiles(jnp.asarray(rng.standard_normal((nb * 128, 256)) * mag(256).T, jnp.float32), 0)
    parts = [
        dequantized(qxt, sxt, 0)[i * 128 : (i + 1) * 128].T @ dequantized(qgt, sgt, 0)[i * 128 : (i + 1) * 128]
        for i in range(nb)
    ]
    ref_w = np.stack(
        [sum((parts[i] for i in np.flatnonzero(block_group == e)), np.zeros((128, 256))) for e in range(4)]
    )
    dw = np.asarray(fgg.fp8_gmm_wgrad_tpu(qxt, sxt, qgt, sgt, jnp.asarray(block_group), 4, interpret=True))
    assert np.abs(dw[[0, 1, 3]] - ref_w[[0, 1, 3]]).max() <= 1e-5 * np.abs(ref_w).max()


# --- dispatch and bad input ----------------------------------------------------------------------


def _operands(m=64, k=256, n=128):
    qa, sa = quantize_tiles(jnp.ones((m, k)))
    qb, sb = quantize_blocks(jnp.ones((k, n)))
    return qa, sa, qb, sb


def test_dispatch_picks_by_backend_and_env(monkeypatch):
    calls = []
    monkeypatch.setattr(fg, "fp8_gemm_reference", lambda *a: calls.append("xla"))
    monkeypatch.setattr(fg, "fp8_gemm_tpu", lambda *a, out_dtype, interpret: calls.append(("tpu", interpret)))
    monkeypatch.setattr(fg, "fp8_gemm_gpu", lambda *a, out_dtype, interpret: calls.append(("triton", interpret)))
    monkeypatch.setattr(fg, "fp8_gemm_mgpu", lambda *a, out_dtype, interpret: calls.append(("mosaic_gpu", interpret)))
    ops = _operands()
    fp8_gemm(*ops)  # auto on CPU
    fp8_gemm(*ops, impl="auto", platform="tpu")
    fp8_gemm(*ops, impl="auto", platform="gpu")  # no GPU known: Hopper
    for kind in ("NVIDIA H200", "NVIDIA L40S", "NVIDIA GeForce RTX 4090"):  # wgmma only on Hopper
        with jax.sharding.use_abstract_mesh(abstract_mesh(kind, "gpu", (1, 1, 1, 1))):
            fp8_gemm(*ops, impl="pallas", platform="gpu")
    with jax.sharding.use_abstract_mesh(abstract_mesh("NVIDIA A100-SXM4-80GB", "gpu", (1, 1, 1, 1))):
        fp8_gemm(*ops, impl="auto", platform="gpu")  # no e4m3 before sm_89: jnp
        with pytest.raises(ValueError, match="needs a GPU with FP8 .*'NVIDIA A100-SXM4-80GB'"):
            fp8_gemm(*ops, impl="pallas", platform="gpu")
    fp8_gemm(*ops, impl="interpret")
    monkeypatch.setenv("DSJAX_FP8_IMPL", "xla")
    fp8_gemm(*ops, impl="pallas", platform="gpu")  # the env var wins over the config
    assert calls == [
        "xla",
        ("tpu", False),
        ("mosaic_gpu", False),
        ("mosaic_gpu", False),
        ("triton", False),
        ("triton", False),
        "xla",
        ("tpu", True),
        "xla",
    ]
    monkeypatch.setenv("DSJAX_FP8_IMPL", "tritonn")
    with pytest.raises(ValueError, match="'tritonn'.*DSJAX_FP8_IMPL"):
        fp8_gemm(*ops)


@pytest.mark.parametrize("kind,hopper,fp8,big_smem,triton", [
    ("NVIDIA H100 80GB HBM3", True, True, True, True), ("NVIDIA GH200 480GB", True, True, True, True),
    ("NVIDIA B200", False, True, True, True), ("NVIDIA A100-SXM4-80GB", False, False, True, True),
    ("NVIDIA A10G", False, False, False, True), ("NVIDIA L4", False, True, False, True),
    ("NVIDIA GeForce RTX 4090", False, True, False, True), ("Tesla T4", False, False, False, False),
    ("Tesla V100-SXM2-16GB", False, False, False, False), ("AMD Instinct MI300X", False, False, False, True),
])  # fmt: skip
def test_gpu_features_from_the_device_kind(kind, hopper, fp8, big_smem, triton):
    """Compiling for an abstract GPU (no local one) reads wgmma (sm_90), e4m3 (sm_89+), >= 160 KiB of
    shared memory per block (sm_80 / 87 / 90 / 100) and Triton (sm_80+, as XLA allows it) from its
    kind; a CPU host assumes Hopper."""
    from pallas_kernels.platform import gpu_big_shared_memory, gpu_has_fp8, gpu_runs_triton

    with jax.sharding.use_abstract_mesh(abstract_mesh(kind, "gpu", (1, 1, 1, 1))):
        assert (gpu_is_hopper(), gpu_has_fp8(), gpu_big_shared_memory(), gpu_runs_triton()) == (
            hopper,
            fp8,
            big_smem,
            triton,
        )
    if jax.default_backend() == "cpu":
        assert gpu_is_hopper() and gpu_has_fp8() and gpu_big_shared_memory() and gpu_runs_triton()


def test_bad_input_raises_clear_errors():
    qa, sa, qb, sb = _operands()
    with pytest.raises(ValueError, match="impl='mosaic'"):
        fp8_gemm(qa, sa, qb, sb, impl="mosaic")
    with pytest.raises(ValueError, match="needs a TPU or GPU"):
        fp8_gemm(qa, sa, qb, sb, impl="pallas")  # this is a CPU
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_gemm(qa.astype(jnp.bfloat16), sa, qb, sb)
    with pytest.raises(ValueError, match=r"b \[K, N\]"):
        fp8_gemm(qa, sa, qb[:128], sb)
    with pytest.raises(ValueError, match="a_scale"):
        fp8_gemm(qa, sa[:, :1], qb, sb)
    with pytest.raises(ValueError, match="b_scale"):
        fp8_gemm(qa, sa, qb, sb[:, :0])
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_gemm(qa, sa, qb, sb, jnp.float16)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_gemm(qa[:, :100], sa[:, :1], qb[:100], sb[:1])
    with pytest.raises(ValueError, match="block_group"):
        fp8_gmm(qa[:0], sa[:0], qb[None], sb[None], jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match=r"fp8_matmul: need x \[M, K\]"):
        fp8_mod.fp8_matmul(jnp.ones((4, 8)), jnp.ones((9, 8)))


# --- lowering for TPU and CUDA without the hardware ------------------------------------------------


def test_tpu_kernels_lower_for_tpu():
    qa, sa = quantize_tiles(jnp.zeros((512, 1024)))
    qb, sb = quantize_blocks(jnp.zeros((1024, 576)))
    assert "tpu_custom_call" in lower(lambda *a: fp8_gemm(*a, impl="pallas", platform="tpu"), (qa, sa, qb, sb), "tpu")
    bg = jnp.array([0, 1, 1, 3])
    qg, sg = quantize_blocks(jnp.zeros((4, 1024, 576)))
    assert "tpu_custom_call" in lower(
        lambda *a: fp8_gmm(*a, impl="pallas", platform="tpu"), (qa, sa, qg, sg, bg), "tpu"
    )
    qt, st = quantize_tiles(jnp.zeros((512, 1024)), 0)
    qd, sd = quantize_tiles(jnp.zeros((512, 576)), 0)
    text = lower(lambda *a: fp8_gmm_wgrad(*a, 4, impl="pallas", platform="tpu"), (qt, st, qd, sd, bg), "tpu")
    assert "tpu_custom_call" in text
    for axis in (-1, 0):
        text = lower(
            lambda x: quantize_tiles(x, axis, impl="pallas", platform="tpu"),
            (jnp.zeros((512, 1024), jnp.bfloat16),),
            "tpu",
        )
        assert "tpu_custom_call" in text and "f8E4M3FN" in text


TPU_COMPILE = """
import sys, jax, jax.numpy as jnp
from jax.sharding import SingleDeviceSharding
from dsjax.parallel.topology import tpu_devices
from pallas_kernels.fp8_gemm import fp8_gemm
from pallas_kernels.fp8_gmm import fp8_gmm, fp8_gmm_wgrad
from pallas_kernels.quant import quantize_blocks, quantize_tiles
dev = tpu_devices(sys.argv[1])[0]
on = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(dev))
a, b, g = jnp.zeros((512, 1024)), jnp.zeros((1024, 576)), jnp.zeros((4, 1024, 576))
bg = jax.ShapeDtypeStruct((4,), jnp.int32)
tiles, blocks = jax.eval_shape(quantize_tiles, a), jax.eval_shape(quantize_blocks, b)
columns = lambda x: jax.eval_shape(lambda v: quantize_tiles(v, 0), x)
for f, args in [
    (lambda *o: fp8_gemm(*o, impl="pallas", platform="tpu"), (*tiles, *blocks)),
    (lambda *o: fp8_gmm(*o, impl="pallas", platform="tpu"), (*tiles, *jax.eval_shape(quantize_blocks, g), bg)),
    (lambda *o: fp8_gmm_wgrad(*o, 4, impl="pallas", platform="tpu"), (*columns(a), *columns(a[:, :576]), bg)),
    (lambda x: quantize_tiles(x, -1, impl="pallas", platform="tpu"), (jnp.zeros((300, 1000), jnp.bfloat16),)),
    (lambda x: quantize_tiles(x, 0, True, impl="pallas", platform="tpu"), (jnp.zeros((1100, 640), jnp.bfloat16),)),
]:
    jax.jit(f).trace(*map(on, args)).lower().compile()
    print("compiled")
"""


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:1x1", "v6e:1x1"])
def test_tpu_kernels_compile_for_tpu(topology):
    """Beyond lowering: libtpu's compiler (Mosaic included) accepts the GEMM and quantizer kernels
    (e4m3 stores included), on this CPU host."""
    pytest.importorskip("libtpu", reason="libtpu has no wheel for this platform (the test extra installs it on Linux)")
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    out = subprocess.run(
        [sys.executable, "-c", TPU_COMPILE, topology],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[2],
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.split() == ["compiled"] * 5, out.stderr[-3000:]


@pytest.mark.parametrize("kind,call", [("NVIDIA H100 80GB HBM3", "mosaic_gpu"), ("NVIDIA L4", "__gpu$xla.gpu.triton")])
def test_gpu_kernels_lower_for_cuda(kind, call):
    """No GPU here: an abstract GPU gives the lowering its compute capability. Hopper gets the Mosaic
    GPU kernels (their lowering checks the wgmma operand layouts), other FP8 GPUs (sm_89+: Ada,
    Blackwell) the Triton ones. (Older GPUs have no e4m3: their ``auto`` is jnp, see the dispatch test.)"""
    qa, sa = quantize_tiles(jnp.zeros((512, 1024)))
    qb, sb = quantize_blocks(jnp.zeros((1024, 576)))
    bg = jnp.array([0, 1, 1, 3])
    qg, sg = quantize_blocks(jnp.zeros((4, 1024, 576)))
    qt, st = quantize_tiles(jnp.zeros((512, 1024)), 0)
    qd, sd = quantize_tiles(jnp.zeros((512, 576)), 0)
    with jax.sharding.use_abstract_mesh(abstract_mesh(kind, "gpu", (1, 1, 1, 1))):
        for f, args in [
            (lambda *a: fp8_gemm(*a, impl="pallas", platform="gpu"), (qa, sa, qb, sb)),
            (lambda *a: fp8_gmm(*a, impl="pallas", platform="gpu"), (qa, sa, qg, sg, bg)),
            (lambda *a: fp8_gmm_wgrad(*a, 4, impl="pallas", platform="gpu"), (qt, st, qd, sd, bg)),
        ]:
            text = lower(f, args, "cuda")
            assert call in text and "f8E4M3FN" in text
