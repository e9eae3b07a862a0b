# cython: language_level=3
"""The executor's one-stream inner loop in compiled code.

A compiled step on one stream is a flat list of ``(out, kernel, ins, attrs, frees)`` tuples over a list of
slots (``env``). ``run_flat`` runs them in order; with ``starts``/``ends`` it also stamps every task with
two reads of CLOCK_MONOTONIC -- the clock behind ``time.perf_counter_ns`` on Linux, so the stamps line up
with every other event -- into preallocated int64 arrays. Per task, nothing runs in Python but the kernel
call itself; the clock reads are taken after the arguments are gathered, so a task's time is its kernel's.
"""
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef inline long long _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000LL + ts.tv_nsec


def now_ns():
    """The loop's clock, for checking it against time.perf_counter_ns."""
    return _now()


def run_flat(list flat, list env, long long[::1] starts=None, long long[::1] ends=None):
    cdef Py_ssize_t k, j, n = len(flat)
    cdef bint timed = starts is not None
    cdef tuple task, ins, frees
    cdef list args
    if timed and (starts.shape[0] < n or ends is None or ends.shape[0] < n):
        raise ValueError(f"run_flat: starts/ends must hold {n} entries")
    for k in range(n):
        task = <tuple>flat[k]
        ins = <tuple>task[2]
        args = [env[<Py_ssize_t>ins[j]] for j in range(len(ins))]
        if timed:
            starts[k] = _now()
            env[<Py_ssize_t>task[0]] = task[1](*args, **task[3])
            ends[k] = _now()
        else:
            env[<Py_ssize_t>task[0]] = task[1](*args, **task[3])
        frees = <tuple>task[4]
        for j in range(len(frees)):
            env[<Py_ssize_t>frees[j]] = None
