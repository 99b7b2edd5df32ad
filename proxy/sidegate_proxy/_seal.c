/*
 * audit.Chain.seal_run in C, for the statements the native lane relays.
 *
 * Python keeps the chain (audit.Chain: chain_id, seq, last_hash) and decides what a record says:
 * for each statement it hands over a *shape* (audit.lane_shape), the record's canonical JSON cut
 * at the values that change from one run to the next: a tuple alternating JSON text (bytes) and
 * a slot code (int), text first and last. Here a run fills the slots (time, time_dt, duration,
 * rows, the simple query's text, and the chain: chain_id, seq, prev_hash, uid), hashes the body
 * with SHA-256, and appends the line ``Chain._link`` would give, byte for byte:
 * body[:-1] + ',"hash":"<hex>"}' + "\n". tests/test_seal.py checks it against seal_run.
 *
 * A run it cannot vouch for has no line here (seal_one returns 0) and goes to Python: an error
 * (its template differs), no row count, a query text that Python would redact (it mentions a
 * password) or truncate, non-ASCII text, a time outside years 1000-9999.
 */
#include "_seal.h"

#include <ctype.h>
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

enum {
    SEAL_TIME = 1,
    SEAL_TIME_DT,
    SEAL_DURATION,
    SEAL_ROWS,
    SEAL_QUERY,
    SEAL_SEQ,
    SEAL_PREV_HASH,
    SEAL_UID,
    SEAL_CHAIN_ID,
};

/* ------------------------------------------------------------------ SHA-256 */

typedef unsigned char *(*sha256_fn)(const unsigned char *data, size_t n, unsigned char *digest);

/* OpenSSL's, when the process has libcrypto loaded (Python's hashlib does): SHA extensions. Its
 * SHA256_Init/Update/Final when exported (a quarter cheaper than SHA256(), which looks the
 * algorithm up on every call), else its SHA256(). */
static sha256_fn openssl_sha256;
static int (*ossl_init)(void *ctx);
static int (*ossl_update)(void *ctx, const void *data, size_t n);
static int (*ossl_final)(unsigned char *digest, void *ctx);

static unsigned char *openssl_sha256_ctx(const unsigned char *data, size_t n, unsigned char *digest) {
    _Alignas(16) unsigned char ctx[512]; /* SHA256_CTX is 112 bytes */
    ossl_init(ctx);
    ossl_update(ctx, data, n);
    ossl_final(digest, ctx);
    return digest;
}

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_block(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
}

/* FIPS 180-4, for a process without libcrypto: slower, same digest. */
static unsigned char *portable_sha256(const unsigned char *data, size_t n, unsigned char *digest) {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t full = n / 64 * 64;
    for (size_t i = 0; i < full; i += 64)
        sha256_block(h, data + i);
    unsigned char tail[128] = {0};
    size_t rest = n - full;
    memcpy(tail, data + full, rest);
    tail[rest] = 0x80;
    size_t blocks = rest + 9 <= 64 ? 1 : 2;
    uint64_t bits = (uint64_t)n * 8;
    for (int i = 0; i < 8; i++)
        tail[blocks * 64 - 1 - i] = (unsigned char)(bits >> (8 * i));
    for (size_t i = 0; i < blocks; i++)
        sha256_block(h, tail + 64 * i);
    for (int i = 0; i < 8; i++) {
        digest[4 * i] = (unsigned char)(h[i] >> 24);
        digest[4 * i + 1] = (unsigned char)(h[i] >> 16);
        digest[4 * i + 2] = (unsigned char)(h[i] >> 8);
        digest[4 * i + 3] = (unsigned char)h[i];
    }
    return digest;
}

static void find_openssl(void) {
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so"};
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !openssl_sha256; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_NOLOAD); /* only one already loaded: no new dependency */
        if (lib) {
            openssl_sha256 = (sha256_fn)(uintptr_t)dlsym(lib, "SHA256");
            *(void **)&ossl_init = dlsym(lib, "SHA256_Init");
            *(void **)&ossl_update = dlsym(lib, "SHA256_Update");
            *(void **)&ossl_final = dlsym(lib, "SHA256_Final");
            if (openssl_sha256 && ossl_init && ossl_update && ossl_final)
                openssl_sha256 = openssl_sha256_ctx;
            if (!openssl_sha256)
                dlclose(lib);
        }
    }
}

