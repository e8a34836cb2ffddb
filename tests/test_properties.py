"""Property-based tests (hypothesis) of the sampling maths, for arbitrary scores."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import jis

_SCORES = hnp.arrays(
    np.float32, st.integers(2, 64),
    elements=st.floats(0.0, 1e6, width=32, allow_subnormal=False)).filter(
        lambda s: s.sum() > 0)


@settings(max_examples=60, deadline=None)
@given(scores=_SCORES, seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1.0, 0.5]))
def test_draws_and_weights_are_valid(scores, seed, k):
  b = max(1, len(scores) // 2)
  sel = jis.importance_sampling(k).select(jax.random.key(seed), jnp.asarray(scores),
                                          (), b)
  probs, w, idx = map(np.asarray, (sel.probs, sel.weights, sel.indices))
  assert abs(probs.sum() - 1.0) < 1e-5
  assert np.all(probs >= 0)
  assert np.all((idx >= 0) & (idx < len(scores)))
  assert np.all(probs[idx] > 0)          # never draws a zero-probability example
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  ess = w.sum() ** 2 / np.square(w).sum()
  assert 1.0 - 1e-4 <= ess <= b + 1e-3


@settings(max_examples=60, deadline=None)
@given(scores=_SCORES, values=hnp.arrays(np.float32, 64, elements=st.floats(-10, 10,
                                                                            width=32)),
       max_weight=st.sampled_from([1e4, 10.0, float("inf")]))
def test_unbiased_weights_recover_the_presample_mean_exactly(scores, values, max_weight):
  """E_i~p[w(i) v_i] = Σ_i p_i v_i / (B p_i) = mean(v), for any scores (k = 1)."""
  n = len(scores)
  values = values[:n].astype(np.float64)
  policy = jis.importance_sampling(1.0, max_weight=max_weight)
  probs = policy.select(jax.random.key(0), jnp.asarray(scores), (), 1).probs
  w = np.asarray(jis.importance_weights(probs, jnp.arange(n), 1.0), np.float64)
  p = np.asarray(probs, np.float64)
  support = p > 0
  assert np.all(w[support] <= max_weight * (1 + 1e-5))
  if np.isfinite(max_weight):
    assert np.all(support)  # the defensive mixture reaches every example
  expectation = np.sum(p[support] * w[support] * values[support])
  # Examples with p = 0 (possible only with max_weight = inf) are never drawn;
  # the estimator then covers the support only.
  reference = values[support].sum() / n
  assert np.isclose(expectation, reference, rtol=1e-4, atol=1e-4 * np.abs(values).max())


@settings(max_examples=40, deadline=None)
@given(scores=_SCORES, seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1.0, 0.5, 0.0]))
def test_weights_never_exceed_max_weight(scores, seed, k):
  sel = jis.importance_sampling(k, max_weight=50.0).select(
      jax.random.key(seed), jnp.asarray(scores), (), 8)
  assert np.all(np.asarray(sel.weights) <= 50.0 * (1 + 1e-5))


@settings(max_examples=60, deadline=None)
@given(scores=_SCORES)
def test_variance_reduction_is_at_least_one_and_scale_free(scores):
  tau = float(jis.variance_reduction(scores))
  assert 1.0 - 1e-5 <= tau <= np.sqrt(len(scores)) + 1e-3
  assert np.isclose(float(jis.variance_reduction(scores * 1000)), tau, rtol=1e-4)
