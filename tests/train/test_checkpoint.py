"""dsjax.train.checkpoint: a mesh state saved from one replica per shard with nothing compiled,
restored under other shardings; checkpoints orbax's StandardSave wrote still restore."""

import jax
import numpy as np


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
