"""Probe cited in docs/performance_notes.md, section 17: the cost of an untaken
lax.cond and of a zero-trip while loop per step of a lax.scan on XLA:CPU.

  python experiments/benchmarks/probes/xla_cpu_control_flow.py
"""
import time, statistics, jax, jax.numpy as jnp
K = 2000
W = jnp.ones((64, 64)) * 0.01
def heavy(x):   # stands in for the scoring pass
  for _ in range(4): x = jnp.tanh(x @ W)
  return x
def body_plain(c, _):
  x, t = c
  return (jnp.tanh(x @ W), t), None
def body_cond(c, _):
  x, t = c
  pos = jax.lax.cond(t > 1e9, lambda: heavy(x)[:, 0], lambda: jnp.zeros((64,)))
  return (jnp.tanh(x @ W) + pos[:, None] * 0, t), None
def body_while(c, _):
  x, t = c
  n = (t > 1e9).astype(jnp.int32)
  pos = jax.lax.fori_loop(0, n, lambda i, p: heavy(x)[:, 0], jnp.zeros((64,)))
  return (jnp.tanh(x @ W) + pos[:, None] * 0, t), None
fs = {n: jax.jit(lambda c, b=b: jax.lax.scan(b, c, None, length=K)[0]) for n, b in
      [("plain", body_plain), ("cond", body_cond), ("while", body_while)]}
c = (jnp.ones((64, 64)), jnp.float32(0))
for f in fs.values(): jax.block_until_ready(f(c))
t = {n: [] for n in fs}
for r in range(15):
  for n, f in fs.items():
    s = time.perf_counter(); jax.block_until_ready(f(c)); t[n].append(time.perf_counter() - s)
for n, v in t.items(): print(n, f"{1e6*min(v)/K:.2f} us/step min, {1e6*statistics.median(v)/K:.2f} median")
