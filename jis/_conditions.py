"""Switch conditions: when to resample instead of training uniformly.

A condition is three pure functions over a state carried in the jis state:
``init(B, b)``, ``active(state, step) -> bool`` (read before the step) and
``update(state, scores, step) -> state`` (after it, with the scores the step
computed: the B presample scores on importance steps, the b trained examples'
scores on uniform steps).
"""

import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jis import _variance

Array = jax.Array


class Condition(NamedTuple):
  """A switch condition (see the module docstring).

  ``constant`` is ``True`` or ``False`` when ``active`` is known before the
  run to always return that value (:func:`always`, :func:`never`, a threshold
  of 0 or inf): the step then compiles only that branch, with no
  ``lax.cond``. ``None`` (the default) when it depends on the state.
  """
  init: Callable[[int, int], Any]
  active: Callable[[Any, Array], Array]
  update: Callable[[Any, Array, Array], Any]
  constant: Optional[bool] = None


class EmaState(NamedTuple):
  value: Array       # the moving average
  threshold: Array   # active when value > threshold


def _check_momentum(name: str, momentum: float) -> None:
  if not 0 <= momentum < 1:
    raise ValueError(f"{name}(momentum) must be in [0, 1); got {momentum!r}.")


def _ema_condition(name: str, threshold: Optional[float], momentum: float,
                   default_threshold: Callable[[int, int], float],
                   statistic: Callable[[Array], Array]) -> Condition:
  _check_momentum(name, momentum)
  if threshold is not None and (isinstance(threshold, (str, bool)) or
                                not isinstance(threshold, numbers.Real) or
                                not threshold >= 0):
    raise ValueError(f"{name}(threshold) must be a number >= 0 (inf: never) "
                     f"or None; got {threshold!r}.")

  def init(presample_size, batch_size):
    th = threshold
    if th is None:
      th = default_threshold(presample_size, batch_size)
    return EmaState(jnp.zeros((), jnp.float32), jnp.asarray(th, jnp.float32))

  def active(state, step):
    # A zero threshold means "always", including the first step (value = 0).
    return (state.value > state.threshold) | (state.threshold == 0)

  def update(state, scores, step):
    value = momentum * state.value + (1.0 - momentum) * statistic(scores)
    return state._replace(value=value)
  constant = {0: True, float("inf"): False}.get(threshold)
  return Condition(init, active, update, constant)


def when_variance_reduced(threshold: Optional[float] = None,
                          momentum: float = 0.9) -> Condition:
  """Active when the moving average of τ exceeds ``threshold``.

  τ is :func:`jis.variance_reduction` of each step's scores, averaged with
  ``τ ← m τ + (1 − m) τ_step`` from ``τ₀ = 0``. ``threshold=None`` is eq. 29 of
  Katharopoulos & Fleuret (2018), ``(B + 3b) / (3b)``; ``0.0`` resamples from
  the first step on; ``float("inf")`` never does.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> cond = jis.when_variance_reduced(threshold=1.5, momentum=0.0)
    >>> state = cond.update(cond.init(8, 4), jnp.array([1.0, 0, 0, 0]), 0)
    >>> bool(cond.active(state, 1))
    True
  """
  return _ema_condition("when_variance_reduced", threshold, momentum,
                        _variance.tau_threshold, _variance.variance_reduction)


def total_variation(scores: Array) -> Array:
  """``½ Σ |p − 1/n|``: distance of ``p = scores / Σ scores`` from uniform."""
  s = jnp.asarray(scores, jnp.float32)
  top = jnp.max(s)
  s = _variance.scale_to_unit_max(s, jnp.where(top > 0, top, 1.0))
  total = jnp.sum(s)
  p = jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 1.0 / s.shape[0])
  return 0.5 * jnp.sum(jnp.abs(p - 1.0 / s.shape[0]))


def when_total_variation(threshold: float, momentum: float = 0.9) -> Condition:
  """Active when the moving average of the total variation of ``p`` from uniform
  exceeds ``threshold`` (the original library's ``TotalVariationCondition``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> cond = jis.when_total_variation(0.2, momentum=0.0)
    >>> state = cond.update(cond.init(4, 2), jnp.array([1.0, 0, 0, 0]), 0)
    >>> bool(cond.active(state, 1))
    True
  """
  if threshold is None:
    raise ValueError("when_total_variation(threshold) needs a number in [0, 1).")
  return _ema_condition("when_total_variation", threshold, momentum,
                        lambda presample_size, batch_size: threshold,
                        total_variation)


def warmup(steps: int) -> Condition:
  """Uniform for the first ``steps`` steps, importance sampling from then on.

  Examples:
    >>> import jis
    >>> cond = jis.warmup(2)
    >>> [bool(cond.active(cond.init(8, 4), s)) for s in range(4)]
    [False, False, True, True]
  """
  if not (isinstance(steps, int) and steps >= 0):
    raise ValueError(f"warmup(steps) must be an int >= 0; got {steps!r}.")
  return Condition(lambda presample_size, batch_size: (),
                   lambda state, step: jnp.asarray(step) >= steps,
                   lambda state, scores, step: state)


def always() -> Condition:
  """Resample at every step."""
  return Condition(lambda presample_size, batch_size: (),
                   lambda state, step: jnp.asarray(True),
                   lambda state, scores, step: state, constant=True)


def never() -> Condition:
  """Never resample: plain uniform training on the first b examples."""
  return Condition(lambda presample_size, batch_size: (),
                   lambda state, step: jnp.asarray(False),
                   lambda state, scores, step: state, constant=False)
