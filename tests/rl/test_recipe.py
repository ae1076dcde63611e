"""R1's recipe end to end on a tiny model: GRPO raises a reward it can reach, and a run writes what it
promises (metrics, TensorBoard, the plot, samples, checkpoints that load)."""

import json

import numpy as np
import pytest

from dsjax.config import load_config
from dsjax.rl.recipe import post_train
from dsjax.train.checkpoint import load_checkpoint
from tests.train.runs import SMALL_RUN, TINY

MODEL = [o for o in SMALL_RUN if o.startswith("model.") or o.startswith("mesh.")]


def emits_a(prompt: str, completion: str, answer: str) -> float:
    """A toy verifiable reward: the share of the 16 completion tokens that are the letter 'a'."""
    return completion.count("a") / 16


def recipe_cfg(tmp_path, *extra):
    return load_config(
        TINY,
        [*MODEL, f"train.output_dir={tmp_path}", "train.log_every=1", "task.name=chain_sum",
         "task.train_examples=256", "task.eval_examples=8", *extra],
    )  # fmt: skip


@pytest.mark.slow
def test_grpo_raises_a_reachable_reward(tmp_path):
    cfg = recipe_cfg(
        tmp_path,
        "grpo.reward_funcs=[tests.rl.test_recipe:emits_a]",
        "grpo.steps=30", "grpo.prompts_per_step=8", "grpo.num_generations=8", "grpo.max_completion_length=16",
        "grpo.learning_rate=3e-3", "grpo.beta=0.0", "grpo.eval_every=100",
    )  # fmt: skip
    post_train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    reward = [r["reward"] for r in rows if r["stage"] == "grpo"]
    assert len(reward) == 30
    first, last = np.mean(reward[:5]), np.mean(reward[-5:])
    assert last > max(3 * first, 0.2), (first, last)


@pytest.mark.slow
def test_sft_then_grpo_writes_the_run_directory(tmp_path):
    cfg = recipe_cfg(
        tmp_path,
        "sft.steps=4", "sft.batch_size=4", "sft.seq_len=64",
        "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=4", "grpo.max_completion_length=8",
        "grpo.num_iterations=2", "grpo.routing_replay=true", "grpo.eval_every=1", "grpo.rollout_engine=paged",
    )  # fmt: skip
    result = post_train(cfg, progress=False)
    run = tmp_path / "tiny"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"sft", "grpo", "eval"}
    grpo = [r for r in rows if r["stage"] == "grpo"]
    expected = ["reward", "rewards/accuracy/mean", "rewards/format/mean", "kl", "entropy", "clip_ratio/region_mean"]
    expected += ["completions/mean_length", "frac_reward_zero_std", "routing_mismatch", "rollout_tokens_per_s"]
    for key in expected:
        assert key in grpo[-1], key
    assert grpo[-1]["routing_mismatch"] == 0.0  # fp32 rollouts
    for name in ("grpo.png", "samples_before.txt", "samples_after.txt", "config.yaml"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir())
    assert set(result) >= {"before", "after", "seconds"}
    for directory in (run, run / "sft"):  # both stages' policies load for generation
        model_cfg, variables, tokenizer = load_checkpoint(directory)
        assert model_cfg == cfg.model and tokenizer is not None and "params" in variables
