"""Step cost of the no-scoring-pass mode against the plain uniform step.

Times, interleaved in one process, K steps in one ``lax.scan`` of: the
experiments' unwrapped ``train_step`` on b rows; jis with ``score="uniform"``;
jis with a score table (losses from the step's ``"is/logits"``,
``jis.infobatch``) on presamples of ``presample · b`` rows given as
``jis.Indexed`` into the training set on device, each step training on its
own draw (``stale_scores(n, lookahead=False)``); and the same with
``lookahead=True`` (each step trains on the previous step's draw, the
default with ``jis.Indexed``); and the step of InfoBatch epochs drawn by
the loop (``pruned_epochs``: b rows with their loader weights, no draw, the
table written; ``experiments.sampling.infobatch_loader_step``). Usage:

  python experiments/benchmarks/probes/no_scoring_cost.py mlp 128 1.5 15

With a fifth argument ``ablate``, also the no-scoring-pass step on arrays
instead of ``jis.Indexed``, and with one piece replaced: the draw by the
first b rows (``first_b``), by rows that change every step without reading
the scores (``shifted``), by the first b rows reached through the scores
(``score_dependent``), by the first b rows with InfoBatch's weights
(``weights_only``); the table's write by a no-op; its lookup by a plain
gather (no fill of unscored entries). Those variants are not correct
samplers; they only show what each piece costs (docs/performance_notes.md,
sections 13, 15 and 17).
"""
import statistics
import sys

import jax
import jax.numpy as jnp

import jis
from jis import _policies
from jis import _pruning
from experiments import sampling
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
                            score_table=jis.stale_scores(n, lookahead=False))
fns = {
    "t_u": (scanned(plain, lambda d, i: rows(d, i, b)), state),
    "uniform": (scanned(uniform.step, lambda d, i: rows(d, i, b)),
                uniform.init(state, jax.random.key(0))),
    "no_scoring_pass": (scanned(table.step, lambda d, i: jis.Indexed(d, i)),
                        table.init(state, jax.random.key(0))),
}


def no_scoring_pass(score_table, presample_of=lambda d, i: jis.Indexed(d, i),
                    policy=None):
  step = jis.importance_step(train.train_step, None, batch_size=b,
                             presample=presample, score_table=score_table,
                             policy=policy)
  return (scanned(step.step, presample_of),
          step.init(state, jax.random.key(0)))


def _policy(select):
  return _policies.Policy(lambda big_b, b: jnp.zeros((), jnp.int32), select)


def first_b(key, scores, state, m):
  """The first m rows, weight 1: no draw at all."""
  return _policies.Selection(jnp.arange(m, dtype=jnp.int32),
                             jnp.ones((m,), jnp.float32),
                             jnp.ones_like(scores) / scores.shape[0], state)


def shifted(key, scores, state, m):
  """Rows that change every step but are known before the scores."""
  rows = ((jnp.arange(m) + state) % scores.shape[0]).astype(jnp.int32)
  return _policies.Selection(rows, jnp.ones((m,), jnp.float32),
                             jnp.ones_like(scores) / scores.shape[0], state + 1)


def score_dependent(key, scores, state, m):
  """The first m rows, reached through the scores (a sum that is always
  above -1): the rows wait for the table lookup, nothing else is drawn."""
  shift = (jnp.sum(scores) < -1).astype(jnp.int32)
  return _policies.Selection((jnp.arange(m) + shift).astype(jnp.int32),
                             jnp.ones((m,), jnp.float32),
                             jnp.ones_like(scores) / scores.shape[0], state)


def weights_only(key, scores, state, m):
  """InfoBatch's weights for the first m rows: the weights wait for the
  scores, the rows do not."""
  keep = _pruning.keep_probabilities(scores, 0.5)
  rho = _pruning.inclusion_probabilities(keep, m)
  return _policies.Selection(jnp.arange(m, dtype=jnp.int32),
                             m / (scores.shape[0] * rho[:m]),
                             keep / jnp.sum(keep), state)


def lookup_only(table, indices, step):
  del step
  return (jnp.take(table.scores, indices, mode="clip"),
          jnp.ones(indices.shape, bool))


fns["lookahead"] = no_scoring_pass(jis.stale_scores(n, lookahead=True))
# The step of InfoBatch epochs drawn in the loop (jis.infobatch_order): b rows
# with their weights, no draw, the table written from "is/logits".
epochs = sampling.infobatch_loader_step(train.train_step, b, n)
data["weight"] = jnp.full((n,), 2.0, jnp.float32)
fns["pruned_epochs"] = (scanned(epochs.step, lambda d, i: rows(d, i, b)),
                        epochs.init(state, jax.random.key(0)))

if ablate:
  full = jis.stale_scores(n, lookahead=False)
  no_write = lambda table, indices, scores, step: table
  fns["on_arrays"] = no_scoring_pass(full, lambda d, i: rows(d, i, big_b))
  for name, select in (("first_b", first_b), ("shifted", shifted),
                       ("score_dependent", score_dependent),
                       ("weights_only", weights_only)):
    fns[name] = no_scoring_pass(full, policy=_policy(select))
  fns["no_write"] = no_scoring_pass(full._replace(write=no_write))
  fns["lookup_only"] = no_scoring_pass(full._replace(lookup=lookup_only))
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
