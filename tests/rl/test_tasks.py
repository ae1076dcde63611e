"""Procedural and file tasks: chain_sum, load_jsonl, the reasoning-gym adapter and make_task."""

import json
import re
import sys

import pytest

from dsjax.rl.rewards import accuracy_reward, format_reward
from dsjax.rl.tasks import Example, TaskError, chain_sum, load_jsonl, make_task, reasoning_gym


def test_chain_sum_is_seeded():
    assert chain_sum(50, seed=0) == chain_sum(50, seed=0)
    assert chain_sum(50, seed=0) != chain_sum(50, seed=1)
    assert chain_sum(10, seed=3) == chain_sum(50, seed=3)[:10]
    assert chain_sum(0, seed=0) == []


@pytest.mark.parametrize("min_terms, max_terms, max_value", [(2, 3, 20), (2, 2, 5), (4, 6, 999), (3, 3, 0)])
def test_chain_sum_examples_are_right_and_well_formed(min_terms, max_terms, max_value):
    examples = chain_sum(200, seed=7, min_terms=min_terms, max_terms=max_terms, max_value=max_value)
    counts = set()
    for ex in examples:
        assert re.fullmatch(r"[0-9]+(\+[0-9]+)+=", ex.prompt), ex.prompt
        terms = [int(t) for t in ex.prompt[:-1].split("+")]
        counts.add(len(terms))
        assert all(0 <= t <= max_value for t in terms)
        assert ex.answer == str(sum(terms))
        assert ex.solution.endswith(f"</think><answer>{sum(terms)}</answer>")
        assert format_reward(ex.prompt, ex.solution, ex.answer) == 1.0
        assert accuracy_reward(ex.prompt, ex.solution, ex.answer) == 1.0
    assert counts == set(range(min_terms, max_terms + 1))  # 200 draws see every count


def test_chain_sum_solution_is_the_running_sum():
    # Hand-written: the running sums of these prompts, left to right (terms in [0, 3]: 2000 draws see them all).
    expected = {
        "3+2+1=": ("6", "<think>3+2=5,5+1=6</think><answer>6</answer>"),
        "2+3=": ("5", "<think>2+3=5</think><answer>5</answer>"),
        "0+3+0+2=": ("5", "<think>0+3=3,3+0=3,3+2=5</think><answer>5</answer>"),
    }
    seen = {ex.prompt: (ex.answer, ex.solution) for ex in chain_sum(2000, seed=0, max_terms=4, max_value=3)}
    for prompt, want in expected.items():
        assert seen[prompt] == want


@pytest.mark.parametrize("kwargs", [{"min_terms": 1}, {"min_terms": 4, "max_terms": 3}, {"max_value": -1}, {"n": -1}])
def test_chain_sum_rejects_bad_options(kwargs):
    with pytest.raises(TaskError, match="^chain_sum needs 2 <= min_terms <= max_terms"):
        chain_sum(**{"n": 5, "seed": 0} | kwargs)


