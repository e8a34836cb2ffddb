"""Faults: a training run killed (SIGKILL) at random points, killed while it
commits a checkpoint, or preempted (SIGTERM), then resumed from its workdir,
ends bit for bit where the uninterrupted run ends.

Every run is a real ``python -m experiments.main`` process on tiny generated
data, with a checkpoint after every step so that kills land in every phase
(dispatch, logging, orbax's asynchronous save). Each process has a timeout
and is killed if a test fails.
"""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

import experiments_testing

NUM_STEPS = 16
_KILL_STRIDE = 4   # each kill lands 1 to 4 steps after the one before
_TIMEOUT = 90   # seconds, per process


def _argv(data_dir, workdir, num_steps=NUM_STEPS):
  return ["--config", "experiments/configs/mnist_mlp.py:runlocal",
          "--workdir", workdir,
          f"--config.dataset.data_dir={data_dir}",
          "--config.batch_size=8", "--config.model.features=(16,)",
          "--config.sampler.tau_threshold=0.0",
          f"--config.num_steps={num_steps}",
          "--config.steps_per_dispatch=1", "--config.log_every_steps=1",
          "--config.eval_every_steps=0", "--config.eval_batch_size=32",
          "--config.eval_at_start=False",
          "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=2",
          "--config.progress_bar=False"]


def _env():
  env = experiments_testing.cache_env()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [experiments_testing.repo_root(), env.get("PYTHONPATH", "")])
  return env


def _start(args, log_path, **env):
  log = open(log_path, "ab")
  proc = subprocess.Popen(args, cwd=experiments_testing.repo_root(),
                          env={**_env(), **env}, stdout=log,
                          stderr=subprocess.STDOUT)
  proc.log = log
  return proc


def _launch(data_dir, workdir, log_path, num_steps=NUM_STEPS):
  return _start([sys.executable, "-m", "experiments.main",
                 *_argv(data_dir, workdir, num_steps)], log_path)


def _finish(proc, log_path, expect=0):
  try:
    rc = proc.wait(timeout=_TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    proc.log.close()
  if expect is not None:
    assert rc == expect, open(log_path, errors="replace").read()[-4000:]
  return rc


def _logged_step(workdir) -> int:
  """The last training step in metrics.jsonl (-1 before the first)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      steps = [json.loads(l)["step"] for l in f if l.strip().endswith("}")]
  except (OSError, ValueError):
    return -1
  return max(steps, default=-1)


def _wait_for_step(proc, workdir, step, log_path):
  deadline = time.monotonic() + _TIMEOUT
  while _logged_step(workdir) < step:
    if proc.poll() is not None:
      pytest.fail(f"the run ended (rc {proc.returncode}) before step {step}:\n"
                  + open(log_path, errors="replace").read()[-4000:])
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"no step {step} within {_TIMEOUT} s")
    time.sleep(0.01)


def _steps(workdir):
  return sorted(int(os.path.basename(p)) for p in
                glob.glob(os.path.join(workdir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


def _restore(workdir, step=None):
  """The flat saved state of a checkpoint (default: the latest), as numpy."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "meta"))
  try:
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  return {k: np.asarray(v) for k, v in out["state"].items()}, out["meta"]


def _assert_same_checkpoint(a, b):
  state_a, meta_a = _restore(a)
  state_b, meta_b = _restore(b)
  assert meta_a["step"] == meta_b["step"] == NUM_STEPS
  assert sorted(state_a) == sorted(state_b)
  assert any("params" in name for name in state_a)
  for name in state_a:   # parameters, optimizer moments, τ, keys, data position
    np.testing.assert_array_equal(state_a[name], state_b[name], err_msg=name)


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f if l.strip()]
  return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


@pytest.fixture(scope="module")
def reference(fake_data, tmp_path_factory):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  log = os.path.join(workdir, "..", "reference.log")
  _finish(_launch(fake_data, workdir, log), log)
  assert _steps(workdir)[-1] == NUM_STEPS
  return workdir


