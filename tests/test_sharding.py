"""Data parallelism over the 8 virtual CPU devices that conftest.py sets up.

References: the single-device algorithm (global mode must reproduce it), the
presample-mean gradient (local mode must be unbiased for it), the unchunked
scores (forward_batch_size must not change them) and a Python loop (lax.scan).
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jis
import jaxpr_testing
import linear_testing as linear

DIM, CLASSES, PAD = 6, 4, 11   # PAD: a batch leaf only a metric reads (traffic probe)
B, b = 32, 16


def _train_step(params, batch, weights):
  """SGD on a linear softmax classifier; reports which examples it trained on."""
  params, metrics = linear.train_step(params, batch, weights)
  return params, {**metrics, "ids": batch["id"], "pad": jnp.sum(batch["pad"])}


_logits = linear.logits


def _presample(n=B, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (n, DIM)),
          "label": jax.random.randint(ky, (n,), 0, CLASSES),
          "id": jnp.arange(n, dtype=jnp.int32),
          "pad": jnp.zeros((n, PAD), jnp.float32)}


def _params(seed=1):
  return 0.5 * jax.random.normal(jax.random.key(seed), (DIM, CLASSES))


def _mesh(axis_type=AxisType.Auto):
  assert jax.device_count() == 8, "conftest.py should give 8 CPU devices"
  return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


def _sampler(mesh=None, **kw):
  kw.setdefault("condition", jis.warmup(2))   # two uniform steps, then IS
  kw.setdefault("diagnostics", True)
  return jis.importance_step(_train_step, _logits, batch_size=b,
                             presample=B / b, mesh=mesh, **kw)


def _train(sampler, mesh=None, steps=5, params=None, key=None):
  state = sampler.init(_params() if params is None else params,
                       jax.random.key(0) if key is None else key)
  step = jax.jit(sampler.step)
  history = []
  for i in range(steps):
    batch = _presample(seed=10 + i)
    if mesh is not None:
      batch = jis.shard_presample(batch, mesh)
    state, metrics = step(state, batch)
    history.append(jax.tree.map(np.asarray, metrics))
  return state, history, step


# ---------------------------------------------------------------- global mode


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_global_mode_on_8_devices_matches_one_device(axis_type):
  mesh = _mesh(axis_type)
  ref, ref_hist, _ = _train(_sampler())
  state, hist, _ = _train(_sampler(mesh, resample="global"), mesh)
  assert [float(m["is/active"]) for m in hist] == [0, 0, 1, 1, 1]
  for m, m_ref in zip(hist, ref_hist):
    # The same examples, drawn from the same global distribution...
    np.testing.assert_array_equal(m["ids"], m_ref["ids"])
    for name in ("loss", "is/ess", "is/entropy", "is/tau", "is/max_weight"):
      np.testing.assert_allclose(m[name], m_ref[name], rtol=1e-5, err_msg=name)
  # ...so the same parameters, to float tolerance (reductions are reordered).
  np.testing.assert_allclose(state.inner, ref.inner, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.tau, ref.tau, rtol=1e-5)
  assert state.inner.sharding.is_fully_replicated


@pytest.mark.parametrize("resample", ["global", "local"])
def test_low_precision_scoring_on_8_devices(resample):
  # jis.low_precision's rewrite runs inside the per-device scoring too: the
  # sampled examples follow the bfloat16 scores exactly as on one device.
  mesh = _mesh()
  low = lambda mesh_=None, **kw: jis.importance_step(
      _train_step, jis.low_precision(_logits), batch_size=b, presample=B / b,
      mesh=mesh_, condition=jis.warmup(2), **kw)
  state, hist, step = _train(low(mesh, resample=resample), mesh)
  assert [float(m["is/active"]) for m in hist] == [0, 0, 1, 1, 1]
  # The per-device body of the step scores in bfloat16 (the training
  # products stay float32).
  products = jaxpr_testing.product_operand_dtypes(jax.make_jaxpr(step)(
      state, jis.shard_presample(_presample(), mesh)).jaxpr)
  assert ("bfloat16", "bfloat16") in products
  assert ("float32", "float32") in products
  if resample == "global":
    ref, ref_hist, _ = _train(low())
    for m, m_ref in zip(hist, ref_hist):
      np.testing.assert_array_equal(m["ids"], m_ref["ids"])
    np.testing.assert_allclose(state.inner, ref.inner, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("resample", ["global", "local"])
def test_batches_of_b_rows_on_8_devices_train_as_on_one(resample):
  """The uniform steps of a scheduled loop take the b rows split over the
  devices; the run matches the 1-device run that feeds presamples."""
  mesh = _mesh()
  sampler = _sampler(mesh, resample=resample, uniform_batches=True)
  ref, ref_hist, _ = _train(_sampler(), steps=3)
  state = sampler.init(_params(), jax.random.key(0))
  rows, step = jis.presample_schedule(sampler), jax.jit(sampler.step)
  sizes = []
  for i in range(3):
    sizes.append(rows(state))
    batch = jax.tree.map(lambda x: x[:sizes[-1]], _presample(seed=10 + i))
    state, metrics = step(state, jis.shard_presample(batch, mesh))
  assert sizes == [b, b, B]   # warmup(2): two uniform steps, then IS
  if resample == "global":
    np.testing.assert_array_equal(metrics["ids"], ref_hist[-1]["ids"])
    np.testing.assert_allclose(state.inner, ref.inner, rtol=1e-5, atol=1e-6)
  assert state.inner.sharding.is_fully_replicated


def test_global_mode_with_params_sharded_over_a_model_axis():
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(AxisType.Auto, AxisType.Auto))
  sharded = NamedSharding(mesh, P(None, "model"))
  params = jax.device_put(_params(), sharded)
  ref, _, _ = _train(_sampler())
  state, hist, _ = _train(_sampler(mesh), mesh, params=params)
  np.testing.assert_allclose(state.inner, ref.inner, rtol=1e-5, atol=1e-6)
  assert state.inner.sharding.spec == sharded.spec   # the user's choice is kept
  assert hist[-1]["ids"].shape == (b,)


def _collective_lines(compiled_text):
  ops = r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
  return [line for line in compiled_text.splitlines()
          if re.search(r"=.*\b" + ops + r"(-start)?\(", line)]


@pytest.mark.parametrize("resample", ["global", "local"])
def test_rows_cross_devices_only_in_global_mode(resample):
  """The `pad` leaf (PAD columns) is read only by a metric (a sum), so any
  collective carrying a [rows, PAD] array is moving examples between devices."""
  mesh = _mesh()
  # No diagnostics: their entropy gathers the B probabilities.
  sampler = _sampler(mesh, resample=resample, condition=jis.always(),
                     diagnostics=False)
  state = sampler.init(_params(), jax.random.key(0))
  batch = jis.shard_presample(_presample(), mesh)
  text = jax.jit(sampler.step).lower(state, batch).compile().as_text()
  moving_rows = [line for line in _collective_lines(text)
                 if re.search(rf"\[\d+,{PAD}\]", line.split("=", 1)[1])]
  scores_gathered = [line for line in _collective_lines(text)
                     if re.search(rf"f32\[{B}\]\S* all-gather", line)]
  if resample == "global":
    # b rows reduce-scattered: b / 8 = 2 rows land on every device.
    assert any(re.search(rf"\[{b // 8},{PAD}\].* reduce-scatter", line)
               for line in moving_rows), moving_rows
    assert scores_gathered, "global mode all-gathers the B scores"
  else:
    assert not moving_rows, moving_rows
    assert not scores_gathered, scores_gathered


# ---------------------------------------------------------------- local mode


def test_local_mode_draws_each_device_s_examples_from_its_own_shard():
  mesh = _mesh()
  _, hist, _ = _train(_sampler(mesh, resample="local"), mesh)
  shard, per = B // 8, b // 8
  for m in hist:
    owner = m["ids"] // shard                 # the device that held each example
    np.testing.assert_array_equal(owner, np.repeat(np.arange(8), per))
  # Uniform steps train on the first b/8 examples of every shard.
  np.testing.assert_array_equal(
      hist[0]["ids"], (np.arange(8)[:, None] * shard + np.arange(per)).ravel())


def test_local_mode_is_unbiased_for_the_presample_mean_gradient():
  """E[update] equals one SGD step on the mean gradient of all B examples.

  Each of the 8 devices draws b / 8 = 1 of its B / 8 = 4 examples. Monte Carlo
  over 10000 seeds; tolerance 4.5 standard errors per coordinate and 3% of the
  update's norm (fixed seeds, so the test is deterministic).
  """
  mesh, draws, b_small = _mesh(), 10000, 8
  sampler = jis.importance_step(_train_step, _logits, batch_size=b_small,
                                presample=B / b_small, tau_threshold=0.0,
                                mesh=mesh, resample="local")
  batch = _presample(seed=3)
  params = _params()
  keys = jax.random.split(jax.random.key(42), draws)
  states = jax.vmap(lambda key: sampler.init(params, key))(keys)
  new, metrics = jax.jit(jax.vmap(sampler.step, in_axes=(0, None)))(
      states, jis.shard_presample(batch, mesh))
  assert np.all(np.asarray(metrics["is/active"]) == 1.0)
  # The draws are not uniform: the weights vary.
  assert float(np.std(np.asarray(metrics["is/max_weight"]))) > 0.05
  updates = np.asarray(new.inner - params, np.float64).reshape(draws, -1)
  full, _ = _train_step(params, batch, jnp.ones(B))
  reference = np.asarray(full - params, np.float64).ravel()
  mean = updates.mean(0)
  stderr = updates.std(0) / np.sqrt(draws)
  assert np.all(np.abs(mean - reference) < 4.5 * stderr + 1e-7), (mean, reference)
  assert np.linalg.norm(mean - reference) < 0.03 * np.linalg.norm(reference)


def test_local_policy_state_is_kept_per_device():
  mesh = _mesh()
  sampler = _sampler(mesh, resample="local",
                     policy=jis.online_batch_selection(pressure_start=10.0))
  state, hist, step = _train(sampler, mesh, steps=4)
  # One step counter per device, each having seen all 4 steps.
  np.testing.assert_array_equal(state.policy, np.full(8, 4))
  assert state.policy.sharding.spec == P("data")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=8, presample=2.5), r"presample size B=20 is not divisible "
                                         r"by the 8 devices on mesh axis 'data'"),
    (dict(batch_size=12, presample=2.0), r"batch_size=12 is not divisible by the "
                                         r"8 devices on mesh axis 'data'"),
    (dict(forward_batch_size=12), r"forward_batch_size=12 must divide the "
                                  r"presample size B=32"),
    (dict(forward_batch_size=4), r"forward_batch_size=4 is not divisible by the "
                                 r"8 devices"),
    (dict(data_axis="batch"), r"data_axis='batch' is not an axis of the mesh, "
                              r"whose axes are \['data'\]"),
    (dict(resample="stratified"), r"resample must be one of \['global', 'local'\]"),
])
def test_divisibility_and_option_errors_name_the_fix(kwargs, message):
  kw = {**dict(batch_size=b, presample=B / b, mesh=_mesh()), **kwargs}
  with pytest.raises(ValueError, match=message):
    jis.importance_step(_train_step, _logits, **kw)


def test_local_mode_needs_a_mesh():
  with pytest.raises(ValueError, match=r"resample='local' .* pass mesh="):
    jis.importance_step(_train_step, _logits, batch_size=b, resample="local")


# ---------------------------------------------------------------- compilation


@pytest.mark.parametrize("resample", ["global", "local"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_compiles_once_across_branches_and_calls(resample, axis_type):
  mesh = _mesh(axis_type)
  traces = []

  def counted(params, batch):
    traces.append(1)
    return _logits(params, batch)
  sampler = jis.importance_step(_train_step, counted, batch_size=b,
                                presample=B / b, condition=jis.warmup(2),
                                mesh=mesh, resample=resample)
  # A raw uint32 key: jax 0.10's C++ dispatch path adds a second cache entry
  # (no recompilation) for typed keys on a multi-device mesh, jax#39089; the
  # typed-key case is checked by XLA compilations below.
  _, hist, step = _train(sampler, mesh, steps=5, key=jax.random.PRNGKey(0))
  assert [float(m["is/active"]) for m in hist] == [0, 0, 1, 1, 1]
  assert step._cache_size() == 1
  assert len(traces) == 1   # traced once, for the importance branch


def test_typed_key_state_never_recompiles(caplog):
  mesh = _mesh()
  sampler = _sampler(mesh, resample="local")
  state = sampler.init(_params(), jax.random.key(0))
  step = jax.jit(sampler.step)
  state, _ = step(state, jis.shard_presample(_presample(seed=1), mesh))
  batches = [jis.shard_presample(_presample(seed=s), mesh) for s in range(2, 6)]
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    for batch in batches:
      state, _ = step(state, batch)
  compiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
  assert not compiled, compiled


@pytest.mark.parametrize("resample", ["global", "local"])
def test_runs_under_scan_and_matches_a_python_loop(resample):
  mesh, steps = _mesh(), 4
  sampler = _sampler(mesh, resample=resample)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[_presample(seed=10 + i) for i in range(steps)])
  stacked = jax.device_put(stacked, NamedSharding(mesh, P(None, "data")))
  state = sampler.init(_params(), jax.random.key(0))
  scanned, metrics = jax.jit(lambda s, bs: jax.lax.scan(sampler.step, s, bs))(
      state, stacked)
  looped, hist, _ = _train(sampler, mesh, steps=steps)
  np.testing.assert_allclose(scanned.inner, looped.inner, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(metrics["ids"], np.stack([m["ids"] for m in hist]))
  np.testing.assert_allclose(metrics["is/tau"], [m["is/tau"] for m in hist],
                             rtol=1e-6)


# ---------------------------------------------------------------- chunked scoring


@pytest.mark.parametrize("resample, use_mesh", [("global", False),
                                                ("global", True),
                                                ("local", True)])
def test_forward_batch_size_gives_the_same_scores_and_parameters(resample,
                                                                 use_mesh):
  mesh = _mesh() if use_mesh else None
  scored = []

  def recording(params, batch):
    scored.append(batch["x"].shape[0])
    return _logits(params, batch)

  def run(forward_batch_size):
    sampler = jis.importance_step(
        _train_step, recording, batch_size=b, presample=B / b,
        condition=jis.warmup(2), mesh=mesh, resample=resample,
        forward_batch_size=forward_batch_size, diagnostics=True)
    return _train(sampler, mesh)

  whole, whole_hist, _ = run(None)
  assert B in scored and 8 not in scored
  scored.clear()
  chunked, chunked_hist, _ = run(8)
  assert 8 in scored and B not in scored   # 4 passes of 8, never all 32
  for m, m_ref in zip(chunked_hist, whole_hist):
    np.testing.assert_array_equal(m["ids"], m_ref["ids"])
    for name in ("is/score_mean", "is/variance_reduction", "is/entropy"):
      np.testing.assert_allclose(m[name], m_ref[name], rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(chunked.inner, whole.inner, rtol=1e-6, atol=1e-7)


def test_chunks_take_equal_shares_from_every_device():
  """Chunk j holds examples j, j + c, j + 2c, ...: with the presample split in 8
  consecutive blocks, each device contributes forward_batch_size / 8."""
  from jis import _sharding
  mesh = _mesh()
  layout = _sharding.resolve_layout(mesh, "data", "global", B, b, 16)
  seen = []

  def score(chunk):
    seen.append(chunk["id"])
    return chunk["id"].astype(jnp.float32)
  ids = jis.shard_presample({"id": jnp.arange(B)}, mesh)
  out = jax.jit(lambda batch: _sharding.score_in_chunks(score, batch, layout))(ids)
  np.testing.assert_array_equal(out, np.arange(B))   # order restored
  chunks = np.arange(B).reshape(16, 2).T            # what lax.map iterates over
  np.testing.assert_array_equal(np.bincount(chunks[0] // (B // 8)), np.full(8, 2))


@pytest.mark.parametrize("resample", ["global", "local"])
def test_a_presample_placed_elsewhere_is_moved_onto_the_mesh(resample):
  """An explicit mesh types shardings; a replicated presample still works."""
  mesh = _mesh(AxisType.Explicit)
  sampler = _sampler(mesh, resample=resample)
  sharded, _, _ = _train(sampler, mesh)
  state = sampler.init(_params(), jax.random.key(0))
  step = jax.jit(sampler.step)
  for i in range(5):
    state, _ = step(state, jax.device_put(_presample(seed=10 + i),
                                          NamedSharding(mesh, P())))
  np.testing.assert_allclose(state.inner, sharded.inner, rtol=1e-6, atol=1e-7)


def test_data_axis_may_span_two_mesh_axes():
  """E.g. TPU multislice: ("replica", "data") together split the presample."""
  mesh = jax.make_mesh((2, 4), ("replica", "data"),
                       axis_types=(AxisType.Auto, AxisType.Auto))
  axes = ("replica", "data")

  def run(resample):
    sampler = _sampler(mesh, resample=resample, data_axis=axes)
    state = sampler.init(_params(), jax.random.key(0))
    step = jax.jit(sampler.step)
    sharding = NamedSharding(mesh, P(axes))
    hist = []
    for i in range(5):
      state, m = step(state, jax.device_put(_presample(seed=10 + i), sharding))
      hist.append(np.asarray(m["ids"]))
    return state, hist

  ref, ref_hist, _ = _train(_sampler())
  state, hist = run("global")
  np.testing.assert_allclose(state.inner, ref.inner, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(hist[-1], ref_hist[-1]["ids"])
  _, hist = run("local")
  for ids in hist:
    np.testing.assert_array_equal(ids // (B // 8), np.repeat(np.arange(8), b // 8))
