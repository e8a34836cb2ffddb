r"""Fashion-MNIST MLP trained with SGD and momentum instead of adam.

The fashion_mnist_mlp setup (512-512, dropout 0.2, b = 128, jis's defaults)
with ``sgd`` at learning rate 0.05, momentum 0.9, as mnist_mlp_sgd: data and
an optimizer the defaults were not tuned on together.

Launch (offline data in ../shared/data; online, drop the data_dir flag):

  python -m experiments.main --config experiments/configs/fashion_mnist_mlp_sgd.py \
      --workdir runs/fashion_sgd_is --config.dataset.data_dir=../shared/data
  python -m experiments.main --config experiments/configs/fashion_mnist_mlp_sgd.py \
      --workdir runs/fashion_sgd_uniform --config.dataset.data_dir=../shared/data \
      --config.sampler.score=uniform

Expected: about 89.4-89.7% test accuracy after 30 s of training (about 38
epochs on 2 CPU cores). Importance sampling stays off (its probes, 1% of
the steps), and the default trails uniform a little at the budget: 1.09x
its training loss per pair on seeds 56-58 and 1.007x (1.00-1.11x, none
lower) on seeds 59-64, test accuracy -0.13 and +0.08 points; the in-step
no-scoring-pass mode 0.83x, +0.36 points (2-core AMD EPYC, 2026-12-05;
docs/performance_notes.md, section 29).
"""

from experiments.configs import fashion_mnist_mlp


def get_config(variant: str = ""):
  c = fashion_mnist_mlp.get_config(variant)
  c.optimizer, c.learning_rate, c.momentum = "sgd", 0.05, 0.9
  return c
