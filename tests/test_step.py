"""importance_step: the algorithm against references, compilation, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import jis

from linear_testing import CLASSES
from linear_testing import DIM
from linear_testing import LR
from linear_testing import logits as _linear_logits
from linear_testing import params as _params
from linear_testing import presample as _presample
from linear_testing import train_step as _linear_train_step


def _numpy_upper_bound(params, batch):
  z = np.asarray(batch["x"], np.float64) @ np.asarray(params, np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(z)), np.asarray(batch["label"])] -= 1
  return np.linalg.norm(p, axis=1)


# ---------------------------------------------------------------- unbiasedness


def _expected_update(k, draws, big_b=12, b=4):
  sampler = jis.importance_step(_linear_train_step, _linear_logits, batch_size=b,
                                presample=big_b / b, tau_threshold=0.0,
                                policy=jis.importance_sampling(k))
  batch = _presample(big_b)
  params = _params()
  keys = jax.random.split(jax.random.key(42), draws)
  states = jax.vmap(lambda key: sampler.init(params, key))(keys)
  new_states, metrics = jax.jit(jax.vmap(sampler.step, in_axes=(0, None)))(states, batch)
  assert np.all(np.asarray(metrics["is/active"]) == 1.0)
  updates = np.asarray(new_states.inner - params, np.float64).reshape(draws, -1)
  # Reference: one SGD step on the mean gradient of the whole presample.
  full, _ = _linear_train_step(params, batch, jnp.ones(big_b))
  return updates, np.asarray(full - params, np.float64).ravel(), batch, params


def test_k1_update_is_unbiased_for_the_presample_mean_gradient():
  updates, reference, _, _ = _expected_update(k=1.0, draws=20000)
  mean = updates.mean(0)
  stderr = updates.std(0) / np.sqrt(len(updates))
  # Monte Carlo: within 4.5 standard errors on every coordinate (fixed seed).
  assert np.all(np.abs(mean - reference) < 4.5 * stderr + 1e-7), (mean, reference)
  # And the tolerance is tight enough to matter: under 3% of the update's norm.
  assert np.linalg.norm(mean - reference) < 0.03 * np.linalg.norm(reference)


def test_k_below_one_biases_the_update_towards_high_score_examples():
  """k < 1 weighs hard (high-score) examples above 1/B in expectation."""
  big_b, b, draws = 12, 4, 20000
  batch, params = _presample(big_b), _params()
  scores = jis.logit_grad_norm(_linear_logits(params, batch), batch["label"])
  policy = jis.importance_sampling(k=0.5)
  sel = jax.vmap(lambda key: policy.select(key, scores, (), b))(
      jax.random.split(jax.random.key(3), draws))
  # Expected weight per presample example of the weighted mean loss (1/b) Σ_j w_j.
  effective = np.zeros(big_b)
  np.add.at(effective, np.asarray(sel.indices).ravel(),
            np.asarray(sel.weights).ravel() / (b * draws))
  high, low = np.argmax(scores), np.argmin(scores)
  assert effective[high] > 1.0 / big_b > effective[low]
  assert np.corrcoef(effective, np.asarray(scores))[0, 1] > 0.9
  # The same estimate for k = 1 is uniform (unbiased), which the test above proves
  # for the full update; here it checks the bias measure is not trivially positive.
  sel1 = jax.vmap(lambda key: jis.importance_sampling(1.0).select(key, scores, (), b))(
      jax.random.split(jax.random.key(3), draws))
  eff1 = np.zeros(big_b)
  np.add.at(eff1, np.asarray(sel1.indices).ravel(),
            np.asarray(sel1.weights).ravel() / (b * draws))
  np.testing.assert_allclose(eff1, 1.0 / big_b, rtol=0.1)


def test_importance_weights_match_the_original_library():
  rng = np.random.default_rng(0)
  scores = rng.exponential(size=20)
  idx = rng.integers(0, 20, size=8)
  for k in (1.0, 0.5, 0.0):
    w = scores.sum() / len(scores) / scores[idx]   # BiasedReweightingPolicy
    w_hat = w ** k
    w_hat *= w.dot(scores[idx]) / w_hat.dot(scores[idx])
    probs = jnp.asarray(scores / scores.sum(), jnp.float32)
    np.testing.assert_allclose(jis.importance_weights(probs, jnp.asarray(idx), k),
                               w_hat, rtol=1e-5)


def test_categorical_sampler_frequencies_match_probabilities():
  probs = np.array([0.0, 0.1, 0.4, 0.0, 0.2, 0.3])
  draws = 200000
  idx = np.asarray(jis.sample_categorical(jax.random.key(0), jnp.asarray(probs), draws))
  counts = np.bincount(idx, minlength=len(probs))
  assert counts[0] == counts[3] == 0
  nz = probs > 0
  chi2 = np.sum((counts[nz] - draws * probs[nz]) ** 2 / (draws * probs[nz]))
  assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


# ---------------------------------------------------------------- τ tracking


def _numpy_tau(scores):
  g = scores / scores.sum()
  return 1 / np.sqrt(1 - ((g - 1 / len(g)) ** 2).sum() / (g ** 2).sum())


def test_tau_tracks_numpy_reference_on_importance_steps():
  # Probes every 3rd step (steps 2, 5): τ is measured on the presample of each
  # importance step, the first measurement setting it, and held in between.
  big_b, m = 12, 0.8
  sampler = jis.importance_step(
      _linear_train_step, _linear_logits, batch_size=4, presample=3.0,
      condition=jis.when_variance_reduced(1e9, probe_every=3), tau_momentum=m)
  state = sampler.init(_params(), jax.random.key(0))
  step = jax.jit(sampler.step)
  tau, last, seen = 0.0, None, []
  for i in range(7):
    batch = _presample(big_b, seed=10 + i)
    step_tau = _numpy_tau(_numpy_upper_bound(state.inner, batch))
    state, metrics = step(state, batch)
    active = float(metrics["is/active"])
    seen.append(active)
    if active:   # a moving average over steps: weight 1 - m^(steps since)
      keep = 0.0 if last is None else m ** (i - last)
      tau, last = keep * tau + (1 - keep) * step_tau, i
      np.testing.assert_allclose(float(metrics["is/variance_reduction"]),
                                 step_tau, rtol=1e-5)
    else:
      assert float(metrics["is/variance_reduction"]) == 1.0
    np.testing.assert_allclose(float(state.tau), tau, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["is/tau"]), tau, rtol=1e-5)
  assert seen == [0, 0, 1, 0, 0, 1, 0]


def test_default_threshold_and_probes_switch_on_when_tau_exceeds_it():
  big_b, b = 12, 4
  make = lambda **kw: jis.importance_step(
      _linear_train_step, _linear_logits, batch_size=b, presample=3.0,
      tau_momentum=0.0, score=lambda logits, labels, batch: batch["s"], **kw)
  sampler = make()
  state = sampler.init(_params(), jax.random.key(0))
  # 1 + 2B/(3b): eq. 29's (B + 3b)/(3b) with the scoring pass counted twice.
  assert float(state.condition) == pytest.approx(
      2 * jis.tau_threshold(big_b, b) - 1) == jis.default_tau_threshold(big_b, b)
  flat = {**_presample(big_b), "s": jnp.ones(big_b)}
  # One hot score among B = 12: τ = sqrt(12) ≈ 3.46 > 3.
  peaked = {**flat, "s": jnp.zeros(big_b).at[5].set(1.0)}
  step = jax.jit(sampler.step)
  for _ in range(jis.PROBE_EVERY - 1):           # no probe before step 127
    state, m = step(state, peaked)
    assert float(m["is/active"]) == 0.0 and float(state.tau) == 0.0
  state, m = step(state, peaked)                   # the probe measures τ
  assert float(m["is/active"]) == 1.0
  assert float(state.tau) == pytest.approx(np.sqrt(12.0), rel=1e-5)
  state, m = step(state, flat)                     # τ > 3: resample; τ → 1
  assert float(m["is/active"]) == 1.0 and float(state.tau) == pytest.approx(1.0)
  state, m = step(state, peaked)                   # τ = 1 < 3: uniform
  assert float(m["is/active"]) == 0.0
  # A threshold above sqrt(12): the probe does not switch it on.
  high = make(tau_threshold=3.5)
  s2 = high.init(_params(), jax.random.key(0))
  for _ in range(jis.PROBE_EVERY + 1):
    s2, m = jax.jit(high.step)(s2, peaked)
  assert float(m["is/active"]) == 0.0


# ---------------------------------------------------------------- equivalence


def test_infinite_threshold_equals_unwrapped_step_on_first_b():
  b, steps = 4, 5
  sampler = jis.importance_step(_linear_train_step, _linear_logits, batch_size=b,
                                presample=3.0, tau_threshold=float("inf"))
  state = sampler.init(_params(), jax.random.key(0))
  params = _params()
  step, ref_step = jax.jit(sampler.step), jax.jit(_linear_train_step)
  for i in range(steps):
    batch = _presample(12, seed=i)
    state, metrics = step(state, batch)
    params, ref_metrics = ref_step(params, {k: v[:b] for k, v in batch.items()},
                                   jnp.ones(b))
    np.testing.assert_allclose(state.inner, params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    assert float(metrics["is/active"]) == 0.0
    assert float(metrics["is/ess"]) == pytest.approx(b)


# ---------------------------------------------------------------- compilation


def _sampler(**kw):
  kw.setdefault("tau_threshold", 0.0)
  return jis.importance_step(_linear_train_step, _linear_logits, batch_size=4,
                             presample=3.0, **kw)


def _switching_sampler():
  """Probes every 4th step; peaked scores there switch on the next step,
  whose flat scores switch it off: active on steps 3, 4, 7, 8, ..."""
  return jis.importance_step(
      _linear_train_step, _linear_logits, batch_size=4, presample=3.0,
      condition=jis.when_variance_reduced(1.5, probe_every=4),
      tau_momentum=0.0, score=lambda logits, labels, batch: batch["s"])


def _switching_batches(n):
  flat = jnp.ones(12)
  peaked = jnp.zeros(12).at[3].set(1.0)
  return [{**_presample(12, seed=i), "s": peaked if i % 4 == 3 else flat}
          for i in range(n)]


def test_compiles_once_across_branches_and_many_calls():
  sampler = _switching_sampler()
  step = jax.jit(sampler.step)
  state = sampler.init(_params(), jax.random.key(0))
  active = []
  for batch in _switching_batches(12):
    state, metrics = step(state, batch)
    active.append(float(metrics["is/active"]))
  assert active == [0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1]
  assert step._cache_size() == 1


def test_no_host_callbacks_and_one_cond():
  # warmup(0): active from the first step, but through a traced predicate.
  sampler = _sampler(tau_threshold=None, condition=jis.warmup(0))
  state = sampler.init(_params(), jax.random.key(0))
  jaxpr = jax.make_jaxpr(sampler.step)(state, _presample(12))
  text = str(jaxpr)
  assert "callback" not in text
  conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
  # One cond chooses the rows to train on; with no score table and no policy
  # that observes uniform steps there is nothing to record after the step.
  assert len(conds) == 1
  # train_step runs once, outside both conds.
  assert sum(e.primitive.name == "dot_general" for e in jaxpr.jaxpr.eqns) >= 1


def test_a_uniform_step_draws_no_random_bits_and_step_t_draws_with_fold_in():
  # The inactive default step should cost what the plain step costs: nothing
  # random and no τ arithmetic outside the cond. Importance step t draws
  # with fold_in(key, t), the key itself never changes.
  sampler = _switching_sampler()
  batches = _switching_batches(4)
  state = sampler.init(_params(), jax.random.key(0))
  jaxpr = jax.make_jaxpr(sampler.step)(state, batches[0])
  outside = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert "cond" in outside
  assert not {p for p in outside if "random" in p or "threefry" in p
              or p == "pow"}, outside
  step = jax.jit(sampler.step)
  params = state.inner
  for i in range(3):   # steps 0-2 uniform: key, τ and its step untouched
    state, metrics = step(state, batches[i])
    assert float(metrics["is/active"]) == 0.0
    params, _ = _linear_train_step(params, {k: v[:4] for k, v in
                                            batches[i].items()}, jnp.ones(4))
  np.testing.assert_array_equal(jax.random.key_data(state.key),
                                jax.random.key_data(jax.random.key(0)))
  assert float(state.tau) == 0.0 and int(state.tau_step) == -1
  state, metrics = step(state, batches[3])   # the probe, step 3
  assert float(metrics["is/active"]) == 1.0 and int(state.tau_step) == 3
  policy = jis.importance_sampling(k=0.5, max_weight=100.0)   # the default
  sel = policy.select(jax.random.fold_in(jax.random.key(0), 3),
                      batches[3]["s"], policy.init(12, 4), 4)
  expected, _ = _linear_train_step(
      params, {k: v[sel.indices] for k, v in batches[3].items()}, sel.weights)
  np.testing.assert_allclose(state.inner, expected, rtol=1e-6, atol=1e-7)


def _copies_in_scanned_step(sampler, params, batches, *shapes):
  """The ``copy`` instructions of any of ``shapes`` (HLO text such as
  ``"[37,41]"``) in the optimized HLO of ``sampler.step`` scanned over
  ``batches`` with the state donated."""
  def run(state, batches):
    return jax.lax.scan(sampler.step, state, batches)

  state = sampler.init(params, jax.random.key(0))
  hlo = jax.jit(run, donate_argnums=0).lower(state, batches).compile().as_text()
  return [l for l in hlo.splitlines()
          if " copy(" in l and any(shape in l for shape in shapes)]


def test_scanned_donated_step_copies_no_parameter_buffer():
  # A cond that returns the train state made XLA copy every parameter out of
  # it on each step; the train step now runs outside the conds.
  sampler = _sampler(tau_threshold=None, condition=jis.warmup(0))
  params = jnp.zeros((37, 41))   # a shape no other buffer has
  batches = jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[_presample(12, seed=i) for i in range(3)])
  batches = {**batches, "x": jnp.zeros(batches["x"].shape[:2] + (37,))}
  copies = _copies_in_scanned_step(sampler, params, batches, "[37,41]")
  assert not copies, copies


def test_scanned_step_copies_no_presample_rows():
  # Image-like rows [n, 37, 1]: when the first cond returned the rows to train
  # on, XLA:CPU copied the whole presample into each branch (and the chosen
  # rows out of it) on every step. The rows are now gathered after the cond.
  def flat(batch):
    return {**batch, "x": batch["x"].reshape(batch["x"].shape[0], -1)}
  sampler = jis.importance_step(
      lambda p, batch, w: _linear_train_step(p, flat(batch), w),
      lambda p, batch: _linear_logits(p, flat(batch)),
      batch_size=4, presample=3.0, condition=jis.warmup(0))
  batches = {"x": jnp.zeros((3, 12, 37, 1)),
             "label": jnp.zeros((3, 12), jnp.int32)}
  copies = _copies_in_scanned_step(sampler, jnp.zeros((37, CLASSES)), batches,
                                   "[12,37,1]", "[4,37,1]")
  assert not copies, copies


def test_runs_under_scan_and_matches_a_python_loop():
  sampler = _switching_sampler()
  batches = jax.tree.map(lambda *xs: jnp.stack(xs), *_switching_batches(6))
  state0 = sampler.init(_params(), jax.random.key(0))
  scanned, metrics = jax.jit(lambda s, bs: jax.lax.scan(sampler.step, s, bs))(
      state0, batches)
  state = state0
  for i in range(6):
    state, _ = jax.jit(sampler.step)(state, jax.tree.map(lambda x: x[i], batches))
  np.testing.assert_allclose(scanned.inner, state.inner, rtol=1e-6, atol=1e-7)
  assert metrics["is/active"].shape == (6,)
  assert set(np.asarray(metrics["is/active"]).tolist()) == {0.0, 1.0}


def test_donated_state_gives_the_same_result():
  sampler = _sampler()
  batch = _presample(12)
  plain, _ = jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)), batch)
  donated_step = jax.jit(sampler.step, donate_argnums=0)
  state = sampler.init(_params(), jax.random.key(0))
  first, _ = donated_step(state, batch)
  assert state.inner.is_deleted()  # the buffers were donated, not copied
  state, _ = donated_step(first, batch)
  again, _ = jax.jit(sampler.step)(plain, batch)
  np.testing.assert_array_equal(state.inner, again.inner)


def test_same_seed_is_bitwise_deterministic_and_seed_matters():
  def run(seed):
    sampler = _sampler()
    state = sampler.init(_params(), jax.random.key(seed))
    step = jax.jit(sampler.step)
    for i in range(5):
      state, _ = step(state, _presample(12, seed=i))
    return np.asarray(state.inner)
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


# ---------------------------------------------------------------- real models


class _BNDropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(CLASSES)(x)


class _State(train_state.TrainState):
  batch_stats: dict
  dropout_key: jax.Array


def _bn_state():
  model = _BNDropoutNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, DIM)), train=False)
  return _State.create(apply_fn=model.apply, params=variables["params"],
                       batch_stats=variables["batch_stats"], tx=optax.adam(1e-2),
                       dropout_key=jax.random.key(7))


def _bn_train_step(state, batch, weights):
  dropout_key = jax.random.fold_in(state.dropout_key, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["x"],
        train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.mean(weights * losses), (updates, logits)
  (loss, (updates, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
  return state, {"loss": loss, "is/logits": logits}


def _bn_logits(state, batch):
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        batch["x"], train=False)


@pytest.mark.parametrize("threshold", [0.0, float("inf")])
def test_trainstate_with_batch_stats_and_dropout(threshold):
  sampler = jis.importance_step(_bn_train_step, _bn_logits, batch_size=8,
                                presample=2.0, tau_threshold=threshold)
  inner = _bn_state()
  assert isinstance(inner.step, int)  # TrainState.create keeps a Python int
  state = sampler.init(inner, jax.random.key(0))
  step = jax.jit(sampler.step, donate_argnums=0)
  for i in range(4):
    state, metrics = step(state, _presample(16, seed=i))
  assert step._cache_size() == 1
  assert int(state.inner.step) == 4
  assert "is/logits" not in metrics and float(metrics["loss"]) > 0
  assert not np.allclose(state.inner.batch_stats["BatchNorm_0"]["mean"], 0.0)


def _counting(calls, fn):
  def counted(state, batch):
    calls.append(jax.tree.leaves(batch)[0].shape[0])
    return fn(state, batch)
  return counted


def test_uniform_steps_make_no_forward_pass():
  # A threshold no τ reaches, but not a constant one (inf would compile the
  # uniform branch alone): logits_fn is traced for the importance branch only,
  # whether or not the train step hands back its logits.
  def no_logits_step(state, batch, weights):
    state, metrics = _bn_train_step(state, batch, weights)
    return state, {"loss": metrics["loss"]}
  for train_step in (_bn_train_step, no_logits_step):
    calls = []
    sampler = jis.importance_step(train_step, _counting(calls, _bn_logits),
                                  batch_size=8, presample=2.0,
                                  tau_threshold=1e30)
    jax.make_jaxpr(sampler.step)(sampler.init(_bn_state(), jax.random.key(0)),
                                 _presample(16))
    assert calls == [16]


@pytest.mark.parametrize("returns_logits", [True, False])
def test_recorded_scores_come_from_the_train_logits_when_given(returns_logits):
  # A score table keeps the trained examples' scores: from the "is/logits"
  # the train step hands back when it does (here zeros, so that they differ
  # from logits_fn's), else from logits_fn at the pre-update parameters.
  def train_step(params, batch, weights):
    new, metrics = _linear_train_step(params, batch, weights)
    if returns_logits:
      metrics["is/logits"] = jnp.zeros((batch["x"].shape[0], CLASSES))
    return new, metrics
  sampler = jis.importance_step(train_step, _linear_logits, batch_size=4,
                                presample=3.0, score_table=jis.stale_scores(12),
                                score="upper_bound", condition=jis.never())
  state = sampler.init(_params(), jax.random.key(0))
  batch = {**_presample(12), "index": jnp.arange(12)}
  expected = (np.full(4, np.sqrt(2 / 3)) if returns_logits else   # ‖1/3 − y‖
              _numpy_upper_bound(state.inner, {k: v[:4] for k, v in batch.items()}))
  state, _ = jax.jit(sampler.step)(state, batch)
  np.testing.assert_allclose(state.table.scores[:4], expected, rtol=1e-5)
  np.testing.assert_array_equal(state.table.scored_at[:4], 0)
  np.testing.assert_array_equal(state.table.scored_at[4:], -1)


def test_a_table_without_logits_fn_or_is_logits_says_where_scores_come_from():
  sampler = jis.importance_step(
      _linear_train_step, None, batch_size=4, presample=3.0, score="loss",
      score_table=jis.stale_scores(12), condition=jis.never())
  state = sampler.init(_params(), jax.random.key(0))
  batch = {**_presample(12), "index": jnp.arange(12)}
  with pytest.raises(ValueError, match=r"return its logits under "
                     r"metrics\['is/logits'\], or pass logits_fn"):
    jax.eval_shape(sampler.step, state, batch)


def test_train_step_is_traced_once_per_compile():
  calls = []

  def counting_step(params, batch, weights):
    calls.append(1)
    return _linear_train_step(params, batch, weights)
  for kwargs in (dict(tau_threshold=None), dict(tau_threshold=0.0),
                 dict(policy=jis.online_batch_selection()),
                 dict(score_table=jis.stale_scores(40))):
    calls.clear()
    sampler = jis.importance_step(counting_step, _linear_logits, batch_size=4,
                                  presample=3.0, **kwargs)
    batch = {**_presample(12), "index": jnp.arange(12)}
    step = jax.jit(sampler.step)
    state = sampler.init(_params(), jax.random.key(0))
    for _ in range(3):
      state, _ = step(state, batch)
    assert len(calls) == 1, kwargs


def test_uniform_score_makes_no_forward_pass():
  def never_called(state, batch):
    raise AssertionError("score='uniform' must not call logits_fn")
  sampler = jis.importance_step(_linear_train_step, never_called, batch_size=4,
                                presample=3.0, score="uniform")
  state, metrics = jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)),
                                         _presample(12))
  assert float(metrics["is/variance_reduction"]) == pytest.approx(1.0)


def test_only_the_built_in_uniform_score_skips_the_cond():
  def uniform(logits, labels, batch):   # a user's score, named "uniform"
    return jnp.arange(1.0, 13.0) ** 4

  def cond_count(score):
    sampler = jis.importance_step(_linear_train_step, _linear_logits,
                                  batch_size=4, presample=3.0, score=score)
    state = sampler.init(_params(), jax.random.key(0))
    jaxpr = jax.make_jaxpr(sampler.step)(state, _presample(12))
    return len([e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"])
  assert cond_count("uniform") == 0
  assert cond_count(uniform) == 1


@pytest.mark.parametrize("constant, traced, kwargs", [
    (dict(tau_threshold=float("inf")), [], dict(tau_threshold=1e30)),
    (dict(condition=jis.never()), [], dict(tau_threshold=1e30)),
    # Uniform scores have τ = 1: the default threshold (3 here) is never crossed.
    (dict(score="uniform"), [], dict(score="uniform", tau_threshold=1e30)),
    (dict(tau_threshold=0.0), [12], dict(condition=jis.warmup(0))),
    (dict(condition=jis.always()), [12], dict(condition=jis.warmup(0))),
])
def test_a_constant_condition_compiles_one_branch_without_a_cond(
    constant, traced, kwargs):
  calls = []

  def counting_logits(params, batch):
    calls.append(batch["x"].shape[0])
    return _linear_logits(params, batch)

  def make(**kw):
    return jis.importance_step(_linear_train_step, counting_logits,
                               batch_size=4, presample=3.0, **kw)
  sampler, reference = make(**constant), make(**kwargs)
  state = sampler.init(_params(), jax.random.key(0))
  jaxpr = jax.make_jaxpr(sampler.step)(state, _presample(12))
  assert calls == traced   # [12]: the presample's scores
  assert not [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
  # The same steps as the traced condition that takes the same branch.
  ref_state = reference.init(_params(), jax.random.key(0))
  step, ref_step = jax.jit(sampler.step), jax.jit(reference.step)
  for i in range(3):
    state, metrics = step(state, _presample(12, seed=i))
    ref_state, ref_metrics = ref_step(ref_state, _presample(12, seed=i))
    np.testing.assert_allclose(state.inner, ref_state.inner, rtol=1e-6)
    assert float(metrics["is/active"]) == float(ref_metrics["is/active"])
    np.testing.assert_allclose(metrics["is/tau"], ref_metrics["is/tau"],
                               rtol=1e-6)


# ---------------------------------------------------------------- pytree batches


def test_tuple_batch_with_several_inputs():
  def train_step(params, batch, weights):
    (xa, xb), y = batch

    def loss_fn(p):
      logits = xa @ p + xb @ p
      return jnp.mean(weights * optax.softmax_cross_entropy_with_integer_labels(
          logits, y))
    return params - 0.1 * jax.grad(loss_fn)(params), {}

  def logits_fn(params, batch):
    (xa, xb), _ = batch
    return xa @ params + xb @ params
  sampler = jis.importance_step(train_step, logits_fn, batch_size=4, presample=2.0,
                                labels=lambda batch: batch[1], tau_threshold=0.0)
  x = jax.random.normal(jax.random.key(0), (8, DIM))
  batch = ((x, 2 * x), jnp.arange(8) % CLASSES)
  state, metrics = jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)),
                                         batch)
  assert set(metrics) >= {"is/tau", "is/active", "is/ess", "is/max_weight",
                          "is/score_mean"}


# ---------------------------------------------------------------- scores


def test_gradient_norm_score_matches_per_example_loop():
  model = nn.Dense(CLASSES)
  params = model.init(jax.random.key(0), jnp.zeros((1, DIM)))["params"]
  inner = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.sgd(0.1))
  batch = _presample(6)

  def logits_fn(state, batch):
    return state.apply_fn({"params": state.params}, batch["x"])
  from jis import _losses, _scores
  got = _scores.per_parameter_grad_norm(
      logits_fn, _losses.resolve_loss("softmax_cross_entropy"),
      lambda b: b["label"], inner, batch)
  for i in range(6):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, batch["x"][i:i + 1]), batch["label"][i:i + 1])[0])(params)
    ref = np.sqrt(sum(np.sum(np.square(l)) for l in jax.tree.leaves(g)))
    np.testing.assert_allclose(got[i], ref, rtol=1e-5)


@pytest.mark.parametrize("score", ["upper_bound", "loss", "gradient_norm", "uniform"])
def test_every_named_score_runs_in_the_step(score):
  model = nn.Dense(CLASSES)
  inner = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.key(0), jnp.zeros((1, DIM)))["params"],
      tx=optax.sgd(0.1))

  def train_step(state, batch, weights):
    def loss_fn(p):
      logits = state.apply_fn({"params": p}, batch["x"])
      return jnp.mean(weights * optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"]))
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params)), {}
  sampler = jis.importance_step(
      train_step, lambda s, b: s.apply_fn({"params": s.params}, b["x"]),
      batch_size=4, presample=2.0, score=score, tau_threshold=0.0)
  state, metrics = jax.jit(sampler.step)(sampler.init(inner, jax.random.key(0)),
                                         _presample(8))
  assert np.isfinite(float(metrics["is/score_mean"]))
  assert float(metrics["is/active"]) == 1.0


# ---------------------------------------------------------------- fallback


@pytest.mark.parametrize("bad", [0.0, 1e-40, np.nan, np.inf, -1.0])
def test_unusable_scores_fall_back_to_uniform(bad):
  """Non-finite, negative, all-zero or all-denormal (flushed to zero) scores."""
  sampler = jis.importance_step(
      _linear_train_step, _linear_logits, batch_size=4, presample=3.0,
      tau_threshold=0.0, score=lambda logits, labels, batch: batch["s"])
  batch = {**_presample(12), "s": jnp.full((12,), bad).at[0].set(
      bad if 0 <= bad < 1e-30 else 1.0)}
  state, metrics = jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)),
                                         batch)
  assert float(metrics["is/fallback"]) == 1.0
  assert float(metrics["is/max_weight"]) == pytest.approx(1.0)
  assert np.all(np.isfinite(np.asarray(state.inner)))
  assert np.isfinite(float(state.tau))


def test_usable_scores_do_not_fall_back():
  state, metrics = jax.jit(_sampler().step)(
      _sampler().init(_params(), jax.random.key(0)), _presample(12))
  assert float(metrics["is/fallback"]) == 0.0


# ---------------------------------------------------------------- smoothing


def test_smoothing_shorthands_build_the_transforms():
  s = jnp.array([0.0, 1.0, 3.0])
  add = jis.importance_step(_linear_train_step, _linear_logits, batch_size=2,
                            presample=1.5, smooth=0.5)
  st = add.init(_params(), jax.random.key(0))
  assert st.transforms == ((),)
  ada = jis.importance_step(_linear_train_step, _linear_logits, batch_size=2,
                            presample=1.5, smooth=0.5, adaptive_smooth=True)
  st = ada.init(_params(), jax.random.key(0))
  assert float(st.transforms[0]) == 1.0  # the moving average starts at 1
  t = jis.adaptive_smoothing(0.5)
  out, mu = t.update(s, t.init())
  mu_ref = 0.9 * 1.0 + 0.1 * float(np.mean(s))
  np.testing.assert_allclose(out, np.asarray(s) + 0.5 * mu_ref, rtol=1e-6)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(presample=0.5), ValueError, "presample must be a finite number >= 1"),
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1"),
    (dict(loss="hinge"), ValueError, "Unknown loss='hinge'"),
    (dict(score="entropy"), ValueError, "Unknown score='entropy'"),
    (dict(tau_momentum=1.0), ValueError, r"tau_momentum must be a number in \[0, 1\)"),
    (dict(k=0.5, policy=jis.uniform()), ValueError, "k=0.5 is a shorthand"),
    (dict(tau_threshold=1.0, condition=jis.always()), ValueError, "tau_threshold is a shorthand"),
    (dict(smooth=1.0, score_transforms=()), ValueError, "shorthands for score_transforms"),
    (dict(adaptive_smooth=True), ValueError, "smooth must be > 0"),
    (dict(labels=3.5), TypeError, "labels must be a batch key"),
])
def test_bad_options_are_refused_in_the_factory(kwargs, error, match):
  kwargs = {"batch_size": 4, **kwargs}
  with pytest.raises(error, match=match):
    jis.importance_step(_linear_train_step, _linear_logits, **kwargs)


def test_train_step_without_weights_is_refused():
  def no_weights(state, batch):
    return state, {}
  with pytest.raises(TypeError, match=r"train_step must accept \(state, batch, weights\)"):
    jis.importance_step(no_weights, _linear_logits, batch_size=4)


def test_jitted_train_step_is_accepted():
  sampler = jis.importance_step(jax.jit(_linear_train_step), jax.jit(_linear_logits),
                                batch_size=4, presample=3.0, tau_threshold=0.0)
  state, _ = jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)),
                                   _presample(12))
  assert int(state.step) == 1


def test_batch_with_wrong_leading_dimension_names_the_leaf():
  sampler = _sampler()
  state = sampler.init(_params(), jax.random.key(0))
  batch = {**_presample(12), "label": jnp.zeros((10,), jnp.int32)}
  with pytest.raises(ValueError, match=r"leading dimension B .* = 12.*\['label'\]"):
    sampler.step(state, batch)


def test_missing_label_key_lists_the_batch_keys():
  sampler = jis.importance_step(_linear_train_step, _linear_logits, batch_size=4,
                                presample=3.0, labels="y", tau_threshold=0.0)
  with pytest.raises(ValueError, match=r"labels='y'.*\['x', 'label'\]"):
    sampler.step(sampler.init(_params(), jax.random.key(0)), _presample(12))


def test_logits_labels_mismatch_is_reported_at_trace_time():
  sampler = jis.importance_step(_linear_train_step, _linear_logits, batch_size=4,
                                presample=3.0, loss="mean_squared_error",
                                tau_threshold=0.0)
  with pytest.raises(ValueError, match="same shape as the logits"):
    jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)), _presample(12))


def test_state_changing_dtype_is_refused():
  def bad_step(params, batch, weights):
    return params.astype(jnp.bfloat16), {}
  sampler = jis.importance_step(bad_step, _linear_logits, batch_size=4, presample=3.0)
  with pytest.raises(ValueError, match="changed a state leaf from float32"):
    sampler.step(sampler.init(_params(), jax.random.key(0)), _presample(12))


def test_init_needs_a_key():
  with pytest.raises(TypeError, match=r"jax.random.key\(0\)"):
    _sampler().init(_params(), 0)


def test_non_dict_metrics_are_refused():
  def scalar_metrics(params, batch, weights):
    return params, jnp.zeros(())
  sampler = jis.importance_step(scalar_metrics, _linear_logits, batch_size=4, presample=3.0)
  with pytest.raises(TypeError, match="metrics as a dict"):
    sampler.step(sampler.init(_params(), jax.random.key(0)), _presample(12))


def test_user_metrics_pass_through_unchanged():
  def train_step(params, batch, weights):
    return params, {"loss": jnp.float32(1.5), "per_example": weights * 2}
  sampler = jis.importance_step(train_step, _linear_logits, batch_size=4,
                                presample=3.0, tau_threshold=float("inf"))
  _, metrics = jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)),
                                     _presample(12))
  np.testing.assert_array_equal(metrics["per_example"], np.full(4, 2.0))
  assert float(metrics["loss"]) == 1.5


@pytest.mark.parametrize("scale", [1e-37, 1e-30, 1e30, 3e38])
def test_extreme_but_valid_scores_keep_weights_finite_and_bounded(scale):
  sampler = jis.importance_step(
      _linear_train_step, _linear_logits, batch_size=4, presample=3.0,
      tau_threshold=0.0, score=lambda logits, labels, batch: batch["s"])
  s = jnp.linspace(0.0, 1.0, 12).at[3].set(1e-12) * scale  # one near-zero, one zero
  batch = {**_presample(12), "s": s.astype(jnp.float32)}
  state, metrics = jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)),
                                         batch)
  assert float(metrics["is/fallback"]) == 0.0
  assert 0 < float(metrics["is/max_weight"]) <= 1e4
  assert 1.0 <= float(metrics["is/variance_reduction"]) <= np.sqrt(12) + 1e-4
  assert np.all(np.isfinite(np.asarray(state.inner)))


# ---------------------------------------------------------------- models users have


def _two_head_setup():
  k = jax.random.split(jax.random.key(4), 4)
  params = {"a": jax.random.normal(k[0], (DIM, 2)),
            "b": jax.random.normal(k[1], (DIM, 5))}
  batch = {"x": jax.random.normal(k[2], (12, DIM)),
           "label": jax.random.randint(k[3], (12,), 0, 2),
           "label2": jax.random.randint(k[3], (12,), 0, 5)}
  heads = lambda p, batch: {"a": batch["x"] @ p["a"], "b": batch["x"] @ p["b"]}

  def train_step(p, batch, weights):
    def loss_fn(p):
      z = heads(p, batch)
      return jnp.mean(weights * (
          optax.softmax_cross_entropy_with_integer_labels(z["a"], batch["label"])
          + optax.softmax_cross_entropy_with_integer_labels(z["b"], batch["label2"])))
    return jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss_fn)(p)), {}
  return params, batch, heads, train_step


@pytest.mark.parametrize("loss_kind", ["custom", "per_head"])
def test_a_two_head_model_is_scored_over_both_heads(loss_kind):
  params, batch, heads, train_step = _two_head_setup()
  if loss_kind == "custom":   # the example, refused before
    loss = lambda z, y: (
        optax.softmax_cross_entropy_with_integer_labels(z["a"], y[0])
        + optax.softmax_cross_entropy_with_integer_labels(z["b"], y[1]))
    labels = lambda b: (b["label"], b["label2"])
  else:
    loss = {"a": "softmax_cross_entropy", "b": "softmax_cross_entropy"}
    labels = lambda b: {"a": b["label"], "b": b["label2"]}
  sampler = jis.importance_step(train_step, heads, batch_size=4, presample=3.0,
                                loss=loss, labels=labels, tau_threshold=0.0)
  state, metrics = jax.jit(sampler.step)(sampler.init(params, jax.random.key(0)),
                                         batch)
  # The mean score is that of the gradient over both heads (numpy reference).
  expected = np.sqrt(
      np.square(_numpy_upper_bound(params["a"], batch)) +
      np.square(_numpy_upper_bound(params["b"], {**batch,
                                                  "label": batch["label2"]})))
  np.testing.assert_allclose(float(metrics["is/score_mean"]), expected.mean(),
                             rtol=1e-5)


def test_a_masked_sequence_model_ignores_padding_in_its_scores():
  n, t, v = 12, 6, 4
  k = jax.random.split(jax.random.key(8), 3)
  emb = jax.random.normal(k[0], (v, v))
  tokens = jax.random.randint(k[1], (n, t), 0, v)
  lengths = jax.random.randint(k[2], (n,), 1, t + 1)
  mask = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.float32)
  logits_fn = lambda p, batch: batch["inputs"] @ p       # [n, T, V]

  def train_step(p, batch, weights):
    def loss_fn(p):
      ce = optax.softmax_cross_entropy_with_integer_labels(
          logits_fn(p, batch), batch["tokens"])
      return jnp.mean(weights * jnp.sum(batch["mask"] * ce, axis=1))
    return p - 0.1 * jax.grad(loss_fn)(p), {}
  sampler = jis.importance_step(train_step, logits_fn, batch_size=4,
                                presample=3.0, labels="tokens", mask="mask",
                                tau_threshold=0.0)
  batch = {"inputs": emb[tokens], "tokens": tokens, "mask": mask}
  noisy = {**batch, "inputs": jnp.where(mask[..., None] > 0, batch["inputs"], 9.0)}
  step = jax.jit(sampler.step)
  runs = [step(sampler.init(jnp.eye(v), jax.random.key(0)), b) for b in
          (batch, noisy)]
  # Padded positions change neither the scores nor what is drawn.
  for name in ("is/score_mean", "is/variance_reduction", "is/max_weight"):
    np.testing.assert_allclose(runs[0][1][name], runs[1][1][name], rtol=1e-6)
  scores = jis.logit_grad_norm(batch["inputs"] @ jnp.eye(v), tokens, mask=mask)
  np.testing.assert_allclose(float(runs[0][1]["is/score_mean"]),
                             float(jnp.mean(scores)), rtol=1e-6)


def test_rows_used_tells_the_loop_how_far_to_advance():
  # A uniform step uses the first b rows of its presample; an importance step
  # all B: a loop that advances by is/rows_used visits every example once per
  # epoch while importance sampling is off.
  sampler = _switching_sampler()
  step = jax.jit(sampler.step)
  state = sampler.init(_params(), jax.random.key(0))
  for batch in _switching_batches(5):
    state, metrics = step(state, batch)
    expected = 12 if float(metrics["is/active"]) else 4
    assert int(metrics["is/rows_used"]) == expected
