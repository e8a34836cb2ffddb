"""Selection policies against their formulas, numpy references and Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jis
from jis import _selective_backprop

LR = 0.5
DIM, CLASSES = 5, 3
BIG_B, B = 12, 4


def _train_step(params, batch, weights):
  def loss_fn(p):
    logits = batch["x"] @ p
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.mean(weights * losses), logits
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return params - LR * grads, {"loss": loss, "is/logits": logits}


def _logits(params, batch):
  return batch["x"] @ params


def _presample(n=BIG_B, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (n, DIM)),
          "label": jax.random.randint(ky, (n,), 0, CLASSES)}


def _params(seed=1):
  return 0.5 * jax.random.normal(jax.random.key(seed), (DIM, CLASSES))


def _scores(params, batch):
  return np.asarray(jis.logit_grad_norm(_logits(params, batch), batch["label"]))


def _draw(policy, scores, draws, batch_size, seed=0, state=None):
  """``draws`` independent selections from the same scores and state."""
  scores = jnp.asarray(scores, jnp.float32)
  if state is None:
    state = policy.init(scores.shape[0], batch_size)
  keys = jax.random.split(jax.random.key(seed), draws)
  return jax.jit(jax.vmap(lambda k: policy.select(k, scores, state, batch_size)))(keys)


def _z_scores(counts, expected_probs, trials):
  """Per-category binomial z-scores of observed counts."""
  p = np.asarray(expected_probs, np.float64)
  sd = np.sqrt(trials * p * (1 - p))
  return np.abs(counts - trials * p) / np.where(sd > 0, sd, 1.0)


def _chi_square(counts, probs):
  counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
  expected = counts.sum() * probs
  return np.sum((counts - expected) ** 2 / expected)


# Upper 0.001 quantiles of the chi-square distribution (scipy.stats.chi2.ppf).
_CHI2_999 = {3: 16.27, 5: 20.52, 7: 24.32, 11: 31.26}


# ---------------------------------------------------------------- top_k


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_top_k_takes_exactly_the_highest_scores(batch_size):
  rng = np.random.default_rng(batch_size)
  scores = rng.exponential(size=10).astype(np.float32)
  policy = jis.top_k()
  sel = policy.select(jax.random.key(0), jnp.asarray(scores),
                      policy.init(10, batch_size), batch_size)
  np.testing.assert_array_equal(np.sort(np.asarray(sel.indices)),
                                np.sort(np.argsort(-scores)[:batch_size]))
  np.testing.assert_array_equal(sel.weights, np.ones(batch_size))
  expected = np.zeros(10)
  expected[np.argsort(-scores)[:batch_size]] = 1.0 / batch_size
  np.testing.assert_allclose(sel.probs, expected, rtol=1e-6)


def test_top_k_is_deterministic_across_keys():
  scores = jnp.array([0.3, 2.0, 0.1, 1.5, 0.7])
  sel = _draw(jis.top_k(), scores, draws=8, batch_size=2)
  assert np.all(np.asarray(sel.indices) == np.array([1, 3]))


# ---------------------------------------------------------------- online batch sel.


def _numpy_rank_probs(scores, pressure):
  n = len(scores)
  rank = np.empty(n)
  rank[np.argsort(-np.asarray(scores), kind="stable")] = np.arange(n)
  p = np.exp(-np.log(pressure) * rank / n)
  return p / p.sum()


def test_obs_rank_probabilities_match_the_formula():
  rng = np.random.default_rng(0)
  for pressure in (1.0, 10.0, 1e4):
    scores = rng.exponential(size=16)
    probs = jis._policies.rank_probabilities(jnp.asarray(scores, jnp.float32), pressure)
    np.testing.assert_allclose(probs, _numpy_rank_probs(scores, pressure), rtol=2e-5)
  top, bottom = np.max(probs), np.min(probs)
  assert top / bottom == pytest.approx(1e4 ** (15 / 16), rel=1e-3)


def test_obs_pressure_is_annealed_geometrically_with_the_step_counter():
  start, end, steps = 1e4, 10.0, 6
  policy = jis.online_batch_selection(start, end, steps)
  scores = jnp.asarray(np.random.default_rng(1).exponential(size=8), jnp.float32)
  state = policy.init(8, 2)
  for t in range(9):
    sel = policy.select(jax.random.key(t), scores, state, 2)
    pressure = start * (end / start) ** (min(t, steps) / steps)
    np.testing.assert_allclose(sel.probs, _numpy_rank_probs(scores, pressure),
                               rtol=1e-4, err_msg=f"step {t}")
    state = sel.state if t % 2 else policy.observe(scores, state)  # both count
  assert int(state) == 9


def test_obs_draws_follow_the_rank_probabilities():
  scores = np.random.default_rng(2).exponential(size=8)
  draws = 20000
  sel = _draw(jis.online_batch_selection(50.0), scores, draws, batch_size=4)
  counts = np.bincount(np.asarray(sel.indices).ravel(), minlength=8)
  # 4 i.i.d. draws per selection: 80000 multinomial draws; chi-square, 7 dof.
  assert _chi_square(counts, _numpy_rank_probs(scores, 50.0)) < _CHI2_999[7]
  assert np.all(np.asarray(sel.weights) == 1.0)


# ---------------------------------------------------------------- selective backprop


def _numpy_percentile(history, scores):
  h = np.asarray(history, np.float64)
  return np.array([(np.sum(h < s) + np.sum(h <= s)) / (2 * len(h)) for s in scores])


def test_sb_percentile_matches_numpy_through_the_ring_buffer():
  rng = np.random.default_rng(3)
  size = 10
  state = jis.selective_backprop(history=size).init(6, 2)
  seen = []
  for n in (4, 4, 6, 13):   # wraps around, then overflows in one append
    new = np.round(rng.exponential(size=n), 1).astype(np.float32)  # with ties
    state = _selective_backprop.append_scores(state, jnp.asarray(new))
    seen.extend(new.tolist())
    buffer = np.array(seen[-size:], np.float32)
    assert int(state.count) == len(buffer)
    np.testing.assert_array_equal(np.sort(np.asarray(state.history)[:len(buffer)]),
                                  np.sort(buffer))
    query = np.concatenate([new[:3], [buffer.min() - 1, buffer.max() + 1]])
    got = _selective_backprop.percentile_of_scores(state, jnp.asarray(query))
    np.testing.assert_allclose(got, _numpy_percentile(buffer, query), rtol=1e-6)


def test_sb_order_keys_compare_like_the_floats():
  x = np.array([-np.inf, -3e38, -1.5, -1e-3, -0.0, 0.0, 1e-3, 1.0, 1.0, 2.5,
                3e38, np.inf], np.float32)
  keys = np.asarray(_selective_backprop.order_keys(jnp.asarray(x)))
  assert keys.dtype == np.int32
  np.testing.assert_array_equal(keys[:, None] < keys[None, :],
                                x[:, None] < x[None, :])
  np.testing.assert_array_equal(keys[:, None] == keys[None, :],
                                x[:, None] == x[None, :])


def test_sb_percentile_matches_numpy_with_signed_zeros_and_negatives():
  # The percentile compares order keys: -0 ties +0, negatives and huge values
  # keep their places, and the unfilled slots (4 of 12) are never counted.
  history = np.array([-2.0, -0.0, 0.0, 0.5, 0.5, 7.0, 3e38, -1e-3], np.float32)
  state = _selective_backprop.append_scores(
      jis.selective_backprop(history=12).init(4, 2), jnp.asarray(history))
  query = np.array([-0.0, 0.0, 0.5, -2.0, 3e38, -5.0, 1.0, 3.4e38], np.float32)
  got = _selective_backprop.percentile_of_scores(state, jnp.asarray(query))
  np.testing.assert_allclose(got, _numpy_percentile(history, query), rtol=1e-6)


def test_sb_selection_probability_is_percentile_to_the_beta():
  rng = np.random.default_rng(4)
  beta, size = 2.0, 32
  policy = jis.selective_backprop(beta=beta, history=size)
  old = rng.exponential(size=20).astype(np.float32)
  state = policy.observe(jnp.asarray(old), policy.init(8, 2))
  scores = rng.exponential(size=8).astype(np.float32)
  sel = policy.select(jax.random.key(0), jnp.asarray(scores), state, 2)
  buffer = np.concatenate([old, scores])   # the presample enters first
  expected = _numpy_percentile(buffer, scores) ** beta
  np.testing.assert_allclose(sel.probs, expected / expected.sum(), rtol=1e-5)


def test_sb_first_draw_frequencies_follow_p():
  scores = np.random.default_rng(5).exponential(size=6)
  policy = jis.selective_backprop(beta=1.5, history=64)
  draws = 30000
  sel = _draw(policy, scores, draws, batch_size=1)
  counts = np.bincount(np.asarray(sel.indices).ravel(), minlength=6)
  p = _numpy_percentile(scores, scores) ** 1.5
  assert _chi_square(counts, p / p.sum()) < _CHI2_999[5]


def test_sb_takes_b_distinct_examples_with_plackett_luce_inclusion():
  big_b, b, draws = 5, 2, 30000
  scores = np.array([0.2, 1.0, 0.5, 3.0, 0.05])
  policy = jis.selective_backprop(beta=1.0, history=16)
  sel = _draw(policy, scores, draws, batch_size=b)
  idx = np.asarray(sel.indices)
  assert np.all(idx[:, 0] != idx[:, 1])   # without replacement
  p = _numpy_percentile(scores, scores)
  p = p / p.sum()
  # Exact inclusion probability of sequential sampling without replacement.
  inclusion = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j])
                                   for j in range(big_b) if j != i)
                        for i in range(big_b)])
  counts = np.bincount(idx.ravel(), minlength=big_b)
  assert np.all(_z_scores(counts, inclusion, draws) < 4.5), (counts / draws, inclusion)


def test_sb_takes_everything_when_b_equals_b():
  sel = _draw(jis.selective_backprop(reweight=True), np.arange(1.0, 5.0), 4, 4)
  assert np.all(np.sort(np.asarray(sel.indices), axis=1) == np.arange(4))
  np.testing.assert_allclose(sel.weights, 1.0)


# ---------------------------------------------------------------- unbiasedness


def _mean_update(policy, draws=20000):
  """Monte Carlo mean of one resampled SGD update, and the full-presample update."""
  sampler = jis.importance_step(_train_step, _logits, batch_size=B,
                                presample=BIG_B / B, tau_threshold=0.0, policy=policy)
  batch, params = _presample(), _params()
  keys = jax.random.split(jax.random.key(42), draws)
  states = jax.vmap(lambda key: sampler.init(params, key))(keys)
  new, metrics = jax.jit(jax.vmap(sampler.step, in_axes=(0, None)))(states, batch)
  assert np.all(np.asarray(metrics["is/active"]) == 1.0)
  updates = np.asarray(new.inner - params, np.float64).reshape(draws, -1)
  full, _ = _train_step(params, batch, jnp.ones(BIG_B))
  return updates, np.asarray(full - params, np.float64).ravel()


@pytest.mark.parametrize("policy", [
    jis.selective_backprop(beta=1.0, history=32, reweight=True),
    jis.online_batch_selection(20.0, reweight=True),
], ids=["selective_backprop", "online_batch_selection"])
def test_reweighted_policies_are_unbiased(policy):
  updates, reference = _mean_update(policy)
  mean = updates.mean(0)
  stderr = updates.std(0) / np.sqrt(len(updates))
  # Within 4.5 standard errors on every coordinate (fixed seed), and the
  # tolerance is tight: under 4% of the update's norm.
  assert np.all(np.abs(mean - reference) < 4.5 * stderr + 1e-7), (mean, reference)
  assert np.linalg.norm(mean - reference) < 0.04 * np.linalg.norm(reference)


@pytest.mark.parametrize("policy", [
    jis.selective_backprop(beta=3.0, history=32),
    jis.online_batch_selection(100.0),
    jis.top_k(),
], ids=["selective_backprop", "online_batch_selection", "top_k"])
def test_unweighted_policies_are_biased_as_documented(policy):
  updates, reference = _mean_update(policy, draws=4000)
  mean = updates.mean(0)
  stderr = updates.std(0) / np.sqrt(len(updates))
  assert np.max(np.abs(mean - reference) / (stderr + 1e-9)) > 10


# ---------------------------------------------------------------- in the step


POLICIES = {
    "importance_sampling": lambda: jis.importance_sampling(0.5),
    "selective_backprop": lambda: jis.selective_backprop(history=32),
    "online_batch_selection": lambda: jis.online_batch_selection(100.0, 2.0, 5),
    "top_k": jis.top_k,
    "uniform": jis.uniform,
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_compiles_once_and_runs_under_scan(name):
  sampler = jis.importance_step(_train_step, _logits, batch_size=B,
                                presample=BIG_B / B, policy=POLICIES[name](),
                                tau_threshold=1.005, tau_momentum=0.0)
  state = sampler.init(_params(), jax.random.key(0))
  step = jax.jit(sampler.step)
  batches = [_presample(seed=i) for i in range(6)]
  active = []
  for batch in batches:
    state, metrics = step(state, batch)
    active.append(float(metrics["is/active"]))
  assert step._cache_size() == 1
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  scanned, metrics = jax.jit(lambda s, bs: jax.lax.scan(sampler.step, s, bs))(
      sampler.init(_params(), jax.random.key(0)), stacked)
  np.testing.assert_allclose(scanned.inner, state.inner, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(metrics["is/active"], active)


def test_is_metrics_describe_what_each_policy_did():
  batch, params = _presample(), _params()
  scores = _scores(params, batch)

  def run(policy):
    sampler = jis.importance_step(_train_step, _logits, batch_size=B,
                                  presample=BIG_B / B, tau_threshold=0.0,
                                  policy=policy, diagnostics=True)
    return jax.jit(sampler.step)(sampler.init(params, jax.random.key(0)), batch)[1]

  def entropy(p):
    p = p[p > 0]
    return -np.sum(p * np.log(p))

  m = run(jis.top_k())
  assert float(m["is/selected_fraction_unique"]) == 1.0
  assert float(m["is/entropy"]) == pytest.approx(np.log(B), rel=1e-5)
  assert float(m["is/ess"]) == pytest.approx(B)
  m = run(jis.online_batch_selection(30.0))
  assert float(m["is/entropy"]) == pytest.approx(
      entropy(_numpy_rank_probs(scores, 30.0)), rel=1e-4)
  m = run(jis.selective_backprop(beta=2.0))
  assert float(m["is/selected_fraction_unique"]) == 1.0
  p = _numpy_percentile(scores, scores) ** 2
  assert float(m["is/entropy"]) == pytest.approx(entropy(p / p.sum()), rel=1e-4)
  m = run(jis.selective_backprop(beta=2.0, reweight=True))
  assert float(m["is/ess"]) < B   # unequal weights


def test_uniform_steps_feed_the_sb_history():
  batch, params = _presample(), _params()
  sampler = jis.importance_step(_train_step, _logits, batch_size=B,
                                presample=BIG_B / B, tau_threshold=float("inf"),
                                policy=jis.selective_backprop(history=32))
  state, metrics = jax.jit(sampler.step)(sampler.init(params, jax.random.key(0)), batch)
  assert float(metrics["is/active"]) == 0.0
  assert int(state.policy.count) == B
  np.testing.assert_allclose(state.policy.history[:B], _scores(params, batch)[:B],
                             rtol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: jis.selective_backprop(beta=-1.0), r"selective_backprop\(beta\)"),
    (lambda: jis.selective_backprop(history=0), r"selective_backprop\(history\)"),
    (lambda: jis.selective_backprop(history=2.5), r"selective_backprop\(history\)"),
    (lambda: jis.online_batch_selection(0.5), r"pressure_start\) must be .* >= 1"),
    (lambda: jis.online_batch_selection(10.0, float("nan")), r"pressure_end"),
    (lambda: jis.online_batch_selection(10.0, 1.0, 0), r"schedule_steps\) must be"),
])
def test_bad_arguments_are_refused_in_the_factory(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_all_policies_are_public():
  for name in ("importance_sampling", "selective_backprop", "online_batch_selection",
               "top_k", "uniform"):
    assert isinstance(getattr(jis, name)(), jis.Policy)
