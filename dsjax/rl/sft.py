"""Cold-start SFT data (DeepSeek-R1 §2.3.1): prompt/response pairs packed into fixed-length
sequences, the loss on response tokens only.

Each example is [BOS] prompt response [EOS]; ``loss_mask`` marks the response and its EOS (the
tokens the model learns to write). Whole examples are packed first-fit into ``seq_len`` windows,
each its own segment (attention never crosses examples), the rest of a window padding (segment 0);
an example longer than a window is an error naming it. The batches are grain's, as in pre-training.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dsjax.train.data import DataError


def encode_pair(tokenizer, prompt: str, response: str) -> tuple[np.ndarray, np.ndarray]:
    """[BOS] prompt response [EOS] and its loss mask (1 on the response and EOS)."""
    p = tokenizer.encode(prompt.encode())
    r = tokenizer.encode(response.encode())
    tokens = np.concatenate([[tokenizer.bos_id], p, r, [tokenizer.eos_id]]).astype(np.int32)
    mask = np.concatenate([np.zeros(1 + len(p), np.int32), np.ones(len(r) + 1, np.int32)])
    return tokens, mask


@dataclasses.dataclass
class PackedPairs:
    """Windows of whole examples; ``pairs[i]`` is sequence i as the train step takes it."""

    tokens: np.ndarray  # [N, S] int32
    segment_ids: np.ndarray  # [N, S] int32 (0: padding)
    positions: np.ndarray  # [N, S] int32, restarting in every example
    loss_mask: np.ndarray  # [N, S] int32: response tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name)[i] for f in dataclasses.fields(self)}


def pack_pairs(pairs: list[tuple[str, str]], tokenizer, seq_len: int) -> PackedPairs:
    """(prompt, response) pairs -> windows of ``seq_len`` tokens, filled first-fit in order."""
    windows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    room: list[int] = []
    for n, (prompt, response) in enumerate(pairs):
        tokens, mask = encode_pair(tokenizer, prompt, response)
        if len(tokens) > seq_len:
            raise DataError(f"SFT example {n} has {len(tokens)} tokens, more than sft.seq_len={seq_len}")
        at = next((i for i, r in enumerate(room[-8:], max(len(room) - 8, 0)) if r >= len(tokens)), None)
        if at is None:
            windows.append([])
            room.append(seq_len)
            at = len(windows) - 1
        windows[at].append((tokens, mask))
        room[at] -= len(tokens)
    out = PackedPairs(*(np.zeros((len(windows), seq_len), np.int32) for _ in range(4)))
    for w, examples in enumerate(windows):
        start = 0
        for seg, (tokens, mask) in enumerate(examples, 1):
            span = slice(start, start + len(tokens))
            out.tokens[w, span], out.loss_mask[w, span] = tokens, mask
            out.segment_ids[w, span], out.positions[w, span] = seg, np.arange(len(tokens))
            start += len(tokens)
    return out
