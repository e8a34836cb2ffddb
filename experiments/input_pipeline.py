"""Datasets: local files or tensorflow-datasets, loaded into numpy arrays.

Every dataset comes back as a :class:`Dataset` whose splits are dicts of numpy
arrays with the same keys: ``"input"`` (uint8 images ``[N, H, W, C]``, uint8
pixel sequences ``[N, 784, 1]``, int32 token ids ``[N, maxlen]`` or uint8
multi-hot rows ``[N, num_words]``) and ``"label"`` (int32 ``[N]``). The
training loop then either puts them on the device once (MNIST-sized data) or
streams presamples from host memory through a Grain pipeline
(:func:`presamples`, one :class:`Epoch` at a time).

Offline, datasets load from a local root (``config.dataset.data_dir`` or the
environment variable ``JIS_DATA_DIR``) with one folder per dataset, the layout
of ``../shared/data``::

    mnist/          train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
                    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
    fashion_mnist/  (the same four Fashion-MNIST files)
    cifar10/        cifar-10-python.tar.gz  (or its cifar-10-batches-py/ folder)
    cifar100/       cifar-100-python.tar.gz (or its cifar-100-python/ folder)
    imdb/           imdb.npz     (Keras format; imdb_word_index.json optional)
    reuters/        reuters.npz  (Keras format; reuters_word_index.json optional)

Online, the same names load through ``tfds.data_source`` (no TensorFlow needed
to read them), ``imdb_reviews`` for IMDB; Reuters is not in tfds.
"""

import collections
import dataclasses
import gzip
import itertools
import os
import pickle
import re
import tarfile
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import jis

DATA_DIR_ENV = "JIS_DATA_DIR"

Split = Dict[str, np.ndarray]


@dataclasses.dataclass
class Dataset:
  """A classification dataset held in host memory.

  Attributes:
    name: the dataset name (``"mnist"``, ``"imdb_reviews"``, ...).
    train: ``{"input": [N, ...], "label": int32 [N]}``.
    test: the same for the test split.
    num_classes: the number of classes.
    source: where it was read from (a folder, or ``tfds:<name>``).
    info: ``kind`` (``image``, ``sequence``, ``text`` or ``bag_of_words``),
      and what the model needs (``vocab_size`` for token ids).
  """
  name: str
  train: Split
  test: Split
  num_classes: int
  source: str
  info: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Spec:
  folder: str              # local folder under the data root
  files: Tuple[str, ...]   # what to put there (for the error message)
  tfds_name: Optional[str]
  num_classes: int
  kind: str                # "image", "text" or "bag_of_words"


_SPECS = {
    "mnist": _Spec("mnist", (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        "mnist", 10, "image"),
    "fashion_mnist": _Spec("fashion_mnist", (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        "fashion_mnist", 10, "image"),
    "cifar10": _Spec("cifar10", ("cifar-10-python.tar.gz",), "cifar10", 10,
                     "image"),
    "cifar100": _Spec("cifar100", ("cifar-100-python.tar.gz",), "cifar100", 100,
                      "image"),
    "imdb_reviews": _Spec("imdb", ("imdb.npz",), "imdb_reviews", 2, "text"),
    "reuters": _Spec("reuters", ("reuters.npz",), None, 46, "bag_of_words"),
}
# Other spellings people use; the key is what configs and errors print.
_ALIASES = {"imdb": "imdb_reviews", "fashion-mnist": "fashion_mnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100"}
# Datasets derived from another one by a fixed transformation.
_DERIVED = {"permuted_mnist": "mnist"}

# Keras conventions for the text datasets (keras.datasets.imdb / reuters).
_KERAS_SEED = 113
_START_CHAR, _OOV_CHAR, _INDEX_FROM = 1, 2, 3


def dataset_names() -> Tuple[str, ...]:
  return tuple(sorted(_SPECS)) + tuple(sorted(_DERIVED))


def resolve_data_dir(data_dir: Optional[str]) -> Optional[str]:
  """``data_dir`` if given, else ``$JIS_DATA_DIR``, else None."""
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
  return os.path.expanduser(data_dir) if data_dir else None


# ----------------------------------------------------------------------------
# Local file formats
# ----------------------------------------------------------------------------

def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzip-compressed or not): the MNIST format."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path} is not an IDX file (bad magic number).")
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
            0x0D: ">f4", 0x0E: ">f8"}
  if data[2] not in dtypes:
    raise ValueError(f"{path}: unknown IDX data type 0x{data[2]:02x}.")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
                for i in range(ndim))
  array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says shape {shape} but the file holds "
                     f"{array.size} values (truncated download?).")
  return array.reshape(shape)


