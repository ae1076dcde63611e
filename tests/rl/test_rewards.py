"""R1-Zero's rule-based rewards on adversarial completions; expected values are written by hand."""

import threading

import pytest

from dsjax.rl.rewards import REWARDS, RewardError, accuracy_reward, extract_answer, format_reward, resolve_rewards

BIG = str(10**400)


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer> 42 </answer>", "42"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last block counts
    ("<answer>\n\\frac{1}{2}\n</answer>", "\\frac{1}{2}"),  # across lines
    ("<answer>1<answer>2</answer>", "2"),  # a nested opening tag: the innermost block
    ("<answer>1</answer><answer>2", "1"),  # the last complete block
    ("<answer></answer>", ""),
    ("<answer>5", None),  # unclosed
    ("5</answer>", None),
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{1} and \\boxed{ 2 }", "2"),
    ("\\boxed{1} and \\boxed{2", "1"),  # the last one never closes
    ("\\boxed{3", None),
    ("<answer>7</answer> \\boxed{8}", "7"),  # answer tags before \boxed
    ("the answer is 5", None),
    ("", None),
])  # fmt: skip
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("<think>t</think><answer>22</answer>", "22", 1.0),
    ("<think>t</think><answer>23</answer>", "22", 0.0),
    ("<answer>22</answer>", "22", 1.0),  # no think block: still accurate
    ("<answer>3</answer><answer>22</answer>", "22", 1.0),
    ("<answer>22</answer><answer>3</answer>", "22", 0.0),
    ("22", "22", 0.0),  # no tag, no \boxed
    ("<answer>22", "22", 0.0),
    ("", "22", 0.0),
    ("   \n ", "22", 0.0),
    ("<answer></answer>", "22", 0.0),
    ("<answer>  </answer>", "", 0.0),
    ("<answer>\n 85 \n</answer>", " 85\n", 1.0),  # whitespace around either
    ("<answer>85.0</answer>", "85", 1.0),
    ("<answer>-7</answer>", "7", 0.0),
    ("<answer>+7</answer>", "7", 1.0),
    (f"<answer>{BIG}</answer>", BIG, 1.0),
    (f"<answer>{10**400 + 1}</answer>", BIG, 0.0),
    (f"<answer>{BIG}.0</answer>", BIG, 1.0),
    ("<answer>0.1</answer>", "0.10000000000000000001", 0.0),  # exact, not float
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # math-verify
    ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
    ("<answer>\\frac{1}{3}</answer>", "\\frac{1}{2}", 0.0),
    ("<answer>\\sqrt 2</answer>", "\\sqrt{2}", 1.0),
    ("<answer>1+x^2</answer>", "x^2+1", 1.0),
    ("<answer>3²</answer>", "3", 0.0),  # not read as 3
    ("<answer>٣</answer>", "3", 0.0),  # Arabic-Indic three: not a fast-path number
    ("<answer>٣</answer>", "4", 0.0),
    ("<answer>²</answer>", "2", 0.0),
    ("<answer>4}\\boxed{3</answer>", "3", 0.0),  # unbalanced braces cannot escape the box
    ("<answer>\\frac{1}{2</answer>", "\\frac{1}{2}", 0.0),
    ("<answer>5</answer>", "\\frac{", 0.0),  # a gold answer math-verify cannot parse
])  # fmt: skip
def test_accuracy_reward(completion, answer, expected):
    assert accuracy_reward("p", completion, answer) == expected


def test_accuracy_reward_off_the_main_thread():
    """math-verify's SIGALRM timeouts only work in the main thread: off it they are turned off, not an error."""
    results = []
    cases = [("<answer>\\frac{1}{2}</answer>", "0.5"), ("<answer>\\frac{1}{3}</answer>", "0.5")]
    thread = threading.Thread(target=lambda: results.extend(accuracy_reward("p", c, a) for c, a in cases))
    thread.start()
    thread.join()
    assert results == [1.0, 0.0]


@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("  \n<think>\nline 1\nline 2\n</think>\n\n<answer>\n42\n</answer>\n ", 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<answer>42</answer>", 0.0),  # no think block
    ("<think>a</think>", 0.0),
    ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a</think>x<answer>b</answer>", 0.0),  # text between the blocks
    ("so <think>a</think><answer>b</answer>", 0.0),  # text before
    ("<think>a</think><answer>b</answer> done", 0.0),  # text after
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),  # two answers
    ("<think>a</think><think>a</think><answer>b</answer>", 0.0),  # two thinks
    ("<think><think>a</think></think><answer>b</answer>", 0.0),  # nested
    ("<think>a<answer>b</answer></think><answer>b</answer>", 0.0),  # a tag inside think
    ("<think>a</think><answer>b</think></answer>", 0.0),  # a tag inside answer
    ("<think>a</think><answer>b", 0.0),  # unclosed
    ("<think>a<answer>b</answer>", 0.0),
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),
    ("", 0.0),
])  # fmt: skip
def test_format_reward(completion, expected):
    assert format_reward("p", completion, "b") == expected


def test_resolve_rewards_by_name_and_import_path():
    assert resolve_rewards(["format", "accuracy"]) == [format_reward, accuracy_reward]
    assert resolve_rewards(["dsjax.rl.rewards:accuracy_reward", "accuracy"]) == [accuracy_reward, accuracy_reward]
    assert resolve_rewards([]) == []
    assert set(REWARDS) == {"accuracy", "format"}


@pytest.mark.parametrize("name, message", [
    ("accuracy_reward", "neither one of ['accuracy', 'format']"),
    ("dsjax.rl.rewards:", "neither one of"),
    (":accuracy_reward", "neither one of"),
    ("dsjax.rl.no_such_module:fn", "cannot import it (ModuleNotFoundError"),
    ("dsjax.rl.rewards:no_such_fn", "cannot import it (AttributeError"),
    ("dsjax.rl.rewards:REWARDS", "dict object is not callable"),
])  # fmt: skip
def test_resolve_rewards_names_the_bad_entry(name, message):
    with pytest.raises(RewardError, match=f"^reward '{name}': ") as e:
        resolve_rewards(["format", name])
    assert message in str(e.value) and "\n" not in str(e.value)
