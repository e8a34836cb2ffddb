"""Stale per-example scores: a score table over the dataset, carried in the state.

Importance sampling pays a forward pass over the ``B`` presampled examples at
every resampling step. When the dataset is small enough to keep one float per
example, the latest score of every example can be kept instead and the
presample scored by looking it up: no forward pass, a gather of ``B`` floats.
The examples a step trains on are rescored as it trains (for free when the
``train_step`` hands back its logits under ``"is/logits"``), so the scores of
the examples that matter most stay fresh. This is the history/cache sampling
of the original library (``HistorySampler``, ``CacheSampler``) and StaleSB
(Jiang et al. 2019), which refreshes the losses with forward passes only every
few epochs.
"""

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jis import _indexed
from jis import _validate

Array = jax.Array
PyTree = Any

# scored_at read for an index outside the table: counts as scored (and
# never too old), so that its NaN score reaches the step's fallback.
_NEVER_OLD = np.iinfo(np.int32).max


class TableState(NamedTuple):
  """The score table, a pytree in ``ImportanceState.table``.

  Attributes:
    scores: ``[N]`` float32, the latest raw (untransformed) score of every
      example.
    scored_at: ``[N]`` int32, the step at which it was computed; -1 never.
  """
  scores: Array
  scored_at: Array


class ScoreTable(NamedTuple):
  """A table of stale per-example scores (see :func:`stale_scores`).

  Attributes:
    init: ``() -> TableState``.
    index: ``batch -> [B]`` int dataset indices of the presample.
    fresh: ``step -> bool``, whether a step scores its presample with a
      forward pass (and writes the scores to the table); None: never, and no
      presample forward pass is traced at all.
    lookup: ``(table, indices [n], step) -> (scores [n], scored [n])``: the
      stale scores, the examples without a valid score (``scored`` False)
      filled in.
    write: ``(table, indices [n], scores [n], step) -> table``; of an index
      given more than once, the largest of its scores is kept (NaN if one
      of them is NaN: a lookup then falls back, as for any NaN score).
    num_examples: ``N``, the table's size.
    lookahead: whether a step trains on the draw the previous step made
      (:func:`stale_scores`): True, False, or None where it can.
  """
  init: Callable[[], TableState]
  index: Callable[[PyTree], Array]
  fresh: Optional[Callable[[Array], Array]]
  lookup: Callable[[TableState, Array, Array], tuple]
  write: Callable[[TableState, Array, Array, Array], TableState]
  num_examples: int = 0
  lookahead: Optional[bool] = None


class Pending(NamedTuple):
  """The draw a lookahead step made for the next one, in
  ``ImportanceState.pending``.

  Attributes:
    index: ``[b]`` int32 dataset indices of the rows drawn.
    weights: ``[b]`` float32 their loss weights.
    ready: bool, False before the first draw.
  """
  index: Array
  weights: Array
  ready: Array


def init_pending(batch_size: int) -> Pending:
  """No draw yet: the first lookahead step trains on its presample's head."""
  return Pending(jnp.zeros((batch_size,), jnp.int32),
                 jnp.ones((batch_size,), jnp.float32), jnp.asarray(False))


def _index_getter(index_key):
  if callable(index_key):
    return index_key

  def get(batch):
    if isinstance(batch, _indexed.Indexed):
      return batch.index
    if isinstance(batch, Mapping) and index_key in batch:
      return batch[index_key]
    keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(
        f"stale_scores looks up each presampled example's score by its dataset "
        f"index in batch[{index_key!r}], but the batch has no such entry (it has "
        f"{keys}). Add the indices to every batch, pass index_key=<their key>, "
        "or pass the presample as jis.Indexed(dataset, indices).")
  return get


