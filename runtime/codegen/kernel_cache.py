"""Compile generated kernels with the machine's C compiler, cache them on disk, load them.

``gcc -O3 -fopenmp -march=native -shared -fPIC -ffp-contract=off -fno-math-errno``.
``-ffp-contract=off`` keeps every multiply and add separately rounded (no FMA), which is what makes
generated code, the interpreter and the unfused numpy ops agree; ``-fno-math-errno`` lets ``sqrtf``
vectorise (it changes no result). Each kernel structure has a cache entry
``$XDG_CACHE_HOME/insight/kernels/<name>_<hash>.so`` (default ``~/.cache/insight/kernels``), the hash
covering the source, the shared header (``element_ops.h``), the flags, the compiler version and the CPU
(model and feature flags: ``-march=native`` code must not run on another CPU). The kernels a graph is
missing are compiled together (two translation units, two gcc processes in parallel); each batch ``.so``
is written to a temporary file and renamed, and each kernel's entry is a symlink to its batch created the
same way, so concurrent processes never see a partial file. Loaded with ctypes; ``address(name)`` is the
function pointer ``runtime._fusion.call`` invokes with the GIL released.

The compiler is ``$INSIGHT_FUSION_CC`` or ``gcc``; ``compiler(cmd)`` switches it temporarily (tests use a
missing one). With no working compiler the first failure warns once and nothing is compiled again.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runtime.codegen import interpreter

HEADER_PATH = Path(__file__).with_name("element_ops.h")
CFLAGS = ("-O3", "-fopenmp", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno")

_state = {"cc": None, "cc_version": None, "cc_broken": False, "warned": False}
_lock = threading.Lock()
_loaded: dict[str, int] = {}        # kernel name -> function address
_libs: list = []                    # keep the CDLLs alive
_failed: set[str] = set()           # kernels whose compilation failed


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
        if interpreter.AVAILABLE:
            warnings.warn(f"graph kernels: {why}; using the tile interpreter", RuntimeWarning, stacklevel=3)
        else:
            warnings.warn(f"graph kernels: {why} and runtime._fusion is not built; running fused groups "
                          f"op by op", RuntimeWarning, stacklevel=3)


def compiler_available() -> bool:
    return _cc() is not None


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


def ensure_compiled(sources, jobs: int = 2) -> None:
    """Compile (or load from the cache) every ``(kernel name, C source)``: the missing ones in ``jobs``
    batches, one gcc process each, in parallel. Failures are remembered (``failed``), never raised."""
    todo = {}
    for name, csrc in sources:
        if name not in _loaded and name not in _failed:
            todo.setdefault(name, csrc)
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


def address(name: str) -> int | None:
    """The loaded kernel's function address, or None when it is not compiled (yet, or ever)."""
    return _loaded.get(name)


def failed(name: str) -> bool:
    """Did compiling this kernel fail (it then runs on the interpreter)?"""
    return name in _failed


def compiler_broken() -> bool:
    """Has the C compiler been found not to work (no further compilation is attempted)?"""
    return _state["cc_broken"]
