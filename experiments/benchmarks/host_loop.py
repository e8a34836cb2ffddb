r"""A user's host-fed loop at equal wall-clock: uniform, the default, and the
default fed by ``jis.presample_schedule``.

    python -m experiments.benchmarks.host_loop --data_dir ../shared/data \
        --seconds 20 --seeds 3 --out docs/benchmarks/results/host_loop_fashion.json

The loop a new user writes: the split in host memory (float32, normalized),
one ``jax.jit`` call a step with numpy batches, no ``"is/logits"`` in the
train step. Fashion-MNIST (not a tuning set), the MLP of issue 15's
held-back check (784-512-512-10, dropout 0.2, adam 1e-3, ``b`` = 128,
``B`` = 384). Methods, each ``--seconds`` of training per seed, taking turns
seed by seed:

* ``uniform``: ``jax.jit(train_step)`` on ``b`` rows a step;
* ``default``: ``jis.importance_step(train_step, logits_fn, batch_size=b)``
  fed ``B`` rows a step;
* ``scheduled``: the same with ``uniform_batches=True``, fed ``B`` or ``b``
  rows as ``jis.presample_schedule`` says.

Each step's rows are the next ones of a shuffled pass over the split (a new
permutation per pass). After the budget: the training loss over the whole
split (inference mode) and the test accuracy. Prints a table (medians and
ranges over seeds) and writes JSON.
"""

import argparse
import os
import statistics
import time

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jis
from experiments import input_pipeline
from experiments.benchmarks import common

b, BIG_B = 128, 384
METHODS = ("uniform", "default", "scheduled")


def load(data_dir):
  root = os.path.join(data_dir, "fashion_mnist")
  read = lambda name: input_pipeline.read_idx(os.path.join(root, name))
  split = lambda prefix: {
      "x": read(f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 784).astype(
          np.float32) / 255,
      "label": read(f"{prefix}-labels-idx1-ubyte.gz").astype(np.int32)}
  return split("train"), split("t10k")


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(2):
      x = nn.Dropout(0.2, deterministic=not train)(nn.relu(nn.Dense(512)(x)))
    return nn.Dense(10)(x)


def train_step(state, batch, weights):
  rng = jax.random.fold_in(jax.random.key(17), state.step)
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["x"], True,
                            rngs={"dropout": rng})
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    return jnp.mean(weights * losses)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss}


def logits_fn(state, batch):
  return state.apply_fn({"params": state.params}, batch["x"], False)


@jax.jit
def _evaluate(params, x, y):
  logits = MLP().apply({"params": params}, x, False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(loss), jnp.sum(jnp.argmax(logits, -1) == y)


def evaluate(params, data, chunk=10000):
  loss = correct = 0.0
  for i in range(0, len(data["label"]), chunk):
    l, c = _evaluate(params, data["x"][i:i + chunk], data["label"][i:i + chunk])
    loss, correct = loss + float(l), correct + float(c)
  return loss / len(data["label"]), correct / len(data["label"])


class Rows:
  """The next ``n`` rows of shuffled passes over the split (host numpy)."""

  def __init__(self, data, seed):
    self.data, self.rng, self.pos = data, np.random.default_rng(seed), 0
    self.order = self.rng.permutation(len(data["label"]))

  def __call__(self, n):
    if self.pos + n > len(self.order):
      self.order, self.pos = self.rng.permutation(len(self.order)), 0
    idx = self.order[self.pos:self.pos + n]   # unsorted: a uniform step
    self.pos += n                             # trains on the first b
    return {k: v[idx] for k, v in self.data.items()}


def run(method, train, seed, seconds):
  """Trains for ``seconds`` of wall-clock (compiled first); returns the
  record."""
  model = MLP()
  params = model.init(jax.random.key(seed), train["x"][:1], False)["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adam(1e-3))
  rows = Rows(train, 1000 + seed)
  if method == "uniform":
    step = jax.jit(lambda s, batch: train_step(s, batch, jnp.ones((b,))),
                   donate_argnums=0)
    size = lambda s: b
    inner = lambda s: s
  else:
    sampler = jis.importance_step(train_step, logits_fn, batch_size=b,
                                  uniform_batches=method == "scheduled")
    state = sampler.init(state, jax.random.key(seed))
    step = jax.jit(sampler.step, donate_argnums=0)
    size = (jis.presample_schedule(sampler) if method == "scheduled"
            else lambda s: BIG_B)
    inner = lambda s: s.inner
  # Compiled before the clock, on copies of the state (the step donates):
  # both programs of the scheduled loop, and the schedule's own.
  sizes = {"uniform": (b,), "default": (BIG_B,), "scheduled": (b, BIG_B)}
  for n in sizes[method]:
    jax.block_until_ready(step(jax.tree.map(jnp.copy, state), rows(n)))
  # One untimed step on the real state for every method (the schedule's
  # first call reads the state and compiles its look-ahead).
  state, _ = step(state, rows(size(state)))
  jax.block_until_ready(state)
  steps, presamples, start = 0, 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    n = size(state)
    presamples += n == BIG_B
    state, metrics = step(state, rows(n))
    steps += 1
  jax.block_until_ready(state)
  elapsed = time.perf_counter() - start
  return {"method": method, "seed": seed, "steps": steps,
          "seconds": elapsed, "ms_per_step": 1e3 * elapsed / steps,
          "presample_steps": presamples, "params": inner(state).params,
          "tau": float(getattr(state, "tau", 0.0))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default=common.data_dir())
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--first_seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(
      common.DEFAULT_OUT_DIR, "host_loop.json"))
  args = parser.parse_args()
  train, test = load(args.data_dir)
  result = {**common.header(), "seconds": args.seconds, "batch_size": b,
            "presample_size": BIG_B, "runs": []}
  for seed in range(args.first_seed, args.first_seed + args.seeds):
    for method in METHODS:
      record = run(method, train, seed, args.seconds)
      params = record.pop("params")
      record["train_loss"], _ = evaluate(params, train)
      _, record["test_accuracy"] = evaluate(params, test)
      print(f"{method:10s} seed {seed}: {record['steps']} steps "
            f"({record['ms_per_step']:.2f} ms), {record['presample_steps']} "
            f"with a presample, train loss {record['train_loss']:.4f}, test "
            f"accuracy {100 * record['test_accuracy']:.2f}%", flush=True)
      result["runs"].append(record)
  rows = []
  by_method = {m: [r for r in result["runs"] if r["method"] == m]
               for m in METHODS}
  for method, runs in by_method.items():
    ratio = lambda key: [r[key] / u[key] for r, u in zip(
        runs, by_method["uniform"])]
    loss_x, step_x = ratio("train_loss"), ratio("ms_per_step")
    rows.append({
        "method": method,
        "train loss": statistics.median(r["train_loss"] for r in runs),
        "× uniform (per seed)": f"{statistics.median(loss_x):.3f} "
                                f"[{min(loss_x):.3f}–{max(loss_x):.3f}]",
        "test acc %": 100 * statistics.median(r["test_accuracy"] for r in runs),
        "step ×": f"{statistics.median(step_x):.3f} "
                  f"[{min(step_x):.3f}–{max(step_x):.3f}]",
        "presample steps": statistics.median(
            r["presample_steps"] / r["steps"] for r in runs)})
  result["summary"] = rows
  print(common.table(rows, list(rows[0]), {"train loss": ".4f",
                                           "test acc %": ".2f",
                                           "presample steps": ".4f"}))
  print("wrote", common.write_json(result, args.out))


if __name__ == "__main__":
  main()
