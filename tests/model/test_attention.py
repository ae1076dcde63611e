"""MLA attention kernels (pallas_kernels.flash_mla, pallas_kernels.mla_decode) against the plain-jnp
references in dsjax.model.attention: Pallas interpret mode on CPU, forward and gradients, ragged shapes;
lowering to Mosaic (TPU) and Triton (GPU) checked on CPU; the model with the kernels equals the model
without them."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice

from dsjax.config import load_config
from dsjax.model import Transformer, abstract_variables, init_cache, random_variables
from dsjax.model.attention import (
    AttentionMask,
    latent_attention,
    latent_attention_reference,
    mla_attention,
    mla_attention_reference,
    resolve_impl,
)
from pallas_kernels.flash_mla import flash_mla
from pallas_kernels.mla_decode import mla_decode

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def packed_segments(rng, b, s):
    """[b, s] segment ids: 1-4 documents per row, then maybe padding (0)."""
    ids = np.zeros((b, s), np.int32)
    for row in ids:
        cuts = np.sort(rng.choice(np.arange(1, s), size=rng.integers(1, 4), replace=False))
        row[:] = np.searchsorted(cuts, np.arange(s), side="right") + 1
        row[s - rng.integers(0, s // 4) :] = 0
    return jnp.asarray(ids)


def expanded_inputs(seed, b, s, h, dn=32, dr=16, dv=24, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    shapes = [(b, s, h, dn), (b, s, h, dr), (b, s, h, dn), (b, s, dr), (b, s, h, dv)]
    return [jax.random.normal(k, sh).astype(dtype) for k, sh in zip(ks, shapes)]


def latent_inputs(seed, b, s, t, h, r=64, dr=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    shapes = [(b, s, h, r), (b, s, h, dr), (b, t, r), (b, t, dr)]
    return [(0.5 * jax.random.normal(k, sh)).astype(dtype) for k, sh in zip(ks, shapes)]


def assert_close(got, want, tol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


# -- flash MLA (training / prefill) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "s,block_q,block_k,dtype", [(45, 16, 8, jnp.float32), (70, 16, 32, jnp.float32), (70, 16, 32, jnp.bfloat16)]
)
def test_flash_forward_equals_reference(s, block_q, block_k, dtype):
    """Packed documents + padding, sequence not a multiple of either block."""
    args = expanded_inputs(s, 2, s, 2, dtype=dtype)
    seg = packed_segments(np.random.default_rng(s), 2, s)
    got = flash_mla(*args, seg, 0.17, block_q=block_q, block_k=block_k)
    assert got.shape == (2, s, 2, 24) and got.dtype == dtype
    assert_close(got, mla_attention_reference(*args, AttentionMask.causal(seg), 0.17), TOL[dtype])


def test_flash_gradients_equal_reference_gradients():
    """custom_vjp (dQ and dK/dV kernels) == jax.grad of the reference, k_pe's summed over heads."""
    s = 53
    args = expanded_inputs(1, 2, s, 2)
    seg = packed_segments(np.random.default_rng(1), 2, s)
    cot = jax.random.normal(jax.random.key(9), (2, s, 2, 24))

    def loss(attend):
        return lambda *a: jnp.sum(attend(*a) * cot)

    got = jax.grad(loss(lambda *a: flash_mla(*a, seg, 0.3, block_q=16, block_k=32)), argnums=range(5))(*args)
    want = jax.grad(loss(lambda *a: mla_attention_reference(*a, AttentionMask.causal(seg), 0.3)), argnums=range(5))(
        *args
    )
    for name, g, w in zip(("q_nope", "q_pe", "k_nope", "k_pe", "v"), got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_flash_bf16_gradients_within_bf16_tolerance():
    s = 40
    args = expanded_inputs(2, 1, s, 2, dtype=jnp.bfloat16)
    seg = packed_segments(np.random.default_rng(2), 1, s)

    def grads(attend):
        return jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32) ** 2), argnums=range(5))(*args)

    got = grads(lambda *a: flash_mla(*a, seg, 0.2, block_q=16, block_k=16))
    want = grads(lambda *a: mla_attention_reference(*a, AttentionMask.causal(seg), 0.2))
    for g, w in zip(got, want):
        scale = float(jnp.abs(w.astype(jnp.float32)).max())
        assert_close(g.astype(jnp.float32) / scale, w.astype(jnp.float32) / scale, 3e-2)


