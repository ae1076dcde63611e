"""V3's FP8 training recipe in the model (DeepSeek-V3 §3.3): the FP8 linear and grouped GEMM and
their gradients against the unquantized ones, their kernels per shard under a mesh, FSDP weights
gathered in e4m3, the MoE dispatch sent in e4m3, the model with ``fp8: true``, and FP8 inference on
stored e4m3 weights (``fp8_weights``)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import dsjax.model.fp8 as fp8_mod
import dsjax.model.gmm as gmm_mod
from dsjax.config import load_config
from dsjax.model import Transformer, random_variables
from dsjax.model.fp8 import Fp8Weight
from dsjax.model.gmm import gmm_blocked, gmm_fp8
from dsjax.model.layers import linear
from dsjax.model.moe import MoE, experts_parallel
from dsjax.parallel.rules import MESH_AXES
from pallas_kernels.fp8_gemm import fp8_gemm
from pallas_kernels.fp8_gmm import fp8_gmm, fp8_gmm_wgrad
from pallas_kernels.quant import GRAD_AMAX_MIN, quantize_blocks, quantize_tiles
from tests.kernels.e4m3 import KERNEL_IMPL, abstract_mesh, dequantized, lower, tiles_view, varied


@pytest.mark.parametrize(
    "platform,kind,call,quantizers",
    [
        ("tpu", "TPU v5", 'name = "tpu_tile_body"', 'name = "_tpu_'),
        ("cuda", "NVIDIA H100", "custom_call @mosaic_gpu", None),
    ],
)
def test_fp8_linear_runs_its_kernels_per_shard_under_a_mesh(platform, kind, call, quantizers):
    """XLA cannot partition a Pallas call: under a 1x2x2x2 TPU / H100 mesh, ``auto`` runs all three
    GEMMs of the FP8 linear (forward, dgrad, wgrad) as kernels inside shard_map, and wgrad's
    per-shard partial products are summed over ``expert`` and reduce-scattered over ``fsdp``. On TPU
    the four activation / gradient quantizations (x, dy in 1x128; x, dy in 128x1) are kernels too."""
    mesh = abstract_mesh(kind, "tpu" if platform == "tpu" else "gpu", (1, 2, 2, 2))
    x, w = jax.ShapeDtypeStruct((1024, 640), jnp.bfloat16), jax.ShapeDtypeStruct((640, 512), jnp.float32)
    f = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fp8_mod.fp8_matmul(x, w))), (0, 1))
    with jax.sharding.use_abstract_mesh(mesh):
        text = lower(f, (x, w), platform)
        assert (
            text.count(call) == 3 and "manual_computation" in text and "reduce_scatter" in text and "all_reduce" in text
        )
        assert quantizers is None or text.count(quantizers) == 4
        # 2 x 2 = 4 batch shards of 64 tokens: wgrad's 128-token tiles do not split, jnp instead (auto)
        text = lower(f, (jax.ShapeDtypeStruct((256, 640), jnp.bfloat16), w), platform)
        assert text.count(call) == 2
        assert quantizers is None or text.count(quantizers) == 2  # the 1x128 ones
        with pytest.raises(ValueError, match="2 tiles of 128 tokens do not split over the batch axes"):
            lower(
                jax.grad(lambda x, w: jnp.sum(fp8_mod.fp8_matmul(x, w, "pallas")), (0, 1)),
                (jax.ShapeDtypeStruct((256, 640), jnp.bfloat16), w),
                platform,
            )
        with pytest.raises(ValueError, match="run per shard, inside jax.shard_map"):  # a kernel called directly
            fp8_gemm(
                *quantize_tiles(jnp.ones((64, 256))),
                *quantize_blocks(jnp.ones((256, 128))),
                impl="pallas",
                platform="tpu",
            )


@pytest.mark.parametrize(
    "mesh_shape,k", [((2, 2, 2, 1), 256), ((1, 2, 2, 2), 255)], ids=["rows_scattered", "cols_scattered"]
)
def test_fp8_linear_wgrad_reduce_scatter_equals_one_device(mesh_shape, k):
    """The FP8 linear's kernels per shard on 8 devices: wgrad's partial dW summed over data / expert
    and reduce-scattered over fsdp -- along dW's rows, or (K = 255 does not split) its columns, after
    ``tensor`` -- give one device's gradients (128-token shards: the same scale tiles)."""
    from jax.sharding import AxisType

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((1024, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, 256)) * 0.05, jnp.float32)
    grads = lambda impl: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fp8_mod.fp8_matmul(x, w, impl))), (0, 1)))  # noqa: E731
    with jax.set_mesh(jax.make_mesh(mesh_shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4)):
        assert "reduce_scatter" in grads("interpret").lower(x, w).as_text()
        dx, dw = grads("interpret")(x, w)
    dx1, dw1 = grads("xla")(x, w)
    np.testing.assert_allclose(dx, dx1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, dw1, rtol=1e-5, atol=1e-5)


