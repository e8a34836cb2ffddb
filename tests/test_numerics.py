"""Numerical edge cases through the whole step: any float32 scores (zero,
subnormal, huge, NaN, inf, negative), half-precision logits, one dominating
example, and a non-finite loss from the user's step (docs/reliability.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import jis

B, b, DIM, CLASSES = 12, 4, 5, 3
MAX_WEIGHT = 1e4


def _train_step(params, batch, weights):
  def loss_fn(p):
    logits = (batch["x"] @ p).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             batch["label"])
    return jnp.mean(weights * losses)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  return params - 0.1 * grads, {"loss": loss, "w": weights}


def _presample(seed=0, dtype=jnp.float32):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (B, DIM)).astype(dtype),
          "label": jax.random.randint(ky, (B,), 0, CLASSES)}


def _params(dtype=jnp.float32):
  return (0.5 * jax.random.normal(jax.random.key(1), (DIM, CLASSES))).astype(dtype)


def _score_step():
  sampler = jis.importance_step(
      _train_step, lambda p, batch: batch["x"] @ p, batch_size=b,
      presample=B / b, tau_threshold=0.0, diagnostics=True,
      policy=jis.importance_sampling(max_weight=MAX_WEIGHT),
      score=lambda logits, labels, batch: batch["s"])
  return sampler, jax.jit(sampler.step)


_SAMPLER, _STEP = _score_step()

_ANY_FLOAT32 = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-45, 1e-40, -1e-40, 1e-30, 1e30, 3e38, np.inf,
                     np.nan, -1.0]))


@settings(max_examples=150, deadline=None)
@given(scores=hnp.arrays(np.float32, B, elements=_ANY_FLOAT32),
       seed=st.integers(0, 2**31 - 1))
# A negative subnormal score counts as zero (hypothesis found it).
@example(scores=np.array([-9.25e-43] + [1.0] * (B - 1), np.float32), seed=0)
def test_any_float32_scores_give_finite_bounded_weights(scores, seed):
  state = _SAMPLER.init(_params(), jax.random.key(seed))
  new, m = _STEP(state, {**_presample(), "s": jnp.asarray(scores)})
  w = np.asarray(m["w"])
  # Subnormal scores, of either sign, count as zero (jis._sanitize flushes
  # them).
  tiny = np.finfo(np.float32).tiny
  flushed = np.where(np.abs(scores) < tiny, np.float32(0), scores)
  usable = (np.all(np.isfinite(scores)) and np.all(flushed >= 0)
            and flushed.max() >= tiny)
  assert float(m["is/fallback"]) == (0.0 if usable else 1.0)
  assert np.all(np.isfinite(w)) and np.all(w > 0)
  assert w.max() <= MAX_WEIGHT * (1 + 1e-5)
  assert 1.0 - 1e-4 <= float(m["is/ess"]) <= b + 1e-3
  if not usable:   # uniform: 1 / (B p) with p = 1 / B, 1 up to rounding
    np.testing.assert_allclose(w, np.ones(b), rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(new.inner)))
  assert np.isfinite(float(new.tau)) and float(m["is/nonfinite"]) == 0.0


@pytest.mark.parametrize("dominant", [1e3, 1e30, 3e38])
def test_one_dominating_example(dominant):
  """One example holds (nearly) all the mass: it is drawn every time, the
  others keep the mixture's floor, and no weight exceeds max_weight."""
  scores = jnp.full((B,), 1e-3).at[5].set(dominant)
  _, m = _STEP(_SAMPLER.init(_params(), jax.random.key(0)),
               {**_presample(), "s": scores})
  w = np.asarray(m["w"])
  assert float(m["is/fallback"]) == 0.0
  assert np.all(np.isfinite(w)) and w.max() <= MAX_WEIGHT
  assert float(m["is/selected_fraction_unique"]) == pytest.approx(1 / b)
  np.testing.assert_allclose(w, 1.0 / (B * ((1 - 1 / MAX_WEIGHT) *
                                            (1 / (1 + 11e-3 / dominant))
                                            + 1 / (MAX_WEIGHT * B))),
                             rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("score", ["upper_bound", "loss"])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_half_precision_logits(dtype, score, scale):
  """Logits in bfloat16/float16 (scaled until float16 softmax would
  overflow without the float32 upcast) give finite float32 scores."""
  def logits_fn(p, batch):
    return (batch["x"] @ p * scale).astype(dtype)

  def train_step(p, batch, weights):
    new, metrics = _train_step(p.astype(jnp.float32), batch, weights)
    return new.astype(p.dtype), {"loss": metrics["loss"], "w": weights}

  sampler = jis.importance_step(train_step, logits_fn, batch_size=b,
                                presample=B / b, tau_threshold=0.0, score=score)
  _, m = jax.jit(sampler.step)(sampler.init(_params(dtype),
                                            jax.random.key(0)),
                               _presample(dtype=dtype))
  assert float(m["is/fallback"]) == 0.0
  assert np.isfinite(float(m["is/score_mean"]))
  w = np.asarray(m["w"], np.float32)
  assert np.all(np.isfinite(w)) and w.max() <= MAX_WEIGHT


def test_logit_grad_norm_keeps_half_precision_finite():
  logits = jnp.array([[6e4, -6e4, 0.0], [1.0, 2.0, 3.0]], jnp.float16)
  for dtype in (jnp.float16, jnp.bfloat16):
    s = jis.logit_grad_norm(logits.astype(dtype), jnp.array([1, 0]),
                            "softmax_cross_entropy")
    assert s.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(s)))
    np.testing.assert_allclose(float(s[0]), np.sqrt(2.0), rtol=1e-2)


