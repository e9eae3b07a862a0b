# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Kernels of the sparse embedding path (EmbeddingLookup, FusedSparseFtrl, FusedSparseLazyAdam).

* ``unique_inverse(ids)``: the distinct ids of a batch in first-occurrence order, padded to ``len(ids)``
  with ``uid[0]``, their count, and for every id its position in the unique list. One pass, no sort:
  a position per table row when the vocabulary is small enough for that map to stay in cache, else
  an open-addressing hash table.
* ``unique_count(uid)``: the count back from a padded unique list.
* ``sparse_ftrl`` / ``sparse_lazy_adam``: in-place updates of the rows ``uid[:count]`` of a float32
  table and its optimizer slots from the summed gradient rows ``grad[:count]``; rows run in parallel
  (OpenMP, GIL released). Only the touched rows are read or written: the cost follows the unique ids,
  not the vocabulary.
"""

import numpy as np
cimport numpy as cnp
cimport openmp
from cython.parallel cimport prange
from libc.math cimport sqrtf, fabsf
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

cnp.import_array()


cdef inline int _threads(Py_ssize_t rows, Py_ssize_t D) noexcept nogil:
    cdef Py_ssize_t t
    if rows * (D + 4) < 131072 or rows < 2:  # below ~100k elements a thread team costs more than it saves
        return 1
    t = openmp.omp_get_max_threads()
    return <int>(t if t > 1 else 1)


def _ids64(ids, str fn):
    a = np.asarray(ids)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{fn}: ids must be integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{fn}: ids must be 1-d, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def unique_inverse(ids, int64_t num_rows=-1):
    """(uid int64 (n,) padded with uid[0], inv int32 (n,), count) for 1-d integer ids.

    ``num_rows >= 0`` checks every id lies in [0, num_rows) and raises IndexError naming the first
    one that does not."""
    cdef cnp.ndarray[int64_t, ndim=1] a = _ids64(ids, "unique_inverse")
    cdef Py_ssize_t n = a.shape[0], k, cap = 16, count = 0
    cdef int64_t lo, hi
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), 0
    if num_rows >= 0:
        lo, hi = a.min(), a.max()
        if lo < 0 or hi >= num_rows:
            bad = a[(a < 0) | (a >= num_rows)][0]
            raise IndexError(f"EmbeddingLookup: id {int(bad)} is outside the table of {num_rows} rows")
    cdef cnp.ndarray[int64_t, ndim=1] uid = np.empty(n, np.int64)
    cdef cnp.ndarray[int32_t, ndim=1] inv = np.empty(n, np.int32)
    if num_rows > 0 and num_rows <= max(8 * n, 1 << 21):
        count = _unique_direct(&a[0], n, num_rows, &uid[0], &inv[0])
        return uid, inv, count
    while cap < 2 * n:
        cap *= 2
    cdef int64_t *keys = <int64_t *> malloc(cap * sizeof(int64_t))
    cdef int32_t *pos = <int32_t *> malloc(cap * sizeof(int32_t))
    if keys == NULL or pos == NULL:
        free(keys)
        free(pos)
        raise MemoryError()
    cdef int64_t *ap = &a[0]
    cdef int64_t *up = &uid[0]
    cdef int32_t *ip = &inv[0]
    cdef uint64_t mask = cap - 1, h
    cdef int64_t key
    with nogil:
        for k in range(cap):
            pos[k] = -1
        for k in range(n):
            key = ap[k]
            h = (<uint64_t> key * 0x9E3779B97F4A7C15ULL) >> 17
            h = h & mask
            while pos[h] >= 0 and keys[h] != key:
                h = (h + 1) & mask
            if pos[h] < 0:
                keys[h] = key
                pos[h] = <int32_t> count
                up[count] = key
                count += 1
            ip[k] = pos[h]
        for k in range(count, n):
            up[k] = up[0]
    free(keys)
    free(pos)
    return uid, inv, count


cdef Py_ssize_t _unique_direct(int64_t *ap, Py_ssize_t n, int64_t num_rows, int64_t *up, int32_t *ip) except -1:
    """unique_inverse with a position per table row (ids checked to lie in [0, num_rows)): no hashing,
    and the map (4 bytes a row) stays in cache for vocabularies up to a few million."""
    cdef int32_t *pos = <int32_t *> malloc(num_rows * sizeof(int32_t))
    cdef Py_ssize_t k, count = 0
    cdef int64_t key
    if pos == NULL:
        raise MemoryError()
    with nogil:
        memset(pos, 0xFF, num_rows * sizeof(int32_t))  # -1 everywhere
        for k in range(n):
            key = ap[k]
            if pos[key] < 0:
                pos[key] = <int32_t> count
                up[count] = key
                count += 1
            ip[k] = pos[key]
        for k in range(count, n):
            up[k] = up[0]
    free(pos)
    return count


def member_mask(a, b):
    """mask[i] = a[i] in b, for non-negative ids (a hash set of b; the GIL is released throughout)."""
    cdef cnp.ndarray[int64_t, ndim=1] aa = _ids64(a, "member_mask")
    cdef cnp.ndarray[int64_t, ndim=1] bb = _ids64(b, "member_mask")
    cdef Py_ssize_t na = aa.shape[0], nb = bb.shape[0], k, cap = 16
    out = np.zeros(na, np.bool_)
    if na == 0 or nb == 0:
        return out
    while cap < 2 * nb:
        cap *= 2
    cdef unsigned char[::1] o = out.view(np.uint8)
    cdef int64_t *keys = <int64_t *> malloc(cap * sizeof(int64_t))
    if keys == NULL:
        raise MemoryError()
    cdef int64_t *ap = &aa[0]
    cdef int64_t *bp = &bb[0]
    cdef uint64_t mask = cap - 1, h
    cdef int64_t key
    with nogil:
        memset(keys, 0xFF, cap * sizeof(int64_t))  # -1: empty
        for k in range(nb):
            key = bp[k]
            h = ((<uint64_t> key * 0x9E3779B97F4A7C15ULL) >> 17) & mask
            while keys[h] >= 0 and keys[h] != key:
                h = (h + 1) & mask
            keys[h] = key
        for k in range(na):
            key = ap[k]
            h = ((<uint64_t> key * 0x9E3779B97F4A7C15ULL) >> 17) & mask
            while keys[h] >= 0 and keys[h] != key:
                h = (h + 1) & mask
            o[k] = keys[h] == key
    free(keys)
    return out


def unique_count(uid):
    """Number of distinct ids in a list padded with its first entry (the first k >= 1 with uid[k] == uid[0])."""
    cdef cnp.ndarray[int64_t, ndim=1] a = _ids64(uid, "unique_count")
    cdef Py_ssize_t n = a.shape[0], k
    if n == 0:
        return 0
    cdef int64_t first = a[0]
    cdef int64_t *ap = &a[0]
    with nogil:
        for k in range(1, n):
            if ap[k] == first:
                break
        else:
            k = n
    return k


def _check(var, slots, uid, grad, Py_ssize_t count, str fn):
    for name, arr in [("table", var)] + slots:
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 2 \
                or not arr.flags.c_contiguous or not arr.flags.writeable:
            raise TypeError(f"{fn}: {name} must be a writeable C-contiguous float32 (rows, dim) array, got "
                            f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', '')}")
        if arr.shape != var.shape:
            raise ValueError(f"{fn}: {name} {arr.shape} does not match the table {var.shape}")
    u = _ids64(uid, fn)
    g = np.ascontiguousarray(grad, dtype=np.float32).reshape(u.shape[0], -1)
    if g.shape[1] != var.shape[1]:
        raise ValueError(f"{fn}: gradient rows {g.shape} do not match the table {var.shape}")
    if count < 0 or count > u.shape[0]:
        raise ValueError(f"{fn}: count {count} outside [0, {u.shape[0]}]")
    if count and (u[:count].min() < 0 or u[:count].max() >= var.shape[0]):
        raise IndexError(f"{fn}: a row id is outside the table of {var.shape[0]} rows")
    return u, g


def sparse_ftrl(var, accum, linear, uid, grad, Py_ssize_t count, float lr, float l1, float l2,
                float weight_decay=0.0):
    """FTRL-proximal (lr_power -0.5) on rows uid[:count] (distinct) with gradient rows grad[:count]."""
    u, g = _check(var, [("accum", accum), ("linear", linear)], uid, grad, count, "sparse_ftrl")
    cdef float[:, ::1] w = var, acc = accum, lin = linear, gr = g
    cdef int64_t[::1] ids = u
    cdef Py_ssize_t D = w.shape[1], k, j
    cdef int64_t r
    cdef float gj, a_old, a_new, sig, l, quad
    cdef int nt = _threads(count, D)
    if count == 0:
        return None
    for k in prange(count, nogil=True, schedule='static', num_threads=nt):
        r = ids[k]
        for j in range(D):
            gj = gr[k, j] + weight_decay * w[r, j]
            a_old = acc[r, j]
            a_new = a_old + gj * gj
            sig = (sqrtf(a_new) - sqrtf(a_old)) / lr
            l = lin[r, j] + gj - sig * w[r, j]
            quad = sqrtf(a_new) / lr + <float>2.0 * l2
            acc[r, j] = a_new
            lin[r, j] = l
            if fabsf(l) > l1:
                w[r, j] = ((l1 if l > 0 else (-l1 if l < 0 else <float>0.0)) - l) / quad
            else:
                w[r, j] = <float>0.0
    return None


def sparse_lazy_adam(var, m, v, uid, grad, Py_ssize_t count, float lr_t, float beta1, float beta2, float eps,
                     float weight_decay=0.0):
    """Adam on rows uid[:count] only (LazyAdam): moments and weights of other rows are untouched.
    ``lr_t`` is the bias-corrected step size lr * sqrt(1 - beta2^t) / (1 - beta1^t)."""
    u, g = _check(var, [("moment1", m), ("moment2", v)], uid, grad, count, "sparse_lazy_adam")
    cdef float[:, ::1] w = var, m1 = m, m2 = v, gr = g
    cdef int64_t[::1] ids = u
    cdef Py_ssize_t D = w.shape[1], k, j
    cdef int64_t r
    cdef float gj, mn, vn
    cdef float c1 = <float>1.0 - beta1, c2 = <float>1.0 - beta2
    cdef int nt = _threads(count, D)
    if count == 0:
        return None
    for k in prange(count, nogil=True, schedule='static', num_threads=nt):
        r = ids[k]
        for j in range(D):
            gj = gr[k, j] + weight_decay * w[r, j]
            mn = m1[r, j] * beta1 + gj * c1
            vn = m2[r, j] * beta2 + gj * gj * c2
            m1[r, j] = mn
            m2[r, j] = vn
            w[r, j] = w[r, j] - mn / (sqrtf(vn) + eps) * lr_t
    return None


def gather_rows(table, uid, Py_ssize_t count):
    """out (n, dim) float32: out[k] = table[uid[k]] for k < count, zeros after (the padding)."""
    if not isinstance(table, np.ndarray) or table.dtype != np.float32 or table.ndim != 2 \
            or not table.flags.c_contiguous:
        raise TypeError("gather_rows: table must be a C-contiguous float32 (rows, dim) array")
    u = _ids64(uid, "gather_rows")
    cdef float[:, ::1] t = table
    cdef int64_t[::1] ids = u
    cdef Py_ssize_t n = u.shape[0], D = table.shape[1], k, j
    out = np.zeros((n, D), np.float32)
    cdef float[:, ::1] o = out
    cdef int nt = _threads(count, D)
    if count == 0:
        return out
    for k in prange(count, nogil=True, schedule='static', num_threads=nt):
        for j in range(D):
            o[k, j] = t[ids[k], j]
    return out
