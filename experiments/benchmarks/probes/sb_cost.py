r"""Per-step cost of Selective-Backprop against importance sampling.

Times, for one model at batch size b and presample B = presample · b, each
program as ``experiments.benchmarks.step_cost`` does (K steps in one
``lax.scan``, carried state donated, warm-up excluded, interleaved repeats):

- ``t_u``: the unwrapped train step on b examples;
- ``t_f``: the scoring pass on B examples;
- ``is``: ``jis.importance_step`` with the convergence benchmark's ``loss``
  method but resampling on every step (``condition=always``);
- ``sb``: the convergence benchmark's ``selective_backprop`` method
  (``experiments.benchmarks.convergence.METHODS``, built by
  ``experiments.sampling.build``);
- ``policy``: ``jis.selective_backprop(beta).select`` alone on random scores;
- ``t_f(N)``, with ``--t_f_sizes``: the scoring pass on N examples, to see
  how its cost depends on the presample size.

``--hlo`` also counts the sorts, while loops, copies, top-k ops and YNNPACK
fusions (``ynn``; XLA:CPU's library fusions, which may hold several dots) in
the compiled programs. ``--forward_batch_size N`` adds ``is/fbN`` and
``sb/fbN``: the same steps scoring the presample N examples at a time
(``jis.importance_step``'s option). XLA flags go in the environment, e.g.
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot``.

  python -m experiments.benchmarks.probes.sb_cost --repeats 7 --hlo \
      --t_f_sizes 448,576 --forward_batch_size 256
"""

import argparse
import re
import statistics
import sys
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

import jis
from experiments import sampling
from experiments.benchmarks import common
from experiments.benchmarks import convergence
from experiments.benchmarks import step_cost


def hlo_counts(compiled_text: str) -> Dict[str, int]:
  """How many sorts, while loops, copies, top-k ops and YNNPACK fusions a
  compiled program holds."""
  patterns = {"sort": r" sort\(", "while": r" while\(", "copy": r" copy\(",
              "topk": r"(?i)topk", "ynn": r"%ynn_fusion\S* = "}
  return {n: len(re.findall(p, compiled_text)) for n, p in patterns.items()}


def _sampler(config, method: Dict[str, object], b: int):
  from experiments import train  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(config.sampler.to_dict())
  for key, value in method.items():
    cfg[key] = value
  return sampling.build(cfg, train.train_step, train.logits_fn, b)


def _policy_program(beta: float, big_b: int, b: int, k: int):
  policy = jis.selective_backprop(beta=beta)

  def step(carry, scores):
    state, key = carry
    key, sub = jax.random.split(key)
    sel = policy.select(sub, scores, state, b)
    used = jnp.sum(sel.indices) + jnp.sum(sel.weights) + jnp.sum(sel.probs)
    return (sel.state, key), used.astype(jnp.float32)

  def run(carry, xs):
    carry, used = jax.lax.scan(step, carry, xs, length=k)
    return carry, jnp.mean(used)
  carry = (policy.init(big_b, b), jax.random.key(0))
  xs = jax.random.uniform(jax.random.key(1), (k, big_b), jnp.float32)
  return jax.jit(run, donate_argnums=0), carry, xs


def _call(progs: step_cost.Programs, name: str) -> None:
  """``Programs.call``, with the scoring passes ``t_f(N)`` left undonated."""
  fn, _, xs = progs.fns[name]
  out, metrics = fn(progs.carry[name], xs)
  if not name.startswith("t_f"):
    progs.carry[name] = out
  jax.block_until_ready((out, metrics))


