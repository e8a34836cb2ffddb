r"""Fashion-MNIST MLP (512-512, dropout 0.2, adam, b = 128).

The mnist_mlp setup on Fashion-MNIST, a harder drop-in replacement: there is
more left to learn after the first epochs, where importance sampling helps.

Launch (offline data in ../shared/data; online, drop the data_dir flag):

  python -m experiments.main --config experiments/configs/fashion_mnist_mlp.py \
      --workdir runs/fashion_mlp_is --config.dataset.data_dir=../shared/data
  python -m experiments.main --config experiments/configs/fashion_mnist_mlp.py \
      --workdir runs/fashion_mlp_uniform --config.dataset.data_dir=../shared/data \
      --config.sampler.score=uniform
  python -m experiments.compare runs/fashion_mlp_uniform runs/fashion_mlp_is \
      --out fashion_mnist_mlp.png

Expected: about 88-89% test accuracy after 10 epochs. Measured on 2 shared
cores of an Intel Xeon (CPU, jax 0.10.2): uniform 88.50% (training loss 0.229,
30.3 s); importance sampling 88.20% (0.220, 40.4 s; it resampled on 39% of the
steps, once τ passed eq. 29's threshold of 2). At the uniform run's 30.3 s,
importance sampling stood at 8 epochs with training loss 0.216 and 88.84%.
"""

from experiments.configs import common


def get_config(variant: str = ""):
  c = common.base()
  c.dataset.name = "fashion_mnist"
  c.model = dict(name="mlp", features=(512, 512), dropout_rate=0.2)
  c.optimizer, c.learning_rate = "adam", 1e-3
  c.batch_size = 128
  c.num_epochs = 10.0
  c.eval_every_epochs = 0.5
  c.log_every_steps = 50

  def runlocal(c):
    c.model.features = (64, 64)
    c.batch_size = 32
  return common.apply_variant(c, variant, runlocal)
