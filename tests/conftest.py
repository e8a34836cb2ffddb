"""Fixtures shared by the experiments' tests, and the hypothesis profile."""

import os

import hypothesis
import pytest

import experiments_testing


@pytest.fixture(scope="module")
def compilation_cache():
  """JAX's persistent compilation cache, for a module that asks for it with
  ``pytestmark = pytest.mark.usefixtures("compilation_cache")``."""
  with experiments_testing.persistent_compilation_cache():
    yield


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
  """A tiny MNIST-shaped dataset on disk: 160 train and 40 test examples (a
  module that needs other sizes defines its own ``fake_data``)."""
  return experiments_testing.write_fake_data(
      str(tmp_path_factory.mktemp("data")), n_train=160, n_test=40)


# The longest modules first (their times from `pytest --junitxml`): with
# `--dist loadfile` pytest-xdist hands each worker whole modules in
# collection order, so a long module left for the end runs alone while the
# other worker idles.
_LONGEST_FIRST = ("test_experiments_multihost", "test_faults",
                  "test_experiments_main", "test_experiments_train",
                  "test_benchmarks", "test_step", "test_sharding",
                  "test_multihost")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


# Property tests draw the same examples on every run, so CI cannot go red by
# chance; HYPOTHESIS_PROFILE=explore draws new ones (and may find new bugs).
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis.settings.register_profile("explore", derandomize=False,
                                     print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
