r"""Fashion-MNIST CNN (the mnist_cnn setup on Fashion-MNIST).

Conv 3x3 32 relu, conv 3x3 64 relu, max-pool 2, dropout 0.25, dense 128 relu,
dropout 0.5, dense 10; adam 1e-3; b = 128, the defaults of jis. A check on
data and a model the defaults were not tuned on together
(docs/performance_notes.md, section 28).

Launch (offline data in ../shared/data; online, drop the data_dir flag):

  python -m experiments.main --config experiments/configs/fashion_mnist_cnn.py \
      --workdir runs/fashion_cnn_is --config.dataset.data_dir=../shared/data
  python -m experiments.main --config experiments/configs/fashion_mnist_cnn.py \
      --workdir runs/fashion_cnn_uniform --config.dataset.data_dir=../shared/data \
      --config.sampler.score=uniform

Expected: about 88.5% test accuracy after one epoch. Within that epoch τ
stays under the default threshold, so the default trains uniformly and
ties with uniform training (1.006x its training loss, +0.16 points, seeds
30-32, 2-core AMD EPYC, 2026-12-05). On 2 CPU cores a step takes about
0.26 s, as on MNIST; run it on a GPU for more than an epoch or two.
"""

from experiments.configs import mnist_cnn


def get_config(variant: str = ""):
  c = mnist_cnn.get_config(variant)
  c.dataset.name = "fashion_mnist"
  return c
