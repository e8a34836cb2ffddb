"""The experiments' training loop: ``train_and_evaluate(config, workdir)``.

One run trains a model with ``jis.importance_step`` (uniform training is
``config.sampler.score="uniform"``) and writes to ``workdir``:

- ``config.json``: the config as run;
- ``metrics.jsonl``: one JSON object per line. Training lines hold ``step``,
  ``epoch`` (updates · batch size / training examples), ``train_seconds``
  (the training clock: compilation, evaluation, logging and checkpointing
  excluded), the train-batch ``train/loss`` and ``train/accuracy`` (weighted by
  the importance weights, so unbiased for the presample) and the jis ``is/``
  metrics, each averaged over the steps since the previous dispatch.
  Evaluation lines add ``eval/test_loss``, ``eval/test_accuracy`` and
  ``eval/train_loss``, ``eval/train_accuracy`` over the whole training split,
  all in inference mode;
- ``checkpoints/``: orbax checkpoints of the whole jis state (train state,
  τ, keys, score and policy states) and the data position, periodic and at the
  end. A workdir that holds one resumes from it.

MNIST-sized data sits on the device; each dispatch runs
``config.steps_per_dispatch`` steps in a ``lax.scan`` that gathers its batches
on device, and the host fetches values only at logging, evaluation and
checkpoint steps. Larger data streams from host memory, a chunk of batches per
dispatch. Only process 0 writes.
"""

import dataclasses
import functools
import json
import logging as std_logging
import math
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

import jis
from experiments import input_pipeline
from experiments import models
from experiments import sampling

_NO_BAD_STEP = np.iinfo(np.int32).max


class TrainState(train_state.TrainState):
  """A flax TrainState with BatchNorm statistics and a dropout key."""
  batch_stats: Any = None
  dropout_key: jax.Array = None   # raw uint32[2]; folded with the step


class Loop(struct.PyTreeNode):
  """What the jitted chunk carries from one dispatch to the next.

  Attributes:
    jis: the ``jis.ImportanceState`` (it nests the TrainState).
    epoch, offset: the data position (on-device data; the host tracks it when
      streaming): the next batch starts at ``offset`` of epoch ``epoch``'s
      permutation.
    perm: that permutation (recomputed from the epoch, never checkpointed).
    first_bad_step: the first step whose loss was not finite, or int32 max.
  """
  jis: jis.ImportanceState
  epoch: jax.Array
  offset: jax.Array
  perm: jax.Array
  first_bad_step: jax.Array


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
# Preprocessing on device
# ----------------------------------------------------------------------------

def zca_matrix(x: jax.Array, epsilon: float) -> Tuple[jax.Array, jax.Array]:
  """ZCA whitening ``(mean [D], W [D, D])`` of ``x [N, D]``.

  ``W = V diag(1/√(λ + ε)) Vᵀ`` over the eigenpairs of the covariance; when
  N < D the thin SVD gives them and directions outside the data get 1/√ε.
  """
  x = jnp.asarray(x, jnp.float32)
  mean = jnp.mean(x, axis=0)
  xc = x - mean
  n, d = x.shape
  if n >= d:
    lam, v = jnp.linalg.eigh(xc.T @ xc / n)
  else:
    _, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    lam, v = jnp.square(s) / n, vt.T
  scale = 1.0 / jnp.sqrt(jnp.maximum(lam, 0.0) + epsilon)
  w = (v * (scale - 1.0 / math.sqrt(epsilon))) @ v.T + jnp.eye(d) / math.sqrt(
      epsilon)
  return mean, w


