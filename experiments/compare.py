"""Compares runs: training loss and test error against wall-clock and epochs.

    python -m experiments.compare runs/mnist_mlp_uniform runs/mnist_mlp_is \
        --out mnist_mlp.png [--budgets=30,60] [--labels=uniform,IS]

Reads each workdir's ``metrics.jsonl`` and draws a 2x2 figure, the figures of
the original library's examples page: the loss on the whole training split
(inference mode) and the test error, both on log scales, against seconds of
training (evaluation excluded) and against epochs. Prints a table of every run at
matched training-time budgets (the last evaluation within each budget) and
writes it next to the figure as ``<out>.md``.
"""

import json
import os
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "compare.png", "Where to write the figure (PNG).")
flags.DEFINE_list("budgets", [], "Training-time budgets in seconds for the "
                  "table; default: a quarter, half, three quarters and all of "
                  "the shortest run.")
flags.DEFINE_list("labels", [], "One label per run; default: the workdir names.")


def load_evaluations(workdir: str) -> List[Dict]:
  """The evaluation records of a run, in step order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir!r} the "
                            "workdir of an experiments.main run?")
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  evals = [r for r in records if "eval/test_accuracy" in r]
  if not evals:
    raise ValueError(f"{path} holds no evaluation yet.")
  return sorted(evals, key=lambda r: (r["step"], r["train_seconds"]))


def _at_budget(evals: Sequence[Dict], seconds: float) -> Optional[Dict]:
  within = [r for r in evals if r["train_seconds"] <= seconds + 1e-9]
  return within[-1] if within else None


def default_budgets(runs: Dict[str, List[Dict]]) -> List[float]:
  """A quarter, half, three quarters and all of the shortest run."""
  shortest = min(evals[-1]["train_seconds"] for evals in runs.values())
  return [shortest * f for f in (0.25, 0.5, 0.75, 1.0)]


def table(runs: Dict[str, List[Dict]], budgets: Sequence[float]) -> str:
  """A markdown table of every run at every budget."""
  lines = ["| budget (s) | run | step | epochs | train loss | test loss | "
           "test error |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
  for budget in budgets:
    for label, evals in runs.items():
      r = _at_budget(evals, budget)
      if r is None:
        lines.append(f"| {budget:.1f} | {label} | - | - | - | - | - |")
        continue
      lines.append(
          f"| {budget:.1f} | {label} | {r['step']} | {r['epoch']:.2f} | "
          f"{r['eval/train_loss']:.4f} | {r['eval/test_loss']:.4f} | "
          f"{100 * (1 - r['eval/test_accuracy']):.2f}% |")
  return "\n".join(lines)


def plot(runs: Dict[str, List[Dict]], out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  rows = [("eval/train_loss", "training loss (whole train split)"),
          ("eval/test_accuracy", "test error (%)")]
  cols = [("train_seconds", "training time (s)"), ("epoch", "epochs")]
  for i, (key, ylabel) in enumerate(rows):
    for j, (xkey, xlabel) in enumerate(cols):
      ax = axes[i][j]
      for label, evals in runs.items():
        x = [r[xkey] for r in evals]
        y = [r[key] if key != "eval/test_accuracy" else 100 * (1 - r[key])
             for r in evals]
        ax.plot(x, y, marker=".", label=label)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      # Log scales: both fall by orders of magnitude from the untrained model.
      ax.set_yscale("log")
      ax.grid(True, alpha=0.3)
      ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def compare(workdirs: Sequence[str], out: str,
            budgets: Optional[Sequence[float]] = None,
            labels: Optional[Sequence[str]] = None) -> str:
  """Writes the figure to ``out`` and the table to ``<out>.md``; returns the
  table."""
  if not workdirs:
    raise ValueError("Give at least one workdir to compare.")
  labels = list(labels or [os.path.basename(os.path.normpath(w))
                           for w in workdirs])
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} runs.")
  if len(set(labels)) != len(labels):
    raise ValueError(f"Labels must differ; got {labels} (pass --labels).")
  runs = {label: load_evaluations(w) for label, w in zip(labels, workdirs)}
  budgets = [float(b) for b in budgets] if budgets else default_budgets(runs)
  plot(runs, out)
  text = table(runs, budgets)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(text + "\n")
  return text


def main(argv):
  text = compare(argv[1:], FLAGS.out, FLAGS.budgets, FLAGS.labels)
  print(text)
  print(f"\nFigure: {os.path.abspath(FLAGS.out)}")


if __name__ == "__main__":
  app.run(main)
