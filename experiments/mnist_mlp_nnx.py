r"""Uniform vs importance sampling on the same MNIST MLP, written in Flax NNX.

    python experiments/mnist_mlp_nnx.py --data_dir ../shared/data --epochs 3

The NNX twin of ``experiments/mnist_mlp.py`` (same flags, data, network,
optimizer and table): Flax's tutorial step, which updates the model and
optimizer in place, plus per-example ``weights``. The two runs differ in one
line::

    sampler = jis.nnx.ImportanceSampler(train_step, logits_fn, batch_size=128,
        presample=1.0, score="uniform", rngs=rngs)                 # uniform
    sampler = jis.nnx.ImportanceSampler(train_step, logits_fn, batch_size=128,
        presample=3.0, rngs=rngs)                                  # importance

and the loop calls ``sampler(model, optimizer, rngs, presample)`` where it
called ``train_step(model, optimizer, rngs, batch)``. The loop is Flax's
performance-guide one: ``nnx.split`` once, a ``jax.jit`` step with the state
donated that merges, steps and returns ``nnx.state``. See docs/nnx.md.

With ``--epochs 1``, seeds 0, 1, 2, on a shared 2-core CPU (2026-12-02), it
reached train loss 0.094–0.106 uniform and 0.070–0.075 with importance
sampling, test accuracy 96.23–96.77% and 97.15–97.29%; ``mnist_mlp.py`` on
the same seeds: 0.095–0.105 and 0.070–0.081, 96.31–96.65% and 96.94–97.18%.
"""

import time

from absl import app
from flax import nnx
import jax
import jax.numpy as jnp
import optax

import jis
import jis.nnx
# The flags (--data_dir, --epochs, --batch_size, --presample, --seed,
# --train_examples) and the data are the Linen script's, so the two cannot
# drift apart.
from experiments.mnist_mlp import FLAGS
from experiments.mnist_mlp import load_mnist


class MLP(nnx.Module):
  """Dense 512 relu, Dropout 0.2, Dense 512 relu, Dropout 0.2, Dense 10."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.hidden = nnx.List([nnx.Linear(784, 512, rngs=rngs),
                            nnx.Linear(512, 512, rngs=rngs)])
    self.dropout = nnx.Dropout(0.2)
    self.out = nnx.Linear(512, 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs = None):
    for layer in self.hidden:
      x = self.dropout(nnx.relu(layer(x)), rngs=rngs)
    return self.out(x)


def train_step(model, optimizer, rngs, batch, weights):
  """Flax's NNX tutorial step, plus per-example loss weights."""
  def loss_fn(model, batch, rngs):
    logits = model(batch["image"], rngs)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    return jnp.mean(weights * losses), logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
      model, batch, rngs)
  optimizer.update(model, grads)
  # "is/logits" (optional; jis removes it from the metrics) hands a score
  # table (jis.stale_scores) the trained examples' scores without another
  # forward pass. The default sampler here does not use it; it costs nothing.
  return {"loss": loss, jis.LOGITS_KEY: logits}


def logits_fn(model, batch):
  """The forward pass in inference mode (no dropout): scores examples."""
  return nnx.view(model, deterministic=True)(batch["image"])


@nnx.jit
def evaluate(model, data):
  """Mean loss and accuracy over a whole split, in inference mode."""
  def chunk(batch):
    logits = logits_fn(model, batch)
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"])
    return jnp.sum(losses), jnp.sum(jnp.argmax(logits, -1) == batch["label"])
  n = data["label"].shape[0]
  size = next(s for s in (1000, 500, 250, 100, 50, 10, 1) if n % s == 0)
  chunks = jax.tree.map(lambda x: x.reshape((n // size, size) + x.shape[1:]),
                        data)
  losses, correct = jax.lax.map(chunk, chunks)
  return jnp.sum(losses) / n, jnp.sum(correct) / n


def run(name, make_sampler, presample_size, train, test, epochs, seed):
  """Trains from the seed's initialization; prints one line per epoch."""
  n = train["label"].shape[0]
  init_key, dropout_key, jis_key, data_key = jax.random.split(
      jax.random.key(seed), 4)
  model = MLP(rngs=nnx.Rngs(init_key))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  rngs = nnx.Rngs(dropout=dropout_key)
  sampler = make_sampler(nnx.Rngs(jis=jis_key))
  objects = (sampler, model, optimizer, rngs)
  graphdef, state = nnx.split(objects)

  def step(state, data, order, position):
    # The presample as indices into the split on the device: the step
    # gathers only the rows it uses (b on a uniform step, not all B).
    sampler, *objects = nnx.merge(graphdef, state)
    indices = jax.lax.dynamic_slice_in_dim(order, position, presample_size)
    metrics = sampler(*objects, jis.Indexed(data, indices))
    return nnx.state((sampler, *objects)), metrics
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
    nnx.update(objects, state)   # the model now holds the state's arrays
    train_loss, _ = evaluate(model, train)
    _, test_accuracy = evaluate(model, test)
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
        f"test examples; {jax.devices()[0].device_kind}; Flax NNX.")

  # The one-line change: the same train step, sampled uniformly or by importance.
  uniform = lambda rngs: jis.nnx.ImportanceSampler(
      train_step, logits_fn, batch_size=b, presample=1.0, score="uniform",
      rngs=rngs)
  importance = lambda rngs: jis.nnx.ImportanceSampler(
      train_step, logits_fn, batch_size=b, presample=FLAGS.presample,
      rngs=rngs)

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
