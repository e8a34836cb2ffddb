"""Bad input: every public factory and config field refuses misuse with an
error that names the argument and says what to do, and a run refused by the
experiments leaves no workdir behind (docs/reliability.md).

The core options of ``importance_step`` are also covered in test_step.py;
this file sweeps the rest of the public API and the experiments' config.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jis
import experiments_testing
from experiments_testing import tiny_config


def _train_step(p, batch, weights):
  return p, {"loss": jnp.mean(weights)}


def _logits(p, batch):
  return batch["x"] @ p


def _batch(n=12, **extra):
  return {"x": jnp.ones((n, 5)), "label": jnp.zeros((n,), jnp.int32), **extra}


def _sampler(**kwargs):
  return jis.importance_step(_train_step, _logits,
                             **{"batch_size": 4, "presample": 3.0,
                                "tau_threshold": 0.0, **kwargs})


def _run(sampler, batch, state=None):
  state = sampler.init(jnp.zeros((5, 3)), jax.random.key(0)) if state is None \
      else state
  return jax.jit(sampler.step)(state, batch)


FACTORY_ERRORS = [
    (lambda: jis.importance_step(_train_step, lambda s: s, batch_size=4),
     TypeError, r"logits_fn must accept \(state, batch\)"),
    (lambda: jis.importance_step(lambda s, b: s, _logits, batch_size=4),
     TypeError, r"train_step must accept \(state, batch, weights\)"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4.0),
     ValueError, "batch_size must be an int >= 1"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 presample=float("nan")),
     ValueError, "presample must be a finite number >= 1"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 presample=0), ValueError, "presample"),
    (lambda: jis.importance_step(_train_step, None, batch_size=4),
     ValueError, "logits_fn is required"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 policy="top_k"),
     TypeError, r"policy must be a jis.Policy \(e.g."),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 condition="always"),
     TypeError, r"condition must be a jis.Condition \(e.g."),
    (lambda: jis.importance_step(_train_step, None, batch_size=4,
                                 score_table=jis.stale_scores),
     TypeError, r"score_table must be a jis.ScoreTable \(jis.stale_scores\(N\)\); "
                "got function"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 budget=jis.constant_time),
     TypeError, r"budget must be a jis.Budget \(jis.constant_variance\(\) or"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 score_transforms="power"),
     TypeError, "score_transforms entries must be a jis.ScoreTransform"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 tau_threshold="high"),
     ValueError, r"threshold\) must be a number >= 0"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 forward_batch_size=5),
     ValueError, "forward_batch_size=5 must divide the presample size B=12"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 resample="foo"),
     ValueError, r"resample must be one of \['global', 'local'\]"),
    (lambda: jis.importance_step(_train_step, _logits, batch_size=4,
                                 score="entropy"),
     ValueError, "Unknown score='entropy'"),
    (lambda: jis.importance_sampling(max_weight=0.5), ValueError,
     r"importance_sampling\(max_weight\) must be a number >= 1"),
    (lambda: jis.importance_sampling(k=-1), ValueError,
     r"importance_sampling\(k\) must be a finite number >= 0"),
    (lambda: jis.stale_scores(-3), ValueError,
     r"stale_scores\(num_examples\) must be an int >= 1"),
    (lambda: jis.warmup(-1), ValueError, r"warmup\(steps\) must be an int >= 0"),
    (lambda: jis.power_smoothing(2.0), ValueError,
     r"power_smoothing\(p\) must be a number in \[0, 1\]"),
    (lambda: jis.additive_smoothing(-1.0), ValueError,
     r"additive_smoothing\(c\) must be a finite number >= 0"),
    (lambda: jis.selective_backprop(beta=-1), ValueError,
     r"selective_backprop\(beta\) must be"),
    (lambda: jis.online_batch_selection(pressure_start=0.5), ValueError,
     r"online_batch_selection\(pressure_start\) must be"),
    (lambda: jis.constant_variance(fractions=(2.0,)), ValueError,
     r"constant_variance\(fractions\)"),
    (lambda: jis.constant_time(buckets=0), ValueError,
     r"constant_time\(buckets\) must be an int >= 1"),
    (lambda: jis.when_variance_reduced(threshold=-1.0), ValueError,
     r"when_variance_reduced\(threshold\) must be a number >= 0"),
    (lambda: jis.tau_threshold(2, 4), ValueError,
     "tau_threshold needs 1 <= batch_size <= presample_size"),
    (lambda: jis.logit_grad_norm(jnp.ones((2, 3)), jnp.array([0, 1]), "hinge"),
     ValueError, "Unknown loss='hinge'. Use one of"),
    (lambda: jis.logit_grad_norm(jnp.ones((2, 3)), jnp.array([0, 1, 2]),
                                 "softmax_cross_entropy"),
     ValueError, r"needs integer labels of shape \(2,\)"),
    (lambda: jis.variance_reduction(jnp.ones((2, 3))), ValueError,
     r"variance_reduction\(scores\) needs one score per example"),
]


@pytest.mark.parametrize("make,error,match", FACTORY_ERRORS)
def test_public_factories_refuse_bad_arguments(make, error, match):
  with pytest.raises(error, match=match):
    make()


STEP_ERRORS = [
    (dict(), _batch(n=10), ValueError,
     r"leading dimension B = .* = 12; leaf batch\['label'\] has shape \(10,\)"),
    (dict(), {**_batch(), "t": jnp.float32(1.0)}, ValueError,
     r"leading dimension B = .* = 12; leaf batch\['t'\] has shape \(\)"),
    (dict(), {"x": jnp.ones((12, 5))}, ValueError,
     r"labels='label' but the batch has no such entry \(it has \['x'\]\)"),
    (dict(), _batch(label=jnp.zeros((12,))), ValueError,
     r"class indices must be integers. Cast them"),
    (dict(), _batch(label=jnp.zeros((12, 7), jnp.int32)), ValueError,
     r"integer labels of shape \(12,\) or one-hot/soft labels of shape "
     r"\(12, 3\)"),
    (dict(score=lambda logits, labels, batch: logits), _batch(), ValueError,
     r"returned shape \(12, 3\); it must return one score per example"),
    (dict(score="reducible_loss"), _batch(), ValueError, "irreducible_loss"),
    (dict(), {}, ValueError, "got a batch with no arrays"),
]


@pytest.mark.parametrize("kwargs,batch,error,match", STEP_ERRORS)
def test_step_refuses_bad_batches_at_trace_time(kwargs, batch, error, match):
  with pytest.raises(error, match=match):
    _run(_sampler(**kwargs), batch)


def test_step_refuses_a_state_it_did_not_make():
  with pytest.raises(TypeError, match="needs the ImportanceState made by "
                     "sampler.init"):
    _sampler().step(jnp.zeros((5, 3)), _batch())


def test_train_step_returning_the_wrong_things():
  bad_return = jis.importance_step(lambda p, batch, w: p, _logits, batch_size=4,
                                   tau_threshold=0.0)
  with pytest.raises(TypeError, match=r"must return \(train_state, metrics\)"):
    _run(bad_return, _batch())
  shape_change = jis.importance_step(
      lambda p, batch, w: (p[:2], {}), _logits, batch_size=4, tau_threshold=0.0)
  with pytest.raises(ValueError, match="changed a state leaf from float32"):
    _run(shape_change, _batch())
  own_prefix = jis.importance_step(
      lambda p, batch, w: (p, {"is/loss": jnp.mean(w)}), _logits, batch_size=4,
      tau_threshold=0.0)
  with pytest.raises(ValueError, match=r"starting with 'is/' are jis's; rename"):
    _run(own_prefix, _batch())


# ---------------------------------------------------------------- experiments


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
  return experiments_testing.write_fake_data(
      str(tmp_path_factory.mktemp("data")), n_train=40, n_test=16)


CONFIG_ERRORS = [
    (dict(batch_size=64), ValueError,
     r"has 40 examples, fewer than one presample batch B = 192; lower "
     r"batch_size or presample"),
    ({"sampler.presample": 0.5}, ValueError,
     "presample must be a finite number >= 1"),
    ({"sampler.policy": "no_such_policy"}, ValueError,
     "jis has no 'no_such_policy'"),
    ({"sampler.score": "entropy"}, ValueError, "Unknown score='entropy'"),
    (dict(optimizer="lamb"), ValueError, "config.optimizer must be one of"),
    (dict(lr_schedule="step"), ValueError,
     "config.lr_schedule must be constant, piecewise or cosine"),
    (dict(num_steps=0), ValueError, "Give a training budget"),
    ({"dataset.name": "cifar10", "dataset.source": "local",
      "dataset.data_dir": "/nonexistent"}, FileNotFoundError, "cifar"),
    ({"input.normalize": "whiten"}, ValueError,
     "config.input.normalize must be scale, standardize or zca"),
]


@pytest.mark.parametrize("overrides,error,match", CONFIG_ERRORS)
def test_bad_config_fails_before_writing_the_workdir(fake_data, tmp_path,
                                                     overrides, error, match):
  from experiments import train  # pylint: disable=g-import-not-at-top
  if overrides.get("input.normalize"):
    overrides = {**overrides, "dataset.name": "cifar10",
                 "model.name": "mlp"}
  workdir = tmp_path / "run"
  with pytest.raises(error, match=match):
    train.train_and_evaluate(tiny_config(fake_data, **overrides), str(workdir))
  assert not workdir.exists() or not os.listdir(workdir), os.listdir(workdir)


def test_labels_out_of_range_are_refused_before_training(tmp_path):
  from experiments import train  # pylint: disable=g-import-not-at-top
  root = experiments_testing.write_fake_data(str(tmp_path / "data"),
                                             n_train=40, n_test=16)
  rng = np.random.default_rng(0)
  experiments_testing.write_idx(
      os.path.join(root, "mnist", "train-labels-idx1-ubyte.gz"),
      rng.integers(0, 12, size=40).astype(np.uint8))   # 10 classes
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"train labels span \[0, 1[01]\] but "
                     r"the model has 10 classes"):
    train.train_and_evaluate(tiny_config(root), str(workdir))
  assert not workdir.exists()