def _find(folder: str, name: str) -> Optional[str]:
  """``name`` in ``folder``, compressed or not."""
  for candidate in (name, name[:-3] if name.endswith(".gz") else name + ".gz"):
    path = os.path.join(folder, candidate)
    if os.path.exists(path):
      return path
  return None


def _load_idx_dataset(folder: str) -> Tuple[Split, Split]:
  splits = []
  for prefix in ("train", "t10k"):
    images = _find(folder, f"{prefix}-images-idx3-ubyte.gz")
    labels = _find(folder, f"{prefix}-labels-idx1-ubyte.gz")
    if images is None or labels is None:
      raise FileNotFoundError(f"{folder} lacks {prefix}-images/labels files.")
    x, y = read_idx(images), read_idx(labels)
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"{folder}: {x.shape[0]} {prefix} images but "
                       f"{y.shape[0]} labels.")
    splits.append({"input": x[..., None].astype(np.uint8),
                   "label": y.astype(np.int32)})
  return splits[0], splits[1]


def _load_cifar(folder: str, num_classes: int) -> Tuple[Split, Split]:
  """CIFAR in the 'python version' format: the tarball or its folder."""
  if num_classes == 10:
    tarball, inner = "cifar-10-python.tar.gz", "cifar-10-batches-py"
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    test_names, label_key = ["test_batch"], b"labels"
  else:
    tarball, inner = "cifar-100-python.tar.gz", "cifar-100-python"
    train_names, test_names, label_key = ["train"], ["test"], b"fine_labels"

  members = {}
  if os.path.isdir(os.path.join(folder, inner)):
    for name in train_names + test_names:
      with open(os.path.join(folder, inner, name), "rb") as f:
        members[name] = f.read()
  else:
    with tarfile.open(os.path.join(folder, tarball), "r:gz") as tar:
      for name in train_names + test_names:
        members[name] = tar.extractfile(f"{inner}/{name}").read()

  def split(names):
    xs, ys = [], []
    for name in names:
      d = pickle.loads(members[name], encoding="bytes")
      xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
      ys.append(np.asarray(d[label_key], np.int32))
    x = np.concatenate(xs).transpose(0, 2, 3, 1)
    return {"input": np.ascontiguousarray(x), "label": np.concatenate(ys)}
  return split(train_names), split(test_names)


def _flat_keras_ids(raw: Sequence[Sequence[int]], num_words: Optional[int]):
  """Raw word ranks -> ``(ids, lengths)``: every sequence as
  ``keras.datasets.*.load_data`` returns it (``start_char=1`` in front, ids
  shifted by ``index_from=3``, ids at or above ``num_words`` replaced by
  ``oov_char=2``), concatenated."""
  lengths = np.fromiter((len(seq) + 1 for seq in raw), np.int64, len(raw))
  ids = np.fromiter(itertools.chain.from_iterable(
      itertools.chain((_START_CHAR - _INDEX_FROM,), seq) for seq in raw),
      np.int64, int(lengths.sum())) + _INDEX_FROM
  if num_words:
    ids = np.where(ids < num_words, ids, _OOV_CHAR)
  return ids, lengths


def keras_sequences(raw: Sequence[Sequence[int]],
                    num_words: Optional[int]) -> list:
  """Raw word ranks -> the lists ``keras.datasets.*.load_data`` returns."""
  ids, lengths = _flat_keras_ids(raw, num_words)
  return [a.tolist() for a in np.split(ids, np.cumsum(lengths)[:-1])]


