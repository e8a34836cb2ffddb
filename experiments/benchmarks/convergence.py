r"""Convergence per second: uniform against the importance-sampling strategies.

Trains the MNIST MLP and MNIST CNN (real data) with each method for the same
training-clock budget (evaluation excluded), over several seeds, through the
experiments' training loop (``experiments.train.train_and_evaluate``), and
reports at matched wall-clock points the loss on the whole training set
(inference mode) and the test error, median and spread over seeds, plus the
time each method needs to reach uniform's final training loss.

The budget is uniform's time for ``--budget_epochs`` epochs (median over the
seeds, measured first), or ``--budget_seconds`` when given.

  python -m experiments.benchmarks.convergence --quick          # < 2 min
  python -m experiments.benchmarks.convergence --models=mlp     # full MLP
  python -m experiments.benchmarks.convergence --models=cnn \
      --budget_seconds=60 --eval_points=3 \
      --out runs/benchmarks/convergence_cnn.json   # ~35 min on 2 CPU cores
  python -m experiments.benchmarks.convergence --models=cnn \
      --methods=uniform,upper_bound,biased_k0.5 --budget_seconds=180 \
      --eval_points=4 --out runs/benchmarks/convergence_cnn_long.json  # ~40 min

The CNN runs one step per dispatch on a CPU (XLA:CPU runs convolutions
inside a loop body many times slower; docs/performance_notes.md).

Targets (issue 5): at a budget of 10 uniform epochs, upper-bound IS reaches
<= 1/5 of uniform's training loss and no worse test error, and reaches
uniform's final training loss in <= 1/3 of the time.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from experiments.benchmarks import common

# name -> config.sampler overrides (over the config file's defaults).
METHODS = {
    "uniform": {"score": "uniform"},
    "upper_bound": {"score": "upper_bound"},
    # The same estimator with the scoring pass's products in bfloat16
    # (jis.low_precision); the training step is unchanged.
    "upper_bound_bf16": {"score": "upper_bound", "score_dtype": "bfloat16"},
    "loss": {"score": "loss"},
    "biased_k0.5": {"score": "loss", "k": 0.5},
    # forward_batch_size: XLA:CPU's fused MLP forward over exactly 512 rows
    # runs 5-7x slower than over 448 or 576 (docs/performance_notes.md);
    # scoring in chunks of 256 sidesteps it without changing a score.
    "selective_backprop": {"score": "loss", "presample": 4.0,
                           "policy": "selective_backprop(beta=3.0)",
                           "condition": "always", "forward_batch_size": 256},
    "stale_scores": {"score": "upper_bound", "score_table": "stale_scores"},
}
MODELS = {"mlp": "mnist_mlp", "cnn": "mnist_cnn"}


def make_config(model: str, method: str, seed: int, data_dir: str,
                quick: bool, budget_seconds: float = 0.0,
                budget_epochs: float = 0.0, eval_points: int = 10,
                sampler: Optional[Dict[str, object]] = None):
  """The experiment config of one run.

  ``sampler``: the method's overrides (``METHODS[method]`` by default), keys
  of ``config.sampler`` or top-level training fields such as
  ``learning_rate``.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"experiments.configs.{MODELS[model]}")
  c = module.get_config("runlocal" if quick else "")
  c.dataset.data_dir = data_dir
  c.seed = seed
  for key, value in (METHODS[method] if sampler is None else sampler).items():
    if key in c.sampler:
      c.sampler[key] = value
    elif key in c and not isinstance(c[key], ml_collections.ConfigDict):
      c[key] = value   # a training field: learning_rate, lr_schedule, ...
    else:
      raise ValueError(
          f"Method {method!r} sets {key!r}, which is neither a config.sampler "
          f"field ({sorted(c.sampler)}) nor a top-level training field.")
  c.progress_bar = False
  c.num_steps = 0
  c.num_epochs = float(budget_epochs)
  c.train_seconds = float(budget_seconds)
  c.eval_at_start = True
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 0
  c.checkpoint_every_seconds = 0.0
  c.keep_checkpoints = 1
  c.log_every_steps = 10**9   # only the last dispatch's train line
  if budget_epochs:
    c.eval_every_epochs, c.eval_every_seconds = budget_epochs / eval_points, 0.0
  else:
    c.eval_every_epochs = 0.0
    c.eval_every_seconds = budget_seconds / eval_points
  if model == "cnn" and jax.default_backend() == "cpu":
    c.steps_per_dispatch = 1   # convolutions in a loop are slow on XLA:CPU
  if quick:
    c.eval_batch_size = 512
    c.steps_per_dispatch = 10 if model != "cnn" else 1
  return c


