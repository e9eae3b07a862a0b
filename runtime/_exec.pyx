# cython: language_level=3
"""The executor's inner loops in compiled code.

A compiled step on one stream is a flat list of ``(out, kernel, ins, attrs, frees)`` tuples over a list of
slots (``env``). ``run_flat`` runs them in order; with ``starts``/``ends`` it also stamps every task with
two reads of CLOCK_MONOTONIC -- the clock behind ``time.perf_counter_ns`` on Linux, so the stamps line up
with every other event -- into preallocated int64 arrays. Per task, nothing runs in Python but the kernel
call itself; the clock reads are taken after the arguments are gathered, so a task's time is its kernel's.
``run_stream`` does the same for one stream of a multi-stream step (each stream in its own thread), with
the event waits and records between streams.
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


# task kinds of run_stream (``codes``): a kernel or copy, an event wait, an event record
cdef enum:
    _WAIT = 1
    _RECORD = 2
KERNEL, EVENT_WAIT, EVENT_RECORD = 0, _WAIT, _RECORD


def run_stream(list tasks, const signed char[::1] codes, list env, object events, list abort,
               long long[::1] starts=None, long long[::1] ends=None):
    """Run one stream's tasks (``runtime.device.tasks.Task`` objects; ``codes[k]`` is the kind of task k) in
    order, honouring cross-stream events (``events[t.event]``: ``threading.Event``). A non-empty ``abort``
    list (another stream failed) stops the stream before its next task and after a wait. With ``starts`` /
    ``ends``, task k is stamped as in ``run_flat`` (an event record: one instant; a wait: the time blocked).
    Returns how many tasks ran."""
    cdef Py_ssize_t k, j, n = len(tasks)
    cdef bint timed = starts is not None
    cdef long long t0
    cdef object t, ins, frees
    cdef list args
    if codes.shape[0] != n or (timed and (starts.shape[0] < n or ends is None or ends.shape[0] < n)):
        raise ValueError(f"run_stream: codes must hold {n} entries, starts/ends at least {n}")
    for k in range(n):
        if abort:
            return k
        t = tasks[k]
        if codes[k] == _WAIT:
            t0 = _now()
            events[t.event].wait()
            if abort:
                return k
            if timed:
                starts[k] = t0
                ends[k] = _now()
        elif codes[k] == _RECORD:
            events[t.event].set()
            if timed:
                t0 = _now()
                starts[k] = t0
                ends[k] = t0
        else:
            ins = t.ins
            args = [env[<Py_ssize_t>ins[j]] for j in range(len(ins))]
            if timed:
                starts[k] = _now()
                env[<Py_ssize_t>t.out] = t.kernel(*args, **t.attrs)
                ends[k] = _now()
            else:
                env[<Py_ssize_t>t.out] = t.kernel(*args, **t.attrs)
            frees = t.frees
            for j in range(len(frees)):
                env[<Py_ssize_t>frees[j]] = None
    return n
