"""Runs that take turns on the machine, so that they meet the same speed.

A shared 2-core machine's speed differs by 10-25 % between two runs a few
seconds apart (and by 2x over minutes at worst), so two training runs timed
one after the other compare the machine as much as the methods.
:func:`take_turns` runs them at once instead, one at a time: each trains
for a slice of its own training clock, then hands the machine to the next
(:class:`experiments.train.Handoff`), round and round until each has spent
its budget. Over a slice of a second both meet the same
machine, and each run's clock still counts only its own training.

  >>> from experiments.benchmarks import turns
  >>> order = []
  >>> def run(name):
  ...   def body(handoff):
  ...     for i in range(2):
  ...       order.append(f"{name}{i}")
  ...       handoff.give()
  ...     return name
  ...   return body
  >>> turns.take_turns([run("a"), run("b")], seconds=1.0)
  ['a', 'b']
  >>> order
  ['a0', 'b0', 'a1', 'b1']
"""

import threading
from typing import Callable, List, Sequence, TypeVar

from experiments import train

T = TypeVar("T")


class _Baton:
  """Whose turn it is, among the runs still going."""

  def __init__(self, count: int):
    self._going = list(range(count))
    self._turn = 0           # an index into _going
    self._cv = threading.Condition()

  def _holder(self) -> int:
    return self._going[self._turn] if self._going else -1

  def wait(self, run: int) -> None:
    with self._cv:
      self._cv.wait_for(lambda: self._holder() == run)

  def give(self, run: int) -> None:
    """Hands the turn to the next run still going, then waits for it back
    (at once when ``run`` is the only one left)."""
    with self._cv:
      self._turn = (self._going.index(run) + 1) % len(self._going)
      self._cv.notify_all()
    self.wait(run)

  def leave(self, run: int) -> None:
    with self._cv:
      i = self._going.index(run)
      self._going.pop(i)
      if self._going:
        self._turn = i % len(self._going)   # the next one's turn
      self._cv.notify_all()


def take_turns(bodies: Sequence[Callable[[train.Handoff], T]],
               seconds: float) -> List[T]:
  """Runs ``bodies`` at once, one at a time, in turns; returns their results.

  Each body runs in a thread of its own and gets a
  :class:`experiments.train.Handoff` for ``train.train_and_evaluate``: it
  holds the machine from its start (setup and compilation included) until
  ``seconds`` of its training clock have passed, hands it to the next body
  still running, and so on, the first body first. A body that ends leaves
  the round. An error in a body is raised here once every body has ended.

  Args:
    bodies: ``body(handoff) -> result``, e.g. a training run.
    seconds: training seconds per turn (> 0).

  Returns:
    The bodies' results, in order.
  """
  if not seconds > 0:
    raise ValueError(f"seconds per turn must be > 0; got {seconds}.")
  baton = _Baton(len(bodies))
  results, errors = [None] * len(bodies), [None] * len(bodies)

  def go(i: int) -> None:
    baton.wait(i)
    try:
      results[i] = bodies[i](train.Handoff(seconds,
                                           lambda: baton.give(i)))
    except BaseException as e:  # pylint: disable=broad-except
      errors[i] = e
    finally:
      baton.leave(i)

  threads = [threading.Thread(target=go, args=(i,), daemon=True)
             for i in range(len(bodies))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for e in errors:
    if e is not None:
      raise e
  return results
