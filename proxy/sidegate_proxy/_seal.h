/*
 * Sealing audit records in C: audit.Chain.seal_run's lines for the runs the native lane saw, so
 * the Python thread does not build, serialise and hash each statement's record (see _seal.c).
 */
#ifndef SIDEGATE_SEAL_H
#define SIDEGATE_SEAL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_buf.h"

/* Where a chain stands: read from a Python audit.Chain, advanced here, written back. */
typedef struct {
    char *uid_prefix; /* the JSON string '"<chain_id>:' (escaped, opening quote included) */
    size_t uid_len;
    long long seq;
    char last_hash[65];
} SealChain;

/* One statement run, as the lane reports it. */
typedef struct {
    double wall, seconds;
    long long rows;       /* -1: none */
    const char *sqlstate; /* "": none */
    const char *query;    /* a simple query's string, or NULL */
    size_t query_len;
} SealRun;

extern PyTypeObject SealerType;

int seal_module_init(PyObject *module);
/* 0, or -1 with an exception set (the chain's fields are not what Chain has). */
int seal_chain_read(PyObject *chain, SealChain *c);
int seal_chain_write(PyObject *chain, const SealChain *c);
void seal_chain_free(SealChain *c);
/* 1: the run's line is appended to ``out`` (sealed lines, one after another) and the chain advanced; 0: it has no line here (the
 * Python relay seals it); -1: no memory (exception set). */
int seal_one(PyObject *sealer, SealChain *c, PyObject *shape, const SealRun *run, Buf *out);

#endif