def preprocess_params(config, dataset) -> Dict[str, Any]:
  """Statistics of the training split the preprocessing needs."""
  kind = dataset.info["kind"]
  normalize = config.input.get("normalize", "scale")
  if kind != "image" or normalize == "scale":
    return {}
  x = dataset.train["input"]
  if normalize == "standardize":
    x = x.astype(np.float32) / 255.0
    return {"mean": x.mean(axis=(0, 1, 2)), "std": x.std(axis=(0, 1, 2)) + 1e-6}
  if normalize == "zca":
    flat = jnp.asarray(x.reshape(x.shape[0], -1), jnp.float32) / 255.0
    mean, w = jax.jit(zca_matrix, static_argnums=1)(
        flat, float(config.input.zca_epsilon))
    return {"zca_mean": mean, "zca": w}
  raise ValueError(f"config.input.normalize must be scale, standardize or zca; "
                   f"got {normalize!r}.")


def _augment(x, key, padding: int, flip: bool):
  """Random translations by up to ``padding`` pixels (zero fill) and
  horizontal flips, per example."""
  n, h, w, _ = x.shape
  k_shift, k_flip = jax.random.split(key)
  if padding:
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    shifts = jax.random.randint(k_shift, (n, 2), 0, 2 * padding + 1)
    x = jax.vmap(lambda img, s: jax.lax.dynamic_slice(
        img, (s[0], s[1], 0), (h, w, img.shape[-1])))(padded, shifts)
  if flip:
    mirror = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    x = jnp.where(mirror, x[:, :, ::-1], x)
  return x


def make_preprocess(config, kind: str) -> Callable:
  """``(batch, params, key, train) -> batch`` with float inputs."""
  augment = config.input.get("augment", False)

  def preprocess(batch, params, key, train: bool):
    x = batch["input"]
    if kind == "image":
      x = x.astype(jnp.float32) / 255.0
      if "zca" in params:
        shape = x.shape
        x = ((x.reshape(shape[0], -1) - params["zca_mean"]) @ params["zca"]
             ).reshape(shape)
      elif "mean" in params:
        x = (x - params["mean"]) / params["std"]
      if train and augment:
        x = _augment(x, key, config.input.crop_padding, config.input.flip)
    elif kind == "sequence":
      x = x.astype(jnp.float32) / 255.0
    elif kind == "bag_of_words":
      x = x.astype(jnp.float32)
    return {**batch, "input": x}
  return preprocess


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------

def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                      jax.dtypes.prng_key)


def _flat_names(tree) -> Tuple[list, Any]:
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = []
  for i, (path, _) in enumerate(paths_leaves):
    readable = re.sub(r"[^0-9A-Za-z]+", "_", jax.tree_util.keystr(path)).strip("_")
    names.append(f"{i:04d}_{readable}"[:120])
  return names, treedef


def to_saveable(tree) -> Dict[str, Any]:
  """A flat dict of arrays that orbax saves whatever the pytree's node types
  (typed PRNG keys become their key data)."""
  names, _ = _flat_names(tree)
  leaves = jax.tree.leaves(tree)
  return {n: (jax.random.key_data(x) if _is_key(x) else
              np.asarray(x) if isinstance(x, (np.generic, int, float)) else x)
          for n, x in zip(names, leaves)}


def from_saveable(flat: Dict[str, Any], template):
  names, treedef = _flat_names(template)
  leaves = []
  for n, t in zip(names, jax.tree.leaves(template)):
    x = flat[n]
    if _is_key(t):
      x = jax.random.wrap_key_data(x, impl=jax.random.key_impl(t))
    leaves.append(x)
  return jax.tree.unflatten(treedef, leaves)


class Checkpointer:
  """Orbax checkpoints of the loop state and JSON metadata in
  ``workdir/checkpoints``."""

  def __init__(self, directory: str, keep: int):
    self._mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        # A save killed half-way leaves only a temporary directory that
        # orbax never lists as a step (it renames on commit); remove it.
        options=ocp.CheckpointManagerOptions(max_to_keep=keep or None,
                                             create=True,
                                             cleanup_tmp_directories=True),
        item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def save(self, step: int, tree, meta: Dict[str, Any]) -> None:
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(to_saveable(tree)),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, template):
    restored = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(to_saveable(template)),
        meta=ocp.args.JsonRestore()))
    return from_saveable(restored["state"], template), restored["meta"]

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

