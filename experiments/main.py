"""Launches one experiment.

    python -m experiments.main --config experiments/configs/mnist_mlp.py \
        --workdir runs/mnist_mlp [--config.sampler.score=uniform ...]

The config file's docstring gives its launch commands and the result it
should reach; ``--config file.py:runlocal`` picks a variant. A workdir that
holds a checkpoint resumes from it. ``run(argv)`` does the same from Python.
"""

from typing import Sequence

from absl import app
from absl import flags
from absl import logging
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


define_flags()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
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
  return train.train_and_evaluate(flag_values.config, flag_values.workdir)


if __name__ == "__main__":
  app.run(main)