def _rows(lengths):
  rows = np.repeat(np.arange(len(lengths)), lengths)
  starts = np.cumsum(lengths) - lengths
  return rows, np.arange(len(rows)) - starts[rows]


def pad_sequences(seqs, maxlen: int, lengths=None) -> np.ndarray:
  """Keras's ``pad_sequences`` defaults: keep the last ``maxlen`` ids and pad
  with 0 in front. ``seqs`` is a list of lists, or flat ids with ``lengths``."""
  if lengths is None:
    lengths = np.asarray([len(s) for s in seqs], np.int64)
    seqs = np.fromiter(itertools.chain.from_iterable(seqs), np.int64,
                       int(lengths.sum()))
  rows, pos = _rows(lengths)
  keep = pos >= lengths[rows] - maxlen
  out = np.zeros((len(lengths), maxlen), np.int32)
  out[rows[keep], (maxlen - lengths[rows] + pos)[keep]] = seqs[keep]
  return out


def bag_of_words(seqs, num_words: int, lengths=None) -> np.ndarray:
  """Keras ``Tokenizer.sequences_to_matrix(mode="binary")``."""
  if lengths is None:
    lengths = np.asarray([len(s) for s in seqs], np.int64)
    seqs = np.fromiter(itertools.chain.from_iterable(seqs), np.int64,
                       int(lengths.sum()))
  rows, _ = _rows(lengths)
  keep = seqs < num_words
  out = np.zeros((len(lengths), num_words), np.uint8)
  out[rows[keep], seqs[keep]] = 1
  return out


def _keras_shuffle(rng: np.random.RandomState, *arrays):
  indices = np.arange(len(arrays[0]))
  rng.shuffle(indices)
  return tuple(a[indices] for a in arrays)


def _load_imdb_npz(folder: str, num_words: int, maxlen: int):
  with np.load(os.path.join(folder, "imdb.npz"), allow_pickle=True) as f:
    x_train, y_train = f["x_train"], f["y_train"]
    x_test, y_test = f["x_test"], f["y_test"]
  rng = np.random.RandomState(_KERAS_SEED)   # train first, then test
  x_train, y_train = _keras_shuffle(rng, x_train, y_train)
  x_test, y_test = _keras_shuffle(rng, x_test, y_test)
  return _text_splits(x_train, y_train, x_test, y_test, num_words, maxlen)


def _text_splits(x_train, y_train, x_test, y_test, num_words, maxlen):
  def split(x, y):
    ids, lengths = _flat_keras_ids(x, num_words)
    return {"input": pad_sequences(ids, maxlen, lengths),
            "label": np.asarray(y, np.int32)}
  return split(x_train, y_train), split(x_test, y_test)


def _load_reuters_npz(folder: str, num_words: int, test_split: float):
  with np.load(os.path.join(folder, "reuters.npz"), allow_pickle=True) as f:
    x, y = f["x"], f["y"]
  x, y = _keras_shuffle(np.random.RandomState(_KERAS_SEED), x, y)
  split = int(len(x) * (1 - test_split))
  ids, lengths = _flat_keras_ids(x, num_words)
  features = bag_of_words(ids, num_words, lengths)
  labels = np.asarray(y, np.int32)
  return ({"input": features[:split], "label": labels[:split]},
          {"input": features[split:], "label": labels[split:]})


# ----------------------------------------------------------------------------
# tensorflow-datasets
# ----------------------------------------------------------------------------

_KERAS_FILTERS = re.compile(r"[!\"#$%&()*+,\-./:;<=>?@\[\\\]^_`{|}~\t\n]")