class MetricWriter:
  """JSON lines in ``workdir/metrics.jsonl``, written by process 0 only."""

  def __init__(self, path: str, enabled: bool, keep_until_step: Optional[int]):
    self._path, self._enabled = path, enabled
    if not enabled:
      return
    if keep_until_step is None:
      open(path, "w").close()
    elif os.path.exists(path):
      # A resumed run replays the steps after its checkpoint: drop their lines.
      with open(path) as f:
        lines = [l for l in f if l.strip()
                 and json.loads(l).get("step", 0) <= keep_until_step]
      with open(path, "w") as f:
        f.writelines(lines)

  def write(self, record: Dict[str, Any]) -> None:
    if not self._enabled:
      return
    clean = {}
    for k, v in record.items():
      v = np.asarray(v).item() if not isinstance(v, (str, int, float)) else v
      if isinstance(v, float) and not math.isfinite(v):
        v = str(v)   # JSON has no NaN/inf
      clean[k] = v
    with open(self._path, "a") as f:
      f.write(json.dumps(clean) + "\n")


def read_metrics(workdir: str) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


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


class _Clock:
  """The training clock: runs only while training chunks run."""

  def __init__(self, start: float = 0.0):
    self.total, self._since = start, None

  def start(self):
    self._since = time.perf_counter()

  def stop(self):
    if self._since is not None:
      self.total += time.perf_counter() - self._since
      self._since = None

  def read(self) -> float:
    extra = 0.0 if self._since is None else time.perf_counter() - self._since
    return self.total + extra


def _check_budgets(config) -> None:
  if not (config.num_steps > 0 or config.num_epochs > 0
          or config.train_seconds > 0):
    raise ValueError("Give a training budget: --config.num_steps, "
                     "--config.num_epochs or --config.train_seconds (> 0).")


class _Preemption:
  """Turns SIGTERM (what schedulers send before preempting a job) into a
  request the training loop answers at the next dispatch: save a checkpoint
  and return normally (exit code 0), so that rerunning the same command
  resumes. Installed only from the main thread; the previous handler comes
  back when the run ends."""

  def __init__(self):
    self.requested, self._previous = False, None

  def install(self) -> None:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    logging.warning("Received signal %d: saving a checkpoint after this "
                    "dispatch, then stopping.", signum)

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _check_labels(dataset) -> None:
  """Integer labels outside [0, num_classes) make softmax cross-entropy
  read past the logits (NaN losses, or silently wrong scores); the data is on
  the host here, so check it once instead of on every step."""
  for split in ("train", "test"):
    labels = np.asarray(getattr(dataset, split)["label"])
    if labels.size and (labels.min() < 0 or
                        labels.max() >= dataset.num_classes):
      raise ValueError(
          f"dataset {dataset.name!r}: {split} labels span [{labels.min()}, "
          f"{labels.max()}] but the model has {dataset.num_classes} classes; "
          "labels must lie in [0, num_classes). Check the data files under "
          "--config.dataset.data_dir.")


def _mesh(config):
  devices = jax.devices()
  n = config.get("num_devices", 0) or len(devices)
  if n > len(devices):
    raise ValueError(f"config.num_devices={n} but only {len(devices)} devices "
                     "are visible.")
  if jax.process_count() > 1:
    if n != len(devices):
      raise ValueError(
          f"config.num_devices={n}: a run of {jax.process_count()} processes "
          f"trains on all {len(devices)} of their devices; set "
          "--config.num_devices=0.")
    # Devices ordered by process: each process's rows of a presample are one
    # block of it.
    return jax.make_mesh((n,), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,)), None
  if n == 1:
    return None, devices[0]
  return jax.sharding.Mesh(np.array(devices[:n]), ("data",)), None


