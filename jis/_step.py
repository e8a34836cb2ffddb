"""`importance_step`: a train step that resamples its batch by importance.

One step, read top to bottom (Katharopoulos & Fleuret 2018, Algorithm 1):

1. ``_active``: the switch condition, read from the state (τ, the step);
2. choose, a ``lax.cond`` (``_draw_then_train``): ``_choose_importance``
   scores the presample, transforms and sanitises the scores, lets the
   policy draw ``b`` positions and weights, and updates what an importance
   step measures (the condition's, transforms' and policy's states, the
   score table, τ's moving average: ``_moving_tau``);
   ``_choose_uniform`` takes the first ``b`` with weight 1 and leaves them
   all as they are. Either returns a ``_Choice``: positions, weights and
   those small states, never the train state;
3. gather the chosen rows (``placement.gather``) and run the user's
   ``train_step`` once (``_train``), outside any conditional (a ``lax.cond``
   returning the train state would copy every parameter and optimizer
   buffer on every step); with a score table's lookahead
   (``_train_then_draw``) it trains instead on the rows the previous step
   drew (``state.pending``), records their scores, and only then draws
   (step 2) for the next step;
4. ``_trained_scores`` and ``_record``: the trained examples' scores, where
   something keeps them (a score table, a policy that observes uniform
   steps), from the step's own ``is/logits`` or a forward pass at the
   parameters they were trained with;
5. ``_finish``: the new :class:`ImportanceState` and the metrics.

A compute budget (:func:`jis.constant_variance`, :func:`jis.constant_time`)
is a ``lax.switch`` over the same step at other static sizes, the uniform
step being the bucket that scores nothing and trains on ``b``.
"""

import functools
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jis import _budget
from jis import _conditions
from jis import _indexed
from jis import _plan
from jis import _policies
from jis import _scores
from jis import _stale
from jis import _transforms
from jis import _variance

Array = jax.Array
PyTree = Any

#: Metrics key under which a ``train_step`` may hand back the logits of the
#: examples it trained on, so that recording their scores costs no forward pass.
LOGITS_KEY = "is/logits"
_PREFIX = "is/"


class ImportanceState(NamedTuple):
  """The state of an importance-sampled training run: a pytree.

  Attributes:
    inner: the user's train state, as their ``train_step`` returns it.
    key: the run's PRNG key. It does not change: importance step ``t`` draws
      with ``jax.random.fold_in(key, t)``, so a uniform step spends no
      random bits and no kernels on it.
    step: int32 count of steps taken.
    tau: float32 moving average of the variance reduction τ of the importance
      steps (``is/tau``); 0 before the first.
    condition: the switch condition's state.
    transforms: the score transforms' states, one per transform.
    policy: the selection policy's state.
    table: the stale score table (:func:`jis.stale_scores`), or ``()``.
    tau_step: int32 step of τ's latest measurement (-1 before the first):
      τ averages over steps, not over measurements.
    pending: the rows the next step trains on, drawn by this one
      (:class:`jis.stale_scores`'s lookahead), or ``()``.
  """
  inner: PyTree
  key: Array
  step: Array
  tau: Array
  condition: PyTree
  transforms: tuple
  policy: PyTree
  table: PyTree = ()
  tau_step: Array = -1
  pending: PyTree = ()


class ImportanceStep(NamedTuple):
  """The pure functions returned by :func:`importance_step`.

  Attributes:
    init: ``(train_state, key) -> ImportanceState``.
    step: ``(ImportanceState, presample_batch) -> (ImportanceState, metrics)``;
      with ``uniform_batches=True``, a batch of ``b`` rows trains uniformly
      on them (:func:`jis.presample_schedule`).
  """
  init: Callable[[PyTree, Array], ImportanceState]
  step: Callable[[ImportanceState, PyTree], tuple]


class _Model(NamedTuple):
  """The user's two functions."""
  train_step: Callable
  logits_fn: Optional[Callable]


class _Own(NamedTuple):
  """jis's small states, which the branches update."""
  condition: PyTree
  transforms: tuple
  policy: PyTree
  table: PyTree


class _Draw(NamedTuple):
  """What a step's selection reports: scalars only."""
  variance_reduction: Array   # of its scores (this step's τ); 1 on uniform steps
  ess: Array
  max_weight: Array
  score_mean: Array   # mean raw presample score; 0 on uniform steps
  fallback: Array     # 1 when the scores were unusable
  extra: dict         # table and diagnostic metrics


