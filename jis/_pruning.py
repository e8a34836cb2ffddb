"""InfoBatch (Qin et al., ICLR 2024) as a fixed-shape selection policy.

InfoBatch keeps every example's latest loss, randomly prunes a share of the
examples whose loss is below the mean, rescales the gradient of the kept
low-loss ones so that the expected update is unchanged, and trains on the
full data again for the last part of training. With a score table
(:func:`jis.stale_scores`) the scores cost no forward pass, so a step costs
what a uniform step costs.
"""

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jis import _policies
from jis import _validate

Array = jax.Array


class PruneState(NamedTuple):
  """``steps``: int32 count of selections, for the annealing."""
  steps: Array


# Scores within this relative distance of the mean count as at the mean
# (kept): rounding, which differs between layouts (one device, a mesh), then
# cannot flip them. A score table fills never-scored examples with the mean
# of the presample's scored ones, which is the presample's mean exactly.
_AT_MEAN = 1e-4

# kept_first_order sorts packed keys while a pass holds this many random
# bits (N ≤ 2²⁶: at most 6 passes), keys with an index beside them past it.
_MIN_FREE_BITS = 6


def keep_probabilities(scores: Array, prune: float) -> Array:
  """``π_i = 1 − prune`` where ``s_i`` is below the mean of ``scores``, else 1.

  A score within ``1e-4`` of the mean (relative) counts as at the mean.
  """
  s = jnp.asarray(scores, jnp.float32)
  return jnp.where(_below_mean(jnp, s, jnp.ones(s.shape, bool)),
                   1.0 - prune, 1.0)


def _below_mean(xp, scores, scored):
  """The scored examples below the mean of the scored ones (numpy or
  jax.numpy ``xp``): InfoBatch's prunable ones, in the step and in the
  epochs alike. A score within ``_AT_MEAN`` of the mean counts as at it."""
  count = xp.maximum(xp.sum(scored), 1)
  mean = xp.sum(xp.where(scored, scores, 0.0)) / count
  return scored & (scores < mean - _AT_MEAN * xp.abs(mean))


def inclusion_probabilities(keep: Array, num: int) -> Array:
  """``ρ_i = min(1, c π_i)`` with ``Σ ρ = num``, for ``keep = π`` that takes
  at most two values, 1 and one below it (InfoBatch's).

  Uncapped, ``c = num / Σ π``. When that would put ``ρ > 1`` on the kept
  examples (``Σ π < num``: fewer kept in expectation than the batch holds),
  every ``π = 1`` example is taken (``ρ = 1``) and the rest of the batch is
  spread evenly over the others.
  """
  keep = jnp.asarray(keep, jnp.float32)
  high = keep >= 1.0
  scale = num / jnp.sum(keep)
  spill = (num - jnp.sum(high)) / jnp.maximum(jnp.sum(~high), 1)
  return jnp.where(scale <= 1.0, scale * keep, jnp.where(high, 1.0, spill))


def systematic_sample(key: Array, rho: Array, num: int) -> Array:
  """``num`` distinct positions, position ``i`` included with probability
  ``ρ_i`` exactly (``ρ ≤ 1``, ``Σ ρ = num``): systematic sampling.

  One uniform ``u`` and the points ``u, u + 1, ..., u + num − 1`` on the
  cumulative sum of ``ρ``; each point falls in one position's interval, of
  length ``ρ_i ≤ 1``, which holds at most one point. O(B + num log B) and no
  sort: a cumulative sum and a binary search. The joint inclusions depend on
  the order of the positions, which for a uniform presample is random.
  """
  cdf = jnp.cumsum(rho.astype(jnp.float32))
  cdf = cdf * (num / cdf[-1])           # Σ ρ = num up to rounding
  points = jax.random.uniform(key, (), jnp.float32) + jnp.arange(
      num, dtype=jnp.float32)
  idx = jnp.searchsorted(cdf, points, side="right", method="scan_unrolled")
  return jnp.minimum(idx, rho.shape[0] - 1).astype(jnp.int32)


