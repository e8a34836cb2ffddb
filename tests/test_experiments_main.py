"""End-to-end: every config runs a few steps through experiments.main."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import input_pipeline
from experiments import main as main_lib
import experiments_testing

CONFIGS = ("mnist_mlp", "mnist_mlp_sgd", "mnist_cnn", "fashion_mnist_mlp",
           "fashion_mnist_mlp_sgd", "fashion_mnist_cnn", "reuters_mlp",
           "imdb_fasttext", "cifar10_wrn", "cifar100_wrn", "pmnist_lstm")
# cifar100_wrn is cifar10_wrn on other files (test_cifar100_is_cifar10_on_
# 100_classes); its training program is cifar10's with a wider last layer.
# fashion_mnist_cnn is mnist_cnn's config on other files of the same shapes;
# the *_sgd configs are their MLPs' with sgd, which cifar10_wrn's run covers.
END_TO_END = tuple(c for c in CONFIGS if c not in (
    "cifar100_wrn", "fashion_mnist_cnn", "mnist_mlp_sgd",
    "fashion_mnist_mlp_sgd"))
STEPS = 4
# A few steps of each runlocal config, on tiny data, importance sampling on
# from the first step so the resampling branch runs.
TINY = [f"--config.num_steps={STEPS}", "--config.steps_per_dispatch=2",
        "--config.log_every_steps=2", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2", "--config.batch_size=8",
        "--config.eval_batch_size=32", "--config.progress_bar=False",
        "--config.sampler.tau_threshold=0"]


pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
  return experiments_testing.write_fake_data(
      str(tmp_path_factory.mktemp("data")))


def config_path(name: str, variant: str = "runlocal") -> str:
  path = os.path.join(experiments_testing.repo_root(), "experiments", "configs",
                      f"{name}.py")
  return f"{path}:{variant}" if variant else path


def check_workdir(workdir: str, steps: int, dataset: str,
                  active: float = 1.0) -> list:
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["dataset"]["name"] == dataset
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "eval/test_accuracy" in r]
  trains = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in evals] == list(range(0, steps + 1, 2))
  assert [r["step"] for r in trains] == list(range(2, steps + 1, 2))
  for r in evals:
    for key in ("eval/test_loss", "eval/train_loss"):
      assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    for key in ("eval/test_accuracy", "eval/train_accuracy"):
      assert 0.0 <= r[key] <= 1.0
  for r in trains:
    assert math.isfinite(r["train/loss"])
    assert r["is/active"] == active        # tau_threshold=0: always resample
    assert {"is/tau", "is/ess", "is/max_weight", "epoch",
            "train_seconds"} <= set(r)
  seconds = [r["train_seconds"] for r in records]
  assert seconds == sorted(seconds)
  steps_saved = sorted(int(s) for s in os.listdir(
      os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps_saved[-1] == steps
  return records


@pytest.mark.parametrize("name", END_TO_END)
def test_config_runs_end_to_end(name, fake_data, tmp_path):
  workdir = str(tmp_path / name)
  result = main_lib.run(["main", f"--config={config_path(name)}",
                         f"--workdir={workdir}",
                         f"--config.dataset.data_dir={fake_data}"] + TINY)
  assert result.step == STEPS
  dataset = {"imdb_fasttext": "imdb_reviews", "pmnist_lstm": "permuted_mnist"
             }.get(name, name.rsplit("_", 1)[0])
  check_workdir(workdir, STEPS, dataset)
  params = [np.asarray(x) for x in jax.tree.leaves(result.state.inner.params)]
  assert all(np.isfinite(x).all() for x in params)
  stats = result.state.inner.batch_stats
  if name.startswith("cifar"):
    # WRN's BatchNorm statistics live in the train state, start at mean 0 and
    # must have been moved by the training steps.
    assert any(np.abs(np.asarray(m)).max() > 0 for m in jax.tree.leaves(
        stats["BatchNorm_0"]))
  else:
    assert stats is None


def test_cifar100_is_cifar10_on_100_classes(fake_data):
  from experiments import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import cifar10_wrn, cifar100_wrn  # pylint: disable=g-import-not-at-top
  for variant in ("", "gpu", "tpu", "runlocal"):
    c10, c100 = cifar10_wrn.get_config(variant), cifar100_wrn.get_config(variant)
    assert (c10.dataset.name, c100.dataset.name) == ("cifar10", "cifar100")
    c100.dataset.name = "cifar10"
    assert c100.to_dict() == c10.to_dict(), variant
  config = cifar100_wrn.get_config("runlocal")
  config.dataset.data_dir = fake_data
  dataset = input_pipeline.load(config.dataset)
  assert dataset.num_classes == 100
  assert 50 < len(np.unique(dataset.train["label"])) <= 100
  model = train.create_model(config, dataset)
  x = dataset.train["input"][:2].astype(np.float32)
  logits = jax.eval_shape(
      lambda: model.init_with_output(jax.random.PRNGKey(0), x, train=False)[0])
  assert logits.shape == (2, 100)


def test_every_config_has_docstring_with_launch_command_and_result():
  import importlib
  for name in CONFIGS:
    module = importlib.import_module(f"experiments.configs.{name}")
    doc = module.__doc__
    assert f"--config experiments/configs/{name}.py" in doc, name
    assert "Expected:" in doc and "PLACEHOLDER" not in doc, name
    for variant in ("", "gpu", "tpu", "runlocal"):
      config = module.get_config(variant)
      assert {"score", "presample", "tau_threshold", "policy"} <= set(
          config.sampler), name
    with pytest.raises(ValueError, match="variant"):
      module.get_config("laptop")


def test_command_line(fake_data, tmp_path):
  """python -m experiments.main parses --config, overrides and --workdir."""
  env = experiments_testing.cache_env()
  env[input_pipeline.DATA_DIR_ENV] = fake_data
  workdir = str(tmp_path / "cli")
  # The flags of the in-process mnist_mlp run: the compiled programs come
  # from the shared compilation cache.
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       f"--config={config_path('mnist_mlp')}", f"--workdir={workdir}"] + TINY,
      cwd=experiments_testing.repo_root(), env=env, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  check_workdir(workdir, STEPS, "mnist")
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["sampler"]["tau_threshold"] == 0.0 and config["batch_size"] == 8
  assert config["dataset"]["data_dir"] == ""      # came from JIS_DATA_DIR


def test_missing_dataset_says_where_to_put_files(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    main_lib.run(["main", f"--config={config_path('reuters_mlp')}",
                  f"--workdir={tmp_path / 'w'}",
                  f"--config.dataset.data_dir={tmp_path / 'empty'}"])
  message = str(info.value)
  assert "reuters.npz" in message
  assert os.path.join(str(tmp_path / "empty"), "reuters") in message
  assert "JIS_DATA_DIR" in message
