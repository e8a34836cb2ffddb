"""``metrics.jsonl``: one JSON object per line, written by process 0 only.

Every line holds ``step``, ``epoch`` and ``train_seconds``; training lines add
the train and ``is/`` metrics, evaluation lines the ``eval/`` ones. NaN and
infinities, which JSON lacks, are written as the strings ``"nan"``, ``"inf"``.
"""

import json
import math
import os
from typing import Any, Dict, List, Optional

import numpy as np

FILENAME = "metrics.jsonl"


def _json_value(v):
  v = np.asarray(v).item() if not isinstance(v, (str, int, float)) else v
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricWriter:
  """Appends records to ``workdir/metrics.jsonl`` when ``enabled``.

  A fresh run (``keep_until_step`` None) starts an empty file; a resumed run
  keeps the lines up to its checkpoint's step and drops those after it, which
  it is about to replay.
  """

  def __init__(self, workdir: str, enabled: bool,
               keep_until_step: Optional[int]):
    self._path, self._enabled = os.path.join(workdir, FILENAME), enabled
    if not enabled:
      return
    if keep_until_step is None:
      open(self._path, "w").close()
    elif os.path.exists(self._path):
      with open(self._path) as f:
        lines = [l for l in f if l.strip()
                 and json.loads(l).get("step", 0) <= keep_until_step]
      with open(self._path, "w") as f:
        f.writelines(lines)

  def write(self, record: Dict[str, Any]) -> None:
    if not self._enabled:
      return
    clean = {k: _json_value(v) for k, v in record.items()}
    with open(self._path, "a") as f:
      f.write(json.dumps(clean) + "\n")


def read_metrics(workdir: str) -> List[Dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl``, in order."""
  with open(os.path.join(workdir, FILENAME)) as f:
    return [json.loads(l) for l in f if l.strip()]
