"""Where the no-scoring-pass step's time goes: an ablation on the MNIST MLP.

Times, interleaved in one process (K = 10 steps per ``lax.scan``, b = 128,
presample 1.5, a score table of 60,000): the unwrapped step, jis uniform, the
no-scoring-pass step (InfoBatch) on ``jis.Indexed`` presamples and on arrays,
and variants with one piece replaced by a no-op: the Gumbel top-k (the first
b rows), the table's write, its lookup (no fill of unscored entries), both.
The variants are not correct samplers; they only show what each piece costs
(docs/performance_notes.md, section 13). Usage:

  python experiments/benchmarks/probes/no_scoring_ablation.py
"""
import statistics, sys, functools
import jax, jax.numpy as jnp
import jis
from jis import _stale, _selective_backprop, _pruning
from experiments import train
from experiments.benchmarks import common
from experiments.benchmarks import step_cost as sc
b, presample, reps, k = 128, 1.5, 9, 10
cfg, model, shape = sc.model_setup("mlp")
n = 60000; big_b = int(round(presample*b))
key = jax.random.PRNGKey(0)
state = train.create_train_state(cfg, model, jnp.zeros((1,) + shape), key)
data = {"input": jax.random.normal(key, (n,) + shape), "label": jax.random.randint(key, (n,), 0, 10)}
idx = jax.random.randint(jax.random.fold_in(key, 1), (k, big_b), 0, n)
def scanned(step, batch_of):
  def run(carry, data, idx):
    return jax.lax.scan(lambda c, i: step(c, batch_of(data, i)), carry, idx)
  return jax.jit(run, donate_argnums=0)
def rows(data, i, m):
  batch = jax.tree.map(lambda x: jnp.take(x, i[:m], axis=0), data)
  return {**batch, "index": i[:m]}
def plain(s, batch):
  s, metrics = train.train_step(s, batch, jnp.ones((b,), jnp.float32)); metrics.pop(jis.LOGITS_KEY); return s, metrics
fns = {}
uniform = jis.importance_step(train.train_step, None, batch_size=b, presample=1.0, score="uniform")
fns["t_u"] = (scanned(plain, lambda d, i: rows(d, i, b)), state)
fns["uniform"] = (scanned(uniform.step, lambda d, i: rows(d, i, b)), uniform.init(state, jax.random.key(0)))
def variant(name, patch=None, policy=None, indexed=True, table=None):
  kw = {} if policy is None else {"policy": policy}
  if patch: patch()
  t = jis.importance_step(train.train_step, None, batch_size=b, presample=presample, score_table=table or jis.stale_scores(n), **kw)
  bo = (lambda d, i: jis.Indexed(d, i)) if indexed else (lambda d, i: rows(d, i, big_b))
  fn = scanned(t.step, bo)
  fns[name] = (fn, t.init(state, jax.random.key(0)))
variant("nsp")
variant("nsp_rows", indexed=False)
# no gumbel: take first b
orig_gtk = _selective_backprop.gumbel_top_k
def first_b(key, logits, m):
  return jnp.arange(m), jnp.min(logits)
_selective_backprop.gumbel_top_k = first_b
variant("nsp_noGumbel")
_selective_backprop.gumbel_top_k = orig_gtk
T = jis.stale_scores(n)
variant("nowrite", table=T._replace(write=lambda tb, i, sc, st: tb))
def lk(tb, indices, step):
  return jnp.take(tb.scores, indices, mode="clip"), jnp.ones(indices.shape, bool)
variant("cheaplookup", table=T._replace(lookup=lk))
variant("both", table=T._replace(lookup=lk, write=lambda tb, i, sc, st: tb))
carry = {name: jax.tree.map(lambda x: jnp.array(x, copy=True), c) for name, (_, c) in fns.items()}
def call(name):
  fn = fns[name][0]
  carry[name], m = fn(carry[name], data, idx)
  jax.block_until_ready((carry[name], m))
for name in fns: call(name); call(name)
times = common.time_interleaved({nm: (lambda nm=nm: call(nm)) for nm in fns}, reps)
med = {name: 1e3 * statistics.median(v) / k for name, v in times.items()}
for nm, v in med.items(): print(f"{nm:14s} {v:.3f} ms  /t_u {v/med['t_u']:.3f}")
