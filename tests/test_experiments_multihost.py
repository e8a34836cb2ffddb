"""Multi-host: experiments.main as two processes on localhost (CPU, gloo).

Each run launches ``python -m experiments.main`` twice with
``--coordinator_address/--num_processes/--process_id``, two CPU devices per
process, so ``jax.distributed`` joins them into one 4-device mesh. The
result must match one process on one device (global resampling is the
single-device algorithm), a checkpoint written by either process count
must resume on the other and end where the uninterrupted run ends, and
time budgets and a SIGTERM to one process must stop both together.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import checkpoints
from experiments import input_pipeline
from experiments import metric_writer
from experiments import train
import experiments_testing


def tiny_config(data_dir, **overrides):
  """``experiments_testing.tiny_config`` dispatching 3 steps at a time: every
  run here lasts a multiple of 3 steps, so each process compiles one
  training program (process 1 never reads the compilation cache: JAX reads
  and writes it from process 0 only, and the cache keys differ by process)."""
  return experiments_testing.tiny_config(
      data_dir, **{"steps_per_dispatch": 3, **overrides})

TIMEOUT_S = 150   # per two-process launch; a run takes ~25 s on 2 busy cores


pytestmark = pytest.mark.usefixtures("compilation_cache")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _flags(config) -> list:
  """``tiny_config``'s fields as command-line overrides of its config file."""
  c = config
  return [
      f"--config={experiments_testing.repo_root()}/experiments/configs/"
      "mnist_mlp.py:runlocal",
      f"--config.batch_size={c.batch_size}",
      f"--config.model.features={tuple(c.model.features)}",
      f"--config.sampler.tau_threshold={c.sampler.tau_threshold}",
      f"--config.num_steps={c.num_steps}",
      f"--config.train_seconds={c.train_seconds}",
      f"--config.steps_per_dispatch={c.steps_per_dispatch}",
      f"--config.log_every_steps={c.log_every_steps}",
      f"--config.eval_every_steps={c.eval_every_steps}",
      f"--config.eval_every_seconds={c.eval_every_seconds}",
      f"--config.eval_batch_size={c.eval_batch_size}",
      f"--config.checkpoint_every_steps={c.checkpoint_every_steps}",
      f"--config.checkpoint_every_seconds={c.checkpoint_every_seconds}",
      f"--config.data_on_device={c.data_on_device}",
      "--config.progress_bar=False",
      "--config.num_devices=0",            # all 4 devices of the 2 processes
  ]


def start_two_processes(config, workdir: str, name: str = "run") -> list:
  """``config`` through experiments.main as 2 processes x 2 CPU devices;
  each process logs to ``{workdir}.{name}.log{i}``."""
  env = experiments_testing.cache_env()
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=experiments_testing.xla_flags(2))
  env[input_pipeline.DATA_DIR_ENV] = config.dataset.data_dir
  port = _free_port()
  procs = []
  for i in range(2):
    log = open(f"{workdir}.{name}.log{i}", "w+")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "experiments.main", f"--workdir={workdir}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2",
         f"--process_id={i}"] + _flags(config),
        cwd=experiments_testing.repo_root(), env=env, stdout=log,
        stderr=subprocess.STDOUT))
    procs[-1].log = log
  return procs


def finish(procs: list, deadline: float) -> list:
  """Waits for both processes; kills both when one fails or at ``deadline``
  (time.monotonic()); asserts they exited with 0. Returns their logs."""
  try:
    # A process that fails leaves the other waiting in a collective: stop
    # both as soon as one fails, or at the deadline.
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline or any(p.poll() for p in procs):
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = []
  for i, p in enumerate(procs):
    p.log.seek(0)
    texts.append(p.log.read())
    p.log.close()
    assert p.returncode == 0, (
        f"process {i} exited with {p.returncode} (killed at the deadline, "
        f"or after the other failed):\n{texts[-1][-4000:]}")
  return texts


def launch_two_processes(config, workdir: str, name: str = "run") -> list:
  """Runs ``config`` as 2 processes to the end; returns their logs."""
  return finish(start_two_processes(config, workdir, name),
                time.monotonic() + TIMEOUT_S)


def restore(workdir: str, step: int, template):
  """The jis state of ``workdir``'s checkpoint ``step``, on one device."""
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), 2)
  try:
    restored, _ = ckpt.restore(step, {"jis": template})
  finally:
    ckpt.close()
  return restored["jis"]


def assert_close_state(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-6)


def final_eval(workdir: str) -> dict:
  return [r for r in metric_writer.read_metrics(workdir) if "eval/test_loss" in r][-1]