def test_fp8_linear_inside_a_partial_shard_map():
    """Inside a shard_map over some mesh axes XLA partitions the others, where no Pallas kernel can
    run: ``auto`` takes jnp -- with the weight's gradient summed over the shards, as check_vma wants
    of the custom_vjp -- and an explicit kernel is refused by name instead of silently replaced."""
    from jax.sharding import AxisType

    def grads(impl, mesh=None):
        f = lambda x, w: fp8_mod.fp8_matmul(x, w, impl)  # noqa: E731
        if mesh is not None:
            f = jax.shard_map(f, mesh=mesh, in_specs=(P("expert"), P()), out_specs=P("expert"), axis_names={"expert"})
        return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1)))

    rng = np.random.default_rng(5)
    x, w = (
        jnp.asarray(rng.standard_normal((512, 256)), jnp.float32),
        jnp.asarray(rng.standard_normal((256, 128)) * 0.05, jnp.float32),
    )
    mesh = jax.make_mesh((2, 1, 2, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh):
        dx, dw = grads("auto", mesh)(x, w)
    dx1, dw1 = grads("xla")(x, w)  # one device; 256-token shards keep whole 128-token tiles: same quantization
    np.testing.assert_allclose(dx, dx1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, dw1, rtol=1e-5, atol=1e-5)
    abstract = abstract_mesh("TPU v5", "tpu")
    with jax.sharding.use_abstract_mesh(abstract):
        args = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype))
        assert "tpu_custom_call" not in lower(grads("auto", abstract), args, "tpu")
        with pytest.raises(ValueError, match="impl='pallas': inside a shard_map over only expert of the mesh"):
            lower(grads("pallas", abstract), args, "tpu")


# --- FP8 linear, grouped GEMM and model ----------------------------------------------------------------


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


# A mean loss's gradients are small: in the tiny config 73% of dy rows have amax < 1e-4 (median 3e-5).
DY_SCALES = pytest.mark.parametrize("dy_scale", [1.0, 1e-7], ids=["dy~1", "dy~1e-7"])


@pytest.mark.accelerator
@DY_SCALES
@pytest.mark.parametrize("impl", ["xla", KERNEL_IMPL])
def test_fp8_linear_gradients_close_to_bf16(impl, dy_scale):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (300, 200), jnp.bfloat16)
    w = 0.05 * jax.random.normal(kw, (200, 180))
    dy = (dy_scale * jax.random.normal(kg, (300, 180))).astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w: fp8_mod.fp8_matmul(x, w, impl), x, w)
    dx, dw = vjp(dy)
    yr, vjpr = jax.vjp(lambda x, w: jnp.dot(x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32), x, w)
    dxr, dwr = vjpr(dy.astype(jnp.float32))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    for a, b in ((y, yr), (dx, dxr), (dw, dwr)):
        assert a.shape == b.shape and cosine(a, b) >= 0.99


