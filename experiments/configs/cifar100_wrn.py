r"""CIFAR-100 with WRN-28-2: the cifar10_wrn setup on 100 classes.

Launch:

  python -m experiments.main --config experiments/configs/cifar100_wrn.py \
      --workdir runs/cifar100_wrn_is
  python -m experiments.main --config experiments/configs/cifar100_wrn.py \
      --workdir runs/cifar100_wrn_uniform --config.sampler.score=uniform
  python -m experiments.compare runs/cifar100_wrn_uniform runs/cifar100_wrn_is \
      --out cifar100_wrn.png

Offline, put cifar-100-python.tar.gz in <data_dir>/cifar100/.

Expected: roughly 72-76% test accuracy for WRN-28-2 with this schedule, and
the same comparison as cifar10_wrn. Not measured here (no CIFAR files and no
accelerator were available to this work).
"""

from experiments.configs import cifar10_wrn


def get_config(variant: str = ""):
  return cifar10_wrn.cifar_wrn("cifar100", variant)
