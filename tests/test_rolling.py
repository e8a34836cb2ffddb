"""rolling=True: the step takes b rows and keeps the last B; references are
the plain train step (importance sampling off) and the presample step on the
pool's rows (on)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jis

LR = 0.5
DIM, CLASSES = 5, 3
b, R = 4, 3   # batch, presample = B / b
BIG_B = R * b


def _train_step(params, batch, weights):
  def loss_fn(p):
    losses = optax.softmax_cross_entropy_with_integer_labels(
        batch["x"] @ p, batch["label"])
    return jnp.mean(weights * losses)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  return params - LR * grads, {"loss": loss}


def _logits(params, batch):
  return batch["x"] @ params


def _batch(n, seed):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (n, DIM)),
          "label": jax.random.randint(ky, (n,), 0, CLASSES)}


def _params():
  return 0.5 * jax.random.normal(jax.random.key(100), (DIM, CLASSES))


def _sampler(rolling=True, **options):
  return jis.importance_step(_train_step, _logits, batch_size=b,
                             presample=float(R), rolling=rolling, **options)


def test_uniform_steps_train_on_the_rows_given_as_the_plain_step_does():
  sampler = _sampler(condition=jis.never())
  state = sampler.init(_params(), jax.random.key(0), _batch(b, 0))
  step, reference = jax.jit(sampler.step), _params()
  for t in range(2 * R + 1):
    batch = _batch(b, t)
    state, metrics = step(state, batch)
    reference, _ = _train_step(reference, batch, jnp.ones(b))
    assert float(metrics["is/active"]) == 0.0
    assert int(metrics["is/rows_used"]) == b
  np.testing.assert_allclose(state.inner, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("indexed", [False, True])
def test_an_importance_step_is_the_presample_step_on_the_last_B_rows(indexed):
  """Step t draws from batch t, then t-2 and t-1 (the ring's order): exactly
  what the presample step does with those B rows, same key and step."""
  data = _batch(64, 7)
  index = [jax.random.randint(jax.random.key(t), (b,), 0, 64)
           for t in range(R + 2)]
  given = [jis.Indexed(data, i) if indexed
           else jax.tree.map(lambda x: x[i], data) for i in index]
  rolling = _sampler(condition=jis.always())
  plain = _sampler(rolling=False, condition=jis.always())
  state = rolling.init(_params(), jax.random.key(3), given[0])
  for t, batch in enumerate(given):
    before = state
    state, metrics = jax.jit(rolling.step)(state, batch)
    assert float(metrics["is/active"]) == float(t >= R - 1)
    if t < R - 1:
      continue
    rows = jnp.concatenate([index[t], index[t - 2], index[t - 1]])
    presample = (jis.Indexed(data, rows) if indexed
                 else jax.tree.map(lambda x: x[rows], data))
    expected, expected_metrics = jax.jit(plain.step)(
        before._replace(pool=()), presample)
    np.testing.assert_allclose(state.inner, expected.inner, rtol=1e-6,
                               atol=1e-7)
    for name in ("is/tau", "is/ess", "is/max_weight", "is/score_mean"):
      np.testing.assert_allclose(metrics[name], expected_metrics[name],
                                 rtol=1e-6)
    assert int(metrics["is/rows_used"]) == b
    assert int(expected_metrics["is/rows_used"]) == BIG_B


def test_a_rolling_importance_step_is_unbiased_for_the_pool_mean_gradient():
  """With the unbiased policy, the mean update over 20000 draws is the SGD
  step on the pool's mean gradient, computed in float64 numpy."""
  sampler = _sampler(condition=jis.always(), policy=jis.importance_sampling())
  state = sampler.init(_params(), jax.random.key(0), _batch(b, 0))
  batches = [_batch(b, 10 + t) for t in range(R)]
  for batch in batches[:-1]:   # fill the pool; these steps are uniform
    state, _ = sampler.step(state, batch)
  keys = jax.random.split(jax.random.key(42), 20000)
  states = jax.vmap(lambda key: state._replace(key=key))(keys)
  new, metrics = jax.jit(jax.vmap(sampler.step, in_axes=(0, None)))(
      states, batches[-1])
  assert np.all(np.asarray(metrics["is/active"]) == 1.0)
  updates = np.asarray(new.inner - state.inner, np.float64).reshape(
      len(keys), -1)
  x = np.concatenate([np.asarray(bt["x"], np.float64) for bt in batches])
  y = np.concatenate([np.asarray(bt["label"]) for bt in batches])
  z = x @ np.asarray(state.inner, np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1
  reference = (-LR * x.T @ p / len(y)).ravel()
  mean = updates.mean(0)
  stderr = updates.std(0) / np.sqrt(len(updates))
  # Monte Carlo: within 4.5 standard errors on every coordinate (fixed seed),
  # and within 3% of the update's norm.
  assert np.all(np.abs(mean - reference) < 4.5 * stderr + 1e-7)
  assert np.linalg.norm(mean - reference) < 0.03 * np.linalg.norm(reference)


def test_a_scan_of_rolling_steps_equals_the_python_loop():
  sampler = _sampler(tau_threshold=0.0)
  batches = [_batch(b, t) for t in range(2 * R)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
  init = lambda: sampler.init(_params(), jax.random.key(5), batches[0])
  scanned, metrics = jax.jit(
      lambda s, xs: jax.lax.scan(sampler.step, s, xs), donate_argnums=0)(
          init(), stacked)
  looped = init()
  for batch in batches:
    looped, _ = sampler.step(looped, batch)
  np.testing.assert_allclose(scanned.inner, looped.inner, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(scanned.pool["label"], looped.pool["label"])
  np.testing.assert_array_equal(metrics["is/active"],
                                [0.0] * (R - 1) + [1.0] * (R + 1))


def test_init_accepts_shape_dtype_structs():
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         _batch(b, 0))
  state = _sampler().init(_params(), jax.random.key(0), example)
  assert state.pool["x"].shape == (BIG_B, DIM)
  assert state.pool["label"].dtype == jnp.int32


@pytest.mark.parametrize("options, match", [
    (dict(presample=2.5), "multiple of batch_size"),
    (dict(score_table=jis.stale_scores(64)), "score_table"),
    (dict(budget=jis.constant_variance()), "budget"),
    (dict(rolling="yes"), "rolling must be True or False"),
])
def test_bad_options_are_refused(options, match):
  kwargs = dict(batch_size=b, presample=float(R), rolling=True)
  kwargs.update(options)
  with pytest.raises((ValueError, TypeError), match=match):
    jis.importance_step(_train_step, _logits, **kwargs)


def test_bad_init_and_batches_are_refused():
  sampler = _sampler()
  with pytest.raises(ValueError, match="init needs an example batch"):
    sampler.init(_params(), jax.random.key(0))
  with pytest.raises(ValueError, match="must have the b = batch_size = 4 rows"):
    sampler.init(_params(), jax.random.key(0), _batch(BIG_B, 0))
  with pytest.raises(ValueError, match="shapes the pool of rolling=True"):
    _sampler(rolling=False).init(_params(), jax.random.key(0), _batch(b, 0))
  state = sampler.init(_params(), jax.random.key(0), _batch(b, 0))
  with pytest.raises(ValueError, match="must have the b = batch_size = 4 rows"):
    sampler.step(state, _batch(BIG_B, 0))
  with pytest.raises(ValueError, match="like init's example batch"):
    sampler.step(state, {"x": _batch(b, 0)["x"]})
  with pytest.raises(ValueError, match=r"row shape and dtype, float32\[5\]"):
    sampler.step(state, {**_batch(b, 0), "x": jnp.zeros((b, 6))})
  with pytest.raises(ValueError, match="has no pool"):
    sampler.step(state._replace(pool=()), _batch(b, 0))
