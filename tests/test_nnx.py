"""jis.nnx: the NNX sampler is jis.importance_step on the user's in-place step.

The references: the unwrapped NNX step (sampling switched off), and the same
network written in flax.linen and run through jis.importance_step (sampling
on). The sampled run is repeated under nnx.jit and under nnx.split/merge +
jax.jit, in NNX's graph and tree modes, and must not change by a bit.
"""

import functools
from typing import Any, NamedTuple
import warnings

import flax.linen as nn
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jis
import jis.nnx

B, b = 8, 4   # presample, batch
STEPS = 3


class MLP(nnx.Module):
  """Linear, BatchNorm, relu, Dropout, Linear; dropout keys come from the
  ``rngs`` argument, as in Flax's MNIST tutorial."""

  def __init__(self, dropout: float, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(4, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x, rngs=None):
    x = nnx.relu(self.norm(self.hidden(x)))
    return self.out(self.dropout(x, rngs=rngs))


traces = []   # one entry each time jax traces train_step


def train_step(model, optimizer, metrics, rngs, batch, weights):
  """Flax's tutorial step, plus per-example weights. ``allow_int`` lets tree
  mode, which differentiates the whole model, skip the RNG counters."""
  traces.append(1)

  def loss_fn(model, batch, rngs):
    logits = model(batch["x"], rngs)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    return jnp.mean(weights * losses), logits
  (loss, logits), grads = nnx.value_and_grad(
      loss_fn, has_aux=True, allow_int=True)(model, batch, rngs)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  optimizer.update(model, grads)
  return {"loss": loss}


def logits_fn(model, batch):
  return nnx.view(model, deterministic=True, use_running_average=True)(
      batch["x"])


def objects(dropout=0.2):
  """model, optimizer, metrics, rngs: the tutorial's objects."""
  model = MLP(dropout, rngs=nnx.Rngs(0))
  return (model, nnx.Optimizer(model, optax.adam(0.01), wrt=nnx.Param),
          nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(),
                          loss=nnx.metrics.Average("loss")),
          nnx.Rngs(dropout=1))


def sampler_for(fn=train_step, logits=logits_fn, **options):
  options = {"presample": B / b, "tau_threshold": 0.0, **options}
  return jis.nnx.ImportanceSampler(fn, logits, batch_size=b,
                                   rngs=nnx.Rngs(jis=2), **options)


def presamples():
  x = jax.random.normal(jax.random.key(3), (STEPS * B, 4))
  label = jax.random.randint(jax.random.key(4), (STEPS * B,), 0, 3)
  return [{"x": x[i * B:(i + 1) * B], "label": label[i * B:(i + 1) * B]}
          for i in range(STEPS)]


@nnx.jit
def sampled_step(sampler, *args):
  return sampler(*args)


@functools.partial(jax.jit, donate_argnums=1)
def functional_step(graphdef, state, batch):
  """Flax's performance-guide loop: merge, call, return the state."""
  sampler, *objs = nnx.merge(graphdef, state)
  metrics = sampler(*objs, batch)
  return nnx.state((sampler, *objs)), metrics


def run_nnx_jit(sampler, objs):
  for batch in presamples():
    metrics = sampled_step(sampler, *objs, batch)
  return nnx.as_pure(nnx.state(objs)), metrics


def run_functional(sampler, objs):
  """Also checks that the state is donated (its buffers deleted, no "donated
  buffers were not usable" warning) and that the step compiles once."""
  graphdef, state = nnx.split((sampler, *objs))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for i, batch in enumerate(presamples()):
      old, (state, metrics) = state, functional_step(graphdef, state, batch)
      assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))
      if i == 0:
        compiled = functional_step._cache_size()
  assert functional_step._cache_size() == compiled
  nnx.update((sampler, *objs), state)
  return nnx.as_pure(nnx.state(objs)), metrics


def assert_equal(x, y):
  def equal(u, v):
    if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
      u, v = jax.random.key_data(u), jax.random.key_data(v)
    np.testing.assert_array_equal(u, v)
  jax.tree.map(equal, nnx.as_pure(x), nnx.as_pure(y))


@pytest.fixture(scope="module")
def reference():
  """The unwrapped step on each presample's first b examples, weights 1."""
  objs = objects()
  step = nnx.jit(train_step)
  losses = [step(*objs, batch_, jnp.ones((b,)))["loss"]
            for batch_ in [jax.tree.map(lambda v: v[:b], p)
                           for p in presamples()]]
  return nnx.as_pure(nnx.state(objs)), losses


class Run(NamedTuple):
  sampler: Any
  objects: tuple
  state: Any        # snapshots: the objects' and the sampler's arrays
  metrics: dict
  sampler_state: Any
  traces: list      # len(traces) after each step


