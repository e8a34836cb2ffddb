"""The training loop: resume, streaming, budgets, NaN stops."""

import json
import os
import time

import jax
import numpy as np
import pytest

from experiments import checkpoints
from experiments import metric_writer
from experiments import train
from experiments_testing import tiny_config


pytestmark = pytest.mark.usefixtures("compilation_cache")


def assert_same_state(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_reproduces_the_uninterrupted_run(fake_data, tmp_path):
  # 160 examples, B = 24: an epoch of data is 6 steps, so the resumed part
  # crosses into the next data epoch. Chunks of 4 steps: the interrupted run
  # stops mid-chunk (step 3) and resumes on other chunk boundaries.
  whole = train.train_and_evaluate(
      tiny_config(fake_data, num_steps=9), str(tmp_path / "whole"))
  first = train.train_and_evaluate(
      tiny_config(fake_data, num_steps=3), str(tmp_path / "split"))
  assert first.step == 3
  resumed = train.train_and_evaluate(
      tiny_config(fake_data, num_steps=9), str(tmp_path / "split"))
  assert resumed.step == 9
  assert_same_state(whole.state, resumed.state)   # params, opt state, τ, keys
  assert not np.array_equal(
      np.asarray(jax.tree.leaves(first.state.inner.params)[0]),
      np.asarray(jax.tree.leaves(resumed.state.inner.params)[0]))
  # The resumed log holds each step once, and the same final evaluation.
  records = metric_writer.read_metrics(str(tmp_path / "split"))
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == sorted(set(train_steps))
  final = [r for r in records if "eval/test_loss" in r][-1]
  expected = [r for r in metric_writer.read_metrics(str(tmp_path / "whole"))
              if "eval/test_loss" in r][-1]
  assert final["step"] == expected["step"] == 9
  assert final["eval/test_loss"] == expected["eval/test_loss"]
  # A run already at its budget does nothing and logs nothing more.
  again = train.train_and_evaluate(tiny_config(fake_data, num_steps=9),
                                   str(tmp_path / "split"))
  assert again.step == 9
  assert metric_writer.read_metrics(str(tmp_path / "split")) == records


def test_checkpoint_holds_the_data_position(fake_data, tmp_path):
  c = tiny_config(fake_data, num_steps=7)
  result = train.train_and_evaluate(c, str(tmp_path))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), 2)
  restored, meta = ckpt.restore(7, {"jis": result.state})
  ckpt.close()
  # 160 examples and B = 24: 6 batches per data epoch, so step 7 ends the
  # first batch of data epoch 1.
  assert meta["data"] == {"source": "device", "epoch": 1, "offset": 24}
  assert meta["step"] == 7 and meta["presample_size"] == 24
  assert_same_state(restored["jis"], result.state)


def test_streamed_run_resumes_bit_exact_from_the_grain_iterator_state(
    fake_data, tmp_path):
  # Streamed epochs are Grain's, in another order than the on-device ones,
  # and as deterministic: the interrupted run (stopped mid-chunk, step 3)
  # resumes from the iterator state in its checkpoint, into data epoch 1.
  config = lambda steps: tiny_config(fake_data, num_steps=steps,
                                     data_on_device=False)
  whole = train.train_and_evaluate(config(9), str(tmp_path / "whole"))
  train.train_and_evaluate(config(3), str(tmp_path / "split"))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "split" / "checkpoints"), 2)
  _, meta = ckpt.restore(3, {"jis": whole.state})
  ckpt.close()
  assert meta["data"] == {"source": "grain:shuffled", "epoch": 0,
                          "iterator": {"next_index": 3}}
  resumed = train.train_and_evaluate(config(9), str(tmp_path / "split"))
  assert resumed.step == 9
  assert_same_state(whole.state, resumed.state)
  on_device = train.train_and_evaluate(tiny_config(fake_data, num_steps=9),
                                       str(tmp_path / "device"))
  assert not np.array_equal(
      np.asarray(jax.tree.leaves(on_device.state.inner.params)[0]),
      np.asarray(jax.tree.leaves(whole.state.inner.params)[0]))