@DY_SCALES
def test_fp8_grouped_matmul_gradients_close(dy_scale):
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    sizes = jnp.array([50, 0, 130, 120])
    x, w = jax.random.normal(kx, (300, 200)), 0.05 * jax.random.normal(kw, (4, 200, 180))
    dy = dy_scale * jax.random.normal(kg, (300, 180))
    y, vjp = jax.vjp(lambda x, w: gmm_mod.grouped_matmul(x, w, sizes, "auto", fp8_mod.Fp8Recipe("xla")), x, w)
    yr, vjpr = jax.vjp(lambda x, w: gmm_blocked(x, w, sizes), x, w)
    (dx, dw), (dxr, dwr) = vjp(dy), vjpr(dy)
    for a, b in ((y, yr), (dx, dxr), (dw, dwr)):
        assert cosine(a, b) >= 0.99
    assert np.all(np.asarray(dw[1]) == 0)  # the empty expert
    np.testing.assert_allclose(gmm_fp8(x, w, sizes, "interpret"), y, rtol=1e-5, atol=1e-5)


FSDP8 = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices("cpu")[:8])


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dim", [-2, -1], ids=["K_split", "N_split"])
def test_gathered_blocks_equal_quantizing_the_gathered_weight(dim, pow2):
    """Slices of 40 rows: 128-blocks straddle 3 or 4 devices; experts with huge, tiny and zero
    blocks. q and s equal, bit for bit, the plain quantizer's on the whole fp32 weight."""
    w = jnp.asarray(varied((3, 200, 320)) if dim == -1 else varied((3, 320, 200)))
    w = w.at[1, :50].set(0.0)
    spec = P(None, "fsdp") if dim == -2 else P(None, None, "fsdp")
    f = jax.shard_map(
        lambda a: fp8_mod.gathered_blocks(a, "fsdp", dim, pow2),
        mesh=FSDP8,
        in_specs=spec,
        out_specs=(P(), P()),
        check_vma=False,
    )
    (q, s), (rq, rs) = jax.jit(f)(w), quantize_blocks(w, pow2)
    assert q.dtype == rq.dtype and q.shape == rq.shape == ((3, 384, 256) if dim == -2 else (3, 256, 384))
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(rq, np.float32))
    np.testing.assert_array_equal(s, rs)


