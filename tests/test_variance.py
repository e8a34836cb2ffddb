"""τ and τ_th against the paper's formulas, in numpy."""

import numpy as np
import pytest

import jis


def _numpy_tau(scores):
  """The original library's VarianceReductionCondition.update, verbatim maths."""
  scores = np.asarray(scores, np.float64)
  u = 1.0 / len(scores)
  total = scores.sum()
  g = np.full_like(scores, u) if total == 0 else scores / total
  return 1.0 / np.sqrt(1 - ((g - u) ** 2).sum() / (g ** 2).sum())


@pytest.mark.parametrize("seed", range(5))
def test_variance_reduction_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  scores = rng.exponential(size=rng.integers(2, 500)) ** rng.uniform(0.5, 3)
  np.testing.assert_allclose(jis.variance_reduction(scores), _numpy_tau(scores),
                             rtol=1e-5)


def test_variance_reduction_edge_cases():
  assert float(jis.variance_reduction(np.ones(7))) == pytest.approx(1.0)
  assert float(jis.variance_reduction(np.zeros(7))) == pytest.approx(1.0)
  # One example holds all the mass: τ = sqrt(B).
  assert float(jis.variance_reduction(np.eye(16)[3])) == pytest.approx(4.0)


@pytest.mark.parametrize("big_b,b", [(384, 128), (256, 128), (640, 64), (128, 128)])
def test_tau_threshold_is_eq_29(big_b, b):
  assert jis.tau_threshold(big_b, b) == pytest.approx((big_b + 3 * b) / (3 * b))


def test_tau_threshold_rejects_b_larger_than_big_b():
  with pytest.raises(ValueError, match="batch_size <= presample_size"):
    jis.tau_threshold(10, 20)
