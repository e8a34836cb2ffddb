"""Where each step's presample comes from: the split on the devices, or a
stream from host memory.

The two sources draw their epochs differently (on the device, data epoch
``e`` is :func:`input_pipeline.epoch_permutation` of ``(key, e)``, inside the
program; streamed, an epoch is a numpy permutation of ``(seed, e)``, or what a
pruning loader keeps), so they visit the examples in different orders; each
is a pure function of the seed, and batches never straddle epochs. The
training loop sees one interface:

- ``carry()``: what the jitted chunk carries from step to step (the on-device
  position);
- ``next_input(step, n, state)``: the argument of the program for the ``n``
  steps from ``step`` (``state``, the jis state before them, is read only by
  a loader whose epochs depend on it), and ``probe(n)`` its shape, to compile
  the program before the clock starts;
- ``take(carry, fed, i, state)``, inside ``jit``: the ``i``-th presample of
  the chunk (with its dataset ``index``, for ``jis.stale_scores``) and the
  new carry (``state``, the jis state before the step, is read only by an
  on-device source whose epochs depend on it);
- ``position(carry)``: the data position to checkpoint, JSON (the source
  starts from it when a run resumes);
- ``device_split``: the training split on the devices, or None.
"""

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

import jis
from experiments import input_pipeline
from experiments import placement as placement_lib
from experiments import pruning


class Position(struct.PyTreeNode):
  """The next presample starts at ``offset`` of data epoch ``epoch``, whose
  order is ``perm`` (recomputed from the epoch, never checkpointed)."""
  epoch: jax.Array
  offset: jax.Array
  perm: jax.Array


class Split(NamedTuple):
  """What an on-device chunk reads: the split, the key of its order, and the
  split preprocessed once (``prepared``; None when a step preprocesses its
  own rows)."""
  data: Any
  key: jax.Array
  prepared: Any = None


class OnDevice:
  """The training split put on the devices once; each step gathers its
  presample inside the jitted program, so the hot loop copies nothing from
  the host.

  With ``prepare`` (a deterministic preprocessing of the whole split, run
  once here), a step's presample is a ``jis.Indexed`` into the prepared
  split: jis then gathers only the rows it uses (the ``b`` trained on a
  uniform step), and ``stale_scores``' lookahead (on by default with
  ``jis.Indexed``) can read the rows the previous step drew.
  """

  kind = "device"

  def __init__(self, split, key: jax.Array, size: int,
               placement: placement_lib.Placement,
               position: Optional[Dict[str, Any]],
               prepare: Optional[Callable[[Any], Any]] = None):
    epoch, offset = 0, 0
    if position:
      _check_kind(position, self.kind)
      epoch, offset = int(position["epoch"]), int(position["offset"])
    self._n, self._size = len(split["label"]), size
    data = jax.device_put(split, placement.replicated)
    self._split = Split(data, key, None if prepare is None else prepare(data))
    self._start = jax.device_put(
        self._first(jnp.asarray(epoch, jnp.int32),
                    jnp.asarray(offset, jnp.int32), position),
        placement.replicated)

  def _first(self, epoch: jax.Array, offset: jax.Array,
             position: Optional[Dict[str, Any]]) -> Position:
    """The carry at ``(epoch, offset)``, where the run starts."""
    del position
    perm = jax.jit(input_pipeline.epoch_permutation, static_argnums=2)(
        self._split.key, epoch, self._n).astype(jnp.int32)
    return Position(epoch=epoch, offset=offset, perm=perm)

  @property
  def device_split(self):
    return self._split.data

  def carry(self) -> Position:
    return self._start

  def next_input(self, step: int, n: int, state) -> Split:
    del step, n, state
    return self._split

  def probe(self, n: int) -> Split:
    del n
    return self._split

  def take(self, carry: Position, fed: Split, i, state=None
           ) -> Tuple[dict, Position]:
    del i, state
    epoch, start = input_pipeline.advance(carry.epoch, carry.offset, self._n,
                                          self._size)
    perm = jax.lax.cond(
        epoch != carry.epoch,
        lambda: input_pipeline.epoch_permutation(fed.key, epoch,
                                                 self._n).astype(jnp.int32),
        lambda: carry.perm)
    idx = jax.lax.dynamic_slice_in_dim(perm, start, self._size)
    position = Position(epoch=epoch, offset=start + self._size, perm=perm)
    return self._presample(fed, idx), position

  def _presample(self, fed: Split, idx: jax.Array, **per_example):
    """The presample at dataset indices ``idx``: a ``jis.Indexed`` into the
    prepared split, else its rows with their ``index``. ``per_example``:
    ``[N]`` arrays given with the rows, by dataset index."""
    if fed.prepared is not None:
      return jis.Indexed({**fed.prepared, **per_example}, idx)
    batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), fed.data)
    return {**batch, "index": idx,
            **{k: jnp.take(v, idx, axis=0) for k, v in per_example.items()}}

  def consumed(self, carry: Position, rows) -> Position:
    """Moves the position back to just after the ``rows`` the step used
    (``is/rows_used``: ``b`` on a uniform step), so that the rows a uniform
    step did not train on open the next presample: every example is then
    visited once per data epoch, as uniform training visits it."""
    return carry.replace(offset=carry.offset - self._size
                         + jnp.asarray(rows, jnp.int32))

  def position(self, carry: Position) -> Dict[str, Any]:
    return {"source": self.kind,
            "epoch": int(placement_lib.fetch_replicated(carry.epoch)),
            "offset": int(placement_lib.fetch_replicated(carry.offset))}

  def close(self) -> None:
    pass