def test_two_processes_match_one_and_resume_on_one(fake_data, tmp_path):
  """Streamed data: each process loads its half of every presample."""
  config = lambda steps: tiny_config(fake_data, num_steps=steps,
                                     data_on_device=False)
  whole = train.train_and_evaluate(config(6), str(tmp_path / "whole"))
  three = train.train_and_evaluate(config(3), str(tmp_path / "three"))
  split = str(tmp_path / "split")
  launch_two_processes(config(3), split)

  # Process 0 alone wrote the config and the log: every line once.
  with open(os.path.join(split, "config.json")) as f:
    assert json.load(f)["num_steps"] == 3
  records = metric_writer.read_metrics(split)
  assert [r["step"] for r in records if "eval/test_loss" in r] == [0, 3]
  assert [r["step"] for r in records if "train/loss" in r] == [3]
  expected = metric_writer.read_metrics(str(tmp_path / "three"))
  for got, want in zip(records, expected):
    for key in ("train/loss", "eval/test_loss", "is/tau"):
      if key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
  assert_close_state(restore(split, 3, three.state), three.state)

  # Saved by 2 processes, resumed by 1: ends where the uninterrupted run does.
  resumed = train.train_and_evaluate(config(6), split)
  assert resumed.step == 6
  assert_close_state(resumed.state, whole.state)
  assert final_eval(split)["eval/test_loss"] == pytest.approx(
      final_eval(str(tmp_path / "whole"))["eval/test_loss"], rel=1e-5)


def test_one_process_checkpoint_resumes_on_two(fake_data, tmp_path):
  """On-device data: replicated on every process, gathered inside the jit."""
  whole = train.train_and_evaluate(tiny_config(fake_data, num_steps=6),
                                   str(tmp_path / "whole"))
  split = str(tmp_path / "split")
  train.train_and_evaluate(tiny_config(fake_data, num_steps=3), split)
  launch_two_processes(tiny_config(fake_data, num_steps=6), split)

  assert_close_state(restore(split, 6, whole.state), whole.state)
  records = metric_writer.read_metrics(split)
  assert [r["step"] for r in records if "eval/test_loss" in r] == [0, 3, 6]
  assert final_eval(split)["eval/test_loss"] == pytest.approx(
      final_eval(str(tmp_path / "whole"))["eval/test_loss"], rel=1e-5)


def _restore_flat(workdir: str, step: int) -> dict:
  """The arrays of ``workdir``'s checkpoint ``step`` by saved name, on one
  device (whatever devices saved them)."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step),
                      "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {name: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
            for name, m in checkpointer.metadata(path).item_metadata.items()}
  return {k: np.asarray(v) for k, v in checkpointer.restore(path, target).items()}


def _has_trained(workdir: str) -> bool:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return any('"train/loss"' in l for l in f if l.endswith("}\n"))
  except OSError:
    return False


def test_time_cadences_and_sigterm_to_one_process_are_agreed(fake_data,
                                                             tmp_path):
  """Each process has its own clock and receives its own signals; the loop
  agrees on the time budget, time cadences and SIGTERM before any
  collective. With evaluations and checkpoints every few tenths of a second
  and a SIGTERM to process 1 alone, both processes save the same step and
  exit 0 (no hang); the same command resumes and both stop at the time
  budget, bit for bit where an uninterrupted run of as many steps ends."""
  timed = tiny_config(fake_data, num_steps=0, train_seconds=1.5,
                      eval_every_seconds=0.2, checkpoint_every_seconds=0.4,
                      log_every_steps=4)
  workdir = str(tmp_path / "timed")
  procs = start_two_processes(timed, workdir, "preempted")
  deadline = time.monotonic() + TIMEOUT_S
  # Once both train (process 0 logged a step), SIGTERM to process 1 alone.
  while not _has_trained(workdir) and time.monotonic() < deadline:
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  logs = finish(procs, deadline)
  preempted = [re.findall(r"Preempted at step (\d+)", text) for text in logs]
  assert len(preempted[0]) == 1 and preempted[0] == preempted[1], [
      text[-3000:] for text in logs]
  step = int(preempted[0][0])
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), 2)
  assert ckpt.latest_step() == step   # saved by both together
  ckpt.close()

  # The same command resumes; both processes stop at the time budget, after
  # timed evaluations and checkpoints on the way.
  logs = launch_two_processes(timed, workdir, "resumed")
  assert all(f"at step {step} " in text for text in logs)
  records = metric_writer.read_metrics(workdir)
  end = records[-1]["step"]
  assert end > step and records[-1]["train_seconds"] >= 1.5
  assert any(step < r["step"] < end for r in records if "eval/test_loss" in r)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), 2)
  assert ckpt.latest_step() == end
  assert any(step < s < end for s in ckpt.all_steps()), ckpt.all_steps()
  ckpt.close()

  # Resumed bit for bit: an uninterrupted run of as many steps ends in the
  # same checkpoint.
  whole = str(tmp_path / "whole")
  launch_two_processes(tiny_config(fake_data, num_steps=end), whole)
  resumed, expected = _restore_flat(workdir, end), _restore_flat(whole, end)
  assert sorted(resumed) == sorted(expected)
  for name in expected:
    np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
