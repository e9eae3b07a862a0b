/* A caching allocator for the host memory of numpy arrays made while the runtime runs a step
 * (runtime/_host_memory.pyx, numpy's PyDataMem_Handler API).
 *
 * A block of HM_MIN bytes or more that numpy frees is kept, by its size rounded up to whole pages, and
 * handed out again for the next array of that size class: the step's temporaries reuse pages that are
 * already mapped instead of costing a page fault (and the kernel zeroing the page) per 4 KB on every
 * step. Smaller blocks go straight to malloc/free. The cache keeps at most hm_limit bytes; a block that
 * does not fit evicts the oldest ones (FIFO), and one larger than the limit is freed at once.
 *
 * Invariant: every live block numpy asked HM_MIN bytes or more for has a capacity of at least its
 * size class, whichever of malloc, the cache or realloc gave it, so it can be cached under that class
 * when numpy frees it (numpy passes the size it asked for).
 */
#ifndef INSIGHT_HOST_MEMORY_H
#define INSIGHT_HOST_MEMORY_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <numpy/ndarraytypes.h>

#define HM_MIN ((size_t)64 * 1024)
#define HM_PAGE ((size_t)4096)
#define HM_SLOTS 2048

typedef struct {
    void *ptr;
    size_t size;
} hm_block;

static hm_block hm_cache[HM_SLOTS];
static int hm_count = 0;
static size_t hm_bytes = 0;
static size_t hm_limit = (size_t)1 << 30;
static uint64_t hm_hits = 0, hm_misses = 0, hm_evicted = 0;
static pthread_mutex_t hm_lock = PTHREAD_MUTEX_INITIALIZER;

static inline size_t hm_class(size_t n) { return (n + HM_PAGE - 1) & ~(HM_PAGE - 1); }

/* the most recently freed block of this class (its pages are the likeliest to be in cache), or NULL */
static void *hm_take(size_t cls) {
    void *p = NULL;
    pthread_mutex_lock(&hm_lock);
    for (int i = hm_count - 1; i >= 0; i--) {
        if (hm_cache[i].size == cls) {
            p = hm_cache[i].ptr;
            memmove(&hm_cache[i], &hm_cache[i + 1], (size_t)(hm_count - 1 - i) * sizeof(hm_block));
            hm_count--;
            hm_bytes -= cls;
            break;
        }
    }
    if (p) hm_hits++; else hm_misses++;
    pthread_mutex_unlock(&hm_lock);
    return p;
}

/* with the lock held: drop the oldest blocks until `incoming` more bytes fit under `limit` (and, with
 * `need_slot`, a slot is free for them); their pointers go to `evict`, to be freed once the lock is
 * released. Returns how many were dropped. */
static int hm_drop_oldest(size_t incoming, size_t limit, int need_slot, void **evict) {
    int drop = 0;
    while (drop < hm_count && (hm_bytes + incoming > limit || (need_slot && hm_count - drop >= HM_SLOTS))) {
        hm_bytes -= hm_cache[drop].size;
        evict[drop] = hm_cache[drop].ptr;
        drop++;
    }
    if (drop) {
        memmove(&hm_cache[0], &hm_cache[drop], (size_t)(hm_count - drop) * sizeof(hm_block));
        hm_count -= drop;
    }
    return drop;
}

static void hm_free_all(void **blocks, int n) {
    for (int i = 0; i < n; i++) free(blocks[i]);
}

static void hm_put(void *p, size_t cls) {
    void *evict[HM_SLOTS];
    int n_evict;
    pthread_mutex_lock(&hm_lock);
    if (cls > hm_limit) {
        evict[0] = p;
        n_evict = 1;
    } else {
        n_evict = hm_drop_oldest(cls, hm_limit, 1, evict);
        hm_cache[hm_count].ptr = p;
        hm_cache[hm_count].size = cls;
        hm_count++;
        hm_bytes += cls;
    }
    hm_evicted += (uint64_t)n_evict;
    pthread_mutex_unlock(&hm_lock);
    hm_free_all(evict, n_evict);   /* outside the lock */
}

static void *hm_malloc(void *ctx, size_t n) {
    (void)ctx;
    if (n < HM_MIN) return malloc(n);
    size_t cls = hm_class(n);
    void *p = hm_take(cls);
    return p ? p : malloc(cls);
}

static void *hm_calloc(void *ctx, size_t nelem, size_t elsize) {
    (void)ctx;
    if (elsize && nelem > SIZE_MAX / elsize) return NULL;
    size_t n = nelem * elsize;
    if (n < HM_MIN) return calloc(nelem, elsize);
    size_t cls = hm_class(n);
    void *p = hm_take(cls);
    if (p) {
        memset(p, 0, n);
        return p;
    }
    return calloc(cls, 1);
}

static void *hm_realloc(void *ctx, void *ptr, size_t n) {
    (void)ctx;
    return realloc(ptr, n < HM_MIN ? n : hm_class(n));
}

static void hm_free(void *ctx, void *p, size_t n) {
    (void)ctx;
    if (p == NULL) return;
    if (n < HM_MIN) {
        free(p);
        return;
    }
    hm_put(p, hm_class(n));
}

/* free every cached block; returns the bytes released */
static size_t hm_release(void) {
    void *blocks[HM_SLOTS];
    pthread_mutex_lock(&hm_lock);
    size_t bytes = hm_bytes;
    int n = hm_drop_oldest(0, 0, 0, blocks);
    pthread_mutex_unlock(&hm_lock);
    hm_free_all(blocks, n);
    return bytes;
}

/* a new limit; the oldest cached blocks beyond it are freed */
static void hm_set_limit(size_t limit) {
    void *evict[HM_SLOTS];
    pthread_mutex_lock(&hm_lock);
    hm_limit = limit;
    int n_evict = hm_drop_oldest(0, limit, 0, evict);
    hm_evicted += (uint64_t)n_evict;
    pthread_mutex_unlock(&hm_lock);
    hm_free_all(evict, n_evict);
}

/* a fork in another thread while one holds the lock would leave the child's copy locked for good */
static void hm_lock_all(void) { pthread_mutex_lock(&hm_lock); }
static void hm_unlock_all(void) { pthread_mutex_unlock(&hm_lock); }
static int hm_init(void) { return pthread_atfork(hm_lock_all, hm_unlock_all, hm_unlock_all); }

/* numpy's handler record; the capsule that carries it is made once in _host_memory.pyx */
static PyDataMem_Handler hm_handler = {
    "insight_host_cache", 1, {NULL, hm_malloc, hm_calloc, hm_realloc, hm_free}};

#endif
