"""The experiments' training loop: ``train_and_evaluate(config, workdir)``.

One run trains a model with ``jis.importance_step`` (uniform training is
``config.sampler.score="uniform"``) and writes to ``workdir``:

- ``config.json``: the config as run;
- ``metrics.jsonl``: one JSON object per line (:mod:`experiments.metric_writer`).
  Training lines hold ``step``, ``epoch`` (updates · batch size / training
  examples), ``train_seconds`` (the training clock: compilation, evaluation,
  logging and checkpointing excluded), the train-batch ``train/loss`` and
  ``train/accuracy`` (weighted by the importance weights: unbiased for the
  presample with ``policy=jis.importance_sampling()``, a hard-example-weighted
  estimate under the default ``k = 0.5`` policy) and the jis ``is/``
  metrics, each averaged over the steps since the previous dispatch.
  Evaluation lines add ``eval/test_loss``, ``eval/test_accuracy``,
  ``eval/train_loss`` and ``eval/train_accuracy``, in
  inference mode (:mod:`experiments.evaluation`);
- ``checkpoints/``: orbax checkpoints of the whole jis state and the data
  position, periodic and at the end (:mod:`experiments.checkpoints`). A
  workdir that holds one resumes from it.

Each dispatch runs ``config.steps_per_dispatch`` steps in one jitted program
(:func:`train_chunk`) that takes its presamples from the batch source
(:mod:`experiments.batches`: gathered on the device, or streamed from host
memory), preprocesses them (:mod:`experiments.preprocess`) and runs the jis
step. The host fetches values only at logging, evaluation and checkpoint
steps, which :mod:`experiments.cadence` decides, the same on every process.
Only process 0 writes files other than checkpoints.
"""

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

from absl import logging
from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

import jis
from experiments import batches
from experiments import cadence
from experiments import checkpoints
from experiments import evaluation
from experiments import input_pipeline
from experiments import metric_writer
from experiments import models
from experiments import placement as placement_lib
from experiments import preprocess as preprocess_lib
from experiments import pruning
from experiments import sampling
from experiments.benchmarks import hlo

_NO_BAD_STEP = np.iinfo(np.int32).max


class TrainState(train_state.TrainState):
  """A flax TrainState with BatchNorm statistics and a dropout key."""
  batch_stats: Any = None
  dropout_key: jax.Array = None   # raw uint32[2]; folded with the step


# ----------------------------------------------------------------------------
# Model, optimizer, steps
# ----------------------------------------------------------------------------

def learning_rate_fn(config) -> optax.Schedule:
  if config.lr_schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  if config.lr_schedule == "piecewise":
    return optax.piecewise_constant_schedule(
        config.learning_rate,
        {int(b): config.lr_decay_factor for b in config.lr_boundaries})
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(config.learning_rate,
                                       max(int(config.num_steps), 1))
  raise ValueError(f"config.lr_schedule must be constant, piecewise or cosine; "
                   f"got {config.lr_schedule!r}.")


def create_optimizer(config) -> optax.GradientTransformation:
  lr = learning_rate_fn(config)
  makers = {
      "adam": lambda: optax.adam(lr),
      "sgd": lambda: optax.sgd(lr, momentum=config.momentum or None,
                               nesterov=config.get("nesterov", False)),
      "rmsprop": lambda: optax.rmsprop(lr),
      "adadelta": lambda: optax.adadelta(lr),
  }
  if config.optimizer not in makers:
    raise ValueError(f"config.optimizer must be one of {sorted(makers)}; got "
                     f"{config.optimizer!r}.")
  parts = []
  if config.get("grad_clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.get("weight_decay", 0.0):
    parts.append(optax.add_decayed_weights(config.weight_decay))
  parts.append(makers[config.optimizer]())
  return optax.chain(*parts)


def create_model(config, dataset: input_pipeline.Dataset):
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != "name"}
  if config.model.name == "fasttext":
    kwargs.setdefault("vocab_size", dataset.info["vocab_size"])
  return models.create(config.model.name, dataset.num_classes, **kwargs)


