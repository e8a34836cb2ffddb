"""Probe cited in docs/performance_notes.md: python experiments/benchmarks/probes/mem.py"""
import jax, jax.numpy as jnp, jis
from experiments import train
from experiments.benchmarks import step_cost as sc
cfg, model, shape = sc.model_setup("mlp")
st = train.create_train_state(cfg, model, jnp.zeros((1,)+shape), jax.random.PRNGKey(0))
B=16384
batch = {"input": jax.ShapeDtypeStruct((B,)+shape, jnp.float32), "label": jax.ShapeDtypeStruct((B,), jnp.int32)}
def score(s, bt): return jis.logit_grad_norm(train.logits_fn(s, bt), bt["label"], "softmax_cross_entropy")
m = jax.jit(score).lower(st, batch).compile().memory_analysis()
print("top-level", m.temp_size_in_bytes/2**20)
def incond(s, bt, p): return jax.lax.cond(p, lambda: score(s, bt), lambda: jnp.zeros((B,)))
m = jax.jit(incond).lower(st, batch, True).compile().memory_analysis()
print("in cond", m.temp_size_in_bytes/2**20)
