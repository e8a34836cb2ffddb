"""When the training loop logs, evaluates, saves and stops.

Step cadences (``*_every_steps``, ``*_every_epochs``, ``num_steps``,
``num_epochs``) are arithmetic on the step count: every process computes the
same answer. Time cadences (``train_seconds``, ``eval_every_seconds``,
``checkpoint_every_seconds``) and preemption (SIGTERM) are not: each process
has its own clock and receives its own signals, and a process that decided
alone to evaluate, save or stop would enter (or leave) a collective that the
others never join. So the loop reads them once per dispatch through
:meth:`Clocks.agreed`: process 0's clocks, and whether any process received
SIGTERM, gathered by one small ``multihost_utils.process_allgather`` before
anything else runs; :class:`Cadence` then decides the same on every process.
With one process it is the local reading and costs nothing.

Why not the library parts that look like this: ``clu.periodic_actions``
fires on ``step % every_steps == 0`` and must be called after every step,
while a dispatch advances ``steps_per_dispatch`` steps (and clu 0.0.12 cannot
be imported without TensorFlow); orbax's ``save_interval_steps`` has the same
modulo rule. ``multihost_utils.reached_preemption_sync_point`` answers only
under ``jax.distributed`` (a one-process run needs its own handler anyway)
and needs a counter that advances by exactly one per call on every process,
which orbax's ``CheckpointManager.save`` overwrites with the step number.
"""

import math
import signal
import threading
import time
from typing import NamedTuple

from absl import logging
from jax.experimental import multihost_utils
import jax
import numpy as np

NO_STEP_BUDGET = np.iinfo(np.int32).max


def check_budgets(config) -> None:
  if not (config.num_steps > 0 or config.num_epochs > 0
          or config.train_seconds > 0):
    raise ValueError("Give a training budget: --config.num_steps, "
                     "--config.num_epochs or --config.train_seconds (> 0).")


def stop_step(config, steps_per_epoch: float) -> int:
  """The step the step and epoch budgets stop at (``NO_STEP_BUDGET``: none)."""
  stop = NO_STEP_BUDGET
  if config.num_steps > 0:
    stop = min(stop, int(config.num_steps))
  if config.num_epochs > 0:
    stop = min(stop, int(math.ceil(config.num_epochs * steps_per_epoch)))
  return stop


class TrainClock:
  """Seconds of training: runs only while training chunks run."""

  def __init__(self, start: float = 0.0):
    self.total, self._since = start, None

  def start(self) -> None:
    self._since = time.perf_counter()

  def stop(self) -> None:
    if self._since is not None:
      self.total += time.perf_counter() - self._since
      self._since = None

  def read(self) -> float:
    extra = 0.0 if self._since is None else time.perf_counter() - self._since
    return self.total + extra


class Now(NamedTuple):
  """A reading of the clocks the time cadences follow."""
  train_seconds: float   # the training clock
  since_save: float      # wall seconds since the last checkpoint (or start)
  preempted: bool        # SIGTERM received


class Clocks:
  """This process's training clock, checkpoint stopwatch and SIGTERM flag.

  As a context manager it turns SIGTERM (what schedulers send before
  preempting a job) into a flag the loop answers at the next dispatch: save
  a checkpoint and return normally (exit code 0), so that rerunning the same
  command resumes. The handler is installed only from the main thread, and
  the previous one comes back on exit.
  """

  def __init__(self, train_seconds: float = 0.0):
    self.train = TrainClock(train_seconds)
    self._saved_at = time.perf_counter()
    self._sigterm, self._previous = False, None

  def __enter__(self) -> "Clocks":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del frame
    self._sigterm = True
    logging.warning("Received signal %d: saving a checkpoint after this "
                    "dispatch, then stopping.", signum)

  def saved(self) -> None:
    """Restarts the checkpoint stopwatch."""
    self._saved_at = time.perf_counter()

  def read(self) -> Now:
    return Now(self.train.read(), time.perf_counter() - self._saved_at,
               self._sigterm)

  def agreed(self) -> Now:
    """Process 0's clocks, and whether any process received SIGTERM: the
    same reading on every process."""
    now = self.read()
    if jax.process_count() == 1:
      return now
    rows = multihost_utils.process_allgather(np.asarray(now, np.float32))
    return Now(float(rows[0, 0]), float(rows[0, 1]), bool(rows[:, 2].any()))


