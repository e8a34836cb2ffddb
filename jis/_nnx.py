"""Flax NNX front end: an ``nnx.Pytree`` sampler on :func:`jis.importance_step`.

NNX steps update their objects in place (``optimizer.update(model, grads)``);
jis's step is pure. :class:`ImportanceSampler` joins the two without a second
implementation of the algorithm: each call splits the user's objects into a
pure train state (``nnx.split``), runs :func:`jis.importance_step`'s ``step``
on it with a pure train step that merges, calls the user's step and splits
again, and writes the result back into the objects (``nnx.update``) and into
the sampler's own :class:`SamplerState` variable.
"""

import inspect
from typing import Any, Callable, Mapping, Optional

from flax import nnx
from flax import struct
import jax

from jis import _step

PyTree = Any

_STREAM = "jis"


class SamplerState(nnx.Variable):
  """jis's state in an :class:`ImportanceSampler` (as ``nnx.OptState`` is an
  optimizer's): one variable holding a :class:`jis.ImportanceState` whose
  ``inner`` is empty (the PRNG key, the step count, τ and the condition,
  score transform, policy and score table states). One variable, not one
  per leaf: ``nnx.jit`` walks every graph node on every call, and eight
  variables cost it about twice the Python time of one."""


class _Objects(struct.PyTreeNode):
  """The user's NNX objects as the pure train state jis's step threads through.

  ``params`` and ``.replace`` make it a ``TrainState`` to the scores that
  differentiate ``logits_fn`` w.r.t. the parameters (``score="gradient_norm"``).
  """
  graphdef: Any = struct.field(pytree_node=False)
  graph: bool = struct.field(pytree_node=False)
  params: Any
  rest: Any


def _split(objects, graph: bool) -> _Objects:
  graphdef, params, rest = nnx.split(objects, nnx.Param, ..., graph=graph)
  # Arrays, not Variables: a merge inside a nested trace (jax.eval_shape,
  # lax.cond) then makes Variables that belong to that trace.
  return _Objects(graphdef, graph, nnx.as_pure(params), nnx.as_pure(rest))


def _merge(state: _Objects):
  return nnx.merge(state.graphdef, state.params, state.rest)


def _name(fn) -> str:
  return getattr(fn, "__name__", type(fn).__name__)


def _describe(x) -> str:
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    return f"{x.dtype}{list(x.shape)}"
  return type(x).__name__


def _path(path) -> str:
  """``model.norm.mean`` for the first object's variables."""
  keys = [getattr(k, "idx", getattr(k, "key", getattr(k, "name", k)))
          for k in path]
  head = "model" if keys[0] == 0 else f"argument {keys[0]}"
  return ".".join([head, *map(str, keys[1:])])


def _changed_paths(before: _Objects, after: _Objects):
  """The variables ``after`` holds another array for than ``before`` (static
  attributes, e.g. ``model.eval()`` on jis's copy, do not count)."""
  changed = []
  for part in ("params", "rest"):
    old = dict(jax.tree_util.tree_flatten_with_path(getattr(before, part))[0])
    changed += [_path(path) for path, y in
                jax.tree_util.tree_flatten_with_path(getattr(after, part))[0]
                if path in old and y is not old[path]]
  return changed


def _pure_train_step(train_step):
  """The user's in-place NNX step as jis's ``(state, batch, weights) ->
  (state, metrics)``: merge, call, split."""

  def step(state: _Objects, batch, weights):
    objects = _merge(state)
    _check_signature(
        train_step, "train_step",
        (*[type(o).__name__.lower() for o in objects], "batch", "weights"),
        "jis.nnx calls train_step with the objects passed to the sampler, "
        "the batch and per-example weights [b]: add a weights argument after "
        "the batch and weight your per-example losses, e.g. "
        "jnp.mean(weights * losses).")
    out = train_step(*objects, batch, weights)
    if out is None:
      metrics = {}
    elif isinstance(out, Mapping):
      metrics = out
    else:
      raise TypeError(
          f"train_step {_name(train_step)} returned {_describe(out)}; with "
          "jis.nnx it must return a dict of metrics (e.g. {'loss': loss, "
          f"{_step.LOGITS_KEY!r}: logits}}) or nothing, and update its objects "
          "in place.")
    new_state = _split(objects, state.graph)
    if new_state.graphdef != state.graphdef:
      raise ValueError(
          f"train_step {_name(train_step)} changed the structure or a static "
          "attribute of its objects (e.g. model.train() / model.eval(), a new "
          "attribute, Module.sow outside nnx.capture). jis threads the objects "
          "through a compiled step, where only nnx.Variable values may change: "
          "set modes before the loop, e.g. pass nnx.view(model, "
          "deterministic=False, use_running_average=False).")
    return new_state, metrics
  return step