def _process_rows(sharding, size: int) -> slice:
  """The rows of a streamed ``[k, size, ...]`` chunk that this process's
  devices hold: the slice of each presample it loads."""
  spans = {idx[1].indices(size)[:2] for idx in
           sharding.addressable_devices_indices_map((1, size)).values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError("This process's devices hold rows of the presample that "
                     f"are not one block ({sorted(spans)}); build the mesh "
                     "with jax.make_mesh, which orders devices by process.")
  return slice(start, stop)


def _quiet_orbax() -> None:
  """Orbax logs every save step at INFO through absl; keep its warnings only."""
  absl_handler = logging.get_absl_handler().python_handler
  if not any(getattr(f, "_jis_orbax", False) for f in absl_handler.filters):
    def keep(record):
      return record.levelno >= std_logging.WARNING or (
          f"{os.sep}orbax{os.sep}" not in record.pathname)
    keep._jis_orbax = True  # pylint: disable=protected-access
    absl_handler.addFilter(keep)


def _convolution_in_a_loop(hlo: str) -> bool:
  """Whether a compiled program's HLO text runs a convolution in the body of
  a ``while`` (directly or through the computations that body calls)."""
  blocks, current = {}, None
  for line in hlo.splitlines():
    head = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
      blocks[current] = []
    elif current is not None:
      blocks[current].append(line)
  texts = {name: "\n".join(lines) for name, lines in blocks.items()}
  todo = set(re.findall(r"body=%([\w.\-]+)", hlo))
  seen = set()
  while todo:
    name = todo.pop()
    seen.add(name)
    text = texts.get(name, "")
    if " convolution(" in text:
      return True
    todo |= {n for n in re.findall(r"%([\w.\-]+)", text)
             if n in texts and n not in seen}
  return False


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Result:
  """Trains and evaluates as ``config`` says, logging to ``workdir``."""
  _check_budgets(config)
  _quiet_orbax()
  is_main = jax.process_index() == 0

  # ---- data, model, sampler ----
  # Everything is validated before the first file is written to the workdir,
  # so a bad config or missing data leaves no workdir that looks like a run.
  dataset = input_pipeline.load(config.dataset)
  _check_labels(dataset)
  kind = dataset.info["kind"]
  n_train = len(dataset.train["label"])
  b = int(config.batch_size)
  model = create_model(config, dataset)
  root = jax.random.PRNGKey(config.seed)
  init_key, jis_key, data_key, aug_key = jax.random.split(root, 4)
  # One data order for every process: each loads its own rows of the same
  # presamples. (Folding 0 keeps the order one-process runs always had.)
  data_key = jax.random.fold_in(data_key, 0)
  preprocess = make_preprocess(config, kind)
  prep_params = preprocess_params(config, dataset)
  sample = preprocess({k: v[:1] for k, v in dataset.train.items()},
                      prep_params, aug_key, False)
  state = create_train_state(config, model, sample["input"], init_key)
  mesh, device = _mesh(config)
  sampler, big_b = sampling.build(config.sampler, train_step, logits_fn, b,
                                  num_examples=n_train, mesh=mesh)
  if n_train < big_b:
    raise ValueError(f"The training split has {n_train} examples, fewer than "
                     f"one presample batch B = {big_b}; lower batch_size or "
                     "presample.")
  jis_state = sampler.init(state, jis_key)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("%s from %s: %d train / %d test examples; model %s with %d "
               "parameters; b=%d, B=%d.", dataset.name, dataset.source, n_train,
               len(dataset.test["label"]), config.model.name, n_params, b, big_b)

  n_dev = 1 if mesh is None else mesh.size
  if mesh is not None:
    spec = jax.sharding.PartitionSpec
    replicated = jax.sharding.NamedSharding(mesh, spec())
    data_sharding = jax.sharding.NamedSharding(mesh, spec("data"))
    # Streamed chunks [k, B, ...]: split the batch axis over the devices.
    stream_sharding = (jax.sharding.NamedSharding(mesh, spec(None, "data"))
                       if big_b % n_dev == 0 else replicated)
  else:
    replicated = data_sharding = stream_sharding = (
        jax.sharding.SingleDeviceSharding(device))

  def shard_batch(batch):
    if mesh is None or big_b % n_dev:
      return batch
    return jax.lax.with_sharding_constraint(batch, data_sharding)

  on_device = bool(config.data_on_device)
  perm_fn = jax.jit(input_pipeline.epoch_permutation, static_argnums=2)

  def new_loop(jis_state, epoch, offset):
    perm = (perm_fn(data_key, epoch, n_train).astype(jnp.int32) if on_device
            else jnp.zeros((0,), jnp.int32))
    return Loop(jis=jis_state, epoch=jnp.asarray(epoch, jnp.int32),
                offset=jnp.asarray(offset, jnp.int32), perm=perm,
                first_bad_step=jnp.asarray(_NO_BAD_STEP, jnp.int32))

  # ---- resume ----
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      config.keep_checkpoints)
  start_step, train_seconds, epoch, offset = 0, 0.0, 0, 0
  latest = ckpt.latest_step()
  if latest is not None:
    # jis_state carries this run's shardings: orbax restores onto them, on
    # any number of processes and devices.
    template = {"jis": jis_state, "data": {"epoch": np.int32(0),
                                           "offset": np.int32(0)}}
    restored, meta = ckpt.restore(latest, template)
    jis_state = restored["jis"]
    epoch, offset = int(restored["data"]["epoch"]), int(restored["data"]["offset"])
    start_step, train_seconds = int(jis_state.step), float(meta["train_seconds"])
    logging.info("Resumed from %s at step %d (data epoch %d, offset %d, "
                 "%.1f s of training).", workdir, start_step, epoch, offset,
                 train_seconds)
  writer = MetricWriter(os.path.join(workdir, "metrics.jsonl"), is_main,
                        keep_until_step=start_step if latest is not None else None)

  loop = jax.device_put(new_loop(jis_state, epoch, offset), replicated)
  train_data = (jax.device_put(dataset.train, replicated) if on_device else None)
  prep_params = jax.device_put(prep_params, replicated)
  keys = {"data": data_key, "aug": aug_key}

  # ---- the jitted programs ----
  k_steps = max(1, int(config.steps_per_dispatch))

  unroll = bool(config.get("scan_unroll", False))

  def run_steps(loop: Loop, batches, train_data, prep_params, keys, *,
                num_steps: int):
    """``num_steps`` steps in one program; the metrics averaged over them.

    ``num_steps`` is static: a run dispatches chunks of ``k_steps`` and, when
    its step budget is not a multiple of ``k_steps``, one shorter chunk at
    the end (a second program, compiled up front). No step is wrapped in a
    conditional: a ``lax.cond`` returning the ``Loop`` would copy every state
    buffer on every step (docs/performance_notes.md).
    """

    def one(loop, host_batch):
      step = loop.jis.step
      if on_device:
        epoch, start = input_pipeline.advance(loop.epoch, loop.offset, n_train,
                                              big_b)
        perm = jax.lax.cond(
            epoch != loop.epoch,
            lambda: input_pipeline.epoch_permutation(
                keys["data"], epoch, n_train).astype(jnp.int32),
            lambda: loop.perm)
        idx = jax.lax.dynamic_slice_in_dim(perm, start, big_b)
        batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), train_data)
        batch["index"] = idx   # dataset indices, for jis.stale_scores
        loop = loop.replace(epoch=epoch, offset=start + big_b, perm=perm)
      else:
        batch = host_batch
      batch = preprocess(batch, prep_params,
                         jax.random.fold_in(keys["aug"], step), True)
      new_jis, metrics = sampler.step(loop.jis, shard_batch(batch))
      bad = ~jnp.isfinite(metrics["train/loss"])
      first_bad = jnp.where(bad & (loop.first_bad_step == _NO_BAD_STEP), step,
                            loop.first_bad_step)
      metrics = jax.tree.map(lambda m: m.astype(jnp.float32), metrics)
      return loop.replace(jis=new_jis, first_bad_step=first_bad), metrics

    if batches is not None:   # a streamed chunk of k_steps batches
      batches = jax.tree.map(lambda x: x[:num_steps], batches)
    if num_steps == 1:   # no loop at all
      return one(loop, None if batches is None else
                 jax.tree.map(lambda x: x[0], batches))
    loop, metrics = jax.lax.scan(one, loop, batches, length=num_steps,
                                 unroll=unroll)
    return loop, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

  eval_bs = max(n_dev, int(config.eval_batch_size) // n_dev * n_dev)

  def eval_sums(inner, batch, mask, prep_params):
    batch = preprocess(batch, prep_params, None, False)
    if mesh is not None:
      batch = jax.lax.with_sharding_constraint(batch, data_sharding)
    logits = logits_fn(inner, batch).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             batch["label"])
    correct = jnp.argmax(logits, -1) == batch["label"]
    return jnp.stack([jnp.sum(jnp.where(mask, losses, 0.0)),
                      jnp.sum(mask & correct), jnp.sum(mask)]).astype(jnp.float32)

  def eval_split_device(inner, splits, prep_params, which, n):
    """Split ``which`` (0 test, 1 train) in chunks of ``eval_bs``, in one
    program that serves both splits (``which`` and ``n`` are traced)."""
    def body(i, sums):
      idx = i * eval_bs + jnp.arange(eval_bs)
      mask = idx < n
      idx = jnp.minimum(idx, n - 1)
      take = lambda split: jax.tree.map(lambda x: jnp.take(x, idx, axis=0),
                                        split)
      batch = jax.lax.cond(which == 0, lambda: take(splits["test"]),
                           lambda: take(splits["train"]))
      return sums + eval_sums(inner, batch, mask, prep_params)
    return jax.lax.fori_loop(0, (n + eval_bs - 1) // eval_bs, body,
                             jnp.zeros((3,), jnp.float32))

  eval_device_fn = jax.jit(eval_split_device)
  eval_host_fn = jax.jit(eval_sums)
  n_eval_train = min(n_train, config.eval_train_examples or n_train)
  eval_splits = {
      "test": dataset.test,
      "train": {k: v[:n_eval_train] for k, v in dataset.train.items()},
  }
  if on_device:
    # The training split is already on the device: evaluate its first
    # n_eval_train examples in place.
    eval_splits = {"test": jax.device_put(dataset.test, replicated),
                   "train": train_data}

  def evaluate(inner) -> Dict[str, float]:
    out = {}
    sizes = {"test": len(dataset.test["label"]), "train": n_eval_train}
    for which, name in enumerate(("test", "train")):
      n = sizes[name]
      if on_device:
        sums = eval_device_fn(inner, eval_splits, prep_params, np.int32(which),
                              np.int32(n))
      else:
        split = eval_splits[name]
        sums = 0.0
        for start in range(0, n, eval_bs):
          idx = np.minimum(np.arange(start, start + eval_bs), n - 1)
          mask = np.arange(start, start + eval_bs) < n
          batch = {k: v[idx] for k, v in split.items()}
          sums = sums + eval_host_fn(inner, batch, mask, prep_params)
      loss, correct, count = np.asarray(jax.device_get(sums), np.float64)
      out[f"eval/{name}_loss"] = loss / count
      out[f"eval/{name}_accuracy"] = correct / count
    return out

  stream = None
  if not on_device:
    stream = input_pipeline.HostStream(
        dataset.train, data_key, big_b, k_steps, epoch=epoch, offset=offset,
        rows=_process_rows(stream_sharding, big_b))

  def next_batches():
    if stream is None:
      return None, None
    batches, positions = stream.next()
    if jax.process_count() > 1:   # this process's rows -> the global chunk
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(
              stream_sharding, x, (x.shape[0], big_b) + x.shape[2:]),
          batches), positions
    return jax.device_put(batches, stream_sharding), positions

  # ---- budgets ----
  steps_per_epoch = n_train / b
  stop_step = _NO_BAD_STEP
  if config.num_steps > 0:
    stop_step = min(stop_step, int(config.num_steps))
  if config.num_epochs > 0:
    stop_step = min(stop_step, int(math.ceil(config.num_epochs * steps_per_epoch)))

  # Compile before the clock starts (the first dispatch would otherwise count
  # compilation as training time): the k_steps program and, when the step
  # budget leaves a remainder, the one for the last, shorter chunk.
  t_compile = time.perf_counter()
  probe_batches = (None if on_device else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((k_steps, big_b) + x.shape[1:], x.dtype,
                                     sharding=stream_sharding),
      {**dataset.train, "index": np.zeros((1,), np.int32)}))
  chunk_sizes = {k_steps}
  if stop_step != _NO_BAD_STEP and stop_step > start_step:
    chunk_sizes.add((stop_step - start_step) % k_steps or k_steps)
  chunk_fns = {
      n: jax.jit(functools.partial(run_steps, num_steps=n), donate_argnums=0)
      .lower(loop, probe_batches, train_data, prep_params, keys).compile()
      for n in sorted(chunk_sizes)}
  logging.info("Compiled the training program%s in %.1f s.",
               "s" if len(chunk_fns) > 1 else "",
               time.perf_counter() - t_compile)
  if (jax.default_backend() == "cpu" and k_steps > 1 and
      _convolution_in_a_loop(chunk_fns[k_steps].as_text())):
    logging.warning(
        "XLA:CPU runs convolutions several times slower inside a loop body "
        "(jax-ml/jax#12868; ~20x measured on the MNIST CNN), and this program "
        "loops over steps_per_dispatch=%d steps: on a CPU pass "
        "--config.steps_per_dispatch=1 (no loop) or --config.scan_unroll=True.",
        k_steps)

  # ---- cadences ----
  seconds_budget = float(config.train_seconds or 0.0)

  def crossed(prev: int, cur: int, every_steps: float) -> bool:
    return every_steps > 0 and math.floor(cur / every_steps) > math.floor(
        prev / every_steps)

  eval_every_steps = max(config.eval_every_steps,
                         config.eval_every_epochs * steps_per_epoch)
  clock = _Clock(train_seconds)
  next_eval_seconds = (config.eval_every_seconds *
                       (math.floor(train_seconds / config.eval_every_seconds) + 1)
                       if config.eval_every_seconds > 0 else math.inf)
  next_ckpt_seconds = (time.perf_counter() + config.checkpoint_every_seconds
                       if config.checkpoint_every_seconds > 0 else math.inf)

  def record_base(step):
    return {"step": step, "epoch": step / steps_per_epoch,
            "train_seconds": clock.read()}

  def check_finite(loop):
    bad = int(jax.device_get(loop.first_bad_step))
    if bad != _NO_BAD_STEP:
      raise FloatingPointError(
          f"Training diverged: the loss became NaN or infinite at step {bad} "
          f"(workdir {workdir}). Lower --config.learning_rate, set "
          "--config.grad_clip_norm, or add smoothing to the scores "
          "(--config.sampler.smooth), then rerun: the run resumes from the "
          "last checkpoint before it, in "
          f"{os.path.join(workdir, 'checkpoints')} (or start a new workdir).")

  host_position = (epoch, offset)

  def save_checkpoint(loop, step):
    check_finite(loop)
    if ckpt.latest_step() == step:
      return   # e.g. a resumed run that had nothing left to do
    if on_device:
      position = {"epoch": loop.epoch, "offset": loop.offset}
    else:
      position = {"epoch": np.int32(host_position[0]),
                  "offset": np.int32(host_position[1])}
    ckpt.save(step, {"jis": loop.jis, "data": position},
              {"step": step, "train_seconds": clock.read(),
               "epoch": step / steps_per_epoch, "presample_size": big_b,
               "batch_size": b, "train_examples": n_train})

  def eval_and_log(loop, step):
    check_finite(loop)
    t0 = time.perf_counter()
    metrics = evaluate(loop.jis.inner)
    record = {**record_base(step), **metrics,
              "eval_seconds": time.perf_counter() - t0}
    writer.write(record)
    logging.info("step %d (%.2f epochs, %.1f s): test loss %.4f, accuracy "
                 "%.4f; train loss %.4f, accuracy %.4f.", step,
                 record["epoch"], record["train_seconds"],
                 metrics["eval/test_loss"], metrics["eval/test_accuracy"],
                 metrics["eval/train_loss"], metrics["eval/train_accuracy"])
    return metrics

  total = stop_step if stop_step != _NO_BAD_STEP else None
  bar = tqdm.tqdm(total=total, initial=start_step, unit="step",
                  disable=not (config.progress_bar and is_main),
                  dynamic_ncols=True, mininterval=0.5)
  step, last_metrics, pending = start_step, None, None
  last_eval = {}
  lr_fn = learning_rate_fn(config)
  preemption = _Preemption()
  preemption.install()
  try:
    if start_step == 0 and config.get("eval_at_start", True):
      last_eval = eval_and_log(loop, 0)   # curves start at t = 0
    clock.start()
    while step < stop_step and not (seconds_budget and
                                    clock.read() >= seconds_budget):
      batches, positions = next_batches()
      n = min(k_steps, stop_step - step)
      loop, metrics = chunk_fns[n](loop, batches, train_data, prep_params, keys)
      if pending is not None:
        jax.block_until_ready(pending)   # keep one chunk in flight, no more
      pending = metrics
      prev, step = step, step + n
      if positions is not None:
        host_position = positions[step - prev - 1]
      last_metrics = metrics
      bar.update(step - prev)

      # SIGTERM: log this step, then leave the loop to save and stop.
      preempted = preemption.requested and step < stop_step
      done = preempted or step >= stop_step or (seconds_budget and
                                                clock.read() >= seconds_budget)
      log_now = crossed(prev, step, config.log_every_steps) or done
      eval_now = (crossed(prev, step, eval_every_steps)
                  or clock.read() >= next_eval_seconds)
      ckpt_now = (crossed(prev, step, config.checkpoint_every_steps)
                  or time.perf_counter() >= next_ckpt_seconds)
      if not (log_now or eval_now or ckpt_now):
        continue
      jax.block_until_ready(loop)
      clock.stop()
      if log_now:
        check_finite(loop)
        values = jax.device_get(last_metrics)
        record = {**record_base(step), **values,
                  "learning_rate": float(lr_fn(step))}
        writer.write(record)
        bar.set_postfix({"loss": f"{values['train/loss']:.4f}",
                         "acc": f"{values['train/accuracy']:.3f}",
                         "tau": f"{values['is/tau']:.2f}",
                         "IS": f"{values['is/active']:.2f}",
                         "s": f"{clock.read():.0f}"}, refresh=False)
      if eval_now and not done:
        last_eval = eval_and_log(loop, step)
        while next_eval_seconds <= clock.read():
          next_eval_seconds += config.eval_every_seconds
      if ckpt_now and not done:
        save_checkpoint(loop, step)
        next_ckpt_seconds = time.perf_counter() + (
            config.checkpoint_every_seconds or math.inf)
      if preempted:
        break
      clock.start()
    clock.stop()
    jax.block_until_ready(loop)
    preempted = preemption.requested and step < stop_step
    if preempted:
      # No evaluation: the grace period before SIGKILL is short.
      save_checkpoint(loop, step)
      logging.warning("Preempted at step %d: checkpoint saved in %s; run the "
                      "same command again to resume.", step, workdir)
    elif step > start_step or latest is None:
      last_eval = eval_and_log(loop, step)
      save_checkpoint(loop, step)
    else:
      logging.info("%s already holds a run to its budget (step %d); raise a "
                   "budget to train further.", workdir, step)
  finally:
    preemption.restore()
    bar.close()
    if stream is not None:
      stream.close()
    ckpt.close()
  return Result(state=loop.jis, step=step, train_seconds=clock.read(),
                eval=last_eval, preempted=preempted)
