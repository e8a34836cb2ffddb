"""Argument checks for the factories: one rule, one message shape, everywhere.

Every public factory validates its arguments once, before it returns its
closures (optax style), with these helpers, so that a bad argument always
reads ``<name> must be <what>; got <value>.``
"""

import inspect
import math
import numbers
from typing import Callable, Optional, Sequence


def _describe(integer: bool, finite: bool, low, high, low_open: bool,
              high_open: bool) -> str:
  kind = "an int" if integer else ("a finite number" if finite else "a number")
  if low is not None and high is not None:
    return (f"{kind} in {'(' if low_open else '['}{low:g}, "
            f"{high:g}{')' if high_open else ']'}")
  if low is not None:
    return f"{kind} {'>' if low_open else '>='} {low:g}"
  if high is not None:
    return f"{kind} {'<' if high_open else '<='} {high:g}"
  return kind


def number(name: str, value, low: Optional[float] = None,
           high: Optional[float] = None, *, low_open: bool = False,
           high_open: bool = False, finite: bool = False,
           integer: bool = False, hint: str = "") -> float:
  """``value`` as a float (or int), or a ValueError naming ``name``.

  Booleans are refused (``True`` is an ``int`` to Python, never a setting
  here), and so are strings, NaN, and infinities when ``finite``.

  Args:
    name: how the argument is named in the message, e.g.
      ``"warmup(steps)"``.
    value: what the caller passed.
    low, high: the bounds, inclusive unless ``low_open`` / ``high_open``.
    finite: refuse ``±inf``.
    integer: require an integral number; the result is an ``int``.
    hint: a sentence appended to the message (what the argument means).

  Returns:
    ``value`` as ``int`` (``integer``) or ``float``.
  """
  kind = numbers.Integral if integer else numbers.Real
  ok = not isinstance(value, bool) and isinstance(value, kind)
  if ok:
    v = float(value)
    ok = not math.isnan(v) and not (finite and math.isinf(v))
    ok = ok and (low is None or (v > low if low_open else v >= low))
    ok = ok and (high is None or (v < high if high_open else v <= high))
  if not ok:
    what = _describe(integer, finite, low, high, low_open, high_open)
    raise ValueError(f"{name} must be {what}; got {value!r}."
                     + (f" {hint}" if hint else ""))
  return int(value) if integer else float(value)


def instance(name: str, value, cls, example: str):
  """``value`` if it is a ``cls``, else a TypeError that shows an example."""
  if not isinstance(value, cls):
    raise TypeError(f"{name} must be a {example}; got {type(value).__name__}.")
  return value


def one_of(name: str, value, options: Sequence):
  if value not in options:
    raise ValueError(f"{name} must be one of {list(options)}; got {value!r}.")
  return value


def accepts(fn: Callable, name: str, args: Sequence[str]) -> None:
  """Checks that ``fn`` can be called with ``args`` positionally (builtins
  and wrappers whose signature cannot be read pass)."""
  if not callable(fn):
    raise TypeError(f"{name} must be callable; got {type(fn).__name__}.")
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(*args)
  except TypeError as e:
    raise TypeError(
        f"{name} must accept ({', '.join(args)}); its signature is "
        f"{getattr(fn, '__name__', name)}{signature} ({e}).") from None
