"""Dataset ops (the user-facing tree nodes). Each node describes one op; per iterator, ``_setup``
turns it into a running stage of the engine (see ``engine.py`` for the stage protocol)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from runtime import communication
from runtime.dataset.engine import EOE, EOF, DatasetIterator


def _check_workers(n, who) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{who}: num_parallel_workers must be an int >= 1, got {n!r}")
    return int(n)


def _fn_name(fn) -> str:
    name = getattr(fn, "__name__", None)
    if name is None:
        name = type(fn).__name__
    return name


def _check_shards(num_shards, shard_id, who):
    """Explicit (num_shards, shard_id), or (None, None): decided from the communication group when iterated."""
    if num_shards is None and shard_id is None:
        return None, None
    if num_shards is None or shard_id is None:
        raise ValueError(f"{who}: give num_shards and shard_id together (got num_shards={num_shards!r}, "
                         f"shard_id={shard_id!r})")
    if isinstance(num_shards, bool) or not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
        raise ValueError(f"{who}: num_shards must be an int >= 1, got {num_shards!r}")
    if isinstance(shard_id, bool) or not isinstance(shard_id, (int, np.integer)) or not 0 <= shard_id < num_shards:
        raise ValueError(f"{who}: shard_id must be an int in 0..{num_shards - 1}, got {shard_id!r}")
    return int(num_shards), int(shard_id)


def _shard_of(ds) -> tuple[int, int]:
    """(num_shards, shard_id): the source's own, else one shard per process of the communication group."""
    if ds._num_shards is not None:
        return ds._num_shards, ds._shard_id
    rank, size = communication.rank_and_size()
    return (size, rank) if communication.is_initialized() else (1, 0)


