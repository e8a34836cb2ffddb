"""The experiment models: shapes, WRN-28-2's structure, BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models


def shapes(model, x):
  return jax.eval_shape(lambda k: model.init(k, x, train=False),
                        jax.random.PRNGKey(0))


def test_wrn_28_2_structure():
  variables = shapes(models.WideResNet(depth=28, width=2, num_classes=10),
                     jnp.zeros((2, 32, 32, 3)))
  kernels = [x.shape for p, x in jax.tree_util.tree_leaves_with_path(
      variables["params"]) if "kernel" in jax.tree_util.keystr(p)]
  convs3 = [s for s in kernels if s[:2] == (3, 3)]
  convs1 = [s for s in kernels if s[:2] == (1, 1)]
  # 1 stem conv + 3 groups x 4 blocks x 2 convs; 1x1 shortcuts where the
  # width changes (16 -> 32, 32 -> 64, 64 -> 128).
  assert len(convs3) == 25 and len(convs1) == 3
  assert sorted({s[-1] for s in convs3}) == [16, 32, 64, 128]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      variables["params"]))
  assert 1.4e6 < n_params < 1.55e6         # WRN-28-2: about 1.5M parameters
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * 25


def test_batchnorm_train_mode_updates_stats_and_inference_uses_them():
  model = models.WideResNet(depth=10, width=1, num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3)) * 3 + 1
  with jax.threefry_partitionable(False):   # compiles faster on CPU
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
        jax.random.PRNGKey(0), x)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  _, updates = apply(variables, x, train=True, mutable=("batch_stats",))
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  # Inference mode is per example: a batch's logits do not depend on the
  # other examples in it.
  full = apply(variables, x, train=False)
  single = apply(variables, x[:1], train=False)
  np.testing.assert_allclose(full[:1], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kwargs,x,classes", [
    ("mlp", {"features": (8, 8), "dropout_rate": 0.2}, (3, 28, 28, 1), 10),
    ("cnn", {}, (3, 28, 28, 1), 10),
    ("lstm", {"hidden": 8}, (3, 20, 1), 10),
    ("fasttext", {"vocab_size": 50, "embed_dim": 4}, (3, 12), 2),
])
def test_models_map_inputs_to_logits(name, kwargs, x, classes):
  model = models.create(name, classes, **kwargs)
  inputs = (jnp.ones(x, jnp.int32) if name == "fasttext"
            else jnp.ones(x, jnp.float32))
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
        jax.random.PRNGKey(0), inputs)
  logits = jax.jit(lambda v, x: model.apply(
      v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)}))(
          variables, inputs)
  assert logits.shape == (3, classes)


def test_fasttext_ignores_padding():
  model = models.FastText(vocab_size=20, embed_dim=4, num_classes=2)
  tokens = jnp.array([[0, 0, 5, 7], [5, 7, 0, 0]])
  variables = model.init(jax.random.PRNGKey(0), tokens, train=False)
  logits = model.apply(variables, tokens, train=False)
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6)


def test_unknown_model_or_field():
  with pytest.raises(ValueError, match="Unknown model"):
    models.create("resnet", 10)
  with pytest.raises(ValueError, match="no field"):
    models.create("mlp", 10, widths=(3,))
