r"""Scaling of scoring: presample size B from 256 to 16,384 at a fixed b.

For each B, times the jis step with importance sampling on every step
(``tau_threshold=0``; a jitted, donated step, one step per dispatch, timed to
``block_until_ready`` after warm-up, repeats interleaved), once scoring all
B examples at once and once in chunks of ``forward_batch_size`` examples
(``lax.map``), and reports the memory the compiled program needs, from XLA's
own buffer assignment (``compiled.memory_analysis()``): the temporary bytes
(the peak of the intermediate buffers: activations of the scoring pass) and
the argument bytes (the train state and the presample batch itself, which
grows with B whatever the chunking). Process RSS is not used: its high-water
mark only ever rises within one process.

The scoring pass's own time is the step's time minus the step at the
smallest B (reported as ``scoring_ms``, an estimate).

  python -m experiments.benchmarks.scoring_scale --quick
  python -m experiments.benchmarks.scoring_scale
"""

import argparse
import os
import statistics
import sys
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp

import jis
from experiments.benchmarks import common
from experiments.benchmarks import step_cost


def _memory(compiled) -> Dict[str, Optional[int]]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return {"temp_bytes": None, "argument_bytes": None, "output_bytes": None}
  return {"temp_bytes": int(m.temp_size_in_bytes),
          "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes),
          "alias_bytes": int(getattr(m, "alias_size_in_bytes", 0))}


def measure(model_name: str, b: int, sizes: Sequence[int], chunk: int,
            repeats: int, wrn=(10, 2, 16)) -> list:
  from experiments import train  # pylint: disable=g-import-not-at-top
  config, model, shape = step_cost.model_setup(model_name, wrn)
  key = jax.random.PRNGKey(0)
  state = train.create_train_state(config, model,
                                   jnp.zeros((1,) + shape, jnp.float32), key)
  rows = []
  for big_b in sizes:
    batch = {k: v[0] for k, v in step_cost._batches(  # pylint: disable=protected-access
        jax.random.fold_in(key, big_b), 1, big_b, shape).items()}
    programs = {}
    for mode, fbs in (("all_at_once", None), ("chunked", min(chunk, big_b))):
      sampler = jis.importance_step(
          train.train_step, train.logits_fn, batch_size=b,
          presample=big_b / b, tau_threshold=0.0, forward_batch_size=fbs)
      s = sampler.init(step_cost._fresh(state), jax.random.key(0))  # pylint: disable=protected-access
      fn = jax.jit(sampler.step, donate_argnums=0)
      compiled = fn.lower(s, batch).compile()
      programs[mode] = {"fn": compiled, "state": s, "fbs": fbs,
                        "memory": _memory(compiled)}

    def call(mode):
      p = programs[mode]
      p["state"], metrics = p["fn"](p["state"], batch)
      jax.block_until_ready((p["state"], metrics))

    for mode in programs:   # warm-up
      call(mode)
    samples = common.time_interleaved(
        {mode: (lambda m=mode: call(m)) for mode in programs}, repeats)
    for mode, p in programs.items():
      rows.append({"model": model_name, "b": b, "B": big_b, "mode": mode,
                   "forward_batch_size": p["fbs"],
                   "step": common.summarize(samples[mode]),
                   "step_ms": 1e3 * statistics.median(samples[mode]),
                   **p["memory"], "load": common.load_average()})
    last = rows[-2:]
    print(f"{model_name} B={big_b}: " + ", ".join(
        f"{r['mode']} {r['step_ms']:.1f} ms, temp "
        f"{(r['temp_bytes'] or 0) / 2**20:.1f} MiB" for r in last), flush=True)
  base = {r["mode"]: r["step_ms"] for r in rows if r["B"] == sizes[0]}
  for r in rows:
    r["scoring_ms"] = r["step_ms"] - base[r["mode"]]
  return rows


def run(models: Sequence[str] = ("mlp", "cnn"), b: int = 128,
        sizes: Sequence[int] = (256, 512, 1024, 2048, 4096, 8192, 16384),
        chunk: int = 1024, repeats: int = 3, out: Optional[str] = None,
        argv: Optional[Sequence[str]] = None) -> Dict:
  out = out or os.path.join(common.DEFAULT_OUT_DIR, "scoring_scale.json")
  result = {**common.header(argv), "b": b, "chunk": chunk, "repeats": repeats,
            "memory_source": "compiled.memory_analysis() (XLA buffer "
                             "assignment)", "rows": []}
  for m in models:
    result["rows"] += measure(m, b, sizes, chunk, repeats)
  print(render(result))
  common.write_json(result, out)
  print(f"wrote {out}")
  return result


def render(result: Dict) -> str:
  by = {}
  for r in result["rows"]:
    by.setdefault((r["model"], r["B"]), {})[r["mode"]] = r
  rows = []
  mib = lambda x: None if x is None else x / 2**20
  for (model, big_b), d in by.items():
    a, c = d["all_at_once"], d["chunked"]
    rows.append({"model": model, "B": big_b,
                 "step ms (all)": a["step_ms"], "step ms (chunked)": c["step_ms"],
                 "chunk": c["forward_batch_size"],
                 "temp MiB (all)": mib(a["temp_bytes"]),
                 "temp MiB (chunked)": mib(c["temp_bytes"]),
                 "args MiB": mib(a["argument_bytes"])})
  return common.table(rows, list(rows[0]), {k: ".1f" for k in rows[0]})


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="MLP only, B in 256, 1024, 4096, 2 repeats")
  p.add_argument("--models", default=None)
  p.add_argument("--b", type=int, default=128)
  p.add_argument("--sizes", default=None)
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--out", default=None)
  a = p.parse_args(argv[1:])
  q = a.quick
  run(models=(a.models or ("mlp" if q else "mlp,cnn")).split(","), b=a.b,
      sizes=[int(x) for x in a.sizes.split(",")] if a.sizes else
      ([256, 1024, 4096] if q else [256, 512, 1024, 2048, 4096, 8192, 16384]),
      chunk=a.chunk, repeats=a.repeats or (2 if q else 3),
      out=a.out or os.path.join(common.DEFAULT_OUT_DIR,
                                "scoring_scale_quick.json" if q
                                else "scoring_scale.json"), argv=argv)


if __name__ == "__main__":
  main()
