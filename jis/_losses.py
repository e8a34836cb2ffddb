"""Per-example losses and the closed-form norms of their gradients w.r.t. logits.

The "upper bound" importance score of Katharopoulos & Fleuret (2018) is the norm
of the gradient of the loss with respect to the network's output (its logits).
For the standard losses it has a closed form that costs one elementwise pass over
the logits; for a user's own loss it is one vjp over the whole batch.

Logits may be one array or a pytree of them (a multi-head model): every leaf's
leading axis is the batch. The built-in losses apply per head (one name for
every head, or a pytree of names shaped like the logits) and sum; the norm is
that of the gradient w.r.t. all heads together. They also take a ``mask`` of
positions (a sequence model's padding): each position's loss, and its
gradient, are multiplied by it.
"""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any
LossFn = Callable[..., Array]


class Loss(NamedTuple):
  """A per-example loss and the norm of its gradient w.r.t. the logits.

  Attributes:
    name: how the loss is referred to in error messages.
    per_example: ``(logits, labels, mask=None) -> [n]``.
    grad_norm: ``(logits, labels, mask=None) -> [n]``,
      ``‖∂ per_example / ∂ logits‖₂`` over every logit of an example.
    takes_mask: whether ``mask`` is applied (the built-in losses); a custom
      loss applies its own.
  """
  name: str
  per_example: LossFn
  grad_norm: LossFn
  takes_mask: bool = True


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


def _class_indices(logits: Array, labels: Array) -> bool:
  """Whether ``labels`` are class indices [B, ...] rather than one-hot or
  soft labels [B, ..., C]; raises when they are neither."""
  if labels.shape == logits.shape[:-1]:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(
          "loss='softmax_cross_entropy' got labels of shape "
          f"{labels.shape} (one per example) but dtype {labels.dtype}; class "
          "indices must be integers. Cast them with labels.astype(jnp.int32), "
          "or pass one-hot labels of the logits' shape.")
    return True
  if labels.shape == logits.shape:
    return False
  raise ValueError(
      "loss='softmax_cross_entropy' needs integer labels of shape "
      f"{logits.shape[:-1]} or one-hot/soft labels of shape {logits.shape}; "
      f"got labels of shape {labels.shape} for logits of shape {logits.shape}.")


def _softmax_targets(logits: Array, labels: Array) -> Array:
  """Integer labels [B, ...] or one-hot / soft labels [B, ..., C] as [B, ..., C]."""
  if _class_indices(logits, labels):
    return jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return labels.astype(logits.dtype)


