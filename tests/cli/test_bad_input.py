"""Fault injection at every entry point: each bad input is answered with one line on stderr that
names the problem, exit status 2, and no traceback (``DSJAX_DEBUG=1`` shows it). The Python
loaders raise the same one-line errors."""

import json
import shutil
from pathlib import Path

import pytest

from dsjax.cli import aot, convert, generate, params, train

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
HUB = ROOT / "tests" / "fixtures" / "v3_no_qlora"  # max_position_embeddings 64


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """Broken inputs, made once: a truncated checkpoint, config.json with a wrong type or a missing
    field, a garbage tokenizer.json, a corpus of non-UTF-8, empty and binary files."""
    d = tmp_path_factory.mktemp("bad")
    for name, edit in (("wrong_type", {"hidden_size": "big"}), ("missing_field", {"hidden_size": None})):
        shutil.copytree(HUB, d / name)
        cfg = {**json.loads((HUB / "config.json").read_text()), **edit}
        (d / name / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    shutil.copytree(HUB, d / "truncated")
    weights = d / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(HUB, d / "bad_header")
    (d / "bad_header" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (d / "tokenizer.json").write_text("{not json")
    return d


def T(*args):  # dsjax-train with the tiny config and these overrides
    return train.main, ["--config", TINY, *args]


def G(checkpoint, *args):  # dsjax-generate
    return generate.main, ["--checkpoint", str(checkpoint), *args]


ONE = ("--prompt-ids", "1")
CASES = {  # name: (bad files -> (entry point, argv), what its one line says)
    "train: no such config": (lambda d: (train.main, ["--config", str(d / "nope.yaml")]), "No such file"),
    "train: data.paths matches nothing": (lambda d: T(f"data.paths=['{d}/nope/*.txt']"), "matches no file"),
    "train: garbage tokenizer.json": (lambda d: T(f"data.tokenizer={d / 'tokenizer.json'}"), "not a tokenizers"),
    "train: unknown key": (lambda d: T("train.stepz=3"), "did you mean 'steps'"),
    "train: a value of the wrong type": (lambda d: T("train.seq_len=long"), "train.seq_len='long': must be an"),
    "train: a mesh the devices cannot make": (lambda d: T("mesh.tensor=16"), "do not divide the 8 devices"),
    "generate: no such checkpoint": (lambda d: G(d / "nope", *ONE), "no such directory"),
    "generate: not a checkpoint": (lambda d: G(d, *ONE), "neither a training run (config.yaml) nor a hub"),
    "generate: truncated safetensors": (lambda d: G(d / "truncated", *ONE), "truncated"),
    "generate: damaged safetensors header": (lambda d: G(d / "bad_header", *ONE), "not a safetensors file"),
    "generate: config.json, a wrong type": (lambda d: G(d / "wrong_type", *ONE), "hidden_size='big': must be"),
    "generate: config.json, a missing field": (lambda d: G(d / "missing_field", *ONE), "missing hidden_size"),
    "generate: a prompt longer than the context": (
        lambda d: G(HUB, "--prompt-ids", ",".join(["1"] * 70)), "max_position_embeddings=64"),
    "generate: --max-new-tokens 0": (lambda d: G(HUB, *ONE, "--max-new-tokens", "0"), "max_new_tokens=0: must"),
    "generate: --max-new-tokens -3": (lambda d: G(HUB, *ONE, "--max-new-tokens", "-3"), "max_new_tokens=-3"),
    "generate: --top-p 1.5": (lambda d: G(HUB, *ONE, "--top-p", "1.5"), "top_p=1.5"),
    "generate: --top-p 0": (lambda d: G(HUB, *ONE, "--top-p", "0"), "top_p=0.0"),
    "generate: --prompt-ids not integers": (lambda d: G(HUB, "--prompt-ids", "1,x"), "comma-separated integers"),
    "generate: text prompt, no tokenizer": (lambda d: G(HUB, "--prompt", "hi"), "has no tokenizer.json"),
    "convert: no such checkpoint": (lambda d: (convert.main, [str(d / "nope")]), "No such file"),
    "convert: truncated safetensors": (lambda d: (convert.main, [str(d / "truncated")]), "truncated"),
    "convert: config.json, a wrong type": (lambda d: (convert.main, [str(d / "wrong_type")]), "must be an integer"),
    "convert: DST not empty": (lambda d: (convert.main, [str(HUB), str(d)]), "not empty"),
    "aot: no such config": (lambda d: (aot.main, ["--config", str(d / "no.yaml"), "--topology", "h100:1"]), "No such"),
    "params: no such config": (lambda d: (params.main, [str(d / "nope.yaml")]), "No such file"),
    "params: an impossible value": (lambda d: (params.main, [TINY, "model.n_group=3"]), "divisible by n_group=3"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(case, bad, capsys):
    make, says = CASES[case]
    main, argv = make(bad)
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], out.err
    assert "Traceback" not in out.err + out.out


def test_dsjax_debug_shows_the_traceback(bad, monkeypatch):
    monkeypatch.setenv("DSJAX_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        params.main([str(bad / "nope.yaml")])


def test_a_corpus_of_non_utf8_empty_and_binary_files(tmp_path):
    """Non-UTF-8 text goes through (the byte tokenizer reads any bytes), an empty file is an empty
    document, a binary file (NUL bytes) is skipped with a count."""
    from dsjax.config import DataConfig
    from dsjax.train.data import ByteTokenizer, load_splits

    text = b"caf\xe9 \xff\xfe latin-1 and stray bytes\n" * 200
    (tmp_path / "latin1.txt").write_bytes(text)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 40)
    cfg = DataConfig(paths=(str(tmp_path / "*.txt"),), validation_fraction=0.1)
    with pytest.warns(UserWarning) as seen:
        split, _ = load_splits(cfg, 64, ByteTokenizer())
    messages = [str(w.message) for w in seen]
    assert any("skipped 1 binary file(s)" in m and "image.txt" in m for m in messages), messages
    assert bytes(t for t in split.tokens if t < 256).startswith(text[:100])  # the non-UTF-8 bytes, as they are
