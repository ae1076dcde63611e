"""The training loop: a run directory, the mesh, checkpoints, metrics, evaluation and a sample.

    from dsjax.config import load_config
    from dsjax.train import train
    last = train(load_config("configs/tiny.yaml", ["train.steps=100"]), resume=False)

A run directory ``<output_dir>/<run_name>/`` gets: config.yaml, checkpoints/ (orbax), metrics.jsonl,
tb/ (TensorBoard events), loss.png and sample.txt. Resuming restores the newest checkpoint that reads
back (state and data iterator position; a damaged one is named and set aside) and continues bitwise
as if never stopped. SIGTERM or a first Ctrl-C saves the current step and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from dsjax.config import Config, ConfigError, load_config
from dsjax.hf.config import HF_FIELDS
from dsjax.infer.generate import generate
from dsjax.model.attention import resolve_impl as attention_impl
from dsjax.model.moe import BIAS
from dsjax.model.params import count_params
from dsjax.model.transformer import build_model
from dsjax.parallel.mesh import check_divisible, global_arrays, make_mesh
from dsjax.parallel.rules import batch_sharding
from dsjax.train import checkpoint as ckpt
from dsjax.train.checkpoint import has_checkpoints, run_dir, save_config
from dsjax.train.data import eval_batches, load_splits, make_tokenizer, train_batches
from dsjax.train.step import abstract_state, init_state_sharded, make_eval_step, make_train_step, state_shardings
from pallas_kernels.platform import resolve_impl as fp8_impl

# The step's metrics written to metrics.jsonl ("indexer": DSA's KL, with index_topk > 0).
LOGGED = ("loss", "ce", "mtp", "balance", "indexer", "grad_norm", "lr", "load_max_mean", "dropped")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and where the last good checkpoint is."""


def evaluate(eval_fn, state, batches, bytes_per_token: float) -> dict[str, float]:
    """Validation loss (nats / token) and bits per byte over fixed batches."""
    nats = count = 0.0
    for b in batches:
        s, n = eval_fn(state.params, state.bias, b)
        nats, count = nats + float(s), count + float(n)
    loss = nats / max(count, 1)
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}


def sample(cfg: Config, variables, tokenizer) -> str:
    """A text sample from the trained model: temperature 0.8, top-k 20, from the latent cache."""
    t = cfg.train
    prompt = [tokenizer.bos_id, *tokenizer.encode(t.sample_prompt.encode()).tolist()]
    out = generate(
        cfg.model,
        variables,
        [prompt],
        t.sample_tokens,
        temperature=0.8,
        top_k=20,
        eos_id=tokenizer.eos_id,
        rng=jax.random.key(t.seed),
    )
    return t.sample_prompt + tokenizer.decode(np.asarray(out.tokens[0, : int(out.lengths[0])]))


def plot(metrics_path: Path, out: Path) -> None:
    """loss.png from metrics.jsonl (a bare Figure: no pyplot, the caller's matplotlib backend untouched)."""
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [(r["step"], r["ce"]) for r in rows if "ce" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), lw=1, label="train next-token loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="nats / token", title=metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def check_kernels(cfg: Config, mesh) -> None:
    """``model.attention_impl`` / ``model.fp8_impl`` (or ``DSJAX_FP8_IMPL``) that the mesh's devices
    cannot run -- 'pallas' on a CPU, FP8 kernels on a GPU without FP8 -- as a ConfigError before
    anything is written or compiled: the same choice the model makes when it is traced."""
    m = cfg.model
    with jax.set_mesh(mesh):
        try:
            attention_impl(m.attention_impl)
            if m.fp8 or m.fp8_weights:
                fp8_impl(m.fp8_impl, "fp8", per_shard=True)  # dsjax.model.fp8 runs its kernels per shard
        except ValueError as e:
            raise ConfigError(str(e)) from None


