"""jis.low_precision against the same function with its casts written by hand."""

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jis
import jaxpr_testing

BF16 = jnp.bfloat16
F32 = jnp.float32


def _products(closed):
  return jaxpr_testing.product_operand_dtypes(closed.jaxpr)


def _dot(x, w, cast):
  """``x @ w``, or the hand-written low-precision version of it."""
  if cast:
    return jnp.dot(x.astype(BF16), w.astype(BF16), preferred_element_type=F32)
  return jnp.dot(x, w)


def _conv(x, w, cast):
  if cast:
    x, w = x.astype(BF16), w.astype(BF16)
  return lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=F32)


def _params(seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {
      "w1": jax.random.normal(k1, (7, 16)),
      "w2": jax.random.normal(k2, (16, 3)),
      "b": jax.random.normal(k3, (3,)),
      "x": jax.random.normal(k4, (5, 7)),
  }


def _mlp(p, x, cast=False):
  return _dot(jax.nn.relu(_dot(x, p["w1"], cast)), p["w2"], cast) + p["b"]


# Each function puts its products inside a different transformation; the
# second argument builds the hand-cast reference.
def _in_jit(p, x, cast=False):
  return jax.jit(functools.partial(_mlp, cast=cast))(p, x)


def _in_scan(p, x, cast=False):
  def body(h, w):
    return jnp.tanh(_dot(h, w, cast)), None
  ws = jnp.stack([p["w1"][:, :7], p["w1"][:, 7:14]])
  return lax.scan(body, x, ws)[0]


def _in_cond(p, x, cast=False):
  return lax.cond(x.sum() > 0, lambda v: _mlp(p, v, cast),
                  lambda v: -_mlp(p, v, cast), x)


def _in_while(p, x, cast=False):
  w = p["w1"][:, :7] / 4
  return lax.fori_loop(0, 3, lambda i, h: _dot(h, w, cast), x)


def _in_remat(p, x, cast=False):
  return jax.checkpoint(functools.partial(_mlp, cast=cast))(p, x)


@jax.custom_jvp
def _custom(h):
  return jnp.sin(h)


_custom.defjvp(lambda primals, tangents: (_custom(primals[0]),
                                          jnp.cos(primals[0]) * tangents[0]))


def _in_custom_jvp(p, x, cast=False):
  # The product is an input of the custom-jvp function here, and jax.nn.relu
  # (itself custom_jvp) wraps the first layer inside _mlp.
  return _custom(_mlp(p, x, cast))


@pytest.mark.parametrize("fn", [_mlp, _in_jit, _in_scan, _in_cond, _in_while,
                                _in_remat, _in_custom_jvp])
def test_equals_the_hand_cast_function(fn):
  p = _params()
  got = jax.jit(jis.low_precision(fn))(p, p["x"])
  want = jax.jit(functools.partial(fn, cast=True))(p, p["x"])
  full = fn(p, p["x"])
  assert got.dtype == full.dtype == F32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # The reference is really different from float32, so equality above means
  # the products were cast (bfloat16 keeps 8 bits of mantissa).
  assert np.abs(np.asarray(want) - np.asarray(full)).max() > 1e-3
  dtypes = _products(jax.make_jaxpr(jis.low_precision(fn))(
      p, p["x"]))
  assert dtypes and all(d == ("bfloat16", "bfloat16") for d in dtypes), dtypes


def test_convolutions_are_cast():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 3))
  w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 3, 4))
  got = jis.low_precision(functools.partial(_conv, cast=False))(x, w)
  want = _conv(x, w, cast=True)
  assert got.dtype == F32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(want) - np.asarray(_conv(x, w, False))).max() > 1e-3


