"""The serving engine (dsjax.infer.engine) and its paged latent cache: greedy outputs equal
``generate``'s, alone and under continuous batching; prefix pages are shared and freed when their
last user ends; forks copy on write; chunked prefill keeps decodes running; no page leaks."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import load_config
from dsjax.infer import generate
from dsjax.infer.engine import Engine, SamplingParams
from dsjax.infer.pages import OutOfPages, PageAllocator
from dsjax.model import Transformer, init_cache, random_variables
from dsjax.model.attention import AttentionMask, latent_attention_reference, paged_latent_reference
from dsjax.model.mla import PagedLatentCache
from dsjax.train.data import ByteTokenizer

ROOT = Path(__file__).resolve().parents[2]
CFG = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_nextn_predict_layers=0"]).model
VARIABLES = random_variables(CFG, seed=3)
TOKENIZER = ByteTokenizer()


def prompt(seed: int, length: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, length)]


def engine(**kw) -> Engine:
    kw = {"max_batch": 4, "page_size": 8, "max_model_len": 128, "prefill_chunk": 16, **kw}
    return Engine(CFG, VARIABLES, TOKENIZER, **kw)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def reference(p: list[int], max_tokens: int) -> list[int]:
    out = generate(CFG, VARIABLES, [p], max_tokens)
    return out.tokens[0, : out.lengths[0]].tolist()


def tokens_of(outputs) -> dict[int, list[int]]:
    """Each sequence's tokens, from a request's outputs."""
    seqs: dict[int, list[int]] = {}
    for out in outputs:
        seqs.setdefault(out.index, []).extend(out.token_ids)
    return seqs


def assert_all_pages_free(e: Engine):
    assert e.allocator.num_free == e.allocator.num_pages and not any(e.allocator.refs)


# -- the paged cache --------------------------------------------------------------------------


def test_paged_cache_writes_and_reads_the_slots_a_row_cache_would():
    """Entries written through a shuffled page table, read back gathered, equal a row-per-sequence
    cache written at the same positions (numpy); writes at -1 or past the table are dropped; the
    attention over pages equals the row cache's."""
    rng = np.random.default_rng(0)
    b, size, n, pool, r, dr = 3, 4, 5, 20, 8, 4
    table = rng.permutation(pool)[: b * n].reshape(b, n).astype(np.int32)
    cache = PagedLatentCache(jnp.zeros((pool, size, r)), jnp.zeros((pool, size, dr)), jnp.asarray(table))
    rows_c, rows_k = np.zeros((b, n * size, r)), np.zeros((b, n * size, dr))
    for step in range(3):
        positions = rng.integers(-1, n * size + 3, (b, 6))
        c, k = rng.standard_normal((b, 6, r)), rng.standard_normal((b, 6, dr))
        cache = cache.write(jnp.asarray(positions), jnp.asarray(c, jnp.float32), jnp.asarray(k, jnp.float32))
        for i in range(b):
            for j, p in enumerate(positions[i]):
                if 0 <= p < n * size:
                    rows_c[i, p], rows_k[i, p] = c[i, j], k[i, j]
    gathered = np.asarray(cache.c_kv)[table].reshape(b, n * size, r)
    np.testing.assert_allclose(gathered, rows_c, atol=1e-6)
    untouched = np.setdiff1d(np.arange(pool), table)
    assert not np.asarray(cache.c_kv)[untouched].any()
    q_lat, q_pe = (jnp.asarray(rng.standard_normal((b, 2, 3, d)), jnp.float32) for d in (r, dr))
    mask = AttentionMask.cache(jnp.asarray(rng.integers(0, n * size, (b, 2))))
    want = latent_attention_reference(q_lat, q_pe, jnp.asarray(rows_c), jnp.asarray(rows_k), mask, 0.3)
    got = paged_latent_reference(q_lat, q_pe, cache.c_kv, cache.k_pe, cache.pages, mask, 0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_page_allocator_counts_references_and_indexes_whole_prefixes():
    a = PageAllocator(6, 2)
    p = a.allocate(3)
    assert p == [0, 1, 2] and a.num_free == 3
    with pytest.raises(OutOfPages):
        a.allocate(4)
    assert a.num_free == 3  # nothing taken by the failed allocation
    a.register([5, 6, 7, 8, 9], p, 2)  # two full pages
    assert a.lookup([5, 6, 7, 8, 1, 1], 3) == [0, 1] and a.refs[:3] == [2, 2, 1]
    assert a.lookup([5, 6, 0, 0], 2) == [0] and a.lookup([7, 8], 1) == []  # a key names the whole prefix
    a.release([0, 1, 0])
    a.release(p)
    assert a.num_free == 6 and a.lookup([5, 6, 7, 8], 2) == []  # freed pages leave the index
    with pytest.raises(ValueError, match="released more often"):
        a.release([0])


# -- the engine against generate --------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 8, 9, 40])
def test_greedy_request_alone_equals_generate(length):
    """Prompts within one page, ending on a page boundary, and spanning several prefill chunks."""
    e = engine()
    rid = e.add_request(prompt(length, length), greedy(12))
    out = e.run()[rid]
    assert tokens_of(out)[0] == reference(prompt(length, length), 12)
    assert out[-1].finished and out[-1].finish_reason == "length" and out[-1].completion_tokens == 12
    assert_all_pages_free(e)


def test_sixteen_concurrent_requests_of_different_lengths_equal_generate():
    """16 requests through 8 decode rows: requests join as others finish (continuous batching);
    each greedy output equals generate's for that request alone; every page is free afterwards."""
    e = engine(max_batch=8, num_pages=80)
    specs = [(i, 3 + 5 * i % 37, 4 + (7 * i) % 13) for i in range(16)]
    ids = {e.add_request(prompt(i, n), greedy(m)): (i, n, m) for i, n, m in specs}
    results = e.run()
    batch = generate(CFG, VARIABLES, [prompt(i, n) for i, n, _ in specs], max(m for *_, m in specs))
    for rid, (i, n, m) in ids.items():  # generate's rows decode independently: row i's first m tokens
        assert tokens_of(results[rid])[0] == batch.tokens[i, :m].tolist(), (i, n, m)
    assert e.stats["decode_steps"] < sum(m for _, _, m in specs) / 2  # rows decoded together
    assert_all_pages_free(e)


def test_prefix_pages_are_shared_and_freed_when_their_last_user_ends():
    e = engine()
    base = prompt(1, 40)
    a = e.add_request(base, greedy(6))
    outputs = {a: []}
    while e.prefilling or e.waiting or e._inbox:
        outputs[a] += e.step()
    b = e.add_request(base + prompt(2, 9), greedy(20))
    outputs[b] = []
    while not any(o.finished for o in outputs[a]):
        for o in e.step():
            outputs[o.request_id].append(o)
    assert e.stats["prefix_tokens_shared"] == 40  # a's five full prompt pages
    b_seq = next(s for s in e.slots if s is not None and s.request.id == b)
    shared = b_seq.pages[:5]
    assert all(e.allocator.refs[p] == 1 for p in shared)  # a ended: b still holds them
    for o in e.run().get(b, []):
        outputs[b].append(o)
    assert tokens_of(outputs[a])[0] == reference(base, 6)
    assert tokens_of(outputs[b])[0] == reference(base + prompt(2, 9), 20)
    assert all(e.allocator.refs[p] == 0 for p in shared)
    assert_all_pages_free(e)


@pytest.mark.parametrize("length", [13, 16])
def test_n_completions_share_the_prompt_and_copy_on_write(length):
    """n = 3 greedy completions: all equal generate's; the partial last prompt page (13 tokens,
    pages of 8) is copied by two of them before their first write, a full one (16) never."""
    e = engine()
    rid = e.add_request(prompt(5, length), greedy(10, n=3))
    seqs = tokens_of(e.run()[rid])
    want = reference(prompt(5, length), 10)
    assert [seqs[i] for i in range(3)] == [want] * 3
    assert e.stats["pages_copied"] == (2 if length % 8 else 0)
    assert_all_pages_free(e)


def test_seeded_sampling_does_not_depend_on_the_other_requests():
    """A seeded sampled request gives the same tokens alone and among other requests; its n
    sequences differ from each other; top_k=1 is greedy."""
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=7, n=2, ignore_eos=True)
    alone = tokens_of(_run_one(engine(), prompt(9, 11), params))
    e = engine()
    for i in range(3):
        e.add_request(prompt(20 + i, 5 + i), SamplingParams(max_tokens=6, seed=i))
    rid = e.add_request(prompt(9, 11), params)
    together = tokens_of(e.run()[rid])
    assert together == alone and alone[0] != alone[1]
    top1 = _run_one(engine(), prompt(9, 11), SamplingParams(max_tokens=10, top_k=1, seed=3, ignore_eos=True))
    assert tokens_of(top1)[0] == reference(prompt(9, 11), 10)


