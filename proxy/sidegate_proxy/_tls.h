/*
 * TLS for the lane: the SSL object behind a Python ``ssl.SSLObject`` (memory BIOs, see tls.py),
 * driven with the libssl that Python's _ssl module already loaded (no build-time dependency).
 */
#ifndef SIDEGATE_TLS_H
#define SIDEGATE_TLS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_buf.h"

/* Whether libssl's functions were found (looked up once, after Python imported ssl). */
int tls_ready(void);

/* The SSL object of an ``ssl.SSLObject``'s ``_sslobj``, or NULL (not one, or not recognised). */
void *tls_ssl_of(PyObject *sslobj);

/* Ciphertext read from the socket, into the SSL object's incoming BIO: 0, or -3 without memory. */
int tls_feed(void *ssl, const char *data, size_t n);

/* Decrypt every whole record the incoming BIO holds onto ``in``, and move what reading made the
 * SSL object answer (a key update) onto ``wire``: 0, -1 close_notify, -2 TLS error, -3 no memory. */
int tls_pull(void *ssl, Buf *in, Buf *wire);

/* Encrypt all of ``out`` onto ``wire`` (ciphertext waiting for the socket): 0, -2, -3 as above. */
int tls_seal(void *ssl, Buf *out, Buf *wire);

#endif
