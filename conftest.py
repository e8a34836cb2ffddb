"""Test-wide setup: 8 virtual CPU devices for the multi-device tests.

XLA reads XLA_FLAGS when JAX initialises its backend, so this must run before
any test imports jax.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
