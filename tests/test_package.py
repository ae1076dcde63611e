"""The package as a user meets it: ``import dsjax`` on a CPU host stays quiet."""

import os
import subprocess
import sys


def test_a_cpu_host_prints_no_libtpu_errors():
    """With libtpu installed (the test extra has it, for the planner) JAX tries a TPU runtime on every
    host and libtpu prints its initialisation errors where there is none; importing dsjax first says
    the CPU is the only platform. Without JAX_PLATFORMS set, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import dsjax, jax; print(jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "cpu", out.stderr
    assert out.stderr == ""
