"""The kernel runtime: build a ``Program`` from a fused ``SubGraph``, compile its C with the machine's gcc
(cached on disk), run it -- or run the same plan on the Cython tile interpreter when no compiler works.

Compilation
    ``gcc -O3 -fopenmp -march=native -shared -fPIC -ffp-contract=off -fno-math-errno``.
    ``-ffp-contract=off`` keeps every multiply and add separately rounded (no FMA), which is what
    makes generated code, the interpreter and the unfused numpy ops agree; ``-fno-math-errno`` lets
    ``sqrtf`` vectorise (it changes no result). Each kernel structure has a cache entry
    ``$XDG_CACHE_HOME/insight/kernels/<name>_<hash>.so`` (default ``~/.cache/insight/kernels``),
    the hash covering the source, the shared header, the flags, the compiler version and the CPU
    (model and feature flags: ``-march=native`` code must not run on another CPU). The kernels
    a graph is missing are compiled together (two translation units, two gcc processes in parallel);
    each batch ``.so`` is written to a temporary file and renamed, and each kernel's entry is a
    symlink to its batch created the same way, so concurrent processes never see a partial file.
    Loaded with ctypes; called through ``runtime._fusion.call`` (GIL released).

Backends (``set_backend`` / env ``INSIGHT_FUSION_BACKEND``)
    ``auto`` -- compiled C, falling back to the interpreter if no compiler works (warned once);
    ``c`` -- compiled C only; ``interp`` -- the Cython tile interpreter (bit-identical to ``c``);
    ``numpy`` -- evaluate the group op by op with the primitives' own kernels (a last resort when
    the Cython extension is not built; same values as running unfused).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from runtime.passes.graph_kernel import cgen
from runtime.passes.graph_kernel.plan import OPCODES, Plan, SubGraph, analyze

try:  # the Cython helper (interpreter + fast caller); optional
    from runtime import _fusion
except ImportError:  # pragma: no cover - extension not built
    _fusion = None

HEADER_PATH = Path(__file__).with_name("fusion_ops.h")
CFLAGS = ("-O3", "-fopenmp", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")

_state = {"backend": os.environ.get("INSIGHT_FUSION_BACKEND", "auto"), "cc": None, "cc_version": None,
          "cc_broken": False, "warned": False,
          "threads": int(os.environ.get("INSIGHT_FUSION_THREADS", "0")) or (os.cpu_count() or 1)}
_lock = threading.Lock()
_loaded: dict[str, int] = {}        # kernel name -> function address
_libs: list = []                    # keep the CDLLs alive
_failed: set[str] = set()           # kernels whose compilation failed


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------
def set_backend(name: str) -> None:
    if name not in ("auto", "c", "interp", "numpy"):
        raise ValueError(f"graph-kernel backend must be auto, c, interp or numpy; got {name!r}")
    _state["backend"] = name


def set_threads(n: int) -> None:
    """Threads per kernel (default: the CPU count; results do not depend on it)."""
    _state["threads"] = max(1, int(n))


def get_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def backend(name: str):
    old = _state["backend"]
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = old


@contextlib.contextmanager
def compiler(cc: str | None):
    """Use another C compiler command (``None``: the default gcc) -- e.g. a missing one in tests."""
    old = (_state["cc"], _state["cc_version"], _state["cc_broken"], _state["warned"])
    _state["cc"], _state["cc_version"], _state["cc_broken"], _state["warned"] = cc, None, False, False
    _loaded_backup = dict(_loaded)
    _loaded.clear()
    try:
        yield
    finally:
        _state["cc"], _state["cc_version"], _state["cc_broken"], _state["warned"] = old
        _loaded.clear()
        _loaded.update(_loaded_backup)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "insight" / "kernels"


def _cc() -> str | None:
    if _state["cc"] is None:
        _state["cc"] = os.environ.get("INSIGHT_FUSION_CC") or shutil.which("gcc") or "gcc"
    if _state["cc_version"] is None and not _state["cc_broken"]:
        try:
            out = subprocess.run([_state["cc"], "--version"], capture_output=True, text=True, timeout=30)
            if out.returncode != 0:
                raise OSError(out.stderr)
            _state["cc_version"] = out.stdout.splitlines()[0] if out.stdout else _state["cc"]
        except (OSError, subprocess.SubprocessError) as e:
            _broken(f"no working C compiler ({_state['cc']}: {e})")
    return None if _state["cc_broken"] else _state["cc"]


def _broken(why: str) -> None:
    _state["cc_broken"] = True
    if not _state["warned"]:
        _state["warned"] = True
        if _fusion is not None:
            warnings.warn(f"graph kernels: {why}; using the tile interpreter", RuntimeWarning, stacklevel=3)
        else:
            warnings.warn(f"graph kernels: {why} and runtime._fusion is not built; running fused groups "
                          f"op by op", RuntimeWarning, stacklevel=3)


def compiler_available() -> bool:
    return _cc() is not None


# ---------------------------------------------------------------------------------------------------
# compile + cache + load
# ---------------------------------------------------------------------------------------------------
_HEADER_TEXT: list = []


def _header() -> str:
    if not _HEADER_TEXT:
        _HEADER_TEXT.append(HEADER_PATH.read_text())
    return _HEADER_TEXT[0]


def _cpu_key() -> str:
    """-march=native code is only valid on the same CPU features: they are part of the cache key."""
    if "cpu" not in _state:
        try:
            with open("/proc/cpuinfo") as f:
                lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        except OSError:
            import platform
            lines = [platform.machine(), platform.processor()]
        _state["cpu"] = hashlib.sha1("".join(lines).encode()).hexdigest()[:12]
    return _state["cpu"]


def _so_path(name: str, source: str) -> Path:
    key = hashlib.sha1("\0".join([_header(), source, " ".join(CFLAGS), _state["cc_version"] or "",
                                  _cpu_key()]).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}_{key}.so"


def _compile_batch(items: list[tuple[str, str]]) -> dict[str, Path]:
    """Compile several kernels in one translation unit (one gcc process); every kernel's cache entry
    ``<name>_<key>.so`` is then a symlink to the batch's shared object. Returns name -> path."""
    cc = _cc()
    if cc is None or not items:
        return {}
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    paths = {n: _so_path(n, src) for n, src in items}
    todo = [(n, src) for n, src in items if not paths[n].exists()]
    if not todo:
        return paths
    body = "\n".join(src for _, src in todo)
    bkey = hashlib.sha1((_header() + body + " ".join(CFLAGS) + (_state["cc_version"] or "") + _cpu_key())
                        .encode()).hexdigest()[:16]
    batch = d / f"batch_{bkey}.so"
    if not batch.exists():
        with tempfile.TemporaryDirectory(dir=d, prefix=".build-") as tmp:
            src = Path(tmp) / "kernels.c"
            src.write_text(_header() + "\n" + body)
            out = Path(tmp) / "kernels.so"
            try:
                r = subprocess.run([cc, *CFLAGS, "-o", str(out), str(src), "-lm"], capture_output=True, text=True,
                                   timeout=600)
            except (OSError, subprocess.SubprocessError) as e:
                _broken(f"the C compiler failed to run ({e})")
                return {}
            if r.returncode != 0:
                if len(todo) > 1:   # find the culprit: compile one by one
                    got = {}
                    for it in todo:
                        got.update(_compile_batch([it]))
                    return {n: p for n, p in paths.items() if n in got or p.exists()}
                with _lock:
                    _failed.add(todo[0][0])
                warnings.warn(f"graph kernels: compiling {todo[0][0]} failed; using the interpreter for it:\n"
                              f"{r.stderr[-2000:]}", RuntimeWarning, stacklevel=2)
                return {n: p for n, p in paths.items() if p.exists()}
            os.replace(out, batch)   # atomic: a concurrent builder of the same batch writes the same bytes
    for n, _ in todo:
        link = d / f".{paths[n].name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.symlink(batch.name, link)
            os.replace(link, paths[n])
        except OSError:
            with contextlib.suppress(OSError):
                link.unlink()
    return {n: p for n, p in paths.items() if p.exists()}


