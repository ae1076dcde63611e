"""dsjax.parallel.mesh: the mesh's shape from MeshConfig, and sizes it cannot split refused
before anything compiles."""

from pathlib import Path

import jax
import pytest

from dsjax.config import ConfigError, MeshConfig, load_config
from dsjax.parallel.mesh import check_divisible, make_mesh, mesh_shape

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["train.batch_size=8", "train.seq_len=32", "model.num_hidden_layers=2", "model.vocab_size=264"]


def test_devices():
    assert jax.device_count() == 8  # tests/conftest.py


def test_mesh_shape_resolves_the_rest_and_rejects_bad_sizes():
    assert mesh_shape(MeshConfig(), 8) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, expert=2), 8)["fsdp"] == 2
    with pytest.raises(ConfigError, match="fixed axes .3 devices. do not divide the 8 devices"):
        mesh_shape(MeshConfig(data=-1, expert=3), 8)
    assert make_mesh(MeshConfig(data=2, fsdp=2)).devices.size == 4  # no -1: the first 4 devices
    with pytest.raises(ConfigError, match="needs 16 devices, but there are 8"):
        mesh_shape(MeshConfig(data=2, fsdp=8), 8)
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        load_config(TINY, ["mesh.fsdp=-1"])  # data is -1 already
    with pytest.raises(ConfigError, match="mesh.tensor=0: must be a positive integer"):
        load_config(TINY, ["mesh.tensor=0"])


@pytest.mark.parametrize(
    "override, mesh, message",
    [
        ([], (1, 1, 1, 8), "model.num_attention_heads=4 is not divisible by mesh.tensor=8"),
        ([], (1, 1, 8, 1), None),
        (
            ["model.n_routed_experts=12", "model.n_group=2"],
            (1, 1, 8, 1),
            "model.n_routed_experts=12 is not divisible by mesh.expert=8",
        ),
        (["model.vocab_size=259"], (4, 1, 1, 2), "model.vocab_size=259 is not divisible by mesh.tensor=2"),
        (
            [],
            (8, 1, 1, 1),
            "sequences per microbatch .* is not divisible by the batch-sharding axes data x fsdp x expert = 8",
        ),
    ],
)
def test_invalid_meshes_fail_before_compiling(override, mesh, message):
    cfg = load_config(TINY, [*SMALL, *override])
    m = make_mesh(MeshConfig(*mesh))
    if message is None:
        check_divisible(m, cfg.model, 8)
    else:
        with pytest.raises(ConfigError, match=message):
            check_divisible(m, cfg.model, 4 if "sequences" in message else 8)
