"""Property-based tests (hypothesis) of the sampling maths, for arbitrary scores.

The score values are arbitrary (zeros, ties, six orders of magnitude); their
lengths come from a few sizes (the smallest, odd ones, a power of two) so
that each jitted function compiles once per size instead of once per example.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import jis

_SCORES = hnp.arrays(
    np.float32, st.sampled_from([2, 3, 17, 64]),
    elements=st.floats(0.0, 1e6, width=32, allow_subnormal=False)).filter(
        lambda s: s.sum() > 0)


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _select(k, max_weight, seed, scores, b):
  return jis.importance_sampling(k, max_weight=max_weight).select(
      jax.random.key(seed), scores, (), b)


@settings(max_examples=60, deadline=None)
@given(scores=_SCORES, seed=st.integers(0, 2**31 - 1), k=st.sampled_from([1.0, 0.5]))
def test_draws_and_weights_are_valid(scores, seed, k):
  b = max(1, len(scores) // 2)
  sel = _select(k, 1e4, seed, jnp.asarray(scores), b)
  probs, w, idx = map(np.asarray, (sel.probs, sel.weights, sel.indices))
  assert abs(probs.sum() - 1.0) < 1e-5
  assert np.all(probs >= 0)
  assert np.all((idx >= 0) & (idx < len(scores)))
  assert np.all(probs[idx] > 0)          # never draws a zero-probability example
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  ess = w.sum() ** 2 / np.square(w).sum()
  assert 1.0 - 1e-4 <= ess <= b + 1e-3


_weights = jax.jit(lambda probs: jis.importance_weights(
    probs, jnp.arange(probs.shape[0]), 1.0))
_tau = jax.jit(jis.variance_reduction)


@settings(max_examples=60, deadline=None)
@given(scores=_SCORES, values=hnp.arrays(np.float32, 64, elements=st.floats(-10, 10,
                                                                            width=32)),
       max_weight=st.sampled_from([1e4, 10.0, float("inf")]))
def test_unbiased_weights_recover_the_presample_mean_exactly(scores, values, max_weight):
  """E_i~p[w(i) v_i] = Σ_i p_i v_i / (B p_i) = mean(v), for any scores (k = 1)."""
  n = len(scores)
  values = values[:n].astype(np.float64)
  probs = _select(1.0, max_weight, 0, jnp.asarray(scores), 1).probs
  w = np.asarray(_weights(probs), np.float64)
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
  sel = _select(k, 50.0, seed, jnp.asarray(scores), 8)
  assert np.all(np.asarray(sel.weights) <= 50.0 * (1 + 1e-5))


@settings(max_examples=60, deadline=None)
@given(scores=_SCORES)
def test_variance_reduction_is_at_least_one_and_scale_free(scores):
  tau = float(_tau(scores))
  assert 1.0 - 1e-5 <= tau <= np.sqrt(len(scores)) + 1e-3
  assert np.isclose(float(_tau(scores * 1000)), tau, rtol=1e-4)