# -- absorbed MLA decode over the latent cache ---------------------------------------------------


@pytest.mark.parametrize(
    "s,t,block_t,splits,dtype",
    [(1, 70, 8, 3, jnp.float32), (3, 64, 16, 2, jnp.float32), (5, 37, 32, 1, jnp.float32), (1, 70, 8, 3, jnp.bfloat16)],
)
def test_decode_equals_reference(s, t, block_t, splits, dtype):
    """Random per-row positions, incl. none visible (-1) and past the cache end; cache not a multiple
    of the block; several tokens per row (prefill / speculative verification)."""
    b, h = 3, 4
    q_lat, q_pe, c_kv, k_pe = latent_inputs(t, b, s, t, h, dtype=dtype)
    rng = np.random.default_rng(t)
    positions = rng.integers(0, t, (b, s))
    positions[0, 0], positions[-1, -1] = -1, t + 5
    positions = jnp.asarray(positions)
    lengths = jnp.broadcast_to(jnp.clip(positions + 1, 0, t)[:, :, None], (b, s, h)).reshape(b, s * h)
    flat = lambda x: x.reshape(b, s * h, -1)  # noqa: E731
    got = mla_decode(flat(q_lat), flat(q_pe), c_kv, k_pe, lengths, 0.2, block_m=8, block_t=block_t, num_splits=splits)
    want = latent_attention_reference(q_lat, q_pe, c_kv, k_pe, AttentionMask.cache(positions), 0.2)
    assert got.dtype == dtype
    assert_close(got.reshape(want.shape), want, TOL[dtype])


# -- the kernels compiled on this machine's accelerator (interpreted on CPU) ---------------------

# On a TPU or GPU these run the real Mosaic / Triton kernels with the backend's default blocks
# (`XLA_PYTHON_CLIENT_PREALLOCATE=false pytest -m accelerator tests/test_attention.py` on a lent GPU); the tests
# above use small interpret-mode blocks that the compilers' tile rules do not all accept.
ON_DEVICE = jax.default_backend() if jax.default_backend() in ("tpu", "gpu") else "interpret"


@pytest.mark.accelerator
def test_flash_on_this_backend_equals_reference_at_v3_head_dims():
    """DeepSeek-V3 head dims (q/k 192 = 128 + 64, v 128), bf16, packed documents, a sequence that is
    not a multiple of the default blocks: forward and all five gradients against jax.grad of the
    jnp reference on the same bf16 inputs, computed in fp32."""
    b, s, h = 1, 200, 2
    args = expanded_inputs(11, b, s, h, dn=128, dr=64, dv=128, dtype=jnp.bfloat16)
    seg = packed_segments(np.random.default_rng(11), b, s)
    cot = jax.random.normal(jax.random.key(12), (b, s, h, 128), jnp.float32)
    scale = 192**-0.5

    def run(attend, *a):
        return jax.value_and_grad(lambda *x: jnp.sum(attend(*x).astype(jnp.float32) * cot), argnums=range(5))(*a)

    got_out = jax.jit(lambda *a: flash_mla(*a, seg, scale, backend=ON_DEVICE))(*args)
    want_out = mla_attention_reference(*(x.astype(jnp.float32) for x in args), AttentionMask.causal(seg), scale)
    assert got_out.dtype == jnp.bfloat16
    assert_close(got_out, want_out, TOL[jnp.bfloat16])
    _, got = jax.jit(lambda *a: run(lambda *x: flash_mla(*x, seg, scale, backend=ON_DEVICE), *a))(*args)
    _, want = run(
        lambda *x: mla_attention_reference(*x, AttentionMask.causal(seg), scale), *(x.astype(jnp.float32) for x in args)
    )
    for name, g, w in zip(("q_nope", "q_pe", "k_nope", "k_pe", "v"), got, want):
        assert g.shape == w.shape and g.dtype == jnp.bfloat16, name
        rel = float(jnp.linalg.norm(g.astype(jnp.float32) - w) / jnp.linalg.norm(w))
        assert rel <= 1e-2, f"{name}: relative error {rel:.3g}"  # bf16 rounding: ~3e-3


