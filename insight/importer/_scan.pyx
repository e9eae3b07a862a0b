# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The fast path of pass 1: trace events straight from JSON bytes into columns, without Python objects.

``Scanner.scan(buf, pos)`` reads whole elements of the ``traceEvents`` array from ``buf[pos:]`` and writes the
columns ``insight.importer.events`` would have made of them (the same integers, the same string codes):
``X`` slices, flow ends (``s``/``f``/``t``) and ``[memory]`` instants. Metadata and every other kind of event
are left to Python as byte spans (few). It is *sound, not complete*: anything it does not handle exactly as
the orjson path does -- a syntax error, a ``\\u`` escape, a float where an integer arg is expected, a value of an
unusual type, our own exporter's args, an ``X`` without ``dur`` -- ends the batch before that element, and the
caller parses from there with orjson as before (which also gives the error message of a malformed file). So
the columns never depend on which path read an event.

Strings (names, categories) and lanes go through small direct-mapped caches keyed by their raw bytes; a miss
calls back into Python (``intern(raw, escaped)``, ``lane(pid, tid)``), whose dictionaries are the truth.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport rint, fabs
from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, memcpy

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from "Python.h":
    ctypedef struct PyObject
    double PyOS_string_to_double(const char *s, char **endptr, PyObject *overflow_exception) except? -1.0

# scan statuses
DEF ST_END = 0        # stopped at the array's ']'
DEF ST_MORE = 1       # the buffer ends inside an element (read more)
DEF ST_SLOW = 2       # the next element is for the orjson path (or is malformed)
DEF ST_FULL = 3       # the batch's columns are full
DEF INC = -1          # (element parser) ran off the end of the buffer
DEF BAD = -2          # (element parser) not for the fast path

DEF K_ABSENT = 0
DEF K_INT = 1
DEF K_STR = 2
DEF K_NULL = 3

DEF MAX_DEPTH = 256
DEF LIMIT = 9e15      # |ts|, |dur| (us) below this are times (events.MAX_US); the orjson path refuses others

cdef double POW10[23]
POW10[:] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
            1e17, 1e18, 1e19, 1e20, 1e21, 1e22]

ctypedef const unsigned char* Buf

# the integer args read (-1 when absent): the slice columns' corr ext bytes flops, then the memory columns'
DEF N_INT_ARGS = 10
cdef const char* INT_ARGS[10]
cdef Py_ssize_t INT_ARG_LEN[10]
INT_ARGS[:] = [b"correlation", b"External id", b"bytes", b"flops", b"Addr", b"Bytes", b"Total Allocated",
               b"Total Reserved", b"Device Type", b"Device Id"]
INT_ARG_LEN[:] = [11, 11, 5, 5, 4, 5, 15, 14, 11, 9]


cdef struct Num:
    int is_int          # an integer literal of at most 18 digits
    int64_t i
    double d
    int ok              # d holds the value (always for a valid number, unless it overflowed)


cdef struct Ev:
    Py_ssize_t ph_s, ph_e
    int ph_esc
    int name_k, name_esc
    Py_ssize_t name_s, name_e
    int cat_k, cat_esc
    Py_ssize_t cat_s, cat_e
    int pid_k, tid_k
    int64_t pid_v, tid_v
    Py_ssize_t pid_s, pid_e, tid_s, tid_e
    int ts_ok, dur_ok, id_ok, bp_e, args_bad
    int64_t ts, dur, id
    # args: INT_ARGS
    int64_t arg[10]
    int x_bad           # an arg the slice columns read is not an integer literal
    int m_bad           # an arg the memory columns read is not an integer literal
    Py_ssize_t dims_s, dims_e, types_s, types_e
    int ours            # our exporter's args (op / iteration_interval_ms / shape): the orjson path


cdef inline bint _ws(unsigned char c) nogil:
    return c == 32 or c == 10 or c == 13 or c == 9


cdef inline Py_ssize_t skip_ws(Buf s, Py_ssize_t i, Py_ssize_t n) nogil:
    while i < n and _ws(s[i]):
        i += 1
    return i


