"""Score transforms: reshape scores before they become sampling probabilities.

Each transform is a pair of pure functions, ``init() -> state`` and
``update(scores, state) -> (scores, state)``, so stateful ones (adaptive
smoothing keeps a moving average) carry their state in the jis state.
"""

from typing import Any, Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp

from jis import _validate

Array = jax.Array


class ScoreTransform(NamedTuple):
  """A score transform: ``init() -> state``, ``update(scores, state)``."""
  init: Callable[[], Any]
  update: Callable[[Array, Any], Tuple[Array, Any]]


def additive_smoothing(c: float) -> ScoreTransform:
  """``s + c``: pulls the sampling distribution towards uniform.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> t = jis.additive_smoothing(1.0)
    >>> t.update(jnp.array([0.0, 2.0]), t.init())[0]
    Array([1., 3.], dtype=float32)
  """
  c = _validate.number("additive_smoothing(c)", c, 0, finite=True)

  def update(scores, state):
    return scores + jnp.asarray(c, scores.dtype), state
  return ScoreTransform(lambda: (), update)


def adaptive_smoothing(c: float, forget: float = 0.9) -> ScoreTransform:
  """``s + c · μ`` with ``μ ← forget · μ + (1 − forget) · mean(s)``, ``μ₀ = 1``.

  The smoothing follows the scale of the scores as training lowers them (the
  original library's ``AdaptiveAdditiveSmoothingSampler``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> t = jis.adaptive_smoothing(0.5, forget=0.0)
    >>> t.update(jnp.array([1.0, 3.0]), t.init())[0]
    Array([2., 4.], dtype=float32)
  """
  c = _validate.number("adaptive_smoothing(c)", c, 0, finite=True)
  forget = _validate.number("adaptive_smoothing(forget)", forget, 0, 1,
                            high_open=True)

  def update(scores, mu):
    mu = forget * mu + (1.0 - forget) * jnp.mean(scores)
    return scores + c * mu, mu
  return ScoreTransform(lambda: jnp.ones((), jnp.float32), update)


def power_smoothing(p: float) -> ScoreTransform:
  """``s ** p`` with ``0 ≤ p ≤ 1``: 0 is uniform, 1 leaves scores unchanged.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> t = jis.power_smoothing(0.5)
    >>> t.update(jnp.array([4.0, 9.0]), t.init())[0]
    Array([2., 3.], dtype=float32)
  """
  p = _validate.number("power_smoothing(p)", p, 0, 1)

  def update(scores, state):
    return jnp.power(scores, p), state
  return ScoreTransform(lambda: (), update)
