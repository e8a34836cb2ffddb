"""Orbax checkpoints of a run: its whole state, data position and clock.

A checkpoint holds two items: ``state``, the pytree flattened to named arrays
(:func:`to_saveable`: orbax then saves any node types, and typed PRNG keys as
their key data), and ``meta``, JSON (the step, the training seconds, the
batch sizes, and under ``"data"`` the batch source's position: for streamed
data, the Grain iterator's ``get_state()``). Every process takes part in a
save; orbax writes to a temporary directory and renames it on commit, so a
run killed mid-save leaves no step that looks complete.
"""

import logging as std_logging
import os
import re
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                      jax.dtypes.prng_key)


def _flat_names(tree) -> Tuple[list, Any]:
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = []
  for i, (path, _) in enumerate(paths_leaves):
    readable = re.sub(r"[^0-9A-Za-z]+", "_", jax.tree_util.keystr(path)).strip("_")
    names.append(f"{i:04d}_{readable}"[:120])
  return names, treedef


def to_saveable(tree) -> Dict[str, Any]:
  """A flat dict of arrays that orbax saves whatever the pytree's node types
  (typed PRNG keys become their key data)."""
  names, _ = _flat_names(tree)
  leaves = jax.tree.leaves(tree)
  return {n: (jax.random.key_data(x) if _is_key(x) else
              np.asarray(x) if isinstance(x, (np.generic, int, float)) else x)
          for n, x in zip(names, leaves)}


def from_saveable(flat: Dict[str, Any], template):
  """The inverse of :func:`to_saveable`, onto ``template``'s structure."""
  names, treedef = _flat_names(template)
  leaves = []
  for n, t in zip(names, jax.tree.leaves(template)):
    x = flat[n]
    if _is_key(t):
      x = jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
    leaves.append(x)
  return jax.tree.unflatten(treedef, leaves)


class Resumed(NamedTuple):
  """What a run resumes from: the state, the batch source's data position
  (JSON) and the training clock."""
  state: Any
  position: Dict[str, Any]
  train_seconds: float


class Checkpointer:
  """Orbax checkpoints of ``{"jis": state}`` and JSON metadata (with the data
  position) in ``directory``, the last ``keep`` kept (0: all)."""

  def __init__(self, directory: str, keep: int):
    self._mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        # A save killed half-way leaves only a temporary directory that
        # orbax never lists as a step (it renames on commit); remove it.
        options=ocp.CheckpointManagerOptions(max_to_keep=keep or None,
                                             create=True,
                                             cleanup_tmp_directories=True),
        item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self._mngr.all_steps()

  def save(self, step: int, tree, meta: Dict[str, Any]) -> None:
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(to_saveable(tree)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, template):
    """``(tree, meta)`` of checkpoint ``step``, onto ``template``'s structure
    and shardings (any number of processes and devices)."""
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(to_saveable(template)),
        meta=ocp.args.JsonRestore()))
    return from_saveable(restored["state"], template), restored["meta"]

  def save_run(self, step: int, state, position: Dict[str, Any],
               meta: Dict[str, Any]) -> None:
    """Saves the run's ``state`` and the batch source's data ``position``
    (JSON: the same on every process, written once)."""
    self.save(step, {"jis": state}, {**meta, "data": position})

  def restore_latest(self, state) -> Optional[Resumed]:
    """The latest checkpoint onto ``state``'s structure, or None."""
    step = self.latest_step()
    if step is None:
      return None
    restored, meta = self.restore(step, {"jis": state})
    return Resumed(restored["jis"], meta["data"], float(meta["train_seconds"]))

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _orbax_warnings_only(record: std_logging.LogRecord) -> bool:
  return record.levelno >= std_logging.WARNING or (
      f"{os.sep}orbax{os.sep}" not in record.pathname)


def quiet_orbax_logs() -> None:
  """Orbax logs every save step at INFO through absl; keep its warnings only."""
  absl_handler = logging.get_absl_handler().python_handler
  if _orbax_warnings_only not in absl_handler.filters:
    absl_handler.addFilter(_orbax_warnings_only)