cdef inline Py_ssize_t scan_string(Buf s, Py_ssize_t i, Py_ssize_t n, int* esc, int* high) nogil:
    """s[i] is '"': the index after the closing quote; ``esc`` set when it has escapes."""
    cdef unsigned char c
    cdef Py_ssize_t k
    i += 1
    while True:
        if i >= n:
            return INC
        c = s[i]
        if c == 34:  # '"'
            return i + 1
        if c == 92:  # backslash
            if i + 1 >= n:
                return INC
            c = s[i + 1]
            if c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110 or c == 114 or c == 116:
                esc[0] |= 1
                i += 2
                continue
            if c == 117:  # \uXXXX: orjson decodes it (and judges surrogates) when the string is interned
                if i + 6 > n:
                    return INC
                for k in range(i + 2, i + 6):
                    if not (48 <= s[k] <= 57 or 65 <= s[k] <= 70 or 97 <= s[k] <= 102):
                        return BAD
                esc[0] |= 2
                i += 6
                continue
            return BAD
        if c < 32:
            return BAD
        if c >= 128:
            high[0] = 1
        i += 1


cdef inline Py_ssize_t _digits(Buf s, Py_ssize_t i, Py_ssize_t n, int64_t* m, Py_ssize_t* sig, Py_ssize_t* taken,
                               int* big) noexcept nogil:
    """The digits at s[i:] (at least one: else BAD) into ``m``, at most 18 significant ones (``taken`` counts the
    digits used, ``big`` is set when some were not); the index after them (INC at the end of the buffer)."""
    if i >= n:
        return INC
    if not (48 <= s[i] <= 57):
        return BAD
    while i < n and 48 <= s[i] <= 57:
        if sig[0] < 18:
            m[0] = m[0] * 10 + (s[i] - 48)
            if m[0]:
                sig[0] += 1
            taken[0] += 1
        else:
            big[0] = 1
        i += 1
    return i if i < n else INC


cdef inline Py_ssize_t scan_number(Buf s, Py_ssize_t i, Py_ssize_t n, Num* out):
    """A JSON number at s[i] (validated by the grammar): its end; ``out`` its value."""
    cdef Py_ssize_t start = i, sig = 0, frac = 0, exp_digits = 0, exp_sig = 0
    cdef int neg = 0, is_int = 1, big = 0, exp_big = 0, neg_e = 0
    cdef int64_t m = 0, e = 0
    cdef char* end
    out.ok = 0
    out.is_int = 0
    if s[i] == 45:  # '-'
        neg = 1
        i += 1
        if i >= n:
            return INC
    if s[i] == 48:  # '0' (no leading zeros)
        i += 1
        if i >= n:
            return INC
    else:
        i = _digits(s, i, n, &m, &sig, &frac, &big)
        if i < 0:
            return i
        frac = 0
    if s[i] == 46:  # '.'
        is_int = 0
        i = _digits(s, i + 1, n, &m, &sig, &frac, &big)
        if i < 0:
            return i
    if s[i] == 101 or s[i] == 69:  # e E
        is_int = 0
        i += 1
        if i < n and (s[i] == 43 or s[i] == 45):
            neg_e = s[i] == 45
            i += 1
        i = _digits(s, i, n, &e, &exp_sig, &exp_digits, &exp_big)
        if i < 0:
            return i
        if exp_big:
            e = 100000
        if neg_e:
            e = -e
    if is_int:
        if big:
            return i  # more than 18 digits: valid JSON, not a value for the fast path
        out.is_int = 1
        out.i = -m if neg else m
        out.d = <double>out.i
        out.ok = 1
        return i
    # Clinger's fast path: m < 2**53 and |exponent| <= 22 make one correctly rounded operation
    e -= frac
    if not big and sig <= 15 and -22 <= e <= 22:
        out.d = (<double>m) / POW10[-e] if e < 0 else (<double>m) * POW10[e]
        if neg:
            out.d = -out.d
        out.ok = 1
        return i
    out.d = PyOS_string_to_double(<const char*>s + start, &end, NULL)
    if end != <char*>s + i:
        return BAD
    out.ok = 1
    return i


