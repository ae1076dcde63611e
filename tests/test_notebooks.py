"""The notebooks in notebooks/: each runs without error in QUICK mode (what CI executes), and the
committed files are what notebooks/build.py generates, carrying the outputs of a full run."""

import importlib.util
import os
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _build():
    spec = importlib.util.spec_from_file_location("notebooks_build", ROOT / "notebooks" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_is_committed():
    assert [p.stem for p in NOTEBOOKS] == sorted(_build().NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_matches_build_and_has_full_outputs(path):
    build = _build()
    nb = nbformat.read(path, as_version=4)
    assert build.sources(nb) == build.sources(build.make(path.stem)), (
        f"run: python notebooks/build.py --run {path.stem[:2]}"
    )
    run = nb.metadata.get("dsjax", {})
    assert run.get("quick") is False, f"{path.name}: commit the outputs of a full (QUICK=0) run"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.get("execution_count"), f"{path.name}: a cell was not executed"
            assert not [o for o in cell.outputs if o.output_type == "error"], f"{path.name}: a cell failed"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    """Executes the notebook as a user would (kernel cwd = notebooks/), QUICK=1; any cell error fails."""
    monkeypatch.setenv("QUICK", "1")
    # the kernel inherits this process's environment: drop conftest's 8 simulated devices (a user has one)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    conclusion = [
        b for a, b in zip(nb.cells, nb.cells[1:]) if a.cell_type == "markdown" and a.source.startswith("## Conclusion")
    ]
    assert conclusion and conclusion[0].cell_type == "code", "no code cell after '## Conclusion'"
    assert any(o.output_type == "stream" and o.text.strip() for o in conclusion[0].outputs), (
        "the conclusion printed nothing"
    )
