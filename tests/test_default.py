"""The default policy: the estimator it is, against brute-force numpy references.

``importance_step(policy=None)`` draws ``i ~ p`` (``p`` the scores mixed with
``1/max_weight`` of uniform, ``max_weight = 100``) and weights the drawn
examples by ``w_j ∝ (B p_j)^(-1/2)``, normalised within the batch so that
``Σ_j w_j p_j = b / B`` (Katharopoulos & Fleuret 2017, the original library's
``BiasedReweightingPolicy``). Its update direction is therefore

    (1/b) Σ_j w_j g_j = Σ_j p_j^(-1/2) g_j / (B Σ_j p_j^(1/2)),

a ratio estimator that tends, as b grows, to
``Σ_i √p_i g_i / (B Σ_i p_i^(3/2))``: a gradient in which each example
counts in proportion to ``√p_i`` instead of ``1/B``. Every weight is at most
``max_weight``. These tests check each statement.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

import jis

B = 5


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  scores = rng.exponential(size=B) ** 2          # a skewed distribution
  grads = rng.normal(size=(B, 3))                # per-example gradients
  probs = scores / scores.sum()
  alpha = 1.0 / 100.0
  probs = (1 - alpha) * probs + alpha / B        # the defensive mixture
  return scores, probs, grads


def _numpy_direction(probs, grads, idx):
  """The original library's biased weights (written independently)."""
  p = probs[idx]
  u = 1.0 / (len(probs) * p)
  w = u ** 0.5
  w *= np.dot(u, p) / np.dot(w, p)
  return (w[:, None] * grads[idx]).mean(0)


def _jis_draws(scores, b, draws, seed=1):
  plan_policy = jis.importance_sampling(k=0.5, max_weight=100.0)
  keys = jax.random.split(jax.random.key(seed), draws)
  sel = jax.jit(jax.vmap(lambda k: plan_policy.select(
      k, jnp.asarray(scores, jnp.float32), (), b)))(keys)
  return np.asarray(sel.indices), np.asarray(sel.weights, np.float64)


def test_the_default_policy_is_this_estimator():
  from jis import _plan   # pylint: disable=g-import-not-at-top
  policy = _plan.default_policy(None)
  scores, probs, _ = _setup()
  sel = policy.select(jax.random.key(0), jnp.asarray(scores, jnp.float32), (), 3)
  np.testing.assert_allclose(sel.probs, probs, rtol=1e-5)
  ref = jis.importance_sampling(k=0.5, max_weight=100.0).select(
      jax.random.key(0), jnp.asarray(scores, jnp.float32), (), 3)
  np.testing.assert_array_equal(sel.indices, ref.indices)
  np.testing.assert_allclose(sel.weights, ref.weights, rtol=1e-6)


def test_the_expected_update_is_the_enumerated_one_and_is_biased():
  b, draws = 3, 40000
  scores, probs, grads = _setup()
  # Brute force: every ordered draw of b from B, with its probability.
  exact = np.zeros(3)
  for idx in itertools.product(range(B), repeat=b):
    idx = np.array(idx)
    exact += np.prod(probs[idx]) * _numpy_direction(probs, grads, idx)
  indices, weights = _jis_draws(scores, b, draws)
  directions = (weights[..., None] * grads[indices]).mean(1)
  mean = directions.mean(0)
  stderr = directions.std(0) / np.sqrt(draws)
  assert np.all(np.abs(mean - exact) < 4.5 * stderr)
  # Biased: not the presample mean gradient, by far more than the noise.
  unbiased = grads.mean(0)
  assert np.linalg.norm(exact - unbiased) > 20 * np.linalg.norm(stderr)


def test_for_large_batches_each_example_counts_as_sqrt_p():
  b, draws = 400, 4000
  scores, probs, grads = _setup()
  indices, weights = _jis_draws(scores, b, draws, seed=2)
  mean = (weights[..., None] * grads[indices]).mean(1).mean(0)
  limit = (np.sqrt(probs)[:, None] * grads).sum(0) / (B * np.sum(probs ** 1.5))
  np.testing.assert_allclose(mean, limit, rtol=0.01, atol=1e-3)


def test_weights_are_bounded_by_max_weight():
  # p_j >= 1 / (max_weight B) and Σ_l √p_l >= b √(min p) give w_j <= max_weight.
  rng = np.random.default_rng(3)
  scores = np.zeros(B)
  scores[0] = 1.0                                 # all the mass on one example
  scores = np.concatenate([scores, rng.exponential(size=0)])
  _, weights = _jis_draws(scores, 3, 20000, seed=4)
  assert weights.max() <= 100.0 * (1 + 1e-5)
  assert weights.max() > 10.0                     # the bound is approached
