# distutils: define_macros=NPY_TARGET_VERSION=NPY_1_22_API_VERSION
"""The runtime's host-memory cache: a numpy allocation handler (``PyDataMem_Handler``) whose large blocks
are recycled instead of being returned to the system (``_host_memory.h``). ``runtime.host_memory`` holds the
policy (where it is on, the limit); this module is the mechanism."""
from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport uint64_t

cimport numpy as cnp

cnp.import_array()


cdef extern from "_host_memory.h" nogil:
    size_t HM_MIN
    int hm_count
    size_t hm_bytes
    size_t hm_limit
    uint64_t hm_hits, hm_misses, hm_evicted
    void *hm_handler_ptr "(&hm_handler)"
    size_t hm_release()
    void hm_set_limit(size_t limit)
    int hm_init()


if hm_init() != 0:
    raise RuntimeError("runtime._host_memory: pthread_atfork failed")
NAME = "insight_host_cache"
MIN_BYTES = HM_MIN
_capsule = PyCapsule_New(hm_handler_ptr, "mem_handler", NULL)


def install():
    """Make the cache numpy's allocator in the calling thread's context; returns the handler it replaces
    (give it to ``restore``)."""
    return cnp.PyDataMem_SetHandler(_capsule)


def restore(old):
    cnp.PyDataMem_SetHandler(old)


def set_limit(size_t limit):
    """At most ``limit`` bytes stay cached (0: none); the oldest blocks beyond it are freed now."""
    hm_set_limit(limit)


def release():
    """Free every cached block; returns the bytes released."""
    return hm_release()


def stats():
    """hits / misses (blocks of at least MIN_BYTES handed out from the cache / from malloc), evicted,
    cached blocks and bytes, limit."""
    return {"hits": hm_hits, "misses": hm_misses, "evicted": hm_evicted, "blocks": hm_count,
            "bytes": hm_bytes, "limit": hm_limit}
