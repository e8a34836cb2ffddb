"""Smoke tests of the benchmark scripts: smallest settings, JSON checked.

They time nothing worth reading; they check that each script runs end to end
and writes the JSON that ``report`` turns into docs/benchmarks.md.
"""

import json
import os
import shutil

import numpy as np
import pytest

import experiments_testing
from experiments.benchmarks import convergence
from experiments.benchmarks import report
from experiments.benchmarks import scoring_scale
from experiments.benchmarks import step_cost


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("benchmarks"))


def _read(path):
  with open(path) as f:
    return json.load(f)


def _check_header(r):
  assert r["machine"]["cores"] >= 1 and r["machine"]["backend"]
  assert r["command"].startswith("python -m experiments.benchmarks.")
  assert r["date"] and "load_start" in r and "load_end" in r


def test_step_cost(out_dir):
  path = os.path.join(out_dir, "step_cost.json")
  step_cost.run(models=("mlp",), batch_sizes=(8,), presamples=(2.0,),
                steps_per_dispatch=2, repeats=1, loop_steps=0, out=path,
                argv=["step_cost.py", "--smoke"])
  r = _read(path)
  _check_header(r)
  (cell,) = r["cells"]
  assert (cell["model"], cell["b"], cell["B"]) == ("mlp", 8, 16)
  assert cell["is_active"] == {"active": 1.0, "inactive": 0.0}
  for key in ("t_u_ms", "t_f_ms", "active_ms", "inactive_ms"):
    assert cell[key] > 0
  assert cell["active_over_floor"] == pytest.approx(
      cell["active_ms"] / (cell["t_f_ms"] + cell["t_u_ms"]))


def test_step_cost_with_bfloat16_scoring_and_its_report(out_dir, tmp_path):
  path = tmp_path / "step_cost_bf16.json"
  step_cost.run(models=("mlp",), batch_sizes=(8,), presamples=(2.0,),
                steps_per_dispatch=2, repeats=1, loop_steps=0, out=str(path),
                score_dtype="bfloat16", argv=["step_cost.py", "--smoke"])
  r = _read(path)
  assert r["score_dtype"] == "bfloat16"
  (cell,) = r["cells"]
  assert cell["is_active"] == {"active": 1.0, "inactive": 0.0}
  assert cell["t_f_full_ms"] > 0
  assert cell["active_over_full_floor"] == pytest.approx(
      cell["active_ms"] / (cell["t_f_full_ms"] + cell["t_u_ms"]))
  text = report.step_cost_section(r, str(tmp_path / "plots"), "plots",
                                  name="step_cost_bf16")
  assert text.startswith("## Step cost with bfloat16 scoring")
  assert "t_f(B) full ms" in text and "model-precision floor" in text
  assert (tmp_path / "plots" / "step_cost_bf16.png").exists()
  summary = report.readme_summary(str(tmp_path), "docs/benchmarks")
  assert "**bfloat16 scoring** (`jis.low_precision`, mlp" in summary


def test_scoring_scale(out_dir):
  path = os.path.join(out_dir, "scoring_scale.json")
  scoring_scale.run(models=("mlp",), b=8, sizes=(16, 64), chunk=16, repeats=1,
                    mem_steps=1, calibrate_mib=32, out=path,
                    argv=["scoring_scale.py", "--smoke"])
  r = _read(path)
  _check_header(r)
  rows = {(x["B"], x["mode"]): x for x in r["rows"]}
  assert set(rows) == {(16, "all_at_once"), (16, "chunked"),
                       (64, "all_at_once"), (64, "chunked")}
  assert rows[(64, "chunked")]["forward_batch_size"] == 16
  # The presample (28x28 floats and an int label per example) is an argument.
  assert rows[(64, "all_at_once")]["presample_bytes"] == 64 * (784 + 1) * 4
  for row in r["rows"]:
    assert row["step_ms"] > 0
    if row["memory_method"] is not None:
      assert row["peak_delta_bytes"] >= 0
      assert row["peak_bytes"] == row["rss_before_bytes"] + row[
          "peak_delta_bytes"]
  # The meter reads a known 32 MiB allocation (it is sensitive and does not
  # count what was resident before).
  cal = r["calibration"]
  if cal["memory_method"] == "vmhwm_reset":
    assert 31 * 2**20 <= cal["peak_delta_bytes"] <= 34 * 2**20
  assert "Calibration" in scoring_scale.memory_note(r)


