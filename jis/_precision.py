"""Low-precision scoring: a logits_fn whose products run in bfloat16.

Scores only choose which examples to train on; the weights ``1 / (B p_i)``
use the same ``p`` the sampler drew from, so the gradient stays unbiased
however roughly the scores were computed. That makes the scoring pass the
place for cheap arithmetic: products in bfloat16 with float32 accumulation
run on GPU tensor cores and on AMX / AVX512-BF16 units (recent x86 CPUs),
and move half the bytes, while the training step keeps its own precision.
(TPUs already multiply float32 in bfloat16 passes by default; there the
gain is the memory traffic.) On a CPU without bfloat16 units (AVX2 only)
the same bfloat16 kernels run slower than float32 ones: the MNIST MLP's
scoring pass took 1.4x its float32 time on such an AMD EPYC
(docs/performance_notes.md, section 10). Measure before adopting it.
"""

from typing import Any, Callable

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

# The primitives whose operands are cast. Everything else (activations,
# normalisation, softmax, the accumulation itself) keeps its dtype.
_PRODUCTS = ("dot_general", "conv_general_dilated")


def _narrower(value, dtype) -> bool:
  return (jnp.issubdtype(value.dtype, jnp.floating)
          and jnp.finfo(value.dtype).bits > jnp.finfo(dtype).bits)


def _eval(jaxpr, consts, args, dtype):
  """Evaluates ``jaxpr`` with its products' operands cast to ``dtype``."""
  env = {}

  def read(var):
    return var.val if isinstance(var, jex_core.Literal) else env[var]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    params = dict(eqn.params)
    if eqn.primitive.name in _PRODUCTS:
      if all(_narrower(x, dtype) for x in invals):
        invals = [x.astype(dtype) for x in invals]
        # Accumulate and return in the original dtype: the output, and so
        # everything downstream of it, keeps its type.
        params["preferred_element_type"] = eqn.outvars[0].aval.dtype
    else:
      # Control flow and nested calls (jit, scan, cond, while, custom_jvp,
      # remat...) carry their bodies as closed jaxprs: rewrite those too.
      for name, value in params.items():
        if isinstance(value, tuple):
          params[name] = tuple(_rewrite_param(v, dtype) for v in value)
        else:
          params[name] = _rewrite_param(value, dtype)
    with eqn.ctx.manager:
      outs = eqn.primitive.bind(*invals,
                                **eqn.primitive.get_bind_params(params))
    if not eqn.primitive.multiple_results:
      outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _rewrite(closed, dtype):
  avals = [v.aval for v in closed.jaxpr.invars]
  return jax.make_jaxpr(
      lambda *args: _eval(closed.jaxpr, closed.consts, args, dtype))(*avals)


def _rewrite_param(value, dtype):
  if isinstance(value, jex_core.ClosedJaxpr):
    return _rewrite(value, dtype)
  if isinstance(value, jex_core.Jaxpr) and not value.constvars:
    # An open jaxpr (remat's body) has no constants to close over; casts
    # add none either, so the rewrite is open again.
    closed = _rewrite(jex_core.ClosedJaxpr(value, ()), dtype)
    if not closed.consts:
      return closed.jaxpr
  return value


def low_precision(fn: Callable[..., Any],
                  dtype: Any = jnp.bfloat16) -> Callable[..., Any]:
  """Runs ``fn``'s matrix products and convolutions on ``dtype`` operands.

  Meant for ``logits_fn``, the scoring forward pass: every ``dot_general``
  and ``conv_general_dilated`` in ``fn`` whose operands are wider floats
  than ``dtype`` gets its operands cast to ``dtype`` and accumulates in the
  original dtype, so the result, and every output of ``fn``, keeps its
  dtype. Products inside ``jit``, ``lax.scan``, ``lax.cond``,
  ``lax.while_loop`` and custom-derivative functions are cast too. Nothing
  else changes: the model, its parameters and the training step keep their
  precision, and jis's weights stay exact, since they use the probabilities
  the sampler drew from.

  It is worth it where it runs faster. On a 2-core Xeon with AMX
  (docs/performance_notes.md, section 8) the MNIST MLP's scoring pass over
  384 examples takes 0.4–0.55× and an LSTM's 0.3× the float32 time, a small
  CNN's 0.9×, and a small WideResNet's 1.25–1.4×; time yours with
  ``python -m experiments.benchmarks.step_cost --score_dtype=bfloat16``.

  ``fn``'s arguments are traced, as under ``jax.jit``: pass Python flags by
  closure, not as arguments.

  Args:
    fn: any function of arrays, usually ``logits_fn(state, batch)``.
    dtype: a floating dtype narrower than the operands, ``jnp.bfloat16``
      (default) or ``jnp.float16``.

  Returns:
    A function with ``fn``'s signature and output structure and dtypes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> w = jnp.full((3, 2), 1 / 3)
    >>> logits = jis.low_precision(lambda x: x @ w)
    >>> logits(jnp.ones((1, 3))).dtype
    dtype('float32')
    >>> ops = jax.make_jaxpr(logits)(jnp.ones((1, 3))).eqns
    >>> [str(e.invars[0].aval.dtype) for e in ops if e.primitive.name == "dot_general"]
    ['bfloat16']
  """
  if not callable(fn):
    raise TypeError(f"low_precision(fn) needs a function such as logits_fn; "
                    f"got {type(fn).__name__}.")
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"low_precision(dtype={dtype!r}) is not a dtype; use "
                     "jnp.bfloat16 or jnp.float16.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"low_precision(dtype={dtype}) must be a floating dtype, "
                     "such as jnp.bfloat16 or jnp.float16.")

  def wrapped(*args, **kwargs):
    closed, out_shape = jax.make_jaxpr(
        lambda a, k: fn(*a, **k), return_shape=True)(args, kwargs)
    outs = _eval(closed.jaxpr, closed.consts,
                 jax.tree.leaves((args, kwargs)), dtype)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped
