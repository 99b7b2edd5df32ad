/*
 * A growable byte buffer, for the lane (_lane.c: read from the front, appended at the back) and
 * the sealer (_seal.c: appended only).
 */
#ifndef SIDEGATE_BUF_H
#define SIDEGATE_BUF_H

#include <stdlib.h>
#include <string.h>

typedef struct {
    char *p;
    size_t start, end, cap; /* the bytes are p[start:end] */
} Buf;

static inline size_t buf_len(const Buf *b) { return b->end - b->start; }

/* Room for ``extra`` more bytes at the end: 0, or -1 without memory. */
static inline int buf_reserve(Buf *b, size_t extra) {
    if (b->cap - b->end >= extra)
        return 0;
    size_t used = buf_len(b);
    if (b->start && b->cap - used >= extra) {
        memmove(b->p, b->p + b->start, used);
    } else {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap - used < extra)
            cap *= 2;
        char *p = malloc(cap);
        if (!p)
            return -1;
        if (used)
            memcpy(p, b->p + b->start, used);
        free(b->p);
        b->p = p;
        b->cap = cap;
    }
    b->start = 0;
    b->end = used;
    return 0;
}

static inline int buf_append(Buf *b, const char *data, size_t n) {
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->end, data, n);
    b->end += n;
    return 0;
}

#endif
