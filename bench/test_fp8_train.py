"""bench.fp8_train's harness: pairing runs by seed across output dirs, the summary statistics
against numpy / scipy written out, branched runs kept apart, a cut-short call picked up, one
compilation per machine, and the pairs record."""

import json
import math
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import dsjax.train
from dsjax.config import load_config
from dsjax.train import checkpoint as ckpt

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _fake_run(out: Path, variant: str, seed: int, final: float, done=300, extra=(), cut=False):
    """A finished-looking bench.fp8_train run: its saved config and metrics rows (no training)."""
    from bench.fp8_train import VARIANTS

    cfg = load_config(
        TINY,
        [
            *extra,
            *VARIANTS[variant],
            f"train.seed={seed}",
            f"train.run_name={variant}_seed{seed}",
            f"train.output_dir={out}",
            "train.steps=300",
        ],
    )
    ckpt.save_config(cfg, out / f"{variant}_seed{seed}")
    rows = [{"step": s, "loss": 9.0} for s in (10, 20)]
    rows += [{"step": s, "val_loss": final if s == done else 2.5} for s in range(100, done + 1, 100)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 310, "lo' if cut else "")
    (out / f"{variant}_seed{seed}" / "metrics.jsonl").write_text(text)


def test_fp8_quality_summary_pools_pairs_across_output_dirs(tmp_path):
    """`bench.fp8_train --summarize`: pairs by seed over several output dirs, unfinished runs set
    aside, a repeated run counted once; mean, standard error and the t-interval against numpy and
    the tabulated t quantile (df 4: 2.7764), and the pairs that bound the mean inside 0.5%."""
    from bench.fp8_train import main

    a, b = tmp_path / "a", tmp_path / "b"
    base = [2.0, 1.9, 1.95, 2.05, 1.98]
    fp8 = [2.01, 1.88, 1.97, 2.05, 2.02]
    for s in range(5):
        _fake_run(a if s < 3 else b, "baseline", s, base[s])
        _fake_run(a if s % 2 else b, "fp8", s, fp8[s], cut=s == 4)
    _fake_run(b, "baseline", 1, base[1])  # a rerun, same result: counted once
    _fake_run(b, "fp8", 7, 2.2, done=200)  # stopped at step 200: unfinished, not paired
    out = main(["--summarize", str(a), str(b)])
    rel = np.array(fp8) / np.array(base) - 1
    assert out["pairs"] == 5 and [r["seed"] for r in out["fp8"]] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(out["val_loss_relative_difference"], rel, atol=1e-5)
    np.testing.assert_allclose(out["mean_relative_difference"], rel.mean(), atol=1e-5)
    se = rel.std(ddof=1) / math.sqrt(5)
    np.testing.assert_allclose(out["standard_error"], se, atol=1e-5)
    np.testing.assert_allclose(out["interval_95"], [rel.mean() - 2.7764 * se, rel.mean() + 2.7764 * se], atol=1e-5)
    assert out["pairs_within_target"] == int((np.abs(rel) <= 0.005).sum())
    need = (1.96 * rel.std(ddof=1) / (0.005 - abs(rel.mean()))) ** 2
    assert out["pairs_for_interval_inside_target"] == math.ceil(need)
    assert len(out["unfinished"]) == 1 and "fp8_seed7" in out["unfinished"][0] and "step 200" in out["unfinished"][0]
    assert "control" not in out
    # each arm's spread, their correlation, and the Brown-Forsythe test of equal spreads written out:
    # a one-way ANOVA F on the distances from each arm's median
    x, y = np.array(base), np.array(fp8)
    for arm, v in (("baseline", x), ("fp8", y)):
        np.testing.assert_allclose(out["seed_spread"][arm], v.std(ddof=1) / v.mean(), atol=1e-5)
    np.testing.assert_allclose(out["seed_correlation"], np.corrcoef(x, y)[0, 1], atol=1e-4)
    z = [np.abs(v - np.median(v)) for v in (x, y)]
    zbar = np.concatenate(z).mean()
    f_stat = 8 * sum(5 * (zi.mean() - zbar) ** 2 for zi in z) / sum(((zi - zi.mean()) ** 2).sum() for zi in z)
    np.testing.assert_allclose(out["equal_spread_p"], scipy.stats.f.sf(f_stat, 1, 8), rtol=1e-3)


def test_fp8_quality_branched_runs_are_marked_and_never_pooled_with_runs_from_scratch(tmp_path, monkeypatch):
    """`--branch-at`'s runs start from their baseline's checkpoint (copied, with the metrics up to it)
    and say so in a marker; `--summarize` reports the step, and refuses to pool them with FP8 runs
    from scratch, whose configs are the same. A branch cut off midway leaves no run behind."""
    from bench.fp8_train import branch, branched_at, main

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for s in (0, 1):
        _fake_run(a, "baseline", s, 2.0 + s / 10)
        (a / f"baseline_seed{s}" / "checkpoints" / "200").mkdir(parents=True)
        (a / f"baseline_seed{s}" / "checkpoints" / "200" / "commit_success.txt").write_text("")
        cfg = load_config(
            TINY, ["model.fp8=true", f"train.seed={s}", f"train.run_name=fp8_seed{s}", f"train.output_dir={b}"]
        )
        branch(a / f"baseline_seed{s}", cfg, 200)
        started = [json.loads(r) for r in (b / f"fp8_seed{s}" / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in started) == 200 and (b / f"fp8_seed{s}" / "checkpoints" / "200").is_dir()
        _fake_run(b, "fp8", s, 2.01 + s / 10)  # as if it had trained on to step 300
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        branch(a / "baseline_seed0", cfg, 200)  # a run that already has checkpoints is never overwritten

    cut = load_config(TINY, ["model.fp8=true", "train.seed=0", "train.run_name=fp8_seed0", f"train.output_dir={c}"])
    with monkeypatch.context() as m:  # the call is cut off after the checkpoint was copied
        m.setattr(ckpt, "save_config", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            branch(a / "baseline_seed0", cut, 200)
    assert not (c / "fp8_seed0").exists()  # no half-branched run, which a next call would take for one from scratch
    branch(a / "baseline_seed0", cut, 200)  # the next call branches it whole
    assert branched_at(c / "fp8_seed0") == 200 and (c / "fp8_seed0" / "checkpoints" / "200").is_dir()
    assert [p.name for p in c.iterdir()] == ["fp8_seed0"]
    (c / "fp8_seed0" / "checkpoints").rename(c / "moved")  # left: files of a run, e.g. one from scratch just started
    with pytest.raises(SystemExit, match="already holds files of another run"):
        branch(a / "baseline_seed0", cut, 200)
    shutil.rmtree(c)
    out = main(["--summarize", str(a), str(b)])
    assert out["branch_at"] == 200 and out["pairs"] == 2
    _fake_run(c, "fp8", 2, 2.2)
    _fake_run(c, "baseline", 2, 2.2)
    assert main(["--summarize", str(c)])["branch_at"] is None
    with pytest.raises(
        SystemExit, match=f"{c / 'fp8_seed2'} was run from scratch, {b / 'fp8_seed0'} branched at step 200"
    ):
        main(["--summarize", str(a), str(b), str(c)])


def test_fp8_quality_call_cut_short_picks_up_where_it_stopped(tmp_path, monkeypatch):
    """Called again on the same output dir, `bench.fp8_train` reuses a finished run (no training),
    resumes one with checkpoints, and starts the missing ones; a run dir left by a different
    experiment (other settings, or from scratch where this call branches) is refused, untouched."""
    from bench.fp8_train import main

    calls = []

    def fake_train(cfg, resume=False, progress=True):  # records the call instead of training
        calls.append((cfg.train.run_name, resume))
        return {"step": cfg.train.steps, "val_loss": 2.25, "loss": 2.0}

    monkeypatch.setattr(dsjax.train, "train", fake_train)
    same = ["train.sample_tokens=0"]  # what bench.fp8_train sets on every run
    was, out = tmp_path / "was", tmp_path / "out"
    _fake_run(was, "baseline", 0, 2.0, extra=same)  # finished
    _fake_run(was, "fp8", 0, 2.1, done=200, extra=same)  # cut after its step-200 checkpoint
    (was / "fp8_seed0" / "checkpoints" / "200").mkdir(parents=True)
    was.rename(out)  # moved since: still the same runs
    report = main(["--seeds", "0", "1", "--output-dir", str(out)])
    assert calls == [("fp8_seed0", True), ("baseline_seed1", True), ("fp8_seed1", True)]
    assert report["baseline"][0]["val_loss"] == 2.0 and report["baseline"][0]["reused"]
    assert [r["val_loss"] for r in report["fp8"]] == [2.25, 2.25]

    calls.clear()
    other = tmp_path / "other"
    _fake_run(other, "baseline", 0, 2.0, extra=[*same, "train.learning_rate=0.001"])
    with pytest.raises(
        SystemExit, match=r"baseline_seed0 holds a run with other settings \(train.learning_rate differ\)"
    ):
        main(["--seeds", "0", "--output-dir", str(other)])
    scratch = tmp_path / "scratch"  # an FP8 run from scratch where a --branch-at call would branch
    _fake_run(scratch, "baseline", 0, 2.0, extra=[*same, "train.keep_checkpoints=4"])
    _fake_run(scratch, "fp8", 0, 2.1, done=200, extra=[*same, "train.keep_checkpoints=4"])
    (scratch / "fp8_seed0" / "checkpoints" / "200").mkdir(parents=True)
    with pytest.raises(
        SystemExit, match="fp8_seed0 holds a run from scratch, this call asks for one branched at step 200"
    ):
        main(["--seeds", "0", "--branch-at", "200", "--output-dir", str(scratch)])
    assert calls == [] and (scratch / "fp8_seed0" / "checkpoints" / "200").is_dir()


def test_fp8_quality_runs_compile_once_per_machine(tmp_path, monkeypatch):
    """Each run of `bench.fp8_train` uses a persistent compilation cache in its output dir, one folder
    per machine: a later seed's runs load what the first compiled (no new entry); outside a run
    nothing is cached, and a cache the user set is left alone."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even this test's tiny program
    try:
        _check_runs_compile_once(tmp_path, monkeypatch)
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()


def _check_runs_compile_once(tmp_path, monkeypatch):
    from bench.common import environment
    from bench.fp8_train import main

    seen = []

    def fake_train(cfg, resume=False, progress=True):  # compiles the same program in every run
        seen.append(jax.config.jax_compilation_cache_dir)
        jax.jit(lambda x: jnp.tanh(x) * 3.0 + cfg.train.steps).lower(jnp.ones(7)).compile()
        return {"step": cfg.train.steps, "val_loss": 2.25, "loss": 2.0}

    monkeypatch.setattr(dsjax.train, "train", fake_train)
    jax.jit(lambda x: x - 2.0).lower(jnp.ones(2)).compile()  # a process that compiled before, uncached
    out = tmp_path / "out"
    main(["--seeds", "0", "--output-dir", str(out)])
    cache = out / ".jax_cache"
    assert [p.name for p in cache.iterdir()] == [re.sub(r"[^\w.-]+", "_", environment()["machine"])]
    entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert entries and set(seen) == {str(next(cache.iterdir()))}
    main(["--seeds", "1", "--output-dir", str(out)])
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == entries  # loaded, not compiled again
    assert jax.config.jax_compilation_cache_dir is None  # and off again after the runs
    jax.jit(lambda x: x * 5.0 - 1.0).lower(jnp.ones(3)).compile()
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == entries

    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    seen.clear()
    main(["--seeds", "2", "--output-dir", str(out)])
    assert set(seen) == {str(tmp_path / "mine")} and jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")


@pytest.mark.parametrize("case", ["rerun differs", "other experiment", "mislabeled"])
def test_fp8_quality_summary_refuses_runs_it_cannot_pair(tmp_path, case):
    from bench.fp8_train import main

    a, b = tmp_path / "a", tmp_path / "b"
    _fake_run(a, "baseline", 0, 2.0)
    _fake_run(a, "fp8", 0, 2.01)
    if case == "rerun differs":
        _fake_run(b, "fp8", 0, 2.02)
        match = "fp8_seed0 finished in .* with different losses"
    elif case == "other experiment":
        _fake_run(b, "fp8", 1, 2.02, extra=["train.learning_rate=0.001"])
        match = "different experiments \\(train.learning_rate differ\\)"
    else:
        _fake_run(b, "baseline", 1, 2.02)
        (b / "baseline_seed1").rename(b / "fp8_seed1")
        match = "named fp8 but its config lacks"
    with pytest.raises(SystemExit, match=match):
        main(["--summarize", str(a), str(b)])


def test_fp8_quality_pairs_file_pools_recorded_pairs_and_records_new_ones(tmp_path, monkeypatch):
    """`--summarize DIR --pairs FILE`: the pairs recorded in FILE (the repository's record; run dirs
    stay on the machine that ran them) pool with the dirs' finished pairs, one report per machine;
    `--record` appends only the pairs FILE lacks, each with the machine it finished on (a run's
    environment.json, else this machine). Pairs of another experiment, branched runs, a seed recorded
    with other losses and a pair split over two machines are refused, the file untouched."""
    from bench import fp8_train
    from bench.fp8_train import experiment, main

    monkeypatch.setattr(fp8_train, "environment", lambda: {"machine": "here", "date": "2026-12-02", "jax": "0.12"})
    exp = experiment(load_config(TINY, ["train.steps=300"]))  # what _fake_run's runs share
    pairs = tmp_path / "pairs.jsonl"
    head = json.dumps({"experiment": exp}) + "\n"
    old = [
        {"seed": 0, "baseline": 2.0, "fp8": 2.03, "machine": "A"},
        {"seed": 1, "baseline": 1.9, "fp8": 1.88, "machine": "A"},
    ]
    pairs.write_text(head + "".join(json.dumps(p) + "\n" for p in old))
    d = tmp_path / "runs"
    for seed, b, f in ((1, 1.9, 1.88), (2, 1.95, 1.96), (3, 2.05, 2.0)):  # seed 1: the recorded pair, found again
        _fake_run(d, "baseline", seed, b)
        _fake_run(d, "fp8", seed, f)
    for v in ("baseline", "fp8"):  # seed 2 finished where environment.json says; seed 3 before it was written
        (d / f"{v}_seed2" / "environment.json").write_text(
            json.dumps({"machine": "B", "date": "2026-12-01", "jax": "0.11.2"})
        )

    out = main(["--summarize", str(d), "--pairs", str(pairs)])
    rel = np.array([2.03 / 2.0, 1.88 / 1.9, 1.96 / 1.95, 2.0 / 2.05]) - 1
    assert out["pairs"] == 4 and "recorded" not in out
    np.testing.assert_allclose(out["mean_relative_difference"], rel.mean(), atol=1e-5)
    np.testing.assert_allclose(out["standard_error"], rel.std(ddof=1) / 2, atol=1e-5)
    assert (
        out["by_machine"]["A"]["pairs"] == 2
        and out["by_machine"]["B"]["pairs"] == 1
        and out["by_machine"]["None"]["pairs"] == 1
    )
    np.testing.assert_allclose(out["by_machine"]["A"]["mean_relative_difference"], rel[:2].mean(), atol=1e-5)
    assert pairs.read_text() == head + "".join(json.dumps(p) + "\n" for p in old)  # without --record: unchanged

    recording = main(["--summarize", str(d), "--pairs", str(pairs), "--record"])
    assert recording["recorded"] == [2, 3] and set(recording["by_machine"]) == {"A", "B", "here"}
    rows = [json.loads(r) for r in pairs.read_text().splitlines()[1:]]
    assert [(r["seed"], r["baseline"], r["fp8"], r["machine"], r["date"]) for r in rows[2:]] == [
        (2, 1.95, 1.96, "B", "2026-12-01"),
        (3, 2.05, 2.0, "here", "2026-12-02"),
    ]
    assert main(["--summarize", str(d), "--pairs", str(pairs), "--record"])["recorded"] == []  # nothing twice
    alone = main(["--summarize", "--pairs", str(pairs)])  # the record alone: the same report
    np.testing.assert_allclose(alone["mean_relative_difference"], rel.mean(), atol=1e-5)
    assert alone["by_machine"]["here"]["pairs"] == 1

    kept = pairs.read_text()
    other, rerun, branched, split = (tmp_path / n for n in ("other", "rerun", "branched", "split"))
    _fake_run(other, "baseline", 5, 2.0, extra=["train.learning_rate=0.001"])
    _fake_run(rerun, "baseline", 0, 2.01)  # seed 0 again, elsewhere: not the recorded pair
    _fake_run(branched, "baseline", 6, 2.0)
    _fake_run(branched, "fp8", 6, 2.0)
    (branched / "fp8_seed6" / "branched_from.json").write_text(json.dumps({"source": "x", "step": 200}))
    for v, host in (("baseline", "B"), ("fp8", "C")):
        _fake_run(split, v, 7, 2.0)
        (split / f"{v}_seed7" / "environment.json").write_text(json.dumps({"machine": host, "date": "d", "jax": "j"}))
    for where, match in (
        (other, r"records another experiment \(train.learning_rate differ\)"),
        (rerun, "seed 0's baseline run ended at 2.01, .* records 2.0 \\(on A\\)"),
        (branched, "branched at step 200; .* records pairs from scratch"),
        (split, "seed 7's runs finished on B and C: not a pair"),
    ):
        with pytest.raises(SystemExit, match=match):
            main(["--summarize", str(where), "--pairs", str(pairs), "--record"])
    assert pairs.read_text() == kept
    with pytest.raises(SystemExit, match="not a pairs file"):
        main(["--summarize", "--pairs", str(tmp_path / "missing.jsonl")])


ORPHANS = """
import json, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from bench.fp8_train import exit_with_parent


def pid(_):
    time.sleep(1.0)  # long enough for the task to go to each worker
    return os.getpid()


def sleep(_):
    time.sleep(600)


if __name__ == "__main__":
    ctx = get_context("spawn")
    pool = ProcessPoolExecutor(2, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),))
    pids = set(pool.map(pid, range(4)))
    [pool.submit(sleep, i) for i in range(2)]
    print(json.dumps(sorted(pids)), flush=True)
    time.sleep(600)
"""


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """bench.fp8_train --jobs N runs in a process pool: killing the parent (SIGKILL: no cleanup) no
    longer leaves its workers training on as orphans."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "orphans.py"
    script.write_text(ORPHANS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    workers = json.loads(parent.stdout.readline())
    assert len(workers) == 2 and all(Path(f"/proc/{p}").exists() for p in workers)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.1)
    alive = [
        p for p in workers if Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
    ]
    assert alive == []