@pytest.mark.parametrize("dim", [1, 2], ids=["K_split", "N_split"])
def test_fp8_grouped_gemm_gathers_fsdp_slices_in_e4m3(dim):
    """gmm_fp8 with ``gather``: 8 devices, each its own tokens and an FSDP slice of the weight. Loss
    and gradients equal the sum of each device's tokens through gmm_fp8 on the whole weight (the
    slice's gradient = its part of the summed dW), and the only gathers in the program move e4m3."""
    m, k, n = 64, 256, 192
    x = jax.random.normal(jax.random.key(1), (8 * m, k))
    w = 0.05 * jax.random.normal(jax.random.key(2), (3, k, n))
    sizes = jnp.array(
        [[20, 30, 14], [64, 0, 0], [0, 0, 64], [10, 10, 44], [1, 62, 1], [32, 32, 0], [0, 64, 0], [21, 21, 22]]
    )
    spec = P(None, "fsdp") if dim == 1 else P(None, None, "fsdp")

    def sharded(x, w):
        def local(x, w, sizes):
            return jnp.sum(jnp.sin(gmm_fp8(x, w, sizes[0], "xla", False, ("fsdp", dim))))[None]

        return jax.shard_map(
            local, mesh=FSDP8, in_specs=(P("fsdp"), spec, P("fsdp")), out_specs=P("fsdp"), check_vma=False
        )(x, w, sizes).sum()

    def whole(x, w):
        return sum(jnp.sum(jnp.sin(gmm_fp8(x[i * m : (i + 1) * m], w, sizes[i], "xla"))) for i in range(8))

    f = jax.jit(jax.value_and_grad(sharded, (0, 1)))
    (loss, (dx, dw)), (rloss, (rdx, rdw)) = f(x, w), jax.jit(jax.value_and_grad(whole, (0, 1)))(x, w)
    np.testing.assert_allclose(loss, rloss, rtol=1e-6)
    np.testing.assert_allclose(dx, rdx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-6 * float(jnp.abs(rdw).max()))
    gathers = [line for line in f.lower(x, w).as_text().splitlines() if "all_gather" in line and "->" in line]
    assert len(gathers) == 2 and all("f8E4M3FN>" in line.split("->")[-1] for line in gathers)  # forward, backward


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dispatched_tiles_requantize_to_themselves(dtype, pow2):
    """Why sending e4m3 rows changes nothing in the experts' forward GEMMs: quantizing the dequantized
    1x128 tiles (in the compute dtype, as they arrive) gives back the same e4m3 values, and scales
    whose product with them is the same -- bit for bit in bf16 (a tile's amax is a bf16 number),
    within one fp32 rounding in fp32. Rows of huge, tiny and zero values, a ragged last tile."""
    x = jnp.asarray(varied((64, 300), seed=3)).at[5].set(0.0).astype(dtype)
    q, s = quantize_tiles(x, -1, pow2)
    q2, s2 = quantize_tiles(fp8_mod._from_tiles(q, s, x), -1, pow2)
    deq, deq2 = (np.asarray(a.astype(jnp.float32)) * np.repeat(np.asarray(b), 128, -1) for a, b in ((q, s), (q2, s2)))
    if dtype == jnp.bfloat16 or pow2:
        np.testing.assert_array_equal(deq2, deq)
    else:
        np.testing.assert_array_equal(np.asarray(q2, np.float32), np.asarray(q, np.float32))
        np.testing.assert_allclose(s2, s, rtol=2**-23)


EXPERT8 = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices("cpu")[:8])


@pytest.mark.parametrize("pow2", [False, True])
def test_moe_dispatch_sends_e4m3_and_its_gradient_comes_back_exactly(pow2):
    """V3's low-precision communication on 8 devices (``all_to_all`` over ``expert``): ``send_e4m3``
    delivers exactly the moved, dequantized 1x128 tiles and returns the plain transpose of its
    cotangent; ``send_grad_e4m3`` moves its input as it is and returns the moved, dequantized tiles
    of its cotangent (gradient clamp). The all-to-alls that carry values travel as e4m3."""
    from dsjax.parallel.expert_parallel import all_to_all as _all_to_all

    x = jnp.asarray(varied((8 * 16, 3, 200), seed=4)).at[7].set(0.0)  # per device: [16, 3, 200] rows
    w = jnp.asarray(varied(x.shape, seed=5)) * 1e-6

    def on_mesh(f):
        return jax.jit(jax.shard_map(f, mesh=EXPERT8, in_specs=P("expert"), out_specs=P("expert"), check_vma=False))

    def tiles(v, amax_min=fp8_mod.AMAX_MIN):
        q, s = fp8_mod._row_tiles(v, "xla", pow2, amax_min)
        return fp8_mod._from_tiles(q, s, v)

    for helper, forward, backward in (
        (fp8_mod.send_e4m3, lambda v: _all_to_all(tiles(v)), _all_to_all),
        (fp8_mod.send_grad_e4m3, _all_to_all, lambda c: _all_to_all(tiles(c, GRAD_AMAX_MIN))),
    ):

        def both(x, w, helper=helper):
            y, vjp = jax.vjp(lambda v: helper(lambda a, aux: _all_to_all(a), v, (), "xla", pow2), x)
            return y, vjp(w)[0]

        y, dx = on_mesh(both)(x, w)
        ry, rdx = on_mesh(lambda x, w: (forward(x), backward(w)))(x, w)
        np.testing.assert_array_equal(y, ry)
        np.testing.assert_array_equal(dx, rdx)
        text = on_mesh(both).lower(x, w).as_text()
        moves = [line for line in text.splitlines() if "all_to_all" in line and "->" in line]
        e4m3 = [line for line in moves if "f8E4M3FN>" in line.split("->")[-1]]
        assert len(moves) == 3 and len(e4m3) == 1, moves  # values in e4m3 one way, scales (f32) and the plain way


