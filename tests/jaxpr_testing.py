"""Walking a jaxpr in tests: every equation, nested bodies included."""

import jax.extend.core as jex


def eqns(jaxpr, into_conds=True):
  """Every equation, recursing into nested jaxprs (cond branches if asked)."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name == "cond" and not into_conds:
      continue
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex.ClosedJaxpr):
          yield from eqns(sub.jaxpr, into_conds)
        elif isinstance(sub, jex.Jaxpr):
          yield from eqns(sub, into_conds)


def product_operand_dtypes(jaxpr):
  """The operand dtypes of every ``dot_general`` and convolution, as
  strings, inside nested jaxprs too."""
  return [tuple(str(v.aval.dtype) for v in e.invars) for e in eqns(jaxpr)
          if e.primitive.name in ("dot_general", "conv_general_dilated")]