/* ------------------------------------------------------------------ JSON pieces */

static int out_int(Buf *o, long long v) {
    char digits[24], *end = digits + sizeof digits, *p = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do
        *--p = (char)('0' + u % 10);
    while (u /= 10);
    if (v < 0)
        *--p = '-';
    return buf_append(o, p, (size_t)(end - p));
}

/* json's encode_basestring_ascii: quoted, printable ASCII but " and \ kept, the rest escaped. */
static int out_string(Buf *o, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    if (buf_reserve(o, n * 6 + 2) < 0)
        return -1;
    char *w = o->p + o->end;
    *w++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= ' ' && c <= '~' && c != '\\' && c != '"') {
            *w++ = (char)c;
            continue;
        }
        *w++ = '\\';
        switch (c) {
        case '\\': *w++ = '\\'; break;
        case '"': *w++ = '"'; break;
        case '\b': *w++ = 'b'; break;
        case '\f': *w++ = 'f'; break;
        case '\n': *w++ = 'n'; break;
        case '\r': *w++ = 'r'; break;
        case '\t': *w++ = 't'; break;
        default: /* only ASCII reaches here (callers check): \u00XX */
            *w++ = 'u';
            *w++ = '0';
            *w++ = '0';
            *w++ = hex[c >> 4];
            *w++ = hex[c & 15];
        }
    }
    *w++ = '"';
    o->end = (size_t)(w - o->p);
    return 0;
}

/* Python's round() of a float to an int: half to even (nearbyint in the default rounding mode). */
static int round_ms(double x, long long *out) {
    double r = nearbyint(x);
    if (!(r > -9e15 && r < 9e15))
        return -1;
    *out = (long long)r;
    return 0;
}

/* ------------------------------------------------------------------ Sealer */

typedef struct {
    PyObject_HEAD
    char **sensitive; /* lowercase words whose mention makes Python redact a statement */
    Py_ssize_t n_sensitive;
    Py_ssize_t max_command;
    sha256_fn sha256;
    long long second; /* the UTC second ``stamp`` spells (runs mostly share theirs) */
    char stamp[24];
} SealerObject;

/* audit._rfc3339_ms: "%Y-%m-%dT%H:%M:%S" of the UTC second, then ".mmmZ". */
static int rfc3339_ms(SealerObject *S, long long ms, char buf[32]) {
    if (ms < 0)
        return -1;
    if (ms / 1000 != S->second) {
        time_t seconds = (time_t)(ms / 1000);
        struct tm tm;
        if (!gmtime_r(&seconds, &tm) || tm.tm_year + 1900 < 1000 || tm.tm_year + 1900 > 9999)
            return -1;
        snprintf(S->stamp, sizeof S->stamp, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        S->second = ms / 1000;
    }
    int frac = (int)(ms % 1000);
    memcpy(buf, S->stamp, 19);
    buf[19] = '.';
    buf[20] = (char)('0' + frac / 100);
    buf[21] = (char)('0' + frac / 10 % 10);
    buf[22] = (char)('0' + frac % 10);
    buf[23] = 'Z';
    buf[24] = 0;
    return 0;
}

/* Python's str.isspace() over ASCII */
static int py_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

static int mentions(const char *s, size_t n, const char *word) {
    size_t w = strlen(word);
    for (size_t i = 0; w && i + w <= n; i++) {
        size_t j = 0;
        while (j < w && (char)tolower((unsigned char)s[i + j]) == word[j])
            j++;
        if (j == w)
            return 1;
    }
    return 0;
}

/* audit.sql_evidence(sqlparse.statement_text(query)) when it is the text itself, trimmed:
 * 0 with [start, start+len), or -1 when Python's answer may differ (redaction, truncation). */
static int evidence(const SealerObject *S, const char *q, size_t n, const char **start, size_t *len) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)q[i] > 0x7f)
            return -1;
    size_t a = 0, b = n;
    while (a < b && py_space((unsigned char)q[a]))
        a++;
    while (b > a && py_space((unsigned char)q[b - 1]))
        b--;
    if (b > a && q[b - 1] == ';') {
        b--;
        while (b > a && py_space((unsigned char)q[b - 1]))
            b--;
    }
    if ((Py_ssize_t)(b - a) > S->max_command)
        return -1;
    for (Py_ssize_t i = 0; i < S->n_sensitive; i++)
        if (mentions(q + a, b - a, S->sensitive[i]))
            return -1;
    *start = q + a;
    *len = b - a;
    return 0;
}

