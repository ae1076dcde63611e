"""DeepSeek Sparse Attention (V3.2): the lightning indexer's scores and top-k, the sparse attention and
the indexer's two training losses against numpy restatements of the report's equations; the full
model: gradients kept apart (LM loss -> main model, KL -> indexers), decoding from the cache equal to
the full forward, MTP drafting, and a mesh equal to one device. HF parity: tests/hf/test_v32.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax.model.attention as attention
import dsjax.model.indexer as indexer
from dsjax.config import MeshConfig, ModelConfig
from dsjax.infer.generate import generate
from dsjax.model.attention import AttentionMask, latent_attention_reference, sparse_latent_attention
from dsjax.model.indexer import Indexer, dense_indexer_kl, select_top_k, sparse_indexer_kl
from dsjax.model.rope import rope_angles
from dsjax.model.transformer import Transformer, init_cache, random_variables
from dsjax.parallel.mesh import make_mesh
from dsjax.parallel.rules import batch_sharding, logical_shardings

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=256,
    index_topk=6,
    index_n_heads=4,
    index_head_dim=12,
    attention_impl="xla",
    initializer_range=0.3,
)


def rng_arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def packed_segments(b, s):
    """Row 0 one document; row 1 two (the second from s // 3), then padding (segment 0) at the end."""
    seg = np.ones((b, s), np.int32)
    seg[1, s // 3 :] = 2
    seg[1, s - 2 :] = 0
    return seg


def np_visible(seg):
    s = seg.shape[1]
    return np.tril(np.ones((s, s), bool))[None] & (seg[:, :, None] == seg[:, None, :])


def np_softmax(x, valid):
    x = np.where(valid, x, -np.inf)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# -- the indexer (V3.2 §2.1, eq. 1) ------------------------------------------------------------------


def np_indexer(p, x, c_q, positions, cfg):
    """q, k, w and I_ts = sum_j w_tj ReLU(q_tj . k_s), restated from the report and HF's layout in
    float64: LayerNorm on k, half-split RoPE (pairs i, i + d/2) on the first qk_rope_head_dim channels."""
    x, c_q = np.float64(x), np.float64(c_q)
    q = np.einsum("bsl,lnd->bsnd", c_q, np.float64(p["wq_b"]["kernel"]))
    k = x @ np.float64(p["wk"]["kernel"])
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6)
    k = k * np.float64(p["k_norm"]["scale"]) + np.float64(p["k_norm"]["bias"])
    dr = cfg.qk_rope_head_dim
    angle = positions[..., None] * (1.0 / cfg.rope_theta ** (np.arange(0, dr, 2) / dr))  # [b, s, dr/2]

    def rope(v, angle):
        half = dr // 2
        x1, x2, rest = v[..., :half], v[..., half:dr], v[..., dr:]
        c, s = np.cos(angle), np.sin(angle)
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, rest], -1)

    q = rope(q, angle[:, :, None])
    k = rope(k, angle)
    n, d = cfg.index_n_heads, cfg.index_head_dim
    w = x @ np.float64(p["weights_proj"]["kernel"]) / np.sqrt(n) / np.sqrt(d)
    scores = np.einsum("bsn,bsnt->bst", w, np.maximum(np.einsum("bsnd,btd->bsnt", q, k), 0))
    return q, k, w, scores


@pytest.fixture(scope="module")
def indexer_setup():
    b, s = 2, 20
    x, c_q = rng_arrays(0, (b, s, CFG.hidden_size), (b, s, CFG.q_lora_rank))
    seg = packed_segments(b, s)
    positions = np.where(seg == 2, np.arange(s) - s // 3, np.arange(s))
    module = Indexer(CFG)
    variables = module.init(jax.random.key(1), x, c_q, *rope_angles(CFG, jnp.asarray(positions)))
    p = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
    rng = np.random.default_rng(2)
    p["k_norm"] = {"scale": 1 + 0.2 * rng.standard_normal(12), "bias": 0.2 * rng.standard_normal(12)}
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), p)
    q, k, w = module.apply({"params": p}, x, c_q, *rope_angles(CFG, jnp.asarray(positions)))
    return (x, c_q, seg, positions, p), (q, k, w)


