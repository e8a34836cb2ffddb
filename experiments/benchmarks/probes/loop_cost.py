r"""Step cost of the convergence benchmark's methods in its own training loop.

The convergence benchmark trains each method for uniform's seconds, one run
after another, so a 2-core machine's drift between runs lands in the
comparison. This probe builds the benchmark's runs (``convergence.make_config``,
``experiments.train``'s program and batch source) for several methods on one
model and times their compiled chunks interleaved in one process, so that the
drift cancels out of the ratios: what each method's step costs in the loop the
benchmark measures. Every round times each method on the same first steps of
its run (from its initial state), so the probes and switches are those of a
run's start.

  python experiments/benchmarks/probes/loop_cost.py reuters_mlp 21 \
      uniform,default,no_scoring_pass runs/loop_cost_reuters.json 2800

Methods are names in ``convergence.METHODS`` or ``NAME=JSON`` sampler
options, separated by ``;`` when a JSON holds commas.
"""
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from experiments import train
from experiments.benchmarks import common
from experiments.benchmarks import convergence


def build(model: str, method: str, data_dir: str):
  """The benchmark's compiled chunk for ``method`` (a name in
  ``convergence.METHODS``, or ``NAME=JSON`` of sampler options), its loop
  and inputs."""
  name, _, options = method.partition("=")
  config = convergence.make_config(
      model, name, 0, data_dir, False, budget_epochs=1.0,
      sampler=json.loads(options) if options else None)
  parts = train._build(config)  # pylint: disable=protected-access
  source = train._source(config, parts, None)  # pylint: disable=protected-access
  k = max(1, int(config.steps_per_dispatch))
  loop, stats, fns = train.program(config, parts, source, parts.jis_state, [k])
  fn = fns[k]
  return {"fn": fn, "start": loop, "source": source, "stats": stats,
          "key": parts.aug_key, "k": k}


def time_dispatches(run, dispatches: int) -> float:
  """Seconds per step over the run's first ``dispatches`` chunks, each waited
  for, as the benchmark's loop waits for each (it logs every dispatch)."""
  run["loop"] = jax.block_until_ready(jax.tree.map(jnp.copy, run["start"]))
  t0, active = time.perf_counter(), []
  for _ in range(dispatches):
    run["loop"], metrics = run["fn"](
        run["loop"], run["source"].next_input(0, run["k"], run["loop"].jis),
        run["stats"], run["key"])
    jax.block_until_ready((run["loop"], metrics))
    active.append(metrics["is/active"])
  seconds = (time.perf_counter() - t0) / (dispatches * run["k"])
  run["active"] = run.get("active", []) + [float(a) for a in active]
  return seconds


def time_rounds(runs, dispatches: int, rounds: int):
  """``(seconds per step by run, round by round; each round's CPU steal)``:
  every round times each run on its first ``dispatches`` chunks, in an
  order that alternates between rounds; a first round warms up, uncounted."""
  names = list(runs)
  times, steal = {m: [] for m in names}, []
  for r in range(rounds + 1):
    start = common.cpu_steal()
    took = {m: time_dispatches(runs[m], dispatches)
            for m in (names if r % 2 else names[::-1])}
    if r:
      steal.append(common.steal_fraction(start, common.cpu_steal()))
      for m in names:
        times[m].append(took[m])
  return times, steal


def main(model="reuters_mlp", repeats="21",
         methods="uniform,default,no_scoring_pass", out="", steps="1000"):
  header = common.header(sys.argv)
  data_dir = common.data_dir()
  specs = methods.split(";") if ";" in methods else methods.split(",")
  names = [m.partition("=")[0] for m in specs]
  runs = {n: build(model, m, data_dir) for n, m in zip(names, specs)}
  dispatches = max(1, int(steps) // runs[names[0]]["k"])
  times, steal = time_rounds(runs, dispatches, int(repeats))
  base = times["uniform"]
  rows = {}
  print(f"{model}: {dispatches} dispatches of {runs[names[0]]['k']} steps a "
        f"round, {repeats} rounds, order alternating")
  for m in names:
    ratios = [a / b for a, b in zip(times[m], base)]
    rows[m] = {"ms_per_step": 1e3 * statistics.median(times[m]),
               "active_fraction": statistics.mean(runs[m]["active"]),
               "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios)}
    print(f"  {m:>16}: {rows[m]['ms_per_step']:.3f} ms/step, "
          f"{rows[m]['ratio_median']:.3f}x uniform "
          f"[{rows[m]['ratio_min']:.3f}-{rows[m]['ratio_max']:.3f}], "
          f"IS active {rows[m]['active_fraction']:.3f}")
  if out:
    common.write_json({**header, "model": model, "steps": int(steps),
                       "repeats": int(repeats), "rows": rows,
                       "times": times, "steal": steal}, out)


if __name__ == "__main__":
  main(*sys.argv[1:])
