"""Training data: documents -> tokens -> packed fixed-length sequences -> seeded grain batches.

Default corpus: the Python standard library's own source files (no test packages, no
site-packages), which every machine with Python has. Text in any encoding goes through (an empty
file is an empty document); binary files (NUL bytes) are skipped, with a count. Files are split
into train / validation by a hash of their path. Each document is [BOS] tokens [EOS]; the
documents of a split are laid end to end and cut into ``seq_len`` windows, each carrying segment
ids (1, 2, ... per document piece, so attention never crosses documents) and positions
(restarting in every segment). The batch iterator is grain's, whose state (a JSON dict) is saved
with every checkpoint.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
import warnings
from dataclasses import dataclass

import grain
import numpy as np

from dsjax.config import DataConfig

STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """The data cannot be used; the message names the file or setting."""


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; then BOS, EOS, PAD."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer.json; BOS/EOS from its special tokens."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise DataError(f"data.tokenizer={path}: not a tokenizers tokenizer.json ({e})") from None
        self.vocab_size = self.tok.get_vocab_size()
        vocab = self.tok.get_vocab()

        def special(*names):
            return next((vocab[n] for n in names if n in vocab), None)

        self.bos_id = special("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "[BOS]", "<bos>")
        self.eos_id = special("<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]", "<eos>")
        if self.eos_id is None:
            raise DataError(f"data.tokenizer={path}: no end-of-text token found among its special tokens")
        self.pad_id = self.eos_id

    def encode(self, data: bytes) -> np.ndarray:
        return np.asarray(self.tok.encode(data.decode("utf-8", errors="replace")).ids, np.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def make_tokenizer(cfg: DataConfig):
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if not os.path.isfile(cfg.tokenizer):
        raise DataError(f"data.tokenizer={cfg.tokenizer!r}: not 'byte' and no such tokenizer.json file")
    return HFTokenizer(cfg.tokenizer)


def stdlib_files() -> list[str]:
    """The standard library's .py files, test packages and site-packages excluded."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in STDLIB_SKIP)
        out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
    return out


