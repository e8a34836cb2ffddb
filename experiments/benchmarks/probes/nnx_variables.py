"""Probe cited in docs/performance_notes.md, section 17: what nnx.jit pays per call
for eight scalar variables against one variable holding the same eight arrays.

  python experiments/benchmarks/probes/nnx_variables.py
"""
import timeit, jax, jax.numpy as jnp
from flax import nnx
class V(nnx.Variable): pass
class Many(nnx.Pytree):
  def __init__(self):
    for n in "abcdefgh": setattr(self, n, nnx.data(V(jnp.zeros(()))))
    self.t1 = nnx.data(()); self.t2 = nnx.data(())
class One(nnx.Pytree):
  def __init__(self):
    self.state = V({n: jnp.zeros(()) for n in "abcdefgh"})
class Bare(nnx.Pytree):
  def __init__(self):
    self.state = nnx.data({n: V(jnp.zeros(())) for n in "abcdefgh"})
for cls in (Many, One, Bare):
  o = cls()
  t = min(timeit.repeat(lambda: nnx.split(o), number=500, repeat=5)) / 500
  @nnx.jit
  def f(o): return o
  f(o)
  t2 = min(timeit.repeat(lambda: f(o), number=300, repeat=5)) / 300
  print(cls.__name__, f"split {1e6*t:.0f} us  jit call {1e6*t2:.0f} us", len(jax.tree.leaves(nnx.state(o))))
