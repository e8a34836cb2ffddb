"""jis for Flax NNX: importance sampling for a step that updates its objects in
place (``optimizer.update(model, grads)``). See ``docs/nnx.md``.

A submodule, not top-level names: ``import jis`` needs no flax, and
``jis.nnx.ImportanceSampler`` sits beside ``nnx.Optimizer`` in a reader's mind.
"""

from jis._nnx import ImportanceSampler
from jis._nnx import SamplerState
