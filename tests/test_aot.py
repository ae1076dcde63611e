"""The compile-only planner (dsjax.aot, dsjax.parallel.topology): the tiny step compiled for a TPU
slice with libtpu's compiler on this CPU host, and the TPU / GPU devices it compiles for."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsjax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.mark.slow
def test_aot_planner_compiles_for_a_tpu_topology():
    """dsjax-aot: the tiny step compiled for a v5e 2x2 slice (libtpu's compiler on this
    CPU host), per-chip memory fields printed."""
    pytest.importorskip("libtpu", reason="libtpu has no wheel for this platform (the test extra installs it on Linux)")
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    cmd = [
        sys.executable,
        "-m",
        "dsjax.cli.aot",
        "--config",
        str(TINY),
        "--topology",
        "v5e:2x2",
        "--json",
        "mesh.data=1",
        "mesh.fsdp=2",
        "mesh.expert=2",
        "train.batch_size=4",
        "train.seq_len=64",
        "model.vocab_size=260",
    ]
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


@pytest.mark.slow
def test_decode_plan_states_the_cache_per_sequence():
    """dsjax-aot --decode: a DeepSeek-V4 decode step (configs/tiny_v4.yaml, every layer type) over a
    4,096-token cache for 8 sequences on v5e 2x2; the cache per sequence is what init_cache allocates."""
    pytest.importorskip("libtpu", reason="libtpu has no wheel for this platform (the test extra installs it on Linux)")
    import jax

    from dsjax.config import load_config
    from dsjax.model.transformer import init_cache

    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    config = ROOT / "configs" / "tiny_v4.yaml"
    args = ["--config", str(config), "--topology", "v5e:2x2", "--decode", "4096", "--decode-batch", "8", "--json"]
    overrides = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "model.vocab_size=260", "model.dtype=bfloat16"]
    cmd = [sys.executable, "-m", "dsjax.cli.aot", *args, *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = load_config(config, overrides).model
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 4096))
    assert r["cache_gib_per_sequence"] * 2**30 == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    assert r["step"] == "decode" and r["fits"] and 0 < r["temporaries_gib"] < r["total_gib"] < 16
    assert "cache per sequence" in out.stdout


def test_tpu_topology_below_one_host_on_older_libtpu(monkeypatch):
    """libtpu 0.0.48 (JAX 0.11) refuses a slice smaller than its default 2x2 host ('v5e:1x1');
    tpu_devices then asks for that slice as one host. Other refusals are a ConfigError naming it."""
    from jax.experimental import topologies

    from dsjax.parallel.topology import tpu_devices

    calls = []

    class Topology:
        devices = ["chip"]

    def fake(platform, topology_name, **kw):  # what libtpu 0.0.48 answers
        calls.append((topology_name, kw))
        if topology_name.startswith("v9"):
            raise RuntimeError("INVALID_ARGUMENT: Invalid TPU external name: TPU v9")
        if not kw or topology_name == "v5e:4x4":  # 4x4 stands for a refusal the retry cannot mend
            raise RuntimeError(
                f'Topology layout "{topology_name}" is not divisible by the given (or default) '
                'chips_per_host_bounds "2x2x1"'
            )
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

    from dsjax.parallel.topology import GPUS, HBM_GIB, gpu_devices

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
    for field in (
        "major: 9 minor: 0",
        "core_count: 132",
        "shared_memory_per_block_optin: 232448",
        'device_description_str: "NVIDIA H100 80GB HBM3"',
    ):
        assert field in config
    assert gpu_devices("l4")[0] == "gpu" and calls[-1][2] == "1x1x1" and "major: 8 minor: 9" in calls[-1][1]
    with pytest.raises(ConfigError, match=r"'t4:1'.*not implemented for cuda.*pip install 'jax\[cuda13\]'"):
        gpu_devices("t4:1")
    with pytest.raises(ConfigError, match="NAME:COUNT"):
        gpu_devices("h100:x8")
    assert HBM_GIB["NVIDIA H100 80GB HBM3"] == 79.1 and set(GPUS) == {"h100", "a100", "l4", "t4"}


GRPO_PLAN = """
import json, math, sys
import jax
from dsjax.aot import plan
from dsjax.config import load_config
from dsjax.model.transformer import Transformer
from dsjax.parallel.mesh import make_mesh
from dsjax.parallel.topology import topology_devices
from dsjax.train.step import abstract_state, state_shardings

path, overrides = sys.argv[1], sys.argv[2:]
plans = {b: plan(load_config(path, overrides + [f"grpo.beta={b}"]), "v5e:2x2") for b in (0.04, 0)}
cfg = load_config(path, overrides)
model = Transformer(cfg.model)
shardings = state_shardings(cfg, model, make_mesh(cfg.mesh, topology_devices("v5e:2x2")))
params = zip(jax.tree.leaves(abstract_state(cfg, model).params), jax.tree.leaves(shardings.params))
bf16_shard_bytes = sum(2 * math.prod(s.shard_shape(a.shape)) for a, s in params)
print(json.dumps({"plans": plans, "bf16_shard_bytes": bf16_shard_bytes}))
"""


@pytest.mark.slow
def test_aot_planner_compiles_the_grpo_update_with_and_without_a_reference():
    """A config with a grpo: section plans GRPO's update (reference log-probs + one step) for the
    rollout batch; with beta > 0 the bf16 reference policy's shards (computed here from the
    parameters' shardings: 2 bytes per element of each chip's shard) join the arguments, at beta
    = 0 they do not. TPU layouts pad a tiny model's small dims, hence the upper bound's slack;
    an fp32 reference would need twice the bytes."""
    pytest.importorskip("libtpu", reason="libtpu has no wheel for this platform (the test extra installs it on Linux)")
    env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    overrides = [
        *("mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "model.vocab_size=260", "model.dtype=bfloat16"),
        *("train.seq_len=64", "grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.num_iterations=2"),
    ]
    cmd = [sys.executable, "-c", GRPO_PLAN, str(ROOT / "configs" / "grpo_tiny.yaml"), *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    with_ref, without = r["plans"]["0.04"], r["plans"]["0"]
    for p in (with_ref, without):
        assert p["step"] == "grpo" and (p["batch_size"], p["seq_len"]) == (8, 64) and p["fits"]
    assert with_ref["reference_dtype"] == "bfloat16" and without["reference_dtype"] is None
    reference = (with_ref["arguments_gib"] - without["arguments_gib"]) * 2**30
    assert r["bf16_shard_bytes"] <= reference <= 1.6 * r["bf16_shard_bytes"]
    assert with_ref["model_flops_per_chip"] == pytest.approx(4 / 3 * without["model_flops_per_chip"])
