"""dsjax.train.loop: resuming is bitwise the run that never stopped -- after a clean stop, a kill
during a save, or a SIGKILL at any point."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from dsjax.train import TrainingError, restore_model, train
from tests.train.runs import SMALL_RUN, small_cfg

ROOT = Path(__file__).resolve().parents[2]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_resume_is_bitwise_identical(tmp_path):
    n = 4
    common = ["train.checkpoint_every=4", f"train.steps={2 * n}"]
    whole = small_cfg(tmp_path, *common, "train.run_name=whole")
    train(whole, progress=False)

    part = small_cfg(tmp_path, *common, "train.run_name=part")
    first = small_cfg(tmp_path, "train.checkpoint_every=4", f"train.steps={n}", "train.run_name=part")
    train(first, progress=False)  # stops after step n, like a kill right after its checkpoint
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(part, progress=False)  # nothing is overwritten without --resume
    train(part, resume=True, progress=False)

    assert losses(tmp_path / "part") == losses(tmp_path / "whole")  # exact floats, every step
    _, a = restore_model(tmp_path / "whole")
    _, b = restore_model(tmp_path / "part")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.slow
def test_killed_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    cfg = small_cfg(tmp_path, "train.checkpoint_every=2", "train.steps=4")
    train(cfg, progress=False)
    ckdir = tmp_path / "tiny" / "checkpoints"
    # A save interrupted by a kill leaves orbax's temporary directory behind.
    (ckdir / "6.orbax-checkpoint-tmp-1234").mkdir()
    (ckdir / "6.orbax-checkpoint-tmp-1234" / "partial").write_text("garbage")
    longer = small_cfg(tmp_path, "train.checkpoint_every=2", "train.steps=6")
    last = train(longer, resume=True, progress=False)
    assert last["step"] == 6
    assert losses(tmp_path / "tiny").keys() == set(range(1, 7))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A real kill (SIGKILL, at whatever point the run has reached) loses nothing."""
    args = [*SMALL_RUN, f"train.output_dir={tmp_path}", "train.checkpoint_every=2", "train.eval_every=100"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, "train.run_name=killed", "train.steps=400"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckdir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (ckdir / "2").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckdir / "2").is_dir(), "the run never wrote its first checkpoint"

    steps = 8
    resumed = small_cfg(
        tmp_path, "train.checkpoint_every=2", "train.eval_every=100", "train.run_name=killed", f"train.steps={steps}"
    )
    last = train(resumed, resume=True, progress=False)
    whole = small_cfg(
        tmp_path, "train.checkpoint_every=2", "train.eval_every=100", "train.run_name=whole", f"train.steps={steps}"
    )
    train(whole, progress=False)
    assert last["step"] == steps
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    _, a = restore_model(tmp_path / "killed", step=steps)
    _, b = restore_model(tmp_path / "whole", step=steps)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
