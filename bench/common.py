"""What every benchmark's JSON starts with: where and when it ran, and with which libraries.

The host's CPU model and the numeric libraries' versions are part of a run's identity: two machines
need not repeat each other's runs to the last digit (an FP8 seed run did not, bench/RESULTS.md), and
these are what to compare when they don't."""

import datetime
import importlib.metadata
import platform
import re
from pathlib import Path

import jax


def cpu_model() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    info = Path("/proc/cpuinfo")
    if info.is_file() and (m := re.search(r"^model name\s*:\s*(.+)$", info.read_text(), re.MULTILINE)):
        return f"{m[1].strip()} ({platform.machine()})"
    return platform.processor() or platform.machine()


def environment() -> dict:
    kind = jax.devices()[0].device_kind
    return {
        "device": f"{kind} x{jax.device_count()} ({jax.default_backend()})",
        "host": cpu_model(),
        "machine": cpu_model() if jax.default_backend() == "cpu" else f"{kind} on {cpu_model()}",  # what ran it
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "libraries": {p: version(p) for p in ("jaxlib", "flax", "optax", "numpy")},
    }


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
