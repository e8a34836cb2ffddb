r"""Convergence per second: the original library's four examples, uniform
against jis's defaults, at equal training time.

keras-importance-sampling's examples page compares uniform sampling with
importance sampling on an MNIST MLP, an MNIST CNN, a Reuters MLP and IMDB
FastText. This benchmark trains the same four (``experiments/configs/
{mnist_mlp,mnist_cnn,reuters_mlp,imdb_fasttext}.py``, real data) through the
experiments' training loop (``experiments.train.train_and_evaluate``) for the
same training-clock budget (compilation, evaluation and logging excluded),
over several seeds, and reports per model and method: the loss on the whole
training split (inference mode) and the test accuracy at the budget; the time
to uniform's final training loss and to uniform's final test accuracy; ms per
step; the fraction of importance steps (``is/active``); the largest weight
(``is/max_weight``); and loss spikes after the first epoch.

The runs go seed by seed, and a seed's methods train at once, taking turns
on the machine: each trains for 0.5 s of its own training clock, then hands
over to the next (``--turn_seconds``; :mod:`experiments.benchmarks.turns`).
A shared 2-core machine's speed drifts by 10-25 % between two runs of
seconds (and by 2x over minutes); taking turns, the methods compared meet
the same machine speed. Every method trains for the model's budget in
seconds: ``--budget_seconds``, or else uniform's time for the model's
number of epochs (:data:`MODELS`, ``--budget_epochs``) in one calibration
run on the first seed, not counted (``calibration`` in the JSON).
``--repeats=reuters_mlp=3`` runs each seed's methods three times, every run
counted in the medians.

``--turn_seconds=0`` runs the methods one after the other instead (as this
benchmark did until 2026-12-04): uniform first, for the model's epochs;
every other method then trains on the same seed for the seconds that
uniform run took, and each run is read at its own budget; the model's
budget is the median over seeds.

  python -m experiments.benchmarks.convergence --quick    # smoke, ~2-3 min
  python -m experiments.benchmarks.convergence            # all four, ~1 h
  python -m experiments.benchmarks.convergence --models=mnist_mlp \
      --budget_epochs=20 --out runs/benchmarks/convergence_mlp20.json
  python -m experiments.benchmarks.convergence --models=mnist_cnn \
      --budget_epochs=mnist_cnn=3 --out runs/benchmarks/convergence_cnn3.json
  python -m experiments.benchmarks.convergence --models=fashion_mnist_mlp \
      --turn_seconds=1 --out runs/benchmarks/convergence_fashion.json

The full run writes ``docs/benchmarks/results/convergence.json``, which
``experiments.benchmarks.report`` turns into docs/benchmarks.md and the
README's table. Methods (``--methods``, default
``uniform,default,no_scoring_pass``) are
named sets of ``jis.importance_step`` options (:data:`METHODS`; ``--add_method
NAME=JSON`` adds one): ``default`` passes none, so it measures whatever
``jis.importance_step(train_step, logits_fn, batch_size=b)`` does.

Estimated time on a quiet 2-core CPU (XLA:CPU, Xeon or EPYC), per model,
uniform and default, 3 seeds each, evaluations, data loading and compilation
included: MNIST MLP ~5 min (10 uniform epochs: 18-31 s of training a run),
MNIST CNN ~45-65 min (2 epochs of 469 steps at ~0.35-0.6 s a step, one step
per dispatch, and ~12 s per evaluation of the 70,000 examples), Reuters MLP
~2 min, IMDB FastText ~5 min: about 1-1.3 h in all. The CNN's 2 epochs are
what keeps it affordable there (3 epochs: ~20 min more); on a GPU raise them
(``--budget_epochs=mnist_cnn=10``).

Targets (issue 15), for ``default`` against ``uniform``, per model and over
the models run (:func:`targets`):
  (a) default's median training loss <= uniform's, and its median test
      accuracy not lower than uniform's beyond seed noise: not below
      uniform's median minus the seed spread, the larger of the two methods'
      [max - min] test accuracy over seeds;
  (b) MNIST MLP: default's median training loss <= 0.3 x uniform's;
  (c) at least two of the four models reach uniform's final test accuracy
      (median over seeds, seeds that never reach it counted as never) in
      <= 0.7 of the budget;
  (d) no loss spike for default: after the first epoch, the whole-train-split
      loss never rises more than 2x between consecutive evaluations, on any
      seed.
"""

import argparse
import functools
import importlib
import inspect
import json
import math
import os
import shutil
import statistics
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from experiments.benchmarks import common
from experiments.benchmarks import turns

# name -> jis.importance_step options (config.sampler fields) or top-level
# training fields; everything a method leaves out is jis's own default.
METHODS = {
    "uniform": {"score": "uniform"},
    # No options at all: jis.importance_step(train_step, logits_fn,
    # batch_size=b), whatever its defaults are today.
    "default": {},
    "upper_bound": {"score": "upper_bound", "presample": 3.0},
    # The same estimator with the scoring pass's products in bfloat16
    # (jis.low_precision); the training step is unchanged.
    "upper_bound_bf16": {"score": "upper_bound", "presample": 3.0,
                         "score_dtype": "bfloat16"},
    "loss": {"score": "loss"},
    "biased_k0.5": {"score": "loss", "policy": "importance_sampling(k=0.5)"},
    # forward_batch_size: XLA:CPU's fused MLP forward over exactly 512 rows
    # runs 5-7x slower than over 448 or 576 (docs/performance_notes.md);
    # scoring in chunks of 256 sidesteps it without changing a score.
    "selective_backprop": {"score": "loss", "presample": 4.0,
                           "policy": "selective_backprop(beta=3.0)",
                           "condition": "always", "forward_batch_size": 256},
    # The categorical draw from stale upper-bound scores (the baseline the
    # no-scoring-pass mode had to beat).
    "stale_scores": {"score": "upper_bound",
                     "score_table": "stale_scores(lookahead=False)",
                     "policy": "importance_sampling()"},
    # The no-scoring-pass mode at its defaults (losses, InfoBatch): a score
    # table and nothing else; presample 1.5 reads a half batch more rows.
    "no_scoring_pass_plain": {"score_table": "stale_scores(lookahead=False)",
                              "presample": 1.5},
    # The same, each step training on the previous step's draw (the split is
    # on the device and preprocessed once, so presamples are jis.Indexed):
    # its rows no longer wait for the table lookup and the draw.
    "no_scoring_pass": {"score_table": "stale_scores(lookahead=True)",
                        "presample": 1.5},
    # InfoBatch's own epochs, drawn on the device from the score table
    # (jis.infobatch_order; experiments.batches.PrunedOnDevice): a step trains
    # on the next b kept examples with their weights, no draw in the step.
    # Never annealed: a time budget cannot place InfoBatch's last epochs.
    "infobatch_epochs": {"pruning": {"method": "infobatch",
                                     "anneal_fraction": 0.0}},
    # The unbiased estimator of the paper, for comparison with the default.
    "unbiased": {"policy": "importance_sampling()"},
}
DEFAULT_METHODS = ("uniform", "default", "no_scoring_pass")