def test_indexer_scores_equal_the_formula(indexer_setup):
    (x, c_q, seg, positions, p), (q, k, w) = indexer_setup
    nq, nk, nw, scores = np_indexer(p, x, c_q, positions, CFG)
    np.testing.assert_allclose(q, nq, atol=1e-5)
    np.testing.assert_allclose(k, nk, atol=1e-5)
    np.testing.assert_allclose(w, nw, atol=1e-6)
    np.testing.assert_allclose(indexer.index_scores(q, k, w), scores, atol=1e-5)


@pytest.mark.parametrize("budget", [indexer.SCORE_BUDGET, 8 * 4 * 20])  # one block; blocks of 8, the last padded
def test_top_k_keeps_the_highest_visible_scores(indexer_setup, budget, monkeypatch):
    (x, c_q, seg, positions, p), (q, k, w) = indexer_setup
    monkeypatch.setattr(indexer, "SCORE_BUDGET", budget)
    topk = CFG.index_topk
    got = np.asarray(select_top_k(CFG, q, k, w, AttentionMask.causal(jnp.asarray(seg)), topk))
    _, _, _, scores = np_indexer(p, x, c_q, positions, CFG)
    visible = np_visible(seg)
    for b, i in np.ndindex(*seg.shape):
        row = got[b, i]
        n = min(topk, visible[b, i].sum())
        chosen = row[:n]
        assert (row[n:] == -1).all() and (np.diff(chosen) > 0).all() and visible[b, i, chosen].all()
        best = np.sort(scores[b, i][visible[b, i]])[::-1][:n]  # ties: the same values, whichever keys
        np.testing.assert_allclose(np.sort(scores[b, i, chosen])[::-1], best, atol=1e-5)


# -- sparse attention over the selected slots ------------------------------------------------------------


def np_sparse_attention(q_lat, q_pe, c_kv, k_pe, indices, scale):
    q_lat, q_pe, c_kv, k_pe = (np.float64(a) for a in (q_lat, q_pe, c_kv, k_pe))
    out = np.zeros(q_lat.shape)
    for b, i in np.ndindex(*indices.shape[:2]):
        sel = indices[b, i][indices[b, i] >= 0]
        s = (q_lat[b, i] @ c_kv[b, sel].T + q_pe[b, i] @ k_pe[b, sel].T) * scale  # [h, n]
        e = np.exp(s - s.max(-1, keepdims=True))
        out[b, i] = (e / e.sum(-1, keepdims=True)) @ c_kv[b, sel]
    return out


def latent_inputs(seed, b=2, s=20, t=20, h=3, r=16, dr=8):
    return rng_arrays(seed, (b, s, h, r), (b, s, h, dr), (b, t, r), (b, t, dr))


@pytest.mark.parametrize("block", [attention.SPARSE_QUERY_BLOCK, 8])
def test_sparse_attention_reads_only_the_selected_slots(block, monkeypatch):
    monkeypatch.setattr(attention, "SPARSE_QUERY_BLOCK", block)
    q_lat, q_pe, c_kv, k_pe = latent_inputs(3, t=40)
    rng = np.random.default_rng(4)
    indices = np.full((2, 20, 7), -1, np.int32)
    for b, i in np.ndindex(2, 20):
        n = rng.integers(1, 8)
        indices[b, i, :n] = np.sort(rng.choice(40, n, replace=False))
    got = sparse_latent_attention(q_lat, q_pe, c_kv, k_pe, jnp.asarray(indices), 0.3)
    np.testing.assert_allclose(got, np_sparse_attention(q_lat, q_pe, c_kv, k_pe, indices, 0.3), atol=1e-5)
    # Slots never selected do not matter: change them all.
    unread = np.ones(40, bool)
    unread[indices[indices >= 0]] = False
    c2 = c_kv.copy()
    c2[:, unread] += 100.0
    again = sparse_latent_attention(q_lat, q_pe, c2, k_pe, jnp.asarray(indices), 0.3)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


