"""FP8 training quality: the same runs with ``model.fp8`` off and on, final validation losses compared.

For each seed (``train.seed``: initialization and data order), both runs use the same config, data
and steps (``dsjax.train.train``); only the FP8 recipe for the projections and experts changes
(DeepSeek-V3 §3.3). Reported: each seed's relative difference of the final validation loss, their mean,
and the seed-to-seed spread of the baseline itself (how much a tiny run moves for reasons that are
not FP8). ``--control`` adds, per seed, the baseline once more with its batch in two microbatches:
the same math, only the order of fp32 sums changes -- how far the run's own chaos moves the final
loss, the floor under which no comparison of two runs can see anything. Target: mean
relative difference <= 0.5% (V3 reports < 0.25% at scale).

``--branch-at STEP`` starts the FP8 (and control) runs from the baseline's own checkpoint at STEP
(weights, optimizer, router bias, data position) instead of from scratch: the pair then shares
everything up to STEP, so what a tiny run decides early (which experts win the routing) is the
same in both, and the difference is what FP8 does to training from there on. Each such run leaves
``branched_from.json`` in its directory, so ``--summarize`` never pools it with runs from scratch.

Pairs pile up over many calls (a lent GPU's 10-minute calls, sessions on a CPU): ``--summarize DIR...``
reads the runs already in those output directories, pairs them by seed, and prints the same report
over all of them -- the mean with its standard error and 95% interval, the median, how many pairs
meet the target, about how many pairs would bound the mean inside it at this spread, and whether
FP8 changes the spread of the final losses itself (each arm's, their correlation, a test). Run
directories stay on the machine that ran them; the pairs themselves are kept in the repository:
``--pairs bench/fp8_train_pairs.jsonl`` pools the pairs recorded there (every finished
from-scratch pair so far, with the machine it ran on) into the report, and ``--record`` appends the
directories' new pairs to that file -- refusing pairs of another experiment (the config, less
seed, names and the variants' own keys, is the file's first line) and a seed recorded with other
losses (a rerun elsewhere: run dirs do not repeat each other across machines). A call
cut short loses nothing: called again with the same output directory, a run that finished is
reused (these runs are deterministic) and one that has checkpoints resumes from its latest; a
branch cut off while its checkpoint was being copied is made again.

    python -m bench.fp8_train [--config configs/tiny.yaml] [--seeds 0 1 2] [--jobs 2] [--control]
                              [--branch-at STEP] [key=value ...]
    python -m bench.fp8_train --summarize runs/fp8_train [more output dirs ...]
    python -m bench.fp8_train --summarize [DIR ...] --pairs bench/fp8_train_pairs.jsonl [--record]
"""

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from bench.common import environment
from dsjax.config import ConfigError, apply_overrides, load_config

VARIANTS = {"baseline": [], "fp8": ["model.fp8=true"], "control": ["train.microbatches=2"]}
TARGET = 0.005  # |final validation loss, FP8 vs baseline| <= 0.5% relative
BRANCHED = "branched_from.json"  # in a --branch-at run's directory: the baseline and step it started from
ENVIRONMENT = "environment.json"  # in a finished run's directory: the machine and libraries it finished on


