r"""Scaling of scoring: presample size B from 256 to 16,384 at a fixed b.

For each B, runs the jis step with importance sampling on every step
(``tau_threshold=0``; jitted, state donated, one step per dispatch), once
scoring all B examples at once and once in chunks of ``forward_batch_size``
examples (``lax.map``), and reports the peak memory it really touches and
its time.

Every (model, B, mode) runs in a fresh Python process (this module with
``--_child``), so that no row inherits another's heap or high-water mark.
The child compiles the step and runs it once (warm-up). Then, for each of
``mem_steps`` steps, it returns freed heap to the system (glibc
``malloc_trim``), reads its resident set (``rss_before``), resets the
kernel's high-water mark (writing ``5`` to ``/proc/self/clear_refs`` resets
``VmHWM``), runs the step and reads ``VmHWM`` (``peak``); the median step's
``peak_delta = peak - rss_before`` is reported, with the range. It is the
memory the execution itself touched: activations and other temporaries,
wherever they are allocated, XLA's buffers or a library's. The presample
batch is an argument, allocated before the window: it is in ``rss_before``,
not in the delta, and is reported on its own (``presample MiB``). So that no
buffer hides in heap pages a previous step left resident, the child sets
glibc's mmap threshold to 64 KiB while it measures (every buffer that large
gets fresh pages); it then times ``repeats`` steps to ``block_until_ready``
with the threshold at 32 MiB, where glibc's dynamic default settles.

Where ``clear_refs`` cannot be written, a thread polls the resident set every
0.5 ms instead (``memory_method: rss_polling``; it can miss short peaks);
without ``/proc`` no memory is reported. A calibration child, whose only
allocation in the window is a new ``--calibrate_mib`` MiB array, checks that
the meter reads a known size.

XLA's buffer assignment (``compiled.memory_analysis()``) is kept as a
secondary column, labelled as the compile-time estimate it is: on XLA:CPU it
misses the intermediates of fusions that XLA hands to a library (the MLP's
whole scoring pass is one ``__ynn_fusion``), so it reports the same 3.4 MiB
at every B for the MLP.

The scoring pass's own time is the step's time minus the step at the
smallest B (``scoring_ms``, an estimate). Timings are repeats within one
process, not interleaved across modes: read them with the load average each
row records.

  python -m experiments.benchmarks.scoring_scale --quick   # MLP, ~1 minute
  python -m experiments.benchmarks.scoring_scale           # MLP and CNN
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp

import jis
from experiments.benchmarks import common
from experiments.benchmarks import step_cost

MODES = ("all_at_once", "chunked")
_ROW_MARKER = "scoring_scale_row: "
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


# ------------------------------------------------------------------ the meter


def _proc_status() -> Optional[Dict[str, int]]:
  """``VmRSS`` and ``VmHWM`` of this process in bytes, or None without /proc."""
  try:
    with open("/proc/self/status") as f:
      fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: 1024 * int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}
  except (OSError, KeyError, ValueError):
    return None


def _reset_peak() -> bool:
  """Resets ``VmHWM`` to the current resident set (Linux >= 4.0)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _libc():
  try:
    return ctypes.CDLL("libc.so.6")
  except OSError:
    return None


def _release_free_heap() -> bool:
  """Gives freed heap pages back to the system, so that a step reusing them
  counts in the delta (glibc only; elsewhere a no-op)."""
  libc = _libc()
  return bool(libc and hasattr(libc, "malloc_trim") and libc.malloc_trim(0))


_M_MMAP_THRESHOLD = -3   # glibc's mallopt parameter
FRESH_PAGES_THRESHOLD = 64 * 2**10
TIMING_THRESHOLD = 32 * 2**20


def _set_mmap_threshold(nbytes: int) -> bool:
  """Sets glibc's mmap threshold: allocations this large or larger get their
  own mapping, returned to the system when freed (glibc only)."""
  libc = _libc()
  return bool(libc and hasattr(libc, "mallopt")
              and libc.mallopt(_M_MMAP_THRESHOLD, nbytes))


class _RssPoller:
  """The largest ``VmRSS`` seen by a thread polling every ``interval_s``."""

  def __init__(self, interval_s: float = 5e-4):
    self.interval_s, self.peak = interval_s, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)

  def _poll(self):
    while not self._stop.is_set():
      status = _proc_status()
      self.peak = max(self.peak, status["VmRSS"] if status else 0)
      time.sleep(self.interval_s)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *unused):
    self._stop.set()
    self._thread.join()
    status = _proc_status()   # what is still resident may not have been seen
    self.peak = max(self.peak, status["VmRSS"] if status else 0)