def stale_scores(num_examples: int, *, refresh_every: int = 0,
                 refresh_steps: int = 1, max_age: Optional[int] = None,
                 index_key: Union[str, Callable[[PyTree], Array]] = "index",
                 lookahead: Optional[bool] = None) -> ScoreTable:
  """Scores the presample from a table of every example's latest score.

  Pass it as ``jis.importance_step(..., score_table=jis.stale_scores(N))``.
  Every batch then carries the dataset index of each presampled example
  (``batch["index"]``, or the presample is a :class:`jis.Indexed`), and a
  resampling step does, instead of the presample forward pass::

      s = table[index]                  # B stale scores, no forward pass
      s[never scored] = mean(s[scored])          # 1.0 if none of the B is
      ... transforms, policy, train_step on the selected b, as usual ...
      table[index[selected]] = score(trained examples)   # refresh them

  **Lookahead** (by default wherever it can run: a :class:`jis.Indexed`
  presample and a step that always resamples, on one device). A step trains
  on the ``b`` rows (and weights) the *previous* step drew from its
  presample, and draws from its own presample the rows the next step trains
  on (the first step trains on the first ``b`` rows of its presample,
  weight 1). The draw then comes after the training instead of before it:
  the rows of a step no longer wait for the table lookup, the policy and
  the gather that follows them, which cost a 5 ms MLP step about 15 % on a
  2-core CPU. The step writes the trained rows' scores first and then looks
  up its presample, so the draw reads the scores just written and XLA
  updates the table in place. The update stays unbiased: the rows were
  drawn from a uniform presample that the parameters they are trained at do
  not depend on. The scores are stale either way; the draw is one step
  staler. A lookahead step's ``is/ess``, ``is/max_weight`` and
  ``is/score_mean`` describe the draw it made for the next step, not the
  weights it trained with.

  The refreshed scores come from the logits the ``train_step`` hands back
  under ``"is/logits"`` (free: they are the train-mode logits of its forward
  pass) or else from ``logits_fn`` on the ``b`` trained examples (a forward
  pass of ``b``, a third of a training step). Uniform steps (a condition
  that is off) write their trained examples' scores in the same way.

  With ``refresh_every = R > 0``, the steps ``t`` with ``t mod R <
  refresh_steps`` score the whole presample with a forward pass and write all
  ``B`` scores (step 0 is one of them). StaleSB, a fresh selection pass every
  ``n`` epochs, is ``refresh_every = n · steps_per_epoch``, ``refresh_steps =
  steps_per_epoch``. The original library's ``HistorySampler`` (sample the
  whole dataset from its last losses) is a presample of every index,
  ``jis.Indexed(dataset, jnp.arange(N))``.

  Costs: the table holds ``8 N`` bytes (a float32 score and an int32 step per
  example) in the state, donated and updated in place with the state; each
  step reads ``B`` entries, writes ``b`` (or ``B`` on fresh steps), and
  fills the unscored ones from the presample's own (``O(B)``: nothing in a
  step reads the whole table). Indices must lie in ``[0, N)``.
  Inside ``jit`` they can only be checked on device: a step whose presample
  holds an index outside reports ``is/bad_index = 1``, reads NaN for it and
  falls back to uniform scores (``is/fallback = 1``); an index known at trace
  time is refused with a ValueError. With a ``mesh`` the table is replicated:
  every device reads and writes the whole presample's entries alike.

  Args:
    num_examples: ``N``, the dataset size.
    refresh_every: ``R ≥ 0``; 0 (default) never makes a presample forward
      pass, and none is traced.
    refresh_steps: ``1 ≤ refresh_steps ≤ R``, consecutive fresh steps per
      period.
    max_age: if set, scores older than ``max_age`` steps count as unscored
      (like the original ``CacheSampler``'s ``staleness``).
    index_key: the batch key holding the dataset indices, or a callable
      ``batch -> [B]``; ignored for :class:`jis.Indexed` presamples.
    lookahead: train on the previous step's draw (above). None (default):
      wherever it can, that is with a :class:`jis.Indexed` presample, a step
      that always resamples (the default condition with a table) and one
      device; each step trains on its own draw otherwise. True: always, and
      anything else is an error that says so. False: never.

  Returns:
    A :class:`ScoreTable`. The step adds ``is/fresh`` (1 when it scored its
    presample with a forward pass), ``is/score_age`` (mean age in steps of the
    table scores it sampled from) and ``is/unscored`` (fraction of the
    presample that had no valid score) and ``is/bad_index`` (1 when an index
    lay outside ``[0, N)``) to its metrics.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> table = jis.stale_scores(5)
    >>> state = table.write(table.init(), jnp.array([1, 3]), jnp.array([2.0, 4.0]), 0)
    >>> scores, scored = table.lookup(state, jnp.array([0, 1, 3]), 1)
    >>> scores, scored   # example 0 is unscored: the mean of the others
    (Array([3., 2., 4.], dtype=float32), Array([False,  True,  True], dtype=bool))
  """
  n = _check_options(num_examples, refresh_every, refresh_steps, max_age,
                     index_key, lookahead)

  def init():
    return TableState(jnp.ones((n,), jnp.float32), jnp.full((n,), -1, jnp.int32))

  def lookup(table, indices, step):
    return _lookup(table, indices, step, max_age)

  fresh = None
  if refresh_every:
    fresh = lambda step: (jnp.asarray(step) % refresh_every) < refresh_steps

  return ScoreTable(init, _index_getter(index_key), fresh, lookup, _write, n,
                    lookahead)


