r"""CIFAR-10 with WRN-28-2 and the paper's schedule (Katharopoulos & Fleuret 2018).

Wide ResNet 28-2 (BatchNorm; batch statistics live in the train state and the
scoring pass runs in inference mode); SGD with momentum 0.9, learning rate 0.1
divided by 5 after 20k and 40k steps, weight decay 5e-4, b = 128 for 50k
steps; ZCA-whitened inputs with random translations (up to 4 pixels) and
horizontal flips, applied on device. Importance sampling scores a presample of
B = 640 (presample 5) with the upper bound and switches itself on when the
estimated variance reduction exceeds the default threshold 1 + 2B/(3b)
(4.33 at presample 5).

CIFAR is not in ../shared/data; online it loads through tensorflow-datasets,
offline put cifar-10-python.tar.gz (the "python version") in <data_dir>/cifar10/.

Launch:

  python -m experiments.main --config experiments/configs/cifar10_wrn.py \
      --workdir runs/cifar10_wrn_is
  python -m experiments.main --config experiments/configs/cifar10_wrn.py \
      --workdir runs/cifar10_wrn_uniform --config.sampler.score=uniform
  python -m experiments.compare runs/cifar10_wrn_uniform runs/cifar10_wrn_is \
      --out cifar10_wrn.png

Expected: roughly 94-95% test accuracy (5-6% error) for WRN-28-2 with this
schedule; the paper reports importance sampling lowering the training loss
and the test error at equal wall-clock time. Not measured here (no CIFAR files
and no accelerator were available to this work; the runlocal variant is
tested on generated data).
"""

from experiments.configs import common


def cifar_wrn(dataset: str, variant: str):
  c = common.base()
  c.dataset.name = dataset
  c.input.normalize = "zca"
  c.input.zca_epsilon = 0.1
  c.input.augment = True
  c.model = dict(name="wide_resnet", depth=28, width=2, dropout_rate=0.0)
  c.optimizer, c.learning_rate, c.momentum = "sgd", 0.1, 0.9
  c.weight_decay = 5e-4
  c.lr_schedule = "piecewise"
  c.lr_boundaries = (20000, 40000)
  c.lr_decay_factor = 0.2
  c.batch_size = 128
  c.sampler.presample = 5.0
  c.num_steps = 50000
  c.eval_every_steps = 1000
  c.eval_every_epochs = 0.0
  c.eval_batch_size = 1000
  c.steps_per_dispatch = 20

  def runlocal(c):
    c.model.depth, c.model.width = 10, 1
    c.batch_size = 16
    c.dataset.train_examples = 512
    c.dataset.test_examples = 128
    c.num_steps = 10
    c.eval_every_steps = 5
    c.checkpoint_every_steps = 5
    c.steps_per_dispatch = 1   # XLA:CPU: convolutions in a loop are slow
  return common.apply_variant(c, variant, runlocal)


def get_config(variant: str = ""):
  return cifar_wrn("cifar10", variant)
