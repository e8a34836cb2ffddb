"""Smoke tests of the benchmark scripts: smallest settings, JSON checked.

They time nothing worth reading; they check that each script runs end to end
and writes the JSON that ``report`` turns into docs/benchmarks.md.
"""

import functools
import json
import os

import numpy as np
import pytest

import experiments_testing
from experiments.benchmarks import common
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
  # One size: every row is a fresh process (clean memory), ~10 s each.
  scoring_scale.run(models=("mlp",), b=8, sizes=(64,), chunk=16, repeats=1,
                    mem_steps=1, calibrate_mib=32, out=path,
                    argv=["scoring_scale.py", "--smoke"])
  r = _read(path)
  _check_header(r)
  rows = {(x["B"], x["mode"]): x for x in r["rows"]}
  assert set(rows) == {(64, "all_at_once"), (64, "chunked")}
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


# ----------------------------------------------------------------------------
# Convergence: the summaries, against hand-computed curves
# ----------------------------------------------------------------------------

def _curve(ts, losses, accs=None, epochs=None):
  accs = accs or [0.5] * len(ts)
  epochs = epochs or ts
  return [{"t": t, "step": 10 * i, "epoch": e, "train_loss": l,
           "train_accuracy": a, "test_loss": l, "test_accuracy": a}
          for i, (t, l, a, e) in enumerate(zip(ts, losses, accs, epochs))]


def test_time_to_reach_a_loss_and_an_accuracy():
  c = _curve([0, 10, 20], [1.0, 0.1, 0.01], [0.1, 0.5, 0.9])
  assert convergence.time_to_reach(c, 0.1) == 10
  # Between evaluations: log-linear for a loss, linear for an accuracy.
  assert convergence.time_to_reach(c, 10**-1.5) == pytest.approx(15)
  assert convergence.time_to_reach(c, 2.0) == 0      # met at the start
  assert convergence.time_to_reach(c, 0.001) is None
  assert convergence.time_to_reach(c, 0.7, "test_accuracy") == pytest.approx(15)
  assert convergence.time_to_reach(c, 0.95, "test_accuracy") is None
  # The first crossing counts, not a later dip below it.
  c = _curve([0, 10, 20, 30], [1.0] * 4, [0.1, 0.8, 0.6, 0.9])
  assert convergence.time_to_reach(c, 0.7, "test_accuracy") == pytest.approx(
      60 / 7)
  c = _curve([0, 10, 20], [1.0, 0.1, 0.01])
  assert convergence.value_at(c, 5, "train_loss", log=True) == pytest.approx(
      0.1**0.5)
  assert convergence.value_at(c, 99, "train_loss", log=True) == pytest.approx(
      0.01)   # past the end: the last evaluation


def test_reach_stats_count_a_seed_that_never_reaches_as_never():
  r = convergence.reach_stats([1.0, None, 3.0], budget=10.0)
  assert (r["median"], r["fraction"], r["reached"], r["n"]) == (3.0, 0.3, 2, 3)
  assert (r["min"], r["max"]) == (1.0, 3.0)
  r = convergence.reach_stats([1.0, None, None], budget=10.0)
  assert r["median"] is None and r["fraction"] is None and r["reached"] == 1
  assert convergence.fmt_reach(r) == "never (1/3)"