def _load(name: str, path: Path) -> int:
    lib = ctypes.CDLL(str(path))
    fn = getattr(lib, name)
    _libs.append(lib)
    return ctypes.cast(fn, ctypes.c_void_p).value


def ensure_compiled(programs, jobs: int = 2) -> None:
    """Compile (or load from the cache) every program's kernel: the missing ones in ``jobs`` batches,
    one gcc process each, in parallel."""
    if _state["backend"] not in ("auto", "c") or _fusion is None:
        return
    todo = {}
    for p in programs:
        if p.name not in _loaded and p.name not in _failed:
            todo.setdefault(p.name, p.csrc)
    if not todo or _cc() is None:
        return
    items = sorted(todo.items())
    missing = [it for it in items if not _so_path(*it).exists()]
    batches = [missing[k::jobs] for k in range(jobs)] if len(missing) > 1 else [missing]
    batches = [b for b in batches if b]
    if len(batches) > 1:
        with ThreadPoolExecutor(max_workers=len(batches)) as ex:
            list(ex.map(_compile_batch, batches))
    elif batches:
        _compile_batch(batches[0])
    for n, src in items:
        path = _so_path(n, src)
        if path.exists():
            with _lock:
                if n not in _loaded:
                    _loaded[n] = _load(n, path)


