"""Several JAX processes on this machine (``dsjax-launch``: jax.distributed over localhost, CPU
collectives over gloo) train like one process with all their devices; each reads only its own rows
of a batch; only process 0 writes; their checkpoint restores onto other process counts; a process
that dies stops the others."""

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

from dsjax.config import load_config
from dsjax.train import restore_model, train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
RUN = ["train.batch_size=8", "train.seq_len=32", "model.num_hidden_layers=2", "model.vocab_size=264",
       "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "train.log_every=1", "train.eval_every=2",
       "train.eval_batches=1", "train.checkpoint_every=2", "train.sample_tokens=0", "train.warmup_steps=2"]  # fmt: skip


def launch(n: int, devices: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dsjax.cli.launch", "-n", str(n), "--devices", str(devices), "--", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_on_one_and_on_four(tmp_path):
    out = f"train.output_dir={tmp_path}"
    train_py = [sys.executable, "train.py", "--config", str(TINY), *RUN, out]
    two = launch(2, 4, *train_py, "train.run_name=two", "train.steps=4")
    assert two.returncode == 0, two.stdout[-3000:]
    assert "(8 cpu device(s), 2 process(es))" in two.stdout
    # one process with all 8 devices (this test process: tests/conftest.py), the same mesh
    train(load_config(TINY, [*RUN, out, "train.run_name=one", "train.steps=6"]), progress=False)
    one = losses(tmp_path / "one")
    got = losses(tmp_path / "two")
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in got], [one[s] for s in got], rtol=1e-5)

    # process 0 alone wrote the run's files: each step once, one TensorBoard event file
    rows = [json.loads(x)["step"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert rows.count(4) == 2  # step 4's training row and its validation row, once each
    assert len(list((tmp_path / "two" / "tb").glob("events.*"))) == 1

    # the 2-process checkpoint onto one process (inference) ...
    _, a = restore_model(tmp_path / "two", step=4)
    _, b = restore_model(tmp_path / "one", step=4)
    diff = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    print(f"\n2 processes vs 1 after 4 steps: max |parameter difference| = {diff:.1e}")
    assert diff <= 1e-5  # gloo and in-process collectives sum in other orders; Adam's m / sqrt(v) shows it
    # ... and onto 4 processes of 2 devices, which resume the run to step 6
    four = launch(4, 2, *train_py, "train.run_name=two", "train.steps=6", "--resume")
    assert four.returncode == 0, four.stdout[-3000:]
    got = losses(tmp_path / "two")
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [one[s] for s in range(1, 7)], rtol=1e-5)


ROWS = """
import json, numpy as np, jax
from dsjax.config import MeshConfig
from dsjax.parallel.distributed import initialize
initialize()
from dsjax.parallel.mesh import global_arrays, make_mesh
from dsjax.parallel.rules import batch_sharding

seen = set()  # the rows of the global batch this process reads
make = jax.make_array_from_callback
def recording(shape, sharding, callback):
    def read(idx):
        seen.update(range(*idx[0].indices(shape[0])))
        return callback(idx)
    return make(shape, sharding, read)
jax.make_array_from_callback = recording

mesh = make_mesh(MeshConfig(data=2, fsdp=2, expert=2))
x = global_arrays(np.arange(16 * 3).reshape(16, 3), batch_sharding(mesh))
print(json.dumps({"process": jax.process_index(), "rows": sorted(seen)}))
"""


@pytest.mark.slow
def test_each_process_reads_only_its_own_rows_of_a_batch():
    r = launch(2, 4, sys.executable, "-c", ROWS, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    seen = {}
    for line in r.stdout.splitlines():
        if '"rows"' in line:
            report = json.loads(line.split("] ", 1)[1])
            seen[report["process"]] = set(report["rows"])
    assert set(seen) == {0, 1} and len(seen[0]) == len(seen[1]) == 8
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(16))  # none twice, none skipped


@pytest.mark.slow
def test_a_process_that_dies_stops_the_others_within_a_minute(tmp_path):
    train_py = [sys.executable, "train.py", "--config", str(TINY), *RUN, f"train.output_dir={tmp_path}"]
    cmd = [sys.executable, "-m", "dsjax.cli.launch", "-n", "2", "--devices", "4", "--", *train_py, "train.steps=1000"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "tiny" / "metrics.jsonl", time.time() + 300  # 2 steps logged: both running
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    victim = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_process(int(p), 1, str(tmp_path)))
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    out, err = launcher.communicate(timeout=120)
    assert time.time() - killed < 60 and launcher.returncode != 0, (launcher.returncode, out[-2000:], err[-2000:])
    assert "dsjax-launch: process 1 exited with signal SIGKILL; stopping the others" in err


def _is_process(pid: int, process_id: int, run: str) -> bool:
    """Whether pid is the launched process ``process_id`` of the run writing to ``run``."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return f"DSJAX_PROCESS_ID={process_id}".encode() in env and run in cmdline and "dsjax.cli.launch" not in cmdline
