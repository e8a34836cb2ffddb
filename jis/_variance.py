"""The variance-reduction estimate τ and its switching threshold."""

import jax
import jax.numpy as jnp


def scale_to_unit_max(scores: jax.Array, top: jax.Array) -> jax.Array:
  """``scores / top`` without forming ``1 / top``, which is subnormal (and
  flushed to zero on most backends) for ``top`` above ~1e38: two multiplies by
  ``1/sqrt(top)`` keep every intermediate normal for any finite ``top > 0``."""
  r = jax.lax.rsqrt(top.astype(jnp.float32))
  return (scores * r) * r


def variance_reduction(scores: jax.Array) -> jax.Array:
  """One-step variance-reduction estimate τ of importance sampling.

  With ``g = scores / Σ scores`` and ``u = 1/B`` (Katharopoulos & Fleuret 2018,
  eq. 25)::

      τ = 1 / sqrt(1 − Σ(g − u)² / Σ g²)

  which equals ``sqrt(B Σ g²) = sqrt(mean(s²)) / mean(s)``; this form is computed
  because it is exact in floating point for nearly uniform scores. Scores that
  sum to zero give ``τ = 1`` (uniform), as in the original library.

  Args:
    scores: ``[B]`` non-negative importance scores.

  Returns:
    A float32 scalar ``≥ 1``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jis
    >>> float(jis.variance_reduction(jnp.ones(8)))
    1.0
    >>> round(float(jis.variance_reduction(jnp.array([1.0, 0, 0, 0]))), 3)
    2.0
  """
  s = jnp.asarray(scores, jnp.float32)
  if s.ndim != 1:
    raise ValueError("variance_reduction(scores) needs one score per example, "
                     f"shape [B]; got shape {s.shape}.")
  top = jnp.max(s)
  s = scale_to_unit_max(s, jnp.where(top > 0, top, 1.0))  # keeps s² finite
  total = jnp.sum(s)
  safe = jnp.where(total > 0, total, 1.0)
  g = jnp.where(total > 0, s / safe, 1.0 / s.shape[0])
  return jnp.sqrt(s.shape[0] * jnp.sum(jnp.square(g)))


def tau_threshold(presample_size: int, batch_size: int) -> float:
  """τ_th = (B + 3b) / (3b), eq. 29 of Katharopoulos & Fleuret (2018).

  Above it, importance sampling reduces the variance enough to pay for scoring
  ``B`` examples to train on ``b`` (a forward pass costing a third of a
  forward-backward pass).

  Examples:
    >>> import jis
    >>> jis.tau_threshold(384, 128)
    2.0
  """
  if batch_size < 1 or presample_size < batch_size:
    raise ValueError(
        f"tau_threshold needs 1 <= batch_size <= presample_size; got "
        f"presample_size={presample_size}, batch_size={batch_size}.")
  return (presample_size + 3 * batch_size) / (3 * batch_size)


def default_tau_threshold(presample_size: int, batch_size: int) -> float:
  """``1 + 2B/(3b)``: eq. 29 with the scoring pass's relative cost counted
  twice, the default condition's threshold (3 at ``presample=3``).

  Eq. 29 switches on where τ pays for the scoring pass if a τ-fold
  variance reduction were worth τ uniform steps. Measured per second, it was
  worth less: at τ ≈ 2–2.5 (Fashion-MNIST, Reuters) importance steps did not
  pay for a scoring pass that costs about one training step, at τ ≥ 3 (MNIST)
  they paid many times over (docs/performance_notes.md, section 11).

  Examples:
    >>> import jis
    >>> jis.default_tau_threshold(384, 128)
    3.0
  """
  return 2.0 * tau_threshold(presample_size, batch_size) - 1.0
