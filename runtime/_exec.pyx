# cython: language_level=3
"""The executor's inner loops in compiled code.

A compiled step on one stream is a flat list of ``(out, kernel, ins, attrs, frees)`` tuples over a list of
slots (``env``). ``run_flat`` runs them in order; with ``starts``/``ends`` it also stamps every task's start
and end in CLOCK_MONOTONIC nanoseconds -- the clock behind ``time.perf_counter_ns`` on Linux, so the stamps
line up with every other event -- into preallocated int64 arrays (read from the TSC where the kernel's clock
runs on it, see ``use_tsc``). Per task, nothing runs in Python but the kernel
call itself; the clock reads are taken after the arguments are gathered, so a task's time is its kernel's.
``run_stream`` does the same for one stream of a multi-stream step (each stream in its own thread), with
the event waits and records between streams.
"""
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from *:
    """
    #if defined(__x86_64__) || defined(__i386__)
    #include <x86intrin.h>
    static inline long long insight_ticks(void) { return (long long)__rdtsc(); }
    #define INSIGHT_HAVE_TSC 1
    #else
    static inline long long insight_ticks(void) { return 0; }
    #define INSIGHT_HAVE_TSC 0
    #endif
    """
    long long insight_ticks() nogil
    int INSIGHT_HAVE_TSC


cdef inline long long _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000LL + ts.tv_nsec


def now_ns():
    """The loop's clock, for checking it against time.perf_counter_ns."""
    return _now()


# Stamping with the CPU's time-stamp counter. Where the kernel itself keeps CLOCK_MONOTONIC on the TSC
# (clocksource "tsc": invariant and synchronised across CPUs), a task is stamped with one RDTSC instruction
# instead of a clock_gettime call, which reads the kernel's clock page: after a kernel has swept a few MB
# through the caches, that page's cache and TLB entries are gone and each read costs several times the
# instruction. The stamps are mapped to CLOCK_MONOTONIC afterwards, pinned to a (clock, counter) pair read
# before the first task and one after the last, so the first and last stamps are exact clock readings.
cdef bint _use_tsc = False
cdef double _ns_per_tick = 0.0   # the long-run rate: for steps too short to measure their own
cdef long long _cal_ns = 0, _cal_ticks = 0


def _tsc_clocksource() -> bool:
    try:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            return f.read().strip() == "tsc"
    except OSError:
        return False


def use_tsc(on=None):
    """Stamp tasks with the TSC (True), with clock_gettime (False), or as the machine allows (None: only
    where the kernel's clocksource is the TSC). Returns whether the TSC is used."""
    global _use_tsc, _cal_ns, _cal_ticks
    if on is None:
        on = INSIGHT_HAVE_TSC and _tsc_clocksource()
    _use_tsc = bool(on) and INSIGHT_HAVE_TSC
    if _use_tsc and _cal_ticks == 0:
        _pair(&_cal_ns, &_cal_ticks)
    return _use_tsc


cdef void _pair(long long* ns, long long* ticks) noexcept nogil:
    """A clock reading and the counter at that moment: the counter read on both sides of the clock and
    averaged, from the tightest of a few tries (a thread preempted between the reads would otherwise skew
    every stamp of the step by up to half the time it was off the CPU)."""
    cdef long long a, b, c, best = -1
    cdef int k
    for k in range(8):
        a = insight_ticks()
        c = _now()
        b = insight_ticks()
        if best < 0 or b - a < best:
            best = b - a
            ns[0] = c
            ticks[0] = a + (b - a) // 2
            if best < 4000:  # ~1-2 us: as tight as the clock read itself allows
                return


cdef inline long long _stamp(bint tsc) noexcept nogil:
    return insight_ticks() if tsc else _now()