# ---------------------------------------------------------------------------------------------------
# programs
# ---------------------------------------------------------------------------------------------------
def encode(plan: Plan) -> dict:
    """The plan as flat arrays for ``runtime._fusion.interpret``."""
    K, vals, reds, outs = plan.K, plan.vals, plan.reds, plan.outs
    nv = len(vals)
    vk = np.full((nv, 6), -1, np.int64)
    vc = np.zeros(nv, np.float32)
    vstr = np.zeros((nv, K), np.int64)
    for i, v in enumerate(vals):
        if v.kind == "in":
            vk[i, :3] = (0, v.a, int(plan.in_u8[v.a]))
            vstr[i] = plan.strides(v.mask)
        elif v.kind == "const":
            vk[i, :3] = (1, 0, 0)
            vc[i] = v.c
        elif v.kind == "red":
            vk[i, :3] = (2, v.a, 0)
            vstr[i] = plan.strides(v.mask)
        else:
            vk[i, 0] = OPCODES[v.op]
            vk[i, 1:3] = 0
            vk[i, 3:3 + len(v.args)] = v.args
    rk = np.zeros((len(reds), 8), np.int64)
    rstr = np.zeros((len(reds), K), np.int64)
    accper = np.zeros(max(len(reds), 1), np.int64)
    for r, rd in enumerate(reds):
        rk[r] = (rd.src, 0 if rd.kind == "sum" else 1, rd.phase, 1 if rd.cls == "S1" else 2, rd.sfx, rd.lanes,
                 int(rd.cross), plan.mask_size(rd.kmask))
        rstr[r] = plan.strides(rd.kmask)
        accper[r] = plan.mask_size(rd.kmask) * rd.lanes if rd.cls == "S2" else 1
    ok = np.zeros((len(outs), 4), np.int64)
    ostr = np.zeros((len(outs), K), np.int64)
    for k, o in enumerate(outs):
        ok[k] = (o.val, int(o.u8), o.phase, o.red)
        ostr[k] = plan.strides(o.mask)
    pv, pvo = [], [0]
    for vs in plan.phase_vals:
        pv.extend(vs)
        pvo.append(len(pv))
    epi = np.zeros(max(len(outs), 1), np.int64)
    epin = np.zeros(max(len(outs), 1), np.int64)
    for k, vs in enumerate(plan.epi_vals):
        epi[k], epin[k] = len(pv), len(vs)
        pv.extend(vs)
    return {"vk": vk.ravel(), "vc": vc, "vstr": vstr.ravel(), "rk": rk.ravel(), "rstr": rstr.ravel(),
            "ok": ok.ravel(), "ostr": ostr.ravel(), "fstr": np.asarray(plan.strides((1 << K) - 1), np.int64),
            "pv": np.asarray(pv or [0], np.int64), "pvo": np.asarray(pvo, np.int64), "accper": accper,
            "epi": epi, "epin": epin, "nphases": plan.nphases, "local": plan.mode == "local",
            "nred": len(reds), "nv": nv, "nin": len(plan.in_masks), "nout": len(outs)}


