"""The host-memory cache of the runtime's steps (runtime/host_memory.py, runtime/_host_memory.h): what a step
allocates through numpy reuses mapped memory instead of paying page faults on every step, and the arrays
it hands out behave like any numpy array."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading

import numpy as np
import pytest
from numpy._core.multiarray import get_handler_name

from runtime import _host_memory, context, host_memory
from runtime.core import GraphBuilder, building
from runtime.compiler import compile as compile_graph
from runtime.ir.graph import Graph
from runtime.ops import api as F

N = 1 << 20   # 4 MB of float32: a block glibc would map and unmap per array


@pytest.fixture
def limit():
    yield
    _host_memory.set_limit(host_memory.LIMIT)


def test_scope_switches_the_allocator_of_this_thread_only():
    assert host_memory.ENABLED
    seen = {}
    with host_memory.step_memory():
        inside = np.empty(N, np.float32)
        t = threading.Thread(target=lambda: seen.setdefault("other", get_handler_name(np.empty(N, np.float32))))
        t.start()
        t.join()
    outside = np.empty(N, np.float32)
    assert get_handler_name(inside) == _host_memory.NAME
    assert get_handler_name(outside) == "default_allocator"
    assert seen["other"] == "default_allocator"   # another thread's arrays are not the step's


def test_freed_blocks_are_reused_and_zeros_are_zero():
    with host_memory.step_memory():
        a = np.full(N, 7.0, np.float32)
        addr = a.ctypes.data
        del a
        before = host_memory.stats()["hits"]
        b = np.empty(N - 3, np.float32)   # the same size class (whole pages): the same block
        assert b.ctypes.data == addr
        b[:] = 3.0
        del b
        z = np.zeros(N, np.float32)       # calloc from the cache: zeroed although the block held 3.0
        assert host_memory.stats()["hits"] >= before + 2
        assert not z.any()
        small = np.ones(100, np.float32)  # below the cache's minimum: numpy's default path
        assert small.sum() == 100


def test_a_resized_array_keeps_a_whole_size_class():
    """``ndarray.resize`` reallocs: the grown block must hold its size class, or reusing it for the next
    array of that class would write past its end."""
    with host_memory.step_memory():
        a = np.ones(N, np.float32)
        a.resize(3 * N + 1, refcheck=False)
        a[:] = 1.0
        del a
        b = np.empty(3 * N + 1000, np.float32)   # the same class (whole pages)
        b[:] = 2.0                               # writes the whole class; a short block would corrupt the heap
        assert float(b[-1]) == 2.0


def test_limit_bounds_what_stays_cached(limit):
    _host_memory.set_limit(8 * N)
    with host_memory.step_memory():
        arrays = [np.empty(N, np.float32) for _ in range(6)]      # 24 MB
        del arrays
    st = host_memory.stats()
    assert st["bytes"] <= 8 * N
    assert st["evicted"] >= 1
    _host_memory.set_limit(0)
    assert host_memory.stats()["bytes"] == 0


def _big_elementwise_graph(n):
    context.set_context(seed=0, enable_graph_kernel=False)
    g = Graph("elementwise")
    b = GraphBuilder(g)
    with building(b):
        x = b.input("x", (n,), np.float32)
        ys = [F.mul(x, float(k)) for k in range(1, 9)]    # eight temporaries live at once, each a fresh array
        s = ys[0]
        for y in ys[1:]:
            s = F.add(s, y)
        g.outputs = {"y": F.reduce_sum(s, axis=0).node}
    return compile_graph(g)


def test_unfused_steps_do_not_fault_their_temporaries_in_again():
    """A step whose temporaries reach 200 MB and die at its end: with numpy's default allocator glibc hands
    the memory back at the end of every step and faults in several thousand pages again in the next
    (about 4,600 per step here, with INSIGHT_HOST_CACHE_MB=0)."""
    n = 4 * N                                   # 16 MB arrays
    exe = _big_elementwise_graph(n)
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    exe({"x": x})
    exe({"x": x})
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        out = exe({"x": x})
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
    assert faults < 500, f"{faults:.0f} page faults per step (one 16 MB array not reused is 4096)"
    assert float(out["y"]) == pytest.approx(36.0 * float(x.astype(np.float64).sum()), rel=1e-3, abs=1e-2 * n ** 0.5)


def test_disabled_by_environment():
    code = ("import numpy as np; from numpy._core.multiarray import get_handler_name; "
            "from runtime import host_memory as h\n"
            "with h.step_memory(): a = np.empty(1 << 20)\n"
            "print(h.ENABLED, get_handler_name(a))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "INSIGHT_HOST_CACHE_MB": "0"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "default_allocator"]
    bad = subprocess.run([sys.executable, "-c", "import runtime.host_memory as h; print(h.ENABLED, h.LIMIT > 0)"],
                         env={**os.environ, "INSIGHT_HOST_CACHE_MB": "lots"}, capture_output=True, text=True)
    assert bad.returncode == 0 and bad.stdout.split() == ["True", "True"]   # the default, with one clear warning
    assert "INSIGHT_HOST_CACHE_MB must be a number of megabytes, got 'lots'" in bad.stderr
    assert "Traceback" not in bad.stderr
