"""Batches of b rows and the presample schedule: a loop that feeds b rows
where no step resamples runs what a loop feeding presamples runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jis
import linear_testing as linear

b, BIG_B = 4, 12
_train_step, _logits = linear.train_step, linear.logits


def _presample(seed):
  return linear.presample(BIG_B, seed)


def _params():
  return linear.params(100)


def _sampler(**options):
  options.setdefault("uniform_batches", True)
  return jis.importance_step(_train_step, _logits, batch_size=b,
                             presample=BIG_B / b, **options)


def test_a_batch_of_b_rows_is_the_plain_step_and_leaves_tau_alone():
  sampler = _sampler(tau_threshold=0.0)
  state = sampler.init(_params(), jax.random.key(0))
  state, _ = jax.jit(sampler.step)(state, _presample(0))   # τ measured
  batch = jax.tree.map(lambda x: x[:b], _presample(1))
  new, metrics = jax.jit(sampler.step)(state, batch)
  expected, expected_metrics = _train_step(state.inner, batch, jnp.ones(b))
  np.testing.assert_allclose(new.inner, expected, rtol=1e-6, atol=1e-7)
  assert int(new.step) == int(state.step) + 1
  assert float(new.tau) == float(state.tau) > 0
  assert int(new.tau_step) == int(state.tau_step)
  assert float(metrics["is/active"]) == 0.0
  assert int(metrics["is/rows_used"]) == b
  np.testing.assert_allclose(metrics["loss"], expected_metrics["loss"])
  _, full = jax.jit(sampler.step)(state, _presample(1))
  assert set(metrics) == set(full)   # the same metrics either way
  # Compiled alone: no cond, no scoring pass.
  hlo = jax.jit(sampler.step).lower(state, batch).as_text()
  assert "conditional" not in hlo and "case" not in hlo


@pytest.mark.parametrize("condition", [
    jis.warmup(5),
    # τ hovers around 1.035-1.045 here: on for stretches, off between.
    jis.when_variance_reduced(threshold=1.04, probe_every=3,
                              far_probe_every=7),
    # τ under halfway to 1.1: a probe every 7th step.
    jis.when_variance_reduced(threshold=1.1, probe_every=3,
                              far_probe_every=7),
], ids=["warmup", "on_and_off", "far_probes"])
def test_the_schedule_feeds_b_rows_only_where_no_step_resamples(condition):
  """Reference: the loop that feeds a presample every step. The scheduled
  loop feeds the presample's first b rows where the schedule says b; the
  runs must agree step by step."""
  sampler = _sampler(condition=condition)
  step = jax.jit(sampler.step)
  reference = sampler.init(_params(), jax.random.key(0))
  scheduled = sampler.init(_params(), jax.random.key(0))
  rows = jis.presample_schedule(sampler, horizon=16)
  sizes, active = [], []
  for t in range(40):
    presample = _presample(t)
    reference, ref_metrics = step(reference, presample)
    n = rows(scheduled)
    sizes.append(n)
    scheduled, metrics = step(scheduled, jax.tree.map(lambda x: x[:n],
                                                      presample))
    assert float(metrics["is/active"]) == float(ref_metrics["is/active"])
    active.append(float(ref_metrics["is/active"]))
    if active[-1]:
      assert n == BIG_B
  np.testing.assert_allclose(scheduled.inner, reference.inner, rtol=1e-5,
                             atol=1e-6)
  assert float(scheduled.tau) == pytest.approx(float(reference.tau))
  assert sizes.count(b) >= 5 and 0 < sum(active) < 40   # both kinds ran


def test_a_schedule_that_reads_late_still_feeds_every_resampling_step(
    monkeypatch):
  """The loop runs ahead of the device: a state is finished only a call
  after the step that made it. No step that resamples may get b rows: the
  schedule waits where it would answer b after a presample-fed step."""
  checks, alive = {}, []

  def late(tree):   # finished from its second readiness check on
    alive.append(tree)   # (so that no other tree takes its id)
    checks[id(tree)] = checks.get(id(tree), 0) + 1
    return checks[id(tree)] >= 2
  monkeypatch.setattr(jis._schedule, "_ready", late)
  # On for stretches, and probes that switch it on again right after.
  sampler = _sampler(condition=jis.when_variance_reduced(
      threshold=1.04, probe_every=3, far_probe_every=7))
  step = jax.jit(sampler.step)
  reference = sampler.init(_params(), jax.random.key(0))
  scheduled = sampler.init(_params(), jax.random.key(0))
  rows = jis.presample_schedule(sampler)
  sizes = []
  for t in range(40):
    presample = _presample(t)
    reference, ref_metrics = step(reference, presample)
    sizes.append(rows(scheduled))
    scheduled, _ = step(scheduled, jax.tree.map(lambda x: x[:sizes[-1]],
                                                presample))
    if float(ref_metrics["is/active"]):
      assert sizes[-1] == BIG_B, t
  np.testing.assert_allclose(scheduled.inner, reference.inner, rtol=1e-5,
                             atol=1e-6)
  assert sizes.count(b) >= 5


def test_the_schedule_reads_an_nnx_sampler():
  from flax import nnx
  import jis.nnx

  def train_step(model, batch, weights):
    del model, batch, weights
    return {}
  model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  sampler = jis.nnx.ImportanceSampler(
      train_step, lambda model, batch: model(batch["x"]), batch_size=b,
      presample=BIG_B / b, rngs=nnx.Rngs(0), condition=jis.warmup(2),
      uniform_batches=True)
  rows = jis.presample_schedule(sampler)
  sizes = []
  for _ in range(4):
    sizes.append(rows(sampler))
    sampler(model, {"x": jnp.ones((sizes[-1], 2)),
                    "label": jnp.zeros((sizes[-1],), jnp.int32)})
  assert sizes == [b, b, BIG_B, BIG_B]


def test_b_row_batches_and_the_schedule_need_uniform_batches():
  plain = _sampler(uniform_batches=False)
  state = plain.init(_params(), jax.random.key(0))
  batch = jax.tree.map(lambda x: x[:b], _presample(0))
  with pytest.raises(ValueError, match=r"leading dimension B .* = 12.*"
                     r"Batches of b = 4 rows.*uniform_batches=True"):
    plain.step(state, batch)
  with pytest.raises(ValueError, match="uniform_batches=True"):
    jis.presample_schedule(plain)


def test_what_needs_scores_every_step_is_refused():
  for option, what in ((dict(score_table=jis.stale_scores(64)),
                        "a score_table"),
                       (dict(budget=jis.constant_variance()), "a budget"),
                       (dict(policy=jis.selective_backprop(),
                             condition=jis.always()),
                        "a policy that observes uniform steps")):
    with pytest.raises(ValueError, match=f"{what} needs scores every step"):
      _sampler(**option)
  with pytest.raises(ValueError, match="horizon"):
    jis.presample_schedule(_sampler(), horizon=0)
  with pytest.raises(TypeError, match="what jis.importance_step returned"):
    jis.presample_schedule(lambda state: state)
  with pytest.raises(TypeError, match="uniform_batches must be True or False"):
    _sampler(uniform_batches="yes")


def test_an_indexed_batch_of_b_rows_is_checked_like_a_presample():
  sampler = _sampler()
  state = sampler.init(_params(), jax.random.key(0))
  data = _presample(0)   # 12 rows: the dataset
  new, _ = sampler.step(state, jis.Indexed(data, jnp.arange(b)))
  expected, _ = _train_step(state.inner, jax.tree.map(lambda x: x[:b], data),
                            jnp.ones(b))
  np.testing.assert_allclose(new.inner, expected, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match=r"index .*\[0, 12\)"):
    sampler.step(state, jis.Indexed(data, jnp.arange(b) + 10))
  with pytest.raises(ValueError, match=r"shape \(4,\), the dataset indices"):
    sampler.step(state, jis.Indexed(data, jnp.arange(b, dtype=jnp.float32)))
  with pytest.raises(ValueError, match="same leading dimension"):
    sampler.step(state, jis.Indexed({"x": data["x"], "label": data["label"][:5]},
                                    jnp.arange(b)))