def keras_tokenize(text) -> list:
  """Keras's ``text_to_word_sequence``: lower case, punctuation to spaces."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  return _KERAS_FILTERS.sub(" ", str(text).lower()).split()


def word_ranks(texts: Sequence[list]) -> Dict[str, int]:
  """Word -> frequency rank (1 = most frequent), ties by first occurrence."""
  counts = collections.Counter()
  for words in texts:
    counts.update(words)
  ordered = sorted(counts.items(), key=lambda kv: -kv[1])  # stable sort
  return {w: i + 1 for i, (w, _) in enumerate(ordered)}


def _tfds_split(name: str, split: str, tfds_data_dir: Optional[str],
                limit: int) -> Dict[str, list]:
  import tensorflow_datasets as tfds  # imported lazily: slow, optional offline
  source = tfds.data_source(name, split=split, data_dir=tfds_data_dir or None)
  n = len(source) if not limit else min(limit, len(source))
  records = []
  chunk = 1024
  for start in range(0, n, chunk):
    keys = list(range(start, min(start + chunk, n)))
    try:
      records.extend(source.__getitems__(keys))
    except (TypeError, AttributeError, NotImplementedError):
      records.extend(source[k] for k in keys)  # e.g. under tfds mock_data
  columns = collections.defaultdict(list)
  for r in records:
    for key, value in r.items():
      columns[key].append(value)
  return columns


def _load_tfds(spec: _Spec, cfg) -> Tuple[Split, Split]:
  tfds_dir = cfg.get("tfds_data_dir") or None
  limits = {"train": cfg.get("train_examples", 0), "test": cfg.get(
      "test_examples", 0)}
  cols = {s: _tfds_split(spec.tfds_name, s, tfds_dir, limits[s])
          for s in ("train", "test")}
  if spec.kind == "image":
    splits = [{"input": np.stack(cols[s]["image"]).astype(np.uint8),
               "label": np.asarray(cols[s]["label"], np.int32)}
              for s in ("train", "test")]
    return splits[0], splits[1]
  # Text: the Keras IMDB conventions, with the vocabulary ranked on train.
  words = {s: [keras_tokenize(t) for t in cols[s]["text"]]
           for s in ("train", "test")}
  ranks = word_ranks(words["train"])
  raw = {s: [[ranks[w] for w in ws if w in ranks] for ws in words[s]]
         for s in ("train", "test")}
  return _text_splits(raw["train"], cols["train"]["label"],
                      raw["test"], cols["test"]["label"], cfg.num_words,
                      cfg.maxlen)


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------

def _missing_message(name: str, spec: _Spec, data_dir: Optional[str],
                     tfds_error: Optional[BaseException]) -> str:
  where = (f"{data_dir}/{spec.folder}/" if data_dir
           else f"<data_dir>/{spec.folder}/")
  lines = [f"Dataset {name!r} is not available."]
  if data_dir:
    lines.append(f"- Local: {where} does not hold "
                 f"{' and '.join(spec.files)}.")
  else:
    lines.append(f"- Local: no data directory given (--config.dataset.data_dir "
                 f"or env {DATA_DIR_ENV}).")
  if spec.tfds_name is None:
    lines.append(f"- tensorflow-datasets has no {name!r}; local files are the "
                 "only source.")
  elif tfds_error is not None:
    lines.append(f"- tensorflow-datasets could not load {spec.tfds_name!r}: "
                 f"{type(tfds_error).__name__}: {tfds_error}")
  lines.append(
      f"To run offline, put {', '.join(spec.files)} in {where} (one folder "
      f"per dataset, as in shared/data) and pass --config.dataset.data_dir="
      f"<data_dir> or set {DATA_DIR_ENV}=<data_dir>.")
  return "\n".join(lines)


def _local_present(spec: _Spec, folder: str) -> bool:
  if not os.path.isdir(folder):
    return False
  if spec.kind == "image" and spec.folder in ("cifar10", "cifar100"):
    inner = "cifar-10-batches-py" if spec.folder == "cifar10" else "cifar-100-python"
    return (os.path.isdir(os.path.join(folder, inner))
            or os.path.exists(os.path.join(folder, spec.files[0])))
  return all(_find(folder, f) is not None for f in spec.files)


def _load_local(name: str, spec: _Spec, folder: str, cfg):
  if spec.kind == "image" and name in ("mnist", "fashion_mnist"):
    return _load_idx_dataset(folder)
  if name in ("cifar10", "cifar100"):
    return _load_cifar(folder, spec.num_classes)
  if name == "imdb_reviews":
    return _load_imdb_npz(folder, cfg.num_words, cfg.maxlen)
  if name == "reuters":
    return _load_reuters_npz(folder, cfg.num_words, cfg.get("test_split", 0.2))
  raise AssertionError(name)


def _subset(split: Split, n: int) -> Split:
  return {k: v[:n] for k, v in split.items()} if n else split


def noisy_labels(labels: np.ndarray, num_classes: int, share: float,
                 seed: int = 1234) -> np.ndarray:
  """``labels`` with each one redrawn, with probability ``share``, uniformly
  over the ``num_classes`` classes (so it keeps its class ``1/num_classes``
  of those times): label noise, the same for the same seed."""
  rng = np.random.RandomState(seed)
  labels = np.array(labels, np.int32)
  flip = rng.rand(len(labels)) < share
  labels[flip] = rng.randint(0, num_classes, flip.sum())
  return labels


def permute_pixels(images: np.ndarray, seed: int) -> np.ndarray:
  """``[N, H, W, 1]`` -> ``[N, H·W, 1]`` pixel sequences in a fixed random
  order (permuted pixel-by-pixel MNIST); the same seed, the same order."""
  flat = images.reshape(images.shape[0], -1)
  order = np.random.RandomState(seed).permutation(flat.shape[1])
  return np.ascontiguousarray(flat[:, order])[..., None]


def load(cfg) -> Dataset:
  """Loads ``cfg.name`` (a ``config.dataset`` ConfigDict) into host memory.

  ``cfg.source`` is ``"auto"`` (local files when ``data_dir`` holds them,
  else tensorflow-datasets), ``"local"`` or ``"tfds"``.
  """
  name = _ALIASES.get(cfg.name, cfg.name)
  base = _DERIVED.get(name, name)
  if base not in _SPECS:
    raise ValueError(f"Unknown dataset {cfg.name!r}; known: "
                     f"{', '.join(dataset_names())}.")
  spec = _SPECS[base]
  source = cfg.get("source", "auto")
  if source not in ("auto", "local", "tfds"):
    raise ValueError(f"config.dataset.source must be auto, local or tfds; got "
                     f"{source!r}.")
  data_dir = resolve_data_dir(cfg.get("data_dir"))
  folder = os.path.join(data_dir, spec.folder) if data_dir else None

  if source != "tfds" and folder and _local_present(spec, folder):
    train, test = _load_local(base, spec, folder, cfg)
    where = folder
  elif source == "local" or spec.tfds_name is None:
    raise FileNotFoundError(_missing_message(base, spec, data_dir, None))
  else:
    try:
      train, test = _load_tfds(spec, cfg)
    except Exception as e:  # pylint: disable=broad-except
      # tfds raises many kinds (no network, missing module, ...): say what to
      # do instead, keeping the original error chained.
      raise FileNotFoundError(_missing_message(base, spec, data_dir, e)) from e
    where = f"tfds:{spec.tfds_name}"

  train = _subset(train, cfg.get("train_examples", 0))
  test = _subset(test, cfg.get("test_examples", 0))
  noise = cfg.get("label_noise", 0.0)
  if not 0.0 <= noise < 1.0:
    raise ValueError(f"config.dataset.label_noise={noise} must lie in [0, 1): "
                     "the share of training labels redrawn at random.")
  if noise:
    train = {**train, "label": noisy_labels(train["label"], spec.num_classes,
                                            noise)}
  info = {"kind": "sequence" if name == "permuted_mnist" else spec.kind}
  if name == "permuted_mnist":
    seed = cfg.get("permutation_seed", 0)
    train = {**train, "input": permute_pixels(train["input"], seed)}
    test = {**test, "input": permute_pixels(test["input"], seed)}
  if spec.kind == "text":
    info["vocab_size"] = int(cfg.num_words)
  return Dataset(name=name, train=train, test=test,
                 num_classes=spec.num_classes, source=where, info=info)


def check_labels(dataset: Dataset) -> None:
  """Integer labels outside [0, num_classes) make softmax cross-entropy
  read past the logits (NaN losses, or silently wrong scores); the data is on
  the host here, so check it once instead of on every step."""
  for split in ("train", "test"):
    labels = np.asarray(getattr(dataset, split)["label"])
    if labels.size and (labels.min() < 0 or
                        labels.max() >= dataset.num_classes):
      raise ValueError(
          f"dataset {dataset.name!r}: {split} labels span [{labels.min()}, "
          f"{labels.max()}] but the model has {dataset.num_classes} classes; "
          "labels must lie in [0, num_classes). Check the data files under "
          "--config.dataset.data_dir.")


# ----------------------------------------------------------------------------
# The data order on the device, and the epochs streamed from the host (Grain)
# ----------------------------------------------------------------------------

def epoch_permutation(key: jax.Array, epoch, n: int) -> jax.Array:
  """The order of data epoch ``epoch`` on the device: a pure function of
  ``(key, epoch)``, drawn inside the jitted program.

  ``jis.kept_first_order`` with every example kept: the same sort-based
  draw as the pruned epochs' (``jis.infobatch_order``), so that uniform and
  pruned runs pay alike for their epochs' orders; on XLA:CPU it takes a
  fifth of ``jax.random.permutation``'s time (docs/performance_notes.md,
  section 25).
  """
  return jis.kept_first_order(jax.random.fold_in(key, epoch),
                              jnp.ones((n,), bool))


def advance(epoch, offset, n, size: int):
  """Where the next batch of ``size`` starts, from position ``(epoch,
  offset)`` in epochs of ``n`` examples (traced or Python ints). Batches
  never straddle two epochs: the end of an epoch too short for a batch is
  skipped. Returns ``(epoch, start)``.
  """
  if isinstance(offset, int):
    return (epoch + 1, 0) if offset + size > n else (epoch, offset)
  new_epoch = offset + size > n
  return jnp.where(new_epoch, epoch + 1, epoch), jnp.where(new_epoch, 0, offset)


class Epoch(NamedTuple):
  """One data epoch streamed from the host: the examples to load, in order.

  Attributes:
    order: ``[M]`` dataset indices; each presample is the next ``B`` of them
      (the last ``M mod B`` are not loaded).
    weights: ``[M]`` float32 loss weights given with them (a loader that
      pruned examples rescales the others), or None.
  """
  order: np.ndarray
  weights: Optional[np.ndarray] = None

  def steps(self, size: int) -> int:
    return len(self.order) // size


def shuffled_epoch(num_examples: int, seed: int, epoch: int) -> Epoch:
  """Every example once, in the order ``numpy.random.default_rng((seed,
  epoch))`` permutes them: a pure function of the seed and the epoch.

  (One vectorized permutation per epoch: Grain's ``MapDataset.shuffle`` and
  ``batch`` work index by index in Python, about 12 times slower here for
  presamples of hundreds of rows; docs/experiments.md, Data.)
  """
  return Epoch(np.random.default_rng((seed, epoch)).permutation(num_examples))


class ReadRows:
  """The Grain transform that loads a presample: the split's rows at the
  element's ``"index"``, added to the element. Only these rows are read."""

  def __init__(self, split: Split):
    self.split = split

  def __call__(self, element: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    index = element["index"]
    return {**{k: v[index] for k, v in self.split.items()}, **element}


def presamples(epoch: Epoch, size: int, rows: slice, read: ReadRows):
  """The epoch as a ``grain.MapDataset`` of presamples, one per step: element
  ``j`` is this process's ``rows`` of the ``j``-th ``size`` examples of
  ``epoch.order``, loaded by ``read``, with their ``"index"`` (for
  ``jis.stale_scores``) and ``"weight"`` when the epoch has weights."""
  import grain  # pylint: disable=g-import-not-at-top  (only streamed runs)

  def rows_of(j: int) -> Dict[str, np.ndarray]:
    part = slice(j * size + rows.start, j * size + rows.stop)
    element = {"index": epoch.order[part].astype(np.int32)}
    if epoch.weights is not None:
      element["weight"] = epoch.weights[part].astype(np.float32)
    return element
  return grain.MapDataset.range(epoch.steps(size)).map(rows_of).map(read)
