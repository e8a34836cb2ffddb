"""Mesh mechanics for data parallelism: layouts, placement, per-device code.

The train step stays a global-view program that jit and the GSPMD partitioner
split over the mesh, so the user's ``train_step`` and ``logits_fn`` run
unmodified with any parameter sharding (replicated, FSDP, tensor-parallel).
This module holds what :mod:`jis._placement` builds its ``"global"`` and
``"local"`` placements from: the resolved :class:`Layout`, sharding
constraints and ``device_put`` that keep jit's cache to one entry,
``shard_map`` over the data axis only, the row exchange of global resampling
(one reduce-scatter, about ``b`` rows of traffic per device whatever ``B``
is; a naive ``jnp.take`` of a sharded presample lets the partitioner
all-gather or all-reduce much more), and chunked scoring.

Everything else (τ, the switch condition, score transforms, metrics) is
computed in the global view from all ``B`` scores; the partitioner turns the
reductions into scalar all-reduces, so every device takes the same branch of
the ``lax.cond``.
"""

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jis import _validate

Array = jax.Array
PyTree = Any
AxisName = Union[str, Tuple[str, ...]]

RESAMPLE_MODES = ("global", "local")


class Layout(NamedTuple):
  """Where the presample lives and how it is resampled (resolved options).

  Attributes:
    mesh: the device mesh, or None for one device (no sharding logic at all).
    axis: the mesh axis name(s) the presample's leading dimension is split on.
    devices: ``d``, the number of devices along ``axis`` (1 without a mesh).
    resample: ``"global"`` or ``"local"``.
    forward_batch_size: examples per scoring forward pass, or None for one
      pass over the whole presample.
    presample_size: ``B``.
  """
  mesh: Optional[Mesh]
  axis: AxisName
  devices: int
  resample: str
  forward_batch_size: Optional[int]
  presample_size: int


def _axis_tuple(axis: AxisName) -> Tuple[str, ...]:
  return (axis,) if isinstance(axis, str) else tuple(axis)


def resolve_layout(mesh: Optional[Mesh], data_axis: AxisName, resample: str,
                   presample_size: int, batch_size: int,
                   forward_batch_size: Optional[int]) -> Layout:
  """Validates the data-parallel options of ``importance_step`` once."""
  _validate.one_of("resample", resample, RESAMPLE_MODES)
  f = None if forward_batch_size is None else _validate.number(
      "forward_batch_size", forward_batch_size, 1, integer=True,
      hint="(None scores the whole presample in one pass)")
  big_b, b = presample_size, batch_size
  if f is not None and big_b % f:
    raise ValueError(
        f"forward_batch_size={f} must divide the presample size B={big_b} "
        f"(round(presample * batch_size)): the presample is scored in B / "
        f"forward_batch_size equal chunks. Pick a divisor of {big_b}.")

  if mesh is None:
    if resample == "local":
      raise ValueError(
          "resample='local' resamples within each device's shard of the "
          "presample, so it needs the mesh: pass mesh=jax.make_mesh((n,), "
          "('data',)) (and data_axis= if your axis has another name).")
    return Layout(None, data_axis, 1, resample, f, big_b)

  axes, d = _data_axes(mesh, data_axis)
  _check_divisible(d, data_axis, big_b, b, f)
  return Layout(mesh, data_axis if isinstance(data_axis, str) else axes, d,
                resample, f, big_b)


def _data_axes(mesh: Mesh, data_axis: AxisName):
  """``(axes, d)``: ``data_axis`` as a tuple of the mesh's axis names, and
  the number of devices along them."""
  if not isinstance(mesh, Mesh):
    raise TypeError("mesh must be a jax.sharding.Mesh such as "
                    f"jax.make_mesh((8,), ('data',)); got {type(mesh).__name__}.")
  if not (isinstance(data_axis, str) or (
      isinstance(data_axis, (tuple, list))
      and all(isinstance(a, str) for a in data_axis))):
    raise TypeError("data_axis must be a mesh axis name or a tuple of names; "
                    f"got {data_axis!r}.")
  axes = _axis_tuple(data_axis)
  missing = [a for a in axes if a not in mesh.axis_names]
  if not axes or missing:
    raise ValueError(
        f"data_axis={data_axis!r} is not an axis of the mesh, whose axes are "
        f"{list(mesh.axis_names)}. Pass data_axis=<the axis the presample is "
        "split over>.")
  return axes, int(np.prod([mesh.shape[a] for a in axes]))