def exit_with_parent(parent: int) -> None:
    """In a worker: exit as soon as the process that started it is gone (killed, say), instead of
    training on as an orphan. A daemon thread checks once a second whose child this process is."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run(
    config: str, output_dir: str, variant: str, seed: int, overrides: list[str], branch_at: int | None = None
) -> dict:
    from dsjax.train import train
    from dsjax.train.checkpoint import run_dir

    name = f"{variant}_seed{seed}"
    cfg = load_config(
        config,
        [
            *overrides,
            *VARIANTS[variant],
            f"train.seed={seed}",
            f"train.run_name={name}",
            f"train.output_dir={output_dir}",
            "train.sample_tokens=0",
        ],
    )
    if prior := earlier(cfg, branch_at):
        return prior | {"reused": True}
    if branch_at is not None and branched_at(run_dir(cfg)) is None:
        branch(Path(output_dir) / f"baseline_seed{seed}", cfg, branch_at)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr), compiled_once(output_dir):  # stdout carries only the JSON
        last = train(cfg, resume=True, progress=False)  # from its latest checkpoint, if it has one
    minutes = (time.perf_counter() - t0) / 60
    run_dir(cfg).mkdir(parents=True, exist_ok=True)
    (run_dir(cfg) / ENVIRONMENT).write_text(json.dumps(environment()) + "\n")  # where its final loss came from
    return record(cfg, last["val_loss"], last["loss"]) | {"minutes": round(minutes, 2)}


@contextlib.contextmanager
def compiled_once(output_dir: str):
    """JAX's persistent compilation cache, in ``output_dir``, for the span of one run: every seed's
    runs compile the same train and eval programs, so only the first run of each variant compiles
    them (the tiny config's train step, on a 2-core CPU shared with two runs: 82 s to compile, 21 s
    to trace and load from the cache). One folder per machine, as an executable is built for the
    CPU it compiled on. A cache the user set (``JAX_COMPILATION_CACHE_DIR``) is used as it is."""
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    compilation_cache.set_cache_dir(
        str(Path(output_dir) / ".jax_cache" / re.sub(r"[^\w.-]+", "_", environment()["machine"]))
    )
    try:
        yield
    finally:  # off again: the cache set up at the run's first compile would outlive the setting
        compilation_cache.set_cache_dir(None)
        compilation_cache.reset_cache()


def earlier(cfg, branch_at: int | None) -> dict | None:
    """What an earlier call left in ``cfg``'s run directory: the record of a finished run (None if it
    has not finished; ``train`` then resumes it). Refused, naming the difference: a run there with
    other settings, or started otherwise (from scratch / branched at another step) -- continuing
    it would mix two experiments in one run."""
    from dsjax.train.checkpoint import has_checkpoints, run_dir

    rd = run_dir(cfg)
    if not (rd / "config.yaml").is_file():
        return None
    saved, now = flatten(load_config(rd / "config.yaml").to_dict()), flatten(cfg.to_dict())
    saved["train.output_dir"] = now["train.output_dir"]  # where it lies now, also if the dir was moved
    if saved != now:
        raise SystemExit(
            f"{rd} holds a run with other settings ({differing(saved, now)} differ); "
            f"pick a new --output-dir (nothing was overwritten)"
        )
    if (at := branched_at(rd)) != branch_at and (at is not None or has_checkpoints(rd) or metrics(rd)):
        raise SystemExit(
            f"{rd} holds a run {how(at)}, this call asks for one {how(branch_at)}; "
            f"pick a new --output-dir (nothing was overwritten)"
        )
    return final(rd, cfg)


def how(at: int | None) -> str:
    return "from scratch" if at is None else f"branched at step {at}"


def final(run_dir: Path, cfg) -> dict | None:
    """The record of a run that validated at its last step (``train.steps``); None before that."""
    rows = metrics(run_dir)
    evals, steps = [r for r in rows if "val_loss" in r], [r for r in rows if "loss" in r]
    if not evals or evals[-1]["step"] != cfg.train.steps:
        return None
    return record(cfg, evals[-1]["val_loss"], steps[-1]["loss"] if steps else None)


def record(cfg, val_loss: float, train_loss: float) -> dict:
    return {
        "seed": cfg.train.seed,
        "val_loss": val_loss,
        "train_loss": train_loss,
        "steps": cfg.train.steps,
        "dtype": cfg.model.dtype,
        "fp8_impl": cfg.model.fp8_impl,
    }


def branch(source: Path, cfg, step: int) -> None:
    """Seeds ``cfg``'s run directory with ``source``'s checkpoint at ``step`` and its metrics up to it.
    Built aside and moved in whole: a call cut off mid-copy leaves no half-branched run (which the
    next call would take for a run from scratch), only the side directory, which it rebuilds."""
    from dsjax.train import checkpoint as ckpt

    src, dst = source / "checkpoints" / str(step), ckpt.run_dir(cfg)
    if not (src / "commit_success.txt").is_file():
        raise SystemExit(
            f"--branch-at {step}: {source} has no complete checkpoint at step {step} "
            f"(train.checkpoint_every must divide it)"
        )
    if dst.exists() and any(dst.iterdir()):
        held = "checkpoints" if (dst / "checkpoints").exists() else "files of another run"
        raise SystemExit(f"--branch-at: {dst} already holds {held}; pick a new --output-dir (nothing was overwritten)")
    side = dst.with_name(f".{dst.name}.branching")  # ours alone; what a cut-off call left there is rebuilt
    shutil.rmtree(side, ignore_errors=True)
    shutil.copytree(src, side / "checkpoints" / str(step))
    rows = (source / "metrics.jsonl").read_text().splitlines()
    (side / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))
    ckpt.save_config(cfg, side)
    (side / BRANCHED).write_text(json.dumps({"source": str(source), "step": step}) + "\n")  # for --summarize
    if dst.exists():
        dst.rmdir()  # empty (checked above)
    side.rename(dst)


def branched_at(run_dir: Path) -> int | None:
    """The baseline step a ``--branch-at`` run started from; None for a run from scratch."""
    marker = run_dir / BRANCHED
    return json.loads(marker.read_text())["step"] if marker.is_file() else None


def collect(dirs: list[str]) -> tuple[dict, list[str], int | None, dict | None]:
    """The finished runs under the output directories ``dirs`` as {(variant, seed): record} (with
    the ``machine`` they finished on, where their ``environment.json`` says), the unfinished ones (their
    last validation before their own ``train.steps``) by directory, the step the FP8/control runs
    branched from their baselines at (None: from scratch), and the experiment: the flattened config
    every run shares (None if there are no runs).

    Refused, naming the runs: one whose config lacks its variant's settings, runs whose configs
    differ in anything but the seed, the names and the variants' own keys (pairs of different
    experiments), FP8/control runs started from scratch next to ones branched from a baseline
    checkpoint, or branched at different steps (their configs are the same; the marker ``branch``
    leaves tells them apart), and a variant of a seed finished twice with different losses (which one
    counts would be a guess; a rerun that repeats its loss, as these deterministic runs do, counts once)."""
    done, where, unfinished, shared, start = {}, {}, [], None, None

    for d in map(Path, dirs):
        if not d.is_dir():
            raise SystemExit(f"--summarize: {d} is not a directory")
        for rd in sorted(d.iterdir()):
            m = re.fullmatch(r"(baseline|fp8|control)_seed(\d+)", rd.name)
            if not (m and (rd / "config.yaml").is_file()):
                continue
            try:
                cfg = load_config(rd / "config.yaml")
            except ConfigError as e:
                raise SystemExit(f"--summarize: {rd}: {e}") from None
            if flatten(cfg.to_dict()) != flatten(apply_overrides(cfg.to_dict(), VARIANTS[m[1]])):
                raise SystemExit(f"--summarize: {rd} is named {m[1]} but its config lacks {VARIANTS[m[1]]}")
            rest = experiment(cfg)
            if shared is None:
                shared = (rd, rest)
            elif rest != shared[1]:
                raise SystemExit(
                    f"--summarize: {rd} and {shared[0]} are different experiments ({differing(rest, shared[1])} differ)"
                )
            if m[1] != "baseline":  # a baseline is the same run in both kinds of experiment
                at = branched_at(rd)
                if start is None:
                    start = (rd, at)
                elif at != start[1]:
                    raise SystemExit(
                        f"--summarize: {rd} was run {how(at)}, {start[0]} {how(start[1])}: different experiments"
                    )
            if (rec := final(rd, cfg)) is None:
                evals = [r["step"] for r in metrics(rd) if "val_loss" in r]
                last = f"step {evals[-1]}" if evals else "none yet"
                unfinished.append(f"{rd} (last validation: {last}; train.steps={cfg.train.steps})")
                continue
            if (rd / ENVIRONMENT).is_file():
                env = json.loads((rd / ENVIRONMENT).read_text())
                rec |= {"machine": env["machine"], "date": env["date"], "jax": env["jax"]}
            key = (m[1], cfg.train.seed)
            if key in where and done[key]["val_loss"] != rec["val_loss"]:
                raise SystemExit(
                    f"--summarize: {rd.name} finished in {where[key]} and in {rd} with different "
                    f"losses ({done[key]['val_loss']} vs {rec['val_loss']}); keep one of them"
                )
            where.setdefault(key, rd)
            done.setdefault(key, rec)
    return done, unfinished, start[1] if start else None, shared[1] if shared else None


def experiment(cfg) -> dict:
    """What a pair's two runs share with every other pair of the experiment: the flattened config
    less the seed, the run's name and place, and the variants' own keys."""
    per_run = {"train.seed", "train.run_name", "train.output_dir", "train.keep_checkpoints"}
    per_run |= {o.split("=")[0] for v in VARIANTS.values() for o in v}
    return {k: v for k, v in flatten(cfg.to_dict()).items() if k not in per_run}


def recorded(path: Path) -> tuple[dict, list[dict]]:
    """A pairs file: its experiment (first line) and its pairs {seed, baseline, fp8, machine, date, jax}."""
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines or "experiment" not in (head := json.loads(lines[0])):
        raise SystemExit(f"--pairs: {path} is not a pairs file (its first line names the experiment)")
    return head["experiment"], [json.loads(line) for line in lines[1:] if line.strip()]


def with_recorded(done: dict, experiment_: dict | None, branch_at: int | None, path: Path) -> tuple[dict, list[dict]]:
    """The runs ``collect`` found, with the pairs recorded in ``path`` added as runs; also the
    directories' pairs the file does not hold yet (for ``--record``). Refused, naming the cause:
    pairs of another experiment, branched runs (the file holds pairs from scratch), a seed recorded
    with other losses, and a new pair whose two runs finished on different machines."""
    kept, pairs = recorded(path)
    if experiment_ is not None and experiment_ != kept:
        raise SystemExit(f"--pairs: {path} records another experiment ({differing(kept, experiment_)} differ)")
    if branch_at is not None:
        raise SystemExit(f"--pairs: the runs were branched at step {branch_at}; {path} records pairs from scratch")
    out, new = dict(done), []
    for p in pairs:
        for v in ("baseline", "fp8"):
            run = out.get((v, p["seed"]))
            if run is not None and run["val_loss"] != p[v]:
                raise SystemExit(
                    f"--pairs: seed {p['seed']}'s {v} run ended at {run['val_loss']}, {path} records "
                    f"{p[v]} (on {p['machine']}); a rerun elsewhere is another pair: use a new seed"
                )
            out[v, p["seed"]] = {"seed": p["seed"], "val_loss": p[v], "machine": p["machine"], "recorded": True}
    held = {p["seed"] for p in pairs}
    for (v, seed), run in sorted(done.items()):
        if v == "fp8" and seed not in held and (base := done.get(("baseline", seed))):
            if None not in (run.get("machine"), base.get("machine")) and run["machine"] != base["machine"]:
                raise SystemExit(
                    f"--pairs: seed {seed}'s runs finished on {base['machine']} and {run['machine']}: "
                    "not a pair (one machine runs both)"
                )
            new.append(
                {
                    "seed": seed,
                    "baseline": base["val_loss"],
                    "fp8": run["val_loss"],
                    **{k: run.get(k) or base.get(k) for k in ("machine", "date", "jax")},
                }
            )
    return out, new


def differing(a: dict, b: dict) -> str:
    """The keys whose values differ between two flattened configs (a key missing from one counts)."""
    return ", ".join(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


def metrics(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl rows, up to a line cut short by a run stopped mid-write."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def summary(rel: list[float]) -> dict:
    """How well the pairs pin the mean relative difference: its standard error and 95% interval
    (Student t), the median, the pairs within the target, and about how many pairs would put the
    95% interval inside the target at this mean and spread (normal approximation)."""
    n, mean = len(rel), statistics.fmean(rel)
    out = {
        "pairs": n,
        "mean_relative_difference": round(mean, 5),
        "median_relative_difference": round(statistics.median(rel), 5),
        "pairs_within_target": sum(abs(r) <= TARGET for r in rel),
    }
    if n > 1:
        from scipy.stats import t

        sd = statistics.stdev(rel)
        se, half = sd / math.sqrt(n), t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        out |= {
            "standard_error": round(se, 5),
            "interval_95": [round(mean - half, 5), round(mean + half, 5)],
            "pairs_for_interval_inside_target": math.ceil((1.96 * sd / (TARGET - abs(mean))) ** 2)
            if abs(mean) < TARGET
            else None,
        }
    return out


def spread(base: dict, done: dict, seeds: list[int]) -> dict:
    """Whether FP8 moves where a seed's run ends up, beyond its mean: each arm's seed-to-seed spread
    of the final loss (standard deviation / mean) over the paired seeds, the correlation of a seed's
    two losses (how much of the chaos the pairing shares) and the Brown-Forsythe test's p-value for
    equal spreads (Levene's, centred on the medians: robust to the heavy tails of the forks)."""
    b, f = [base[s]["val_loss"] for s in seeds], [done["fp8", s]["val_loss"] for s in seeds]
    if len(seeds) < 3 or len(set(b)) < 2 or len(set(f)) < 2:  # no spread to compare
        return {}
    from scipy.stats import levene

    rel_sd = lambda x: round(statistics.stdev(x) / statistics.fmean(x), 5)  # noqa: E731
    return {
        "seed_spread": {"baseline": rel_sd(b), "fp8": rel_sd(f)},
        "seed_correlation": round(statistics.correlation(b, f), 4),
        "equal_spread_p": float(f"{levene(b, f, center='median').pvalue:.3g}"),
    }


def report(done: dict, header: dict) -> dict:
    """FP8 (and control) against the baseline, over every seed that has both runs of a pair."""
    base = {s: r for (v, s), r in sorted(done.items()) if v == "baseline"}
    losses = [r["val_loss"] for r in base.values()]
    out = {
        "benchmark": "fp8_train",
        **header,
        "baseline": list(base.values()),
        "baseline_seed_spread": round(statistics.stdev(losses) / statistics.fmean(losses), 5)
        if len(losses) > 1
        else None,
    }
    for v, name in (("fp8", "val_loss"), ("control", "control")):
        seeds = sorted(s for w, s in done if w == v and s in base)
        if not seeds:
            continue
        rel = [done[v, s]["val_loss"] / base[s]["val_loss"] - 1 for s in seeds]
        out |= {v: [done[v, s] for s in seeds], f"{name}_relative_difference": [round(r, 5) for r in rel]}
        out |= summary(rel) | spread(base, done, seeds) if v == "fp8" else {"control_summary": summary(rel)}
        machines = {base[s].get("machine") for s in seeds}
        if v == "fp8" and len(machines) > 1:  # pairs of several machines: each machine's own report
            out["by_machine"] = {
                str(h): summary([r for s, r in zip(seeds, rel) if base[s].get("machine") == h])
                for h in sorted(machines, key=str)
            }
    return out | {"target_abs_mean_relative_difference": TARGET}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--output-dir", default="runs/fp8_train")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--jobs", type=int, default=1, choices=range(1, 9), metavar="1..8", help="runs at once, one process each"
    )
    ap.add_argument("--control", action="store_true", help="per seed, also the baseline in two microbatches")
    ap.add_argument(
        "--branch-at",
        type=int,
        metavar="STEP",
        help="start the FP8 and control runs from the baseline's checkpoint at STEP",
    )
    ap.add_argument(
        "--summarize", nargs="*", metavar="DIR", help="report the finished runs in these output dirs; run nothing"
    )
    ap.add_argument("--pairs", type=Path, metavar="FILE", help="with --summarize: pool the pairs recorded in FILE")
    ap.add_argument("--record", action="store_true", help="with --pairs: append the dirs' new pairs to FILE")
    ap.add_argument("overrides", nargs="*", help="section.key=value, applied to every run")
    a = ap.parse_args(argv)
    if (a.pairs or a.record) and a.summarize is None or a.record and not a.pairs:
        ap.error("--pairs goes with --summarize, --record with --pairs")
    if a.summarize is not None:
        if not (a.summarize or a.pairs):
            ap.error("--summarize: name output directories, or a --pairs file")
        done, unfinished, branch_at, exp = collect(a.summarize)
        new = []
        if a.pairs:
            done, new = with_recorded(done, exp, branch_at, a.pairs)
        if not any(v == "fp8" and ("baseline", s) in done for v, s in done):
            raise SystemExit(
                f"--summarize: no finished baseline/fp8 pair in {' '.join(a.summarize)}; unfinished: {unfinished}"
            )
        here = environment()
        header = {
            "date": here["date"],
            "summarized": a.summarize,
            "pairs_file": str(a.pairs) if a.pairs else None,
            "branch_at": branch_at,
            "unfinished": unfinished,
        }
        if a.record:
            with a.pairs.open("a") as f:
                for p in new:  # a run without environment.json finished before it was written: here
                    p |= {k: p[k] or here[k] for k in ("machine", "date", "jax")}
                    f.write(json.dumps(p) + "\n")
                    for v in ("baseline", "fp8"):  # and the report says so too
                        done[v, p["seed"]]["machine"] = p["machine"]
            header["recorded"] = [p["seed"] for p in new]
        out = report(done, header)
        print(json.dumps(out, indent=2))
        return out
    variants = ["baseline", "fp8", *(["control"] if a.control else [])]
    overrides = a.overrides
    if a.branch_at is not None:  # checked before anything runs; the baselines keep every checkpoint
        t = load_config(a.config, overrides).train
        if not 0 < a.branch_at < t.steps or a.branch_at % t.checkpoint_every:
            ap.error(
                f"--branch-at {a.branch_at}: must lie in (0, train.steps={t.steps}) "
                f"and be a multiple of train.checkpoint_every={t.checkpoint_every}"
            )
        overrides = [*overrides, f"train.keep_checkpoints={t.steps // t.checkpoint_every + 1}"]
    runs = [(a.config, a.output_dir, v, seed, overrides) for seed in a.seeds for v in variants]
    # with --branch-at, the baselines run first and every other run starts from one of them
    phases = (
        [runs]
        if a.branch_at is None
        else [[r for r in runs if r[2] == "baseline"], [(*r, a.branch_at) for r in runs if r[2] != "baseline"]]
    )
    done = {}
    for phase in phases:
        if a.jobs > 1:
            ctx, parent = get_context("spawn"), os.getpid()
            with ProcessPoolExecutor(a.jobs, mp_context=ctx, initializer=exit_with_parent, initargs=(parent,)) as pool:
                done.update(zip([r[2:4] for r in phase], pool.map(run, *zip(*phase))))
        else:
            done.update({r[2:4]: run(*r) for r in phase})
    out = report(done, {**environment(), "config": a.config, "overrides": a.overrides, "branch_at": a.branch_at})
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