def _pure_logits_fn(logits_fn):
  """``logits_fn(model, batch)`` on a merged copy of the objects; refuses one
  that changes them (training-mode BatchNorm or dropout), whose changes would
  otherwise be dropped silently."""

  def logits(state: _Objects, batch):
    objects = _merge(state)
    out = logits_fn(objects[0], batch)
    changed = _changed_paths(state, _split(objects, state.graph))
    if changed:
      raise ValueError(
          f"logits_fn {_name(logits_fn)} changed the model's state: "
          f"{', '.join(changed)}. It scores examples and must run in "
          "inference mode (BatchNorm on its running statistics, no dropout, "
          "no RNG draws); jis discards any change it makes. Call the model "
          "through nnx.view(model, deterministic=True, "
          "use_running_average=True) inside logits_fn, or call model.eval() "
          "first (on jis's copy: your model keeps its mode).")
    return out
  return logits


def _check_signature(fn, name: str, args, hint: str) -> None:
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return  # builtins and some wrappers have no signature: trust the caller.
  try:
    signature.bind(*args)
  except TypeError as e:
    raise TypeError(f"{name} {_name(fn)}{signature} cannot be called as "
                    f"{name}({', '.join(args)}) ({e}). {hint}") from None


def _field(name: str) -> property:
  """A read-only view of one :class:`jis.ImportanceState` field of
  ``sampler.state``."""
  return property(lambda self: getattr(self.state.get_value(), name),
                  doc=f"The sampler's ``{name}`` (read-only).")