def test_spikes_after_the_first_epoch():
  c = _curve(ts=[0, 1, 2, 3, 4, 5, 6],
             losses=[2.0, 0.1, 0.3, 0.2, 0.5, 0.45, 0.9],
             epochs=[0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
  s = convergence.spikes(c)
  # 0.1 -> 0.3 starts before epoch 1: not counted. 0.2 -> 0.5 (2.5x) is a
  # spike; 0.45 -> 0.9 (exactly 2x) is not.
  assert s["count"] == 1 and s["worst_ratio"] == pytest.approx(2.5)
  assert s["events"][0]["epoch"] == 2.0
  assert s["events"][0]["from"] == 0.2 and s["events"][0]["to"] == 0.5
  s = convergence.spikes(_curve([0, 1], [1.0, 0.5], epochs=[0, 0.5]))
  assert s == {"count": 0, "worst_ratio": None, "events": []}


def test_active_fraction_and_max_weight_from_the_training_lines():
  # Three dispatches: 10 uniform steps; 10 steps of which one importance step
  # with max weight 10 (the line's mean: (10 + 9) / 10); 5 importance steps
  # with max weights averaging 3.
  lines = {"step": [10, 20, 25], "is/active": [0.0, 0.1, 1.0],
           "is/max_weight": [1.0, 1.9, 3.0]}
  s = convergence.train_line_stats(lines)
  assert s["is_active_fraction"] == pytest.approx(6 / 25)
  assert s["max_weight_max"] == pytest.approx(10.0)
  assert s["max_weight_mean"] == pytest.approx((10 + 5 * 3) / 6)
  assert s["max_weight_line_max"] == 3.0
  s = convergence.train_line_stats({"step": [10, 20], "is/active": [0.0, 0.0],
                                    "is/max_weight": [1.0, 1.0]})
  assert s["is_active_fraction"] == 0.0 and s["max_weight_max"] is None


def _method(loss, acc, frac=0.5, spikes=0, worst=1.1):
  """A method's summary with what the targets read: loss median, accuracy
  (median, min, max), time fraction to uniform's accuracy, spikes."""
  med, lo, hi = acc
  return {"train_loss": {"median": loss},
          "test_accuracy": {"median": med, "min": lo, "max": hi},
          "time_to_uniform_final_accuracy": {"fraction": frac},
          "spikes": {"count": spikes, "worst_ratio": worst}}


def test_targets_per_model_and_overall():
  uniform = _method(0.10, (0.980, 0.975, 0.985))   # seed spread 1 point
  per_model = {
      # (a) met: loss lower; accuracy 0.972 >= 0.980 - 0.010. (b) 0.25 <= 0.3.
      "mnist_mlp": {"uniform": uniform,
                    "default": _method(0.025, (0.972, 0.970, 0.974), 0.6)},
      # (a) not met: accuracy 0.969 < 0.970 (beyond seed noise).
      "mnist_cnn": {"uniform": uniform,
                    "default": _method(0.05, (0.969, 0.968, 0.970), 0.8)},
      # (a) not met: loss higher. (c) met. (d) one spike.
      "reuters_mlp": {"uniform": uniform,
                      "default": _method(0.11, (0.99, 0.99, 0.99), 0.7,
                                         spikes=1, worst=2.5)},
  }
  t = {m: convergence.model_targets(m, {"methods": s})
       for m, s in per_model.items()}
  mlp = t["mnist_mlp"]
  assert mlp["a"]["seed_spread"] == pytest.approx(0.010)
  assert mlp["a"]["test_accuracy_floor"] == pytest.approx(0.970)
  assert mlp["a"]["met"] and mlp["b"]["met"] and mlp["c"]["met"]
  assert mlp["b"]["train_loss_ratio"] == pytest.approx(0.25)
  assert "b" not in t["mnist_cnn"]      # (b) is the MNIST MLP's alone
  assert t["mnist_cnn"]["a"]["train_loss_met"]
  assert not t["mnist_cnn"]["a"]["test_accuracy_met"]
  assert not t["mnist_cnn"]["c"]["met"]   # 0.8 of the budget
  assert not t["reuters_mlp"]["a"]["met"] and t["reuters_mlp"]["c"]["met"]
  assert not t["reuters_mlp"]["d"]["met"] and t["mnist_mlp"]["d"]["met"]
  overall = convergence.targets({**t, "imdb_fasttext": None})
  assert overall["models"] == ["mnist_mlp", "mnist_cnn", "reuters_mlp"]
  assert not overall["all_four"]
  assert not overall["a"]["met"]
  assert overall["a"]["failed"] == ["mnist_cnn", "reuters_mlp"]
  assert overall["b"]["met"] is True
  assert overall["c"]["met"] and overall["c"]["models_reaching"] == [
      "mnist_mlp", "reuters_mlp"]
  assert not overall["d"]["met"] and overall["d"]["spikes"]["reuters_mlp"] == 1
  # One model reaching is not two; no MNIST MLP leaves (b) unknown.
  overall = convergence.targets({"mnist_cnn": t["mnist_cnn"],
                                 "reuters_mlp": t["reuters_mlp"]})
  assert not overall["c"]["met"] and overall["b"]["met"] is None
  assert "(b) MNIST MLP training loss ≤ 0.3× uniform's: not run" in (
      convergence.targets_text(overall))


def test_per_model_budgets_from_the_command_line():
  models = list(convergence.MODELS)
  assert convergence.per_model("5", models) == {m: 5.0 for m in models}
  assert convergence.per_model("mnist_cnn=3,imdb_fasttext=2.5", models) == {
      "mnist_cnn": 3.0, "imdb_fasttext": 2.5}
  assert convergence.per_model(None, models) == {}
  assert convergence.per_model("cnn=3", models) == {"mnist_cnn": 3.0}
  with pytest.raises(ValueError, match="unknown model 'vgg'"):
    convergence.per_model("vgg=3", models)
  assert set(convergence.MODELS) == {"mnist_mlp", "mnist_cnn", "reuters_mlp",
                                     "imdb_fasttext"}
  # A check on data the default was not tuned on is run on request only,
  # and is not one of the table's four.
  assert convergence.per_model("fashion_mnist_mlp=4", models) == {
      "fashion_mnist_mlp": 4.0}
  assert "fashion_mnist_mlp" not in convergence.MODELS
  plan = convergence._plan("fashion_mnist_mlp", False, None, None, None, None)  # pylint: disable=protected-access
  assert plan.model == "fashion_mnist_mlp"
  assert not convergence.targets(
      {"fashion_mnist_mlp": {"a": {"met": True}, "c": {"met": False},
                             "d": {"met": True, "spikes": 0}}}
  )["all_four"]


def test_default_method_calls_importance_step_with_no_options(monkeypatch):
  from experiments import sampling  # pylint: disable=g-import-not-at-top
  calls = []

  @functools.wraps(sampling.jis.importance_step)   # its signature, too
  def importance_step(train_step, logits_fn, **kwargs):
    del train_step, logits_fn
    calls.append(kwargs)
  monkeypatch.setattr(sampling.jis, "importance_step", importance_step)
  for model in convergence.MODELS:
    c = convergence.make_config(model, "default", 0, "data", quick=True)
    assert convergence.sampler_fields(c) == {}, model
    sampling.build(c.sampler, None, None, 32)
    assert calls.pop() == {"batch_size": 32}, model
  c = convergence.make_config("mnist_mlp", "uniform", 0, "data", quick=True)
  assert convergence.sampler_fields(c) == {"score": "uniform"}
  c = convergence.make_config("mnist_mlp", "biased_k0.5", 0, "data", quick=True)
  assert convergence.sampler_fields(c) == {
      "score": "loss", "policy": "importance_sampling(k=0.5)"}
  # A training line per dispatch: is/active is known step by step.
  assert c.log_every_steps == c.steps_per_dispatch


def test_a_method_sets_sampler_and_training_fields():
  c = convergence.make_config("mnist_mlp", "ub_lr", 10, "data", quick=True,
                              sampler={"score": "upper_bound",
                                       "learning_rate": 5e-4})
  assert c.sampler.score == "upper_bound" and c.learning_rate == 5e-4
  assert c.seed == 10
  for bad in ({"lr": 1e-3}, {"dataset": "mnist"}):
    with pytest.raises(ValueError, match="neither a config.sampler field"):
      convergence.make_config("mnist_mlp", "x", 0, "data", quick=True,
                              sampler=bad)


@pytest.mark.parametrize("model,n_train,n_test,width", [
    ("reuters_mlp", 1024, 256, 1000), ("imdb_fasttext", 2048, 512, 64)])
def test_quick_text_configs_load_offline(model, n_train, n_test, width):
  from experiments import input_pipeline  # pylint: disable=g-import-not-at-top
  data = experiments_testing.shared_data_dir()
  if data is None or not os.path.isdir(os.path.join(data, model.split("_")[0])):
    pytest.skip("no ../shared/data")
  c = convergence.make_config(model, "default", 0, data, quick=True)
  c.dataset.source = "local"   # never tensorflow-datasets
  ds = input_pipeline.load(c.dataset)
  assert ds.train["input"].shape == (n_train, width)
  assert ds.test["input"].shape == (n_test, width)
  classes = 46 if model == "reuters_mlp" else 2
  for split in (ds.train, ds.test):
    assert 0 <= split["label"].min() and split["label"].max() < classes
  assert len(set(ds.train["label"].tolist())) > 1


def test_convergence_quick_on_two_models(out_dir, tmp_path):
  # 800 examples: 25 steps per uniform epoch at b = 32, 50 in the 2-epoch
  # budget, a multiple of the 10 steps per dispatch (one program to compile).
  data = experiments_testing.write_fake_data(str(tmp_path / "data"),
                                             n_train=800, n_test=200)
  path = os.path.join(out_dir, "convergence.json")
  convergence.main(["convergence.py", "--quick", "--methods=uniform,default",
                    "--models=mnist_mlp,reuters_mlp", f"--data_dir={data}",
                    f"--out={path}", f"--workdir={tmp_path / 'runs'}"])
  r = _read(path)
  _check_header(r)
  assert r["format"] == convergence.FORMAT and r["quick"] and r["seeds"] == 1
  assert r["methods"] == {"uniform": {"score": "uniform"}, "default": {}}
  assert r["code"]["jis"] and "presample" in r["jis_defaults"]
  assert set(r["models"]) == {"mnist_mlp", "reuters_mlp"}
  for model, entry in r["models"].items():
    # By default a seed's methods take turns, for a calibrated budget.
    assert entry["turn_seconds"] == convergence.TURN_SECONDS
    assert entry["calibration"]["epochs"] == convergence.QUICK_BUDGET_EPOCHS
    assert entry["budget_seconds"] > 0 and entry["steps_per_dispatch"] == 10
    assert entry["sampler_fields"] == {"uniform": {"score": "uniform"},
                                       "default": {}}
    methods = entry["summary"]["methods"]
    assert set(methods) == {"uniform", "default"}
    for m in methods.values():
      assert m["train_loss"]["median"] > 0
      assert 0 <= m["test_accuracy"]["median"] <= 1
      for key in ("time_to_uniform_final_loss",
                  "time_to_uniform_final_accuracy"):
        assert {"median", "fraction", "reached", "n", "per_seed"} <= set(m[key])
      assert m["ms_per_step"]["median"] > 0
      assert 0 <= m["is_active_fraction"]["median"] <= 1
      assert {"count", "worst_ratio"} <= set(m["spikes"])
    assert methods["uniform"]["is_active_fraction"]["median"] == 0
    assert methods["uniform"]["max_weight"]["max"] is None
    runs = {x["method"]: x for x in entry["runs"]}
    if common.cpu_steal() is not None:   # Linux: each run records its steal
      for x in runs.values():
        assert 0.0 <= x["steal_fraction"] <= 1.0
      assert methods["default"]["steal_fraction"]["n"] == 1
    # The budget: uniform's time for its 50 steps (2 epochs) in a
    # calibration run; every method trains that long, in turns.
    calibration = entry["calibration"]
    assert calibration["steps"] == 50 and calibration["seed"] == 0
    assert entry["budget_seconds"] == calibration["train_seconds"]
    for x in runs.values():
      assert x["budget_seconds"] == calibration["train_seconds"]
      assert x["train_seconds"] >= x["budget_seconds"]
      # Evaluations at the start, on the seconds' cadence, and at the end;
      # a training line per dispatch of 10 steps.
      assert x["curve"][0]["epoch"] == 0 and len(x["curve"]) >= 2
      assert x["curve"][-1]["step"] == x["steps"]
      assert x["train_lines"]["step"] == list(range(10, x["steps"] + 1, 10))
    default = runs["default"]
    lines = default["train_lines"]
    assert lines["step"][-1] == default["steps"]
    assert default["is_active_fraction"] == pytest.approx(
        convergence.train_line_stats(lines)["is_active_fraction"])
    assert entry["targets"]["method"] == "default"
    assert ("b" in entry["targets"]) == (model == "mnist_mlp")
  assert set(r["targets"]) >= {"a", "b", "c", "d", "models"}
  assert r["targets"]["models"] == ["mnist_mlp", "reuters_mlp"]


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------

def _fake_run(method, seed, losses, accs, ms=5.0, active=0.0):
  curve = _curve([0, 5, 10], losses, accs, epochs=[0, 1, 2])
  lines = {"step": [10, 20], "is/active": [active, active],
           "is/max_weight": [1 + 3 * active] * 2}
  return {"method": method, "seed": seed, "steps": 20, "train_seconds": 10.0,
          "wall_seconds": 12.0, "ms_per_step": ms,
          **convergence.train_line_stats(lines),
          "spikes": convergence.spikes(curve), "curve": curve,
          "train_lines": lines}


def test_repeats_pair_each_run_with_the_uniform_run_just_before(
    monkeypatch, tmp_path):
  """``repeats``, one method after the other (``turn_seconds=0``): each
  seed's methods run again, uniform first; each method trains for the
  seconds of the uniform run just before it (the machine's speed changes
  between repeats), and every run counts in the summary."""
  calls = []

  def fake_run_one(config, workdir):
    # The machine's speed changes from call to call: uniform's times differ.
    r = _fake_run("x", config.seed, [2.0, 0.5, 0.1 + 0.01 * len(calls)],
                  [0.1, 0.8, 0.9])
    seconds = config.train_seconds or 4.0 + len(calls)
    calls.append((os.path.basename(workdir), config.train_seconds))
    return {**{k: v for k, v in r.items() if k not in ("method", "seed")},
            "train_seconds": seconds}

  monkeypatch.setattr(convergence, "run_one", fake_run_one)
  out = str(tmp_path / "c.json")
  r = convergence.run(models=["reuters_mlp"], methods=["uniform", "default"],
                      seeds=2, repeats={"reuters_mlp": 2}, out=out,
                      workdir=str(tmp_path), data_dir=str(tmp_path),
                      turn_seconds=0.0)
  assert [c[0] for c in calls] == [
      "uniform_s0_r0", "default_s0_r0", "uniform_s0_r1", "default_s0_r1",
      "uniform_s1_r0", "default_s1_r0", "uniform_s1_r1", "default_s1_r1"]
  # Uniform trains for its epochs (no seconds); default for uniform's time.
  for (u_name, u_budget), (d_name, d_budget), i in zip(
      calls[::2], calls[1::2], range(0, 8, 2)):
    assert u_budget == 0.0 and d_budget == 4.0 + i
  entry = _read(out)["models"]["reuters_mlp"]
  assert entry["repeats"] == 2
  assert [(x["seed"], x["repeat"]) for x in entry["runs"]
          if x["method"] == "default"] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert entry["summary"]["methods"]["default"]["train_loss"]["n"] == 4
  assert "Reuters MLP 2×" in report._repeats(r)
  assert report._repeats({"models": {"mnist_mlp": {"repeats": 1}}}) == ""
  with pytest.raises(ValueError, match="repeats"):
    convergence.run(models=["reuters_mlp"], methods=["uniform"], seeds=1,
                    repeats={"reuters_mlp": 0}, out=out,
                    workdir=str(tmp_path), data_dir=str(tmp_path),
                    turn_seconds=0.0)


def test_each_run_is_read_at_its_own_seeds_budget():
  """Seed 0's runs end at 10 s, seed 1's at 20 s: each is read at its own
  budget, not at the median (15 s), where seed 0 would be past its end."""
  runs = {m: [] for m in ("uniform", "default")}
  for seed, t_end in ((0, 10.0), (1, 20.0)):
    for method, end_loss in (("uniform", 0.4), ("default", 0.1)):
      r = _fake_run(method, seed, [2.0, 1.0, end_loss], [0.1, 0.5, 0.9])
      r["curve"] = _curve([0, t_end / 2, t_end], [2.0, 1.0, end_loss],
                          [0.1, 0.5, 0.9], epochs=[0, 1, 2])
      r["budget_seconds"] = t_end
      runs[method].append(r)
  summary = convergence.summarize_model(runs, 15.0)
  assert summary["uniform_final_train_loss"] == pytest.approx(0.4)
  assert summary["methods"]["default"]["train_loss"]["min"] == pytest.approx(
      0.1)
  # Without a budget of their own (older JSON), runs are read at the median:
  # seed 1 at 15 s, between 1.0 (10 s) and 0.4 (20 s) in log space.
  for r in runs["uniform"]:
    del r["budget_seconds"]
  old = convergence.summarize_model(runs, 15.0)
  assert old["methods"]["uniform"]["train_loss"]["max"] == pytest.approx(
      0.4 ** 0.5)


def _synthetic_convergence(models=("mnist_mlp", "mnist_cnn", "reuters_mlp")):
  """A convergence JSON in the benchmark's layout, from hand-made runs."""
  result = {"machine": {"cpu": "test cpu", "cores": 2, "memory_gib": 1.0,
                        "backend": "cpu", "device": "cpu", "jax": "0"},
            "command": "python -m experiments.benchmarks.convergence",
            "date": "2026-12-02T00:00:00+00:00",
            "code": {"jis": "0.1.0", "commit": "abcdef0123", "dirty": False},
            "load_start": [0.1], "load_end": [0.2],
            "format": convergence.FORMAT, "quick": False, "seeds": 2,
            "first_seed": 0, "methods": {"uniform": {"score": "uniform"},
                                         "default": {}},
            "spike_rule": {"factor": 2.0, "after_epoch": 1.0}, "models": {}}
  for model in models:
    runs = {"uniform": [_fake_run("uniform", s, [2.0, 0.5, 0.2],
                                  [0.1, 0.8, 0.9 + 0.01 * s]) for s in (0, 1)],
            "default": [_fake_run("default", s, [2.0, 0.2, 0.05],
                                  [0.1, 0.9, 0.95], ms=8.0, active=0.5)
                        for s in (0, 1)]}
    summary = convergence.summarize_model(runs, 10.0)
    result["models"][model] = {
        "title": convergence.MODELS[model].title,
        "config": f"experiments/configs/{model}.py", "budget_seconds": 10.0,
        "budget_epochs_uniform": 2.0, "eval_points": 2, "batch_size": 128,
        "steps_per_dispatch": 10, "steps_per_epoch": 10.0,
        "summary": summary,
        "targets": convergence.model_targets(model, summary),
        "runs": runs["uniform"] + runs["default"]}
  result["targets"] = convergence.targets(
      {m: e["targets"] for m, e in result["models"].items()})
  return result


def test_the_report_says_how_each_model_got_its_budget():
  r = _synthetic_convergence(("mnist_mlp", "reuters_mlp"))
  assert "(median over seeds); every other" in report._budget_rule(r)
  for run in r["models"]["mnist_mlp"]["runs"]:
    run["budget_seconds"] = 10.0
  rule = report._budget_rule(r)   # pylint: disable=protected-access
  assert rule.startswith("Seed by seed")
  assert "Measured before that rule (Reuters MLP)" in rule
  for run in r["models"]["reuters_mlp"]["runs"]:
    run["budget_seconds"] = 10.0
  assert "Measured before" not in report._budget_rule(r)
  # Methods in turns on one model: its rule first, then the others'.
  r["models"]["mnist_mlp"].update(turn_seconds=0.5, budget_epochs_uniform=None,
                                  calibration={"epochs": 12.0})
  rule = report._budget_rule(r)
  assert rule.startswith("A seed's methods train at once")
  assert "MNIST MLP 0.5 s of training per turn" in rule
  assert "One method after the other (Reuters MLP): seed by seed" in rule
  assert "(12 epochs)" in report.four_model_table(r)
  r["models"]["reuters_mlp"]["turn_seconds"] = 1.0
  rule = report._budget_rule(r)
  assert "One method after the other" not in rule
  # Reuters' budget was given in seconds: no calibration run to name.
  assert ("in one calibration run that is not counted, or given in seconds "
          "(Reuters MLP)") in rule
  assert report._budget_phrase(r).startswith("in seconds; ")
  r["models"]["reuters_mlp"]["calibration"] = {"epochs": 10.0}
  assert report._budget_phrase(r).startswith("uniform's time for its epochs")


def _part(command, models):
  return {"command": command, "date": "d", "code": {"commit": command},
          "load_start": [0.0], "models": models}


def test_merge_keeps_the_other_models_and_says_which_run_measured_each():
  common = {"format": convergence.FORMAT, "quick": False, "seeds": 3,
            "first_seed": 0, "methods": {"uniform": {}, "default": {}}}
  earlier = {**common, **_part("A", None), "models": {
      "mnist_mlp": {"t": 1}, "mnist_cnn": {"t": 2}}}
  new = {**common, **_part("B", ["mnist_cnn"]), "models": {}}
  new["parts"] = [_part("B", ["mnist_cnn"])]
  merged = convergence._merged(new, earlier, ["mnist_cnn"])
  assert list(merged["models"]) == ["mnist_mlp"]   # the CNN comes from B
  assert merged["models"]["mnist_mlp"]["run"]["command"] == "A"
  assert [p["command"] for p in merged["parts"]] == ["A", "B"]
  assert merged["command"] == "A && B"
  # Merged again, the parts that measure nothing kept are dropped.
  again = convergence._merged(
      {**new, "parts": [_part("C", ["mnist_mlp"])]},
      {**merged, "models": {**merged["models"], "mnist_cnn": {"run": new[
          "parts"][0]}}}, ["mnist_mlp"])
  assert [p["command"] for p in again["parts"]] == ["B", "C"]
  with pytest.raises(ValueError, match="seeds"):
    convergence._merged({**new, "seeds": 2}, earlier, ["mnist_cnn"])


def test_the_report_names_each_merged_run_its_commit_and_its_load():
  machine = {"cpu": "c", "cores": 2, "memory_gib": 1, "backend": "cpu",
             "device": "cpu", "jax": "0"}
  first = {**_part("python -m x --models=a,b --data_dir=d", ["a", "b"]),
           "code": {"commit": "1111111aaaa", "dirty": True},
           "load_start": [2.0]}
  second = {**_part("python -m x --models=c --merge", ["c"]),
            "code": {"commit": "2222222bbbb", "dirty": False},
            "load_start": [0.5]}
  merged = {"machine": machine, "command": "A && B", "date": "d",
            "code": second["code"], "parts": [first, second]}
  assert report._commits(merged, 7) == (
      "commits 1111111 (with uncommitted changes) and 2222222")
  text = report.provenance(merged)
  assert "a,b on d (load at start [2.0])" in text
  assert "c on d (load at start [0.5])" in text
  # One run, or parts of one commit: one commit, no "merged" line.
  single = {**merged, "parts": [second]}
  assert report._commits(single, 7) == "commit 2222222"
  assert "Merged" not in report.provenance(single)
  assert report._commits({**merged, "parts": [second, second]}, 3) == (
      "commit 222")


def test_steal_is_the_share_of_ticks_the_host_took():
  assert common.steal_fraction((10, 1000), (40, 1200)) == pytest.approx(0.15)
  assert common.steal_fraction(None, (40, 1200)) is None
  assert common.steal_fraction((10, 1000), (10, 1000)) is None
  now = common.cpu_steal()
  if now is not None:
    assert 0 <= now[0] <= now[1]


def test_the_json_names_a_probe_by_its_script_and_a_benchmark_by_its_module():
  probe = common.header(["/x/experiments/benchmarks/probes/loop_cost.py", "a"])
  assert probe["command"] == "python experiments/benchmarks/probes/loop_cost.py a"
  bench = common.header(["/x/experiments/benchmarks/convergence.py", "--quick"])
  assert bench["command"] == "python -m experiments.benchmarks.convergence --quick"


def test_a_model_table_states_the_steal_its_runs_ran_under():
  runs = {"uniform": [], "default": []}
  for seed, steal in ((0, 0.01), (1, 0.30)):
    for method in runs:
      r = _fake_run(method, seed, [2.0, 0.5, 0.2], [0.1, 0.9, 0.95])
      runs[method].append({**r, "steal_fraction": steal})
  entry = {"summary": convergence.summarize_model(runs, 10.0),
           "budget_seconds": 10.0}
  text = convergence.render("mnist_mlp", entry)
  assert "CPU steal (the host's share) 15.5% median, 30.0% in the worst run" in text
  for r in runs.values():
    for x in r:
      del x["steal_fraction"]   # runs from before it was recorded: nothing said
  entry["summary"] = convergence.summarize_model(runs, 10.0)
  assert "steal" not in convergence.render("mnist_mlp", entry)


def test_summarize_a_synthetic_model():
  r = _synthetic_convergence(("mnist_mlp",))
  s = r["models"]["mnist_mlp"]["summary"]
  assert s["uniform_final_train_loss"] == pytest.approx(0.2)
  assert s["uniform_final_test_accuracy"] == pytest.approx(0.905)
  d = s["methods"]["default"]
  # Default reaches 0.2 at 5 s; 0.905 between 5 s (0.9) and 10 s (0.95).
  assert d["time_to_uniform_final_loss"]["median"] == pytest.approx(5.0)
  assert d["time_to_uniform_final_accuracy"]["median"] == pytest.approx(5.5)
  assert d["time_to_uniform_final_accuracy"]["fraction"] == pytest.approx(0.55)
  assert d["is_active_fraction"]["median"] == 0.5
  assert d["max_weight"] == {"max": pytest.approx(4.0),
                             "mean": pytest.approx(4.0)}
  t = r["models"]["mnist_mlp"]["targets"]
  assert t["a"]["met"] and t["b"]["met"] and t["c"]["met"] and t["d"]["met"]


def test_report_renders_the_four_model_table(tmp_path):
  in_dir = tmp_path / "results"
  in_dir.mkdir()
  (in_dir / "convergence.json").write_text(json.dumps(_synthetic_convergence()))
  plots = tmp_path / "plots"
  text = report.build(str(in_dir), str(tmp_path / "benchmarks.md"),
                      str(plots))
  assert ("## Convergence per second: the original library's four examples"
          in text)
  for title in ("### MNIST MLP", "### MNIST CNN", "### Reuters MLP"):
    assert title in text
  assert "### IMDB FastText" not in text   # not run: no table, no figure
  for model in ("mnist_mlp", "mnist_cnn", "reuters_mlp"):
    assert (plots / f"convergence_{model}.png").exists()
  assert not (plots / "convergence_imdb_fasttext.png").exists()
  assert "## Step cost" not in text      # its JSON is missing: skipped
  summary = report.readme_summary(str(in_dir), "docs/benchmarks")
  rows = [l for l in summary.splitlines() if l.startswith("  | ")]
  assert len(rows) == 2 + 4              # header, rule, the four models
  mlp = next(l for l in rows if l.startswith("  | MNIST MLP |"))
  assert "0.2000 → 0.0500 (0.25×)" in mlp and "90.50% → 95.00%" in mlp
  assert "5.5 s (0.55; 2/2)" in mlp and "5.0 / 8.0 (0.05 / 0.08)" in mlp
  assert "4 s / 10 s" in mlp and "IS after 3 epochs" in mlp
  imdb = next(l for l in rows if l.startswith("  | IMDB FastText |"))
  assert "not run" in imdb and "9 s / 59 s" in imdb
  assert "(d) no loss spikes: met" in summary
  assert "docs/benchmarks/convergence_mnist_cnn.png" in summary


def test_report_skips_what_is_missing(tmp_path):
  text = report.build(str(tmp_path), str(tmp_path / "benchmarks.md"),
                      str(tmp_path / "plots"))
  assert text.startswith("# Benchmarks") and "##" not in text
  assert report.readme_summary(str(tmp_path)).strip() == ""
  # A convergence JSON in the old layout is skipped, not misread.
  (tmp_path / "convergence.json").write_text(json.dumps({"models": {}}))
  assert "## Convergence" not in report.build(
      str(tmp_path), str(tmp_path / "benchmarks.md"), str(tmp_path / "plots"))


def test_report(out_dir):
  md = os.path.join(out_dir, "benchmarks.md")
  text = report.build(out_dir, md, os.path.join(out_dir, "plots"))
  for heading in ("## Step cost", "## Convergence per second",
                  "## Scaling of scoring", "### Beside the original library"):
    assert heading in text
  assert "Targets (default vs uniform)" in text
  assert "*Machine:*" in text and "python -m experiments.benchmarks" in text


def test_readme_summary_fills_only_the_marked_block(out_dir, tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text(f"# title\n{report.README_START}\nold\n{report.README_END}"
                    "\n## after\n")
  summary = report.readme_summary(out_dir, "docs/benchmarks")
  assert "**Step cost**" in summary and "**Scaling of scoring**" in summary
  assert "**Convergence per second**" in summary and "MNIST MLP" in summary
  report.update_readme(str(readme), summary)
  text = readme.read_text()
  assert text.startswith("# title\n") and text.endswith("\n## after\n")
  assert "\nold\n" not in text and summary in text
  readme.write_text("# no markers\n")
  with pytest.raises(ValueError, match="benchmarks:start"):
    report.update_readme(str(readme), summary)


def test_runs_taking_turns_hold_the_machine_one_at_a_time():
  """take_turns: one body runs at a time, in a round, the first first; a
  body that ends leaves the round; an error is raised once all have ended."""
  from experiments.benchmarks import turns  # pylint: disable=g-import-not-at-top
  events, holder = [], []

  def body(name, n, fail=False):
    def run(handoff):
      for i in range(n):
        holder.append(name)
        events.append(f"{name}{i}")
        assert holder == [name]    # nobody else runs meanwhile
        holder.pop()
        handoff.give()
      if fail:
        raise RuntimeError(f"{name} failed")
      return name
    return run

  assert turns.take_turns([body("a", 3), body("b", 1), body("c", 2)],
                          0.5) == ["a", "b", "c"]
  assert events == ["a0", "b0", "c0", "a1", "c1", "a2"]
  events.clear()
  with pytest.raises(RuntimeError, match="b failed"):
    turns.take_turns([body("a", 2), body("b", 1, fail=True)], 0.5)
  assert events == ["a0", "b0", "a1"]      # a still ran to its end
  with pytest.raises(ValueError, match="seconds per turn"):
    turns.take_turns([body("a", 1)], 0.0)


def test_methods_taking_turns_train_for_a_calibrated_budget(
    monkeypatch, tmp_path):
  """``turn_seconds``: one uniform run of the epochs (not reported) sets the
  budget in seconds; then each seed's methods train at once, each for that
  budget, with a handoff; the JSON says so."""
  calls = []

  def fake_run_one(config, workdir, handoff=None):
    r = _fake_run("x", config.seed, [2.0, 0.5, 0.2], [0.1, 0.8, 0.9])
    calls.append((os.path.basename(workdir), config.train_seconds,
                  config.num_epochs, handoff))
    if handoff is not None:
      assert handoff.seconds == 0.25
      handoff.give()
    return {**{k: v for k, v in r.items() if k not in ("method", "seed")},
            "train_seconds": config.train_seconds or 7.5}

  monkeypatch.setattr(convergence, "run_one", fake_run_one)
  out = str(tmp_path / "c.json")
  convergence.run(models=["reuters_mlp"], methods=["uniform", "default"],
                  seeds=2, first_seed=3, turn_seconds=0.25, out=out,
                  workdir=str(tmp_path), data_dir=str(tmp_path))
  calibration, *runs = calls
  assert calibration[:3] == ("calibration", 0.0, 10.0)
  assert calibration[3] is None
  # Each seed's pair ran in turns: uniform, default, then each's second turn.
  assert [(c[0], c[1], c[2]) for c in runs] == [
      ("uniform_s3", 7.5, 0.0), ("default_s3", 7.5, 0.0),
      ("uniform_s4", 7.5, 0.0), ("default_s4", 7.5, 0.0)]
  assert all(c[3] is not None for c in runs)
  entry = _read(out)["models"]["reuters_mlp"]
  assert entry["turn_seconds"] == 0.25 and entry["budget_seconds"] == 7.5
  assert entry["calibration"] == {"epochs": 10.0, "seed": 3, "steps": 20,
                                  "train_seconds": 7.5}
  assert all(r["budget_seconds"] == 7.5 for r in entry["runs"])
  assert ("methods in turns of 0.25 s (uniform reached 2.0 epochs, median)"
          in convergence.render("reuters_mlp", entry))
  # The epochs uniform's runs reached, whatever the other methods reached.
  runs = [{"method": m, "curve": _curve([0, 1], [1.0, 0.5], epochs=[0, e])}
          for m, e in [("uniform", 3.0), ("default", 9.0), ("uniform", 5.0),
                       ("uniform", 4.0)]]
  assert convergence.uniform_epochs({"runs": runs}) == 4.0
  assert convergence.uniform_epochs({"runs": runs[1:2]}) is None
  with pytest.raises(ValueError, match="turn_seconds"):
    convergence.run(models=["reuters_mlp"], methods=["uniform"], seeds=1,
                    turn_seconds=-1.0, out=out, workdir=str(tmp_path),
                    data_dir=str(tmp_path))


def test_a_run_stopped_by_sigterm_writes_no_result(monkeypatch, tmp_path):
  # SIGTERM makes a training run save and stop early (preemption); the
  # benchmark must not take its curve, or its time as a calibrated budget.
  from experiments import train   # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda config, workdir, handoff=None: train.Result(
                          state=None, step=50, train_seconds=0.08, eval={},
                          preempted=True))
  with pytest.raises(SystemExit, match="stopped by SIGTERM at step 50"):
    convergence.run_one(None, str(tmp_path / "run"))


def test_host_loop_runs_each_method_and_reads_every_row_once_a_pass():
  from experiments.benchmarks import host_loop   # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  train = {"x": rng.random((1024, 784), np.float32),
           "label": rng.integers(0, 10, 1024).astype(np.int32)}
  ids = {"x": np.zeros((1024, 1), np.float32), "label": np.arange(1024)}
  rows = host_loop.Rows(ids, 0)
  seen = np.concatenate([rows(n)["label"] for n in (128, 384, 128, 384)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(1024))  # one pass
  first = rows.order
  rows(128)                                        # a new pass, reshuffled
  assert not np.array_equal(rows.order, first)
  records = {m: host_loop.run(m, train, 0, 0.3) for m in host_loop.METHODS}
  assert all(r["steps"] > 0 for r in records.values())
  assert records["uniform"]["presample_steps"] == 0
  assert records["default"]["presample_steps"] == records["default"]["steps"]
  assert records["scheduled"]["presample_steps"] < records["scheduled"]["steps"]