def test_peak_memory_without_clear_refs(monkeypatch):
  if scoring_scale._proc_status() is None:  # pylint: disable=protected-access
    pytest.skip("no /proc/self/status")
  monkeypatch.setattr(scoring_scale, "_reset_peak", lambda: False)
  kept = []
  m = scoring_scale.peak_memory(
      lambda: kept.append(np.ones(2**23, np.float32)), 1, settle_s=0.0)
  assert m["memory_method"] == "rss_polling"
  assert m["peak_delta_bytes"] >= 30 * 2**20   # the 32 MiB array


def test_convergence(out_dir, tmp_path):
  data = experiments_testing.write_fake_data(str(tmp_path / "data"),
                                             n_train=2100, n_test=600)
  path = os.path.join(out_dir, "convergence.json")
  convergence.run(models=("mlp",),
                  methods=("uniform", "upper_bound", "upper_bound_bf16"),
                  seeds=1, budget_seconds=0.5, eval_points=2, quick=True,
                  out=path, workdir=str(tmp_path / "runs"),
                  data_dir=data or str(tmp_path / "data"),
                  argv=["convergence.py", "--smoke"])
  r = _read(path)
  _check_header(r)
  entry = r["models"]["mlp"]
  assert entry["budget_seconds"] == 0.5
  methods = entry["summary"]["methods"]
  assert set(methods) == {"uniform", "upper_bound", "upper_bound_bf16"}
  for m in methods.values():
    assert [p["fraction"] for p in m["points"]] == [0.5, 1.0]
    assert m["points"][-1]["train_loss"]["median"] > 0
  assert {"train_loss_ratio", "time_met"} <= set(entry["targets"])
  assert entry["targets"]["method"] == "upper_bound"
  assert entry["targets_bf16"]["method"] == "upper_bound_bf16"
  ub = methods["upper_bound_bf16"]["points"][-1]["train_loss"]["median"]
  assert entry["targets_bf16"]["train_loss_ratio"] == pytest.approx(
      ub / methods["uniform"]["points"][-1]["train_loss"]["median"])


def test_a_method_sets_sampler_and_training_fields():
  c = convergence.make_config("mlp", "ub_lr", 10, "data", quick=True,
                              sampler={"score": "upper_bound",
                                       "learning_rate": 5e-4})
  assert c.sampler.score == "upper_bound" and c.learning_rate == 5e-4
  assert c.seed == 10
  for bad in ({"lr": 1e-3}, {"dataset": "mnist"}):
    with pytest.raises(ValueError, match="neither a config.sampler field"):
      convergence.make_config("mlp", "x", 0, "data", quick=True, sampler=bad)


def test_report(out_dir):
  md = os.path.join(out_dir, "benchmarks.md")
  text = report.build(out_dir, md, os.path.join(out_dir, "plots"))
  for heading in ("## Step cost", "## Convergence per second",
                  "## Scaling of scoring"):
    assert heading in text
  assert "Targets (upper-bound IS vs uniform" in text
  assert "Targets (upper-bound IS, bfloat16 scoring vs uniform" in text
  assert "*Machine:*" in text and "python -m experiments.benchmarks" in text


def test_report_adds_a_longer_convergence_run(out_dir, tmp_path):
  for name in os.listdir(out_dir):
    if name.endswith(".json"):
      shutil.copy(os.path.join(out_dir, name), tmp_path / name)
  shutil.copy(tmp_path / "convergence.json", tmp_path / "convergence_cnn_long.json")
  plots = tmp_path / "plots"
  text = report.build(str(tmp_path), str(tmp_path / "benchmarks.md"), str(plots))
  assert text.count("## Convergence per second") == 2
  assert "## Convergence per second (longer budget)" in text
  assert (plots / "convergence_mlp.png").exists()
  assert (plots / "convergence_mlp_long.png").exists()
  summary = report.readme_summary(str(tmp_path), "docs/benchmarks")
  assert summary.count("**Convergence per second**") == 2
  assert "docs/benchmarks/convergence_mlp_long.png" in summary


def test_readme_summary_fills_only_the_marked_block(out_dir, tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(f"# title\n{report.README_START}\nold\n{report.README_END}"
                    "\n## after\n")
  summary = report.readme_summary(out_dir, "docs/benchmarks")
  assert "**Step cost**" in summary and "**Scaling of scoring**" in summary
  assert "**Convergence per second**" in summary and "uniform" in summary
  report.update_readme(str(readme), summary)
  text = readme.read_text()
  assert text.startswith("# title\n") and text.endswith("\n## after\n")
  assert "old" not in text and summary in text
  readme.write_text("# no markers\n")
  with pytest.raises(ValueError, match="benchmarks:start"):
    report.update_readme(str(readme), summary)
