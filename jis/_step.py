"""`importance_step`: a train step that resamples its batch by importance."""

import functools
import inspect
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jis import _budget
from jis import _conditions
from jis import _indexed
from jis import _losses
from jis import _policies
from jis import _scores
from jis import _sharding
from jis import _stale
from jis import _transforms
from jis import _variance

Array = jax.Array
PyTree = Any

#: Metrics key under which a ``train_step`` may hand back the logits of the
#: examples it trained on, so uniform steps keep τ current without a forward pass.
LOGITS_KEY = "is/logits"
_PREFIX = "is/"


class ImportanceState(NamedTuple):
  """The state of an importance-sampled training run: a pytree.

  Attributes:
    inner: the user's train state, as their ``train_step`` returns it.
    key: the PRNG key; split at every step.
    step: int32 count of steps taken.
    tau: float32 moving average of the variance reduction τ (``is/tau``).
    condition: the switch condition's state.
    transforms: the score transforms' states, one per transform.
    policy: the selection policy's state.
    table: the stale score table (:func:`jis.stale_scores`), or ``()``.
  """
  inner: PyTree
  key: Array
  step: Array
  tau: Array
  condition: PyTree
  transforms: tuple
  policy: PyTree
  table: PyTree = ()


class ImportanceStep(NamedTuple):
  """The pure functions returned by :func:`importance_step`.

  Attributes:
    init: ``(train_state, key) -> ImportanceState``.
    step: ``(ImportanceState, presample_batch) -> (ImportanceState, metrics)``.
  """
  init: Callable[[PyTree, Array], ImportanceState]
  step: Callable[[ImportanceState, PyTree], tuple]


def _check_callable_arity(fn, name: str, args: Sequence[str]) -> None:
  if not callable(fn):
    raise TypeError(f"{name} must be callable; got {type(fn).__name__}.")
  try:
    signature = inspect.signature(fn)
  except (TypeError, ValueError):
    return  # builtins and some wrappers have no signature: trust the caller.
  try:
    signature.bind(*args)
  except TypeError as e:
    raise TypeError(
        f"{name} must accept ({', '.join(args)}); its signature is "
        f"{getattr(fn, '__name__', name)}{signature} ({e}).") from None


def _labels_getter(labels) -> Callable[[PyTree], Array]:
  if callable(labels):
    return labels
  if not isinstance(labels, (str, int)):
    raise TypeError(
        f"labels must be a batch key or a callable batch -> labels; got "
        f"{type(labels).__name__}.")

  def get(batch):
    try:
      return batch[labels]
    except (KeyError, IndexError, TypeError):
      keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
      raise ValueError(
          f"labels={labels!r} but the batch has no such entry (it has {keys}). "
          "Pass labels=<the key holding the targets>, or a callable "
          "labels=lambda batch: ...") from None
  return get


def _as_array(x):
  # TrainState.create keeps step as a Python int; the jitted step returns an
  # int32 array, which would make the second call compile again.
  if isinstance(x, (bool, numbers.Number, np.ndarray, np.generic)):
    return jnp.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))
  return x


def _unique_fraction(indices: Array) -> Array:
  s = jnp.sort(indices)
  unique = 1 + jnp.sum(s[1:] != s[:-1])
  return unique.astype(jnp.float32) / indices.shape[0]


def _entropy(probs: Array) -> Array:
  p = probs.astype(jnp.float32)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def _sanitize(scores: Array):
  """The scores, or uniform ones (and fallback = 1) where they cannot be a
  distribution: non-finite, negative or all zero. Subnormal scores, of either
  sign, count as zero on every backend (most flush them anyway)."""
  tiny = jnp.finfo(scores.dtype).tiny
  scores = jnp.where(jnp.abs(scores) < tiny, jnp.zeros_like(scores), scores)
  ok = (jnp.all(jnp.isfinite(scores)) & jnp.all(scores >= 0)
        & (jnp.max(scores) > 0))
  return jnp.where(ok, scores, jnp.ones_like(scores)), 1.0 - ok.astype(jnp.float32)