@pytest.fixture(scope="module")
def sampled():
  """Importance sampling on, graph mode, nnx.jit: the run the other paths
  must reproduce."""
  sampler, objs = sampler_for(), objects()
  counts = []
  for batch in presamples():
    metrics = sampled_step(sampler, *objs, batch)
    counts.append(len(traces))
  return Run(sampler, objs, nnx.as_pure(nnx.state(objs)), metrics,
             nnx.as_pure(nnx.state(sampler)), counts)


def test_switched_off_equals_the_unwrapped_step_bit_for_bit(reference):
  # No "is/logits": every step also runs the scoring pass (logits_fn) on the
  # trained examples, which must leave BatchNorm and the RNG streams alone.
  sampler, objs = sampler_for(tau_threshold=float("inf")), objects()
  state, metrics = run_nnx_jit(sampler, objs)
  ref_state, ref_losses = reference
  assert_equal(state, ref_state)
  np.testing.assert_array_equal(metrics["loss"], ref_losses[-1])
  assert float(metrics["is/active"]) == 0.0
  assert int(objs[3].dropout.count[...]) == STEPS   # one dropout key a step
  assert not np.allclose(objs[0].norm.mean[...], 0.0)


def test_sampled_run_updates_objects_and_sampler_in_place(sampled):
  sampler, objs, metrics = sampled.sampler, sampled.objects, sampled.metrics
  assert float(metrics["is/active"]) == 1.0
  assert int(sampler.step[...]) == STEPS
  assert int(objs[1].step[...]) == STEPS             # optimizer
  assert int(objs[2].loss.count[...]) == STEPS       # nnx.MultiMetric
  assert int(objs[3].dropout.count[...]) == STEPS    # scoring drew no key
  assert float(sampler.tau[...]) > 0


def test_nnx_jit_compiles_once(sampled):
  assert sampled.traces[1:] == sampled.traces[:1] * (STEPS - 1)
  for batch in presamples()[:2]:
    sampled_step(sampled.sampler, *sampled.objects, batch)
  assert len(traces) == sampled.traces[-1]


@pytest.mark.parametrize("run, graph_mode", [
    (run_nnx_jit, False), (run_functional, True), (run_functional, False)],
    ids=["nnx.jit-tree", "split_merge_jax.jit-graph",
         "split_merge_jax.jit-tree"])
def test_every_path_and_mode_gives_the_same_run(sampled, run, graph_mode):
  # The sampled fixture is the fourth: nnx.jit in graph mode.
  with nnx.set_graph_mode(graph_mode):
    sampler, objs = sampler_for(), objects()
    state, metrics = run(sampler, objs)
  assert_equal(state, sampled.state)
  assert_equal(nnx.state(sampler), sampled.sampler_state)
  assert_equal(metrics, sampled.metrics)


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.99,
                             epsilon=1e-5)(nn.Dense(16)(x)))
    return nn.Dense(3)(x)


class LinenState(train_state.TrainState):
  batch_stats: dict


def linen_train_step(state, batch, weights):
  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["x"],
        train=True, mutable=["batch_stats"])
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    return jnp.mean(weights * losses), updates
  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  return (state.apply_gradients(grads=grads)
          .replace(batch_stats=updates["batch_stats"]), {"loss": loss})


def linen_logits_fn(state, batch):
  return state.apply_fn({"params": state.params,
                         "batch_stats": state.batch_stats}, batch["x"],
                        train=False)


def test_importance_sampling_equals_the_linen_path():
  # Dropout 0: Linen and NNX derive dropout keys differently, so the two
  # can only draw the same masks when there are none.
  sampler, (model, optimizer, meter, rngs) = sampler_for(), objects(dropout=0.0)
  as_linen = lambda layer: {"kernel": layer.kernel[...],
                            "bias": layer.bias[...]}
  params = {"Dense_0": as_linen(model.hidden), "Dense_1": as_linen(model.out),
            "BatchNorm_0": {"scale": model.norm.scale[...],
                            "bias": model.norm.bias[...]}}
  stats = {"BatchNorm_0": {"mean": model.norm.mean[...],
                           "var": model.norm.var[...]}}
  linen = jis.importance_step(linen_train_step, linen_logits_fn, batch_size=b,
                              presample=B / b, tau_threshold=0.0)
  state = linen.init(LinenState.create(
      apply_fn=LinenMLP().apply, params=params, tx=optax.adam(0.01),
      batch_stats=stats), sampler.key[...])
  linen_step = jax.jit(linen.step)
  for batch in presamples():
    metrics = sampled_step(sampler, model, optimizer, meter, rngs, batch)
    state, linen_metrics = linen_step(state, batch)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
                 metrics, linen_metrics)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
  close(model.hidden.kernel[...], state.inner.params["Dense_0"]["kernel"])
  close(model.out.bias[...], state.inner.params["Dense_1"]["bias"])
  close(model.norm.mean[...], state.inner.batch_stats["BatchNorm_0"]["mean"])
  close(sampler.tau[...], state.tau)
  assert_equal(sampler.key[...], state.key)


