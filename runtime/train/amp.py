"""Mixed-precision training as MindSpore does it (``mindspore.amp``).

``build_train_network(network, loss_fn, optimizer, level="O2", loss_scale_manager=None)`` returns the
three pieces to hand to ``Model``:

* the network: at level ``O2`` every Cell that has a float16 path (``to_float``; the GNN layers) computes
  in float16 -- its float32 parameters are the master weights, cast in the graph -- and the output is cast
  back to float32, so the loss, its softmax and every reduction after it run in float32;
* the loss: wrapped so that its backward is multiplied by the current loss scale (``scale_gradient``);
  the reported loss stays unscaled;
* the optimizer: wrapped so that it divides the gradients by the scale, checks them for inf/NaN
  (``all_finite``) and, on overflow, skips the whole update -- every in-place write of the optimizer
  becomes ``select(finite, new, old)`` -- and lets the manager adjust the scale.

Loss-scale managers (MindSpore's names): ``FixedLossScaleManager(loss_scale, drop_overflow_update=True)``
and ``DynamicLossScaleManager(init_loss_scale=2**16, scale_factor=2, scale_window=2000)`` (halve on
overflow, double after ``scale_window`` finite steps). Both work in GRAPH_MODE (the scale is a
Parameter updated in the step graph) and PYNATIVE_MODE.
"""
from __future__ import annotations

import numpy as np

from runtime import core
from runtime.core import Tensor
from runtime.nn.cell import Cell
from runtime.nn.parameter import Parameter
from runtime.ops import amp as A
from runtime.ops import api as F

AMP_LEVELS = ("O0", "O2")


class LossScaleManager:
    drop_overflow_update = True

    def __init__(self, loss_scale: float):
        if not loss_scale >= 1.0:
            raise ValueError(f"{type(self).__name__}: the loss scale must be >= 1, got {loss_scale}")
        self.scale = Parameter(np.asarray(loss_scale, np.float32), name="loss_scale", requires_grad=False)
        # steps whose gradients overflowed (skipped when drop_overflow_update), counted in the step itself
        self.overflow_count = Parameter(np.asarray(0.0, np.float32), name="loss_scale_overflows",
                                        requires_grad=False)

    @property
    def overflows(self) -> int:
        return int(self.overflow_count.data)

    def get_loss_scale(self) -> float:
        return float(self.scale.data)

    def update_graph(self, finite: Tensor) -> None:
        """Append the scale update for one step (``finite``: bool scalar) to the graph / run it eagerly."""

    def update_eager(self, finite: bool) -> None:
        pass


class FixedLossScaleManager(LossScaleManager):
    """A constant loss scale; with ``drop_overflow_update`` a step whose gradients overflow is skipped."""

    def __init__(self, loss_scale: float = 128.0, drop_overflow_update: bool = True):
        super().__init__(loss_scale)
        self.drop_overflow_update = bool(drop_overflow_update)


class DynamicLossScaleManager(LossScaleManager):
    """Halve the scale on overflow (and skip that step); double it after ``scale_window`` good steps."""

    def __init__(self, init_loss_scale: float = 2.0 ** 16, scale_factor: int = 2, scale_window: int = 2000):
        super().__init__(init_loss_scale)
        if scale_factor <= 1 or scale_window < 1:
            raise ValueError("DynamicLossScaleManager: scale_factor must be > 1 and scale_window >= 1")
        self.scale_factor, self.scale_window = float(scale_factor), int(scale_window)
        self.good_steps = Parameter(np.asarray(0.0, np.float32), name="loss_scale_good_steps", requires_grad=False)

    def update_graph(self, finite):
        s, c = self.scale, self.good_steps
        c_inc = F.add(c, 1.0)
        grow = F.greater_equal(c_inc, float(self.scale_window))
        s_ok = F.select(grow, F.mul(s, self.scale_factor), s)
        c_ok = F.select(grow, F.mul(c, 0.0), c_inc)
        s_bad = F.maximum(F.div(s, self.scale_factor), 1.0)
        F.assign(s, F.select(finite, s_ok, s_bad))
        F.assign(c, F.select(finite, c_ok, F.mul(c, 0.0)))

    def update_eager(self, finite):
        s, c = float(self.scale.data), float(self.good_steps.data)
        if finite:
            c += 1
            if c >= self.scale_window:
                s, c = s * self.scale_factor, 0.0
        else:
            s, c = max(s / self.scale_factor, 1.0), 0.0
        self.scale.set_data(np.asarray(s, np.float32))
        self.good_steps.set_data(np.asarray(c, np.float32))


