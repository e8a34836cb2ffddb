r"""Uniform vs importance sampling on the same MNIST MLP: the one-line change.

    python experiments/mnist_mlp.py --data_dir ../shared/data --epochs 3

Trains the Keras MNIST MLP (Dense 512 relu, Dropout 0.2, Dense 512 relu,
Dropout 0.2, Dense 10; adam; b = 128) twice from the same initialization,
once with uniform batches and once with jis importance sampling, and prints for
each epoch the training time, the loss on the whole training set (inference
mode) and the test accuracy. The two runs differ in one line::

    sampler = jis.importance_step(train_step, logits_fn, batch_size=128,
                                  presample=1.0, score="uniform")  # uniform
    sampler = jis.importance_step(train_step, logits_fn, batch_size=128,
                                  presample=3.0)                   # importance

An epoch is 60000 / 128 updates for both; importance sampling reads three
examples for each one it trains on. The split lives on the device and each
step gets its presample as ``jis.Indexed(split, indices)``, so a step
gathers only the rows it uses. MNIST is read from ``<data_dir>/mnist/``
(the four original IDX ``.gz`` files); ``--data_dir`` defaults to the
environment variable JIS_DATA_DIR. For configs, checkpoints, logs and plots,
see ``python -m experiments.main`` (docs/experiments.md).
"""

import os
import time

from absl import app
from absl import flags
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

import jis
from experiments import input_pipeline

flags.DEFINE_string("data_dir", os.environ.get("JIS_DATA_DIR"),
                    "Root holding mnist/ with the four IDX .gz files "
                    "(default: env JIS_DATA_DIR).")
flags.DEFINE_integer("epochs", 3, "Epochs of updates (60000 / batch_size "
                     "steps each).")
flags.DEFINE_integer("batch_size", 128, "b: examples per update.")
flags.DEFINE_float("presample", 3.0, "B / b for importance sampling.")
flags.DEFINE_integer("seed", 0, "Seed of the initialization and the data order.")
flags.DEFINE_integer("train_examples", 0, "Use only the first n training "
                     "examples (0: all); for quick checks.")
FLAGS = flags.FLAGS


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = x.reshape((x.shape[0], -1))
    for _ in range(2):
      x = nn.relu(nn.Dense(512)(x))
      x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(10)(x)


class TrainState(train_state.TrainState):
  dropout_key: jax.Array = None


def train_step(state, batch, weights):
  """An ordinary flax step, plus per-example loss weights."""
  dropout_key = jax.random.fold_in(state.dropout_key, state.step)

  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["image"], train=True,
                            rngs={"dropout": dropout_key})
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    return jnp.mean(weights * losses), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  # "is/logits" (optional; jis removes it from the metrics) hands a score
  # table (jis.stale_scores) the trained examples' scores without another
  # forward pass. The default sampler here does not use it; it costs nothing.
  return state.apply_gradients(grads=grads), {"loss": loss, "is/logits": logits}


def logits_fn(state, batch):
  """The forward pass in inference mode (no dropout): scores examples."""
  return state.apply_fn({"params": state.params}, batch["image"], train=False)


def load_mnist(data_dir):
  folder = os.path.join(data_dir or "", "mnist")
  names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
           "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
  if not data_dir or not all(os.path.exists(os.path.join(folder, n))
                             for n in names):
    raise FileNotFoundError(
        f"MNIST not found in {folder!r}. Put {', '.join(names)} in "
        "<data_dir>/mnist/ and pass --data_dir <data_dir> (or set "
        "JIS_DATA_DIR).")
  x_train, y_train, x_test, y_test = (
      input_pipeline.read_idx(os.path.join(folder, n)) for n in names)
  to_float = lambda x: jnp.asarray(x.reshape(len(x), -1), jnp.float32) / 255.0
  return ({"image": to_float(x_train), "label": jnp.asarray(y_train, jnp.int32)},
          {"image": to_float(x_test), "label": jnp.asarray(y_test, jnp.int32)})


