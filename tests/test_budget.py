"""Compute-budget modes: bucket choice against the original formulas, in the step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jis
import linear_testing as linear
from linear_testing import logits as _logits
from linear_testing import params as _params
from linear_testing import presample as _presample


def _train_step(params, batch, weights):
  params, metrics = linear.train_step(params, batch, weights)
  return params, {**metrics, "trained": jnp.float32(weights.shape[0])}


TAUS = (0.0, 1.0, 1.2, 1.5, 1.9, 2.0, 2.5, 3.0, 4.0, 7.0, 30.0, 1e4)


# ---------------------------------------------------------------- formulas


def _numpy_constant_variance(tau, b, extra, fractions):
  sizes = sorted({max(1, math.ceil(f * b)) for f in set(fractions) | {1.0}})
  target = (1.0 / tau + extra) * b if tau > 0 else math.inf
  fitting = [n for n in sizes if n >= target - 1e-6]
  return fitting[0] if fitting else sizes[-1]


@pytest.mark.parametrize("b, extra, fractions", [
    (128, 0.2, (0.25, 0.5, 0.75, 1.0)),
    (10, 0.0, (0.1, 0.3, 0.6)),
    (7, 0.5, (0.5,)),
])
def test_constant_variance_trains_on_the_smallest_bucket_above_b_over_tau(
    b, extra, fractions):
  budget = jis.constant_variance(extra_samples=extra, fractions=fractions)
  buckets = budget.plan(b, b)
  assert all(n == b for n, _ in buckets)
  for tau in TAUS:
    _, trained = buckets[int(budget.choose(tau, b, b))]
    assert trained == _numpy_constant_variance(tau, b, extra, fractions), tau


def test_constant_variance_threshold_is_where_resampling_pays_off():
  for t_b, extra in ((2.0, 0.2), (1.0, 0.0), (3.0, 0.5)):
    budget = jis.constant_variance(backward_time=t_b, extra_samples=extra)
    tau = budget.tau_threshold(64, 64)
    assert tau == pytest.approx(1.0 / (t_b / (1 + t_b) - extra))
    # At τ_th, training on (1/τ + extra) b saves exactly the presample's forward.
    b = 64
    assert (1 + t_b) * (b - (1 / tau + extra) * b) == pytest.approx(b)


def _numpy_constant_time(tau, big_b, b, t_b, ratio, min_fraction, buckets):
  """ConstantTimeSampler.sample's arithmetic, rounded to jis's static grid."""
  total = (1 + t_b) * b
  a = max(min_fraction * b, b / tau) if tau > 0 else b
  most = total - (1 + t_b) * a
  target = b + (most - b) * ratio
  grid = sorted({int(round(n)) for n in np.linspace(b, big_b, buckets)})
  below = [n for n in grid if n <= target + 1e-6]
  n = below[-1] if below else grid[0]
  return n, int(math.floor((total - n) / (1 + t_b) + 1e-9))


@pytest.mark.parametrize("big_b, b, t_b, ratio, min_fraction, buckets", [
    (216, 128, 2.0, 0.5, 0.2, 4),
    (24, 16, 1.0, 1.0, 0.3, 3),
    (40, 20, 3.0, 0.25, 0.1, 6),
])
def test_constant_time_follows_the_original_formula_on_a_grid(
    big_b, b, t_b, ratio, min_fraction, buckets):
  budget = jis.constant_time(backward_time=t_b, ratio=ratio,
                             min_fraction=min_fraction, buckets=buckets)
  plan = budget.plan(big_b, b)
  for scored, trained in plan:   # no bucket costs more than a uniform step
    assert scored + (1 + t_b) * trained <= (1 + t_b) * b + 1e-9
    assert scored + (1 + t_b) * (trained + 1) > (1 + t_b) * b
  chosen = set()
  for tau in TAUS:
    got = plan[int(budget.choose(tau, big_b, b))]
    assert got == _numpy_constant_time(tau, big_b, b, t_b, ratio, min_fraction,
                                       buckets), tau
    chosen.add(got)
  assert len(chosen) > 1


def test_constant_variance_keeps_the_uniform_variance_with_exact_norms():
  """With scores = per-example gradient norms, the chosen bucket's importance
  sampled mean gradient has no more variance than b uniform examples."""
  rng = np.random.default_rng(0)
  b = 32
  budget = jis.constant_variance(extra_samples=0.0,
                                 fractions=tuple(np.arange(1, 33) / 32))
  ratios = []
  for trial in range(20):
    g = rng.normal(size=(b, 4)) * rng.lognormal(sigma=1.5, size=(b, 1))
    norms = np.linalg.norm(g, axis=1)
    tau = float(jis.variance_reduction(jnp.asarray(norms, jnp.float32)))
    _, n = budget.plan(b, b)[int(budget.choose(tau, b, b))]
    mean = g.mean(0)
    p = norms / norms.sum()
    uniform = (np.mean(norms ** 2) - mean @ mean) / b
    weighted = g / (b * p[:, None])    # w_i G_i with w_i = 1 / (B p_i)
    importance = (np.sum(p * np.sum(weighted ** 2, 1)) - mean @ mean) / n
    ratios.append(importance / uniform)
    assert n < b or tau < 1.05
  assert max(ratios) <= 1.0 + 1e-9, ratios
  assert min(ratios) < 0.9      # and the bound is not vacuous


# ---------------------------------------------------------------- in the step


def _sampler(budget, b=8, presample=1.0, **kw):
  kw.setdefault("condition", jis.always())
  return jis.importance_step(_train_step, _logits, batch_size=b,
                             presample=presample, budget=budget, **kw)


def test_step_trains_on_the_bucket_tau_picks_and_compiles_once():
  b = 8
  budget = jis.constant_variance()
  sampler = _sampler(budget)
  step = jax.jit(sampler.step)
  state = sampler.init(_params(), jax.random.key(0))
  sizes = set()
  for i, tau in enumerate((1.2, 2.5, 5.0, 40.0, 3.0)):
    state, metrics = step(state._replace(tau=jnp.float32(tau)), _presample(b, i))
    expected = _numpy_constant_variance(tau, b, 0.2, (0.25, 0.5, 0.75, 1.0))
    assert float(metrics["trained"]) == expected == float(metrics["is/batch_size"])
    assert float(metrics["is/presample_size"]) == b
    sizes.add(expected)
  assert sizes == {2, 4, 6, 8}
  assert step._cache_size() == 1


def test_constant_time_scores_fewer_rows_of_the_presample():
  b, presample = 8, 1.75
  budget = jis.constant_time()
  sampler = _sampler(budget, presample=presample)
  plan = budget.plan(14, b)
  assert plan == ((8, 5), (10, 4), (12, 4), (14, 3))
  step = jax.jit(sampler.step)
  state = sampler.init(_params(), jax.random.key(0))
  for i, tau in enumerate((1.0, 2.0, 3.0, 1e3)):
    state, metrics = step(state._replace(tau=jnp.float32(tau)), _presample(14, i))
    scored, trained = _numpy_constant_time(tau, 14, b, 2.0, 0.5, 0.2, 4)
    assert float(metrics["is/presample_size"]) == scored
    assert float(metrics["trained"]) == trained
  assert step._cache_size() == 1


def test_default_condition_uses_the_budget_threshold():
  budget = jis.constant_variance(extra_samples=0.1)
  sampler = jis.importance_step(_train_step, _logits, batch_size=8, presample=1.0,
                                budget=budget)
  state = sampler.init(_params(), jax.random.key(0))
  assert float(state.condition) == pytest.approx(
      1.0 / (2.0 / 3.0 - 0.1), rel=1e-6)
  state, metrics = jax.jit(sampler.step)(state, _presample(8))
  assert float(metrics["is/active"]) == 0.0     # τ starts below it
  assert float(metrics["is/batch_size"]) == 8.0
  assert float(metrics["is/presample_size"]) == 0.0


def test_small_buckets_stay_unbiased():
  b, draws = 8, 20000
  sampler = _sampler(jis.constant_variance(), policy=jis.importance_sampling())
  batch, params = _presample(b), _params()
  keys = jax.random.split(jax.random.key(3), draws)
  states = jax.vmap(lambda k: sampler.init(params, k)._replace(
      tau=jnp.float32(20.0)))(keys)   # picks the bucket of 2 examples
  new, metrics = jax.jit(jax.vmap(sampler.step, in_axes=(0, None)))(states, batch)
  assert np.all(np.asarray(metrics["trained"]) == 2)
  updates = np.asarray(new.inner - params, np.float64).reshape(draws, -1)
  full, _ = _train_step(params, batch, jnp.ones(b))
  reference = np.asarray(full - params, np.float64).ravel()
  mean, stderr = updates.mean(0), updates.std(0) / np.sqrt(draws)
  # Within 4.5 standard errors per coordinate; under 5% of the update's norm.
  assert np.all(np.abs(mean - reference) < 4.5 * stderr + 1e-7)
  assert np.linalg.norm(mean - reference) < 0.05 * np.linalg.norm(reference)


@pytest.mark.parametrize("budget", [jis.constant_time(), jis.constant_variance()],
                         ids=["constant_time", "constant_variance"])
def test_runs_under_scan_with_the_sb_policy(budget):
  b = 8
  sampler = _sampler(budget, presample=1.75,
                     policy=jis.selective_backprop(history=64),
                     condition=jis.when_variance_reduced(0.5, probe_every=3),
                     tau_momentum=0.5)
  batches = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[_presample(14, i) for i in range(8)])
  state = sampler.init(_params(), jax.random.key(0))
  _, metrics = jax.jit(lambda s, bs: jax.lax.scan(sampler.step, s, bs))(state, batches)
  active = np.asarray(metrics["is/active"]) == 1
  assert active.any()
  assert np.all(np.asarray(metrics["is/batch_size"])[~active] == b)
  plan = budget.plan(14, b)
  chosen = zip(np.asarray(metrics["is/presample_size"])[active],
               np.asarray(metrics["is/batch_size"])[active])
  assert set(chosen) <= set(plan)


@pytest.mark.parametrize("make, match", [
    (lambda: jis.constant_variance(backward_time=0.0), r"backward_time"),
    (lambda: jis.constant_variance(extra_samples=0.7), r"extra_samples"),
    (lambda: jis.constant_variance(fractions=()), r"fractions"),
    (lambda: jis.constant_variance(fractions=(0.0, 1.0)), r"fractions"),
    (lambda: jis.constant_time(ratio=1.5), r"ratio"),
    (lambda: jis.constant_time(min_fraction=0.0), r"min_fraction"),
    (lambda: jis.constant_time(buckets=0), r"buckets"),
])
def test_bad_budget_arguments_are_refused(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_bad_combinations_are_refused_in_the_factory():
  with pytest.raises(ValueError, match=r"Lower presample"):
    _sampler(jis.constant_time(), presample=2.9)
  with pytest.raises(ValueError, match=r"score_table"):
    _sampler(jis.constant_variance(), score_table=jis.stale_scores(10))
  with pytest.raises(ValueError, match=r"forward_batch_size=4 must divide"):
    _sampler(jis.constant_time(buckets=2), presample=1.75, forward_batch_size=4)
  with pytest.raises(TypeError, match=r"jis.Budget"):
    _sampler(object())


@pytest.mark.parametrize("condition", [jis.always(), jis.warmup(0)],
                         ids=["constant", "traced"])
def test_the_full_size_bucket_is_the_default_step_bit_for_bit(condition):
  # One implementation: a budget's bucket (B, b) runs the very step that the
  # default (budget-free) sampler runs, on the same key.
  b, big_b = 8, 16
  full = jis.Budget(plan=lambda big_b, b: ((big_b, b),),
                    choose=lambda tau, big_b, b: jnp.int32(0),
                    tau_threshold=lambda big_b, b: 0.0)
  budgeted = _sampler(full, b=b, presample=big_b / b, condition=condition)
  default = jis.importance_step(_train_step, _logits, batch_size=b,
                                presample=big_b / b, condition=condition)
  states = [s.init(_params(), jax.random.key(3)) for s in (budgeted, default)]
  steps = [jax.jit(s.step) for s in (budgeted, default)]
  for t in range(4):
    batch = _presample(big_b, t)
    (s1, m1), (s2, m2) = [step(state, batch) for step, state in zip(steps, states)]
    states = [s1, s2]
    as_data = lambda s: s._replace(key=jax.random.key_data(s.key))
    for x, y in zip(jax.tree.leaves(as_data(s1)), jax.tree.leaves(as_data(s2))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(m1["is/presample_size"]) == big_b and float(m1["is/active"]) == 1
    for name in m2:
      np.testing.assert_array_equal(m1[name], m2[name])
