"""dsjax-train (``python train.py``, ``python -m dsjax.cli.train``): bad configs, meshes and kernel
choices are one line and exit status 2 before anything is written or compiled; a run on a mesh
trains, checkpoints, resumes and restores on one device."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from dsjax.cli.train import main
from dsjax.config import ConfigError, load_config
from dsjax.train import restore_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["train.batch_size=8", "train.seq_len=32", "model.num_hidden_layers=2", "model.vocab_size=264"]


def test_config_errors_before_compiling(capsys):
    assert main(["train.stepz=3"]) == 2
    assert "train.stepz: unknown key; did you mean 'steps'?" in capsys.readouterr().err
    assert main(["train.batch_size=6", "train.microbatches=4"]) == 2
    assert "train.batch_size=6: must be divisible by train.microbatches=4" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.seq_len='long': must be an integer"):
        load_config(TINY, ["train.seq_len=long"])


def test_kernel_choices_the_devices_cannot_run_are_config_errors(tmp_path, capsys, monkeypatch):
    """'pallas' kernels on this CPU suite's devices, or a bad DSJAX_FP8_IMPL: an error naming the
    choice, exit code 2, before the run directory is made or anything traced."""
    out = [f"train.output_dir={tmp_path}"]
    assert jax.default_backend() == "cpu"  # the suite's platform: 'pallas' cannot run here
    assert main([*out, "model.attention_impl=pallas"]) == 2
    assert "attention_impl='pallas' needs a TPU or GPU, this is 'cpu'" in capsys.readouterr().err
    assert main([*out, "model.fp8=true", "model.fp8_impl=pallas"]) == 2
    assert "fp8_impl='pallas' needs a TPU or GPU, this is 'cpu'" in capsys.readouterr().err
    monkeypatch.setenv("DSJAX_FP8_IMPL", "triton")
    assert main([*out, "model.fp8=true"]) == 2
    assert "fp8_impl='triton': expected one of auto, pallas, interpret, xla" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_train_py_rejects_a_bad_mesh_before_compiling(tmp_path):
    args = ["--config", str(TINY), f"train.output_dir={tmp_path}", "mesh.tensor=8"]
    assert main(args) == 2  # ConfigError: named, no traceback, nothing trained
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_train_py_on_a_mesh(tmp_path):
    """dsjax-train with a 2x2x2x1 mesh: trains, checkpoints sharded state, resumes, and restores the
    model on one device for inference."""
    args = [
        "--config",
        str(TINY),
        f"train.output_dir={tmp_path}",
        "train.run_name=mesh",
        *SMALL,
        "train.steps=2",
        "train.eval_every=2",
        "train.eval_batches=1",
        "train.checkpoint_every=1",
        "train.sample_tokens=4",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.expert=2",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "mesh" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["val_loss"])
    assert main([*args, "train.steps=3", "--resume"]) == 0  # restores the sharded checkpoint, goes on
    assert json.loads((tmp_path / "mesh" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    cfg, variables = restore_model(tmp_path / "mesh")
    w = variables["params"]["moe_layers"]["layers"]["mlp"]["w_gate"]
    assert len(w.sharding.device_set) == 1
