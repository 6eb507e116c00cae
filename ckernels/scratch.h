/* Per-thread scratch buffers kept between calls.
 *
 * The launcher calls each kernel once per task of a few groups, thousands of times per
 * training step, from a persistent pool of threads. A fresh malloc of a 100-256 KB work
 * array per call is served by mmap (glibc's threshold starts at 128 KB), so every call paid
 * page faults and the kernel's zeroing of the pages (perf of a SmolLM2 DKM step: clear_page
 * 11% of it at commit d241f77, 5% with these buffers; the rest is torch's). Each buffer here belongs to one thread
 * (_Thread_local), grows when a call needs more and is released at the end of a call only
 * when it exceeds SCRATCH_KEEP_BYTES. A thread that exits leaks its buffers (at most
 * SCRATCH_KEEP_BYTES each); the launcher's threads live as long as the process. */
#ifndef EDKM_SCRATCH_H
#define EDKM_SCRATCH_H

#include <stdlib.h>
#include <string.h>

#define SCRATCH_KEEP_BYTES ((size_t)8 << 20)

typedef struct {
    void* ptr;
    size_t cap;
} Buf;

/* At least `bytes` of b (contents undefined), or NULL when malloc fails. With `zeroed`,
 * a newly allocated buffer is zero-filled (callers that need zeros keep them zero). */
static inline void* buf_get(Buf* b, size_t bytes, int zeroed) {
    if (b->cap < bytes || !b->ptr) {
        free(b->ptr);
        b->ptr = zeroed ? calloc(bytes ? bytes : 1, 1) : malloc(bytes ? bytes : 1);
        b->cap = b->ptr ? bytes : 0;
    }
    return b->ptr;
}

/* End of a call: drop b if it grew past SCRATCH_KEEP_BYTES. */
static inline void buf_trim(Buf* b) {
    if (b->cap > SCRATCH_KEEP_BYTES) {
        free(b->ptr);
        b->ptr = NULL;
        b->cap = 0;
    }
}

#endif
