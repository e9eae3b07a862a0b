"""Cell: the building block of networks, as in MindSpore.

A Cell owns Parameters and child Cells (registered by attribute assignment) and defines
``construct``. Calling a Cell enters its scope, so every node it creates and every shape
error it raises names it (e.g. ``Dense(in_channels=64, out_channels=10) at 'fc2'``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

from runtime import core
from runtime.nn.parameter import Parameter
from runtime.ops.registry import ShapeError


class Cell:
    def __init__(self, auto_prefix: bool = True):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_cells", OrderedDict())
        object.__setattr__(self, "training", False)
        object.__setattr__(self, "_scope_name", "")
        object.__setattr__(self, "_attrs", {})

    # -- registration ------------------------------------------------------------------------
    def __setattr__(self, name, value):
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Cell):
            self._cells[name] = value
            object.__setattr__(value, "_scope_name", name)
        object.__setattr__(self, name, value)

    def insert_child_to_cell(self, name: str, cell: "Cell") -> None:
        setattr(self, name, cell)

    def cells_and_names(self, prefix: str = "") -> Iterator[tuple[str, "Cell"]]:
        yield prefix, self
        for name, c in self._cells.items():
            yield from c.cells_and_names(f"{prefix}.{name}" if prefix else name)

    def cells(self):
        return list(self._cells.values())

    def parameters_and_names(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen = set()
        for cname, cell in self.cells_and_names(prefix):
            for pname, p in cell._params.items():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                full = f"{cname}.{pname}" if cname else pname
                if not p._named:
                    p.name = full
                    p._named = True
                yield full, p

    def get_parameters(self) -> list[Parameter]:
        return [p for _, p in self.parameters_and_names()]

    def trainable_params(self) -> list[Parameter]:
        return [p for p in self.get_parameters() if p.requires_grad]

    def untrainable_params(self) -> list[Parameter]:
        return [p for p in self.get_parameters() if not p.requires_grad]

    def parameters_dict(self) -> "OrderedDict[str, Parameter]":
        return OrderedDict((p.name, p) for p in self.get_parameters())

    # -- mode -------------------------------------------------------------------------------------
    def set_train(self, mode: bool = True) -> "Cell":
        for _, c in self.cells_and_names():
            object.__setattr__(c, "training", bool(mode))
        return self

    def add_flags(self, **flags) -> "Cell":
        self._attrs.update(flags)
        return self

    def set_attr(self, key, value) -> "Cell":
        """A Cell-level attribute inherited by every op the Cell (and its children) creates,
        e.g. ``cell.set_attr("primitive_target", "CPU")`` pins its ops to the host."""
        for _, c in self.cells_and_names():
            c._attrs[key] = value
        return self

    # -- calling ------------------------------------------------------------------------------------
    def construct(self, *args):
        raise NotImplementedError(f"{type(self).__name__} must define construct()")

    def __call__(self, *args, **kwargs):
        with core.cell_scope(self._scope_name or type(self).__name__, self):
            return self.construct(*args, **kwargs)

    def extend_repr(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extend_repr()})"

    def check(self, ok: bool, message: str) -> None:
        """Raise a ShapeError that names this Cell and its path."""
        if not ok:
            path = core.current_scope() or type(self).__name__
            raise ShapeError(f"{self!r} at '{path}': {message}")
