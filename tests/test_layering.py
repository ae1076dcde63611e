"""The package's layers, read from its imports: no import cycle between modules, and no module
imports from a layer above its own (function-local imports included, ``TYPE_CHECKING`` ones too)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dsjax", "pallas_kernels")
# Bottom to top; a module may import from its own layer and those before it. pallas_kernels imports
# no dsjax module; train sits above infer (a run ends with a text sample), rl above train (its SFT is
# the train step; GRPO's update reuses its optimizer), aot above train (it compiles the train step),
# cli above everything.
LAYERS = (
    ("pallas_kernels",),
    ("dsjax.config",),
    ("dsjax.parallel",),
    ("dsjax.model",),
    ("dsjax.hf", "dsjax.infer"),
    ("dsjax.train",),
    ("dsjax.rl",),
    ("dsjax.aot",),
    ("dsjax.cli",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports, anywhere in it (``from a import b`` counts a.b if it is a module)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    g = {}
    for name, path in mods.items():
        deps = imported(path, name, known)
        if path.name == "__init__.py":  # a package re-exporting its own modules is not a dependency on them
            deps = {d for d in deps if not d.startswith(name + ".")}
        g[name] = {
            d for d in deps if not name.startswith(d + ".")
        }  # a module's own package(s): their __init__ runs first
    return g


def layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    if name in PACKAGES:
        return -1  # the top-level package __init__ re-exports lazily
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_no_module_imports_from_a_higher_layer():
    bad = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph().items()
        if m not in PACKAGES
        for d in sorted(deps)
        if layer(d) > layer(m)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g, state, cycles = graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("source, edge", [
    ("import dsjax.cli.train\n", ("dsjax.model.layers", "dsjax.cli.train")),
    ("def f():\n    from dsjax.train import step\n", ("dsjax.model.layers", "dsjax.train.step")),
    ("from ..train.loop import train\n", ("dsjax.model.layers", "dsjax.train.loop")),
])  # fmt: skip
def test_the_reader_sees_module_level_function_local_and_relative_imports(tmp_path, source, edge):
    path = tmp_path / "layers.py"
    path.write_text(source)
    assert edge[1] in imported(path, edge[0], set(modules()))