# ---------------------------------------------------------------- the user's loss


def _nan_batch():
  batch = _presample()
  return {**batch, "x": batch["x"].at[:, 0].set(jnp.nan), "s": jnp.ones(B)}


def test_a_nan_loss_is_reported_in_is_nonfinite():
  state = _SAMPLER.init(_params(), jax.random.key(0))
  _, ok = _STEP(state, {**_presample(), "s": jnp.ones(B)})
  assert float(ok["is/nonfinite"]) == 0.0
  new, bad = _STEP(state, _nan_batch())
  assert float(bad["is/nonfinite"]) == 1.0
  assert not np.all(np.isfinite(np.asarray(new.inner)))   # jis does not skip


def test_optax_apply_if_finite_skips_the_update_jis_reports():
  """The documented way to skip non-finite updates: wrap the optimizer."""
  tx = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3)

  def train_step(state, batch, weights):
    params, opt_state = state
    def loss_fn(p):
      losses = optax.softmax_cross_entropy_with_integer_labels(
          batch["x"] @ p, batch["label"])
      return jnp.mean(weights * losses)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

  sampler = jis.importance_step(train_step, lambda s, batch: batch["x"] @ s[0],
                                batch_size=b, presample=B / b,
                                tau_threshold=0.0)
  params = _params()
  state = sampler.init((params, tx.init(params)), jax.random.key(0))
  new, m = jax.jit(sampler.step)(state, _nan_batch())
  assert float(m["is/nonfinite"]) == 1.0 and float(m["is/fallback"]) == 1.0
  np.testing.assert_array_equal(np.asarray(new.inner[0]), np.asarray(params))


def test_labels_out_of_range_show_up_as_nonfinite_loss():
  """Integer labels >= num_classes: optax's cross-entropy reads NaN, so the
  step reports is/nonfinite = 1 (and falls back to uniform with
  score="loss"); the experiments check labels on the host before training."""
  sampler = jis.importance_step(_train_step, lambda p, batch: batch["x"] @ p,
                                batch_size=b, presample=B / b,
                                tau_threshold=0.0, score="loss")
  batch = _presample()
  batch = {**batch, "label": batch["label"].at[:].set(CLASSES + 2)}
  _, m = jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)),
                               batch)
  assert float(m["is/nonfinite"]) == 1.0 and float(m["is/fallback"]) == 1.0