int seal_one(PyObject *sealer, SealChain *c, PyObject *shape, const SealRun *run, Buf *out) {
    SealerObject *S = (SealerObject *)sealer;
    if (run->rows < 0 || run->sqlstate[0] || !shape || !PyTuple_Check(shape))
        return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(shape);
    if (n % 2 == 0)
        return 0;
    long long ms, duration;
    char time_dt[32];
    if (round_ms(run->wall * 1000, &ms) < 0 || rfc3339_ms(S, ms, time_dt) < 0 ||
        round_ms(run->seconds * 1000, &duration) < 0)
        return 0;
    const char *query = NULL;
    size_t query_len = 0;
    size_t mark = out->end;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(shape, i);
        int failed;
        if (i % 2 == 0) {
            if (!PyBytes_Check(item))
                goto no_line;
            failed = buf_append(out, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item));
        } else {
            long slot = PyLong_Check(item) ? PyLong_AsLong(item) : -1;
            switch (slot) {
            case SEAL_TIME: failed = out_int(out, ms); break;
            case SEAL_TIME_DT: failed = out_string(out, time_dt, 24); break;
            case SEAL_DURATION: failed = out_int(out, duration); break;
            case SEAL_ROWS: failed = out_int(out, run->rows); break;
            case SEAL_QUERY:
                if (!run->query || (!query && evidence(S, run->query, run->query_len, &query, &query_len) < 0))
                    goto no_line;
                failed = out_string(out, query, query_len);
                break;
            case SEAL_SEQ: failed = out_int(out, c->seq + 1); break;
            case SEAL_PREV_HASH: failed = out_string(out, c->last_hash, 64); break;
            case SEAL_CHAIN_ID: /* the uid's prefix without its colon, closed */
                failed = buf_append(out, c->uid_prefix, c->uid_len - 1) || buf_append(out, "\"", 1);
                break;
            case SEAL_UID:
                failed = buf_append(out, c->uid_prefix, c->uid_len) || out_int(out, c->seq + 1) ||
                         buf_append(out, "\"", 1);
                break;
            default: goto no_line;
            }
        }
        if (failed) {
            out->end = mark;
            PyErr_NoMemory();
            return -1;
        }
    }
    if (out->end == mark || out->p[out->end - 1] != '}')
        goto no_line;
    if (buf_reserve(out, 76) < 0) { /* ,"hash":"<64>"} and the newline */
        out->end = mark;
        PyErr_NoMemory();
        return -1;
    }
    unsigned char digest[32];
    S->sha256((const unsigned char *)out->p + mark, out->end - mark, digest);
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        c->last_hash[2 * i] = hex[digest[i] >> 4];
        c->last_hash[2 * i + 1] = hex[digest[i] & 15];
    }
    c->last_hash[64] = 0;
    c->seq++;
    out->end--; /* the body's closing brace: the hash goes inside */
    buf_append(out, ",\"hash\":\"", 9);
    buf_append(out, c->last_hash, 64);
    buf_append(out, "\"}\n", 3);
    return 1;
no_line:
    out->end = mark;
    return 0;
}

/* ------------------------------------------------------------------ the chain, from Python */