def create_train_state(config, model, sample_input, key) -> TrainState:
  """Initializes the model and optimizer in one compiled program (op by op,
  a WRN's initialization compiles dozens of small programs)."""
  tx = create_optimizer(config)

  def init(key, x):
    init_key, dropout_key = jax.random.split(key)
    variables = model.init({"params": init_key, "dropout": init_key}, x,
                           train=False)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              tx=tx, batch_stats=variables.get("batch_stats"),
                              dropout_key=dropout_key)
    return state.replace(step=jnp.zeros((), jnp.int32))
  # XLA:CPU compiles the partitionable threefry of dozens of differently
  # shaped draws slowly (~10 s for a small WRN, against ~2 s); the
  # initialization runs once and unsharded, so the classic threefry serves.
  with jax.threefry_partitionable(False):
    return jax.jit(init)(key, sample_input)


def _variables(state):
  v = {"params": state.params}
  if state.batch_stats is not None:
    v["batch_stats"] = state.batch_stats
  return v


def train_step(state: TrainState, batch, weights):
  """One weighted update. Hands back its logits so jis scores uniform steps
  without another forward pass."""
  rng = jax.random.fold_in(state.dropout_key, state.step)
  has_bn = state.batch_stats is not None

  def loss_fn(params):
    variables = {**_variables(state), "params": params}
    if has_bn:
      logits, updates = state.apply_fn(variables, batch["input"], train=True,
                                       rngs={"dropout": rng},
                                       mutable=["batch_stats"])
    else:
      logits, updates = state.apply_fn(variables, batch["input"], train=True,
                                       rngs={"dropout": rng}), {}
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"])
    return jnp.mean(weights * losses), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  if has_bn:
    state = state.replace(batch_stats=updates["batch_stats"])
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  # The loss is the weighted objective, an unbiased estimate of the
  # presample's mean loss; the accuracy is self-normalized to stay in [0, 1].
  return state, {"train/loss": loss,
                 "train/accuracy": jnp.sum(weights * correct) / jnp.sum(weights),
                 jis.LOGITS_KEY: logits}


def logits_fn(state: TrainState, batch):
  """The forward pass in inference mode (BatchNorm running statistics)."""
  return state.apply_fn(_variables(state), batch["input"], train=False)


# ----------------------------------------------------------------------------
# A dispatch: steps_per_dispatch steps in one program
# ----------------------------------------------------------------------------

class Loop(struct.PyTreeNode):
  """What the jitted chunk carries from one dispatch to the next.

  Attributes:
    jis: the ``jis.ImportanceState`` (it nests the TrainState).
    data: the batch source's carry (the data position, on the device).
    first_bad_step: the first step whose loss was not finite, or int32 max.
  """
  jis: jis.ImportanceState
  data: Any
  first_bad_step: jax.Array