@pytest.mark.accelerator
def test_decode_on_this_backend_equals_reference_at_v3_latent_dims():
    """Latent 512 + rope 64, 16 heads, bf16, one and three tokens per row at random positions in a
    cache that is not a multiple of the default block, default blocks and splits."""
    for s, t in ((1, 300), (3, 200)):
        b, h = 2, 16
        q_lat, q_pe, c_kv, k_pe = latent_inputs(t + s, b, s, t, h, r=512, dr=64, dtype=jnp.bfloat16)
        positions = jnp.asarray(np.random.default_rng(t).integers(0, t, (b, s)))
        lengths = jnp.broadcast_to((positions + 1)[:, :, None], (b, s, h)).reshape(b, s * h)
        flat = lambda x: x.reshape(b, s * h, -1)  # noqa: E731
        got = jax.jit(lambda *a: mla_decode(*a, 0.07, backend=ON_DEVICE))(flat(q_lat), flat(q_pe), c_kv, k_pe, lengths)
        f32 = (x.astype(jnp.float32) for x in (q_lat, q_pe, c_kv, k_pe))
        want = latent_attention_reference(*f32, AttentionMask.cache(positions), 0.07)
        assert got.dtype == jnp.bfloat16
        assert_close(got.reshape(want.shape), want, TOL[jnp.bfloat16])


def test_attention_auto_skips_gpus_without_triton():
    """XLA compiles no Triton kernel before sm_80 (a T4 -- Colab's -- or a V100): there ``auto`` is the
    jnp path and ``pallas`` a named error, instead of a FAILED_PRECONDITION from the compiler."""
    for kind, want in (("Tesla T4", "xla"), ("NVIDIA A10G", "pallas"), ("NVIDIA H100 80GB HBM3", "pallas")):
        device = AbstractDevice(device_kind=kind, num_cores=40, platform="gpu")
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
            assert resolve_impl("auto") == want, kind
            if want == "xla":
                with pytest.raises(ValueError, match="needs an Ampere or newer GPU"):
                    resolve_impl("pallas")


