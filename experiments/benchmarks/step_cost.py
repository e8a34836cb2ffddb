r"""Step cost: the jis step against the unwrapped step and the algorithm's floor.

For each model, batch size b and presample factor (B = presample · b), times
four compiled programs, each running ``--steps_per_dispatch`` (K) steps in one
``lax.scan`` (as the experiments' loop does, so dispatch overhead is spread
over K steps), jitted with the carried state donated (``donate_argnums=0``),
timed to ``block_until_ready`` after warm-up (compilation and the first run
excluded), interleaved round-robin and repeated:

- ``t_u(b)``: the experiments' ``train_step`` on b examples, weights 1
  (the unwrapped uniform step);
- ``t_f(B)``: the scoring pass alone, ``logits_fn`` on B examples in
  inference mode plus the closed-form upper-bound score (nothing donated:
  it updates no state; its scores are summed into the carry so that no step
  is hoisted out of the loop);
- ``active``: ``jis.importance_step(..., condition=jis.warmup(0))``, IS on
  every step through a traced predicate (both branches compiled);
- ``inactive``: ``condition=jis.when_variance_reduced(1e30)``, never crossed;
  the ``train_step`` hands back ``is/logits`` so uniform steps score without
  a forward pass. (``tau_threshold=0`` or ``inf`` would be constant
  conditions, which compile one branch and no ``lax.cond``.)

Every program returns the mean of its metrics over the K steps, as the
experiments' loop does, so no metric is dead code. Inputs are random float
batches already on the device (no data gathering); the targets are
``active / (t_f(B) + t_u(b)) <= 1.10`` and ``inactive / t_u(b) <= 1.10``.

It then runs the experiments' training loop (``experiments.train``, real
MNIST on device: gathering, preprocessing, logging included, evaluation and
compilation excluded) for a few hundred steps, uniform and IS-active, and
compares its per-epoch time with the bare step's.

  python -m experiments.benchmarks.step_cost --quick
  python -m experiments.benchmarks.step_cost             # full grid

``--score_dtype=bfloat16`` scores through ``jis.low_precision`` (t_f and
the IS steps use it) and also times the model-precision scoring pass,
``t_f_full``, in the same interleaving: ``active / (t_f_full + t_u)`` is
what low-precision scoring saves against the floor it replaces.

  python -m experiments.benchmarks.step_cost --models=mlp,cnn \
      --score_dtype=bfloat16 --out runs/benchmarks/step_cost_bf16.json

WRN-28-2 is shrunk for the CPU (``--wrn``): by default WRN-10-2 (one block per
group instead of four, the same widths 32/64/128, BatchNorm and SGD) on
16×16×3 inputs; ``--wrn=28,2,32`` times the real one.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jis
from experiments.benchmarks import common

TARGET = 1.10


def model_setup(name: str, wrn=(10, 2, 16)):
  """``(config, model, input_shape)`` for ``mlp``, ``cnn`` or ``wrn``."""
  from experiments import models  # pylint: disable=g-import-not-at-top
  from experiments.configs import cifar10_wrn, mnist_cnn, mnist_mlp  # pylint: disable=g-import-not-at-top
  if name == "mlp":
    c = mnist_mlp.get_config()
    shape = (28, 28, 1)
  elif name == "cnn":
    c = mnist_cnn.get_config()
    shape = (28, 28, 1)
  elif name == "wrn":
    c = cifar10_wrn.get_config()
    c.model.depth, c.model.width = int(wrn[0]), int(wrn[1])
    shape = (int(wrn[2]), int(wrn[2]), 3)
  else:
    raise ValueError(f"unknown model {name!r}: mlp, cnn or wrn.")
  kwargs = {k: v for k, v in c.model.to_dict().items() if k != "name"}
  return c, models.create(c.model.name, 10, **kwargs), shape


def _scan(step, k: int):
  """``(carry, xs[K, ...]) -> (carry, mean metrics)``: K steps in a scan.

  ``k == 1`` is one step per dispatch with no scan at all: XLA:CPU runs a
  conv net's training step ~17x slower inside a while loop (or a
  conditional) than at the top level of the program (measured: MNIST CNN,
  b = 64, 0.18 s per step alone, 3.1 s per step in a 2-step ``lax.scan``,
  0.16 s unrolled), so the conv nets are timed one step per dispatch.
  """
  if k == 1:
    return lambda carry, xs: step(carry, jax.tree.map(lambda x: x[0], xs))

  def run(carry, xs):
    carry, metrics = jax.lax.scan(step, carry, xs, length=k)
    return carry, jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32), 0),
                               metrics)
  return run


def _batches(key, k: int, n: int, shape, num_classes: int = 10):
  kx, ky = jax.random.split(key)
  return {"input": jax.random.normal(kx, (k, n) + shape, jnp.float32),
          "label": jax.random.randint(ky, (k, n), 0, num_classes)}


def _fresh(tree):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


class Programs:
  """The four compiled programs of one (model, b, presample) cell."""

  def __init__(self, config, model, shape, b: int, presample: float, k: int,
               seed: int = 0, jis_module=jis, only=None,
               score_dtype: Optional[str] = None, train_logits: bool = False):
    from experiments import train  # pylint: disable=g-import-not-at-top
    self.b, self.big_b, self.k = b, int(round(presample * b)), k
    logits_fn = train.logits_fn
    if score_dtype:
      logits_fn = jis.low_precision(logits_fn, score_dtype)
    key = jax.random.PRNGKey(seed)
    state = train.create_train_state(config, model,
                                     jnp.zeros((1,) + shape, jnp.float32), key)
    self.small = _batches(jax.random.fold_in(key, 1), k, b, shape)
    self.big = _batches(jax.random.fold_in(key, 2), k, self.big_b, shape)

    def uniform_step(s, batch):
      s, metrics = train.train_step(s, batch, jnp.ones((b,), jnp.float32))
      metrics.pop(jis.LOGITS_KEY)   # the unwrapped step has no use for them
      return s, metrics

    def forward(s, xs, logits_fn=logits_fn):
      def score_step(total, batch):
        logits = logits_fn(s, batch)
        scores = jis.logit_grad_norm(logits.astype(jnp.float32),
                                     batch["label"], "softmax_cross_entropy")
        return total + jnp.sum(scores), {"score_mean": jnp.mean(scores)}
      return _scan(score_step, k)(jnp.zeros((), jnp.float32), xs)

    def plain_step(s, batch, weights):
      # What most users write: a train step that does not hand back logits.
      s, metrics = train.train_step(s, batch, weights)
      metrics.pop(jis.LOGITS_KEY)
      return s, metrics

    def sampler(condition):
      return jis_module.importance_step(
          train.train_step if train_logits else plain_step, logits_fn,
          batch_size=b, presample=presample, condition=condition)

    # Traced predicates, as a run with the default condition has them (a
    # constant one, tau_threshold=0 or inf, compiles one branch and no cond).
    active = sampler(jis_module.warmup(0))
    inactive = sampler(jis_module.when_variance_reduced(1e30))
    jit = lambda f: jax.jit(f, donate_argnums=0)
    self.fns = {
        "t_u": (jit(_scan(uniform_step, k)), _fresh(state), self.small),
        "t_f": (jax.jit(forward), state, self.big),
        "active": (jit(_scan(active.step, k)),
                   active.init(_fresh(state), jax.random.key(seed)), self.big),
        "inactive": (jit(_scan(inactive.step, k)),
                     inactive.init(_fresh(state), jax.random.key(seed)),
                     self.big),
    }
    if score_dtype:   # the model-precision scoring pass, for comparison
      self.fns["t_f_full"] = (
          jax.jit(lambda s, xs: forward(s, xs, train.logits_fn)), state,
          self.big)
    if only is not None:
      self.fns = {n: v for n, v in self.fns.items() if n in only}
    self.carry = {name: v[1] for name, v in self.fns.items()}

  def call(self, name: str) -> None:
    fn, _, xs = self.fns[name]
    out, metrics = fn(self.carry[name], xs)
    if not name.startswith("t_f"):
      self.carry[name] = out
    jax.block_until_ready((out, metrics))

  def warm_up(self, times: int = 2) -> float:
    t0 = time.perf_counter()
    for name in self.fns:
      for _ in range(times):
        self.call(name)
    return time.perf_counter() - t0

  def check_active(self) -> Dict[str, float]:
    """is/active of the last dispatch of each jis program (1.0 and 0.0)."""
    out = {}
    for name in ("active", "inactive"):
      fn, _, xs = self.fns[name]
      self.carry[name], metrics = fn(self.carry[name], xs)
      out[name] = float(metrics["is/active"])
    return out


def time_cell(config, model, shape, b, presample, k, repeats,
              score_dtype: Optional[str] = None) -> Dict:
  progs = Programs(config, model, shape, b, presample, k,
                   score_dtype=score_dtype)
  warm = progs.warm_up()
  active_flags = progs.check_active()
  samples = common.time_interleaved(
      {name: (lambda n=name: progs.call(n)) for name in progs.fns}, repeats)
  per_step = {name: [t / k for t in ts] for name, ts in samples.items()}
  med = {name: statistics.median(ts) for name, ts in per_step.items()}
  floor = med["t_f"] + med["t_u"]
  cell = {
      "b": b, "presample": presample, "B": progs.big_b, "k": k,
      "compile_and_warmup_s": warm, "is_active": active_flags,
      "per_step_seconds": {n: common.summarize(ts) for n, ts in per_step.items()},
      "t_u_ms": 1e3 * med["t_u"], "t_f_ms": 1e3 * med["t_f"],
      "active_ms": 1e3 * med["active"], "inactive_ms": 1e3 * med["inactive"],
      "floor_ms": 1e3 * floor,
      "active_over_floor": med["active"] / floor,
      "inactive_over_t_u": med["inactive"] / med["t_u"],
      # What an IS update costs in uniform updates (convergence per second).
      "active_over_t_u": med["active"] / med["t_u"],
      # The spread of the ratio over repeats (each repeat's own ratio).
      "active_over_floor_range": _ratio_range(
          per_step["active"], [f + u for f, u in zip(per_step["t_f"],
                                                     per_step["t_u"])]),
      "inactive_over_t_u_range": _ratio_range(per_step["inactive"],
                                              per_step["t_u"]),
  }
  if "t_f_full" in med:
    # The IS step with low-precision scoring against the floor it would
    # have at the model's precision.
    full_floor = med["t_f_full"] + med["t_u"]
    cell.update({"t_f_full_ms": 1e3 * med["t_f_full"],
                 "full_floor_ms": 1e3 * full_floor,
                 "active_over_full_floor": med["active"] / full_floor})
  return cell


def _ratio_range(num: Sequence[float], den: Sequence[float]) -> List[float]:
  r = sorted(n / d for n, d in zip(num, den))
  return [r[0], r[-1]]


def loop_cost(model_name: str, b: int, presample: float, steps: int,
              k: int, data_dir: str, score_dtype: Optional[str] = None
              ) -> Dict:
  """Per-epoch time of the experiments' loop (uniform and IS active)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import mnist_cnn, mnist_mlp  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  module = {"mlp": mnist_mlp, "cnn": mnist_cnn}[model_name]
  out = {}
  for method, sampler in (("uniform", {"score": "uniform"}),
                          ("active", {"condition": "warmup(0)",
                                      "presample": presample,
                                      "score_dtype": score_dtype or ""})):
    c = module.get_config()
    c.dataset.data_dir = data_dir
    c.dataset.test_examples = 1000
    c.eval_train_examples = 1000
    c.batch_size = b
    for key, v in sampler.items():
      c.sampler[key] = v
    c.num_steps, c.num_epochs, c.train_seconds = steps, 0.0, 0.0
    c.eval_at_start, c.eval_every_epochs, c.eval_every_seconds = False, 0.0, 0.0
    c.eval_every_steps = 0
    c.checkpoint_every_seconds, c.checkpoint_every_steps = 0.0, 0
    c.log_every_steps = max(steps // 2, 1)
    c.steps_per_dispatch = k
    c.progress_bar = False
    with tempfile.TemporaryDirectory() as workdir:
      result = train.train_and_evaluate(c, workdir)
    per_step = result.train_seconds / result.step
    out[method] = {"steps": result.step, "train_seconds": result.train_seconds,
                   "per_step_ms": 1e3 * per_step,
                   "epoch_seconds": per_step * 60000 / b}
  return out


def run(models: Sequence[str] = ("mlp", "cnn", "wrn"),
        batch_sizes: Sequence[int] = (64, 128, 256),
        presamples: Sequence[float] = (2.0, 3.0, 5.0),
        steps_per_dispatch: int = 10, repeats: int = 5,
        heavy_steps_per_dispatch: Optional[int] = None,
        loop_steps: int = 200, loop_models: Sequence[str] = ("mlp", "cnn"),
        wrn=(10, 2, 16), out: Optional[str] = None,
        data_dir: Optional[str] = None, score_dtype: Optional[str] = None,
        argv: Optional[Sequence[str]] = None) -> Dict:
  """Runs the benchmark; writes and returns its JSON."""
  out = out or os.path.join(common.DEFAULT_OUT_DIR, "step_cost.json")
  result = {**common.header(argv), "steps_per_dispatch": steps_per_dispatch,
            "repeats": repeats, "score_dtype": score_dtype or "float32",
            "wrn": {"depth": wrn[0], "width": wrn[1], "input": wrn[2]},
            "targets": {"active_over_floor": TARGET,
                        "inactive_over_t_u": TARGET},
            "cells": [], "loop": []}
  for name in models:
    config, model, shape = model_setup(name, wrn)
    k = steps_per_dispatch
    if name != "mlp" and heavy_steps_per_dispatch:
      k = heavy_steps_per_dispatch   # conv steps take 0.1-1 s on a CPU
    for b in batch_sizes:
      for p in presamples:
        cell = time_cell(config, model, shape, b, p, k, repeats, score_dtype)
        cell["model"] = name
        cell["load"] = common.load_average()
        result["cells"].append(cell)
        print(f"{name} b={b} B={cell['B']}: t_u {cell['t_u_ms']:.2f} ms, "
              f"t_f {cell['t_f_ms']:.2f}, active {cell['active_ms']:.2f} "
              f"({cell['active_over_floor']:.3f} x floor), inactive "
              f"{cell['inactive_ms']:.2f} ({cell['inactive_over_t_u']:.3f} x "
              f"t_u)", flush=True)
  data_dir = data_dir or common.data_dir()
  if loop_steps and data_dir:
    for name in loop_models:
      b, p = 128, 3.0
      k = steps_per_dispatch
      steps = loop_steps
      if name != "mlp" and heavy_steps_per_dispatch:
        k, steps = heavy_steps_per_dispatch, max(loop_steps // 40, 2 * k)
      loop = loop_cost(name, b, p, steps, k, data_dir, score_dtype)
      bare = {c_["model"]: c_ for c_ in result["cells"]
              if c_["b"] == b and c_["presample"] == p}.get(name)
      entry = {"model": name, "b": b, "presample": p, "steps": steps,
               "steps_per_dispatch": k,
               **{f"{m}_{k_}": v for m, d in loop.items() for k_, v in d.items()}}
      if bare:
        entry["bare_uniform_epoch_seconds"] = bare["t_u_ms"] / 1e3 * 60000 / b
        entry["bare_active_epoch_seconds"] = (bare["active_ms"] / 1e3 * 60000
                                              / b)
        entry["uniform_loop_over_bare"] = (
            loop["uniform"]["epoch_seconds"] / entry["bare_uniform_epoch_seconds"])
        entry["active_loop_over_bare"] = (
            loop["active"]["epoch_seconds"] / entry["bare_active_epoch_seconds"])
      result["loop"].append(entry)
      print(f"loop {name}: {entry}", flush=True)
  print(render(result))
  common.write_json(result, out)
  print(f"wrote {out}")
  return result


def render(result: Dict) -> str:
  rows = []
  for c in result["cells"]:
    rows.append({
        "model": c["model"], "b": c["b"], "B": c["B"], "K": c["k"],
        "t_u(b) ms": c["t_u_ms"], "t_f(B) ms": c["t_f_ms"],
        "active ms": c["active_ms"], "inactive ms": c["inactive_ms"],
        "active/floor": f"{c['active_over_floor']:.3f} "
                        f"[{c['active_over_floor_range'][0]:.2f}–"
                        f"{c['active_over_floor_range'][1]:.2f}]",
        "inactive/t_u": f"{c['inactive_over_t_u']:.3f} "
                        f"[{c['inactive_over_t_u_range'][0]:.2f}–"
                        f"{c['inactive_over_t_u_range'][1]:.2f}]",
        "met": ("yes" if c["active_over_floor"] <= TARGET
                and c["inactive_over_t_u"] <= TARGET else "no"),
        "active/t_u": c["active_ms"] / c["t_u_ms"],
    })
    if "t_f_full_ms" in c:   # --score_dtype: the model-precision pass too
      rows[-1].update({"t_f(B) full ms": c["t_f_full_ms"],
                       "active/full floor": c["active_over_full_floor"]})
  fmt = {k: ".2f" for k in ("t_u(b) ms", "t_f(B) ms", "active ms",
                            "inactive ms", "active/t_u", "t_f(B) full ms",
                            "active/full floor")}
  text = common.table(rows, list(rows[0]), fmt) if rows else ""
  if result["loop"]:
    lrows = [{
        "model": l["model"], "b": l["b"], "B (IS)": int(l["b"] * l["presample"]),
        "uniform loop s/epoch": l["uniform_epoch_seconds"],
        "bare t_u s/epoch": l.get("bare_uniform_epoch_seconds"),
        "uniform loop/bare": l.get("uniform_loop_over_bare"),
        "IS loop s/epoch": l["active_epoch_seconds"],
        "bare active s/epoch": l.get("bare_active_epoch_seconds"),
        "IS loop/bare": l.get("active_loop_over_bare"),
    } for l in result["loop"]]
    text += "\n\n" + common.table(lrows, list(lrows[0]),
                                  {k: ".2f" for k in lrows[0] if k not in
                                   ("model", "b", "B (IS)")})
  return text


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="b=64, presample 3 only, K=5, 3 repeats, a 40-step loop")
  p.add_argument("--models", default="mlp,cnn,wrn")
  p.add_argument("--batch_sizes", default=None)
  p.add_argument("--presamples", default=None)
  p.add_argument("--steps_per_dispatch", type=int, default=None)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--heavy_steps_per_dispatch", type=int, default=None,
                 help="K for the CNN and the WRN (default 1: no scan, see _scan)")
  p.add_argument("--loop_steps", type=int, default=None)
  p.add_argument("--loop_models", default="mlp,cnn")
  p.add_argument("--wrn", default="10,2,16",
                 help="depth,width,input size of the WRN (28,2,32 is WRN-28-2)")
  p.add_argument("--score_dtype", default=None,
                 help="score in this dtype (jis.low_precision), e.g. bfloat16; "
                 "t_f and the IS steps then use it")
  p.add_argument("--out", default=None)
  p.add_argument("--data_dir", default=None)
  a = p.parse_args(argv[1:])
  q = a.quick
  ints = lambda s: [int(x) for x in s.split(",")]
  run(models=a.models.split(","),
      batch_sizes=ints(a.batch_sizes) if a.batch_sizes else
      ([64] if q else [64, 128, 256]),
      presamples=[float(x) for x in a.presamples.split(",")] if a.presamples
      else ([3.0] if q else [2.0, 3.0, 5.0]),
      steps_per_dispatch=a.steps_per_dispatch or (5 if q else 10),
      repeats=a.repeats or (3 if q else 5),
      heavy_steps_per_dispatch=a.heavy_steps_per_dispatch or 1,
      loop_steps=(a.loop_steps if a.loop_steps is not None
                  else (40 if q else 200)),
      loop_models=[m for m in (a.loop_models if not q or
                               a.loop_models != "mlp,cnn" else "mlp").split(",")
                   if m],   # quick: the CNN loop alone takes minutes (notes)
      wrn=ints(a.wrn),
      out=a.out or os.path.join(common.DEFAULT_OUT_DIR,
                                "step_cost_quick.json" if q else
                                "step_cost.json"),
      data_dir=a.data_dir, score_dtype=a.score_dtype, argv=argv)


if __name__ == "__main__":
  main()
