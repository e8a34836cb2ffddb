"""Compute-budget modes: trade presample size against backward batch size by τ.

The original library's ``ConstantVarianceSampler`` and ``ConstantTimeSampler``
change the number of examples scored and trained on at every step. XLA needs
static shapes, so here a budget mode is a small static menu of *buckets*
``(n_scored, n_trained)`` and a rule that picks one from the moving average
τ (``ImportanceState.tau``, known before the step scores anything). The step
compiles one resampling branch per bucket and ``lax.switch`` runs the chosen
one, so a small bucket really costs less: its forward and backward passes have
the bucket's shapes. The price is compile time and program size, about one
resampling branch per bucket (keep the menu short), and a rounding of the
ideal size to the menu, always in the direction that keeps the promise (no
more variance than uniform training for constant variance, no more time than
a uniform step for constant time).

Time is counted in forward passes of one example: a backward pass costs
``backward_time`` (``t_b``) of them, so a uniform step of ``b`` costs
``(1 + t_b) b`` and scoring ``n`` examples costs ``n``.
"""

import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jis import _validate

Array = jax.Array
Buckets = Tuple[Tuple[int, int], ...]


def _check_real(name: str, value, low: float, high: Optional[float] = None,
                low_open: bool = False, high_open: bool = False) -> float:
  return _validate.number(name, value, low, high, low_open=low_open,
                          high_open=high_open, finite=True)


class Budget(NamedTuple):
  """A compute-budget mode (see the module docstring).

  Attributes:
    plan: ``(presample_size B, batch_size b) -> ((n_scored, n_trained), ...)``,
      the static buckets, ``n_scored ≤ B``; called once at trace time.
    choose: ``(tau, B, b) -> int32`` index of the bucket for this step.
    tau_threshold: ``(B, b) -> float``, the τ above which resampling pays off
      in this mode; the step's default condition uses it.
  """
  plan: Callable[[int, int], Buckets]
  choose: Callable[[Array, int, int], Array]
  tau_threshold: Callable[[int, int], float]


def _inverse_tau(tau: Array) -> Array:
  tau = jnp.asarray(tau, jnp.float32)
  return jnp.where(tau > 0, 1.0 / jnp.where(tau > 0, tau, 1.0), jnp.inf)


def constant_variance(backward_time: float = 2.0, extra_samples: float = 0.2,
                      fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
                      ) -> Budget:
  """Train on fewer examples, keeping the gradient variance of uniform training.

  The original ``ConstantVarianceSampler``: when importance sampling reduces
  the variance by τ, ``b/τ`` resampled examples estimate the gradient about
  as well as ``b`` uniform ones, so the step trains on::

      n* = (1/τ + extra_samples) · b

  examples drawn from the presample and weighted by the policy, and saves
  backward passes. jis rounds ``n*`` *up* to the nearest of the static batch
  sizes ``ceil(f · b)``, ``f`` in ``fractions`` (1 always included), so the
  variance never exceeds the target. The switch pays off once the saved
  backward passes outweigh scoring the presample,
  ``(1 + t_b)(b − n*) ≥ B``; for ``B = b`` (``presample=1``, the original's
  setting) that is the default threshold::

      τ_th = 1 / (t_b / (1 + t_b) − extra_samples)     (2.14 by default)

  Why ``b/τ`` is enough when the scores are the per-example gradient norms:
  with ``M_u = mean ‖G_i‖²``, ``M_g = (mean ‖G_i‖)²``, ``m = ‖mean G_i‖²`` and
  ``τ² = M_u / M_g``, the variances of the mean of ``b`` uniform and of
  ``n`` importance-sampled gradients are ``(M_u − m)/b`` and ``(M_g − m)/n``,
  whose ratio at ``n = b/τ`` is at most ``1/τ ≤ 1``.

  Args:
    backward_time: ``t_b > 0``, the cost of a backward pass in forward passes.
    extra_samples: ``0 ≤ e < t_b/(1 + t_b)``, added to ``1/τ`` to absorb the
      error of τ (upper-bound scores, moving average).
    fractions: the static batch sizes as fractions of ``b`` in ``(0, 1]``;
      one compiled resampling branch each.

  Examples:
    >>> import jis
    >>> budget = jis.constant_variance()
    >>> budget.plan(128, 128)
    ((128, 32), (128, 64), (128, 96), (128, 128))
    >>> [int(budget.choose(tau, 128, 128)) for tau in (1.5, 2.5, 5.0, 50.0)]
    [3, 2, 1, 0]
  """
  _check_real("constant_variance(backward_time)", backward_time, 0.0, low_open=True)
  ceiling = backward_time / (1.0 + backward_time)
  _check_real("constant_variance(extra_samples) (below t_b/(1 + t_b), or "
              "resampling never pays off)", extra_samples, 0.0, ceiling,
              high_open=True)
  fractions = tuple(fractions)
  if not fractions:
    raise ValueError("constant_variance(fractions) needs at least one fraction "
                     "of the batch size, e.g. (0.5, 1.0).")
  for f in fractions:
    _check_real("constant_variance(fractions) entries", f, 0.0, 1.0, low_open=True)
  fractions = tuple(sorted(set(float(f) for f in fractions) | {1.0}))

  def sizes(batch_size):
    return tuple(sorted({max(1, math.ceil(f * batch_size - 1e-9))
                         for f in fractions}))

  def plan(presample_size, batch_size):
    return tuple((presample_size, n) for n in sizes(batch_size))

  def choose(tau, presample_size, batch_size):
    target = (_inverse_tau(tau) + extra_samples) * batch_size
    menu = jnp.asarray(sizes(batch_size), jnp.float32)
    k = jnp.searchsorted(menu, target * (1 - 1e-6), side="left")
    return jnp.minimum(k, menu.shape[0] - 1).astype(jnp.int32)

  def tau_threshold(presample_size, batch_size):
    return 1.0 / (ceiling - extra_samples)

  return Budget(plan, choose, tau_threshold)