@pytest.mark.parametrize(
    "kind,flash,decode",
    [
        ("NVIDIA H100 80GB HBM3", (128, 64), (64, 64)),
        ("NVIDIA A100-SXM4-80GB", (128, 64), (64, 64)),
        ("NVIDIA L4", (64, 64), (32, 32)),
    ],
)
def test_gpu_blocks_fit_the_gpus_shared_memory(monkeypatch, kind, flash, decode):
    """The default GPU blocks follow the GPU's shared memory: (128, 64) flash blocks need 201 KiB in
    the dK/dV kernel and (64, 64) decode blocks 216 KiB on an H100 (A100: 138 / 152 of 163 KiB), past
    the ~99 KiB of an L4 / A10 / RTX, which get smaller ones (89 / 74 KiB; `tools/gpu_compile.py`
    compiled them for all three without a GPU)."""
    import pallas_kernels.flash_mla as flash_module
    import pallas_kernels.mla_decode as decode_module

    seen = []
    monkeypatch.setattr(
        flash_module,
        "check_blocks",
        lambda kernel, backend, lane_dense=False, **b: seen.append(tuple(b.values())),
    )
    monkeypatch.setattr(
        decode_module,
        "check_blocks",
        lambda kernel, backend, lane_dense=False, **b: seen.append(tuple(b.values())),
    )
    sds = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    device = AbstractDevice(device_kind=kind, num_cores=100, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        jax.eval_shape(
            lambda *a: flash_mla(*a, 0.1, backend="gpu"),
            sds(1, 512, 2, 128),
            sds(1, 512, 2, 64),
            sds(1, 512, 2, 128),
            sds(1, 512, 64),
            sds(1, 512, 2, 128),
            sds(1, 512, dt=jnp.int32),
        )
        jax.eval_shape(
            lambda *a: mla_decode(*a, 0.1, backend="gpu"),
            sds(1, 128, 512),
            sds(1, 128, 64),
            sds(1, 1024, 512),
            sds(1, 1024, 64),
            sds(1, 128, dt=jnp.int32),
        )
    assert seen == [flash, decode]


# -- dispatch (the model tests below run both dispatch functions both ways) ----------------------


def test_bad_inputs_raise_named_errors():
    args = expanded_inputs(0, 1, 16, 2)
    seg = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="attention_impl='cuda': expected one of"):
        resolve_impl("cuda")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs a TPU or GPU"):
            resolve_impl("pallas")
        assert resolve_impl("auto") == "xla"
    with pytest.raises(ValueError, match="AttentionMask.causal"):
        mla_attention(*args, AttentionMask.causal(seg).dense(16), 0.1, "interpret")
    with pytest.raises(ValueError, match="AttentionMask.cache"):
        latent_attention(*latent_inputs(0, 1, 1, 16, 2), AttentionMask.causal(seg[:, :1]), 0.1, "interpret")
    with pytest.raises(ValueError, match="k_pe has shape"):
        flash_mla(*args[:3], args[3][:, :, :8], args[4], seg, 0.1)
    with pytest.raises(ValueError, match="power of two"):
        flash_mla(*args, seg, 0.1, backend="gpu", block_q=48)
    with pytest.raises(ValueError, match="multiple of 128"):
        flash_mla(*args, seg, 0.1, backend="tpu", block_k=64)
    with pytest.raises(ValueError, match="lengths has shape"):
        q_lat, q_pe, c_kv, k_pe = latent_inputs(0, 1, 1, 16, 2)
        mla_decode(q_lat[:, 0], q_pe[:, 0], c_kv, k_pe, jnp.ones((1, 3), jnp.int32), 0.1)


# -- lowering to the accelerators' compilers, on CPU ---------------------------------------------

TARGETS = {
    "tpu": ("tpu", AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu"), "tpu_custom_call"),
    "gpu": (
        "cuda",
        AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"),
        "__gpu$xla.gpu.triton",
    ),
}


def lowered_kernels(fn, args, backend):
    """Lowers fn(*args) for the backend's compiler (Pallas -> Mosaic MLIR / Triton IR in the
    StableHLO), without the device; returns how many kernel custom calls it holds."""
    platform, device, call = TARGETS[backend]
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((), (), abstract_device=device)
    ):  # no axes: no sharding
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text().count(f"@{call}(")


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernels_lower_for_tpu_and_gpu(backend):
    """DeepSeek-V3 head dims (192 = 128 + 64 for q/k, 128 for v; latent 512 + 64), bf16, sequence
    and cache lengths not multiples of the blocks: forward + backward, and decode."""
    b, s, h, t = 2, 300, 4, 1000
    sds = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    train_args = (
        sds(b, s, h, 128),
        sds(b, s, h, 64),
        sds(b, s, h, 128),
        sds(b, s, 64),
        sds(b, s, h, 128),
        sds(b, s, dt=jnp.int32),
    )

    def train(*a):
        loss = lambda *x: flash_mla(*x, a[5], 0.1, backend=backend).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=range(5))(*a[:5])

    assert lowered_kernels(train, train_args, backend) == 3  # forward, dQ, dK/dV
    decode_args = (sds(b, 128, 512), sds(b, 128, 64), sds(b, t, 512), sds(b, t, 64), sds(b, 128, dt=jnp.int32))
    assert lowered_kernels(lambda *a: mla_decode(*a, 0.1, backend=backend), decode_args, backend) == 1