def test_sigkill_at_random_points_then_resume_is_bit_exact(fake_data, reference,
                                                           tmp_path):
  workdir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
  rng = random.Random(7)
  kills, target = [], 0
  for _ in range(3):
    # Kill once the run has passed a random step, after a random delay that
    # lands anywhere in a step: its dispatch, its log line, its async save.
    target = rng.randint(target + 1, target + _KILL_STRIDE)
    proc = _launch(fake_data, workdir, log)
    _wait_for_step(proc, workdir, target, log)
    time.sleep(rng.uniform(0.0, 0.15))
    proc.send_signal(signal.SIGKILL)
    assert _finish(proc, log, expect=None) == -signal.SIGKILL
    kills.append((target, _steps(workdir)))
    assert _steps(workdir), "no checkpoint survived the kill"
  assert _steps(workdir)[-1] < NUM_STEPS, kills
  _finish(_launch(fake_data, workdir, log), log)
  _assert_same_checkpoint(workdir, reference)
  # The log holds each step once, with the reference's losses.
  assert _train_losses(workdir) == _train_losses(reference)


_KILL_IN_COMMIT = r"""
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
original = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
  # Every item of the step is written and committed; the step's own commit
  # (the rename of its temporary directory) is not.
  if self._final_path.name == os.environ["KILL_AT_STEP"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return await original(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from experiments import main
main.run(["main"] + sys.argv[1:])
"""


def test_kill_during_checkpoint_commit_leaves_no_valid_looking_checkpoint(
    fake_data, reference, tmp_path):
  workdir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
  proc = _start([sys.executable, "-c", _KILL_IN_COMMIT,
                 *_argv(fake_data, workdir)], log, KILL_AT_STEP="5")
  assert _finish(proc, log, expect=None) == -signal.SIGKILL
  # The save of step 5 wrote its files but never committed: orbax sees
  # only steps 3 and 4, and step 5 is a temporary directory.
  ckpts = os.path.join(workdir, "checkpoints")
  assert _steps(workdir) == [3, 4]
  assert glob.glob(os.path.join(ckpts, "5.orbax-checkpoint-tmp*"))
  mngr = ocp.CheckpointManager(ckpts, item_names=("state", "meta"))
  assert mngr.latest_step() == 4 and list(mngr.all_steps()) == [3, 4]
  mngr.close()
  # The resumed run starts from step 4, removes the debris and ends where
  # the uninterrupted run ends.
  _finish(_launch(fake_data, workdir, log), log)
  assert not glob.glob(os.path.join(ckpts, "*tmp*"))
  assert "Resumed from" in open(log).read() and "at step 4 " in open(log).read()
  _assert_same_checkpoint(workdir, reference)


def test_a_damaged_checkpoint_fails_loudly_or_is_skipped(reference, tmp_path):
  """What a crash or a bad copy can leave beside the last good checkpoint:
  a temporary directory (skipped), and a step directory with missing or
  truncated array files (refused with an error, never restored as valid)."""
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  last = os.path.join(ckpts, str(NUM_STEPS))
  shutil.copytree(last, os.path.join(ckpts,
                                     f"{NUM_STEPS + 1}.orbax-checkpoint-tmp-1"))
  state, meta = _restore(workdir)
  assert meta["step"] == NUM_STEPS
  # A step directory without its array data.
  broken = os.path.join(ckpts, str(NUM_STEPS + 2))
  shutil.copytree(last, broken)
  data_files = [p for p in glob.glob(os.path.join(broken, "state", "**", "d",
                                                  "*"), recursive=True)
                if os.path.isfile(p)]   # OCDBT's array data, not metadata
  assert data_files
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  try:
    _restore(workdir, NUM_STEPS + 2)
  except Exception as e:  # pylint: disable=broad-except
    print("damaged checkpoint refused:", type(e).__name__, str(e)[:200])
  else:
    pytest.fail("a checkpoint with truncated array files restored silently")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(fake_data, reference,
                                                      tmp_path):
  workdir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
  proc = _launch(fake_data, workdir, log, num_steps=NUM_STEPS)
  _wait_for_step(proc, workdir, 6, log)
  proc.send_signal(signal.SIGTERM)
  _finish(proc, log, expect=0)
  text = open(log).read()
  assert "Preempted at step" in text
  stopped = _steps(workdir)[-1]
  assert 6 <= stopped < NUM_STEPS
  _finish(_launch(fake_data, workdir, log), log)
  assert f"at step {stopped} " in open(log).read()
  _assert_same_checkpoint(workdir, reference)
  assert _train_losses(workdir) == _train_losses(reference)
