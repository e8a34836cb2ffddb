"""The default step while importance sampling stays off, against the plain step.

What a user sees when τ never crosses its threshold (docs/performance_notes.md,
section 17): an MLP on Fashion-MNIST (784-H-10, dropout 0.2, adam 1e-3,
b = 128, B = 384, probes on), one step per call, timed interleaved in one
process:

* ``nnx``: Flax NNX objects and ``nnx.jit``, the plain ``train_step`` against
  ``jis.nnx.ImportanceSampler`` at its defaults;
* ``scan``: Linen, data on device, ``lax.scan`` over 256 steps a dispatch, each
  step gathering its rows from the dataset, the plain step on ``b`` rows
  against ``jis.importance_step`` at its defaults on ``B`` rows.

A module named ``jis_before`` on ``sys.path`` (an older jis, see ``ab.py``)
adds its default step to both. Usage (prints a table, writes JSON)::

  python experiments/benchmarks/probes/inactive_cost.py 15 64 /tmp/inactive.json
"""
import gzip
import json
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

import jis
import jis.nnx
from experiments.benchmarks import common

try:
  sys.path.insert(0, "/tmp/before_pkg")
  import jis_before
  import jis_before._nnx
except ImportError:
  jis_before = None

REPS, H, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
DATA = "../shared/data/fashion_mnist/"
b, K, CALLS = 128, 256, 60


def _read(name, offset):
  with gzip.open(DATA + name) as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


X = _read("train-images-idx3-ubyte.gz", 16).reshape(-1, 784)
Y = _read("train-labels-idx1-ubyte.gz", 8).astype(np.int32)
N = len(Y)


def nnx_programs():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.l2 = nnx.Linear(784, H, rngs=rngs), nnx.Linear(H, 10, rngs=rngs)
      self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.drop(nnx.relu(self.l1(x.astype(jnp.float32) / 255))))

  def train_step(model, opt, batch, weights):
    def loss_fn(model):
      losses = optax.softmax_cross_entropy_with_integer_labels(
          model(batch["x"]), batch["label"])
      return jnp.mean(weights * losses)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return {"loss": loss}

  def logits_fn(model, batch):
    return nnx.view(model, deterministic=True)(batch["x"])

  def objects():
    model = MLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def plain(model, opt, batch):
    return train_step(model, opt, batch, jnp.ones((b,)))

  @nnx.jit
  def sampled(sampler, model, opt, batch):
    return sampler(model, opt, batch)

  rng = np.random.default_rng(0)
  rows = [rng.integers(0, N, 3 * b) for _ in range(CALLS)]
  small = [{"x": jnp.asarray(X[i[:b]]), "label": jnp.asarray(Y[i[:b]])} for i in rows]
  big = [{"x": jnp.asarray(X[i]), "label": jnp.asarray(Y[i])} for i in rows]

  def loop(fn, batches, *objs):
    def run():
      for batch in batches:
        m = fn(*objs, batch)
      jax.block_until_ready(m)
    return run
  progs = {"plain": loop(plain, small, *objects())}
  modules = {"default": jis} if jis_before is None else {
      "default": jis, "default_before": jis_before}
  for name, module in modules.items():
    nnx_module = module.nnx if module is jis else module._nnx
    sampler = nnx_module.ImportanceSampler(train_step, logits_fn, batch_size=b,
                                           rngs=nnx.Rngs(1))
    progs[name] = loop(sampled, big, sampler, *objects())
  return progs, CALLS


def scan_programs():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.relu(nn.Dense(H)(x.astype(jnp.float32) / 255))
      return nn.Dense(10)(nn.Dropout(0.2, deterministic=not train)(x))

  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 784)), False)["params"]
  xs, ys = jnp.asarray(X), jnp.asarray(Y)

  def train_step(state, batch, weights):
    rng = jax.random.fold_in(jax.random.key(1), state.step)
    def loss_fn(p):
      logits = model.apply({"params": p}, batch["x"], True, rngs={"dropout": rng})
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      return jnp.mean(weights * losses)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), {"loss": loss}

  def logits_fn(state, batch):
    return model.apply({"params": state.params}, batch["x"], False)

  def scanned(step, n):
    def body(s, key):
      i = jax.random.randint(key, (n,), 0, N)
      return step(s, {"x": xs[i], "label": ys[i]})
    run = jax.jit(lambda s, key: jax.lax.scan(body, s, jax.random.split(key, K)),
                  donate_argnums=0)
    return run

  def state():
    return train_state.TrainState.create(   # own buffers: the run donates
        apply_fn=model.apply, params=jax.tree.map(jnp.copy, params),
        tx=optax.adam(1e-3))
  carry = {}

  def program(name, fn, init):
    carry[name] = init
    def run():
      carry[name], m = fn(carry[name], jax.random.key(len(carry)))
      jax.block_until_ready(m)
    return run
  progs = {"plain": program("plain", scanned(
      lambda s, batch: train_step(s, batch, jnp.ones((b,))), b), state())}
  modules = {"default": jis} if jis_before is None else {
      "default": jis, "default_before": jis_before}
  for name, module in modules.items():
    sampler = module.importance_step(train_step, logits_fn, batch_size=b)
    progs[name] = program(name, scanned(sampler.step, 3 * b),
                          sampler.init(state(), jax.random.key(0)))
  return progs, K


def measure(progs, steps):
  for run in progs.values():
    run(), run()
  times = common.time_interleaved(progs, REPS)
  out = {}
  for name, t in times.items():
    ratios = sorted(x / y for x, y in zip(t, times["plain"]))
    out[name] = {"ms_per_step": 1e3 * statistics.median(t) / steps,
                 "over_plain": statistics.median(ratios),
                 "over_plain_range": [ratios[0], ratios[-1]]}
  return out


result = {"hidden": H, "batch_size": b, "presample_size": 3 * b,
          "repeats": REPS, "jax": jax.__version__,
          "loops": {"nnx": measure(*nnx_programs()),
                    "scan": measure(*scan_programs())}}
for loop_name, rows in result["loops"].items():
  for name, r in rows.items():
    print(f"{loop_name:5s} {name:15s} {r['ms_per_step']:7.3f} ms/step  "
          f"{r['over_plain']:.3f}x plain [{r['over_plain_range'][0]:.2f}-"
          f"{r['over_plain_range'][1]:.2f}]")
with open(OUT, "w") as f:
  json.dump(result, f, indent=1)
