r"""The score table's write before and after 2026-12-04, timed interleaved.

The write kept one score per example of duplicated indices with a stable
argsort (the first wins); it now clears the entries and scatters the max
(the largest wins), with no sort. This probe builds the convergence
benchmark's ``no_scoring_pass`` run twice, once with the old write patched
into ``jis.stale_scores``, and times both and uniform's in rounds
(``loop_cost.time_rounds``).

  python experiments/benchmarks/probes/table_write.py reuters_mlp 41 2800 \
      docs/benchmarks/results/table_write_reuters.json
"""
import functools
import os
import statistics
import sys

import jax.numpy as jnp

import jis
from experiments.benchmarks import common

sys.path.insert(0, os.path.dirname(__file__))
import loop_cost  # pylint: disable=g-import-not-at-top,wrong-import-position


def with_sorted_write(stale_scores):
  """``jis.stale_scores`` with the write of before 2026-12-04."""
  @functools.wraps(stale_scores)
  def make(*args, **kwargs):
    table = stale_scores(*args, **kwargs)
    n = table.num_examples

    def write(state, indices, scores, step):
      order = jnp.argsort(indices, stable=True)
      ordered = indices[order]
      first = jnp.concatenate([jnp.ones((1,), bool),
                               ordered[1:] != ordered[:-1]])
      target = jnp.where(first, ordered, n)   # n: out of bounds, dropped
      step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), target.shape)
      return type(state)(
          state.scores.at[target].set(
              jnp.asarray(scores, jnp.float32)[order], mode="drop"),
          state.scored_at.at[target].set(step, mode="drop"))
    return table._replace(write=write)
  return make


def main(model="reuters_mlp", rounds="41", steps="2800", out=""):
  header = common.header(sys.argv)
  data_dir = common.data_dir()
  runs = {"uniform": loop_cost.build(model, "uniform", data_dir),
          "new": loop_cost.build(model, "no_scoring_pass", data_dir)}
  current = jis.stale_scores
  jis.stale_scores = with_sorted_write(current)
  try:
    runs["old"] = loop_cost.build(model, "no_scoring_pass", data_dir)
  finally:
    jis.stale_scores = current
  dispatches = max(1, int(steps) // runs["uniform"]["k"])
  times, steal = loop_cost.time_rounds(runs, dispatches, int(rounds))

  def ratio(a, b):
    r = [x / y for x, y in zip(times[a], times[b])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}

  rows = {m: {"ms_per_step": 1e3 * statistics.median(times[m]),
              "over_uniform": ratio(m, "uniform")} for m in runs}
  rows["new_over_old"] = ratio("new", "old")
  for m, row in rows.items():
    r = row.get("over_uniform", row)
    print(f"{model} {m:>12}: {r['median']:.3f}x [{r['min']:.3f}-"
          f"{r['max']:.3f}]" + (f", {row['ms_per_step']:.3f} ms/step"
                                if "ms_per_step" in row else ""))
  if out:
    common.write_json({**header, "model": model, "rounds": int(rounds),
                       "steps": int(steps), "rows": rows, "times": times,
                       "steal": steal}, out)


if __name__ == "__main__":
  main(*sys.argv[1:])