def run_one(config, workdir: str) -> Dict[str, object]:
  """Trains one run from scratch; returns its evaluation curve."""
  from experiments import metric_writer  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top
  if os.path.exists(workdir):
    shutil.rmtree(workdir)   # a leftover checkpoint would resume
  t0 = time.perf_counter()
  result = train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  records = metric_writer.read_metrics(workdir)
  curve = [{"t": r["train_seconds"], "step": r["step"], "epoch": r["epoch"],
            "train_loss": r["eval/train_loss"],
            "test_error": 1.0 - r["eval/test_accuracy"]}
           for r in records if "eval/train_loss" in r]
  train_lines = [r for r in records if "is/active" in r]
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  return {"curve": curve, "steps": result.step,
          "train_seconds": result.train_seconds, "wall_seconds": wall,
          "is_active_last": train_lines[-1]["is/active"] if train_lines else None,
          "tau_last": train_lines[-1]["is/tau"] if train_lines else None}


def value_at(curve: List[Dict[str, float]], t: float, key: str,
             log: bool = False) -> Optional[float]:
  """``key`` at training time ``t``, linearly interpolated between the
  evaluations around it (in log space for losses); the last evaluation
  beyond the end."""
  ts = [p["t"] for p in curve]
  vs = [p[key] for p in curve]
  if not ts:
    return None
  if log:
    vs = [math.log(max(v, 1e-30)) for v in vs]
  v = float(np.interp(t, ts, vs))
  return math.exp(v) if log else v


def time_to_reach(curve: List[Dict[str, float]], target: float,
                  key: str = "train_loss") -> Optional[float]:
  """The first training time at which ``key`` falls to ``target``
  (interpolated between evaluations), or None."""
  prev = None
  for p in curve:
    if p[key] <= target:
      if prev is None:
        return p["t"]
      lo, hi = math.log(max(prev[key], 1e-30)), math.log(max(p[key], 1e-30))
      frac = (lo - math.log(target)) / (lo - hi) if lo != hi else 1.0
      return prev["t"] + frac * (p["t"] - prev["t"])
    prev = p
  return None


