"""Presamples given by dataset indices, for datasets that live on device.

A step normally receives its ``B`` presampled examples as arrays. When the
whole dataset fits on the accelerator, it can instead receive the dataset and
``B`` indices, :class:`Indexed`, and gather inside the jitted program only the
rows it uses: the ``b`` trained examples, plus all ``B`` only when it runs a
forward pass over the presample. The helpers below treat both forms alike.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


class Indexed(NamedTuple):
  """A presample given as indices into a dataset that lives on device.

  Pass it to ``step`` in place of the presample batch. ``data`` is an
  argument of the jitted step (not a constant closed over), so it is neither
  copied nor recompiled for; do not donate it.

  Attributes:
    data: the dataset, a pytree whose leaves all have leading dimension ``N``.
    index: ``[B]`` integer indices into ``data``; the presample (or the
      ``b`` rows of a uniform step, with ``uniform_batches=True``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> data = {"x": jnp.arange(10.0)[:, None], "label": jnp.arange(10) % 2}
    >>> batch = jis.Indexed(data, jnp.array([7, 2, 5]))
    >>> jis.presample_rows(batch)["x"][:, 0]
    Array([7., 2., 5.], dtype=float32)
  """
  data: PyTree
  index: Array


def presample_size(batch: PyTree) -> int:
  """``B``, the number of presampled examples (static)."""
  if isinstance(batch, Indexed):
    return int(np.shape(batch.index)[0])
  return int(np.shape(jax.tree.leaves(batch)[0])[0])


def head(batch: PyTree, n: int) -> PyTree:
  """The first ``n`` presampled examples, in the same form as ``batch``."""
  if n == presample_size(batch):
    return batch
  if isinstance(batch, Indexed):
    return Indexed(batch.data, batch.index[:n])
  return jax.tree.map(lambda x: x[:n], batch)


def take(batch: PyTree, positions: Array) -> PyTree:
  """The examples at ``positions`` of the presample, as arrays.

  ``positions`` are valid by construction (a policy's draw, or ``arange``), so
  their gather clips instead of masking out-of-range rows.
  """
  at = lambda x, i: jnp.take(x, i, axis=0, mode="clip")
  if isinstance(batch, Indexed):
    return dataset_rows(batch, at(batch.index, positions))
  return jax.tree.map(lambda x: at(x, positions), batch)


def dataset_rows(batch: Indexed, index: Array) -> PyTree:
  """The dataset's rows at ``index`` (dataset indices, not positions)."""
  return jax.tree.map(lambda x: jnp.take(x, index, axis=0), batch.data)


def presample_rows(batch: PyTree) -> PyTree:
  """All presampled examples as arrays (a gather of ``B`` rows for Indexed)."""
  if isinstance(batch, Indexed):
    return dataset_rows(batch, batch.index)
  return batch


def check_indexed(batch: Indexed, expected: int) -> None:
  """Trace-time checks of an :class:`Indexed` batch of ``expected`` rows (a
  presample's ``B``, or the ``b`` of a uniform step with
  ``uniform_batches=True``).

  An index that is known at trace time (not traced) is also checked to lie in
  ``[0, N)``; a traced one can only be checked on device (``is/bad_index``).
  """
  shape = np.shape(batch.index)
  dtype = jnp.result_type(batch.index)
  if shape != (expected,) or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(
        f"Indexed(data, index): index must be an integer array of shape "
        f"({expected},), the dataset indices of the step's rows (the B = "
        f"round(presample * batch_size) of a presample, or the b of a uniform "
        f"step with uniform_batches=True); got {dtype}{list(shape)}.")
  leaves = jax.tree_util.tree_flatten_with_path(batch.data)[0]
  if not leaves:
    raise ValueError("Indexed(data, index): data has no arrays.")
  sizes = {np.shape(leaf)[:1] for _, leaf in leaves}
  if len(sizes) != 1 or () in sizes:
    shapes = {jax.tree_util.keystr(p): np.shape(leaf) for p, leaf in leaves}
    raise ValueError(
        "Indexed(data, index): every data leaf must have the same leading "
        f"dimension, the dataset size N; got {shapes}.")
  check_in_range(batch.index, sizes.pop()[0], "Indexed(data, index): index")


def check_in_range(index, size: int, what: str) -> None:
  """Refuses indices outside ``[0, size)`` when they are known at trace time
  (a traced index is checked on device instead: ``is/bad_index``)."""
  if isinstance(index, jax.core.Tracer):
    return
  values = np.asarray(index)
  if values.size and (values.min() < 0 or values.max() >= size):
    raise ValueError(
        f"{what} must lie in [0, {size}), the dataset's rows; got indices "
        f"from {values.min()} to {values.max()}.")


def out_of_range(index: Array, size: int) -> Array:
  """1.0 when any of ``index`` lies outside ``[0, size)`` (a metric)."""
  return jnp.any((index < 0) | (index >= size)).astype(jnp.float32)