def train_chunk(loop: Loop, fed, statistics, aug_key, *, num_steps: int,
                sampler: jis.ImportanceStep, source,
                preprocess: preprocess_lib.Preprocess,
                placement: placement_lib.Placement, unroll: bool):
  """``num_steps`` steps in one program; the metrics averaged over them.

  Each step takes presample ``i`` of the chunk from ``source`` (``fed`` is
  what it reads), preprocesses it with the augmentation key folded with the
  step (unless it is a ``jis.Indexed`` into the split preprocessed once),
  and runs the jis step. ``num_steps`` is static: a run dispatches
  chunks of ``steps_per_dispatch`` and, when its step budget is not a
  multiple of that, one shorter chunk at the end (a second program, compiled
  up front). No step is wrapped in a conditional: a ``lax.cond`` returning
  the ``Loop`` would copy every state buffer on every step
  (docs/performance_notes.md).
  """
  def one(loop: Loop, i):
    step = loop.jis.step
    batch, data = source.take(loop.data, fed, i, loop.jis)
    if not isinstance(batch, jis.Indexed):   # rows, preprocessed here
      batch = placement.constrain(preprocess(
          batch, statistics, jax.random.fold_in(aug_key, step), True))
    new_jis, metrics = sampler.step(loop.jis, batch)
    data = source.consumed(data, metrics["is/rows_used"])
    bad = ~jnp.isfinite(metrics["train/loss"])
    first_bad = jnp.where(bad & (loop.first_bad_step == _NO_BAD_STEP), step,
                          loop.first_bad_step)
    metrics = jax.tree.map(lambda m: m.astype(jnp.float32), metrics)
    return Loop(jis=new_jis, data=data, first_bad_step=first_bad), metrics

  if num_steps == 1:   # no loop at all
    return one(loop, 0)
  # One stacked array per metric. Concatenating them into one vector a step
  # (one write instead of one per metric) made the default's step 5-9 %
  # slower on Reuters (docs/performance_notes.md, section 26).
  loop, metrics = jax.lax.scan(one, loop, jnp.arange(num_steps),
                               unroll=unroll)
  return loop, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def compile_chunks(loop: Loop, statistics, aug_key, sizes, *, source,
                   **static) -> Dict[int, jax.stages.Compiled]:
  """:func:`train_chunk` for each chunk size in ``sizes``, compiled ahead of
  time (the training clock never counts compilation), the loop donated."""
  return {n: jax.jit(functools.partial(train_chunk, num_steps=n,
                                       source=source, **static),
                     donate_argnums=0)
          .lower(loop, source.probe(n), statistics, aug_key).compile()
          for n in sorted(sizes)}


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
  """What :func:`train_and_evaluate` returns (also written to the workdir)."""
  state: jis.ImportanceState
  step: int
  train_seconds: float
  eval: Dict[str, float]
  preempted: bool = False   # stopped early by SIGTERM, after a checkpoint


def _check_finite(loop: Loop, workdir: str) -> None:
  bad = int(jax.device_get(loop.first_bad_step))
  if bad != _NO_BAD_STEP:
    raise FloatingPointError(
        f"Training diverged: the loss became NaN or infinite at step {bad} "
        f"(workdir {workdir}). Lower --config.learning_rate, set "
        "--config.grad_clip_norm, or add smoothing to the scores "
        "(--config.sampler.score_transforms='(additive_smoothing(1.0),)'), "
        "then rerun: the run resumes from the last checkpoint before it, in "
        f"{os.path.join(workdir, 'checkpoints')} (or start a new workdir).")


