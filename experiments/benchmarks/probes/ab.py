"""A/B timing of the jis step against an older jis (see docs/performance_notes.md).

Needs the older library importable as ``jis_before`` from /tmp/before_pkg, e.g.
``git show a0aac87:jis/_step.py`` etc. copied into /tmp/before_pkg/jis_before/
with its imports renamed. Usage: python experiments/benchmarks/probes/ab.py mlp 128 3 15
"""
import sys, statistics, json
sys.path.insert(0, "/tmp/before_pkg")
import jis_before, jax
from experiments.benchmarks import step_cost as sc, common
models = sys.argv[1].split(","); b = int(sys.argv[2]); p = float(sys.argv[3]); reps = int(sys.argv[4])
# A fifth argument "logits": the train step hands back "is/logits" (the
# experiments' step does); by default it does not (a plain user step).
train_logits = len(sys.argv) > 5 and sys.argv[5] == "logits"
out = {}
for m in models:
  cfg, model, shape = sc.model_setup(m)
  k = 10 if m == "mlp" else 1   # conv nets: one step per dispatch on a CPU
  new = sc.Programs(cfg, model, shape, b, p, k, train_logits=train_logits)
  old = sc.Programs(cfg, model, shape, b, p, k, jis_module=jis_before, only=("active", "inactive"),
                    train_logits=train_logits)
  new.warm_up(); old.warm_up()
  fns = {**{f"new_{n}": (lambda n=n: new.call(n)) for n in new.fns},
         **{f"old_{n}": (lambda n=n: old.call(n)) for n in old.fns}}
  t = common.time_interleaved(fns, reps)
  med = {n: 1e3*statistics.median(v)/k for n, v in t.items()}
  fl = med["new_t_f"] + med["new_t_u"]
  print(m, b, p, {k: round(v, 3) for k, v in med.items()},
        "old act/floor %.3f new act/floor %.3f old inact/tu %.3f new inact/tu %.3f" % (
          med["old_active"]/fl, med["new_active"]/fl, med["old_inactive"]/med["new_t_u"], med["new_inactive"]/med["new_t_u"]),
        "spread", {k: [round(1e2*min(v),2), round(1e2*max(v),2)] for k, v in t.items()}, flush=True)
