"""EmbeddingLookup: an embedding table on the device or on the host, with a sparse path.

``EmbeddingLookup(vocab_size, embedding_size, target="CPU"|"DEVICE", sparse=True)`` as MindSpore's
``nn.EmbeddingLookup``. With ``sparse=True`` a lookup of ids (any shape) is

    uid  = emb_unique(ids)        distinct ids of the batch (padded to len(ids) with uid[0])
    inv  = emb_inverse(ids)       position of every id in uid
    rows = gather(table, uid)     on the table's side
    out  = gather(rows, inv)      on the device

so with ``target="CPU"`` the table, the unique/gather and the optimizer update run on the host and
only ``rows`` cross host->device; the backward of ``gather(rows, inv)`` sums the gradient per distinct
id on the device and only those rows cross device->host, as ``SparseGrad(uid, rows)``. FTRL and
LazyAdam then run the fused Cython kernels (``runtime/_kernels_embedding.pyx``), touching only those
rows. With ``target="DEVICE"`` the same graph runs on the device (a model that fits).

Overlap (host tables, ``overlap=True``): the host optimizer update of step k is deferred. When step
k+1 looks the table up, the rows it reads are updated first (the rows the two batches share), the
rest of the update is finished on a host thread while the device computes step k+1. Every value
is the one serial execution produces (row updates are independent; the rows step k+1 reads are
final before it reads them). ``flush_host_tables()`` completes every deferred update (Model.train
calls it when training ends; do it before reading a host table's values by hand).
"""
from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from runtime import core, hooks
from runtime import random as _random
from runtime.core import bind
from runtime.nn.cell import Cell
from runtime.nn.parameter import Parameter
from runtime.ops import api as F

clock = time.perf_counter_ns
_TABLES: "weakref.WeakKeyDictionary[Parameter, EmbeddingLookup]" = weakref.WeakKeyDictionary()
_ENGINES: "weakref.WeakSet[HostTableEngine]" = weakref.WeakSet()


def lookup_of(table) -> "EmbeddingLookup | None":
    """The sparse EmbeddingLookup owning ``table`` (None for any other parameter)."""
    try:
        return _TABLES.get(table)
    except TypeError:
        return None


def flush_host_tables() -> None:
    """Finish every deferred host optimizer update (values of host tables are final afterwards)."""
    for e in list(_ENGINES):
        e.flush()


def _init_table(shape, init, dtype, key: str) -> np.ndarray:
    """Initialise in float32 chunks (a 10M x 32 table never exists in float64)."""
    if isinstance(init, np.ndarray):
        if init.shape != tuple(shape):
            raise ValueError(f"EmbeddingLookup: table of shape {init.shape} given for {tuple(shape)}")
        return np.ascontiguousarray(init, dtype=dtype)
    out = np.empty(shape, dtype)
    if isinstance(init, (int, float)):
        out.fill(init)
        return out
    name = str(init).lower()
    if name in ("zeros", "ones"):
        out.fill(0.0 if name == "zeros" else 1.0)
        return out
    rng = _random.generator(None, key)
    flat = out.reshape(-1)
    step = 1 << 22
    for s in range(0, flat.size, step):
        part = flat[s:s + step]
        if name == "normal":
            rng.standard_normal(part.size, dtype=np.float32, out=part)
            part *= np.float32(0.01)
        elif name == "uniform":
            rng.random(part.size, dtype=np.float32, out=part)
            part -= np.float32(0.5)
            part *= np.float32(0.14)
        else:
            raise ValueError(f"EmbeddingLookup: unknown embedding_table init {init!r}; use normal, uniform, "
                             f"zeros, ones, a number or an array")
    return out