def test_sparse_attention_equals_dense_when_every_visible_key_is_selected():
    """k >= the context: the top-k hold every visible key, in order, so sparse is dense attention (to
    fp32 rounding: the gathered keys are summed in another order by XLA's dots, ~1 ulp)."""
    q_lat, q_pe, c_kv, k_pe = latent_inputs(5)
    seg = packed_segments(2, 20)
    visible = np_visible(seg)
    indices = np.stack([np.where(v, np.arange(20), 20) for v in visible.reshape(-1, 20)]).reshape(2, 20, 20)
    indices = np.sort(indices, -1)
    indices[indices == 20] = -1
    got = sparse_latent_attention(q_lat, q_pe, c_kv, k_pe, jnp.asarray(indices), 0.3)
    want = latent_attention_reference(q_lat, q_pe, c_kv, k_pe, AttentionMask.causal(jnp.asarray(seg)), 0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-7)


# -- the indexer's losses (V3.2 §2.1.1) ---------------------------------------------------------------


def np_kl(p, logits, valid):
    log_q = np.log(np_softmax(logits, valid))
    return np.where(valid & (p > 0), p * (np.log(np.where(p > 0, p, 1)) - log_q), 0).sum(-1)


def test_dense_warmup_loss_is_kl_to_the_head_averaged_attention(indexer_setup):
    (x, c_q, seg, positions, p), (q, k, w) = indexer_setup
    q_lat, q_pe, c_kv, k_pe = latent_inputs(6)
    got = dense_indexer_kl(CFG, q_lat, q_pe, c_kv, k_pe, 0.3, q, k, w, AttentionMask.causal(jnp.asarray(seg)))
    visible = np_visible(seg)
    logits = np.einsum("bshr,btr->bhst", q_lat, c_kv) + np.einsum("bshd,btd->bhst", q_pe, k_pe)
    attn = np_softmax(np.float64(logits) * 0.3, visible[:, None]).sum(1)  # summed over heads
    target = attn / attn.sum(-1, keepdims=True)  # L1-normalised
    want = np_kl(target, np_indexer(p, x, c_q, positions, CFG)[3], visible)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert want.mean() > 0.1  # not trivially 0 (a query seeing one key has KL 0)


def test_sparse_loss_is_kl_on_the_selected_set_only(indexer_setup):
    (x, c_q, seg, positions, p), (q, k, w) = indexer_setup
    q_lat, q_pe, c_kv, k_pe = latent_inputs(7)
    indices = np.asarray(select_top_k(CFG, q, k, w, AttentionMask.causal(jnp.asarray(seg)), 4))
    got = sparse_indexer_kl(CFG, q_lat, q_pe, c_kv, k_pe, 0.3, q, k, w, jnp.asarray(indices))
    scores = np_indexer(p, x, c_q, positions, CFG)[3]
    want = np.zeros(seg.shape)
    for b, i in np.ndindex(*seg.shape):
        sel = indices[b, i][indices[b, i] >= 0]
        logits = np.einsum("hr,nr->hn", q_lat[b, i], c_kv[b, sel]) + np.einsum("hd,nd->hn", q_pe[b, i], k_pe[b, sel])
        attn = np_softmax(np.float64(logits) * 0.3, np.ones(len(sel), bool)).sum(0)
        want[b, i] = np_kl(attn / attn.sum(), scores[b, i, sel], np.ones(len(sel), bool))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# -- the model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_setup():
    variables = random_variables(CFG, seed=3)
    tokens = np.random.default_rng(8).integers(0, CFG.vocab_size, (2, 16)).astype(np.int32)
    return variables, jnp.asarray(tokens)


@pytest.mark.parametrize("warmup", [False, True])
def test_lm_loss_trains_the_main_model_and_the_kl_only_the_indexers(model_setup, warmup):
    variables, tokens = model_setup
    cfg = CFG.replace(indexer_warmup=warmup)
    model = Transformer(cfg)

    def grads(which):
        def f(params):
            out = model.apply({**variables, "params": params}, tokens)
            return out.indexer_loss if which == "kl" else jax.nn.log_softmax(out.logits).mean()

        return jax.tree_util.tree_leaves_with_path(jax.grad(f)(variables["params"]))

    def is_indexer(path):
        return "indexer" in jax.tree_util.keystr(path)

    kl, lm = grads("kl"), grads("lm")
    assert all(not np.any(g) for path, g in kl if not is_indexer(path))
    assert all(np.any(g) for path, g in kl if is_indexer(path))
    assert all(not np.any(g) for path, g in lm if is_indexer(path))


