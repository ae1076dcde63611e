"""Run directories and orbax checkpoints.

runs/<name>/config.yaml          the resolved config (what ``load_config`` reads back)
runs/<name>/checkpoints/<step>/  orbax: ``state`` (params, optimizer, selection bias, counters)
                                 and ``data`` (the grain iterator state and the state's
                                 ``fingerprint``, JSON)

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed at any moment, also during a save, restores from the last complete checkpoint. One that
does not read back whole (torn, truncated, or corrupted: its fingerprint differs) is named, and
the one before it is taken (``restore_intact``); nothing is deleted.

On one host each shard is written from one replica. Orbax's default, replica-parallel saving,
splits a replicated shard among its replicas so that several hosts share the writing; on one host
it writes the same bytes after slicing every shard op by op, one compile per slice shape.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from orbax.checkpoint._src.metadata import array_metadata_store  # what orbax's own ArrayHandler keeps

from dsjax.config import Config, ModelConfig, load_config
from dsjax.hf.checkpoint import load_hf, to_fp8_weights
from dsjax.model.transformer import build_model
from dsjax.train.data import HFTokenizer, make_tokenizer
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


FINGERPRINT = "dsjax_fingerprint"  # in a checkpoint's data item: its state's fingerprint when saved
_WORDS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}
_PRIMES = (2654435761, 2246822519, 3266489917, 668265263, 374761393, 1181783497)


@jax.jit
def fingerprint(tree):
    """One uint32 per array: the sum of its raw bits, each word weighted by an odd hash of its
    position (wrapping). Stored with every checkpoint and checked on restore, it catches the silent
    damage (flipped or overwritten bytes in an uncompressed chunk) that reads back without an error."""

    def one(x):
        words = jax.lax.bitcast_convert_type(x, _WORDS[x.dtype.itemsize]).astype(jnp.uint32)
        weight = jnp.ones(words.shape, jnp.uint32)
        for d in range(words.ndim):
            weight += jax.lax.broadcasted_iota(jnp.uint32, words.shape, d) * jnp.uint32(_PRIMES[d % len(_PRIMES)])
        return jnp.sum(words * (weight * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)

    return jax.tree.map(one, tree)


def _fingerprints(state) -> dict[str, int]:
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(fingerprint(state)))
    return {jax.tree_util.keystr(path): int(v) for path, v in leaves}


class SaveError(RuntimeError):
    """A checkpoint could not be written; the message names it, and the ones before it (intact)."""


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
    """Starts writing checkpoint ``step`` (in the background: ``finish`` waits). Orbax writes to a
    temporary directory and renames it when complete, so a failed save leaves the others intact."""
    data = {**data_state, FINGERPRINT: _fingerprints(state)}
    args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data))
    try:
        mngr.save(step, args=args)
    except Exception as e:  # this save, or the one before it failing in the background
        raise _save_error(mngr, step, e) from None


def finish(mngr: ocp.CheckpointManager) -> None:
    """Waits for the checkpoint being written; SaveError if it failed."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _save_error(mngr, None, e) from None


def _save_error(mngr: ocp.CheckpointManager, step: int | None, e: Exception) -> SaveError:
    where = mngr.directory / str(step) if step is not None else f"a checkpoint in {mngr.directory}"
    intact = ", ".join(str(s) for s in mngr.all_steps()) or "none"
    return SaveError(f"saving {where} failed ({_why(e)}); intact checkpoints: {intact}")


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
    data = dict(out["data"])
    saved = data.pop(FINGERPRINT, None)  # checkpoints written before fingerprints: nothing to check
    if saved is not None:
        now = _fingerprints(out["state"])
        differ = [k for k, v in saved.items() if now.get(k) != v]
        if differ:
            raise ValueError(
                f"corrupted: {len(differ)} array(s) differ from their fingerprint when saved, e.g. {differ[0]}"
            )
    return out["state"], data


class RestoreError(RuntimeError):
    """No checkpoint of a run reads back; the message names each one and what failed."""


PARTS = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "data/metadata")  # what orbax writes


def _why(e: BaseException, path: Path | None = None) -> str:
    """What failed, in one line: the parts of checkpoint ``path`` that are missing, else the innermost error."""
    missing = [part for part in PARTS if path is not None and not (path / part).exists()]
    if missing:
        return f"torn: {', '.join(missing)} missing"
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0]
    return f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__


@contextlib.contextmanager
def _stderr_kept():
    """What the process writes to its stderr meanwhile (file descriptor 2: threads and C++ included)
    goes to a file; yields a list that holds the text afterwards."""
    sys.stderr.flush()
    saved, kept, text, unraisable = os.dup(2), tempfile.TemporaryFile(), [], []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append  # "Exception ignored in: ..." too
    os.dup2(kept.fileno(), 2)
    try:
        yield text
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.unraisablehook = hook
        kept.seek(0)
        ignored = "".join(f"Exception ignored in {u.object!r}: {u.exc_value!r}\n" for u in unraisable)
        text.append(kept.read().decode(errors="replace") + ignored)
        kept.close()


def _set_aside(path: Path, why: str) -> Path | None:
    """Renames a damaged checkpoint to ``<step>.damaged`` (``.damaged-2`` ...) with the reason in
    ``DAMAGED.txt``: kept for inspection, out of the way of the run's next save of that step."""
    for n in range(1, 100):
        aside = path.with_name(f"{path.name}.damaged" + (f"-{n}" if n > 1 else ""))
        if not aside.exists():
            try:
                path.rename(aside)
                (aside / "DAMAGED.txt").write_text(why + "\n")
            except OSError:
                return None
            return aside
    return None