@pytest.mark.parametrize("chunking", [
    dict(steps_per_dispatch=3),                       # 3 + 3 + a 1-step tail
    dict(steps_per_dispatch=1),                       # no loop at all
    dict(steps_per_dispatch=2, scan_unroll=True, data_on_device=False),
])
def test_chunking_does_not_change_the_run(fake_data, tmp_path, chunking):
  # 7 steps: the chunked runs end with a shorter chunk (its own program).
  reference = train.train_and_evaluate(
      tiny_config(fake_data, num_steps=7, steps_per_dispatch=7,
                  data_on_device=chunking.get("data_on_device", True)),
      str(tmp_path / "reference"))
  chunked = train.train_and_evaluate(
      tiny_config(fake_data, num_steps=7, **chunking), str(tmp_path / "chunked"))
  assert chunked.step == reference.step == 7
  assert int(chunked.state.step) == 7
  for x, y in zip(jax.tree.leaves(reference.state.inner.params),
                  jax.tree.leaves(chunked.state.inner.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(np.asarray(reference.state.tau),
                             np.asarray(chunked.state.tau), rtol=1e-5)


def test_data_parallel_over_two_devices_matches_one(fake_data, tmp_path):
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices (conftest.py asks XLA for 8 CPU devices)")
  one = train.train_and_evaluate(tiny_config(fake_data, num_steps=4),
                                 str(tmp_path / "one"))
  two = train.train_and_evaluate(
      tiny_config(fake_data, num_steps=4, num_devices=2), str(tmp_path / "two"))
  for x, y in zip(jax.tree.leaves(one.state.inner.params),
                  jax.tree.leaves(two.state.inner.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                               atol=1e-5)


def test_seconds_budget_and_evaluation_off_the_clock(fake_data, tmp_path):
  start = time.perf_counter()
  result = train.train_and_evaluate(
      tiny_config(fake_data, num_steps=0, train_seconds=1.0,
                  eval_every_steps=4, steps_per_dispatch=2),
      str(tmp_path))
  wall = time.perf_counter() - start
  records = metric_writer.read_metrics(str(tmp_path))
  evals = [r for r in records if "eval/test_loss" in r]
  assert result.step > 0 and result.train_seconds >= 1.0
  assert len(evals) >= 2
  assert records[-1]["train_seconds"] == pytest.approx(result.train_seconds,
                                                       abs=0.05)
  # Evaluation time is not training time.
  assert result.train_seconds + sum(r["eval_seconds"] for r in evals) <= wall


def test_epoch_budget_counts_updates(fake_data, tmp_path):
  # 160 examples, b = 8: an epoch of updates is 20 steps.
  result = train.train_and_evaluate(
      tiny_config(fake_data, num_steps=0, num_epochs=0.5), str(tmp_path))
  assert result.step == 10
  assert metric_writer.read_metrics(str(tmp_path))[-1]["epoch"] == 0.5


def test_nan_stops_the_run_loudly(fake_data, tmp_path):
  c = tiny_config(fake_data, optimizer="sgd", learning_rate=1e30, momentum=0.0,
                  num_steps=8, steps_per_dispatch=2)
  with pytest.raises(FloatingPointError, match=r"diverged.*step \d+"):
    train.train_and_evaluate(c, str(tmp_path))


def test_budget_is_required(fake_data, tmp_path):
  with pytest.raises(ValueError, match="budget"):
    train.train_and_evaluate(tiny_config(fake_data, num_steps=0),
                             str(tmp_path))


def test_metrics_are_json_lines_with_config(fake_data, tmp_path):
  train.train_and_evaluate(tiny_config(fake_data, num_steps=2,
                                       steps_per_dispatch=2), str(tmp_path))
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["batch_size"] == 8
  records = metric_writer.read_metrics(str(tmp_path))
  assert records[0]["step"] == 0 and "eval/train_loss" in records[0]
  assert any("learning_rate" in r for r in records)


@pytest.mark.parametrize("data_on_device", [True, False])
def test_stale_scores_get_dataset_indices(fake_data, tmp_path, data_on_device):
  import jis
  if not hasattr(jis, "stale_scores"):
    pytest.skip("this jis has no stale_scores")
  result = train.train_and_evaluate(
      tiny_config(fake_data, num_steps=4, data_on_device=data_on_device,
                  **{"sampler.score_table": "stale_scores",
                     "sampler.tau_threshold": None}),
      str(tmp_path))
  # The table holds a score for each of the 160 training examples, and the
  # trained ones were refreshed from their dataset indices.
  tables = [np.asarray(x) for x in jax.tree.leaves(result.state)
            if np.shape(x) == (160,) and np.asarray(x).dtype == np.float32]
  assert tables and any(np.isfinite(t).sum() > 0 for t in tables)


@pytest.mark.parametrize("chunking, warned", [
    (dict(steps_per_dispatch=2), True),
    (dict(steps_per_dispatch=1), False),
    (dict(steps_per_dispatch=2, scan_unroll=True), False),
])
def test_convolutions_in_a_cpu_loop_are_reported(fake_data, tmp_path, caplog,
                                                 chunking, warned):
  if jax.default_backend() != "cpu":
    pytest.skip("the warning is about XLA:CPU")
  c = tiny_config(fake_data, num_steps=2, **chunking)
  c.model = dict(name="cnn", conv_dropout_rate=0.0, dense_dropout_rate=0.0)
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(c, str(tmp_path))
  messages = [r.getMessage() for r in caplog.records]
  assert any("jax-ml/jax#12868" in m for m in messages) == warned, messages


def test_two_runs_taking_turns_train_as_each_alone(fake_data, tmp_path):
  """Runs that take turns (experiments.benchmarks.turns) hand the machine
  over between dispatches, off their training clocks, and end as they would
  alone: the same steps, the same parameters."""
  from experiments.benchmarks import turns  # pylint: disable=g-import-not-at-top
  config = lambda score: tiny_config(fake_data, num_steps=12,
                                     steps_per_dispatch=2,
                                     **{"sampler.score": score})
  alone = [train.train_and_evaluate(config(s), str(tmp_path / f"alone_{s}"))
           for s in ("upper_bound", "uniform")]
  gives = []

  def body(score):
    def run(handoff):
      # Each handover waits 0.2 s: off the training clock.
      counted = train.Handoff(
          1e-9, lambda: (gives.append(score), time.sleep(0.2),
                         handoff.give()))
      return train.train_and_evaluate(config(score),
                                      str(tmp_path / f"turns_{score}"),
                                      counted)
    return run

  both = turns.take_turns([body("upper_bound"), body("uniform")], 1e-9)
  # A turn of ~0 s: a handoff after every dispatch but the last (6 of 2).
  assert gives == ["upper_bound", "uniform"] * 5
  for a, b in zip(alone, both):
    assert a.step == b.step == 12
    assert_same_state(a.state.inner.params, b.state.inner.params)
    # Five handovers of 0.2 s, and the other run's turns, are not training.
    assert b.train_seconds < 0.5
