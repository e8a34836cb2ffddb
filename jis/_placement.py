"""Where the presample lives: one object, chosen once, with one interface.

:func:`make` resolves the data-parallel options of ``importance_step`` into a
:class:`Placement`, a NamedTuple of functions that the step calls without
knowing which of three placements it has:

* one device (``mesh=None``): the presample is arrays or a :class:`jis.Indexed`
  dataset-with-indices; positions index it directly;
* ``resample="global"``: the presample is split over a mesh axis; every
  device draws the same ``b`` positions from all ``B`` scores (the
  single-device algorithm, bit for bit) and one reduce-scatter moves the
  selected rows (``jis._sharding.exchange_rows``);
* ``resample="local"``: each device draws ``b / d`` of its own ``B / d`` rows,
  with weights normalised within its shard (stratified sampling); no row
  leaves its device.

Positions are always global presample positions, so that what the step does
with them (metrics, the score table) does not depend on the placement.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jis import _indexed
from jis import _policies
from jis import _sharding

Array = jax.Array
PyTree = Any


class Placement(NamedTuple):
  """The placement's functions (see the module docstring).

  Attributes:
    layout: the resolved :class:`jis._sharding.Layout`.
    check: ``batch -> None``, trace-time checks of a presample.
    init_policy: ``(policy, B, b) -> state`` (one per device for ``local``).
    select: ``(policy, key, scores [B], state, n) -> Selection`` with global
      positions.
    uniform: ``n -> [n]`` the positions a uniform step trains on.
    gather: ``(batch, positions [n]) -> rows``, split over the data axis.
    score: ``(score_fn, batch) -> [B]``, ``forward_batch_size`` rows at a time.
    observe: ``(policy, scores, state) -> state`` on uniform steps.
    put: ``(tree, dim) -> tree``: split over the data axis along ``dim``, or
      replicated (None); inside jit a constraint, outside a ``device_put``.
    put_train_state: the user's state, leaves already on the mesh untouched.
    policy_dim: the axis of the policy state split over devices, or None.
  """
  layout: _sharding.Layout
  check: Callable[[PyTree], None]
  init_policy: Callable[..., PyTree]
  select: Callable[..., _policies.Selection]
  uniform: Callable[[int], Array]
  gather: Callable[[PyTree, Array], PyTree]
  score: Callable[[Callable, PyTree], Array]
  observe: Callable[..., PyTree]
  put: Callable[[PyTree, Optional[int]], PyTree]
  put_train_state: Callable[[PyTree], PyTree]
  policy_dim: Optional[int]


def make(mesh, data_axis, resample: str, presample_size: int, batch_size: int,
         forward_batch_size: Optional[int]) -> Placement:
  """Validates the data-parallel options and returns their placement."""
  layout = _sharding.resolve_layout(mesh, data_axis, resample, presample_size,
                                    batch_size, forward_batch_size)
  if layout.mesh is None:
    return _one_device(layout)
  return _global(layout) if layout.resample == "global" else _local(layout)


def _check_arrays(batch, layout) -> None:
  if isinstance(batch, _indexed.Indexed):
    raise ValueError(
        "jis.Indexed presamples run on one device (mesh=None). With a mesh, "
        "gather the presample rows yourself and pass them as arrays.")


def _score(layout):
  def score(score_fn, batch):
    if isinstance(batch, _indexed.Indexed):   # chunk the indices, not rows
      return _sharding.score_in_chunks(
          lambda index: score_fn(_indexed.presample_rows(
              _indexed.Indexed(batch.data, index))), batch.index, layout)
    return _sharding.score_in_chunks(score_fn, batch, layout)
  return score


def _no_put(tree, dim=None):
  return tree


def _one_device(layout) -> Placement:
  return Placement(
      layout=layout,
      check=lambda batch: None,
      init_policy=lambda policy, big_b, b: policy.init(big_b, b),
      select=lambda policy, key, scores, state, n: policy.select(
          key, scores, state, n),
      uniform=lambda n: jnp.arange(n, dtype=jnp.int32),
      gather=_indexed.take,
      score=_score(layout),
      observe=lambda policy, scores, state: policy.observe(scores, state),
      put=_no_put, put_train_state=_no_put, policy_dim=None)


def _mesh_functions(layout):
  put = lambda tree, dim=None: _sharding.place(tree, layout, dim)
  return dict(layout=layout,
              check=lambda batch: _check_arrays(batch, layout),
              score=_score(layout), put=put,
              put_train_state=lambda tree: _sharding.place_train_state(
                  tree, layout))


def _global(layout) -> Placement:
  def select(policy, key, scores, state, n):
    scores = _sharding.constrain(scores, layout, None)   # all-gather of 4B bytes
    sel = policy.select(key, scores, state, n)
    return sel._replace(
        indices=_sharding.constrain(sel.indices.astype(jnp.int32), layout, None),
        weights=_sharding.constrain(jnp.asarray(sel.weights, jnp.float32),
                                    layout, 0))

  return Placement(
      init_policy=lambda policy, big_b, b: policy.init(big_b, b),
      select=select,
      uniform=lambda n: jnp.arange(n, dtype=jnp.int32),
      gather=lambda batch, positions: _sharding.exchange_rows(
          batch, positions, layout),
      observe=lambda policy, scores, state: policy.observe(scores, state),
      policy_dim=None, **_mesh_functions(layout))


def _local(layout) -> Placement:
  """``resample="local"``: each of the ``d`` devices draws ``b/d`` of its own
  ``B/d`` presampled rows (inside ``shard_map``), with its own policy state,
  so no row crosses devices; positions are global (device ``i``'s block
  starts at ``i·B/d``)."""
  axis, d = layout.axis, layout.devices
  per_device = lambda fn, in_specs, out_specs: _sharding.shard_map(
      layout, fn, in_specs, out_specs)
  unstack = lambda state: jax.tree.map(lambda x: x[0], state)
  stack = lambda state: jax.tree.map(lambda x: x[None], state)

  def init_policy(policy, big_b, b):
    state = policy.init(big_b // d, b // d)
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (d,) + np.shape(x)), state)

  def select(policy, key, scores, state, n):
    def draw(key, scores, state):
      shard = jax.lax.axis_index(axis)
      # The global scores are usable (jis checked them); a shard may still be
      # all zeros, and then any distribution over it is unbiased: uniform.
      scores = jnp.where(jnp.max(scores) > 0, scores, jnp.ones_like(scores))
      sel = policy.select(jax.random.fold_in(key, shard), scores,
                          unstack(state), n // d)
      return (sel.indices.astype(jnp.int32) + shard * scores.shape[0],
              jnp.asarray(sel.weights, jnp.float32), sel.probs / d,
              stack(sel.state))
    indices, weights, probs, state = per_device(
        draw, (P(), P(axis), P(axis)), P(axis))(key, scores, state)
    return _policies.Selection(indices, weights, probs, state)

  def uniform(n):
    # The first n / d rows of every device's block of B / d.
    return _sharding.constrain(jnp.asarray(
        (np.arange(d)[:, None] * (layout.presample_size // d)
         + np.arange(n // d)[None, :]).reshape(-1), jnp.int32), layout, 0)

  def gather(batch, positions):
    def take(batch, positions):
      n = jax.tree.leaves(batch)[0].shape[0]
      local = positions - jax.lax.axis_index(axis) * n
      return jax.tree.map(lambda x: jnp.take(x, local, axis=0), batch)
    return per_device(take, (P(axis), P(axis)), P(axis))(batch, positions)

  def observe(policy, scores, state):
    return per_device(
        lambda scores, state: stack(policy.observe(scores, unstack(state))),
        (P(axis), P(axis)), P(axis))(scores, state)

  return Placement(init_policy=init_policy, select=select, uniform=uniform,
                   gather=gather, observe=observe, policy_dim=0,
                   **_mesh_functions(layout))