class PrunedPosition(struct.PyTreeNode):
  """The next presample starts at ``offset`` of data epoch ``epoch``, whose
  order is ``perm``, the ``size`` kept examples first, each example weighing
  ``weights[index]``. Drawn from the score table when the epoch began, so
  checkpointed: as the examples then below the mean (``N`` bits)."""
  epoch: jax.Array
  offset: jax.Array
  perm: jax.Array
  weights: jax.Array
  size: jax.Array


class PrunedOnDevice(OnDevice):
  """InfoBatch epochs on the device: :class:`OnDevice`, each data epoch drawn
  inside the program by :func:`jis.infobatch_order` from the score table in
  the jis state when the epoch begins (the first epoch, with nothing scored,
  and those beginning at or after ``anneal_step`` keep every example). A
  step trains on the next ``size`` rows of the kept examples, with their
  weights under ``batch["weight"]``, so it costs what a uniform step costs;
  the step (:func:`experiments.sampling.infobatch_loader_step`) keeps the
  table current from the losses of the examples it trains on.
  """

  kind = "device:infobatch"

  def __init__(self, split, key: jax.Array, size: int,
               placement: placement_lib.Placement,
               position: Optional[Dict[str, Any]],
               prepare: Optional[Callable[[Any], Any]] = None, *,
               prune: float, anneal_step: Optional[int]):
    n = len(split["label"])
    if (1.0 - prune) * n < 2 * size:
      raise ValueError(
          f"config.pruning.prune={prune} could leave an epoch of the "
          f"{n} training examples with fewer than one presample "
          f"({size}) kept: lower pruning.prune or batch_size (the kept "
          "share is at least 1 − prune of the examples, in expectation).")
    self._prune, self._anneal_step = float(prune), anneal_step
    super().__init__(split, key, size, placement, position, prepare)

  def _first(self, epoch, offset, position) -> PrunedPosition:
    """The epoch being read when the run starts, drawn again from its
    below-mean bits (none at the start: every example kept)."""
    below_mean = (pruning.unpack(position["below_mean"], self._n)
                  if position else np.zeros(self._n, bool))
    perm, weights, kept = jax.jit(self._redraw)(epoch, below_mean)
    return PrunedPosition(epoch=epoch, offset=offset, perm=perm,
                          weights=weights, size=kept)

  def _draw(self, epoch, scores, scored, anneal=False):
    return jis.infobatch_order(jax.random.fold_in(self._split.key, epoch),
                               scores, scored, prune=self._prune,
                               anneal=anneal)

  def _redraw(self, epoch, below_mean):
    """Epoch ``epoch`` again, from the examples that were below the mean."""
    return self._draw(epoch, jnp.where(below_mean, 0.0, 1.0), None)

  def take(self, carry: PrunedPosition, fed: Split, i, state=None
           ) -> Tuple[Any, PrunedPosition]:
    del i
    epoch, start = input_pipeline.advance(carry.epoch, carry.offset,
                                          carry.size, self._size)
    anneal = (False if self._anneal_step is None
              else state.step >= self._anneal_step)
    perm, weights, kept = jax.lax.cond(
        epoch != carry.epoch,
        lambda: self._draw(epoch, state.table.scores,
                           state.table.scored_at >= 0, anneal),
        lambda: (carry.perm, carry.weights, carry.size))
    idx = jax.lax.dynamic_slice_in_dim(perm, start, self._size)
    position = PrunedPosition(epoch=epoch, offset=start + self._size,
                              perm=perm, weights=weights, size=kept)
    return self._presample(fed, idx, weight=weights), position

  def position(self, carry: PrunedPosition) -> Dict[str, Any]:
    perm, weights, kept = (np.asarray(placement_lib.fetch_replicated(x))
                           for x in (carry.perm, carry.weights, carry.size))
    kept = perm[:kept]
    return {**super().position(carry), "below_mean": pruning.pack(
        pruning.below_mean(self._n, kept, weights[kept]))}


