r"""Fashion-MNIST MLP with 20 % of the training labels redrawn at random.

The fashion_mnist_mlp setup with ``config.dataset.label_noise = 0.2`` (each
training label redrawn uniformly over the 10 classes with probability 0.2,
fixed seed; the test labels stay clean): data on which selection that
favours hard examples can favour wrong labels. A check of the defaults on
data nobody tuned them for:

  python -m experiments.benchmarks.convergence \
      --models=fashion_mnist_mlp_noisy --budget_seconds=30 \
      --data_dir=../shared/data --out runs/convergence_noisy.json
"""

from experiments.configs import fashion_mnist_mlp


def get_config(variant: str = ""):
  c = fashion_mnist_mlp.get_config(variant)
  c.dataset.label_noise = 0.2
  return c
