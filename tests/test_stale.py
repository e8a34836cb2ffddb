"""Stale per-example scores: the table, its refreshes, and the forward passes saved."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jis
import jaxpr_testing

LR = 0.5
DIM, CLASSES = 5, 3
N, BIG_B, B = 30, 12, 4


def _train_step(params, batch, weights):
  def loss_fn(p):
    logits = batch["x"] @ p
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.mean(weights * losses), logits
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  # "trained" tells the test which dataset examples the step trained on.
  return params - LR * grads, {"loss": loss, "is/logits": logits,
                               "trained": batch["index"]}


def _train_step_without_logits(params, batch, weights):
  params, metrics = _train_step(params, batch, weights)
  del metrics["is/logits"]
  return params, metrics


def _logits(params, batch):
  return batch["x"] @ params


def _dataset(seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(kx, (N, DIM)),
          "label": jax.random.randint(ky, (N,), 0, CLASSES),
          "index": jnp.arange(N)}


def _params(seed=1):
  return 0.5 * jax.random.normal(jax.random.key(seed), (DIM, CLASSES))


def _indices(seed, n=BIG_B):
  return jax.random.choice(jax.random.key(100 + seed), N, (n,), replace=False)


def _numpy_upper_bound(params, data, idx):
  idx = np.asarray(idx)
  z = np.asarray(data["x"], np.float64)[idx] @ np.asarray(params, np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(idx)), np.asarray(data["label"])[idx]] -= 1
  return np.linalg.norm(p, axis=1)


def _sampler(table=None, train_step=_train_step, **kw):
  # The table of upper-bound scores and the categorical draw from them (the
  # stale mode's defaults, loss scores and InfoBatch, are in test_pruning.py),
  # each step training on its own draw unless a test asks for lookahead.
  kw.setdefault("tau_threshold", 0.0)
  kw.setdefault("score", "upper_bound")
  kw.setdefault("policy", jis.importance_sampling())
  return jis.importance_step(
      train_step, _logits, batch_size=B, presample=BIG_B / B,
      score_table=table or jis.stale_scores(N, lookahead=False), **kw)


# ---------------------------------------------------------------- the table


def test_write_keeps_the_largest_of_duplicates_and_lookup_fills_the_unscored():
  table = jis.stale_scores(6)
  first = table.write(table.init(), jnp.array([4, 5]), jnp.array([20.0, 3.0]),
                      2)
  # Example 4 twice, its old score 20 above both new ones: it is replaced.
  state = table.write(first, jnp.array([4, 1, 4, 2]),
                      jnp.array([1.0, 2.0, 9.0, 6.0]), 7)
  np.testing.assert_array_equal(state.scores, [1, 2, 6, 1, 9, 3])
  np.testing.assert_array_equal(state.scored_at, [-1, 7, 7, -1, 7, 2])
  # The same writes in another order give the same table.
  again = table.write(first, jnp.array([2, 4, 1, 4]),
                      jnp.array([6.0, 9.0, 2.0, 1.0]), 7)
  np.testing.assert_array_equal(again.scores, state.scores)
  scores, scored = table.lookup(state, jnp.array([0, 1, 2, 4, 3]), 8)
  np.testing.assert_allclose(scores, [17 / 3, 2.0, 6.0, 9.0, 17 / 3])
  np.testing.assert_array_equal(scored, [False, True, True, True, False])
  # The fill is the mean of the presample's scored entries (O(B)), not of
  # the whole table's: example 2 (score 6) is not in this presample.
  scores, _ = table.lookup(state, jnp.array([0, 1, 4]), 8)
  np.testing.assert_allclose(scores, [5.5, 2.0, 9.0])
  # Indices out of range are dropped.
  dropped = table.write(state, jnp.array([6, 0]), jnp.array([5.0, 4.0]), 9)
  np.testing.assert_array_equal(dropped.scores, [4, 2, 6, 1, 9, 3])
  # A NaN among an index's scores is kept, in either order (a lookup that
  # reads it then makes the step fall back, as for any NaN score).
  for order in ([0.5, np.nan], [np.nan, 0.5]):
    nan = table.write(state, jnp.array([3, 3]), jnp.array(order), 9)
    assert np.isnan(nan.scores[3])
  scores, scored = table.lookup(table.init(), jnp.array([0, 3]), 0)
  np.testing.assert_array_equal(scores, [1.0, 1.0])   # nothing scored: uniform
  assert not np.any(scored)


def test_max_age_expires_old_scores():
  table = jis.stale_scores(4, max_age=2)
  state = table.write(table.init(), jnp.array([0]), jnp.array([5.0]), 0)
  state = table.write(state, jnp.array([1]), jnp.array([1.0]), 3)
  scores, scored = table.lookup(state, jnp.array([0, 1]), 4)
  np.testing.assert_array_equal(scored, [False, True])   # age 4 > 2; age 1
  np.testing.assert_allclose(scores, [1.0, 1.0])


@pytest.mark.parametrize("make, match", [
    (lambda: jis.stale_scores(0), r"num_examples"),
    (lambda: jis.stale_scores(10, refresh_every=-1), r"refresh_every"),
    (lambda: jis.stale_scores(10, refresh_every=2, refresh_steps=3), r"refresh_steps"),
    (lambda: jis.stale_scores(10, max_age=-2), r"max_age"),
])
def test_bad_arguments_are_refused(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# ---------------------------------------------------------------- in the step


@pytest.mark.parametrize("train_step", [_train_step, _train_step_without_logits],
                         ids=["train_logits", "forward_of_b"])
def test_trained_examples_are_refreshed_and_the_others_untouched(train_step):
  data, params = _dataset(), _params()
  sampler = _sampler(train_step=train_step)
  step = jax.jit(sampler.step)
  state = sampler.init(params, jax.random.key(0))
  table0 = state.table
  for t in range(3):
    before = state
    state, metrics = step(state, jis.Indexed(data, _indices(t)))
    trained = np.unique(np.asarray(metrics["trained"]))
    others = np.setdiff1d(np.arange(N), trained)
    np.testing.assert_allclose(state.table.scores[trained],
                               _numpy_upper_bound(before.inner, data, trained),
                               rtol=1e-5)
    np.testing.assert_array_equal(state.table.scored_at[trained], t)
    np.testing.assert_array_equal(state.table.scores[others],
                                  before.table.scores[others])
    np.testing.assert_array_equal(state.table.scored_at[others],
                                  before.table.scored_at[others])
    assert float(metrics["is/fresh"]) == 0.0
  assert np.any(state.table.scored_at != table0.scored_at)


def test_trained_scores_without_logits_fn_come_from_the_train_step_or_fail_clearly():
  # No logits_fn: a lookup-only table reads its scores from the train step's
  # "is/logits". Without them the step refuses, naming the table and the
  # fix; a score that reads no logits (uniform) needs neither, so a policy
  # that observes uniform steps' scores runs on a train step without them.
  data = _dataset()
  table = jis.stale_scores(N, lookahead=False)
  bare = jis.importance_step(_train_step_without_logits, None, batch_size=B,
                             presample=BIG_B / B, score_table=table)
  state = bare.init(_params(), jax.random.key(0))
  with pytest.raises(ValueError, match=r"score table keeps.*score='loss'"
                     r".*metrics\['is/logits'\].*logits_fn"):
    bare.step(state, jis.Indexed(data, _indices(0)))
  observer = jis.importance_step(
      _train_step_without_logits, None, batch_size=B, presample=BIG_B / B,
      score="uniform", policy=jis.selective_backprop(), condition=jis.never())
  state = observer.init(_params(), jax.random.key(0))
  for t in range(2):
    state, metrics = jax.jit(observer.step)(
        state, {k: v[_indices(t)] for k, v in data.items()})
  assert np.isfinite(float(metrics["loss"]))


def test_unscored_fraction_and_age_metrics():
  data = _dataset()
  sampler = _sampler()
  step = jax.jit(sampler.step)
  state = sampler.init(_params(), jax.random.key(0))
  state, metrics = step(state, jis.Indexed(data, _indices(0)))
  assert float(metrics["is/unscored"]) == 1.0   # nothing scored yet
  scored_at = np.asarray(state.table.scored_at)
  idx = np.asarray(_indices(1))
  state, metrics = step(state, jis.Indexed(data, jnp.asarray(idx)))
  seen = scored_at[idx] >= 0
  assert float(metrics["is/unscored"]) == pytest.approx(1 - seen.mean())
  if seen.any():
    assert float(metrics["is/score_age"]) == pytest.approx(1.0)  # scored at step 0


def test_an_index_outside_the_table_is_reported_and_not_aged():
  # Inside jit an index can only be checked on the device: the step reports
  # is/bad_index, falls back to uniform scores, and the mean score age is
  # that of the entries read from the table (scored at step 3, read at 10).
  data, sampler = _dataset(), _sampler()
  state = sampler.init(_params(), jax.random.key(0))
  state = state._replace(
      step=jnp.asarray(10, jnp.int32),
      table=state.table._replace(scored_at=jnp.full((N,), 3, jnp.int32)))
  index = _indices(0).at[0].set(N + 5)
  _, metrics = jax.jit(sampler.step)(state, jis.Indexed(data, index))
  assert float(metrics["is/bad_index"]) == 1.0
  assert float(metrics["is/fallback"]) == 1.0
  assert float(metrics["is/score_age"]) == pytest.approx(7.0)


def test_fresh_steps_score_the_whole_presample():
  data, params = _dataset(), _params()
  sampler = _sampler(jis.stale_scores(N, refresh_every=3))
  step = jax.jit(sampler.step)
  state = sampler.init(params, jax.random.key(0))
  fresh = []
  for t in range(6):
    before = state
    idx = _indices(t)
    state, metrics = step(state, jis.Indexed(data, idx))
    fresh.append(float(metrics["is/fresh"]))
    if t % 3 == 0:
      np.testing.assert_allclose(state.table.scores[idx],
                                 _numpy_upper_bound(before.inner, data, idx),
                                 rtol=1e-5)
      np.testing.assert_array_equal(state.table.scored_at[idx], t)
  assert fresh == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
  assert step._cache_size() == 1


def test_uniform_steps_write_the_scores_they_compute():
  data, params = _dataset(), _params()
  sampler = _sampler(tau_threshold=float("inf"))
  idx = _indices(0)
  state, metrics = jax.jit(sampler.step)(sampler.init(params, jax.random.key(0)),
                                         jis.Indexed(data, idx))
  assert float(metrics["is/active"]) == 0.0
  np.testing.assert_allclose(state.table.scores[idx[:B]],
                             _numpy_upper_bound(params, data, idx[:B]), rtol=1e-5)
  assert int(jnp.sum(state.table.scored_at >= 0)) == B


def test_selection_follows_the_stale_scores():
  data, params = _dataset(), _params()
  sampler = _sampler(diagnostics=True)
  rng = np.random.default_rng(0)
  table_scores = rng.exponential(size=N).astype(np.float32)
  idx = np.asarray(_indices(0))
  draws = 4000
  keys = jax.random.split(jax.random.key(7), draws)

  def one(key):
    state = sampler.init(params, key)
    state = state._replace(table=jis._stale.TableState(
        jnp.asarray(table_scores), jnp.zeros((N,), jnp.int32)))
    return sampler.step(state, jis.Indexed(data, jnp.asarray(idx)))[1]
  metrics = jax.jit(jax.vmap(one))(keys)
  trained = np.asarray(metrics["trained"]).ravel()
  counts = np.array([np.sum(trained == i) for i in idx])
  p = table_scores[idx] / table_scores[idx].sum()
  p = (1 - 1e-4) * p + 1e-4 / len(p)   # importance_sampling's defensive mixture
  chi2 = np.sum((counts - counts.sum() * p) ** 2 / (counts.sum() * p))
  assert chi2 < 31.26   # chi-square, 11 degrees of freedom, p = 0.001
  np.testing.assert_allclose(metrics["is/entropy"], -np.sum(p * np.log(p)), rtol=1e-5)


def test_a_dict_batch_with_indices_equals_an_indexed_presample():
  data, params = _dataset(), _params()
  sampler = _sampler(jis.stale_scores(N, refresh_every=2, lookahead=False))
  step = jax.jit(sampler.step)
  a = b = sampler.init(params, jax.random.key(0))
  for t in range(4):
    idx = _indices(t)
    a, _ = step(a, jis.Indexed(data, idx))
    b, _ = step(b, jax.tree.map(lambda x: x[idx], data))
  np.testing.assert_allclose(a.inner, b.inner, rtol=1e-6)
  np.testing.assert_array_equal(a.table.scored_at, b.table.scored_at)
  np.testing.assert_allclose(a.table.scores, b.table.scores, rtol=1e-6)


def test_compiles_once_runs_under_scan_and_with_donation():
  data = _dataset()
  sampler = _sampler(jis.stale_scores(N, refresh_every=3), tau_threshold=1.01,
                     tau_momentum=0.0)
  step = jax.jit(sampler.step, donate_argnums=0)
  state = sampler.init(_params(), jax.random.key(0))
  idx = jnp.stack([_indices(t) for t in range(6)])
  active = []
  for t in range(6):
    state, metrics = step(state, jis.Indexed(data, idx[t]))
    active.append(float(metrics["is/active"]))
  assert step._cache_size() == 1

  @jax.jit
  def run(state, data, idx):
    return jax.lax.scan(lambda s, i: sampler.step(s, jis.Indexed(data, i)), state, idx)
  # params was donated with the first state: make it again.
  scanned, metrics = run(sampler.init(_params(), jax.random.key(0)), data, idx)
  np.testing.assert_allclose(scanned.inner, state.inner, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(scanned.table.scored_at, state.table.scored_at)
  np.testing.assert_array_equal(metrics["is/active"], active)


def test_whole_dataset_presample_is_the_history_sampler():
  data = _dataset()
  sampler = jis.importance_step(_train_step, _logits, batch_size=5,
                                presample=N / 5, tau_threshold=0.0,
                                score_table=jis.stale_scores(N))
  step = jax.jit(sampler.step)
  state = sampler.init(_params(), jax.random.key(0))
  unscored = []
  for _ in range(4):
    state, metrics = step(state, jis.Indexed(data, jnp.arange(N)))
    unscored.append(float(metrics["is/unscored"]))
  # Lookahead (the default with jis.Indexed): step 0 trains on the first 5
  # rows and writes their scores before it looks up the whole dataset.
  assert unscored[0] == pytest.approx(1.0 - 5 / N)
  assert unscored == sorted(unscored, reverse=True) and unscored[-1] < unscored[0]


def test_missing_index_is_reported_with_the_fix():
  data = _dataset()
  batch = {k: v[:BIG_B] for k, v in data.items() if k != "index"}
  sampler = _sampler()
  with pytest.raises(ValueError, match=r"batch\['index'\].*jis.Indexed"):
    sampler.step(sampler.init(_params(), jax.random.key(0)), batch)


def test_bad_indexed_presample_is_reported():
  sampler = _sampler()
  state = sampler.init(_params(), jax.random.key(0))
  with pytest.raises(ValueError,
                     match=r"index must be an integer array of shape \(12,\)"):
    sampler.step(state, jis.Indexed(_dataset(), jnp.arange(5)))


# ---------------------------------------------------------------- forward passes


def _row_counts(jaxpr, into_conds=True):
  """Rows of every example batch a dot_general multiplies, or a gather makes."""
  rows = []
  for eqn in jaxpr_testing.eqns(jaxpr, into_conds):
    if eqn.primitive.name == "dot_general":
      shape = eqn.invars[0].aval.shape
      if len(shape) == 2 and shape[1] == DIM:
        rows.append(("dot", shape[0]))
    if eqn.primitive.name == "gather":
      shape = eqn.outvars[0].aval.shape
      if len(shape) == 2 and shape[1] == DIM:
        rows.append(("gather", shape[0]))
  return rows


def _step_jaxpr(sampler, batch):
  return jax.make_jaxpr(sampler.step)(sampler.init(_params(), jax.random.key(0)),
                                      batch).jaxpr


@pytest.mark.parametrize("train_step", [_train_step, _train_step_without_logits],
                         ids=["train_logits", "forward_of_b"])
def test_no_presample_forward_pass_without_refresh(train_step):
  data = _dataset()
  batch = jis.Indexed(data, _indices(0))
  rows = _row_counts(_step_jaxpr(_sampler(train_step=train_step), batch))
  assert rows and all(n == B for _, n in rows), rows   # only the b trained rows
  # The same check finds the presample forward pass of plain importance sampling.
  plain = jis.importance_step(train_step, _logits, batch_size=B,
                              presample=BIG_B / B, tau_threshold=0.0)
  assert ("dot", BIG_B) in _row_counts(_step_jaxpr(plain, batch))


def test_presample_forward_pass_only_in_the_fresh_branch():
  batch = jis.Indexed(_dataset(), _indices(0))
  jaxpr = _step_jaxpr(_sampler(jis.stale_scores(N, refresh_every=4)), batch)
  presample = ("dot", BIG_B)
  assert presample not in _row_counts(jaxpr, into_conds=False)
  # With a score table the default condition is always(): the importance
  # path is compiled alone, with no cond choosing it. The presample forward
  # pass sits in one branch of the (stale, fresh) cond only.
  splits = [[presample in _row_counts(br.jaxpr) for br in eqn.params["branches"]]
            for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
  # (The other cond skips the trained examples' refresh on fresh steps.)
  assert [split for split in splits if any(split)] == [[False, True]], splits


def _run_on(mesh, resample, steps=5):
  sampler = _sampler(tau_threshold=None, policy=jis.infobatch(0.5),
                     mesh=mesh, resample=resample)  # upper-bound scores
  # A raw uint32 key: jax 0.10 adds a second dispatch-cache entry (no
  # recompilation) for typed keys on a multi-device mesh (jax#39089).
  state = sampler.init(_params(), jax.random.PRNGKey(0))
  step = jax.jit(sampler.step)
  data = _dataset()
  for t in range(steps):
    batch = jax.tree.map(lambda x: x[_indices(t)], data)
    if mesh is not None:
      batch = jis.shard_presample(batch, mesh)
    state, metrics = step(state, batch)
  return state, step


@pytest.mark.parametrize("resample", ["global", "local"])
def test_the_table_on_a_mesh(resample):
  # Replicated table, presample split over 4 devices: "global" draws what one
  # device draws, so the run equals it; "local" draws per device, and every
  # device writes every trained example's score into its copy.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  state, step = _run_on(mesh, resample)
  assert step._cache_size() == 1
  assert state.table.scores.sharding.is_fully_replicated
  written = np.asarray(state.table.scored_at) >= 0
  assert 0 < written.sum() <= 5 * B
  if resample == "global":
    ref, _ = _run_on(None, "global")
    np.testing.assert_allclose(state.inner, ref.inner, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.table.scores, ref.table.scores, rtol=1e-5)
    np.testing.assert_array_equal(state.table.scored_at, ref.table.scored_at)


def test_default_condition_resamples_from_the_first_step():
  sampler = jis.importance_step(_train_step, _logits, batch_size=B,
                                presample=BIG_B / B, score_table=jis.stale_scores(N))
  _, metrics = jax.jit(sampler.step)(sampler.init(_params(), jax.random.key(0)),
                                     jis.Indexed(_dataset(), _indices(0)))
  assert float(metrics["is/active"]) == 1.0


# ---------------------------------------------------------------- lookahead


def _weighted_train_step(params, batch, weights):
  params, metrics = _train_step(params, batch, weights)
  return params, {**metrics, "weights": weights}


def _prefilled(sampler, params, key, seed=0):
  """A fresh state whose table holds exponential scores for every example."""
  scores = np.random.default_rng(seed).exponential(size=N).astype(np.float32)
  state = sampler.init(params, key)
  return state._replace(table=jis._stale.TableState(
      jnp.asarray(scores), jnp.zeros((N,), jnp.int32)))


def test_lookahead_trains_each_step_on_the_previous_steps_draw():
  data, params = _dataset(), _params()
  plain = _sampler(train_step=_weighted_train_step)
  ahead = _sampler(jis.stale_scores(N, lookahead=True),
                   train_step=_weighted_train_step)
  p0, p1 = (jis.Indexed(data, _indices(t)) for t in (0, 1))
  step = jax.jit(ahead.step)
  start = _prefilled(ahead, params, jax.random.key(3))
  state, first = step(start, p0)
  # Step 0 trains on the first b rows of its presample with weight 1 and
  # writes their scores at step 0, before it draws.
  np.testing.assert_array_equal(first["trained"], np.asarray(p0.index)[:B])
  np.testing.assert_array_equal(first["weights"], 1.0)
  written = np.flatnonzero(np.asarray(state.table.scores)
                           != np.asarray(start.table.scores))
  assert set(written) <= set(np.asarray(p0.index)[:B].tolist())
  assert len(written) > 0
  # Its draw is the one the plain step makes from the table so written,
  # which the plain step trains on at once.
  _, drawn = jax.jit(plain.step)(
      _prefilled(plain, params, jax.random.key(3))._replace(
          table=state.table), p0)
  np.testing.assert_array_equal(state.pending.index, drawn["trained"])
  state, second = step(state, p1)
  np.testing.assert_array_equal(second["trained"], drawn["trained"])
  np.testing.assert_allclose(second["weights"], drawn["weights"], rtol=1e-6)
  # The scores written are the trained rows', at the step that trained them.
  trained = np.asarray(drawn["trained"])
  np.testing.assert_array_equal(np.asarray(state.table.scored_at)[trained], 1)
  assert step._cache_size() == 1


def test_lookahead_update_is_unbiased():
  # Step 1 trains at θ1 on rows drawn from presample 0: over draws its update
  # averages one SGD step at θ1 on presample 0's mean gradient (numpy).
  data, params = _dataset(), _params()
  sampler = _sampler(jis.stale_scores(N, lookahead=True))
  p0, p1 = (jis.Indexed(data, _indices(t)) for t in (0, 1))
  draws = 20000

  def two_steps(key):
    state, _ = sampler.step(_prefilled(sampler, params, key), p0)
    return sampler.step(state, p1)[0].inner
  theta2 = jax.jit(jax.vmap(two_steps))(
      jax.random.split(jax.random.key(42), draws))
  rows = lambda idx: {k: v[np.asarray(idx)] for k, v in data.items()}
  theta1, _ = _train_step(params, rows(p0.index[:B]), jnp.ones(B))
  full, _ = _train_step(theta1, rows(p0.index), jnp.ones(BIG_B))
  updates = np.asarray(theta2 - theta1, np.float64).reshape(draws, -1)
  reference = np.asarray(full - theta1, np.float64).ravel()
  diff = updates.mean(0) - reference
  stderr = updates.std(0) / np.sqrt(draws)
  assert np.all(stderr > 0)   # the draw varies with the key
  assert np.all(np.abs(diff / stderr) < 4.5)
  # The coordinates are correlated, and a softmax's gradients sum to zero
  # over the classes, so the updates span DIM * (CLASSES - 1) dimensions:
  # Hotelling's T² on that range is chi-square with as many degrees of
  # freedom, and off it the mean must match to rounding.
  variances, axes = np.linalg.eigh(np.cov(updates, rowvar=False))
  spanned = variances > 1e-8 * variances.max()
  assert spanned.sum() == DIM * (CLASSES - 1)
  along = axes[:, spanned].T @ diff
  t2 = draws * np.sum(along ** 2 / variances[spanned])
  assert t2 < 29.59   # chi2(10) upper 0.001 quantile (scipy.stats.chi2.ppf)
  np.testing.assert_allclose(axes[:, ~spanned].T @ diff, 0.0, atol=1e-6)


def test_lookahead_resumes_bit_exact_from_a_saved_state():
  data, params = _dataset(), _params()
  sampler = _sampler(jis.stale_scores(N, lookahead=True))
  batches = [jis.Indexed(data, _indices(t)) for t in range(4)]
  step = jax.jit(sampler.step)
  straight = sampler.init(params, jax.random.key(0))
  for batch in batches:
    straight, _ = step(straight, batch)
  resumed = sampler.init(params, jax.random.key(0))
  for batch in batches[:2]:
    resumed, _ = step(resumed, batch)
  saved = jax.device_get(resumed)               # a checkpoint, on the host
  resumed = jax.tree.map(jnp.asarray, saved)
  for batch in batches[2:]:
    resumed, _ = step(resumed, batch)
  jax.tree.map(np.testing.assert_array_equal, jax.random.key_data(
      straight.key), jax.random.key_data(resumed.key))
  for a, b in zip(jax.tree.leaves(straight._replace(key=0)),
                  jax.tree.leaves(resumed._replace(key=0))):
    np.testing.assert_array_equal(a, b)


def test_lookahead_by_default_wherever_it_can_run():
  data, params = _dataset(), _params()
  runs = {}
  for name, lookahead in (("default", None), ("on", True), ("off", False)):
    sampler = _sampler(jis.stale_scores(N, lookahead=lookahead),
                       train_step=_weighted_train_step)
    step = jax.jit(sampler.step)
    for form in ("indexed", "arrays"):
      if form == "arrays" and lookahead:
        continue   # lookahead=True refuses arrays (below)
      state = sampler.init(params, jax.random.key(3))
      for t in range(3):
        idx = _indices(t)
        batch = (jis.Indexed(data, idx) if form == "indexed"
                 else jax.tree.map(lambda x, i=idx: x[i], data))
        state, metrics = step(state, batch)
      runs[name, form] = (state, metrics["trained"])
  # A jis.Indexed presample looks ahead; arrays train on their own draw.
  for form, same in (("indexed", "on"), ("arrays", "off")):
    np.testing.assert_array_equal(runs["default", form][1], runs[same, form][1])
    np.testing.assert_allclose(runs["default", form][0].inner,
                               runs[same, form][0].inner, rtol=1e-6)
  assert not np.array_equal(runs["on", "indexed"][1], runs["off", "indexed"][1])
  # Where a step may not resample, no lookahead and no pending draw: no error.
  sampler = _sampler(jis.stale_scores(N), tau_threshold=None,
                     condition=jis.warmup(2))
  state = sampler.init(params, jax.random.key(0))
  assert state.pending == ()
  sampler.step(state, jis.Indexed(data, _indices(0)))


def test_lookahead_refuses_what_it_cannot_do():
  data, params = _dataset(), _params()
  ahead = jis.stale_scores(N, lookahead=True)
  sampler = _sampler(ahead)
  batch = {k: v[np.asarray(_indices(0))] for k, v in data.items()}
  with pytest.raises(ValueError, match=r"lookahead=True.*jis.Indexed"):
    sampler.step(sampler.init(params, jax.random.key(0)), batch)
  with pytest.raises(ValueError, match=r"every step must resample"):
    _sampler(ahead, tau_threshold=None, condition=jis.warmup(2))
  # The first error about the table, before what the other options say.
  with pytest.raises(ValueError, match=r"every step must resample"):
    _sampler(ahead, tau_threshold=None, condition=jis.warmup(2),
             uniform_batches=True)
  for bad in ("yes", 1):
    with pytest.raises(TypeError, match=r"lookahead\) must be None"):
      jis.stale_scores(N, lookahead=bad)
