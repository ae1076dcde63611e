"""Decoding tests: latent-cache decode == full forward, greedy == HF transformers' greedy, cache size,
speculative (MTP) greedy == plain greedy, sampling."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax.model.fp8 as fp8_mod
from dsjax.cli.generate import main
from dsjax.config import ModelConfig, load_config
from dsjax.hf import from_hf_config
from dsjax.infer import generate
from dsjax.model import Transformer, echoing_variables, init_cache, random_variables
from dsjax.model.mla import LatentCache, mla_attention, mla_attention_absorbed
from pallas_kernels.quant import dequantize_blocks, pad_to

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TINY = ROOT / "configs" / "tiny.yaml"


def test_absorbed_attention_equals_expanded():
    """(q_nope W_UK).c_kv = q_nope.(c_kv W_UK) and (p.c_kv) W_UV = p.(c_kv W_UV): DeepSeek-V2 §2.1.2."""
    b, s, t, h, dn, dr, dv, r = 2, 3, 7, 4, 8, 4, 6, 16
    ks = jax.random.split(jax.random.key(0), 6)
    q_nope, q_pe = jax.random.normal(ks[0], (b, s, h, dn)), jax.random.normal(ks[1], (b, s, h, dr))
    c_kv, k_pe = jax.random.normal(ks[2], (b, t, r)), jax.random.normal(ks[3], (b, t, dr))
    w_uk, w_uv = jax.random.normal(ks[4], (r, h, dn)), jax.random.normal(ks[5], (r, h, dv))
    mask = jnp.arange(t) <= jnp.asarray([[2, 3, 4], [4, 5, 6]])[..., None]
    k_nope, v = jnp.einsum("btr,rhd->bthd", c_kv, w_uk), jnp.einsum("btr,rhd->bthd", c_kv, w_uv)
    want = mla_attention(q_nope, q_pe, k_nope, k_pe, v, mask, 0.3)
    got = mla_attention_absorbed(q_nope, q_pe, LatentCache(c_kv, k_pe), w_uk, w_uv, mask, 0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def decoded_and_full(cfg, variables, ref):
    """Right-padded prompts of 3, 11 and 17 tokens, prefilled together, then one token per row per
    step (each row at its own position): (every decoded position's logits, the full forward's) [N, V]."""
    model = Transformer(cfg)
    seqs = ref["input_ids"][[0, 1, 0]]  # [3, 24]
    lens = np.array([3, 11, 17])
    full = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(seqs)).logits)

    @jax.jit
    def decode(variables, tokens, positions, cache):
        _, normed, cache, _ = model.apply(variables, tokens, positions, cache, method="decode")
        return model.apply(variables, normed, method="logits"), cache

    s, steps = lens.max(), 24 - lens.min()
    prompt = np.where(np.arange(s) < lens[:, None], seqs[:, :s], 0)
    cache = init_cache(cfg, 3, s + steps)
    logits, cache = decode(variables, prompt, np.broadcast_to(np.arange(s), prompt.shape), cache)
    got = [np.asarray(logits[i, :n]) for i, n in enumerate(lens)]
    want = [full[i, :n] for i, n in enumerate(lens)]
    for t in range(steps):
        pos = lens + t  # each row's next position
        logits, cache = decode(variables, seqs[np.arange(3), np.minimum(pos, 23)][:, None], pos[:, None], cache)
        live = pos < 24
        got.append(np.asarray(logits[live, 0]))
        want.append(full[live, pos[live]])
    return np.concatenate(got), np.concatenate(want)


@pytest.mark.parametrize("name,scan", [("v3_qlora_groups", True), ("v3_deep_dense2", False)])
def test_decode_logits_match_full_forward(name, scan, load_hf_fixture):
    """Every decoded logit equals the full forward's (YaRN on)."""
    cfg, variables, ref = load_hf_fixture(name, scan_layers=scan)
    assert cfg.rope_scaling is not None
    got, want = decoded_and_full(cfg, variables, ref)
    err = np.abs(got - want).max()
    print(f"\n{name} scan={scan}: max |decode - forward| = {err:.2e}")
    assert err <= 1e-4, err


