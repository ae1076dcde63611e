"""The suite's environment and shared fixtures.

Every test process sees 8 simulated CPU devices (set before JAX initialises its backends), so the
mesh tests can build meshes; single-device code keeps running on device 0. The suite is a CPU
suite (``JAX_PLATFORMS=cpu`` unless set: ``bench/gpu.sh tests`` sets it for a GPU).

Shared fixtures: ``hf_fixture`` (a test taking it runs once per HF reference fixture in
tests/fixtures/, made by tools/make_hf_reference.py), ``load_hf_fixture`` (name -> config,
variables, reference outputs), ``tiny_config`` (configs/tiny.yaml) and ``jax_0_11_dce``.
"""

import os
from pathlib import Path

flags = os.environ.get("XLA_FLAGS", "").split()
if not any("xla_force_host_platform_device_count" in f for f in flags):
    flags.append("--xla_force_host_platform_device_count=8")
# Most of the suite's time is XLA compiling small programs; without LLVM's optimisation passes that
# takes about half as long, and the programs compute the same (no fast-math either way). A level
# given in XLA_FLAGS is kept.
if not any("xla_backend_optimization_level" in f for f in flags):
    flags.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu (for dsjax.aot) in several processes
# JAX's persistent compilation cache, shared by the xdist workers and the training / notebook
# subprocesses (they inherit the environment): a program compiled once in the run is loaded, not
# compiled again. Keyed by the HLO, flags and JAX version, so a stale entry is never used. A size
# cap turns on JAX's file lock, which the workers need to write the same directory.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax")
)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
HF_FIXTURES = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.npz").exists())


def pytest_generate_tests(metafunc):
    if "hf_fixture" in metafunc.fixturenames:
        metafunc.parametrize("hf_fixture", HF_FIXTURES)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    return ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def load_hf_fixture():
    """name, **ModelConfig overrides -> (config, variables (numpy), the HF reference outputs)."""
    import numpy as np
    from safetensors.numpy import load_file

    from dsjax.hf import from_hf_config, from_hf_state_dict

    def load(name: str, **overrides):
        cfg = from_hf_config(FIXTURES / name, **overrides)
        variables = from_hf_state_dict(cfg, load_file(FIXTURES / name / "model.safetensors"))
        return cfg, variables, np.load(FIXTURES / name / "reference.npz")

    return load


@pytest.fixture
def jax_0_11_dce(monkeypatch):
    """JAX 0.11's dead-code elimination of Pallas calls: it keeps every pallas_call (0.12 drops unused
    ones). The lent GPU machines run JAX 0.11.2; this lets a newer JAX check what traces there."""
    from jax._src.interpreters import partial_eval as pe
    from jax._src.pallas.pallas_call import pallas_call_p

    monkeypatch.setitem(pe.dce_rules, pallas_call_p, lambda *args: ([True] * len(args[-1].invars), args[-1]))


# Each program XLA compiles for the CPU keeps memory mappings. A worker process that runs a few
# hundred tests compiles thousands of programs and passed Linux's vm.max_map_count (65530): XLA then
# aborted mid-compile (a segfault or SIGABRT in whatever test came next). Past this many mappings,
# JAX's in-memory caches are dropped after a test; the persistent cache above still saves compiling.
MAX_MAPPINGS = 30_000


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    try:
        with open("/proc/self/maps", "rb") as f:
            mappings = sum(1 for _ in f)
    except OSError:  # not Linux
        return
    if mappings > MAX_MAPPINGS:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()
