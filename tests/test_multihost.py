"""Two processes on localhost train exactly like one (jax.distributed, CPU).

The test launches this file twice as a script (``python test_multihost.py
worker ...``), each process with 4 CPU devices, joined by
``jax.distributed.initialize`` into one 8-device mesh over gloo collectives.
Each process feeds only its own half of every presample. The result must
match one process driving all 8 devices (and, in global mode, one device).
"""

import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import experiments_testing
import jis

STEPS, B, b, FEATURES, CLASSES = 4, 32, 16, 5, 3
TIMEOUT_S = 240


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(nn.relu(nn.Dense(8)(x)))


def _train_step(state, batch, weights):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["x"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return jnp.mean(weights * losses), logits
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss, "is/logits": logits}


def _logits(state, batch):
  return state.apply_fn({"params": state.params}, batch["x"])


def _presample(step):
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(7), step))
  return {"x": np.asarray(jax.random.normal(kx, (B, FEATURES))),
          "label": np.asarray(jax.random.randint(ky, (B,), 0, CLASSES))}


def _train(resample, mesh):
  """STEPS steps of a small MLP; each process feeds its block of rows only."""
  model = _MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, FEATURES)))["params"]
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=optax.sgd(0.3, momentum=0.9))
  sampler = jis.importance_step(
      _train_step, _logits, batch_size=b, presample=B / b,
      condition=jis.warmup(1), forward_batch_size=16,
      mesh=mesh, resample=resample if mesh is not None else "global")
  jis_state = sampler.init(state, jax.random.key(1))
  step = jax.jit(sampler.step)
  rows = B // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  losses = []
  for i in range(STEPS):
    full = _presample(i)
    if mesh is None:
      batch = full
    else:
      batch = jis.shard_presample({k: v[mine] for k, v in full.items()}, mesh)
    jis_state, metrics = step(jis_state, batch)
    losses.append(float(metrics["loss"]))   # replicated: readable everywhere
  params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                        jis_state.inner.params)
  flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
  return flat, np.asarray(losses)


def _worker(process_id, port, out):
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=2, process_id=process_id,
                             initialization_timeout=TIMEOUT_S // 2)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = jax.make_mesh((8,), ("data",))
  results = {}
  for resample in ("global", "local"):
    results[f"{resample}_params"], results[f"{resample}_losses"] = _train(
        resample, mesh)
  np.savez(out, **results)
  jax.distributed.shutdown()


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": experiments_testing.xla_flags(4)}
  procs = [subprocess.Popen(
      [sys.executable, __file__, "worker", str(i), str(port),
       str(out / f"{i}.npz")], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"the two processes did not finish in {TIMEOUT_S} s")
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"
  return [dict(np.load(out / f"{i}.npz")) for i in range(2)]


@pytest.mark.parametrize("resample", ["global", "local"])
def test_two_processes_match_one_process(two_process_results, resample):
  assert jax.device_count() == 8, "conftest.py should give 8 CPU devices"
  one_process = _train(resample, jax.make_mesh((8,), ("data",)))
  for result in two_process_results:
    np.testing.assert_allclose(result[f"{resample}_params"], one_process[0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result[f"{resample}_losses"], one_process[1],
                               rtol=1e-5)
  if resample == "global":    # the single-device algorithm, too
    one_device = _train("global", None)
    np.testing.assert_allclose(one_process[0], one_device[0], rtol=1e-5,
                               atol=1e-6)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
