"""EmbeddingLookup: an embedding table on the device or on the host, with a sparse path.

``EmbeddingLookup(vocab_size, embedding_size, target="CPU"|"DEVICE", sparse=True)`` as MindSpore's
``nn.EmbeddingLookup``. With ``sparse=True`` a lookup of ids (any shape) is

    uid  = emb_unique(ids)        the distinct ids of the batch
    inv  = emb_inverse(ids)       position of every id in uid
    rows = emb_lookup(table, uid) on the table's side (rows[k] = table[uid[k]])
    out  = emb_expand(rows, inv)  rows[inv], on the device

(the IR declares min(len(ids), vocab) rows as capacity; the kernels produce and copy only the distinct ones)

so with ``target="CPU"`` the table, the unique/gather and the optimizer update run on the host and
only ``rows`` cross host->device; the backward of ``gather(rows, inv)`` sums the gradient per distinct
id on the device (emb_rows_grad) and only those rows cross device->host, as ``SparseGrad(uid, rows)``. FTRL and
LazyAdam then run the fused Cython kernels (``runtime/_kernels_embedding.pyx``), touching only those
rows. With ``target="DEVICE"`` the same graph runs on the device (a model that fits).

Overlap (host tables, ``overlap=True``, ``HostTableEngine``): the host optimizer update of step k is
deferred. The rows step k+1 reads are updated first -- on the host thread as soon as the update is
handed over, when step k+1's lookup was prefetched, else when step k+1 looks up; then, on the host
thread while the device computes step k+1, the rest of the update runs and the lookup of step k+2 is
prefetched (in data sink mode the next batch already waits in the device queue: its ids are computed
by re-running the pure ops that lead from the batch to the ids, then unique + gather); the rows the
prefetch shares with step k+1's update are refreshed after that update. Every value is the one serial
execution produces: row updates are independent, and every row a lookup returns has every earlier
update applied. ``flush_host_tables()`` completes every deferred update (Model.train calls it when
training ends; do it before reading a host table's values by hand).
"""
from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from runtime import _kernels as K
from runtime import _kernels_embedding as KE
from runtime import core, hooks
from runtime import random as _random
from runtime.core import Tensor, bind
from runtime.device.queue import SinkFeeder
from runtime.nn.cell import Cell
from runtime.nn.parameter import Parameter
from runtime.ops import api as F
from runtime.ops.registry import get_primitive

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


def _init_table(shape, init, dtype, key: str, out: np.ndarray) -> np.ndarray:
    """Initialise ``out`` in place, in float32 chunks (a 10M x 32 table never exists in float64)."""
    if isinstance(init, np.ndarray):
        if init.shape != tuple(shape):
            raise ValueError(f"EmbeddingLookup: table of shape {init.shape} given for {tuple(shape)}")
        out[...] = init
        return out
    if isinstance(init, (int, float)):
        out.fill(init)
        return out
    name = str(init).lower()
    if name in ("zeros", "ones"):
        if name == "ones":
            out.fill(1.0)
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


class _Prefetch:
    __slots__ = ("ids", "uid", "inv", "count", "rows", "table")

    def __init__(self, ids, uid, inv, count, rows, table):
        self.ids, self.uid, self.inv, self.count, self.rows, self.table = ids, uid, inv, count, rows, table


def _ids_program(node):
    """A snapshot of the pure computation from the graph inputs to ``node`` (the lookup's ids), or None
    if it reads a parameter or has side effects -- what the prefetch re-runs on the next batch."""
    seen: dict = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n.id in seen:
            continue
        if n.op == "param" or (n.op not in ("input", "const") and get_primitive(n.op).category in ("effect", "source")):
            return None
        seen[n.id] = n
        stack.extend(n.inputs)
    prog = [(n.id, n.op, [i.id for i in n.inputs], dict(n.attrs)) for n in sorted(seen.values(), key=lambda n: n.id)]
    if not any(op == "input" for _, op, _, _ in prog):
        return None
    return prog, node.id


def _run_program(program, batch):
    """The ids of the batch ``(data, label)`` (Model's feed names) computed by the snapshot."""
    prog, target = program
    env = {}
    for nid, op, ins, attrs in prog:
        if op == "input":
            k = {"data": 0, "label": 1}.get(attrs.get("name"))
            if k is None or k >= len(batch):
                return None
            env[nid] = batch[k]
        elif op == "const":
            env[nid] = attrs["value"]
        else:
            env[nid] = get_primitive(op).kernel(*[env[i] for i in ins], **attrs)
    return env[target]