def run(model: str = "mlp", b: int = 128, presample: float = 4.0, k: int = 10,
        repeats: int = 5, beta: float = 3.0, hlo: bool = False,
        forward_batch_size: Optional[int] = None,
        t_f_sizes: Sequence[int] = ()) -> Dict:
  """Times the programs; returns median ms per step of each."""
  config, net, shape = step_cost.model_setup(model)
  progs = step_cost.Programs(config, net, shape, b, presample, k,
                             only=("t_u", "t_f"))
  state = progs.carry["t_u"]
  methods = {
      "is": {"score": "loss", "presample": presample, "condition": "always"},
      "sb": {**convergence.METHODS["selective_backprop"],
             "presample": presample},
  }
  if forward_batch_size:
    methods.update({f"{name}/fb{forward_batch_size}": {
        **method, "forward_batch_size": forward_batch_size}
                    for name, method in methods.items()})
  # pylint: disable=protected-access
  for name, method in methods.items():
    sampler, big_b = _sampler(config, method, b)
    assert big_b == progs.big_b, (big_b, progs.big_b)
    carry = sampler.init(step_cost._fresh(state), jax.random.key(0))
    progs.fns[name] = (jax.jit(step_cost._scan(sampler.step, k),
                               donate_argnums=0), carry, progs.big)
    progs.carry[name] = carry
  # pylint: enable=protected-access
  progs.fns["policy"] = _policy_program(beta, progs.big_b, b, k)
  progs.carry["policy"] = progs.fns["policy"][1]
  for size in t_f_sizes:
    extra = step_cost.Programs(config, net, shape, b, size / b, k,
                               only=("t_f",))
    progs.fns[f"t_f({size})"] = extra.fns["t_f"]
    progs.carry[f"t_f({size})"] = extra.carry["t_f"]

  counts = {}
  if hlo:
    for name in progs.fns:
      fn, carry, xs = progs.fns[name]
      counts[name] = hlo_counts(fn.lower(carry, xs).compile().as_text())
  calls = {name: (lambda n=name: _call(progs, n)) for name in progs.fns}
  for call in calls.values():
    call()
    call()
  load_before = common.load_average()
  samples = common.time_interleaved(calls, repeats)
  ms = {name: [1e3 * t / k for t in ts] for name, ts in samples.items()}
  return {"model": model, "b": b, "B": progs.big_b, "k": k, "repeats": repeats,
          "median_ms": {n: statistics.median(v) for n, v in ms.items()},
          "range_ms": {n: (min(v), max(v)) for n, v in ms.items()},
          "hlo": counts, "load": [load_before, common.load_average()]}


def render(result: Dict) -> str:
  med = result["median_ms"]
  floor = med["t_f"] + med["t_u"]
  rows = [{"program": n, "ms/step": med[n],
           "range": "%.2f–%.2f" % result["range_ms"][n],
           "/floor": med[n] / floor, **result["hlo"].get(n, {})}
          for n in med]
  columns = ["program", "ms/step", "range", "/floor"]
  if result["hlo"]:
    columns += list(next(iter(result["hlo"].values())))
  head = (f"{result['model']} b={result['b']} B={result['B']} "
          f"K={result['k']} repeats={result['repeats']}; floor t_f+t_u = "
          f"{floor:.2f} ms; load {result['load'][0]} -> {result['load'][1]}")
  return head + "\n" + common.table(rows, columns,
                                    {"ms/step": ".2f", "/floor": ".2f"})


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="mlp")
  p.add_argument("--b", type=int, default=128)
  p.add_argument("--presample", type=float, default=4.0)
  p.add_argument("--steps_per_dispatch", type=int, default=10)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--beta", type=float, default=3.0)
  p.add_argument("--hlo", action="store_true",
                 help="count sorts, while loops, copies, top-k, YNNPACK "
                 "fusions in the HLO")
  p.add_argument("--forward_batch_size", type=int, default=None,
                 help="also time is and sb scoring in chunks of this size")
  p.add_argument("--t_f_sizes", default="",
                 help="comma-separated extra sizes N to time t_f(N) at")
  a = p.parse_args(argv[1:])
  sizes = [int(x) for x in a.t_f_sizes.split(",") if x]
  print(render(run(a.model, a.b, a.presample, a.steps_per_dispatch,
                   a.repeats, a.beta, a.hlo, a.forward_batch_size, sizes)),
        flush=True)


if __name__ == "__main__":
  main()
