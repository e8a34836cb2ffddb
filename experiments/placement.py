"""Where the run's arrays live: one device, or a ``data`` mesh over all devices.

:meth:`Placement.from_config` chooses once; the loop then asks the placement,
never ``if mesh is None``. With several processes the mesh spans every
process's devices (``jax.make_mesh`` orders them by process), so each
process's rows of a presample are one block of it: the block it loads when
batches stream from the host (:meth:`Placement.process_rows`).
"""

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

P = jax.sharding.PartitionSpec


@dataclasses.dataclass(frozen=True)
class Placement:
  """One device (``mesh`` None) or data parallelism over ``mesh``'s ``data``
  axis: the state replicated, each presample split over the devices."""
  mesh: Optional[jax.sharding.Mesh]
  device: Optional[Any] = None   # the one device when mesh is None

  @classmethod
  def from_config(cls, config) -> "Placement":
    """``config.num_devices`` devices (0: all); every device of every process
    when the run has several processes."""
    devices = jax.devices()
    n = config.get("num_devices", 0) or len(devices)
    if n > len(devices):
      raise ValueError(f"config.num_devices={n} but only {len(devices)} "
                       "devices are visible.")
    if jax.process_count() > 1:
      if n != len(devices):
        raise ValueError(
            f"config.num_devices={n}: a run of {jax.process_count()} processes "
            f"trains on all {len(devices)} of their devices; set "
            "--config.num_devices=0.")
      return cls(jax.make_mesh((n,), ("data",),
                               axis_types=(jax.sharding.AxisType.Auto,)))
    if n == 1:
      return cls(None, devices[0])
    return cls(jax.sharding.Mesh(np.array(devices[:n]), ("data",)))

  @property
  def num_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.size

  def _sharding(self, spec: P) -> jax.sharding.Sharding:
    if self.mesh is None:
      return jax.sharding.SingleDeviceSharding(self.device)
    return jax.sharding.NamedSharding(self.mesh, spec)

  @property
  def replicated(self) -> jax.sharding.Sharding:
    return self._sharding(P())

  def splits(self, size: int) -> bool:
    """Whether ``size`` examples split evenly over several devices."""
    return self.mesh is not None and size % self.mesh.size == 0

  def chunk_sharding(self, size: int) -> jax.sharding.Sharding:
    """A streamed chunk ``[k, size, ...]``: its examples over the devices."""
    return self._sharding(P(None, "data")) if self.splits(size) else (
        self.replicated)

  def constrain(self, batch):
    """Inside ``jit``: ``batch``'s examples split over the devices."""
    size = jax.tree.leaves(batch)[0].shape[0]
    if not self.splits(size):
      return batch
    return jax.lax.with_sharding_constraint(batch, self._sharding(P("data")))

  def process_rows(self, size: int) -> slice:
    """The rows of a streamed ``[k, size, ...]`` chunk that this process's
    devices hold: the slice of each presample it loads."""
    indices = self.chunk_sharding(size).addressable_devices_indices_map(
        (1, size))
    spans = {idx[1].indices(size)[:2] for idx in indices.values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
      raise ValueError("This process's devices hold rows of the presample "
                       f"that are not one block ({sorted(spans)}); build the "
                       "mesh with jax.make_mesh, which orders devices by "
                       "process.")
    return slice(start, stop)

  def global_chunk(self, local, size: int):
    """This process's rows of a streamed chunk -> the global ``[k, size, ...]``
    arrays on the devices."""
    sharding = self.chunk_sharding(size)
    if jax.process_count() == 1:
      return jax.device_put(local, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, x, (x.shape[0], size) + x.shape[2:]), local)


def fetch_replicated(x) -> np.ndarray:
  """A replicated array's value, from this process's own copy (``np.asarray``
  of an array on several processes' devices fails, and would move data)."""
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)