class Actions(NamedTuple):
  """What to do after a dispatch. ``stop``: leave the loop (the budget is
  spent or the run is preempted); the loop's end evaluates and saves."""
  log: bool = False
  evaluate: bool = False
  save: bool = False
  stop: bool = False
  preempted: bool = False


def _crossed(prev: int, step: int, every: float) -> bool:
  """Whether ``(prev, step]`` holds a multiple of ``every`` (0: never)."""
  return every > 0 and math.floor(step / every) > math.floor(prev / every)


class Cadence:
  """The decisions, from the step and an agreed :class:`Now`: the same on
  every process when given the same readings."""

  def __init__(self, config, steps_per_epoch: float, train_seconds: float):
    self.stop_step = stop_step(config, steps_per_epoch)
    self._seconds_budget = float(config.train_seconds or 0.0)
    self._log_every = config.log_every_steps
    self._eval_every = max(config.eval_every_steps,
                           config.eval_every_epochs * steps_per_epoch)
    self._ckpt_every = config.checkpoint_every_steps
    self._eval_seconds = float(config.eval_every_seconds)
    self._ckpt_seconds = (float(config.checkpoint_every_seconds)
                          if config.checkpoint_every_seconds > 0 else math.inf)
    self._next_eval = (
        self._eval_seconds * (math.floor(train_seconds / self._eval_seconds) + 1)
        if self._eval_seconds > 0 else math.inf)

  def total_steps(self):
    """The step budget, or None."""
    return None if self.stop_step == NO_STEP_BUDGET else self.stop_step

  def chunk(self, step: int, steps_per_dispatch: int) -> int:
    """The number of steps of the dispatch from ``step``: up to the next
    multiple of ``steps_per_dispatch`` or the step budget. Dispatches start
    at multiples of it (after a resumption from a step that is not, the
    first one is shorter), so a resumed run dispatches the same steps
    together as the uninterrupted one (a pruning loader draws its epochs at
    those boundaries)."""
    k = steps_per_dispatch
    return min(k - step % k, self.stop_step - step)

  def chunk_sizes(self, start_step: int, steps_per_dispatch: int) -> set:
    """The dispatch sizes a run from ``start_step`` uses, so that only those
    are compiled: a shorter first one when ``start_step`` is not a multiple
    of ``steps_per_dispatch``, then ``steps_per_dispatch`` while the step
    budget allows (always without one), then a shorter last one. A run with
    nothing left to do still gets ``{steps_per_dispatch}``."""
    k, step, stop = steps_per_dispatch, start_step, self.stop_step
    sizes = set()
    if step < stop and step % k:
      sizes.add(self.chunk(step, k))
      step += self.chunk(step, k)
    if stop == NO_STEP_BUDGET or stop - step >= k:
      sizes.add(k)
    if stop != NO_STEP_BUDGET and (stop - step) % k:
      sizes.add((stop - step) % k)
    return sizes or {k}

  def done(self, step: int, train_seconds: float) -> bool:
    """Whether a budget is spent."""
    return step >= self.stop_step or bool(
        self._seconds_budget and train_seconds >= self._seconds_budget)

  def after_dispatch(self, prev: int, step: int, now: Now) -> Actions:
    """What to do now that the steps ``(prev, step]`` have run."""
    preempted = now.preempted and step < self.stop_step
    stop = preempted or self.done(step, now.train_seconds)
    evaluate = not stop and (_crossed(prev, step, self._eval_every)
                             or now.train_seconds >= self._next_eval)
    save = not stop and (_crossed(prev, step, self._ckpt_every)
                         or now.since_save >= self._ckpt_seconds)
    log = stop or _crossed(prev, step, self._log_every)
    return Actions(log, evaluate, save, stop, preempted)

  def evaluated(self, train_seconds: float) -> None:
    """Schedules the next timed evaluation after ``train_seconds`` (an agreed
    reading of the stopped clock, which an evaluation does not advance)."""
    while self._next_eval <= train_seconds:
      self._next_eval += self._eval_seconds