def _one_window(run: Callable[[], None], settle_s: float):
  """``(method, rss_before, peak)`` in bytes over one call of ``run``."""
  # Buffers of the previous call can outlive it briefly (and a reference
  # cycle can hold an array): collect and wait, then return the freed heap to
  # the system, so that a reused page is faulted in again and counted.
  gc.collect()
  time.sleep(settle_s)
  _release_free_heap()
  before = _proc_status()
  if before is None:
    run()
    return None, None, None
  if _reset_peak():
    run()
    return "vmhwm_reset", before["VmRSS"], _proc_status()["VmHWM"]
  with _RssPoller() as poller:
    run()
  return "rss_polling", before["VmRSS"], max(poller.peak, before["VmRSS"])


def peak_memory(run: Callable[[], None], samples: int,
                settle_s: float = 0.25) -> Dict[str, object]:
  """Peak resident memory of one call of ``run()`` (which must block),
  relative to the resident set just before it, over ``samples`` calls.

  Each call is its own window (a peak reset before it), so that one call's
  late frees do not overlap the next call's allocations.

  Returns:
    ``memory_method`` (``"vmhwm_reset"``, ``"rss_polling"`` or None), and
    the median sample's ``rss_before_bytes``, ``peak_bytes`` (absolute) and
    ``peak_delta_bytes``, with ``peak_delta_range_bytes`` (min, max).
  """
  windows = [_one_window(run, settle_s) for _ in range(samples)]
  method = windows[0][0]
  if method is None:
    return {"memory_method": None, "rss_before_bytes": None,
            "peak_bytes": None, "peak_delta_bytes": None,
            "peak_delta_range_bytes": None}
  windows.sort(key=lambda w: w[2] - w[1])
  _, before, peak = windows[(len(windows) - 1) // 2]   # the (lower) median
  deltas = [w[2] - w[1] for w in windows]
  return {"memory_method": method, "rss_before_bytes": before,
          "peak_bytes": peak, "peak_delta_bytes": peak - before,
          "peak_delta_range_bytes": [deltas[0], deltas[-1]]}


def _xla_estimate(compiled) -> Dict[str, Optional[int]]:
  """XLA's buffer assignment: a compile-time estimate, not a measurement."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return {"xla_temp_bytes": None, "xla_argument_bytes": None}
  return {"xla_temp_bytes": int(m.temp_size_in_bytes),
          "xla_argument_bytes": int(m.argument_size_in_bytes)}


# ------------------------------------------------------- one child's measure


def measure_one(model_name: str, b: int, big_b: int, mode: str, chunk: int,
                repeats: int, mem_steps: int = 3, wrn=(10, 2, 16)) -> Dict:
  """Measures one (model, B, mode) step's peak memory, then times it, in this
  process; :func:`measure` calls it in a fresh one."""
  from experiments import train  # pylint: disable=g-import-not-at-top
  # Every buffer of 64 KiB or more gets fresh pages, so that none hides in
  # heap memory a previous step left resident (measured: without this the
  # MLP's delta at B = 4096 varies from 3 to 16 MiB between runs).
  fresh_pages = _set_mmap_threshold(FRESH_PAGES_THRESHOLD)
  config, model, shape = step_cost.model_setup(model_name, wrn)
  key = jax.random.PRNGKey(0)
  state = train.create_train_state(config, model,
                                   jnp.zeros((1,) + shape, jnp.float32), key)
  batch = {k: v[0] for k, v in step_cost._batches(  # pylint: disable=protected-access
      jax.random.fold_in(key, big_b), 1, big_b, shape).items()}
  fbs = None if mode == "all_at_once" else min(chunk, big_b)
  sampler = jis.importance_step(
      train.train_step, train.logits_fn, batch_size=b, presample=big_b / b,
      tau_threshold=0.0, forward_batch_size=fbs)
  carry = {"state": sampler.init(state, jax.random.key(0))}
  compiled = jax.jit(sampler.step, donate_argnums=0).lower(
      carry["state"], batch).compile()

  def call():
    carry["state"], metrics = compiled(carry["state"], batch)
    jax.block_until_ready((carry["state"], metrics))

  call()   # warm-up
  memory = peak_memory(call, mem_steps)
  # Timed with the threshold where glibc's own (dynamic) one settles once
  # large buffers have been freed, so that page faults the meter needed do
  # not slow the step.
  _set_mmap_threshold(TIMING_THRESHOLD)
  call()
  samples = common.time_interleaved({mode: call}, repeats)[mode]
  return {"model": model_name, "b": b, "B": big_b, "mode": mode,
          "forward_batch_size": fbs,
          "step": common.summarize(samples),
          "step_ms": 1e3 * statistics.median(samples),
          "presample_bytes": sum(x.nbytes for x in jax.tree.leaves(batch)),
          **memory, "mem_steps": mem_steps, "fresh_pages": fresh_pages,
          **_xla_estimate(compiled), "load": common.load_average()}


def calibrate_one(mib: int) -> Dict:
  """The meter on a program whose only new buffer is a ``mib`` MiB output."""
  fresh_pages = _set_mmap_threshold(FRESH_PAGES_THRESHOLD)
  x = jnp.ones((mib * 2**18,), jnp.float32)
  double = jax.jit(lambda x: 2.0 * x)
  jax.block_until_ready(double(x))   # compiled and warmed; output freed
  out = []
  memory = peak_memory(lambda: out.append(jax.block_until_ready(double(x))), 3)
  return {"expected_bytes": mib * 2**20, **memory, "fresh_pages": fresh_pages}


def _child(spec: Dict) -> Dict:
  kind = spec.pop("kind")
  return calibrate_one(**spec) if kind == "calibrate" else measure_one(**spec)


def _in_subprocess(spec: Dict) -> Dict:
  """Runs ``_child(spec)`` in a fresh interpreter and returns its row."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (_ROOT, env.get("PYTHONPATH")) if p)
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.scoring_scale",
       "--_child", json.dumps(spec)],
      cwd=_ROOT, env=env, capture_output=True, text=True, check=False)
  rows = [line[len(_ROW_MARKER):] for line in proc.stdout.splitlines()
          if line.startswith(_ROW_MARKER)]
  if proc.returncode or not rows:
    raise RuntimeError(
        f"scoring_scale child {spec} failed (exit {proc.returncode}):\n"
        f"{proc.stderr[-4000:]}")
  return json.loads(rows[-1])


