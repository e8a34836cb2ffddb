"""From stored examples (uint8 pixels, token ids) to the model's float inputs,
on the device: scaling, standardization or ZCA whitening, and the random
translations and flips of the CIFAR configs.

:meth:`Preprocess.statistics` computes once what the normalization needs from
the training split; calling the :class:`Preprocess` applies it to a batch
inside the jitted step.
"""

import dataclasses
import math
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def zca_matrix(x: jax.Array, epsilon: float) -> Tuple[jax.Array, jax.Array]:
  """ZCA whitening ``(mean [D], W [D, D])`` of ``x [N, D]``.

  ``W = V diag(1/√(λ + ε)) Vᵀ`` over the eigenpairs of the covariance; when
  N < D the thin SVD gives them and directions outside the data get 1/√ε.
  """
  x = jnp.asarray(x, jnp.float32)
  mean = jnp.mean(x, axis=0)
  xc = x - mean
  n, d = x.shape
  if n >= d:
    lam, v = jnp.linalg.eigh(xc.T @ xc / n)
  else:
    _, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    lam, v = jnp.square(s) / n, vt.T
  scale = 1.0 / jnp.sqrt(jnp.maximum(lam, 0.0) + epsilon)
  w = (v * (scale - 1.0 / math.sqrt(epsilon))) @ v.T + jnp.eye(d) / math.sqrt(
      epsilon)
  return mean, w


def augment(x, key, padding: int, flip: bool):
  """Random translations by up to ``padding`` pixels (zero fill) and
  horizontal flips, per example of ``x [N, H, W, C]``."""
  n, h, w, _ = x.shape
  k_shift, k_flip = jax.random.split(key)
  if padding:
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    shifts = jax.random.randint(k_shift, (n, 2), 0, 2 * padding + 1)
    x = jax.vmap(lambda img, s: jax.lax.dynamic_slice(
        img, (s[0], s[1], 0), (h, w, img.shape[-1])))(padded, shifts)
  if flip:
    mirror = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    x = jnp.where(mirror, x[:, :, ::-1], x)
  return x


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """``(batch, statistics, key, train) -> batch`` with float inputs.

  Attributes:
    kind: the dataset's kind (``image``, ``sequence``, ``text``,
      ``bag_of_words``); only images are normalized and augmented.
    normalize: ``scale`` (x/255), ``standardize`` or ``zca`` (images).
    zca_epsilon: ZCA's regularizer.
    augment: random translations by ``crop_padding`` pixels and, with
      ``flip``, horizontal flips, in training only.
  """
  kind: str
  normalize: str = "scale"
  zca_epsilon: float = 0.1
  augment: bool = False
  crop_padding: int = 4
  flip: bool = True

  @classmethod
  def from_config(cls, input_config, kind: str) -> "Preprocess":
    """From ``config.input``."""
    return cls(kind=kind, normalize=input_config.get("normalize", "scale"),
               zca_epsilon=float(input_config.get("zca_epsilon", 0.1)),
               augment=bool(input_config.get("augment", False)),
               crop_padding=int(input_config.get("crop_padding", 4)),
               flip=bool(input_config.get("flip", True)))

  def statistics(self, train: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """What the normalization needs from the training split ``train``."""
    if self.kind != "image" or self.normalize == "scale":
      return {}
    x = train["input"]
    if self.normalize == "standardize":
      x = x.astype(np.float32) / 255.0
      return {"mean": x.mean(axis=(0, 1, 2)),
              "std": x.std(axis=(0, 1, 2)) + 1e-6}
    if self.normalize == "zca":
      flat = jnp.asarray(x.reshape(x.shape[0], -1), jnp.float32) / 255.0
      mean, w = jax.jit(zca_matrix, static_argnums=1)(flat, self.zca_epsilon)
      return {"zca_mean": mean, "zca": w}
    raise ValueError(f"config.input.normalize must be scale, standardize or "
                     f"zca; got {self.normalize!r}.")

  def __call__(self, batch, statistics, key, train: bool):
    x = batch["input"]
    if self.kind == "image":
      x = x.astype(jnp.float32) / 255.0
      if "zca" in statistics:
        shape = x.shape
        x = ((x.reshape(shape[0], -1) - statistics["zca_mean"]) @
             statistics["zca"]).reshape(shape)
      elif "mean" in statistics:
        x = (x - statistics["mean"]) / statistics["std"]
      if train and self.augment:
        x = augment(x, key, self.crop_padding, self.flip)
    elif self.kind == "sequence":
      x = x.astype(jnp.float32) / 255.0
    elif self.kind == "bag_of_words":
      x = x.astype(jnp.float32)
    return {**batch, "input": x}
