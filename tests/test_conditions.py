"""Switch conditions: they turn resampling on at the step their formula says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jis
import linear_testing as linear

DIM, CLASSES = 3, 2
BIG_B, B = 8, 4


def _train_step(params, batch, weights):
  return linear.train_step(params, batch, weights, lr=0.1)


def _given_scores(logits, labels, batch):
  """A score read from the batch, so a numpy simulation knows every score."""
  return batch["s"]


def _batches(score_rows):
  rng = np.random.default_rng(0)
  n = len(score_rows)
  return {"x": jnp.asarray(rng.normal(size=(n, BIG_B, DIM)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, CLASSES, (n, BIG_B))),
          "s": jnp.asarray(score_rows, jnp.float32)}


def _run(condition, score_rows, **kwargs):
  """is/active of every step, under lax.scan."""
  sampler = jis.importance_step(_train_step, lambda p, batch: batch["x"] @ p,
                                batch_size=B, presample=BIG_B / B,
                                score=_given_scores, condition=condition,
                                **kwargs)
  state = sampler.init(jnp.zeros((DIM, CLASSES)), jax.random.key(0))
  _, metrics = jax.jit(lambda s, bs: jax.lax.scan(sampler.step, s, bs))(
      state, _batches(score_rows))
  return np.asarray(metrics["is/active"]), metrics


def _numpy_tv(s):
  s = np.asarray(s, np.float64)
  return 0.5 * np.abs(s / s.sum() - 1.0 / len(s)).sum()


def _numpy_tau(s):
  g = np.asarray(s, np.float64)
  g = g / g.sum()
  u = 1.0 / len(g)
  return 1.0 / np.sqrt(1.0 - ((g - u) ** 2).sum() / (g ** 2).sum())


def _simulate(statistic, threshold, momentum, score_rows, probe_every,
              over_steps=False, far_probe_every=None):
  """The original library's EMA condition, measured as jis measures it: on
  the B presample scores of importance steps only (the first measurement
  sets the average), with a probing importance step every probe_every steps
  while the condition is off (every far_probe_every while a measured value
  is under halfway to the threshold). ``over_steps``: τ's average is over
  steps (a measurement Δ steps after the last weighs 1 − m^Δ); the
  total-variation condition's is over measurements."""
  value, last, active = 0.0, None, []
  for t, s in enumerate(score_rows):
    period = probe_every
    if far_probe_every is not None and 0 < value < (1 + threshold) / 2:
      period = far_probe_every
    on = (value > threshold or threshold == 0
          or t % period == period - 1)
    active.append(float(on))
    if on:
      keep = 0.0 if last is None else momentum ** (t - last if over_steps
                                                   else 1)
      value, last = keep * value + (1 - keep) * statistic(s), t
  return np.array(active)


def _score_rows(seed, steps=14):
  """Nearly uniform scores, then skewed ones, then nearly uniform again."""
  rng = np.random.default_rng(seed)
  rows = []
  for t in range(steps):
    skew = 3.0 if 4 <= t < 9 else 0.1
    rows.append(np.exp(skew * rng.normal(size=BIG_B)))
  return np.array(rows)


@pytest.mark.parametrize("steps", [0, 1, 5])
def test_warmup_switches_on_exactly_at_step_n(steps):
  active, _ = _run(jis.warmup(steps), _score_rows(0, steps=8))
  np.testing.assert_array_equal(active, (np.arange(8) >= steps).astype(float))


def test_always_and_never():
  rows = _score_rows(1, steps=4)
  np.testing.assert_array_equal(_run(jis.always(), rows)[0], np.ones(4))
  np.testing.assert_array_equal(_run(jis.never(), rows)[0], np.zeros(4))


@pytest.mark.parametrize("threshold, momentum", [(0.25, 0.5), (0.15, 0.0)])
def test_total_variation_switches_when_numpy_says(threshold, momentum):
  rows = _score_rows(2)
  active, _ = _run(
      jis.when_total_variation(threshold, momentum, probe_every=3), rows)
  expected = _simulate(_numpy_tv, threshold, momentum, rows, 3)
  assert 0 < expected.sum() < len(rows)   # it does switch, on and off
  np.testing.assert_array_equal(active, expected)


@pytest.mark.parametrize("threshold, momentum", [(1.3, 0.5), (1.6, 0.2)])
def test_variance_reduction_switches_when_numpy_says(threshold, momentum):
  rows = _score_rows(3)
  active, metrics = _run(jis.when_variance_reduced(threshold, probe_every=3),
                         rows, tau_momentum=momentum)
  expected = _simulate(_numpy_tau, threshold, momentum, rows, 3, True)
  assert 0 < expected.sum() < len(rows)
  np.testing.assert_array_equal(active, expected)
  # This step's τ is the formula of its presample scores (1 when uniform).
  np.testing.assert_allclose(
      metrics["is/variance_reduction"],
      [_numpy_tau(s) if on else 1.0 for s, on in zip(rows, expected)],
      rtol=1e-5)


