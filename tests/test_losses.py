"""Closed-form logit-gradient norms against autodiff, and the loss registry."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jis
from jis import _losses


def _reference_losses():
  """Per-example losses written independently of jis, for autodiff."""
  def ce(z, y):  # z [C], y int or [C]
    target = jax.nn.one_hot(y, z.shape[-1]) if jnp.ndim(y) == 0 else y
    return -jnp.sum(target * jax.nn.log_softmax(z))

  def bce(z, y):
    return jnp.sum(jnp.logaddexp(0.0, z) - y * z)

  def mse(z, y):
    return jnp.mean(jnp.square(z - y))
  return {"softmax_cross_entropy": ce, "sigmoid_binary_cross_entropy": bce,
          "mean_squared_error": mse}


def _autodiff_norms(per_example, logits, labels):
  grads = jax.vmap(jax.grad(per_example))(logits.astype(jnp.float32), labels)
  return np.sqrt(np.sum(np.square(np.asarray(grads)).reshape(len(logits), -1), 1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("loss,logit_shape,label_kind", [
    ("softmax_cross_entropy", (6, 3), "int"),
    ("softmax_cross_entropy", (9, 10), "int"),
    ("softmax_cross_entropy", (5, 4), "soft"),
    ("sigmoid_binary_cross_entropy", (7, 1), "binary"),
    ("sigmoid_binary_cross_entropy", (4, 2, 3), "binary"),
    ("mean_squared_error", (8, 1), "real"),
    ("mean_squared_error", (5, 3, 2), "real"),
])
def test_closed_form_matches_autodiff(loss, logit_shape, label_kind, dtype):
  k1, k2 = jax.random.split(jax.random.key(hash((loss, logit_shape)) % 2**31))
  logits = (3 * jax.random.normal(k1, logit_shape)).astype(dtype)
  n = logit_shape[0]
  if label_kind == "int":
    labels = jax.random.randint(k2, (n,), 0, logit_shape[-1])
  elif label_kind == "soft":
    labels = jax.nn.softmax(jax.random.normal(k2, logit_shape))
  elif label_kind == "binary":
    labels = jax.random.bernoulli(k2, 0.5, logit_shape).astype(jnp.float32)
  else:
    labels = jax.random.normal(k2, logit_shape)
  ref = _autodiff_norms(_reference_losses()[loss], logits, labels)
  got = jis.logit_grad_norm(logits, labels, loss)
  assert got.dtype == jnp.float32 and got.shape == (n,)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_callable_loss_norm_is_one_vjp_and_matches_closed_form():
  logits = jax.random.normal(jax.random.key(0), (16, 5))
  labels = jax.random.randint(jax.random.key(1), (16,), 0, 5)

  def my_ce(z, y):
    return optax.softmax_cross_entropy_with_integer_labels(z, y)
  np.testing.assert_allclose(jis.logit_grad_norm(logits, labels, my_ce),
                             jis.logit_grad_norm(logits, labels), rtol=1e-5)
  # One vjp over the batch: a single transpose of the loss, no per-example loop.
  jaxpr = str(jax.make_jaxpr(lambda z: jis.logit_grad_norm(z, labels, my_ce))(logits))
  assert "while" not in jaxpr and "scan" not in jaxpr


def test_per_example_losses_match_optax():
  logits = jax.random.normal(jax.random.key(0), (6, 4))
  labels = jax.random.randint(jax.random.key(1), (6,), 0, 4)
  ce = _losses.resolve_loss("softmax_cross_entropy").per_example(logits, labels)
  np.testing.assert_allclose(
      ce, optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-6)
  target = jax.random.normal(jax.random.key(2), (6, 4))
  mse = _losses.resolve_loss("mean_squared_error").per_example(logits, target)
  np.testing.assert_allclose(mse, np.mean((np.asarray(logits) - np.asarray(target))**2, 1),
                             rtol=1e-6)


def test_unknown_loss_names_the_choices():
  with pytest.raises(ValueError, match=r"Unknown loss='hinge'.*softmax_cross_entropy"):
    jis.logit_grad_norm(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), "hinge")


@pytest.mark.parametrize("loss,labels,match", [
    ("softmax_cross_entropy", jnp.zeros((4, 2), jnp.int32), "integer labels of shape"),
    ("softmax_cross_entropy", jnp.zeros((4,), jnp.float32), "must be integers"),
    ("mean_squared_error", jnp.zeros((4,)), "same shape as the logits"),
    ("sigmoid_binary_cross_entropy", jnp.zeros((4, 1)), "same shape as the logits"),
])
def test_shape_mismatch_errors(loss, labels, match):
  with pytest.raises(ValueError, match=match):
    jis.logit_grad_norm(jnp.zeros((4, 3)), labels, loss)


def test_callable_loss_must_return_per_example_values():
  with pytest.raises(ValueError, match="one loss per example"):
    jis.logit_grad_norm(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32),
                        lambda z, y: jnp.sum(z))
