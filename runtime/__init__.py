"""The Insight training runtime: a MindSpore-shaped API over one graph IR.

    from runtime import context, nn, Model, Tensor
    context.set_context(mode=context.GRAPH_MODE, seed=1)

The runtime never imports the profiler (``insight``, ``collectors``) or the dashboard; it emits
events through ``runtime.hooks`` and whoever listens collects them.
"""
from runtime import context, hooks  # noqa: F401
from runtime import ops  # noqa: F401  (registers primitives)
from runtime import nn  # noqa: F401
from runtime.core import Tensor
from runtime.nn.parameter import Parameter
from runtime.ops.registry import ShapeError
from runtime.train import Model

__all__ = ["context", "hooks", "ops", "nn", "Tensor", "Parameter", "ShapeError", "Model"]
