"""Rolling presamples: the step keeps the last ``B`` rows it was given.

With ``importance_step(..., rolling=True)`` the loader stays the uniform
loader: each call of ``step`` gets the ``b`` rows a plain training step would
get. jis writes them into a pool of the last ``B`` rows, kept in the state
(``state.pool``), and hands the rest of the step the pool as a presample whose
first ``b`` rows are the ones just given. A uniform step trains on exactly
those rows, so a run whose importance sampling never switches on loads,
transfers and trains on what uniform training does; an importance step
scores and draws from all ``B``.

The pool is a uniform sample of the data like a fresh presample (the union of
the last ``B/b`` uniform batches), so a draw from it is unbiased for the
pool's mean gradient as before. Each row stays ``B/b`` steps in the pool, and
may be drawn on each of them: with the unbiased policy its expected share of
a step's mean loss is ``1/B``, ``1/b`` over its ``B/b`` steps, what a uniform
step gives each of its rows.

The pool holds the rows themselves, or, for a :class:`jis.Indexed` batch,
only their ``B`` dataset indices.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jis import _indexed

Array = jax.Array
PyTree = Any


def _leading(what: str, tree: PyTree, n: int) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = np.shape(leaf)
    if len(shape) == 0 or shape[0] != n:
      raise ValueError(
          f"With rolling=True, {what} must have the b = batch_size = {n} rows of a "
          f"uniform step; {what}{jax.tree_util.keystr(path)} has shape "
          f"{shape}. Feed the batches you feed uniform training (jis keeps "
          "the last B rows), or pass rolling=False and presamples of B rows.")


def init(example: PyTree, batch_size: int, presample_size: int) -> PyTree:
  """An empty pool of ``presample_size`` rows shaped like ``example``, a
  batch of ``batch_size`` rows (arrays or their ``jax.ShapeDtypeStruct``, or
  a :class:`jis.Indexed`): zeros, or zero dataset indices."""
  if example is None:
    raise ValueError(
        "With rolling=True, init needs an example batch to shape the pool of "
        "the last B rows: sampler.init(train_state, key, batch), or "
        "jis.nnx.ImportanceSampler(..., batch=batch), with one uniform batch "
        f"of b = {batch_size} rows (or its jax.ShapeDtypeStruct's).")
  if isinstance(example, _indexed.Indexed):
    _leading("init's batch.index", example.index, batch_size)
    return jnp.zeros((presample_size,), jnp.result_type(example.index))
  if not jax.tree.leaves(example):
    raise ValueError("init(train_state, key, batch) got a batch with no arrays.")
  _leading("init's batch", example, batch_size)
  return jax.tree.map(
      lambda x: jnp.zeros((presample_size,) + tuple(np.shape(x)[1:]),
                          jnp.result_type(x)), example)


def check(batch: PyTree, pool: PyTree, batch_size: int) -> None:
  """Trace-time checks of a rolling step's batch against its pool."""
  if isinstance(pool, tuple) and pool == ():
    raise ValueError(
        "This state has no pool (rolling=True keeps the last B rows in "
        "state.pool): make it with this sampler's init(train_state, key, "
        "batch).")
  indexed = isinstance(batch, _indexed.Indexed)
  if indexed != isinstance(pool, jax.Array) or (
      not indexed and jax.tree.structure(batch) != jax.tree.structure(pool)):
    raise ValueError(
        "With rolling=True, every batch must be like init's example batch "
        "(the same keys, or jis.Indexed for both); got "
        f"{jax.tree.structure(batch)} against the pool's "
        f"{jax.tree.structure(pool)}.")
  if indexed:
    _leading("batch.index", batch.index, batch_size)
    return
  _leading("batch", batch, batch_size)
  for (path, x), p in zip(
      jax.tree_util.tree_flatten_with_path(batch)[0], jax.tree.leaves(pool)):
    if np.shape(x)[1:] != np.shape(p)[1:] or jnp.result_type(x) != p.dtype:
      raise ValueError(
          f"With rolling=True, batch{jax.tree_util.keystr(path)} must have "
          f"init's example's row shape and dtype, {p.dtype}"
          f"{list(np.shape(p)[1:])}; got {jnp.result_type(x)}"
          f"{list(np.shape(x)[1:])}.")


def push(pool: PyTree, batch: PyTree, step: Array, batch_size: int,
         presample_size: int):
  """``(pool, presample)``: ``batch``'s rows written over the oldest in the
  pool, and the pool as a :class:`jis.Indexed` presample whose first
  ``batch_size`` rows are ``batch``'s.

  The pool is a ring of ``B / b`` slots; step ``t`` writes slot ``t mod
  (B / b)`` in place (``dynamic_update_slice``, ``b`` rows).
  """
  start = (step % (presample_size // batch_size)) * batch_size
  write = lambda p, x: jax.lax.dynamic_update_slice_in_dim(
      p, jnp.asarray(x, p.dtype), start, 0)
  order = (start + jnp.arange(presample_size, dtype=jnp.int32)) % presample_size
  if isinstance(batch, _indexed.Indexed):
    pool = write(pool, batch.index)
    return pool, _indexed.Indexed(batch.data, pool[order])
  pool = jax.tree.map(write, pool, batch)
  return pool, _indexed.Indexed(pool, order)


def filled(step: Array, batch_size: int, presample_size: int) -> Array:
  """Whether the pool holds ``B`` given rows at step ``step`` (after its
  write): from step ``B/b − 1`` on. Importance sampling waits for it."""
  return step >= presample_size // batch_size - 1