def prepare_run(cfg: Config, resume: bool) -> tuple[Path, bool]:
    """Creates or checks the run directory; returns (path, whether a checkpoint will be restored)."""
    directory = run_dir(cfg)
    has_ckpt = has_checkpoints(directory)
    if has_ckpt and not resume:
        raise TrainingError(
            f"{directory} already holds checkpoints; pass --resume to continue it, "
            "or train.run_name=<new name> for a new run (nothing was overwritten)"
        )
    if has_ckpt:
        saved = load_config(directory / "config.yaml")
        if saved.model != cfg.model:
            diff = [
                f.name
                for f in dataclasses.fields(cfg.model)
                if getattr(saved.model, f.name) != getattr(cfg.model, f.name)
            ]
            raise TrainingError(f"--resume: model settings differ from {directory / 'config.yaml'}: {', '.join(diff)}")
    if jax.process_index() == 0:  # one writer; the others read the same directory
        save_config(cfg, directory)
    return directory, has_ckpt


class StopRequest:
    """Preemption: SIGTERM (what TPU VMs and Kubernetes send first) or a first Ctrl-C asks the loop to
    save a checkpoint of the step it is on and stop; a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: str | None = None

    def _request(self, signum, frame):
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def on_signals(self):
        if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
            yield self
            return
        before = {s: signal.signal(s, self._request) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)


def start_from(cfg: Config, state, shardings, main_process: bool):
    """``state`` (fresh) with the weights of the run or hub checkpoint ``cfg.train.init_from``;
    indexers it lacks stay fresh (a V3 checkpoint starting V3.2's DSA training)."""
    source = cfg.train.init_from
    src_cfg, variables, _ = ckpt.load_checkpoint(source)
    params, fresh = ckpt.graft(jax.device_get(state.params), jax.device_get(variables["params"]), source)
    bias, _ = ckpt.graft(jax.device_get(state.bias), jax.device_get(variables.get(BIAS, {})), source)
    if main_process:
        differ = [f for f in HF_FIELDS if not f.startswith("index_") and getattr(src_cfg, f) != getattr(cfg.model, f)]
        print(
            f"started from {source}"
            + (f" with {len(fresh)} fresh indexer tensors" if fresh else "")
            + (f"; model settings that differ from it: {', '.join(differ)}" if differ else "")
        )
    return state.replace(params=jax.device_put(params, shardings.params), bias=jax.device_put(bias, shardings.bias))


def train(cfg: Config, resume: bool = False, model=None, progress: bool = True) -> dict:
    """Runs (or resumes) training; returns the last metrics (with ``stopped_by``: the signal, when
    SIGTERM or Ctrl-C stopped it after saving). ``model`` defaults to ``build_model(cfg.model)``."""
    t = cfg.train
    tokenizer = make_tokenizer(cfg.data)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: the tokenizer has {tokenizer.vocab_size} tokens")
    train_split, val_split = load_splits(cfg.data, t.seq_len, tokenizer)
    mesh = make_mesh(cfg.mesh)
    check_divisible(mesh, cfg.model, t.batch_size // t.microbatches)  # before anything compiles
    check_kernels(cfg, mesh)
    main_process = jax.process_index() == 0
    directory, restoring = prepare_run(cfg, resume)
    model = model or build_model(cfg.model)

    batches = train_batches(train_split, t.batch_size, t.seed)
    val_batches = eval_batches(val_split, t.batch_size, t.eval_batches)
    state_sh, batch_sh = state_shardings(cfg, model, mesh), batch_sharding(mesh)
    metrics_path = directory / "metrics.jsonl"
    start = 0
    if restoring:  # the newest checkpoint that reads back; a damaged one is named and set aside
        abstract = abstract_state(cfg, model, state_sh)
        state, data_state, start = ckpt.restore_intact(directory, abstract, t.keep_checkpoints, set_aside=main_process)
        batches.set_state(data_state)
        kept = (
            [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start]
            if metrics_path.exists()
            else []
        )
        if main_process:
            metrics_path.write_text("".join(line + "\n" for line in kept))  # steps after it are redone
    else:
        state = init_state_sharded(cfg, model, mesh, jax.random.key(t.seed), state_sh)
        if t.init_from:
            state = start_from(cfg, state, state_sh, main_process)
        if main_process:
            metrics_path.write_text("")

    mngr = ckpt.manager(directory, t.keep_checkpoints)
    step_fn = jax.jit(
        make_train_step(cfg, model), in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0
    )
    eval_fn = jax.jit(make_eval_step(cfg, model), in_shardings=(state_sh.params, state_sh.bias, batch_sh))
    put = lambda batch: global_arrays(batch, jax.tree.map(lambda _: batch_sh, batch))  # noqa: E731
    from tensorboardX import SummaryWriter

    tb = SummaryWriter(str(directory / "tb"), write_to_disk=main_process)
    counts = count_params(cfg.model)
    mesh_desc = " x ".join(f"{a} {n}" for a, n in mesh.shape.items())
    print(
        f"{directory}: {counts['total']:,} parameters, {counts['activated']:,} activated per token; "
        f"{len(train_split):,} training sequences of {t.seq_len} tokens; mesh {mesh_desc} "
        f"({mesh.size} {jax.default_backend()} device(s), {jax.process_count()} process(es))"
    )

    def log(row: dict) -> None:
        if not main_process:
            return
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step":
                tb.add_scalar(k, v, row["step"])

    bar = tqdm(total=t.steps, initial=start, disable=not (progress and main_process), dynamic_ncols=True)
    stop = StopRequest()
    with jax.set_mesh(mesh), stop.on_signals():  # the MoE layers run expert parallelism over this mesh
        try:
            last, window_tokens, window_start = {}, 0, time.perf_counter()
            for step in range(start + 1, t.steps + 1):
                state, m = step_fn(state, put(next(batches)))
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                window_tokens += m["tokens"]
                if not m["ok"]:
                    log({"step": step, "skipped_nonfinite": 1.0, "loss": m["loss"], "grad_norm": m["grad_norm"]})
                    bar.write(
                        f"step {step}: non-finite loss or gradient (loss={m['loss']}, "
                        f"grad_norm={m['grad_norm']}); step skipped"
                    )
                    if int(state.nonfinite) >= t.max_nonfinite_steps:
                        ckpt.finish(mngr)  # the last save may still be in flight: finish it first
                        latest = mngr.latest_step()
                        where = (
                            f"{mngr.directory / str(latest)} (step {latest})"
                            if latest is not None
                            else "none was saved yet"
                        )
                        raise TrainingError(
                            f"{t.max_nonfinite_steps} consecutive non-finite steps at step {step}: stopping. "
                            f"Last good checkpoint: {where}"
                        )
                if step % t.log_every == 0 or step == t.steps:
                    dt = time.perf_counter() - window_start
                    last = {
                        "step": step,
                        **{k: m[k] for k in LOGGED if k in m},
                        "tokens_per_s": window_tokens / dt,
                        "skipped_total": int(state.skipped),
                    }
                    log(last)
                    bar.set_postfix(
                        loss=f"{m['ce']:.3f}",
                        tok_s=f"{last['tokens_per_s']:.0f}",
                        lr=f"{m['lr']:.2e}",
                        load=f"{m['load_max_mean']:.2f}",
                        **({"indexer_kl": f"{m['indexer']:.4f}"} if "indexer" in m else {}),
                    )
                    window_tokens, window_start = 0, time.perf_counter()
                if step % t.eval_every == 0 or step == t.steps:
                    ev = evaluate(eval_fn, state, map(put, val_batches), val_split.bytes_per_token)
                    log({"step": step, **ev})
                    last.update(ev)
                    bar.write(f"step {step}: validation loss {ev['val_loss']:.4f}, {ev['val_bpb']:.3f} bits per byte")
                if step % t.checkpoint_every == 0 or step == t.steps or stop.signal:
                    ckpt.save(mngr, step, state, batches.get_state())
                bar.update(1)
                if stop.signal:
                    bar.write(f"{stop.signal}: saved checkpoint {step} and stopped; continue with --resume")
                    last = {**last, "step": step, "stopped_by": stop.signal}
                    break
        finally:  # whatever stops the loop, every started checkpoint save completes
            bar.close()
            tb.close()
            try:
                ckpt.finish(mngr)
            finally:
                mngr.close()

    if not main_process:
        return last
    plot(metrics_path, directory / "loss.png")
    if jax.process_count() > 1 and t.sample_tokens:  # the weights live on every process's devices
        print(f"no sample in a multi-process run: dsjax-generate --checkpoint {directory} makes one")
    elif t.sample_tokens and not stop.signal:
        text = sample(cfg, {"params": state.params, "selection_bias": state.bias}, tokenizer)
        (directory / "sample.txt").write_text(text)
        print(f"--- sample ({directory / 'sample.txt'}) ---\n{text}\n---")
    return last
