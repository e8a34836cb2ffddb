"""The default step while importance sampling stays off, against the plain step.

What a user sees when τ never crosses its threshold (docs/performance_notes.md,
sections 17 and 27): an MLP on Fashion-MNIST (784-H-10, or 784-H-H-10 with a
fourth argument 2; images as uint8, or float32 with a fifth; dropout 0.2,
adam 1e-3, b = 128, B = 384, probes on), a ``train_step`` without
``"is/logits"``, timed interleaved in one process:

* ``nnx``: Flax NNX objects and ``nnx.jit``, one call a step, batches from
  host memory: the plain ``train_step`` against ``jis.nnx.ImportanceSampler``
  at its defaults;
* ``jit``: Linen, ``jax.jit``, one call a step, batches from host memory
  (numpy slices of a shuffled split, as a ``tfds`` numpy iterator gives
  them);
* ``scan``: Linen, data on device, ``lax.scan`` over 256 steps a dispatch, each
  step gathering its rows from the dataset.

In each, ``default`` is ``jis.importance_step`` at its defaults fed
presamples of ``B`` rows, ``plain_B`` the plain step fed the same ``B``
rows, training on the first ``b`` (what loading a presample costs alone),
and, in the host-fed loops, ``scheduled`` the default fed ``b`` rows except
where :func:`jis.presample_schedule` asks for a presample; in the scan loop,
``indexed`` the default given ``jis.Indexed(dataset, indices)``.
A module named ``jis_before`` on ``sys.path`` (an older jis, see ``ab.py``)
adds its default step. Usage (prints a table, writes JSON)::

  python experiments/benchmarks/probes/inactive_cost.py 15 64 /tmp/inactive.json [LAYERS [DTYPE]]
"""
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
from experiments import input_pipeline
from experiments.benchmarks import common

try:
  sys.path.insert(0, "/tmp/before_pkg")
  import jis_before
  import jis_before._nnx
except ImportError:
  jis_before = None

REPS, H, OUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
LAYERS = int(sys.argv[4]) if len(sys.argv) > 4 else 1
# The images as the loader holds them: uint8 bytes, or float32 (a split
# normalized on the host: 4x the bytes to load and transfer).
DTYPE = sys.argv[5] if len(sys.argv) > 5 else "uint8"
DATA = "../shared/data/fashion_mnist/"
b, K, CALLS = 128, 256, 60


X = input_pipeline.read_idx(DATA + "train-images-idx3-ubyte.gz").reshape(
    -1, 784).astype(DTYPE)
Y = input_pipeline.read_idx(DATA + "train-labels-idx1-ubyte.gz").astype(
    np.int32)
N = len(Y)


def _host_batches(n):
  """``CALLS`` consecutive ``n``-row numpy slices of a shuffled split: the
  batches a host loader (a ``tfds`` numpy iterator) hands a step."""
  order = np.random.default_rng(0).permutation(N)
  return [{"x": X[order[i * n:(i + 1) * n]], "label": Y[order[i * n:(i + 1) * n]]}
          for i in range(CALLS)]


def _modules():
  return {"default": jis} if jis_before is None else {
      "default": jis, "default_before": jis_before}


def nnx_programs():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      sizes = [784] + [H] * LAYERS
      self.hidden = nnx.List([nnx.Linear(i, o, rngs=rngs)
                              for i, o in zip(sizes, sizes[1:])])
      self.out = nnx.Linear(H, 10, rngs=rngs)
      self.drop = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x):
      x = x.astype(jnp.float32) / 255
      for layer in self.hidden:
        x = self.drop(nnx.relu(layer(x)))
      return self.out(x)

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
  def plain_b(model, opt, batch):
    return train_step(model, opt, jax.tree.map(lambda x: x[:b], batch),
                      jnp.ones((b,)))

  @nnx.jit
  def sampled(sampler, model, opt, batch):
    return sampler(model, opt, batch)

  small, big = _host_batches(b), _host_batches(3 * b)

  def loop(fn, batches, *objs):
    def run():
      for batch in batches:
        m = fn(*objs, batch)
      jax.block_until_ready(m)
    return run
  progs = {"plain": loop(plain, small, *objects())}
  for name, module in _modules().items():
    nnx_module = module.nnx if module is jis else module._nnx
    sampler = nnx_module.ImportanceSampler(train_step, logits_fn, batch_size=b,
                                           rngs=nnx.Rngs(1))
    progs[name] = loop(sampled, big, sampler, *objects())
  progs["plain_B"] = loop(plain_b, big, *objects())
  sampler = jis.nnx.ImportanceSampler(train_step, logits_fn, batch_size=b,
                                      rngs=nnx.Rngs(1), uniform_batches=True)
  rows = jis.presample_schedule(sampler)
  objs = objects()

  def scheduled():
    for i in range(CALLS):
      m = sampled(sampler, *objs, big[i] if rows(sampler) > b else small[i])
    jax.block_until_ready(m)
  progs["scheduled"] = scheduled
  return progs, CALLS