class _Outputs:
  """What the loop writes: training and evaluation lines of metrics.jsonl,
  and checkpoints, each stamped with the step, epoch and training clock."""

  def __init__(self, workdir: str, writer: metric_writer.MetricWriter,
               ckpt: checkpoints.Checkpointer, clocks: cadence.Clocks,
               steps_per_epoch: float, info: Dict[str, int]):
    self.workdir, self.writer, self.ckpt, self.clocks = (workdir, writer, ckpt,
                                                         clocks)
    self.steps_per_epoch = steps_per_epoch
    self.info = info   # presample_size, batch_size, train_examples

  def record(self, step: int) -> Dict[str, Any]:
    return {"step": step, "epoch": step / self.steps_per_epoch,
            "train_seconds": self.clocks.train.read()}

  def log_train(self, loop: Loop, metrics, step: int, lr: float, bar) -> None:
    _check_finite(loop, self.workdir)
    values = jax.device_get(metrics)
    self.writer.write({**self.record(step), **values, "learning_rate": lr})
    bar.set_postfix({"loss": f"{values['train/loss']:.4f}",
                     "acc": f"{values['train/accuracy']:.3f}",
                     "tau": f"{values['is/tau']:.2f}",
                     "IS": f"{values['is/active']:.2f}",
                     "s": f"{self.clocks.train.read():.0f}"}, refresh=False)

  def evaluate(self, evaluator, loop: Loop, statistics, step: int):
    _check_finite(loop, self.workdir)
    t0 = time.perf_counter()
    metrics = evaluator(loop.jis.inner, statistics)
    record = {**self.record(step), **metrics,
              "eval_seconds": time.perf_counter() - t0}
    self.writer.write(record)
    logging.info("step %d (%.2f epochs, %.1f s): test loss %.4f, accuracy "
                 "%.4f; train loss %.4f, accuracy %.4f.", step,
                 record["epoch"], record["train_seconds"],
                 metrics["eval/test_loss"], metrics["eval/test_accuracy"],
                 metrics["eval/train_loss"], metrics["eval/train_accuracy"])
    return metrics

  def save(self, loop: Loop, source, step: int) -> None:
    _check_finite(loop, self.workdir)
    if self.ckpt.latest_step() != step:   # else a resumed run with no steps
      meta = {**self.record(step), **self.info}
      self.ckpt.save_run(step, loop.jis, source.position(loop.data), meta)
    self.clocks.saved()


class _Parts(NamedTuple):
  """A run's data, model and sampler, built and validated from its config."""
  dataset: input_pipeline.Dataset
  placement: placement_lib.Placement
  preprocess: preprocess_lib.Preprocess
  statistics: Any
  sampler: jis.ImportanceStep
  jis_state: jis.ImportanceState
  presample_size: int
  data_key: jax.Array
  aug_key: jax.Array


def _build(config: ml_collections.ConfigDict) -> _Parts:
  """Data, model and sampler, all validated before the first file is written
  to the workdir: a bad config or missing data leaves no workdir that looks
  like a run."""
  cadence.check_budgets(config)
  pruning.check(config)
  dataset = input_pipeline.load(config.dataset)
  input_pipeline.check_labels(dataset)
  n_train, b = len(dataset.train["label"]), int(config.batch_size)
  init_key, jis_key, data_key, aug_key = jax.random.split(
      jax.random.PRNGKey(config.seed), 4)
  # One data order for every process: each loads its own rows of the same
  # presamples. (Folding 0 keeps the order one-process runs always had.)
  data_key = jax.random.fold_in(data_key, 0)
  placement = placement_lib.Placement.from_config(config)
  preprocess = preprocess_lib.Preprocess.from_config(config.input,
                                                     dataset.info["kind"])
  statistics = preprocess.statistics(dataset.train)
  sample = preprocess({k: v[:1] for k, v in dataset.train.items()},
                      statistics, aug_key, False)
  state = create_train_state(config, create_model(config, dataset),
                             sample["input"], init_key)
  sampler, big_b = sampling.build(config.sampler, train_step, logits_fn, b,
                                  num_examples=n_train, mesh=placement.mesh,
                                  pruning=pruning.method(config))
  if n_train < big_b:
    raise ValueError(f"The training split has {n_train} examples, fewer than "
                     f"one presample batch B = {big_b}; lower batch_size or "
                     "presample.")
  logging.info("%s from %s: %d train / %d test examples; model %s with %d "
               "parameters; b=%d, B=%d.", dataset.name, dataset.source, n_train,
               len(dataset.test["label"]), config.model.name,
               sum(x.size for x in jax.tree.leaves(state.params)), b, big_b)
  return _Parts(dataset, placement, preprocess, statistics, sampler,
                sampler.init(state, jis_key), big_b, data_key, aug_key)


