r"""What each piece of the no-scoring-pass step costs in the benchmark's loop.

Builds the convergence benchmark's compiled chunk (``loop_cost.build``) for
uniform training and for the no-scoring-pass mode with pieces of jis replaced
while it traces, then times the chunks interleaved in one process. Each round
runs every variant on the first ``steps`` steps of its run; rounds in which
the VM's host took 2 % or more of the CPU (``/proc/stat`` steal) are left out
of the medians. The replaced pieces make incorrect samplers; they only show
what each piece costs:

* ``plain``: the mode without lookahead (``no_scoring_pass_plain``);
* ``first_b``: InfoBatch's draw replaced by the presample's first ``b`` rows;
* ``no_write``: the table's write replaced by a no-op;
* ``no_tau``: τ, the scores' sanitizing and the metrics' finiteness check
  replaced by constants;
* ``dense_search``: the systematic draw's cumulative sum as a product with a
  triangular matrix, its binary search as a comparison of every pair.

Variants join with ``+``. Usage (prints a table, writes JSON)::

  python experiments/benchmarks/probes/table_pieces.py reuters_mlp 40 250 \
      nsp,plain,first_b+no_write+no_tau,dense_search out.json
"""
import functools
import statistics
import sys
import os

import jax
import jax.numpy as jnp

import jis
from jis import _policies
from jis import _pruning
from jis import _step
from jis import _variance
from experiments.benchmarks import common

sys.path.insert(0, os.path.dirname(__file__))
import loop_cost  # pylint: disable=g-import-not-at-top,wrong-import-position

ORIGINAL = {"stale_scores": jis.stale_scores, "infobatch": _pruning.infobatch,
            "systematic_sample": _pruning.systematic_sample,
            "variance_reduction": _variance.variance_reduction,
            "sanitize": _step._sanitize, "nonfinite": _step._nonfinite}  # pylint: disable=protected-access


def _first_b(*args, **kwargs):
  del args, kwargs
  def select(key, scores, state, m):
    del key
    return _policies.Selection(jnp.arange(m, dtype=jnp.int32),
                               jnp.ones((m,), jnp.float32),
                               jnp.ones_like(scores) / scores.shape[0], state)
  return _policies.Policy(lambda big_b, b: jnp.zeros((), jnp.int32), select)


@functools.wraps(ORIGINAL["stale_scores"])
def _no_write(*args, **kwargs):
  table = ORIGINAL["stale_scores"](*args, **kwargs)
  return table._replace(write=lambda state, index, scores, step: state)


def _dense_search(key, rho, num):
  size = rho.shape[0]
  cdf = jnp.dot(jnp.tril(jnp.ones((size, size), jnp.float32)),
                rho.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  cdf = cdf * (num / cdf[-1])
  points = jax.random.uniform(key, (), jnp.float32) + jnp.arange(
      num, dtype=jnp.float32)
  idx = jnp.searchsorted(cdf, points, side="right", method="compare_all")
  return jnp.minimum(idx, size - 1).astype(jnp.int32)


def _patch(pieces):
  jis.stale_scores = ORIGINAL["stale_scores"]
  _pruning.infobatch = ORIGINAL["infobatch"]
  _pruning.systematic_sample = ORIGINAL["systematic_sample"]
  _variance.variance_reduction = ORIGINAL["variance_reduction"]
  _step._sanitize = ORIGINAL["sanitize"]  # pylint: disable=protected-access
  _step._nonfinite = ORIGINAL["nonfinite"]  # pylint: disable=protected-access
  for piece in pieces:
    if piece == "first_b":
      _pruning.infobatch = _first_b
    elif piece == "no_write":
      jis.stale_scores = _no_write
    elif piece == "no_tau":
      _variance.variance_reduction = lambda s: jnp.ones((), jnp.float32)
      _step._sanitize = lambda s: (s, jnp.zeros((), jnp.float32))  # pylint: disable=protected-access
      _step._nonfinite = lambda m: jnp.zeros((), jnp.float32)  # pylint: disable=protected-access
    elif piece == "dense_search":
      _pruning.systematic_sample = _dense_search
    elif piece not in ("nsp", "plain"):
      raise ValueError(f"unknown piece {piece!r}")


def main(model="reuters_mlp", rounds="40", steps="250",
         variants="nsp,plain,first_b+no_write+no_tau,dense_search", out=""):
  header = common.header(sys.argv)
  data_dir = common.data_dir()
  runs = {}
  for name in ["uniform"] + variants.split(","):
    pieces = [] if name == "uniform" else name.split("+")
    _patch(pieces)
    method = ("uniform" if name == "uniform" else "no_scoring_pass_plain"
              if "plain" in pieces else "no_scoring_pass")
    runs[name] = loop_cost.build(model, method, data_dir)
  _patch([])
  dispatches = max(1, int(steps) // runs["uniform"]["k"])
  times, steal = loop_cost.time_rounds(runs, dispatches, int(rounds))
  calm = [i for i, s in enumerate(steal) if (s or 0.0) < 0.02]
  rows = {}
  print(f"{model}: {len(calm)} of {rounds} rounds under 2 % steal")
  for m in runs:
    ratios = [times[m][i] / times["uniform"][i] for i in calm]
    rows[m] = {"ms_per_step_min": 1e3 * min(times[m]),
               "min_over_uniform_min": min(times[m]) / min(times["uniform"]),
               "ratio_median": statistics.median(ratios) if ratios else None,
               "ratio_min": min(ratios, default=None),
               "ratio_max": max(ratios, default=None)}
    print(f"  {m:>28}: fastest round {rows[m]['ms_per_step_min']:.3f} ms/step "
          f"({rows[m]['min_over_uniform_min']:.3f}x uniform's fastest); "
          f"calm rounds {rows[m]['ratio_median']:.3f}x "
          f"[{rows[m]['ratio_min']:.3f}-{rows[m]['ratio_max']:.3f}]")
  if out:
    common.write_json({**header, "model": model, "steps": int(steps),
                       "rounds": int(rounds), "rows": rows, "times": times,
                       "steal": steal}, out)


if __name__ == "__main__":
  main(*sys.argv[1:])
