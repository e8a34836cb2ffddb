"""Switch conditions: when a step resamples instead of training uniformly.

A condition is three pure functions over a state carried in the jis state:

* ``init(B, b) -> state``;
* ``active(state, step, tau) -> bool``, read before the step, with the step
  count and jis's moving average τ (``ImportanceState.tau``);
* ``update(state, scores, step) -> state``, after every *importance* step,
  with the ``B`` presample scores it computed (transformed and sanitised;
  fewer than ``B`` in a compute budget's smaller buckets).

``active`` must be a pure ``jax.numpy`` function that changes only where
``update`` runs or the step moves: :func:`jis.presample_schedule` evaluates
it on the host for the coming steps at once (``jax.vmap`` over ``step``).

Uniform steps compute no scores (that is what makes them cost what a plain
step costs), so a condition that depends on the scores must resample now and
then to measure them: :func:`when_variance_reduced` and
:func:`when_total_variation` make every ``probe_every``-th step an importance
step while they are off. A probe is an ordinary, unbiased importance step.
"""

import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jis import _validate
from jis import _variance

Array = jax.Array

#: While a score-driven condition is off, every this many steps is an
#: importance step that re-measures the scores (docs/strategies.md): where
#: scoring a presample costs a training step, about 1 % of the time.
PROBE_EVERY = 128

#: The default condition's probe period while τ is under halfway to its
#: threshold: about 0.25 % of the time where it never switches on.
FAR_PROBE_EVERY = 4 * PROBE_EVERY


class Condition(NamedTuple):
  """A switch condition (see the module docstring).

  Attributes:
    init: ``(presample_size, batch_size) -> state``.
    active: ``(state, step, tau) -> bool``.
    update: ``(state, scores [B], step) -> state``, after importance steps.
    constant: ``True`` or ``False`` when ``active`` is known before the run to
      always return that value (:func:`always`, :func:`never`, a threshold of
      0 or inf): the step then compiles only that branch, with no
      ``lax.cond``; ``None`` when it depends on the state.
    tau_momentum: the momentum of τ this condition was written for, or None
      to leave ``importance_step(tau_momentum=)`` in charge (the deprecated
      ``when_variance_reduced(momentum=)`` sets it).
  """
  init: Callable[[int, int], Any]
  active: Callable[[Any, Array, Array], Array]
  update: Callable[[Any, Array, Array], Any]
  constant: Optional[bool] = None
  tau_momentum: Optional[float] = None


def _is_probe(step: Array, probe_every) -> Array:
  # Steps probe_every - 1, 2 probe_every - 1, ...: not step 0, whose scores
  # come from the untrained model.
  return (jnp.asarray(step) % probe_every) == probe_every - 1


def _check_probe_every(name: str, probe_every: int, prefix: str = "") -> int:
  return _validate.number(
      f"{name}({prefix}probe_every)", probe_every, 1, integer=True,
      hint="It is the period of the importance steps that re-measure the "
           "scores while the condition is off.")


def when_variance_reduced(threshold: Optional[float] = None,
                          momentum: Optional[float] = None, *,
                          probe_every: int = PROBE_EVERY,
                          far_probe_every: Optional[int] = None) -> Condition:
  """Active when τ, jis's moving average of the variance reduction, exceeds
  ``threshold``.

  τ (``ImportanceState.tau``) averages :func:`jis.variance_reduction` of the
  presample scores of every importance step, ``τ ← m^Δ τ + (1 − m^Δ) τ_step``
  for a measurement ``Δ`` steps after the previous one (the first sets it).
  While τ is below the threshold, every ``probe_every``-th step is an
  importance step that measures it again; while a measured τ is below
  halfway to it, ``(1 + threshold) / 2``, every ``far_probe_every``-th. τ
  rises over epochs, not steps: the default condition probes 4 times less
  often while it is far, so a crossing of the threshold from there is
  measured at most ``far_probe_every`` steps after it happens
  (``probe_every`` once a measurement is past halfway).
  ``threshold=None`` is :func:`jis.default_tau_threshold`, ``1 + 2B/(3b)``
  (eq. 29 of Katharopoulos & Fleuret (2018), ``(B + 3b) / (3b)``, with the
  scoring pass's cost counted twice); ``0.0`` resamples at every step;
  ``float("inf")`` never does.

  Args:
    threshold: the τ above which to resample, ``≥ 0``, or None.
    momentum: deprecated; pass ``importance_step(tau_momentum=)``, the one
      home of τ's momentum.
    probe_every: ``≥ 1``, the period of the measuring importance steps while
      the condition is off.
    far_probe_every: their period while τ, once measured, is below
      ``(1 + threshold) / 2``; None is ``probe_every``. The default
      condition (``importance_step(tau_threshold=)``) passes
      ``jis.FAR_PROBE_EVERY``, 512.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> cond = jis.when_variance_reduced(threshold=1.5)
    >>> state = cond.init(8, 4)
    >>> bool(cond.active(state, 1, jnp.float32(2.0)))
    True
    >>> bool(cond.active(state, 1, jnp.float32(1.2)))   # below; not a probe
    False
    >>> bool(cond.active(state, 127, jnp.float32(1.2)))  # below; a probe
    True
    >>> far = jis.when_variance_reduced(threshold=3.0, far_probe_every=512)
    >>> [bool(far.active(far.init(8, 4), t, jnp.float32(1.5))) for t in (127, 511)]
    [False, True]
  """
  if threshold is not None:
    _validate.number("when_variance_reduced(threshold)", threshold, 0,
                     hint="(inf: never)")
  if momentum is not None:
    _validate.number("when_variance_reduced(momentum)", momentum, 0, 1,
                     high_open=True)
    warnings.warn(
        "when_variance_reduced(momentum=) is deprecated: τ has one home, "
        "ImportanceState.tau; pass importance_step(tau_momentum=...).",
        DeprecationWarning, stacklevel=2)
  probe_every = _check_probe_every("when_variance_reduced", probe_every)
  far_probe_every = probe_every if far_probe_every is None else (
      _check_probe_every("when_variance_reduced", far_probe_every, "far_"))

  def init(presample_size, batch_size):
    th = (_variance.default_tau_threshold(presample_size, batch_size)
          if threshold is None else threshold)
    return jnp.asarray(th, jnp.float32)

  def active(th, step, tau):
    # A zero threshold means "always", including the first step (τ = 0,
    # not yet measured: probed at the near period).
    period = probe_every
    if far_probe_every != probe_every:
      far = (tau > 0) & (tau < 0.5 * (1.0 + th))
      period = jnp.where(far, far_probe_every, probe_every)
    return (tau > th) | (th == 0) | _is_probe(step, period)

  constant = {0: True, float("inf"): False}.get(threshold)
  return Condition(init, active, lambda th, scores, step: th, constant,
                   tau_momentum=momentum)


