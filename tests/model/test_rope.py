"""dsjax.model.rope: interleaved RoPE, YaRN frequencies and the softmax / attention scales.

Every expectation is an independent numpy restatement (float64) of the spec: the official DeepSeek
code's complex-multiplication form, HF's de-interleave + rotate_half form, and YaRN's frequency
blend (arXiv 2309.00071, as DeepSeek-V2 §3.1.4 and HF's ``_compute_yarn_parameters`` apply it).
Nothing here is compared with values copied from a run of the code under test.
"""

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import ModelConfig, RopeScaling, load_config
from dsjax.model.rope import apply_rope, attention_factor, inv_frequencies, rope_angles, softmax_scale

ROOT = Path(__file__).resolve().parents[2]
V3_YAML = ROOT / "configs" / "deepseek_v3_671b.yaml"

D = 16  # rope head dim of the small configs


def small_cfg(rope_scaling=None, d=D, theta=10000.0, **kw) -> ModelConfig:
    """A tiny valid config; only the RoPE fields matter here."""
    fields = dict(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=d,
        v_head_dim=8,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=512,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
    )
    fields.update(kw)
    return ModelConfig(**fields)


# ---------------------------------------------------------------------------------------------
# Independent numpy references.


def np_inv_freq(d, theta):
    return theta ** (-(2.0 * np.arange(d // 2)) / d)  # float64: theta^(-2i/d)


def np_yarn_inv_freq(d, theta, orig, beta_fast, beta_slow, factor):
    """YaRN restated (as HF's ``_compute_yarn_parameters``): correction range, linear ramp, blend of
    inv_freq and inv_freq / factor."""

    def corr_dim(beta):
        return d * math.log(orig / (beta * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), d - 1)
    base = np_inv_freq(d, theta)
    out = np.empty(d // 2)
    for i in range(d // 2):
        ramp = min(max((i - low) / (high - low if high != low else 1e-3), 0.0), 1.0)
        out[i] = base[i] * (1 - ramp) + base[i] / factor * ramp
    return out, low, high


def np_mscale(factor, m):
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def np_rope_complex(x, pos, inv_freq, scale=1.0):
    """Official DeepSeek form: view (x[2i], x[2i+1]) as x[2i] + j x[2i+1], multiply by exp(j pos w_i).

    x [b, s, (h,) d], pos [b, s] -> same shape as x, float64.
    """
    x = np.asarray(x, np.float64)
    z = x[..., 0::2] + 1j * x[..., 1::2]
    rot = scale * np.exp(1j * np.asarray(pos, np.float64)[..., None] * inv_freq)  # [b, s, d/2]
    if x.ndim == 4:
        rot = rot[:, :, None, :]
    z = z * rot
    out = np.empty(x.shape)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def np_rope_hf(x, pos, inv_freq, scale=1.0):
    """HF form (rope_interleave=True): de-interleave (evens then odds), x*cos + rotate_half(x)*sin.

    Returns the rotated vector in the de-interleaved channel order (what HF dots with k).
    """
    x = np.asarray(x, np.float64)
    xd = np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    ang = np.asarray(pos, np.float64)[..., None] * inv_freq
    emb = np.concatenate([ang, ang], axis=-1)  # [b, s, d]
    cos, sin = np.cos(emb) * scale, np.sin(emb) * scale
    if x.ndim == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotate_half = np.concatenate([-xd[..., half:], xd[..., :half]], axis=-1)
    return xd * cos + rotate_half * sin


def reinterleave(xd):
    half = xd.shape[-1] // 2
    out = np.empty(xd.shape)
    out[..., 0::2], out[..., 1::2] = xd[..., :half], xd[..., half:]
    return out


def restarting_positions(b, s, seed=0):
    """[b, s] positions that restart (packed segments) and are not arange in any row."""
    rng = np.random.default_rng(seed)
    pos = np.zeros((b, s), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s), size=2, replace=False))
        start = 0
        for c in list(cuts) + [s]:
            pos[r, start:c] = np.arange(c - start) + rng.integers(0, 7) * (r % 2)
            start = c
    return pos


def rope_jax(cfg, x, pos):
    cos, sin = rope_angles(cfg, jnp.asarray(pos))
    return np.asarray(apply_rope(jnp.asarray(x, jnp.float32), cos, sin), np.float64)


YARN_SMALL = RopeScaling(factor=4.0, original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0)
# mscale != mscale_all_dim: HF's attention factor (cos/sin magnitude) is their mscale ratio, not 1.
YARN_SMALL_AF = RopeScaling(factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.5)


def ref_inv_freq_and_scale(cfg):
    rs = cfg.rope_scaling
    if rs is None:
        return np_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta), 1.0
    f, _, _ = np_yarn_inv_freq(
        cfg.qk_rope_head_dim, cfg.rope_theta, rs.original_max_position_embeddings, rs.beta_fast, rs.beta_slow, rs.factor
    )
    return f, np_mscale(rs.factor, rs.mscale) / np_mscale(rs.factor, rs.mscale_all_dim)


# ---------------------------------------------------------------------------------------------
# apply_rope / rope_angles against the official complex-multiplication form.


@pytest.mark.parametrize("scaling", [None, YARN_SMALL, YARN_SMALL_AF], ids=["plain", "yarn", "yarn_attn_factor"])
@pytest.mark.parametrize("per_head", [True, False], ids=["per_head", "shared_key"])
def test_apply_rope_matches_complex_rotation(scaling, per_head):
    cfg = small_cfg(scaling)
    rng = np.random.default_rng(1)
    b, s, h = 2, 12, 3
    x = rng.standard_normal((b, s, h, D) if per_head else (b, s, D)).astype(np.float32)
    pos = restarting_positions(b, s)
    assert not all((pos[r] == np.arange(s)).all() for r in range(b))
    inv_freq, scale = ref_inv_freq_and_scale(cfg)
    expected = np_rope_complex(x, pos, inv_freq, scale)
    got = rope_jax(cfg, x, pos)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)


def test_apply_rope_per_head_uses_same_angles_for_every_head():
    """The per-head input broadcasts the [b, s, d/2] angles over heads: head j == shared-key rope of head j."""
    cfg = small_cfg()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 10, 4, D)).astype(np.float32)
    pos = restarting_positions(2, 10, seed=3)
    full = rope_jax(cfg, x, pos)
    for j in range(4):
        np.testing.assert_allclose(full[:, :, j], rope_jax(cfg, x[:, :, j], pos), rtol=1e-6, atol=1e-6)