int seal_chain_read(PyObject *chain, SealChain *c) {
    memset(c, 0, sizeof *c);
    PyObject *chain_id = PyObject_GetAttrString(chain, "chain_id");
    PyObject *seq = chain_id ? PyObject_GetAttrString(chain, "seq") : NULL;
    PyObject *last = seq ? PyObject_GetAttrString(chain, "last_hash") : NULL;
    int ok = -1;
    if (!last)
        goto done;
    if (!PyUnicode_Check(chain_id) || !PyLong_Check(seq) || !PyUnicode_Check(last) ||
        !PyUnicode_IS_ASCII(chain_id) || !PyUnicode_IS_ASCII(last) || PyUnicode_GET_LENGTH(last) != 64) {
        PyErr_SetString(PyExc_TypeError, "chain: chain_id (ASCII str), seq (int) and last_hash (64 hex) expected");
        goto done;
    }
    c->seq = PyLong_AsLongLong(seq);
    if (c->seq == -1 && PyErr_Occurred())
        goto done;
    memcpy(c->last_hash, PyUnicode_DATA(last), 64);
    c->last_hash[64] = 0;
    Buf prefix = {0};
    if (out_string(&prefix, PyUnicode_DATA(chain_id), (size_t)PyUnicode_GET_LENGTH(chain_id)) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    prefix.p[prefix.end - 1] = ':'; /* the closing quote comes after the number */
    c->uid_prefix = prefix.p;
    c->uid_len = prefix.end;
    ok = 0;
done:
    Py_XDECREF(chain_id);
    Py_XDECREF(seq);
    Py_XDECREF(last);
    return ok;
}

int seal_chain_write(PyObject *chain, const SealChain *c) {
    PyObject *seq = PyLong_FromLongLong(c->seq);
    PyObject *last = seq ? PyUnicode_FromStringAndSize(c->last_hash, 64) : NULL;
    int ok = last && PyObject_SetAttrString(chain, "seq", seq) == 0 && PyObject_SetAttrString(chain, "last_hash", last) == 0
                 ? 0
                 : -1;
    Py_XDECREF(seq);
    Py_XDECREF(last);
    return ok;
}

void seal_chain_free(SealChain *c) {
    free(c->uid_prefix);
    c->uid_prefix = NULL;
}

static PyObject *sealer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"sensitive", "max_command", "openssl", NULL};
    PyObject *words;
    Py_ssize_t max_command;
    int use_openssl = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!n|p", kwlist, &PyTuple_Type, &words, &max_command, &use_openssl))
        return NULL;
    SealerObject *S = (SealerObject *)type->tp_alloc(type, 0);
    if (!S)
        return NULL;
    S->max_command = max_command;
    S->second = -1;
    S->sha256 = use_openssl && openssl_sha256 ? openssl_sha256 : portable_sha256;
    Py_ssize_t n = PyTuple_GET_SIZE(words);
    S->sensitive = calloc((size_t)(n ? n : 1), sizeof(char *));
    if (!S->sensitive) {
        Py_DECREF(S);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *w = PyTuple_GET_ITEM(words, i);
        if (!PyBytes_Check(w) || PyBytes_GET_SIZE(w) == 0) {
            Py_DECREF(S);
            PyErr_SetString(PyExc_TypeError, "sensitive: non-empty lowercase bytes expected");
            return NULL;
        }
        S->sensitive[i] = strdup(PyBytes_AS_STRING(w));
        if (!S->sensitive[i]) {
            Py_DECREF(S);
            return PyErr_NoMemory();
        }
        S->n_sensitive = i + 1;
        for (char *p = S->sensitive[i]; *p; p++)
            *p = (char)tolower((unsigned char)*p);
    }
    return (PyObject *)S;
}

static void sealer_dealloc(SealerObject *S) {
    for (Py_ssize_t i = 0; i < S->n_sensitive; i++)
        free(S->sensitive[i]);
    free(S->sensitive);
    Py_TYPE(S)->tp_free((PyObject *)S);
}