class EmaState(NamedTuple):
  value: Array       # the moving average of the statistic, 0 before any
  threshold: Array   # active when value > threshold


def total_variation(scores: Array) -> Array:
  """``½ Σ |p − 1/n|``: distance of ``p = scores / Σ scores`` from uniform."""
  s = jnp.asarray(scores, jnp.float32)
  top = jnp.max(s)
  s = _variance.scale_to_unit_max(s, jnp.where(top > 0, top, 1.0))
  total = jnp.sum(s)
  p = jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 1.0 / s.shape[0])
  return 0.5 * jnp.sum(jnp.abs(p - 1.0 / s.shape[0]))


def when_total_variation(threshold: float, momentum: float = 0.9, *,
                         probe_every: int = PROBE_EVERY) -> Condition:
  """Active when the moving average of the total variation of ``p`` from
  uniform exceeds ``threshold`` (the original library's
  ``TotalVariationCondition``).

  The average is over importance steps, the first measurement setting it;
  while it is below the threshold, every ``probe_every``-th step is an
  importance step that measures it again.

  Args:
    threshold: in ``[0, 1)``: the total variation of two distributions is
      below 1.
    momentum: in ``[0, 1)``, of the moving average.
    probe_every: ``≥ 1``, the period of the measuring steps while off.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> cond = jis.when_total_variation(0.2, momentum=0.0)
    >>> state = cond.update(cond.init(4, 2), jnp.array([1.0, 0, 0, 0]), 0)
    >>> bool(cond.active(state, 1, jnp.float32(0.0)))
    True
  """
  threshold = _validate.number("when_total_variation(threshold)", threshold,
                               0, 1, high_open=True)
  momentum = _validate.number("when_total_variation(momentum)", momentum, 0, 1,
                              high_open=True)
  probe_every = _check_probe_every("when_total_variation", probe_every)

  def init(presample_size, batch_size):
    return EmaState(jnp.zeros((), jnp.float32),
                    jnp.asarray(threshold, jnp.float32))

  def active(state, step, tau):
    return ((state.value > state.threshold) | (state.threshold == 0)
            | _is_probe(step, probe_every))

  def update(state, scores, step):
    tv = total_variation(scores)
    value = jnp.where(state.value > 0,
                      momentum * state.value + (1.0 - momentum) * tv, tv)
    return state._replace(value=value)
  return Condition(init, active, update, True if threshold == 0 else None)


def warmup(steps: int) -> Condition:
  """Uniform for the first ``steps`` steps, importance sampling from then on.

  Examples:
    >>> import jis
    >>> cond = jis.warmup(2)
    >>> [bool(cond.active(cond.init(8, 4), s, 0.0)) for s in range(4)]
    [False, False, True, True]
  """
  steps = _validate.number("warmup(steps)", steps, 0, integer=True)
  return Condition(lambda presample_size, batch_size: (),
                   lambda state, step, tau: jnp.asarray(step) >= steps,
                   lambda state, scores, step: state)


def always() -> Condition:
  """Resample at every step."""
  return Condition(lambda presample_size, batch_size: (),
                   lambda state, step, tau: jnp.asarray(True),
                   lambda state, scores, step: state, constant=True)


def never() -> Condition:
  """Never resample: plain uniform training on the first b examples."""
  return Condition(lambda presample_size, batch_size: (),
                   lambda state, step, tau: jnp.asarray(False),
                   lambda state, scores, step: state, constant=False)


def with_tau(condition: Condition) -> Condition:
  """``condition`` with the ``active(state, step, tau)`` signature.

  Conditions written before τ was passed in take ``active(state, step)``;
  they keep working, with a DeprecationWarning.
  """
  try:
    _validate.accepts(condition.active, "condition.active",
                      ("state", "step", "tau"))
    return condition
  except TypeError:
    pass   # perhaps the old two-argument form:
  _validate.accepts(condition.active, "condition.active", ("state", "step"))
  warnings.warn(
      "condition.active(state, step) is deprecated: conditions now receive "
      "jis's τ too, active(state, step, tau).", DeprecationWarning,
      stacklevel=5)   # with_tau < _plan._condition < make < importance_step
  old = condition.active
  return condition._replace(active=lambda state, step, tau: old(state, step))