# ---------------------------------------------------------------- the driver


def measure(model_name: str, b: int, sizes: Sequence[int], chunk: int,
            repeats: int, mem_steps: int = 3, wrn=(10, 2, 16)) -> list:
  """One row per (B, mode), each measured in its own process."""
  rows = []
  for big_b in sizes:
    for mode in MODES:
      rows.append(_in_subprocess(dict(
          kind="step", model_name=model_name, b=b, big_b=big_b, mode=mode,
          chunk=chunk, repeats=repeats, mem_steps=mem_steps, wrn=list(wrn))))
    mib = lambda x: float("nan") if x is None else x / 2**20
    print(f"{model_name} B={big_b}: " + ", ".join(
        f"{r['mode']} {r['step_ms']:.1f} ms, peak +"
        f"{mib(r['peak_delta_bytes']):.1f} MiB" for r in rows[-2:])
          + f" (load {rows[-1]['load']})", flush=True)
  base = {r["mode"]: r["step_ms"] for r in rows if r["B"] == sizes[0]}
  for r in rows:
    r["scoring_ms"] = r["step_ms"] - base[r["mode"]]
  return rows


def run(models: Sequence[str] = ("mlp", "cnn"), b: int = 128,
        sizes: Sequence[int] = (256, 512, 1024, 2048, 4096, 8192, 16384),
        chunk: int = 1024, repeats: int = 3, mem_steps: int = 3,
        calibrate_mib: int = 64, out: Optional[str] = None,
        argv: Optional[Sequence[str]] = None) -> Dict:
  out = out or os.path.join(common.DEFAULT_OUT_DIR, "scoring_scale.json")
  result = {**common.header(argv), "b": b, "chunk": chunk, "repeats": repeats,
            "mem_steps": mem_steps,
            "memory_source": "measured: peak resident set during "
                             "execution, one fresh process per row",
            "xla_estimate_source": "compiled.memory_analysis() (XLA buffer "
                                   "assignment; misses library fusions' "
                                   "intermediates on CPU)"}
  calibration = _in_subprocess({"kind": "calibrate", "mib": calibrate_mib})
  print(f"calibration: a new {calibrate_mib} MiB buffer reads as +"
        f"{(calibration['peak_delta_bytes'] or 0) / 2**20:.1f} MiB "
        f"({calibration['memory_method']})", flush=True)
  rows = []
  for m in models:
    rows += measure(m, b, sizes, chunk, repeats, mem_steps)
  result.update(calibration=calibration, rows=rows, memory_method=sorted(
      {r["memory_method"] or "none" for r in rows + [calibration]}),
                fresh_pages=all(r["fresh_pages"] for r in rows + [calibration]))
  print(render(result))
  common.write_json(result, out)
  print(f"wrote {out}")
  return result