def test_probes_thin_out_while_tau_is_under_halfway_to_the_threshold():
  # τ ≈ 1 on the nearly uniform rows (under halfway, (1 + 4) / 2), then the
  # skewed rows lift it over 4: probes every 5 steps while it is far, every 2
  # before the first measurement and while it is near.
  rng = np.random.default_rng(5)
  rows = np.array([np.exp((4.0 if 12 <= t < 26 else 0.05)
                          * rng.normal(size=BIG_B)) for t in range(32)])
  active, _ = _run(jis.when_variance_reduced(4.0, probe_every=2,
                                             far_probe_every=5),
                   rows, tau_momentum=0.3)
  expected = _simulate(_numpy_tau, 4.0, 0.3, rows, 2, True, far_probe_every=5)
  near_only = _simulate(_numpy_tau, 4.0, 0.3, rows, 2, True)
  assert expected.sum() < near_only.sum()     # fewer probes while far
  assert expected[12:].sum() > 0              # and it still switches on
  np.testing.assert_array_equal(active, expected)


def test_the_default_condition_probes_four_times_less_while_tau_is_far():
  rows = np.ones((3 * jis.FAR_PROBE_EVERY, BIG_B))   # τ = 1: far below 3
  active, _ = _run(None, rows)
  probes = np.flatnonzero(active)
  np.testing.assert_array_equal(
      probes, [jis.PROBE_EVERY - 1] + [k * jis.FAR_PROBE_EVERY - 1
                                       for k in (1, 2, 3)])


def test_total_variation_matches_numpy():
  rng = np.random.default_rng(4)
  for n in (2, 7, 50):
    s = rng.exponential(size=n)
    assert float(jis.total_variation(jnp.asarray(s))) == pytest.approx(
        _numpy_tv(s), rel=1e-5)
  assert float(jis.total_variation(jnp.zeros(4))) == 0.0


def test_condition_update_is_the_ema_of_the_statistic():
  cond = jis.when_total_variation(0.3, momentum=0.8)
  state = cond.init(BIG_B, B)
  value = 0.0
  for s in _score_rows(5, steps=5):
    state = cond.update(state, jnp.asarray(s, jnp.float32), 0)
    value = _numpy_tv(s) if value == 0 else 0.8 * value + 0.2 * _numpy_tv(s)
    assert float(state.value) == pytest.approx(value, rel=1e-5)
    assert bool(cond.active(state, 0, 0.0)) == (value > 0.3)


@pytest.mark.parametrize("make", [
    lambda: jis.warmup(2), jis.always, jis.never,
    lambda: jis.when_total_variation(0.2), lambda: jis.when_variance_reduced(1.01),
], ids=["warmup", "always", "never", "total_variation", "variance_reduced"])
def test_every_condition_compiles_once(make):
  sampler = jis.importance_step(_train_step, lambda p, batch: batch["x"] @ p,
                                batch_size=B, presample=BIG_B / B,
                                score=_given_scores, condition=make())
  step = jax.jit(sampler.step)
  state = sampler.init(jnp.zeros((DIM, CLASSES)), jax.random.key(0))
  batches = _batches(_score_rows(6, steps=5))
  for t in range(5):
    state, _ = step(state, jax.tree.map(lambda x: x[t], batches))
  assert step._cache_size() == 1


@pytest.mark.parametrize("make, match", [
    (lambda: jis.warmup(-1), r"warmup\(steps\)"),
    (lambda: jis.warmup(2.5), r"warmup\(steps\)"),
    (lambda: jis.warmup(True), r"warmup\(steps\) must be an int >= 0; got True"),
    (lambda: jis.when_total_variation(1.0),
     r"when_total_variation\(threshold\) must be a number in \[0, 1\)"),
    (lambda: jis.when_variance_reduced(1.5, probe_every=0),
     r"when_variance_reduced\(probe_every\) must be an int >= 1"),
    (lambda: jis.when_total_variation(None), r"when_total_variation\(threshold\)"),
    (lambda: jis.when_total_variation(0.2, momentum=1.0), r"momentum"),
    (lambda: jis.when_variance_reduced(-1.0), r"threshold"),
])
def test_bad_arguments_are_refused(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_tau_has_one_momentum():
  # The deprecated condition momentum sets τ's; a different tau_momentum is
  # refused rather than silently giving the switch and is/tau two averages.
  with pytest.warns(DeprecationWarning, match="tau_momentum"):
    cond = jis.when_variance_reduced(1.3, momentum=0.5, probe_every=3)
  rows = _score_rows(3)
  active, _ = _run(cond, rows)
  expected = _simulate(_numpy_tau, 1.3, 0.5, rows, 3, True)
  assert 0 < expected.sum() < len(rows)
  np.testing.assert_array_equal(active, expected)
  with pytest.raises(ValueError, match="one home and one momentum"):
    _run(cond, rows, tau_momentum=0.9)


def test_a_two_argument_condition_still_works_with_a_warning():
  old = jis.Condition(lambda big_b, b: (), lambda state, step: step >= 2,
                      lambda state, scores, step: state)
  with pytest.warns(DeprecationWarning, match=r"active\(state, step, tau\)"):
    active, _ = _run(old, _score_rows(0, steps=4))
  np.testing.assert_array_equal(active, [0, 0, 1, 1])