class Model(NamedTuple):
  """One of the original library's examples.

  Attributes:
    title: its name in tables.
    budget_epochs: the default budget, in uniform epochs: long enough for
      uniform to be past its first few epochs, short enough for a 2-core CPU.
    eval_points: evaluations over the budget (plus one at the start).
  """
  title: str
  budget_epochs: float
  eval_points: int


# Keys are the config files' names (experiments/configs/<key>.py).
MODELS = {
    "mnist_mlp": Model("MNIST MLP", 10.0, 20),
    # ~165-280 s per uniform epoch on a 2-core CPU: 2 epochs keep its six
    # runs to 45-65 min there (3 epochs: ~20 min more).
    "mnist_cnn": Model("MNIST CNN", 2.0, 8),
    "reuters_mlp": Model("Reuters MLP", 10.0, 20),
    "imdb_fasttext": Model("IMDB FastText", 5.0, 10),
}
# Data the default was not tuned on (the README's table is MODELS only):
# --models=fashion_mnist_mlp measures it alike, into a JSON of its own.
CHECKS = {"fashion_mnist_mlp": Model("Fashion-MNIST MLP", 10.0, 20),
          "fashion_mnist_mlp_noisy": Model(
              "Fashion-MNIST MLP, 20 % noisy labels", 10.0, 20),
          "fashion_mnist_cnn": Model("Fashion-MNIST CNN", 1.0, 5),
          "mnist_mlp_sgd": Model("MNIST MLP, SGD", 10.0, 20),
          "fashion_mnist_mlp_sgd": Model("Fashion-MNIST MLP, SGD", 10.0, 20)}
KNOWN = {**MODELS, **CHECKS}
# The names of earlier versions of this benchmark (--models=mlp,cnn).
ALIASES = {"mlp": "mnist_mlp", "cnn": "mnist_cnn"}
# --quick: the runlocal variants (a slice of the data, smaller models).
QUICK_MODELS = tuple(MODELS)
QUICK_BUDGET_EPOCHS = 2.0
QUICK_EVAL_POINTS = 4

SPIKE_FACTOR = 2.0        # a rise of more than 2x between evaluations ...
SPIKE_AFTER_EPOCH = 1.0   # ... after the first epoch is a spike
TARGET_LOSS_RATIO_MLP = 0.3
TARGET_TIME_FRACTION = 0.7
TARGET_MODELS_REACHING = 2
# Training seconds per turn when a seed's methods take turns (--turn_seconds).
TURN_SECONDS = 0.5
FORMAT = "convergence/2"   # the JSON layout report.py reads
# The per-dispatch training-line columns kept in the JSON (with step, t).
TRAIN_LINE_KEYS = ("is/active", "is/max_weight", "is/tau")


# ----------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------

def make_config(model: str, method: str, seed: int, data_dir: str,
                quick: bool, budget_seconds: float = 0.0,
                budget_epochs: float = 0.0, eval_points: int = 10,
                sampler: Optional[Dict[str, object]] = None):
  """The experiment config of one run.

  Every ``config.sampler`` field is cleared (jis's own defaults apply), then
  the method's overrides are set: ``sampler`` (``METHODS[method]`` by
  default), keys of ``config.sampler``, ``pruning`` (a dict of
  ``config.pruning`` fields) or top-level training fields such as
  ``learning_rate``. The loss stays when the config sets one other than
  jis's default: it is the model's, not a sampling choice.
  """
  module = importlib.import_module(f"experiments.configs.{model}")
  c = module.get_config("runlocal" if quick else "")
  c.dataset.data_dir = data_dir
  c.seed = seed
  jis_defaults = _importance_step_defaults()
  for key in list(c.sampler):
    if key == "loss" and c.sampler.loss != jis_defaults.get("loss"):
      continue
    c.sampler[key] = None
  for key, value in (METHODS[method] if sampler is None else sampler).items():
    if key in c.sampler:
      c.sampler[key] = value
    elif key == "pruning":
      c.pruning.update(value)   # experiments.pruning: the loader's InfoBatch
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
  if budget_epochs:
    c.eval_every_epochs, c.eval_every_seconds = budget_epochs / eval_points, 0.0
  else:
    c.eval_every_epochs = 0.0
    c.eval_every_seconds = budget_seconds / eval_points
  if c.model.name == "cnn" and jax.default_backend() == "cpu":
    c.steps_per_dispatch = 1   # convolutions in a loop are slow on XLA:CPU
  if quick:
    c.eval_batch_size = 512
  # A training line per dispatch (each averages its steps' metrics), so the
  # run's is/active and is/max_weight are known step by step.
  c.log_every_steps = max(1, int(c.steps_per_dispatch))
  return c