def test_gradients_and_vmap_follow_the_rewritten_function():
  p = _params()

  def loss(fn):
    return lambda p, x: jnp.sum(fn(p, x[None]) ** 2)

  low = jis.low_precision(_mlp)
  ref = functools.partial(_mlp, cast=True)
  got = jax.vmap(jax.grad(loss(low)), in_axes=(None, 0))(p, p["x"])
  want = jax.vmap(jax.grad(loss(ref)), in_axes=(None, 0))(p, p["x"])
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_outputs_keep_structure_and_dtype_and_other_operands_are_left():
  def fn(x, ints, *, scale):
    return {"logits": (x @ x.T) * scale,
            "counts": ints @ ints.T,
            "half": x.astype(jnp.float16) @ x.T.astype(jnp.float16)}

  x = jnp.arange(6.0).reshape(2, 3) / 7
  ints = jnp.arange(6).reshape(2, 3)
  low = jis.low_precision(fn)
  out = low(x, ints, scale=2.0)
  assert jax.tree.structure(out) == jax.tree.structure(fn(x, ints, scale=2.0))
  assert {k: v.dtype for k, v in out.items()} == {
      "logits": F32, "counts": ints.dtype, "half": jnp.float16}
  np.testing.assert_array_equal(out["counts"], ints @ ints.T)
  dtypes = _products(jax.make_jaxpr(
      functools.partial(low, scale=2.0))(x, ints))
  # bfloat16 and float16 are both 16 bits: the float16 product is left alone.
  assert sorted(dtypes) == sorted([("bfloat16", "bfloat16"),
                                   (str(ints.dtype), str(ints.dtype)),
                                   ("float16", "float16")])


def test_float16_and_a_dtype_as_wide_as_the_operands():
  p = _params()
  half = jis.low_precision(_mlp, jnp.float16)(p, p["x"])
  assert half.dtype == F32
  assert {d for d in _products(jax.make_jaxpr(
      jis.low_precision(_mlp, "float16"))(p, p["x"]))} == {
          ("float16", "float16")}
  # float32 "low precision" on float32 operands changes nothing.
  np.testing.assert_array_equal(jis.low_precision(_mlp, F32)(p, p["x"]),
                                _mlp(p, p["x"]))


@pytest.mark.parametrize("fn, dtype, error, match", [
    (None, BF16, TypeError, r"low_precision\(fn\) needs a function"),
    (_mlp, jnp.int32, ValueError, r"low_precision\(dtype=int32\) must be a "
     r"floating dtype"),
    (_mlp, "bfloat", ValueError, r"low_precision\(dtype='bfloat'\) is not a "
     r"dtype"),
])
def test_bad_arguments_name_the_argument(fn, dtype, error, match):
  with pytest.raises(error, match=match):
    jis.low_precision(fn, dtype)


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def test_importance_step_scores_in_bfloat16_and_trains_in_float32():
  model = _Net()
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 7))
  batch = {"x": x, "label": jnp.arange(12) % 3}
  params = model.init(jax.random.PRNGKey(1), x)
  opt = optax.sgd(0.1)

  def train_step(state, batch, weights):
    params, opt_state = state

    def loss_fn(params):
      logits = model.apply(params, batch["x"])
      return jnp.mean(weights * optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"]))

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), {}

  def logits_fn(state, batch):
    return model.apply(state[0], batch["x"])

  sampler = jis.importance_step(train_step, jis.low_precision(logits_fn),
                                batch_size=4, tau_threshold=0.0)
  state = sampler.init((params, opt.init(params)), jax.random.PRNGKey(2))
  closed = jax.make_jaxpr(sampler.step)(state, batch)
  dtypes = set(_products(closed))
  # The scoring pass's two layers in bfloat16; the training step's forward
  # and backward products stay float32.
  assert ("bfloat16", "bfloat16") in dtypes and ("float32", "float32") in dtypes
  new_state, metrics = jax.jit(sampler.step)(state, batch)
  assert float(metrics["is/active"]) == 1.0
  for leaf in jax.tree.leaves(new_state):
    assert np.all(np.isfinite(leaf))
  assert all(a.dtype == b.dtype for a, b in zip(
      jax.tree.leaves(new_state), jax.tree.leaves(state)))
