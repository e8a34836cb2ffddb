"""Closed-form logit-gradient norms against autodiff, and the loss registry."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax

import jis
from jis import _losses
from jis import _scores


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


def _numpy_softmax_ce(logits, labels):
  """-log softmax(z)[y] in float64; 0 for a label outside [0, C) (its
  one-hot row is all zero)."""
  z = np.asarray(logits, np.float64)
  log_p = z - z.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  y = np.asarray(labels)
  valid = (y >= 0) & (y < z.shape[-1])
  picked = np.take_along_axis(log_p, np.where(valid, y, 0)[..., None], -1)
  return np.where(valid, -picked[..., 0], 0.0)


def test_cross_entropy_of_class_indices_matches_numpy_and_one_hot_labels():
  # Class indices take optax's integer-label form (which XLA can share with
  # the train step's loss), one-hot labels the general one: both must give
  # the numpy loss, and an index outside [0, C) (padding written as -1, or C)
  # scores 0 as its all-zero one-hot row does, not a wrapped or NaN value.
  ce = _losses.resolve_loss("softmax_cross_entropy").per_example
  logits = 4 * jax.random.normal(jax.random.key(3), (7, 5))
  labels = jnp.array([0, 4, 2, -1, 5, 3, -5])
  expected = _numpy_softmax_ce(logits, labels)
  assert expected[3] == expected[4] == expected[6] == 0.0
  np.testing.assert_allclose(ce(logits, labels), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ce(logits, jax.nn.one_hot(labels, 5)), expected,
                             rtol=1e-5, atol=1e-6)
  # A sequence [n, T, C] with a mask: the masked positions' losses summed.
  seq = jax.random.normal(jax.random.key(4), (3, 4, 5))
  seq_labels = jax.random.randint(jax.random.key(5), (3, 4), -1, 5)
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_allclose(
      ce(seq, seq_labels, mask),
      (_numpy_softmax_ce(seq, seq_labels) * np.asarray(mask)).sum(1),
      rtol=1e-5, atol=1e-6)


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


# ---------------------------------------------------------------- heads, masks


def _two_heads(n=6, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  logits = {"a": 2 * jax.random.normal(k[0], (n, 2)),
            "b": 2 * jax.random.normal(k[1], (n, 5))}
  labels = {"a": jax.random.randint(k[2], (n,), 0, 2),
            "b": jax.random.bernoulli(k[3], 0.5, (n, 5)).astype(jnp.float32)}
  return logits, labels


def _pytree_autodiff_norms(per_example, logits, labels):
  """‖∂ℓᵢ/∂(all heads)‖ by a per-example autodiff gradient of the whole pytree."""
  grads = jax.vmap(jax.grad(per_example))(logits, labels)
  squares = [np.sum(np.square(np.asarray(g)).reshape(g.shape[0], -1), 1)
             for g in jax.tree.leaves(grads)]
  return np.sqrt(sum(squares))


def test_a_loss_per_head_matches_autodiff():
  logits, labels = _two_heads()
  ref = _reference_losses()
  per_example = lambda z, y: (ref["softmax_cross_entropy"](z["a"], y["a"])
                              + ref["sigmoid_binary_cross_entropy"](z["b"], y["b"]))
  loss = {"a": "softmax_cross_entropy", "b": "sigmoid_binary_cross_entropy"}
  np.testing.assert_allclose(jis.logit_grad_norm(logits, labels, loss),
                             _pytree_autodiff_norms(per_example, logits, labels),
                             rtol=1e-5, atol=1e-6)
  # The per-example loss sums the heads.
  np.testing.assert_allclose(
      _losses.resolve_loss(loss).per_example(logits, labels),
      jax.vmap(per_example)(logits, labels), rtol=1e-5)


def test_one_loss_name_applies_to_every_head():
  k = jax.random.split(jax.random.key(3), 4)
  logits = (jax.random.normal(k[0], (5, 3)), jax.random.normal(k[1], (5, 4)))
  labels = (jax.random.randint(k[2], (5,), 0, 3),
            jax.random.randint(k[3], (5,), 0, 4))
  ce = _reference_losses()["softmax_cross_entropy"]
  per_example = lambda z, y: ce(z[0], y[0]) + ce(z[1], y[1])
  np.testing.assert_allclose(jis.logit_grad_norm(logits, labels),
                             _pytree_autodiff_norms(per_example, logits, labels),
                             rtol=1e-5, atol=1e-6)


def test_a_custom_loss_takes_the_heads_whole():
  logits, labels = _two_heads(seed=1)

  def custom(z, y):   # the two-head model: a loss of its own
    return (optax.softmax_cross_entropy_with_integer_labels(z["a"], y["a"])
            + jnp.sum(jnp.square(z["b"] - y["b"]), axis=1))
  per_example = lambda z, y: custom(jax.tree.map(lambda x: x[None], z),
                                    jax.tree.map(lambda x: x[None], y))[0]
  np.testing.assert_allclose(jis.logit_grad_norm(logits, labels, custom),
                             _pytree_autodiff_norms(per_example, logits, labels),
                             rtol=1e-5, atol=1e-6)


def _sequence(n=4, t=7, v=6, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  logits = 2 * jax.random.normal(k[0], (n, t, v))
  tokens = jax.random.randint(k[1], (n, t), 0, v)
  lengths = jnp.array([7, 3, 5, 1])[:n]
  mask = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)
  return logits, tokens, mask


def test_masked_sequence_cross_entropy_matches_autodiff_and_ignores_padding():
  logits, tokens, mask = _sequence()
  ce = _reference_losses()["softmax_cross_entropy"]

  def masked(z, y, m):   # z [T, V], y [T], m [T]
    return jnp.sum(m * jax.vmap(ce)(z, y))
  grads = jax.vmap(jax.grad(masked))(logits, tokens, mask)
  ref = np.sqrt(np.sum(np.square(np.asarray(grads)).reshape(4, -1), 1))
  got = jis.logit_grad_norm(logits, tokens, mask=mask)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      _losses.resolve_loss("softmax_cross_entropy").per_example(
          logits, tokens, mask), jax.vmap(masked)(logits, tokens, mask),
      rtol=1e-5)
  # Whatever sits in the padded positions changes nothing.
  noise = jnp.where(mask[..., None] > 0, logits, 100.0 * jnp.ones_like(logits))
  np.testing.assert_allclose(jis.logit_grad_norm(noise, tokens, mask=mask), got,
                             rtol=1e-6)
  # Without the mask the padding counts (the bug the mask removes).
  assert not np.allclose(jis.logit_grad_norm(logits, tokens), got)


@pytest.mark.parametrize("loss", ["sigmoid_binary_cross_entropy",
                                  "mean_squared_error"])
def test_masks_for_the_elementwise_losses_match_autodiff(loss):
  k = jax.random.split(jax.random.key(5), 2)
  logits = jax.random.normal(k[0], (4, 7, 2))
  labels = jax.random.bernoulli(k[1], 0.5, (4, 7, 2)).astype(jnp.float32)
  _, _, mask = _sequence()
  ref_loss = _reference_losses()[loss]
  if loss == "mean_squared_error":   # the mean stays over all D outputs
    per = lambda z, y, m: jnp.sum(m[:, None] * jnp.square(z - y)) / z.size
  else:
    per = lambda z, y, m: jnp.sum(m * jax.vmap(ref_loss)(z, y))
  grads = jax.vmap(jax.grad(per))(logits, labels, mask)
  ref = np.sqrt(np.sum(np.square(np.asarray(grads)).reshape(4, -1), 1))
  np.testing.assert_allclose(jis.logit_grad_norm(logits, labels, loss, mask),
                             ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,error,match", [
    (lambda: jis.logit_grad_norm(_two_heads()[0], jnp.zeros((6,), jnp.int32)),
     ValueError, r"labels \(and a per-head loss\) must be pytrees"),
    (lambda: jis.logit_grad_norm(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32),
                                 {"a": "softmax_cross_entropy"}),
     ValueError, "names a loss per head, but the logits are one array"),
    (lambda: jis.logit_grad_norm(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32),
                                 {"a": "hinge"}),
     ValueError, "Unknown loss='hinge'"),
    (lambda: jis.logit_grad_norm(jnp.zeros((4, 7, 3)), jnp.zeros((4, 7), jnp.int32),
                                 mask=jnp.ones((4, 6))),
     ValueError, r"mask must have the shape of the loss's positions \(4, 7\)"),
    (lambda: jis.logit_grad_norm(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32),
                                 lambda z, y: jnp.sum(z, 1), mask=jnp.ones(4)),
     ValueError, "mask= applies to the built-in losses"),
])
def test_head_and_mask_errors_name_the_fix(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_reducible_loss_is_the_loss_minus_the_batchs_clipped_at_zero():
  # RHO-LOSS against numpy: max(cross-entropy − batch["irreducible_loss"], 0),
  # from a dict or any other Mapping batch (a flax FrozenDict).
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=6)
  irreducible = rng.uniform(0.0, 2.5, size=6).astype(np.float32)
  shifted = logits - logits.max(axis=1, keepdims=True)
  ce = -(shifted[np.arange(6), labels]
         - np.log(np.exp(shifted).sum(axis=1)))
  expected = np.maximum(ce - irreducible, 0.0)
  assert (expected == 0).any() and (expected > 0).any()   # both sides seen
  score = _scores.resolve_score(
      "reducible_loss", _losses.resolve_loss("softmax_cross_entropy"))
  for batch in ({"irreducible_loss": irreducible},
                flax.core.FrozenDict({"irreducible_loss": irreducible})):
    np.testing.assert_allclose(score.fn(jnp.asarray(logits), labels, batch),
                               expected, rtol=1e-5, atol=1e-6)