class _OutputToFloat32(Cell):
    """The mixed-precision network: the float16 body and a cast of its output back to float32."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def construct(self, *args):
        out = self.network(*args)
        return F.cast(out, np.float32) if out.dtype != np.float32 else out

    def extend_repr(self):
        return f"{self.network!r} -> float32"


class _ScaledLoss(Cell):
    def __init__(self, loss_fn, manager: LossScaleManager):
        super().__init__()
        self.loss_fn, self.manager = loss_fn, manager

    def construct(self, logits, labels):
        loss = self.loss_fn(logits, labels)
        return A.scale_gradient(loss, self.manager.scale)

    def extend_repr(self):
        return f"{self.loss_fn!r}, loss_scale={self.manager.get_loss_scale()}"


def _guard_effects(graph, first: int, finite: Tensor) -> None:
    """Make the effects appended since ``first`` no-ops when ``finite`` is False: each assign writes
    ``select(finite, new, old)``, each scatter-add adds ``select(finite, rows, 0)``. The guarded effect
    nodes move after their new inputs so the node list stays topologically ordered."""
    effects = graph.effects[first:]
    for node in effects:
        if node.op == "assign":
            var, value = node.inputs
            node.inputs[1] = F.select(finite, Tensor(node=value), Tensor(node=var)).node
        elif node.op == "scatter_add_rows":
            rows = Tensor(node=node.inputs[2])
            node.inputs[2] = F.select(finite, rows, F.zeros_like(rows)).node
        else:
            raise NotImplementedError(f"amp: cannot skip the optimizer effect {node.op!r} on overflow")
    moved = {n.id for n in effects}
    graph.nodes[:] = [n for n in graph.nodes if n.id not in moved] + list(effects)


class LossScaleOptimizer:
    """Wraps an Optimizer: unscale, overflow check, skip on overflow, scale update."""

    def __init__(self, optimizer, manager: LossScaleManager):
        self.optimizer, self.manager = optimizer, manager

    def __getattr__(self, name):  # parameters, sparse, target, step_begin, state_parameters, ...
        return getattr(self.optimizer, name)

    def state_parameters(self) -> list:
        extra = [self.manager.scale, self.manager.overflow_count] + ([self.manager.good_steps]
                                        if isinstance(self.manager, DynamicLossScaleManager) else [])
        return self.optimizer.state_parameters() + extra

    def _unscale(self, grads):
        inv = F.reciprocal(self.manager.scale)
        out = []
        for g in grads:
            if hasattr(g, "values"):  # SparseGrad
                g = g.to_dense()
            out.append(F.mul(g, inv if inv.dtype == g.dtype else F.cast(inv, g.dtype)))
        return out

    def __call__(self, grads):
        grads = self._unscale(grads)
        builder = core.current_builder()
        if builder is None:  # PYNATIVE: concrete gradients
            finite = all(bool(np.isfinite(g.asnumpy()).all()) for g in grads)
            if finite or not self.manager.drop_overflow_update:
                self.optimizer(grads)
            if not finite:
                self.manager.overflow_count.set_data(np.asarray(self.manager.overflows + 1, np.float32))
            self.manager.update_eager(finite)
            return
        finite = A.all_finite(grads)
        first = len(builder.graph.effects)
        self.optimizer(grads)
        if self.manager.drop_overflow_update:
            _guard_effects(builder.graph, first, finite)
        self.manager.update_graph(finite)
        cnt = self.manager.overflow_count
        F.assign(cnt, F.add(cnt, F.sub(1.0, F.cast(finite, np.float32))))


def auto_mixed_precision(network, level: str = "O2"):
    """Level O2: float16 compute in every sub-Cell that supports it, output cast to float32."""
    if level not in AMP_LEVELS:
        raise ValueError(f"amp: unknown level {level!r}; use one of {AMP_LEVELS}")
    if level == "O0":
        return network
    converted = 0
    for _, cell in network.cells_and_names():
        if hasattr(cell, "to_float"):
            cell.to_float(np.float16)
            converted += 1
    if not converted:
        raise ValueError(f"amp: {network!r} has no Cell with a float16 path (to_float); nothing to convert")
    return _OutputToFloat32(network)


def build_train_network(network, loss_fn, optimizer, level: str = "O2", loss_scale_manager=None):
    """(network, loss_fn, optimizer) for ``Model`` with mixed precision at ``level``. At O2 the default
    manager is ``DynamicLossScaleManager()``."""
    if level == "O0" and loss_scale_manager is None:
        return network, loss_fn, optimizer
    net = auto_mixed_precision(network, level)
    manager = loss_scale_manager or DynamicLossScaleManager()
    if not isinstance(manager, LossScaleManager):
        raise TypeError(f"amp: loss_scale_manager must be a LossScaleManager, got {type(manager).__name__}")
    return net, _ScaledLoss(loss_fn, manager), LossScaleOptimizer(optimizer, manager)


__all__ = ["AMP_LEVELS", "LossScaleManager", "FixedLossScaleManager", "DynamicLossScaleManager",
           "LossScaleOptimizer", "auto_mixed_precision", "build_train_network"]
