"""Step cost of the no-scoring-pass mode against the plain uniform step.

Times, interleaved in one process, K steps in one ``lax.scan`` of: the
experiments' unwrapped ``train_step`` on b rows; jis with ``score="uniform"``;
and jis with a score table at its defaults (losses from the step's
``"is/logits"``, ``jis.infobatch``) on presamples of ``presample · b`` rows
given as ``jis.Indexed`` into the training set on device (what the
experiments' loop does). Usage:

  python experiments/benchmarks/probes/no_scoring_cost.py mlp 128 1.5 15

With a fifth argument ``ablate``, also the no-scoring-pass step on arrays
instead of ``jis.Indexed``, and with one piece replaced by a no-op: the
Gumbel top-k (the first b rows), its noise (a top-k of fixed perturbations
instead), its top-k (the noise, then the first b rows), the table's write,
its lookup (no fill of unscored entries), both. Those variants are not
correct samplers; they only show what each piece costs
(docs/performance_notes.md, sections 13 and 15).
"""
import statistics
import sys

import jax
import jax.numpy as jnp

import jis
from jis import _selective_backprop
from experiments import train
from experiments.benchmarks import common
from experiments.benchmarks import step_cost as sc

model_name, b, presample, reps = (sys.argv[1], int(sys.argv[2]),
                                  float(sys.argv[3]), int(sys.argv[4]))
ablate = sys.argv[5:] == ["ablate"]
k = 10 if model_name == "mlp" else 1
cfg, model, shape = sc.model_setup(model_name)
n = 60000
big_b = int(round(presample * b))
key = jax.random.PRNGKey(0)
state = train.create_train_state(cfg, model, jnp.zeros((1,) + shape), key)
data = {"input": jax.random.normal(key, (n,) + shape),
        "label": jax.random.randint(key, (n,), 0, 10)}
idx = jax.random.randint(jax.random.fold_in(key, 1), (k, big_b), 0, n)


def scanned(step, batch_of):
  def run(carry, data, idx):
    def one(carry, i):
      return step(carry, batch_of(data, i))
    if k == 1:
      return one(carry, idx[0])
    return jax.lax.scan(one, carry, idx)
  return jax.jit(run, donate_argnums=0)


def rows(data, i, m):
  batch = jax.tree.map(lambda x: jnp.take(x, i[:m], axis=0), data)
  return {**batch, "index": i[:m]}


def plain(s, batch):
  s, metrics = train.train_step(s, batch, jnp.ones((b,), jnp.float32))
  metrics.pop(jis.LOGITS_KEY)
  return s, metrics

uniform = jis.importance_step(train.train_step, None, batch_size=b,
                              presample=1.0, score="uniform")
table = jis.importance_step(train.train_step, None, batch_size=b,
                            presample=presample,
                            score_table=jis.stale_scores(n))
fns = {
    "t_u": (scanned(plain, lambda d, i: rows(d, i, b)), state),
    "uniform": (scanned(uniform.step, lambda d, i: rows(d, i, b)),
                uniform.init(state, jax.random.key(0))),
    "no_scoring_pass": (scanned(table.step, lambda d, i: jis.Indexed(d, i)),
                        table.init(state, jax.random.key(0))),
}


def no_scoring_pass(score_table, presample_of=lambda d, i: jis.Indexed(d, i)):
  step = jis.importance_step(train.train_step, None, batch_size=b,
                             presample=presample, score_table=score_table)
  return (scanned(step.step, presample_of),
          step.init(state, jax.random.key(0)))


def first_b(key, log_keep, m):
  del key
  return jnp.arange(m), jnp.min(log_keep)


def top_k_only(key, log_keep, m):
  """The top-k without the Gumbel noise (its random bits)."""
  del key
  noise = 1e-3 * jnp.arange(log_keep.shape[0], dtype=jnp.float32)
  values, indices = jax.lax.top_k(log_keep + noise, m + 1)
  return indices[:m].astype(jnp.int32), values[m]


def noise_only(key, log_keep, m):
  """The Gumbel noise, then the first m (no top-k)."""
  perturbed = log_keep + jax.random.gumbel(key, log_keep.shape, jnp.float32)
  return jnp.arange(m), jnp.min(perturbed)


def lookup_only(table, indices, step):
  del step
  return (jnp.take(table.scores, indices, mode="clip"),
          jnp.ones(indices.shape, bool))


if ablate:
  full = jis.stale_scores(n)
  no_write = lambda table, indices, scores, step: table
  fns["on_arrays"] = no_scoring_pass(full, lambda d, i: rows(d, i, big_b))
  gumbel_top_k = _selective_backprop.gumbel_top_k
  _selective_backprop.gumbel_top_k = first_b   # read when the step traces
  fn, init = no_scoring_pass(full)
  fns["no_gumbel"] = (fn.lower(init, data, idx).compile(), init)  # traced now
  for name, variant in (("top_k_only", top_k_only), ("noise_only", noise_only)):
    _selective_backprop.gumbel_top_k = variant
    fn, init = no_scoring_pass(full)
    fns[name] = (fn.lower(init, data, idx).compile(), init)
  _selective_backprop.gumbel_top_k = gumbel_top_k
  fns["no_write"] = no_scoring_pass(full._replace(write=no_write))
  fns["lookup_only"] = no_scoring_pass(full._replace(lookup=lookup_only))
  fns["neither"] = no_scoring_pass(full._replace(lookup=lookup_only,
                                                 write=no_write))
carry = {name: jax.tree.map(lambda x: jnp.array(x, copy=True), c)
         for name, (_, c) in fns.items()}


def call(name):
  fn = fns[name][0]
  carry[name], m = fn(carry[name], data, idx)
  jax.block_until_ready((carry[name], m))

for name in fns:
  call(name), call(name)
times = common.time_interleaved({n: (lambda n=n: call(n)) for n in fns}, reps)
med = {name: 1e3 * statistics.median(v) / k for name, v in times.items()}
print(model_name, b, presample, {n: round(v, 3) for n, v in med.items()},
      "no_scoring_pass / t_u = %.3f, uniform / t_u = %.3f" % (
          med["no_scoring_pass"] / med["t_u"], med["uniform"] / med["t_u"]))
for name, ms in med.items():
  print(f"{name:16s} {ms:.3f} ms  / t_u {ms / med['t_u']:.3f}")