def test_moe_ragged_dispatch_sends_e4m3_when_lowered_for_tpu():
    """The ``ragged_all_to_all`` exchange (GPU / TPU; XLA:CPU has none) under FP8, differentiated and
    lowered for TPU: token rows go out as e4m3 + scales, results come back as they are, and in the
    backward the down-projection's gradient goes out as e4m3 + scales, the rows' gradient back as is.
    No expert id travels (the receivers rebuild them from gathered counts)."""
    from dsjax.model.fp8 import Fp8Recipe
    from dsjax.model.moe import e4m3_transports
    from dsjax.parallel.expert_parallel import as_is, exchange

    m, h = 32, 256
    rows = jax.random.normal(jax.random.key(0), (8 * m, h))
    eid = jnp.sort(jax.random.randint(jax.random.key(1), (8, m), 0, 16), axis=1).reshape(-1)  # 2 experts per device

    def loss(rows, eid, fp8):
        def local(r, i):
            transports = (as_is, as_is) if fp8 is None else e4m3_transports(fp8)
            ys, _ = exchange(r, i, 2, 0.0, lambda a, ids: a * (2.0 + ids[:, None]), "ragged_all_to_all", *transports)
            return jnp.sum(ys * r)[None]

        return jax.shard_map(
            local, mesh=EXPERT8, in_specs=(P("expert"), P("expert")), out_specs=P("expert"), check_vma=False
        )(rows, eid).sum()

    def moved(fp8):
        text = (
            jax.jit(jax.grad(loss), static_argnums=2).trace(rows, eid, fp8).lower(lowering_platforms=("tpu",)).as_text()
        )
        return [
            line.split("->")[-1].strip() for line in text.splitlines() if "ragged_all_to_all" in line and "->" in line
        ]

    assert all(t.endswith("xf32>") for t in moved(None)) and len(moved(None)) == 4
    fp8 = moved(Fp8Recipe("xla", False))
    assert sorted(fp8) == sorted(["tensor<256x256xf8E4M3FN>", "tensor<256x2xf32>", "tensor<32x256xf32>"] * 2), fp8


def test_fp8_dense_general_multi_axis_same_params():
    """o_proj-like (axis=(-2, -1)) and q_proj-like (features=(h, d)) kernels: same parameters, FP8 output close."""
    base = load_config("configs/tiny.yaml").model
    x = jax.random.normal(jax.random.key(2), (2, 5, 4, 32))
    for features, axis, inp in ((128, (-2, -1), x), ((4, 48), -1, x.reshape(2, 5, 128))):
        outs = {}
        for fp8 in (False, True):
            layer = linear(dataclasses.replace(base, fp8=fp8), features, ("a", "b", "c"), "proj", axis=axis)
            v = layer.init(jax.random.key(0), inp)
            outs[fp8] = (v, layer.apply(v, inp))
        (v0, y0), (v1, y1) = outs[False], outs[True]
        assert jax.tree.map(lambda a: (a.shape, a.dtype), v0) == jax.tree.map(lambda a: (a.shape, a.dtype), v1)
        assert v1["params"]["kernel"].names == ("a", "b", "c")  # logical axes kept
        np.testing.assert_array_equal(v0["params"]["kernel"].value, v1["params"]["kernel"].value)
        assert y1.shape == y0.shape and cosine(y1, y0) >= 0.99