def test_model_lowers_for_tpu_with_the_kernels():
    """attention_impl auto, compiled for a TPU from this CPU host (the compile-only path): training
    uses the flash kernels (forward, dQ, dK/dV per layer stack), decoding the latent decode kernel."""
    # 1 dense + 1 MoE stack; no MTP: JAX 0.11 keeps its unused forward kernel in the lowered module
    cfg = load_config("configs/tiny.yaml", ["model.num_hidden_layers=2", "model.num_nextn_predict_layers=0"]).model
    model, variables = Transformer(cfg), nn.meta.unbox(abstract_variables(cfg))
    tokens, step = jax.ShapeDtypeStruct((2, 300), jnp.int32), jax.ShapeDtypeStruct((2, 1), jnp.int32)

    def grad(v, t):
        return jax.grad(lambda p: model.apply({**v, "params": p}, t).logits.sum())(v["params"])

    def decode(v, t, pos, cache):
        return model.apply(v, t, pos, cache, method="decode")

    assert lowered_kernels(grad, (variables, tokens), "tpu") == 2 * 3
    cache = jax.eval_shape(lambda: init_cache(cfg, 2, 256))
    assert lowered_kernels(decode, (variables, step, step, cache), "tpu") == 2


# -- the model with the kernels ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("configs/tiny.yaml", ["model.num_hidden_layers=2", "model.initializer_range=0.1"]).model
    return cfg, random_variables(cfg)


def with_impl(cfg, impl):
    return dataclasses.replace(cfg, attention_impl=impl)


def packed_batch(cfg):
    rng = np.random.default_rng(5)
    return jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 40))), packed_segments(rng, 2, 40)


def test_model_logits_interpret_equal_xla(tiny):
    """Full forward (scan over layers, MTP) on packed documents with padding."""
    cfg, variables = tiny
    tokens, seg = packed_batch(cfg)
    got, want = (
        jax.jit(Transformer(with_impl(cfg, impl)).apply)(variables, tokens, seg) for impl in ("interpret", "xla")
    )
    assert_close(got.logits, want.logits, 1e-5)
    assert_close(got.mtp_logits, want.mtp_logits, 1e-5)


@pytest.mark.slow
def test_model_gradients_interpret_equal_xla(tiny):
    """jax.grad through the kernel's custom_vjp inside nn.scan == through the reference."""
    cfg, variables = tiny
    tokens, seg = packed_batch(cfg)

    def grads(impl):
        model = Transformer(with_impl(cfg, impl))

        def loss(params):
            out = model.apply({**variables, "params": params}, tokens, segment_ids=seg)
            return jnp.sum(out.logits**2) + jnp.sum(out.mtp_logits**2)

        return jax.jit(jax.grad(loss))(variables["params"])

    for g, w in zip(jax.tree.leaves(grads("interpret")), jax.tree.leaves(grads("xla"))):
        scale = max(float(jnp.abs(w).max()), 1e-6)
        assert_close(g / scale, w / scale, 1e-4)


def test_decode_with_kernel_equals_decode_without(tiny, jax_0_11_dce):
    """Prefill of right-padded prompts (S > 1, causal over the cache), then single-token steps with
    every row at its own position, through Transformer.decode: logits and cache equal. With JAX 0.11's
    dead-code elimination, which keeps Pallas calls: nn.scan must still trace the kernel's layer body."""
    cfg, variables = tiny
    rng = np.random.default_rng(6)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 9)))
    steps = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 3, 1)))
    lens = jnp.asarray([9, 4, 6])

    def run(impl):
        model = Transformer(with_impl(cfg, impl))
        decode = jax.jit(lambda tok, pos, cache: model.apply(variables, tok, pos, cache, method="decode"))
        _, normed, cache, _ = decode(prompts, jnp.arange(9)[None].repeat(3, 0), init_cache(cfg, 3, 21))
        outs = [normed]
        for k, tok in enumerate(steps):
            _, normed, cache, _ = decode(tok, (lens + k)[:, None], cache)
            outs.append(normed)
        return [model.apply(variables, o, method="logits") for o in outs], cache

    got, got_cache = run("interpret")
    want, want_cache = run("xla")
    for g, w in zip(got + jax.tree.leaves(got_cache), want + jax.tree.leaves(want_cache)):
        assert_close(g, w, 1e-5)
