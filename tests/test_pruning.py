"""InfoBatch in jis: the in-step policy, the loader's epoch, the stale mode.

The statistical claims (unbiased rescaled updates) are checked against numpy
references by Monte Carlo with fixed seeds and tolerances in standard errors.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jis
from jis import _epochs
from jis import _pruning

DIM, CLASSES = 5, 3
LR = 0.5


def _train_step(params, batch, weights):
  def loss_fn(p):
    logits = batch["x"] @ p
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.mean(weights * losses), logits
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return params - LR * grads, {"loss": loss, "is/logits": logits,
                               "weights": weights}


def _data(n, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (n, DIM)),
          "label": jax.random.randint(ky, (n,), 0, CLASSES),
          "index": jnp.arange(n)}


def _params(seed=1):
  return 0.5 * jax.random.normal(jax.random.key(seed), (DIM, CLASSES))


# ---------------------------------------------------------------- the policy


def test_the_policy_keeps_below_mean_examples_at_1_minus_prune_odds():
  policy = jis.infobatch(prune=0.75)
  scores = jnp.array([0.1, 0.2, 0.3, 5.0, 6.0, 0.2])   # mean 1.97: 4 below
  sel = policy.select(jax.random.key(0), scores, policy.init(6, 2), 2)
  np.testing.assert_allclose(sel.probs, np.array([.25, .25, .25, 1, 1, .25])
                             / 3.0, rtol=1e-6)
  assert len(set(sel.indices.tolist())) == 2   # without replacement


@pytest.mark.parametrize("prune", [0.5, 0.8])
def test_the_rescaled_update_is_unbiased(prune):
  # E over draws of the step's update equals one step on the presample's mean
  # gradient (brute force: numpy over 20000 vmapped draws).
  big_b, b, draws = 12, 4, 20000
  sampler = jis.importance_step(_train_step, lambda p, batch: batch["x"] @ p,
                                batch_size=b, presample=big_b / b,
                                tau_threshold=0.0,
                                policy=jis.infobatch(prune))
  batch, params = _data(big_b), _params()
  keys = jax.random.split(jax.random.key(42), draws)
  states = jax.vmap(lambda k: sampler.init(params, k))(keys)
  new, metrics = jax.jit(jax.vmap(sampler.step, in_axes=(0, None)))(states, batch)
  updates = np.asarray(new.inner - params, np.float64).reshape(draws, -1)
  full, _ = _train_step(params, batch, jnp.ones(big_b))
  reference = np.asarray(full - params, np.float64).ravel()
  mean, stderr = updates.mean(0), updates.std(0) / np.sqrt(draws)
  assert np.all(np.abs(mean - reference) < 4.5 * stderr + 1e-7)
  assert np.linalg.norm(mean - reference) < 0.03 * np.linalg.norm(reference)
  # Not a uniform draw in disguise: below-mean examples weigh more.
  w = np.asarray(metrics["weights"])
  assert w.max() / w.min() > 1.5


def _capped_reference(keep, num):
  """Brute force: ρ = min(1, c π) with Σ ρ = num, by capping one at a time."""
  keep = np.asarray(keep, np.float64)
  rho, capped = np.zeros_like(keep), np.zeros(keep.shape, bool)
  while True:
    c = (num - capped.sum()) / keep[~capped].sum()
    rho = np.where(capped, 1.0, c * keep)
    if not np.any(rho > 1 + 1e-12):
      return rho
    capped |= rho > 1


@pytest.mark.parametrize("keep,num", [
    ([0.5, 1, 0.5, 1, 1, 0.5, 0.5, 0.5], 3),     # uncapped
    ([0.2, 1, 0.2, 0.2, 0.2, 0.2, 0.2, 1], 4),   # the two π = 1 capped
    ([0.5] * 6 + [1, 1], 8),                     # every example
    ([1.0] * 8, 2),                              # nothing pruned
])
def test_systematic_sampling_includes_each_row_with_its_probability(keep, num):
  from jis import _pruning
  rho = np.asarray(_pruning.inclusion_probabilities(jnp.array(keep), num))
  np.testing.assert_allclose(rho, _capped_reference(keep, num), rtol=1e-6)
  draws = 40000
  idx = np.asarray(jax.jit(jax.vmap(
      lambda k: _pruning.systematic_sample(k, jnp.asarray(rho), num)))(
          jax.random.split(jax.random.key(3), draws)))
  assert all(len(set(row)) == num for row in idx[:2000])   # distinct
  freq = np.bincount(idx.ravel(), minlength=len(keep)) / draws
  stderr = np.sqrt(rho * (1 - rho) / draws)
  assert np.all(np.abs(freq - rho) <= 4.5 * stderr + 1e-9), (freq, rho)


def test_a_low_score_example_weighs_1_over_1_minus_prune_times_a_high_one():
  policy = jis.infobatch(prune=0.75)
  scores = jnp.array([0.1, 0.2, 0.3, 5.0, 6.0, 0.2, 4.0, 0.1])   # 5 below
  below = np.asarray(scores) < float(scores.mean())
  rho = _capped_reference(np.where(below, 0.25, 1.0), 3)
  for t in range(20):
    sel = policy.select(jax.random.key(t), scores, policy.init(8, 3), 3)
    chosen = np.asarray(sel.indices)
    np.testing.assert_allclose(sel.weights, 3 / (8 * rho[chosen]), rtol=1e-5)
    np.testing.assert_allclose(   # the same weight once the ratio is undone
        np.where(below[chosen], sel.weights / 4, sel.weights),
        3 / (8 * rho.max()), rtol=1e-5)


def test_annealing_trains_uniformly_with_weight_one():
  policy = jis.infobatch(prune=0.5, anneal_step=2)
  scores = jnp.array([0.1, 0.2, 5.0, 6.0])
  state = policy.init(4, 2)
  seen = []
  for t in range(4):
    sel = policy.select(jax.random.key(t), scores, state, 2)
    state = sel.state
    seen.append((np.asarray(sel.probs), np.asarray(sel.weights)))
  assert not np.allclose(seen[1][0], 0.25)
  for probs, weights in seen[2:]:
    np.testing.assert_allclose(probs, 0.25)
    np.testing.assert_array_equal(weights, 1.0)


# ---------------------------------------------------------------- the loader


def test_the_epoch_weights_are_unbiased_and_skip_pruned_examples():
  scores = np.random.default_rng(0).exponential(size=50)
  scored = np.ones(50, bool)
  scored[:5] = False                      # never scored: always kept
  low = scored & (scores < scores[scored].mean())
  total = np.zeros(50)
  lengths = []
  for epoch in range(4000):
    order, weights = jis.infobatch_epoch(scores, scored, prune=0.5,
                                         seed=(7, epoch))
    assert len(set(order.tolist())) == len(order)   # each at most once
    np.add.at(total, order, weights)
    lengths.append(len(order))
  # Every example's mean weight over epochs is 1 (binomial: sd 1/sqrt(n)).
  mean = total / 4000
  np.testing.assert_allclose(mean[~low], 1.0)
  assert np.all(np.abs(mean[low] - 1.0) < 4.5 / np.sqrt(4000))
  # The epoch is shorter by prune times the below-mean share.
  assert np.mean(lengths) == pytest.approx(50 - 0.5 * low.sum(), rel=0.01)


def test_the_device_epoch_is_unbiased_and_puts_the_kept_first():
  # jis.infobatch_order against the numpy reference: the below-mean set, each
  # kept example's weight, and every example's mean weight over epochs 1.
  scores = np.random.default_rng(1).exponential(size=50).astype(np.float32)
  scored = np.ones(50, bool)
  scored[:5] = False                      # never scored: always kept
  low = scored & (scores < scores[scored].mean())
  draw = jax.jit(jax.vmap(lambda k: jis.infobatch_order(k, scores, scored,
                                                        prune=0.5)))
  epochs = 4000
  orders, weights, sizes = jax.device_get(
      draw(jax.random.split(jax.random.key(3), epochs)))
  total, first = np.zeros(50), np.zeros(50)
  for order, w, size in zip(orders, weights, sizes):
    assert sorted(order.tolist()) == list(range(50))   # a permutation
    kept, pruned = order[:size], order[size:]
    assert low[pruned].all()                 # only below-mean ones pruned
    np.testing.assert_array_equal(w[kept], np.where(low[kept], 2.0, 1.0))
    total[kept] += w[kept]
    first[order[0]] += 1
  mean = total / epochs
  np.testing.assert_allclose(mean[~low], 1.0)
  assert np.all(np.abs(mean[low] - 1.0) < 4.5 / np.sqrt(epochs))
  assert np.mean(sizes) == pytest.approx(50 - 0.5 * low.sum(), rel=0.01)
  # The kept ones in a random order: the first is an above-mean example
  # with probability (its share of the kept) ≈ (50 − |low|) / E[size].
  share = first[~low].sum() / epochs
  expected = (~low).sum() / np.mean(sizes)
  assert abs(share - expected) < 4.5 * np.sqrt(expected * (1 - expected) / epochs)


@pytest.mark.parametrize("min_free_bits", [None, 33])   # packed; pairs
def test_kept_first_order_is_uniform_within_each_part(monkeypatch,
                                                      min_free_bits):
  # Against the exact distribution: with keep = [T, F, T, T, F] every one
  # of the 3! · 2! orders with the kept first is equally likely (chi-square
  # over 12,000 draws, fixed seed; the 0.1 % critical value of 11 degrees of
  # freedom is 31.3). 33 forces the fallback that sorts keys with an index.
  if min_free_bits:
    monkeypatch.setattr(_epochs, "_MIN_FREE_BITS", min_free_bits)
  keep = jnp.array([True, False, True, True, False])
  draws = 12_000
  orders = jax.device_get(jax.jit(jax.vmap(
      lambda k: _epochs.kept_first_order(k, keep)))(
          jax.random.split(jax.random.key(5), draws)))
  counts = {}
  for order in map(tuple, orders):
    counts[order] = counts.get(order, 0) + 1
  allowed = {a + b for a in itertools.permutations((0, 2, 3))
             for b in itertools.permutations((1, 4))}
  assert set(counts) == allowed
  expected = draws / len(allowed)
  chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
  assert chi2 < 31.3


def test_kept_first_order_with_three_passes_has_no_index_order_left():
  # N = 2¹⁶ + 1 needs 17 position bits, so three packed sorts. A pass that
  # left ties in index order would show in the ascents (order[j] <
  # order[j+1]): a uniform permutation has (N − 1)/2 of them, sd
  # √((N + 1)/12) ≈ 74; and example 0 would come early.
  n = 2 ** 16 + 1
  keep = jnp.arange(n) % 3 != 0
  firsts = []
  for seed in range(4):
    order = np.asarray(jax.jit(_epochs.kept_first_order)(
        jax.random.key(seed), keep))
    size = int(keep.sum())
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert np.all(order[:size] % 3 != 0) and np.all(order[size:] % 3 == 0)
    for part in (order[:size], order[size:]):
      ascents = np.sum(np.diff(part) > 0)
      assert abs(ascents - (len(part) - 1) / 2) < 5 * np.sqrt(len(part) / 12)
    firsts.append(int(np.flatnonzero(order == 1)[0]))
  # Example 1 (kept) sits anywhere among the kept: its mean position over
  # 4 draws is within 5 sd of the middle (sd size/√(12·4)).
  assert abs(np.mean(firsts) - size / 2) < 5 * size / np.sqrt(48)


def test_the_step_and_the_epochs_agree_on_what_is_below_the_mean():
  # Scores 1, 3 and 2(1 − 1e-5) (mean 2 − 6.7e-6): the last lies within
  # 1e-4 of the mean and counts as at it in all three, so it is never
  # pruned and keeps weight 1; example 0 is below and prunable.
  scores = np.array([1.0, 3.0, 2.0 * (1 - 1e-5)], np.float32)
  np.testing.assert_allclose(_pruning.keep_probabilities(scores, 0.5),
                             [0.5, 1.0, 1.0])
  for seed in range(20):
    order, weights = jis.infobatch_epoch(scores, prune=0.5, seed=seed)
    assert {1, 2} <= set(order.tolist())
    np.testing.assert_array_equal(weights[order != 0], 1.0)
    order, weights, size = jis.infobatch_order(jax.random.key(seed), scores,
                                               prune=0.5)
    assert {1, 2} <= set(order[:size].tolist())
    np.testing.assert_array_equal(weights[1:], 1.0)


def test_an_annealed_device_epoch_keeps_everything_with_weight_one():
  order, weights, size = jis.infobatch_order(
      jax.random.key(0), jnp.arange(10.0), prune=0.5, anneal=jnp.array(True))
  assert int(size) == 10 and sorted(order.tolist()) == list(range(10))
  np.testing.assert_array_equal(weights, 1.0)


def test_an_annealed_epoch_keeps_everything_with_weight_one():
  order, weights = jis.infobatch_epoch(np.arange(10.0), prune=0.5, seed=0,
                                       anneal=True)
  assert sorted(order.tolist()) == list(range(10))
  np.testing.assert_array_equal(weights, 1.0)


@pytest.mark.parametrize("call,match", [
    (lambda: jis.infobatch(prune=1.0), r"infobatch\(prune\) must be a number in \[0, 1\)"),
    (lambda: jis.infobatch(anneal_step=-1), r"infobatch\(anneal_step\)"),
    (lambda: jis.infobatch_epoch(np.ones((2, 2))), "one score per example"),
    (lambda: jis.infobatch_epoch(np.ones(3), np.ones(2, bool)),
     r"scored\) must have the scores' shape"),
    (lambda: jis.infobatch_order(jax.random.key(0), jnp.ones((2, 2))),
     "one score per example"),
    (lambda: jis.infobatch_order(jax.random.key(0), jnp.ones(3),
                                 jnp.ones(2, bool)),
     r"infobatch_order\(scored\) must have the scores' shape"),
    (lambda: jis.infobatch_order(jax.random.key(0), jnp.ones(3), prune=1.0),
     r"infobatch_order\(prune\)"),
    (lambda: jis.kept_first_order(jax.random.key(0), jnp.ones((2, 2), bool)),
     r"kept_first_order\(keep\) needs one bool per example, shape \[N\]"),
])
def test_bad_arguments_name_the_fix(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ---------------------------------------------------------------- the stale mode


def _stale_sampler(**kw):
  return jis.importance_step(_train_step, kw.pop("logits_fn", None),
                             batch_size=4, presample=3.0,
                             score_table=jis.stale_scores(40),
                             policy=jis.infobatch(0.5), **kw)


def test_no_logits_fn_with_a_table_reads_the_train_step_logits():
  sampler = _stale_sampler()
  state = sampler.init(_params(), jax.random.key(0))
  data = _data(40)
  state, metrics = jax.jit(sampler.step)(state, jis.Indexed(data, jnp.arange(12)))
  assert int(np.sum(np.asarray(state.table.scored_at) == 0)) >= 1

  def no_logits(params, batch, weights):
    params, metrics = _train_step(params, batch, weights)
    del metrics["is/logits"]
    return params, metrics
  bad = jis.importance_step(no_logits, None, batch_size=4, presample=3.0,
                            score_table=jis.stale_scores(40))
  with pytest.raises(ValueError, match=r"return its logits under metrics\['is/logits'\]"):
    jax.jit(bad.step)(bad.init(_params(), jax.random.key(0)),
                      jis.Indexed(data, jnp.arange(12)))
  with pytest.raises(ValueError, match="logits_fn is required"):
    jis.importance_step(_train_step, None, batch_size=4)


def test_example_weights_multiply_the_importance_weights():
  sampler = jis.importance_step(_train_step, None, batch_size=4, presample=1.0,
                                score_table=jis.stale_scores(40),
                                condition=jis.never(), example_weights="weight")
  batch = {**jax.tree.map(lambda x: x[:4], _data(40)),
           "weight": jnp.array([1.0, 2.0, 1.0, 2.0])}
  state, metrics = jax.jit(sampler.step)(
      sampler.init(_params(), jax.random.key(0)), batch)
  np.testing.assert_array_equal(metrics["weights"], batch["weight"])
  np.testing.assert_array_equal(np.asarray(state.table.scored_at)[:4], 0)


def test_the_stale_mode_on_8_devices_equals_one_device():
  mesh = jax.make_mesh((8,), ("data",))
  data = _data(64)

  def run(mesh):
    sampler = jis.importance_step(_train_step, None, batch_size=8,
                                  presample=2.0, score="loss",
                                  score_table=jis.stale_scores(64),
                                  policy=jis.infobatch(0.5), mesh=mesh)
    state = sampler.init(_params(), jax.random.PRNGKey(0))
    step = jax.jit(sampler.step)
    for t in range(6):
      idx = jax.random.permutation(jax.random.key(t), 64)[:16]
      batch = jax.tree.map(lambda x: x[idx], data)
      if mesh is not None:
        batch = jis.shard_presample(batch, mesh)
      state, _ = step(state, batch)
    return state
  one, eight = run(None), run(mesh)
  np.testing.assert_allclose(eight.inner, one.inner, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eight.table.scores, one.table.scores, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(eight.table.scored_at, one.table.scored_at)


def test_scores_at_the_mean_are_kept_whatever_the_rounding():
  # A score table fills never-scored examples with the mean of the scored
  # ones in the presample: the presample's mean, up to rounding that differs
  # between one device and a mesh. Such scores are kept (π = 1) either way.
  from jis import _pruning
  mean = np.float32(0.4)
  for at_mean in (mean, np.nextafter(mean, np.float32(0)),
                  np.nextafter(mean, np.float32(1))):
    s = np.array([0.1, 0.7] + [at_mean] * 14, np.float32)
    keep = np.asarray(_pruning.keep_probabilities(jnp.asarray(s), 0.5))
    np.testing.assert_array_equal(keep, [0.5] + [1.0] * 15)
