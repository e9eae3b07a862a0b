"""Datasets (MindData-shaped API): NumpySlicesDataset with shuffle / batch / repeat.

This first version runs its stages serially in the consumer's thread; every op keeps the
MindSpore signature so the threaded pipeline can replace the internals without changing users.
"""
from __future__ import annotations

import numpy as np

from runtime import random as _random


class Dataset:
    def __init__(self, parent: "Dataset | None" = None):
        self.parent = parent

    # -- chaining ------------------------------------------------------------------------------
    def batch(self, batch_size: int, drop_remainder: bool = False) -> "Dataset":
        return BatchDataset(self, batch_size, drop_remainder)

    def shuffle(self, buffer_size: int, seed: int | None = None) -> "Dataset":
        return ShuffleDataset(self, buffer_size, seed)

    def repeat(self, count: int = 1) -> "Dataset":
        return RepeatDataset(self, count)

    def map(self, operations, input_columns=None) -> "Dataset":
        return MapDataset(self, operations, input_columns)

    # -- iteration ------------------------------------------------------------------------------
    def rows(self):
        raise NotImplementedError

    def create_tuple_iterator(self):
        return iter(self.rows())

    def __iter__(self):
        return self.create_tuple_iterator()

    def get_dataset_size(self) -> int:
        return sum(1 for _ in self.rows())

    @property
    def column_names(self) -> list[str]:
        return self.parent.column_names


class NumpySlicesDataset(Dataset):
    """Rows are slices along axis 0 of each column array."""

    def __init__(self, data, column_names=None, shuffle=False, seed: int | None = None):
        super().__init__(None)
        if isinstance(data, dict):
            column_names = list(data)
            data = list(data.values())
        if isinstance(data, np.ndarray):
            data = [data]
        cols = [np.asarray(c) for c in data]
        n = {len(c) for c in cols}
        if len(n) != 1:
            raise ValueError(f"NumpySlicesDataset: columns have different lengths {[len(c) for c in cols]}")
        self.cols = cols
        self._names = list(column_names or [f"column_{i}" for i in range(len(cols))])
        if len(self._names) != len(cols):
            raise ValueError(f"NumpySlicesDataset: {len(cols)} columns but {len(self._names)} names")
        self._shuffle = shuffle
        self._rng = _random.generator(seed, "NumpySlicesDataset") if shuffle else None

    @property
    def column_names(self):
        return self._names

    def rows(self):
        n = len(self.cols[0])
        order = self._rng.permutation(n) if self._shuffle else range(n)
        for i in order:
            yield tuple(c[i] for c in self.cols)

    def get_dataset_size(self):
        return len(self.cols[0])


class ShuffleDataset(Dataset):
    def __init__(self, parent, buffer_size, seed=None):
        super().__init__(parent)
        if buffer_size < 1:
            raise ValueError(f"shuffle: buffer_size must be >= 1, got {buffer_size}")
        self.buffer_size = int(buffer_size)
        self._rng = _random.generator(seed, "shuffle")

    def rows(self):
        buf = []
        for row in self.parent.rows():
            buf.append(row)
            if len(buf) >= self.buffer_size:
                k = int(self._rng.integers(len(buf)))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        while buf:
            k = int(self._rng.integers(len(buf)))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()

    def get_dataset_size(self):
        return self.parent.get_dataset_size()


class MapDataset(Dataset):
    def __init__(self, parent, operations, input_columns=None):
        super().__init__(parent)
        self.operations = operations if isinstance(operations, (list, tuple)) else [operations]
        self.input_columns = input_columns

    def rows(self):
        names = self.parent.column_names
        idx = [names.index(c) for c in (self.input_columns or names[:1])]
        for row in self.parent.rows():
            row = list(row)
            for i in idx:
                v = row[i]
                for op in self.operations:
                    v = op(v)
                row[i] = v
            yield tuple(row)

    def get_dataset_size(self):
        return self.parent.get_dataset_size()


class BatchDataset(Dataset):
    def __init__(self, parent, batch_size, drop_remainder=False):
        super().__init__(parent)
        if batch_size < 1:
            raise ValueError(f"batch: batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.drop_remainder = int(batch_size), bool(drop_remainder)

    def rows(self):
        buf = []
        for row in self.parent.rows():
            buf.append(row)
            if len(buf) == self.batch_size:
                yield tuple(np.stack(c) for c in zip(*buf))
                buf = []
        if buf and not self.drop_remainder:
            yield tuple(np.stack(c) for c in zip(*buf))

    def get_dataset_size(self):
        n = self.parent.get_dataset_size()
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)


class RepeatDataset(Dataset):
    def __init__(self, parent, count=1):
        super().__init__(parent)
        self.count = int(count)

    def rows(self):
        for _ in range(self.count):
            yield from self.parent.rows()

    def get_dataset_size(self):
        return self.parent.get_dataset_size() * self.count