class ImportanceSampler(nnx.Pytree):
  """Importance sampling for an NNX step that updates its objects in place.

  ``sampler(*objects, batch)`` takes a uniform presample of
  ``B = round(presample · batch_size)`` examples, picks ``batch_size`` of them
  by importance (:func:`jis.importance_step`, Algorithm 1 of Katharopoulos &
  Fleuret 2018) and calls ``train_step(*objects, selected, weights)`` once, on
  device. The objects (model, optimizer, metrics, ``nnx.Rngs``) are updated
  in place, as the step alone updates them, and so are the sampler's τ, key
  and step count (:class:`SamplerState` variables). Call it inside
  ``nnx.jit``, or merge it with your objects inside ``jax.jit``
  (``nnx.split`` / ``nnx.merge``; see ``docs/nnx.md``); in a plain Python loop
  it runs op by op.

  It is equivalent to::

      graphdef, params, rest = nnx.split(objects, nnx.Param, ...)
      def pure_step(state, batch, weights):       # jis's train_step convention
        objects = nnx.merge(graphdef, *state)
        metrics = train_step(*objects, batch, weights)      # in place
        return nnx.split(objects, nnx.Param, ...)[1:], metrics or {}
      def pure_logits(state, batch):
        return logits_fn(nnx.merge(graphdef, *state)[0], batch)
      step = jis.importance_step(pure_step, pure_logits, batch_size=b, ...)
      state, metrics = step.step(ImportanceState(
          (params, rest), sampler.key, sampler.step, sampler.tau, ...), batch)
      nnx.update(objects, *state.inner)   # and sampler.key, .step, .tau, ...

  The scoring pass, ``logits_fn``, runs on a copy of the objects, so it
  cannot update BatchNorm statistics or advance an RNG stream; a
  ``logits_fn`` that tries (a model called in training mode, which would
  score with batch statistics and dropout) is refused with an error. Only
  ``train_step`` draws dropout keys, once per step, on the examples it trains
  on, as without jis.

  Args:
    train_step: ``(*objects, batch, weights [b]) -> metrics dict or None``,
      your NNX step (plain or ``nnx.jit``-decorated) with per-example loss
      weights, updating the objects in place. A metrics dict may hold the
      trained examples' logits under ``jis.LOGITS_KEY`` (``"is/logits"``):
      a score table or a policy that observes uniform steps then scores the
      trained examples without a forward pass (unused otherwise).
    logits_fn: ``(model, batch) -> logits [n, ...]``, the forward pass in
      inference mode (``nnx.view(model, deterministic=True,
      use_running_average=True)``); ``model`` is the first object passed to
      the sampler. May be None with ``score="uniform"``.
    batch_size: ``b``, the number of examples each update trains on.
    rngs: an ``nnx.Rngs``; the sampler draws its key once, from the ``jis``
      stream (the default stream if there is none).
    graph: NNX graph mode (True) or tree mode (False) for splitting the
      objects; None follows ``nnx.set_graph_mode`` at each call, as
      ``nnx.Optimizer`` does.
    **options: any keyword option of :func:`jis.importance_step`
      (``presample``, ``loss``, ``labels``, ``score``, ``tau_threshold``, ...).

  Attributes:
    state: the :class:`SamplerState` variable holding the
      :class:`jis.ImportanceState` fields other than ``inner``
      (``sampler.state.get_value().tau``).
    key, step, tau, condition, transforms, policy, table, tau_step: those
      fields, read-only (``sampler.tau``).
    pure: the :class:`jis.ImportanceStep` the sampler runs.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import jis.nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    >>> def train_step(model, optimizer, batch, weights):
    ...   def loss_fn(model):
    ...     logits = model(batch["x"])
    ...     losses = optax.softmax_cross_entropy_with_integer_labels(
    ...         logits, batch["label"])
    ...     return jnp.mean(weights * losses)
    ...   loss, grads = nnx.value_and_grad(loss_fn)(model)
    ...   optimizer.update(model, grads)
    ...   return {"loss": loss}
    >>> sampler = jis.nnx.ImportanceSampler(
    ...     train_step, lambda model, batch: model(batch["x"]),
    ...     batch_size=4, presample=2.0, tau_threshold=0.0, rngs=nnx.Rngs(0))
    >>> @nnx.jit
    ... def step(sampler, model, optimizer, batch):
    ...   return sampler(model, optimizer, batch)
    >>> batch = {"x": jnp.ones((8, 3)), "label": jnp.array([0, 1] * 4)}
    >>> metrics = step(sampler, model, optimizer, batch)
    >>> int(sampler.step), int(optimizer.step[...])
    (1, 1)
    >>> float(metrics["is/active"])
    1.0
  """

  def __init__(self, train_step: Callable[..., Optional[Mapping]],
               logits_fn: Optional[Callable[[Any, PyTree], jax.Array]], *,
               batch_size: int, rngs: nnx.Rngs, graph: Optional[bool] = None,
               **options):
    if not callable(train_step):
      raise TypeError(
          f"train_step must be callable; got {_describe(train_step)}.")
    if logits_fn is not None:
      if not callable(logits_fn):
        raise TypeError(
            f"logits_fn must be callable; got {_describe(logits_fn)}.")
      _check_signature(
          logits_fn, "logits_fn", ("model", "batch"),
          "jis.nnx calls logits_fn(model, batch) with the first object passed "
          "to the sampler, e.g. lambda model, batch: nnx.view(model, "
          "deterministic=True, use_running_average=True)(batch['image']).")
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, e.g. rngs=nnx.Rngs(0); got "
                      f"{_describe(rngs)}.")
    if graph not in (None, True, False):
      raise TypeError(f"graph must be None, True or False; got {graph!r}.")
    self.graph = graph
    self.pure = _step.importance_step(
        _pure_train_step(train_step),
        None if logits_fn is None else _pure_logits_fn(logits_fn),
        batch_size=batch_size, **options)
    # rngs["jis"] falls back to the default stream, as rngs.dropout does.
    self.state = SamplerState(self.pure.init((), rngs[_STREAM]()))

  def __call__(self, *objects_and_batch) -> dict:
    """``sampler(*objects, batch)``: one importance-sampled ``train_step``.

    Args:
      *objects_and_batch: the NNX objects ``train_step`` takes (model first),
        then the presample batch, whose leaves have leading dimension ``B``.

    Returns:
      ``train_step``'s metrics plus jis's ``is/`` metrics (see
      :func:`jis.importance_step`).
    """
    objects, batch = self._check_call(objects_and_batch)
    graph = (nnx.set_graph_mode.current_value() if self.graph is None
             else self.graph)
    state = self.state.get_value()._replace(inner=_split(objects, graph))
    state, metrics = self.pure.step(state, batch)
    nnx.update(objects, state.inner.params, state.inner.rest)
    self.state.set_value(state._replace(inner=()))
    return metrics

  key = _field("key")
  step = _field("step")
  tau = _field("tau")
  tau_step = _field("tau_step")
  condition = _field("condition")
  transforms = _field("transforms")
  policy = _field("policy")
  table = _field("table")

  def _check_call(self, args):
    usage = ("Call sampler(model, [optimizer, metrics, rngs, ...], batch): "
             "your step's NNX objects, then the presample batch; it calls "
             "train_step(model, ..., batch, weights).")
    if len(args) < 2:
      raise TypeError(f"sampler got {len(args)} argument(s). {usage}")
    *objects, batch = args
    if isinstance(batch, (nnx.Pytree, nnx.Variable)):
      raise TypeError(f"the last argument is {_describe(batch)}; it must be "
                      f"the presample batch. {usage}")
    for i, o in enumerate(objects):
      if isinstance(o, ImportanceSampler):
        raise TypeError(f"argument {i} is the sampler itself; do not pass it "
                        f"to its own call. {usage}")
      if not isinstance(o, (nnx.Pytree, nnx.Variable)):
        raise TypeError(
            f"argument {i} is {_describe(o)}, not an NNX object (nnx.Module, "
            "nnx.Optimizer, nnx.MultiMetric, nnx.Rngs, nnx.Variable). Close "
            "over other values in train_step (functools.partial); for a "
            f"flax.linen TrainState use jis.importance_step. {usage}")
    return tuple(objects), batch
