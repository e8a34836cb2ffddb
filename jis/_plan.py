"""The options of ``importance_step``, validated and resolved into one static plan.

``importance_step`` takes two dozen keyword options, several of them
shorthands for others. :func:`make` checks each once, at build time, and
resolves them into a :class:`Plan` of jis objects, so that the step itself
never inspects an option again.
"""

import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple

import jax

from jis import _budget
from jis import _conditions
from jis import _losses
from jis import _placement
from jis import _policies
from jis import _pruning
from jis import _scores
from jis import _stale
from jis import _transforms
from jis import _validate
from jis import _variance

PyTree = Any

#: τ's default momentum (``importance_step(tau_momentum=None)``).
TAU_MOMENTUM = 0.9
#: The default policy's weight exponent and bound (:func:`default_policy`).
DEFAULT_K = 0.5
DEFAULT_MAX_WEIGHT = 100.0
#: InfoBatch's pruned share, the default policy with a score table.
DEFAULT_PRUNE = 0.5


class Plan(NamedTuple):
  """Everything the step needs to know before it sees a batch.

  Attributes:
    batch_size: ``b``, examples per update.
    presample_size: ``B = round(presample · b)``, examples per presample.
    loss: the per-example loss and its logit-gradient norm.
    score: the importance score.
    labels: ``batch -> labels``.
    mask: ``batch -> mask`` of the loss's positions, or None.
    example_weights: ``batch -> [n]`` weights the loader gives each example
      (multiplied into the importance weights), or None.
    policy: how ``b`` rows are drawn from the scores.
    condition: when a step resamples.
    transforms: score transforms, applied in order.
    table: the stale score table, or None.
    buckets: the budget's ``(n_scored, n_trained)`` sizes, or None.
    budget: the budget mode, or None.
    placement: where the presample lives (one device, global, local).
    tau_momentum: momentum of τ's moving average.
    static_active: True/False when the condition is known before the run
      (one branch compiled, no ``lax.cond``), else None.
    may_look_ahead: whether a step may train on the previous step's draw: a
      score table whose ``lookahead`` is not False, every step resampling,
      on one device. The state then carries the pending draw; a step looks
      ahead when its presample is :class:`jis.Indexed`.
    diagnostics: whether the step reports the metrics that cost a sort or a
      log (``is/selected_fraction_unique``, ``is/entropy``).
    uniform_batches: whether ``step`` also takes batches of ``b`` rows, on
      which it trains uniformly (:func:`jis.presample_schedule`).
  """
  batch_size: int
  presample_size: int
  loss: _losses.Loss
  score: _scores.Score
  labels: Callable[[PyTree], Any]
  mask: Optional[Callable[[PyTree], Any]]
  example_weights: Optional[Callable[[PyTree], Any]]
  policy: _policies.Policy
  condition: _conditions.Condition
  transforms: Tuple[_transforms.ScoreTransform, ...]
  table: Optional[_stale.ScoreTable]
  buckets: Optional[_budget.Buckets]
  budget: Optional[_budget.Budget]
  placement: _placement.Placement
  tau_momentum: float
  static_active: Optional[bool]
  may_look_ahead: bool
  diagnostics: bool
  uniform_batches: bool = False


def batch_getter(option: str, what: str, key) -> Callable[[PyTree], Any]:
  """``batch -> batch[key]`` (with an error naming ``option`` and the batch's
  keys when it is missing), or ``key`` itself when it is a callable."""
  if callable(key):
    return key
  if not isinstance(key, (str, int)):
    raise TypeError(
        f"{option} must be a batch key or a callable batch -> {what}; got "
        f"{type(key).__name__}.")

  def get(batch):
    try:
      return batch[key]
    except (KeyError, IndexError, TypeError):
      keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
      raise ValueError(
          f"{option}={key!r} but the batch has no such entry (it has {keys}). "
          f"Pass {option}=<the key holding the {what}>, or a callable "
          f"{option}=lambda batch: ...") from None
  return get


def labels_getter(labels) -> Callable[[PyTree], Any]:
  """``batch -> labels`` from a batch key or a callable."""
  return batch_getter("labels", "targets", labels)


def _mask_getter(mask, loss: _losses.Loss):
  if mask is None:
    return None
  if not loss.takes_mask:
    raise ValueError(
        f"mask= applies to the built-in losses; the custom loss {loss.name!r} "
        "applies its own (hand it the mask with the labels, e.g. labels="
        "lambda batch: (batch['y'], batch['mask'])).")
  return batch_getter("mask", "mask", mask)


def _deprecated(option: str, instead: str) -> None:
  warnings.warn(f"importance_step({option}) is deprecated; pass {instead}.",
                DeprecationWarning, stacklevel=5)