def infobatch(prune: float = 0.5, anneal_step: Optional[int] = None
              ) -> _policies.Policy:
  """Prune a share of the well-learned examples, rescale the rest (InfoBatch).

  Of the ``B`` presampled examples, those whose score is below the
  presample's mean are kept with probability ``1 − prune``, the others
  always. At a fixed batch size that is: ``b`` of the ``B`` are drawn
  without replacement with inclusion probabilities ``ρ_i ∝ π_i``
  (``π = 1 − prune`` below the mean, 1 above; capped at 1,
  :func:`inclusion_probabilities`) by systematic sampling (one uniform
  number, a cumulative sum and a binary search: no sort and no per-example
  noise, so the rows are known soon after the scores), with the
  Horvitz–Thompson weights ``w_i = b / (B ρ_i)``. The weighted mean gradient
  is then an unbiased estimate of the presample's mean gradient, as
  InfoBatch's rescaling ``1 / (1 − prune)`` is for its epoch, and a
  low-score example weighs exactly ``1 / (1 − prune)`` times a high-score
  one (InfoBatch's ratio) unless the cap binds.

  From step ``anneal_step`` on (the policy's own count of its selections,
  which is the step number under the mode's default, always-on
  condition), every example is kept (``π = 1``): a uniform
  draw without replacement with weight 1, InfoBatch's annealing of the last
  part of training (it anneals the last 12.5 % of the epochs: pass
  ``anneal_step = int(0.875 · total_steps)``).

  Args:
    prune: the share of the below-mean examples dropped, in ``[0, 1)``;
      InfoBatch's ``r`` (0.5 by default, as in the paper).
    anneal_step: the step from which nothing is pruned; None never.

  Returns:
    A :class:`jis.Policy`; its ``probs`` are ``π / Σ π``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> policy = jis.infobatch(prune=0.5)
    >>> sel = policy.select(jax.random.key(0), jnp.array([0.1, 0.2, 2.0, 3.0]),
    ...                     policy.init(4, 2), 2)
    >>> sel.probs.tolist()   # the two below the mean are kept half as often
    [0.1666..., 0.1666..., 0.3333..., 0.3333...]
  """
  prune = _validate.number("infobatch(prune)", prune, 0, 1, high_open=True,
                           hint="It is the share of the below-mean examples "
                                "dropped (InfoBatch's r; the paper uses 0.5).")
  if anneal_step is not None:
    anneal_step = _validate.number("infobatch(anneal_step)", anneal_step, 0,
                                   integer=True)

  def init(presample_size, batch_size):
    return PruneState(jnp.zeros((), jnp.int32))

  def select(key, scores, state, batch_size):
    keep = keep_probabilities(scores, prune)
    if anneal_step is not None:
      keep = jnp.where(state.steps >= anneal_step, jnp.ones_like(keep), keep)
    rho = inclusion_probabilities(keep, batch_size)
    indices = systematic_sample(key, rho, batch_size)
    weights = batch_size / (keep.shape[0] * rho[indices])
    # Nothing pruned (annealing, or equal scores): a uniform draw without
    # replacement, whose exact weights are 1.
    weights = jnp.where(jnp.all(keep == 1.0), jnp.ones_like(weights), weights)
    return _policies.Selection(indices, weights, keep / jnp.sum(keep),
                               PruneState(state.steps + 1))
  return _policies.Policy(init, select)


def _epoch_inputs(name: str, xp, dtype, scores, scored):
  """``(scores [N], scored [N] bool)`` as ``xp`` arrays (numpy or jax.numpy);
  ``scored`` None is all. Refuses other shapes, naming ``name``'s argument."""
  scores = xp.asarray(scores, dtype)
  if scores.ndim != 1:
    raise ValueError(f"{name}(scores) needs one score per example, shape "
                     f"[N]; got {scores.shape}.")
  scored = (xp.ones(scores.shape, bool) if scored is None
            else xp.asarray(scored, bool))
  if scored.shape != scores.shape:
    raise ValueError(f"{name}(scored) must have the scores' shape "
                     f"{scores.shape}; got {scored.shape}.")
  return scores, scored