cdef Py_ssize_t skip_value(Buf s, Py_ssize_t i, Py_ssize_t n, int depth, int* high):
    """Validate and skip one JSON value at s[i]."""
    cdef unsigned char c
    cdef int esc = 0
    cdef Num num
    if i >= n:
        return INC
    c = s[i]
    if c == 34:
        return scan_string(s, i, n, &esc, high)
    if c == 45 or 48 <= c <= 57:
        return scan_number(s, i, n, &num)
    if c == 123 or c == 91:  # { [
        if depth >= MAX_DEPTH:
            return BAD
        return skip_container(s, i, n, depth + 1, high)
    if c == 116:
        return _literal(s, i, n, b"true", 4)
    if c == 102:
        return _literal(s, i, n, b"false", 5)
    if c == 110:
        return _literal(s, i, n, b"null", 4)
    return BAD


cdef inline Py_ssize_t _literal(Buf s, Py_ssize_t i, Py_ssize_t n, const char* word, Py_ssize_t k):
    cdef Py_ssize_t j
    for j in range(k):
        if i + j >= n:
            return INC
        if s[i + j] != <unsigned char>word[j]:
            return BAD
    return i + k


cdef Py_ssize_t skip_container(Buf s, Py_ssize_t i, Py_ssize_t n, int depth, int* high):
    cdef int is_obj = s[i] == 123
    cdef unsigned char close = 125 if is_obj else 93
    cdef Py_ssize_t ks, ke
    cdef bint last = 0
    i = skip_ws(s, i + 1, n)
    if i >= n:
        return INC
    if s[i] == close:
        return i + 1
    while True:
        if is_obj:
            i = member_key(s, i, n, &ks, &ke, high, 1)
            if i < 0:
                return i
        i = member_end(s, skip_value(s, i, n, depth, high), n, &last, close)
        if i < 0 or last:
            return i


cdef inline bint key_is(Buf s, Py_ssize_t a, Py_ssize_t b, const char* k, Py_ssize_t kn) nogil:
    return b - a == kn and memcmp(s + a, k, kn) == 0


cdef inline int to_ns(Num* v, int64_t* out):
    """Microseconds -> ns the way events._ns does it (ints exactly, floats rint(x * 1000))."""
    if not v.ok:
        return 0
    if v.is_int:
        if v.i >= LIMIT or v.i <= -LIMIT:
            return 0
        out[0] = v.i * 1000
        return 1
    if not (fabs(v.d) < LIMIT):
        return 0
    out[0] = <int64_t>rint(v.d * 1000.0)
    return 1


cdef Py_ssize_t parse_int_arg(Buf s, Py_ssize_t i, Py_ssize_t n, int64_t* out, int* bad, int* high):
    """An integer arg: its value, or ``bad`` when it is anything but an integer literal (then the orjson
    path decides what it means)."""
    cdef Num num
    if i >= n:
        return INC
    if s[i] == 45 or 48 <= s[i] <= 57:
        i = scan_number(s, i, n, &num)
        if i >= 0:
            if num.is_int:
                out[0] = num.i
            else:
                bad[0] = 1
        return i
    bad[0] = 1
    return skip_value(s, i, n, 1, high)


cdef inline void reset_args(Ev* ev) noexcept nogil:
    cdef int a
    for a in range(N_INT_ARGS):
        ev.arg[a] = -1
    ev.x_bad = ev.m_bad = ev.ours = 0
    ev.dims_s = ev.types_s = -1


cdef inline Py_ssize_t raw_string(Buf s, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* a, Py_ssize_t* b, int* esc,
                                  int* high):
    """s[i] is '"': the index after the string; its raw bytes (between the quotes) are s[a:b]."""
    esc[0] = 0
    a[0] = i + 1
    i = scan_string(s, i, n, esc, high)
    if i >= 0:
        b[0] = i - 1
    return i


