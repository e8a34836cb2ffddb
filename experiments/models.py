"""Plain Flax (linen) modules for the experiments.

Every model maps a preprocessed batch input to logits and takes ``train``
(dropout on, BatchNorm in batch-statistics mode) as a keyword. Models with
BatchNorm keep their running statistics in the ``batch_stats`` collection,
which the train state carries; the scoring pass of importance sampling runs
them with ``train=False``.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Dense-ReLU(-Dropout) layers, then a linear classifier.

  ``MLP((512, 512), dropout_rate=0.2)`` is the MNIST MLP of the Keras and
  jis examples; ``MLP((512,), dropout_rate=0.5)`` the Reuters MLP.
  """
  features: Sequence[int] = (512, 512)
  num_classes: int = 10
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = x.reshape((x.shape[0], -1))
    for width in self.features:
      x = nn.relu(nn.Dense(width)(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """The Keras MNIST CNN: conv32-conv64 (3x3, valid), max-pool, dense 128."""
  num_classes: int = 10
  conv_dropout_rate: float = 0.25
  dense_dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    if self.conv_dropout_rate:
      x = nn.Dropout(self.conv_dropout_rate, deterministic=not train)(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128)(x))
    if self.dense_dropout_rate:
      x = nn.Dropout(self.dense_dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class _WideBlock(nn.Module):
  """Pre-activation residual block: BN-ReLU-conv3x3, BN-ReLU-conv3x3."""
  features: int
  strides: int
  dropout_rate: float = 0.0
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, *, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train,
                                momentum=self.bn_momentum, epsilon=1e-5)
    conv = lambda f, k, s: nn.Conv(f, (k, k), strides=(s, s), padding="SAME",
                                   use_bias=False)
    y = nn.relu(norm()(x))
    # The shortcut sees the activated input when the shape changes, as in
    # Zagoruyko & Komodakis's reference implementation.
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = conv(self.features, 1, self.strides)(y)
    y = conv(self.features, 3, self.strides)(y)
    if self.dropout_rate:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.relu(norm()(y))
    y = conv(self.features, 3, 1)(y)
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-depth-width (Zagoruyko & Komodakis 2016); WRN-28-2 by default.

  depth = 6n + 4: three groups of n blocks with 16·width, 32·width and
  64·width channels.
  """
  depth: int = 28
  width: int = 2
  num_classes: int = 10
  dropout_rate: float = 0.0
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, *, train: bool):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4; got {self.depth}.")
    n = (self.depth - 4) // 6
    x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False)(x)
    for group, features in enumerate((16, 32, 64)):
      for i in range(n):
        strides = 2 if group > 0 and i == 0 else 1
        x = _WideBlock(features * self.width, strides, self.dropout_rate,
                       self.bn_momentum)(x, train=train)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=1e-5)(x)
    x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class LSTMClassifier(nn.Module):
  """An LSTM read over a sequence ``[B, T, F]``; its last output classifies.

  The pixel-by-pixel (permuted) MNIST model: T = 784 pixels, F = 1.
  """
  hidden: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train: bool):
    del train
    x = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(x)
    return nn.Dense(self.num_classes)(x[:, -1])


class FastText(nn.Module):
  """fastText (Joulin et al. 2016): mean of word embeddings, then linear.

  Token id 0 is padding and is left out of the mean.
  """
  vocab_size: int = 20000
  embed_dim: int = 50
  num_classes: int = 2

  @nn.compact
  def __call__(self, tokens, *, train: bool):
    del train
    embedded = nn.Embed(self.vocab_size, self.embed_dim)(tokens)
    mask = (tokens > 0)[..., None].astype(embedded.dtype)
    mean = jnp.sum(embedded * mask, axis=1) / jnp.maximum(
        jnp.sum(mask, axis=1), 1.0)
    return nn.Dense(self.num_classes)(mean)


_MODELS = {
    "mlp": MLP,
    "cnn": CNN,
    "wide_resnet": WideResNet,
    "lstm": LSTMClassifier,
    "fasttext": FastText,
}


def create(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """The model called ``name`` (``mlp``, ``cnn``, ``wide_resnet``, ``lstm``,
  ``fasttext``) with ``num_classes`` outputs and the given fields."""
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r}; known: {', '.join(_MODELS)}.")
  cls = _MODELS[name]
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = set(kwargs) - fields
  if unknown:
    raise ValueError(f"Model {name!r} has no field(s) {sorted(unknown)}; its "
                     f"fields are {sorted(fields)}.")
  return cls(num_classes=num_classes, **kwargs)