class Shuffled:
  """Uniform epochs: every example once, in an order drawn from ``(seed,
  epoch)`` (:func:`input_pipeline.shuffled_epoch`)."""

  kind = "shuffled"
  reads_table = False   # the order needs nothing from the training state
  weighted = False

  def __init__(self, num_examples: int, seed: int):
    self._n, self._seed = num_examples, seed

  def draw(self, epoch: int, first_step: int, state) -> input_pipeline.Epoch:
    del first_step, state
    return input_pipeline.shuffled_epoch(self._n, self._seed, epoch)

  def save(self, epochs) -> Dict[str, Any]:
    del epochs
    return {}

  def restore(self, epoch: int, saved: Dict[str, Any]) -> list:
    del saved
    return [self.draw(epoch, 0, None)]


class Streamed:
  """Presamples streamed from host memory by Grain, one epoch at a time.

  ``epochs`` draws each data epoch (an :class:`input_pipeline.Epoch`: the
  order, and weights when a loader prunes): :class:`Shuffled` or
  :class:`experiments.pruning.InfoBatchEpochs`, each with ``draw(epoch,
  first_step, state)``, ``save(epochs)`` (JSON) and ``restore(epoch,
  saved)``, and ``kind``, ``reads_table`` and ``weighted``;
  :func:`input_pipeline.presamples`
  makes it a ``grain.MapDataset`` of this process's rows of each presample,
  which a Grain iterator reads ahead in a background thread. A chunk of
  ``n`` steps takes the next ``n`` presamples; the position to checkpoint is
  the epoch and the Grain iterator's state (``get_state()``) after them,
  plus what ``epochs`` needs to draw the epochs already drawn again.

  Every process walks the same epochs (the same seed, and the same table for
  a pruning loader) and loads only its own devices' block of rows of each
  presample, so the global batch, and the checkpoint, do not depend on the
  number of processes. (Grain's per-process sharding, ``ShardByJaxProcess``,
  splits the examples instead: each process would draw its own ``B/P`` rows,
  so the run would depend on the process count and a checkpoint would not
  resume on another.)

  An epoch whose order needs the training state (``epochs.reads_table``) is
  drawn at the chunk boundary at a multiple of ``steps_per_dispatch`` (the
  loop dispatches from those) before the dispatch in which it begins, from
  the state there; a checkpoint holds every epoch already drawn, so a run
  resumed anywhere draws the same epochs at the same steps.
  """

  _READ_THREADS = 1    # loading is a numpy gather from host memory

  def __init__(self, split, epochs, size: int, chunk_steps: int,
               placement: placement_lib.Placement,
               position: Optional[Dict[str, Any]]):
    self._epochs, self._size, self._k = epochs, size, chunk_steps
    self._placement = placement
    self._rows = placement.process_rows(size)
    self._read = input_pipeline.ReadRows(split)
    self._shapes = {k: (size,) + v.shape[1:] for k, v in split.items()}
    self._dtypes = {k: v.dtype for k, v in split.items()}
    self._shapes["index"], self._dtypes["index"] = (size,), np.dtype(np.int32)
    if epochs.weighted:
      self._shapes["weight"], self._dtypes["weight"] = (size,), np.dtype(
          np.float32)
    self._kind = f"grain:{epochs.kind}"
    # The epoch being read (its index, Epoch and Grain iterator), then the
    # epochs drawn ahead of it.
    self._index, self._epoch, self._iterator, self._ahead = 0, None, None, []
    if position:
      _check_kind(position, self._kind)
    if position and position["iterator"] is not None:
      self._index = int(position["epoch"])
      drawn = epochs.restore(self._index, position)
      self._open(drawn[0], position["iterator"])
      self._ahead = drawn[1:]

  device_split = None

  def _open(self, epoch: input_pipeline.Epoch, state=None) -> None:
    import grain  # pylint: disable=g-import-not-at-top
    if epoch.steps(self._size) == 0:
      raise ValueError(
          f"Data epoch {self._index} holds {len(epoch.order)} examples, "
          f"fewer than one presample ({self._size}).")
    self._epoch = epoch
    self._iterator = iter(input_pipeline.presamples(
        epoch, self._size, self._rows, self._read).to_iter_dataset(
            grain.ReadOptions(num_threads=self._READ_THREADS,
                              prefetch_buffer_size=2 * self._k)))
    if state is not None:
      self._iterator.set_state(state)

  def _steps_left(self) -> int:
    if self._iterator is None:
      return 0
    return (self._epoch.steps(self._size)
            - self._iterator.get_state()["next_index"])

  def _draw_ahead(self, step: int, state) -> None:
    """Draws every epoch that begins before the next multiple of
    ``steps_per_dispatch``, from ``state`` (the state at ``step``)."""
    begins = step + self._steps_left() + sum(
        e.steps(self._size) for e in self._ahead)
    while begins < step + self._k:
      index = self._index + len(self._ahead) + (self._epoch is not None)
      epoch = self._epochs.draw(index, begins, state)
      self._ahead.append(epoch)
      begins += max(1, epoch.steps(self._size))   # an empty epoch fails later

  def _next(self, step: int, state) -> Dict[str, np.ndarray]:
    while True:
      if self._iterator is not None:
        try:
          return next(self._iterator)
        except StopIteration:
          self._iterator.close()
          self._index += 1
      # Drawn ahead when it reads the table; else now (a run resumed with
      # another steps_per_dispatch draws here, from the chunk's first state).
      epoch = (self._ahead.pop(0) if self._ahead
               else self._epochs.draw(self._index, step, state))
      self._open(epoch)

  def carry(self) -> tuple:
    return ()

  def next_input(self, step: int, n: int, state):
    if self._epochs.reads_table and step % self._k == 0:
      self._draw_ahead(step, state)
    rows = [self._next(step + i, state) for i in range(n)]
    local = {k: np.stack([r[k] for r in rows]) for k in self._shapes}
    return self._placement.global_chunk(local, self._size)

  def probe(self, n: int):
    sharding = self._placement.chunk_sharding(self._size)
    return {k: jax.ShapeDtypeStruct((n,) + shape, self._dtypes[k],
                                    sharding=sharding)
            for k, shape in self._shapes.items()}

  def take(self, carry: tuple, fed, i, state=None) -> Tuple[dict, tuple]:
    del state
    return jax.tree.map(lambda x: x[i], fed), carry

  def consumed(self, carry: tuple, rows) -> tuple:
    """Streamed presamples are loaded whole: the rows a step did not use are
    not given back (the loader-side pruning, ``config.pruning``, skips rows
    before they are loaded)."""
    del rows
    return carry

  def position(self, carry: tuple) -> Dict[str, Any]:
    del carry
    if self._iterator is None:   # nothing read yet
      return {"source": self._kind, "epoch": 0, "iterator": None}
    return {"source": self._kind, "epoch": self._index,
            "iterator": self._iterator.get_state(),
            **self._epochs.save([self._epoch] + self._ahead)}

  def close(self) -> None:
    if self._iterator is not None:
      self._iterator.close()


