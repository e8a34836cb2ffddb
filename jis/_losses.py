"""Per-example losses and the closed-form norms of their gradients w.r.t. logits.

The "upper bound" importance score of Katharopoulos & Fleuret (2018) is the norm
of the gradient of the loss with respect to the network's output (its logits).
For the standard losses it has a closed form that costs one elementwise pass over
the logits; for a user's own loss it is one vjp over the whole batch.
"""

from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
LossFn = Callable[[Array, Array], Array]


class Loss(NamedTuple):
  """A per-example loss and the norm of its gradient w.r.t. the logits.

  Attributes:
    name: how the loss is referred to in error messages.
    per_example: ``(logits [B, ...], labels) -> [B]``.
    grad_norm: ``(logits [B, ...], labels) -> [B]``, ``‖∂ per_example / ∂ logits‖₂``.
  """
  name: str
  per_example: LossFn
  grad_norm: LossFn


def _as_float(logits: Array) -> Array:
  # Scores are reductions over many logits; bfloat16/float16 would lose them.
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _row_norm(x: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))


def _row_sum(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def _check_same_shape(name: str, logits: Array, labels: Array) -> None:
  if logits.shape != labels.shape:
    raise ValueError(
        f"loss={name!r} needs labels with the same shape as the logits; got "
        f"logits {logits.shape} and labels {labels.shape}. Reshape the labels "
        "(or the model output) so they match, e.g. labels[:, None] for one "
        "output per example.")


def _softmax_targets(logits: Array, labels: Array) -> Array:
  """Integer labels [B, ...] or one-hot / soft labels [B, ..., C] as [B, ..., C]."""
  if labels.shape == logits.shape[:-1]:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(
          "loss='softmax_cross_entropy' got labels of shape "
          f"{labels.shape} (one per example) but dtype {labels.dtype}; class "
          "indices must be integers. Cast them with labels.astype(jnp.int32), "
          "or pass one-hot labels of the logits' shape.")
    return jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  if labels.shape == logits.shape:
    return labels.astype(logits.dtype)
  raise ValueError(
      "loss='softmax_cross_entropy' needs integer labels of shape "
      f"{logits.shape[:-1]} or one-hot/soft labels of shape {logits.shape}; "
      f"got labels of shape {labels.shape} for logits of shape {logits.shape}.")


def _softmax_ce(logits, labels):
  logits = _as_float(logits)
  targets = _softmax_targets(logits, labels)
  return _row_sum(optax.softmax_cross_entropy(logits, targets))


def _softmax_ce_norm(logits, labels):
  logits = _as_float(logits)
  targets = _softmax_targets(logits, labels)
  return _row_norm(jax.nn.softmax(logits) - targets)


def _sigmoid_bce(logits, labels):
  _check_same_shape("sigmoid_binary_cross_entropy", logits, labels)
  logits = _as_float(logits)
  return _row_sum(
      optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)))


def _sigmoid_bce_norm(logits, labels):
  _check_same_shape("sigmoid_binary_cross_entropy", logits, labels)
  logits = _as_float(logits)
  return _row_norm(jax.nn.sigmoid(logits) - labels.astype(logits.dtype))


def _outputs_per_example(logits: Array) -> int:
  size = 1
  for d in logits.shape[1:]:
    size *= d
  return size


def _mse(logits, labels):
  _check_same_shape("mean_squared_error", logits, labels)
  logits = _as_float(logits)
  err = logits - labels.astype(logits.dtype)
  return _row_sum(jnp.square(err)) / _outputs_per_example(logits)


def _mse_norm(logits, labels):
  _check_same_shape("mean_squared_error", logits, labels)
  logits = _as_float(logits)
  err = logits - labels.astype(logits.dtype)
  return 2.0 / _outputs_per_example(logits) * _row_norm(err)


LOSSES = {
    "softmax_cross_entropy": Loss(
        "softmax_cross_entropy", _softmax_ce, _softmax_ce_norm),
    "sigmoid_binary_cross_entropy": Loss(
        "sigmoid_binary_cross_entropy", _sigmoid_bce, _sigmoid_bce_norm),
    "mean_squared_error": Loss("mean_squared_error", _mse, _mse_norm),
}


def _autodiff_norm(per_example: LossFn) -> LossFn:
  """Per-example ‖∂ℓᵢ/∂zᵢ‖ by one vjp of Σᵢ ℓᵢ over the whole batch.

  Each ℓᵢ depends on row i of the logits only, so the gradient of the sum holds
  every per-example gradient in its rows.
  """
  def grad_norm(logits, labels):
    logits = _as_float(logits)
    grads = jax.grad(lambda z: jnp.sum(per_example(z, labels)))(logits)
    return _row_norm(grads)
  return grad_norm


def resolve_loss(loss: Union[str, LossFn, Loss]) -> Loss:
  """Returns the :class:`Loss` named by ``loss`` (a name or a callable)."""
  if isinstance(loss, Loss):
    return loss
  if isinstance(loss, str):
    if loss not in LOSSES:
      raise ValueError(
          f"Unknown loss={loss!r}. Use one of {sorted(LOSSES)} or pass a "
          "callable loss(logits, labels) -> [B] per-example losses.")
    return LOSSES[loss]
  if callable(loss):
    def per_example(logits, labels):
      values = loss(logits, labels)
      if values.shape != logits.shape[:1]:
        raise ValueError(
            f"The loss callable {getattr(loss, '__name__', loss)!r} must return "
            f"one loss per example, shape {logits.shape[:1]}; it returned shape "
            f"{values.shape}. Reduce over every axis but the first.")
      return values
    name = getattr(loss, "__name__", type(loss).__name__)
    return Loss(name, per_example, _autodiff_norm(per_example))
  raise TypeError(
      f"loss must be a name ({sorted(LOSSES)}) or a callable "
      f"loss(logits, labels) -> [B]; got {type(loss).__name__}.")


def logit_grad_norm(logits: Array, labels: Array,
                    loss: Union[str, LossFn] = "softmax_cross_entropy") -> Array:
  """Per-example norm of the loss gradient w.r.t. the logits.

  This is the upper bound of the full parameter-gradient norm that
  Katharopoulos & Fleuret (2018) use as importance score. Closed forms:

  - ``"softmax_cross_entropy"``: ``‖softmax(z) − y‖₂`` (``y`` one-hot for
    integer labels, or the given soft labels, which should sum to 1),
  - ``"sigmoid_binary_cross_entropy"``: ``‖σ(z) − y‖₂`` (loss summed over
    outputs),
  - ``"mean_squared_error"``: ``(2/D) ‖z − y‖₂`` (loss averaged over the ``D``
    outputs of an example),
  - a callable ``loss(logits, labels) -> [B]``: the norm of its gradient,
    taken by autodiff in one vjp over the batch.

  Computation is in float32 at least, whatever the logits' dtype.

  Args:
    logits: ``[B, ...]`` model outputs.
    labels: targets, as the loss expects them.
    loss: a loss name or callable.

  Returns:
    ``[B]`` float32 norms.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> logits = jnp.array([[0.0, 0.0], [10.0, -10.0]])
    >>> jis.logit_grad_norm(logits, jnp.array([0, 0])).round(3)
    Array([0.707, 0.   ], dtype=float32)
  """
  return resolve_loss(loss).grad_norm(logits, labels)
