"""DSA's two training stages (V3.2 report §2.1.1) from a V3 run, as DeepSeek began V3.2: a V3 run's
weights start a V3.2 model with fresh indexers (train.init_from); the dense warm-up
(model.indexer_warmup) trains the indexers alone by KL, every other weight bit-for-bit frozen; sparse
training then trains everything."""

import json

import jax
import numpy as np
import pytest

from dsjax.train.checkpoint import graft, restore_model
from dsjax.train.loop import train
from tests.train.runs import small_cfg

# seq_len 32 > index_topk 8: the sparse stage selects.
DSA = ["model.index_topk=8", "model.index_n_heads=4", "model.index_head_dim=16"]


def leaves(variables):
    return {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(variables)}


def rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.slow
def test_v3_run_then_dense_warmup_then_sparse_training(tmp_path):
    train(small_cfg(tmp_path, "train.steps=2", "train.run_name=v3"), progress=False)
    warm = small_cfg(
        tmp_path,
        *DSA,
        "model.indexer_warmup=true",
        "train.steps=12",
        "train.learning_rate=1e-2",
        f"train.init_from={tmp_path / 'v3'}",
        "train.run_name=warmup",
    )
    train(warm, progress=False)
    sparse = small_cfg(
        tmp_path, *DSA, "train.steps=2", f"train.init_from={tmp_path / 'warmup'}", "train.run_name=sparse"
    )
    train(sparse, progress=False)

    v3, warmed, trained = (leaves(restore_model(tmp_path / r)[1]) for r in ("v3", "warmup", "sparse"))
    indexer = {k for k in warmed if "'indexer'" in k}
    assert indexer and set(warmed) - indexer == set(v3)
    for k in v3:  # the main model (and its selection bias) is frozen in the warm-up
        np.testing.assert_array_equal(warmed[k], v3[k], err_msg=k)
    assert all(not np.array_equal(trained[k], warmed[k]) for k in indexer if "bias" not in k)
    assert sum(not np.array_equal(trained[k], warmed[k]) for k in v3) > len(v3) // 2  # sparse: all train

    warm_rows = rows(tmp_path / "warmup")
    kl = [r["indexer"] for r in warm_rows]
    assert kl[-1] < 0.8 * kl[0], kl  # the indexers learn the attention's distribution
    assert all(r["loss"] == r["indexer"] for r in warm_rows)  # the warm-up's loss is the KL alone
    assert all("indexer" in r and r["loss"] > r["ce"] for r in rows(tmp_path / "sparse"))


def test_init_from_names_every_tensor_that_does_not_fit():
    fresh = {"a": np.zeros(3), "self_attn": {"indexer": {"wk": np.zeros(2)}, "o": np.zeros((2, 2))}}
    loaded = {"a": np.ones(3), "self_attn": {"o": np.ones((2, 2))}}
    merged, new = graft(fresh, loaded, "ckpt")
    assert new == ["['self_attn']['indexer']['wk']"] and merged["a"][0] == 1 and merged["self_attn"]["o"][0, 0] == 1
    with pytest.raises(ValueError, match=r"\['a'\]: \(4,\) in the checkpoint, \(3,\) in the model"):
        graft(fresh, {**loaded, "a": np.ones(4)}, "ckpt")
    with pytest.raises(ValueError, match=r"\['self_attn'\]\['o'\]: missing from the checkpoint"):
        graft(fresh, {"a": np.ones(3)}, "ckpt")
    with pytest.raises(ValueError, match=r"\['extra'\]: not in the model"):
        graft(fresh, {**loaded, "extra": np.ones(1)}, "ckpt")
