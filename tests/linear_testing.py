"""A linear softmax classifier trained by SGD: the smallest model a jis
step can run, for tests that compare two loops step by step."""

import jax
import jax.numpy as jnp
import optax

LR = 0.5
DIM, CLASSES = 5, 3


def train_step(params, batch, weights, lr=LR):
  """Plain SGD on a linear softmax classifier; params is [DIM, CLASSES]."""
  def loss_fn(p):
    losses = optax.softmax_cross_entropy_with_integer_labels(
        batch["x"] @ p, batch["label"])
    return jnp.mean(weights * losses)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  return params - lr * grads, {"loss": loss}


def logits(params, batch):
  return batch["x"] @ params


def presample(n, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (n, DIM)),
          "label": jax.random.randint(ky, (n,), 0, CLASSES)}


def params(seed=1):
  return 0.5 * jax.random.normal(jax.random.key(seed), (DIM, CLASSES))
