"""What every benchmark's JSON starts with: where and when it ran."""

import datetime
import platform

import jax


def environment() -> dict:
    return {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})",
        "host": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
    }