def _check_divisible(d: int, data_axis: AxisName, big_b: int, b: int,
                     f: Optional[int]) -> None:
  """Every device must get an equal share of the presample, of the batch and
  of each scoring pass."""
  if big_b % d:
    raise ValueError(
        f"The presample size B={big_b} is not divisible by the {d} devices on "
        f"mesh axis {data_axis!r}: every device must score B / {d} examples. "
        f"Change presample or batch_size so that round(presample * "
        f"batch_size) is a multiple of {d}.")
  if b % d:
    raise ValueError(
        f"batch_size={b} is not divisible by the {d} devices on mesh axis "
        f"{data_axis!r}: every device must train on batch_size / {d} "
        f"examples. Use a batch_size that is a multiple of {d}.")
  if f is not None and f % d:
    raise ValueError(
        f"forward_batch_size={f} is not divisible by the {d} devices on mesh "
        f"axis {data_axis!r}: each scoring pass gives every device "
        f"forward_batch_size / {d} examples. Use a multiple of {d}.")


# ------------------------------------------------------------------ placement


def _explicit(layout: Layout) -> bool:
  types = dict(zip(layout.mesh.axis_names, layout.mesh.axis_types))
  return any(types[a] == AxisType.Explicit for a in _axis_tuple(layout.axis))


def _spec(layout: Layout, ndim: int, dim: Optional[int]) -> P:
  """The spec jit gives back for this placement, so that a state placed with
  it does not make a second entry in jit's dispatch cache: explicit meshes
  spell out every dimension, auto meshes drop trailing Nones."""
  entries = [None] * ndim
  if dim is not None:
    entries[dim] = layout.axis
  if not _explicit(layout):
    while entries and entries[-1] is None:
      entries.pop()
  return P(*entries)


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _constrain(x: Array, layout: Layout, dim: Optional[int]) -> Array:
  """``x`` split over the data axis along ``dim``, or replicated (None)."""
  ndim = np.ndim(x)
  if _explicit(layout):
    # In explicit mode shardings are types; keep what other axes (a "model"
    # axis) already shard, and only move the data axis.
    current = list(jax.typeof(x).sharding.spec) if dim is not None else []
    current += [None] * (ndim - len(current))
    spec = [None] * ndim
    if dim is not None:
      spec[dim + 1:] = current[dim + 1:]
      spec[dim] = layout.axis
    return jax.sharding.reshard(x, NamedSharding(layout.mesh, P(*spec)))
  if dim is None:
    spec = P()
  else:
    spec = P(*([None] * dim + [layout.axis]
               + [P.UNCONSTRAINED] * (ndim - dim - 1)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))


def constrain(tree: PyTree, layout: Layout, dim: Optional[int]) -> PyTree:
  """Every leaf of ``tree`` split over the data axis along ``dim`` (None:
  replicated). Only a mesh placement calls these (``_placement``)."""
  return jax.tree.map(lambda x: _constrain(x, layout, dim), tree)


def _put(x, layout: Layout, dim: Optional[int]):
  if _is_tracer(x):
    return _constrain(x, layout, dim)
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    # device_put cannot place a typed key on other processes' devices (jax
    # 0.10); its uint32 data it can.
    data = jax.random.key_data(x)
    data = jax.device_put(data, NamedSharding(
        layout.mesh, _spec(layout, data.ndim, dim)))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  # With several processes, device_put checks that they all pass equal values.
  return jax.device_put(x, NamedSharding(layout.mesh,
                                         _spec(layout, np.ndim(x), dim)))


def place(tree: PyTree, layout: Layout, dim: Optional[int]) -> PyTree:
  """Like :func:`constrain`, outside jit too (``jax.device_put``)."""
  return jax.tree.map(lambda x: _put(x, layout, dim), tree)


def place_train_state(tree: PyTree, layout: Layout) -> PyTree:
  """Replicates the leaves of the user's state that are not yet on the mesh.

  Leaves the user already placed on the mesh (replicated or sharded, FSDP or
  tensor-parallel) keep their sharding.
  """

  def put(x):
    if _is_tracer(x) or not isinstance(x, jax.Array):
      return x
    sharding = x.sharding
    if isinstance(sharding, NamedSharding) and sharding.mesh == layout.mesh:
      return x
    return _put(x, layout, None)
  return jax.tree.map(put, tree)