class _Choice(NamedTuple):
  """The output of ``choose``: what to train on, and the updated states."""
  positions: Array    # [n] int32 presample positions
  weights: Array      # [n] float32 loss weights
  own: _Own
  draw: _Draw
  fresh: Array        # the presample was scored and written to the table
  tau: Array          # τ's moving average after this step
  tau_step: Array     # the step of its latest measurement


class _ScoresKept(NamedTuple):
  """Whether a step keeps its trained examples' scores, per branch."""
  on_importance: bool
  on_uniform: bool


class _Outcome(NamedTuple):
  """A step's training and choice, before jis's state is put together."""
  choice: _Choice     # its own: the small states after the step's records
  inner: PyTree       # the user's train state after the update
  metrics: dict       # the user's metrics
  pending: PyTree     # the draw the next step trains on (lookahead), or ()


# ------------------------------------------------------------------ pieces


def _as_array(x):
  # TrainState.create keeps step as a Python int; the jitted step returns an
  # int32 array, which would make the second call compile again.
  if isinstance(x, (bool, int, float, complex, np.ndarray, np.generic)):
    return jnp.asarray(x, jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))
  return x


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


def _diagnostics(positions: Array, probs: Array) -> dict:
  """The metrics that cost a sort or a log (``diagnostics=True``)."""
  s = jnp.sort(positions)
  unique = (1 + jnp.sum(s[1:] != s[:-1])).astype(jnp.float32) / s.shape[0]
  p = probs.astype(jnp.float32)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"is/selected_fraction_unique": unique, "is/entropy": entropy}


