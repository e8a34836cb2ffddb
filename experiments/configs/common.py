"""Defaults shared by the experiment configs, and the hardware variants.

A config file's ``get_config(variant="")`` starts from :func:`base`, sets its
dataset, model and optimizer, then calls :func:`apply_variant`. Pick a variant
after a colon::

    --config experiments/configs/mnist_mlp.py            # the default (GPU)
    --config experiments/configs/mnist_mlp.py:tpu
    --config experiments/configs/mnist_mlp.py:runlocal   # a laptop, in seconds

Every field can be overridden: ``--config.sampler.score=uniform``.
"""

from typing import Callable, Optional

import ml_collections
from ml_collections import config_dict

VARIANTS = ("", "gpu", "tpu", "runlocal")


def sampler() -> ml_collections.ConfigDict:
  """The keyword options of ``jis.importance_step``, at its defaults.

  ``score="uniform"`` is the uniform baseline (B = b, no scoring pass).
  ``policy``, ``condition``, ``score_transforms``, ``score_table`` and
  ``budget`` name jis objects: ``--config.sampler.policy=selective_backprop``,
  ``--config.sampler.condition='warmup(100)'``; "" or None keeps jis's
  default.
  """
  return ml_collections.ConfigDict({
      # "" is jis's default: upper_bound (loss with a score_table); also
      # loss | gradient_norm | reducible_loss | uniform.
      "score": "",
      "presample": 3.0,              # B / b
      "loss": "softmax_cross_entropy",
      # None: jis's default, 1 + 2B/(3b) (eq. 29 with the scoring pass
      # counted twice); 0.0 always; inf never.
      "tau_threshold": config_dict.placeholder(float),
      "tau_momentum": config_dict.placeholder(float),   # None: 0.9
      # "" is jis's default, importance_sampling(k=0.5, max_weight=100.0)
      # (infobatch(0.5) with a score_table); e.g. importance_sampling() for
      # the unbiased estimator, top_k, selective_backprop.
      "policy": "",
      "condition": "",               # e.g. warmup(100), always
      "score_transforms": "",        # e.g. (power_smoothing(0.5),)
      # Stale scores and budgets (docs/strategies.md), e.g. stale_scores
      # (num_examples is filled in), constant_variance, constant_time.
      "score_table": "",
      "budget": "",
      # Data parallelism over the "data" mesh axis (docs/scaling.md):
      # "global" matches one device; "local" resamples within each device's
      # shard and moves no examples between devices.
      "resample": "global",
      # Score the presample in passes of this many examples (a multiple of
      # the device count dividing B); None: one pass.
      "forward_batch_size": config_dict.placeholder(int),
      # Not an importance_step option: "bfloat16" wraps logits_fn in
      # jis.low_precision (products in bfloat16, accumulated in float32);
      # "" scores in the model's own precision.
      "score_dtype": "",
  })


def base() -> ml_collections.ConfigDict:
  """Every field the training loop reads, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict({
      "name": "mnist",
      "source": "auto",        # auto (local files, else tfds) | local | tfds
      "data_dir": "",          # local root; "" reads env JIS_DATA_DIR
      "tfds_data_dir": "",     # "" is tfds's default (~/tensorflow_datasets)
      "train_examples": 0,     # 0: all; else the first n (runlocal)
      "test_examples": 0,
      # A share of the training labels redrawn uniformly over the classes
      # (fixed seed; test labels stay clean): a check on noisy data.
      "label_noise": 0.0,
  })
  c.input = ml_collections.ConfigDict({
      "normalize": "scale",    # scale (x/255) | standardize | zca (images)
      "zca_epsilon": 0.1,
      "augment": False,        # random translations and flips (images)
      "crop_padding": 4,
      "flip": True,
  })
  c.model = ml_collections.ConfigDict({"name": "mlp"})

  c.optimizer = "adam"         # adam | sgd | rmsprop | adadelta
  c.learning_rate = 1e-3
  c.momentum = 0.9             # sgd only
  c.nesterov = False
  c.weight_decay = 0.0
  c.grad_clip_norm = 0.0
  c.lr_schedule = "constant"   # constant | piecewise | cosine (over num_steps)
  c.lr_boundaries = ()         # piecewise: steps where lr *= lr_decay_factor
  c.lr_decay_factor = 0.2

  c.batch_size = 128
  c.sampler = sampler()

  # Budgets: training stops at the first one reached (0 = unset).
  c.num_steps = 0
  c.num_epochs = 0.0           # epochs of updates: steps * batch_size / N
  c.train_seconds = 0.0        # training clock: evaluation etc. excluded

  c.log_every_steps = 100
  c.eval_every_steps = 0
  c.eval_every_epochs = 1.0
  c.eval_every_seconds = 0.0
  c.eval_at_start = True
  c.eval_batch_size = 1000
  c.eval_train_examples = 0    # 0: the whole training split
  c.checkpoint_every_steps = 0
  c.checkpoint_every_seconds = 600.0
  c.keep_checkpoints = 2

  c.data_on_device = True      # False streams batches from host memory
  # "infobatch" draws each data epoch from the score table, so pruned examples
  # are never loaded or trained on: streamed, with jis.infobatch_epoch on the
  # host; on the device, with jis.infobatch_order inside the program
  # (experiments/pruning.py, experiments/batches.py); the sampler is then
  # built for it.
  c.pruning = ml_collections.ConfigDict({
      "method": "",            # "" | infobatch
      "prune": 0.5,            # share of the below-mean examples dropped
      "anneal_fraction": 0.125,  # last share of the step budget: no pruning
  })
  c.steps_per_dispatch = 50    # steps per jitted lax.scan
  # True unrolls the dispatch's steps (no loop): conv nets on XLA:CPU run
  # ~20x slower inside a loop body (docs/performance_notes.md); costs compile
  # time. steps_per_dispatch=1 is the other way out.
  c.scan_unroll = False
  c.num_devices = 0            # 0: all local devices (data parallel)
  c.progress_bar = True
  return c


def apply_variant(c: ml_collections.ConfigDict, variant: Optional[str],
                  runlocal: Optional[Callable[[ml_collections.ConfigDict],
                                              None]] = None
                  ) -> ml_collections.ConfigDict:
  """Overrides a few fields for the hardware ``variant``.

  ``runlocal`` shrinks the run to seconds on a laptop CPU: a slice of the
  data, one device, a few dozen steps; a config passes its own ``runlocal``
  function to shrink its model too.
  """
  variant = variant or ""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; use one of "
                     f"{', '.join(v or '(none)' for v in VARIANTS)}.")
  if variant == "tpu":
    c.steps_per_dispatch = 100
    c.eval_batch_size = 2048
  elif variant == "runlocal":
    c.dataset.train_examples = 2048
    c.dataset.test_examples = 512
    c.num_steps = 40
    c.num_epochs = 0.0
    c.train_seconds = 0.0
    c.log_every_steps = 10
    c.eval_every_steps = 20
    c.eval_every_epochs = 0.0
    c.eval_every_seconds = 0.0
    c.eval_batch_size = 256
    c.checkpoint_every_steps = 20
    c.steps_per_dispatch = 10
    c.num_devices = 1
    if runlocal is not None:
      runlocal(c)
  return c
