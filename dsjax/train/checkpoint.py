"""Run directories and orbax checkpoints.

runs/<name>/config.yaml          the resolved config (what ``load_config`` reads back)
runs/<name>/checkpoints/<step>/  orbax: ``state`` (params, optimizer, selection bias, counters)
                                 and ``data`` (the grain iterator state, JSON)

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed at any moment, also during a save, restores from the last complete checkpoint.

On one host each shard is written from one replica. Orbax's default, replica-parallel saving,
splits a replicated shard among its replicas so that several hosts share the writing; on one host
it writes the same bytes after slicing every shard op by op, one compile per slice shape.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from orbax.checkpoint._src.metadata import array_metadata_store  # what orbax's own ArrayHandler keeps

from dsjax.config import Config, ModelConfig, load_config
from dsjax.model.transformer import Transformer
from dsjax.train.step import abstract_state


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.run_name


def has_checkpoints(directory: Path) -> bool:
    """Whether the run directory holds a checkpoint (a ``checkpoints/<step>`` directory)."""
    d = Path(directory) / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def save_config(cfg: Config, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(directory / "config.yaml")


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler, set as its StandardSave sets it (same files). Several processes keep
    orbax's own jax.Array writer; one process writes each shard from one replica."""
    limits = dict(save_concurrent_gb=96, restore_concurrent_gb=96)
    if jax.process_count() > 1:
        return ocp.PyTreeCheckpointHandler(**limits)
    t = ocp.type_handlers
    arrays = t.ArrayHandler(use_replica_parallel=False, array_metadata_store=array_metadata_store.Store())
    others = [(ty, t.get_type_handler(ty)) for ty in (int, float, bytes, np.number, np.ndarray, str)]
    return ocp.PyTreeCheckpointHandler(
        type_handler_registry=t.create_type_handler_registry(*others, (jax.Array, arrays)), **limits
    )


def manager(directory: Path, keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    handlers = {"state": _state_handler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(Path(directory).absolute() / "checkpoints", options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)))


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """(state, data iterator state) of ``step`` (default: the newest complete checkpoint)."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {mngr.directory}")
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
            ),
            data=ocp.args.JsonRestore(),
        ),
    )
    return out["state"], out["data"]


def restore_model(directory: str | Path, step: int | None = None) -> tuple[ModelConfig, dict]:
    """A training run directory -> (model config, {"params", "selection_bias"}) for inference."""
    directory = Path(directory)
    cfg = load_config(directory / "config.yaml")
    model = Transformer(cfg.model)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh trained it: one device here
    abstract = abstract_state(cfg, model, jax.tree.map(lambda _: one, abstract_state(cfg, model)))
    with manager(directory, cfg.train.keep_checkpoints) as mngr:
        state, _ = restore(mngr, abstract, step)
    return cfg.model, {"params": state.params, "selection_bias": state.bias}
