"""Score transforms against numpy, alone and in the step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jis


def _scores(n, seed=0):
  return np.random.default_rng(seed).exponential(size=n).astype(np.float32)


@pytest.mark.parametrize("c", [0.0, 0.5, 3.0])
def test_additive_smoothing(c):
  s = _scores(9)
  t = jis.additive_smoothing(c)
  out, state = t.update(jnp.asarray(s), t.init())
  np.testing.assert_allclose(out, s + c, rtol=1e-6)
  assert state == ()


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_power_smoothing(p):
  s = _scores(9, seed=1)
  t = jis.power_smoothing(p)
  np.testing.assert_allclose(t.update(jnp.asarray(s), t.init())[0], s ** p,
                             rtol=1e-5)


def test_adaptive_smoothing_follows_the_ema_of_the_mean_score():
  c, forget = 0.4, 0.7
  t = jis.adaptive_smoothing(c, forget)
  state, mu = t.init(), 1.0
  for i in range(5):
    s = _scores(6, seed=i) * (i + 1)
    out, state = t.update(jnp.asarray(s), state)
    mu = forget * mu + (1 - forget) * s.mean()
    np.testing.assert_allclose(out, s + c * mu, rtol=1e-5)
    assert float(state) == pytest.approx(mu, rel=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: jis.additive_smoothing(-1.0), r"additive_smoothing\(c\)"),
    (lambda: jis.adaptive_smoothing(-0.1), r"adaptive_smoothing\(c\)"),
    (lambda: jis.adaptive_smoothing(1.0, forget=1.0), r"forget"),
    (lambda: jis.power_smoothing(1.5), r"power_smoothing\(p\)"),
    (lambda: jis.power_smoothing(-0.1), r"power_smoothing\(p\)"),
])
def test_bad_arguments_are_refused(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_step_applies_the_transforms_in_order_and_keeps_their_state():
  big_b, b = 8, 4

  def train_step(params, batch, weights):
    def loss_fn(p):
      return jnp.mean(weights * optax.softmax_cross_entropy_with_integer_labels(
          batch["x"] @ p, batch["label"]))
    return params - 0.1 * jax.grad(loss_fn)(params), {}

  transforms = (jis.power_smoothing(0.5), jis.additive_smoothing(0.2),
                jis.adaptive_smoothing(0.5, forget=0.6))
  sampler = jis.importance_step(
      train_step, lambda p, batch: batch["x"] @ p, batch_size=b,
      presample=big_b / b, score=lambda logits, labels, batch: batch["s"],
      score_transforms=transforms, tau_threshold=0.0)
  state = sampler.init(jnp.zeros((3, 2)), jax.random.key(0))
  step = jax.jit(sampler.step)
  rng = np.random.default_rng(0)
  mu = 1.0
  for i in range(3):
    s = _scores(big_b, seed=10 + i)
    batch = {"x": jnp.asarray(rng.normal(size=(big_b, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 2, big_b)), "s": jnp.asarray(s)}
    state, metrics = step(state, batch)
    expected = np.sqrt(s) + 0.2
    mu = 0.6 * mu + 0.4 * expected.mean()
    expected = expected + 0.5 * mu
    g = expected / expected.sum()
    assert float(metrics["is/variance_reduction"]) == pytest.approx(
        np.sqrt(big_b * np.sum(g ** 2)), rel=1e-5)
    assert float(metrics["is/score_mean"]) == pytest.approx(s.mean(), rel=1e-5)
    assert float(state.transforms[2]) == pytest.approx(mu, rel=1e-5)
  assert step._cache_size() == 1
