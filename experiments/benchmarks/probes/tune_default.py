r"""Tuning probe for the default sampler: convergence per *cost unit*.

Wall-clock comparisons need a quiet machine; tuning runs share it with test
suites. This probe counts cost instead: a uniform step costs 1, an
importance step ``c`` (the ratio of the two steps' times, measured at the
start of the run by interleaved repeats, so a steady load cancels out).
Every method trains for the same number of cost units and is evaluated on
the whole training split (inference mode) and the test split at fixed cost
points. A method is a JSON object of ``jis.importance_step`` options, with
jis objects written as in ``config.sampler`` (``"policy":
"importance_sampling(max_weight=10.0)"``). Two options are the probe's
own: ``"_cost"``, the method's cost per importance step, and ``"_lr_steps"``,
which decays the learning rate to 0 over that many steps (optax's cosine
schedule; pass each method's own step count at the budget).

  python experiments/benchmarks/probes/tune_default.py --model=mlp \
      --seeds=10,11,12 --epochs=10 \
      --method 'default={}' --method 'mw10={"policy": "importance_sampling(max_weight=10.0)"}' \
      --out runs/tune/mlp.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jis
from experiments import input_pipeline
from experiments import preprocess
from experiments import sampling
from experiments import train

MODELS = {
    "mlp": ("mnist_mlp", {}),
    "fmlp": ("fashion_mnist_mlp", {}),
    "noisy_mlp": ("mnist_mlp", {"label_noise": 0.2}),
    "noisy_fmlp": ("fashion_mnist_mlp", {"label_noise": 0.2}),
    "cnn": ("mnist_cnn", {}),
    "reuters": ("reuters_mlp", {}),
    "imdb": ("imdb_fasttext", {}),
}


def load(model: str, data_dir: str):
  import importlib  # pylint: disable=g-import-not-at-top
  name, extra = MODELS[model]
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  config.dataset.data_dir = data_dir
  config.dataset.label_noise = extra.get("label_noise", 0.0)
  return config, input_pipeline.load(config.dataset)


class Runner:
  """Builds the programs of one (model, method, seed)."""

  def __init__(self, config, dataset, options, seed, chunk):
    if "_lr_steps" in options:   # cosine decay to 0 over this many steps
      config = config.copy_and_resolve_references()
      config.lr_schedule, config.num_steps = "cosine", options["_lr_steps"]
    self.config, self.dataset = config, dataset
    b = int(config.batch_size)
    self.n = len(dataset.train["label"])
    model = train.create_model(config, dataset)
    root = jax.random.PRNGKey(seed)
    init_key, jis_key, self.data_key, aug_key = jax.random.split(root, 4)
    self.preprocess = preprocess.Preprocess.from_config(config.input,
                                                        dataset.info["kind"])
    self.prep = self.preprocess.statistics(dataset.train)
    sample = self.preprocess({k: v[:1] for k, v in dataset.train.items()},
                             self.prep, aug_key, False)
    state = train.create_train_state(config, model, sample["input"], init_key)
    cfg = sampling.sampler_kwargs(
        {k: v for k, v in options.items()
         if k != "presample" and not k.startswith("_")},
        {"num_examples": self.n})
    presample = options.get("presample", 3.0)
    if cfg.get("score") == "uniform":
      presample = 1.0
    self.sampler = jis.importance_step(train.train_step, train.logits_fn,
                                       batch_size=b, presample=presample, **cfg)
    self.big_b = int(round(presample * b))
    self.state = self.sampler.init(state, jis_key)
    self.data = jax.device_put(dataset.train)
    # Without augmentation the preprocessing runs once, and a step's
    # presample is a jis.Indexed into it, as in experiments.train (which
    # stale_scores(lookahead=True) needs).
    self.prepared = None if self.preprocess.augment else jax.jit(
        lambda split: self.preprocess(split, self.prep, aug_key, False))(
            self.data)
    self.inputs = self.data if self.prepared is None else self.prepared
    self.test = jax.device_put(dataset.test)
    self.chunk = chunk
    self.run = jax.jit(self._run, donate_argnums=0)
    self.eval = jax.jit(self._eval)

  def start(self):
    perm = input_pipeline.epoch_permutation(self.data_key, 0, self.n)
    return (self.state, jnp.int32(0), jnp.int32(0), perm.astype(jnp.int32))

  def _run(self, carry, data):
    def one(carry, _):
      state, old_epoch, offset, perm = carry
      epoch, start = input_pipeline.advance(old_epoch, offset, self.n, self.big_b)
      perm = jax.lax.cond(
          epoch != old_epoch,
          lambda: input_pipeline.epoch_permutation(
              self.data_key, epoch, self.n).astype(jnp.int32),
          lambda: perm)
      idx = jax.lax.dynamic_slice_in_dim(perm, start, self.big_b)
      if self.prepared is not None:
        batch = jis.Indexed(data, idx)
      else:
        batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
        batch["index"] = idx
        batch = self.preprocess(
            batch, self.prep, jax.random.fold_in(self.data_key, state.step),
            True)
      state, metrics = self.sampler.step(state, batch)
      keep = {k: v.astype(jnp.float32) for k, v in metrics.items()
              if k in ("is/active", "is/tau", "is/max_weight", "is/ess",
                       "train/loss", "is/fallback")}
      # A uniform step's unused rows open the next presample.
      return (state, epoch, start + metrics["is/rows_used"], perm), keep
    if self.chunk == 1:
      carry, m = one(carry, None)
      return carry, jax.tree.map(lambda x: x[None], m)
    return jax.lax.scan(one, carry, None, length=self.chunk)

  def _eval(self, inner, split):
    n = split["label"].shape[0]
    bs = 1000
    def body(i, sums):
      idx = jnp.minimum(i * bs + jnp.arange(bs), n - 1)
      mask = (i * bs + jnp.arange(bs)) < n
      batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), split)
      batch = self.preprocess(batch, self.prep, None, False)
      logits = train.logits_fn(inner, batch).astype(jnp.float32)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
      correct = jnp.argmax(logits, -1) == batch["label"]
      return sums + jnp.stack([jnp.sum(jnp.where(mask, loss, 0.0)),
                               jnp.sum(mask & correct)])
    s = jax.lax.fori_loop(0, (n + bs - 1) // bs, body, jnp.zeros((2,)))
    return s / n

  def evaluate(self, carry):
    inner = carry[0].inner
    train_loss, train_acc = np.asarray(self.eval(inner, self.data))
    test_loss, test_acc = np.asarray(self.eval(inner, self.test))
    return {"train_loss": float(train_loss), "train_acc": float(train_acc),
            "test_loss": float(test_loss), "test_acc": float(test_acc)}


def measure_cost(config, dataset, chunk, repeats=5):
  """IS step time over uniform step time, interleaved repeats."""
  runners = {
      "u": Runner(config, dataset, {"score": "uniform"}, 0, chunk),
      "is": Runner(config, dataset, {"tau_threshold": 0.0}, 0, chunk),
  }
  carries = {k: r.start() for k, r in runners.items()}
  times = {k: [] for k in runners}
  for _ in range(repeats + 1):
    for k, r in runners.items():
      t0 = time.perf_counter()
      for _ in range(max(1, 20 // chunk)):
        carries[k], m = r.run(carries[k], r.inputs)
      jax.block_until_ready(m)
      times[k].append(time.perf_counter() - t0)
  ratio = statistics.median(a / b for a, b in zip(times["is"][1:], times["u"][1:]))
  return ratio, {k: statistics.median(v[1:]) / max(1, 20 // chunk) / chunk
                 for k, v in times.items()}


def run_method(config, dataset, options, seed, budget, cost, evals, chunk):
  """``options["_cost"]``, when given, is the method's cost per importance
  step (a score table's steps cost what uniform steps cost: 1)."""
  cost = options.get("_cost", cost)
  r = Runner(config, dataset, options, seed, chunk)
  carry = r.start()
  points = [budget * (i + 1) / evals for i in range(evals)]
  curve = [{"units": 0.0, "steps": 0, **r.evaluate(carry)}]
  units, steps, active, logs = 0.0, 0, 0.0, []
  t0 = time.perf_counter()
  while points:
    carry, m = r.run(carry, r.inputs)
    m = jax.device_get(m)
    a = float(np.sum(m["is/active"]))
    steps += r.chunk
    active += a
    units += r.chunk + a * (cost - 1.0)
    logs.append({k: float(np.mean(v)) for k, v in m.items()})
    if units >= points[0]:
      while points and units >= points[0]:
        points.pop(0)
      curve.append({"units": units, "steps": steps,
                    "active": active / steps, **r.evaluate(carry)})
  return {"curve": curve, "wall": time.perf_counter() - t0,
          "active_fraction": active / steps,
          "tau_trace": [l["is/tau"] for l in logs[::max(1, len(logs) // 50)]],
          "max_weight_trace": [l["is/max_weight"]
                               for l in logs[::max(1, len(logs) // 50)]]}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="mlp", choices=sorted(MODELS))
  p.add_argument("--data_dir", default="../shared/data")
  p.add_argument("--seeds", default="10,11,12")
  p.add_argument("--epochs", type=float, default=10.0,
                 help="budget in uniform epochs (cost units)")
  p.add_argument("--evals", type=int, default=10)
  p.add_argument("--cost", type=float, default=0.0,
                 help="IS/uniform step cost; 0 measures it")
  p.add_argument("--method", action="append", default=[])
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  config, dataset = load(args.model, args.data_dir)
  chunk = 1 if (args.model == "cnn" and jax.default_backend() == "cpu") else 25
  methods = {"uniform": {"score": "uniform"}}
  for spec in args.method:
    name, _, js = spec.partition("=")
    methods[name] = json.loads(js)
  cost, step_times = (args.cost, {}) if args.cost else measure_cost(
      config, dataset, chunk)
  n = len(dataset.train["label"])
  budget = args.epochs * n / config.batch_size
  print(f"{args.model}: cost ratio {cost:.3f} {step_times}; budget {budget:.0f} "
        f"units", flush=True)
  results = {"model": args.model, "cost": cost, "step_times": step_times,
             "budget_units": budget, "methods": methods, "runs": {},
             "command": " ".join(sys.argv)}
  for seed in [int(s) for s in args.seeds.split(",")]:
    for name, options in methods.items():
      res = run_method(config, dataset, options, seed, budget, cost,
                       args.evals, chunk)
      results["runs"].setdefault(name, {})[seed] = res
      last = res["curve"][-1]
      print(f"  seed {seed} {name:>14}: train loss {last['train_loss']:.4f} "
            f"test acc {last['test_acc']:.4f} active {res['active_fraction']:.2f} "
            f"wall {res['wall']:.0f}s", flush=True)
      if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
          json.dump(results, f)
  summarize(results)


def summarize(results):
  print(f"\n{results['model']} (cost {results['cost']:.2f}), median over seeds "
        "[min-max] at the budget; max 2x-rise count over evals after the first "
        "epoch-equivalent")
  base = results["runs"]["uniform"]
  u_final = statistics.median(r["curve"][-1]["train_loss"] for r in base.values())
  for name, runs in results["runs"].items():
    losses = [r["curve"][-1]["train_loss"] for r in runs.values()]
    accs = [r["curve"][-1]["test_acc"] for r in runs.values()]
    spikes = 0
    for r in runs.values():
      c = [p["train_loss"] for p in r["curve"][2:]]
      spikes += sum(b > 2 * a for a, b in zip(c, c[1:]))
    act = statistics.median(r["active_fraction"] for r in runs.values())
    print(f"  {name:>14}: loss {statistics.median(losses):.4f} "
          f"[{min(losses):.4f}-{max(losses):.4f}] ratio "
          f"{statistics.median(losses) / u_final:.2f}  acc "
          f"{statistics.median(accs):.4f} [{min(accs):.4f}-{max(accs):.4f}] "
          f"active {act:.2f} spikes {spikes}")


if __name__ == "__main__":
  main()
