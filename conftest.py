"""Test-wide setup: 8 virtual CPU devices for the multi-device tests, and
kernels compiled without LLVM's optimisations.

XLA reads XLA_FLAGS when JAX initialises its backend, so this must run before
any test imports jax. The tests' programs are tiny and compiled once or a few
times each: compiling dominates their time, and with LLVM's -O0 the suite
needs about a quarter less CPU time. It changes how XLA's kernels are
compiled, not what they compute (XLA's own HLO passes, fusion included, still
run); the benchmarks, which measure speed, run with XLA's defaults.
Subprocesses that set their own device count keep the other flags
(``tests/experiments_testing.xla_flags``).
"""
import os

_FLAGS = ("--xla_force_host_platform_device_count=8",
          "--xla_backend_optimization_level=0")
for _flag in _FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + _flag).strip()
