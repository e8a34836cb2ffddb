r"""Turns the benchmarks' JSON into ``docs/benchmarks.md`` (tables and plots).

  python -m experiments.benchmarks.report [--in_dir runs/benchmarks] \
      [--out docs/benchmarks.md] [--plots docs/benchmarks]

Reads ``step_cost.json``, ``step_cost_bf16.json`` (bfloat16 scoring),
``convergence.json``, ``convergence_cnn.json``
(the CNN run separately), ``convergence_cnn_long.json`` (the CNN at a longer
budget) and ``scoring_scale.json`` (the ``*_quick.json`` ones with
``--quick``) where present, and names the
machine, the command, the date and the load of each. It also fills the
README's results block (between its ``benchmarks:start`` and
``benchmarks:end`` markers) with the headline numbers.
"""

import argparse
import functools
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

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
          f"```bash\n{result['command']}\n```\n")


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


def targets_sentence(t: Dict) -> str:
  """The issue's targets for upper-bound IS, met or not, in one sentence."""
  frac = t["time_fraction_to_uniform_final"]
  budget = ("" if t["budget_is_10_uniform_epochs"]
            else ", budget not 10 uniform epochs")
  name = {"upper_bound": "upper-bound IS",
          "upper_bound_bf16": "upper-bound IS, bfloat16 scoring"}.get(
              t.get("method", "upper_bound"), t.get("method"))
  return (f"Targets ({name} vs uniform{budget}): training-loss ratio "
          f"{t['train_loss_ratio']:.3f} (target ≤ 0.2: "
          f"{'met' if t['train_loss_met'] else 'not met'}); test error "
          f"{t['test_error_upper_bound']:.2%} vs {t['test_error_uniform']:.2%} "
          f"({'met' if t['test_error_met'] else 'not met'}); time to uniform's "
          f"final loss {'never' if frac is None else f'{frac:.2f}'} of the "
          f"budget (target ≤ 0.33: {'met' if t['time_met'] else 'not met'}).")


# The convergence JSON files, each with the tag its plots and heading get.
CONVERGENCE_FILES = (("convergence", ""), ("convergence_cnn", ""),
                     ("convergence_cnn_long", "_long"))


def convergence_section(r: Dict, plots: str, rel: str, tag: str = "") -> str:
  heading = " (longer budget)" if tag == "_long" else ""
  text = [f"## Convergence per second{heading}\n", provenance(r),
          f"{r['seeds']} seeds per method; training clock (evaluation and "
          "compilation excluded); loss on the whole training set in inference "
          "mode and test error, median [min–max] over seeds, interpolated "
          "between evaluations.\n"]
  for model, entry in r["models"].items():
    text.append(convergence.render(model, entry))
    for t in (entry.get("targets"), entry.get("targets_bf16")):
      if t:
        text.append(f"\n{targets_sentence(t)}\n")

    def draw(plt, entry=entry, model=model):
      fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
      for method, m in entry["summary"]["methods"].items():
        ts = [p["t"] for p in m["points"]]
        axes[0].semilogy(ts, [p["train_loss"]["median"] for p in m["points"]],
                         label=method)
        axes[0].fill_between(ts, [p["train_loss"]["min"] for p in m["points"]],
                             [p["train_loss"]["max"] for p in m["points"]],
                             alpha=0.15)
        axes[1].plot(ts, [100 * p["test_error"]["median"] for p in m["points"]],
                     label=method)
      axes[0].set_title(f"{model}: training loss (whole set)")
      axes[1].set_title(f"{model}: test error (%)")
      for ax in axes:
        ax.set_xlabel("training seconds")
      axes[1].legend(fontsize=7)
      return fig
    name = f"convergence_{model}{tag}.png"
    if _plot(os.path.join(plots, name), draw):
      text.append(f"![convergence {model}{tag}]({rel}/{name})\n")
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