cdef inline Py_ssize_t member_key(Buf s, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* ks, Py_ssize_t* ke, int* high,
                                  bint escapes=0):
    """At an object member: the raw span of its key (with escapes: BAD unless ``escapes``) and the index of its
    value."""
    cdef int esc = 0
    if s[i] != 34:
        return BAD
    i = raw_string(s, i, n, ks, ke, &esc, high)
    if i < 0 or (esc and not escapes):
        return i if i < 0 else BAD
    i = skip_ws(s, i, n)
    if i >= n:
        return INC
    if s[i] != 58:  # ':'
        return BAD
    i = skip_ws(s, i + 1, n)
    if i >= n:
        return INC
    return i


cdef inline Py_ssize_t member_end(Buf s, Py_ssize_t i, Py_ssize_t n, bint* last, unsigned char close=125) nogil:
    """After a member's value: the index of the next member, or (``last``) the index after the object (or the
    array: ``close``); a negative ``i`` (INC, BAD from the value) is passed on."""
    if i < 0:
        return i
    i = skip_ws(s, i, n)
    if i >= n:
        return INC
    if s[i] == close:
        last[0] = 1
        return i + 1
    if s[i] != 44:
        return BAD
    i = skip_ws(s, i + 1, n)
    if i >= n:
        return INC
    return i


cdef Py_ssize_t parse_args(Buf s, Py_ssize_t i, Py_ssize_t n, Ev* ev, int* high):
    cdef Py_ssize_t ks, ke
    cdef int a
    cdef bint last = 0
    reset_args(ev)
    i = skip_ws(s, i + 1, n)
    if i >= n:
        return INC
    if s[i] == 125:
        return i + 1
    while True:
        i = member_key(s, i, n, &ks, &ke, high)
        if i < 0:
            return i
        a = 0
        while a < N_INT_ARGS and not key_is(s, ks, ke, INT_ARGS[a], INT_ARG_LEN[a]):
            a += 1
        if a < N_INT_ARGS:  # the first 4 are read by the slice columns, the others by the memory columns
            i = parse_int_arg(s, i, n, &ev.arg[a], &ev.x_bad if a < 4 else &ev.m_bad, high)
        elif key_is(s, ks, ke, b"Input Dims", 10):
            ev.dims_s = i
            i = skip_value(s, i, n, 1, high)
            ev.dims_e = i
        elif key_is(s, ks, ke, b"Input type", 10):
            ev.types_s = i
            i = skip_value(s, i, n, 1, high)
            ev.types_e = i
        else:
            if key_is(s, ks, ke, b"op", 2) or key_is(s, ks, ke, b"shape", 5) or \
                    key_is(s, ks, ke, b"iteration_interval_ms", 21):
                ev.ours = 1
            i = skip_value(s, i, n, 1, high)
        i = member_end(s, i, n, &last)
        if i < 0 or last:
            return i


cdef Py_ssize_t parse_id(Buf s, Py_ssize_t i, Py_ssize_t n, int* kind, int64_t* v, Py_ssize_t* a,
                         Py_ssize_t* b, int* high):
    """pid / tid: an integer, a string without escapes, or null."""
    cdef int esc = 0
    cdef Num num
    if i >= n:
        return INC
    if s[i] == 34:
        i = raw_string(s, i, n, a, b, &esc, high)
        kind[0] = K_STR
        return BAD if i >= 0 and esc else i
    if s[i] == 45 or 48 <= s[i] <= 57:
        i = scan_number(s, i, n, &num)
        if i < 0:
            return i
        if not num.is_int:
            return BAD
        v[0] = num.i
        kind[0] = K_INT
        return i
    if s[i] == 110:
        kind[0] = K_NULL
        return _literal(s, i, n, b"null", 4)
    return BAD


cdef Py_ssize_t parse_str(Buf s, Py_ssize_t i, Py_ssize_t n, int* kind, int* esc, Py_ssize_t* a,
                          Py_ssize_t* b, int* high):
    """name / cat: a string (raw span between the quotes) or null."""
    if i >= n:
        return INC
    if s[i] == 34:
        kind[0] = K_STR
        return raw_string(s, i, n, a, b, esc, high)
    if s[i] == 110:
        kind[0] = K_NULL
        return _literal(s, i, n, b"null", 4)
    return BAD