def _shard_rows(n: int, num_shards: int) -> int:
    """Rows per shard: every shard gets ceil(n / num_shards) (the last ones wrap around to the first rows, as
    MindSpore's DistributedSampler pads), so every rank runs the same number of steps."""
    return n if num_shards == 1 else -(-n // num_shards)


def _pass_suffix(p) -> str:
    return f" of pass {p}" if p else ""


class Dataset:
    """Base of every dataset op: chaining, iteration, sizes."""

    _op_type = "dataset"

    def __init__(self, children=(), num_parallel_workers: int = 1):
        self.children = list(children)
        self.num_parallel_workers = _check_workers(num_parallel_workers, type(self).__name__)
        self._iterators_created = 0

    # -- chaining ------------------------------------------------------------------------------
    def map(self, operations, input_columns=None, output_columns=None, num_parallel_workers: int = 1) -> "Dataset":
        return MapDataset(self, operations, input_columns, output_columns, num_parallel_workers)

    def batch(self, batch_size: int, drop_remainder: bool = False, num_parallel_workers: int = 1) -> "Dataset":
        return BatchDataset(self, batch_size, drop_remainder, num_parallel_workers)

    def shuffle(self, buffer_size: int, seed: int | None = None) -> "Dataset":
        return ShuffleDataset(self, buffer_size, seed)

    def repeat(self, count: int = 1) -> "Dataset":
        return RepeatDataset(self, count)

    # -- iteration ------------------------------------------------------------------------------
    def create_tuple_iterator(self, num_epochs: int = -1, columns=None, output_numpy: bool = True,
                              do_copy: bool = True) -> DatasetIterator:
        """Items are tuples of numpy arrays, one per column. One epoch per ``for`` loop over the
        iterator; ``num_epochs`` bounds how many (-1: unbounded)."""
        return DatasetIterator(self, num_epochs, "tuple", columns)

    def create_dict_iterator(self, num_epochs: int = -1, output_numpy: bool = True) -> DatasetIterator:
        """Items are ``{column_name: numpy array}`` dicts."""
        return DatasetIterator(self, num_epochs, "dict")

    def __iter__(self):
        return self.create_tuple_iterator(num_epochs=1)

    # -- sizes and schema -------------------------------------------------------------------------
    def get_dataset_size(self) -> int:
        return self.children[0].get_dataset_size()

    def get_batch_size(self) -> int:
        return self.children[0].get_batch_size()

    @property
    def column_names(self) -> list[str]:
        return self.children[0].column_names

    def get_col_names(self) -> list[str]:
        return list(self.column_names)

    # -- engine interface -------------------------------------------------------------------------
    def _children(self):
        return self.children

    def _child_passes(self, passes):
        return passes

    def _effective_workers(self) -> int:
        return self.num_parallel_workers

    def _output_batched(self) -> bool:
        return self.children[0]._output_batched() if self.children else False

    def _explicit_seed(self):
        return None

    def _desc(self) -> str:
        return ""

    def _label(self, op_id: int) -> str:
        d = self._desc()
        return f"{self._op_type} op #{op_id}" + (f" ({d})" if d else "")

    def _where(self, info) -> str:
        if info is None:
            return "an unknown row"
        p, r = info
        return f"row {r}{_pass_suffix(p)}"

    def _setup(self, st) -> None:
        raise NotImplementedError

    def __repr__(self):
        d = self._desc()
        return f"{type(self).__name__}({d})"


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------
class _RandomAccessSource(Dataset):
    """A source whose rows can be fetched by index: fetch hands out indices (in a per-pass
    permutation when shuffling), workers turn indices into rows in parallel."""

    def __init__(self, column_names, shuffle, seed, num_parallel_workers, num_shards=None, shard_id=None):
        super().__init__((), num_parallel_workers)
        self._names = list(column_names)
        self._shuffle = bool(shuffle)
        self._seed = None if seed is None else int(seed)
        self._num_shards, self._shard_id = _check_shards(num_shards, shard_id, type(self).__name__)

    @property
    def column_names(self):
        return list(self._names)

    def get_batch_size(self) -> int:
        return 1

    def _explicit_seed(self):
        return self._seed

    def _get_row(self, i):
        raise NotImplementedError

    def _setup(self, st) -> None:
        # sharded: this shard's r-th row is row (shard_id + r * num_shards) mod n of the pass's (shuffled) order --
        # every shard draws the same permutation (same seed), so the shards partition each pass deterministically
        n = self._full_size()
        num_shards, shard_id = _shard_of(self)
        m = _shard_rows(n, num_shards)
        passes = st.passes
        shuffle = self._shuffle

        def order(p):
            if not shuffle or (passes is not None and p >= passes):
                return None
            return st.pass_rng(p).permutation(n)

        s = SimpleNamespace(p=0, pos=0, order=order(0))

        def fetch(ws):
            if passes is not None and s.p >= passes:
                return EOF, None, False
            r = s.pos
            if r < m:
                s.pos = r + 1
                q = (shard_id + r * num_shards) % n if num_shards > 1 else r
                return (q if s.order is None else int(s.order[q])), (s.p, r), True
            s.p += 1
            s.pos = 0
            s.order = order(s.p)
            return EOE, None, False

        get_row = self._get_row
        st.fetch = fetch
        st.process = lambda i, info: get_row(i)


class NumpySlicesDataset(_RandomAccessSource):
    """Rows are slices along axis 0 of each column array.

    ``data``: a dict ``{name: array}``, a tuple of arrays (one per column), a list of arrays (one
    per column), a single array, or a list of values (one column). ``shuffle=True`` visits the rows
    in a fresh permutation every pass (seeded by ``seed``, else by the dataset seed).

    ``num_shards`` / ``shard_id``: read only one shard, rows ``shard_id, shard_id + num_shards, ...`` of each
    pass's order (ceil(rows / num_shards) per shard). Default: one shard per process of the communication
    group after ``runtime.communication.init()`` (pass ``num_shards=1, shard_id=0`` to read every row)."""

    _op_type = "numpy_slices"

    def __init__(self, data, column_names=None, shuffle=False, seed: int | None = None,
                 num_parallel_workers: int = 1, num_shards: int | None = None, shard_id: int | None = None):
        if isinstance(data, dict):
            column_names = list(data) if column_names is None else column_names
            data = list(data.values())
        elif isinstance(data, np.ndarray):
            data = [data]
        elif isinstance(data, list) and not all(isinstance(c, np.ndarray) for c in data):
            data = [np.asarray(data)]
        elif not isinstance(data, (tuple, list)):
            raise TypeError(f"NumpySlicesDataset: data must be a dict, tuple, list or numpy array, "
                            f"got {type(data).__name__}")
        cols = [np.asarray(c) for c in data]
        if not cols:
            raise ValueError("NumpySlicesDataset: no columns")
        if any(c.ndim == 0 for c in cols):
            raise ValueError("NumpySlicesDataset: every column must have at least one dimension")
        lens = [len(c) for c in cols]
        if len(set(lens)) != 1:
            raise ValueError(f"NumpySlicesDataset: columns have different lengths {lens}")
        names = list(column_names) if column_names is not None else [f"column_{i}" for i in range(len(cols))]
        if isinstance(column_names, str):
            names = [column_names]
        if len(names) != len(cols):
            raise ValueError(f"NumpySlicesDataset: {len(cols)} columns but {len(names)} names")
        super().__init__(names, shuffle, seed, num_parallel_workers, num_shards, shard_id)
        self.cols = cols

    def _full_size(self) -> int:
        return len(self.cols[0])

    def get_dataset_size(self) -> int:
        return _shard_rows(self._full_size(), _shard_of(self)[0])

    def _get_row(self, i):
        return tuple([np.array(c[i]) for c in self.cols])

    def _desc(self):
        return f"columns={self._names}, rows={len(self.cols[0])}" + (", shuffle=True" if self._shuffle else "")


def _to_row(value, names):
    """A generator item -> a tuple of numpy values, one per column."""
    k = len(names)
    if isinstance(value, tuple) or (isinstance(value, list) and k > 1):
        if len(value) != k:
            raise ValueError(f"the source produced {len(value)} values but there are {k} columns {names}")
        return tuple(np.asarray(v) for v in value)
    if k != 1:
        raise ValueError(f"the source produced a single {type(value).__name__} but there are {k} columns {names}; "
                         "yield a tuple with one value per column")
    return (np.asarray(value),)


class GeneratorDataset(Dataset):
    """Rows from Python code. ``source`` is either

    * random-access (has ``__getitem__`` and ``__len__``): ``source[i]`` is row i; supports
      ``shuffle=True`` and parallel workers; or
    * a callable returning an iterator (e.g. a generator function; called once per pass), or an
      iterable (``iter(source)`` once per pass). Read by one thread, in order.

    Each item is a tuple with one value per column (a bare value is accepted for one column)."""

    _op_type = "generator"

    def __init__(self, source, column_names, shuffle: bool = False, seed: int | None = None,
                 num_parallel_workers: int = 1, num_shards: int | None = None, shard_id: int | None = None):
        names = [column_names] if isinstance(column_names, str) else list(column_names or [])
        if not names:
            raise ValueError("GeneratorDataset: column_names is required (one name per value the source yields)")
        super().__init__((), num_parallel_workers)
        self.source = source
        self._names = names
        self._random_access = hasattr(source, "__getitem__") and hasattr(source, "__len__")
        if not self._random_access and not callable(source) and not hasattr(source, "__iter__"):
            raise TypeError(f"GeneratorDataset: source must be callable, iterable or random-accessible, "
                            f"got {type(source).__name__}")
        if shuffle and not self._random_access:
            raise ValueError("GeneratorDataset: shuffle=True needs a random-accessible source "
                             "(__getitem__ and __len__); use .shuffle(buffer_size) for an iterable source")
        self._shuffle = bool(shuffle)
        self._seed = None if seed is None else int(seed)
        self._num_shards, self._shard_id = _check_shards(num_shards, shard_id, "GeneratorDataset")
        if self._num_shards is not None and self._num_shards > 1 and not self._random_access:
            raise ValueError("GeneratorDataset: num_shards needs a random-accessible source (__getitem__ and __len__) "
                             "so every shard can pick its rows")
        self._size = None
        self._one_shot = not self._random_access and not callable(source) and hasattr(source, "__next__")
        self._one_shot_used = False

    @property
    def column_names(self):
        return list(self._names)

    def get_batch_size(self) -> int:
        return 1

    def _full_size(self) -> int:
        return len(self.source)

    def get_dataset_size(self) -> int:
        if self._random_access:
            return _shard_rows(len(self.source), _shard_of(self)[0])
        if self._size is None:
            if self._one_shot:
                raise TypeError("GeneratorDataset: the size of a one-shot iterator source is unknown "
                                "without consuming it; pass a generator function instead")
            self._size = sum(1 for _ in self._open())
        return self._size

    def _effective_workers(self) -> int:
        return self.num_parallel_workers if self._random_access else 1

    def _explicit_seed(self):
        return self._seed

    def _open(self):
        src = self.source
        if callable(src):
            return iter(src())
        if self._one_shot:
            if self._one_shot_used:
                raise ValueError("GeneratorDataset: the source is a one-shot iterator that was already consumed; "
                                 "pass a generator function (or a re-iterable object) to iterate more than once")
            self._one_shot_used = True
        return iter(src)

    def _get_row(self, i):
        return _to_row(self.source[i], self._names)

    def _desc(self):
        return f"source={_fn_name(self.source)}"

    def _setup(self, st) -> None:
        names = self._names
        if self._random_access:
            _RandomAccessSource._setup(self, st)  # index fetch + parallel __getitem__
            return
        passes = st.passes

        def passes_gen():
            p = 0
            while passes is None or p < passes:
                st.cur_info = (p, 0)
                it = self._open()
                r = 0
                while True:
                    st.cur_info = (p, r)
                    try:
                        v = next(it)
                    except StopIteration:
                        break
                    yield v, (p, r), True
                    r += 1
                yield EOE, None, False
                p += 1
            while True:
                yield EOF, None, False

        g = passes_gen()
        st.fetch = lambda ws: next(g)
        st.process = lambda v, info: _to_row(v, names)


# ------------------------------------------------------------------------------------------------
# ops
# ------------------------------------------------------------------------------------------------
class MapDataset(Dataset):
    """Applies ``operations`` (a callable or a list, chained: each gets the previous one's outputs as
    arguments) to ``input_columns`` (default: the first column) and stores the results in
    ``output_columns`` (default: the input columns). With as many outputs as inputs, outputs replace
    the inputs in place; otherwise the inputs are removed and the outputs inserted where the first
    input column was."""

    _op_type = "map"

    def __init__(self, child, operations, input_columns=None, output_columns=None, num_parallel_workers=1):
        super().__init__((child,), num_parallel_workers)
        ops = list(operations) if isinstance(operations, (list, tuple)) else [operations]
        if not ops:
            raise ValueError("map: operations is empty")
        bad = [o for o in ops if not callable(o)]
        if bad:
            raise TypeError(f"map: operations must be callables, got {bad!r}")
        self.operations = ops
        names = child.column_names
        ins = [input_columns] if isinstance(input_columns, str) else list(input_columns or names[:1])
        missing = [c for c in ins if c not in names]
        if missing:
            raise ValueError(f"map: input_columns {missing} not in the dataset's columns {names}")
        if len(set(ins)) != len(ins):
            raise ValueError(f"map: duplicate input_columns {ins}")
        outs = ([output_columns] if isinstance(output_columns, str) else
                list(output_columns) if output_columns is not None else list(ins))
        if not outs or len(set(outs)) != len(outs):
            raise ValueError(f"map: output_columns must be non-empty and unique, got {outs}")
        self.input_columns, self.output_columns = ins, outs
        in_idx = [names.index(c) for c in ins]
        if len(outs) == len(ins):
            layout = [("in", i) for i in range(len(names))]
            for k, i in enumerate(in_idx):
                layout[i] = ("out", k)
            new_names = list(names)
            for k, i in enumerate(in_idx):
                new_names[i] = outs[k]
        else:
            first = min(in_idx)
            layout, new_names = [], []
            for i, n in enumerate(names):
                if i == first:
                    layout += [("out", k) for k in range(len(outs))]
                    new_names += outs
                if i not in in_idx:
                    layout.append(("in", i))
                    new_names.append(n)
        if len(set(new_names)) != len(new_names):
            raise ValueError(f"map: output_columns {outs} clash with the remaining columns; "
                             f"result would be {new_names}")
        self._in_idx, self._layout, self._names = in_idx, layout, new_names

    @property
    def column_names(self):
        return list(self._names)

    def _desc(self):
        return f"operations=[{', '.join(_fn_name(o) for o in self.operations)}]"

    def _where(self, info):
        if info is None:
            return "an unknown row"
        p, r = info
        return f"{'batch' if self.children[0]._output_batched() else 'row'} {r}{_pass_suffix(p)}"

    def _setup(self, st) -> None:
        get = st.child.out.get
        s = SimpleNamespace(p=0, row=0)

        def fetch(ws):
            item = get(ws)
            if type(item) is tuple:
                r = s.row
                s.row = r + 1
                return item, (s.p, r), True
            if item is EOE:
                s.p += 1
                s.row = 0
            return item, None, False

        ops, in_idx, layout = self.operations, self._in_idx, self._layout
        n_out = len(self.output_columns)
        outs_names = self.output_columns

        def process(row, info):
            args = [row[i] for i in in_idx]
            for op in ops:
                res = op(*args)
                args = list(res) if isinstance(res, tuple) else [res]
            if len(args) != n_out:
                raise ValueError(f"the operations returned {len(args)} values but output_columns has "
                                 f"{n_out}: {outs_names}")
            return tuple(np.asarray(args[j]) if kind == "out" else row[j] for kind, j in layout)

        st.fetch, st.process = fetch, process


class BatchDataset(Dataset):
    """Groups ``batch_size`` consecutive rows and stacks each column with ``np.stack``."""

    _op_type = "batch"

    def __init__(self, child, batch_size, drop_remainder=False, num_parallel_workers=1):
        super().__init__((child,), num_parallel_workers)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch: batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size, self.drop_remainder = int(batch_size), bool(drop_remainder)

    def get_dataset_size(self) -> int:
        n = self.children[0].get_dataset_size()
        if n < 0:
            return n
        return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)

    def get_batch_size(self) -> int:
        return self.batch_size

    def _output_batched(self) -> bool:
        return True

    def _desc(self):
        return f"batch_size={self.batch_size}" + (", drop_remainder=True" if self.drop_remainder else "")

    def _where(self, info):
        if info is None:
            return "an unknown batch"
        p, b, r0, r1 = info
        return f"batch {b} (rows {r0}..{r1}){_pass_suffix(p)}"

    def _setup(self, st) -> None:
        get = st.child.out.get
        bs, drop = self.batch_size, self.drop_remainder
        names = self.children[0].column_names
        s = SimpleNamespace(p=0, row=0, b=0, pending=None)

        def new_pass():
            s.p += 1
            s.row = s.b = 0

        def fetch(ws):
            if s.pending is not None:
                m, s.pending = s.pending, None
                if m is EOE:
                    new_pass()
                return m, None, False
            rows = []
            while len(rows) < bs:
                item = get(ws)
                if type(item) is tuple:
                    rows.append(item)
                    continue
                if rows and not drop and (item is EOE or item is EOF):
                    s.pending = item
                    break
                if item is EOE:
                    new_pass()
                return item, None, False
            info = (s.p, s.b, s.row, s.row + len(rows) - 1)
            s.b += 1
            s.row += len(rows)
            return rows, info, True

        def process(rows, info):
            out = []
            for j, name in enumerate(names):
                col = [r[j] for r in rows]
                try:
                    out.append(np.stack(col))
                except ValueError:
                    shapes = [np.shape(v) for v in col]
                    k = next((k for k, sh in enumerate(shapes) if sh != shapes[0]), None)
                    if k is None:
                        raise
                    r0 = info[2]
                    raise ValueError(f"cannot stack column {name!r}: rows have different shapes "
                                     f"{shapes[0]} (row {r0}) and {shapes[k]} (row {r0 + k})") from None
            return tuple(out)

        st.fetch, st.process = fetch, process