def _importance_step_defaults() -> Dict[str, object]:
  import jis  # pylint: disable=g-import-not-at-top
  params = inspect.signature(jis.importance_step).parameters
  return {n: p.default for n, p in params.items()
          if p.kind == inspect.Parameter.KEYWORD_ONLY
          and p.default is not inspect.Parameter.empty}


def sampler_fields(config) -> Dict[str, object]:
  """The ``config.sampler`` fields a run sets (all others: jis's default)."""
  return {k: v for k, v in config.sampler.items()
          if v is not None and not (isinstance(v, str) and not v.strip())}


def train_line_stats(lines: Dict[str, List[float]]) -> Dict[str, object]:
  """The run's importance-sampling activity from its training lines.

  ``lines`` holds columns ``step`` (the step count after each dispatch) and
  ``is/active``, ``is/max_weight``, each the mean over that dispatch's
  steps. ``is_active_fraction`` weighs each line by the steps it covers: it
  is the run's exact fraction of importance steps. A uniform step's largest
  weight is 1, so a line's mean over its importance steps alone is
  ``(max_weight - (1 - active)) / active``: ``max_weight_max`` is the
  largest of those (each step's own at one importance step per dispatch, a
  lower bound of it otherwise) and ``max_weight_mean`` the mean over all
  importance steps; both None without importance steps.
  ``max_weight_line_max`` is the largest line as logged.
  """
  steps = np.asarray(lines.get("step", []), float)
  if not steps.size:
    return {"is_active_fraction": None, "max_weight_max": None,
            "max_weight_mean": None, "max_weight_line_max": None}
  covered = np.diff(np.concatenate([[0.0], steps]))
  active = np.asarray(lines["is/active"], float)
  mw = np.asarray(lines["is/max_weight"], float)
  n_active = covered * active
  on = active > 0
  per_line = (mw[on] - (1.0 - active[on])) / active[on]
  return {"is_active_fraction": float(n_active.sum() / covered.sum()),
          "max_weight_max": float(per_line.max()) if on.any() else None,
          "max_weight_mean": (float(np.sum(n_active[on] * per_line)
                                    / n_active.sum()) if on.any() else None),
          "max_weight_line_max": float(mw.max())}


def spikes(curve: List[Dict[str, float]], factor: float = SPIKE_FACTOR,
           after_epoch: float = SPIKE_AFTER_EPOCH) -> Dict[str, object]:
  """Rises of the training loss between consecutive evaluations, both at or
  after ``after_epoch``: ``count`` of those above ``factor``×, the
  ``worst_ratio`` (largest later/earlier, None when no pair qualifies) and
  the spikes themselves."""
  events, worst = [], None
  for prev, p in zip(curve, curve[1:]):
    if prev["epoch"] < after_epoch:
      continue
    ratio = p["train_loss"] / max(prev["train_loss"], 1e-30)
    worst = ratio if worst is None else max(worst, ratio)
    if ratio > factor:
      events.append({"t": p["t"], "epoch": p["epoch"], "ratio": ratio,
                     "from": prev["train_loss"], "to": p["train_loss"]})
  return {"count": len(events), "worst_ratio": worst, "events": events}


def run_one(config, workdir: str, handoff=None) -> Dict[str, object]:
  """Trains one run from scratch; returns its curves and metrics.
  ``handoff``: an ``experiments.train.Handoff`` (runs that take turns; its
  ``wall_seconds`` and ``steal_fraction`` then cover the other runs' turns
  too)."""
  from experiments import metric_writer  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top
  if os.path.exists(workdir):
    shutil.rmtree(workdir)   # a leftover checkpoint would resume
  t0, steal = time.perf_counter(), common.cpu_steal()
  result = train.train_and_evaluate(config, workdir, handoff)
  if result.preempted:   # a stopped run's curve would pass for a result
    raise SystemExit(
        f"{workdir}: the run was stopped by SIGTERM at step {result.step}; "
        "the benchmark writes no results from a stopped run. Run it again "
        "(SIGKILL stops a benchmark without this message).")
  wall = time.perf_counter() - t0
  steal = common.steal_fraction(steal, common.cpu_steal())
  records = metric_writer.read_metrics(workdir)
  curve = [{"t": r["train_seconds"], "step": r["step"], "epoch": r["epoch"],
            "train_loss": r["eval/train_loss"],
            "train_accuracy": r["eval/train_accuracy"],
            "test_loss": r["eval/test_loss"],
            "test_accuracy": r["eval/test_accuracy"]}
           for r in records if "eval/train_loss" in r]
  train = [r for r in records if "is/active" in r]
  lines = {"step": [r["step"] for r in train],
           "t": [round(r["train_seconds"], 4) for r in train]}
  for key in TRAIN_LINE_KEYS:
    lines[key] = [_round(r.get(key)) for r in train]
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  steps = int(result.step)
  return {"steps": steps, "train_seconds": result.train_seconds,
          "wall_seconds": wall, "steal_fraction": steal,
          "ms_per_step": 1e3 * result.train_seconds / max(steps, 1),
          **train_line_stats(lines), "spikes": spikes(curve),
          "curve": curve, "train_lines": lines}


def _round(v, digits: int = 6):
  if isinstance(v, float) and math.isfinite(v) and v:
    return round(v, digits - 1 - int(math.floor(math.log10(abs(v)))))
  return v


# ----------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------

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
  """The first training time at which ``key`` reaches ``target``: falls to
  it for a loss (interpolated in log space between evaluations), rises to
  it for an accuracy (interpolated linearly); None if it never does."""
  higher = "accuracy" in key
  prev = None
  for p in curve:
    v = p[key]
    if (v >= target) if higher else (v <= target):
      if prev is None:
        return p["t"]
      lo, hi = prev[key], v
      if not higher:
        lo, hi, target = (math.log(max(lo, 1e-30)), math.log(max(hi, 1e-30)),
                          math.log(max(target, 1e-30)))
      frac = (target - lo) / (hi - lo) if hi != lo else 1.0
      return prev["t"] + frac * (p["t"] - prev["t"])
    prev = p
  return None


