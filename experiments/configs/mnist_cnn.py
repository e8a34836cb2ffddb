r"""MNIST CNN (the Keras mnist_cnn: conv32-conv64-pool-dense128, adam, b = 128).

Conv 3x3 32 relu, conv 3x3 64 relu, max-pool 2, dropout 0.25, dense 128 relu,
dropout 0.5, dense 10; adam 1e-3; upper-bound importance sampling at presample
3 (B = 384). The original library plotted this one against seconds.

Launch (offline data in ../shared/data; online, drop the data_dir flag):

  python -m experiments.main --config experiments/configs/mnist_cnn.py \
      --workdir runs/mnist_cnn_is --config.dataset.data_dir=../shared/data
  python -m experiments.main --config experiments/configs/mnist_cnn.py \
      --workdir runs/mnist_cnn_uniform --config.dataset.data_dir=../shared/data \
      --config.sampler.score=uniform
  python -m experiments.compare runs/mnist_cnn_uniform runs/mnist_cnn_is \
      --out mnist_cnn.png

Expected: about 99.1-99.3% test accuracy after 10 epochs, importance sampling
lowering the training loss faster per epoch (the original library's examples
page: 99.00% uniform vs 99.27% with importance sampling after 12 epochs, with
Adadelta). On 2 CPU cores it runs at about 0.3 s a step, one step per
dispatch (XLA:CPU is slow on convolutions inside a loop); the README's
Results measure one epoch there. Run the ten epochs on a GPU.
"""

from experiments.configs import common


def get_config(variant: str = ""):
  c = common.base()
  c.dataset.name = "mnist"
  c.model = dict(name="cnn", conv_dropout_rate=0.25, dense_dropout_rate=0.5)
  c.optimizer, c.learning_rate = "adam", 1e-3
  c.batch_size = 128
  c.num_epochs = 10.0
  c.eval_every_epochs = 0.5
  c.steps_per_dispatch = 25

  def runlocal(c):
    c.batch_size = 32
    c.steps_per_dispatch = 1   # XLA:CPU: convolutions in a loop are slow
  return common.apply_variant(c, variant, runlocal)