def test_apply_rope_position_zero_is_identity_and_rotation_is_not_half_split():
    """At pos 0 nothing moves; at pos 1 only pairs (2i, 2i+1) mix (an HF half-split would mix i, i+d/2)."""
    cfg = small_cfg()
    x = np.zeros((1, 2, D), np.float32)
    x[:, :, 0] = 1.0  # only channel 0 set: pair 0 is (0, 1)
    got = rope_jax(cfg, x, np.array([[0, 1]]))
    np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-7)
    # pair 0 has inv_freq 1: (1, 0) rotated by 1 rad -> (cos 1, sin 1) in channels 0 and 1.
    expected = np.zeros(D)
    expected[0], expected[1] = math.cos(1.0), math.sin(1.0)
    np.testing.assert_allclose(got[0, 1], expected, atol=1e-6)


def test_apply_rope_keeps_dtype():
    cfg = small_cfg()
    x = np.random.default_rng(4).standard_normal((1, 4, D)).astype(np.float32)
    cos, sin = rope_angles(cfg, jnp.arange(4)[None])
    out = apply_rope(jnp.asarray(x, jnp.bfloat16), cos, sin)
    assert out.dtype == jnp.bfloat16
    x_bf16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    expected = np_rope_complex(x_bf16, np.arange(4)[None], np_inv_freq(D, 1e4))
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# Equivalence with HF's formulation (de-interleave + rotate_half).


