"""The inactive default step in a user's ``lax.scan`` over ``jis.Indexed``
presamples, against the plain step (docs/performance_notes.md, section 18).

A Reuters-sized MLP (1000-512-46, dropout 0.5, adam, b = 32, B = 96) on
random sparse data on the device, 256 steps a scan, each step's presample
the next rows of the dataset (its position advanced by ``is/rows_used``),
timed interleaved in one process. Programs: the plain step on ``b`` rows;
``jis.importance_step``'s default step (probes every 128 steps included);
the same with the loop keeping only the loss and ``is/rows_used`` of its
metrics; ``condition=jis.never()``. Prints a table and writes JSON::

  python experiments/benchmarks/probes/inactive_indexed.py 31 /tmp/inactive_indexed.json
"""
import json
import statistics
import sys

import jax
import jax.numpy as jnp

import jis
from experiments.benchmarks import common
# The model, steps and sizes of the HLO probe beside this file.
from inactive_hlo import N, b, dataset, fresh_state as fresh, logits_fn, train_step

K = 256
REPS, OUT = int(sys.argv[1]), sys.argv[2]
data = dataset(density=0.05)


def scanned(step, n, keep=None):
  """``K`` steps in one program; presample ``i`` is the ``n`` rows after the
  previous step's, which moves on by ``is/rows_used`` (``n`` if absent)."""
  def body(carry, data):
    s, offset = carry
    s, m = step(s, jis.Indexed(data, (offset + jnp.arange(n)) % N))
    rows = m.get("is/rows_used", n)
    if keep is not None:
      m = {k: m[k] for k in keep}
    return (s, offset + rows), m
  return jax.jit(lambda s, data: jax.lax.scan(
      lambda c, _: body(c, data), (s, jnp.int32(0)), jnp.arange(K)),
                 donate_argnums=0)


def plain_step(s, batch):
  rows = jax.tree.map(lambda x: x[batch.index[:b]], batch.data)
  return train_step(s, rows, jnp.ones((b,)))


def main():
  sampler = jis.importance_step(train_step, logits_fn, batch_size=b)
  never = jis.importance_step(train_step, logits_fn, batch_size=b,
                              condition=jis.never())
  progs = {
      "plain": (scanned(plain_step, b), fresh()),
      "default": (scanned(sampler.step, 3 * b),
                  sampler.init(fresh(), jax.random.key(0))),
      "default_loss_rows": (
          scanned(sampler.step, 3 * b, keep=("loss", "is/rows_used")),
          sampler.init(fresh(), jax.random.key(0))),
      "never": (scanned(never.step, 3 * b),
                never.init(fresh(), jax.random.key(0))),
  }
  carry = {k: v[1] for k, v in progs.items()}

  def runner(name):
    def run():
      out, m = progs[name][0](carry[name], data)
      carry[name] = out[0]
      jax.block_until_ready(m)
    return run
  fns = {k: runner(k) for k in progs}
  for f in fns.values():
    f(), f()
  t = common.time_interleaved(fns, REPS)
  result = {"machine": common.machine(), "repeats": REPS, "steps_per_scan": K,
            "batch_size": b, "presample_size": 3 * b, "programs": {}}
  for k, v in t.items():
    r = sorted(x / y for x, y in zip(v, t["plain"]))
    result["programs"][k] = {"ms_per_step": 1e3 * statistics.median(v) / K,
                             "over_plain": statistics.median(r),
                             "over_plain_range": [r[0], r[-1]]}
    print(f"{k:18s} {1e3 * statistics.median(v) / K:.3f} ms/step  "
          f"{statistics.median(r):.3f}x plain [{r[0]:.2f}-{r[-1]:.2f}]")
  with open(OUT, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