@pytest.mark.slow
def test_model_fp8_grad_and_unquantized_head(monkeypatch):
    """jax.grad through the whole model with fp8: true; exactly the projections V3 quantizes go FP8."""
    cfg = dataclasses.replace(load_config("configs/tiny.yaml", ["model.num_hidden_layers=2"]).model, fp8=True)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    quantized = set()
    real_matmul, real_gmm = fp8_mod.fp8_matmul, gmm_mod.gmm_fp8
    monkeypatch.setattr(fp8_mod, "fp8_matmul", lambda x, w, *a: quantized.add(w.shape) or real_matmul(x, w, *a))
    monkeypatch.setattr(gmm_mod, "gmm_fp8", lambda x, w, s, *a: quantized.add(w.shape) or real_gmm(x, w, s, *a))
    model = Transformer(cfg)
    v = model.init(jax.random.key(0), tokens)

    def loss(p):
        out = model.apply({**v, "params": p}, tokens)
        return -jax.nn.log_softmax(out.logits).mean() - jax.nn.log_softmax(out.mtp_logits).mean()

    grads = jax.jit(jax.grad(loss))(v["params"])
    h, e, i, heads = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_attention_heads
    attention = {
        (h, cfg.q_lora_rank),
        (cfg.q_lora_rank, heads * cfg.qk_head_dim),
        (h, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        (cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
        (heads * cfg.v_head_dim, h),
    }
    mlps = {(h, cfg.intermediate_size), (cfg.intermediate_size, h), (h, i), (i, h)}  # dense, shared expert
    assert quantized == attention | mlps | {(e, h, i), (e, i, h)}  # no lm_head (h, vocab), no eh_proj (2h, h)
    assert jax.tree.structure(grads) == jax.tree.structure(v["params"])
    assert all(np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


def test_bf16_compute_quantizes_experts_from_the_fp32_master(monkeypatch):
    """dtype bfloat16 + fp8: routed experts reach the FP8 grouped GEMM as the fp32 master (one
    rounding, to e4m3), not as a bf16 copy (two); activations arrive in bf16."""
    cfg = dataclasses.replace(load_config("configs/tiny.yaml").model, dtype="bfloat16", fp8=True)
    seen = []
    real = gmm_mod.gmm_fp8
    monkeypatch.setattr(gmm_mod, "gmm_fp8", lambda x, w, s, *a: seen.append((x.dtype, w.dtype)) or real(x, w, s, *a))
    moe = MoE(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 8, cfg.hidden_size), jnp.bfloat16)
    v = moe.init(jax.random.key(1), x, jnp.ones((2, 8), bool))
    y, _ = moe.apply(v, x, jnp.ones((2, 8), bool))
    assert y.dtype == jnp.bfloat16
    assert seen == [(jnp.bfloat16, jnp.float32)] * 3 * 2  # gate, up, down; init and apply


def np_quantize_ue8m0(x):
    """numpy float64: [M, K] in 1x128 tiles through e4m3, each scale the power of two >= amax / 448."""
    t = tiles_view(x, -1)
    s = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(t).max(-1), 1e-4) / 448.0))
    q = (t / s[..., None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return (q * s[..., None]).reshape(x.shape[0], -1)[:, : x.shape[1]]


def test_ue8m0_scales_reach_every_fp8_gemm(monkeypatch):
    """``fp8_scale_fmt: ue8m0``: the FP8 linear's forward equals numpy's, with power-of-two scales
    for x's 1x128 tiles and W's 128x128 blocks -- and every FP8 GEMM of a model (a dense and a MoE
    layer), projections and routed experts, training and stored-weight inference, gets pow2 scales."""
    tiny = load_config("configs/tiny.yaml", ["model.num_hidden_layers=2", "model.num_nextn_predict_layers=0"]).model
    cfg = dataclasses.replace(tiny, fp8=True, fp8_scale_fmt="ue8m0")
    x = varied((6, 300), seed=7)
    layer = linear(cfg, 200, ("embed", "mlp"), "up")
    v = layer.init(jax.random.key(0), x)
    w = np.asarray(v["params"]["kernel"].value, np.float64)
    blocks = np.pad(w, ((0, -300 % 128), (0, -200 % 128))).reshape(3, 128, 2, 128)
    sw = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(blocks).max((1, 3)), 1e-4) / 448.0))
    qw = (blocks / sw[:, None, :, None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * sw[:, None, :, None]
    want = np_quantize_ue8m0(x) @ qw.reshape(384, 256)[:300, :200]
    y = np.asarray(layer.apply(v, x))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    plain = np.asarray(
        linear(dataclasses.replace(cfg, fp8_scale_fmt="float32"), 200, ("embed", "mlp"), "up").apply(v, x)
    )
    assert np.abs(plain - want).max() > 1e-3 * np.abs(want).max()  # fp32 scales round otherwise

    seen = []
    real_matmul, real_gmm, real_stored, real_gstored = (
        fp8_mod.fp8_matmul,
        gmm_mod.gmm_fp8,
        fp8_mod._x_times_blocks,
        gmm_mod.gmm_fp8_stored,
    )
    monkeypatch.setattr(
        fp8_mod, "fp8_matmul", lambda x, w, impl, pow2: seen.append(pow2) or real_matmul(x, w, impl, pow2)
    )
    monkeypatch.setattr(
        gmm_mod, "gmm_fp8", lambda x, w, s, impl, pow2, *g: seen.append(pow2) or real_gmm(x, w, s, impl, pow2, *g)
    )
    monkeypatch.setattr(fp8_mod, "_x_times_blocks", lambda *a: seen.append(a[-1]) or real_stored(*a))
    monkeypatch.setattr(gmm_mod, "gmm_fp8_stored", lambda *a: seen.append(a[-1]) or real_gstored(*a))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    for c in (cfg, dataclasses.replace(cfg, fp8=False, fp8_weights=True)):
        model = Transformer(c)
        model.apply(model.init(jax.random.key(0), tokens), tokens)
    assert len(seen) >= 2 * 10 and all(p is True for p in seen)  # >= 10 GEMMs per model: 5 attention, MLPs, experts


# --- FP8 inference: weights stored in e4m3 (model.fp8_weights) -----------------------------------


def stored_weight(shape, seed):
    """Arbitrary e4m3 values (any of them, subnormals included) and positive block scales, built
    without the quantizer: what a checkpoint could hold."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(np.clip(rng.standard_normal(shape) * 60, -448, 448), jnp.float8_e4m3fn)
    blocks = (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    return q, jnp.asarray(10.0 ** rng.uniform(-4, -1, blocks), jnp.float32)


def quantized_activations(x):
    """numpy float64: x in 1x128 tiles through e4m3 (the quantizer is checked against numpy above)."""
    q, s = quantize_tiles(jnp.asarray(x, jnp.float32))
    return dequantized(q, s, 1)[:, : x.shape[1]]


def test_fp8_linear_on_stored_weights_matches_dequantized_matmul():
    """o_proj-like Fp8Linear (axis=(-2, -1), K = 4 x 40 = 160 and N = 200: ragged blocks): e4m3
    kernel + scale_inv params, output = quantized x times the dequantized stored weight."""
    cfg = dataclasses.replace(load_config("configs/tiny.yaml").model, fp8_weights=True)
    x = varied((6, 4, 40), seed=4)
    layer = linear(cfg, 200, ("heads", "v_dim", "embed"), "o_proj", axis=(-2, -1))
    v = layer.init(jax.random.key(0), x)
    assert v["params"]["kernel"].names == ("heads", "v_dim", "embed")
    assert v["params"]["kernel"].value.dtype == jnp.float8_e4m3fn and v["params"]["kernel"].value.shape == (4, 40, 200)
    assert v["params"]["kernel_scale_inv"].shape == (2, 2)
    q, s = stored_weight((160, 200), seed=5)
    y = np.asarray(layer.apply({"params": {"kernel": q.reshape(4, 40, 200), "kernel_scale_inv": s}}, x))
    want = quantized_activations(x.reshape(6, 160)) @ dequantized(q, s)
    assert y.shape == (6, 200)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.accelerator
@pytest.mark.parametrize("impl", ["xla", KERNEL_IMPL])
@pytest.mark.parametrize("rows", [3, 300], ids=["decode_rows", "prefill_blocks"])
def test_grouped_matmul_on_stored_experts_matches_dequantized(impl, rows):
    """Experts stored as Fp8Weight [g, K, N] (ragged K, N): few rows (<= groups) take the gathered-rows
    path, many the FP8 grouped GEMM; both equal quantized rows times their expert, dequantized."""
    g, k, n = 4, 200, 136
    q, s = stored_weight((g, k, n), seed=6)
    sizes = np.array([1, 0, 2, 0]) if rows == 3 else np.array([130, 0, 20, 150])
    x = varied((rows, k), seed=7)
    y = np.asarray(
        gmm_mod.grouped_matmul(jnp.asarray(x), Fp8Weight(q, s), jnp.asarray(sizes), fp8=fp8_mod.Fp8Recipe(impl))
    )
    w = dequantized(q, s)
    group = np.repeat(np.arange(g), sizes)
    want = np.einsum("mk,mkn->mn", quantized_activations(x), w[group])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_kernel_calls_drop_out_of_layer_scans_with_jax_0_11_dce(jax_0_11_dce):
    """JAX 0.11 (the lent GPU machines') keeps every pallas_call through dead-code elimination, and
    Flax's nn.scan refuses a layer body whose kept ops read the carry. Each dispatch's kernel call
    (GEMM, grouped GEMM and wgrad, TPU quantizer) drops out when unused, so FP8 inference on stored
    weights runs through the model's layer scans and equals the jnp path; differentiating a kernel
    call itself is an error naming it."""
    from jax._src.interpreters import partial_eval as pe

    x, w = jnp.asarray(varied((256, 256), seed=8)), jnp.asarray(varied((2, 256, 128), seed=9))
    qa, sa = quantize_tiles(x)
    qw, sw = quantize_blocks(w)
    qt, st = quantize_tiles(x, 0)
    groups = jnp.array([0, 1])
    calls = {
        "fp8_gemm": lambda: fp8_gemm(qa, sa, qw[0], sw[0], impl="interpret"),
        "fp8_gmm": lambda: fp8_gmm(qa, sa, qw, sw, groups, impl="interpret"),
        "fp8_gmm_wgrad": lambda: fp8_gmm_wgrad(qt, st, qt, st, groups, 2, "interpret"),
        "quantize_tiles": lambda: quantize_tiles(x, impl="interpret"),
    }
    for name, call in calls.items():
        jaxpr = jax.make_jaxpr(lambda: [call(), 0.0][1])().jaxpr  # noqa: B023
        assert pe.dce_jaxpr(jaxpr, [True])[0].eqns == [], name
    with pytest.raises(TypeError, match="fp8_gemm: a Pallas kernel without a gradient rule"):
        jax.grad(lambda s: fp8_gemm(qa, s, qw[0], sw[0], jnp.float32, "interpret").sum())(sa)

    cfg = dataclasses.replace(load_config("configs/tiny.yaml", ["model.num_hidden_layers=2"]).model, fp8_weights=True)
    variables = random_variables(cfg)
    tokens = jnp.asarray(np.random.default_rng(10).integers(0, cfg.vocab_size, (1, 64)))
    got, want = (
        Transformer(dataclasses.replace(cfg, fp8_impl=impl)).apply(variables, tokens).logits
        for impl in ("interpret", "xla")
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_fp8_weights_under_a_mesh_is_refused_clearly():
    """Expert parallelism has no FP8-stored path yet: a clear error, not a wrong result."""
    cfg = dataclasses.replace(load_config("configs/tiny.yaml").model, fp8_weights=True)
    with pytest.raises(NotImplementedError, match="fp8_weights .* runs on one device"):
        experts_parallel(None, None, None, None, None, None, cfg, None)
