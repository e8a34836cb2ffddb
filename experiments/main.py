"""Launches one experiment.

    python -m experiments.main --config experiments/configs/mnist_mlp.py \
        --workdir runs/mnist_mlp [--config.sampler.score=uniform ...]

The config file's docstring gives its launch commands and the result it
should reach; ``--config file.py:runlocal`` picks a variant. A workdir that
holds a checkpoint resumes from it. ``run(argv)`` does the same from Python.

Several processes (hosts) join one run through ``jax.distributed``, started
before any other JAX call: ``--distributed`` lets JAX detect the cluster
(TPU pod slices, SLURM, Open MPI), or name it explicitly on every process::

    python -m experiments.main --config ... --workdir ... \
        --coordinator_address=host0:1234 --num_processes=2 --process_id=$RANK

(or set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``). All processes pass the same flags and the same shared
``--workdir``; see docs/experiments.md, "Multi-host".
"""

import os
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import train


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: Sequence[str] = None) -> None:
  flags.DEFINE_string("workdir", None, "Directory for metrics, config and "
                      "checkpoints; a run resumes from a checkpoint found "
                      "there.", flag_values=flag_values)
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, optionally with a variant: "
      "experiments/configs/mnist_mlp.py:runlocal.", flag_values=flag_values,
      lock_config=True, sys_argv=sys_argv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)
  flags.DEFINE_bool(
      "distributed", False, "Join a multi-process run with "
      "jax.distributed.initialize(), detecting the cluster (TPU pod slice, "
      "SLURM, Open MPI); implied by --coordinator_address.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0's coordinator "
      "service (default: env JAX_COORDINATOR_ADDRESS).",
      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Processes in the run (default: "
                       "env JAX_NUM_PROCESSES, else detected).",
                       flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "This process's rank, 0 to "
                       "num_processes - 1 (default: env JAX_PROCESS_ID, else "
                       "detected).", flag_values=flag_values)


def _flag_or_env(value, env: str, cast=str):
  if value is not None:
    return value
  raw = os.environ.get(env, "").strip()
  return cast(raw) if raw else None


def initialize_distributed(flag_values: flags.FlagValues = flags.FLAGS
                           ) -> Optional[int]:
  """``jax.distributed.initialize`` when the flags (or env) ask for several
  processes; returns the process count, or None for a one-process run.

  Must run before any other JAX call: the backends then see every process's
  devices, and ``jax.devices()`` is the global list the mesh is built from.
  """
  address = _flag_or_env(flag_values.coordinator_address,
                         "JAX_COORDINATOR_ADDRESS")
  num = _flag_or_env(flag_values.num_processes, "JAX_NUM_PROCESSES", int)
  rank = _flag_or_env(flag_values.process_id, "JAX_PROCESS_ID", int)
  if not (flag_values.distributed or address or num is not None
          or rank is not None):
    return None
  jax.distributed.initialize(coordinator_address=address, num_processes=num,
                             process_id=rank)
  logging.info("Process %d of %d; %d of %d devices are local.",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return jax.process_count()


define_flags()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  initialize_distributed(FLAGS)
  logging.info("Config:\n%s", FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run(argv: Sequence[str]) -> train.Result:
  """Parses ``argv`` (``argv[0]`` is the program) as the command line is
  parsed, then trains; for tests and notebooks."""
  argv = list(argv)
  flag_values = flags.FlagValues()
  define_flags(flag_values, sys_argv=argv)
  rest = flag_values(argv)
  if len(rest) > 1:
    raise app.UsageError(f"Unexpected arguments: {rest[1:]}")
  initialize_distributed(flag_values)
  return train.train_and_evaluate(flag_values.config, flag_values.workdir)


if __name__ == "__main__":
  app.run(main)
