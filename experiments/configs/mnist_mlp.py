r"""MNIST MLP (512-512, dropout 0.2, adam, b = 128): uniform vs importance sampling.

The Keras ``mnist_mlp`` example that the original library compared on (Dense
512 relu, Dropout 0.2, Dense 512 relu, Dropout 0.2, Dense 10; adam 1e-3), with
upper-bound importance sampling at presample 3 (B = 384).

Launch (offline data in ../shared/data; online, drop the data_dir flag):

  python -m experiments.main --config experiments/configs/mnist_mlp.py \
      --workdir runs/mnist_mlp_is --config.dataset.data_dir=../shared/data
  python -m experiments.main --config experiments/configs/mnist_mlp.py \
      --workdir runs/mnist_mlp_uniform --config.dataset.data_dir=../shared/data \
      --config.sampler.score=uniform
  python -m experiments.compare runs/mnist_mlp_uniform runs/mnist_mlp_is \
      --out mnist_mlp.png

Expected: about 98.3-98.6% test accuracy for both within the 60 s. Importance
sampling reaches a lower training loss per epoch; per second it leads or trails
by run (one IS step costs ~1.8 uniform steps on this CPU, and its loss spikes
near zero with adam). Measured on 2 cores of an Intel Xeon (CPU, jax 0.10.2,
2026-11-22, one run each), at matched training time (``experiments.compare``):

  | budget | uniform: epochs, train loss, test error | IS: epochs, train loss, test error |
  | 15 s   | 6.0, 0.0196, 1.94%                      | 3.2, 0.0109, 1.77%                 |
  | 30 s   | 15.5, 0.0036, 1.63%                     | 8.2, 0.0061, 1.65%                 |
  | 45 s   | 24.8, 0.0043, 1.70%                     | 13.6, 0.0004, 1.40%                |
  | 60 s   | 37.1, 0.0012, 1.47%                     | 18.2, 0.0027, 1.73%                |

The seeded comparison over 3 seeds is
``python -m experiments.benchmarks.convergence --models=mlp`` (README,
Results). On a GPU the same 60 s hold hundreds of epochs.
"""

from experiments.configs import common


def get_config(variant: str = ""):
  c = common.base()
  c.dataset.name = "mnist"
  c.model = dict(name="mlp", features=(512, 512), dropout_rate=0.2)
  c.optimizer, c.learning_rate = "adam", 1e-3
  c.batch_size = 128
  # Equal wall-clock budgets, as the paper compares: 60 s of training each
  # (evaluation excluded). The Keras example's 10 epochs instead:
  # --config.train_seconds=0 --config.num_epochs=10.
  c.train_seconds = 60.0
  c.eval_every_seconds = 5.0
  c.eval_every_epochs = 0.0
  c.log_every_steps = 50

  def runlocal(c):
    c.model.features = (64, 64)
    c.batch_size = 32
  return common.apply_variant(c, variant, runlocal)
