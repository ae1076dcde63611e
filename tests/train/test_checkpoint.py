"""dsjax.train.checkpoint: a mesh state saved from one replica per shard with nothing compiled,
restored under other shardings; checkpoints orbax's StandardSave wrote still restore; a failing
save names itself and leaves the others intact."""

import jax
import numpy as np
import pytest


def test_checkpoint_of_a_mesh_state_compiles_nothing_and_restores_resharded(tmp_path, caplog):
    """dsjax.train.checkpoint on one host: a state sharded over 4 devices and replicated over 2 is saved
    from one replica per shard with nothing compiled (orbax's default, replica-parallel saving,
    compiles a slice of every replicated shard), and restores equal under other shardings; so does
    a checkpoint written by orbax's StandardSave, as dsjax wrote them before."""
    import logging

    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dsjax.train import checkpoint as ckpt

    mesh = jax.make_mesh((2, 4), ("a", "b"))
    on = lambda spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    values = {
        "w": np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 7,
        "b": np.arange(48, dtype=np.float32),
        "step": np.int32(7),
    }
    state = {
        "w": jax.device_put(values["w"], on(("b", None))),
        "b": jax.device_put(values["b"], on(())),
        "step": jax.device_put(values["step"], on(())),
    }
    abstract = {
        "w": jax.ShapeDtypeStruct((64, 48), np.float32, sharding=on((None, ("a", "b")))),
        "b": jax.ShapeDtypeStruct((48,), np.float32, sharding=on(("b",))),
        "step": jax.ShapeDtypeStruct((), np.int32, sharding=on(())),
    }

    with caplog.at_level(logging.WARNING), jax.log_compiles(True), ckpt.manager(tmp_path / "new") as mngr:
        ckpt.save(mngr, 3, state, {"batches": 5})
        mngr.wait_until_finished()
    compiled = [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    assert [m for m in compiled if "fingerprint" not in m] == []  # the state's fingerprint: one program

    options = ocp.CheckpointManagerOptions(create=True)
    with ocp.CheckpointManager((tmp_path / "old" / "checkpoints").absolute(), options=options) as old:
        old.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"batches": 5})))
    for run in ("new", "old"):
        with ckpt.manager(tmp_path / run) as mngr:
            got, data = ckpt.restore(mngr, abstract)
        assert data == {"batches": 5}
        for k, want in values.items():
            assert got[k].sharding == abstract[k].sharding and got[k].dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got[k]), want)


def test_a_failing_save_names_the_checkpoint_and_leaves_the_earlier_ones_intact(tmp_path, monkeypatch):
    """A write error (here a full disk, from a writer that fails on the second save) stops the run
    with one line naming the checkpoint; the one before it restores."""
    from dsjax.train import checkpoint as ckpt
    from dsjax.train import restore_model, train
    from tests.train.runs import small_cfg

    real, saves = ckpt._state_handler, []

    def disk_full_on_the_second_save():
        handler = real()
        write = handler.async_save

        async def async_save(directory, *args, **kwargs):
            saves.append(directory)
            if len(saves) == 2:
                raise OSError(28, "No space left on device", str(directory))
            return await write(directory, *args, **kwargs)

        handler.async_save = async_save
        return handler

    monkeypatch.setattr(ckpt, "_state_handler", disk_full_on_the_second_save)
    with pytest.raises(ckpt.SaveError) as e:
        train(small_cfg(tmp_path, "train.checkpoint_every=2", "train.steps=6"), progress=False)
    message = str(e.value)
    assert "No space left on device" in message and "intact checkpoints: 2" in message, message
    assert str(tmp_path / "tiny" / "checkpoints") in message
    monkeypatch.undo()
    _, variables = restore_model(tmp_path / "tiny", step=2)
    assert jax.tree.leaves(variables)