/* seal(chain, shape, runs) -> (lines, count): runs are (wall, seconds, rows, sqlstate, query);
 * sealing stops at the first run without a line here. */
static PyObject *sealer_seal(PyObject *self, PyObject *args) {
    PyObject *chain, *shape, *runs;
    if (!PyArg_ParseTuple(args, "OOO!", &chain, &shape, &PyList_Type, &runs))
        return NULL;
    SealChain c;
    if (seal_chain_read(chain, &c) < 0)
        return NULL;
    Buf out = {0};
    Py_ssize_t count = 0;
    int status = 1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(runs) && status == 1; i++) {
        SealRun run = {.rows = -1, .sqlstate = ""};
        PyObject *rows = Py_None, *state = Py_None, *query = Py_None;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(runs, i), "ddOOO", &run.wall, &run.seconds, &rows, &state, &query)) {
            status = -1;
            break;
        }
        if (rows != Py_None && (run.rows = PyLong_AsLongLong(rows)) < 0)
            break; /* negative or unconvertible: no line (an error, if any, is cleared below) */
        if (state != Py_None && !(run.sqlstate = PyUnicode_AsUTF8(state))) {
            status = -1;
            break;
        }
        if (query != Py_None) {
            char *text;
            Py_ssize_t len;
            if (PyBytes_AsStringAndSize(query, &text, &len) < 0) {
                status = -1;
                break;
            }
            run.query = text;
            run.query_len = (size_t)len;
        }
        status = seal_one(self, &c, shape, &run, &out);
        count += status == 1;
    }
    if (status != -1)
        PyErr_Clear();
    PyObject *result = NULL;
    if (status != -1 && seal_chain_write(chain, &c) == 0)
        result = Py_BuildValue("(y#n)", out.p ? out.p : "", (Py_ssize_t)out.end, count);
    free(out.p);
    seal_chain_free(&c);
    return result;
}

static PyObject *sealer_sha256(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    unsigned char digest[32];
    ((SealerObject *)self)->sha256(view.buf, (size_t)view.len, digest);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)digest, 32);
}

static PyObject *sealer_openssl(PyObject *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(((SealerObject *)self)->sha256 == openssl_sha256 && openssl_sha256);
}

static PyMethodDef sealer_methods[] = {
    {"seal", sealer_seal, METH_VARARGS, "Seal runs of one shape onto a chain: (lines, count)."},
    {"sha256", sealer_sha256, METH_O, "The digest this sealer hashes with."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sealer_getset[] = {
    {"openssl", sealer_openssl, NULL, "Whether it hashes with the process's OpenSSL.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject SealerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidegate_proxy._lane.Sealer",
    .tp_basicsize = sizeof(SealerObject),
    .tp_dealloc = (destructor)sealer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "audit.Chain.seal_run in C, for runs the native lane saw.",
    .tp_methods = sealer_methods,
    .tp_getset = sealer_getset,
    .tp_new = sealer_new,
};

int seal_module_init(PyObject *module) {
    find_openssl();
    if (PyType_Ready(&SealerType) < 0 || PyModule_AddObjectRef(module, "Sealer", (PyObject *)&SealerType) < 0)
        return -1;
    static const struct {
        const char *name;
        int value;
    } slots[] = {
        {"SEAL_TIME", SEAL_TIME}, {"SEAL_TIME_DT", SEAL_TIME_DT}, {"SEAL_DURATION", SEAL_DURATION},
        {"SEAL_ROWS", SEAL_ROWS}, {"SEAL_QUERY", SEAL_QUERY}, {"SEAL_SEQ", SEAL_SEQ},
        {"SEAL_PREV_HASH", SEAL_PREV_HASH}, {"SEAL_UID", SEAL_UID}, {"SEAL_CHAIN_ID", SEAL_CHAIN_ID},
    };
    for (size_t i = 0; i < sizeof slots / sizeof slots[0]; i++)
        if (PyModule_AddIntConstant(module, slots[i].name, slots[i].value) < 0)
            return -1;
    return 0;
}