def _source(config, parts: _Parts, position):
  """The batch source. Without augmentation the preprocessing is the same
  every epoch: it runs once, and on device jis gathers only the rows a step
  uses."""
  prepare = None if parts.preprocess.augment else (
      lambda split: jax.jit(functools.partial(parts.preprocess, train=False))(
          split, parts.statistics, parts.aug_key))
  n_train = len(parts.dataset.train["label"])
  return batches.create(config, parts.dataset.train, parts.data_key,
                        parts.presample_size, parts.placement, position,
                        n_train / int(config.batch_size), prepare)


def program(config, parts: _Parts, source, jis_state, sizes):
  """``(loop, statistics, chunk_fns)``: the loop's carry and the
  preprocessing statistics on the devices, and :func:`compile_chunks` for
  each chunk size in ``sizes``. What the training loop runs (and what
  ``experiments/benchmarks/probes/loop_cost.py`` times)."""
  loop = jax.device_put(Loop(jis=jis_state, data=source.carry(),
                             first_bad_step=jnp.int32(_NO_BAD_STEP)),
                        parts.placement.replicated)
  statistics = jax.device_put(parts.statistics, parts.placement.replicated)
  return loop, statistics, compile_chunks(
      loop, statistics, parts.aug_key, sizes, sampler=parts.sampler,
      source=source, preprocess=parts.preprocess, placement=parts.placement,
      unroll=bool(config.get("scan_unroll", False)))


def _steps_per_dispatch(config) -> int:
  return max(1, int(config.steps_per_dispatch))


class Handoff(NamedTuple):
  """Lets other work use the machine between a run's dispatches (the
  convergence benchmark's runs that take turns, so that they meet the same
  machine speed): every ``seconds`` of the run's training clock, the loop
  drains its dispatches, stops the clock and calls ``give``, which returns
  when the run may go on (the same dispatch on every process: the loop
  reads the agreed clock). A streamed source's loader threads are not
  paused: they fill their buffers while ``give`` waits. A run in a thread
  other than the main one installs no SIGTERM handler (no save-and-stop on
  preemption)."""
  seconds: float
  give: Callable[[], None]


class _Run(NamedTuple):
  """A run set up and compiled, its training clock not started."""
  loop: Loop
  source: Any
  statistics: Any
  aug_key: jax.Array
  evaluator: evaluation.Evaluator
  schedule: cadence.Cadence
  chunk_fns: Dict[int, jax.stages.Compiled]
  out: _Outputs
  start_step: int
  resumed: bool
  handoff: Optional[Handoff] = None