def write(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_load_jsonl(tmp_path):
    rows = [
        {"prompt": "1+1=", "answer": "2"},
        {"prompt": "2+2=", "answer": 4, "solution": "<think>2+2=4</think><answer>4</answer>", "extra": [1]},
        {"prompt": "half?", "answer": 0.5, "response": "<think>1/2</think><answer>0.5</answer>"},
    ]
    path = write(tmp_path, "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n  \n" + json.dumps(rows[2]) + "\n")
    assert load_jsonl(path) == [
        Example("1+1=", "2"),
        Example("2+2=", "4", "<think>2+2=4</think><answer>4</answer>"),
        Example("half?", "0.5", "<think>1/2</think><answer>0.5</answer>"),
    ]
    assert load_jsonl(str(path))[0] == Example("1+1=", "2", None)


@pytest.mark.parametrize("text, line, message", [
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', 2, "not valid JSON"),
    ('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b"}\n', 3, "missing key 'answer'"),
    ('{"answer": "1"}\n', 1, "missing key 'prompt'"),
    ('["a", "1"]\n', 1, "expected a JSON object, got list"),
    ('{"prompt": 3, "answer": "1"}\n', 1, "'prompt' must be a string, got int"),
    ('{"prompt": "a", "answer": null}\n', 1, "'answer' must be a non-empty string or a number, got None"),
    ('{"prompt": "a", "answer": true}\n', 1, "'answer' must be a non-empty string or a number, got True"),
    ('{"prompt": "a", "answer": " "}\n', 1, "'answer' must be a non-empty string or a number"),
    ('{"prompt": "a", "answer": "1", "solution": ["x"]}\n', 1, "'solution' must be a string, got list"),
    ('{"prompt": "a", "answer": "1", "response": 5}\n', 1, "'solution' must be a string, got int"),
    (b'{"prompt": "\xff", "answer": "1"}\n', 1, "not valid JSON"),  # not UTF-8
])  # fmt: skip
def test_load_jsonl_errors_name_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(TaskError, match=f"^{re.escape(f'{path}:{line}: {message}')}") as e:
        load_jsonl(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_load_jsonl_rejects_an_empty_file(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(TaskError, match=f"^{re.escape(str(path))}: no examples"):
        load_jsonl(path)


def test_reasoning_gym_chain_sum():
    examples = reasoning_gym("chain_sum", 5, seed=1, min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    assert examples == reasoning_gym("chain_sum", 5, seed=1, min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    assert len(examples) == 5
    for ex in examples:
        a, op, b = re.search(r"(\d) ([+-]) (\d) =$", ex.prompt).groups()  # "... problem: 4 - 1 ="
        assert ex.answer == str(int(a) + int(b) if op == "+" else int(a) - int(b))
        assert ex.solution is None


@pytest.mark.parametrize("name, kwargs, message", [
    ("no_such_dataset", {}, "Dataset 'no_such_dataset' not registered"),
    ("chain_sum", {"bogus": 1}, "unexpected keyword argument 'bogus'"),
])  # fmt: skip
def test_reasoning_gym_errors(name, kwargs, message):
    with pytest.raises(TaskError, match=f"^task 'reasoning_gym:{name}': .*{message}"):
        reasoning_gym(name, 3, seed=0, **kwargs)


def test_reasoning_gym_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now raises ImportError
    with pytest.raises(TaskError) as e:
        make_task("reasoning_gym:chain_sum", 3, seed=0)
    assert str(e.value) == "task 'reasoning_gym:chain_sum' needs reasoning-gym: pip install 'dsjax[gym]'"


def test_make_task_dispatches(tmp_path):
    assert make_task("chain_sum", 4, seed=2, max_value=5) == chain_sum(4, seed=2, max_value=5)
    gym = make_task("reasoning_gym:chain_sum", 3, seed=0, min_digits=1, max_digits=1)
    assert gym == reasoning_gym("chain_sum", 3, seed=0, min_digits=1, max_digits=1)
    path = write(tmp_path, "".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(5)))
    assert [ex.answer for ex in make_task(str(path), 2, seed=9)] == ["0", "1"]
    assert [ex.answer for ex in make_task(str(path), 0, seed=9)] == ["0", "1", "2", "3", "4"]
    assert [ex.answer for ex in make_task(str(path), 99, seed=9)] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("spec, kwargs, message", [
    ("chainsum", {}, "unknown task 'chainsum': expected 'chain_sum', 'reasoning_gym:<name>' or a path ending in .js"),
    ("reasoning_gym:", {}, "unknown task 'reasoning_gym:'"),
    ("data.json", {}, "unknown task 'data.json'"),
    ("data.jsonl", {"max_value": 3}, "task 'data.jsonl': a .jsonl file takes no options, got ['max_value']"),
])  # fmt: skip
def test_make_task_errors(spec, kwargs, message):
    with pytest.raises(TaskError, match=f"^{re.escape(message)}"):
        make_task(spec, 3, seed=0, **kwargs)
