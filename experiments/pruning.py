"""InfoBatch in the loader: epochs that skip the pruned examples.

With ``--config.pruning.method=infobatch`` and the data on the device, each
data epoch is drawn inside the program by :func:`jis.infobatch_order` from
the table in the jis state when the epoch begins
(:class:`experiments.batches.PrunedOnDevice`). With streamed data
(``--config.data_on_device=False``), every data epoch is drawn by
:func:`jis.infobatch_epoch` from the score table the jis state carries:
examples whose latest loss is below the mean are dropped with probability
``pruning.prune`` before they are loaded, and the kept ones are given the
weight ``1 / (1 − prune)`` under ``batch["weight"]``. The step is uniform
over what the loader gives (:func:`experiments.sampling.infobatch_loader_step`:
``B = b``, no scoring pass) and keeps the table current from the losses of
the examples it trains on. The first epoch, with nothing scored yet, keeps
every example; so do the epochs that begin in the last
``pruning.anneal_fraction`` of the step budget (InfoBatch's annealing).

The table is read to the host once per epoch, at the multiple of
``steps_per_dispatch`` before the dispatch in which the epoch begins
(:class:`experiments.batches.Streamed`): a pruned epoch reflects the losses
up to ``steps_per_dispatch − 1`` steps before it starts (none with
``steps_per_dispatch=1``). A checkpoint holds, for each epoch already drawn,
which examples were below the mean (``N`` bits), from which the resumed run
draws the same order and weights again.
"""

import base64
import math
from typing import Any, Dict, List, Optional

from absl import logging
import numpy as np

import jis
from experiments import cadence
from experiments import input_pipeline
from experiments import placement as placement_lib

METHODS = ("", "infobatch")


def method(config) -> str:
  """``config.pruning.method``: ``""`` (no pruning) or ``"infobatch"``."""
  pruning = config.get("pruning")
  return (pruning.get("method") or "") if pruning is not None else ""


def check(config) -> None:
  """Refuses a pruning config that cannot run, before anything is written."""
  name = method(config)
  if name not in METHODS:
    raise ValueError(f"config.pruning.method must be one of "
                     f"{', '.join(repr(m) for m in METHODS)}; got {name!r}.")
  if not name:
    return
  prune = config.pruning.prune
  if not 0.0 <= prune < 1.0:
    raise ValueError(f"config.pruning.prune={prune} must lie in [0, 1): the "
                     "share of the below-mean examples dropped each epoch.")
  if not 0.0 <= config.pruning.anneal_fraction <= 1.0:
    raise ValueError(f"config.pruning.anneal_fraction="
                     f"{config.pruning.anneal_fraction} must lie in [0, 1].")


def anneal_step(config, steps_per_epoch: float) -> Optional[int]:
  """The step from which epochs keep every example: the last
  ``anneal_fraction`` of the step or epoch budget; None without one."""
  fraction = config.pruning.anneal_fraction
  stop = cadence.stop_step(config, steps_per_epoch)
  if not fraction:
    return None
  if stop == cadence.NO_STEP_BUDGET:
    logging.warning("config.pruning.anneal_fraction=%s needs a step or epoch "
                    "budget to place the annealing; with a time budget alone, "
                    "every epoch is pruned.", fraction)
    return None
  return int(math.ceil((1.0 - fraction) * stop))


def pack(mask: np.ndarray) -> str:
  """A bool mask as base64 text, one bit an example (for JSON metadata)."""
  return base64.b64encode(np.packbits(mask).tobytes()).decode("ascii")


def unpack(text: str, n: int) -> np.ndarray:
  """The ``n``-example bool mask that :func:`pack` wrote."""
  bits = np.frombuffer(base64.b64decode(text), np.uint8)
  return np.unpackbits(bits, count=n).astype(bool)


def below_mean(n: int, kept: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """The examples an epoch of ``n`` treated as below the mean: those it
  pruned (not in ``kept``) and those it kept with a weight other than 1
  (``weights`` of the ``kept``, in their order). InfoBatch's epoch depends on
  the table through them alone, so they are what a checkpoint keeps."""
  low = np.ones(n, bool)
  low[kept] = np.asarray(weights) != 1.0
  return low


class InfoBatchEpochs:
  """The epochs of an InfoBatch loader, for :class:`experiments.batches.Streamed`.

  ``draw`` reads the table from the jis state and calls
  :func:`jis.infobatch_epoch` with the seed ``(seed, epoch)``; ``save`` and
  ``restore`` keep what a resumed run needs to draw the same epochs.
  """

  kind = "infobatch"
  reads_table = True
  weighted = True

  def __init__(self, num_examples: int, seed: int, prune: float,
               anneal_step: Optional[int]):
    self._n, self._seed, self._prune = num_examples, seed, float(prune)
    self._anneal_step = anneal_step

  def draw(self, epoch: int, first_step: int, state) -> input_pipeline.Epoch:
    """Epoch ``epoch``, beginning at ``first_step``, from ``state.table``."""
    scores = placement_lib.fetch_replicated(state.table.scores)
    scored = placement_lib.fetch_replicated(state.table.scored_at) >= 0
    anneal = self._anneal_step is not None and first_step >= self._anneal_step
    order, weights = jis.infobatch_epoch(scores, scored, prune=self._prune,
                                         seed=(self._seed, epoch),
                                         anneal=anneal)
    return input_pipeline.Epoch(order, weights)

  def below_mean(self, epoch: input_pipeline.Epoch) -> np.ndarray:
    """The examples the epoch treated as below the mean (:func:`below_mean`)."""
    return below_mean(self._n, epoch.order, epoch.weights)

  def redraw(self, epoch: int, below_mean: np.ndarray) -> input_pipeline.Epoch:
    """Epoch ``epoch`` again, from the examples that were below the mean."""
    order, weights = jis.infobatch_epoch(np.where(below_mean, 0.0, 1.0),
                                         prune=self._prune,
                                         seed=(self._seed, epoch))
    return input_pipeline.Epoch(order, weights)

  def save(self, epochs: List[input_pipeline.Epoch]) -> Dict[str, Any]:
    return {"below_mean": [pack(self.below_mean(e)) for e in epochs]}

  def restore(self, epoch: int, saved: Dict[str, Any]
              ) -> List[input_pipeline.Epoch]:
    return [self.redraw(epoch + i, unpack(text, self._n))
            for i, text in enumerate(saved["below_mean"])]
