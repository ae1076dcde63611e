"""dsjax.train.loop: resuming is bitwise the run that never stopped -- after a clean stop, a kill
during a save, a SIGKILL at any point, a SIGTERM (which saves first), or from the checkpoint before
a damaged one."""

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
from dsjax.train.checkpoint import RestoreError
from dsjax.train.loop import StopRequest
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


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints and preemption


def _largest_file(path: Path) -> Path:
    return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(ck: Path):
    f = _largest_file(ck / "state")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt(ck: Path):
    f = _largest_file(ck / "state")
    data = bytearray(f.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = bytes(range(256)) * 16
    f.write_bytes(bytes(data))


def _tear(ck: Path):
    (ck / "state" / "_METADATA").unlink()  # a save cut short after the commit marker was written


DAMAGE = {"truncated": _truncate, "corrupted": _corrupt, "torn": _tear}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps, checkpoints every 2: the losses every resumed run must repeat exactly."""
    out = tmp_path_factory.mktemp("whole")
    train(small_cfg(out, "train.checkpoint_every=2", "train.steps=6"), progress=False)
    return losses(out / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_one_before(
    tmp_path, damage, uninterrupted, capsys
):
    train(small_cfg(tmp_path, "train.checkpoint_every=2", "train.steps=4"), progress=False)
    ck = tmp_path / "tiny" / "checkpoints" / "4"
    DAMAGE[damage](ck)
    capsys.readouterr()
    last = train(small_cfg(tmp_path, "train.checkpoint_every=2", "train.steps=6"), resume=True, progress=False)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "cannot be read" in line]
    assert len(lines) == 1 and str(ck) in lines[0] and "moved aside to 4.damaged" in lines[0], err
    assert (ck.parent / "4.damaged" / "DAMAGED.txt").is_file() and ck.is_dir()  # kept, and step 4 saved anew
    assert last["step"] == 6 and losses(tmp_path / "tiny") == uninterrupted  # resumed from step 2, bitwise

    # restore_model (generate --checkpoint) takes the newest checkpoint that reads back, naming the others
    DAMAGE[damage](ck.parent / "6")
    _, fallback = restore_model(tmp_path / "tiny")
    assert "checkpoints/6 cannot be read" in capsys.readouterr().err
    _, at4 = restore_model(tmp_path / "tiny", step=4)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), fallback, at4)
    assert (ck.parent / "6").is_dir()  # inference leaves the run's files as they are
    for step in (2, 4):
        DAMAGE[damage](ck.parent / str(step))
    with pytest.raises(RestoreError) as e:
        restore_model(tmp_path / "tiny")
    assert all(f"checkpoints/{s}: " in str(e.value) for s in (2, 4, 6)), str(e.value)


def test_a_signal_asks_for_a_save_and_a_second_ctrl_c_stops_at_once():
    stop = StopRequest()
    with stop.on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: a request, like SIGTERM
        assert stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers before are back


@pytest.mark.slow
def test_sigterm_saves_the_current_step_exits_0_and_the_resume_is_bitwise(tmp_path, uninterrupted):
    """What TPU VMs and Kubernetes send before preemption: the run saves the step it is on and exits 0."""
    args = [*SMALL_RUN, f"train.output_dir={tmp_path}", "train.checkpoint_every=100"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args, "train.steps=400"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )

    def logged() -> int:
        try:
            return len(losses(tmp_path / "tiny"))
        except (OSError, ValueError):  # not written yet, or a line half written
            return 0

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and logged() < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 2 <= stopped < 6 and (tmp_path / "tiny" / "checkpoints" / str(stopped)).is_dir()
    train(small_cfg(tmp_path, "train.checkpoint_every=2", "train.steps=6"), resume=True, progress=False)
    assert losses(tmp_path / "tiny") == uninterrupted