def _nonfinite(metrics) -> Array:
  """1.0 when a floating-point value among the user's metrics (their loss) is
  NaN or infinite: a few scalar reductions, so it costs nothing per step."""
  flags = [jnp.any(~jnp.isfinite(x)) for x in jax.tree.leaves(metrics)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not flags:
    return jnp.zeros((), jnp.float32)
  return jnp.any(jnp.stack(flags)).astype(jnp.float32)


def importance_step(
    train_step: Callable[[PyTree, PyTree, Array], tuple],
    logits_fn: Optional[Callable[[PyTree, PyTree], Array]],
    *,
    batch_size: int,
    presample: float = 3.0,
    loss: Union[str, Callable[[Array, Array], Array]] = "softmax_cross_entropy",
    labels: Union[str, int, Callable[[PyTree], Array]] = "label",
    score: Union[str, Callable[..., Array], _scores.Score] = "upper_bound",
    tau_threshold: Optional[float] = None,
    tau_momentum: float = 0.9,
    k: float = 1.0,
    smooth: float = 0.0,
    adaptive_smooth: bool = False,
    score_transforms: Optional[Sequence[_transforms.ScoreTransform]] = None,
    policy: Optional[_policies.Policy] = None,
    condition: Optional[_conditions.Condition] = None,
    score_table: Optional[_stale.ScoreTable] = None,
    budget: Optional[_budget.Budget] = None,
    forward_batch_size: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    data_axis: Union[str, Sequence[str]] = "data",
    resample: str = "global",
) -> ImportanceStep:
  """Wraps a train step so that it trains on an importance-sampled batch.

  ``step(state, batch)`` takes a uniform *presample* of ``B = round(presample ·
  batch_size)`` examples and is equivalent to this Python (Katharopoulos &
  Fleuret 2018, Algorithm 1), but compiles to one XLA program with ``lax.cond``
  choosing the branch on device::

      if condition_active(state):                  # default: τ > τ_th
        s = score(logits_fn(inner, batch), labels)  # one forward pass over B
        s = transforms(s)                           # smoothing
        p = s / s.sum()
        i = categorical(p, size=b)                  # with replacement
        w = (1 / (B * p[i])) ** k                   # rescaled if k != 1
        inner, metrics = train_step(inner, batch[i], w)
      else:
        inner, metrics = train_step(inner, batch[:b], ones(b))
        s = score of batch[:b]                      # to keep τ current
      τ = m τ + (1 − m) variance_reduction(s)

  On uniform steps the scores of the ``b`` trained examples come from the
  logits the ``train_step`` hands back under ``metrics["is/logits"]`` when it
  does (free: its forward pass computed them; jis removes the key from the
  metrics), or else from ``logits_fn`` on those ``b`` examples (one extra
  forward pass of ``b``, about a third of a training step). With
  ``score="uniform"`` no forward pass is ever made.

  If the scores of a step are non-finite, negative or all zero, that step uses
  uniform scores instead and reports ``is/fallback = 1``.

  ``train_step`` and ``logits_fn`` may be plain or already-jitted functions:
  jis traces them into its own program either way. jis never jits on your
  behalf: ``jax.jit(sampler.step, donate_argnums=0)`` is yours to write.

  Args:
    train_step: ``(train_state, batch, weights [b]) -> (train_state, metrics)``,
      the user's step with per-example loss weights; ``metrics`` a dict.
    logits_fn: ``(train_state, batch) -> logits [n, ...]``, the forward pass in
      inference mode (BatchNorm statistics, no dropout). May be None with
      ``score="uniform"`` or a score that needs no logits.
    batch_size: ``b``, the number of examples each update trains on.
    presample: ``B / b`` (a float ≥ 1); the batch given to ``step`` must have
      ``B = round(presample · b)`` examples.
    loss: ``"softmax_cross_entropy"`` (integer or one-hot/soft labels),
      ``"sigmoid_binary_cross_entropy"``, ``"mean_squared_error"``, or a
      callable ``loss(logits, labels) -> [n]``; used by the scores.
    labels: the batch key holding the targets, or a callable ``batch -> labels``.
    score: ``"upper_bound"`` (norm of the loss gradient w.r.t. the logits),
      ``"loss"``, ``"gradient_norm"`` (exact per-example parameter-gradient
      norm; a costly reference), ``"reducible_loss"`` (RHO-LOSS, needs
      ``batch["irreducible_loss"]``), ``"uniform"``, or a callable
      ``score(logits, labels, batch) -> [n]``.
    tau_threshold: resample when τ exceeds it; None is eq. 29,
      ``(B + 3b) / (3b)``; ``0.0`` always, ``float("inf")`` never. Shorthand for
      ``condition=when_variance_reduced(tau_threshold, tau_momentum)``.
    tau_momentum: momentum of the moving average τ (``state.tau``).
    k: weight exponent; 1 is unbiased, ``k < 1`` biases towards hard examples.
      Shorthand for ``policy=importance_sampling(k)``.
    smooth: added to every score (shorthand for ``additive_smoothing``).
    adaptive_smooth: if True, ``smooth`` multiplies a moving average of the
      scores instead (shorthand for ``adaptive_smoothing(smooth)``).
    score_transforms: transforms applied in order to the scores.
    policy: how to select ``b`` examples from the scores.
    condition: when to resample rather than train on the first ``b`` examples.
    score_table: :func:`jis.stale_scores`: score the presample from a table of
      every example's latest score instead of a forward pass, refreshing the
      trained examples' scores (see ``docs/strategies.md``). The default
      condition is then :func:`jis.always`, since resampling costs no
      presample forward pass.
    budget: :func:`jis.constant_variance` or :func:`jis.constant_time`: pick
      the numbers of examples scored and trained on from τ, among static
      buckets (``lax.switch``); its τ threshold is the default condition's.
    forward_batch_size: score the presample this many examples at a time
      (``lax.map`` over ``B / forward_batch_size`` chunks) so that very large
      presamples fit in memory; it must divide ``B`` (and, on a mesh, be a
      multiple of the devices on ``data_axis``). None scores all ``B`` at once.
    mesh: the ``jax.sharding.Mesh`` whose ``data_axis`` the presample's leading
      dimension is split over (data parallelism; see ``docs/scaling.md``).
      None runs the single-device algorithm. ``train_step`` and ``logits_fn``
      stay global-view functions; the parameters may be replicated or sharded
      over other mesh axes as you choose. ``init`` replicates the jis state and
      any train-state leaf not already on the mesh.
    data_axis: the mesh axis name (or tuple of names) of the data parallelism.
      ``B`` and ``b`` must be divisible by the number of devices on it.
    resample: with a mesh, ``"global"`` draws the ``b`` examples from all
      ``B`` scores exactly as on one device (all-gathers the ``B`` scores,
      then moves about ``b`` rows per device); ``"local"`` draws ``b / d``
      from each device's own ``B / d`` examples with weights
      ``1 / ((B / d) p)`` that keep the update unbiased (stratified; no
      example crosses devices).

  Returns:
    An :class:`ImportanceStep` ``(init, step)``. ``step`` returns the user's
    metrics plus ``is/tau``, ``is/active``, ``is/ess``, ``is/max_weight``,
    ``is/score_mean``, ``is/fallback``, ``is/selected_fraction_unique``,
    ``is/entropy``, ``is/variance_reduction`` (this step's τ) and
    ``is/nonfinite`` (1 when one of your metrics, e.g. the loss, is NaN or
    infinite; see ``docs/reliability.md``); with a
    ``score_table`` also ``is/fresh``, ``is/score_age`` and ``is/unscored``;
    with a ``budget`` also ``is/presample_size`` and ``is/batch_size``.
    ``step`` also accepts a :class:`jis.Indexed` presample (dataset indices
    into a dataset on device) in place of the presample batch.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jis
    >>> def train_step(params, batch, weights):
    ...   def loss_fn(p):
    ...     logits = batch["x"] @ p
    ...     losses = optax.softmax_cross_entropy_with_integer_labels(
    ...         logits, batch["label"])
    ...     return jnp.mean(weights * losses)
    ...   loss, grads = jax.value_and_grad(loss_fn)(params)
    ...   return params - 0.1 * grads, {"loss": loss}
    >>> sampler = jis.importance_step(
    ...     train_step, lambda params, batch: batch["x"] @ params,
    ...     batch_size=4, presample=2.0, tau_threshold=0.0)
    >>> state = sampler.init(jnp.zeros((3, 2)), jax.random.key(0))
    >>> batch = {"x": jnp.ones((8, 3)), "label": jnp.array([0, 1] * 4)}
    >>> state, metrics = jax.jit(sampler.step)(state, batch)
    >>> int(state.step), float(metrics["is/active"])
    (1, 1.0)
  """
  # ---- validate once, before the closures (optax style) ----
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
  b = int(batch_size)
  if isinstance(presample, bool) or not isinstance(presample, numbers.Real) \
      or not np.isfinite(presample) or presample < 1:
    raise ValueError(
        f"presample must be a finite number >= 1 (B = round(presample * "
        f"batch_size) examples are scored per step); got {presample!r}.")
  big_b = int(round(presample * b))
  if big_b < b:
    raise ValueError(f"presample={presample} gives B={big_b} < batch_size={b}.")
  if not 0 <= tau_momentum < 1:
    raise ValueError(f"tau_momentum must be in [0, 1); got {tau_momentum!r}.")
  _check_callable_arity(train_step, "train_step", ("state", "batch", "weights"))
  loss_ = _losses.resolve_loss(loss)
  score_ = _scores.resolve_score(score, loss_)
  if logits_fn is None:
    if score_.needs_logits:
      raise ValueError(
          f"score={score_.name!r} needs the model's logits, so logits_fn is "
          "required: pass logits_fn(state, batch) -> logits (inference mode).")
  else:
    _check_callable_arity(logits_fn, "logits_fn", ("state", "batch"))
  labels_fn = _labels_getter(labels)

  if policy is None:
    policy = _policies.importance_sampling(k)
  elif k != 1.0:
    raise ValueError(
        f"k={k} is a shorthand for policy=jis.importance_sampling(k); it cannot "
        "be combined with policy=. Pass the exponent to the policy instead.")
  if not isinstance(policy, _policies.Policy):
    raise TypeError(f"policy must be a jis.Policy (e.g. jis.importance_sampling());"
                    f" got {type(policy).__name__}.")

  default_threshold = None   # the default condition's τ threshold
  if condition is None:
    if tau_threshold is None and budget is not None:
      default_threshold = budget.tau_threshold(big_b, b)
      condition = _conditions.when_variance_reduced(default_threshold,
                                                    tau_momentum)
    elif tau_threshold is None and score_table is not None:
      # Eq. 29 prices a presample forward pass that stale scores do not make.
      condition = _conditions.always()
    else:
      default_threshold = (_variance.tau_threshold(big_b, b)
                           if tau_threshold is None else tau_threshold)
      condition = _conditions.when_variance_reduced(default_threshold,
                                                    tau_momentum)
  elif tau_threshold is not None:
    raise ValueError(
        "tau_threshold is a shorthand for condition=jis.when_variance_reduced("
        "threshold); it cannot be combined with condition=.")
  if not isinstance(condition, _conditions.Condition):
    raise TypeError(f"condition must be a jis.Condition (e.g. jis.always()); got "
                    f"{type(condition).__name__}.")
  if condition.constant not in (None, True, False):
    raise TypeError("condition.constant must be None, True or False; got "
                    f"{condition.constant!r}.")
  # Known before the run: compile one branch and no lax.cond. Uniform scores
  # have τ = 1, so the default condition's threshold above 1 never fires.
  static_active = condition.constant
  if (static_active is None and score_.name == "uniform" and
      default_threshold is not None and default_threshold > 1.01):
    static_active = False

  def branch(pred, on_true, on_false, operands):
    """``lax.cond``, or the one branch ``static_active`` names."""
    if static_active is None:
      return jax.lax.cond(pred, on_true, on_false, operands)
    return (on_true if static_active else on_false)(operands)

  if adaptive_smooth and not smooth > 0:
    raise ValueError("adaptive_smooth=True scales smooth by a moving average of "
                     f"the scores, so smooth must be > 0; got smooth={smooth!r}.")
  if score_transforms is None:
    if adaptive_smooth:
      score_transforms = (_transforms.adaptive_smoothing(smooth),)
    elif smooth:
      score_transforms = (_transforms.additive_smoothing(smooth),)
    else:
      score_transforms = ()
  elif smooth or adaptive_smooth:
    raise ValueError("smooth/adaptive_smooth are shorthands for score_transforms"
                     "; put jis.additive_smoothing / jis.adaptive_smoothing in "
                     "score_transforms instead.")
  score_transforms = tuple(score_transforms)
  for t in score_transforms:
    if not isinstance(t, _transforms.ScoreTransform):
      raise TypeError("score_transforms must hold jis.ScoreTransform values "
                      f"(e.g. jis.additive_smoothing(1.0)); got {type(t).__name__}.")

  layout = _sharding.resolve_layout(mesh, data_axis, resample, big_b, b,
                                   forward_batch_size)
  if score_table is not None and not isinstance(score_table, _stale.ScoreTable):
    raise TypeError("score_table must be a jis.ScoreTable (jis.stale_scores(N));"
                    f" got {type(score_table).__name__}.")
  if score_table is not None and layout.mesh is not None:
    raise ValueError("score_table runs on one device for now: pass mesh=None.")
  buckets = None
  if budget is not None:
    if score_table is not None:
      raise ValueError(
          "budget trades presample forward passes against backward passes; "
          "with score_table the presample needs no forward pass. Use one.")
    buckets = _budget.resolve_buckets(budget, big_b, b, layout)

  # ---- the pure functions ----
  def init(train_state: PyTree, key: Array) -> ImportanceState:
    if not (isinstance(key, jax.Array) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,)))):
      raise TypeError(
          f"init(train_state, key) needs a PRNG key such as jax.random.key(0); "
          f"got {type(key).__name__} {getattr(key, 'dtype', '')}.")
    state = ImportanceState(
        inner=_sharding.place_train_state(
            jax.tree.map(_as_array, train_state), layout),
        key=key,
        step=jnp.zeros((), jnp.int32),
        tau=jnp.zeros((), jnp.float32),
        condition=condition.init(big_b, b),
        transforms=tuple(t.init() for t in score_transforms),
        policy=_sharding.init_policy(policy, big_b, b, layout),
        table=score_table.init() if score_table is not None else ())
    return on_mesh(state, _sharding.place)

  def on_mesh(state, put):
    # jis's own leaves go where step returns them (replicated, or split per
    # device for a local policy), so a jitted step never compiles twice.
    own = {name: put(getattr(state, name), layout, None)
           for name in state._fields if name not in ("inner", "policy")}
    return state._replace(**own, policy=put(
        state.policy, layout, _sharding.policy_sharding_dim(layout)))

  def check_batch(batch):
    if isinstance(batch, _indexed.Indexed):
      return _indexed.check_indexed(batch, big_b, layout)
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
      raise ValueError("step(state, batch) got a batch with no arrays.")
    for path, leaf in leaves:
      shape = np.shape(leaf)
      if len(shape) == 0 or shape[0] != big_b:
        raise ValueError(
            f"Every batch leaf must have leading dimension B = round(presample * "
            f"batch_size) = round({presample} * {b}) = {big_b}; leaf "
            f"batch{jax.tree_util.keystr(path)} has shape {shape}. Feed "
            f"presample batches of {big_b} examples, or change presample.")

  def scores_of(inner, batch, logits=None):
    n = jax.tree.leaves(batch)[0].shape[0]
    if score_.per_parameter:
      s = _scores.per_parameter_grad_norm(logits_fn, loss_, labels_fn, inner, batch)
    else:
      if score_.needs_logits and logits is None:
        logits = logits_fn(inner, batch)
      lab = labels_fn(batch) if score_.needs_labels else None
      if score_.needs_logits and lab is not None and np.shape(logits)[:1] != (n,):
        raise ValueError(
            f"logits_fn returned logits of shape {np.shape(logits)} for {n} "
            f"examples; the first axis must be the batch ({n}).")
      s = score_.fn(logits, lab, batch)
    if np.shape(s) != (n,):
      raise ValueError(f"score={score_.name!r} returned shape {np.shape(s)}; "
                       f"it must return one score per example, shape ({n},).")
    return jnp.asarray(s, jnp.float32)

  def transform(scores, states):
    new_states = []
    for t, s in zip(score_transforms, states):
      scores, s = t.update(scores, s)
      new_states.append(s)
    return scores, tuple(new_states)

  def call_train_step(inner, batch, weights):
    out = train_step(inner, batch, weights)
    if not (isinstance(out, tuple) and len(out) == 2):
      raise TypeError("train_step must return (train_state, metrics); got "
                      f"{type(out).__name__}.")
    new_inner, metrics = out
    if not isinstance(metrics, Mapping):
      raise TypeError("train_step must return its metrics as a dict so jis can "
                      f"add its is/ metrics; got {type(metrics).__name__}.")
    metrics = dict(metrics)
    logits = metrics.pop(LOGITS_KEY, None)
    clash = [name for name in metrics if str(name).startswith(_PREFIX)]
    if clash:
      raise ValueError(f"Metric names starting with {_PREFIX!r} are jis's; "
                       f"rename {clash}.")
    in_leaves, in_tree = jax.tree.flatten(inner)
    out_leaves, out_tree = jax.tree.flatten(new_inner)
    if in_tree != out_tree:
      raise ValueError("train_step must return a train state with the same "
                       f"structure as it was given; got {out_tree}, expected "
                       f"{in_tree}.")
    for x, y in zip(in_leaves, out_leaves):
      if jnp.shape(x) != jnp.shape(y) or jnp.result_type(x) != jnp.result_type(y):
        raise ValueError(
            "train_step changed a state leaf from "
            f"{jnp.result_type(x)}{list(jnp.shape(x))} to "
            f"{jnp.result_type(y)}{list(jnp.shape(y))}; leaves must keep their "
            "shape and dtype so the step compiles once (create the state with "
            "sampler.init, which turns Python numbers into arrays).")
    n = np.shape(weights)[0]
    if logits is not None and np.shape(logits)[:1] != (n,):
      raise ValueError(f"metrics[{LOGITS_KEY!r}] must hold the logits of the "
                       f"{n} trained examples; got shape {np.shape(logits)}.")
    return new_inner, metrics, logits

  def is_metrics(raw_scores, scores, indices, weights, probs, fallback, active):
    w = weights.astype(jnp.float32)
    return {
        "is/active": jnp.asarray(active, jnp.float32),
        "is/ess": jnp.square(jnp.sum(w)) / jnp.sum(jnp.square(w)),
        "is/max_weight": jnp.max(w),
        "is/score_mean": jnp.mean(raw_scores),
        "is/fallback": fallback,
        "is/selected_fraction_unique": _unique_fraction(indices),
        "is/entropy": _entropy(probs),
        "is/variance_reduction": _variance.variance_reduction(scores),
    }

  def score_and_select(inner, pool, table, t_states, p_state, step_count, key,
                       n_train):
    """Scores ``pool`` (from the score table or a forward pass), transforms and
    sanitises the scores, and lets the policy draw ``n_train`` of its rows."""
    score_presample = lambda: _indexed.score_in_chunks(
        lambda chunk: scores_of(inner, chunk), pool, layout)
    if score_table is None:
      raw, fresh, extra = score_presample(), False, {}
    else:
      raw, table, fresh, extra = _stale.presample_scores(
          score_table, table, pool, step_count, score_presample)
    scores, t_states = transform(raw, t_states)
    scores, fallback = _sanitize(scores)
    sel, selected = _indexed.select(
        policy, key, scores, p_state, pool, n_train, layout)
    weights = jnp.asarray(sel.weights, jnp.float32)
    return (raw, scores, fallback, sel, selected, weights, table, t_states,
            fresh, extra)

  def step(state: ImportanceState, batch: PyTree):
    if not isinstance(state, ImportanceState):
      raise TypeError("step(state, batch) needs the ImportanceState made by "
                      f"sampler.init; got {type(state).__name__}.")
    check_batch(batch)
    key, select_key = jax.random.split(state.key)
    operands = (state.inner, state.condition, state.transforms, state.policy,
                state.table)

    def importance_branch(operands, n_scored=big_b, n_train=b):
      inner, cond_state, t_states, p_state, table = operands
      pool = _indexed.head(batch, n_scored)  # the rows scored
      (raw, scores, fallback, sel, selected, weights, table, t_states, fresh,
       extra) = score_and_select(inner, pool, table, t_states, p_state,
                                 state.step, select_key, n_train)
      new_inner, metrics, logits = call_train_step(inner, selected, weights)
      if score_table is not None:
        if logits is not None:
          logits = jax.lax.stop_gradient(logits)
        table = _stale.refresh(
            score_table, table,
            _stale.trained_index(score_table, pool, selected, sel.indices),
            state.step, fresh, lambda: scores_of(inner, selected, logits))
      if buckets is not None:
        extra = {**extra, **_budget.metrics(n_scored, n_train)}
      cond_state = condition.update(cond_state, scores, state.step)
      return (new_inner, metrics, cond_state, t_states, sel.state, table,
              {**is_metrics(raw, scores, sel.indices, weights, sel.probs,
                            fallback, 1.0), **extra})

    if buckets is not None:
      bucket = budget.choose(state.tau, big_b, b)
      resample_branch = lambda operands: jax.lax.switch(bucket, [
          functools.partial(importance_branch, n_scored=n, n_train=a)
          for n, a in buckets], operands)
    else:
      resample_branch = importance_branch

    def uniform_branch(operands):
      inner, cond_state, t_states, p_state, table = operands
      sub = _indexed.first_rows(batch, b, layout)
      weights = _sharding.constrain(jnp.ones((b,), jnp.float32), layout, 0)
      new_inner, metrics, logits = call_train_step(inner, sub, weights)
      if logits is not None:
        logits = jax.lax.stop_gradient(logits)
      raw = scores_of(inner, sub, logits)
      extra = {}
      if score_table is not None:
        table = score_table.write(
            table, _stale.trained_index(score_table, batch, sub, jnp.arange(b)),
            raw, state.step)
        extra = _stale.uniform_metrics()
      if buckets is not None:
        extra = {**extra, **_budget.metrics(0, b)}
      scores, t_states = transform(raw, t_states)
      scores, fallback = _sanitize(scores)
      p_state = _sharding.observe(policy, scores, p_state, layout)
      cond_state = condition.update(cond_state, scores, state.step)
      probs = jnp.full((big_b,), 1.0 / big_b, jnp.float32)
      return (new_inner, metrics, cond_state, t_states, p_state, table,
              {**is_metrics(raw, scores, jnp.arange(b), weights, probs,
                            fallback, 0.0), **extra})

    active = jnp.asarray(condition.active(state.condition, state.step))
    if active.shape != () or active.dtype != jnp.bool_:
      raise TypeError("condition.active must return a scalar bool; got "
                      f"{active.dtype}{list(active.shape)}.")
    if static_active is not None:
      active = jnp.asarray(static_active)
    if buckets is not None:
      # The buckets train on different batch sizes: each branch runs its own
      # train_step.
      inner, metrics, cond_state, t_states, p_state, table, extra = \
          branch(active, resample_branch, uniform_branch, operands)
    else:
      inner, metrics, cond_state, t_states, p_state, table, extra = \
          train_once(state, batch, active, select_key)
    tau = tau_momentum * state.tau + (1.0 - tau_momentum) * extra[
        "is/variance_reduction"]
    new_state = ImportanceState(
        inner=inner, key=key, step=state.step + 1, tau=tau,
        condition=cond_state, transforms=t_states, policy=p_state, table=table)
    new_state = on_mesh(new_state, _sharding.constrain)
    return new_state, {**metrics, **extra, "is/tau": tau,
                       "is/nonfinite": _nonfinite(metrics)}

  def train_once(state, batch, active, select_key):
    """The step with ``train_step`` traced once, outside any ``lax.cond``.

    A ``lax.cond`` whose branches return the updated train state makes XLA
    copy every state buffer (parameters, optimizer moments) out of the
    conditional on each step, inside a ``lax.scan`` too. Here the first cond
    only chooses the ``b`` positions and weights to train on (the importance
    branch scores and draws them; the uniform branch takes the first ``b``),
    the rows are gathered after it (inside it on a mesh), the train step runs
    unconditionally on them, and a second cond does the bookkeeping that
    needs the step's logits. Both conds carry only small values: positions,
    scores, the jis states.
    """
    no_refresh = score_table is None or score_table.fresh is None
    inner = state.inner
    small = (state.condition, state.transforms, state.policy, state.table)
    if score_table is not None:   # a missing index is the first error to see
      _stale.check_index(score_table.index(batch),
                         _indexed.presample_size(batch))
    # Scores of trained examples that the step's own logits cannot give
    # (no "is/logits", or a per-parameter score) need the pre-update state:
    # compute them before the update, so the old parameters die with it.
    step_shapes = jax.eval_shape(
        lambda: call_train_step(inner, _indexed.first_rows(batch, b, layout),
                                jnp.ones((b,), jnp.float32)))
    score_before = step_shapes[2] is None or score_.per_parameter
    no_scores = jnp.zeros((b,), jnp.float32)

    def choose_importance(small):
      cond_state, t_states, p_state, table = small
      (raw, scores, fallback, sel, selected, weights, table, t_states, fresh,
       extra) = score_and_select(inner, batch, table, t_states, p_state,
                                 state.step, select_key, b)
      cond_state = condition.update(cond_state, scores, state.step)
      seen = (raw, scores, jnp.asarray(sel.probs, jnp.float32), fallback,
              extra)
      trained = (scores_of(inner, selected) if score_before and
                 score_table is not None else no_scores)
      return (selected, weights, sel.indices.astype(jnp.int32),
              jnp.asarray(fresh, jnp.bool_), (cond_state, t_states, sel.state,
                                              table), seen, trained)

    def choose_uniform(small):
      sub = _indexed.first_rows(batch, b, layout)
      weights = _sharding.constrain(jnp.ones((b,), jnp.float32), layout, 0)
      unused = jnp.zeros((big_b,), jnp.float32)
      seen = (unused, unused, unused, jnp.zeros((), jnp.float32),
              _stale.uniform_metrics() if score_table is not None else {})
      trained = scores_of(inner, sub) if score_before else no_scores
      return (sub, weights, jnp.arange(b, dtype=jnp.int32),
              jnp.zeros((), jnp.bool_), small, seen, trained)

    if static_active is None and layout.mesh is None:
      # Gather the rows after the cond, not inside it: a cond that returns
      # rows made XLA:CPU copy the whole presample into each branch
      # (docs/performance_notes.md, section 6).
      rows_later = lambda choose: lambda small: (None,) + choose(small)[1:]
      (_, weights, indices, fresh, small, seen, scored_before) = branch(
          active, rows_later(choose_importance), rows_later(choose_uniform),
          small)
      selected = _indexed.take(batch, indices)
    else:
      (selected, weights, indices, fresh, small, seen,
       scored_before) = branch(active, choose_importance, choose_uniform, small)
    if layout.mesh is not None:
      selected = _sharding.constrain(selected, layout, 0)
      weights = _sharding.constrain(weights, layout, 0)
    new_inner, metrics, logits = call_train_step(inner, selected, weights)
    if logits is not None:
      logits = jax.lax.stop_gradient(logits)
    trained_scores = lambda: (scored_before if score_before else
                              scores_of(None, selected, logits))

    def finish_importance(small):
      cond_state, t_states, p_state, table = small
      if score_table is not None:
        table = _stale.refresh(
            score_table, table,
            _stale.trained_index(score_table, batch, selected, indices),
            state.step, False if no_refresh else fresh, trained_scores)
      raw, scores, probs, fallback, extra = seen
      return (cond_state, t_states, p_state, table), {
          **is_metrics(raw, scores, indices, weights, probs, fallback, 1.0),
          **extra}

    def finish_uniform(small):
      cond_state, t_states, p_state, table = small
      raw = trained_scores()
      extra = {}
      if score_table is not None:
        table = score_table.write(
            table, _stale.trained_index(score_table, batch, selected,
                                        jnp.arange(b)), raw, state.step)
        extra = _stale.uniform_metrics()
      scores, t_states = transform(raw, t_states)
      scores, fallback = _sanitize(scores)
      p_state = _sharding.observe(policy, scores, p_state, layout)
      cond_state = condition.update(cond_state, scores, state.step)
      probs = jnp.full((big_b,), 1.0 / big_b, jnp.float32)
      return (cond_state, t_states, p_state, table), {
          **is_metrics(raw, scores, jnp.arange(b), weights, probs, fallback,
                       0.0), **extra}

    small, extra = branch(active, finish_importance, finish_uniform, small)
    cond_state, t_states, p_state, table = small
    return new_inner, metrics, cond_state, t_states, p_state, table, extra

  return ImportanceStep(init, step)