def default_policy(table) -> _policies.Policy:
  """The policy of ``importance_step(policy=None)``.

  Scoring a presample: the biased importance sampling of Katharopoulos &
  Fleuret (2017), ``k = 1/2``, with weights bounded by the defensive
  mixture of ``max_weight = 100`` (docs/performance_notes.md, section 11,
  has the measurements behind it). With a score table: InfoBatch's
  prune-and-rescale.
  """
  if table is not None:
    return _pruning.infobatch(DEFAULT_PRUNE)
  return _policies.importance_sampling(k=DEFAULT_K, max_weight=DEFAULT_MAX_WEIGHT)


def _policy(policy, k: Optional[float], table) -> _policies.Policy:
  if k is not None:
    _deprecated("k=", "policy=jis.importance_sampling(k=...)")
    if policy is not None:
      raise ValueError(
          f"k={k} is a shorthand for policy=jis.importance_sampling(k); it "
          "cannot be combined with policy=. Pass the exponent to the policy.")
    return _policies.importance_sampling(k)
  if policy is None:
    return default_policy(table)
  return _validate.instance("policy", policy, _policies.Policy,
                            "jis.Policy (e.g. jis.importance_sampling())")


def _transforms_of(score_transforms, smooth: float, adaptive_smooth: bool):
  if smooth or adaptive_smooth:
    _deprecated("smooth=, adaptive_smooth=",
                "score_transforms=(jis.additive_smoothing(c),) or "
                "(jis.adaptive_smoothing(c),)")
    if score_transforms is not None:
      raise ValueError(
          "smooth/adaptive_smooth are shorthands for score_transforms; put "
          "jis.additive_smoothing / jis.adaptive_smoothing in score_transforms "
          "instead.")
    if adaptive_smooth and not smooth > 0:
      raise ValueError(
          "adaptive_smooth=True scales smooth by a moving average of the "
          f"scores, so smooth must be > 0; got smooth={smooth!r}.")
    make = (_transforms.adaptive_smoothing if adaptive_smooth
            else _transforms.additive_smoothing)
    return (make(smooth),)
  transforms = tuple(score_transforms or ())
  for t in transforms:
    _validate.instance("score_transforms entries", t, _transforms.ScoreTransform,
                       "jis.ScoreTransform (e.g. jis.additive_smoothing(1.0))")
  return transforms


def _condition(condition, tau_threshold, budget, table, big_b: int, b: int):
  """The switch condition and the τ threshold it was given (or None)."""
  if condition is not None:
    if tau_threshold is not None:
      raise ValueError(
          "tau_threshold is a shorthand for condition=jis.when_variance_reduced"
          "(threshold); it cannot be combined with condition=.")
    _validate.instance("condition", condition, _conditions.Condition,
                       "jis.Condition (e.g. jis.always())")
    if condition.constant not in (None, True, False):
      raise TypeError("condition.constant must be None, True or False; got "
                      f"{condition.constant!r}.")
    return _conditions.with_tau(condition), None
  if tau_threshold is None and budget is not None:
    tau_threshold = budget.tau_threshold(big_b, b)
  elif tau_threshold is None and table is not None:
    # Eq. 29 prices a presample forward pass that stale scores do not make.
    return _conditions.always(), None
  elif tau_threshold is None:
    tau_threshold = _variance.default_tau_threshold(big_b, b)
  return _conditions.when_variance_reduced(
      tau_threshold, far_probe_every=_conditions.FAR_PROBE_EVERY), tau_threshold


def _tau_momentum(tau_momentum, condition) -> float:
  if tau_momentum is not None:
    _validate.number("tau_momentum", tau_momentum, 0, 1, high_open=True)
  asked = condition.tau_momentum
  if asked is not None and tau_momentum is not None and asked != tau_momentum:
    raise ValueError(
        f"The condition asks for a τ momentum of {asked} but tau_momentum="
        f"{tau_momentum}: τ has one home and one momentum. Pass only "
        "tau_momentum=.")
  for value in (tau_momentum, asked):
    if value is not None:
      return float(value)
  return TAU_MOMENTUM


def _static_active(condition, score, threshold) -> Optional[bool]:
  # Uniform scores have τ = 1, so a τ threshold above 1 never fires: compile
  # the uniform branch alone.
  if (condition.constant is None and _scores.is_uniform(score)
      and threshold is not None and threshold > 1.01):
    return False
  return condition.constant


def _check_uniform_batches(uniform_batches, score_table, budget,
                           policy: _policies.Policy) -> None:
  """``uniform_batches=True`` lets steps train on ``b`` rows without scores:
  refused where something needs scores on every step."""
  if uniform_batches not in (True, False):
    raise TypeError(
        f"uniform_batches must be True or False; got {uniform_batches!r}.")
  needs = [what for what, on in (
      ("a score_table", score_table is not None),
      ("a budget", budget is not None),
      ("a policy that observes uniform steps", policy.observe is not None))
           if on]
  if uniform_batches and needs:
    raise ValueError(
        "uniform_batches=True lets steps train on b rows without scores; "
        f"{' and '.join(needs)} needs scores every step. Drop one.")


