"""dsjax.train.data: the standard-library corpus, the split by file, packing with segment ids,
the iterator's saved state, tokenizers and data errors."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from dsjax.config import load_config
from dsjax.model import Transformer
from dsjax.train.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    is_validation,
    load_splits,
    make_tokenizer,
    split_keys,
    stdlib_files,
    train_batches,
)
from tests.train.runs import SMALL_RUN, TINY


def test_stdlib_corpus_has_no_tests_or_site_packages():
    files = stdlib_files()
    assert len(files) > 300
    parts = {p for f in files for p in Path(f).parts}
    assert not parts & {"test", "tests", "site-packages", "idle_test"}


def test_split_is_deterministic_and_disjoint():
    files = stdlib_files()
    keys = split_keys(files)
    assert "json/decoder.py" in keys  # relative to the stdlib root: the same split on every machine
    val = [k for k in keys if is_validation(k, 0.05)]
    assert 0 < len(val) < 0.15 * len(files)
    assert val == [k for k in keys if is_validation(k, 0.05)]
    # md5("a.txt") etc. are fixed: none of the three files below is held out at 1%.
    assert not any(is_validation(k, 0.01) for k in split_keys(["/x/a.txt", "/x/b.txt", "/x/c.txt"]))
    assert split_keys(["/x/y/a.txt"]) == ["a.txt"]


def test_packed_windows_keep_documents_apart(tmp_path):
    docs = {"a.txt": b"alpha doc", "b.txt": b"the second document", "c.txt": b"third"}
    for name, text in docs.items():
        (tmp_path / name).write_bytes(text)
    cfg = load_config(TINY, [f"data.paths=['{tmp_path}/*.txt']", "data.validation_fraction=0.01"])
    tok = ByteTokenizer()
    with pytest.warns(UserWarning, match="too few files"):  # 3 files: validation = the stream's tail
        train, val = load_splits(cfg.data, 16, tok)
    assert len(train) == 1 and len(val) == 1
    w = train[0]
    seg, pos = w["segment_ids"], w["positions"]
    assert seg[0] == 1 and seg.max() >= 2
    first_doc = 1 + len(docs["a.txt"]) + 1  # BOS alpha doc EOS
    np.testing.assert_array_equal(seg[:first_doc], 1)
    assert seg[first_doc] == 2 and pos[first_doc] == 0 and w["tokens"][first_doc] == tok.bos_id

    # Through the model: segment 2's logits equal running that piece alone.
    mcfg = load_config(TINY, SMALL_RUN).model
    model = Transformer(mcfg)
    variables = model.init(jax.random.key(0), w["tokens"][None])
    packed = model.apply(variables, w["tokens"][None], w["segment_ids"][None], w["positions"][None]).logits[0]
    piece = w["tokens"][seg == 2]
    alone = model.apply(variables, piece[None]).logits[0]
    np.testing.assert_allclose(np.asarray(packed[seg == 2]), np.asarray(alone), atol=1e-5)


def test_iterator_state_restores_the_same_batches():
    cfg = load_config(TINY)
    train, _ = load_splits(cfg.data, 64, ByteTokenizer())
    it = train_batches(train, 4, seed=7)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it)["tokens"] for _ in range(3)]
    again = train_batches(train, 4, seed=7)
    again.set_state(json.loads(json.dumps(state)))  # as saved in the checkpoint (JSON)
    for w in want:
        np.testing.assert_array_equal(next(again)["tokens"], w)
    other = train_batches(train, 4, seed=8)
    assert not np.array_equal(next(other)["tokens"], next(train_batches(train, 4, seed=7))["tokens"])


def test_data_errors_are_clear(tmp_path):
    def load(*overrides, seq=32):
        cfg = load_config(TINY, list(overrides))
        return load_splits(cfg.data, seq, make_tokenizer(cfg.data))

    with pytest.raises(DataError, match="matches no file"):
        load(f"data.paths=['{tmp_path}/nothing/*.txt']")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="2 tokens, fewer than the two sequences"):  # just BOS + EOS
        load(f"data.paths=['{tmp_path}/empty.txt']")
    (tmp_path / "short.txt").write_bytes(b"x" * 10)
    with pytest.raises(DataError, match="fewer than the two sequences of train.seq_len=32"):
        load(f"data.paths=['{tmp_path}/short.txt']")
    bad = tmp_path / "ids.npy"
    np.save(bad, np.asarray([1, 2, 999]))
    with pytest.raises(DataError, match=r"ids.npy: token ids must lie in \[0, 259\)"):
        load(f"data.paths=['{bad}']")
    with pytest.raises(DataError, match="no such tokenizer.json"):
        load("data.tokenizer=/nonexistent/tokenizer.json")


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "doc.py").write_text("def g(y):\n    return y * 2\n" * 40)
    cfg = load_config(TINY, [f"data.tokenizer={tmp_path / 'tokenizer.json'}", f"data.paths=['{tmp_path}/*.py']"])
    t = make_tokenizer(cfg.data)
    assert isinstance(t, HFTokenizer) and t.eos_id == tok.token_to_id("</s>") and t.bos_id == tok.token_to_id("<s>")
    with pytest.warns(UserWarning, match="too few files"):  # one file: validation = its tail
        train, _ = load_splits(cfg.data, 16, t)
    assert train.tokens[0] == t.bos_id and train.tokens.max() < t.vocab_size
    assert "return y" in t.decode(train.tokens[:20])