def resolve_paths(cfg: DataConfig) -> list[str]:
    if not cfg.paths:
        return stdlib_files()
    files = []
    for pattern in cfg.paths:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            raise DataError(f"data.paths: {pattern!r} matches no file")
        files += matched
    return list(dict.fromkeys(files))  # de-duplicated, order kept


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of md5(key) as a fraction of 2^64.

    `key` is the file's path relative to the data's common root (see `split_keys`), so the split is
    the same on every machine, wherever the standard library or the user's data lives."""
    h = int.from_bytes(hashlib.md5(key.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def split_keys(files: list[str]) -> list[str]:
    """Each file's path relative to the files' common directory (the key `is_validation` hashes)."""
    if not files:
        return []
    root = os.path.commonpath([os.path.abspath(f) for f in files])
    if len(files) == 1:
        root = os.path.dirname(root)
    return [os.path.relpath(os.path.abspath(f), root) for f in files]


def is_binary(path: str) -> bool:
    """Whether a file looks binary rather than text: a NUL byte in its first 8 KiB. Text in any
    encoding, UTF-8 or not, has none; it goes through (the byte tokenizer reads any bytes)."""
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(8192)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def read_document(path: str, tokenizer) -> np.ndarray:
    """One file -> its tokens ([BOS] text [EOS]; a .npy file holds pre-tokenized ids as they are)."""
    try:
        if path.endswith(".npy"):
            ids = np.load(path, mmap_mode="r")
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise DataError(
                    f"{path}: a pre-tokenized .npy must be a 1-D integer array, got {ids.dtype}{list(ids.shape)}"
                )
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise DataError(f"{path}: token ids must lie in [0, {tokenizer.vocab_size})")
            return np.asarray(ids, np.int32)
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return np.concatenate([[tokenizer.bos_id], tokenizer.encode(text), [tokenizer.eos_id]]).astype(np.int32)


@dataclass
class PackedSplit:
    """A split's token stream cut into windows; ``window(i)`` is sequence i."""

    tokens: np.ndarray  # [N] int32, documents end to end
    doc_ids: np.ndarray  # [N] int32, which document each token belongs to
    seq_len: int
    num_bytes: int  # UTF-8 bytes of the text behind the tokens (for bits per byte)

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = slice(i * self.seq_len, (i + 1) * self.seq_len)
        doc = self.doc_ids[s]
        starts = np.concatenate([[True], doc[1:] != doc[:-1]])
        segment_ids = np.cumsum(starts).astype(np.int32)  # 1, 2, ... per document piece
        idx = np.arange(self.seq_len)
        positions = (idx - np.maximum.accumulate(np.where(starts, idx, 0))).astype(np.int32)
        return {"tokens": self.tokens[s], "segment_ids": segment_ids, "positions": positions}

    @property
    def bytes_per_token(self) -> float:
        return self.num_bytes / max(len(self.tokens), 1)


def pack(docs: list[np.ndarray], seq_len: int, num_bytes: int) -> PackedSplit:
    tokens = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    doc_ids = np.repeat(np.arange(len(docs), dtype=np.int32), [len(d) for d in docs])
    return PackedSplit(tokens, doc_ids, seq_len, num_bytes)


def load_splits(cfg: DataConfig, seq_len: int, tokenizer) -> tuple[PackedSplit, PackedSplit]:
    """(train, validation) packed splits; each must hold at least one full sequence."""
    files = resolve_paths(cfg)
    docs: dict[bool, list[np.ndarray]] = {False: [], True: []}
    nbytes = {False: 0, True: 0}
    binary = []
    for path, key in zip(files, split_keys(files)):
        if not path.endswith(".npy") and is_binary(path):
            binary.append(path)
            continue
        ids = read_document(path, tokenizer)
        val = is_validation(key, cfg.validation_fraction)
        docs[val].append(ids)
        nbytes[val] += os.path.getsize(path) if not path.endswith(".npy") else len(ids)
    source = "the standard library" if not cfg.paths else f"data.paths={list(cfg.paths)}"
    if binary:
        warnings.warn(f"{source}: skipped {len(binary)} binary file(s) (NUL bytes), e.g. {binary[0]}", stacklevel=2)
    train, val = (pack(docs[v], seq_len, nbytes[v]) for v in (False, True))
    if len(train) == 0 or len(val) == 0:  # too few files for a split by file: split the stream
        whole = pack(docs[False] + docs[True], seq_len, nbytes[False] + nbytes[True])
        n_val = max(seq_len, int(cfg.validation_fraction * len(whole.tokens)))
        cut = len(whole.tokens) - n_val
        if cut < seq_len:
            raise DataError(
                f"{source}: {len(whole.tokens)} tokens, fewer than the two sequences of "
                f"train.seq_len={seq_len} needed for training and validation; add data or shorten train.seq_len"
            )
        warnings.warn(f"{source}: too few files to hold out whole files; validating on the last {n_val} tokens")
        bpt = whole.bytes_per_token
        train = PackedSplit(whole.tokens[:cut], whole.doc_ids[:cut], seq_len, round(cut * bpt))
        val = PackedSplit(whole.tokens[cut:], whole.doc_ids[cut:], seq_len, round(n_val * bpt))
    return train, val


def train_batches(split: PackedSplit, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Endless seeded batches (reshuffled every epoch); ``get_state()`` / ``set_state()`` resume it."""
    ds = grain.MapDataset.source(split).shuffle(seed=seed).repeat(None).batch(batch_size)
    return iter(ds.to_iter_dataset())


def eval_batches(split: PackedSplit, batch_size: int, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` full batches of the validation split, always the same."""
    n = min(num_batches, len(split) // batch_size) or 1
    rows = [split[i % len(split)] for i in range(n * batch_size)]
    return [
        {k: np.stack([r[k] for r in rows[b * batch_size : (b + 1) * batch_size]]) for k in rows[0]} for b in range(n)
    ]