class Program:
    """One compiled (or interpreted) kernel for a fused SubGraph with fixed shapes."""

    def __init__(self, sg: SubGraph):
        self.sg = sg
        self.plan = analyze(sg)
        self.name, self.csrc = cgen.generate(self.plan)
        self.code = encode(self.plan) if _fusion is not None else None
        self.dims = np.asarray(self.plan.dims, np.int64)
        self.out_shapes = [tuple(sg.ref_shape(r)) for r in sg.outputs]
        self.out_dtypes = [sg.ref_dtype(r) for r in sg.outputs]
        p = self.plan
        self._res_sizes = [p.mask_size(r.kmask) for r in p.reds]
        self._acc_sizes = [p.acc_size(r) for r in p.reds]
        self._res_specs = [(r.out, n) for r, n in zip(p.reds, self._res_sizes)]
        self._in_checks = list(enumerate(np.dtype(d) for d in sg.in_dtypes))
        self._out_specs = [(shape, np.dtype(dt), int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize)
                           for shape, dt in zip(self.out_shapes, self.out_dtypes)]
        self.flops = p.flops

    # -- which path runs it ----------------------------------------------------------------------------
    def backend(self) -> str:
        b = _state["backend"]
        if b == "numpy" or _fusion is None:
            return "numpy"
        if b == "interp":
            return "interp"
        if self.name not in _loaded and self.name not in _failed and not _state["cc_broken"]:
            ensure_compiled([self])
        if self.name in _loaded:
            return "c"
        if b == "c":
            raise RuntimeError(f"graph kernel {self.name} is not compiled and the backend is 'c'")
        return "interp"

    def __call__(self, *arrays):
        how = self.backend()
        if how == "numpy":
            return self._numpy(arrays)
        plan = self.plan
        ins = list(arrays)
        for k, dt in self._in_checks:
            a = ins[k]
            if type(a) is not np.ndarray or a.dtype != dt or not a.flags.c_contiguous:
                ins[k] = np.ascontiguousarray(a, dtype=dt)
        outs = [np.empty(shape, dt) if nb < (1 << 20) else _aligned_empty(shape, dt, nb)
                for shape, dt, nb in self._out_specs]
        inplace_tmp = None
        if plan.inplace:
            var = arrays[0]
            if type(var) is np.ndarray and var.flags.c_contiguous and var.dtype == self.out_dtypes[0]:
                outs[0] = ins[0] = var
            else:  # pragma: no cover - parameters are contiguous float32
                inplace_tmp = outs[0]
        P = ins + outs
        for r, n in self._res_specs:
            P.append(outs[r] if r >= 0 else np.empty(n, np.float32))
        for n in self._acc_sizes:
            P.append(np.empty(n, np.float64) if n else None)
        if how == "c":
            _fusion.call(_loaded[self.name], P, self.dims, plan.c0, plan.nchunks, _state["threads"])
        else:
            _fusion.interpret(self.code, P, self.dims, plan.c0, plan.nchunks, _state["threads"])
        if plan.inplace:
            if inplace_tmp is not None:  # pragma: no cover
                np.copyto(arrays[0], inplace_tmp)
            return arrays[0]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _numpy(self, arrays):
        """Op-by-op evaluation with the primitives' kernels (no compiler, no Cython helper)."""
        from runtime.ops.registry import get_primitive

        sg = self.sg
        env: list = [None] * len(sg.ops)

        def get(r):
            return env[r] if r >= 0 else np.asarray(arrays[-1 - r])
        for j, o in enumerate(sg.ops):
            if o.op == "const":
                env[j] = np.asarray(o.attrs["value"], o.dtype).reshape(o.shape)
                continue
            attrs = {k: v for k, v in o.attrs.items()}
            env[j] = np.asarray(get_primitive(o.op).kernel(*[get(a) for a in o.args], **attrs))
        outs = [np.ascontiguousarray(get(r)).astype(dt, copy=False).reshape(s)
                for r, s, dt in zip(sg.outputs, self.out_shapes, self.out_dtypes)]
        if sg.inplace:
            np.copyto(arrays[0], outs[0])
            return arrays[0]
        return outs[0] if len(outs) == 1 else tuple(outs)


_programs: dict = {}


class _BufferPool:
    """Recycles the memory of large kernel outputs (a caching allocator).

    A fresh multi-megabyte numpy array costs a page fault (and the kernel zeroing the page) per 4 KB on
    its first write -- often more than the kernel itself. Outputs are 64-byte aligned views of pooled
    buffers; a buffer is free again once nothing references it any more (its views are gone), which
    its reference count tells. The pool keeps at most ``limit`` bytes.
    """

    def __init__(self, limit: int = 1 << 30):
        self.limit = limit
        self.bytes = 0
        self.free_lists: dict[int, list] = {}
        self.lock = threading.Lock()
        # references a buffer has when only the pool holds it, measured through the same code path
        probe = [np.empty(1, np.uint8)]
        self.free_refs = [sys.getrefcount(b) for b in probe][0]

    def empty(self, shape, dtype, nbytes: int):
        with self.lock:
            bufs = self.free_lists.setdefault(nbytes, [])
            for buf in bufs:
                if sys.getrefcount(buf) == self.free_refs:   # no view of it is alive any more
                    return self._view(buf, shape, dtype, nbytes)
            buf = np.empty(nbytes + 64, np.uint8)
            if self.bytes + nbytes <= self.limit:
                bufs.append(buf)
                self.bytes += nbytes
            return self._view(buf, shape, dtype, nbytes)

    @staticmethod
    def _view(buf, shape, dtype, nbytes):
        off = (-buf.ctypes.data) % 64
        return buf[off:off + nbytes].view(dtype).reshape(shape)

    def clear(self):
        with self.lock:
            self.free_lists.clear()
            self.bytes = 0


_pool = _BufferPool()


def _aligned_empty(shape, dtype, nbytes):
    """A large output array: 64-byte aligned (whole vectors, streaming stores), memory recycled."""
    return _pool.empty(shape, dtype, nbytes)


def program_for(sg: SubGraph) -> Program:
    """Programs are shared between identical groups (e.g. every encoder layer's layer norm)."""
    key = sg.key()
    p = _programs.get(key)
    if p is None:
        p = _programs[key] = Program(sg)
    return p