def _check_leading(what: str, tree, n: int) -> None:
  """Every leaf of ``tree`` (logits, one array or a pytree of heads) must
  have leading dimension ``n``."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  bad = {jax.tree_util.keystr(p) or "": np.shape(x) for p, x in leaves
         if np.shape(x)[:1] != (n,)}
  if bad or not leaves:
    raise ValueError(
        f"{what} for {n} examples have shapes {bad or 'none'}; the first axis "
        f"of every array (every head of a multi-output model) must be the "
        f"batch ({n}).")


def _scores_of(plan, model, inner, batch, logits=None) -> Array:
  """One score per example of ``batch`` (arrays), from ``logits`` if given."""
  n = jax.tree.leaves(batch)[0].shape[0]
  score = plan.score
  if score.per_parameter:
    s = _scores.per_parameter_grad_norm(model.logits_fn, plan.loss, plan.labels,
                                        inner, batch, plan.mask)
  else:
    if score.needs_logits and logits is None:
      logits = model.logits_fn(inner, batch)
      _check_leading("logits_fn's logits", logits, n)
    labels = plan.labels(batch) if score.needs_labels else None
    s = score.fn(logits, labels, batch)
  if np.shape(s) != (n,):
    raise ValueError(f"score={score.name!r} returned shape {np.shape(s)}; "
                     f"it must return one score per example, shape ({n},).")
  return jnp.asarray(s, jnp.float32)


def _transform(plan, scores: Array, states: tuple):
  """The scores through the score transforms, in order, and their states."""
  new_states = []
  for t, s in zip(plan.transforms, states):
    scores, s = t.update(scores, s)
    new_states.append(s)
  return scores, tuple(new_states)


def _usable_scores(plan, raw: Array, states: tuple):
  """``(scores, transform states, fallback)``: the raw scores transformed,
  then sanitized (uniform, and fallback = 1, where they cannot be sampled)."""
  scores, states = _transform(plan, raw, states)
  scores, fallback = _sanitize(scores)
  return scores, states, fallback


def _split_train_step_output(inner, out, n: int):
  """``(train state, metrics, logits or None)``: the user's ``(train_state,
  metrics)``, checked, with ``is/logits`` split off the metrics."""
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
  if logits is not None:
    _check_leading(f"metrics[{LOGITS_KEY!r}], the logits of the trained "
                   "examples,", logits, n)
    logits = jax.lax.stop_gradient(logits)
  return new_inner, metrics, logits


def _branch(static, pred, on_true, on_false, operand):
  """``lax.cond``, or the one branch a condition known before the run names."""
  if static is None:
    return jax.lax.cond(pred, on_true, on_false, operand)
  return (on_true if static else on_false)(operand)


# ------------------------------------------------------------------ the step


def _choose_importance(plan, model, state, batch, own, n_scored, n_train):
  """Scores the first ``n_scored`` presampled rows and draws ``n_train``."""
  key = jax.random.fold_in(state.key, state.step)
  pool = _indexed.head(batch, n_scored)
  score_pool = lambda: plan.placement.score(
      lambda rows: _scores_of(plan, model, state.inner, rows), pool)
  extra = {}
  if plan.table is None:
    raw, table, fresh = score_pool(), own.table, jnp.asarray(False)
  else:
    raw, table, fresh, extra = _stale.presample_scores(
        plan.table, own.table, pool, state.step, score_pool,
        replicate=lambda x: plan.placement.put(x, None))
  scores, transforms, fallback = _usable_scores(plan, raw, own.transforms)
  sel = plan.placement.select(plan.policy, key, scores, own.policy, n_train)
  weights = jnp.asarray(sel.weights, jnp.float32)
  if plan.diagnostics:
    replicated = lambda x: plan.placement.put(x, None)   # sorted whole
    extra = {**extra, **_diagnostics(replicated(sel.indices),
                                     replicated(sel.probs))}
  draw = _Draw(variance_reduction=_variance.variance_reduction(scores),
               ess=jnp.square(jnp.sum(weights)) / jnp.sum(jnp.square(weights)),
               max_weight=jnp.max(weights), score_mean=jnp.mean(raw),
               fallback=fallback, extra=extra)
  condition = plan.condition.update(own.condition, scores, state.step)
  tau, tau_step = _moving_tau(plan, state, draw.variance_reduction)
  return _Choice(positions=sel.indices.astype(jnp.int32), weights=weights,
                 own=_Own(condition, transforms, sel.state, table), draw=draw,
                 fresh=jnp.asarray(fresh, jnp.bool_), tau=tau,
                 tau_step=tau_step)


def _choose_uniform(plan, state, own, n_train):
  """The first ``n_train`` presampled rows, weight 1."""
  zero = jnp.zeros((), jnp.float32)
  extra = {}
  if plan.table is not None:
    extra = _stale.uniform_metrics()
  if plan.diagnostics:
    extra = {**extra, "is/selected_fraction_unique": jnp.ones(()),
             "is/entropy": jnp.log(jnp.float32(plan.presample_size))}
  draw = _Draw(variance_reduction=jnp.ones((), jnp.float32),
               ess=jnp.float32(n_train),
               max_weight=jnp.ones((), jnp.float32), score_mean=zero,
               fallback=zero, extra=extra)
  weights = plan.placement.put(jnp.ones((n_train,), jnp.float32), 0)
  return _Choice(positions=plan.placement.uniform(n_train), weights=weights,
                 own=own, draw=draw, fresh=jnp.asarray(False), tau=state.tau,
                 tau_step=state.tau_step)


def _scores_kept(plan, static) -> _ScoresKept:
  """Whether the trained examples' scores are kept: by the score table, and
  on uniform steps by a policy that observes them (on the branches that can
  run)."""
  table = plan.table is not None
  return _ScoresKept(
      on_importance=table and static is not False,
      on_uniform=(table or plan.policy.observe is not None)
      and static is not True)


def _trained_scores(plan, model, state, rows, logits, static, active):
  """The trained examples' scores where something keeps them (else None):
  from the train step's own logits (free), else by a forward pass at the
  parameters they were trained with (``state.inner``), on the branches that
  keep them."""
  kept = _scores_kept(plan, static)
  if not any(kept):
    return None
  score = plan.score
  if not score.per_parameter and (logits is not None or not score.needs_logits):
    return _scores_of(plan, model, None, rows, logits)
  if model.logits_fn is None:
    keeper = ("The score table keeps" if plan.table is not None
              else "The policy observes")
    raise ValueError(   # (a policy alone needs logits_fn: _plan.make)
        f"{keeper} the trained examples' scores, and without a logits_fn "
        f"score={score.name!r} can only read them from the train step: "
        f"return its logits under metrics[{LOGITS_KEY!r}], or pass "
        "logits_fn.")
  forward = lambda _: _scores_of(plan, model, state.inner, rows)
  unused = lambda _: jnp.zeros((jax.tree.leaves(rows)[0].shape[0],),
                               jnp.float32)
  return _branch(static, active, forward if kept.on_importance else unused,
                 forward if kept.on_uniform else unused, None)


def _moving_tau(plan, state, measured: Array):
  """``(τ, tau_step)``: τ's moving average over steps, after an importance
  step (uniform steps leave both as they are, inside the ``cond``'s other
  branch). A measurement ``Δ`` steps after the previous one gets the weight
  ``1 − m^Δ`` (``m`` the momentum): while importance sampling is on (``Δ =
  1``) τ averages about ``1/(1 − m)`` steps; while it is off, a probe
  ``probe_every`` steps after the last all but replaces it, so a sparse
  probe sees what the presample says now. The first measurement sets it."""
  gap = (state.step - state.tau_step).astype(jnp.float32)
  keep = jnp.where(state.tau_step >= 0, plan.tau_momentum ** gap, 0.0)
  return (keep * state.tau + (1.0 - keep) * measured,
          jnp.asarray(state.step, jnp.int32))


def _record(plan, choice, static, active, batch, rows, trained, step):
  """Keeps the trained examples' scores where something needs them: the score
  table (unless this step wrote the whole presample's) and a policy that
  observes uniform steps."""
  table, observe = plan.table, plan.policy.observe
  if trained is None:
    return choice.own
  if table is not None:
    # The table is replicated: every device writes all trained examples.
    index = plan.placement.put(
        _stale.trained_index(table, batch, rows, choice.positions), None)
    trained = plan.placement.put(trained, None)

  def on_importance(own):
    if table is None:
      return own
    return own._replace(table=_stale.refresh(table, own.table, index, step,
                                             choice.fresh, lambda: trained))

  def on_uniform(own):
    if table is not None:
      own = own._replace(table=table.write(own.table, index, trained, step))
    if observe is not None:
      own = own._replace(policy=plan.placement.observe(
          plan.policy, _usable_scores(plan, trained, own.transforms)[0],
          own.policy))
    return own
  return _branch(static, active, on_importance, on_uniform, choice.own)


def _train(plan, model, state, rows, weights, n_train):
  """``(train state, metrics, logits or None)``: the user's ``train_step`` on
  ``rows`` with ``weights`` (and the loader's own weights), and the logits it
  handed back under ``"is/logits"``."""
  if plan.example_weights is not None:   # the loader's own weights
    weights = weights * jnp.asarray(plan.example_weights(rows), jnp.float32)
  out = model.train_step(state.inner, rows, weights)
  return _split_train_step_output(state.inner, out, n_train)


def _draw_then_train(plan, model, state, batch, own, static, active,
                     n_scored, n_train):
  """A step that chooses its rows from its own presample (importance
  sampling or the first ``n_train``, as ``active`` says), trains on them and
  records their scores where something keeps them."""
  choice = _branch(
      static, active,
      lambda own: _choose_importance(plan, model, state, batch, own,
                                     n_scored, n_train),
      lambda own: _choose_uniform(plan, state, own, n_train), own)
  rows = plan.placement.gather(batch, choice.positions)
  inner, metrics, logits = _train(plan, model, state, rows, choice.weights,
                                  n_train)
  trained = _trained_scores(plan, model, state, rows, logits, static, active)
  own = _record(plan, choice, static=static, active=active, batch=batch,
                rows=rows, trained=trained, step=state.step)
  return _Outcome(choice._replace(own=own), inner, metrics, state.pending)


def _train_then_draw(plan, model, state, batch, own, n_scored, n_train):
  """A lookahead step: it trains on the rows the previous step drew
  (``state.pending``; before the first, this presample's first ``n_train``
  rows with weight 1), writes their scores, and only then looks up and
  draws from its own presample the rows the next step trains on. The
  training waits for no lookup or draw, the draw reads the scores just
  written, and the table is updated in place (a write after the lookup
  that nothing orders makes XLA copy the whole table every step)."""
  ready = state.pending.ready
  trained_index = jnp.where(ready, state.pending.index, batch.index[:n_train])
  weights = jnp.where(ready, state.pending.weights, 1.0)
  rows = _indexed.dataset_rows(batch, trained_index)
  inner, metrics, logits = _train(plan, model, state, rows, weights, n_train)
  trained = _trained_scores(plan, model, state, rows, logits, static=True,
                            active=True)
  own = own._replace(table=plan.table.write(own.table, trained_index, trained,
                                            state.step))
  choice = _choose_importance(plan, model, state, batch, own, n_scored,
                              n_train)
  pending = _stale.Pending(
      jnp.take(batch.index, choice.positions).astype(jnp.int32),
      choice.weights, jnp.asarray(True))
  return _Outcome(choice, inner, metrics, pending)


def _step_metrics(out: _Outcome, active, n_scored, n_train, extra_metrics):
  """The user's metrics and jis's ``is/`` ones."""
  choice, draw = out.choice, out.choice.draw
  return {
      **out.metrics, "is/tau": choice.tau,
      "is/active": jnp.asarray(active, jnp.float32),
      "is/ess": draw.ess, "is/max_weight": draw.max_weight,
      "is/score_mean": draw.score_mean, "is/fallback": draw.fallback,
      "is/variance_reduction": draw.variance_reduction,
      "is/nonfinite": _nonfinite(out.metrics),
      "is/rows_used": jnp.where(active, n_scored, n_train).astype(jnp.int32),
      **draw.extra, **(extra_metrics or {})}


def _sized_step(plan, model, state, batch, static, active, n_scored,
                n_train, extra_metrics=None, lookahead=False):
  """One step that scores ``n_scored`` presampled rows and trains on
  ``n_train``; ``static`` names the branch when it is known at trace time.
  With ``lookahead`` it trains on the previous step's draw and keeps its own
  for the next step."""
  own = _own(state)
  if lookahead:
    out = _train_then_draw(plan, model, state, batch, own, n_scored, n_train)
  else:
    out = _draw_then_train(plan, model, state, batch, own, static=static,
                           active=active, n_scored=n_scored, n_train=n_train)
  return _finish(state, out, active, n_scored, n_train, extra_metrics)


def _own(state: ImportanceState) -> _Own:
  return _Own(state.condition, state.transforms, state.policy, state.table)


def _finish(state, out: _Outcome, active, n_scored, n_train,
            extra_metrics=None):
  """The new :class:`ImportanceState` and the step's metrics."""
  new_state = state._replace(
      inner=out.inner, step=state.step + 1, tau=out.choice.tau,
      tau_step=out.choice.tau_step, pending=out.pending,
      **out.choice.own._asdict())
  return new_state, _step_metrics(out, active, n_scored, n_train,
                                  extra_metrics)


def _budget_step(plan, model, state, batch, active):
  """The sized step at the bucket τ picks; the uniform step is bucket 0,
  ``(0, b)``. Each bucket trains on its own batch size, so ``train_step``
  runs in each branch of the ``lax.switch``."""
  def sized(n_scored, n_train):
    resample = n_scored > 0
    return lambda state, batch: _sized_step(
        plan, model, state, batch, static=resample, active=resample,
        n_scored=n_scored, n_train=n_train,
        extra_metrics=_budget.metrics(n_scored, n_train))
  bucket = jnp.where(active, 1 + plan.budget.choose(
      state.tau, plan.presample_size, plan.batch_size), 0)
  sizes = ((0, plan.batch_size),) + plan.buckets
  return jax.lax.switch(bucket, [sized(n, a) for n, a in sizes],
                        state, batch)


def _check_batch(plan, batch, rows: Optional[int] = None) -> None:
  """Trace-time checks of a batch of ``rows`` examples: ``B`` by default,
  the ``b`` of a uniform step with ``uniform_batches=True``."""
  rows = rows or plan.presample_size
  plan.placement.check(batch)
  if isinstance(batch, _indexed.Indexed):
    return _indexed.check_indexed(batch, rows)
  leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
  if not leaves:
    raise ValueError("step(state, batch) got a batch with no arrays.")
  for path, leaf in leaves:
    shape = np.shape(leaf)
    if len(shape) == 0 or shape[0] != rows:
      raise ValueError(
          f"Every batch leaf must have leading dimension B = round(presample * "
          f"batch_size) = {plan.presample_size}; leaf "
          f"batch{jax.tree_util.keystr(path)} has shape {shape}. Feed "
          f"presample batches of {plan.presample_size} examples, or change "
          "presample." + (
              f" (Batches of b = {plan.batch_size} rows, uniform steps that "
              "skip the presample, need uniform_batches=True: see "
              "jis.presample_schedule.)"
              if shape[:1] == (plan.batch_size,) and not plan.uniform_batches
              else ""))


def _active(plan, state) -> Array:
  active = jnp.asarray(plan.condition.active(state.condition, state.step,
                                             state.tau))
  if active.shape != () or active.dtype != jnp.bool_:
    raise TypeError("condition.active must return a scalar bool; got "
                    f"{active.dtype}{list(active.shape)}.")
  if plan.static_active is not None:
    return jnp.asarray(plan.static_active)
  return active


def _looks_ahead(plan, batch) -> bool:
  """Whether this step trains on the previous step's draw (lookahead)."""
  if not plan.may_look_ahead:
    return False
  if not isinstance(batch, _indexed.Indexed):
    if plan.table.lookahead is None:   # where it can: not on arrays
      return False
    raise ValueError(
        "stale_scores(lookahead=True) trains on the rows the previous step "
        "drew, which it reads from the dataset: pass the presample as "
        "jis.Indexed(dataset, indices), or leave lookahead at None (a "
        "presample of arrays then trains on its own draw).")
  return True


def _put_own(plan, state: ImportanceState) -> ImportanceState:
  """jis's own leaves where ``step`` returns them (replicated, or split per
  device for a local policy), so a jitted step never compiles twice."""
  put = plan.placement.put
  own = {name: put(getattr(state, name), None) for name in state._fields
         if name not in ("inner", "policy")}
  return state._replace(**own, policy=put(state.policy, plan.placement.policy_dim))


def _step(plan, model, state: ImportanceState, batch):
  if not isinstance(state, ImportanceState):
    raise TypeError("step(state, batch) needs the ImportanceState made by "
                    f"sampler.init; got {type(state).__name__}.")
  if plan.uniform_batches and _is_uniform_batch(plan, batch):
    return _uniform_batch_step(plan, model, state, batch)
  _check_batch(plan, batch)
  if plan.table is not None:   # a missing index is the first error to see
    _stale.check_index(plan.table, plan.table.index(batch),
                       plan.presample_size)
  active = _active(plan, state)
  if plan.buckets is None:
    new_state, metrics = _sized_step(
        plan, model, state, batch, static=plan.static_active, active=active,
        n_scored=plan.presample_size, n_train=plan.batch_size,
        lookahead=_looks_ahead(plan, batch))
  else:
    new_state, metrics = _budget_step(plan, model, state, batch, active)
  return _put_own(plan, new_state), metrics


def _is_uniform_batch(plan, batch) -> bool:
  """Whether ``batch`` holds the ``b`` rows of a uniform step (``B > b``)."""
  if plan.presample_size == plan.batch_size:
    return False
  if isinstance(batch, _indexed.Indexed):
    return np.shape(batch.index)[:1] == (plan.batch_size,)
  leaves = jax.tree.leaves(batch)
  return bool(leaves) and all(np.shape(x)[:1] == (plan.batch_size,)
                              for x in leaves)


def _uniform_batch_step(plan, model, state: ImportanceState, batch):
  """A batch of ``b`` rows: a uniform step on them, compiled alone (no
  ``cond``, no scoring). The condition is not consulted: the loop chose
  (:func:`jis.presample_schedule`). τ and the condition's state stay
  (``_plan.make`` refused what needs scores on every step)."""
  _check_batch(plan, batch, plan.batch_size)
  rows = _indexed.presample_rows(batch)
  own = _own(state)
  choice = _choose_uniform(plan, state, own, plan.batch_size)
  inner, metrics, _ = _train(plan, model, state, rows, choice.weights,
                             plan.batch_size)
  new_state, metrics = _finish(
      state, _Outcome(choice, inner, metrics, state.pending),
      jnp.asarray(False), plan.presample_size, plan.batch_size)
  return _put_own(plan, new_state), metrics


def _init(plan, train_state: PyTree, key: Array) -> ImportanceState:
  if not (isinstance(key, jax.Array) and (
      jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
      or (key.dtype == jnp.uint32 and key.shape == (2,)))):
    raise TypeError(
        f"init(train_state, key) needs a PRNG key such as jax.random.key(0); "
        f"got {type(key).__name__} {getattr(key, 'dtype', '')}.")
  placement = plan.placement
  state = ImportanceState(
      inner=placement.put_train_state(jax.tree.map(_as_array, train_state)),
      key=key,
      step=jnp.zeros((), jnp.int32),
      tau=jnp.zeros((), jnp.float32),
      condition=plan.condition.init(plan.presample_size, plan.batch_size),
      transforms=tuple(t.init() for t in plan.transforms),
      policy=placement.init_policy(plan.policy, plan.presample_size,
                                   plan.batch_size),
      table=plan.table.init() if plan.table is not None else (),
      tau_step=jnp.full((), -1, jnp.int32),
      pending=(_stale.init_pending(plan.batch_size)
               if plan.may_look_ahead else ()))
  return _put_own(plan, state)


# ------------------------------------------------------------------ public


def importance_step(
    train_step: Callable[[PyTree, PyTree, Array], tuple],
    logits_fn: Optional[Callable[[PyTree, PyTree], Array]],
    *,
    batch_size: int,
    presample: float = 3.0,
    loss: Union[str, Callable[[Array, Array], Array]] = "softmax_cross_entropy",
    labels: Union[str, int, Callable[[PyTree], Array]] = "label",
    mask: Union[None, str, Callable[[PyTree], Array]] = None,
    example_weights: Union[None, str, Callable[[PyTree], Array]] = None,
    score: Union[None, str, Callable[..., Array], _scores.Score] = None,
    tau_threshold: Optional[float] = None,
    tau_momentum: Optional[float] = None,
    score_transforms: Optional[Sequence[_transforms.ScoreTransform]] = None,
    policy: Optional[_policies.Policy] = None,
    condition: Optional[_conditions.Condition] = None,
    score_table: Optional[_stale.ScoreTable] = None,
    budget: Optional[_budget.Budget] = None,
    forward_batch_size: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    data_axis: Union[str, Sequence[str]] = "data",
    resample: str = "global",
    diagnostics: bool = False,
    uniform_batches: bool = False,
    k: Optional[float] = None,
    smooth: float = 0.0,
    adaptive_smooth: bool = False,
) -> ImportanceStep:
  """Wraps a train step so that it trains on an importance-sampled batch.

  ``step(state, batch)`` takes a uniform *presample* of ``B = round(presample ·
  batch_size)`` examples and is equivalent to this Python (Katharopoulos &
  Fleuret 2018, Algorithm 1), but compiles to one XLA program with ``lax.cond``
  choosing the branch on device::

      if condition.active(state, step, τ):          # default: τ > 1 + 2B/(3b), or a probe
        s = score(logits_fn(inner, batch), labels)  # one forward pass over B
        s = transforms(s)                           # smoothing, if any
        i, w = policy.select(s, size=b)             # default: i ~ p ∝ s, w ∝ (B p_i)^-½
        inner, metrics = train_step(inner, batch[i], w)
        τ = m^Δ τ + (1 − m^Δ) variance_reduction(s)   # Δ: steps since the last
      else:
        inner, metrics = train_step(inner, batch[:b], ones(b))

  Uniform steps compute no scores: they cost what your ``train_step`` costs.
  τ is measured on importance steps only, from the scores the step draws
  with (by default ``logits_fn``'s, in inference mode, over the presample),
  so one estimator drives the switch. While the
  default condition is off, every 128th step is an importance step that
  measures τ again, every 512th while τ is under halfway to the threshold
  (``jis.when_variance_reduced(probe_every=, far_probe_every=)``).

  If the scores of a step are non-finite, negative or all zero, that step uses
  uniform scores instead and reports ``is/fallback = 1``.

  ``train_step`` and ``logits_fn`` may be plain or already-jitted functions:
  jis traces them into its own program (once per branch that calls them:
  a ``budget``'s buckets each train at their own size). jis never jits
  on your behalf: ``jax.jit(sampler.step, donate_argnums=0)`` is yours to
  write.

  Args:
    train_step: ``(train_state, batch, weights [b]) -> (train_state, metrics)``,
      the user's step with per-example loss weights; ``metrics`` a dict. It
      may return the logits of its batch under ``metrics["is/logits"]``: jis
      then records the trained examples' scores (for a score table, or a
      policy that observes uniform steps) without a forward pass, and removes
      the key from the metrics it returns.
    logits_fn: ``(train_state, batch) -> logits [n, ...]``, the forward pass in
      inference mode (BatchNorm statistics, no dropout). May be None with
      ``score="uniform"`` or a score that needs no logits.
    batch_size: ``b``, the number of examples each update trains on.
    presample: ``B / b`` (a float ≥ 1); the batch given to ``step`` must have
      ``B = round(presample · b)`` examples.
    loss: ``"softmax_cross_entropy"`` (integer or one-hot/soft labels),
      ``"sigmoid_binary_cross_entropy"``, ``"mean_squared_error"``, or a
      callable ``loss(logits, labels) -> [n]``; used by the scores. With a
      multi-head model (``logits_fn`` returns a pytree of arrays, each with
      the batch as its first axis), a name applies to every head, or a
      pytree of names like the logits gives each head its own; the labels
      are then a pytree like the logits. A callable takes the pytrees whole.
    labels: the batch key holding the targets, or a callable ``batch -> labels``.
    mask: for the built-in losses, the batch key (or ``batch -> mask``) of a
      mask over the loss's positions, e.g. ``[n, T]`` for a sequence model's
      logits ``[n, T, V]`` and tokens ``[n, T]``: padded positions (0) add
      nothing to the loss or the score; the closed-form norms stay.
    example_weights: the batch key (or ``batch -> [n]``) of weights your
      loader gives each example, multiplied into the importance weights the
      ``train_step`` receives (e.g. the rescaling of a loader that pruned
      examples itself, :func:`jis.infobatch_epoch`).
    score: ``"upper_bound"`` (norm of the loss gradient w.r.t. the logits;
      the default), ``"loss"`` (the default with a ``score_table``, as
      InfoBatch keeps), ``"gradient_norm"`` (exact per-example
      parameter-gradient norm; a costly reference), ``"reducible_loss"``
      (RHO-LOSS, needs ``batch["irreducible_loss"]``), ``"uniform"``, or a
      callable ``score(logits, labels, batch) -> [n]``.
    tau_threshold: resample when τ exceeds it; None is
      :func:`jis.default_tau_threshold`, ``1 + 2B/(3b)`` (eq. 29 with the
      scoring pass counted twice; 3 at ``presample=3``); ``0.0`` always,
      ``float("inf")`` never. Shorthand for
      ``condition=jis.when_variance_reduced(tau_threshold,
      far_probe_every=jis.FAR_PROBE_EVERY)``.
    tau_momentum: momentum of τ's moving average (``state.tau``); None is 0.9.
    score_transforms: transforms applied in order to the scores.
    policy: how to select ``b`` examples from the scores. None is
      ``jis.importance_sampling(k=0.5, max_weight=100.0)``: biased towards
      high-score examples, bounded (see the README's "The default"); with a
      ``score_table``, ``jis.infobatch(0.5)``. ``jis.importance_sampling()``
      is the unbiased estimator of the paper.
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
    diagnostics: also report ``is/selected_fraction_unique`` and
      ``is/entropy``, which cost a sort and a log over the presample.
    uniform_batches: ``step`` also takes a batch of the ``b`` rows of a
      uniform step and trains on it uniformly, compiled alone (no ``cond``,
      no scoring pass; τ and the condition's state unchanged), so that a
      loop loads the presample only for the steps that may resample:
      :func:`jis.presample_schedule` says which. Not with a ``score_table``,
      a ``budget`` or a policy that observes uniform steps (they need
      scores every step). False: such a batch is
      an error, as any batch that is not ``B`` rows.
    k: deprecated: ``policy=jis.importance_sampling(k=...)``.
    smooth: deprecated: ``score_transforms=(jis.additive_smoothing(c),)``.
    adaptive_smooth: deprecated: ``score_transforms=(jis.adaptive_smoothing(c),)``.

  Returns:
    An :class:`ImportanceStep` ``(init, step)``. ``step`` returns the user's
    metrics plus ``is/tau``, ``is/active`` (1 on importance steps),
    ``is/ess`` (effective sample size of the weights), ``is/max_weight``,
    ``is/score_mean`` (mean raw presample score; 0 on uniform steps),
    ``is/fallback``, ``is/variance_reduction`` (this step's τ; 1 on uniform
    steps), ``is/nonfinite`` (1 when one of your metrics, e.g. the loss,
    is NaN or infinite; see ``docs/reliability.md``) and ``is/rows_used``
    (the presample rows the step used: ``B`` when it resampled (the rows
    a ``budget``'s bucket scored), the first ``b`` when it trained uniformly; advance your data position by it, so
    that a uniform step's unused rows open the next presample and every
    example is visited once per epoch); with a ``score_table``
    also ``is/fresh``, ``is/score_age``, ``is/unscored`` and ``is/bad_index``;
    with a ``budget`` also ``is/presample_size`` and ``is/batch_size``.
    ``step`` also accepts a :class:`jis.Indexed` presample (dataset indices
    into a dataset on device) in place of the presample batch, and, with
    ``uniform_batches=True``, a batch of ``b`` rows (arrays or ``Indexed``).

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
  plan = _plan.make(
      train_step, logits_fn, batch_size=batch_size, presample=presample,
      loss=loss, labels=labels, mask=mask, example_weights=example_weights,
      score=score,
      tau_threshold=tau_threshold,
      tau_momentum=tau_momentum, k=k, smooth=smooth,
      adaptive_smooth=adaptive_smooth, score_transforms=score_transforms,
      policy=policy, condition=condition, score_table=score_table,
      budget=budget, forward_batch_size=forward_batch_size, mesh=mesh,
      data_axis=data_axis, resample=resample, diagnostics=diagnostics,
      uniform_batches=uniform_batches)
  model = _Model(train_step, logits_fn)
  return ImportanceStep(functools.partial(_init, plan),
                        functools.partial(_step, plan, model))


def plan_of(sampler: ImportanceStep) -> Optional[_plan.Plan]:
  """The :class:`jis._plan.Plan` behind what :func:`importance_step`
  returned (``step`` is ``partial(_step, plan, model)``), or None."""
  step = getattr(sampler, "step", None)
  if isinstance(step, functools.partial) and step.func is _step:
    return step.args[0]
  return None
