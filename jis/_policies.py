"""Selection policies: from B presample scores to b indices and weights."""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jis import _validate
from jis import _variance

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
      scores before calling it otherwise). It may run at other sizes than the
      ``init``'s: a ``budget``'s buckets, and ``B/d`` per device under
      ``resample="local"``; keep the state's shapes independent of them.
    observe: ``(scores [n], state) -> state``, called on the uniform steps with
      the scores of the trained examples, for policies that keep statistics;
      None (the default) for those that do not. A policy that observes makes
      uniform steps score their examples: free when the ``train_step``
      returns ``"is/logits"``, else a forward pass of ``b``.
  """
  init: Callable[[int, int], Any]
  select: Callable[[Array, Array, Any, int], Selection]
  observe: Optional[Callable[[Array, Any], Any]] = None


def normalize(scores: Array) -> Array:
  """``scores / Σ scores``, exact for any finite non-negative scores with a
  positive maximum: scaling by the maximum first keeps the sum of huge scores
  (1e30 and up) from overflowing."""
  scaled = _variance.scale_to_unit_max(scores, jnp.max(scores))
  return scaled / jnp.sum(scaled)


def sample_categorical(key: Array, probs: Array, num: int) -> Array:
  """``num`` i.i.d. draws from ``Categorical(probs)`` by inverting the CDF.

  O(B + num log B) work, against O(B · num) for Gumbel-max
  (``jax.random.categorical`` with a shape). Zero-probability entries are never
  drawn.
  """
  cdf = jnp.cumsum(probs.astype(jnp.float32))
  u = jax.random.uniform(key, (num,), jnp.float32) * cdf[-1]
  idx = jnp.searchsorted(cdf, u, side="right", method="scan_unrolled")
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


def importance_sampling(k: float = 1.0, max_weight: float = 1e4) -> Policy:
  """Categorical sampling with replacement, ``p ∝ scores``, weights ``(1/(Bp))^k``.

  Katharopoulos & Fleuret (2018) with ``k = 1`` (unbiased); ``k < 1`` biases the
  update towards hard examples (Katharopoulos & Fleuret 2017 use ``k = 0.5``
  with loss scores).

  Weights are bounded by ``max_weight``: the sampling distribution is the
  defensive mixture ``p = (1 − α) s/Σs + α/B`` with ``α = 1/max_weight``, so
  ``1/(B p) ≤ max_weight`` and, for ``k < 1``, the rescaled weights too. The
  weights are computed from this ``p``, so the estimate stays unbiased; the
  mixture moves at most ``α`` of the probability mass (1e-4 by default) and
  keeps examples with tiny or zero scores from producing huge or infinite
  weights. ``max_weight=float("inf")`` is the plain ``p = s/Σs`` of the paper.

  Args:
    k: the weight exponent, ``≥ 0``.
    max_weight: the largest weight an example can get, ``≥ 1``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> policy = jis.importance_sampling(max_weight=float("inf"))
    >>> sel = policy.select(jax.random.key(0), jnp.array([1.0, 0.0, 3.0, 0.0]),
    ...                     policy.init(4, 2), 2)
    >>> set(sel.indices.tolist()) <= {0, 2}
    True
  """
  k = _validate.number("importance_sampling(k)", k, 0, finite=True)
  max_weight = _validate.number(
      "importance_sampling(max_weight)", max_weight, 1,
      hint="A weight bound below 1 is impossible; inf is no bound.")
  alpha = 1.0 / max_weight

  def select(key, scores, state, batch_size):
    probs = normalize(scores)
    if alpha > 0:
      probs = (1.0 - alpha) * probs + alpha / scores.shape[0]
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


def top_k() -> Policy:
  """The ``b`` highest-scoring presampled examples, weight 1 (deterministic).

  The selection rule of RHO-LOSS (Mindermann et al. 2022, with
  ``score="reducible_loss"``) and of "biggest losers" training. It is biased
  by design: examples below the top ``b`` are never trained on while the
  scores stay as they are. Ties go to the lower presample position. The
  reported ``probs`` put ``1/b`` on each selected example.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> policy = jis.top_k()
    >>> sel = policy.select(jax.random.key(0), jnp.array([0.1, 3.0, 0.5, 2.0]),
    ...                     policy.init(4, 2), 2)
    >>> sel.indices.tolist(), sel.weights.tolist()
    ([1, 3], [1.0, 1.0])
  """
  def select(key, scores, state, batch_size):
    del key
    _, indices = jax.lax.top_k(scores, batch_size)
    indices = indices.astype(jnp.int32)
    probs = jnp.zeros(scores.shape, jnp.float32).at[indices].set(1.0 / batch_size)
    return Selection(indices, jnp.ones((batch_size,), jnp.float32), probs, state)
  return Policy(lambda presample_size, batch_size: (), select)


def _check_pressure(name: str, value) -> float:
  return _validate.number(
      f"online_batch_selection({name})", value, 1, finite=True,
      hint="It is the ratio of the most to the least likely example; 1 is "
           "uniform.")


def selection_pressure(pressure_start: float, pressure_end: float,
                       schedule_steps: int, step: Array) -> Array:
  """``s_e(t) = s₀ · (s_end / s₀)^(min(t, T) / T)``: geometric annealing."""
  frac = jnp.minimum(jnp.asarray(step, jnp.float32), schedule_steps) / schedule_steps
  log_s = np.log(pressure_start) + frac * np.log(pressure_end / pressure_start)
  return jnp.exp(log_s)


def rank_probabilities(scores: Array, pressure: Array) -> Array:
  """``p ∝ exp(−log(s_e) · rank / B)``, rank 0 for the highest score.

  Ties are ranked by presample position (a stable sort), so equal scores get
  slightly different probabilities, as in the original library.
  """
  n = scores.shape[0]
  order = jnp.argsort(-scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  logits = -jnp.log(jnp.asarray(pressure, jnp.float32)) * rank / n
  return jax.nn.softmax(logits)


def online_batch_selection(pressure_start: float = 100.0,
                           pressure_end: Optional[float] = None,
                           schedule_steps: int = 1,
                           reweight: bool = False) -> Policy:
  """Rank-based selection of Loshchilov & Hutter (2015), with replacement.

  The ``B`` presampled examples are ranked by score (rank 0 the highest) and
  ``b`` are drawn i.i.d. from::

      p(rank) ∝ exp(−log(s_e) · rank / B)

  so the highest-ranked example is about ``s_e`` (the *selection pressure*)
  times likelier than the lowest. ``s_e`` is annealed geometrically from
  ``pressure_start`` to ``pressure_end`` over ``schedule_steps`` steps,
  ``s_e(t) = s₀ (s_end/s₀)^(min(t, T)/T)``, then held (the paper anneals per
  epoch: pass ``schedule_steps = epochs · steps_per_epoch``). The step counter
  ``t`` lives in the policy state and counts every step, uniform ones
  included. The paper ranks the whole dataset by (stale) losses; with
  :func:`jis.stale_scores` and a large presample jis does the same.

  Args:
    pressure_start: ``s₀ ≥ 1``; 1 is uniform. The paper's best runs used
      ``10²`` to ``10⁸``.
    pressure_end: ``s_end ≥ 1``; None keeps ``pressure_start`` throughout.
    schedule_steps: ``T ≥ 1``, steps over which ``s_e`` moves.
    reweight: if False (the paper), every weight is 1 and the update is
      biased towards high-score examples; if True, weights ``1/(B p)`` make
      it an unbiased estimate of the presample's mean gradient.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> policy = jis.online_batch_selection(pressure_start=100.0)
    >>> sel = policy.select(jax.random.key(0), jnp.array([3.0, 1.0, 2.0]),
    ...                     policy.init(3, 2), 2)
    >>> [round(p, 3) for p in sel.probs.tolist()]  # ranks 0, 2, 1: 100^(1/3) apart
    [0.792, 0.037, 0.171]
  """
  if pressure_end is None:
    pressure_end = pressure_start
  _check_pressure("pressure_start", pressure_start)
  _check_pressure("pressure_end", pressure_end)
  _validate.number("online_batch_selection(schedule_steps)", schedule_steps, 1,
                   integer=True, hint="It is the number of steps over which "
                   "the pressure is annealed.")
  start, end, steps = float(pressure_start), float(pressure_end), int(schedule_steps)

  def init(presample_size, batch_size):
    return jnp.zeros((), jnp.int32)  # steps seen

  def select(key, scores, step, batch_size):
    probs = rank_probabilities(scores, selection_pressure(start, end, steps, step))
    indices = sample_categorical(key, probs, batch_size)
    if reweight:
      weights = importance_weights(probs, indices)
    else:
      weights = jnp.ones((batch_size,), jnp.float32)
    return Selection(indices, weights, probs, step + 1)

  return Policy(init, select, lambda scores, step: step + 1)