def _check_options(num_examples, refresh_every, refresh_steps, max_age,
                   index_key, lookahead) -> int:
  """Refuses bad :func:`stale_scores` options; returns ``N``."""
  check = lambda name, value, low: _validate.number(
      f"stale_scores({name})", value, low, integer=True)
  n = check("num_examples", num_examples, 1)
  check("refresh_every", refresh_every, 0)
  check("refresh_steps", refresh_steps, 1)
  if refresh_every and refresh_steps > refresh_every:
    raise ValueError(
        f"stale_scores(refresh_steps={refresh_steps}) must be at most "
        f"refresh_every={refresh_every}: it is the number of fresh steps in "
        "every period of refresh_every steps.")
  if max_age is not None:
    check("max_age", max_age, 0)
  if not (isinstance(index_key, str) or callable(index_key)):
    raise TypeError("stale_scores(index_key) must be a batch key or a callable "
                    f"batch -> indices; got {type(index_key).__name__}.")
  if not (lookahead is None or isinstance(lookahead, bool)):
    raise TypeError("stale_scores(lookahead) must be None (where it can), "
                    f"True or False; got {lookahead!r}.")
  return n


def _lookup(table: TableState, indices: Array, step, max_age: Optional[int]):
  """:attr:`ScoreTable.lookup`: the unscored (never, or more than
  ``max_age`` steps ago) filled with the mean of the scored, 1.0 if none."""
  # Out of range: a NaN score counted as scored, so the step falls back.
  scores = jnp.take(table.scores, indices, mode="fill", fill_value=jnp.nan)
  at = jnp.take(table.scored_at, indices, mode="fill", fill_value=_NEVER_OLD)
  scored = at >= 0
  if max_age is not None:
    scored &= (jnp.asarray(step, jnp.int32) - at) <= max_age
  count = jnp.sum(scored)
  fill = jnp.where(count > 0,
                   jnp.sum(jnp.where(scored, scores, 0.0))
                   / jnp.maximum(count, 1).astype(jnp.float32), 1.0)
  return jnp.where(scored, scores, fill), scored


def _write(table: TableState, indices: Array, scores: Array, step
           ) -> TableState:
  """:attr:`ScoreTable.write`. Of duplicated indices (sampling with
  replacement) the largest score stays, whatever the scatter order: the
  entries are cleared, then each takes the max of its new scores. No sort
  (on XLA:CPU a sort costs more than both scatters together)."""
  cleared = table.scores.at[indices].set(-jnp.inf, mode="drop")
  step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), indices.shape)
  return TableState(
      cleared.at[indices].max(jnp.asarray(scores, jnp.float32), mode="drop"),
      table.scored_at.at[indices].set(step, mode="drop"))