@jax.jit
def evaluate(state, data):
  """Mean loss and accuracy over a whole split, in inference mode."""
  def chunk(batch):
    logits = logits_fn(state, batch)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == batch["label"])
  n = data["label"].shape[0]
  size = next(s for s in (1000, 500, 250, 100, 50, 10, 1) if n % s == 0)
  chunks = jax.tree.map(lambda x: x.reshape((n // size, size) + x.shape[1:]),
                        data)
  losses, correct = jax.lax.map(chunk, chunks)
  return jnp.sum(losses) / n, jnp.sum(correct) / n


def run(name, sampler, presample_size, train, test, epochs, seed):
  """Trains from the seed's initialization; prints one line per epoch."""
  n = train["label"].shape[0]
  model = MLP()
  init_key, dropout_key, jis_key, data_key = jax.random.split(
      jax.random.key(seed), 4)
  params = model.init(init_key, train["image"][:1], train=False)["params"]
  state = sampler.init(
      TrainState.create(apply_fn=model.apply, params=params,
                        tx=optax.adam(1e-3), dropout_key=dropout_key),
      jis_key)

  def step(state, data, order, position):
    # The presample as indices into the split on the device: the step
    # gathers only the rows it uses (b on a uniform step, not all B).
    indices = jax.lax.dynamic_slice_in_dim(order, position, presample_size)
    return sampler.step(state, jis.Indexed(data, indices))
  # Compiled before the clock starts, so epoch 1's time is training only.
  step = jax.jit(step, donate_argnums=0).lower(
      state, train, jnp.zeros((n,), jnp.int32), 0).compile()

  def data_order(data_epoch):
    key = jax.random.fold_in(data_key, data_epoch)
    return jax.random.permutation(key, n).astype(jnp.int32)

  steps_per_epoch = n // FLAGS.batch_size
  order, position, data_epoch = data_order(0), 0, 0
  history = []
  for epoch in range(1, epochs + 1):
    start = time.perf_counter()
    active = 0.0
    for _ in range(steps_per_epoch):
      if position + presample_size > n:  # a new pass over the data
        data_epoch += 1
        order, position = data_order(data_epoch), 0
      state, metrics = step(state, train, order, position)
      position += presample_size
      active += metrics["is/active"]
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    train_loss, _ = evaluate(state.inner, train)
    _, test_accuracy = evaluate(state.inner, test)
    history.append((seconds, float(train_loss), float(test_accuracy)))
    print(f"{name:>10}  epoch {epoch}: {seconds:6.1f} s, train loss "
          f"{float(train_loss):.4f}, test accuracy {100 * float(test_accuracy):.2f}%"
          f", importance sampling on {100 * float(active) / steps_per_epoch:.0f}%"
          " of steps", flush=True)
  return history


def main(argv):
  del argv
  train, test = load_mnist(FLAGS.data_dir)
  if FLAGS.train_examples:
    train = jax.tree.map(lambda x: x[:FLAGS.train_examples], train)
  b = FLAGS.batch_size
  print(f"MNIST: {train['label'].shape[0]} train, {test['label'].shape[0]} "
        f"test examples; {jax.devices()[0].device_kind}.")

  # The one-line change: the same train step, sampled uniformly or by importance.
  uniform = jis.importance_step(train_step, logits_fn, batch_size=b,
                                presample=1.0, score="uniform")
  importance = jis.importance_step(train_step, logits_fn, batch_size=b,
                                   presample=FLAGS.presample)

  results = {
      "uniform": run("uniform", uniform, b, train, test, FLAGS.epochs,
                     FLAGS.seed),
      "importance": run("importance", importance,
                        int(round(FLAGS.presample * b)), train, test,
                        FLAGS.epochs, FLAGS.seed),
  }
  print("\n| sampling | time (s) | train loss | test accuracy |")
  print("| --- | ---: | ---: | ---: |")
  for name, history in results.items():
    total = sum(h[0] for h in history)
    print(f"| {name} | {total:.1f} | {history[-1][1]:.4f} | "
          f"{100 * history[-1][2]:.2f}% |")


if __name__ == "__main__":
  app.run(main)