def shard_presample(batch: PyTree, mesh: Mesh,
                    data_axis: AxisName = "data") -> PyTree:
  """A global presample, split over ``data_axis``, from this process's rows.

  With one process ``batch`` is the whole presample and this is a
  ``jax.device_put``. With several (``jax.distributed``), each process passes
  its own ``B / jax.process_count()`` rows and the result is one global
  ``jax.Array`` per leaf (by ``jax.make_array_from_process_local_data``)
  whose leading dimension is ``B``: pass it to the jitted ``step`` as on one
  device. A process's rows become the block its devices hold; with
  ``jax.make_mesh``, whose devices are ordered by process, process ``i``'s
  rows are rows ``[i B / P, (i + 1) B / P)`` of the global presample.

  Args:
    batch: a pytree of process-local arrays with a common leading dimension.
    mesh: the device mesh the sampler was built with.
    data_axis: the mesh axis (or axes) the presample is split over.

  Returns:
    The same pytree of global arrays sharded ``P(data_axis)`` on ``mesh``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import jis
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> batch = jis.shard_presample(
    ...     {"x": jnp.ones((16, 3)), "label": jnp.arange(16) % 2}, mesh)
    >>> batch["x"].shape, batch["x"].sharding.spec
    ((16, 3), P('data',))
    >>> def train_step(params, batch, weights):
    ...   def loss_fn(p):
    ...     losses = optax.softmax_cross_entropy_with_integer_labels(
    ...         batch["x"] @ p, batch["label"])
    ...     return jnp.mean(weights * losses)
    ...   return params - 0.1 * jax.grad(loss_fn)(params), {}
    >>> sampler = jis.importance_step(
    ...     train_step, lambda params, batch: batch["x"] @ params,
    ...     batch_size=8, presample=2.0, tau_threshold=0.0, mesh=mesh)
    >>> state = sampler.init(jnp.zeros((3, 2)), jax.random.key(0))
    >>> state, metrics = jax.jit(sampler.step)(state, batch)
    >>> int(state.step), state.inner.sharding.is_fully_replicated
    (1, True)
  """
  axis = data_axis if isinstance(data_axis, str) else tuple(data_axis)
  sharding = NamedSharding(mesh, P(axis))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# ------------------------------------------------------------------ per device


def shard_map(layout: Layout, fn: Callable, in_specs, out_specs):
  # Manual only over the data axis: other mesh axes stay under the
  # partitioner's control.
  mapped = jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs,
                         out_specs=out_specs,
                         axis_names=set(_axis_tuple(layout.axis)))

  def call(*args):
    # Explicit meshes require the inputs to arrive as in_specs say; a
    # presample placed otherwise is moved (a no-op when it already is).
    return mapped(*(constrain(arg, layout, None if spec == P() else 0)
                    for arg, spec in zip(args, in_specs)))
  return call


def exchange_rows(batch: PyTree, indices: Array, layout: Layout) -> PyTree:
  """``batch[indices]`` split over the data axis, by one reduce-scatter.

  ``indices`` (``[b]``, the same on every device) are global positions in the
  presample; every device gathers the selected rows it holds, zeros the rest,
  and ``psum_scatter`` sums the ``d`` partial ``[b, ...]`` arrays and hands
  each device its ``b / d`` rows. Exactly one device holds each row, so the
  sum adds zeros to it: the rows arrive unchanged.
  """
  axis = layout.axis

  def per_device(batch, indices):
    n = jax.tree.leaves(batch)[0].shape[0]
    local = indices - jax.lax.axis_index(axis) * n
    mine = (local >= 0) & (local < n)
    safe = jnp.clip(local, 0, n - 1)

    def one(x):
      rows = jnp.take(x, safe, axis=0)
      keep = mine.reshape((-1,) + (1,) * (rows.ndim - 1))
      as_sum = rows.astype(jnp.int32) if rows.dtype == jnp.bool_ else rows
      rows = jnp.where(keep, as_sum, jnp.zeros_like(as_sum))
      rows = jax.lax.psum_scatter(rows, axis, scatter_dimension=0, tiled=True)
      return rows.astype(x.dtype)
    return jax.tree.map(one, batch)
  return shard_map(layout, per_device, (P(axis), P()), P(axis))(batch, indices)


def score_in_chunks(score_fn: Callable[[PyTree], Array], batch: PyTree,
                    layout: Layout) -> Array:
  """``score_fn(batch)``, evaluated ``forward_batch_size`` examples at a time.

  On one device chunk ``j`` holds examples ``j f … (j + 1) f − 1``. On a
  mesh, chunk ``j`` holds examples ``j, j + c, j + 2c, …`` (``c`` chunks): with the
  presample split in ``d`` consecutive blocks, every chunk then takes
  ``forward_batch_size / d`` examples from each device, so each device scores
  its own rows in ``c`` passes of ``forward_batch_size / d`` and nothing moves
  between devices. Scores are per example, so chunking changes no value.
  """
  n = jax.tree.leaves(batch)[0].shape[0]
  f = layout.forward_batch_size
  if f is None or f >= n:
    return score_fn(batch)
  c = n // f
  if layout.mesh is None:
    # One device: consecutive chunks, each sliced from the batch inside the
    # loop. (The strided split below copies the whole presample into a
    # transposed layout; even a reshape to [c, f, ...] made XLA:CPU copy a
    # [B, 28, 28, 1] presample whole before the loop: measured by
    # experiments/benchmarks/scoring_scale.py.)
    def chunk(j):
      return score_fn(jax.tree.map(
          lambda x: jax.lax.dynamic_slice_in_dim(x, j * f, f), batch))
    return jax.lax.map(chunk, jnp.arange(c)).reshape(n)

  def split(x):
    chunks = jnp.swapaxes(x.reshape((f, c) + x.shape[1:]), 0, 1)
    return _constrain(chunks, layout, 1)
  scores = jax.lax.map(score_fn, jax.tree.map(split, batch))   # [c, f]
  return _constrain(jnp.swapaxes(scores, 0, 1).reshape(n), layout, 0)
