"""dsjax.model.moe / .gmm: routing, dropless experts, grouped matmul, balance loss, MoE layer (DeepSeek-V3 §2.1.2).

Expectations are independent numpy restatements of the spec (per-token loops, float64). The dense
expert path (``experts_dense``) is itself checked against numpy before it is used as the reference
for the dropless path.
"""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import ModelConfig
from dsjax.model.gmm import block_rows, gmm_blocked, grouped_matmul
from dsjax.model.moe import BIAS, MoE, balance_loss, experts_dense, experts_dropless, route

IMPLS = ["blocked", "ragged_dot", "rows"]

# jitted entry points: one compilation per shape instead of many eager op dispatches (CPU time)
route_jit = jax.jit(route, static_argnums=2)
dropless_jit = jax.jit(experts_dropless, static_argnames="impl")
dense_jit = jax.jit(experts_dense)
gmm_jit = jax.jit(grouped_matmul, static_argnums=3)
balance_jit = jax.jit(balance_loss, static_argnums=3)


def moe_cfg(**kw) -> ModelConfig:
    fields = dict(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=0,
    )
    fields.update(kw)
    return ModelConfig(**fields)


# ---------------------------------------------------------------------------------------------
# numpy references


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def np_silu(x):
    return x * np_sigmoid(x)


