"""experiments.compare on two tiny runs: a PNG and a table."""

import os
import subprocess
import sys

import pytest

from experiments import compare
from experiments import train
import experiments_testing
from experiments_testing import tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  data = experiments_testing.write_fake_data(str(root / "data"), 160, 40)
  with experiments_testing.persistent_compilation_cache():
    for score in ("uniform", "upper_bound"):
      train.train_and_evaluate(
          tiny_config(data, num_steps=6, eval_every_steps=2,
                      steps_per_dispatch=2, **{"sampler.score": score}),
          str(root / score))
  return [str(root / "uniform"), str(root / "upper_bound")]


def test_compare_writes_png_and_table(runs, tmp_path):
  out = str(tmp_path / "cmp.png")
  text = compare.compare(runs, out, budgets=[1e9])
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(str(tmp_path / "cmp.md")) as f:
    assert f.read().strip() == text
  lines = text.splitlines()
  assert len(lines) == 2 + 2            # header, rule, one row per run
  # At an unlimited budget each row is the run's last evaluation.
  for line, workdir in zip(lines[2:], runs):
    last = compare.load_evaluations(workdir)[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == os.path.basename(workdir)
    assert int(cells[2]) == last["step"] == 6
    assert float(cells[4]) == pytest.approx(last["eval/train_loss"], abs=1e-4)
    assert float(cells[6].rstrip("%")) == pytest.approx(
        100 * (1 - last["eval/test_accuracy"]), abs=0.01)


def test_budgets_pick_the_last_evaluation_within_them(runs, tmp_path):
  evals = compare.load_evaluations(runs[0])
  budget = evals[1]["train_seconds"]
  text = compare.compare(runs[:1], str(tmp_path / "one.png"),
                         budgets=[budget, 0.0], labels=["u"])
  rows = text.splitlines()[2:]
  assert f"| {evals[1]['step']} |" in rows[0]
  assert "| 0 |" in rows[1]             # the evaluation before training
  with pytest.raises(ValueError, match="Labels must differ"):
    compare.compare(runs, str(tmp_path / "x.png"), labels=["a", "a"])


def test_command_line(runs, tmp_path):
  out = str(tmp_path / "cli.png")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.compare", *runs, f"--out={out}",
       "--labels=uniform,importance"],
      cwd=experiments_testing.repo_root(), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| importance |" in proc.stdout and os.path.exists(out)
  # Default budgets: a quarter, half, three quarters and all of the shortest
  # run.
  assert proc.stdout.count("| uniform |") == 4
