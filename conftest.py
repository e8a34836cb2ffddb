"""Test-wide setup: 8 virtual CPU devices for the multi-device tests, and
XLA:CPU flags that make compiling cheap.

XLA reads XLA_FLAGS when JAX initialises its backend, so this must run before
any test imports jax. The tests' programs are tiny and compiled once or a few
times each: compiling dominates their time. Three flags change how XLA:CPU
compiles kernels, not what they compute (XLA's HLO passes, fusion included,
still run):

- ``--xla_backend_optimization_level=0``: LLVM at -O0;
- ``--xla_cpu_use_fusion_emitters=false``: fused kernels from XLA's
  elemental emitter instead of its MLIR fusion pipeline;
- ``--xla_cpu_parallel_codegen_split_count=1``: one LLVM module per program,
  not several compiled on threads (the test workers already use every core).

On the 2-core machine, ``tests/test_losses.py`` and ``tests/test_policies.py``
took 105 s of CPU time with the first flag alone and 58 s with all three.
The benchmarks, which measure speed, run with XLA's defaults. Subprocesses
that set their own device count keep the other flags
(``tests/experiments_testing.xla_flags``).
"""
import os

_FLAGS = ("--xla_force_host_platform_device_count=8",
          "--xla_backend_optimization_level=0",
          "--xla_cpu_use_fusion_emitters=false",
          "--xla_cpu_parallel_codegen_split_count=1")
for _flag in _FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + _flag).strip()