def stats(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
  """Median, min and max of the values that are not None."""
  vals = [v for v in values if v is not None]
  if not vals:
    return {"median": None, "min": None, "max": None, "n": 0}
  return {"median": statistics.median(vals), "min": min(vals),
          "max": max(vals), "n": len(vals)}


def reach_stats(times: Sequence[Optional[float]], budget: float
                ) -> Dict[str, object]:
  """Times to a target over seeds. The median counts a seed that never
  reached it as never (infinite), so it is None when half or more never
  did; ``fraction`` is the median over the budget."""
  reached = sorted(t for t in times if t is not None)
  padded = reached + [math.inf] * (len(times) - len(reached))
  median = statistics.median(padded) if padded else math.inf
  median = None if math.isinf(median) else median
  return {"median": median,
          "fraction": None if median is None else median / budget,
          "min": reached[0] if reached else None,
          "max": reached[-1] if reached else None,
          "reached": len(reached), "n": len(times), "per_seed": list(times)}


def summarize_model(runs: Dict[str, List[Dict[str, object]]],
                    budget: float) -> Dict[str, object]:
  """Per method, over seeds: the values at the budget (each run's own, its
  seed's uniform time, when it has one; else ``budget``), the times to
  uniform's final training loss and test accuracy, the step cost, the
  importance-sampling activity and the spikes."""
  at = lambda r, key, log=False: value_at(
      r["curve"], r.get("budget_seconds", budget), key, log)
  final_loss = statistics.median(at(r, "train_loss", True)
                                 for r in runs["uniform"])
  final_acc = statistics.median(at(r, "test_accuracy") for r in runs["uniform"])
  out = {"uniform_final_train_loss": final_loss,
         "uniform_final_test_accuracy": final_acc, "methods": {}}
  for method, seeds in runs.items():
    out["methods"][method] = {
        "train_loss": stats([at(r, "train_loss", True) for r in seeds]),
        "test_accuracy": stats([at(r, "test_accuracy") for r in seeds]),
        "test_loss": stats([at(r, "test_loss", True) for r in seeds]),
        "time_to_uniform_final_loss": reach_stats(
            [time_to_reach(r["curve"], final_loss, "train_loss")
             for r in seeds], budget),
        "time_to_uniform_final_accuracy": reach_stats(
            [time_to_reach(r["curve"], final_acc, "test_accuracy")
             for r in seeds], budget),
        "steps": stats([r["steps"] for r in seeds]),
        "ms_per_step": stats([r["ms_per_step"] for r in seeds]),
        "is_active_fraction": stats([r["is_active_fraction"] for r in seeds]),
        # The CPU time the virtual machine's host took during the runs.
        "steal_fraction": stats([r.get("steal_fraction") for r in seeds]),
        # Over the importance steps: the largest of any seed, and the
        # median over seeds of each run's mean.
        "max_weight": {
            "max": max((r["max_weight_max"] for r in seeds
                        if r["max_weight_max"] is not None), default=None),
            "mean": stats([r["max_weight_mean"] for r in seeds])["median"]},
        "spikes": {
            "count": sum(r["spikes"]["count"] for r in seeds),
            "seeds_with_spikes": sum(r["spikes"]["count"] > 0 for r in seeds),
            "worst_ratio": max((r["spikes"]["worst_ratio"] for r in seeds
                                if r["spikes"]["worst_ratio"] is not None),
                               default=None)},
        "seeds": len(seeds),
    }
  return out


def band(runs: Sequence[Dict[str, object]], key: str, grid: Sequence[float],
         log: bool = False) -> Dict[str, List[float]]:
  """Median, min and max over seeds of ``key`` on the time ``grid`` (each
  seed's curve interpolated), for the plots."""
  values = np.array([[value_at(r["curve"], t, key, log) for t in grid]
                     for r in runs], float)
  return {"median": np.median(values, 0).tolist(),
          "min": values.min(0).tolist(), "max": values.max(0).tolist()}


def model_targets(model: str, summary: Dict[str, object],
                  method: str = "default") -> Optional[Dict[str, object]]:
  """Issue 15's targets (a), (b), (c), (d) for ``method`` against uniform on
  one model; None when either was not run."""
  m = summary["methods"]
  if method not in m or "uniform" not in m:
    return None
  d, u = m[method], m["uniform"]
  spread = max(u["test_accuracy"]["max"] - u["test_accuracy"]["min"],
               d["test_accuracy"]["max"] - d["test_accuracy"]["min"])
  loss_ok = d["train_loss"]["median"] <= u["train_loss"]["median"]
  acc_floor = u["test_accuracy"]["median"] - spread
  acc_ok = d["test_accuracy"]["median"] >= acc_floor
  ratio = d["train_loss"]["median"] / u["train_loss"]["median"]
  frac = d["time_to_uniform_final_accuracy"]["fraction"]
  out = {
      "method": method,
      "a": {"train_loss_met": loss_ok, "test_accuracy_floor": acc_floor,
            "seed_spread": spread, "test_accuracy_met": acc_ok,
            "met": loss_ok and acc_ok},
      "c": {"time_fraction_to_uniform_final_accuracy": frac,
            "target": TARGET_TIME_FRACTION,
            "met": frac is not None and frac <= TARGET_TIME_FRACTION},
      "d": {"spikes": d["spikes"]["count"],
            "worst_ratio": d["spikes"]["worst_ratio"],
            "met": d["spikes"]["count"] == 0},
      "train_loss_ratio": ratio,
  }
  if model == "mnist_mlp":
    out["b"] = {"train_loss_ratio": ratio, "target": TARGET_LOSS_RATIO_MLP,
                "met": ratio <= TARGET_LOSS_RATIO_MLP}
  return out


def targets(per_model: Dict[str, Optional[Dict[str, object]]]
            ) -> Dict[str, object]:
  """The targets over the models run: (a) and (d) on every one, (b) on the
  MNIST MLP, (c) on at least two."""
  t = {m: x for m, x in per_model.items() if x}
  reaching = [m for m, x in t.items() if x["c"]["met"]]
  mlp = t.get("mnist_mlp", {}).get("b")
  return {
      "models": list(t), "all_four": set(t) == set(MODELS),
      "a": {"met": bool(t) and all(x["a"]["met"] for x in t.values()),
            "failed": [m for m, x in t.items() if not x["a"]["met"]]},
      "b": {"met": None if mlp is None else mlp["met"],
            "train_loss_ratio": None if mlp is None else mlp[
                "train_loss_ratio"], "target": TARGET_LOSS_RATIO_MLP},
      "c": {"met": len(reaching) >= TARGET_MODELS_REACHING,
            "models_reaching": reaching, "needed": TARGET_MODELS_REACHING,
            "target": TARGET_TIME_FRACTION},
      "d": {"met": all(x["d"]["met"] for x in t.values()),
            "spikes": {m: x["d"]["spikes"] for m, x in t.items()}},
  }


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------

def _merged(result: Dict[str, object], earlier: Dict[str, object],
            models: Sequence[str]) -> Dict[str, object]:
  """``result`` with the models of ``earlier`` it does not measure again."""
  if earlier.get("format") != FORMAT or earlier.get("quick") != result["quick"]:
    raise ValueError("--merge: the existing JSON is of another format or "
                     "kind (quick or full); write to a new --out instead.")
  for key in ("seeds", "first_seed", "methods"):
    if earlier.get(key) != result[key]:
      raise ValueError(f"--merge: the existing JSON has {key} = "
                       f"{earlier.get(key)!r}, this run {result[key]!r}; "
                       "merged models must be measured alike.")
  kept = {m: e for m, e in earlier["models"].items() if m not in models}
  whole = {k: earlier.get(k) for k in ("command", "date", "code", "load_start")}
  parts = []
  for m, entry in kept.items():
    entry.setdefault("run", {**whole, "load_end": earlier.get("load_end")})
    part = {k: entry["run"].get(k) for k in whole}
    same = [p for p in parts if all(p[k] == part[k] for k in whole)]
    if same:
      same[0]["models"].append(m)
    else:
      parts.append({**part, "models": [m]})
  parts += result["parts"]
  return {**result, "models": kept, "parts": parts,
          "command": " && ".join(p["command"] for p in parts)}


class _Plan(NamedTuple):
  """One model's budget: uniform's ``epochs`` (its time is the seed's
  budget), or ``seconds`` for every run when given; ``points``
  evaluations; ``repeats`` runs of each seed; ``turn``: the seconds of
  training per turn when a seed's methods take turns (0: one after the
  other)."""
  model: str
  epochs: float
  seconds: float
  points: int
  repeats: int
  turn: float = 0.0


def _plan(model: str, quick: bool, budget_epochs, budget_seconds,
          eval_points, repeats, turn: float = 0.0) -> _Plan:
  spec = KNOWN[model]
  n = int((repeats or {}).get(model, 1))
  if n < 1:
    raise ValueError(f"repeats for {model} must be >= 1; got {n}.")
  return _Plan(
      model,
      (budget_epochs or {}).get(model, QUICK_BUDGET_EPOCHS if quick
                                else spec.budget_epochs),
      (budget_seconds or {}).get(model, 0.0),
      (eval_points or {}).get(model, QUICK_EVAL_POINTS if quick
                              else spec.eval_points),
      n, float(turn))


def _train_model(plan: _Plan, methods, seeds, data_dir: str, quick: bool,
                 workdir: str):
  """Every run of one model: ``(runs by method, sampler fields by method,
  the model's batch facts)``. ``methods``: ``(name, overrides)`` pairs,
  uniform first. Seed by seed, and repeat by repeat (:func:`_seed_runs`).
  """
  runs = {name: [] for name, _ in methods}
  fields, info = {}, {}

  def config(name, overrides, seed, budget):
    by_epochs = name == "uniform" and not budget
    cfg = make_config(plan.model, name, seed, data_dir, quick,
                      budget_epochs=plan.epochs if by_epochs else 0.0,
                      budget_seconds=budget, eval_points=plan.points,
                      sampler=overrides)
    fields[name] = sampler_fields(cfg)
    return cfg

  for seed in seeds:
    for rep in range(plan.repeats):
      tag = f"_r{rep}" if plan.repeats > 1 else ""
      where = {name: os.path.join(workdir, plan.model, f"{name}_s{seed}{tag}")
               for name, _ in methods}
      done = _seed_runs(plan, methods,
                        functools.partial(config, seed=seed), where)
      for name, cfg, r, budget in done:
        r = {"method": name, "seed": seed,
             **({"repeat": rep} if plan.repeats > 1 else {}), **r,
             "budget_seconds": budget or r["train_seconds"]}
        runs[name].append(r)
        last = r["curve"][-1]
        info = {"batch_size": int(cfg.batch_size),
                "steps_per_dispatch": int(cfg.steps_per_dispatch),
                "steps_per_epoch": (last["step"] / last["epoch"]
                                    if last["epoch"] else None)}
        print(f"[{plan.model}] {name:<19} seed {seed}{tag}: {r['steps']:6d} "
              f"steps in {r['train_seconds']:6.1f} s ({r['ms_per_step']:.1f} "
              f"ms/step), train loss {last['train_loss']:.4f}, test accuracy "
              f"{last['test_accuracy']:.2%}, IS active "
              f"{r['is_active_fraction'] or 0:.2f}", flush=True)
  return runs, fields, info


def _seed_runs(plan: _Plan, methods, config, where):
  """``(name, config, result, budget)`` of each method on one seed.

  With ``plan.turn``, the methods train at once, taking turns of
  ``plan.turn`` training seconds (:mod:`experiments.benchmarks.turns`),
  each for ``plan.seconds``. Without, one after the other, uniform first:
  each method then trains for the seconds that uniform run took (unless
  the budget is in seconds), right after it, at nearly the same machine
  speed.
  """
  if plan.turn:
    cfgs = [(name, config(name, o, budget=plan.seconds))
            for name, o in methods]
    results = turns.take_turns(
        [functools.partial(run_one, cfg, where[name]) for name, cfg in cfgs],
        plan.turn)
    return [(name, cfg, r, plan.seconds)
            for (name, cfg), r in zip(cfgs, results)]
  done = []
  for name, overrides in methods:
    # 0: this uniform run's time is the seed's budget.
    budget = plan.seconds or (done[0][2]["train_seconds"] if done else 0.0)
    cfg = config(name, overrides, budget=budget)
    done.append((name, cfg, run_one(cfg, where[name]), budget))
  return done


def _calibrated(plan: _Plan, data_dir: str, quick: bool, seed: int,
                workdir: str) -> Tuple[_Plan, Dict[str, object]]:
  """``plan`` with a budget in seconds, for runs that take turns: the time
  of one uniform run of ``plan.epochs`` (not reported), unless the budget
  is in seconds already."""
  if not plan.turn or plan.seconds:
    return plan, {}
  cfg = make_config(plan.model, "uniform", seed, data_dir, quick,
                    budget_epochs=plan.epochs, eval_points=1)
  r = run_one(cfg, os.path.join(workdir, plan.model, "calibration"))
  print(f"[{plan.model}] budget: {r['train_seconds']:.1f} s, uniform's time "
        f"for {plan.epochs:g} epochs on seed {seed}", flush=True)
  return plan._replace(seconds=r["train_seconds"]), {
      "epochs": plan.epochs, "seed": seed, "steps": r["steps"],
      "train_seconds": r["train_seconds"]}


def _measure(plan: _Plan, methods, seeds, data_dir: str, quick: bool,
             workdir: str) -> Dict[str, object]:
  """One model's entry in the JSON: its budget, runs, summary and
  targets. ``methods``: ``(name, overrides)`` pairs, uniform first."""
  plan, calibration = _calibrated(plan, data_dir, quick, seeds[0], workdir)
  runs, fields, info = _train_model(plan, methods, seeds, data_dir, quick,
                                    workdir)
  budget = plan.seconds or statistics.median(
      r["train_seconds"] for r in runs["uniform"])
  summary = summarize_model(runs, budget)
  return {
      "title": KNOWN[plan.model].title,
      "config": f"experiments/configs/{plan.model}.py",
      "budget_seconds": budget,
      "budget_epochs_uniform": None if plan.seconds else plan.epochs,
      "eval_points": plan.points, "repeats": plan.repeats,
      "turn_seconds": plan.turn,
      **({"calibration": calibration} if calibration else {}), **info,
      "sampler_fields": fields,
      "summary": summary,
      "targets": model_targets(plan.model, summary),
      "runs": [r for name, _ in methods for r in runs[name]],
  }


def run(models: Sequence[str] = tuple(MODELS),
        methods: Sequence[str] = DEFAULT_METHODS, seeds: int = 3,
        budget_epochs: Optional[Dict[str, float]] = None,
        budget_seconds: Optional[Dict[str, float]] = None,
        eval_points: Optional[Dict[str, int]] = None, quick: bool = False,
        out: Optional[str] = None, workdir: Optional[str] = None,
        data_dir: Optional[str] = None, first_seed: int = 0,
        extra_methods: Optional[Dict[str, Dict[str, object]]] = None,
        argv: Optional[Sequence[str]] = None,
        merge: bool = False,
        repeats: Optional[Dict[str, int]] = None,
        turn_seconds: float = TURN_SECONDS) -> Dict[str, object]:
  """Runs the benchmark; writes and returns its JSON.

  ``budget_epochs``, ``budget_seconds`` and ``eval_points`` map model names
  to overrides of :data:`MODELS` (a model missing from ``budget_seconds``
  gets its budget from uniform's epochs). ``extra_methods`` adds methods
  (name -> overrides) to :data:`METHODS`, e.g. for a sweep on seeds from
  ``first_seed``. ``merge``: keep the models of an earlier run in ``out``
  that this run does not measure (each model's ``run`` says which command,
  date, code and load measured it; ``parts`` lists the runs). ``repeats``
  maps models to a number of repeats of each seed (1 by default): the seed's
  methods run again, uniform first, each repeat paired as one seed is, and
  every run counts in the medians. Over a budget of a few seconds the
  machine's drift between two runs is larger than the methods' difference;
  repeats average it out. ``turn_seconds`` > 0: a seed's methods train at
  once, taking turns of that many training seconds, so that they meet the
  same machine speed; each model's budget is then in seconds, from
  ``budget_seconds`` or else from one uniform run of its epochs on
  ``first_seed`` (``calibration`` in its entry, not in the medians).
  """
  all_methods = {**METHODS, **(extra_methods or {})}
  models = [ALIASES.get(m, m) for m in models]
  unknown = [m for m in models if m not in KNOWN]
  if unknown:
    raise ValueError(f"Unknown models {unknown}; known: {', '.join(KNOWN)}.")
  unknown = [m for m in methods if m not in all_methods]
  if unknown:
    raise ValueError(f"Unknown methods {unknown}; known: "
                     f"{', '.join(all_methods)} (or --add_method NAME=JSON).")
  if "uniform" not in methods:
    raise ValueError("methods must include uniform (the reference).")
  logging.set_verbosity(logging.WARNING)
  data_dir = data_dir or common.data_dir()
  if data_dir is None:
    raise FileNotFoundError("The datasets were not found: set JIS_DATA_DIR or "
                            "put them in ../shared/data.")
  out = out or os.path.join(common.RESULTS_DIR, "convergence.json")
  workdir = workdir or os.path.join(common.DEFAULT_OUT_DIR, "convergence_runs")
  result = {**common.header(argv), "format": FORMAT, "quick": quick,
            "seeds": seeds, "first_seed": first_seed,
            "methods": {m: all_methods[m] for m in methods},
            "jis_defaults": {k: repr(v) for k, v in
                             _importance_step_defaults().items()},
            "spike_rule": {"factor": SPIKE_FACTOR,
                           "after_epoch": SPIKE_AFTER_EPOCH},
            "models": {}}
  part = {k: result[k] for k in ("command", "date", "code", "load_start")}
  result["parts"] = [{**part, "models": list(models)}]
  if merge and os.path.exists(out):
    with open(out) as f:
      result = _merged(result, json.load(f), models)
  order = ["uniform"] + [m for m in methods if m != "uniform"]
  if turn_seconds < 0:
    raise ValueError(f"turn_seconds must be >= 0 (0: one run after the "
                     f"other); got {turn_seconds}.")
  plans = {m: _plan(m, quick, budget_epochs, budget_seconds, eval_points,
                    repeats, turn_seconds)
           for m in models}   # checked before any training
  for model, plan in plans.items():
    result["models"][model] = {
        **_measure(plan, [(m, all_methods[m]) for m in order],
                   range(first_seed, first_seed + seeds), data_dir, quick,
                   workdir),
        "run": {**part, "load_end": common.load_average()}}
    print(render(model, result["models"][model]), flush=True)
    # Written after every model, so a long run cut short keeps what it has.
    result["targets"] = targets({m: e["targets"]
                                 for m, e in result["models"].items()})
    common.write_json(result, out)
  print("\n" + targets_text(result["targets"]))
  print(f"wrote {out}")
  return result


# ----------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------

def fmt_range(s: Dict[str, Optional[float]], spec: str, pct: bool = False
              ) -> str:
  """``median [min–max]``, or – when nothing was measured."""
  if s.get("median") is None:
    return "–"
  f = (lambda v: f"{100 * v:{spec}}%") if pct else (lambda v: f"{v:{spec}}")
  if s.get("n", 2) < 2 or s["min"] == s["max"]:
    return f(s["median"])
  return f"{f(s['median'])} [{f(s['min'])}–{f(s['max'])}]"


def fmt_seconds(t: float) -> str:
  return f"{t:.1f} s" if t >= 10 else f"{t:.3g} s"


def fmt_reach(r: Dict[str, object]) -> str:
  """``12.3 s (0.45; 3/3)``: the median time, its fraction of the budget and
  how many seeds reached the target."""
  seeds = f"{r['reached']}/{r['n']}"
  if r["median"] is None:
    return f"never ({seeds})"
  return f"{fmt_seconds(r['median'])} ({r['fraction']:.2f}; {seeds})"


def fmt_weight(w: Dict[str, Optional[float]]) -> str:
  if w.get("max") is None:
    return "–"
  return f"{w['max']:.3g} / {w['mean']:.3g}"


def fmt_spikes(s: Dict[str, object]) -> str:
  worst = s.get("worst_ratio")
  return f"{s['count']} ({'–' if worst is None else f'{worst:.2f}×'})"


def render(model: str, entry: Dict[str, object]) -> str:
  """The table of one model: one row per method."""
  s = entry["summary"]
  rows = []
  for method, m in s["methods"].items():
    rows.append({
        "method": method,
        "train loss": fmt_range(m["train_loss"], ".4f"),
        "test accuracy": fmt_range(m["test_accuracy"], ".2f", pct=True),
        "t → uniform's loss": fmt_reach(m["time_to_uniform_final_loss"]),
        "t → uniform's accuracy": fmt_reach(
            m["time_to_uniform_final_accuracy"]),
        "ms/step": fmt_range(m["ms_per_step"], ".1f"),
        "IS active": fmt_range(m["is_active_fraction"], ".2f"),
        "max weight (max / mean)": fmt_weight(m["max_weight"]),
        "spikes (worst rise)": fmt_spikes(m["spikes"]),
    })
  budget = f"budget {fmt_seconds(entry['budget_seconds'])} of training"
  epochs = entry.get("budget_epochs_uniform")
  if epochs:
    budget += f" (uniform, {epochs:g} epochs)"
  turn = entry.get("turn_seconds")
  if turn:
    budget += f", methods in turns of {turn:g} s"
    reached = uniform_epochs(entry)
    if reached:
      budget += f" (uniform reached {reached:.1f} epochs, median)"
  return (f"\n{entry.get('title', model)} ({model}): {budget}; uniform's "
          f"final train loss {s['uniform_final_train_loss']:.4f}, test "
          f"accuracy {s['uniform_final_test_accuracy']:.2%}"
          f"{fmt_steal(s['methods'].values())}\n\n"
          + common.table(rows, list(rows[0])))


def uniform_epochs(entry: Dict[str, object]) -> Optional[float]:
  """The median over uniform's runs of the epochs each reached at the
  budget: in turns the budget is a calibration run's time, which a machine
  slower or faster at that moment makes more or fewer epochs than it names.
  None without uniform runs."""
  reached = [r["curve"][-1]["epoch"] for r in entry.get("runs", [])
             if r.get("method") == "uniform" and r.get("curve")]
  return statistics.median(reached) if reached else None


def fmt_steal(methods) -> str:
  """The CPU time the virtual machine's host took during the model's runs
  (``"; CPU steal ..."``), or "" where it was not recorded."""
  steal = [m.get("steal_fraction") or {} for m in methods]
  worst = [x["max"] for x in steal if x.get("max") is not None]
  if not worst:
    return ""
  median = statistics.median(x["median"] for x in steal
                             if x.get("median") is not None)
  return (f"; CPU steal (the host's share) {median:.1%} median, "
          f"{max(worst):.1%} in the worst run")


def _met(x: Optional[bool]) -> str:
  return "not run" if x is None else ("met" if x else "not met")


def targets_text(t: Dict[str, object]) -> str:
  """The four targets over the models run, one line each."""
  models = ", ".join(t["models"]) or "none"
  b = t["b"]
  ratio = ("" if b["train_loss_ratio"] is None
           else f" ({b['train_loss_ratio']:.2f}×)")
  failed = ("" if not t["a"]["failed"]
            else f" (not on {', '.join(t['a']['failed'])})")
  return "\n".join([
      f"Targets for default against uniform (models: {models}"
      f"{'' if t['all_four'] else '; not all four run'}):",
      f"- (a) median training loss ≤ uniform's and median test accuracy not "
      f"below uniform's median minus the seed spread, on every model: "
      f"{_met(t['a']['met'])}{failed}.",
      f"- (b) MNIST MLP training loss ≤ {b['target']}× uniform's: "
      f"{_met(b['met'])}{ratio}.",
      f"- (c) uniform's final test accuracy in ≤ {t['c']['target']} of the "
      f"budget on ≥ {t['c']['needed']} models: {_met(t['c']['met'])} "
      f"({', '.join(t['c']['models_reaching']) or 'none'}).",
      f"- (d) no loss spike (> {SPIKE_FACTOR:g}× between evaluations after "
      f"epoch {SPIKE_AFTER_EPOCH:g}) on any seed: {_met(t['d']['met'])}"
      f" ({', '.join(f'{m} {n}' for m, n in t['d']['spikes'].items())}).",
  ])


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

def _named_json(arg: str):
  name, sep, value = arg.partition("=")
  if not sep or not name:
    raise ValueError(f"--add_method wants NAME=JSON; got {arg!r}.")
  return name, json.loads(value)


def per_model(arg: Optional[str], models: Sequence[str], kind=float
              ) -> Dict[str, float]:
  """``"5"`` (every model) or ``"mnist_cnn=3,imdb_fasttext=2"`` -> a
  model -> value map."""
  if not arg:
    return {}
  out = {}
  for part in arg.split(","):
    name, sep, value = part.rpartition("=")
    name = ALIASES.get(name, name)
    if not sep:
      out.update({m: kind(value) for m in models})
    elif name not in KNOWN:
      raise ValueError(f"{part!r}: unknown model {name!r}; known: "
                       f"{', '.join(KNOWN)}.")
    else:
      out[name] = kind(value)
  return out


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="tiny: the runlocal variants (a slice of the data, "
                 f"smaller models) of {', '.join(QUICK_MODELS)}, 1 seed, "
                 f"{QUICK_BUDGET_EPOCHS:g} uniform epochs (a smoke test, not "
                 "a result)")
  p.add_argument("--models", default=None,
                 help=f"comma-separated, of {', '.join(KNOWN)} (default: "
                 f"the four of the README's table, {', '.join(MODELS)})")
  p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                 help=f"comma-separated, of {', '.join(METHODS)} and those "
                 "added with --add_method")
  p.add_argument("--seeds", type=int, default=None)
  p.add_argument("--first_seed", type=int, default=0)
  p.add_argument("--add_method", action="append", default=[],
                 metavar="NAME=JSON",
                 help="an extra method: its config.sampler overrides (or "
                 "top-level fields such as learning_rate) as JSON, e.g. "
                 "'ub_p5={\"score\": \"upper_bound\", \"presample\": 5}'"
                 " (name it in --methods too)")
  p.add_argument("--budget_epochs", default=None,
                 help="the budget in uniform epochs: one number for every "
                 "model or MODEL=EPOCHS,... (defaults: " + ", ".join(
                     f"{k} {v.budget_epochs:g}" for k, v in MODELS.items())
                 + ")")
  p.add_argument("--budget_seconds", default=None,
                 help="the budget in seconds of training, as --budget_epochs "
                 "(overrides epochs)")
  p.add_argument("--eval_points", default=None,
                 help="evaluations over the budget, as --budget_epochs")
  p.add_argument("--repeats", default=None,
                 help="runs of each seed (uniform first, each paired as a "
                 "seed is; all count in the medians), as --budget_epochs; "
                 "for budgets of seconds, where the machine's drift between "
                 "runs outweighs the methods' difference (default 1)")
  p.add_argument("--turn_seconds", type=float, default=TURN_SECONDS,
                 help="train a seed's methods at once, taking turns of this "
                 "many training seconds, so that they meet the same machine "
                 "speed; the budget is then in seconds, from --budget_seconds "
                 "or one uniform run of the epochs; 0: one run after the "
                 f"other, each seed's budget uniform's time (default "
                 f"{TURN_SECONDS:g})")
  p.add_argument("--out", default=None)
  p.add_argument("--workdir", default=None,
                 help="the runs' workdirs (default runs/benchmarks/"
                 "convergence_runs)")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--merge", action="store_true",
                 help="keep the models already in --out that this run does "
                 "not measure (same seeds and methods), e.g. to add the CNN "
                 "to a run of the other three")
  a = p.parse_args(argv[1:])
  models = ([ALIASES.get(m, m) for m in a.models.split(",")] if a.models
            else list(QUICK_MODELS if a.quick else MODELS))
  run(models=models, methods=a.methods.split(","),
      seeds=a.seeds or (1 if a.quick else 3),
      budget_epochs=per_model(a.budget_epochs, models),
      budget_seconds=per_model(a.budget_seconds, models),
      eval_points=per_model(a.eval_points, models, int), quick=a.quick,
      out=a.out or (os.path.join(common.DEFAULT_OUT_DIR,
                                 "convergence_quick.json") if a.quick
                    else os.path.join(common.RESULTS_DIR, "convergence.json")),
      workdir=a.workdir, data_dir=a.data_dir, first_seed=a.first_seed,
      extra_methods=dict(_named_json(x) for x in a.add_method), argv=argv,
      merge=a.merge, repeats=per_model(a.repeats, models, int),
      turn_seconds=a.turn_seconds)


if __name__ == "__main__":
  main()
