"""On 8 simulated CPU devices every mesh computes what one device computes: loss, gradients and a
whole train step with its bias update (loads counted on the global batch); expert weights split over
the expert axis, tokens travelling by all-to-all, capacity drops reported, remat policies, and the
Pallas kernels (attention, FP8) run per shard."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import MeshConfig, load_config
from dsjax.model import Transformer, build_model
from dsjax.parallel.mesh import make_mesh
from dsjax.parallel.rules import batch_sharding
from dsjax.train.loss import loss_sums
from dsjax.train.step import init_state, make_train_step, state_shardings, update_bias

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
# vocab 264: divisible by the tensor axis (the byte tokenizer needs >= 259)
SMALL = ["train.batch_size=8", "train.seq_len=32", "model.num_hidden_layers=2", "model.vocab_size=264"]
MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2), (1, 1, 8, 1)]


def imbalanced_batch(cfg):
    """Rows 0-3 repeat one token (every copy to the same experts); rows 4-7 are random: each shard
    of the batch sees a different expert load."""
    rng = np.random.default_rng(0)
    b, s = cfg.train.batch_size, cfg.train.seq_len
    tokens = rng.integers(0, 259, (b, s)).astype(np.int32)
    tokens[: b // 2] = 7
    seg = np.ones((b, s), np.int32)
    seg[1, s // 2 :] = 2  # a packed second document
    pos = np.where(seg == 2, np.arange(s) - s // 2, np.arange(s)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


@pytest.fixture(scope="module")
def reference():
    """One device, no mesh: loss, gradients, loads and one train step (the independent reference)."""
    cfg = load_config(TINY, SMALL)
    model = Transformer(cfg.model)
    state = init_state(cfg, model, jax.random.key(0))
    batch = imbalanced_batch(cfg)
    return cfg, model, state, batch, jax.jit(run(cfg, model))(state, batch)


def run(cfg, model):
    step = make_train_step(cfg, model)

    def both(state, batch):
        def f(p):
            sums, loads = loss_sums(model, p, state.bias, batch, cfg.model.num_nextn_predict_layers)
            n = batch["tokens"].size
            return (sums["ce"] + sums["mtp"].sum()) / n + sums["balance"], loads

        (loss, loads), grads = jax.value_and_grad(f, has_aux=True)(state.params)
        new, metrics = step(state, batch)
        return loss, grads, loads, new, metrics

    return both


def on_mesh(cfg, model, state, batch, shape):
    """``run`` compiled for the mesh of that shape, the state and batch split as training splits them:
    (mesh, the compiled program, its outputs)."""
    mesh = make_mesh(MeshConfig(*shape))
    sh, batch_sh = state_shardings(cfg, model, mesh), batch_sharding(mesh)
    with jax.set_mesh(mesh):
        fn = jax.jit(run(cfg, model), in_shardings=(sh, batch_sh))
        compiled = fn.trace(jax.device_put(state, sh), jax.device_put(batch, batch_sh)).lower().compile()
        return mesh, compiled, compiled(jax.device_put(state, sh), jax.device_put(batch, batch_sh))


def assert_same_step(got, want):
    """Loss, gradients and the updated parameters within 1e-5, the expert loads exactly."""
    (s_loss, s_grads, s_loads, s_new, _), (loss, grads, loads, new, _) = got, want
    assert abs(float(s_loss) - float(loss)) <= 1e-5
    assert max_diff(s_grads, grads) <= 1e-5
    np.testing.assert_array_equal(s_loads["main"], loads["main"])  # global loads, exactly
    assert max_diff(s_new.params, new.params) <= 1e-5


def max_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_every_mesh_computes_what_one_device_computes(reference, shape):
    cfg, model, state, batch, want = reference
    mesh, compiled, out = on_mesh(cfg, model, state, batch, shape)
    assert_same_step(out, want)
    s_new, s_metrics, new = out[3], out[4], want[3]
    np.testing.assert_array_equal(
        np.asarray(s_new.bias["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"]),
        np.asarray(new.bias["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"]),
    )
    assert float(s_metrics["dropped"]) == 0.0  # dropless

    # Routed-expert weights: each device holds 1/expert of them (times 1/fsdp, 1/tensor).
    w = s_new.params["moe_layers"]["layers"]["mlp"]["w_gate"]
    n = mesh.shape
    per_device = {s.data.nbytes for s in w.addressable_shards}
    assert per_device == {w.nbytes // (n["expert"] * n["fsdp"] * n["tensor"])}
    hlo = compiled.as_text()
    assert ("all-to-all" in hlo) == (n["expert"] > 1)


@pytest.mark.slow
def test_sequence_parallelism_computes_what_one_device_computes(reference, shape=(1, 2, 2, 2)):
    """model.sequence_parallel: the residual stream and the logits split along the sequence over the
    tensor axis between the attention and the FFN; the experts gather the rows and reduce-scatter."""
    cfg, _, state, batch, want = reference
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(sequence_parallel=True))
    _, compiled, out = on_mesh(cfg, Transformer(cfg.model), state, batch, shape)
    assert_same_step(out, want)
    assert "reduce-scatter" in compiled.as_text()


def test_bias_update_uses_the_global_load_not_a_shards(reference):
    """The sharded steps above match the update from the whole batch's loads (exactly); one shard's
    own rows (the last one: random tokens) would push the bias elsewhere."""
    cfg, model, state, batch, (_, _, loads, new, _) = reference
    bias = state.bias
    whole = update_bias(bias, loads, 1e-3)
    assert max_diff(whole, new.bias) == 0
    shard = {k: v[-1:] for k, v in batch.items()}
    _, shard_loads = loss_sums(model, state.params, bias, shard, 1)
    local = update_bias(bias, shard_loads, 1e-3)
    assert max_diff(local, whole) > 0  # a shard's own loads would give another update


@pytest.mark.slow
def test_capacity_factor_drops_and_reports(reference):
    cfg, model, state, batch, (loss, *_rest) = reference
    mesh = make_mesh(MeshConfig(1, 1, 8, 1))
    sh, batch_sh = state_shardings(cfg, model, mesh), batch_sharding(mesh)

    def dropped(factor):
        c = load_config(TINY, [*SMALL, f"model.expert_capacity_factor={factor}"])
        m = Transformer(c.model)
        with jax.set_mesh(mesh):
            sums, _ = jax.jit(lambda s, b: loss_sums(m, s.params, s.bias, b, 1), in_shardings=(sh, batch_sh))(
                state, batch
            )
        return float(sums["dropped"]), float(sums["ce"])

    tight, roomy = dropped(1.0), dropped(8.0)
    assert tight[0] > 0.05  # rows 0-3 send every copy to the same two experts
    assert roomy[0] == 0.0  # 8 x the even share = room for everything (expert=8)
    assert tight[1] != roomy[1]


def test_remat_policies_give_the_same_gradients():
    cfg = load_config(TINY, SMALL)
    batch = imbalanced_batch(cfg)
    grads = {}
    for policy in ("none", "full", "save_projections"):
        c = load_config(TINY, [*SMALL, f"model.remat={policy}"])
        model = Transformer(c.model)
        state = init_state(c, model, jax.random.key(0))
        f = lambda p: loss_sums(model, p, state.bias, batch, 1)[0]["ce"] / batch["tokens"].size  # noqa: E731
        if policy != "none":
            assert "remat" in str(jax.make_jaxpr(jax.grad(f))(state.params))  # checkpointing is in the program
        grads[policy] = jax.jit(jax.grad(f))(state.params)
    assert max_diff(grads["full"], grads["none"]) <= 1e-5
    assert max_diff(grads["save_projections"], grads["none"]) <= 1e-5


@pytest.mark.slow
def test_attention_kernel_runs_per_shard_under_a_mesh():
    """Pallas calls cannot be partitioned by XLA: under a mesh the flash kernel (interpret mode
    here) runs inside shard_map, sequences over the batch axes and heads over tensor."""
    cfg = load_config(TINY, [*SMALL, "train.batch_size=4"])
    batch = imbalanced_batch(cfg)
    tokens, seg = batch["tokens"], batch["segment_ids"]
    variables = Transformer(cfg.model).init(jax.random.key(0), tokens[:1])
    want = Transformer(cfg.model).apply(variables, tokens, seg).logits
    kernel = Transformer(cfg.model.replace(attention_impl="interpret"))
    mesh = make_mesh(MeshConfig(2, 1, 2, 2))
    with jax.set_mesh(mesh):
        jitted = jax.jit(lambda v, t, s: kernel.apply(v, t, s).logits)
        lowered = jitted.trace(variables, tokens, seg).lower()
        got = jitted(variables, tokens, seg)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


@pytest.mark.slow
def test_fp8_training_runs_its_kernels_per_shard_under_a_mesh():
    """``fp8: true`` under a 1x2x2x2 mesh with the FP8 Pallas kernels (interpret mode here): the dense
    GEMMs run per shard (shard_map), the routed experts' inside expert parallelism, their FSDP slices
    (64 of the 128 hidden rows: one 128-block across two devices) gathered in e4m3. Loss and gradients
    equal the plain-jnp recipe's on the same mesh, and are within FP8 tolerance of one device's (a
    partitioned program rounds differently before quantizing, and e4m3 roundings then flip)."""
    # 128 tokens per shard; no MTP module (only more of the same GEMMs, and half this test's time)
    cfg = load_config(TINY, [*SMALL, "train.seq_len=64", "model.fp8=true", "model.num_nextn_predict_layers=0"])
    batch = imbalanced_batch(cfg)
    model = Transformer(cfg.model)
    state = init_state(cfg, model, jax.random.key(0))

    def loss_and_grads(impl):
        m = Transformer(cfg.model.replace(fp8_impl=impl))

        def f(p):
            sums, _ = loss_sums(m, p, state.bias, batch, cfg.model.num_nextn_predict_layers)
            return (sums["ce"] + sums["mtp"].sum()) / batch["tokens"].size + sums["balance"]

        return jax.value_and_grad(f)

    one = jax.jit(loss_and_grads("xla"))(state.params)
    mesh = make_mesh(MeshConfig(1, 2, 2, 2))
    sh = state_shardings(cfg, model, mesh).params
    params = jax.device_put(state.params, sh)
    with jax.set_mesh(mesh):
        jnp_path = jax.jit(loss_and_grads("xla"), in_shardings=(sh,))(params)
        fn = jax.jit(loss_and_grads("interpret"), in_shardings=(sh,))
        traced = fn.trace(params)
        assert str(traced.jaxpr).count("pallas_call") >= 3 * 4  # 3 GEMMs x (q, kv, o, MLP...)
        lowered = traced.lower()
        moved = [
            line.split("->")[-1] for line in lowered.as_text().splitlines() if "all_to_all" in line and "->" in line
        ]
        assert sum("f8E4M3FN>" in t for t in moved) == 2  # the dispatch, and the down-projection's gradient (V3 §3.3.3)
        kernels = lowered.compile()(params)
    assert abs(float(kernels[0]) - float(jnp_path[0])) <= 1e-6 * abs(float(jnp_path[0]))
    assert abs(float(jnp_path[0]) - float(one[0])) <= 1e-4 * abs(float(one[0]))
    agree(kernels[1], jnp_path[1], min_cosine=0.999)  # measured: >= 0.99984, rounding flips only
    agree(jnp_path[1], one[1], min_cosine=0.99)  # measured: >= 0.997


def agree(grads, reference, min_cosine):
    """Per tensor: cosine similarity >= min_cosine and the same norm within 2% (a shard's partial sum,
    or a missing scale, would break one or the other)."""
    for (path, r), g in zip(jax.tree_util.tree_leaves_with_path(reference), jax.tree.leaves(grads)):
        r, g = np.asarray(r, np.float64).ravel(), np.asarray(g, np.float64).ravel()
        nr, ng = np.linalg.norm(r), np.linalg.norm(g)
        assert r @ g >= min_cosine * nr * ng and abs(ng - nr) <= 0.02 * nr, jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def v4_reference():
    """configs/tiny_v4.yaml (hybrid attention, mHC, hash + learned routing) on one device."""
    small = ["train.batch_size=8", "train.seq_len=32", "model.vocab_size=264", "model.index_topk=4"]
    cfg = load_config(ROOT / "configs" / "tiny_v4.yaml", small)
    model = build_model(cfg.model)
    state, batch = init_state(cfg, model, jax.random.key(0)), imbalanced_batch(cfg)
    return cfg, model, state, batch, jax.jit(run(cfg, model))(state, batch)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 2, 2, 2)], ids=lambda s: "x".join(map(str, s)))  # fsdp, experts, tensor
def test_deepseek_v4_mesh_computes_what_one_device_computes(v4_reference, shape):
    """DeepSeek-V4: loss, gradients, loads and a train step, its bias update included, as on one device."""
    cfg, model, state, batch, want = v4_reference
    _, _, out = on_mesh(cfg, model, state, batch, shape)
    assert_same_step(out, want)
    s_new, new = out[3], want[3]
    assert max_diff(s_new.bias, new.bias) == 0.0
    assert max_diff(new.bias, state.bias) > 0  # the learned layers' bias moved (the hash tables cannot)