def restore_intact(directory: Path, abstract_state, keep: int = 3, step: int | None = None, set_aside: bool = False):
    """(state, data iterator state, step) of ``step``, or of the newest checkpoint that reads back.

    A checkpoint that does not (torn, truncated, corrupted) is named in one line on stderr with what
    failed, and the next older one is tried; ``set_aside`` also moves it to ``<step>.damaged`` (a
    resumed run will save that step again). Nothing is deleted. RestoreError lists every failure
    when none reads back; FileNotFoundError when there is no checkpoint at all."""
    directory = Path(directory)
    with manager(directory, keep) as mngr:
        steps = sorted(mngr.all_steps(), reverse=True)
    if step is not None:
        steps = [step] if step in steps else []
    if not steps:
        what = f"no checkpoint of step {step}" if step is not None else "no complete checkpoint"
        raise FileNotFoundError(f"{what} in {directory / 'checkpoints'}")
    failed, warnings, asides, restored = [], [], [], None
    # A failed read leaves orbax's reader threads and coroutines to print their tracebacks, some of
    # them while the next checkpoint is read: while trying, stderr is kept aside (in the damaged
    # checkpoint's DAMAGED.txt when there is one), and the one line per failure said afterwards.
    with _stderr_kept() as printed:
        for s in steps:
            path = directory / "checkpoints" / str(s)
            try:  # a fresh manager per try: a failed read can leave orbax's event loop closed
                with manager(directory, keep) as mngr:
                    restored = (*restore(mngr, abstract_state, s), s)
                break
            except Exception as e:  # orbax / tensorstore raise many kinds; any of them means unreadable
                why = _why(e, path)
            mngr = None  # the failed read's manager, with its abandoned reads
            time.sleep(0.5)  # the reader threads' last words
            gc.collect()  # and the abandoned reads' ("Exception ignored in: <coroutine ...>")
            failed.append(f"{path}: {why}")
            aside = _set_aside(path, why) if set_aside else None
            asides += [aside] if aside else []
            where = f"; moved aside to {aside.name}" if aside else ""
            rest = "trying the one before it" if s != steps[-1] else "no older checkpoint"
            warnings.append(f"warning: checkpoint {path} cannot be read ({why}){where}; {rest}")
        mngr = None
        gc.collect()
    if not failed:
        sys.stderr.write(printed[0])
    elif asides:
        with open(asides[-1] / "DAMAGED.txt", "a") as f:
            f.write("\nWhat the reads printed:\n" + printed[0])
    for line in warnings:
        print(line, file=sys.stderr)
    if restored is not None:
        return restored
    raise RestoreError(f"no checkpoint of {directory} can be read:\n" + "\n".join(f"  {f}" for f in failed))


def restore_model(directory: str | Path, step: int | None = None) -> tuple[ModelConfig, dict]:
    """A training run directory -> (model config, {"params", "selection_bias"}) for inference: of
    ``step``, or the newest checkpoint that reads back (a damaged one is named on stderr and left as
    it is). FileNotFoundError without a run there."""
    directory = Path(directory)
    if not (directory / "config.yaml").is_file():
        raise FileNotFoundError(f"{directory}: no training run here (no config.yaml)")
    cfg = load_config(directory / "config.yaml")
    model = build_model(cfg.model)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh trained it: one device here
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract_state(cfg, model))
    state, _, _ = restore_intact(directory, abstract, cfg.train.keep_checkpoints, step)
    return cfg.model, {"params": state.params, "selection_bias": state.bias}


def load_checkpoint(path: str | Path, fp8_weights: bool = False):
    """A training run directory (has config.yaml) or a hub-format HF directory -> (cfg, variables,
    tokenizer or None). ``fp8_weights``: for FP8 inference (an FP8 release's weights kept as they
    are, others quantized: ``dsjax.hf.to_fp8_weights``)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--checkpoint {p}: no such directory")
    if not (p / "config.yaml").is_file() and not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"--checkpoint {p}: neither a training run (config.yaml) nor a hub checkpoint (config.json)"
        )
    if (p / "config.yaml").is_file():
        cfg, variables = restore_model(p)
        if fp8_weights:
            cfg, variables = to_fp8_weights(cfg, jax.device_get(variables))
        return cfg, variables, make_tokenizer(load_config(p / "config.yaml").data)
    cfg, variables = load_hf(p, fp8_weights=fp8_weights)
    if (p / "tokenizer.json").is_file():
        return cfg, variables, HFTokenizer(str(p / "tokenizer.json"))
    return cfg, variables, None


def graft(fresh: dict, loaded: dict, where: str) -> tuple[dict, list[str]]:
    """``fresh`` variables with every leaf of ``loaded`` put in its place. Returns (the variables, the
    paths left fresh). CheckpointError-like ValueError naming every leaf of ``loaded`` the model
    lacks or holds in another shape, and every fresh leaf that is not an indexer's (only DSA's
    indexers may start fresh)."""
    flat_fresh = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(fresh)}
    flat_loaded = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_leaves_with_path(loaded)}
    problems = [f"{k}: not in the model" for k in flat_loaded if k not in flat_fresh]
    problems += [
        f"{k}: {tuple(a.shape)} in the checkpoint, {tuple(flat_fresh[k].shape)} in the model"
        for k, a in flat_loaded.items()
        if k in flat_fresh and tuple(a.shape) != tuple(flat_fresh[k].shape)
    ]
    new = [k for k in flat_fresh if k not in flat_loaded]
    problems += [f"{k}: missing from the checkpoint" for k in new if "'indexer'" not in k]
    if problems:
        raise ValueError(f"train.init_from={where}: its weights do not fit the model: " + "; ".join(problems))
    merged = jax.tree_util.tree_map_with_path(lambda p, a: flat_loaded.get(jax.tree_util.keystr(p), a), fresh)
    return merged, new