cdef Py_ssize_t parse_event(Buf s, Py_ssize_t i, Py_ssize_t n, Ev* ev, int* high):
    """One element at s[i]: the index after it, INC or BAD."""
    cdef Py_ssize_t ks, ke
    cdef int esc = 0
    cdef bint last = 0
    cdef Num num
    ev.ph_s = -1
    ev.name_k = ev.cat_k = ev.pid_k = ev.tid_k = K_ABSENT
    ev.ts_ok = ev.dur_ok = ev.id_ok = ev.bp_e = ev.args_bad = 0
    reset_args(ev)
    if s[i] != 123:
        return BAD
    i = skip_ws(s, i + 1, n)
    if i >= n:
        return INC
    if s[i] == 125:
        return BAD  # {} has no ph
    while True:
        i = member_key(s, i, n, &ks, &ke, high)
        if i < 0:
            return i
        if key_is(s, ks, ke, b"ph", 2):
            if s[i] != 34:
                return BAD
            i = raw_string(s, i, n, &ev.ph_s, &ev.ph_e, &esc, high)
            if esc and i >= 0:
                return BAD
        elif key_is(s, ks, ke, b"ts", 2) or key_is(s, ks, ke, b"dur", 3):
            if not (s[i] == 45 or 48 <= s[i] <= 57):
                return BAD
            i = scan_number(s, i, n, &num)
            if i >= 0:
                if ke - ks == 2:
                    ev.ts_ok = to_ns(&num, &ev.ts)
                else:
                    ev.dur_ok = to_ns(&num, &ev.dur)
                if not (ev.ts_ok if ke - ks == 2 else ev.dur_ok):
                    return BAD
        elif key_is(s, ks, ke, b"name", 4):
            i = parse_str(s, i, n, &ev.name_k, &ev.name_esc, &ev.name_s, &ev.name_e, high)
        elif key_is(s, ks, ke, b"cat", 3):
            i = parse_str(s, i, n, &ev.cat_k, &ev.cat_esc, &ev.cat_s, &ev.cat_e, high)
        elif key_is(s, ks, ke, b"pid", 3):
            i = parse_id(s, i, n, &ev.pid_k, &ev.pid_v, &ev.pid_s, &ev.pid_e, high)
        elif key_is(s, ks, ke, b"tid", 3):
            i = parse_id(s, i, n, &ev.tid_k, &ev.tid_v, &ev.tid_s, &ev.tid_e, high)
        elif key_is(s, ks, ke, b"id", 2):
            if not (s[i] == 45 or 48 <= s[i] <= 57):
                return BAD
            i = scan_number(s, i, n, &num)
            if i >= 0:
                if not num.is_int:
                    return BAD
                ev.id = num.i
                ev.id_ok = 1
        elif key_is(s, ks, ke, b"bp", 2):
            ev.bp_e = s[i] == 34 and i + 2 < n and s[i + 1] == 101 and s[i + 2] == 34
            i = skip_value(s, i, n, 1, high)
        elif key_is(s, ks, ke, b"args", 4):
            if s[i] == 123:
                i = parse_args(s, i, n, ev, high)
            else:  # null, or a value of another type: no args (as events._args)
                i = skip_value(s, i, n, 1, high)
                reset_args(ev)
        elif key_is(s, ks, ke, b"id2", 3) or key_is(s, ks, ke, b"bind_id", 7):
            return BAD
        else:
            i = skip_value(s, i, n, 1, high)
        i = member_end(s, i, n, &last)
        if i < 0 or last:
            return i


cdef inline uint64_t span_hash(Buf p, Py_ssize_t n) noexcept nogil:
    """A fast hash of n bytes, 8 at a time (a cache key: collisions only cost a miss, keys are compared)."""
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL ^ <uint64_t>n, w
    cdef Py_ssize_t j = 0
    while j + 8 <= n:
        memcpy(&w, p + j, 8)
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL
        h ^= h >> 29
        j += 8
    w = 0
    memcpy(&w, p + j, n - j)
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL
    return h ^ (h >> 32)