def memory_note(result: Dict) -> str:
  """How the memory columns were measured, and whether the meter was sound."""
  methods = result.get("memory_method") or []
  cal = result.get("calibration") or {}
  if methods == ["vmhwm_reset"]:
    how = ("peak Δ = VmHWM (reset through /proc/self/clear_refs) − VmRSS "
           "just before the measured step")
  elif "none" in methods:
    how = "NOT MEASURED on this machine (no /proc): the columns are empty"
  else:
    how = (f"peak Δ by polling VmRSS every 0.5 ms (methods {methods}): "
           "/proc/self/clear_refs was not writable; short peaks can be missed")
  text = f"Memory: {how}."
  if result.get("fresh_pages") is False:
    text += (" glibc's mmap threshold could not be set: a step may reuse "
             "resident heap pages, which the delta then misses.")
  if cal.get("peak_delta_bytes") is not None:
    text += (f" Calibration: a new {cal['expected_bytes'] / 2**20:.0f} MiB "
             f"buffer read as +{cal['peak_delta_bytes'] / 2**20:.1f} MiB.")
  return text


def render(result: Dict) -> str:
  by = {}
  for r in result["rows"]:
    by.setdefault((r["model"], r["B"]), {})[r["mode"]] = r
  rows = []
  mib = lambda x: None if x is None else x / 2**20
  for (model, big_b), d in by.items():
    a, c = d["all_at_once"], d["chunked"]
    rows.append({
        "model": model, "B": big_b, "chunk": c["forward_batch_size"],
        "step ms (all)": a["step_ms"], "step ms (chunked)": c["step_ms"],
        "peak Δ MiB (all)": mib(a.get("peak_delta_bytes")),
        "peak Δ MiB (chunked)": mib(c.get("peak_delta_bytes")),
        "peak RSS MiB (all)": mib(a.get("peak_bytes")),
        "peak RSS MiB (chunked)": mib(c.get("peak_bytes")),
        "presample MiB": mib(a.get("presample_bytes")),
        "XLA est. temp MiB (all)": mib(a.get("xla_temp_bytes",
                                             a.get("temp_bytes"))),
        "XLA est. temp MiB (chunked)": mib(c.get("xla_temp_bytes",
                                                 c.get("temp_bytes")))})
  return (common.table(rows, list(rows[0]), {k: ".1f" for k in rows[0]})
          + "\n\n" + memory_note(result))


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="MLP only, B in 256, 4096, 16384, 2 repeats")
  p.add_argument("--models", default=None)
  p.add_argument("--b", type=int, default=128)
  p.add_argument("--sizes", default=None)
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--mem_steps", type=int, default=3,
                 help="steps measured for memory, one window each; the "
                 "median is reported")
  p.add_argument("--calibrate_mib", type=int, default=64)
  p.add_argument("--out", default=None)
  p.add_argument("--_child", dest="child", default=None,
                 help=argparse.SUPPRESS)   # one row, as JSON, on stdout
  a = p.parse_args(argv[1:])
  if a.child is not None:
    print(_ROW_MARKER + json.dumps(_child(json.loads(a.child))), flush=True)
    return
  q = a.quick
  run(models=(a.models or ("mlp" if q else "mlp,cnn")).split(","), b=a.b,
      sizes=[int(x) for x in a.sizes.split(",")] if a.sizes else
      ([256, 4096, 16384] if q
       else [256, 512, 1024, 2048, 4096, 8192, 16384]),
      chunk=a.chunk, repeats=a.repeats or (2 if q else 3),
      mem_steps=a.mem_steps, calibrate_mib=a.calibrate_mib,
      out=a.out or os.path.join(common.DEFAULT_OUT_DIR,
                                "scoring_scale_quick.json" if q
                                else "scoring_scale.json"), argv=argv)


if __name__ == "__main__":
  main()
