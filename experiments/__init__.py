"""Experiments for jis: configs, a launcher, datasets, models, logs and plots.

Launch one experiment with ``python -m experiments.main --config
experiments/configs/mnist_mlp.py --workdir runs/mnist_mlp`` and compare runs
with ``python -m experiments.compare runs/a runs/b --out cmp.png``; see
docs/experiments.md. Nothing under ``jis/`` imports this package, so its
dependencies (tensorflow-datasets, ml_collections, absl, orbax, tqdm,
matplotlib) stay optional: ``pip install -e ".[experiments]"``.
"""