class ShuffleDataset(Dataset):
    """Buffer shuffle: keeps ``buffer_size`` rows and emits a random one each time a row arrives
    (then drains the buffer at the end of each pass). Re-seeded every pass (see ``pass_rng``)."""

    _op_type = "shuffle"

    def __init__(self, child, buffer_size, seed=None):
        super().__init__((child,), 1)
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, (int, np.integer)) or buffer_size < 1:
            raise ValueError(f"shuffle: buffer_size must be an int >= 1, got {buffer_size!r}")
        self.buffer_size = int(buffer_size)
        self.seed = None if seed is None else int(seed)

    def _explicit_seed(self):
        return self.seed

    def _effective_workers(self) -> int:
        return 1

    def _desc(self):
        return f"buffer_size={self.buffer_size}"

    def _setup(self, st) -> None:
        get = st.child.out.get
        ws0 = st.ws[0]
        size = self.buffer_size

        def gen():
            p = 0
            while True:
                rng = st.pass_rng(p)
                buf = []
                while True:
                    item = get(ws0)
                    if type(item) is tuple:
                        buf.append(item)
                        if len(buf) >= size:
                            k = int(rng.integers(len(buf)))
                            buf[k], buf[-1] = buf[-1], buf[k]
                            yield buf.pop(), None, True
                        continue
                    if item is EOE or item is EOF:
                        while buf:
                            k = int(rng.integers(len(buf)))
                            buf[k], buf[-1] = buf[-1], buf[k]
                            yield buf.pop(), None, True
                    yield item, None, False
                    if item is not EOE:
                        return
                    break
                p += 1

        g = gen()
        st.fetch = lambda ws: next(g)


