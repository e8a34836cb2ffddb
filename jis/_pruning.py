"""InfoBatch (Qin et al., ICLR 2024) as a fixed-shape selection policy.

InfoBatch keeps every example's latest loss, randomly prunes a share of the
examples whose loss is below the mean, rescales the gradient of the kept
low-loss ones so that the expected update is unchanged, and trains on the
full data again for the last part of training. With a score table
(:func:`jis.stale_scores`) the scores cost no forward pass, so a step costs
what a uniform step costs. The same rule over whole epochs, for a loader or a
loop over on-device data, is in ``_epochs``.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

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


def keep_probabilities(scores: Array, prune: float) -> Array:
  """``π_i = 1 − prune`` where ``s_i`` is below the mean of ``scores``, else 1.

  A score within ``1e-4`` of the mean (relative) counts as at the mean.
  """
  s = jnp.asarray(scores, jnp.float32)
  return jnp.where(below_mean(jnp, s, jnp.ones(s.shape, bool)),
                   1.0 - prune, 1.0)


def below_mean(xp, scores, scored):
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
