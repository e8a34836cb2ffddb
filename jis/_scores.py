"""Importance scores: how informative each presampled example is."""

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jis import _losses

Array = jax.Array
ScoreFn = Callable[[Optional[Array], Any, Any], Array]


class Score(NamedTuple):
  """An importance score.

  Attributes:
    name: how the score is referred to in errors and docs.
    fn: ``(logits [B, ...] or None, labels, batch) -> [B]`` non-negative scores.
    needs_logits: whether ``fn`` reads the logits (a forward pass); a score
      that does not (``"uniform"``) lets jis skip the forward pass entirely.
    needs_labels: whether ``fn`` reads the labels.
    per_parameter: the score is the exact per-example parameter-gradient norm;
      ``fn`` is unused and the step differentiates ``logits_fn`` instead.
  """
  name: str
  fn: Optional[ScoreFn]
  needs_logits: bool = True
  needs_labels: bool = True
  per_parameter: bool = False


MaskFn = Optional[Callable[[Any], Array]]


def _mask(mask_fn: MaskFn, batch):
  return None if mask_fn is None else mask_fn(batch)


def upper_bound(loss: _losses.Loss, mask_fn: MaskFn = None) -> Score:
  """``‖∂loss/∂logits‖₂`` per example (Katharopoulos & Fleuret 2018)."""
  return Score("upper_bound", lambda logits, labels, batch: loss.grad_norm(
      logits, labels, _mask(mask_fn, batch)))


def loss_score(loss: _losses.Loss, mask_fn: MaskFn = None) -> Score:
  """The per-example loss (Loshchilov & Hutter 2015; the 2017 biased paper)."""
  return Score("loss", lambda logits, labels, batch: loss.per_example(
      logits, labels, _mask(mask_fn, batch)))


def reducible_loss(loss: _losses.Loss, key: str = "irreducible_loss",
                   mask_fn: MaskFn = None) -> Score:
  """RHO-LOSS (Mindermann et al. 2022): loss minus ``batch[key]``.

  ``batch[key]`` holds, per example, the loss of a model trained on held-out
  data (precomputed once). Negative differences are clipped to zero, since a
  sampling score cannot be negative.
  """
  def fn(logits, labels, batch):
    if not isinstance(batch, Mapping) or key not in batch:
      raise ValueError(
          f"score='reducible_loss' reads the irreducible loss from batch[{key!r}]"
          " but the batch has no such key. Precompute it with a model trained "
          "on held-out data and add it to every batch.")
    irreducible = jnp.asarray(batch[key], jnp.float32)
    n = jax.tree.leaves(logits)[0].shape[:1]
    if irreducible.shape != n:
      raise ValueError(
          f"batch[{key!r}] must hold one value per example, shape "
          f"{n}; got {irreducible.shape}.")
    per_example = loss.per_example(logits, labels, _mask(mask_fn, batch))
    return jnp.maximum(per_example - irreducible, 0.0)
  return Score("reducible_loss", fn)


def _ones(logits, labels, batch) -> Array:
  del logits, labels
  return jnp.ones(jax.tree.leaves(batch)[0].shape[:1], jnp.float32)


def uniform_score() -> Score:
  """All ones: no forward pass, τ = 1, plain uniform training."""
  return Score("uniform", _ones, needs_logits=False, needs_labels=False)


def is_uniform(score: Score) -> bool:
  """Whether ``score`` is the built-in uniform score (by its function, not
  its name: a user's score may be called ``"uniform"`` too)."""
  return score.fn is _ones


def gradient_norm() -> Score:
  """The exact per-example norm of the full parameter gradient (costly)."""
  return Score("gradient_norm", None, per_parameter=True)


#: The built-in scores by name: ``(loss, mask_fn) -> Score``.
_MAKERS = {
    "upper_bound": upper_bound,
    "loss": loss_score,
    "gradient_norm": lambda loss, mask_fn: gradient_norm(),
    "reducible_loss": lambda loss, mask_fn: reducible_loss(loss,
                                                           mask_fn=mask_fn),
    "uniform": lambda loss, mask_fn: uniform_score(),
}
SCORES = tuple(_MAKERS)


def resolve_score(score: Union[str, Score, ScoreFn], loss: _losses.Loss,
                  mask_fn: MaskFn = None) -> Score:
  """Returns the :class:`Score` named by ``score``; the built-in ones apply
  ``mask_fn(batch)`` to the loss's positions."""
  if isinstance(score, Score):
    return score
  if isinstance(score, str):
    if score not in _MAKERS:
      raise ValueError(
          f"Unknown score={score!r}. Use one of {list(SCORES)} or a callable "
          "score(logits, labels, batch) -> [B].")
    return _MAKERS[score](loss, mask_fn)
  if callable(score):
    return Score(getattr(score, "__name__", "custom"), score)
  raise TypeError(
      f"score must be a name ({list(SCORES)}) or a callable "
      f"score(logits, labels, batch) -> [B]; got {type(score).__name__}.")


def per_parameter_grad_norm(logits_fn, loss: _losses.Loss, labels_fn,
                            state, batch, mask_fn: MaskFn = None) -> Array:
  """``‖∇_θ ℓ(f(xᵢ; θ), yᵢ)‖₂`` for every example, by a vmapped gradient.

  ``state`` must be a flax ``TrainState``-like pytree with ``.params`` and
  ``.replace``. Memory is ``B ×`` the parameter count: a reference, not a
  training score.
  """
  if not (hasattr(state, "params") and hasattr(state, "replace")):
    raise TypeError(
        "score='gradient_norm' differentiates logits_fn w.r.t. state.params, so "
        "the train state must have .params and .replace (a flax TrainState); "
        f"got {type(state).__name__}.")

  def example_loss(params, example):
    one = jax.tree.map(lambda x: x[None], example)
    logits = logits_fn(state.replace(params=params), one)
    return jnp.sum(loss.per_example(logits, labels_fn(one), _mask(mask_fn, one)))

  grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(
      state.params, batch)
  squares = [jnp.sum(jnp.square(g.reshape(g.shape[0], -1).astype(jnp.float32)),
                     axis=1) for g in jax.tree.leaves(grads)]
  return jnp.sqrt(sum(squares))
