/*
 * TLS for the lane (see _tls.h). The lane thread only ever touches a session's SSL object while
 * Python has the session paused, and hands it back with every byte accounted for: plaintext it
 * decrypted but did not relay goes back as the session's unread bytes, ciphertext it made but
 * could not send goes back for Python to write raw, ahead of anything Python encrypts next.
 */
#include "_tls.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdint.h>

#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_ZERO_RETURN 6

static struct {
    int (*read)(void *ssl, void *buf, int n);
    int (*write)(void *ssl, const void *buf, int n);
    int (*get_error)(const void *ssl, int ret);
    void *(*get_rbio)(const void *ssl);
    void *(*get_wbio)(const void *ssl);
    void *(*get_ex_data)(const void *ssl, int index);
    int (*bio_write)(void *bio, const void *buf, int n);
    int (*bio_read)(void *bio, void *buf, int n);
    size_t (*bio_ctrl_pending)(void *bio);
    void (*err_clear)(void);
    int found; /* not found is not remembered: _ssl may load libssl later (import ssl) */
} ossl;

int tls_ready(void) {
    static const char *names[] = {"libssl.so.3", "libssl.so.1.1", "libssl.so"};
    if (ossl.found)
        return 1;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_NOLOAD); /* the one _ssl loaded: the same SSL objects */
        if (!lib)
            continue;
        *(void **)&ossl.read = dlsym(lib, "SSL_read");
        *(void **)&ossl.write = dlsym(lib, "SSL_write");
        *(void **)&ossl.get_error = dlsym(lib, "SSL_get_error");
        *(void **)&ossl.get_rbio = dlsym(lib, "SSL_get_rbio");
        *(void **)&ossl.get_wbio = dlsym(lib, "SSL_get_wbio");
        *(void **)&ossl.get_ex_data = dlsym(lib, "SSL_get_ex_data");
        *(void **)&ossl.bio_write = dlsym(lib, "BIO_write"); /* libcrypto's, through libssl's dependencies */
        *(void **)&ossl.bio_read = dlsym(lib, "BIO_read");
        *(void **)&ossl.bio_ctrl_pending = dlsym(lib, "BIO_ctrl_pending");
        *(void **)&ossl.err_clear = dlsym(lib, "ERR_clear_error");
        if (ossl.read && ossl.write && ossl.get_error && ossl.get_rbio && ossl.get_wbio && ossl.get_ex_data
            && ossl.bio_write && ossl.bio_read && ossl.bio_ctrl_pending && ossl.err_clear) {
            ossl.found = 1;
            return 1;
        }
        dlclose(lib);
    }
    return 0;
}

/* CPython's _ssl._SSLSocket starts {PyObject_HEAD; PyObject *Socket; SSL *ssl; ...} (3.7 to 3.13),
 * and makes itself the SSL object's app data (index 0): both are checked before it is trusted. */
void *tls_ssl_of(PyObject *sslobj) {
    PyTypeObject *type = Py_TYPE(sslobj);
    if (!tls_ready() || strcmp(type->tp_name, "_ssl._SSLSocket") != 0
        || type->tp_basicsize < (Py_ssize_t)(sizeof(PyObject) + 2 * sizeof(void *)))
        return NULL;
    void *ssl;
    memcpy(&ssl, (char *)sslobj + sizeof(PyObject) + sizeof(PyObject *), sizeof ssl);
    if (!ssl || ossl.get_ex_data(ssl, 0) != (void *)sslobj)
        return NULL;
    return ssl;
}

int tls_feed(void *ssl, const char *data, size_t n) {
    while (n) {
        int chunk = n > INT_MAX ? INT_MAX : (int)n;
        int wrote = ossl.bio_write(ossl.get_rbio(ssl), data, chunk);
        if (wrote <= 0)
            return -3; /* a memory BIO only refuses without memory */
        data += wrote;
        n -= (size_t)wrote;
    }
    return 0;
}

/* What the SSL object wrote to its outgoing BIO, onto ``wire``. */
static int drain_wbio(void *ssl, Buf *wire) {
    void *wbio = ossl.get_wbio(ssl);
    size_t pending;
    while ((pending = ossl.bio_ctrl_pending(wbio)) > 0) {
        int chunk = pending > INT_MAX ? INT_MAX : (int)pending;
        if (buf_reserve(wire, (size_t)chunk) < 0)
            return -3;
        int got = ossl.bio_read(wbio, wire->p + wire->end, chunk);
        if (got <= 0)
            break;
        wire->end += (size_t)got;
    }
    return 0;
}

int tls_pull(void *ssl, Buf *in, Buf *wire) {
    int rc;
    for (;;) {
        if (buf_reserve(in, 16 * 1024) < 0)
            return -3;
        size_t room = in->cap - in->end;
        ossl.err_clear(); /* SSL_get_error reads this thread's error queue */
        int got = ossl.read(ssl, in->p + in->end, room > INT_MAX ? INT_MAX : (int)room);
        if (got > 0) {
            in->end += (size_t)got;
            continue;
        }
        int error = ossl.get_error(ssl, got);
        rc = error == SSL_ERROR_WANT_READ ? 0 : error == SSL_ERROR_ZERO_RETURN ? -1 : -2;
        break;
    }
    return drain_wbio(ssl, wire) < 0 ? -3 : rc;
}

int tls_seal(void *ssl, Buf *out, Buf *wire) {
    while (buf_len(out)) {
        size_t n = buf_len(out);
        int chunk = n > (1 << 20) ? 1 << 20 : (int)n;
        ossl.err_clear();
        int wrote = ossl.write(ssl, out->p + out->start, chunk);
        if (wrote <= 0)
            return drain_wbio(ssl, wire) < 0 ? -3 : -2;
        out->start += (size_t)wrote;
        if (out->start == out->end)
            out->start = out->end = 0;
    }
    return drain_wbio(ssl, wire);
}
