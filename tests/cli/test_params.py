"""dsjax-params (``python -m dsjax.cli.params``): parameter counts of a config, errors as one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dsjax.cli.params", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_cli_v3_param_counts():
    r = run_cli("configs/deepseek_v3_671b.yaml")
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert counts["main"] == pytest.approx(671e9, rel=0.005)
    assert counts["activated"] == pytest.approx(37e9, rel=0.03)
    assert 11e9 < counts["mtp"] < 15e9
    assert counts["total"] == counts["main"] + counts["mtp"]
    assert "activated per token" in r.stderr


@pytest.mark.slow
def test_cli_bad_override_exits_2():
    r = run_cli("configs/deepseek_v3_671b.yaml", "model.n_group=3")
    assert r.returncode == 2
    assert "n_routed_experts=256: must be divisible by n_group=3" in r.stderr
    assert r.stdout == ""