def infobatch_epoch(scores, scored=None, *, prune: float = 0.5,
                    seed: Union[int, Sequence[int]] = 0, anneal: bool = False
                    ) -> Tuple[np.ndarray, np.ndarray]:
  """One InfoBatch epoch for a data loader: what to load, in what order, weighted.

  For data that streams from the host, pruning inside the step still loads
  every presampled row. Pruning in the loader skips the pruned examples
  before they are read: once per epoch, read the score table to the host
  (``np.asarray(state.table.scores)``, ``4 N`` bytes), draw the epoch here,
  load only its examples, and give the step their weights with
  ``importance_step(..., example_weights="weight")``; the step keeps the
  table current from the ``"is/logits"`` of the examples it trains on
  (``presample=1.0``, ``condition=jis.never()``: no scoring pass).

  Examples whose score is below the mean of the scored ones (by more than
  ``1e-4`` of it, as in :func:`infobatch`) are kept with probability
  ``1 − prune`` and weight ``1 / (1 − prune)``; the others (and the never
  scored) are kept with weight 1. Every example's expected weight is 1, so
  the epoch's weighted gradient sum is an unbiased estimate of the full
  epoch's; the epoch is ``prune`` times the share of below-mean examples
  shorter.

  Args:
    scores: ``[N]`` the table's scores.
    scored: ``[N]`` bool, which examples have a score (``state.table.scored_at
      >= 0``); None: all.
    prune: InfoBatch's ``r``, in ``[0, 1)``.
    seed: seeds ``numpy.random.default_rng``; pass ``(seed, epoch)``.
    anneal: keep every example with weight 1 (InfoBatch's last epochs).

  Returns:
    ``(indices [M], weights [M])``, the kept examples in a random order.

  Examples:
    >>> import numpy as np
    >>> import jis
    >>> order, weights = jis.infobatch_epoch(np.array([0.1, 0.2, 3.0, 4.0]),
    ...                                      prune=0.5, seed=(0, 1))
    >>> sorted(set(weights.tolist())) <= [1.0, 2.0], {2, 3} <= set(order.tolist())
    (True, True)
  """
  prune = _validate.number("infobatch_epoch(prune)", prune, 0, 1,
                           high_open=True)
  scores, scored = _epoch_inputs("infobatch_epoch", np, np.float64, scores,
                                 scored)
  rng = np.random.default_rng(seed)
  low = _below_mean(np, scores, scored) & (not anneal)
  keep = ~low | (rng.random(scores.shape) >= prune)
  indices = rng.permutation(np.flatnonzero(keep))
  weights = np.where(low[indices], 1.0 / (1.0 - prune), 1.0).astype(np.float32)
  return indices, weights


def infobatch_order(key: Array, scores: Array, scored: Optional[Array] = None,
                    *, prune: float = 0.5, anneal=False
                    ) -> Tuple[Array, Array, Array]:
  """One InfoBatch epoch drawn on the device, for a loop over on-device data.

  The jittable counterpart of :func:`infobatch_epoch`, at fixed shapes:
  examples whose score is below the mean of the scored ones (by more than
  ``1e-4`` of it) are kept with probability ``1 − prune`` and weight
  ``1 / (1 − prune)``, the others (and the never scored) always, with
  weight 1. Each example's expected weight is 1, so the epoch's weighted
  gradient sum is an unbiased estimate of the full epoch's. The kept
  examples come first, in a random order; train on ``order[:size]``, ``b``
  at a time, with ``weights[order]`` as the loader's weights (``importance_step(..., presample=1.0, condition=jis.never(),
  score_table=jis.stale_scores(N), example_weights="weight")``: no scoring
  pass, the table kept current from ``"is/logits"``). A step then costs
  what a uniform step costs, and the epoch is ``prune`` times the share of
  below-mean examples shorter.

  Args:
    key: the epoch's PRNG key (e.g. ``jax.random.fold_in(key, epoch)``).
    scores: ``[N]`` the table's scores (``state.table.scores``).
    scored: ``[N]`` bool, which have a score (``state.table.scored_at >= 0``);
      None: all.
    prune: InfoBatch's ``r``, in ``[0, 1)``.
    anneal: (may be traced) keep every example with weight 1, InfoBatch's
      last epochs.

  Returns:
    ``(order [N] int32, weights [N] float32, size int32)``: a permutation of
    the examples with the ``size`` kept ones first, and each example's weight
    (by dataset index).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> order, weights, size = jis.infobatch_order(
    ...     jax.random.key(0), jnp.array([0.1, 0.2, 3.0, 4.0]), prune=0.5)
    >>> {2, 3} <= set(order[:size].tolist()), weights[2:].tolist()
    (True, [1.0, 1.0])
  """
  prune = _validate.number("infobatch_order(prune)", prune, 0, 1,
                           high_open=True)
  s, scored = _epoch_inputs("infobatch_order", jnp, jnp.float32, scores,
                            scored)
  n = s.shape[0]
  low = _below_mean(jnp, s, scored) & ~jnp.asarray(anneal, bool)
  order_key, keep_key = jax.random.split(key)
  keep = ~low | (jax.random.uniform(keep_key, (n,)) >= prune)
  order = kept_first_order(order_key, keep)
  size = jnp.sum(keep, dtype=jnp.int32)
  weights = jnp.where(low & keep, 1.0 / (1.0 - prune), 1.0).astype(jnp.float32)
  return order, weights, size