cdef void _map_stamps(long long[::1] starts, long long[::1] ends, Py_ssize_t n, long long ns0, long long t0,
                      long long ns1, long long t1) noexcept:
    """Map the counter values of tasks [0, n) to CLOCK_MONOTONIC on the line through (t0, ns0) and (t1, ns1),
    in run order (start <= end <= the next task's start: a thread moved to a CPU whose counter lags by a few
    cycles does not make a negative duration) and within [ns0, ns1]."""
    global _ns_per_tick, _cal_ns, _cal_ticks
    cdef double rate
    cdef Py_ssize_t k
    cdef long long prev = ns0, v
    if ns1 - _cal_ns > 200000000 and t1 > _cal_ticks:  # 0.2 s since the last calibration: refresh the rate
        _ns_per_tick = <double>(ns1 - _cal_ns) / <double>(t1 - _cal_ticks)
        if ns1 - _cal_ns > 60000000000:  # follow the kernel's rate slowly (NTP): a fresh base every minute
            _cal_ns, _cal_ticks = ns1, t1
    if t1 - t0 > 2000000 or _ns_per_tick <= 0:  # a long enough step (~1 ms) measures its own rate
        rate = <double>(ns1 - ns0) / <double>(t1 - t0) if t1 > t0 else 0.0
    else:
        rate = _ns_per_tick
    for k in range(n):
        v = ns0 + <long long>(<double>(starts[k] - t0) * rate)
        prev = v if v > prev else prev
        starts[k] = prev if prev < ns1 else ns1
        v = ns0 + <long long>(<double>(ends[k] - t0) * rate)
        prev = v if v > prev else prev
        ends[k] = prev if prev < ns1 else ns1


def run_flat(list flat, list env, long long[::1] starts=None, long long[::1] ends=None):
    cdef Py_ssize_t k, j, n = len(flat)
    cdef bint timed = starts is not None
    cdef tuple task, ins, frees
    cdef list args
    if timed and (starts.shape[0] < n or ends is None or ends.shape[0] < n):
        raise ValueError(f"run_flat: starts/ends must hold {n} entries")
    cdef bint tsc = timed and _use_tsc
    cdef long long ns0 = 0, t0 = 0, ns1 = 0, t1 = 0
    if tsc:
        _pair(&ns0, &t0)
    for k in range(n):
        task = <tuple>flat[k]
        ins = <tuple>task[2]
        args = [env[<Py_ssize_t>ins[j]] for j in range(len(ins))]
        if timed:
            starts[k] = _stamp(tsc)
            env[<Py_ssize_t>task[0]] = task[1](*args, **task[3])
            ends[k] = _stamp(tsc)
        else:
            env[<Py_ssize_t>task[0]] = task[1](*args, **task[3])
        frees = <tuple>task[4]
        for j in range(len(frees)):
            env[<Py_ssize_t>frees[j]] = None
    if tsc:
        _pair(&ns1, &t1)
        _map_stamps(starts, ends, n, ns0, t0, ns1, t1)


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
    cdef bint tsc = timed and _use_tsc
    cdef long long ns0 = 0, tk0 = 0, ns1 = 0, tk1 = 0
    cdef Py_ssize_t done = n
    if tsc:
        _pair(&ns0, &tk0)
    for k in range(n):
        if abort:
            done = k
            break
        t = tasks[k]
        if codes[k] == _WAIT:
            t0 = _stamp(tsc)
            events[t.event].wait()
            if abort:
                done = k
                break
            if timed:
                starts[k] = t0
                ends[k] = _stamp(tsc)
        elif codes[k] == _RECORD:
            events[t.event].set()
            if timed:
                t0 = _stamp(tsc)
                starts[k] = t0
                ends[k] = t0
        else:
            ins = t.ins
            args = [env[<Py_ssize_t>ins[j]] for j in range(len(ins))]
            if timed:
                starts[k] = _stamp(tsc)
                env[<Py_ssize_t>t.out] = t.kernel(*args, **t.attrs)
                ends[k] = _stamp(tsc)
            else:
                env[<Py_ssize_t>t.out] = t.kernel(*args, **t.attrs)
            frees = t.frees
            for j in range(len(frees)):
                env[<Py_ssize_t>frees[j]] = None
    if tsc:
        _pair(&ns1, &tk1)
        _map_stamps(starts, ends, done, ns0, tk0, ns1, tk1)
    return done


use_tsc()
