"""Every test process sees 8 simulated CPU devices (set before JAX initialises its backends), so the
sharding tests can build meshes; single-device code keeps running on device 0."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu (for dsjax.aot) in several processes
# JAX's persistent compilation cache, shared by the xdist workers and the train.py / notebook
# subprocesses (they inherit the environment): a program compiled once in the run is loaded, not
# compiled again. Keyed by the HLO, flags and JAX version, so a stale entry is never used. A size
# cap turns on JAX's file lock, which the workers need to write the same directory.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "jax"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest  # noqa: E402


@pytest.fixture
def jax_0_11_dce(monkeypatch):
    """JAX 0.11's dead-code elimination of Pallas calls: it keeps every pallas_call (0.12 drops unused
    ones). The lent GPU machines run JAX 0.11.2; this lets a newer JAX check what traces there."""
    from jax._src.interpreters import partial_eval as pe
    from jax._src.pallas.pallas_call import pallas_call_p

    monkeypatch.setitem(pe.dce_rules, pallas_call_p, lambda *args: ([True] * len(args[-1].invars), args[-1]))
