"""Parameter: a named, persistent Tensor whose storage optimizers update in place."""
from __future__ import annotations

import numpy as np

from runtime.core import Tensor


class Parameter(Tensor):
    __slots__ = ("name", "requires_grad", "_named", "owner")

    def __init__(self, data, name: str | None = None, requires_grad: bool = True):
        if isinstance(data, Tensor):
            data = data.asnumpy()
        arr = np.asarray(data)
        if arr.dtype == np.float64 and not isinstance(data, np.ndarray):
            arr = arr.astype(np.float32)
        super().__init__(np.array(arr, order="C", copy=True))
        self.name = name or "Parameter"
        self._named = name is not None
        self.requires_grad = requires_grad
        self.owner: "Parameter | None" = None  # for optimizer state: the parameter it belongs to

    @property
    def data(self) -> np.ndarray:
        return self._data

    def set_data(self, value) -> None:
        """Overwrite the values in place (shape and dtype must match)."""
        value = np.asarray(value.asnumpy() if isinstance(value, Tensor) else value)
        if value.shape != self._data.shape:
            raise ValueError(f"Parameter {self.name!r}: cannot load a value of shape {value.shape} into "
                             f"shape {self._data.shape}")
        np.copyto(self._data, value.astype(self._data.dtype, copy=False))

    def __repr__(self):
        return f"Parameter(name={self.name!r}, shape={self.shape}, dtype={self.dtype}, " \
               f"requires_grad={self.requires_grad})"