def constant_time(backward_time: float = 2.0, tau_threshold: float = 2.0,
                  ratio: float = 0.5, min_fraction: float = 0.2,
                  buckets: int = 4) -> Budget:
  """Spend a uniform step's time on a better gradient: score more, train fewer.

  The original ``ConstantTimeSampler``. A uniform step of ``b`` costs ``T =
  (1 + t_b) b``; a resampling step that scores ``n`` examples and trains on
  ``a`` costs ``n + (1 + t_b) a``. From τ it computes::

      a* = max(min_fraction · b, b / τ)     # the fewest worth training on
      n_max = T − (1 + t_b) a*              # the most that can then be scored
      n* = b + ratio · (n_max − b)          # split the difference
      a = (T − n*) / (1 + t_b)              # what the time left trains

  jis scores the first ``n`` rows of the presample, for ``n`` on a static grid
  of ``buckets`` sizes evenly spaced from ``b`` to ``B`` (the presample given
  to the step), each with ``a = floor((T − n)/(1 + t_b))`` so that no bucket
  costs more than a uniform step; it takes the largest grid ``n ≤ n*``.
  ``n*`` is at most ``b (1 + ratio ((1 + t_b)(1 − min_fraction) − 1))``
  (``1.7 b`` by default), the largest presample worth passing.

  Args:
    backward_time: ``t_b > 0``, the cost of a backward pass in forward passes.
    tau_threshold: resample when τ exceeds it (the original's default, 2);
      the step's default condition uses it.
    ratio: in ``[0, 1]``; 0 scores only ``b``, 1 scores as many as the time
      allows after training ``a*``.
    min_fraction: in ``(0, 1]``, the fewest examples trained, as a fraction of
      ``b``.
    buckets: ``≥ 1`` grid sizes; one compiled resampling branch each.

  Examples:
    >>> import jis
    >>> budget = jis.constant_time()
    >>> budget.plan(216, 128)   # presample 1.7 b
    ((128, 85), (157, 75), (187, 65), (216, 56))
    >>> [int(budget.choose(tau, 216, 128)) for tau in (1.5, 2.0, 3.0, 100.0)]
    [0, 1, 2, 3]
  """
  _check_real("constant_time(backward_time)", backward_time, 0.0, low_open=True)
  _check_real("constant_time(tau_threshold)", tau_threshold, 0.0)
  _check_real("constant_time(ratio)", ratio, 0.0, 1.0)
  _check_real("constant_time(min_fraction)", min_fraction, 0.0, 1.0, low_open=True)
  _validate.number("constant_time(buckets)", buckets, 1, integer=True)
  cost = 1.0 + backward_time

  def scored_sizes(presample_size, batch_size):
    grid = np.linspace(batch_size, presample_size, int(buckets))
    return tuple(sorted({int(round(n)) for n in grid}))

  def plan(presample_size, batch_size):
    total = cost * batch_size
    out = []
    for n in scored_sizes(presample_size, batch_size):
      a = int(math.floor((total - n) / cost + 1e-9))
      if a < 1:
        raise ValueError(
            f"constant_time: scoring n={n} examples leaves no time to train on "
            f"any within the budget of a uniform step, (1 + backward_time) * b "
            f"= {total:g}. Lower presample (B={presample_size}) below "
            f"{(total - cost) / batch_size:g}.")
      out.append((n, a))
    return tuple(out)

  def choose(tau, presample_size, batch_size):
    total = cost * batch_size
    fewest = jnp.maximum(min_fraction * batch_size, batch_size * _inverse_tau(tau))
    most_scored = total - cost * fewest
    target = batch_size + ratio * (most_scored - batch_size)
    menu = jnp.asarray(scored_sizes(presample_size, batch_size), jnp.float32)
    k = jnp.searchsorted(menu, target * (1 + 1e-6), side="right") - 1
    return jnp.clip(k, 0, menu.shape[0] - 1).astype(jnp.int32)

  return Budget(plan, choose, lambda presample_size, batch_size: float(tau_threshold))


def resolve_buckets(budget: Budget, presample_size: int, batch_size: int,
                    layout) -> Buckets:
  """The budget's static buckets (a checked :class:`Budget`) against the
  step's options."""
  if layout.mesh is not None:
    raise ValueError("budget modes run on one device for now: pass mesh=None.")
  buckets = tuple((int(n), int(a)) for n, a in budget.plan(presample_size,
                                                           batch_size))
  for n, a in buckets:
    if not (1 <= a <= n <= presample_size):
      raise ValueError(
          f"budget bucket (n_scored={n}, n_trained={a}) must satisfy 1 <= "
          f"n_trained <= n_scored <= B={presample_size}.")
    f = layout.forward_batch_size
    if f is not None and f < n and n % f:
      raise ValueError(
          f"forward_batch_size={f} must divide every bucket's scored size; "
          f"this budget scores {sorted({m for m, _ in buckets})}. Pick a common "
          "divisor, or forward_batch_size=None.")
  return buckets


def metrics(n_scored: int, n_trained: int) -> dict:
  """``is/presample_size`` (examples scored to select) and ``is/batch_size``."""
  return {"is/presample_size": jnp.asarray(n_scored, jnp.float32),
          "is/batch_size": jnp.asarray(n_trained, jnp.float32)}
