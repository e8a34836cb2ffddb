"""What a compiled program's HLO says about its speed on XLA:CPU.

XLA:CPU runs convolutions (the backward ones above all) many times slower
inside a loop body than at the top level of a program (jax-ml/jax#12868;
~20x measured on the MNIST CNN, docs/performance_notes.md). The training loop
runs ``steps_per_dispatch`` steps in a ``lax.scan``, so it asks
:func:`warn_if_slow_on_cpu` about its compiled program.
"""

import re

from absl import logging
import jax


def convolution_in_a_loop(hlo: str) -> bool:
  """Whether a compiled program's HLO text runs a convolution in the body of
  a ``while`` (directly or through the computations that body calls)."""
  blocks, current = {}, None
  for line in hlo.splitlines():
    head = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
      blocks[current] = []
    elif current is not None:
      blocks[current].append(line)
  texts = {name: "\n".join(lines) for name, lines in blocks.items()}
  todo = set(re.findall(r"body=%([\w.\-]+)", hlo))
  seen = set()
  while todo:
    name = todo.pop()
    seen.add(name)
    text = texts.get(name, "")
    if " convolution(" in text:
      return True
    todo |= {n for n in re.findall(r"%([\w.\-]+)", text)
             if n in texts and n not in seen}
  return False


def warn_if_slow_on_cpu(compiled: jax.stages.Compiled,
                        steps_per_dispatch: int) -> None:
  """Warns when ``compiled`` loops over convolutions on the CPU backend."""
  if (jax.default_backend() == "cpu" and steps_per_dispatch > 1
      and convolution_in_a_loop(compiled.as_text())):
    logging.warning(
        "XLA:CPU runs convolutions several times slower inside a loop body "
        "(jax-ml/jax#12868; ~20x measured on the MNIST CNN), and this program "
        "loops over steps_per_dispatch=%d steps: on a CPU pass "
        "--config.steps_per_dispatch=1 (no loop) or --config.scan_unroll=True.",
        steps_per_dispatch)