def _run_one(e, p, params):
    rid = e.add_request(p, params)
    return e.run()[rid]


def test_chunked_prefill_keeps_running_requests_decoding():
    """A 120-token prompt (8 chunks of 16) arrives while a request decodes: that request gets a
    token at every step of the long prefill."""
    e = engine(max_model_len=160)
    short = e.add_request(prompt(1, 4), greedy(30))
    e.step()
    long = e.add_request(prompt(2, 120), greedy(4))
    per_step = []
    while e.has_work():
        outs = e.step()
        if any(o.request_id == long for o in outs) or e.prefilling:
            per_step.append(sum(len(o.token_ids) for o in outs if o.request_id == short))
    assert len(per_step) >= 8 and all(k == 1 for k in per_step[:7])


def test_stop_strings_end_the_text_and_streamed_deltas_add_up():
    """A stop string taken from the middle of the greedy text ends it there (not included); the
    text deltas streamed step by step concatenate to the final text."""
    p = prompt(4, 10)
    full = TOKENIZER.decode(reference(p, 24))
    stop = full[10:13]
    cut = full.find(stop)
    e = engine()
    streamed = []
    rid = e.add_request(p, greedy(24, stop=(stop, "\x00never")), on_output=streamed.append)
    out = e.run()[rid]
    assert "".join(o.text for o in streamed) == "".join(o.text for o in out) == full[:cut]
    assert out[-1].finish_reason == "stop" and out[-1].completion_tokens < 24
    assert_all_pages_free(e)


