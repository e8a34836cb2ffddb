"""Selection policies: from B presample scores to b indices and weights."""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Selection(NamedTuple):
  """What a policy chose.

  Attributes:
    indices: ``[b]`` int32 positions in the presample.
    weights: ``[b]`` float32 per-example loss weights for the train step.
    probs: ``[B]`` the distribution the indices were drawn from (for metrics).
    state: the policy's new state.
  """
  indices: Array
  weights: Array
  probs: Array
  state: Any


class Policy(NamedTuple):
  """A selection policy.

  Attributes:
    init: ``(presample_size, batch_size) -> state``.
    select: ``(key, scores [B], state, batch_size) -> Selection``; scores are
      finite and non-negative with a positive sum (jis falls back to uniform
      scores before calling it otherwise).
    observe: ``(scores [n], state) -> state``, called on the uniform steps with
      the scores of the trained examples, for policies that keep statistics.
  """
  init: Callable[[int, int], Any]
  select: Callable[[Array, Array, Any, int], Selection]
  observe: Callable[[Array, Any], Any] = lambda scores, state: state


def sample_categorical(key: Array, probs: Array, num: int) -> Array:
  """``num`` i.i.d. draws from ``Categorical(probs)`` by inverting the CDF.

  O(B + num log B) work, against O(B · num) for Gumbel-max
  (``jax.random.categorical`` with a shape). Zero-probability entries are never
  drawn.
  """
  cdf = jnp.cumsum(probs.astype(jnp.float32))
  u = jax.random.uniform(key, (num,), jnp.float32) * cdf[-1]
  idx = jnp.searchsorted(cdf, u, side="right")
  return jnp.minimum(idx, probs.shape[0] - 1).astype(jnp.int32)


def importance_weights(probs: Array, indices: Array, k: float = 1.0) -> Array:
  """Weights ``(1/(B pᵢ))^k`` for the selected examples, rescaled for k ≠ 1.

  For ``k = 1`` they make the weighted mean gradient an unbiased estimate of the
  presample's mean gradient. For ``k ≠ 1`` they are rescaled, as in the original
  library's ``BiasedReweightingPolicy``, so that ``Σᵢ wᵢ pᵢ`` over the selected
  examples equals its value at ``k = 1``: the loss keeps its scale while the
  emphasis shifts towards high-score examples (``k < 1``).
  """
  p = probs[indices]
  unbiased = 1.0 / (probs.shape[0] * p)
  if k == 1.0:
    return unbiased
  biased = jnp.power(unbiased, k)
  return biased * (jnp.sum(unbiased * p) / jnp.sum(biased * p))


def importance_sampling(k: float = 1.0) -> Policy:
  """Categorical sampling with replacement, ``p ∝ scores``, weights ``(1/(Bp))^k``.

  Katharopoulos & Fleuret (2018) with ``k = 1`` (unbiased); ``k < 1`` biases the
  update towards hard examples (Katharopoulos & Fleuret 2017 use ``k = 0.5``
  with loss scores).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> policy = jis.importance_sampling()
    >>> sel = policy.select(jax.random.key(0), jnp.array([1.0, 0.0, 3.0, 0.0]),
    ...                     policy.init(4, 2), 2)
    >>> set(sel.indices.tolist()) <= {0, 2}
    True
  """
  if not k >= 0:
    raise ValueError(f"importance_sampling(k) must be >= 0; got {k!r}.")

  def select(key, scores, state, batch_size):
    probs = scores / jnp.sum(scores)
    indices = sample_categorical(key, probs, batch_size)
    return Selection(indices, importance_weights(probs, indices, k), probs, state)
  return Policy(lambda presample_size, batch_size: (), select)


def uniform() -> Policy:
  """The first b presampled examples with weight 1 (the presample is uniform).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> jis.uniform().select(jax.random.key(0), jnp.ones(4), (), 2).indices
    Array([0, 1], dtype=int32)
  """
  def select(key, scores, state, batch_size):
    n = scores.shape[0]
    return Selection(jnp.arange(batch_size, dtype=jnp.int32),
                     jnp.ones((batch_size,), jnp.float32),
                     jnp.full((n,), 1.0 / n, jnp.float32), state)
  return Policy(lambda presample_size, batch_size: (), select)