def test_fp8_weights_decode_matches_full_forward(capsys, monkeypatch, load_hf_fixture):
    """FP8 inference (weights quantized on load). Decoding applies W_UKV dequantized in absorbed form
    where the forward runs kv_b_proj's FP8 GEMM on e4m3 c_kv tiles (as DeepSeek's inference code
    does), so the two differ at FP8 precision (0.076 relative on this noise-amplifying random model,
    as much as FP8 vs fp32). With the projections' activations left unquantized, that one
    difference removed, every decoded logit equals the forward's to 1e-4. The CLI runs unpatched."""
    cfg, variables, ref = load_hf_fixture("v3_qlora_groups", fp8_weights=True)
    assert variables["params"]["moe_layers"]["layers"]["mlp"]["w_up"].dtype == jnp.float8_e4m3fn

    def unquantized_x(x, qw, sw, impl, pow2=False):  # x [M, K] times the padded stored blocks [Kp, Np]
        return (pad_to(x, 1) @ dequantize_blocks(qw, sw)).astype(x.dtype)

    monkeypatch.setattr(fp8_mod, "_x_times_blocks", unquantized_x)
    got, want = decoded_and_full(cfg, variables, ref)
    err = np.abs(got - want).max()
    print(f"\nfp8 weights, unquantized activations: max |decode - forward| = {err:.2e}")
    assert err <= 1e-4, err
    monkeypatch.undo()

    prompt = ref["greedy_ids"][0, : int(ref["greedy_prompt_len"])]
    capsys.readouterr()
    main(
        [
            "--checkpoint",
            str(FIXTURES / "v3_qlora_groups"),
            "--prompt-ids",
            ",".join(map(str, prompt)),
            "--max-new-tokens",
            "3",
            "--fp8-weights",
        ]
    )
    out = capsys.readouterr().out.strip().split(",")
    assert len(out) == 3 and all(0 <= int(t) < cfg.vocab_size for t in out)


def test_cache_holds_only_the_latent():
    """Bytes per token per layer, read from the cache arrays: (kv_lora_rank + qk_rope_head_dim) x dtype."""
    for cfg in (from_hf_config(FIXTURES / "v3_qlora_groups"), load_config(TINY, ["model.dtype=bfloat16"]).model):
        b, t = 3, 5
        cache = init_cache(cfg, b, t, with_mtp=True)
        layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        nbytes = sum(a.nbytes for a in jax.tree.leaves(cache))
        assert nbytes / (b * t * layers) == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(cfg.dtype).itemsize
    v3 = ModelConfig(dtype="bfloat16")  # DeepSeek-V3 dims: 576 values vs 128 heads x (192 + 128)
    latent = v3.kv_lora_rank + v3.qk_rope_head_dim
    expanded = v3.num_attention_heads * (v3.qk_head_dim + v3.v_head_dim)
    assert (latent, expanded) == (576, 40960) and round(100 * latent / expanded, 1) == 1.4


def test_greedy_matches_hf_transformers(hf_fixture, load_hf_fixture):
    cfg, variables, ref = load_hf_fixture(hf_fixture)
    if "greedy_ids" not in ref:
        pytest.fail("fixture has no greedy_ids: run tools/make_hf_reference.py")
    want, p = ref["greedy_ids"], int(ref["greedy_prompt_len"])
    out = generate(cfg, variables, [list(r[:p]) for r in want], want.shape[1] - p)
    np.testing.assert_array_equal(out.tokens, want[:, p:])


# ---------------------------------------------------------------------------------------------
# Speculative decoding and sampling on random tiny models (configs/tiny.yaml).

PROMPTS = [[256, 5, 99], [256, *range(40, 48)], [256], [256, 7, 7, 7, 200, 1]]  # 3, 9, 1, 6 tokens
NEW = 24


