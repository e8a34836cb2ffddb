"""Probe cited in docs/performance_notes.md, section 8: the MLP cell b = 128,
B = 384 of step_cost --score_dtype=bfloat16, plus scoring passes whose
parameters change every step (so no cast can be hoisted out of the loop;
tf_chg_none is the cost of that change alone).

  python experiments/benchmarks/probes/low_precision_floor.py
"""
import time, statistics, jax, jax.numpy as jnp
from experiments.benchmarks import step_cost as sc, common
from experiments import train
import jis
config, model, shape = sc.model_setup("mlp")
b, p, k = 128, 3.0, 10
progs = sc.Programs(config, model, shape, b, p, k, score_dtype="bfloat16")
st = train.create_train_state(config, model, jnp.zeros((1,)+shape), jax.random.PRNGKey(0))
def make(fn):
  def run(s, xs):
    def body(s, batch):
      logits = fn(s, batch)
      sc_ = jis.logit_grad_norm(logits, batch["label"], "softmax_cross_entropy")
      s = s.replace(params=jax.tree.map(lambda p: p + 1e-9 * sc_[0], s.params))
      return s, jnp.sum(sc_)
    return jax.lax.scan(body, s, xs)
  return jax.jit(run, donate_argnums=0)
def touch(s, batch):
  return jnp.zeros((batch["label"].shape[0], 10)) + batch["label"][:, None] * 0.0
for name, fn in (("tf_chg_f32", train.logits_fn), ("tf_chg_bf16", jis.low_precision(train.logits_fn)), ("tf_chg_none", touch)):
  progs.fns[name] = (make(fn), sc._fresh(st), progs.big); progs.carry[name] = progs.fns[name][1]
progs.warm_up()
t = common.time_interleaved({n: (lambda n=n: progs.call(n)) for n in progs.fns}, 7)
for n, ts in t.items(): print(n, "%.2f ms" % (statistics.median(ts) / k * 1e3))