def _train(config, run: _Run) -> Result:
  """The training loop: dispatches chunks until the schedule stops it, with
  logging, evaluation and checkpoints off the training clock."""
  loop, source, statistics, out = run.loop, run.source, run.statistics, run.out
  schedule, clocks, start_step = run.schedule, run.out.clocks, run.start_step
  k = _steps_per_dispatch(config)
  lr_fn = learning_rate_fn(config)
  bar = tqdm.tqdm(total=schedule.total_steps(), initial=start_step, unit="step",
                  disable=not (config.progress_bar and jax.process_index() == 0),
                  dynamic_ncols=True, mininterval=0.5)
  step, pending, last_eval, actions = start_step, None, {}, cadence.Actions()
  give_at = math.inf if run.handoff is None else (
      clocks.agreed().train_seconds + run.handoff.seconds)
  try:
    with clocks:
      if start_step == 0 and config.get("eval_at_start", True):
        last_eval = out.evaluate(run.evaluator, loop, statistics, 0)
      # The clock has not started: it reads the checkpoint's seconds. (The
      # first agreement also compiles its collective, off the clock.)
      done = schedule.done(step, clocks.agreed().train_seconds)
      clocks.train.start()
      while not done:
        n = schedule.chunk(step, k)
        loop, metrics = run.chunk_fns[n](
            loop, source.next_input(step, n, loop.jis), statistics,
            run.aug_key)
        if pending is not None:
          jax.block_until_ready(pending)   # keep one chunk in flight, no more
        pending, prev, step = metrics, step, step + n
        bar.update(n)
        now = clocks.agreed()
        actions = schedule.after_dispatch(prev, step, now)
        done = actions.stop
        hand_over = not done and now.train_seconds >= give_at
        if not (actions.log or actions.evaluate or actions.save or hand_over):
          continue
        jax.block_until_ready(loop)
        clocks.train.stop()
        if actions.log:
          out.log_train(loop, metrics, step, float(lr_fn(step)), bar)
        if actions.evaluate:
          last_eval = out.evaluate(run.evaluator, loop, statistics, step)
          schedule.evaluated(clocks.agreed().train_seconds)
        if actions.save:
          out.save(loop, source, step)
        if hand_over:
          run.handoff.give()
          give_at = clocks.agreed().train_seconds + run.handoff.seconds
        if not done:
          clocks.train.start()
      clocks.train.stop()
      jax.block_until_ready(loop)
      if actions.preempted:
        # No evaluation: the grace period before SIGKILL is short.
        out.save(loop, source, step)
        logging.warning("Preempted at step %d: checkpoint saved in %s; run the "
                        "same command again to resume.", step, out.workdir)
      elif step > start_step or not run.resumed:
        last_eval = out.evaluate(run.evaluator, loop, statistics, step)
        out.save(loop, source, step)
      else:
        logging.info("%s already holds a run to its budget (step %d); raise "
                     "a budget to train further.", out.workdir, step)
  finally:
    bar.close()
  return Result(state=loop.jis, step=step, train_seconds=clocks.train.read(),
                eval=last_eval, preempted=actions.preempted)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       handoff: Optional[Handoff] = None) -> Result:
  """Trains and evaluates as ``config`` says, logging to ``workdir``;
  ``handoff`` lets other work run between dispatches (:class:`Handoff`)."""
  checkpoints.quiet_orbax_logs()
  parts = _build(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  # Resume from the workdir's latest checkpoint, onto this run's shardings
  # (on any number of processes and devices).
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  config.keep_checkpoints)
  jis_state, position, train_seconds = parts.jis_state, None, 0.0
  resumed = ckpt.restore_latest(jis_state)
  if resumed:
    jis_state, position, train_seconds = resumed
    logging.info("Resumed from %s at step %d (data epoch %d, %.1f s of "
                 "training).", workdir, int(jis_state.step),
                 position["epoch"], train_seconds)
  start_step = int(jis_state.step)
  writer = metric_writer.MetricWriter(
      workdir, jax.process_index() == 0,
      keep_until_step=start_step if resumed else None)
  source = _source(config, parts, position)
  dataset = parts.dataset
  evaluator = evaluation.Evaluator(
      logits_fn, parts.preprocess, parts.placement, config.eval_batch_size,
      dataset.test, dataset.train, config.eval_train_examples,
      source.device_split)
  steps_per_epoch = len(dataset.train["label"]) / int(config.batch_size)
  schedule = cadence.Cadence(config, steps_per_epoch, train_seconds)
  t0 = time.perf_counter()
  sizes = schedule.chunk_sizes(start_step, _steps_per_dispatch(config))
  loop, statistics, chunk_fns = program(config, parts, source, jis_state,
                                        sizes)
  logging.info("Compiled the training program%s in %.1f s.",
               "s" if len(sizes) > 1 else "", time.perf_counter() - t0)
  hlo.warn_if_slow_on_cpu(chunk_fns[max(sizes)], max(sizes))

  clocks = cadence.Clocks(train_seconds)
  out = _Outputs(workdir, writer, ckpt, clocks, steps_per_epoch, {
      "presample_size": parts.presample_size,
      "batch_size": int(config.batch_size),
      "train_examples": len(dataset.train["label"])})
  try:
    return _train(config, _Run(loop, source, statistics, parts.aug_key,
                               evaluator, schedule, chunk_fns, out,
                               start_step, bool(resumed), handoff))
  finally:
    source.close()
    ckpt.close()