@pytest.fixture(scope="module")
def tiny():
    """Tiny config with 2 MTP modules; the 1-module model is the same with mtp_1 dropped. Plain greedy
    (one compile: the main model does not depend on the MTP modules) of random and rigged weights."""
    cfg2 = load_config(TINY, ["model.num_nextn_predict_layers=2"]).model
    cfg1 = cfg2.replace(num_nextn_predict_layers=1)
    v2 = random_variables(cfg2)
    models = {"random": v2, "rigged": echoing_variables(v2, 30.0)}  # rigged: drafts partly right

    def drop_mtp1(v):
        return {c: {k: x for k, x in d.items() if k != "mtp_1"} for c, d in v.items()}

    plain = {}
    for kind, v in models.items():
        plain[kind, None] = full = generate(cfg1, drop_mtp1(v), PROMPTS, NEW).tokens
        eos = int(full[1, 4])  # row 1 stops at its 5th token at the latest
        plain[kind, eos] = generate(cfg1, drop_mtp1(v), PROMPTS, NEW, eos_id=eos).tokens
        for row, cut in zip(full, plain[kind, eos]):  # = the run without EOS, cut after the first EOS
            n = list(row).index(eos) + 1 if eos in row else NEW
            np.testing.assert_array_equal(cut, np.where(np.arange(NEW) < n, row, -1))
    return {1: cfg1, 2: cfg2}, {1: {k: drop_mtp1(v) for k, v in models.items()}, 2: models}, plain


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_greedy_equals_greedy(tiny, depth):
    cfgs, models, plain = tiny
    acceptance = {}
    for (kind, eos), want in plain.items():
        out = generate(cfgs[depth], models[depth][kind], PROMPTS, NEW, eos_id=eos, speculative=True)
        np.testing.assert_array_equal(out.tokens, want, err_msg=f"{kind} model, eos {eos}")
        assert (out.lengths < NEW).any() == (eos is not None)
        acceptance[kind] = out.stats["acceptance"]
    assert 0.3 < acceptance["rigged"] < 1.0, acceptance  # both accepted and rejected drafts occurred
    print(f"depth {depth} acceptance: {acceptance}")


def test_sampling(tiny):
    cfgs, models, plain = tiny
    cfg, v = cfgs[1], models[1]["random"]
    greedy = plain["random", None]

    def run(**kw):
        return generate(cfg, v, PROMPTS, NEW, **kw).tokens

    np.testing.assert_array_equal(run(temperature=1.0, top_k=1, rng=jax.random.key(1)), greedy)
    np.testing.assert_array_equal(run(temperature=1.0, top_p=1e-6, rng=jax.random.key(1)), greedy)
    key = jax.random.key(7)
    a = run(temperature=2.0, top_k=5, rng=key)
    np.testing.assert_array_equal(run(temperature=2.0, top_k=5, rng=key), a)  # the caller's key is not consumed
    assert (run(temperature=2.0, top_k=5, rng=jax.random.key(8)) != a).any()
    assert (a != greedy).any()
    # Every sampled token is among the 5 most likely after its prefix (full forward over the result).
    lens = np.array([len(p) for p in PROMPTS])
    seqs = np.zeros((len(PROMPTS), lens.max() + NEW), np.int32)
    for i, p in enumerate(PROMPTS):
        seqs[i, : lens[i] + NEW] = [*p, *a[i]]
    logits = np.asarray(jax.jit(Transformer(cfg).apply)(v, jnp.asarray(seqs)).logits)
    top5 = np.argsort(-logits, axis=-1)[..., :5]
    for i, n in enumerate(lens):
        for j in range(NEW):
            assert a[i, j] in top5[i, n + j - 1], (i, j)


def test_stats_keep_compilation_out_of_the_decode_time(tiny):
    """Prefill and decode are compiled before the clock starts, and the compilation is timed on its
    own: a second call with the same shapes compiles nothing."""
    cfgs, models, _ = tiny
    first, again = (generate(cfgs[1], models[1]["random"], PROMPTS, 11).stats for _ in range(2))
    assert again["compile_s"] < min(first["compile_s"], 0.05)
