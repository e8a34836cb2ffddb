"""When the loop logs, evaluates, saves and stops (experiments/cadence.py).

The decisions are a pure function of the step and an agreed clock reading,
so every process that gets the same reading decides the same; the two-process
runs in test_experiments_multihost.py check the agreement end to end.
"""

import os
import signal

import ml_collections
import pytest

from experiments import cadence


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(
      num_steps=0, num_epochs=0.0, train_seconds=0.0, log_every_steps=0,
      eval_every_steps=0, eval_every_epochs=0.0, eval_every_seconds=0.0,
      checkpoint_every_steps=0, checkpoint_every_seconds=0.0))
  c.update(overrides)
  return c


def _now(train_seconds=0.0, since_save=0.0, preempted=False):
  return cadence.Now(train_seconds, since_save, preempted)


def test_step_cadences_fire_when_a_dispatch_crosses_a_multiple():
  # Chunks of 4 steps never land on 10 or 25: the dispatch that crosses one
  # logs, evaluates or saves.
  schedule = cadence.Cadence(_config(num_steps=40, log_every_steps=10,
                                     eval_every_steps=25,
                                     checkpoint_every_steps=12), 20.0, 0.0)
  fired = {"log": [], "evaluate": [], "save": []}
  for step in range(4, 40, 4):
    actions = schedule.after_dispatch(step - 4, step, _now())
    for name in fired:
      if getattr(actions, name):
        fired[name].append(step)
  assert fired == {"log": [12, 20, 32], "evaluate": [28], "save": [12, 24, 36]}
  # The budget's last dispatch stops and logs; the loop's end evaluates and
  # saves, so the cadences do not.
  assert schedule.after_dispatch(36, 40, _now()) == cadence.Actions(
      log=True, stop=True)


def test_epoch_budget_and_chunk_sizes():
  schedule = cadence.Cadence(_config(num_epochs=0.5), 20.0, 0.0)
  assert schedule.stop_step == 10 and schedule.total_steps() == 10
  assert schedule.chunk_sizes(0, 4) == {4, 2}
  assert schedule.chunk_sizes(10, 4) == {4}
  # Resumed at step 3: a dispatch to step 4, then from multiples of 4.
  assert schedule.chunk_sizes(3, 4) == {1, 4, 2}
  assert [schedule.chunk(s, 4) for s in (3, 4, 8)] == [1, 4, 2]
  unbounded = cadence.Cadence(_config(train_seconds=5.0), 20.0, 0.0)
  assert unbounded.total_steps() is None
  assert unbounded.chunk_sizes(3, 4) == {1, 4}
  assert unbounded.chunk_sizes(8, 4) == {4}
  # Only the sizes a run dispatches are compiled: a budget shorter than
  # steps_per_dispatch needs no full-size dispatch.
  assert schedule.chunk_sizes(0, 16) == {10}
  assert schedule.chunk_sizes(8, 4) == {2}
  assert schedule.chunk_sizes(7, 4) == {1, 2}
  assert schedule.chunk_sizes(0, 5) == {5}


def test_time_cadences_follow_the_agreed_reading():
  schedule = cadence.Cadence(_config(train_seconds=10.0, eval_every_seconds=2.0,
                                     checkpoint_every_seconds=3.0), 20.0, 0.0)
  assert not schedule.after_dispatch(0, 1, _now(1.9, 2.9)).evaluate
  actions = schedule.after_dispatch(1, 2, _now(2.0, 3.0))
  assert actions.evaluate and actions.save and not actions.stop
  # Evaluated at 4.1 s of a stopped clock: the next is due at 6 s, not 4.
  schedule.evaluated(4.1)
  assert not schedule.after_dispatch(2, 3, _now(5.9, 0.0)).evaluate
  assert schedule.after_dispatch(3, 4, _now(6.0, 0.0)).evaluate
  assert schedule.after_dispatch(4, 5, _now(10.0, 0.0)) == cadence.Actions(
      log=True, stop=True)
  # A resumed run evaluates at the next multiple after its clock.
  resumed = cadence.Cadence(_config(train_seconds=10.0, eval_every_seconds=2.0),
                            20.0, 5.0)
  assert not resumed.after_dispatch(0, 1, _now(5.9)).evaluate
  assert resumed.after_dispatch(1, 2, _now(6.0)).evaluate
  assert resumed.done(0, 10.0) and not resumed.done(0, 9.9)


def test_sigterm_stops_unless_the_budget_is_already_spent():
  schedule = cadence.Cadence(_config(num_steps=8, eval_every_steps=1), 20.0, 0.0)
  assert schedule.after_dispatch(3, 4, _now(preempted=True)) == cadence.Actions(
      log=True, stop=True, preempted=True)
  assert schedule.after_dispatch(7, 8, _now(preempted=True)) == cadence.Actions(
      log=True, stop=True)


def test_budget_is_required():
  with pytest.raises(ValueError, match="budget"):
    cadence.check_budgets(_config())


def test_clocks_catch_sigterm_and_one_process_agrees_without_collectives(
    monkeypatch):
  def no_collective(*args, **kwargs):
    raise AssertionError("a one-process run must not gather")
  monkeypatch.setattr(cadence.multihost_utils, "process_allgather",
                      no_collective)
  previous = signal.getsignal(signal.SIGTERM)
  with cadence.Clocks(train_seconds=3.0) as clocks:
    now = clocks.agreed()
    assert now.train_seconds == 3.0 and now.since_save >= 0.0
    assert not now.preempted
    os.kill(os.getpid(), signal.SIGTERM)
    assert clocks.agreed().preempted
    clocks.train.start()
    assert clocks.agreed().train_seconds > 3.0
  assert signal.getsignal(signal.SIGTERM) is previous
