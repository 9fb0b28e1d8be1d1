"""Test session setup: 8 simulated CPU devices (set before JAX is imported), so sharding tests see a real mesh.

Tests that want one device pass `devices=jax.devices()[:1]` (or a mesh shape of (1, 1, 1)) explicitly.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
