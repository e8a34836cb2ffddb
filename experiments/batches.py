"""Where each step's presample comes from: the split on the devices, or a
stream from host memory.

Both sources visit the examples in the same order (data epoch ``e`` is
:func:`input_pipeline.epoch_permutation` of ``(key, e)``; batches never
straddle epochs), so a streamed run equals an on-device run. The training
loop sees one interface:

- ``carry()``: what the jitted chunk carries from step to step (the on-device
  position);
- ``next_input()``: the argument of the next chunk's program, and
  ``probe()`` its shape, to compile the program before the clock starts;
- ``take(carry, fed, i)``, inside ``jit``: the ``i``-th presample of the chunk
  (with its dataset ``index``, for ``jis.stale_scores``) and the new carry;
- ``consumed(n)``: the chunk's first ``n`` presamples were trained on;
- ``position(carry)``: the ``(epoch, offset)`` to checkpoint;
- ``device_split``: the training split on the devices, or None.
"""

from typing import Any, NamedTuple, Tuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from experiments import input_pipeline
from experiments import placement as placement_lib


class Position(struct.PyTreeNode):
  """The next presample starts at ``offset`` of data epoch ``epoch``, whose
  order is ``perm`` (recomputed from the epoch, never checkpointed)."""
  epoch: jax.Array
  offset: jax.Array
  perm: jax.Array


class Split(NamedTuple):
  """What an on-device chunk reads: the split and the key of its order."""
  data: Any
  key: jax.Array


class OnDevice:
  """The training split put on the devices once; each step gathers its
  presample inside the jitted program, so the hot loop copies nothing from
  the host."""

  def __init__(self, split, key: jax.Array, size: int,
               placement: placement_lib.Placement, epoch: int, offset: int):
    self._n, self._size = len(split["label"]), size
    self._split = Split(jax.device_put(split, placement.replicated), key)
    perm = jax.jit(input_pipeline.epoch_permutation, static_argnums=2)(
        key, epoch, self._n).astype(jnp.int32)
    self._start = jax.device_put(
        Position(epoch=jnp.asarray(epoch, jnp.int32),
                 offset=jnp.asarray(offset, jnp.int32), perm=perm),
        placement.replicated)

  @property
  def device_split(self):
    return self._split.data

  def carry(self) -> Position:
    return self._start

  def next_input(self) -> Split:
    return self._split

  def probe(self) -> Split:
    return self._split

  def take(self, carry: Position, fed: Split, i) -> Tuple[dict, Position]:
    del i
    epoch, start = input_pipeline.advance(carry.epoch, carry.offset, self._n,
                                          self._size)
    perm = jax.lax.cond(
        epoch != carry.epoch,
        lambda: input_pipeline.epoch_permutation(fed.key, epoch,
                                                 self._n).astype(jnp.int32),
        lambda: carry.perm)
    idx = jax.lax.dynamic_slice_in_dim(perm, start, self._size)
    batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), fed.data)
    batch["index"] = idx
    return batch, Position(epoch=epoch, offset=start + self._size, perm=perm)

  def consumed(self, n: int) -> None:
    del n

  def position(self, carry: Position) -> Tuple[jax.Array, jax.Array]:
    return carry.epoch, carry.offset

  def close(self) -> None:
    pass


class Streamed:
  """Chunks of ``k`` presamples from host memory, prefetched by a thread
  (:class:`input_pipeline.HostStream`); each process loads only its own
  devices' rows of every presample."""

  def __init__(self, split, key: jax.Array, size: int, chunk_steps: int,
               placement: placement_lib.Placement, epoch: int, offset: int):
    self._size, self._placement = size, placement
    self._shapes = {k: ((chunk_steps, size) + v.shape[1:], v.dtype)
                    for k, v in split.items()}
    self._shapes["index"] = ((chunk_steps, size), np.dtype(np.int32))
    self._stream = input_pipeline.HostStream(
        split, key, size, chunk_steps, epoch=epoch, offset=offset,
        rows=placement.process_rows(size))
    self._position, self._next_positions = (epoch, offset), None

  device_split = None

  def carry(self) -> tuple:
    return ()

  def next_input(self):
    local, self._next_positions = self._stream.next()
    return self._placement.global_chunk(local, self._size)

  def probe(self):
    sharding = self._placement.chunk_sharding(self._size)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in self._shapes.items()}

  def take(self, carry: tuple, fed, i) -> Tuple[dict, tuple]:
    return jax.tree.map(lambda x: x[i], fed), carry

  def consumed(self, n: int) -> None:
    self._position = self._next_positions[n - 1]

  def position(self, carry: tuple) -> Tuple[np.int32, np.int32]:
    del carry
    return np.int32(self._position[0]), np.int32(self._position[1])

  def close(self) -> None:
    self._stream.close()


def create(config, split, key: jax.Array, size: int,
           placement: placement_lib.Placement, position: Tuple[int, int]):
  """The source ``config.data_on_device`` asks for, from data position
  ``(epoch, offset)``."""
  if config.data_on_device:
    return OnDevice(split, key, size, placement, *position)
  return Streamed(split, key, size, max(1, int(config.steps_per_dispatch)),
                  placement, *position)