def _score(score, score_table, loss_, mask_fn, logits_fn) -> _scores.Score:
  """The resolved score (``"loss"`` with a score table, as InfoBatch keeps
  losses; else ``"upper_bound"``), checked against ``logits_fn``."""
  if score is None:
    score = "loss" if score_table is not None else "upper_bound"
  score_ = _scores.resolve_score(score, loss_, mask_fn)
  lookups_only = score_table is not None and score_table.fresh is None
  if logits_fn is None and score_.needs_logits and not lookups_only:
    raise ValueError(
        f"score={score_.name!r} needs the model's logits, so logits_fn is "
        "required: pass logits_fn(state, batch) -> logits (inference mode). "
        "(Only a score table that never refreshes the presample, "
        "jis.stale_scores(N), can do without: its scores then come from the "
        "logits your train_step returns under metrics['is/logits'].)")
  if logits_fn is not None:
    _validate.accepts(logits_fn, "logits_fn", ("state", "batch"))
  elif score_.per_parameter:
    raise ValueError("score='gradient_norm' differentiates logits_fn: pass it.")
  return score_


def _buckets(budget, score_table, big_b, b, layout):
  """A compute budget's ``(n_scored, n_train)`` buckets, or None."""
  if budget is None:
    return None
  if score_table is not None:
    raise ValueError(
        "budget trades presample forward passes against backward passes; "
        "with score_table the presample needs no forward pass. Use one.")
  return _budget.resolve_buckets(budget, big_b, b, layout)


def _may_look_ahead(score_table, static_active, placement) -> bool:
  """Whether a step may train on the previous step's draw (the score
  table's lookahead): every step must resample, on one device; a step then
  looks ahead when, besides, its presample is ``jis.Indexed``."""
  if score_table is None:
    return False
  can = static_active is True and placement.layout.mesh is None
  if score_table.lookahead is True and not can:
    raise ValueError(
        "stale_scores(lookahead=True) trains on the previous step's draw, so "
        "every step must resample (condition=jis.always(), the default with "
        "a score table) on one device (mesh=None, where jis.Indexed "
        "presamples run). Leave lookahead at None (on where it can run) or "
        "pass False.")
  return can and score_table.lookahead is not False


def make(train_step, logits_fn, *, batch_size, presample, loss, labels, mask,
         example_weights, score,
         tau_threshold, tau_momentum, k, smooth, adaptive_smooth,
         score_transforms, policy, condition, score_table, budget,
         forward_batch_size, mesh, data_axis, resample, diagnostics,
         uniform_batches=False) -> Plan:
  """Validates every option of ``importance_step`` and resolves its plan."""
  b = _validate.number("batch_size", batch_size, 1, integer=True)
  presample = _validate.number(
      "presample", presample, 1, finite=True,
      hint="B = round(presample * batch_size) examples are scored per step.")
  big_b = int(round(presample * b))
  _validate.accepts(train_step, "train_step", ("state", "batch", "weights"))
  if score_table is not None:
    _validate.instance("score_table", score_table, _stale.ScoreTable,
                       "jis.ScoreTable (jis.stale_scores(N))")
  if budget is not None:
    _validate.instance("budget", budget, _budget.Budget,
                       "jis.Budget (jis.constant_variance() or "
                       "jis.constant_time())")
  loss_ = _losses.resolve_loss(loss)
  mask_fn = _mask_getter(mask, loss_)
  score_ = _score(score, score_table, loss_, mask_fn, logits_fn)
  placement = _placement.make(mesh, data_axis, resample, big_b, b,
                              forward_batch_size)
  buckets = _buckets(budget, score_table, big_b, b, placement.layout)
  condition, threshold = _condition(condition, tau_threshold, budget,
                                    score_table, big_b, b)
  static_active = _static_active(condition, score_, threshold)
  may_look_ahead = _may_look_ahead(score_table, static_active, placement)
  policy_ = _policy(policy, k, score_table)
  _check_uniform_batches(uniform_batches, score_table, budget, policy_)
  return Plan(
      batch_size=b, presample_size=big_b, loss=loss_, score=score_,
      labels=labels_getter(labels), mask=mask_fn,
      example_weights=(None if example_weights is None else batch_getter(
          "example_weights", "per-example weights", example_weights)),
      policy=policy_,
      condition=condition,
      transforms=_transforms_of(score_transforms, smooth, adaptive_smooth),
      table=score_table, buckets=buckets, budget=budget, placement=placement,
      tau_momentum=_tau_momentum(tau_momentum, condition),
      static_active=static_active,
      may_look_ahead=may_look_ahead,
      diagnostics=bool(diagnostics), uniform_batches=bool(uniform_batches))
