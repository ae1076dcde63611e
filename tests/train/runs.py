"""A fast variant of configs/tiny.yaml, shared by the training tests."""

from pathlib import Path

from dsjax.config import load_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SMALL_RUN = [  # a fast variant of the tiny config for tests
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
    "model.v_head_dim=16", "model.moe_intermediate_size=32",
    "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=2", "train.decay_steps=20",
    "train.log_every=1", "train.eval_every=4", "train.eval_batches=2", "train.sample_tokens=0",
    "mesh.data=1",  # one device (tests/conftest.py simulates 8; tests/parallel uses them)
]  # fmt: skip


def small_cfg(tmp_path, *extra):
    return load_config(TINY, [*SMALL_RUN, f"train.output_dir={tmp_path}", *extra])
