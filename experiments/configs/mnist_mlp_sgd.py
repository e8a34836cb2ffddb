r"""MNIST MLP trained with SGD and momentum instead of adam.

The mnist_mlp setup (512-512, dropout 0.2, b = 128, jis's defaults) with
``sgd`` at learning rate 0.05, momentum 0.9: an optimizer the defaults were
not tuned with (they were chosen on adam runs; docs/performance_notes.md,
sections 11-13). The learning rate is a common choice for this MLP, not a
tuned one.

Launch (offline data in ../shared/data; online, drop the data_dir flag):

  python -m experiments.main --config experiments/configs/mnist_mlp_sgd.py \
      --workdir runs/mnist_sgd_is --config.dataset.data_dir=../shared/data
  python -m experiments.main --config experiments/configs/mnist_mlp_sgd.py \
      --workdir runs/mnist_sgd_uniform --config.dataset.data_dir=../shared/data \
      --config.sampler.score=uniform

Expected: about 98.2-98.4% test accuracy after 10 epochs. Importance sampling
switches on for about 73% of the steps, as with adam; at equal time
(uniform's 10 epochs, 7.7-8.4 s; seeds 50-55 run twice each, 2-core AMD
EPYC, 2026-12-05) the default ended at 0.63x uniform's training loss per
pair (0.47-0.77x, 12 of 12 lower) and +0.17 points of test accuracy, and
reached uniform's final accuracy in 0.53-0.62 of the time
(docs/performance_notes.md, section 29).
"""

from experiments.configs import mnist_mlp


def get_config(variant: str = ""):
  c = mnist_mlp.get_config(variant)
  c.optimizer, c.learning_rate, c.momentum = "sgd", 0.05, 0.9
  return c