cdef inline bint same(object kept, Buf p, Py_ssize_t n):
    return PyBytes_GET_SIZE(kept) == n and memcmp(PyBytes_AS_STRING(kept), p, n) == 0


DEF CACHE = 8192


cdef class Scanner:
    """Fast-path columns of one trace file. ``intern(raw: bytes, escaped: bool) -> code`` (-1: not for the fast
    path), ``lane(pid, tid) -> code``, ``described(dims: bytes, types: bytes | None) -> (shape, dtype)``."""
    cdef public object intern, lane, described
    cdef public Py_ssize_t cap
    cdef public object x, fl, mem, other
    cdef int64_t[:, ::1] X, F, M, O
    cdef uint64_t s_hash[CACHE]
    cdef int64_t s_code[CACHE]
    cdef list s_keep
    cdef int64_t l_key[1024][4]
    cdef int64_t l_code[1024]
    cdef uint64_t d_hash[CACHE]
    cdef int64_t d_code[CACHE][2]
    cdef list d_keep

    def __init__(self, intern, lane, described, Py_ssize_t cap=16384):
        self.intern, self.lane, self.described, self.cap = intern, lane, described, cap
        # rows: X -> ts dur name cat lane corr ext bytes flops shape dtype; F -> ph cat id lane ts bp;
        # M -> ts lane addr bytes allocated reserved dev_type dev_id; O -> start end index
        self.x = np.empty((11, cap), np.int64)
        self.fl = np.empty((6, cap), np.int64)
        self.mem = np.empty((8, cap), np.int64)
        self.other = np.empty((3, cap), np.int64)
        self.X, self.F, self.M, self.O = self.x, self.fl, self.mem, self.other
        self.s_keep = [None] * CACHE
        self.d_keep = [None] * CACHE
        cdef int k
        for k in range(CACHE):
            self.s_hash[k] = self.d_hash[k] = 0
            self.s_code[k] = self.d_code[k][0] = -1
        for k in range(1024):
            self.l_code[k] = -1

    cdef int64_t code(self, bytes buf, Buf s, Py_ssize_t a, Py_ssize_t b, int esc) except -2:
        """The interned code of the raw string s[a:b] (-1: not for the fast path)."""
        cdef uint64_t h = span_hash(s + a, b - a)
        cdef Py_ssize_t slot = h & (CACHE - 1)
        cdef int64_t c
        if self.s_hash[slot] == h and self.s_code[slot] >= 0 and same(self.s_keep[slot], s + a, b - a):
            return self.s_code[slot]
        raw = PyBytes_FromStringAndSize(<const char*>s + a, b - a)
        c = self.intern(raw, bool(esc))
        if c >= 0:
            self.s_hash[slot] = h
            self.s_code[slot] = c
            self.s_keep[slot] = raw
        return c

    cdef int shape_codes(self, Buf s, Ev* ev, int64_t* out) except -1:
        """The shape and dtype codes of Kineto's ``Input Dims`` / ``Input type`` (raw JSON spans), cached."""
        cdef Py_ssize_t nd = ev.dims_e - ev.dims_s, nt = ev.types_e - ev.types_s
        cdef uint64_t h = span_hash(s + ev.dims_s, nd) * 31 + (span_hash(s + ev.types_s, nt) if ev.types_s >= 0 else 7)
        cdef Py_ssize_t slot = h & (CACHE - 1)
        cdef object kept
        if self.d_hash[slot] == h and self.d_code[slot][0] >= 0:
            kept = self.d_keep[slot]
            if same(kept[0], s + ev.dims_s, nd) and (
                    kept[1] is None if ev.types_s < 0 else kept[1] is not None and same(kept[1], s + ev.types_s, nt)):
                out[0], out[1] = self.d_code[slot][0], self.d_code[slot][1]
                return 0
        dims = PyBytes_FromStringAndSize(<const char*>s + ev.dims_s, nd)
        types = PyBytes_FromStringAndSize(<const char*>s + ev.types_s, nt) if ev.types_s >= 0 else None
        shape, dtype = self.described(dims, types)
        out[0], out[1] = shape, dtype
        if shape >= 0:
            self.d_hash[slot] = h
            self.d_code[slot][0], self.d_code[slot][1] = shape, dtype
            self.d_keep[slot] = (dims, types)
        return 0

    cdef object ident(self, Buf s, int kind, int64_t v, Py_ssize_t a, Py_ssize_t b):
        if kind == K_INT:
            return v
        if kind == K_STR:
            return PyUnicode_DecodeUTF8(<const char*>s + a, b - a, "strict")
        return None

    cdef int64_t lane_code(self, Buf s, Ev* ev) except -2:
        cdef Py_ssize_t slot
        cdef int64_t c
        if ev.pid_k != K_STR and ev.tid_k != K_STR:
            if ev.pid_k != K_INT:
                ev.pid_v = 0
            if ev.tid_k != K_INT:
                ev.tid_v = 0
            slot = <Py_ssize_t>((<uint64_t>ev.pid_v * 31 + <uint64_t>ev.tid_v * 7 + ev.pid_k * 3 + ev.tid_k) & 1023)
            if self.l_code[slot] >= 0 and self.l_key[slot][0] == ev.pid_k and self.l_key[slot][1] == ev.pid_v \
                    and self.l_key[slot][2] == ev.tid_k and self.l_key[slot][3] == ev.tid_v:
                return self.l_code[slot]
            c = self.lane(self.ident(s, ev.pid_k, ev.pid_v, 0, 0), self.ident(s, ev.tid_k, ev.tid_v, 0, 0))
            self.l_key[slot][0], self.l_key[slot][1] = ev.pid_k, ev.pid_v
            self.l_key[slot][2], self.l_key[slot][3] = ev.tid_k, ev.tid_v
            self.l_code[slot] = c
            return c
        try:
            return self.lane(self.ident(s, ev.pid_k, ev.pid_v, ev.pid_s, ev.pid_e),
                             self.ident(s, ev.tid_k, ev.tid_v, ev.tid_s, ev.tid_e))
        except UnicodeDecodeError:
            return -1

    def scan(self, bytes buf, Py_ssize_t pos):
        """Scan whole elements from ``buf[pos:]`` (at an element's first byte).

        Returns ``(status, end, fast, nx, nf, nm, no, n)`` for the first ``n`` elements, which end at
        ``buf[end - 1]``: a run of elements either all for the fast path (``fast``: the columns ``x[:, :nx]``,
        ``fl[:, :nf]``, ``mem[:, :nm]`` and the spans ``other[:, :no]`` hold them) or all for orjson (valid
        JSON as far as this scanner checks). ``n`` is 0 when the next element is malformed (status ST_SLOW)
        or the buffer ends inside it (ST_MORE)."""
        cdef Buf s = <Buf>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t i = pos, j, end = pos, cap = self.cap
        cdef Py_ssize_t nx = 0, nf = 0, nm = 0, no = 0, k = 0
        cdef int status = ST_MORE, high = 0, high_ev, fast, mode = -1
        cdef unsigned char p
        cdef int64_t name, cat, ln
        cdef int64_t sd[2]
        cdef Ev ev
        while True:
            if nx >= cap or nf >= cap or nm >= cap or no >= cap or k >= cap:
                status = ST_FULL
                break
            high_ev = 0
            j = parse_event(s, i, n, &ev, &high_ev)
            if j == INC:
                status = ST_MORE
                break
            fast = j >= 0 and fastable(s, &ev)
            if not fast and j == BAD:  # (a value of a type the fast path leaves to orjson, or a syntax error)
                high_ev = 0
                j = skip_value(s, i, n, 0, &high_ev)
                if j == INC:
                    status = ST_MORE
                    break
                if j == BAD:
                    status = ST_SLOW
                    break
            if mode < 0:
                mode = fast
            elif mode != fast:
                status = ST_SLOW
                break
            if fast:
                p = s[ev.ph_s]
                if p == 88:  # X
                    name = 0 if ev.name_k != K_STR else self.code(buf, s, ev.name_s, ev.name_e, ev.name_esc)
                    cat = 0 if ev.cat_k != K_STR else self.code(buf, s, ev.cat_s, ev.cat_e, ev.cat_esc)
                    ln = self.lane_code(s, &ev)
                    if name < 0 or cat < 0 or ln < 0:
                        status = ST_SLOW
                        break
                    if ev.dims_s >= 0:
                        self.shape_codes(s, &ev, sd)
                        if sd[0] < 0:
                            status = ST_SLOW
                            break
                        self.X[9, nx] = sd[0]
                        self.X[10, nx] = sd[1]
                    else:
                        self.X[9, nx] = 0
                        self.X[10, nx] = 0
                    self.X[0, nx] = ev.ts
                    self.X[1, nx] = ev.dur
                    self.X[2, nx] = name
                    self.X[3, nx] = cat
                    self.X[4, nx] = ln
                    self.X[5, nx] = ev.arg[0]
                    self.X[6, nx] = ev.arg[1]
                    self.X[7, nx] = ev.arg[2]
                    self.X[8, nx] = ev.arg[3]
                    nx += 1
                elif p == 115 or p == 102 or p == 116:  # s f t
                    cat = 0 if ev.cat_k != K_STR else self.code(buf, s, ev.cat_s, ev.cat_e, ev.cat_esc)
                    ln = self.lane_code(s, &ev)
                    if cat < 0 or ln < 0:
                        status = ST_SLOW
                        break
                    self.F[0, nf] = 115 if p == 115 else 102
                    self.F[1, nf] = cat
                    self.F[2, nf] = ev.id
                    self.F[3, nf] = ln
                    self.F[4, nf] = ev.ts
                    self.F[5, nf] = ev.bp_e
                    nf += 1
                elif is_memory(s, &ev):
                    ln = self.lane_code(s, &ev)
                    if ln < 0:
                        status = ST_SLOW
                        break
                    self.M[0, nm] = ev.ts
                    self.M[1, nm] = ln
                    self.M[2, nm] = ev.arg[4]
                    self.M[3, nm] = ev.arg[5]
                    self.M[4, nm] = ev.arg[6]
                    self.M[5, nm] = ev.arg[7]
                    self.M[6, nm] = ev.arg[8]
                    self.M[7, nm] = ev.arg[9]
                    nm += 1
                else:  # metadata, other instants, B / E, counters, ...: Python
                    self.O[0, no] = i
                    self.O[1, no] = j
                    self.O[2, no] = k
                    no += 1
            high |= high_ev
            k += 1
            end = j
            # the separator: ',' and the next element, or the array's ']'
            i = skip_ws(s, j, n)
            if i >= n:
                status = ST_MORE
                break
            if s[i] == 93:
                status = ST_END
                break
            if s[i] != 44:
                status = ST_SLOW
                break
            i = skip_ws(s, i + 1, n)
            if i >= n:
                status = ST_MORE
                break
        if high and k and mode == 1:
            # non-ASCII bytes somewhere in these elements: they must be valid UTF-8 (as orjson demands)
            try:
                PyUnicode_DecodeUTF8(<const char*>s + pos, end - pos, "strict")
            except UnicodeDecodeError:
                return ST_SLOW, pos, 0, 0, 0, 0, 0, 0
        return status, end, mode == 1, nx, nf, nm, no, k


cdef inline bint is_memory(Buf s, Ev* ev):
    return (s[ev.ph_s] == 105 or s[ev.ph_s] == 73) and ev.name_k == K_STR and not ev.name_esc and \
        key_is(s, ev.name_s, ev.name_e, b"[memory]", 8)


cdef bint fastable(Buf s, Ev* ev):
    """Does the fast path make of this parsed element exactly what the orjson path makes of it?"""
    cdef unsigned char p
    if ev.ph_s < 0 or ev.ph_e - ev.ph_s != 1:
        return False
    p = s[ev.ph_s]
    if p == 88:  # X
        return ev.ts_ok and ev.dur_ok and not ev.x_bad and not ev.ours
    if p == 115 or p == 102 or p == 116:
        return ev.ts_ok and ev.id_ok
    if is_memory(s, ev):
        return ev.ts_ok and not ev.m_bad
    return True