def kept_first_order(key: Array, keep: Array) -> Array:
  """A random permutation of ``[0, N)`` with the ``keep`` examples first.

  With ``keep`` all True, a uniformly random permutation for an epoch's
  order in about a fifth of ``jax.random.permutation``'s time on XLA:CPU.
  Each part comes in a uniformly random order: the examples are sorted by
  at least 31 random bits (two that draw the same bits, about ``N²/2³²``
  pairs, keep their index order). XLA:CPU sorts one ``uint32`` array 5–6
  times faster than keys with an index beside them (what ``jnp.argsort``
  and ``jax.random.permutation`` sort), so each pass sorts one array that
  packs random bits above a position's ``⌈log₂ N⌉`` bits, and reads the
  positions back from the low bits. A pass orders by its random bits, ties
  by the previous pass's order, so the passes together sort by all their
  random bits, as a radix sort does; the last pass spends its top bit on
  ``~keep``. Two passes up to ``N = 2¹⁶``, more above; keys with an index
  beside them past ``2²⁶``. The packed keys are distinct, so each sort has
  one result: a key gives the same order on every backend.

  Args:
    key: a PRNG key.
    keep: ``[N]`` bool.

  Returns:
    ``[N]`` int32, the examples with ``keep`` first.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> order = jis.kept_first_order(jax.random.key(0),
    ...                              jnp.array([False, True, False, True]))
    >>> sorted(order[:2].tolist()), sorted(order[2:].tolist())
    ([1, 3], [0, 2])
    >>> perm = jis.kept_first_order(jax.random.key(1), jnp.ones(60_000, bool))
  """
  keep = jnp.asarray(keep, bool)
  if keep.ndim != 1:
    raise ValueError("kept_first_order(keep) needs one bool per example, "
                     f"shape [N]; got shape {keep.shape}.")
  n = keep.shape[0]
  width = max(1, (n - 1).bit_length())      # the bits of a position
  free = 32 - width                         # the random bits a pass holds
  pruned = jnp.where(keep, jnp.uint32(0), jnp.uint32(1 << 31))
  if free < _MIN_FREE_BITS:                 # too many passes: sort pairs
    bits = jax.random.bits(key, (n,), jnp.uint32) >> 1
    return jax.lax.sort((bits | pruned, jnp.arange(n, dtype=jnp.int32)),
                        num_keys=1, is_stable=True)[1]
  passes = -(-32 // free)                   # passes · free − 1 ≥ 31 bits
  positions = jnp.arange(n, dtype=jnp.uint32)
  order = jnp.arange(n, dtype=jnp.int32)
  for i, k in enumerate(jax.random.split(key, passes)):
    last = i == passes - 1
    bits = jax.random.bits(k, (n,), jnp.uint32) >> (width + last) << width
    if last:
      bits = bits | jnp.take(pruned, order)
    moved = jax.lax.sort(bits | positions) & jnp.uint32((1 << width) - 1)
    order = jnp.take(order, moved.astype(jnp.int32))
  return order
