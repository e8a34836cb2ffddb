"""What the inactive default step adds to a user's ``lax.scan`` loop, read
from the optimized HLO (docs/performance_notes.md, section 18).

A Reuters-sized MLP (1000-512-46, dropout 0.5, adam, b = 32, B = 96) on
random data on the device; 64 steps a scan. Three programs: the plain step
on ``b`` rows, and ``jis.importance_step``'s default step on a
``jis.Indexed`` presample and on gathered arrays. For each it prints the
instructions in the scan's body, its copies larger than 4 KiB, its
``while`` loops and ``cond``s, and which computation holds each ``while``.
Compiles only; times nothing. Usage::

  python experiments/benchmarks/probes/inactive_hlo.py
"""
import re

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jis

N, D, H, C, b, STEPS = 8982, 1000, 512, 46, 32, 64


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.relu(nn.Dense(H)(x))
    return nn.Dense(C)(nn.Dropout(0.5, deterministic=not train)(x))


model = MLP()


def dataset(density: float = 1.0):
  """``N`` random examples on the device; ``density`` of the inputs nonzero."""
  x = np.random.default_rng(0).random((N, D), np.float32)
  if density < 1:
    x = (x < density).astype(np.float32)
  return {"x": jnp.asarray(x), "label": jnp.asarray(
      np.random.default_rng(1).integers(0, C, N), jnp.int32)}


def fresh_state():
  return train_state.TrainState.create(
      apply_fn=model.apply,
      params=model.init(jax.random.key(0), jnp.zeros((1, D)), False)["params"],
      tx=optax.adam(1e-3))


def train_step(state, batch, weights):
  rng = jax.random.fold_in(jax.random.key(1), state.step)
  def loss_fn(p):
    logits = model.apply({"params": p}, batch["x"], True, rngs={"dropout": rng})
    return jnp.mean(weights * optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]))
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), {"loss": loss}


def logits_fn(state, batch):
  return model.apply({"params": state.params}, batch["x"], False)


def scanned(step, n, indexed, data):
  def body(s, key):
    i = jax.random.randint(key, (n,), 0, N)
    batch = (jis.Indexed(data, i) if indexed
             else jax.tree.map(lambda x: x[i], data))
    return step(s, batch)
  return jax.jit(lambda s, key: jax.lax.scan(body, s,
                                             jax.random.split(key, STEPS)))


def computations(hlo: str):
  """``{name: text}`` of each computation of an HLO module's text."""
  out = {}
  for block in re.split(r"\n(?=\S)", hlo):
    head = block.split("\n")[0].split(" ")
    name = head[1] if head[0] == "ENTRY" else head[0]
    out[name.lstrip("%")] = block
  return out


def describe(name: str, hlo: str) -> None:
  comps = computations(hlo)
  bodies = re.findall(r"while\(.*?body=%?([\w.\-]+)", hlo)
  loop = max(bodies, key=lambda c: comps[c].count("\n"))   # the scan's body
  text = comps[loop]
  big = [shape for shape in re.findall(r"= (\S+) copy\(", text)
         if np.prod([int(d) for d in re.findall(r"\d+", shape.split("{")[0])]
                    or [1]) * 4 > 4096]
  print(f"{name}: {text.count(chr(10))} instructions in the scan body; "
        f"copies > 4 KiB {big}; conditionals "
        f"{text.count('conditional(')}")
  for comp, block in comps.items():
    n = len(re.findall(r" while\(", block))
    if n and comp != loop and "ENTRY" not in block.split("\n")[0]:
      callers = [c for c, t in comps.items() if c != comp and comp in t]
      print(f"  while loop in {comp}, called from {callers}")
  print(f"  while loops directly in the scan body: "
        f"{len(re.findall(r' while[(]', text))}")


def main():
  data = dataset()
  state = fresh_state()
  sampler = jis.importance_step(train_step, logits_fn, batch_size=b)
  programs = {
      "plain": (scanned(lambda s, x: train_step(s, x, jnp.ones((b,))), b,
                        False, data), state),
      "default, jis.Indexed": (scanned(sampler.step, 3 * b, True, data),
                               sampler.init(state, jax.random.key(0))),
      "default, arrays": (scanned(sampler.step, 3 * b, False, data),
                          sampler.init(state, jax.random.key(0))),
  }
  for label, (fn, s) in programs.items():
    describe(label, fn.lower(s, jax.random.key(0)).compile().as_text())


if __name__ == "__main__":
  main()