def build(in_dir: str = common.DEFAULT_OUT_DIR, out: str = "docs/benchmarks.md",
          plots: Optional[str] = None, quick: bool = False) -> str:
  suffix = "_quick" if quick else ""
  plots = plots or os.path.join(os.path.dirname(out) or ".", "benchmarks")
  rel = os.path.relpath(plots, os.path.dirname(os.path.abspath(out)) or ".")
  parts = ["# Benchmarks\n",
           "Generated by `python -m experiments.benchmarks.report` from the "
           "JSON the benchmark scripts write; each section names its machine, "
           "command, date and load. CPU timings on a shared 2-core machine are "
           "noisy: read the medians with their ranges.\n"]
  sections = [("step_cost", step_cost_section),
              ("step_cost_bf16", functools.partial(step_cost_section,
                                                   name="step_cost_bf16"))]
  sections += [(name, functools.partial(convergence_section, tag=tag))
               for name, tag in CONVERGENCE_FILES]
  sections.append(("scoring_scale", scoring_section))
  for name, section in sections:
    r = _load(os.path.join(in_dir, f"{name}{suffix}.json"))
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


def readme_summary(in_dir: str = common.DEFAULT_OUT_DIR,
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
  for name, tag in CONVERGENCE_FILES:
    cv = _load(os.path.join(in_dir, f"{name}{suffix}.json"))
    for model, entry in (cv or {}).get("models", {}).items():
      methods = entry["summary"]["methods"]
      budget = entry["budget_seconds"]
      epochs = entry.get("budget_epochs_uniform")
      lines.append(
          f"- **Convergence per second**, {model} (real MNIST, {cv['seeds']} "
          f"seeds, budget {budget:.0f} s of training"
          f"{f' = {epochs:g} uniform epochs' if epochs else ''}; "
          f"{cv['machine']['cores']}-core {cv['machine']['backend']}, "
          f"{cv['date'][:10]}): median [min–max] over seeds at the budget.\n")
      rows = []
      for method, mm in methods.items():
        last = mm["points"][-1]
        tl, te = last["train_loss"], last["test_error"]
        reach = mm["time_to_uniform_final"]["median"]
        rows.append({
            "method": method,
            "train loss": f"{tl['median']:.4f} [{tl['min']:.4f}–{tl['max']:.4f}]",
            "test error": f"{te['median']:.2%} [{te['min']:.2%}–{te['max']:.2%}]",
            "ms/step": f"{1e3 * budget / max(mm['steps']['median'], 1):.1f}",
            "time to uniform's final loss": (
                "never" if reach is None else f"{reach:.1f} s"),
        })
      table = common.table(rows, list(rows[0]))
      lines.append("  " + table.replace("\n", "\n  ") + "\n")
      for t in (entry.get("targets"), entry.get("targets_bf16")):
        if t:
          lines.append(f"  {targets_sentence(t)}\n")
      lines.append(f"  ![convergence {model}{tag}]({plots_rel}/convergence_"
                   f"{model}{tag}.png)\n")
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
  p.add_argument("--in_dir", default=common.DEFAULT_OUT_DIR)
  p.add_argument("--out", default="docs/benchmarks.md")
  p.add_argument("--plots", default=None)
  p.add_argument("--quick", action="store_true",
                 help="read the *_quick.json files")
  p.add_argument("--readme", default="README.md",
                 help="fill this README's benchmark block ('' to skip; "
                 "skipped with --quick)")
  a = p.parse_args(argv[1:])
  build(a.in_dir, a.out, a.plots, a.quick)
  print(f"wrote {a.out}")
  if a.readme and not a.quick:
    plots = a.plots or os.path.join(os.path.dirname(a.out) or ".", "benchmarks")
    rel = os.path.relpath(plots, os.path.dirname(os.path.abspath(a.readme)))
    update_readme(a.readme, readme_summary(a.in_dir, rel))
    print(f"updated {a.readme}")


if __name__ == "__main__":
  main()
