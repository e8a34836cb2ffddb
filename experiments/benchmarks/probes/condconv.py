"""Probe cited in docs/performance_notes.md: python experiments/benchmarks/probes/condconv.py"""
import sys, time, jax, jax.numpy as jnp
sys.path.insert(0, "/tmp/before_pkg")
import jis, jis_before
from experiments import train
from experiments.benchmarks import step_cost as sc
cfg, model, shape = sc.model_setup("cnn")
b=64
st = train.create_train_state(cfg, model, jnp.zeros((1,)+shape), jax.random.PRNGKey(0))
batch = {k: v[0] for k, v in sc._batches(jax.random.PRNGKey(1), 1, 3*b, shape).items()}
for mod in (jis, jis_before, jis, jis_before):
  for thr in (0.0, float("inf")):
    s = mod.importance_step(train.train_step, train.logits_fn, batch_size=b, presample=3.0, tau_threshold=thr)
    f = jax.jit(s.step, donate_argnums=0)
    state = s.init(sc._fresh(st), jax.random.key(0))
    state, m = f(state, batch); jax.block_until_ready(state)
    t = time.perf_counter(); state, m = f(state, batch); jax.block_until_ready(state)
    print(mod.__name__, thr, round(time.perf_counter()-t, 3), float(m["is/active"]), flush=True)
