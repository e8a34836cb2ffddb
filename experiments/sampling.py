"""From ``config.sampler`` to ``jis.importance_step``.

The sampler sub-config mirrors the keyword options of
:func:`jis.importance_step`: every field whose name is one of its parameters is
passed through, so an option the library gains is one config field away.
Fields that take jis objects (``policy``, ``condition``, ``score_transforms``,
``score_table``, ``budget``) are written as strings naming them on the ``jis``
module and looked up when the run starts::

    --config.sampler.policy=selective_backprop
    --config.sampler.policy='importance_sampling(k=0.5)'
    --config.sampler.condition='warmup(100)'
    --config.sampler.score_transforms='(power_smoothing(0.5), additive_smoothing(1.0))'
    --config.sampler.score_table=stale_scores     # num_examples filled in

One field is not an ``importance_step`` option: ``score_dtype`` wraps
``logits_fn`` in :func:`jis.low_precision` (``--config.sampler.score_dtype=
bfloat16``), so the scoring pass's products run in bfloat16.

A bare name is called with its defaults when it is a factory; a factory's
``num_examples`` parameter, when left out, is the training split's size.
``""`` or None leaves the option at jis's default. ``score="uniform"`` is plain uniform training: no
forward pass is ever made and the presample is one batch (``B = b``), so the
baseline reads as much data per step as it trains on.
"""

import ast
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jis


def _public_callables() -> list:
  return sorted(n for n in dir(jis)
                if not n.startswith("_") and n[0].islower()
                and callable(getattr(jis, n)))


def _lookup(name: str, field: str, spec: str):
  if name.startswith("jis."):
    name = name[4:]
  if not hasattr(jis, name):
    raise ValueError(
        f"--config.sampler.{field}={spec!r}: jis has no {name!r} (jis "
        f"{jis.__version__}). Names jis offers: {', '.join(_public_callables())}.")
  return getattr(jis, name)


def _literal(node, field: str, spec: str):
  try:
    return ast.literal_eval(node)
  except ValueError:
    raise ValueError(f"--config.sampler.{field}={spec!r}: arguments must be "
                     "Python literals (numbers, strings, None, tuples).") from None


