"""Selective-Backprop (Jiang et al. 2019) as a fixed-shape selection policy."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jis import _policies
from jis import _validate

Array = jax.Array

# Floor of the percentile before the power, so every log-probability is finite.
_MIN_PERCENTILE = 1e-30


class SelectiveBackpropState(NamedTuple):
  """The ring buffer of recent scores.

  Attributes:
    history: ``[history]`` float32; the first ``count`` entries are filled.
    count: int32 number of filled entries (at most ``history``).
    position: int32 slot the next score is written to.
  """
  history: Array
  count: Array
  position: Array


def append_scores(state: SelectiveBackpropState,
                  scores: Array) -> SelectiveBackpropState:
  """Writes ``scores`` into the ring buffer, oldest entries first out."""
  size = state.history.shape[0]
  scores = jnp.asarray(scores, jnp.float32)[-size:]  # only the newest fit
  n = scores.shape[0]
  slots = (state.position + jnp.arange(n, dtype=jnp.int32)) % size
  return SelectiveBackpropState(
      history=state.history.at[slots].set(scores, unique_indices=True),
      count=jnp.minimum(state.count + n, size),
      position=(state.position + n) % size)


def order_keys(values: Array) -> Array:
  """int32 keys ordered as the float32 ``values``: ``k(x) < k(y)`` iff x < y.

  ``-0`` and ``+0`` get one key (as do all NaNs, above ``+inf``), which is
  the order ``jnp.sort`` and ``jnp.searchsorted`` use; values that compare
  equal to zero on the device (subnormals, where it flushes them) get zero's.
  XLA:CPU sorts int32 keys about 4x faster than float32 values, whose sort
  comparator canonicalises both operands at every comparison.
  """
  x = jnp.asarray(values, jnp.float32)
  x = jnp.where(x == 0, jnp.zeros_like(x), x)
  x = jnp.where(jnp.isnan(x), jnp.full_like(x, jnp.nan), x)
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  # Sign-magnitude to two's complement: a negative float's magnitude bits
  # count the wrong way.
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def percentile_of_scores(state: SelectiveBackpropState, scores: Array) -> Array:
  """Fraction of the filled history below each score, ties counting half.

  ``(#{h < s} + #{h ≤ s}) / (2 n)`` over the ``n`` filled entries, which is
  ``scipy.stats.percentileofscore(h, s, kind="mean") / 100``. Selective-Backprop
  counts strictly smaller entries only; counting ties half gives equal scores
  equal, non-zero percentiles and differs by at most ``1/n``.
  """
  size = state.history.shape[0]
  filled = jnp.arange(size) < state.count
  # The counts compare order keys, not floats: the same counts, cheaper sort.
  ordered = jnp.sort(order_keys(jnp.where(filled, state.history, jnp.inf)))
  keys = order_keys(scores)
  below = jnp.searchsorted(ordered, keys, side="left")
  at_or_below = jnp.searchsorted(ordered, keys, side="right")
  count = jnp.maximum(state.count, 1).astype(jnp.float32)
  return (below + at_or_below).astype(jnp.float32) / (2.0 * count)


def gumbel_top_k(key: Array, log_weights: Array, num: int):
  """``num`` draws without replacement, each ∝ ``exp(log_weights)`` among the rest.

  Returns the indices and the threshold ``κ``, the ``(num+1)``-th largest
  perturbed log-weight (``-inf`` when ``num`` is every example).
  """
  perturbed = log_weights + jax.random.gumbel(key, log_weights.shape, jnp.float32)
  if num < log_weights.shape[0]:
    values, indices = jax.lax.top_k(perturbed, num + 1)
    return indices[:num].astype(jnp.int32), values[num]
  _, indices = jax.lax.top_k(perturbed, num)
  return indices.astype(jnp.int32), jnp.asarray(-jnp.inf, jnp.float32)


def priority_weights(log_weights: Array, indices: Array, threshold: Array) -> Array:
  """Unbiased weights ``b / (B q_i)`` for a Gumbel top-k sample.

  ``q_i = P(log_weights_i + G > κ) = 1 − exp(−exp(log_weights_i − κ))`` is the
  probability that example ``i`` beats the threshold ``κ`` (priority sampling,
  Duffield et al. 2007; for Gumbel keys, Kool et al. 2019). Conditioned on the
  other keys, ``i`` is selected exactly when its key beats theirs, so
  ``E[1{i selected} / q_i] = 1`` and ``(1/b) Σ_selected w_i g_i`` is an unbiased
  estimate of the presample mean ``(1/B) Σ_i g_i``.
  """
  batch_size, presample_size = indices.shape[0], log_weights.shape[0]
  q = -jnp.expm1(-jnp.exp(log_weights[indices] - threshold))
  return batch_size / (presample_size * q)


def selective_backprop(beta: float = 3.0, history: int = 1024,
                       reweight: bool = False) -> _policies.Policy:
  """Selective-Backprop (Jiang et al. 2019): keep examples by loss percentile.

  Every score seen (the ``B`` presample scores on importance steps, the ``b``
  trained examples' scores on uniform steps, through ``Policy.observe``) enters
  a ring buffer of the last ``history`` scores carried in the policy state.
  Each presampled example then gets the selection probability::

      P_i = percentile(s_i among the buffer) ^ beta

  (the presample's scores are added to the buffer first, as the paper does).

  *Fixed shapes.* The paper keeps each forwarded example independently with
  probability ``P_i`` and backpropagates once ``b`` have accumulated, so the
  number of examples forwarded per update varies (``b / mean(P)`` on
  average, ``(beta + 1) · b`` for continuous scores, since ``E[U^β] =
  1/(β+1)``). XLA needs static shapes, so jis instead takes exactly ``b`` of
  the ``B`` presampled examples without replacement, each draw ∝ ``P`` among
  those left (Gumbel top-k). The relative odds of two examples are the
  paper's; the inclusion probability ``π_i`` is close to ``b P_i / Σ P`` for
  ``b ≪ B`` and saturates at 1 for the top examples. Choose
  ``presample = beta + 1`` to forward as many examples per update as the
  paper does on average.

  Args:
    beta: the exponent ``β ≥ 0``; 0 is uniform without replacement, larger
      values concentrate on the highest percentiles (the paper uses 1 to 3).
    history: ``≥ 1`` scores kept to compute percentiles (the paper: 1024).
    reweight: False (the paper) trains with weight 1, a biased update that
      emphasises high-score examples. True uses the priority-sampling weights
      ``w_i = b / (B q_i)``, ``q_i = 1 − exp(−P_i e^{−κ})`` with ``κ`` the
      ``(b+1)``-th largest Gumbel key, which make the weighted mean gradient
      an unbiased estimate of the presample's mean gradient (Duffield et al.
      2007; Kool et al. 2019).

  Returns:
    A :class:`jis.Policy` whose state is a :class:`SelectiveBackpropState`.
    The reported ``probs`` are ``P / Σ P``, the distribution of the first draw.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> policy = jis.selective_backprop(beta=3.0, history=8)
    >>> sel = policy.select(jax.random.key(0), jnp.array([0.1, 0.2, 0.3, 5.0]),
    ...                     policy.init(4, 2), 2)
    >>> sorted(set(sel.indices.tolist())) == sorted(sel.indices.tolist())
    True
    >>> int(sel.state.count)
    4
  """
  beta = _validate.number("selective_backprop(beta)", beta, 0, finite=True,
                          hint="The paper uses 1 to 3.")
  history = _validate.number(
      "selective_backprop(history)", history, 1, integer=True,
      hint="It is the number of recent scores percentiles are taken over (the "
           "paper uses 1024).")

  def init(presample_size, batch_size):
    return SelectiveBackpropState(jnp.zeros((history,), jnp.float32),
                                  jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def select(key, scores, state, batch_size):
    state = append_scores(state, scores)
    percentile = percentile_of_scores(state, scores)
    log_p = beta * jnp.log(jnp.maximum(percentile, _MIN_PERCENTILE))
    indices, threshold = gumbel_top_k(key, log_p, batch_size)
    if reweight:
      weights = priority_weights(log_p, indices, threshold)
    else:
      weights = jnp.ones((batch_size,), jnp.float32)
    return _policies.Selection(indices, weights, jax.nn.softmax(log_p), state)

  def observe(scores, state):
    return append_scores(state, scores)
  return _policies.Policy(init, select, observe)