class _Update:
    """A deferred optimizer update of one table: ``fn(var, *slots, uid, grad, n, *args)`` on some rows."""
    __slots__ = ("fn", "var", "slots", "uid", "grad", "args", "step", "left", "patched")

    def __init__(self, fn, var, slots, uid, grad, args, step):
        self.fn, self.var, self.slots, self.uid, self.grad, self.args, self.step = fn, var, slots, uid, grad, args, step
        self.left = np.arange(len(uid))  # positions of uid not applied yet
        self.patched = None              # the prefetch whose rows already include this update


class HostTableEngine:
    """The host side of one table: defers its optimizer update across the step boundary and prefetches
    the next batch's lookup while the device computes (see the module doc). Runs its background work on
    one host thread, in order, so the table is never read and written at once."""

    def __init__(self, name: str, num_rows: int):
        self.name, self.num_rows = name, int(num_rows)
        self._pending: _Update | None = None  # a deferred update
        self._job = None         # future of the background work (see defer and lookup)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.RLock()
        self._pre: _Prefetch | None = None   # the next batch's lookup, valid up to the pending update
        self._last = None        # (ids, uid, inv) of the last unique
        self._table = None
        self.program = None      # how to compute the ids from a batch (set when a training step is traced)
        self.step = 0
        self.shared_rows = self.rest_rows = 0
        self.prefetch_hits = self.prefetch_misses = 0
        _ENGINES.add(self)

    # -- helpers ---------------------------------------------------------------------------------
    def _wait_job(self):
        f, self._job = self._job, None
        if f is not None:
            f.result()  # re-raises a failure of the host thread

    def _submit(self, fn, *args):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"host-{self.name}")
        self._job = self._pool.submit(fn, *args)

    def _emit(self, name, op, t0, step, shape, nbytes, phase):
        if hooks.listening:
            hooks.emit("task", {"task_id": -3, "name": f"{name}/{self.name}", "op": op, "kind": "kernel",
                                "stream_id": 4, "stream": "host", "scope": self.name, "start_ns": t0,
                                "end_ns": clock(), "step": step, "graph": "host_tables", "shape": shape,
                                "dtype": "float32", "flops": 0, "bytes": int(nbytes), "phase": phase})

    def _apply(self, u: _Update, idx, label: str):
        """Apply the update to the rows at positions ``idx`` of its uid (and mark them done)."""
        if idx.size == 0:
            return
        t0 = clock()
        uid, g = u.uid[idx], u.grad[idx]
        u.fn(u.var, *u.slots, uid, g, len(uid), *u.args)
        self._emit(f"{u.fn.__name__}[{label}]", u.fn.__name__, t0, u.step, f"{len(uid)}x{u.var.shape[1]}",
                   g.nbytes * (1 + 2 * (1 + len(u.slots))), "update")

    def _finish(self, u: _Update, label: str):
        self._apply(u, u.left, label)
        u.left = u.left[:0]

    def _prefetch(self):
        queue = SinkFeeder.active
        batch = queue.peek() if (queue is not None and self.program is not None) else None
        if batch is None or self._table is None:
            return
        t0 = clock()
        try:
            ids = _run_program(self.program, batch)
            if ids is None or ids.ndim != 1:
                return
            uid, inv, count = KE.unique_inverse(ids, self.num_rows)
            uid = uid[:count]
        except Exception:  # noqa: BLE001 - a bad batch fails in its own step, with its own error
            return
        rows = K.embedding_gather(self._table, uid)
        self._pre = _Prefetch(ids, uid, inv, count, rows, self._table)
        self._emit("EmbeddingLookup[prefetch]", "emb_lookup", t0, self.step + 1, f"{count}x{rows.shape[1]}",
                   rows.nbytes, "forward")

    def _early(self, u: _Update, pre: _Prefetch):
        """Right after step k's update is handed over: update the rows the prefetched step k+1 reads
        and refresh them in the prefetch, while the device finishes step k."""
        shared = KE.member_mask(u.uid, pre.uid)
        sel = np.flatnonzero(shared)
        self._apply(u, sel, "rows read next")
        self.shared_rows += sel.size
        if sel.size:
            pos = np.flatnonzero(KE.member_mask(pre.uid, u.uid[sel]))
            pre.rows[pos] = u.var[pre.uid[pos]]
        u.left = np.flatnonzero(~shared)
        u.patched = pre

    def _background(self, u, rest):
        if u is not None:
            self._apply(u, rest, "other rows")
            self.rest_rows += rest.size
        self._prefetch()

    # -- called by the kernels ---------------------------------------------------------------------
    def unique(self, ids, num_rows):
        """(uid, inv) of ``ids``: from the prefetch when it computed these ids."""
        with self._lock:
            last = self._last
            if last is not None and (last[0] is ids or np.array_equal(last[0], ids)):
                return last[1], last[2]
            self._wait_job()
            pre = self._pre
            if pre is not None and np.array_equal(pre.ids, ids):
                self._last = (ids, pre.uid, pre.inv)
                return pre.uid, pre.inv
            uid, inv, count = KE.unique_inverse(ids, num_rows)
            uid = uid[:count]
            self._last = (np.array(ids, copy=True), uid, inv)
            return uid, inv

    def lookup(self, table, ids, uid):
        """The rows ``table[uid]`` as serial execution would read them now."""
        with self._lock:
            self._wait_job()
            self._table = table
            count = KE.unique_count(uid)
            pre, self._pre = self._pre, None
            u, self._pending = self._pending, None
            hit = pre is not None and pre.table is table and pre.uid.shape == uid.shape and np.array_equal(pre.uid, uid)
            rest = None
            shared = None
            if u is not None:
                if hit and u.patched is pre:  # the shared rows were updated and refreshed early
                    rest = u.left
                else:  # update the rows this batch reads, now
                    mask = KE.member_mask(u.uid[u.left], uid[:count])  # (releases the GIL, unlike np.isin)
                    sel, rest = u.left[mask], u.left[~mask]
                    self._apply(u, sel, "rows read next")
                    self.shared_rows += sel.size
                    shared = u.uid[sel] if sel.size else None
            if hit:
                rows = pre.rows
                if shared is not None:  # the prefetch read these rows before the update above
                    pos = np.flatnonzero(KE.member_mask(uid[:count], shared))
                    rows[pos] = table[uid[pos]]
                self.prefetch_hits += 1
            else:
                rows = K.embedding_gather(table, uid)
                self.prefetch_misses += pre is not None
            if (rest is not None and rest.size) or self.program is not None:
                self._submit(self._background, u, rest if rest is not None else np.zeros(0, np.int64))
            return rows

    def defer(self, fn, var, slots, uid, grad, count, args):
        with self._lock:
            self._wait_job()
            if self._pending is not None:  # two updates with no lookup between: finish the first
                self._finish(self._pending, "all rows")
                self._pre = None
            grad = grad.reshape(uid.shape[0], -1)
            u = self._pending = _Update(fn, var, tuple(slots), uid[:count], grad[:count], args, self.step)
            self._last = None
            self.step += 1
            pre = self._pre
            if pre is not None and pre.table is var:
                self._submit(self._early, u, pre)

    def flush(self):
        with self._lock:
            self._wait_job()
            u, self._pending = self._pending, None
            if u is not None:
                self._finish(u, "all rows")
                self._pre = None


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
        shape = (self.vocab_size, self.embedding_size)
        self.embedding_table = Parameter(np.zeros(shape, dtype))  # filled in place: the table never exists twice
        _init_table(shape, embedding_table, dtype, f"EmbeddingLookup/{shape[0]}x{shape[1]}",
                    self.embedding_table.data)
        self.engine = HostTableEngine(f"table{self.vocab_size}x{self.embedding_size}", self.vocab_size) \
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
        if not self.sparse or self.embedding_table.dtype != np.float32:  # the fused kernels are float32
            with core.annotate(**host):
                return F.gather(self.embedding_table, ids)
        shape = tuple(ids.shape)
        n = int(np.prod(shape, dtype=np.int64))
        with core.annotate(**host):
            flat = F.reshape(ids, (n,))
            attrs = {"num_rows": self.vocab_size}
            if self.engine is not None:
                attrs["_engine"] = self.engine
                if flat.node is not None and self.training:
                    self.engine.program = _ids_program(flat.node)
            if flat.is_symbolic:
                uid = bind("emb_unique", [flat], attrs)
            else:  # eager: the distinct ids are known now (an op's eager output must match its inferred shape)
                u, _, count = KE.unique_inverse(flat.asnumpy(), self.vocab_size)
                uid = Tensor(u[:count])
            inv = bind("emb_inverse", [flat], attrs)
            rows = bind("emb_lookup", [self.embedding_table, flat, uid],
                        {"_engine": self.engine} if self.engine is not None else {})
        out = bind("emb_expand", [rows, inv])
        return F.reshape(out, shape + (self.embedding_size,))
