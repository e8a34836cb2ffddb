"""Loss and accuracy over the test split and the training split, in inference
mode (BatchNorm running statistics, no dropout).

A split is read in batches of ``batch_size`` (the last one masked). When the
training split is already on the devices, one jitted program loops over
either split in place; otherwise batches go from host memory to a jitted
program one at a time.
"""

import functools
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import placement as placement_lib
from experiments import preprocess as preprocess_lib


def batch_sums(state, batch, mask, statistics, *, logits_fn: Callable,
               preprocess: preprocess_lib.Preprocess,
               placement: placement_lib.Placement) -> jax.Array:
  """``[loss sum, correct, count]`` over the examples of ``batch`` that
  ``mask`` keeps."""
  batch = placement.constrain(preprocess(batch, statistics, None, False))
  logits = logits_fn(state, batch).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           batch["label"])
  correct = jnp.argmax(logits, -1) == batch["label"]
  return jnp.stack([jnp.sum(jnp.where(mask, losses, 0.0)),
                    jnp.sum(mask & correct), jnp.sum(mask)]).astype(jnp.float32)


def split_sums(state, splits, statistics, which, n, *, batch_size: int,
               **kwargs) -> jax.Array:
  """:func:`batch_sums` over the first ``n`` examples of on-device split
  ``which`` (0 test, 1 train), in one program that serves both splits
  (``which`` and ``n`` are traced)."""
  def body(i, sums):
    idx = i * batch_size + jnp.arange(batch_size)
    mask = idx < n
    idx = jnp.minimum(idx, n - 1)
    take = lambda split: jax.tree.map(lambda x: jnp.take(x, idx, axis=0),
                                      split)
    batch = jax.lax.cond(which == 0, lambda: take(splits["test"]),
                         lambda: take(splits["train"]))
    return sums + batch_sums(state, batch, mask, statistics, **kwargs)
  return jax.lax.fori_loop(0, (n + batch_size - 1) // batch_size, body,
                           jnp.zeros((3,), jnp.float32))


class Evaluator:
  """``evaluator(state, statistics)`` -> ``{"eval/test_loss", ...}``.

  Args:
    logits_fn: ``(state, batch) -> logits`` in inference mode.
    preprocess: what turns stored examples into model inputs.
    placement: where the arrays live.
    batch_size: examples per evaluation batch (rounded to the devices).
    test, train: the splits in host memory.
    train_examples: evaluate the first n training examples (0: all).
    device_train: the training split already on the devices, or None.
  """

  def __init__(self, logits_fn: Callable, preprocess, placement, batch_size: int,
               test, train, train_examples: int = 0, device_train=None):
    n_dev = placement.num_devices
    self._batch_size = max(n_dev, int(batch_size) // n_dev * n_dev)
    n_train = len(train["label"])
    self._sizes = {"test": len(test["label"]),
                   "train": min(n_train, train_examples or n_train)}
    kwargs = dict(logits_fn=logits_fn, preprocess=preprocess,
                  placement=placement)
    self._on_device = device_train is not None
    if self._on_device:
      # The training split is already on the devices: evaluate it in place.
      self._splits = {"test": jax.device_put(test, placement.replicated),
                      "train": device_train}
      self._fn = jax.jit(functools.partial(
          split_sums, batch_size=self._batch_size, **kwargs))
    else:
      self._splits = {"test": test, "train": {
          k: v[:self._sizes["train"]] for k, v in train.items()}}
      self._fn = jax.jit(functools.partial(batch_sums, **kwargs))

  def _host_sums(self, state, split, n: int, statistics):
    sums = 0.0
    for start in range(0, n, self._batch_size):
      rows = np.arange(start, start + self._batch_size)
      batch = {k: v[np.minimum(rows, n - 1)] for k, v in split.items()}
      sums = sums + self._fn(state, batch, rows < n, statistics)
    return sums

  def __call__(self, state, statistics) -> Dict[str, float]:
    out = {}
    for which, name in enumerate(("test", "train")):
      n = self._sizes[name]
      if self._on_device:
        sums = self._fn(state, self._splits, statistics, np.int32(which),
                        np.int32(n))
      else:
        sums = self._host_sums(state, self._splits[name], n, statistics)
      loss, correct, count = np.asarray(jax.device_get(sums), np.float64)
      out[f"eval/{name}_loss"] = loss / count
      out[f"eval/{name}_accuracy"] = correct / count
    return out
