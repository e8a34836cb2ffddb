"""Probe cited in docs/performance_notes.md, section 9: r updates per scored
presample (importance sampling with data echoing), through the convergence
benchmark.

A method whose ``batch_size`` is ``r * 128`` makes jis score ``B = presample *
r * 128`` rows once and draw ``r * 128`` of them; the patched train step below
spends them as ``r`` consecutive updates of 128 rows, each with its own weights
``1 / (B p)``. Each update is unbiased for the presample it draws from; the
updates after the first reuse scores (and rows) from before the previous
updates. ``batch_size=128`` methods are unchanged. ``--update_rows=N`` (the
first argument, if given) sets the 128, e.g. 32 for a ``--quick`` smoke run.

  python experiments/benchmarks/probes/reuse.py --models=mlp --first_seed=10 \
      --methods=uniform,ub,r2_B384 \
      --add_method 'ub={"score": "upper_bound"}' \
      --add_method 'r2_B384={"score": "upper_bound", "batch_size": 256,
                             "presample": 1.5}' \
      --out runs/proto/reuse.json
"""
import sys

import jax
import jax.numpy as jnp

from experiments import train
from experiments.benchmarks import convergence

UPDATE_ROWS = 128
_train_step = train.train_step


def train_step_in_updates(state, batch, weights):
  """``train.train_step`` on consecutive chunks of ``UPDATE_ROWS`` rows."""
  r = weights.shape[0] // UPDATE_ROWS
  if r <= 1:
    return _train_step(state, batch, weights)
  logits, losses, accuracies = [], [], []
  for j in range(r):
    rows = slice(j * UPDATE_ROWS, (j + 1) * UPDATE_ROWS)
    state, m = _train_step(state, jax.tree.map(lambda x: x[rows], batch),
                           weights[rows])
    logits.append(m["is/logits"])
    losses.append(m["train/loss"])
    accuracies.append(m["train/accuracy"])
  return state, {"train/loss": jnp.mean(jnp.stack(losses)),
                 "train/accuracy": jnp.mean(jnp.stack(accuracies)),
                 "is/logits": jnp.concatenate(logits)}


if __name__ == "__main__":
  argv = list(sys.argv)
  if len(argv) > 1 and argv[1].startswith("--update_rows="):
    UPDATE_ROWS = int(argv.pop(1).partition("=")[2])
  train.train_step = train_step_in_updates
  convergence.main(argv)
