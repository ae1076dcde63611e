"""dsjax.sharding + expert parallelism: on 8 simulated CPU devices every mesh computes what one
device computes (loss, gradients, a whole train step with its bias update); expert weights are
split over the expert axis; tokens travel by all-to-all; bad meshes fail before compiling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import sharding
from dsjax.config import ConfigError, MeshConfig, load_config
from dsjax.model import Transformer
from dsjax.trainer import init_state, loss_sums, make_train_step, state_shardings, update_bias

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# vocab 264: divisible by the tensor axis (the byte tokenizer needs >= 259)
SMALL = ["train.batch_size=8", "train.seq_len=32", "model.num_hidden_layers=2", "model.vocab_size=264"]
MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2), (1, 1, 8, 1)]


def test_devices():
    assert jax.device_count() == 8  # tests/conftest.py


def test_mesh_shape_resolves_the_rest_and_rejects_bad_sizes():
    assert sharding.mesh_shape(MeshConfig(), 8) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    assert sharding.mesh_shape(MeshConfig(data=2, fsdp=-1, expert=2), 8)["fsdp"] == 2
    with pytest.raises(ConfigError, match="fixed axes .3 devices. do not divide the 8 devices"):
        sharding.mesh_shape(MeshConfig(data=-1, expert=3), 8)
    assert sharding.make_mesh(MeshConfig(data=2, fsdp=2)).devices.size == 4  # no -1: the first 4 devices
    with pytest.raises(ConfigError, match="needs 16 devices, but there are 8"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=8), 8)
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        load_config(TINY, ["mesh.fsdp=-1"])  # data is -1 already
    with pytest.raises(ConfigError, match="mesh.tensor=0: must be a positive integer"):
        load_config(TINY, ["mesh.tensor=0"])


@pytest.mark.parametrize(
    "override, mesh, message",
    [
        ([], (1, 1, 1, 8), "model.num_attention_heads=4 is not divisible by mesh.tensor=8"),
        ([], (1, 1, 8, 1), None),
        (["model.n_routed_experts=12", "model.n_group=2"], (1, 1, 8, 1), "model.n_routed_experts=12 is not divisible by mesh.expert=8"),
        (["model.vocab_size=259"], (4, 1, 1, 2), "model.vocab_size=259 is not divisible by mesh.tensor=2"),
        ([], (8, 1, 1, 1), "sequences per microbatch .* is not divisible by the batch-sharding axes data x fsdp x expert = 8"),
    ],
)
def test_invalid_meshes_fail_before_compiling(override, mesh, message):
    cfg = load_config(TINY, [*SMALL, *override])
    m = sharding.make_mesh(MeshConfig(*mesh))
    if message is None:
        sharding.check(m, cfg.model, 8)
    else:
        with pytest.raises(ConfigError, match=message):
            sharding.check(m, cfg.model, 4 if "sequences" in message else 8)


def test_train_py_rejects_a_bad_mesh_before_compiling(tmp_path):
    from train import main

    args = ["--config", str(TINY), f"train.output_dir={tmp_path}", "mesh.tensor=8"]
    assert main(args) == 2  # ConfigError: named, no traceback, nothing trained
    assert not any(tmp_path.iterdir())


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


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_every_mesh_computes_what_one_device_computes(reference, shape):
    cfg, model, state, batch, (loss, grads, loads, new, metrics) = reference
    mesh = sharding.make_mesh(MeshConfig(*shape))
    sh, batch_sh = state_shardings(cfg, model, mesh), sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        fn = jax.jit(run(cfg, model), in_shardings=(sh, batch_sh))
        compiled = fn.trace(jax.device_put(state, sh), jax.device_put(batch, batch_sh)).lower().compile()
        out = compiled(jax.device_put(state, sh), jax.device_put(batch, batch_sh))
    s_loss, s_grads, s_loads, s_new, s_metrics = out
    assert abs(float(s_loss) - float(loss)) <= 1e-5
    assert max_diff(s_grads, grads) <= 1e-5
    np.testing.assert_array_equal(s_loads["main"], loads["main"])  # global loads, exactly
    assert max_diff(s_new.params, new.params) <= 1e-5
    np.testing.assert_array_equal(np.asarray(s_new.bias["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"]),
                                  np.asarray(new.bias["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"]))  # fmt: skip
    assert float(s_metrics["dropped"]) == 0.0  # dropless

    # Routed-expert weights: each device holds 1/expert of them (times 1/fsdp, 1/tensor).
    w = s_new.params["moe_layers"]["layers"]["mlp"]["w_gate"]
    n = mesh.shape
    per_device = {s.data.nbytes for s in w.addressable_shards}
    assert per_device == {w.nbytes // (n["expert"] * n["fsdp"] * n["tensor"])}
    hlo = compiled.as_text()
    assert ("all-to-all" in hlo) == (n["expert"] > 1)


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
    mesh = sharding.make_mesh(MeshConfig(1, 1, 8, 1))
    sh, batch_sh = state_shardings(cfg, model, mesh), sharding.batch_sharding(mesh)

    def dropped(factor):
        c = load_config(TINY, [*SMALL, f"model.expert_capacity_factor={factor}"])
        m = Transformer(c.model)
        with jax.set_mesh(mesh):
            sums, _ = jax.jit(lambda s, b: loss_sums(m, s.params, s.bias, b, 1), in_shardings=(sh, batch_sh))(state, batch)
        return float(sums["dropped"]), float(sums["ce"])

    tight, roomy = dropped(1.0), dropped(8.0)
    assert tight[0] > 0.05  # rows 0-3 send every copy to the same two experts
    assert roomy[0] == 0.0  # 8 x the even share = room for everything (expert=8)
    assert tight[1] != roomy[1]


@pytest.mark.parametrize("cap", [40, 7, 2])  # dropless (all 40 rows fit anywhere), and two capacity limits
def test_received_expert_ids_are_rebuilt_from_gathered_counts(cap):
    """No expert id travels with the rows: each device gathers every device's per-expert row counts
    and rebuilds the ids of the rows it receives. On 8 devices with 2 experts each, they equal the
    ids of the rows that land in each slot, worked out here in numpy from the two exchanges'
    layouts (fixed: [source, cap] slots; ragged: the sources' kept rows end to end)."""
    from jax.sharding import PartitionSpec as P

    from dsjax.moe import _arrivals, _fixed_ids, _ragged_ids

    n, e_local, m = 8, 2, 40
    rng = np.random.default_rng(cap)
    eid = np.sort(rng.choice(16, size=(n, m), p=np.r_[np.full(4, 0.15), np.full(12, 0.4 / 12)]), axis=1)  # skewed
    mesh = jax.make_mesh((n,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])

    def local(e):
        fits = _arrivals(e, e_local, n, cap)[1]
        return _fixed_ids(fits, cap)[None], _ragged_ids(fits, n * cap)[None]

    fixed, ragged = jax.shard_map(local, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))(eid.reshape(-1))
    for me in range(n):
        chunks = [eid[s][eid[s] // e_local == me][:cap] % e_local for s in range(n)]
        want_fixed = np.stack([np.pad(c, (0, cap - len(c)), constant_values=e_local) for c in chunks])
        kept = np.concatenate(chunks)
        want_ragged = np.pad(kept, (0, n * cap - len(kept)), constant_values=e_local)
        np.testing.assert_array_equal(np.asarray(fixed[me]), want_fixed)
        np.testing.assert_array_equal(np.asarray(ragged[me]), want_ragged)
    assert (cap < m) == any(len(eid[s][eid[s] // e_local == d]) > cap for s in range(n) for d in range(n))


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
def test_train_py_on_a_mesh(tmp_path):
    """train.py with a 2x2x2x1 mesh: trains, checkpoints sharded state, resumes, and restores the
    model on one device for inference."""
    from dsjax.checkpoint import restore_model
    from train import main

    args = ["--config", str(TINY), f"train.output_dir={tmp_path}", "train.run_name=mesh", *SMALL,
            "train.steps=2", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=1",
            "train.sample_tokens=4", "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "mesh" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["val_loss"])
    assert main([*args, "train.steps=3", "--resume"]) == 0  # restores the sharded checkpoint, goes on
    assert json.loads((tmp_path / "mesh" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    cfg, variables = restore_model(tmp_path / "mesh")
    w = variables["params"]["moe_layers"]["layers"]["mlp"]["w_gate"]
    assert len(w.sharding.device_set) == 1


def test_checkpoint_of_a_mesh_state_compiles_nothing_and_restores_resharded(tmp_path, caplog):
    """dsjax.checkpoint on one host: a state sharded over 4 devices and replicated over 2 is saved
    from one replica per shard with nothing compiled (orbax's default, replica-parallel saving,
    compiles a slice of every replicated shard), and restores equal under other shardings; so does
    a checkpoint written by orbax's StandardSave, as dsjax wrote them before."""
    import logging

    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsjax import checkpoint as ckpt

    mesh = jax.make_mesh((2, 4), ("a", "b"))
    on = lambda spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    values = {"w": np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 7, "b": np.arange(48, dtype=np.float32),
              "step": np.int32(7)}  # fmt: skip
    state = {"w": jax.device_put(values["w"], on(("b", None))), "b": jax.device_put(values["b"], on(())),
             "step": jax.device_put(values["step"], on(()))}  # fmt: skip
    abstract = {"w": jax.ShapeDtypeStruct((64, 48), np.float32, sharding=on((None, ("a", "b")))),
                "b": jax.ShapeDtypeStruct((48,), np.float32, sharding=on(("b",))),
                "step": jax.ShapeDtypeStruct((), np.int32, sharding=on(()))}  # fmt: skip

    with caplog.at_level(logging.WARNING), jax.log_compiles(True), ckpt.manager(tmp_path / "new") as mngr:
        ckpt.save(mngr, 3, state, {"batches": 5})
        mngr.wait_until_finished()
    compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    assert compiled == []

    options = ocp.CheckpointManagerOptions(create=True)
    with ocp.CheckpointManager((tmp_path / "old" / "checkpoints").absolute(), options=options) as old:
        old.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"batches": 5})))
    for run in ("new", "old"):
        with ckpt.manager(tmp_path / run) as mngr:
            got, data = ckpt.restore(mngr, abstract)
        assert data == {"batches": 5}
        for k, want in values.items():
            assert got[k].sharding == abstract[k].sharding and got[k].dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got[k]), want)


@pytest.mark.slow
def test_aot_planner_compiles_for_a_tpu_topology():
    """python -m dsjax.aot: the tiny step compiled for a v5e 2x2 slice (libtpu's compiler on this
    CPU host), per-chip memory fields printed."""
    pytest.importorskip("libtpu", reason="libtpu has no wheel for this platform (the test extra installs it on Linux)")
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    cmd = [sys.executable, "-m", "dsjax.aot", "--config", str(TINY), "--topology", "v5e:2x2", "--json",
           "mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "train.batch_size=4", "train.seq_len=64",
           "model.vocab_size=260"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["chips"] == 4 and r["device_kind"] == "TPU v5 lite" and r["hbm_gib"] == 16
    for field in ("arguments_gib", "temporaries_gib", "total_gib"):
        assert 0 < r[field] < 16
    assert r["total_gib"] >= r["arguments_gib"] + r["temporaries_gib"]
    assert r["fits"] and r["compiled_flops_per_chip"] > 0
    assert r["pallas_kernel_calls"] > 0  # auto on TPU: the flash MLA kernels, per shard
    assert "per chip: arguments" in out.stdout and "of 16 GiB HBM: fits" in out.stdout


def test_tpu_topology_below_one_host_on_older_libtpu(monkeypatch):
    """libtpu 0.0.48 (JAX 0.11) refuses a slice smaller than its default 2x2 host ('v5e:1x1');
    tpu_devices then asks for that slice as one host. Other refusals are a ConfigError naming it."""
    from jax.experimental import topologies

    from dsjax.aot import tpu_devices

    calls = []

    class Topology:
        devices = ["chip"]

    def fake(platform, topology_name, **kw):  # what libtpu 0.0.48 answers
        calls.append((topology_name, kw))
        if topology_name.startswith("v9"):
            raise RuntimeError("INVALID_ARGUMENT: Invalid TPU external name: TPU v9")
        if not kw or topology_name == "v5e:4x4":  # 4x4 stands for a refusal the retry cannot mend
            raise RuntimeError(f'Topology layout "{topology_name}" is not divisible by the given (or default) '
                               'chips_per_host_bounds "2x2x1"')  # fmt: skip
        return Topology()

    monkeypatch.setattr(topologies, "get_topology_desc", fake)
    assert tpu_devices("v5e:1x1") == ["chip"]
    assert calls == [("v5e:1x1", {}), ("v5e:1x1", {"chips_per_host_bounds": (1, 1, 1)})]
    assert tpu_devices("v5p:2x1x1") == ["chip"] and calls[-1][1] == {"chips_per_host_bounds": (2, 1, 1)}
    with pytest.raises(ConfigError, match="'v9z:1x1'.*Invalid TPU external name"):
        tpu_devices("v9z:1x1")
    with pytest.raises(ConfigError, match="'v5e:4x4'.*not divisible"):
        tpu_devices("v5e:4x4")


def test_gpu_topologies_ask_xla_for_a_described_gpu(monkeypatch):
    """``--topology h100:8``: eight GPUs of one host, compiled for from their description (XLA's
    GpuTargetConfig: compute capability, SMs, shared memory, memory) with no GPU present; without
    XLA's CUDA plugin, or with a malformed name, a ConfigError that says what to do."""
    from jax.experimental import topologies

    from dsjax.aot import GPUS, HBM_GIB, gpu_devices

    calls = []

    class Topology:
        devices = ["gpu"] * 8

    def fake(platform, target_config, topology):
        calls.append((platform, target_config, topology))
        # the CUDA plugin's check of local CUDA libraries (cuPTI) fails without a GPU: skipped
        assert os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK") == "1"
        if "Tesla T4" in target_config:  # stands for a host without the CUDA plugin
            raise NotImplementedError("topology not implemented for cuda")
        return Topology()

    monkeypatch.delenv("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", raising=False)
    monkeypatch.setattr(topologies, "get_topology_desc", fake)
    assert gpu_devices("h100:8") == ["gpu"] * 8
    platform, config, topology = calls[-1]
    assert (platform, topology) == ("cuda", "1x1x8")
    for field in ("major: 9 minor: 0", "core_count: 132", "shared_memory_per_block_optin: 232448",
                  'device_description_str: "NVIDIA H100 80GB HBM3"'):  # fmt: skip
        assert field in config
    assert gpu_devices("l4")[0] == "gpu" and calls[-1][2] == "1x1x1" and "major: 8 minor: 9" in calls[-1][1]
    with pytest.raises(ConfigError, match=r"'t4:1'.*not implemented for cuda.*pip install 'jax\[cuda13\]'"):
        gpu_devices("t4:1")
    with pytest.raises(ConfigError, match="NAME:COUNT"):
        gpu_devices("h100:x8")
    assert HBM_GIB["NVIDIA H100 80GB HBM3"] == 79.1 and set(GPUS) == {"h100", "a100", "l4", "t4"}


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
    mesh = sharding.make_mesh(MeshConfig(2, 1, 2, 2))
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
    mesh = sharding.make_mesh(MeshConfig(1, 2, 2, 2))
    sh = state_shardings(cfg, model, mesh).params
    params = jax.device_put(state.params, sh)
    with jax.set_mesh(mesh):
        jnp_path = jax.jit(loss_and_grads("xla"), in_shardings=(sh,))(params)
        fn = jax.jit(loss_and_grads("interpret"), in_shardings=(sh,))
        traced = fn.trace(params)
        assert str(traced.jaxpr).count("pallas_call") >= 3 * 4  # 3 GEMMs x (q, kv, o, MLP...)
        lowered = traced.lower()
        moved = [line.split("->")[-1] for line in lowered.as_text().splitlines() if "all_to_all" in line and "->" in line]
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
