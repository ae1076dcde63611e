"""DeepSeek-V4's pieces against numpy restatements of the V4 report's equations (mHC and Sinkhorn-Knopp,
the compressors, the lightning indexer, hash routing with sqrtsoftplus and the SwiGLU clamp), packed
documents, and decoding against the full forward. Whole-model parity with HF transformers:
tests/model/test_transformer.py over the fixtures v4_* (tools/make_hf_reference.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import ModelConfig
from dsjax.infer.generate import generate
from dsjax.model.compressor import compress, window_ends, windows_before
from dsjax.model.hybrid_attention import CSA, HCA, SLIDING, HybridCache, index_scores, indexer_kl, select_entries
from dsjax.model.hyper_connection import HyperConnection, expand, sinkhorn
from dsjax.model.moe import MoE
from dsjax.model.transformer import build_model, init_cache, random_variables
from dsjax.model.v4_block import layer_plan
from dsjax.model.v4_transformer import cache_bytes_per_token

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _same_draws_whatever_the_order():
    """Every test draws from a fresh generator: its data do not depend on which tests ran before."""
    global RNG
    RNG = np.random.default_rng(0)


def tiny(**changes) -> ModelConfig:
    """Every layer type, hash and learned routing, 3 streams, an active SwiGLU clamp, one MTP module."""
    base = dict(
        architecture="v4",
        vocab_size=128,
        hidden_size=64,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        num_hidden_layers=3,
        layer_types=(SLIDING, CSA, HCA),
        mlp_layer_types=("hash_moe", "moe", "moe"),
        compress_rate_csa=4,
        compress_rate_hca=6,
        sliding_window=5,
        hc_mult=3,
        index_topk=3,
        index_n_heads=4,
        index_head_dim=16,
        scoring_func="sqrtsoftplus",
        routed_scaling_factor=1.5,
        swiglu_limit=0.5,
        num_nextn_predict_layers=1,
        initializer_range=0.1,
        compress_rope_theta=1000.0,
        max_position_embeddings=128,
    )
    return ModelConfig(**{**base, **changes})


def variables_with_sinks(cfg, seed=0):
    """random_variables plus non-zero sinks, ape and mHC biases (they are zero at init)."""
    rng = np.random.default_rng(seed)
    v = random_variables(cfg, seed)

    def perturb(path, a):
        if path[-1].key in ("attn_sink", "ape", "base"):
            return rng.normal(0, 0.5, a.shape).astype(a.dtype)
        return a

    return {**v, "params": jax.tree_util.tree_map_with_path(perturb, v["params"])}


# ---------------------------------------------------------------------------------------------
# mHC (V4 §2.2)


def test_sinkhorn_is_doubly_stochastic_and_follows_the_iteration():
    m = jax.nn.softmax(jnp.asarray(RNG.normal(0, 1, (5, 4, 4))), -1) + 1e-6
    out = np.asarray(sinkhorn(m, 20, 1e-6))
    np.testing.assert_allclose(out.sum(-1), 1, atol=1e-3)
    np.testing.assert_allclose(out.sum(-2), 1, atol=1e-6)  # the last step normalises the columns
    ref = np.asarray(m, np.float64)  # restated: columns, then (rows, columns) twice more
    ref = ref / (ref.sum(-2, keepdims=True) + 1e-6)
    for _ in range(2):
        ref = ref / (ref.sum(-1, keepdims=True) + 1e-6)
        ref = ref / (ref.sum(-2, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(sinkhorn(m, 3, 1e-6)), ref, rtol=1e-5)


def test_hyper_connection_matches_numpy():
    cfg = tiny(hc_mult=3, hidden_size=8)
    n, h = 3, 8
    x = RNG.normal(0, 1, (2, 5, n, h)).astype(np.float32)
    module = HyperConnection(cfg)
    params = jax.tree.map(np.asarray, nn.meta.unbox(module.init(jax.random.key(0), x)))
    p = params["params"]
    p["base"] = RNG.normal(0, 0.5, p["base"].shape).astype(np.float32)
    p["scale"] = np.asarray([0.7, 1.3, 2.0], np.float32)
    u, post, comb = module.apply(params, x)

    flat = x.reshape(2, 5, n * h).astype(np.float64)
    flat = flat / np.sqrt((flat**2).mean(-1, keepdims=True) + cfg.rms_norm_eps)
    mix = flat @ p["fn"].T.astype(np.float64)
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    pre = sig(mix[..., :n] * 0.7 + p["base"][:n]) + cfg.hc_eps
    post_ref = 2 * sig(mix[..., n : 2 * n] * 1.3 + p["base"][n : 2 * n])
    logits = (mix[..., 2 * n :] * 2.0 + p["base"][2 * n :]).reshape(2, 5, n, n)
    c = np.exp(logits - logits.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + cfg.hc_eps
    c = c / (c.sum(-2, keepdims=True) + cfg.hc_eps)
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        c = c / (c.sum(-1, keepdims=True) + cfg.hc_eps)
        c = c / (c.sum(-2, keepdims=True) + cfg.hc_eps)
    np.testing.assert_allclose(np.asarray(u), (pre[..., None] * x).sum(-2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(post), post_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(comb), c, rtol=1e-4, atol=1e-6)
    y = RNG.normal(0, 1, (2, 5, h)).astype(np.float32)  # X'_k = post_k y + sum_j comb_jk X_j
    want = post_ref[..., None] * y[..., None, :] + np.einsum("bsjk,bsjd->bskd", c, x)
    np.testing.assert_allclose(np.asarray(expand(jnp.asarray(x), y, post, comb)), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Compressors (V4 §2.3.1 eq. 9-12, §2.3.2 eq. 20-23)


def numpy_entries(kv, gate, ape, m, overlap):
    """Entry w of a sequence starting at position 0: the restated pooling of its complete windows."""
    length, width = kv.shape
    d = width // 2 if overlap else width
    out = []
    for w in range(length // m):
        cur = slice(w * m, w * m + m)
        if overlap:
            kvs = [kv[cur, d:]]
            gates = [gate[cur, d:] + ape[:, d:]]
            if w > 0:
                prev = slice(w * m - m, w * m)
                kvs.insert(0, kv[prev, :d])
                gates.insert(0, gate[prev, :d] + ape[:, :d])
            kvs, gates = np.concatenate(kvs), np.concatenate(gates)
        else:
            kvs, gates = kv[cur], gate[cur] + ape
        p = np.exp(gates - gates.max(0))
        out.append((p / p.sum(0) * kvs).sum(0))
    return np.stack(out)


@pytest.mark.parametrize("overlap", [False, True], ids=["hca", "csa"])
@pytest.mark.parametrize("length", [24, 23], ids=["divides", "ragged"])
def test_compressor_matches_numpy(overlap, length):
    m, d = 4, 6
    width = 2 * d if overlap else d
    kv, gate = (RNG.normal(0, 1, (1, length, width)).astype(np.float32) for _ in range(2))
    ape = RNG.normal(0, 1, (m, width)).astype(np.float32)
    pos = np.arange(length)[None]
    ends = window_ends(jnp.asarray(pos), jnp.ones_like(pos, bool), m, length // m)
    last = np.asarray(ends)  # positions = indices here
    got = compress(kv, gate, ape, *windows_before(ends, m), jnp.asarray(last >= 2 * m - 1), overlap)
    np.testing.assert_allclose(np.asarray(got)[0], numpy_entries(kv[0], gate[0], ape, m, overlap), rtol=1e-5, atol=1e-6)


def test_packed_documents_compress_like_separate_ones():
    """Windows restart at every document's first token: the entries of a packed row are each
    document's own (the windows straddling documents in index order are not formed)."""
    m, d, a = 4, 6, 10  # document A: 10 tokens (2 windows and 2 left over), B: 14
    kv, gate = (RNG.normal(0, 1, (1, 24, 2 * d)).astype(np.float32) for _ in range(2))
    ape = RNG.normal(0, 1, (m, 2 * d)).astype(np.float32)
    pos = np.concatenate([np.arange(a), np.arange(24 - a)])[None]
    ends = window_ends(jnp.asarray(pos), jnp.ones((1, 24), bool), m, 24 // m)
    last = np.take_along_axis(pos, np.maximum(np.asarray(ends), 0), 1)
    got = np.asarray(compress(kv, gate, ape, *windows_before(ends, m), jnp.asarray(last >= 2 * m - 1), True))[0]
    want = np.concatenate(
        [numpy_entries(kv[0, :a], gate[0, :a], ape, m, True), numpy_entries(kv[0, a:], gate[0, a:], ape, m, True)]
    )
    np.testing.assert_array_equal(np.asarray(ends)[0], [3, 7, 13, 17, 21, -1])
    np.testing.assert_allclose(got[:5], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Lightning indexer (V4 §2.3.1 eq. 13-17)


def test_index_scores_and_top_k_match_numpy():
    q, w, k = RNG.normal(0, 1, (2, 3, 4, 8)), RNG.normal(0, 1, (2, 3, 4)), RNG.normal(0, 1, (2, 7, 8))
    want = np.einsum("bqj,bqjn->bqn", w, np.maximum(np.einsum("bqjd,bnd->bqjn", q, k), 0))
    got = np.asarray(index_scores(*(jnp.asarray(a, jnp.float32) for a in (q, w, k))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    scores = np.where(np.arange(7) <= np.arange(3)[:, None] + 1, got, -np.inf)  # query i sees i + 2 entries
    idx, real, top = (np.asarray(a) for a in select_entries(jnp.asarray(scores), 3))
    for b in range(2):
        for i in range(3):
            visible = np.flatnonzero(np.isfinite(scores[b, i]))
            best = visible[np.argsort(-scores[b, i, visible])][:3]
            np.testing.assert_array_equal(np.sort(idx[b, i][real[b, i]]), np.sort(best))
            np.testing.assert_array_equal(top[b, i][real[b, i]], scores[b, i, idx[b, i][real[b, i]]])
    assert real.sum(-1).tolist() == [[2, 3, 3]] * 2  # query 0 sees 2 entries: one pick is not real


# ---------------------------------------------------------------------------------------------
# Hash routing, sqrtsoftplus scores, the SwiGLU clamp (V4 §2.1)


def test_hash_routed_moe_matches_numpy():
    cfg = tiny()
    x = RNG.normal(0, 1, (2, 6, cfg.hidden_size)).astype(np.float32)
    tokens = RNG.integers(0, cfg.vocab_size, (2, 6)).astype(np.int32)
    module = MoE(cfg, hashed=True)
    v = nn.meta.unbox(module.init(jax.random.key(1), x, jnp.ones((2, 6), bool), tokens=tokens))
    v = jax.tree.map(np.asarray, v)
    table = np.stack([RNG.permutation(cfg.n_routed_experts)[:2] for _ in range(cfg.vocab_size)]).astype(np.int32)
    v["selection_bias"]["tid2eid"] = table
    y, stats = module.apply(v, x, jnp.ones((2, 6), bool), tokens=tokens)
    np.testing.assert_array_equal(np.asarray(stats.expert_ids), table[tokens])  # the table's experts, nothing else

    p, lim = v["params"], cfg.swiglu_limit
    flat = x.reshape(-1, cfg.hidden_size).astype(np.float64)
    scores = np.sqrt(np.log1p(np.exp(flat @ p["gate"])))
    idx = table[tokens.reshape(-1)]
    w = np.take_along_axis(scores, idx, 1)
    w = w / w.sum(1, keepdims=True) * cfg.routed_scaling_factor

    def swiglu(h, wg, wu, wd):
        g, u = np.minimum(h @ wg, lim), np.clip(h @ wu, -lim, lim)
        return (g / (1 + np.exp(-g)) * u) @ wd

    want = np.stack(
        [
            sum(w[t, k] * swiglu(flat[t], p["w_gate"][e], p["w_up"][e], p["w_down"][e]) for k, e in enumerate(idx[t]))
            for t in range(12)
        ]
    )
    sh = p["shared_experts"]
    want += swiglu(flat, sh["gate_proj"]["kernel"], sh["up_proj"]["kernel"], sh["down_proj"]["kernel"])
    assert np.mean(np.abs(flat @ p["w_up"][0]) > lim) > 0.05  # the clamp is active
    np.testing.assert_allclose(np.asarray(y).reshape(12, -1), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The whole model


@pytest.fixture(scope="module")
def model():
    cfg = tiny()
    return cfg, variables_with_sinks(cfg)


def test_layer_plan_scans_repeats():
    cfg = tiny()
    plan = layer_plan(cfg)
    assert [(r.start, len(r.kinds), r.repeats) for r in plan] == [(i, 1, 1) for i in range(3)]  # no repeats
    flash = tiny(
        num_hidden_layers=43,
        layer_types=(SLIDING, SLIDING) + (CSA, HCA) * 20 + (CSA,),
        mlp_layer_types=("hash_moe",) * 3 + ("moe",) * 40,
    )
    runs = [(r.start, r.kinds, r.repeats) for r in layer_plan(flash)]
    assert runs == [
        (0, ((SLIDING, "hash_moe"),), 2),
        (2, ((CSA, "hash_moe"),), 1),
        (3, ((HCA, "moe"), (CSA, "moe")), 20),
    ]  # V4-Flash: 43 layers in three modules
    assert sorted(i for r in layer_plan(flash) for i, _, _ in r.layers()) == list(range(43))


def test_scanned_and_unrolled_stacks_agree(model):
    cfg, _ = model
    cfg = cfg.replace(
        num_hidden_layers=5, layer_types=(SLIDING, CSA, HCA, CSA, HCA), mlp_layer_types=("hash_moe",) + ("moe",) * 4
    )
    scanned, unrolled = cfg, cfg.replace(scan_layers=False)
    assert any(r.repeats > 1 for r in layer_plan(scanned))
    v_s = variables_with_sinks(scanned)
    # the same weights, re-laid from the scanned runs into one module per layer
    v_u = jax.tree.map(np.asarray, random_variables(unrolled))
    for run in layer_plan(scanned):
        for i, r, o in run.layers():
            for coll in ("params", "selection_bias"):
                src = v_s[coll]["layers"][run.name][f"block_{o}"]
                v_u[coll]["layers"][f"layer_{i}"]["block_0"] = jax.tree.map(
                    lambda a, r=r: a[r] if run.repeats > 1 else a, src
                )
    for k in v_s["params"]:
        if k != "layers":
            v_u["params"][k] = v_s["params"][k]
    v_u["selection_bias"] = {**v_s["selection_bias"], "layers": v_u["selection_bias"]["layers"]}
    tokens = jnp.asarray(RNG.integers(0, 128, (2, 20)), jnp.int32)
    a = build_model(scanned).apply(v_s, tokens)
    b = build_model(unrolled).apply(v_u, tokens)
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a.router.expert_ids), np.asarray(b.router.expert_ids))


def test_packed_documents_equal_separate_runs(model):
    cfg, v = model
    m = build_model(cfg)
    a, b = RNG.integers(0, 128, 13), RNG.integers(0, 128, 11)
    tokens = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    seg = jnp.asarray(np.repeat([1, 2], [13, 11])[None], jnp.int32)
    packed = m.apply(v, tokens, seg, mtp=False).logits[0]
    alone_a = m.apply(v, jnp.asarray(a[None], jnp.int32), mtp=False).logits[0]
    alone_b = m.apply(v, jnp.asarray(b[None], jnp.int32), mtp=False).logits[0]
    np.testing.assert_allclose(np.asarray(packed), np.concatenate([alone_a, alone_b]), atol=2e-5)


@pytest.mark.parametrize("prefill", [17])
def test_step_decode_equals_full_forward(model, prefill):
    """Prefill, then one token at a time: every layer type's cache (window ring, compressor ring,
    entries, indexer keys) reproduces the full forward's logits at every position."""
    cfg, v = model
    m = build_model(cfg)
    tokens = jnp.asarray(RNG.integers(0, 128, (2, 30)), jnp.int32)
    full = m.apply(v, tokens).logits
    cache = init_cache(cfg, 2, 32)
    pos = jnp.broadcast_to(jnp.arange(prefill), (2, prefill))
    _, normed, cache, _ = m.apply(v, tokens[:, :prefill], pos, cache, method="decode")
    out = [m.apply(v, normed, method="logits")]
    for p in range(prefill, 30):
        _, normed, cache, _ = m.apply(v, tokens[:, p : p + 1], jnp.full((2, 1), p), cache, method="decode")
        out.append(m.apply(v, normed, method="logits"))
    np.testing.assert_allclose(np.asarray(jnp.concatenate(out, 1)), np.asarray(full), atol=2e-5)


def test_generate_with_prompts_of_several_lengths_is_greedy(model):
    """Ragged prompts (right-padded; the padding never enters V4's caches) and MTP speculative
    decoding: each row's tokens are the argmax of a full forward over its own sequence."""
    cfg, v = model
    m = build_model(cfg)
    prompts = [[5, 99, 3], list(range(40, 51)), [7]]
    plain = generate(cfg, v, prompts, 14)
    spec = generate(cfg, v, prompts, 14, speculative=True)
    np.testing.assert_array_equal(plain.tokens, spec.tokens)
    for prompt, row in zip(prompts, plain.tokens):
        seq = jnp.asarray([prompt + list(row)], jnp.int32)
        greedy = np.asarray(jnp.argmax(m.apply(v, seq, mtp=False).logits[0], -1))
        np.testing.assert_array_equal(greedy[len(prompt) - 1 : -1], row)


def test_cache_bytes_per_token():
    """At long context the window and rings are a constant; what grows per token is d / m per
    compressed layer (+ the indexer key's d_I / m for CSA): V4-Flash's sizes, bf16."""
    cfg = tiny(
        num_hidden_layers=4,
        layer_types=(SLIDING, CSA, HCA, CSA),
        mlp_layer_types=("moe",) * 4,
        head_dim=512,
        index_head_dim=128,
        compress_rate_csa=4,
        compress_rate_hca=128,
        sliding_window=128,
        hidden_size=64,
        num_attention_heads=8,
        o_groups=8,
        dtype="bfloat16",
        max_position_embeddings=2**20,
    )
    n = 2**20
    per_token = cache_bytes_per_token(cfg, n)
    growing = 2 * (2 * (512 + 128) / 4 + 512 / 128)  # bytes: 2 CSA + 1 HCA layers
    # bf16 windows (W + slack keys, 4 layers), CSA rings (kv + gate of 2m + slack tokens, compressor and
    # indexer, 2 layers), the HCA ring; int32 window positions
    fixed = 2 * (4 * 144 * 512 + 2 * 2 * 24 * (1024 + 256) + 2 * 272 * 512) + 4 * 4 * 144
    assert per_token == pytest.approx(growing + fixed / n, rel=1e-9)
    assert HybridCache.zeros(cfg, SLIDING, 1, n).entries is None


def test_indexer_kl_matches_numpy_and_trains_the_indexer_alone(model):
    p = RNG.uniform(0, 1, (2, 3, 4, 6))  # [b, heads, queries, entries]
    scores = RNG.normal(0, 1, (2, 4, 6))
    selected = RNG.uniform(0, 1, (2, 4, 6)) < 0.5
    selected[0, 0] = False  # a query that selects nothing contributes 0
    got = np.asarray(indexer_kl(jnp.asarray(p), jnp.asarray(scores), jnp.asarray(selected)))
    for b in range(2):
        for q in range(4):
            s = selected[b, q]
            if not s.any():
                assert got[b, q] == 0
                continue
            t = p[b, :, q].sum(0)[s] / p[b, :, q].sum(0)[s].sum()
            log_q = scores[b, q, s] - np.log(np.exp(scores[b, q, s]).sum())
            np.testing.assert_allclose(got[b, q], (t * (np.log(t) - log_q)).sum(), rtol=1e-5, atol=1e-6)

    cfg, v = model
    m = build_model(cfg)
    tokens = jnp.asarray(RNG.integers(0, 128, (2, 24)), jnp.int32)

    def grads(which):
        def f(params):
            out = m.apply({**v, "params": params}, tokens, mtp=False)
            return out.indexer_loss if which == "kl" else out.logits.mean()

        return jax.tree_util.tree_leaves_with_path(jax.grad(f)(v["params"]))

    def is_indexer(path):
        return any(getattr(k, "key", None) == "indexer" for k in path)

    lm, kl = grads("lm"), grads("kl")
    assert all(not np.any(g) for path, g in lm if is_indexer(path))  # the LM loss never reaches the indexer
    assert all(not np.any(g) for path, g in kl if not is_indexer(path))  # the KL trains it alone
    assert any(np.any(g) for path, g in kl if is_indexer(path))
