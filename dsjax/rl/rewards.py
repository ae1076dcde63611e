"""Rule-based rewards: DeepSeek-R1-Zero's accuracy and format rewards (DeepSeek-R1, arXiv 2501.12948 §2.2.2).

A reward is a plain callable ``fn(prompt, completion, answer) -> float``. R1-Zero scores a completion
by rules, not by a learned reward model: the accuracy reward checks the final answer (inside
``<answer>…</answer>``, or the last ``\\boxed{…}``) against the gold one, the format reward checks
that the reasoning sits in ``<think>…</think>`` before it. The answers are compared by Hugging
Face's ``math-verify`` (the verifier of open-r1), after an exact fast path for plain numbers.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Sequence
from decimal import Decimal

from math_verify import parse, verify
from math_verify.errors import TimeoutException

Reward = Callable[[str, str, str], float]

_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)  # innermost: no <answer> inside
_TAG_FREE = r"(?:(?!</?(?:think|answer)>).)*"
_FORMAT = re.compile(rf"\s*<think>{_TAG_FREE}</think>\s*<answer>{_TAG_FREE}</answer>\s*", re.DOTALL)
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")  # ASCII digits only: "٣" is no fast-path number
_TIMEOUT_S = 5  # math-verify's own default, per parse and per comparison


class RewardError(ValueError):
    """A reward name cannot be resolved; the message names it."""


def _closing_brace(text: str, start: int) -> int | None:
    """The index of the brace closing one opened just before ``start``; None if it never closes."""
    depth = 1
    for i in range(start, len(text)):
        depth += (text[i] == "{") - (text[i] == "}")
        if depth == 0:
            return i
    return None


def _balanced(text: str) -> bool:
    """No brace closes before it opens, and all close: then a brace appended closes the whole text."""
    return _closing_brace(text + "}", 0) == len(text)


def extract_answer(text: str) -> str | None:
    """The stripped content of the last complete ``<answer>…</answer>`` block; if none, of the last
    complete ``\\boxed{…}`` (nested braces allowed); else None."""
    blocks = _ANSWER.findall(text)
    if blocks:
        return blocks[-1].strip()
    for m in reversed(list(re.finditer(r"\\boxed\{", text))):
        end = _closing_brace(text, m.end())
        if end is not None:
            return text[m.end() : end].strip()
    return None


def _math_verify(gold: str, pred: str) -> bool:
    """math-verify's verdict on two answers, each parsed as the content of a ``\\boxed{}`` (so "3²" is not
    read as 3). Its timeouts use SIGALRM, which only the main thread may set: elsewhere they are off.
    Any error, or a gold answer it cannot parse, is a wrong answer."""
    if not (_balanced(gold) and _balanced(pred)):
        return False
    timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed, pred_parsed = (parse(f"\\boxed{{{s}}}", parsing_timeout=timeout) for s in (gold, pred))
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))  # an unparsed gold: [], False
    except (Exception, TimeoutException):
        return False


def accuracy_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 if the completion's final answer (:func:`extract_answer`) equals ``answer``, else 0.0. Two plain
    decimal numbers compare exactly ("85" == "85.0", 10**400 != 10**400 + 1); anything else goes to math-verify."""
    pred, gold = extract_answer(completion), answer.strip()
    if not pred or not gold:
        return 0.0
    if _NUMBER.fullmatch(gold) and _NUMBER.fullmatch(pred):
        return float(Decimal(gold) == Decimal(pred))
    return float(_math_verify(gold, pred))


def format_reward(prompt: str, completion: str, answer: str) -> float:
    """1.0 iff the completion is exactly ``<think>…</think>`` then ``<answer>…</answer>`` (whitespace around
    and between allowed; neither content holding one of the four tags), else 0.0: R1-Zero's template."""
    return float(_FORMAT.fullmatch(completion) is not None)


REWARDS: dict[str, Reward] = {"accuracy": accuracy_reward, "format": format_reward}


def resolve_rewards(names: Sequence[str]) -> list[Reward]:
    """Each name: a key of :data:`REWARDS`, or an import path ``"package.module:function"``."""
    rewards = []
    for name in names:
        if name in REWARDS:
            rewards.append(REWARDS[name])
            continue
        module, _, attr = name.partition(":")
        if not module or not attr:
            raise RewardError(f"reward {name!r}: neither one of {sorted(REWARDS)} nor a 'package.module:function' path")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except Exception as e:
            raise RewardError(f"reward {name!r}: cannot import it ({type(e).__name__}: {e})") from e
        if not callable(fn):
            raise RewardError(f"reward {name!r}: {type(fn).__name__} object is not callable")
        rewards.append(fn)
    return rewards
