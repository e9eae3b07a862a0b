"""The Insight training runtime: a MindSpore-shaped API over one graph IR.

    from runtime import context, nn, Model, Tensor
    context.set_context(mode=context.GRAPH_MODE, seed=1)

The runtime never imports the profiler (``insight``, ``collectors``) or the dashboard; it emits
events through ``runtime.hooks`` and whoever listens collects them.
"""
import os as _os

# Stream worker threads and OpenMP kernels share two cores: OpenMP threads that spin while idle would
# steal them from the other stream (and from BLAS). Yield instead, unless the user chose otherwise.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from runtime import context, hooks  # noqa: E402,F401
from runtime import ops  # noqa: E402,F401  (registers primitives)
from runtime import nn  # noqa: E402,F401
from runtime.core import Tensor  # noqa: E402
from runtime.nn.parameter import Parameter  # noqa: E402
from runtime.ops.registry import ShapeError  # noqa: E402
from runtime.train import Model  # noqa: E402

__all__ = ["context", "hooks", "ops", "nn", "Tensor", "Parameter", "ShapeError", "Model"]