class RepeatDataset(Dataset):
    """Repeats its input ``count`` times (-1: forever) within one epoch."""

    _op_type = "repeat"

    def __init__(self, child, count=1):
        super().__init__((child,), 1)
        count = int(count)
        if count == 0 or count < -1:
            raise ValueError(f"repeat: count must be -1 (forever) or >= 1, got {count}")
        self.count = count

    def get_dataset_size(self) -> int:
        n = self.children[0].get_dataset_size()
        return -1 if self.count == -1 or n < 0 else n * self.count

    def _effective_workers(self) -> int:
        return 1

    def _child_passes(self, passes):
        return None if passes is None or self.count == -1 else passes * self.count

    def _desc(self):
        return f"count={self.count}"

    def _setup(self, st) -> None:
        get = st.child.out.get
        count = self.count
        s = SimpleNamespace(k=0, rows=0)

        def fetch(ws):
            while True:
                item = get(ws)
                if type(item) is tuple:
                    s.rows += 1
                    return item, None, True
                if item is EOE:
                    s.k += 1
                    if count == -1 and s.rows == 0:
                        return EOF, None, False  # repeating an empty pass forever: end instead of spinning
                    s.rows = 0
                    if count != -1 and s.k % count == 0:
                        return item, None, False
                    continue
                return item, None, False

        st.fetch = fetch