def check_index(table: ScoreTable, index: Array, expected: int) -> None:
  """Trace-time checks of the presample's dataset indices."""
  shape, dtype = np.shape(index), jnp.result_type(index)
  if shape != (expected,) or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(
        f"stale_scores needs one integer dataset index per presampled example, "
        f"shape ({expected},); got {dtype}{list(shape)}.")
  if table.num_examples:
    _indexed.check_in_range(index, table.num_examples,
                            "stale_scores: the presample's dataset indices")


def presample_scores(table: ScoreTable, state: TableState, batch: PyTree,
                     step: Array, score_presample: Callable[[], Array],
                     replicate: Callable[[Array], Array] = lambda x: x):
  """The presample's scores: looked up, or computed on the fresh steps.

  Returns ``(scores [B], table state, fresh, metrics)``; ``fresh`` is a bool
  array, True on the steps that scored the presample with a forward pass and
  wrote all ``B`` scores to the table. ``replicate`` gathers a presample
  split over a mesh, so that every device reads and writes the whole
  (replicated) table alike.
  """
  index = replicate(table.index(batch))
  size = state.scores.shape[0]
  bad = _indexed.out_of_range(index, size)

  def stale():
    scores, scored = table.lookup(state, index, step)
    # The mean age of the scores read from the table (an index outside it
    # counts as scored in the lookup, so that its NaN reaches the fallback).
    aged = scored & (index >= 0) & (index < size)
    age = jnp.asarray(step, jnp.int32) - jnp.take(state.scored_at, index,
                                                   mode="fill", fill_value=0)
    age = jnp.where(aged, age, 0).astype(jnp.float32)
    metrics = {
        "is/fresh": jnp.zeros((), jnp.float32),
        "is/score_age": jnp.sum(age) / jnp.maximum(jnp.sum(aged), 1),
        "is/unscored": 1.0 - jnp.mean(scored.astype(jnp.float32)),
        "is/bad_index": bad,
    }
    return scores, state, metrics

  def fresh():
    scores = score_presample()
    metrics = {**uniform_metrics(), "is/fresh": jnp.ones((), jnp.float32),
               "is/bad_index": bad}
    return scores, table.write(state, index, replicate(scores), step), metrics

  if table.fresh is None:
    scores, state, metrics = stale()
    return scores, state, jnp.asarray(False), metrics
  is_fresh = jnp.asarray(table.fresh(step))
  scores, state, metrics = jax.lax.cond(is_fresh, fresh, stale)
  return scores, state, is_fresh, metrics


def refresh(table: ScoreTable, state: TableState, index: Array, step: Array,
            fresh: Array, score_trained: Callable[[], Array]) -> TableState:
  """Writes the trained examples' scores, except on fresh steps (already written)."""
  write = lambda: table.write(state, index, score_trained(), step)
  if table.fresh is None:
    return write()
  return jax.lax.cond(fresh, lambda: state, write)


def uniform_metrics() -> dict:
  """The table metrics of a uniform step (scores computed, nothing looked up)."""
  zero = jnp.zeros((), jnp.float32)
  return {"is/fresh": zero, "is/score_age": zero, "is/unscored": zero,
          "is/bad_index": zero}


def trained_index(table: ScoreTable, batch: PyTree, rows: PyTree,
                  positions: Array) -> Array:
  """Dataset indices of the trained ``rows`` (at presample ``positions``)."""
  if isinstance(batch, _indexed.Indexed):
    return jnp.take(batch.index, positions, axis=0)
  # Read from the rows themselves: right whatever layout gathered them.
  return table.index(rows)
