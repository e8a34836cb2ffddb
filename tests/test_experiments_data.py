"""Dataset loaders: local files (real ones when present), tfds mock data."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from experiments import batches
from experiments import input_pipeline
from experiments import placement as placement_lib
import experiments_testing

REAL = experiments_testing.shared_data_dir()
needs_real = pytest.mark.skipif(REAL is None, reason="../shared/data absent")


def cfg(name, data_dir, **extra):
  return ml_collections.ConfigDict(
      {"name": name, "data_dir": data_dir, "source": "auto", **extra})


@needs_real
def test_real_mnist_and_fashion_mnist():
  mnist = input_pipeline.load(cfg("mnist", REAL))
  assert mnist.train["input"].shape == (60000, 28, 28, 1)
  assert mnist.test["input"].shape == (10000, 28, 28, 1)
  assert mnist.train["input"].dtype == np.uint8
  # The label counts shared/data/README.md documents.
  assert np.bincount(mnist.train["label"]).tolist() == [
      5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
  assert np.bincount(mnist.test["label"]).tolist() == [
      980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
  fashion = input_pipeline.load(cfg("fashion_mnist", REAL))
  assert np.bincount(fashion.train["label"]).tolist() == [6000] * 10
  assert np.bincount(fashion.test["label"]).tolist() == [1000] * 10
  assert not np.array_equal(fashion.train["input"][:10], mnist.train["input"][:10])


@needs_real
def test_real_permuted_mnist_is_a_fixed_pixel_permutation():
  mnist = input_pipeline.load(cfg("mnist", REAL, train_examples=100))
  a = input_pipeline.load(cfg("permuted_mnist", REAL, train_examples=100))
  b = input_pipeline.load(cfg("permuted_mnist", REAL, train_examples=100,
                              permutation_seed=1))
  assert a.train["input"].shape == (100, 784, 1)
  flat = mnist.train["input"].reshape(100, -1)
  np.testing.assert_array_equal(np.sort(a.train["input"][..., 0], 1),
                                np.sort(flat, 1))
  assert not np.array_equal(a.train["input"], flat[..., None])
  assert not np.array_equal(a.train["input"], b.train["input"])


@needs_real
def test_real_imdb_matches_keras_load_data():
  ds = input_pipeline.load(cfg("imdb_reviews", REAL, num_words=20000,
                               maxlen=400))
  assert ds.train["input"].shape == (25000, 400)
  assert np.bincount(ds.train["label"]).tolist() == [12500, 12500]
  # TEXT_DATASETS.md: Keras's first training sequence has 218 ids and starts
  # [1, 14, 22, 16, 43, 530, 973, 1622]; padding goes in front.
  first = ds.train["input"][0]
  assert (first > 0).sum() == 218
  assert first[400 - 218:400 - 218 + 8].tolist() == [
      1, 14, 22, 16, 43, 530, 973, 1622]
  assert ds.train["input"].max() < 20000 and ds.info["vocab_size"] == 20000


@needs_real
def test_real_reuters_matches_keras_load_data():
  ds = input_pipeline.load(cfg("reuters", REAL, num_words=1000))
  assert ds.train["input"].shape == (8982, 1000)
  assert ds.test["input"].shape == (2246, 1000)
  assert ds.num_classes == 46 and ds.train["label"].max() <= 45
  # The first Keras sequence starts [1, 27595, 28842, 8, 43, 10, 447, 5]:
  # ids >= 1000 become oov 2, and the bag of words marks what is left.
  assert ds.train["input"][0][[1, 2, 8, 43, 10, 447, 5]].tolist() == [1] * 7
  assert ds.train["input"][0][0] == 0


def test_fake_files_in_every_local_format(tmp_path):
  root = experiments_testing.write_fake_data(str(tmp_path), n_train=50,
                                             n_test=20)
  for name, shape, classes in [("mnist", (28, 28, 1), 10),
                               ("fashion_mnist", (28, 28, 1), 10),
                               ("cifar10", (32, 32, 3), 10),
                               ("cifar100", (32, 32, 3), 100)]:
    ds = input_pipeline.load(cfg(name, root))
    assert ds.train["input"].shape[1:] == shape, name
    assert ds.test["input"].shape[0] == 20 and ds.num_classes == classes
    assert ds.source == os.path.join(root, name)
  imdb = input_pipeline.load(cfg("imdb", root, num_words=100, maxlen=16))
  assert imdb.name == "imdb_reviews"
  assert imdb.train["input"].shape == (50, 16)
  assert imdb.train["input"].max() < 100
  reuters = input_pipeline.load(cfg("reuters", root, num_words=64))
  assert reuters.train["input"].shape == (56, 64)   # 80% of 70


def test_label_noise_redraws_a_share_of_the_training_labels(tmp_path):
  # Against the definition: each training label redrawn uniformly over the
  # C classes with probability p, so it changes with probability p(1 − 1/C);
  # the test labels and the inputs are untouched; the same seed, the same.
  root = experiments_testing.write_fake_data(str(tmp_path), n_train=4000,
                                             n_test=20)
  clean = input_pipeline.load(cfg("fashion_mnist", root))
  noisy = input_pipeline.load(cfg("fashion_mnist", root, label_noise=0.4))
  changed = np.mean(noisy.train["label"] != clean.train["label"])
  expected = 0.4 * 0.9
  assert abs(changed - expected) < 4 * np.sqrt(expected * (1 - expected) / 4000)
  assert noisy.train["label"].dtype == np.int32
  assert noisy.train["label"].min() >= 0 and noisy.train["label"].max() < 10
  np.testing.assert_array_equal(noisy.test["label"], clean.test["label"])
  np.testing.assert_array_equal(noisy.train["input"], clean.train["input"])
  np.testing.assert_array_equal(
      input_pipeline.load(cfg("fashion_mnist", root, label_noise=0.4)
                          ).train["label"], noisy.train["label"])
  with pytest.raises(ValueError, match=r"label_noise=1.0 must lie in \[0, 1\)"):
    input_pipeline.load(cfg("fashion_mnist", root, label_noise=1.0))


def test_idx_reader_checks_the_header(tmp_path):
  path = str(tmp_path / "x.gz")
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  experiments_testing.write_idx(path, images)
  np.testing.assert_array_equal(input_pipeline.read_idx(path), images)
  import gzip
  with gzip.open(path, "rb") as f:
    data = f.read()
  with gzip.open(path, "wb") as f:
    f.write(data[:-5])
  with pytest.raises(ValueError, match="truncated"):
    input_pipeline.read_idx(path)


def test_keras_text_conventions():
  assert input_pipeline.keras_sequences([[1, 5, 999]], num_words=10) == [
      [1, 4, 8, 2]]
  np.testing.assert_array_equal(
      input_pipeline.pad_sequences([[1, 2, 3], [4]], 2), [[2, 3], [0, 4]])
  np.testing.assert_array_equal(
      input_pipeline.bag_of_words([[1, 3, 3, 12]], 5), [[0, 1, 0, 1, 0]])
  assert input_pipeline.keras_tokenize("It's GREAT!<br />Really") == [
      "it's", "great", "br", "really"]
  assert input_pipeline.word_ranks([["b", "a", "b"], ["c", "a", "b"]]) == {
      "b": 1, "a": 2, "c": 3}


def test_missing_local_files_name_the_files(tmp_path, monkeypatch):
  monkeypatch.delenv(input_pipeline.DATA_DIR_ENV, raising=False)
  with pytest.raises(FileNotFoundError) as info:
    input_pipeline.load(cfg("mnist", str(tmp_path), source="local"))
  message = str(info.value)
  assert "train-images-idx3-ubyte.gz" in message
  assert os.path.join(str(tmp_path), "mnist") in message
  # The environment variable is the default root.
  root = experiments_testing.write_fake_data(str(tmp_path / "env"), 30, 10)
  monkeypatch.setenv(input_pipeline.DATA_DIR_ENV, root)
  assert input_pipeline.load(cfg("mnist", "")).source == os.path.join(root,
                                                                      "mnist")


def test_tfds_mock_data_without_tensorflow():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    mnist = input_pipeline.load(cfg("mnist", "", source="tfds"))
    cifar = input_pipeline.load(cfg("cifar100", "", source="tfds"))
    imdb = input_pipeline.load(cfg("imdb_reviews", "", source="tfds",
                                   num_words=50, maxlen=8))
  assert mnist.source == "tfds:mnist"
  assert mnist.train["input"].shape == (12, 28, 28, 1)
  assert cifar.train["input"].shape == (12, 32, 32, 3)
  assert cifar.train["label"].max() < 100
  assert imdb.train["input"].shape == (12, 8)
  assert (imdb.train["input"][:, -1] > 0).all()   # padded in front
  assert "tensorflow" not in __import__("sys").modules


class _SecondHalf:
  """A placement whose process holds rows [2, 4) of each presample of 4."""

  def process_rows(self, size):
    del size
    return slice(2, 4)

  def global_chunk(self, local, size):
    del size
    return local


def test_streamed_presamples_follow_seeded_epochs_and_resume():
  split = {"input": np.arange(10)[:, None], "label": np.arange(10)}
  one_device = placement_lib.Placement(None, jax.devices()[0])

  def source(position=None, placement=one_device):
    return batches.Streamed(split, batches.Shuffled(10, seed=3), 4, 3,
                            placement, position)
  stream = source()
  fed = jax.device_get(stream.next_input(0, 3, None))
  perm0 = input_pipeline.shuffled_epoch(10, 3, 0).order
  perm1 = input_pipeline.shuffled_epoch(10, 3, 1).order
  # Two presamples of 4 from epoch 0 (its last 2 examples skipped), then
  # epoch 1: each the rows of its dataset indices.
  np.testing.assert_array_equal(
      fed["label"], [perm0[:4], perm0[4:8], perm1[:4]])
  np.testing.assert_array_equal(fed["index"], fed["label"])
  np.testing.assert_array_equal(fed["input"][..., 0], fed["label"])
  position = stream.position(())
  assert position == {"source": "grain:shuffled", "epoch": 1,
                      "iterator": {"next_index": 1}}
  after = jax.device_get(stream.next_input(3, 2, None))
  stream.close()
  resumed = source(json.loads(json.dumps(position)))   # as checkpointed
  again = jax.device_get(resumed.next_input(3, 2, None))
  resumed.close()
  np.testing.assert_array_equal(again["label"], after["label"])
  perm2 = input_pipeline.shuffled_epoch(10, 3, 2).order
  np.testing.assert_array_equal(after["label"], [perm1[4:8], perm2[:4]])
  assert sorted(perm0.tolist()) == list(range(10))
  assert not np.array_equal(perm0, perm1)
  # Another process loads only its own rows of the same presamples.
  half = source(placement=_SecondHalf())
  fed = half.next_input(0, 3, None)
  half.close()
  np.testing.assert_array_equal(
      fed["label"], [perm0[2:4], perm0[6:8], perm1[2:4]])


def test_on_device_source_gives_back_the_rows_a_step_did_not_use():
  import jax.numpy as jnp
  from experiments import batches
  from experiments import placement as placement_lib
  split = {"input": np.arange(20, dtype=np.float32)[:, None],
           "label": np.zeros(20, np.int32)}
  source = batches.OnDevice(split, jax.random.key(0), 6,
                            placement_lib.Placement(None, jax.devices()[0]), None)
  carry = source.carry()
  seen = []
  for rows in (2, 2, 6, 2):     # uniform, uniform, importance, uniform
    batch, carry = source.take(carry, source.next_input(0, 1, None), 0)
    seen.append(np.asarray(batch["index"])[:rows])
    carry = source.consumed(carry, jnp.int32(rows))
  used = np.concatenate(seen)
  assert len(set(used.tolist())) == len(used) == 12   # no row used twice
  assert int(carry.offset) == 12


def test_a_prepared_split_gives_the_same_rows_as_preprocessing_each_batch():
  # Without augmentation the loop preprocesses the split once and hands jis
  # a jis.Indexed into it: the rows must be the ones it preprocessed per step.
  import jis
  from experiments import preprocess as preprocess_lib
  rng = np.random.default_rng(0)
  split = {"input": rng.integers(0, 256, (40, 4, 4, 3)).astype(np.uint8),
           "label": rng.integers(0, 10, 40).astype(np.int32)}
  prep = preprocess_lib.Preprocess("image", normalize="standardize")
  stats = prep.statistics(split)
  here = placement_lib.Placement(None, jax.devices()[0])
  make = lambda prepare: batches.OnDevice(split, jax.random.key(3), 8, here,
                                          None, prepare)
  rows, indexed = make(None), make(
      lambda data: jax.jit(prep, static_argnums=3)(data, stats, None, False))
  carry_r, carry_i = rows.carry(), indexed.carry()
  for _ in range(7):   # past an epoch boundary (40 / 8 = 5 presamples)
    batch, carry_r = rows.take(carry_r, rows.next_input(0, 1, None), 0)
    lazy, carry_i = indexed.take(carry_i, indexed.next_input(0, 1, None), 0)
    assert isinstance(lazy, jis.Indexed) and not isinstance(batch, jis.Indexed)
    np.testing.assert_array_equal(lazy.index, batch["index"])
    expected = prep(batch, stats, jax.random.key(0), True)
    got = jis.presample_rows(lazy)
    np.testing.assert_array_equal(got["input"], expected["input"])
    np.testing.assert_array_equal(got["label"], expected["label"])