def _mask_like(name: str, mask: Optional[Array], positions: tuple,
               ndim: int) -> Optional[Array]:
  """``mask`` over ``positions`` (the loss's per-position shape), with
  trailing axes added up to ``ndim``; None when there is no mask."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != positions[:mask.ndim] or mask.ndim < 1:
    raise ValueError(
        f"loss={name!r}: the mask must have the shape of the loss's positions "
        f"{positions} or a prefix of it (e.g. [n, T] for a sequence); got "
        f"{mask.shape}.")
  return mask.astype(jnp.float32).reshape(mask.shape + (1,) * (ndim - mask.ndim))


def _masked(values: Array, mask: Optional[Array]) -> Array:
  return values if mask is None else values * mask


def _softmax_ce(logits, labels, mask=None):
  logits = _as_float(logits)
  m = _mask_like("softmax_cross_entropy", mask, logits.shape[:-1],
                 logits.ndim - 1)
  if _class_indices(logits, labels):
    # optax's integer-label form, the one train steps usually write: XLA
    # then computes the log-normalizer of the train step's own logits once.
    # An index outside [0, C) scores 0, as its all-zero one-hot row would.
    valid = (labels >= 0) & (labels < logits.shape[-1])
    losses = jnp.where(valid, optax.softmax_cross_entropy_with_integer_labels(
        logits, labels), 0.0)
  else:
    losses = optax.softmax_cross_entropy(logits, labels.astype(logits.dtype))
  return _row_sum(_masked(losses, m))


def _softmax_ce_norm(logits, labels, mask=None):
  logits = _as_float(logits)
  targets = _softmax_targets(logits, labels)
  m = _mask_like("softmax_cross_entropy", mask, logits.shape[:-1], logits.ndim)
  return _row_norm(_masked(jax.nn.softmax(logits) - targets, m))


def _sigmoid_bce(logits, labels, mask=None):
  _check_same_shape("sigmoid_binary_cross_entropy", logits, labels)
  logits = _as_float(logits)
  m = _mask_like("sigmoid_binary_cross_entropy", mask, logits.shape,
                 logits.ndim)
  return _row_sum(_masked(optax.sigmoid_binary_cross_entropy(
      logits, labels.astype(logits.dtype)), m))


def _sigmoid_bce_norm(logits, labels, mask=None):
  _check_same_shape("sigmoid_binary_cross_entropy", logits, labels)
  logits = _as_float(logits)
  m = _mask_like("sigmoid_binary_cross_entropy", mask, logits.shape,
                 logits.ndim)
  return _row_norm(_masked(jax.nn.sigmoid(logits) - labels.astype(logits.dtype),
                           m))


def _outputs_per_example(logits: Array) -> int:
  size = 1
  for d in logits.shape[1:]:
    size *= d
  return size


def _mse(logits, labels, mask=None):
  _check_same_shape("mean_squared_error", logits, labels)
  logits = _as_float(logits)
  m = _mask_like("mean_squared_error", mask, logits.shape, logits.ndim)
  err = logits - labels.astype(logits.dtype)
  return _row_sum(_masked(jnp.square(err), m)) / _outputs_per_example(logits)


def _mse_norm(logits, labels, mask=None):
  _check_same_shape("mean_squared_error", logits, labels)
  logits = _as_float(logits)
  m = _mask_like("mean_squared_error", mask, logits.shape, logits.ndim)
  err = logits - labels.astype(logits.dtype)
  return 2.0 / _outputs_per_example(logits) * _row_norm(_masked(err, m))


LOSSES = {
    "softmax_cross_entropy": Loss(
        "softmax_cross_entropy", _softmax_ce, _softmax_ce_norm),
    "sigmoid_binary_cross_entropy": Loss(
        "sigmoid_binary_cross_entropy", _sigmoid_bce, _sigmoid_bce_norm),
    "mean_squared_error": Loss("mean_squared_error", _mse, _mse_norm),
}


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _autodiff_norm(per_example: LossFn) -> LossFn:
  """Per-example ‖∂ℓᵢ/∂zᵢ‖ by one vjp of Σᵢ ℓᵢ over the whole batch.

  Each ℓᵢ depends on row i of the logits (of every head) only, so the
  gradient of the sum holds every per-example gradient in its rows.
  """
  def grad_norm(logits, labels, mask=None):
    del mask   # a custom loss applies its own
    logits = jax.tree.map(_as_float, logits)
    grads = jax.grad(lambda z: jnp.sum(per_example(z, labels)))(logits)
    return jnp.sqrt(sum(jnp.square(_row_norm(g)) for g in jax.tree.leaves(grads)))
  return grad_norm


def _per_head(name: str, heads: PyTree) -> Loss:
  """The built-in ``heads`` (a loss per leaf of the logits, or one for
  all) applied to each head and summed; norms over all heads together."""
  def split(logits, labels):
    if _is_array(logits):
      if not isinstance(heads, Loss):
        raise ValueError(
            f"loss={name} names a loss per head, but the logits are one "
            f"array of shape {logits.shape}; return a pytree of heads from "
            "logits_fn, or pass one loss name.")
      return [(heads, logits, labels)]
    leaves, tree = jax.tree.flatten(logits)
    try:
      label_leaves = tree.flatten_up_to(labels)
      head_losses = ([heads] * len(leaves) if isinstance(heads, Loss)
                     else tree.flatten_up_to(heads))
    except (ValueError, TypeError) as e:
      raise ValueError(
          f"loss={name}: the logits are a pytree of heads {tree}; the labels "
          "(and a per-head loss) must be pytrees of the same structure, one "
          f"leaf per head (labels=lambda batch: {{...}}). ({e})") from None
    return list(zip(head_losses, leaves, label_leaves))

  def per_example(logits, labels, mask=None):
    return sum(h.per_example(z, y, mask) for h, z, y in split(logits, labels))

  def grad_norm(logits, labels, mask=None):
    squares = [jnp.square(h.grad_norm(z, y, mask))
               for h, z, y in split(logits, labels)]
    return jnp.sqrt(sum(squares))
  return Loss(name, per_example, grad_norm)


def _custom(loss: Callable) -> Loss:
  def per_example(logits, labels, mask=None):
    del mask
    n = jax.tree.leaves(logits)[0].shape[:1]
    values = loss(logits, labels)
    if getattr(values, "shape", None) != n:
      raise ValueError(
          f"The loss callable {getattr(loss, '__name__', loss)!r} must return "
          f"one loss per example, shape {n}; it returned shape "
          f"{getattr(values, 'shape', type(values).__name__)}. Reduce over "
          "every axis but the first.")
    return values
  name = getattr(loss, "__name__", type(loss).__name__)
  return Loss(name, per_example, _autodiff_norm(per_example), takes_mask=False)


def resolve_loss(loss: Union[str, LossFn, Loss, PyTree]) -> Loss:
  """Returns the :class:`Loss` named by ``loss``: a name, a pytree of names
  (one per head of the logits), a callable, or a :class:`Loss`."""
  if isinstance(loss, Loss):
    return loss
  if isinstance(loss, str):
    if loss not in LOSSES:
      raise ValueError(
          f"Unknown loss={loss!r}. Use one of {sorted(LOSSES)} or pass a "
          "callable loss(logits, labels) -> [B] per-example losses.")
    return _per_head(loss, LOSSES[loss])
  if callable(loss):
    return _custom(loss)
  if isinstance(loss, (dict, list, tuple)):
    names = jax.tree.leaves(loss)
    if not names or not all(isinstance(n, str) for n in names):
      raise TypeError(
          "loss as a pytree must hold one loss name per head of the logits, "
          f"e.g. {{'a': 'softmax_cross_entropy', 'b': 'mean_squared_error'}}; "
          f"got {loss!r}.")
    for n in names:
      resolve_loss(n)   # an unknown name is refused here
    return _per_head(repr(loss), jax.tree.map(lambda n: LOSSES[n], loss))
  raise TypeError(
      f"loss must be a name ({sorted(LOSSES)}), a pytree of names (one per "
      "head), or a callable loss(logits, labels) -> [B]; got "
      f"{type(loss).__name__}.")


def logit_grad_norm(logits: PyTree, labels: PyTree,
                    loss: Union[str, LossFn, PyTree] = "softmax_cross_entropy",
                    mask: Optional[Array] = None) -> Array:
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

  Pytree logits (several heads) give the norm over all heads together, with
  a loss name for every head or a pytree of names shaped like the logits. A
  ``mask`` multiplies each position's loss (a sequence's padding: logits
  ``[B, T, C]``, labels ``[B, T]``, mask ``[B, T]``).

  Computation is in float32 at least, whatever the logits' dtype.

  Args:
    logits: ``[B, ...]`` model outputs, or a pytree of them.
    labels: targets, as the loss expects them (a pytree like the logits).
    loss: a loss name, a pytree of names, or a callable.
    mask: positions to count (built-in losses), or None for all.

  Returns:
    ``[B]`` float32 norms.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> logits = jnp.array([[0.0, 0.0], [10.0, -10.0]])
    >>> jis.logit_grad_norm(logits, jnp.array([0, 0])).round(3)
    Array([0.707, 0.   ], dtype=float32)
  """
  resolved = resolve_loss(loss)
  if mask is not None and not resolved.takes_mask:
    raise ValueError("mask= applies to the built-in losses; a custom "
                     "loss(logits, labels) applies its own mask.")
  return resolved.grad_norm(logits, labels, mask)
