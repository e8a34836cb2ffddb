"""Which steps need a presample: a host-side schedule for the loader.

A presample is ``B`` rows loaded for a step, and a step only uses them when
it resamples; while importance sampling is off (τ under its threshold) that
is one probe every 128 or 512 steps. Built with ``uniform_batches=True``,
``step`` also takes a batch of the ``b`` rows of a uniform step and trains
on them, compiled alone. :func:`presample_schedule` tells the loop which to
load.

It needs no device round trip on most steps: whether a step resamples is
``condition.active(condition_state, step, τ)``, and the condition's state and
τ change only on importance steps. After reading them once, the schedule
evaluates ``active`` for the next ``horizon`` steps in one small program and
answers from that. After a step it fed a presample, it reads the new state
when that is finished (``jax.Array.is_ready``: no waiting) while its answer
is ``B`` anyway; where it would answer ``b``, it waits for that state
first, since the presample-fed step may have switched importance sampling
on. That is one wait after each probe and one when importance sampling
switches off, and never a uniform batch for a step that resamples.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jis import _step

PyTree = Any


def _plan_and_state(sampler) -> tuple:
  """The :class:`jis._plan.Plan` of a :class:`jis.ImportanceStep` or a
  ``jis.nnx.ImportanceSampler``, and a function reading the latter's state."""
  pure = getattr(sampler, "pure", sampler)   # the NNX sampler's ImportanceStep
  plan = _step.plan_of(pure)
  if plan is None:
    raise TypeError(
        "presample_schedule needs what jis.importance_step returned (or a "
        f"jis.nnx.ImportanceSampler); got {type(sampler).__name__}.")
  if pure is sampler:
    return plan, lambda state: state
  return plan, lambda _: sampler.state.get_value()


def _ready(tree) -> bool:
  """Whether every array of ``tree`` is computed (reading it will not wait)."""
  return all(x.is_ready() for x in jax.tree.leaves(tree)
             if isinstance(x, jax.Array))


def _check(plan, horizon) -> None:
  if not plan.uniform_batches:
    raise ValueError(
        "presample_schedule: the steps it does not ask a presample for take "
        "b rows; build the sampler with importance_step(..., "
        "uniform_batches=True) (jis.nnx.ImportanceSampler takes it too).")
  if not isinstance(horizon, int) or horizon < 1:
    raise ValueError(f"presample_schedule(horizon) must be an int >= 1; got "
                     f"{horizon!r}.")


def _active_ahead(condition, horizon: int):
  """``(condition state, step, τ) -> bool [horizon]``: whether each of the
  ``horizon`` steps from ``step`` on resamples, if nothing changes the
  condition's state or τ in between (only importance steps do)."""
  @jax.jit
  def ahead(state, step, tau):
    steps = step + jnp.arange(horizon, dtype=jnp.int32)
    return jax.vmap(lambda t: condition.active(state, t, tau))(steps)
  return ahead


def presample_schedule(sampler, horizon: int = 1024
                       ) -> Callable[[Any], int]:
  """``rows(state) -> int``: how many rows to load for the next step.

  ``B`` for a step that may resample, ``b`` for a step that trains
  uniformly; a sampler built with ``uniform_batches=True`` takes either (a
  batch of ``b`` rows trains on them uniformly, with no ``cond`` and no
  scoring pass). A loop that feeds the ``b`` rows where it can loads and
  transfers what uniform training does while importance sampling is off,
  and pays the presample only on the steps that use it. Call it once per
  step, before the step, with the state the step will take (for a
  ``jis.nnx.ImportanceSampler``, pass the sampler), and feed the rows it
  asks for; a loop that calls ``step`` between two calls must feed it
  presamples.

  Every step that resamples gets its presample. The schedule waits for the
  device once after each probe (the step after it needs the probe's τ) and
  once when importance sampling switches off; while it is on, it reads the
  states as they finish and answers ``B``.

  Args:
    sampler: what :func:`jis.importance_step` returned with
      ``uniform_batches=True``, or a ``jis.nnx.ImportanceSampler`` built
      so.
    horizon: steps evaluated ahead of each read, ``≥ 1``.

  Returns:
    A function of the state (or NNX sampler) returning ``B`` or ``b``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jis
    >>> def train_step(w, batch, weights):
    ...   return w - 0.1 * jnp.mean(weights[:, None] * batch["x"], 0), {}
    >>> sampler = jis.importance_step(
    ...     train_step, lambda w, batch: batch["x"] @ w[:, None],
    ...     batch_size=2, presample=2.0, loss="mean_squared_error",
    ...     labels=lambda batch: batch["y"], uniform_batches=True)
    >>> rows = jis.presample_schedule(sampler)
    >>> state = sampler.init(jnp.zeros(3), jax.random.key(0))
    >>> sizes = []
    >>> for _ in range(130):
    ...   n = rows(state)
    ...   sizes.append(n)
    ...   batch = {"x": jnp.ones((n, 3)), "y": jnp.zeros((n, 1))}
    ...   state, _ = sampler.step(state, batch)
    >>> sizes.count(4), sizes.index(4)   # the first probe, step 127
    (1, 127)
  """
  plan, read_state = _plan_and_state(sampler)
  _check(plan, horizon)
  big_b, b = plan.presample_size, plan.batch_size
  cpu = jax.devices("cpu")[0]
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
  ahead = _active_ahead(plan.condition, horizon)

  # What the schedule knows: the step of the latest state it read and
  # active[i] for step + i; the loop's step count; the states after
  # presample-fed steps not read yet, oldest first.
  known = {"step": 0, "active": None, "t": 0, "unread": [], "fed": False}

  def learn(condition, step, tau) -> None:
    condition, step, tau = jax.device_get((condition, step, tau))
    with jax.default_device(cpu):
      active = np.asarray(ahead(condition, np.int32(step), tau))
    known.update(step=int(step), active=active)

  def read_latest_ready() -> None:
    """Reads the newest finished state of the unread ones (no waiting) and
    drops it and the older ones."""
    unread = known["unread"]
    for i in reversed(range(len(unread))):
      if _ready(unread[i]):
        learn(*unread[i])
        known["unread"] = unread[i + 1:]
        return

  def rows(state_or_sampler) -> int:
    state = read_state(state_or_sampler)
    if plan.static_active is not None:
      return big_b if plan.static_active else b
    if known["active"] is None:   # the first call
      learn(state.condition, state.step, state.tau)
      known["t"] = known["step"]
    elif known["fed"]:   # the previous step had a presample: copies, which
      # outlive the state when the loop donates it to the next step
      known["unread"].append(copy((state.condition, state.step, state.tau)))
    read_latest_ready()
    t = known["t"]
    offset = t - known["step"]
    # Past what was evaluated, or a step predicted uniform while a
    # presample-fed step is unread (a probe may have switched importance
    # sampling on): wait for this state and read it. Once a probe, and once
    # when importance sampling switches off. A step predicted to resample
    # needs no wait: if it would not, its presample is only unused.
    if offset >= horizon or (known["unread"] and not known["active"][offset]):
      learn(state.condition, state.step, state.tau)
      known["unread"], offset = [], 0
    want = bool(known["active"][offset])
    known.update(t=t + 1, fed=want)
    return big_b if want else b

  return rows
