r"""How many XLA:CPU kernels a step of the convergence benchmark runs, and
how long they take, from a ``jax.profiler`` trace.

Wall-clock ratios on a shared 2-core VM drift by 10-40 % between rounds
(docs/performance_notes.md, sections 19 and 20); the number of kernels a
step launches does not. This probe builds the benchmark's compiled chunk for
each method (``loop_cost.build``), runs a few dispatches under the profiler
and sums the trace's kernel events (XLA:CPU's thunks) per training step:
their count, and their time split at 5 µs into small kernels (launch-bound:
the scalar and ``[B]``-sized work of the sampler) and large ones (the
model's products).

  python experiments/benchmarks/probes/kernel_profile.py reuters_mlp \
      uniform,default,no_scoring_pass,no_scoring_pass_plain out.json

Methods are names in ``convergence.METHODS`` or ``NAME=JSON`` sampler
options, separated by ``;`` when a JSON holds commas.
"""
import collections
import glob
import os
import sys
import tempfile

import jax

from experiments.benchmarks import common

sys.path.insert(0, os.path.dirname(__file__))
import loop_cost  # pylint: disable=g-import-not-at-top,wrong-import-position

SMALL_NS = 5000


def kernels(trace_dir: str) -> dict:
  """``{kernel name: [count, total ns]}`` over the XLA:CPU worker threads."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                   recursive=True)[0]
  out = collections.defaultdict(lambda: [0, 0])
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      for event in line.events:
        if event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
          continue   # the executor's own spans, around the kernels
        out[event.name][0] += 1
        out[event.name][1] += event.duration_ns
  return dict(out)


def profile(run, dispatches: int) -> dict:
  loop_cost.time_dispatches(run, 2)   # compiled and warm
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    loop_cost.time_dispatches(run, dispatches)
    jax.profiler.stop_trace()
    found = kernels(tmp)
  steps = dispatches * run["k"]
  small = [v for v in found.values() if v[1] < SMALL_NS * v[0]]
  large = [v for v in found.values() if v[1] >= SMALL_NS * v[0]]
  per_step = lambda vs, i: sum(v[i] for v in vs) / steps
  top = sorted(found.items(), key=lambda kv: -kv[1][1])[:15]
  return {"kernels_per_step": per_step(found.values(), 0),
          "small_kernels_per_step": per_step(small, 0),
          "small_us_per_step": per_step(small, 1) / 1e3,
          "large_kernels_per_step": per_step(large, 0),
          "large_us_per_step": per_step(large, 1) / 1e3,
          "top": {name: {"per_step": n / steps, "us_per_step": ns / steps / 1e3}
                  for name, (n, ns) in top}}


def main(model="reuters_mlp", methods="uniform,no_scoring_pass", out="",
         dispatches="6"):
  header = common.header(sys.argv)
  data_dir = common.data_dir()
  specs = methods.split(";") if ";" in methods else methods.split(",")
  rows = {}
  for spec in specs:
    name = spec.partition("=")[0]
    rows[name] = profile(loop_cost.build(model, spec, data_dir),
                         int(dispatches))
    r = rows[name]
    print(f"{model} {name:>22}: {r['kernels_per_step']:6.1f} kernels/step; "
          f"small {r['small_kernels_per_step']:6.1f} ({r['small_us_per_step']:6.1f}"
          f" µs), large {r['large_kernels_per_step']:5.1f} "
          f"({r['large_us_per_step']:7.1f} µs) per step, summed over threads, "
          "under the profiler", flush=True)
  if out:
    common.write_json({**header, "model": model, "dispatches": int(dispatches),
                       "rows": rows}, out)


if __name__ == "__main__":
  main(*sys.argv[1:])