class HostTableEngine:
    """Defers the optimizer update of one host table across a step boundary (see the module doc)."""

    def __init__(self, name: str):
        self.name = name
        self._pending = None     # (fn, var, slots, uid, grad, args, step)
        self._rest = None        # future of the update of the rows the next batch did not read
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.step = 0
        self.shared_rows = self.rest_rows = 0  # totals, for the benchmark
        _ENGINES.add(self)

    def _wait_rest(self):
        f, self._rest = self._rest, None
        if f is not None:
            f.result()  # re-raises a failure of the host thread

    def _apply(self, p, idx, label: str):
        fn, var, slots, uid, grad, args, step = p
        t0 = clock()
        u, g = (uid, grad) if idx is None else (uid[idx], grad[idx])
        fn(var, *slots, u, g, len(u), *args)
        if hooks.listening:
            hooks.emit("task", {"task_id": -3, "name": f"{fn.__name__}[{label}]/{self.name}", "op": fn.__name__,
                                "kind": "kernel", "stream_id": 4, "stream": "host", "scope": self.name,
                                "start_ns": t0, "end_ns": clock(), "step": step, "graph": "host_tables",
                                "shape": f"{len(u)}x{var.shape[1]}", "dtype": "float32", "flops": int(g.size * 12),
                                "bytes": int(g.nbytes * (1 + 2 * (1 + len(slots)))), "phase": "update"})

    def defer(self, fn, var, slots, uid, grad, count, args):
        with self._lock:
            self._wait_rest()
            if self._pending is not None:  # two updates with no lookup between: finish the first
                self._apply(self._pending, None, "all rows")
            grad = grad.reshape(uid.shape[0], -1)
            self._pending = (fn, var, tuple(slots), uid[:count], grad[:count], args, self.step)
            self.step += 1

    def before_lookup(self, uid, count):
        """Called with the distinct ids a lookup is about to read: make exactly those rows final."""
        with self._lock:
            self._wait_rest()
            p, self._pending = self._pending, None
            if p is None:
                return
            shared = np.isin(p[3], uid[:count], assume_unique=True)
            sel = np.flatnonzero(shared)
            rest = np.flatnonzero(~shared)
            self.shared_rows += sel.size
            self.rest_rows += rest.size
            if sel.size:
                self._apply(p, sel, "rows read next")
            if rest.size:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"host-opt-{self.name}")
                self._rest = self._pool.submit(self._apply, p, rest, "other rows")

    def flush(self):
        with self._lock:
            self._wait_rest()
            p, self._pending = self._pending, None
            if p is not None:
                self._apply(p, None, "all rows")


class EmbeddingLookup(Cell):
    """A (vocab_size, embedding_size) table looked up by integer ids of any shape -> ids.shape + (dim,)."""

    def __init__(self, vocab_size, embedding_size, target="DEVICE", sparse=True, embedding_table="normal",
                 overlap=True, dtype=np.float32):
        super().__init__()
        target = str(target).upper()
        if target not in ("CPU", "DEVICE"):
            raise ValueError(f"EmbeddingLookup: target must be 'CPU' or 'DEVICE', got {target!r}")
        if int(vocab_size) < 1 or int(embedding_size) < 1:
            raise ValueError(f"EmbeddingLookup: vocab_size and embedding_size must be >= 1, got "
                             f"{vocab_size} x {embedding_size}")
        self.vocab_size, self.embedding_size = int(vocab_size), int(embedding_size)
        self.target, self.sparse = target, bool(sparse)
        self.embedding_table = Parameter(_init_table((self.vocab_size, self.embedding_size), embedding_table, dtype,
                                                     f"EmbeddingLookup/{self.vocab_size}x{self.embedding_size}"))
        self.engine = HostTableEngine(f"table{self.vocab_size}x{self.embedding_size}") \
            if (target == "CPU" and sparse and overlap) else None
        if sparse:
            _TABLES[self.embedding_table] = self

    @property
    def on_host(self) -> bool:
        return self.target == "CPU"

    def extend_repr(self):
        return f"vocab_size={self.vocab_size}, embedding_size={self.embedding_size}, target={self.target}, " \
               f"sparse={self.sparse}"

    def construct(self, ids):
        self.check(ids.dtype.kind in "iu", f"expects integer ids but got dtype {ids.dtype}")
        host = {"primitive_target": "CPU"} if self.on_host else {}
        if not self.sparse:
            with core.annotate(**host):
                return F.gather(self.embedding_table, ids)
        shape = tuple(ids.shape)
        n = int(np.prod(shape, dtype=np.int64))
        with core.annotate(**host):
            flat = F.reshape(ids, (n,))
            attrs = {"num_rows": self.vocab_size}
            if self.engine is not None:
                attrs["_engine"] = self.engine
            uid = bind("emb_unique", [flat], attrs)
            inv = bind("emb_inverse", [flat], {"num_rows": self.vocab_size})
            rows = F.gather(self.embedding_table, uid)
        out = F.gather(rows, inv)
        return F.reshape(out, shape + (self.embedding_size,))