def test_step_logits_are_taken_from_its_metrics_and_removed():
  # A score table keeps the trained examples' scores: those of the logits the
  # step hands back, not logits_fn's.
  handed_back = jnp.linspace(-2.0, 2.0, b * 3).reshape(b, 3)

  def step_with_logits(*args):
    return {**train_step(*args), jis.LOGITS_KEY: handed_back}
  sampler = sampler_for(step_with_logits, tau_threshold=None, condition=jis.never(),
                        score="upper_bound", score_table=jis.stale_scores(B))
  batch = {**presamples()[0], "index": jnp.arange(B)}
  metrics = sampled_step(sampler, *objects(), batch)
  assert jis.LOGITS_KEY not in metrics and "loss" in metrics
  scores = jis.logit_grad_norm(handed_back, batch["label"][:b])
  np.testing.assert_allclose(sampler.table.scores[...][:b], scores, rtol=1e-6)


def test_logits_fn_may_switch_its_copy_to_eval_mode(sampled):
  def eval_logits(model, batch):
    model.eval()   # jis's copy of the model: the user's keeps training mode
    return model(batch["x"])
  sampler, objs = sampler_for(logits=eval_logits), objects()
  state, _ = run_nnx_jit(sampler, objs)
  assert_equal(state, sampled.state)   # the same run as with nnx.view
  assert not objs[0].dropout.deterministic
  assert not objs[0].norm.use_running_average


# ---- errors that name the fix ----

def test_train_step_without_weights_is_refused():
  def no_weights(model, optimizer, metrics, rngs, batch):
    return train_step(model, optimizer, metrics, rngs, batch, 1.0)
  with pytest.raises(TypeError, match="add a weights argument"):
    sampler_for(no_weights)(*objects(), presamples()[0])


def test_logits_fn_in_training_mode_is_refused():
  train_mode = lambda model, batch: model(batch["x"], nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"norm.*nnx\.view\(model, "):
    sampler_for(logits=train_mode)(*objects(), presamples()[0])


def test_step_that_switches_modes_is_refused():
  def switches(model, optimizer, metrics, rngs, batch, weights):
    model.eval()
    return train_step(model, optimizer, metrics, rngs, batch, weights)
  with pytest.raises(ValueError, match="static attribute.*nnx.view"):
    sampler_for(switches)(*objects(), presamples()[0])


def test_step_returning_a_loss_is_refused():
  returns_loss = lambda *args: train_step(*args)["loss"]
  with pytest.raises(TypeError, match="must return a dict of metrics"):
    sampler_for(returns_loss)(*objects(), presamples()[0])


@pytest.mark.parametrize("args, match", [
    (lambda objs, batch: (batch,), "got 1 argument"),
    (lambda objs, batch: (*objs[:3], batch, objs[3]), "last argument is Rngs"),
    (lambda objs, batch: (nnx.state(objs[0]), *objs[1:], batch),
     "argument 0 is State, not an NNX object"),
    (lambda objs, batch: ({"params": 1}, *objs[1:], batch),
     "argument 0 is dict.*jis.importance_step"),
], ids=["no_objects", "batch_not_last", "state_not_module", "linen_params"])
def test_bad_call_arguments_are_refused(args, match):
  with pytest.raises(TypeError, match=match):
    sampler_for()(*args(objects(), presamples()[0]))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"logits_fn": lambda model: model}, TypeError,
     r"logits_fn\(model, batch\)"),
    ({"rngs": 0}, TypeError, r"rngs=nnx\.Rngs\(0\)"),
    ({"graph": "tree"}, TypeError, "graph must be"),
    ({"presample": 0.5}, ValueError, "presample must be"),
], ids=["logits_fn_arity", "rngs_not_Rngs", "graph", "core_option"])
def test_bad_construction_is_refused(kwargs, error, match):
  kwargs = {"train_step": train_step, "logits_fn": logits_fn,
            "batch_size": b, "rngs": nnx.Rngs(0), **kwargs}
  with pytest.raises(error, match=match):
    jis.nnx.ImportanceSampler(**kwargs)


def test_a_score_table_looks_ahead_on_indexed_presamples():
  # The state the sampler holds carries the pending draw, and each call
  # trains on the rows the call before drew (stale_scores' default).
  rows = presamples()
  data = {k: jnp.concatenate([p[k] for p in rows]) for k in rows[0]}
  sampler = sampler_for(score_table=jis.stale_scores(STEPS * B))
  objs = objects()
  for t in range(3):
    metrics = sampled_step(sampler, *objs,
                           jis.Indexed(data, jnp.arange(t * B, (t + 1) * B)))
    assert float(metrics["is/active"]) == 1.0
  pending = sampler.state.get_value().pending
  assert bool(pending.ready) and pending.index.shape == (b,)
  assert set(np.asarray(pending.index).tolist()) <= set(range(2 * B, 3 * B))
  assert int(sampler.step[...]) == 3
