r"""Turns the benchmarks' JSON into ``docs/benchmarks.md`` (tables and plots).

  python -m experiments.benchmarks.report [--in_dir docs/benchmarks/results] \
      [--out docs/benchmarks.md] [--plots docs/benchmarks]

Reads the committed JSON in ``docs/benchmarks/results/`` (``--in_dir``):
``step_cost.json``, ``step_cost_bf16.json`` (bfloat16 scoring),
``convergence.json`` (the original library's four examples, uniform against
jis's defaults) and ``scoring_scale.json``; a missing one is a section left
out. With ``--quick`` it reads the ``*_quick.json`` smoke runs from
``runs/benchmarks/`` instead and leaves the README alone. Each section names
the machine, the command, the date and the load; the plots go to
``docs/benchmarks/``. It also fills the README's results block (between its
``benchmarks:start`` and ``benchmarks:end`` markers) with the headline
numbers: the four examples in one table beside the original library's.
"""

import argparse
import functools
import json
import os
import sys
from typing import Dict, Optional, Sequence

from experiments.benchmarks import common
from experiments.benchmarks import convergence
from experiments.benchmarks import scoring_scale
from experiments.benchmarks import step_cost


def _load(path: str) -> Optional[Dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def provenance(result: Dict) -> str:
  m = result["machine"]
  return (f"*Machine:* {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
          f"{m['backend']} backend ({m['device']}), jax {m['jax']}. "
          f"*Date:* {result['date']}. *Load average (1/5/15 min) at start:* "
          f"{result.get('load_start')}, at end: {result.get('load_end')}.\n\n"
          f"```bash\n{result['command']}\n```\n" + _parts(result))


def _parts(result: Dict) -> str:
  """For a result merged from several runs: each run's date and load."""
  parts = result.get("parts") or []
  if len(parts) < 2:
    return ""
  return "\nMerged from two or more runs: " + "; ".join(
      f"{','.join(p.get('models') or ['all models'])} on {p['date']} (load "
      f"at start {p.get('load_start')})" for p in parts) + ".\n"


def _plot(path: str, draw) -> Optional[str]:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  fig = draw(plt)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def step_cost_section(r: Dict, plots: str, rel: str,
                      name: str = "step_cost") -> str:
  low = r.get("score_dtype", "float32") != "float32"
  title = (f"## Step cost with {r.get('score_dtype')} scoring "
           "(`jis.low_precision`)\n" if low else
           "## Step cost against the floor\n")
  text = [title, provenance(r),
          f"K steps per dispatch (one `lax.scan`; K = {r['steps_per_dispatch']}"
          " for the MLP, fewer for the conv nets, column K), "
          f"state donated, {r['repeats']} interleaved repeats; medians, with "
          "the range of the per-repeat ratio in brackets. floor = "
          "t_f(B) + t_u(b); targets: active/floor ≤ 1.10, inactive/t_u ≤ 1.10. "
          f"WRN: depth {r['wrn']['depth']}, width {r['wrn']['width']}, "
          f"{r['wrn']['input']}×{r['wrn']['input']}×3 inputs (WRN-28-2 shrunk "
          "for the CPU).\n",
          step_cost.render(r), ""]
  met_a = sum(c["active_over_floor"] <= step_cost.TARGET for c in r["cells"])
  met_i = sum(c["inactive_over_t_u"] <= step_cost.TARGET for c in r["cells"])
  text.append(f"Active within 1.10 × floor in {met_a}/{len(r['cells'])} cells; "
              f"inactive within 1.10 × t_u in {met_i}/{len(r['cells'])}.\n")
  full = [c["active_over_full_floor"] for c in r["cells"]
          if "active_over_full_floor" in c]
  if low and full:
    text.append(f"t_f(B) and the IS steps score in {r['score_dtype']}; "
                "t_f(B) full is the model-precision scoring pass, timed in "
                "the same interleaving. The IS step costs "
                f"{min(full):.2f}–{max(full):.2f} × the model-precision floor "
                "t_f full + t_u.\n")

  def draw(plt):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for model in sorted({c["model"] for c in r["cells"]}):
      cells = [c for c in r["cells"] if c["model"] == model]
      axes[0].plot(range(len(cells)), [c["active_over_floor"] for c in cells],
                   "o-", label=model)
      axes[1].plot(range(len(cells)), [c["inactive_over_t_u"] for c in cells],
                   "o-", label=model)
      labels = [f"{c['b']}/{c['B']}" for c in cells]
    for ax, title in zip(axes, ("active / (t_f(B) + t_u(b))",
                                "inactive / t_u(b)")):
      ax.axhline(1.10, color="k", ls="--", lw=1)
      ax.axhline(1.0, color="gray", lw=0.5)
      ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
      ax.set_xlabel("b / B")
      ax.set_title(title)
      ax.legend()
    return fig
  p = _plot(os.path.join(plots, f"{name}.png"), draw)
  if p:
    text.append(f"![step cost]({rel}/{name}.png)\n")
  return "\n".join(text)


# The original library's examples page (keras-importance-sampling, Keras on
# a CPU), quoted from /work/shared/ANCHORS.md: seconds per epoch, uniform and
# importance sampling, and what the page reports per second.
ORIGINAL = {
    "mnist_mlp": ("4 s", "10 s", "IS after 3 epochs beats uniform after 20 "
                  "(loss and accuracy)"),
    "mnist_cnn": ("61 s", "197 s", "plotted against seconds (no per-second "
                  "comparison quoted)"),
    "reuters_mlp": ("1 s", "6–7 s", "learns faster per update, \"a lot "
                    "slower with respect to wall clock time\""),
    "imdb_fasttext": ("9 s", "59 s", "better generalisation, \"training time "
                      "is increased 6-fold\""),
}


def _convergence(r: Optional[Dict]) -> Optional[Dict]:
  """``r`` when it is in the layout this report reads, else None (older
  convergence JSON is skipped with a note)."""
  if r is not None and r.get("format") != convergence.FORMAT:
    print(f"skipping a convergence JSON in another layout "
          f"({r.get('format', 'convergence/1')}; this report reads "
          f"{convergence.FORMAT})", file=sys.stderr)
    return None
  return r


def _pct(v: Optional[float]) -> str:
  return "–" if v is None else f"{100 * v:.2f}%"


def _s_per_epoch(ms: Optional[float], entry: Dict) -> str:
  spe = entry.get("steps_per_epoch")
  return "" if ms is None or not spe else f"{ms * spe / 1e3:.3g}"


def _repeats(r, short: bool = False) -> str:
  """Which models ran each seed more than once (``--repeats``), or ""."""
  rep = {e.get("title", k): e["repeats"] for k, e in r["models"].items()
         if e.get("repeats", 1) > 1}
  if not rep:
    return ""
  each = ", ".join(f"{t} {n}×" for t, n in rep.items())
  if short:
    return f"; each seed run {each}"
  return (f" Each seed ran more than once on {each}: the seed's methods "
          "again, each repeat measured as a seed is, every run counted in "
          "the medians and ranges (over budgets of a few seconds the "
          "seeds' and the machine's noise outweighs the methods' "
          "difference).")


def _turns_rule(r) -> str:
  """How the models whose methods took turns got their budgets, or ""."""
  turns = {e.get("title", k): e for k, e in r["models"].items()
           if e.get("turn_seconds")}
  if not turns:
    return ""
  each = ", ".join(f"{t} {e['turn_seconds']:g} s" for t, e in turns.items())
  given = [t for t, e in turns.items() if "calibration" not in e]
  budget = ("uniform's training time for its epochs in one calibration run "
            "that is not counted")
  if given:
    budget = (f"given in seconds ({', '.join(given)})" if len(given) == len(
        turns) else budget + f", or given in seconds ({', '.join(given)})")
  return ("A seed's methods train at once, taking turns on the machine "
          f"({each} of training per turn), so that the methods compared meet "
          "the same machine speed; each runs for the model's budget in "
          f"seconds, {budget}. ")


def _budget_rule(r) -> str:
  """How the runs of ``r`` got their budgets: in turns (:func:`_turns_rule`),
  paired by seed (runs that record their own ``budget_seconds``) or at one
  budget per model."""
  rule = _turns_rule(r)
  models = {k: e for k, e in r["models"].items() if not e.get("turn_seconds")}
  if not models:
    return rule.strip()
  return rule + _sequential_rule(models, bool(rule))


def _budget_phrase(r) -> str:
  """The budget rule in a few words, for the README's block."""
  turns = [e for e in r["models"].values() if e.get("turn_seconds")]
  if len(turns) == len(r["models"]):
    budget = ("uniform's time for its epochs" if all(
        "calibration" in e for e in turns) else "in seconds")
    return (f"{budget}; a seed's methods train at once, taking turns on the "
            "machine")
  return ("uniform's time for its epochs, paired by seed where "
          "docs/benchmarks.md says so")


def _sequential_rule(models: Dict, after_turns: bool) -> str:
  """How models measured one method after the other got their budgets;
  ``after_turns``: the sentence follows :func:`_turns_rule`'s."""
  titles = {k: e.get("title", k) for k, e in models.items()}
  paired = [titles[k] for k, e in models.items()
            if e.get("runs") and all("budget_seconds" in x for x in e["runs"])]
  others = [t for t in titles.values() if t not in paired]
  median = ("each model's budget is uniform's training time for its epochs "
            "(median over seeds); every other method trains that many "
            "seconds.")
  pairing = ("seed by seed, uniform trains for the model's epochs and every "
             "other method then trains on the same seed for that run's time, "
             "each read at its own budget, so the methods compared meet "
             "nearly the same machine speed; the budget shown is the median "
             "over seeds.")
  capitalized = lambda text: text[0].upper() + text[1:]
  parts = []
  if paired:
    parts.append(f"One method after the other ({', '.join(paired)}): "
                 + pairing if after_turns else capitalized(pairing))
  if others and (paired or after_turns):
    before = "before that rule" if paired else "one method after the other"
    parts.append(f"Measured {before} ({', '.join(others)}): " + median)
  elif others:
    parts.append(capitalized(median))
  return " ".join(parts)


def four_model_table(r: Optional[Dict], method: str = "default") -> str:
  """One row per model of the original library's examples: uniform against
  ``method`` at the budget, beside the original's figures; a model not in
  ``r`` keeps its row, with the original's figures only."""
  rows = []
  for model, spec in convergence.MODELS.items():
    u_epoch, is_epoch, per_second = ORIGINAL[model]
    row = {"model": spec.title, "budget": "not run",
           "train loss, uniform → default": "–",
           "test accuracy, uniform → default": "–",
           "default reaches uniform's final accuracy": "–",
           "ms/step (s/epoch), uniform / default": "–",
           "IS active": "–", "max weight (max / mean)": "–",
           "original s/epoch, uniform / IS": f"{u_epoch} / {is_epoch}",
           "original, per second": per_second}
    entry = (r or {}).get("models", {}).get(model)
    methods = entry["summary"]["methods"] if entry else {}
    if "uniform" in methods and method in methods:
      u, d = methods["uniform"], methods[method]
      epochs = (entry.get("budget_epochs_uniform")
                or entry.get("calibration", {}).get("epochs"))
      ul, dl = u["train_loss"]["median"], d["train_loss"]["median"]
      um, dm = u["ms_per_step"]["median"], d["ms_per_step"]["median"]
      ue, de = _s_per_epoch(um, entry), _s_per_epoch(dm, entry)
      row.update({
          "budget": (convergence.fmt_seconds(entry["budget_seconds"])
                     + (f" ({epochs:g} epochs)" if epochs else "")),
          "train loss, uniform → default":
              f"{ul:.4f} → {dl:.4f} ({dl / ul:.2f}×)",
          "test accuracy, uniform → default":
              f"{_pct(u['test_accuracy']['median'])} → "
              f"{_pct(d['test_accuracy']['median'])}",
          "default reaches uniform's final accuracy": convergence.fmt_reach(
              d["time_to_uniform_final_accuracy"]),
          "ms/step (s/epoch), uniform / default":
              f"{um:.1f} / {dm:.1f}" + (f" ({ue} / {de})" if ue else ""),
          "IS active": convergence.fmt_range(d["is_active_fraction"], ".2f"),
          "max weight (max / mean)": convergence.fmt_weight(d["max_weight"]),
      })
    rows.append(row)
  return common.table(rows, list(rows[0]))


def _targets_sentence(t: Dict) -> str:
  """The overall targets in one sentence."""
  def met(x):
    return "not run" if x is None else ("met" if x else "**not met**")
  b = t["b"]
  ratio = ("" if b["train_loss_ratio"] is None
           else f", {b['train_loss_ratio']:.2f}×")
  return (f"Targets for default against uniform ({len(t['models'])} of 4 "
          f"models run): (a) loss no higher and accuracy within seed noise "
          f"on every model: {met(t['a']['met'])}; (b) MNIST MLP loss ≤ "
          f"{b['target']}× uniform's: {met(b['met'])}{ratio}; (c) uniform's "
          f"final accuracy in ≤ {t['c']['target']} of the budget on ≥ "
          f"{t['c']['needed']} models: {met(t['c']['met'])} "
          f"({', '.join(t['c']['models_reaching']) or 'none'}); (d) no loss "
          f"spikes: {met(t['d']['met'])}.")


def _model_targets_sentence(t: Dict) -> str:
  a, c, d = t["a"], t["c"], t["d"]
  frac = c["time_fraction_to_uniform_final_accuracy"]
  parts = [
      f"(a) training loss {'≤' if a['train_loss_met'] else '>'} uniform's "
      f"({t['train_loss_ratio']:.2f}×), test accuracy "
      f"{'not below' if a['test_accuracy_met'] else 'below'} uniform's median "
      f"minus the seed spread ({_pct(a['test_accuracy_floor'])}, spread "
      f"{100 * a['seed_spread']:.2f} points): "
      f"{'met' if a['met'] else 'not met'}"]
  if "b" in t:
    parts.append(f"(b) loss ratio {t['b']['train_loss_ratio']:.2f} ≤ "
                 f"{t['b']['target']}: {'met' if t['b']['met'] else 'not met'}")
  parts.append(f"(c) uniform's final test accuracy at "
               f"{'never' if frac is None else f'{frac:.2f}'} of the budget "
               f"(≤ {c['target']}: {'met' if c['met'] else 'not met'})")
  worst = d["worst_ratio"]
  parts.append(f"(d) {d['spikes']} spike(s), worst rise "
               f"{'–' if worst is None else f'{worst:.2f}×'}: "
               f"{'met' if d['met'] else 'not met'}")
  return f"Targets ({t['method']} vs uniform): " + "; ".join(parts) + "."


def convergence_plot(model: str, entry: Dict, path: str) -> Optional[str]:
  """Training loss (log scale) and test accuracy against training seconds:
  the median over seeds and the min–max band, per method."""
  runs = {}
  for run in entry["runs"]:
    runs.setdefault(run["method"], []).append(run)
  budget = entry["budget_seconds"]
  grid = [budget * i / 100 for i in range(101)]

  def draw(plt):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    low = []
    for method, seeds in runs.items():
      loss = convergence.band(seeds, "train_loss", grid, log=True)
      acc = convergence.band(seeds, "test_accuracy", grid)
      (line,) = axes[0].semilogy(grid, loss["median"], label=method)
      axes[0].fill_between(grid, loss["min"], loss["max"], alpha=0.2,
                           color=line.get_color())
      pct = {k: [100 * v for v in vs] for k, vs in acc.items()}
      axes[1].plot(grid, pct["median"], label=method, color=line.get_color())
      axes[1].fill_between(grid, pct["min"], pct["max"], alpha=0.2,
                           color=line.get_color())
      low.append(min(pct["min"][10:] or pct["min"]))
    top = max(100 * r["curve"][-1]["test_accuracy"]
              for seeds in runs.values() for r in seeds)
    axes[1].set_ylim(max(0.0, min(low) - 0.5), min(100.0, top + 0.5))
    title = entry.get("title", model)
    axes[0].set_title(f"{title}: training loss (whole split)")
    axes[1].set_title(f"{title}: test accuracy (%)")
    for ax in axes:
      ax.set_xlabel("training seconds")
      ax.axvline(budget, color="gray", lw=0.5)
    axes[1].legend(fontsize=8)
    return fig
  return _plot(path, draw)


def _commits(r: Dict, digits: int) -> str:
  """``commit X``, or ``commits X and Y`` for a result merged from runs of
  different commits (each part's, in order), marking uncommitted changes."""
  codes = [p.get("code") or {} for p in r.get("parts") or []] or [
      r.get("code") or {}]
  names = []
  for code in codes:
    name = str(code.get("commit"))[:digits] + (
        " (with uncommitted changes)" if code.get("dirty") else "")
    if name not in names:
      names.append(name)
  return ("commit " if len(names) == 1 else "commits ") + " and ".join(names)


def convergence_section(r: Dict, plots: str, rel: str) -> str:
  methods = ", ".join(
      f"`{m}` ({'no options: jis defaults' if not o else json.dumps(o)})"
      for m, o in r["methods"].items())
  code = r.get("code") or {}
  text = ["## Convergence per second: the original library's four examples\n",
          provenance(r),
          f"*Code:* jis {code.get('jis')}, {_commits(r, 40)}.\n",
          f"Methods: {methods}. {r['seeds']} seed(s) each (from seed "
          f"{r['first_seed']}).{_repeats(r)} {_budget_rule(r)} Training "
          "clock only "
          "(compilation, evaluation "
          "and logging excluded). Training loss: the whole training split in "
          "inference mode; values at the budget are median [min–max] over "
          "seeds, interpolated between evaluations. *t → uniform's loss / "
          "accuracy*: median time to uniform's final value (a seed that never "
          "reaches it counts as never), its fraction of the budget, and the "
          "seeds that reached it. *IS active*: the fraction of importance "
          "steps (`is/active`, from a training line per dispatch). *max "
          "weight*: over the importance steps, the largest (per dispatch, "
          "exact at one importance step per dispatch) and the median over "
          "seeds of the mean. *spikes*: rises of the training loss of more "
          f"than {r['spike_rule']['factor']:g}× between consecutive "
          f"evaluations after epoch {r['spike_rule']['after_epoch']:g}, "
          "summed over seeds, and the worst rise seen.\n"]
  for model in convergence.MODELS:
    entry = r["models"].get(model)
    if entry is None:
      continue
    text.append(f"### {entry.get('title', model)}\n")
    text.append(f"`{entry['config']}`, b = {entry.get('batch_size')}, "
                f"{entry.get('steps_per_dispatch')} step(s) per dispatch, "
                f"{entry['eval_points']} evaluations over the budget.\n")
    text.append(convergence.render(model, entry).strip() + "\n")
    if entry.get("targets"):
      text.append(_model_targets_sentence(entry["targets"]) + "\n")
    name = f"convergence_{model}.png"
    if convergence_plot(model, entry, os.path.join(plots, name)):
      text.append(f"![convergence {model}]({rel}/{name})\n")
  text.append("### Beside the original library\n")
  text.append(four_model_table(r) + "\n")
  if r.get("targets"):
    text.append(convergence.targets_text(r["targets"]) + "\n")
  return "\n".join(text)


def scoring_section(r: Dict, plots: str, rel: str) -> str:
  text = ["## Scaling of scoring\n", provenance(r),
          f"b = {r['b']}; one jis step with IS on every step, all B scored at "
          f"once or in chunks of {r['chunk']} (`forward_batch_size`). Each row "
          "runs in a fresh process. *peak Δ*: the resident memory the step's "
          "execution touched beyond what was resident before it (median of "
          f"{r.get('mem_steps', '?')} steps): activations and temporaries, "
          "not the presample batch, which is an argument (*presample MiB*). "
          "*peak RSS*: the process's absolute high-water mark over that step. "
          "*XLA est.*: `compiled.memory_analysis()` temporaries, a "
          "compile-time estimate that on XLA:CPU misses the intermediates of "
          "library fusions (the MLP's scoring pass).\n",
          scoring_scale.render(r), ""]

  def draw(plt):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for model in sorted({x["model"] for x in r["rows"]}):
      for mode, ls in (("all_at_once", "-"), ("chunked", "--")):
        rows = [x for x in r["rows"] if x["model"] == model and x["mode"] == mode]
        bs = [x["B"] for x in rows]
        axes[0].loglog(bs, [x["step_ms"] for x in rows], ls, marker="o",
                       label=f"{model} {mode}")
        delta = [x.get("peak_delta_bytes") for x in rows]
        if all(d is not None for d in delta):
          axes[1].loglog(bs, [max(d, 2**16) / 2**20 for d in delta], ls,
                         marker="o", label=f"{model} {mode}")
    presample = {x["B"]: x["presample_bytes"] / 2**20 for x in r["rows"]
                 if x.get("presample_bytes")}
    if presample:   # the same for the MNIST models: drawn once
      bs = sorted(presample)
      axes[1].loglog(bs, [presample[k] for k in bs], ":", color="gray",
                     label="presample batch (argument)")
    axes[0].set_title("step time (ms)")
    axes[1].set_title("measured peak memory of the step, Δ RSS (MiB)")
    for ax in axes:
      ax.set_xlabel("presample B")
      ax.legend(fontsize=7)
    return fig
  p = _plot(os.path.join(plots, "scoring_scale.png"), draw)
  if p:
    text.append(f"![scoring scale]({rel}/scoring_scale.png)\n")
  return "\n".join(text)


def build(in_dir: str = common.RESULTS_DIR, out: str = "docs/benchmarks.md",
          plots: Optional[str] = None, quick: bool = False) -> str:
  """Writes ``out`` (and its plots) from the JSON in ``in_dir``; a section
  whose JSON is missing is left out."""
  suffix = "_quick" if quick else ""
  plots = plots or os.path.join(os.path.dirname(out) or ".", "benchmarks")
  rel = os.path.relpath(plots, os.path.dirname(os.path.abspath(out)) or ".")
  parts = ["# Benchmarks\n",
           "Generated by `python -m experiments.benchmarks.report` from the "
           f"JSON in `{in_dir}` that the benchmark scripts write; each section "
           "names its machine, command, date and load. CPU timings on a "
           "shared 2-core machine are noisy: read the medians with their "
           "ranges.\n"]
  sections = [("step_cost", step_cost_section),
              ("step_cost_bf16", functools.partial(step_cost_section,
                                                   name="step_cost_bf16")),
              ("convergence", convergence_section),
              ("scoring_scale", scoring_section)]
  for name, section in sections:
    r = _load(os.path.join(in_dir, f"{name}{suffix}.json"))
    if name == "convergence":
      r = _convergence(r)
    if r is not None:
      parts.append(section(r, plots, rel))
  text = "\n".join(parts)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  return text


README_START = "<!-- benchmarks:start (python -m experiments.benchmarks.report) -->"
README_END = "<!-- benchmarks:end -->"


def _range(values: Sequence[float]) -> str:
  return f"{min(values):.2f}–{max(values):.2f}"


def readme_summary(in_dir: str = common.RESULTS_DIR,
                   plots_rel: str = "docs/benchmarks", suffix: str = "") -> str:
  """The README's results: the headline numbers of each benchmark JSON."""
  lines = []
  sc = _load(os.path.join(in_dir, f"step_cost{suffix}.json"))
  if sc:
    m, cells = sc["machine"], sc["cells"]
    act = [c["active_over_floor"] for c in cells]
    ina = [c["inactive_over_t_u"] for c in cells]
    models = ", ".join(sorted({c["model"] for c in cells}))
    lines.append(
        f"- **Step cost** ({models}; b ∈ {sorted({c['b'] for c in cells})}, "
        f"B/b ∈ {sorted({c['presample'] for c in cells})}; {m['cores']}-core "
        f"{m['backend']}, {sc['date'][:10]}): with importance sampling on, "
        f"the jis step costs {_range(act)}× the algorithm's floor "
        f"t_f(B) + t_u(b) ({sum(a <= step_cost.TARGET for a in act)}/"
        f"{len(act)} within 1.10×); with it off, {_range(ina)}× the plain "
        f"step ({sum(i <= step_cost.TARGET for i in ina)}/{len(ina)} within "
        "1.10×).")
    for e in sc.get("loop", []):
      if "uniform_loop_over_bare" in e:
        lines.append(
            f"  The training loop ({e['model']}, b = {e['b']}, "
            f"{e['steps_per_dispatch']} step(s) per dispatch, data gathering "
            f"included) costs {e['uniform_loop_over_bare']:.2f}× the bare "
            f"uniform step and {e['active_loop_over_bare']:.2f}× the bare IS "
            "step per epoch.")
  low = _load(os.path.join(in_dir, f"step_cost_bf16{suffix}.json"))
  if low:
    for model in sorted({c["model"] for c in low["cells"]}):
      cells = [c for c in low["cells"] if c["model"] == model
               and "t_f_full_ms" in c]
      if not cells:
        continue
      scoring = [c["t_f_ms"] / c["t_f_full_ms"] for c in cells]
      full = [c["active_over_full_floor"] for c in cells]
      per_u = [c["active_ms"] / c["t_u_ms"] for c in cells]
      lines.append(
          f"- **{low['score_dtype']} scoring** (`jis.low_precision`, "
          f"{model}, {low['date'][:10]}): the scoring pass takes "
          f"{_range(scoring)}× its time at the model's precision; the IS "
          f"step costs {_range(full)}× the model-precision floor, "
          f"{_range(per_u)} uniform steps.")
  cv = _convergence(_load(os.path.join(in_dir, f"convergence{suffix}.json")))
  if cv:
    m = cv["machine"]
    lines.append(
        f"- **Convergence per second**, the original library's four examples "
        f"(real data, {cv['seeds']} seed{'s' if cv['seeds'] != 1 else ''}"
        f"{_repeats(cv, short=True)}, uniform against jis's defaults at "
        f"equal training time; {m['cores']}-core {m['backend']}, "
        f"{cv['date'][:10]}, {_commits(cv, 7)}): medians "
        f"over seeds at the budget ({_budget_phrase(cv)}); the "
        "original's figures are from its examples page (Keras, CPU).\n")
    lines.append("  " + four_model_table(cv).replace("\n", "\n  ") + "\n")
    if cv.get("targets"):
      lines.append(f"  {_targets_sentence(cv['targets'])}\n")
    figures = [f"[{e.get('title', k)}]({plots_rel}/convergence_{k}.png)"
               for k, e in cv["models"].items()]
    lines.append(f"  Figures: {', '.join(figures)}. Command: "
                 f"`{cv['command']}` (tables per model in "
                 "docs/benchmarks.md).\n")
  ss = _load(os.path.join(in_dir, f"scoring_scale{suffix}.json"))
  if ss:
    parts = []
    for model in sorted({r["model"] for r in ss["rows"]}):
      rows = [r for r in ss["rows"] if r["model"] == model]
      big = max(r["B"] for r in rows)
      at = {r["mode"]: r for r in rows if r["B"] == big}
      small = min(r["B"] for r in rows)
      first = {r["mode"]: r for r in rows if r["B"] == small}
      mib = lambda r: (r.get("peak_delta_bytes") or 0) / 2**20
      parts.append(
          f"{model}: {mib(first['all_at_once']):.0f} MiB at B = {small}; at "
          f"B = {big}, {mib(at['all_at_once']):.0f} MiB scoring all at once "
          f"against {mib(at['chunked']):.0f} MiB in chunks of "
          f"{at['chunked']['forward_batch_size']}")
    lines.append(
        f"- **Scaling of scoring** (b = {ss['b']}, peak memory the step's "
        f"execution touches, measured as Δ RSS in a fresh process per row; "
        f"{ss['date'][:10]}): " + "; ".join(parts) + ".")
  return "\n".join(lines) + "\n"


def update_readme(path: str, summary: str) -> None:
  """Replaces the text between the README's benchmark markers."""
  with open(path) as f:
    text = f.read()
  if README_START not in text or README_END not in text:
    raise ValueError(f"{path} has no {README_START!r} ... {README_END!r} "
                     "block to fill; add the two marker lines.")
  head, rest = text.split(README_START, 1)
  _, tail = rest.split(README_END, 1)
  with open(path, "w") as f:
    f.write(f"{head}{README_START}\n{summary}{README_END}{tail}")


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--in_dir", default=None,
                 help=f"the JSON (default {common.RESULTS_DIR}, committed; "
                 f"with --quick {common.DEFAULT_OUT_DIR})")
  p.add_argument("--out", default="docs/benchmarks.md")
  p.add_argument("--plots", default=None)
  p.add_argument("--quick", action="store_true",
                 help="read the *_quick.json files")
  p.add_argument("--readme", default="README.md",
                 help="fill this README's benchmark block ('' to skip; "
                 "skipped with --quick)")
  a = p.parse_args(argv[1:])
  in_dir = a.in_dir or (common.DEFAULT_OUT_DIR if a.quick
                        else common.RESULTS_DIR)
  build(in_dir, a.out, a.plots, a.quick)
  print(f"wrote {a.out}")
  if a.readme and not a.quick:
    plots = a.plots or os.path.join(os.path.dirname(a.out) or ".", "benchmarks")
    rel = os.path.relpath(plots, os.path.dirname(os.path.abspath(a.readme)))
    update_readme(a.readme, readme_summary(in_dir, rel))
    print(f"updated {a.readme}")


if __name__ == "__main__":
  main()
