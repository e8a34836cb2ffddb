"""What the benchmarks share: machine description, timing, JSON, tables."""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

# Scratch output (quick runs, workdirs): not committed.
DEFAULT_OUT_DIR = os.path.join("runs", "benchmarks")
# The JSON behind docs/benchmarks.md and the README's results: committed;
# experiments.benchmarks.report reads it from here.
RESULTS_DIR = os.path.join("docs", "benchmarks", "results")


def load_average() -> List[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def cpu_steal() -> Optional[Tuple[int, int]]:
  """``(steal, total)`` CPU ticks since boot (``/proc/stat``; None where
  there is none). Steal is the time a virtual machine's host gave this
  machine's ready CPUs to something else: a run that times itself on the
  wall clock loses it, so the benchmarks record the share it took."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()
    if len(fields) < 9 or fields[0] != "cpu":
      return None
    ticks = [int(x) for x in fields[1:9]]
  except (OSError, ValueError):
    return None
  return ticks[7], sum(ticks)


def steal_fraction(start: Optional[Tuple[int, int]],
                   end: Optional[Tuple[int, int]]) -> Optional[float]:
  """The share of CPU time stolen between two :func:`cpu_steal` readings."""
  if start is None or end is None or end[1] <= start[1]:
    return None
  return (end[0] - start[0]) / (end[1] - start[1])


def machine() -> Dict[str, object]:
  """The machine, in words and numbers, for the report."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  mem_gib = None
  try:
    with open("/proc/meminfo") as f:
      mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
  except (OSError, ValueError, IndexError):
    pass
  dev = jax.devices()[0]
  return {
      "cpu": cpu,
      "cores": os.cpu_count(),
      "memory_gib": mem_gib,
      "backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "platform": platform.platform(),
  }


def header(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
  """Machine, command, date, code and load at the start of a benchmark."""
  argv = list(sys.argv if argv is None else argv)
  return {
      "machine": machine(),
      "command": " ".join(_launcher(argv[0]) + argv[1:]),
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "code": code_version(),
      "load_start": load_average(),
  }


def code_version() -> Dict[str, object]:
  """The jis version and the git commit the benchmark ran (``dirty``: with
  uncommitted changes), None where there is no git checkout."""
  import jis  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(jis.__file__)))

  def git(*args):
    try:
      return subprocess.run(["git", "-C", root, *args], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None
  commit = git("rev-parse", "HEAD")
  status = git("status", "--porcelain", "--untracked-files=no")
  return {"jis": getattr(jis, "__version__", None), "commit": commit,
          "dirty": None if status is None else bool(status)}


def _launcher(path: str) -> List[str]:
  """How the benchmark was started: ``python -m experiments.benchmarks.X``,
  or ``python <path>`` for a probe (a script, not a module)."""
  if os.path.basename(os.path.dirname(os.path.abspath(path))) == "probes":
    return ["python", os.path.join("experiments", "benchmarks", "probes",
                                   os.path.basename(path))]
  name = os.path.splitext(os.path.basename(path))[0]
  return ["python -m", f"experiments.benchmarks.{name}"]


def write_json(result: Dict[str, object], path: str) -> str:
  result = {**result, "load_end": load_average()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1, sort_keys=False, default=_jsonable)
  return path


def _jsonable(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def summarize(samples: Sequence[float]) -> Dict[str, float]:
  """Median and spread (min, max, interquartile range) of repeated timings."""
  s = sorted(float(x) for x in samples)
  q = np.percentile(s, [25, 75]) if len(s) > 1 else [s[0], s[0]]
  return {"median": statistics.median(s), "min": s[0], "max": s[-1],
          "iqr": float(q[1] - q[0]), "n": len(s)}


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int,
                     ) -> Dict[str, List[float]]:
  """Seconds per call of each ``fn`` (which must block), run round-robin
  ``repeats`` times so load changes hit every configuration alike."""
  out = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      out[name].append(time.perf_counter() - t0)
  return out


def table(rows: List[Dict[str, object]], columns: Sequence[str],
          formats: Optional[Dict[str, str]] = None) -> str:
  """A markdown table of ``rows`` (dicts) with the given ``columns``."""
  formats = formats or {}

  def cell(row, c):
    v = row.get(c, "")
    if v is None:
      return "–"
    if isinstance(v, float) and c in formats:
      return format(v, formats[c])
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |",
           "| " + " | ".join("---:" if isinstance(rows[0].get(c), (int, float))
                             else "---" for c in columns) + " |"]
  for row in rows:
    lines.append("| " + " | ".join(cell(row, c) for c in columns) + " |")
  return "\n".join(lines)


def data_dir() -> Optional[str]:
  """$JIS_DATA_DIR, else ../shared/data from the repository root."""
  here = os.path.dirname(os.path.abspath(__file__))
  root = os.path.dirname(os.path.dirname(here))
  for candidate in (os.environ.get("JIS_DATA_DIR"),
                    os.path.join(root, "..", "shared", "data")):
    if candidate and os.path.isdir(os.path.join(candidate, "mnist")):
      return os.path.abspath(candidate)
  return None
