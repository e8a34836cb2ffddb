"""Helpers for the experiments tests: tiny datasets in the real file formats.

``write_fake_data(root)`` writes, under ``root``, one folder per dataset in
the layout of shared/data (IDX ``.gz`` files, CIFAR python pickles, Keras
``.npz``), with random contents, so the local loaders and whole runs can be
tested without the real files.
"""

import atexit
import gzip
import os
import pickle
import shutil
import struct
import tempfile

import numpy as np


def repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shared_data_dir():
  """The real datasets: $JIS_DATA_DIR, else ../shared/data from the repo root;
  None when neither holds them."""
  for candidate in (os.environ.get("JIS_DATA_DIR"),
                    os.path.join(repo_root(), "..", "shared", "data")):
    if candidate and os.path.isdir(os.path.join(candidate, "mnist")):
      return os.path.abspath(candidate)
  return None


def tiny_config(data_dir, **overrides):
  """mnist_mlp:runlocal on tiny data: b = 8, B = 24, dropout on, importance
  sampling from the first step."""
  from experiments.configs import mnist_mlp  # pylint: disable=g-import-not-at-top
  c = mnist_mlp.get_config("runlocal")
  c.dataset.data_dir = data_dir
  c.batch_size = 8
  c.model.features = (16,)
  c.sampler.tau_threshold = 0.0
  c.num_steps = 6
  c.steps_per_dispatch = 4
  c.log_every_steps = 2
  c.eval_every_steps = 0
  c.eval_batch_size = 32
  c.checkpoint_every_steps = 0
  c.progress_bar = False
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def write_idx(path: str, array: np.ndarray) -> None:
  codes = {np.dtype(np.uint8): 0x08}
  header = bytes([0, 0, codes[array.dtype], array.ndim])
  header += b"".join(struct.pack(">I", d) for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def _images(rng, n, shape):
  return rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)


def write_fake_data(root: str, n_train: int = 96, n_test: int = 48,
                    seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  for name in ("mnist", "fashion_mnist"):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
      write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"),
                _images(rng, n, (28, 28)))
      write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"),
                rng.integers(0, 10, size=n, dtype=np.uint8))

  def cifar_batch(n, label_key, classes):
    return {b"data": _images(rng, n, (3072,)),
            label_key: rng.integers(0, classes, size=n).tolist()}

  folder = os.path.join(root, "cifar10", "cifar-10-batches-py")
  os.makedirs(folder, exist_ok=True)
  per_batch = -(-n_train // 5)
  for i in range(1, 6):
    with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
      pickle.dump(cifar_batch(per_batch, b"labels", 10), f)
  with open(os.path.join(folder, "test_batch"), "wb") as f:
    pickle.dump(cifar_batch(n_test, b"labels", 10), f)
  folder = os.path.join(root, "cifar100", "cifar-100-python")
  os.makedirs(folder, exist_ok=True)
  for name, n in (("train", n_train), ("test", n_test)):
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump(cifar_batch(n, b"fine_labels", 100), f)

  def sequences(n, vocab):
    out = np.empty(n, dtype=object)
    for i in range(n):
      out[i] = rng.integers(1, vocab, size=int(rng.integers(5, 40))).tolist()
    return out

  os.makedirs(os.path.join(root, "imdb"), exist_ok=True)
  np.savez(os.path.join(root, "imdb", "imdb.npz"),
           x_train=sequences(n_train, 5000),
           y_train=rng.integers(0, 2, size=n_train),
           x_test=sequences(n_test, 5000),
           y_test=rng.integers(0, 2, size=n_test))
  os.makedirs(os.path.join(root, "reuters"), exist_ok=True)
  n_all = int((n_train + n_test) * 1.0)
  np.savez(os.path.join(root, "reuters", "reuters.npz"),
           x=sequences(n_all, 3000), y=rng.integers(0, 46, size=n_all))
  return root


_SESSION_CACHE = []


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a subprocess with ``devices`` CPU devices, keeping the
  test session's other flags (``conftest.py``: cheap compiling)."""
  count = "--xla_force_host_platform_device_count"
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith(count + "=")]
  return " ".join([f"{count}={devices}"] + kept)


def session_cache_dir() -> str:
  """One JAX compilation cache for all the experiments tests of a process
  (and the subprocesses they start), removed at exit."""
  if not _SESSION_CACHE:
    _SESSION_CACHE.append(tempfile.mkdtemp(prefix="jis-jax-cache-"))
    atexit.register(shutil.rmtree, _SESSION_CACHE[0], ignore_errors=True)
  return _SESSION_CACHE[0]


def cache_env(env=None) -> dict:
  """``env`` (default os.environ) with the session cache for a subprocess."""
  env = dict(os.environ if env is None else env)
  env.update(JAX_COMPILATION_CACHE_DIR=session_cache_dir(),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


class persistent_compilation_cache:
  """Context manager: JAX's persistent compilation cache in ``directory``.

  The experiments tests run the same small programs several times (a run, its
  resumption, a comparison run); with the cache only the first run compiles.
  The previous settings are restored on exit.
  """

  _OPTIONS = {"jax_compilation_cache_dir": None,
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}

  def __init__(self, directory: str = None):
    directory = directory or session_cache_dir()
    self._values = dict(self._OPTIONS, jax_compilation_cache_dir=directory)
    self._saved = {}

  def _reset(self):
    try:
      from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
      compilation_cache.reset_cache()
    except (ImportError, AttributeError):
      pass

  def __enter__(self):
    import jax  # pylint: disable=g-import-not-at-top
    for name, value in self._values.items():
      self._saved[name] = getattr(jax.config, name)
      jax.config.update(name, value)
    self._reset()
    return self

  def __exit__(self, *exc):
    import jax  # pylint: disable=g-import-not-at-top
    for name, value in self._saved.items():
      jax.config.update(name, value)
    self._reset()
    return False
