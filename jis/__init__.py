"""jis: importance sampling for JAX/Flax training loops.

Score a uniform presample cheaply, train on a batch resampled towards
informative examples, and reweight so the gradient stays unbiased
(Katharopoulos & Fleuret 2018), all inside one jitted step.
"""

from jis._budget import Budget
from jis._budget import constant_time
from jis._budget import constant_variance
from jis._conditions import always
from jis._conditions import Condition
from jis._conditions import FAR_PROBE_EVERY
from jis._conditions import never
from jis._conditions import PROBE_EVERY
from jis._conditions import total_variation
from jis._conditions import warmup
from jis._conditions import when_total_variation
from jis._conditions import when_variance_reduced
from jis._epochs import infobatch_epoch
from jis._epochs import infobatch_order
from jis._epochs import kept_first_order
from jis._indexed import Indexed
from jis._indexed import presample_rows
from jis._losses import logit_grad_norm
from jis._losses import Loss
from jis._policies import importance_sampling
from jis._policies import importance_weights
from jis._policies import online_batch_selection
from jis._policies import Policy
from jis._policies import sample_categorical
from jis._policies import Selection
from jis._policies import top_k
from jis._policies import uniform
from jis._precision import low_precision
from jis._pruning import infobatch
from jis._schedule import presample_schedule
from jis._scores import Score
from jis._selective_backprop import selective_backprop
from jis._sharding import shard_presample
from jis._stale import ScoreTable
from jis._stale import stale_scores
from jis._step import importance_step
from jis._step import ImportanceState
from jis._step import ImportanceStep
from jis._step import LOGITS_KEY
from jis._transforms import adaptive_smoothing
from jis._transforms import additive_smoothing
from jis._transforms import power_smoothing
from jis._transforms import ScoreTransform
from jis._variance import default_tau_threshold
from jis._variance import tau_threshold
from jis._variance import variance_reduction

__version__ = "0.1.0"


def __getattr__(name):
  # jis.nnx (ImportanceSampler, SamplerState), the Flax NNX front end, loads on
  # first use, so that `import jis` needs no flax.
  if name == "nnx":
    import importlib
    return importlib.import_module("jis.nnx")
  raise AttributeError(f"module 'jis' has no attribute {name!r}")