def np_route(scores, bias, cfg):
    """DeepSeek-V3 §2.1.2 (eq. 12-16) restated per token. Returns a list of (sorted expert ids, {expert: weight})."""
    scores = np.asarray(scores, np.float64)
    bias = np.asarray(bias, np.float64)
    t_count, e = scores.shape
    k = cfg.num_experts_per_tok
    per_group = e // cfg.n_group
    out = []
    for t in range(t_count):
        sel = scores[t] + bias
        allowed = list(range(e))
        if cfg.topk_method != "greedy":
            group_scores = []
            for g in range(cfg.n_group):
                vals = sorted(sel[g * per_group : (g + 1) * per_group], reverse=True)
                group_scores.append(vals[0] + vals[1] if cfg.topk_method == "noaux_tc" else vals[0])
            kept = sorted(range(cfg.n_group), key=lambda g: -group_scores[g])[: cfg.topk_group]
            allowed = [j for j in range(e) if j // per_group in kept]
        chosen = sorted(allowed, key=lambda j: -sel[j])[:k]
        w = np.array([scores[t, j] for j in chosen])  # unbiased scores
        if cfg.norm_topk_prob:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        out.append((sorted(chosen), dict(zip(chosen, w))))
    return out


def assert_route_matches(idx, w, ref, rtol=1e-5):
    idx, w = np.asarray(idx), np.asarray(w, np.float64)
    assert idx.shape == w.shape == (len(ref), len(ref[0][0]))
    for t, (experts, weights) in enumerate(ref):
        assert sorted(idx[t].tolist()) == experts, f"token {t}: {sorted(idx[t].tolist())} != {experts}"
        for j, e in enumerate(idx[t]):
            assert w[t, j] == pytest.approx(weights[int(e)], rel=rtol, abs=1e-7), f"token {t} expert {e}"


def np_experts(x, idx, w, w_gate, w_up, w_down):
    """sum_k w_k * down(silu(gate x) * up x) of expert idx_k, per token, float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    wg, wu, wd = (np.asarray(a, np.float64) for a in (w_gate, w_up, w_down))
    y = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for j, e in enumerate(np.asarray(idx)[t]):
            h = np_silu(x[t] @ wg[e]) * (x[t] @ wu[e])
            y[t] += w[t, j] * (h @ wd[e])
    return y


def np_balance_loss(scores, idx, mask, e):
    """DeepSeek-V3 §2.1.2 (eq. 17-20) sequence-wise loss, per sequence: sum_i f_i P_i, averaged over the sequences
    that have real tokens (an all-padding row has no routing to balance)."""
    scores, idx, mask = np.asarray(scores, np.float64), np.asarray(idx), np.asarray(mask, bool)
    b, s, k = idx.shape
    losses = []
    for r in range(b):
        real = [t for t in range(s) if mask[r, t]]
        t_real = len(real)
        if not real:
            continue
        counts = np.zeros(e)
        p = np.zeros(e)
        for t in real:
            for j in idx[r, t]:
                counts[j] += 1
            p += scores[r, t] / scores[r, t].sum()
        f = e / (k * t_real) * counts
        losses.append(np.sum(f * p / t_real))
    return float(np.mean(losses))


def seed_of(obj) -> int:
    """A seed that does not depend on PYTHONHASHSEED."""
    return zlib.crc32(repr(obj).encode())


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


# ---------------------------------------------------------------------------------------------
# route


ROUTE_CASES = [
    # (topk_method, n_group, topk_group, norm_topk_prob, scoring, E, K)
    ("noaux_tc", 4, 2, True, "sigmoid", 16, 4),
    ("noaux_tc", 8, 3, True, "sigmoid", 32, 6),
    ("noaux_tc", 4, 1, False, "sigmoid", 16, 3),
    ("noaux_tc", 1, 1, True, "sigmoid", 8, 2),
    ("group_limited_greedy", 4, 2, False, "softmax", 16, 4),
    ("group_limited_greedy", 4, 1, True, "softmax", 16, 2),
    ("group_limited_greedy", 8, 3, True, "sigmoid", 16, 3),
    ("greedy", 1, 1, False, "softmax", 16, 6),
    ("greedy", 1, 1, True, "sigmoid", 8, 3),
]


def route_cfg(method, n_group, topk_group, norm, scoring, e, k, rsf=2.5):
    return moe_cfg(
        topk_method=method,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        scoring_func=scoring,
        n_routed_experts=e,
        num_experts_per_tok=k,
        routed_scaling_factor=rsf,
    )


def random_scores(rng, t, e, scoring):
    logits = rng.standard_normal((t, e)) * 2.0
    s = np_sigmoid(logits) if scoring == "sigmoid" else np_softmax(logits)
    return s.astype(np.float32)


def route_case_id(c):
    return f"{c[0]}-g{c[1]}k{c[2]}-norm{int(c[3])}-{c[4]}-E{c[5]}K{c[6]}"


@pytest.mark.parametrize("case", ROUTE_CASES, ids=route_case_id)
def test_route_matches_reference(case):
    method, n_group, topk_group, norm, scoring, e, k = case
    cfg = route_cfg(*case, rsf=2.5 if scoring == "sigmoid" else 16.0)
    rng = np.random.default_rng(seed_of(case))
    scores = random_scores(rng, 64, e, scoring)
    bias = (rng.standard_normal(e) * 0.05).astype(np.float32) if scoring == "sigmoid" else np.zeros(e, np.float32)
    idx, w = route_jit(jnp.asarray(scores), jnp.asarray(bias), cfg)
    assert_route_matches(idx, w, np_route(scores, bias, cfg))
    if norm:
        np.testing.assert_allclose(np.asarray(w).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)


def test_route_group_limit_matters():
    """Sanity of the reference/cases: the group limit changes the pick for some tokens (else the
    group tests above would not tell group-limited from greedy routing)."""
    rng = np.random.default_rng(11)
    scores = random_scores(rng, 64, 16, "sigmoid")
    bias = np.zeros(16, np.float32)
    limited = route_cfg("noaux_tc", 4, 1, True, "sigmoid", 16, 4)
    greedy = route_cfg("greedy", 1, 1, True, "sigmoid", 16, 4)
    a = np.sort(np.asarray(route_jit(jnp.asarray(scores), jnp.asarray(bias), limited)[0]), -1)
    b = np.sort(np.asarray(route_jit(jnp.asarray(scores), jnp.asarray(bias), greedy)[0]), -1)
    assert (a != b).any(axis=-1).sum() > 10
    # with topk_group = 1 every token's experts lie in one group of 4
    assert ((a // 4) == (a[:, :1] // 4)).all()


def test_route_noaux_tc_group_score_is_top2_sum_not_max():
    """A group with one huge expert loses to a group with two good experts under noaux_tc (sum of
    top-2), but wins under group_limited_greedy (max)."""
    e = 8  # 2 groups of 4
    s = np.array([[0.95, 0.10, 0.11, 0.12, 0.80, 0.79, 0.13, 0.14]], np.float32)
    b = np.zeros(e, np.float32)
    v3 = route_cfg("noaux_tc", 2, 1, True, "sigmoid", e, 2)
    v2 = route_cfg("group_limited_greedy", 2, 1, True, "sigmoid", e, 2)
    idx3 = sorted(np.asarray(route_jit(jnp.asarray(s), jnp.asarray(b), v3)[0])[0].tolist())
    idx2 = sorted(np.asarray(route_jit(jnp.asarray(s), jnp.asarray(b), v2)[0])[0].tolist())
    assert idx3 == np_route(s, b, v3)[0][0] == [4, 5]
    assert idx2 == np_route(s, b, v2)[0][0] == [0, 3]


def test_bias_changes_selection_never_weights():
    cfg = route_cfg("noaux_tc", 4, 2, True, "sigmoid", 16, 4)
    rng = np.random.default_rng(12)
    scores = random_scores(rng, 64, 16, "sigmoid")
    bias = np.zeros(16, np.float32)
    bias[[1, 6, 13]] = 0.8  # strongly favour three experts in three different groups
    idx0, _ = route_jit(jnp.asarray(scores), jnp.zeros(16), cfg)
    idx, w = route_jit(jnp.asarray(scores), jnp.asarray(bias), cfg)
    idx0, idx, w = np.asarray(idx0), np.asarray(idx), np.asarray(w, np.float64)
    changed = (np.sort(idx0, -1) != np.sort(idx, -1)).any(-1)
    assert changed.sum() >= 10, "a large bias must change the picked experts for many tokens"
    assert np.isin([1, 6, 13], idx).all()
    # weights: the UNBIASED scores of the picked experts, normalised, times the scaling factor
    picked = np.take_along_axis(scores.astype(np.float64), idx, -1)
    np.testing.assert_allclose(w, picked / picked.sum(-1, keepdims=True) * 2.5, rtol=1e-5)
    assert_route_matches(idx, w, np_route(scores, bias, cfg))


# ---------------------------------------------------------------------------------------------
# experts_dropless vs experts_dense


T_H_I_E = dict(h=16, i=8, e=8)


def expert_weights(rng, e, h, i):
    wg = (rng.standard_normal((e, h, i)) / np.sqrt(h)).astype(np.float32)
    wu = (rng.standard_normal((e, h, i)) / np.sqrt(h)).astype(np.float32)
    wd = (rng.standard_normal((e, i, h)) / np.sqrt(i)).astype(np.float32)
    return wg, wu, wd


def distinct_random_idx(rng, t, k, experts):
    experts = np.asarray(experts)
    return np.stack([rng.choice(experts, size=k, replace=False) for _ in range(t)]).astype(np.int32)


def routing_case(name, rng, e):
    """(idx [T, K], description) for the routing patterns under test."""
    if name == "random":
        return distinct_random_idx(rng, 24, 2, np.arange(e))
    if name == "all_same_one_expert":  # every copy in one group
        return np.full((20, 1), 5, np.int32)
    if name == "all_same_two_experts":
        return np.tile(np.array([[6, 2]], np.int32), (19, 1))
    if name == "some_experts_empty":  # experts 1, 3, 4, 5, 6 receive nothing (incl. first/last non-empty)
        return distinct_random_idx(rng, 21, 2, [0, 2, 7])
    if name == "first_and_last_empty":
        return distinct_random_idx(rng, 17, 3, [1, 2, 3, 4, 5, 6])
    if name == "odd_sizes_block8":  # m = 111, block 8: sizes are not multiples of the block
        return distinct_random_idx(rng, 37, 3, np.arange(e))
    if name == "odd_sizes_block32":  # m = 600, 8 groups: block 32, sizes ~75
        return distinct_random_idx(rng, 300, 2, np.arange(e))
    raise AssertionError(name)


ROUTING_CASES = [
    "random", "all_same_one_expert", "all_same_two_experts", "some_experts_empty",
    "first_and_last_empty", "odd_sizes_block8", "odd_sizes_block32",
]  # fmt: skip


def test_routing_cases_cover_the_block_patterns():
    rng = np.random.default_rng(0)
    e = T_H_I_E["e"]
    for name, bsz in (("odd_sizes_block8", 8), ("odd_sizes_block32", 32)):
        idx = routing_case(name, rng, e)
        sizes = np.bincount(idx.reshape(-1), minlength=e)
        assert block_rows(idx.size, e) == bsz
        assert (sizes % bsz != 0).any()
    sizes = np.bincount(routing_case("some_experts_empty", rng, e).reshape(-1), minlength=e)
    assert (sizes == 0).sum() == 5


def experts_case(name):
    """(x, idx, w, w_gate, w_up, w_down) for one routing case, seeded by its name."""
    rng = np.random.default_rng(seed_of(name))
    h, i, e = T_H_I_E["h"], T_H_I_E["i"], T_H_I_E["e"]
    idx = routing_case(name, rng, e)
    t, k = idx.shape
    x = rng.standard_normal((t, h)).astype(np.float32)
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    return (x, idx, w, *expert_weights(rng, e, h, i))


@pytest.mark.parametrize("name", ROUTING_CASES)
def test_experts_dense_matches_numpy(name):
    x, idx, w, wg, wu, wd = experts_case(name)
    t, h = x.shape
    got = dense_jit(*(jnp.asarray(a) for a in (x, idx, w, wg, wu, wd)))
    ref = np_experts(x, idx, w, wg, wu, wd)
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ROUTING_CASES)
def test_experts_dropless_matches_dense(name, impl):
    x, idx, w, wg, wu, wd = experts_case(name)
    t, h = x.shape
    args = tuple(jnp.asarray(a) for a in (x, idx, w, wg, wu, wd))
    dense = np.asarray(dense_jit(*args))
    drop = np.asarray(dropless_jit(*args, impl=impl))
    assert drop.shape == (t, h)
    assert rel_err(drop, dense) <= 1e-5
    assert rel_err(drop, np_experts(x, idx, w, wg, wu, wd)) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["random", "all_same_one_expert", "some_experts_empty", "odd_sizes_block8"])
def test_experts_dropless_gradients_match_dense(name, impl):
    rng = np.random.default_rng(seed_of(name) + 1)
    h, i, e = T_H_I_E["h"], T_H_I_E["i"], T_H_I_E["e"]
    idx = jnp.asarray(routing_case(name, rng, e))
    t, k = idx.shape
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)), jnp.float32)
    wg, wu, wd = (jnp.asarray(a) for a in expert_weights(rng, e, h, i))
    probe = jnp.asarray(rng.standard_normal((t, h)), jnp.float32)  # random linear functional

    def loss(fn, x, w, wg, wu, wd):
        return jnp.sum(fn(x, idx, w, wg, wu, wd) * probe)

    argnums = (0, 1, 2, 3, 4)  # x, routing weights, w_gate, w_up, w_down
    dropless = lambda *b: experts_dropless(*b, impl=impl)  # noqa: E731
    g_drop = jax.jit(jax.grad(lambda *a: loss(dropless, *a), argnums))(x, w, wg, wu, wd)
    g_dense = jax.jit(jax.grad(lambda *a: loss(experts_dense, *a), argnums))(x, w, wg, wu, wd)
    for name_, a, b in zip(("x", "w", "w_gate", "w_up", "w_down"), g_drop, g_dense):
        assert a.shape == b.shape
        assert rel_err(a, b) <= 1e-5, name_
    # experts that receive no tokens get exactly zero weight gradients
    unused = np.setdiff1d(np.arange(e), np.asarray(idx))
    for a in g_drop[2:]:
        assert np.all(np.asarray(a)[unused] == 0)
    # and the used ones do get gradient (a constant-zero grad would match only trivially)
    used = np.unique(np.asarray(idx))
    assert np.all(np.abs(np.asarray(g_drop[4])[used]).max(axis=(1, 2)) > 0)


# ---------------------------------------------------------------------------------------------
# grouped matmul


GROUP_PATTERNS = {
    "mixed_with_empty": [3, 0, 5, 8],
    "single_group_all_rows": [0, 0, 29, 0],
    "first_group_all_rows": [13, 0, 0],
    "last_group_all_rows": [0, 0, 0, 0, 0, 11],
    "not_block_multiple": [9, 17, 1, 30, 0, 7],
    "one_row_each": [1, 1, 1, 1, 1],
    "block128": [1000, 0, 1047],
    "block64_odd": [130, 200, 67, 300, 0, 100],
    "single_group": [21],
}


def np_grouped_matmul(lhs, rhs, sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, n in enumerate(sizes):
        out[start : start + n] = lhs[start : start + n] @ rhs[g]
        start += n
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pattern", list(GROUP_PATTERNS))
def test_grouped_matmul_matches_numpy(pattern, impl):
    sizes = np.array(GROUP_PATTERNS[pattern], np.int32)
    m, g, k, n = int(sizes.sum()), len(sizes), 12, 5
    rng = np.random.default_rng(m * 31 + g)
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    rhs = rng.standard_normal((g, k, n)).astype(np.float32)
    out = gmm_jit(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), impl)
    assert out.shape == (m, n)
    assert rel_err(out, np_grouped_matmul(lhs, rhs, sizes)) <= 1e-5


@pytest.mark.parametrize("sizes", [[5, 0, 14], [0, 1, 0, 2, 0]], ids=["many_rows", "decode_few_rows"])
def test_grouped_matmul_auto_dispatch(sizes):
    sizes = np.array(sizes, np.int32)
    rng = np.random.default_rng(3)
    lhs = rng.standard_normal((int(sizes.sum()), 4)).astype(np.float32)
    rhs = rng.standard_normal((len(sizes), 4, 2)).astype(np.float32)
    out = grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes))  # impl="auto"
    assert rel_err(out, np_grouped_matmul(lhs, rhs, sizes)) <= 1e-5


def test_group_patterns_exercise_block_sizes():
    bs = {block_rows(sum(p), len(p)) for p in GROUP_PATTERNS.values()}
    assert {8, 64, 128} <= bs


def test_gmm_blocked_under_jit_with_traced_sizes():
    """Group sizes are data (routing), not static: one compiled function serves several patterns."""
    k, n, g, m = 6, 3, 4, 40
    rng = np.random.default_rng(5)
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    rhs = rng.standard_normal((g, k, n)).astype(np.float32)
    f = jax.jit(gmm_blocked)
    for sizes in ([10, 10, 10, 10], [0, 40, 0, 0], [1, 0, 38, 1], [0, 0, 0, 40], [40, 0, 0, 0], [3, 17, 9, 11]):
        out = f(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes, jnp.int32))
        assert rel_err(out, np_grouped_matmul(lhs, rhs, sizes)) <= 1e-5


def test_block_rows_power_of_two_in_range():
    for m in [0, 1, 7, 8, 15, 16, 100, 255, 256, 1000, 4096, 10**6]:
        for g in [1, 2, 3, 8, 64, 256]:
            b = block_rows(m, g)
            assert 8 <= b <= 128 and (b & (b - 1)) == 0, (m, g, b)
            # docstring: padding (at most one block per group) stays <= m/2 unless the block is minimal,
            # and the block is the largest such power of two
            if b > 8:
                assert g * b <= m // 2, (m, g, b)
            if b < 128:
                assert g * 2 * b > m // 2, (m, g, b)


def test_grouped_matmul_unknown_impl():
    lhs, rhs, sizes = jnp.ones((4, 2)), jnp.ones((2, 2, 3)), jnp.array([2, 2])
    with pytest.raises(ValueError, match="bogus_impl"):
        grouped_matmul(lhs, rhs, sizes, "bogus_impl")


# ---------------------------------------------------------------------------------------------
# balance loss


def test_balance_loss_matches_reference_with_padding():
    rng = np.random.default_rng(21)
    b, s, e, k = 3, 10, 8, 2
    scores = np_sigmoid(rng.standard_normal((b, s, e)) * 2).astype(np.float32)
    idx = np.stack([distinct_random_idx(rng, s, k, np.arange(e)) for _ in range(b)])
    mask = np.ones((b, s), bool)
    mask[0, 7:] = False  # padding at the end
    mask[2, :3] = False  # and at the start
    # padding tokens all go to expert 0 with an extreme score: counting them would show
    idx[~mask] = [0, 1]
    scores[~mask] = 0.01
    scores[~mask, 0] = 0.99
    got = float(balance_jit(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(mask), e))
    assert got == pytest.approx(np_balance_loss(scores, idx, mask, e), rel=1e-5)
    unmasked = np_balance_loss(scores, idx, np.ones_like(mask), e)
    assert abs(got - unmasked) > 1e-3  # the mask matters for this data
    assert float(balance_jit(jnp.asarray(scores), jnp.asarray(idx), jnp.ones((b, s), bool), e)) == pytest.approx(
        unmasked, rel=1e-5
    )


def test_balance_loss_softmax_scores():
    rng = np.random.default_rng(22)
    b, s, e, k = 2, 9, 16, 6
    scores = np_softmax(rng.standard_normal((b, s, e))).astype(np.float32)
    idx = np.stack([distinct_random_idx(rng, s, k, np.arange(e)) for _ in range(b)])
    mask = np.ones((b, s), bool)
    mask[1, 5:] = False
    got = float(balance_jit(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(mask), e))
    assert got == pytest.approx(np_balance_loss(scores, idx, mask, e), rel=1e-5)


def test_balance_loss_uniform_is_one():
    e = 4
    idx = np.array([[[0, 1], [2, 3], [0, 1], [2, 3]], [[0, 2], [1, 3], [3, 0], [2, 1]]], np.int32)
    scores = np.full((2, 4, e), 0.5, np.float32)
    got = balance_jit(jnp.asarray(scores), jnp.asarray(idx), jnp.ones((2, 4), bool), e)
    assert float(got) == pytest.approx(1.0, abs=1e-6)
    # padding a 5th token that routes to [0, 1] does not disturb it
    idx5 = np.concatenate([idx, np.array([[[0, 1]], [[0, 1]]], np.int32)], axis=1)
    scores5 = np.concatenate([scores, np.array([[[0.9, 0.9, 0.1, 0.1]]] * 2, np.float32)], axis=1)
    mask5 = np.array([[1, 1, 1, 1, 0]] * 2, bool)
    got5 = balance_jit(jnp.asarray(scores5), jnp.asarray(idx5), jnp.asarray(mask5), e)
    assert float(got5) == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_collapse_is_large():
    """All tokens on the same K experts, scores concentrated there: L = E/K (worst case)."""
    e, k, s = 8, 2, 6
    idx = np.tile(np.array([[[3, 5]]], np.int32), (1, s, 1))
    scores = np.zeros((1, s, e), np.float32)
    scores[..., [3, 5]] = 0.5
    got = float(balance_jit(jnp.asarray(scores), jnp.asarray(idx), jnp.ones((1, s), bool), e))
    assert got == pytest.approx(e / k, rel=1e-6)
    assert got == pytest.approx(np_balance_loss(scores, idx, np.ones((1, s)), e), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The MoE layer


def unbox(tree):
    return nn.meta.unbox(tree)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # V3-style: sigmoid, noaux_tc, 2 groups keep 1
        dict(n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=2),
        dict(
            scoring_func="softmax",
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
            n_group=2,
            topk_group=1,
        ),
        dict(
            scoring_func="softmax",
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            n_shared_experts=0,
        ),
    ],
    ids=["v3", "v3_4groups_2shared", "v2_group_limited", "v2_greedy_noshared"],
)
def test_moe_layer_matches_numpy(variant, impl):
    cfg = moe_cfg(moe_impl=impl, **variant)
    b, s, h = 3, 7, cfg.hidden_size
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    rng = np.random.default_rng(31)
    x = rng.standard_normal((b, s, h)).astype(np.float32)
    mask = np.ones((b, s), bool)
    mask[0, 5:] = False
    mask[2, 2:] = False

    module = MoE(cfg)
    # the variable tree's structure and shapes, filled with our own random values (cheaper than an
    # eager init on CPU, and O(1) weights keep the routing free of near-ties)
    shapes = unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x), jnp.asarray(mask)))
    assert set(shapes) == {"params", BIAS}
    leaves, treedef = jax.tree.flatten(shapes["params"])
    variables = {
        "params": jax.tree.unflatten(
            treedef, [jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(a.shape[-2]), a.dtype) for a in leaves]
        )
    }
    # a non-zero selection bias (sigmoid) so the check covers biased selection + unbiased weights
    bias = np.zeros(e, np.float32)
    if cfg.scoring_func == "sigmoid":
        bias = (rng.standard_normal(e) * 0.3).astype(np.float32)
    variables = {"params": variables["params"], BIAS: {"e_score_correction_bias": jnp.asarray(bias)}}
    y, stats = jax.jit(module.apply)(variables, jnp.asarray(x), jnp.asarray(mask))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    assert p["gate"].shape == (h, e)
    assert p["w_gate"].shape == p["w_up"].shape == (e, h, cfg.moe_intermediate_size)
    assert p["w_down"].shape == (e, cfg.moe_intermediate_size, h)

    # routing, recomputed in numpy from the module's own router weights and bias
    xt = x.reshape(b * s, h).astype(np.float64)
    logits = xt @ p["gate"]
    scores = np_sigmoid(logits) if cfg.scoring_func == "sigmoid" else np_softmax(logits)
    ref = np_route(scores, bias, cfg)
    idx = np.array([experts for experts, _ in ref])
    w = np.array([[weights[j] for j in experts] for experts, weights in ref])
    expected = np_experts(xt, idx, w, p["w_gate"], p["w_up"], p["w_down"])
    if cfg.n_shared_experts:
        sh = p["shared_experts"]
        assert sh["gate_proj"]["kernel"].shape == (h, cfg.n_shared_experts * cfg.moe_intermediate_size)
        hid = np_silu(xt @ sh["gate_proj"]["kernel"]) * (xt @ sh["up_proj"]["kernel"])
        expected = expected + hid @ sh["down_proj"]["kernel"]
    else:
        assert "shared_experts" not in p
    expected = expected.reshape(b, s, h)
    assert y.shape == (b, s, h)
    assert rel_err(y, expected) <= 1e-5

    # the bias really changed some picks (else this test would not cover it)
    if cfg.scoring_func == "sigmoid":
        unbiased = np.array([experts for experts, _ in np_route(scores, np.zeros(e), cfg)])
        assert (unbiased != idx).any()

    # router stats: counts over real tokens only
    real = mask.reshape(-1)
    counts = np.bincount(idx[real].reshape(-1), minlength=e)
    got_counts = np.asarray(stats.expert_counts)
    assert got_counts.shape == (e,)
    np.testing.assert_array_equal(got_counts, counts)
    assert got_counts.sum() == k * real.sum()
    assert float(stats.balance_loss) == pytest.approx(
        np_balance_loss(scores.reshape(b, s, e), idx.reshape(b, s, k), mask, e), rel=1e-5
    )


def test_balance_loss_ignores_all_padding_rows():
    rng = np.random.default_rng(7)
    e, k, s = 8, 2, 6
    scores = rng.uniform(0.05, 1.0, (3, s, e))
    idx = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(s)]) for _ in range(3)])
    mask = np.ones((3, s), bool)
    mask[1] = False  # a row of padding only
    got = float(balance_jit(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(mask), e))
    rows_0_2 = np_balance_loss(scores[[0, 2]], idx[[0, 2]], mask[[0, 2]], e)
    assert got == pytest.approx(rows_0_2, rel=1e-5)
    assert got == pytest.approx(np_balance_loss(scores, idx, mask, e), rel=1e-5)