def _linen():
  """The Linen MLP, its train step (no ``"is/logits"``), logits_fn and a
  fresh train state maker."""
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = x.astype(jnp.float32) / 255
      for _ in range(LAYERS):
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(nn.Dense(H)(x)))
      return nn.Dense(10)(x)

  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 784)), False)["params"]

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

  def state():
    return train_state.TrainState.create(   # own buffers: the run donates
        apply_fn=model.apply, params=jax.tree.map(jnp.copy, params),
        tx=optax.adam(1e-3))
  return train_step, logits_fn, state


def _carried(progs, name, fn, init, feed, pick=None):
  """A program that threads its state through ``fn(state, batch)`` over
  ``feed``; ``pick(i, state)``, if given, chooses each batch instead."""
  carry = {"state": init}
  pick = pick or (lambda i, state: feed[i])

  def run():
    for i in range(len(feed)):
      carry["state"], m = fn(carry["state"], pick(i, carry["state"]))
    jax.block_until_ready(m)
  progs[name] = run


def jit_programs():
  train_step, logits_fn, state = _linen()
  small, big = _host_batches(b), _host_batches(3 * b)
  progs = {}
  _carried(progs, "plain", jax.jit(
      lambda s, batch: train_step(s, batch, jnp.ones((b,))),
      donate_argnums=0), state(), small)
  for name, module in _modules().items():
    sampler = module.importance_step(train_step, logits_fn, batch_size=b)
    _carried(progs, name, jax.jit(sampler.step, donate_argnums=0),
             sampler.init(state(), jax.random.key(0)), big)
  _carried(progs, "plain_B", jax.jit(
      lambda s, batch: train_step(s, jax.tree.map(lambda x: x[:b], batch),
                                  jnp.ones((b,))), donate_argnums=0),
      state(), big)
  sampler = jis.importance_step(train_step, logits_fn, batch_size=b,
                                uniform_batches=True)
  rows = jis.presample_schedule(sampler)
  _carried(progs, "scheduled", jax.jit(sampler.step, donate_argnums=0),
           sampler.init(state(), jax.random.key(0)), small,
           pick=lambda i, s: big[i] if rows(s) > b else small[i])
  return progs, CALLS


def scan_programs():
  train_step, logits_fn, state = _linen()
  xs, ys = jnp.asarray(X), jnp.asarray(Y)

  def scanned(step, n, indexed=False):
    def body(s, key):
      i = jax.random.randint(key, (n,), 0, N)
      if indexed:
        return step(s, jis.Indexed({"x": xs, "label": ys}, i))
      return step(s, {"x": xs[i], "label": ys[i]})
    return jax.jit(lambda s, key: jax.lax.scan(body, s, jax.random.split(key, K)),
                   donate_argnums=0)

  one_dispatch = [jax.random.key(0)]   # K steps per dispatch
  progs = {}
  _carried(progs, "plain", scanned(
      lambda s, batch: train_step(s, batch, jnp.ones((b,))), b), state(),
      one_dispatch)
  for name, module in _modules().items():
    sampler = module.importance_step(train_step, logits_fn, batch_size=b)
    _carried(progs, name, scanned(sampler.step, 3 * b),
             sampler.init(state(), jax.random.key(0)), one_dispatch)
  sampler = jis.importance_step(train_step, logits_fn, batch_size=b)
  _carried(progs, "indexed", scanned(sampler.step, 3 * b, indexed=True),
           sampler.init(state(), jax.random.key(0)), one_dispatch)
  _carried(progs, "plain_B", scanned(
      lambda s, batch: train_step(s, jax.tree.map(lambda x: x[:b], batch),
                                  jnp.ones((b,))), 3 * b),
      state(), one_dispatch)
  return progs, K


def measure(progs, steps):
  for run in progs.values():   # past the first probe (step 127): compiled
    run(), run(), run()
  times = common.time_interleaved(progs, REPS)
  out = {}
  for name, t in times.items():
    ratios = sorted(x / y for x, y in zip(t, times["plain"]))
    out[name] = {"ms_per_step": 1e3 * statistics.median(t) / steps,
                 "over_plain": statistics.median(ratios),
                 "over_plain_range": [ratios[0], ratios[-1]]}
  return out


result = {**common.header(sys.argv), "hidden": [H] * LAYERS, "dtype": DTYPE,
          "batch_size": b,
          "presample_size": 3 * b, "repeats": REPS,
          "loops": {"nnx": measure(*nnx_programs()),
                    "jit": measure(*jit_programs()),
                    "scan": measure(*scan_programs())}}
for loop_name, rows in result["loops"].items():
  for name, r in rows.items():
    print(f"{loop_name:5s} {name:15s} {r['ms_per_step']:7.3f} ms/step  "
          f"{r['over_plain']:.3f}x plain [{r['over_plain_range'][0]:.2f}-"
          f"{r['over_plain_range'][1]:.2f}]")
with open(OUT, "w") as f:
  json.dump(result, f, indent=1)