def test_abort_ends_a_request_and_frees_its_pages():
    e = engine()
    rid = e.add_request(prompt(3, 20), greedy(50))
    for _ in range(4):
        e.step()
    e.abort(rid)
    outs = e.step()
    assert [o.finish_reason for o in outs if o.request_id == rid] == ["abort"]
    assert not e.has_work()
    assert_all_pages_free(e)


def test_bad_requests_are_refused_before_they_run():
    e = engine(max_model_len=32)
    for bad, match in [
        (lambda: e.add_request([], greedy(4)), "prompt is empty"),
        (lambda: e.add_request(prompt(1, 30), greedy(4)), "exceeds the context of 32"),
        (lambda: e.add_request([CFG.vocab_size], greedy(4)), "outside the vocabulary"),
        (lambda: e.add_request(prompt(1, 4), greedy(4, n=9)), "at most max_batch=4"),
        (lambda: SamplingParams(top_p=0), "top_p=0"),
        (lambda: SamplingParams(max_tokens=0), "max_tokens=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()
    assert not e.has_work()


def test_a_dsa_model_is_refused_with_the_way_to_decode_it():
    with pytest.raises(ValueError, match="decode DeepSeek-V3.2 models with dsjax.infer.generate"):
        Engine(CFG.replace(index_topk=4, index_n_heads=2, index_head_dim=16), VARIABLES, TOKENIZER, max_batch=4)


def test_a_v4_model_is_refused_with_the_way_to_decode_it():
    v4 = load_config(ROOT / "configs" / "tiny_v4.yaml").model
    with pytest.raises(ValueError, match="DeepSeek-V4 keeps per-layer-type caches"):
        Engine(v4, VARIABLES, TOKENIZER, max_batch=4)


def test_requests_wait_for_pages_and_run_when_they_free():
    """A pool of 6 pages of 8 holds one request of 40 tokens at a time: the second waits, then
    runs; both equal generate."""
    e = engine(num_pages=6)
    a, b = (e.add_request(prompt(i, 20), greedy(20)) for i in (1, 2))
    e.step()
    assert len(e.waiting) == 1
    results = e.run()
    assert tokens_of(results[a])[0] == reference(prompt(1, 20), 20)
    assert tokens_of(results[b])[0] == reference(prompt(2, 20), 20)
    assert_all_pages_free(e)


def test_forked_sequences_each_cache_their_own_tokens():
    """n = 3 sampled completions of a 13-token prompt (its last page partial, shared, then copied on
    write): after some steps each sequence's pages hold the latents of its own tokens, equal to a
    row cache built by the model from those tokens alone."""
    e = engine()
    e.add_request(prompt(6, 13), SamplingParams(max_tokens=30, temperature=1.0, seed=11, n=3, ignore_eos=True))
    for _ in range(8):
        e.step()
    live = [s for s in e.slots if s is not None]
    assert len(live) == 3 and len({tuple(s.tokens) for s in live}) == 3
    model = Transformer(CFG)
    for seq in live:
        t = seq.cached
        tokens = jnp.asarray([seq.tokens[:t]])
        _, _, row_cache, _ = model.apply(VARIABLES, tokens, jnp.arange(t)[None], init_cache(CFG, 1, t), method="decode")
        for name, pool in e.cache.items():
            gathered = np.asarray(pool.c_kv)[:, seq.pages].reshape(pool.c_kv.shape[0], -1, pool.c_kv.shape[-1])[:, :t]
            np.testing.assert_allclose(gathered, np.asarray(row_cache[name].c_kv)[:, 0], atol=1e-4)


def test_engine_with_the_paged_kernel_equals_generate():
    """attention_impl=interpret: the paged decode kernel (Pallas interpreter) reads the pages
    through the table; greedy output equals generate's with the jnp reference."""
    import dataclasses

    cfg = dataclasses.replace(CFG, attention_impl="interpret")
    e = Engine(cfg, VARIABLES, TOKENIZER, max_batch=2, page_size=8, max_model_len=64, prefill_chunk=16)
    ids = [e.add_request(prompt(i, 5 + 9 * i), greedy(6)) for i in range(2)]
    results = e.run()
    for i, rid in enumerate(ids):
        assert tokens_of(results[rid])[0] == reference(prompt(i, 5 + 9 * i), 6)
    assert_all_pages_free(e)


# -- MTP speculative decoding -----------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_requests_equal_generate_beside_plain_ones(depth):
    """An engine with D MTP modules (rigged weights: drafts partly right): speculative and plain
    greedy requests in one batch, a forked n = 2 speculative one and one sharing a prefix; every
    output equals plain generate's, and drafts were both accepted and rejected."""
    from dsjax.model import echoing_variables

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.num_nextn_predict_layers={depth}"]).model
    variables = echoing_variables(random_variables(cfg, seed=3), 30.0)
    e = Engine(
        cfg, variables, TOKENIZER, max_batch=6, page_size=8, max_model_len=96, prefill_chunk=16, speculative=True
    )
    base = prompt(7, 24)
    specs = [(prompt(1, 5), True, 1), (prompt(2, 19), False, 1), (prompt(3, 13), True, 2), (base, True, 1)]
    ids = [e.add_request(p, greedy(20, speculative=spec, n=n)) for p, spec, n in specs]
    early = []
    while e._inbox or e.waiting or e.prefilling:  # until base's prompt pages are cached
        early += e.step()
    later = e.add_request(base + prompt(8, 9), greedy(20, speculative=True))  # shares base's 3 full pages
    results = e.run()
    results = {rid: [o for o in early if o.request_id == rid] + results.get(rid, []) for rid in [*ids, later]}
    plain = generate(cfg, variables, [p for p, *_ in specs] + [base + prompt(8, 9)], 20)
    for row, rid in enumerate([*ids, later]):
        seqs = tokens_of(results[rid])
        for seq in seqs.values():
            assert seq == plain.tokens[row].tolist(), (row, seq)
    assert e.stats["prefix_tokens_shared"] == 24
    assert 0.2 < e.stats["accepted"] / e.stats["drafted"] < 1.0, dict(e.stats)
    assert_all_pages_free(e)


@pytest.mark.parametrize("rigged", [False, True])
def test_speculative_drafts_are_generates(rigged):
    """All requests speculative: the engine accepts exactly the drafts generate(speculative=True)
    accepts (MTP caches over pages, drafted after a chunked prefill, equal generate's), with random
    weights and with rigged ones (drafts mostly right)."""
    from dsjax.model import echoing_variables

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_nextn_predict_layers=1"]).model
    variables = random_variables(cfg, seed=3)
    variables = echoing_variables(variables, 30.0) if rigged else variables
    prompts = [prompt(1, 5), prompt(2, 19), prompt(3, 13), prompt(7, 24)]
    e = Engine(
        cfg, variables, TOKENIZER, max_batch=4, page_size=8, max_model_len=96, prefill_chunk=16, speculative=True
    )
    for p in prompts:
        e.add_request(p, greedy(40, speculative=True))
    e.run()
    want = generate(cfg, variables, prompts, 40, speculative=True).stats["acceptance"]
    assert e.stats["accepted"] / e.stats["drafted"] == pytest.approx(want, abs=1e-4)
    assert (want > 0.5) == rigged


def test_speculative_sequences_cache_their_mtp_entries():
    """Mid-run, each speculative sequence's MTP-module pages hold, at every position i < n (n
    cached), the entries of h^0_i and Emb(t_{i+1}) over its own accepted tokens, equal to the
    module run by the model over the whole sequence at once. Random weights (the module reads h^0);
    two sampled forks of one prompt, each with its own first token (copied its last prompt page)."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.num_nextn_predict_layers=1"]).model
    variables = random_variables(cfg, seed=3)
    e = Engine(
        cfg, variables, TOKENIZER, max_batch=4, page_size=8, max_model_len=96, prefill_chunk=16, speculative=True
    )
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=5, n=2, ignore_eos=True, speculative=True)
    forked = e.add_request(prompt(2, 21), sampled)
    e.add_request(prompt(3, 6), greedy(40, speculative=True))
    for _ in range(9):
        e.step()
    model, live = Transformer(cfg), [s for s in e.slots if s is not None]
    a, b = (s for s in live if s.request.id == forked)
    assert len(live) == 3 and a.tokens[21] != b.tokens[21]
    for seq in live:
        n = seq.cached
        tokens, positions = jnp.asarray([seq.tokens[: n + 1]]), jnp.arange(n)[None]
        h0, _, _, _ = model.apply(variables, tokens[:, :n], positions, init_cache(cfg, 1, n), method="decode")
        cache = init_cache(cfg, 1, n, with_mtp=True)
        _, _, cache = model.apply(variables, 0, h0, tokens[:, 1:], positions, cache, method="draft")
        pool = np.asarray(e.cache["mtp_0"].c_kv)
        got = pool[seq.pages].reshape(-1, pool.shape[-1])[:n]
        np.testing.assert_allclose(got, np.asarray(cache["mtp_0"].c_kv)[0], atol=1e-4)


def test_speculative_requests_need_a_speculative_engine():
    with pytest.raises(ValueError, match="keeps no MTP caches"):
        engine().add_request(prompt(1, 4), greedy(4, speculative=True))


def test_warm_up_compiles_every_step_shape_and_changes_nothing():
    """After warm_up, requests of any count run without compiling, and the pool is still empty."""
    e = engine(max_batch=3, prefill_rows=2)
    e.warm_up()
    assert not np.asarray(e.cache["moe_layers"].c_kv).any()
    compiled = jax_cache_sizes()
    for k in range(1, 4):
        ids = [e.add_request(prompt(k + i, 3 + 4 * i), greedy(3 + i)) for i in range(k)]
        results = e.run()
        assert [tokens_of(results[rid])[0] for rid in ids] == [
            reference(prompt(k + i, 3 + 4 * i), 3 + i) for i in range(k)
        ]
    assert jax_cache_sizes() == compiled


def jax_cache_sizes():
    import dsjax.infer.engine as m

    return m._forward._cache_size(), m._sample._cache_size()