def _check_kind(position: Dict[str, Any], kind: str) -> None:
  written = position.get("source")
  if written != kind:
    raise ValueError(
        f"The checkpoint's data position was written by a {written!r} batch "
        f"source, and this run's is {kind!r}: the two read the examples in "
        "different orders. Resume with the same --config.data_on_device and "
        "--config.pruning as the run that wrote it, or start a new workdir.")


def create(config, split, key: jax.Array, size: int,
           placement: placement_lib.Placement,
           position: Optional[Dict[str, Any]], steps_per_epoch: float,
           prepare: Optional[Callable[[Any], Any]] = None):
  """The source ``config.data_on_device`` asks for, from a checkpoint's data
  ``position`` (None: the start). Streamed epochs are :class:`Shuffled`, or
  pruned by the loader (``config.pruning``, :mod:`experiments.pruning`), from
  a seed drawn from ``key``; ``steps_per_epoch`` places the annealing.
  ``prepare``: the split's preprocessing, when it can run once (on one
  device, without augmentation); on-device presamples are then
  ``jis.Indexed`` into its result."""
  if config.data_on_device and pruning.method(config) == "infobatch":
    return PrunedOnDevice(
        split, key, size, placement, position,
        prepare if placement.mesh is None else None,
        prune=config.pruning.prune,
        anneal_step=pruning.anneal_step(config, steps_per_epoch))
  if config.data_on_device:
    return OnDevice(split, key, size, placement, position,
                    prepare if placement.mesh is None else None)
  n = len(split["label"])
  seed = int(jax.device_get(jax.random.bits(key, dtype=jnp.uint32)))
  if pruning.method(config) == "infobatch":
    epochs = pruning.InfoBatchEpochs(
        n, seed, config.pruning.prune,
        pruning.anneal_step(config, steps_per_epoch))
  else:
    epochs = Shuffled(n, seed)
  return Streamed(split, epochs, size, max(1, int(config.steps_per_dispatch)),
                  placement, position)
