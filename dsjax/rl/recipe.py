"""DeepSeek-R1's recipe end to end (arXiv 2501.12948 §2.3): a cold-start SFT on worked solutions,
then GRPO with rule-based rewards (``dsjax.rl.grpo``), on the same mesh as pre-training.

    from dsjax.config import load_config
    from dsjax.rl.recipe import post_train
    result = post_train(load_config("configs/grpo_tiny.yaml"))   # python train.py --config ...

The run directory ``<output_dir>/<run_name>/`` gets config.yaml, metrics.jsonl (one row per step,
``stage`` "sft", "grpo" or "eval"), tb/ (TensorBoard), grpo.png (reward, accuracy and completion
length), samples_before.txt / samples_after.txt (held-out prompts, greedy, around GRPO), sft/ (the
SFT stage's checkpoint, itself a run directory) and checkpoints/ (the final policy): both load with
``dsjax-generate --checkpoint``. Each rollout batch's sampling, rewards and update are logged with
TRL's metric names. Post-training runs do not resume yet: a run directory holding checkpoints is refused.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dsjax.config import Config, ConfigError
from dsjax.model.moe import BIAS
from dsjax.model.transformer import build_model
from dsjax.parallel.mesh import check_divisible, global_arrays, make_mesh
from dsjax.parallel.rules import batch_sharding
from dsjax.rl.grpo import (
    equal_reward_groups,
    group_advantages,
    make_grpo_step,
    make_logps_fn,
    reference_copy,
    rl_train_config,
    routing_mismatch,
)
from dsjax.rl.rewards import accuracy_reward, format_reward, resolve_rewards
from dsjax.rl.rollout import sample_completions
from dsjax.rl.sft import pack_pairs
from dsjax.rl.tasks import Example, load_jsonl, make_task
from dsjax.train import checkpoint as ckpt
from dsjax.train.data import make_tokenizer, train_batches
from dsjax.train.loop import TrainingError, check_kernels
from dsjax.train.optim import make_optimizer
from dsjax.train.step import TrainState, init_state_sharded, make_train_step, state_shardings


class Log:
    """metrics.jsonl and TensorBoard, written by process 0."""

    def __init__(self, directory: Path):
        from tensorboardX import SummaryWriter

        self.main = jax.process_index() == 0
        self.path = directory / "metrics.jsonl"
        if self.main:
            self.path.write_text("")
        self.tb = SummaryWriter(str(directory / "tb"), write_to_disk=self.main)

    def __call__(self, stage: str, step: int, row: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, **row}) + "\n")
        for k, v in row.items():
            self.tb.add_scalar(f"{stage}/{k}", v, step)


def task_examples(cfg: Config) -> tuple[list[Example], list[Example]]:
    """(training prompts, held-out prompts): procedural ones drawn with two seeds; a JSONL's last
    ``eval_examples`` lines are held out."""
    t, seed = cfg.task, cfg.train.seed
    if t.name.endswith(".jsonl"):
        rows = load_jsonl(t.name)
        if len(rows) <= t.eval_examples:
            raise ConfigError(
                f"task.name={t.name}: {len(rows)} lines, not more than task.eval_examples={t.eval_examples}"
            )
        return rows[: -t.eval_examples][: t.train_examples], rows[-t.eval_examples :]
    train = make_task(t.name, t.train_examples, seed, **t.kwargs)
    held = make_task(t.name, t.eval_examples, seed + 1_000_003, **t.kwargs)
    seen = {e.prompt for e in train}
    held = [e for e in held if e.prompt not in seen]
    if not held:
        raise ConfigError(f"task: every held-out prompt also appears among the {len(train)} training prompts")
    return train, held


def initial_policy(cfg: Config, source: str) -> tuple[Config, dict | None]:
    """(config, variables) of a run or hub checkpoint ``source`` (its model settings replace the
    config's), or (config, None): fresh weights."""
    if not source:
        return cfg, None
    model_cfg, variables, _ = ckpt.load_checkpoint(source)
    variables = jax.device_get(variables)
    return dataclasses.replace(cfg, model=model_cfg), variables


def with_fresh_optimizer(cfg: Config, model, mesh, params, bias) -> TrainState:
    """A TrainState at step 0 holding ``params`` and ``bias``, with new optimizer moments for
    ``cfg.train``, sharded like training's."""
    zero = jnp.zeros((), jnp.int32)

    def build(params, bias):
        return TrainState(zero, params, make_optimizer(cfg.train).init(params), bias, zero, zero)

    return jax.jit(build, out_shardings=state_shardings(cfg, model, mesh))(params, bias)


def evaluate(cfg: Config, state: TrainState, tokenizer, examples: list[Example], pad_to: int) -> dict:
    """Greedy completions of the held-out prompts: accuracy, format rate, mean length, the texts."""
    prompts = [e.prompt for e in examples]
    prompts += prompts[: -len(prompts) % pad_to]  # rows divisible over the mesh's batch axes
    g = cfg.grpo
    ro = sample_completions(
        cfg.model,
        {"params": state.params, BIAS: state.bias},
        tokenizer,
        prompts,
        1,
        g.max_completion_length if g else cfg.train.sample_tokens,
        temperature=0.0,
    )
    n = len(examples)
    texts = ro.completions[:n]
    acc = [accuracy_reward(e.prompt, c, e.answer) for e, c in zip(examples, texts)]
    fmt = [format_reward(e.prompt, c, e.answer) for e, c in zip(examples, texts)]
    return {
        "accuracy": float(np.mean(acc)),
        "format": float(np.mean(fmt)),
        "mean_length": float(ro.completion_lengths[:n].mean()),
        "texts": texts,
        "correct": acc,
    }


def write_samples(path: Path, examples: list[Example], result: dict, k: int = 16) -> None:
    lines = [f"held-out accuracy {result['accuracy']:.3f}, format {result['format']:.3f} (greedy)\n"]
    for e, text, ok in list(zip(examples, result["texts"], result["correct"]))[:k]:
        lines.append(f"{'RIGHT' if ok else 'WRONG'}  {e.prompt!r} -> {text!r}  (answer {e.answer})")
    path.write_text("\n".join(lines) + "\n")


def sft_stage(cfg: Config, model, mesh, state: TrainState, tokenizer, examples, log: Log, progress: bool):
    """Cold start: next-token loss on the responses of prompt/response pairs (``sft.data``, else the
    task's worked solutions), the train step of pre-training with a loss mask. Saves ``sft/``."""
    s = cfg.sft
    if s.data:
        rows = load_jsonl(s.data)
        missing = [i for i, e in enumerate(rows) if e.solution is None]
        if missing:
            raise ConfigError(f"sft.data={s.data}: line {missing[0] + 1} has no 'response'")
    else:
        rows = [e for e in examples if e.solution is not None]
        if not rows:
            raise ConfigError(f"task.name={cfg.task.name}: gives no worked solutions; set sft.data to a JSONL")
    data = pack_pairs([(e.prompt, e.solution) for e in rows], tokenizer, s.seq_len)
    train = dataclasses.replace(
        cfg.train,
        steps=s.steps,
        batch_size=s.batch_size,
        microbatches=1,
        seq_len=s.seq_len,
        learning_rate=s.learning_rate,
        warmup_steps=s.warmup_steps,
        constant_steps=0,
        decay_steps=max(s.steps - s.warmup_steps, 1),
        min_lr=s.learning_rate / 10,
        min_lr_steps=10**9,
    )
    scfg = dataclasses.replace(cfg, train=train)
    check_divisible(mesh, cfg.model, s.batch_size)
    state = with_fresh_optimizer(scfg, model, mesh, state.params, state.bias)
    state_sh, batch_sh = state_shardings(scfg, model, mesh), batch_sharding(mesh)
    step_fn = jax.jit(
        make_train_step(scfg, model),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )
    batches = train_batches(data, s.batch_size, cfg.train.seed)
    bar = tqdm(range(1, s.steps + 1), desc="SFT", disable=not (progress and log.main), dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        state, m = step_fn(state, global_arrays(batch, jax.tree.map(lambda _: batch_sh, batch)))
        if step % cfg.train.log_every == 0 or step == s.steps:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            log("sft", step, {k: m[k] for k in ("loss", "ce", "mtp", "grad_norm", "lr")})
            bar.set_postfix(ce=f"{m['ce']:.3f}")
    directory = ckpt.run_dir(cfg) / "sft"
    if log.main:
        ckpt.save_config(cfg, directory)
    mngr = ckpt.manager(directory, 1)
    try:
        ckpt.save(mngr, s.steps, state, {"stage": "sft"})
        ckpt.finish(mngr)
    finally:
        mngr.close()
    return state


def score(reward_fns, weights, examples: list[Example], completions: list[str], group: int) -> tuple[np.ndarray, dict]:
    """Each reward function on each completion -> (weighted total [N], per-function values {name: [N]})."""
    expanded = [e for e in examples for _ in range(group)]
    per = {}
    for fn in reward_fns:
        name = getattr(fn, "__name__", "reward").removesuffix("_reward")
        per[name] = np.asarray([float(fn(e.prompt, c, e.answer)) for e, c in zip(expanded, completions)])
    total = sum(w * v for w, v in zip(weights, per.values()))
    return np.asarray(total, np.float64), per


def grpo_stage(cfg, model, mesh, state, tokenizer, examples, held_out, log, progress, pad_to):
    """GRPO (DeepSeekMath §4.1): per step, G sampled completions for each of prompts_per_step prompts,
    their rewards and group advantages, then num_iterations updates. Returns (state, last metrics)."""
    g = cfg.grpo
    n = g.prompts_per_step * g.num_generations
    check_divisible(mesh, cfg.model, n // g.microbatches)
    rcfg = dataclasses.replace(cfg, train=rl_train_config(cfg))
    state = with_fresh_optimizer(rcfg, model, mesh, state.params, state.bias)
    ref = None
    if g.beta > 0:  # the frozen reference policy: a copy of the starting weights
        ref = (reference_copy(state.params, cfg.model.dtype), jax.tree.map(jnp.copy, state.bias))
    state_sh, batch_sh = state_shardings(rcfg, model, mesh), batch_sharding(mesh)
    step_fn = jax.jit(
        make_grpo_step(rcfg, model), in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0
    )
    logps_fn = jax.jit(make_logps_fn(model, g.temperature))
    reward_fns = resolve_rewards(g.reward_funcs)
    weights = g.reward_weights or (1.0,) * len(reward_fns)
    rng = np.random.default_rng(cfg.train.seed)
    key = jax.random.key(cfg.train.seed)
    order, cursor = rng.permutation(len(examples)), 0
    put = lambda b: global_arrays(b, jax.tree.map(lambda _: batch_sh, b))  # noqa: E731
    bar = tqdm(range(1, g.steps + 1), desc="GRPO", disable=not (progress and log.main), dynamic_ncols=True)
    last = {}
    for step in bar:
        t0 = time.perf_counter()
        if cursor + g.prompts_per_step > len(order):
            order, cursor = rng.permutation(len(examples)), 0
        batch_ex = [examples[i] for i in order[cursor : cursor + g.prompts_per_step]]
        cursor += g.prompts_per_step
        key, sub = jax.random.split(key)
        ro = sample_completions(
            cfg.model,
            {"params": state.params, BIAS: state.bias},
            tokenizer,
            [e.prompt for e in batch_ex],
            g.num_generations,
            g.max_completion_length,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            rng=sub,
            speculative=g.speculative,
            record_routes=True,
            paged=g.rollout_engine == "paged",
        )
        t1 = time.perf_counter()
        total, per = score(reward_fns, weights, batch_ex, ro.completions, g.num_generations)
        equal = equal_reward_groups(total, g.num_generations)
        mask = ro.completion_mask * (~equal if g.drop_equal_reward_groups else np.ones_like(equal))[:, None]
        batch = {
            "tokens": ro.tokens,
            "segment_ids": ro.segment_ids,
            "completion_mask": mask.astype(np.int32),
            "advantages": group_advantages(total, g.num_generations, g.scale_rewards),
        }
        if g.routing_replay and ro.routes is not None:
            batch["routes"] = ro.routes
        device_batch = put(batch)
        old_logp, expert_ids = logps_fn(state.params, state.bias, device_batch)
        extra = {}
        if g.num_iterations > 1:
            extra["old_logp"] = old_logp
        if ref is not None:
            extra["ref_logp"] = logps_fn(*ref, device_batch)[0]
        for _ in range(g.num_iterations):
            state, m = step_fn(state, {**device_batch, **extra})
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        row = {
            "reward": float(total.mean()),
            "reward_std": float(total.reshape(-1, g.num_generations).std(1, ddof=1).mean()),
            **{f"rewards/{k}/mean": float(v.mean()) for k, v in per.items()},
            **{f"rewards/{k}/std": float(v.std()) for k, v in per.items()},
            "frac_reward_zero_std": float(equal.mean()),
            "completions/mean_length": float(ro.completion_lengths.mean()),
            "completions/min_length": float(ro.completion_lengths.min()),
            "completions/max_length": float(ro.completion_lengths.max()),
            "completions/clipped_ratio": float(ro.truncated.mean()),
            **{k: v for k, v in m.items() if k != "ok"},
            "skipped_nonfinite": float(not m["ok"]),
            "rollout_tokens_per_s": ro.stats["rollout_tokens_per_s"],
            "rollout_s": round(t1 - t0, 3),  # sampling
            "update_s": round(time.perf_counter() - t1, 3),  # rewards, old / reference log-probs, the updates
        }
        if "acceptance" in ro.stats:
            row["draft_acceptance"] = ro.stats["acceptance"]
        if expert_ids is not None and ro.routes is not None:
            valid = jnp.asarray(ro.segment_ids > 0)
            row["routing_mismatch"] = float(routing_mismatch(jnp.asarray(ro.routes), expert_ids, valid))
        log("grpo", step, row)
        last = row
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row.get('rewards/accuracy/mean', 0):.2f}")
        if step % g.eval_every == 0 and step < g.steps:
            ev = evaluate(cfg, state, tokenizer, held_out, pad_to)
            log("eval", step, {k: ev[k] for k in ("accuracy", "format", "mean_length")})
    return state, last


def plot(metrics_path: Path, out: Path) -> None:
    """grpo.png: rollout reward and accuracy, held-out accuracy, completion length per GRPO step."""
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    evals = [r for r in rows if r["stage"] == "eval"]
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    steps = [r["step"] for r in grpo]
    left.plot(steps, [r["reward"] for r in grpo], lw=1, label="reward (rollouts)")
    if grpo and "rewards/accuracy/mean" in grpo[0]:
        left.plot(steps, [r["rewards/accuracy/mean"] for r in grpo], lw=1, label="accuracy (rollouts)")
    if evals:
        left.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="held-out accuracy (greedy)")
    left.set(xlabel="GRPO step", title=metrics_path.parent.name)
    left.legend()
    left.grid(alpha=0.3)
    right.plot(steps, [r["completions/mean_length"] for r in grpo], lw=1)
    right.set(xlabel="GRPO step", ylabel="tokens", title="mean completion length")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def post_train(cfg: Config, progress: bool = True) -> dict:
    """SFT (if ``cfg.sft``), then GRPO (if ``cfg.grpo``), with the held-out accuracy measured around
    GRPO. Returns {"before": held-out accuracy before GRPO, "after": after it, "last": the last GRPO
    metrics, "seconds", "directory"} (each when it applies)."""
    t0 = time.perf_counter()
    tokenizer = make_tokenizer(cfg.data)
    source = (cfg.sft.init_from if cfg.sft else "") or (cfg.grpo.init_from if cfg.grpo else "")
    cfg, variables = initial_policy(cfg, source)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: the tokenizer has {tokenizer.vocab_size} tokens")
    directory = ckpt.run_dir(cfg)
    if ckpt.has_checkpoints(directory) or (directory / "sft").exists():
        raise TrainingError(
            f"{directory} already holds a post-training run; post-training does not resume yet: "
            "set train.run_name=<new name> (nothing was overwritten)"
        )
    mesh = make_mesh(cfg.mesh)
    check_kernels(cfg, mesh)
    if jax.process_index() == 0:
        ckpt.save_config(cfg, directory)
    model = build_model(cfg.model)
    examples, held_out = task_examples(cfg) if cfg.task else ([], [])
    log = Log(directory)
    pad_to = mesh.size
    result = {}
    with jax.set_mesh(mesh):
        if variables is None:
            state = init_state_sharded(cfg, model, mesh, jax.random.key(cfg.train.seed))
        else:
            state = with_fresh_optimizer(cfg, model, mesh, variables["params"], variables[BIAS])
        if cfg.sft:
            state = sft_stage(cfg, model, mesh, state, tokenizer, examples, log, progress)
        if held_out:  # the policy GRPO starts from (or the SFT result)
            before = evaluate(cfg, state, tokenizer, held_out, pad_to)
            log("eval", 0, {k: before[k] for k in ("accuracy", "format", "mean_length")})
            write_samples(directory / "samples_before.txt", held_out, before)
            result["before"] = before["accuracy"]
        if cfg.grpo:
            state, result["last"] = grpo_stage(
                cfg, model, mesh, state, tokenizer, examples, held_out, log, progress, pad_to
            )
            after = evaluate(cfg, state, tokenizer, held_out, pad_to)
            log("eval", cfg.grpo.steps, {k: after[k] for k in ("accuracy", "format", "mean_length")})
            write_samples(directory / "samples_after.txt", held_out, after)
            result["after"] = after["accuracy"]
        mngr = ckpt.manager(directory, 1)
        try:
            ckpt.save(mngr, int(state.step), state, {"stage": "grpo" if cfg.grpo else "sft"})
            ckpt.finish(mngr)
        finally:
            mngr.close()
    log.tb.close()
    if cfg.grpo and log.main:
        plot(log.path, directory / "grpo.png")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["directory"] = str(directory)
    return result
