"""Every test process sees 8 simulated CPU devices (set before JAX initialises its backends), so the
sharding tests can build meshes; single-device code keeps running on device 0."""

import os

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu (for dsjax.aot) in several processes
