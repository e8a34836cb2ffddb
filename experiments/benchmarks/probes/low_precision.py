"""Probe cited in docs/performance_notes.md, section 8: the scoring pass (logits
in inference mode) of each experiments model in float32 and through
jis.low_precision (bfloat16 products, float32 accumulation), on random inputs.

  python experiments/benchmarks/probes/low_precision.py
"""
import time
import jax, jax.numpy as jnp
import jis
from experiments import models


def bench(f, *a, n=30):
  jax.block_until_ready(f(*a)); ts = []
  for _ in range(5):
    t = time.perf_counter()
    for _ in range(n):
      r = f(*a)
    jax.block_until_ready(r); ts.append((time.perf_counter() - t) / n * 1e3)
  return min(ts)


for name, shape, big_b, kw in [("mlp", (28, 28, 1), 384, {}),
                               ("mlp", (28, 28, 1), 1280, {}),
                               ("cnn", (28, 28, 1), 384, {}),
                               ("wide_resnet", (32, 32, 3), 192,
                                dict(depth=10, width=2)),
                               ("lstm", (784, 1), 128, {})]:
  m = models.create(name, 10, **kw)
  x = jnp.ones((big_b,) + shape) * 0.3
  v = m.init(jax.random.PRNGKey(0), x[:2], train=False)
  f = jax.jit(lambda v, x: m.apply(v, x, train=False))
  g = jax.jit(jis.low_precision(lambda v, x: m.apply(v, x, train=False)))
  diff = float(jnp.abs(f(v, x) - g(v, x)).max())
  print(f"{name} B={big_b}: float32 {bench(f, v, x):.2f} ms, bfloat16 "
        f"{bench(g, v, x):.2f} ms, max |logit difference| {diff:.4f}",
        flush=True)
