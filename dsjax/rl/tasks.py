"""Tasks with verifiable answers, for GRPO (DeepSeekMath, arXiv 2402.03300 §4) and R1's cold-start SFT
(DeepSeek-R1, arXiv 2501.12948 §2.3.1). Nothing is downloaded: ``chain_sum`` is generated here,
``reasoning_gym:<name>`` by the reasoning-gym package's procedural generators, and a ``.jsonl`` file
holds one's own data.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path


class TaskError(ValueError):
    """A task cannot be made; the message names the task, or the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt, its gold answer, and optionally a worked response in R1's template (for cold-start SFT)."""

    prompt: str
    answer: str
    solution: str | None = None


def chain_sum(n: int, seed: int, min_terms: int = 2, max_terms: int = 3, max_value: int = 20) -> list[Example]:
    """``n`` sums like "7+12+3=" (terms in [0, max_value]), answer "22", solution
    "<think>7+12=19,19+3=22</think><answer>22</answer>": the running sums, left to right. Short enough for
    a tiny byte-level model."""
    if not 2 <= min_terms <= max_terms or max_value < 0 or n < 0:
        raise TaskError(
            f"chain_sum needs 2 <= min_terms <= max_terms, max_value >= 0 and n >= 0, got "
            f"{min_terms=}, {max_terms=}, {max_value=}, {n=}"
        )
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        terms = [rng.randint(0, max_value) for _ in range(rng.randint(min_terms, max_terms))]
        steps, total = [], terms[0]
        for t in terms[1:]:
            steps.append(f"{total}+{t}={total + t}")
            total += t
        solution = f"<think>{','.join(steps)}</think><answer>{total}</answer>"
        examples.append(Example("+".join(map(str, terms)) + "=", str(total), solution))
    return examples


def _example(row: object, where: str) -> Example:
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "answer"):
        if key not in row:
            raise TaskError(f"{where}: missing key {key!r}")
    prompt, answer = row["prompt"], row["answer"]
    solution = row.get("solution", row.get("response"))
    if not isinstance(prompt, str):
        raise TaskError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise TaskError(f"{where}: 'answer' must be a non-empty string or a number, got {answer!r}")
    if solution is not None and not isinstance(solution, str):
        raise TaskError(f"{where}: 'solution' must be a string, got {type(solution).__name__}")
    return Example(prompt, answer, solution)


def load_jsonl(path: str | Path) -> list[Example]:
    """One JSON object a line: ``prompt`` and ``answer`` (a number becomes its str()), optionally ``solution``
    (or ``response``) for SFT; other keys are ignored, blank lines skipped."""
    examples = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # bad JSON or bad UTF-8
                raise TaskError(f"{path}:{i}: not valid JSON ({e})") from None
            examples.append(_example(row, f"{path}:{i}"))
    if not examples:
        raise TaskError(f"{path}: no examples (the file is empty)")
    return examples


def reasoning_gym(name: str, n: int, seed: int, **kwargs) -> list[Example]:
    """``n`` examples of reasoning-gym's dataset ``name`` (its keyword options in ``kwargs``), seeded."""
    try:
        import reasoning_gym as rg
    except ImportError:
        raise TaskError(f"task 'reasoning_gym:{name}' needs reasoning-gym: pip install 'dsjax[gym]'") from None
    try:
        data = rg.create_dataset(name, size=n, seed=seed, **kwargs)
    except (ValueError, TypeError, AssertionError) as e:  # an unknown name, an unknown or invalid option
        raise TaskError(f"task 'reasoning_gym:{name}': {e}") from e
    return [Example(entry["question"], str(entry["answer"])) for entry in data]


def make_task(spec: str, n: int, seed: int, **kwargs) -> list[Example]:
    """``spec``: "chain_sum", "reasoning_gym:<name>" (both take ``kwargs``), or a path ending in .jsonl
    (its first ``n`` examples, all if ``n`` <= 0; ``seed`` unused)."""
    if spec == "chain_sum":
        return chain_sum(n, seed, **kwargs)
    if spec.startswith("reasoning_gym:") and spec != "reasoning_gym:":
        return reasoning_gym(spec.removeprefix("reasoning_gym:"), n, seed, **kwargs)
    if spec.endswith(".jsonl"):
        if kwargs:
            raise TaskError(f"task {spec!r}: a .jsonl file takes no options, got {sorted(kwargs)}")
        examples = load_jsonl(spec)
        return examples[:n] if n > 0 else examples
    raise TaskError(f"unknown task {spec!r}: expected 'chain_sum', 'reasoning_gym:<name>' or a path ending in .jsonl")
