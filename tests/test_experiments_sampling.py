"""config.sampler -> jis.importance_step keyword arguments."""

import jax
import jax.numpy as jnp
import pytest

import jis
from experiments import sampling
from experiments.configs import common


def config(**fields):
  c = common.sampler()
  for k, v in fields.items():
    c[k] = v
  return c


def test_defaults_are_importance_step_defaults():
  kwargs = sampling.sampler_kwargs(common.sampler())
  assert kwargs["presample"] == 3.0
  # None and "" are not passed: importance_step's defaults apply (its score,
  # threshold, policy, ...).
  for unset in ("score", "tau_threshold", "tau_momentum", "policy",
                "condition", "score_transforms", "score_table", "budget",
                "forward_batch_size"):
    assert unset not in kwargs
  # An unset field for an option this jis version lacks is fine; a set one
  # is an error (below).
  c = config()
  c.option_of_a_later_jis = ""
  assert "option_of_a_later_jis" not in sampling.sampler_kwargs(c)


def test_policy_condition_and_transforms_are_looked_up_on_jis():
  kwargs = sampling.sampler_kwargs(config(
      policy="importance_sampling(k=0.5)", condition="warmup(3)",
      score_transforms="(additive_smoothing(1.0), power_smoothing(0.5))"))
  assert isinstance(kwargs["policy"], jis.Policy)
  assert isinstance(kwargs["condition"], jis.Condition)
  assert all(isinstance(t, jis.ScoreTransform)
             for t in kwargs["score_transforms"])
  assert len(kwargs["score_transforms"]) == 2
  # A bare factory name is called with its defaults.
  assert isinstance(sampling.sampler_kwargs(config(condition="always"))[
      "condition"], jis.Condition)
  assert isinstance(sampling.sampler_kwargs(config(
      condition="jis.never"))["condition"], jis.Condition)


def test_the_looked_up_policy_is_the_one_used():
  # warmup(2): two uniform steps, then importance sampling.
  def train_step(params, batch, weights):
    return params, {"loss": jnp.mean(weights)}
  sampler, big_b = sampling.build(
      config(condition="warmup(2)", tau_threshold=None), train_step,
      lambda p, b: b["x"], 4)
  assert big_b == 12
  state = sampler.init(jnp.zeros(()), jax.random.PRNGKey(0))
  batch = {"x": jnp.ones((12, 3)), "label": jnp.zeros((12,), jnp.int32)}
  active = []
  step = jax.jit(sampler.step)
  for _ in range(4):
    state, metrics = step(state, batch)
    active.append(float(metrics["is/active"]))
  assert active == [0.0, 0.0, 1.0, 1.0]


def test_unknown_names_fail_clearly():
  with pytest.raises(ValueError, match="jis has no 'no_such_policy'") as info:
    sampling.sampler_kwargs(config(policy="no_such_policy"))
  assert "importance_sampling" in str(info.value)   # lists what exists
  with pytest.raises(ValueError, match="not an option of jis.importance_step"):
    c = config()
    c.unknown_option = 1.0
    sampling.sampler_kwargs(c)
  with pytest.raises(ValueError, match="literals"):
    sampling.sampler_kwargs(config(policy="importance_sampling(k=x)"))
  with pytest.raises(ValueError, match="not a jis name"):
    sampling.sampler_kwargs(config(policy="importance_sampling("))


def test_uniform_score_reads_one_batch_per_step():
  sampler, big_b = sampling.build(config(score="uniform"),
                                  lambda s, b, w: (s, {}), None, 8)
  assert big_b == 8
  _, big_b = sampling.build(config(presample=5.0), lambda s, b, w: (s, {}),
                            lambda s, b: b, 8)
  assert big_b == 40


def test_tau_threshold_overrides_from_strings():
  c = config()
  c.tau_threshold = float("inf")
  assert sampling.sampler_kwargs(c)["tau_threshold"] == float("inf")


def test_num_examples_is_filled_in_for_factories_that_take_it():
  if not hasattr(jis, "stale_scores"):
    pytest.skip("this jis has no stale_scores")
  seen = {}
  original = jis.stale_scores

  def spy(num_examples, **kwargs):
    seen["num_examples"] = num_examples
    return original(num_examples, **kwargs)
  jis.stale_scores = spy
  try:
    sampling.sampler_kwargs(config(score_table="stale_scores"),
                            {"num_examples": 1234})
    assert seen["num_examples"] == 1234
    sampling.sampler_kwargs(config(score_table="stale_scores(99)"),
                            {"num_examples": 1234})
    assert seen["num_examples"] == 99      # given arguments win
  finally:
    jis.stale_scores = original


@pytest.mark.parametrize("score_dtype, scored_in", [
    ("", "float32[12,3]"), ("bfloat16", "bfloat16[12,3]")])
def test_score_dtype_wraps_logits_fn_in_low_precision(score_dtype, scored_in):
  def train_step(params, batch, weights):
    return params, {"loss": jnp.mean(weights)}

  sampler, _ = sampling.build(config(score_dtype=score_dtype,
                                     tau_threshold=0.0),
                              train_step, lambda p, b: b["x"] @ p, 4)
  state = sampler.init(jnp.ones((3, 5)) / 3, jax.random.PRNGKey(0))
  batch = {"x": jnp.ones((12, 3)), "label": jnp.zeros((12,), jnp.int32)}
  # The scoring pass's product, on the presample of 12, in the chosen dtype.
  products = [e for e in jax.make_jaxpr(sampler.step)(state, batch).eqns
              if e.primitive.name == "dot_general"]
  assert [str(e.invars[0].aval) for e in products] == [scored_in]
  _, metrics = jax.jit(sampler.step)(state, batch)
  assert float(metrics["is/active"]) == 1.0


@pytest.mark.parametrize("score_dtype, message", [
    ("bf16x", "is not a dtype"), ("int8", "must be a floating dtype")])
def test_bad_score_dtype_names_the_field(score_dtype, message):
  with pytest.raises(ValueError, match=rf"config.sampler.score_dtype="
                     rf"'{score_dtype}': .*{message}"):
    sampling.build(config(score_dtype=score_dtype), lambda s, b, w: (s, {}),
                   lambda s, b: b["x"], 4)


def test_score_dtype_with_the_uniform_baseline_needs_no_logits_fn():
  sampler, big_b = sampling.build(config(score="uniform",
                                         score_dtype="bfloat16"),
                                  lambda s, b, w: (s, {}), None, 8)
  assert big_b == 8
  state = sampler.init(jnp.zeros(()), jax.random.PRNGKey(0))
  _, metrics = sampler.step(state, {"x": jnp.ones((8, 3)),
                                    "label": jnp.zeros((8,), jnp.int32)})
  assert float(metrics["is/active"]) == 0.0