def _call(fn, name: str, args, kwargs, field: str, spec: str, context):
  """``fn(*args, **kwargs)``, filling the parameters ``context`` names (the
  dataset size ``num_examples``) that the spec leaves out."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    params = {}
  names = list(params)
  given = set(names[:len(args)]) | set(kwargs)
  for key, value in (context or {}).items():
    if key in params and key not in given and value is not None:
      kwargs = {**kwargs, key: value}
  try:
    return fn(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"--config.sampler.{field}={spec!r}: {name}(...) "
                     f"failed: {e}. Write the arguments as '{name}(...)'."
                     ) from None


def _build(node, field: str, spec: str, context):
  if isinstance(node, (ast.Tuple, ast.List)):
    return tuple(_build(e, field, spec, context) for e in node.elts)
  if isinstance(node, (ast.Name, ast.Attribute)):
    name = ast.unparse(node)
    obj = _lookup(name, field, spec)
    # A factory such as jis.selective_backprop: call it with its defaults.
    if callable(obj) and not isinstance(obj, tuple):
      return _call(obj, name, (), {}, field, spec, context)
    return obj
  if isinstance(node, ast.Call) and isinstance(node.func,
                                                 (ast.Name, ast.Attribute)):
    name = ast.unparse(node.func)
    fn = _lookup(name, field, spec)
    args = [_literal(a, field, spec) for a in node.args]
    kwargs = {k.arg: _literal(k.value, field, spec) for k in node.keywords}
    return _call(fn, name, args, kwargs, field, spec, context)
  raise ValueError(f"--config.sampler.{field}={spec!r} must name jis objects, "
                   "e.g. 'top_k', 'warmup(100)' or '(a(1), b)'.")


def resolve_spec(spec: str, field: str, context: Optional[Mapping] = None):
  """``"name"``, ``"name(args)"`` or a tuple of them -> jis objects.

  ``context`` fills factory parameters the spec leaves out, by name (the
  training loop passes ``num_examples``, so ``stale_scores`` needs no
  argument).
  """
  try:
    tree = ast.parse(spec.strip(), mode="eval")
  except SyntaxError:
    raise ValueError(f"--config.sampler.{field}={spec!r} is not a jis name or "
                     "call such as 'top_k' or 'warmup(100)'.") from None
  return _build(tree.body, field, spec, context)


#: The options of ``jis.importance_step`` that take jis objects, written in
#: a config as the names of the factories that make them. The other string
#: options (``score``, ``loss``, ``labels``, ...) are passed as they are.
OBJECT_OPTIONS = ("policy", "condition", "score_transforms", "score_table",
                  "budget")


def _unset(value) -> bool:
  return value is None or (isinstance(value, str) and not value.strip())


def sampler_kwargs(sampler_cfg: Mapping[str, Any],
                   context: Optional[Mapping[str, Any]] = None
                   ) -> Dict[str, Any]:
  """The keyword arguments of ``jis.importance_step`` that ``sampler_cfg``
  sets, with named jis objects looked up.

  Fields left at ``""`` or None are not passed (jis's default applies), so a
  config may carry fields for options this jis version lacks; a field that
  is set must be an option.
  """
  params = inspect.signature(jis.importance_step).parameters
  options = {n: p for n, p in params.items()
             if p.kind == inspect.Parameter.KEYWORD_ONLY}
  kwargs = {}
  for field, value in dict(sampler_cfg).items():
    if _unset(value) or field == "score_dtype":   # build() applies it
      continue
    if field not in options:
      raise ValueError(
          f"config.sampler.{field}={value!r} is not an option of "
          f"jis.importance_step (its options: {', '.join(sorted(options))}).")
    if isinstance(value, str) and field in OBJECT_OPTIONS:
      kwargs[field] = resolve_spec(value, field, context)  # names jis objects
    elif hasattr(value, "to_dict"):
      kwargs[field] = value.to_dict()
    else:
      kwargs[field] = value
  return kwargs


def infobatch_loader_step(train_step: Callable, batch_size: int,
                          num_examples: int, mesh=None) -> jis.ImportanceStep:
  """The step for epochs an InfoBatch loader pruned (:mod:`experiments.pruning`).

  Uniform over what the loader gives (``B = b``, ``condition=jis.never()``:
  no scoring pass, no ``logits_fn``), with the loader's rescaling multiplied
  into the weights (``example_weights="weight"``), and a table of every
  example's latest loss (``jis.stale_scores``) that the train step's
  ``"is/logits"`` keep current, for the loader to draw the next epoch from.
  """
  kwargs = {} if mesh is None else {"mesh": mesh}
  return jis.importance_step(
      train_step, None, batch_size=batch_size, presample=1.0, score="loss",
      score_table=jis.stale_scores(num_examples), condition=jis.never(),
      example_weights="weight", **kwargs)


def build(sampler_cfg: Mapping[str, Any], train_step: Callable,
          logits_fn: Callable, batch_size: int,
          num_examples: Optional[int] = None,
          mesh=None, pruning: str = "") -> Tuple[jis.ImportanceStep, int]:
  """``jis.importance_step`` as ``sampler_cfg`` asks, and the presample size B.

  ``sampler_cfg.score_dtype`` (when set, e.g. ``"bfloat16"``) wraps
  ``logits_fn`` in ``jis.low_precision``: the scoring pass's products run in
  that dtype. ``batch_size`` (b) comes from the experiment config.
  ``num_examples`` (the training split's size) fills factories'
  ``num_examples`` parameter. With a
  ``mesh`` of several devices, jis's own data parallelism gets it when this
  jis version has it (otherwise XLA partitions the step from the batch's
  sharding). ``pruning="infobatch"``: the loader chooses the examples, and
  the step is :func:`infobatch_loader_step` (``sampler_cfg`` is not used).
  """
  if pruning == "infobatch":
    return infobatch_loader_step(train_step, batch_size, num_examples,
                                 mesh), batch_size
  kwargs = sampler_kwargs(sampler_cfg, {"num_examples": num_examples})
  score_dtype = dict(sampler_cfg).get("score_dtype")
  if not _unset(score_dtype) and logits_fn is not None:
    try:
      logits_fn = jis.low_precision(logits_fn, score_dtype)
    except ValueError as e:
      raise ValueError(f"config.sampler.score_dtype={score_dtype!r}: {e} "
                       "(\"\" scores in the model's own precision)") from None
  if "batch_size" in kwargs:
    raise ValueError("Set the batch size with config.batch_size, not "
                     "config.sampler.batch_size.")
  if kwargs.get("score") == "uniform":
    kwargs["presample"] = 1.0   # plain uniform SGD: read b, train on b
  params = inspect.signature(jis.importance_step).parameters
  if mesh is not None and "mesh" in params and "mesh" not in kwargs:
    kwargs["mesh"] = mesh
  sampler = jis.importance_step(train_step, logits_fn, batch_size=batch_size,
                                **kwargs)
  presample = kwargs.get("presample", params["presample"].default)
  return sampler, int(round(presample * batch_size))