def _stats(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
  vals = [v for v in values if v is not None]
  if not vals:
    return {"median": None, "min": None, "max": None, "n": 0}
  return {"median": statistics.median(vals), "min": min(vals),
          "max": max(vals), "n": len(vals)}


def summarize_model(runs: Dict[str, List[Dict[str, object]]], budget: float,
                    fractions: Sequence[float]) -> Dict[str, object]:
  """Per method: matched-time values and time to uniform's final loss."""
  uniform_final = statistics.median(
      value_at(r["curve"], budget, "train_loss", log=True)
      for r in runs["uniform"])
  out = {"uniform_final_train_loss": uniform_final, "methods": {}}
  for method, seeds in runs.items():
    points = []
    for f in fractions:
      t = f * budget
      points.append({
          "fraction": f, "t": t,
          "train_loss": _stats([value_at(r["curve"], t, "train_loss", True)
                                for r in seeds]),
          "test_error": _stats([value_at(r["curve"], t, "test_error")
                                for r in seeds])})
    reach = [time_to_reach(r["curve"], uniform_final) for r in seeds]
    out["methods"][method] = {
        "points": points,
        "time_to_uniform_final": _stats(reach),
        "reached": sum(x is not None for x in reach),
        "steps": _stats([r["steps"] for r in seeds]),
    }
  return out


def targets(summary: Dict[str, object], budget_is_10_epochs: bool,
            method: str = "upper_bound") -> Dict[str, object]:
  """The issue's targets for upper-bound IS (``method``) against uniform."""
  m = summary["methods"]
  if method not in m or "uniform" not in m:
    return {}
  ub, un = m[method]["points"][-1], m["uniform"]["points"][-1]
  loss_ratio = ub["train_loss"]["median"] / un["train_loss"]["median"]
  reach = m[method]["time_to_uniform_final"]["median"]
  budget = un["t"]
  return {
      "method": method,
      "budget_is_10_uniform_epochs": budget_is_10_epochs,
      "train_loss_ratio": loss_ratio,
      "train_loss_ratio_target": 0.2,
      "train_loss_met": loss_ratio <= 0.2,
      "test_error_upper_bound": ub["test_error"]["median"],
      "test_error_uniform": un["test_error"]["median"],
      "test_error_met": ub["test_error"]["median"] <= un["test_error"]["median"],
      "time_fraction_to_uniform_final": None if reach is None else reach / budget,
      "time_fraction_target": 1 / 3,
      "time_met": reach is not None and reach / budget <= 1 / 3,
  }


def run(models: Sequence[str] = ("mlp", "cnn"),
        methods: Sequence[str] = tuple(METHODS), seeds: int = 3,
        budget_epochs: float = 10.0, budget_seconds: float = 0.0,
        eval_points: int = 10, quick: bool = False,
        out: Optional[str] = None, workdir: Optional[str] = None,
        data_dir: Optional[str] = None, first_seed: int = 0,
        extra_methods: Optional[Dict[str, Dict[str, object]]] = None,
        argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
  """Runs the benchmark; writes and returns its JSON.

  ``extra_methods`` adds methods (name -> config.sampler overrides) to
  ``METHODS``, e.g. for a hyperparameter sweep on seeds from ``first_seed``.
  """
  all_methods = {**METHODS, **(extra_methods or {})}
  logging.set_verbosity(logging.WARNING)
  data_dir = data_dir or common.data_dir()
  if data_dir is None:
    raise FileNotFoundError("MNIST not found: set JIS_DATA_DIR or put it in "
                            "../shared/data.")
  out = out or os.path.join(common.DEFAULT_OUT_DIR, "convergence.json")
  workdir = workdir or os.path.join(os.path.dirname(out), "convergence_runs")
  result = {**common.header(argv), "quick": quick, "seeds": seeds,
            "first_seed": first_seed,
            "methods": {m: all_methods[m] for m in methods}, "models": {}}
  fractions = [i / eval_points for i in range(1, eval_points + 1)]
  for model in models:
    runs = {m: [] for m in methods}
    if "uniform" not in runs:
      raise ValueError("methods must include uniform (the reference).")
    budget = budget_seconds
    # Uniform first: with no budget in seconds it defines the budget.
    order = ["uniform"] + [m for m in methods if m != "uniform"]
    for method in order:
      for seed in range(first_seed, first_seed + seeds):
        if method == "uniform" and not budget_seconds:
          cfg = make_config(model, method, seed, data_dir, quick,
                            budget_epochs=budget_epochs, eval_points=eval_points,
                            sampler=all_methods[method])
        else:
          cfg = make_config(model, method, seed, data_dir, quick,
                            budget_seconds=budget, eval_points=eval_points,
                            sampler=all_methods[method])
        r = run_one(cfg, os.path.join(workdir, model, f"{method}_s{seed}"))
        r.update(method=method, seed=seed)
        runs[method].append(r)
        last = r["curve"][-1]
        print(f"[{model}] {method:<19} seed {seed}: {r['steps']:6d} steps in "
              f"{r['train_seconds']:6.1f} s, train loss {last['train_loss']:.4f}"
              f", test error {last['test_error']:.2%}", flush=True)
      if method == "uniform" and not budget_seconds:
        budget = statistics.median(r["train_seconds"] for r in runs["uniform"])
    summary = summarize_model(runs, budget, fractions)
    ten_epochs = not budget_seconds and budget_epochs == 10
    result["models"][model] = {
        "budget_seconds": budget,
        "budget_epochs_uniform": budget_epochs if not budget_seconds else None,
        "runs": [r for m in methods for r in runs[m]],
        "summary": summary,
        "targets": targets(summary, ten_epochs),
        # The same estimator, scored in bfloat16 (jis.low_precision).
        "targets_bf16": targets(summary, ten_epochs, "upper_bound_bf16"),
    }
    print(render(model, result["models"][model]))
  common.write_json(result, out)
  print(f"wrote {out}")
  return result


def render(model: str, entry: Dict[str, object]) -> str:
  s = entry["summary"]
  rows = []
  for method, m in s["methods"].items():
    row = {"method": method}
    for p in m["points"]:
      if p["fraction"] in (0.25, 0.5, 1.0) or p is m["points"][-1]:
        tl, te = p["train_loss"], p["test_error"]
        row[f"loss@{p['t']:.0f}s"] = (f"{tl['median']:.4f} "
                                      f"[{tl['min']:.4f}–{tl['max']:.4f}]")
        row[f"err@{p['t']:.0f}s"] = (f"{te['median']:.2%} "
                                     f"[{te['min']:.2%}–{te['max']:.2%}]")
    r = m["time_to_uniform_final"]
    st = m["steps"]
    row["steps (ms/step)"] = (f"{st['median']:.0f} "
                              f"({1e3 * entry['budget_seconds'] / max(st['median'], 1):.1f})")
    row["t→uniform final"] = ("never" if r["median"] is None else
                              f"{r['median']:.1f} s ({m['reached']}/"
                              f"{m['steps']['n']} seeds reached)")
    rows.append(row)
  cols = list(rows[0])
  return (f"\n{model}: budget {entry['budget_seconds']:.1f} s of training; "
          f"uniform final train loss {s['uniform_final_train_loss']:.4f}\n"
          + common.table(rows, cols))


def _named_json(arg: str):
  name, sep, value = arg.partition("=")
  if not sep or not name:
    raise ValueError(f"--add_method wants NAME=JSON; got {arg!r}.")
  return name, json.loads(value)


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny: a slice of MNIST, the runlocal models, 1 seed, "
                 "a 3 s budget (a smoke test, not a result)")
  p.add_argument("--models", default="mlp,cnn")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", type=int, default=None)
  p.add_argument("--first_seed", type=int, default=0)
  p.add_argument("--add_method", action="append", default=[],
                 metavar="NAME=JSON",
                 help="an extra method: its config.sampler overrides (or "
                 "top-level fields such as learning_rate) as JSON, e.g. "
                 "'ub_p5={\"score\": \"upper_bound\", \"presample\": 5}'"
                 " (name it in --methods too)")
  p.add_argument("--budget_epochs", type=float, default=10.0,
                 help="the budget: uniform's time for this many epochs")
  p.add_argument("--budget_seconds", type=float, default=None,
                 help="the budget in seconds of training (overrides epochs)")
  p.add_argument("--eval_points", type=int, default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--data_dir", default=None)
  a = p.parse_args(argv[1:])
  quick = a.quick
  run(models=a.models.split(","), methods=a.methods.split(","),
      seeds=a.seeds or (1 if quick else 3),
      budget_epochs=a.budget_epochs,
      budget_seconds=(a.budget_seconds if a.budget_seconds is not None
                      else (3.0 if quick else 0.0)),
      eval_points=a.eval_points or (3 if quick else 10), quick=quick,
      out=a.out or os.path.join(common.DEFAULT_OUT_DIR,
                                "convergence_quick.json" if quick
                                else "convergence.json"),
      data_dir=a.data_dir, first_seed=a.first_seed,
      extra_methods=dict(_named_json(x) for x in a.add_method), argv=argv)


if __name__ == "__main__":
  main()