@pytest.mark.parametrize("scaling", [None, YARN_SMALL_AF], ids=["plain", "yarn_attn_factor"])
def test_hf_formulation_gives_identical_vectors_and_scores(scaling):
    cfg = small_cfg(scaling)
    rng = np.random.default_rng(5)
    b, s, h = 2, 9, 2
    q = rng.standard_normal((b, s, h, D)).astype(np.float32)
    k = rng.standard_normal((b, s, D)).astype(np.float32)  # one shared rope key head, as in MLA
    pos = restarting_positions(b, s, seed=6)
    inv_freq, scale = ref_inv_freq_and_scale(cfg)

    q_hf, k_hf = np_rope_hf(q, pos, inv_freq, scale), np_rope_hf(k, pos, inv_freq, scale)
    q_ds, k_ds = rope_jax(cfg, q, pos), rope_jax(cfg, k, pos)
    # Re-interleaving HF's output gives dsjax's output channel for channel ...
    np.testing.assert_allclose(q_ds, reinterleave(q_hf), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(k_ds, reinterleave(k_hf), rtol=1e-5, atol=2e-5)
    # ... and the attention scores q.k (HF de-interleaved vs dsjax interleaved) are identical.
    s_hf = np.einsum("bshd,btd->bhst", q_hf, k_hf)
    s_ds = np.einsum("bshd,btd->bhst", q_ds, k_ds)
    np.testing.assert_allclose(s_ds, s_hf, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Relative-position property.


def test_scores_depend_only_on_relative_position():
    cfg = small_cfg()
    rng = np.random.default_rng(7)
    q = rng.standard_normal(D).astype(np.float32)
    k = rng.standard_normal(D).astype(np.float32)

    def score(m, n):
        qm = rope_jax(cfg, q[None, None], np.array([[m]]))[0, 0]
        kn = rope_jax(cfg, k[None, None], np.array([[n]]))[0, 0]
        return float(qm @ kn)

    for delta in (-5, 0, 3, 17):
        base = score(20 + delta, 20)
        for m0 in (0, 7, 100, 333):
            if m0 + delta < 0:
                continue
            assert score(m0 + delta, m0) == pytest.approx(base, rel=1e-4, abs=1e-4)
        # ... and it is the float64 closed form sum_i Re(zq_i conj(zk_i) e^{j delta w_i}).
        zq, zk = q[0::2] + 1j * q[1::2], k[0::2] + 1j * k[1::2]
        closed = np.real(np.sum(zq * np.conj(zk) * np.exp(1j * delta * np_inv_freq(D, 1e4))))
        assert base == pytest.approx(closed, rel=1e-4, abs=1e-4)
    # The score does depend on the offset (a no-op "rope" would pass the checks above trivially).
    assert abs(score(3, 0) - score(0, 0)) > 1e-2


# ---------------------------------------------------------------------------------------------
# inv_frequencies and YaRN.


@pytest.mark.parametrize("d,theta", [(16, 10000.0), (64, 10000.0), (32, 500000.0)])
def test_inv_frequencies_without_scaling(d, theta):
    cfg = small_cfg(None, d=d, theta=theta)
    got = inv_frequencies(cfg)
    assert got.shape == (d // 2,) and got.dtype == np.float32
    np.testing.assert_allclose(got, theta ** (-np.arange(0, d, 2) / d), rtol=1e-6)


def v3_like_yarn(factor=40.0, orig=4096, mscale=1.0, mscale_all_dim=1.0):
    return small_cfg(
        RopeScaling(
            factor=factor,
            original_max_position_embeddings=orig,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=mscale,
            mscale_all_dim=mscale_all_dim,
        ),
        d=64,
        max_position_embeddings=163840,
    )


def test_yarn_correction_range_is_10_to_23_for_v3():
    _, low, high = np_yarn_inv_freq(64, 1e4, 4096, 32.0, 1.0, 40.0)
    assert (low, high) == (10, 23)  # the restatement itself gives V3's published correction range


def test_yarn_inv_frequencies_v3():
    cfg = v3_like_yarn()
    got = inv_frequencies(cfg).astype(np.float64)
    base = np_inv_freq(64, 1e4)
    expected, low, high = np_yarn_inv_freq(64, 1e4, 4096, 32.0, 1.0, 40.0)
    assert got.shape == (32,)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    i = np.arange(32)
    # pairs at or below low keep their frequency; at or above high they are divided by factor ...
    np.testing.assert_allclose(got[i <= low], base[i <= low], rtol=1e-6)
    np.testing.assert_allclose(got[i >= high], base[i >= high] / 40.0, rtol=1e-6)
    # ... strictly in between, a linear blend with ramp (i - 10) / 13.
    mid = (i > low) & (i < high)
    ramp = (i[mid] - 10) / 13.0
    np.testing.assert_allclose(got[mid], base[mid] * (1 - ramp) + base[mid] / 40.0 * ramp, rtol=1e-6)
    assert np.all(got[mid] < base[mid]) and np.all(got[mid] > base[mid] / 40.0)


def test_yarn_inv_frequencies_v3_config_file():
    cfg = load_config(V3_YAML).model
    expected, _, _ = np_yarn_inv_freq(64, 1e4, 4096, 32.0, 1.0, 40.0)
    np.testing.assert_allclose(inv_frequencies(cfg), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "d,theta,orig,bf,bs,factor",
    [(16, 10000.0, 64, 32.0, 1.0, 4.0), (32, 10000.0, 256, 16.0, 2.0, 8.0), (64, 50000.0, 2048, 32.0, 1.0, 16.0)],
)
def test_yarn_inv_frequencies_other_settings(d, theta, orig, bf, bs, factor):
    cfg = small_cfg(
        RopeScaling(factor=factor, original_max_position_embeddings=orig, beta_fast=bf, beta_slow=bs),
        d=d,
        theta=theta,
        max_position_embeddings=int(orig * factor),
    )
    expected, _, _ = np_yarn_inv_freq(d, theta, orig, bf, bs, factor)
    np.testing.assert_allclose(inv_frequencies(cfg), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# softmax_scale and attention_factor.


def test_softmax_scale_v3_config():
    cfg = load_config(V3_YAML).model
    m = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert m**2 == pytest.approx(1.87385, abs=1e-5)  # V3: mscale(40, 1)^2 = 1.36889^2
    assert softmax_scale(cfg) == pytest.approx(192**-0.5 * m**2, rel=1e-12)


def test_softmax_scale_without_scaling():
    cfg = load_config(V3_YAML, ["model.rope_scaling=null"]).model
    assert cfg.rope_scaling is None
    assert softmax_scale(cfg) == pytest.approx(192**-0.5, rel=1e-12)
    assert softmax_scale(small_cfg()) == pytest.approx((8 + D) ** -0.5, rel=1e-12)


def test_softmax_scale_uses_mscale_all_dim_only():
    cfg = v3_like_yarn(mscale=0.5, mscale_all_dim=0.8)
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim**-0.5 * (0.1 * 0.8 * math.log(40) + 1) ** 2, rel=1e-12)
    cfg0 = v3_like_yarn(mscale=1.0, mscale_all_dim=0.0)  # HF: no mscale_all_dim -> no softmax correction
    assert softmax_scale(cfg0) == pytest.approx(cfg0.qk_head_dim**-0.5, rel=1e-12)


def test_attention_factor():
    assert attention_factor(small_cfg()) == 1.0
    assert attention_factor(load_config(V3_YAML).model) == pytest.approx(1.0, abs=1e-12)
    assert attention_factor(v3_like_yarn(mscale=0.7, mscale_all_dim=0.7)) == pytest.approx(1.0, abs=1e-12)
    # HF _compute_yarn_parameters: mscale(s, mscale) / mscale(s, mscale_all_dim) when both are set ...
    a = attention_factor(v3_like_yarn(mscale=1.0, mscale_all_dim=0.5))
    assert a == pytest.approx((0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1), rel=1e-12)
    assert a != pytest.approx(1.0)
    # ... otherwise get_mscale(factor) with mscale 1.
    assert attention_factor(v3_like_yarn(mscale=1.0, mscale_all_dim=0.0)) == pytest.approx(
        0.1 * math.log(40) + 1, rel=1e-12
    )


def test_rope_angles_carry_attention_factor():
    cfg = v3_like_yarn(factor=4.0, orig=64, mscale=1.0, mscale_all_dim=0.5)
    pos = np.array([[0, 3, 11, 2]])
    cos, sin = rope_angles(cfg, jnp.asarray(pos))
    a = np_mscale(4.0, 1.0) / np_mscale(4.0, 0.5)
    f, _, _ = np_yarn_inv_freq(64, 1e4, 64, 32.0, 1.0, 4.0)
    np.testing.assert_allclose(np.asarray(cos), a * np.cos(pos[..., None] * f), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), a * np.sin(pos[..., None] * f), rtol=1e-5, atol=1e-6)


def test_apply_rope_shared_key_with_unbatched_positions():
    """cos/sin from 1-D positions [s] broadcast over the batch, also when batch == seq."""
    cfg = small_cfg()
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 4, D))  # shared key [b, s, d] with b == s
    pos = np.array([3, 0, 7, 1])
    want = np_rope_complex(x, np.broadcast_to(pos, (4, 4)), np_inv_freq(D, 10000.0))
    np.testing.assert_allclose(rope_jax(cfg, x, pos), want, atol=1e-5)