def test_selection_changes_the_output(model_setup):
    variables, tokens = model_setup
    sparse = Transformer(CFG).apply(variables, tokens)
    dense = Transformer(CFG.replace(index_topk=16)).apply(variables, tokens)  # k >= 16 tokens: dense
    assert float(jnp.abs(sparse.logits - dense.logits).max()) > 1e-2


def test_decoding_from_the_cache_equals_the_full_forward(model_setup):
    """Prefill 5 tokens, then one token a step: each step's indexer scores the cached keys and the
    attention reads only the top-k latents (k = 6 < up to 16 cached), as the full forward does."""
    variables, tokens = model_setup
    model = Transformer(CFG)
    full = model.apply(variables, tokens).logits
    cache = init_cache(CFG, 2, 16)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    _, normed, cache, _ = model.apply(variables, tokens[:, :5], positions, cache, method="decode")
    got = [model.apply(variables, normed, method="logits")]
    for i in range(5, 16):
        pos = jnp.full((2, 1), i)
        _, normed, cache, _ = model.apply(variables, tokens[:, i : i + 1], pos, cache, method="decode")
        got.append(model.apply(variables, normed, method="logits"))
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), full, atol=2e-4)
    assert cache["moe_layers"].index_k.shape == (2, 2, 16, CFG.index_head_dim)


def test_speculative_decoding_keeps_working(model_setup):
    variables, tokens = model_setup
    prompts = [list(np.asarray(tokens[0, :4])), list(np.asarray(tokens[1, :9]))]
    plain = generate(CFG, variables, prompts, max_new_tokens=12)
    drafted = generate(CFG, variables, prompts, max_new_tokens=12, speculative=True)
    np.testing.assert_array_equal(drafted.tokens, plain.tokens)
    # Greedy tokens are the full forward's argmax: the cache path selects what the forward selects.
    seq = jnp.asarray(np.concatenate([np.asarray(tokens[1, :9]), np.asarray(plain.tokens[1])])[None])
    argmax = np.asarray(Transformer(CFG).apply(variables, seq).logits.argmax(-1))[0, 8:-1]
    np.testing.assert_array_equal(argmax, np.asarray(plain.tokens[1]))


@pytest.mark.parametrize("shape", [(2, 2, 1, 2), (1, 2, 2, 2)], ids=["2x2x1x2", "1x2x2x2"])
def test_a_mesh_computes_what_one_device_computes(model_setup, shape):
    variables, tokens = model_setup
    tokens = jnp.tile(tokens, (2, 1))  # 4 rows over the batch axes
    model = Transformer(CFG)

    def loss(params):
        out = model.apply({**variables, "params": params}, tokens)
        return jax.nn.log_softmax(out.logits).mean() + out.indexer_loss

    want = jax.jit(jax.value_and_grad(loss))(variables["params"])
    mesh = make_mesh(MeshConfig(*shape))
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)
    params = jax.device_put(variables["params"], logical_shardings(mesh, boxed["params"]))
    tokens = jax.device_put(tokens, batch_sharding(mesh))
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(loss))(params)
    assert got[1]["moe_layers"]["layers"]["self_attn"]["indexer"]["wq_b"]["kernel"].sharding.spec != ()
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got, want)
    assert max(jax.tree.leaves(diffs)) <= 1e-5


def test_the_sparse_kernel_trains_the_model_as_the_reference_does(model_setup):
    """attention_impl interpret: the Pallas sparse MLA kernel (forward and backward) in the model."""
    variables, tokens = model_setup

    def loss_and_grads(impl):
        model = Transformer(CFG.replace(attention_impl=impl))

        def f(params):
            out = model.apply({**variables, "params": params}, tokens)
            return jax.nn.log_softmax(out.logits).mean() + out.indexer_loss

        return jax.jit(jax.value_and_grad(f))(variables["params"])

    got, want = loss_and_grads("interpret"), loss_and_grads("xla")
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got, want)
    assert max(jax.tree.leaves(diffs)) <= 1e-5
