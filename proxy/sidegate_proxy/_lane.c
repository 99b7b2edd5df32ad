/*
 * The native lane of PostgreSQL sessions: their steady state relayed without Python.
 *
 * Python decides everything (identity, guardrails, masking plans, audit); the lane relays what
 * it has already decided, on the session's two sockets, in one thread of its own (epoll) for
 * every session handed to it, without the GIL: Bind / Describe / Execute / Sync / Flush of
 * statements Python handed over as allowed, answered by result shapes Python found nothing to
 * mask in. The first message of any other kind, or anything it does not recognise byte for
 * byte, ends the session's stay *before* that message: the bytes go back to Python untouched,
 * with the requests still in flight, so the Python relay carries on exactly where the lane
 * stopped. It never decides anything Python did not, and never rejects anything: what it cannot
 * vouch for, Python sees.
 *
 * Loop(): the thread. fileno() is readable when drain() has something:
 * adopt(token, client_fd, server_fd, client_bytes, server_bytes, statements, shapes, inject,
 *       max_message, seconds[, client_tls, server_tls, filters])
 *   statements: tuple of statement names (bytes) Python allows; a Bind names one by index.
 *   shapes: tuple of RowDescription frames (bytes) whose rows pass unchanged, or None for
 *   "every result passes" (the caller has no masking at all).
 *   inject: after a Bind that no Describe of its portal follows, ask for one (and swallow its
 *   answer), as the Python relay does to learn the result shape.
 *   seconds: how long the shapes hold (then the session goes back to Python).
 *   client_tls, server_tls (optional): a TLS side's ``ssl.SSLObject._sslobj``, or None for plain
 *   TCP: the lane reads and writes that side through it (_tls.c); tls_ready() says whether it can.
 *   filters (with shapes): one bytes per shape, empty when its rows pass unchanged, else the check
 *   each DataRow must pass to be relayed (row_clean: the detectors' necessary conditions).
 * recall(token): send a session back to Python now, with what is in flight.
 * drain() -> (records, done):
 *   records: (token, statement index, wall time, seconds, rows or None, sqlstate or None), one
 *   per Execute the lane saw answered, in order;
 *   done: (token, (stop, client_rest, server_rest, to_client, to_server, pending, bound,
 *   last_client, shape)) of sessions handed back: the bytes not relayed each way, those not yet written
 *   each way (on a TLS side: ciphertext, to be written raw ahead of anything else), requests in
 *   flight as (kind, statement index, bind serial, started), the unnamed portal's last Bind here
 *   as (bind serial, statement index) or None, when the client last sent anything
 *   (CLOCK_MONOTONIC seconds; 0.0: nothing), and the current result's shape (index; -1: none),
 *   whose plan Python applies to the rest of that result.
 * drain_sealed(sealer, chain, shapes, bounds): drain(), with the records sealed onto the audit
 *   chain in C first (_seal.c), as far as they have a shape: shapes[token] = (statement shapes,
 *   query shapes). Returns (lines, sealed, counts per token, latency buckets or None, the
 *   records left for Python, done).
 * close(): every session goes back to Python (drain() has them), the thread ends.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "_seal.h"
#include "_tls.h"

enum { K_BIND = 1, K_DESCRIBE_PORTAL, K_DESCRIBE_STATEMENT, K_INJECT, K_EXECUTE, K_SYNC, K_QUERY };
enum {
    STOP_CLIENT = 1,   /* a client message for Python; nothing in flight */
    STOP_SERVER,       /* a server message for Python */
    STOP_SLICE,        /* the time slice or the record budget is spent */
    STOP_CLIENT_EOF,
    STOP_SERVER_EOF,
    STOP_CLIENT_ERROR,
    STOP_SERVER_ERROR,
    STOP_NO_MEMORY,
};

#define LANE_THREAD_NAME "sidegate-lane" /* at most 15 characters */
#define MAX_PENDING 1024
#define HIGH_WATER (256 * 1024)
#define READ_CHUNK (64 * 1024)
/* Statements answered are reported to Python at most every ``report_every`` seconds (Loop's
 * argument), or sooner once ``report_records`` of them wait: its thread then wakes once for a
 * batch, not once per statement, and a busy lane's batches stay short (each is a burst of work
 * for the Python thread). Sessions handed back are reported at once. */

typedef struct {
    int kind;
    int statement; /* K_QUERY: the query shape's index */
    long serial;
    double started;
    char *text; /* K_QUERY: the query string (owned) */
    size_t text_len;
    int completed; /* K_QUERY: its statement was answered (ReadyForQuery follows) */
} Pending;

typedef struct {
    int statement;
    double wall, seconds;
    long long rows; /* -1: none */
    char sqlstate[6]; /* "": none */
    char *text; /* a simple query's string (owned), else NULL */
    size_t text_len;
} Record;

typedef struct Lane Lane;

/* Byte strings Python handed over (copied into the lane's blob), found by their index. */
typedef struct {
    const char **items;
    size_t *lens;
    Py_ssize_t n;
} Table;

typedef struct {
    Lane *lane;
    int side; /* CLIENT or SERVER */
} Side;

enum { CLIENT = 0, SERVER = 1 };

struct Lane {
    long token;
    char *blob; /* the tables' bytes, copied: the lane outlives the call */
    Table statements; /* names of the prepared statements Python allows */
    Table queries;    /* literal keys (see literal_key) of simple queries Python allows */
    Table shapes;     /* RowDescriptions with nothing to mask; n -1: every result passes */
    Table filters;    /* per shape: empty, or the rows' check (row_clean) when detectors scan it */
    int shape;        /* the current result's shape (index in shapes, from its RowDescription); -1 */
    Buf key;
    int inject;
    long max_message;
    double deadline;
    int client_fd, server_fd;
    void *tls[2];          /* per side: the SSL object (_tls.c), or NULL for plain TCP */
    PyObject *tls_owner[2]; /* the Python object that owns it, kept alive while the lane uses it */
    Buf wire[2];           /* per TLS side: ciphertext the socket has not taken yet */
    Side sides[2];
    uint32_t mask[2]; /* what epoll watches on each side */
    Buf cin, sin, cout, sout;
    Pending pending[MAX_PENDING];
    size_t p_head, p_count;
    Record *records;
    Py_ssize_t n_records, records_cap;
    long serial;        /* of the unnamed portal's last Bind here; 0: none */
    int bound_statement;
    int client_stopped; /* a client message waits for Python: read no more */
    int stop;
    int finished;
    double last_client;
    Lane *next; /* in the loop's list of sessions, or a hand-over list */
};

static double now_clock(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint32_t be32(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return ((uint32_t)u[0] << 24) | ((uint32_t)u[1] << 16) | ((uint32_t)u[2] << 8) | u[3];
}

static int be16(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return (int16_t)(((uint16_t)u[0] << 8) | u[1]);
}

/* ------------------------------------------------------------------ buffers */

static void buf_consume(Buf *b, size_t n) {
    b->start += n;
    if (b->start == b->end)
        b->start = b->end = 0;
}

/* Read what the socket has (one call): 1 data, 0 nothing now, -1 EOF, -2 error. */
static int buf_recv(Buf *b, int fd) {
    if (buf_reserve(b, READ_CHUNK) < 0)
        return -3;
    ssize_t n = recv(fd, b->p + b->end, b->cap - b->end, MSG_DONTWAIT);
    if (n > 0) {
        b->end += (size_t)n;
        return 1;
    }
    if (n == 0)
        return -1;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return 0;
    return -2;
}

/* Write what the socket takes: 0 fine (maybe partly), -1 error. */
static int buf_send(Buf *b, int fd) {
    while (buf_len(b)) {
        ssize_t n = send(fd, b->p + b->start, buf_len(b), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n > 0) {
            buf_consume(b, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ message checks */

/* The length of a NUL-terminated string at body[pos:], without the NUL; -1 if unterminated. */
static long cstr_len(const char *body, size_t n, size_t pos) {
    if (pos >= n)
        return -1;
    const char *z = memchr(body + pos, 0, n - pos);
    return z ? (long)(z - (body + pos)) : -1;
}

static int all_ascii(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            return 0;
    return 1;
}

static int table_find(const Table *t, const char *key, size_t n) {
    for (Py_ssize_t i = 0; i < t->n; i++)
        if (t->lens[i] == n && memcmp(t->items[i], key, n) == 0)
            return (int)i;
    return -1;
}

/* A run of int16 format codes (count first), each 0 or 1: the position after it, or 0. */
static size_t format_codes(const char *body, size_t n, size_t pos) {
    if (pos + 2 > n)
        return 0;
    int count = be16(body + pos);
    pos += 2;
    if (count < 0 || pos + 2 * (size_t)count > n)
        return 0;
    for (int i = 0; i < count; i++) {
        int code = be16(body + pos + 2 * (size_t)i);
        if (code != 0 && code != 1)
            return 0;
    }
    return pos + 2 * (size_t)count;
}

/* Bind of the unnamed portal to a handed-over statement, well formed: its index, else -1. */
static int bind_statement(const Lane *lane, const char *body, size_t n) {
    if (n < 1 || body[0] != 0)
        return -1; /* a named portal: Python's */
    long sl = cstr_len(body, n, 1);
    if (sl < 0)
        return -1;
    int statement = table_find(&lane->statements, body + 1, (size_t)sl);
    if (statement < 0)
        return -1;
    size_t pos = format_codes(body, n, 1 + (size_t)sl + 1);
    if (!pos || pos + 2 > n)
        return -1;
    int params = be16(body + pos);
    pos += 2;
    if (params < 0)
        return -1;
    for (int i = 0; i < params; i++) {
        if (pos + 4 > n)
            return -1;
        int32_t len = (int32_t)be32(body + pos);
        pos += 4;
        if (len == -1)
            continue;
        if (len < 0 || pos + (size_t)len > n)
            return -1;
        pos += (size_t)len;
    }
    pos = format_codes(body, n, pos);
    return pos && pos == n ? statement : -1;
}

/* A RowDescription (or ParameterDescription) as the Python decoder would accept it. */
static int row_description_ok(const char *body, size_t n) {
    if (n < 2)
        return 0;
    int fields = be16(body);
    if (fields < 0)
        return 0;
    size_t pos = 2;
    for (int i = 0; i < fields; i++) {
        long sl = cstr_len(body, n, pos);
        if (sl < 0 || !all_ascii(body + pos, (size_t)sl))
            return 0;
        pos += (size_t)sl + 1 + 18;
        if (pos > n)
            return 0;
    }
    return pos == n;
}

static int parameter_description_ok(const char *body, size_t n) {
    if (n < 2)
        return 0;
    int count = be16(body);
    return count >= 0 && 2 + 4 * (size_t)count == n;
}

/* Error and notice fields (code byte, string) up to a NUL, all ASCII. */
static int fields_ok(const char *body, size_t n, char *severity, size_t sev_cap, char *sqlstate) {
    size_t pos = 0;
    char sev_s[16] = "", sev_v[16] = "";
    if (sqlstate)
        sqlstate[0] = 0;
    for (;;) {
        if (pos >= n)
            return 0;
        char code = body[pos++];
        if (code == 0)
            break;
        long sl = cstr_len(body, n, pos);
        if (sl < 0 || !all_ascii(body + pos, (size_t)sl))
            return 0;
        if (code == 'S' && (size_t)sl < sizeof sev_s) {
            memcpy(sev_s, body + pos, (size_t)sl);
            sev_s[sl] = 0;
        } else if (code == 'V' && (size_t)sl < sizeof sev_v) {
            memcpy(sev_v, body + pos, (size_t)sl);
            sev_v[sl] = 0;
        } else if (code == 'C' && sqlstate) {
            if (sl != 5)
                return 0; /* Python would carry it as is: let it */
            memcpy(sqlstate, body + pos, 5);
            sqlstate[5] = 0;
        }
        pos += (size_t)sl + 1;
    }
    if (pos != n)
        return 0;
    if (severity) {
        const char *s = sev_v[0] ? sev_v : sev_s;
        snprintf(severity, sev_cap, "%s", s);
    }
    return 1;
}

/* The row count of a CommandComplete tag ("SELECT 5", "INSERT 0 3"): 1 ok, 0 not for the lane. */
static int command_rows(const char *body, size_t n, long long *rows) {
    long sl = cstr_len(body, n, 0);
    if (sl < 0 || (size_t)sl + 1 != n || !all_ascii(body, (size_t)sl))
        return 0;
    const char *space = NULL;
    for (long i = sl - 1; i >= 0; i--)
        if (body[i] == ' ') {
            space = body + i;
            break;
        }
    *rows = -1;
    if (!space)
        return 1;
    const char *digits = space + 1;
    size_t nd = (size_t)(body + sl - digits);
    if (nd == 0 || nd > 18)
        return nd == 0;
    long long v = 0;
    for (size_t i = 0; i < nd; i++) {
        if (digits[i] < '0' || digits[i] > '9')
            return 1;
        v = v * 10 + (digits[i] - '0');
    }
    *rows = v;
    return 1;
}

/* ------------------------------------------------------------------ requests in flight */

static Pending *front(Lane *lane) { return lane->p_count ? &lane->pending[lane->p_head] : NULL; }

static void pop(Lane *lane) {
    free(lane->pending[lane->p_head].text);
    lane->pending[lane->p_head].text = NULL;
    lane->p_head = (lane->p_head + 1) % MAX_PENDING;
    lane->p_count--;
}

static void push(Lane *lane, int kind, int statement, double started) {
    Pending *p = &lane->pending[(lane->p_head + lane->p_count) % MAX_PENDING];
    p->kind = kind;
    p->statement = statement;
    p->serial = lane->serial;
    p->started = started;
    p->text = NULL;
    p->text_len = 0;
    p->completed = 0;
    lane->p_count++;
}

static int record(Lane *lane, const Pending *p, long long rows, const char *sqlstate) {
    if (lane->n_records == lane->records_cap) {
        Py_ssize_t cap = lane->records_cap ? lane->records_cap * 2 : 64;
        Record *r = realloc(lane->records, (size_t)cap * sizeof(Record));
        if (!r)
            return -1;
        lane->records = r;
        lane->records_cap = cap;
    }
    Record *r = &lane->records[lane->n_records++];
    r->statement = p->statement;
    r->wall = now_clock(CLOCK_REALTIME);
    r->seconds = now_clock(CLOCK_MONOTONIC) - p->started;
    r->rows = rows;
    snprintf(r->sqlstate, sizeof r->sqlstate, "%s", sqlstate ? sqlstate : "");
    r->text = NULL;
    r->text_len = p->text_len;
    if (p->text) {
        r->text = malloc(p->text_len ? p->text_len : 1);
        if (!r->text) {
            lane->n_records--;
            return -1;
        }
        memcpy(r->text, p->text, p->text_len);
    }
    return 0;
}

/* ------------------------------------------------------------------ simple queries by shape */

/*
 * The literal key of a simple query: sqlparse._literal_key's canonical form, where numbers that
 * are plain comparison operands or IN-list elements read 0 (0.0 for decimals), so that texts
 * differing only in them (pgbench's and psycopg2's inlined parameters) share the decision Python
 * made for the first. It accepts exactly the texts _literal_key's argument covers (ASCII, a lone
 * SELECT, quotes well formed and without backslashes, no $, no comments, no ; but a trailing one)
 * and rewrites exactly the same numbers; a text it does not rewrite is its own key. Anything else
 * has no key (-1): the query goes to Python. tests/test_pgproxy_lane.py checks it against the
 * Python function on generated texts.
 */
static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f'; }

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static int ends_operator(char c) { return c != 0 && strchr("-+*/<>=~!@#%^&|`?", c) != NULL; }

static int word_char(char c) {
    return is_digit(c) || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' || c == '$' || c == '.';
}

/* An unsigned decimal number at s[i:]: its end, or i. */
static size_t number_end(const char *s, size_t n, size_t i) {
    size_t j = i;
    while (j < n && is_digit(s[j]))
        j++;
    if (j == i)
        return i;
    if (j + 1 < n && s[j] == '.' && is_digit(s[j + 1])) {
        j++;
        while (j < n && is_digit(s[j]))
            j++;
    }
    return j;
}

static int put_zero(Buf *out, const char *s, size_t from, size_t to) {
    return memchr(s + from, '.', to - from) ? buf_append(out, "0.0", 3) : buf_append(out, "0", 1);
}

static long literal_key(const char *s, size_t n, Buf *out) {
    out->start = out->end = 0;
    size_t i = 0;
    for (size_t k = 0; k < n; k++)
        if ((unsigned char)s[k] >= 0x80 || s[k] == 0)
            return -1;
    while (i < n && is_ws(s[i]))
        i++;
    if (i + 7 > n || strncasecmp(s + i, "select", 6) != 0 || !is_ws(s[i + 6]))
        return -1;
    i = 0;
    while (i < n) {
        char c = s[i];
        if (c == '\'' || c == '"') { /* a quoted token, whole */
            size_t j = i + 1;
            for (;;) {
                if (j >= n || s[j] == '\\')
                    return -1;
                if (s[j] == c) {
                    if (j + 1 < n && s[j + 1] == c) {
                        j += 2;
                        continue;
                    }
                    break;
                }
                j++;
            }
            if (buf_append(out, s + i, j + 1 - i) < 0)
                return -1;
            i = j + 1;
            continue;
        }
        if (c == '$' || c == '\\' || (c == '-' && i + 1 < n && s[i + 1] == '-')
            || (c == '/' && i + 1 < n && s[i + 1] == '*'))
            return -1;
        if (c == ';') {
            for (size_t j = i + 1; j < n; j++)
                if (!is_ws(s[j]))
                    return -1;
        }
        /* a comparison operator (not the end of a longer one), spaces, a number, then a boundary */
        size_t op_end = 0;
        if (i > 0 && !ends_operator(s[i - 1])) {
            if (c == '<')
                op_end = i + 1 + (i + 1 < n && (s[i + 1] == '=' || s[i + 1] == '>'));
            else if (c == '>')
                op_end = i + 1 + (i + 1 < n && s[i + 1] == '=');
            else if (c == '=')
                op_end = i + 1;
            else if (c == '!' && i + 1 < n && s[i + 1] == '=')
                op_end = i + 2;
        }
        if (op_end) {
            size_t j = op_end;
            while (j < n && is_ws(s[j]))
                j++;
            size_t e = number_end(s, n, j);
            int bounded = e == n || is_ws(s[e]) || s[e] == ')' || s[e] == ',' || s[e] == ';';
            if (e > j && bounded) {
                if (buf_append(out, s + i, j - i) < 0 || put_zero(out, s, j, e) < 0)
                    return -1;
                i = e;
                continue;
            }
        }
        /* IN, a word of its own, then a parenthesised list of numbers only */
        if ((c == 'I' || c == 'i') && i > 0 && !word_char(s[i - 1]) && i + 1 < n && (s[i + 1] == 'N' || s[i + 1] == 'n')) {
            size_t j = i + 2;
            while (j < n && is_ws(s[j]))
                j++;
            if (j < n && s[j] == '(') {
                size_t k = j + 1, items = 0;
                int ok = 1;
                for (;;) {
                    while (k < n && is_ws(s[k]))
                        k++;
                    size_t e = number_end(s, n, k);
                    if (e == k) {
                        ok = 0;
                        break;
                    }
                    items++;
                    k = e;
                    while (k < n && is_ws(s[k]))
                        k++;
                    if (k < n && s[k] == ',') {
                        k++;
                        continue;
                    }
                    ok = k < n && s[k] == ')';
                    break;
                }
                if (ok && items) {
                    if (buf_append(out, s + i, j + 1 - i) < 0)
                        return -1;
                    size_t m = j + 1;
                    while (m < k) {
                        size_t e = is_digit(s[m]) ? number_end(s, n, m) : m;
                        if (e > m) {
                            if (put_zero(out, s, m, e) < 0)
                                return -1;
                            m = e;
                        } else {
                            if (buf_append(out, s + m, 1) < 0)
                                return -1;
                            m++;
                        }
                    }
                    if (buf_append(out, ")", 1) < 0)
                        return -1;
                    i = k + 1;
                    continue;
                }
            }
        }
        if (buf_append(out, s + i, 1) < 0)
            return -1;
        i++;
    }
    return (long)buf_len(out);
}

/* ------------------------------------------------------------------ the two directions */

static const char DESCRIBE_UNNAMED_PORTAL[] = {'D', 0, 0, 0, 6, 'P', 0};

/* Client messages, while each is one the lane may relay; the first other one stays for Python. */
static void from_client(Lane *lane) {
    Buf *b = &lane->cin;
    while (!lane->client_stopped && buf_len(b) >= 5 && lane->p_count + 2 <= MAX_PENDING) {
        const char *m = b->p + b->start;
        char type = m[0];
        uint32_t len = be32(m + 1);
        if (len < 4 || len > (uint32_t)lane->max_message) {
            lane->client_stopped = 1;
            break;
        }
        size_t size = (size_t)len + 1;
        if (buf_len(b) < size)
            break;
        const char *body = m + 5;
        size_t n = len - 4;
        double started = 0;
        int ok = 1;
        switch (type) {
        case 'B': {
            int statement = bind_statement(lane, body, n);
            if (statement < 0) {
                ok = 0;
                break;
            }
            lane->serial++;
            lane->bound_statement = statement;
            if (buf_append(&lane->sout, m, size) < 0) {
                lane->stop = STOP_NO_MEMORY;
                return;
            }
            buf_consume(b, size);
            push(lane, K_BIND, statement, 0);
            /* the client's own Describe of the portal next gives its shape; else ask for it */
            const char *next = b->p + b->start;
            int described = buf_len(b) >= 7 && next[0] == 'D' && be32(next + 1) == 6 && next[5] == 'P' && next[6] == 0;
            if (lane->inject && !described) {
                if (buf_append(&lane->sout, DESCRIBE_UNNAMED_PORTAL, sizeof DESCRIBE_UNNAMED_PORTAL) < 0) {
                    lane->stop = STOP_NO_MEMORY;
                    return;
                }
                push(lane, K_INJECT, statement, 0);
            }
            continue;
        }
        case 'D': {
            int described = n >= 2 && body[0] == 'S' && memchr(body + 1, 0, n - 1) == body + n - 1
                                ? table_find(&lane->statements, body + 1, n - 2) : -1;
            if (n == 2 && body[0] == 'P' && body[1] == 0 && lane->serial)
                push(lane, K_DESCRIBE_PORTAL, lane->bound_statement, 0);
            else if (described >= 0)
                push(lane, K_DESCRIBE_STATEMENT, described, 0);
            else
                ok = 0;
            break;
        }
        case 'E':
            if (n == 5 && body[0] == 0 && lane->serial) {
                started = now_clock(CLOCK_MONOTONIC);
                push(lane, K_EXECUTE, lane->bound_statement, started);
            } else {
                ok = 0;
            }
            break;
        case 'S':
            if (n == 0)
                push(lane, K_SYNC, -1, 0);
            else
                ok = 0;
            break;
        case 'H':
            ok = n == 0;
            break;
        case 'Q': { /* a simple query whose shape Python allowed, at a quiet moment like Python's own */
            long key = n >= 1 && body[n - 1] == 0 && !lane->p_count ? literal_key(body, n - 1, &lane->key) : -1;
            int query = key < 0 ? -1 : table_find(&lane->queries, lane->key.p, (size_t)key);
            if (query < 0) {
                ok = 0;
                break;
            }
            push(lane, K_QUERY, query, now_clock(CLOCK_MONOTONIC));
            Pending *p = &lane->pending[(lane->p_head + lane->p_count - 1) % MAX_PENDING];
            p->text = malloc(n);
            if (!p->text) {
                lane->stop = STOP_NO_MEMORY;
                return;
            }
            memcpy(p->text, body, n - 1);
            p->text_len = n - 1;
            break;
        }
        default:
            ok = 0;
        }
        if (!ok) {
            lane->client_stopped = 1;
            break;
        }
        if (buf_append(&lane->sout, m, size) < 0) {
            lane->stop = STOP_NO_MEMORY;
            return;
        }
        buf_consume(b, size);
    }
}

/* Whether a result's RowDescription passes; it becomes the current shape (for row_clean). */
static int shape_passes(Lane *lane, const char *frame, size_t size) {
    if (lane->shapes.n < 0)
        return row_description_ok(frame + 5, size - 5);
    lane->shape = table_find(&lane->shapes, frame, size);
    return lane->shape >= 0;
}

/* A DataRow of a result whose shape the detectors scan: whether none of its scanned values can
 * hold a finding, by the detectors' necessary conditions Python handed over (masking.py,
 * ColumnPlan.lane_filter): fewer ASCII digits than the fewest any detector needs, and none of
 * their substrings. Anything else, malformed input included, is Python's to scan. */
static int row_clean(const Lane *lane, const char *body, size_t n) {
    if (lane->shape < 0 || lane->shape >= lane->filters.n)
        return 0;
    const unsigned char *f = (const unsigned char *)lane->filters.items[lane->shape];
    size_t flen = lane->filters.lens[lane->shape];
    if (flen == 0)
        return 1; /* nothing to check: the shape has nothing to mask */
    if (flen < 4)
        return 0;
    size_t ncols = ((size_t)f[0] << 8) | f[1];
    if (flen < 2 + ncols + 2 || n < 2 || (size_t)be16(body) != ncols)
        return 0;
    const unsigned char *flags = f + 2;
    unsigned digits_needed = f[2 + ncols];
    size_t nsubs = f[3 + ncols];
    const unsigned char *subs = f + 4 + ncols, *subs_end = f + flen;
    size_t pos = 2;
    for (size_t col = 0; col < ncols; col++) {
        if (n - pos < 4)
            return 0;
        int32_t len = (int32_t)be32(body + pos);
        pos += 4;
        if (len < 0)
            continue; /* NULL */
        if ((size_t)len > n - pos)
            return 0;
        const char *v = body + pos;
        pos += (size_t)len;
        if (!flags[col])
            continue;
        if (digits_needed) {
            unsigned digits = 0;
            for (int32_t i = 0; i < len && digits < digits_needed; i++)
                digits += v[i] >= '0' && v[i] <= '9';
            if (digits >= digits_needed)
                return 0;
        }
        const unsigned char *sub = subs;
        for (size_t k = 0; k < nsubs; k++) {
            if (sub >= subs_end || (size_t)(subs_end - sub - 1) < sub[0])
                return 0;
            if (sub[0] == 0 || memmem(v, (size_t)len, sub + 1, sub[0]) != NULL)
                return 0;
            sub += 1 + sub[0];
        }
    }
    return pos == n;
}

/* Server messages answering the lane's requests; the first one Python must see stops the lane. */
static void from_server(Lane *lane) {
    Buf *b = &lane->sin;
    while (!lane->stop && buf_len(b) >= 5) {
        const char *m = b->p + b->start;
        char type = m[0];
        uint32_t len = be32(m + 1);
        if (len < 4 || len > (uint32_t)lane->max_message) {
            lane->stop = STOP_SERVER;
            return;
        }
        size_t size = (size_t)len + 1;
        if (buf_len(b) < size) {
            if (buf_reserve(b, size - buf_len(b)) < 0)
                lane->stop = STOP_NO_MEMORY;
            return;
        }
        const char *body = m + 5;
        size_t n = len - 4;
        Pending *p = front(lane);
        int kind = p ? p->kind : 0;
        int forward = 1, ok = 1;
        switch (type) {
        case 'D': /* DataRow: relayed as it came (its result shape passed, its values checked) */
            ok = (kind == K_EXECUTE || kind == K_QUERY) && (lane->shapes.n < 0 || row_clean(lane, body, n));
            break;
        case '2':
            ok = kind == K_BIND && n == 0;
            if (ok)
                pop(lane);
            break;
        case 'T':
            if (kind == K_QUERY) {
                ok = !p->completed && shape_passes(lane, m, size);
                break;
            }
            if (kind == K_DESCRIBE_STATEMENT) {
                ok = row_description_ok(body, n);
            } else {
                ok = (kind == K_DESCRIBE_PORTAL || kind == K_INJECT) && shape_passes(lane, m, size);
                forward = kind != K_INJECT;
            }
            if (ok)
                pop(lane);
            break;
        case 'n':
            ok = (kind == K_DESCRIBE_PORTAL || kind == K_DESCRIBE_STATEMENT || kind == K_INJECT) && n == 0;
            forward = kind != K_INJECT;
            if (ok)
                pop(lane);
            break;
        case 't':
            ok = kind == K_DESCRIBE_STATEMENT && parameter_description_ok(body, n);
            break;
        case 'C': {
            long long rows;
            ok = (kind == K_EXECUTE || (kind == K_QUERY && !p->completed)) && command_rows(body, n, &rows);
            if (ok) {
                if (record(lane, p, rows, NULL) < 0) {
                    lane->stop = STOP_NO_MEMORY;
                    return;
                }
                if (kind == K_QUERY)
                    p->completed = 1; /* ReadyForQuery ends it */
                else
                    pop(lane);
            }
            break;
        }
        case 'I':
        case 's':
            ok = (kind == K_EXECUTE || (kind == K_QUERY && !p->completed && type == 'I')) && n == 0;
            if (ok) {
                if (record(lane, p, -1, NULL) < 0) {
                    lane->stop = STOP_NO_MEMORY;
                    return;
                }
                if (kind == K_QUERY)
                    p->completed = 1;
                else
                    pop(lane);
            }
            break;
        case 'Z':
            ok = (kind == K_SYNC || kind == K_QUERY) && n == 1 && (body[0] == 'I' || body[0] == 'T' || body[0] == 'E');
            if (ok)
                pop(lane);
            break;
        case 'N':
            ok = fields_ok(body, n, NULL, 0, NULL);
            break;
        case 'A': {
            long c = cstr_len(body, n, 4);
            long pl = c < 0 ? -1 : cstr_len(body, n, 4 + (size_t)c + 1);
            ok = n >= 4 && pl >= 0 && 4 + (size_t)c + 1 + (size_t)pl + 1 == n && all_ascii(body + 4, n - 4);
            break;
        }
        case 'E': {
            char severity[16], sqlstate[6];
            ok = p && fields_ok(body, n, severity, sizeof severity, sqlstate)
                 && strcmp(severity, "FATAL") != 0 && strcmp(severity, "PANIC") != 0;
            if (!ok || (kind == K_QUERY && p->completed)) {
                ok = 0;
                break;
            }
            const Pending *failed = kind == K_EXECUTE || kind == K_QUERY ? p : NULL;
            for (size_t i = 0; !failed && i < lane->p_count; i++) { /* a Bind failed: the Execute it skips */
                const Pending *q = &lane->pending[(lane->p_head + i) % MAX_PENDING];
                if (q->kind == K_SYNC)
                    break;
                if (q->kind == K_EXECUTE)
                    failed = q;
            }
            if (failed && record(lane, failed, -1, sqlstate[0] ? sqlstate : NULL) < 0) {
                lane->stop = STOP_NO_MEMORY;
                return;
            }
            if (kind == K_QUERY) {
                p->completed = 1; /* ReadyForQuery follows */
                break;
            }
            /* extended protocol: the server skips everything up to the next Sync */
            while (lane->p_count && front(lane)->kind != K_SYNC)
                pop(lane);
            break;
        }
        default:
            ok = 0;
        }
        if (!ok) {
            lane->stop = STOP_SERVER;
            return;
        }
        if (forward && buf_append(&lane->cout, m, size) < 0) {
            lane->stop = STOP_NO_MEMORY;
            return;
        }
        buf_consume(b, size);
    }
}

/* ------------------------------------------------------------------ the loop (its own thread, no GIL) */

typedef struct {
    long token;
    Record r;
} OutRecord;

typedef struct {
    PyObject_HEAD
    pthread_t thread;
    int running;
    int epfd, wake_fd, notify_fd;
    pthread_mutex_t mu;
    /* under mu: from Python to the thread */
    Lane *adopting;
    long *recalls;
    size_t n_recalls, cap_recalls;
    int closing;
    /* under mu: from the thread to Python */
    OutRecord *out;
    size_t n_out, cap_out;
    Lane *done;
    int signalled;
    int owed;        /* records published but not signalled yet (REPORT_EVERY) */
    double last_signal;
    double report_every;
    size_t report_records; /* 0: no limit */
    int failed; /* the thread could not go on (no memory, epoll failed): every session came back */
    /* the thread's own */
    Lane *sessions;
    Lane *finishing;
    double next_deadline; /* the earliest of the sessions' deadlines (INFINITY: none) */
} LoopObject;

static void lane_free(Lane *lane) {
    if (!lane)
        return;
    for (size_t i = 0; i < lane->p_count; i++)
        free(lane->pending[(lane->p_head + i) % MAX_PENDING].text);
    for (Py_ssize_t i = 0; i < lane->n_records; i++)
        free(lane->records[i].text);
    free(lane->key.p);
    free(lane->blob);
    free(lane->cin.p);
    free(lane->sin.p);
    free(lane->cout.p);
    free(lane->sout.p);
    free(lane->records);
    for (int side = CLIENT; side <= SERVER; side++) {
        free(lane->wire[side].p);
        Py_XDECREF(lane->tls_owner[side]); /* every caller holds the GIL */
    }
    free(lane);
}

static void signal_python(LoopObject *L) { /* under mu */
    L->owed = 0;
    if (!L->signalled) {
        uint64_t one = 1;
        L->signalled = 1;
        L->last_signal = now_clock(CLOCK_MONOTONIC);
        if (write(L->notify_fd, &one, sizeof one) < 0) {
            /* an eventfd only refuses at 2^64-1: cannot happen with the flag above */
        }
    }
}

/* Records waiting: signal now (report_every has passed since the last signal, or report_records
 * wait), or later. */
static void owe_python(LoopObject *L) { /* under mu */
    if (L->signalled)
        return;
    if ((L->report_records && L->n_out >= L->report_records) ||
        now_clock(CLOCK_MONOTONIC) - L->last_signal >= L->report_every)
        signal_python(L);
    else
        L->owed = 1;
}

/* Hand this session's finished statements to Python. */
static void publish_records(LoopObject *L, Lane *lane) {
    if (!lane->n_records)
        return;
    pthread_mutex_lock(&L->mu);
    size_t need = L->n_out + (size_t)lane->n_records;
    if (need > L->cap_out) {
        size_t cap = L->cap_out ? L->cap_out : 256;
        while (cap < need)
            cap *= 2;
        OutRecord *out = realloc(L->out, cap * sizeof(OutRecord));
        if (!out) {
            pthread_mutex_unlock(&L->mu);
            lane->stop = STOP_NO_MEMORY; /* the records stay with the session: Python gets them with it */
            return;
        }
        L->out = out;
        L->cap_out = cap;
    }
    for (Py_ssize_t i = 0; i < lane->n_records; i++) {
        L->out[L->n_out].token = lane->token;
        L->out[L->n_out].r = lane->records[i];
        L->n_out++;
    }
    lane->n_records = 0;
    owe_python(L);
    pthread_mutex_unlock(&L->mu);
}

static int watch(LoopObject *L, Lane *lane, int side, uint32_t want) {
    if (lane->mask[side] == want)
        return 0;
    struct epoll_event ev = {.events = want, .data.ptr = &lane->sides[side]};
    int fd = side == CLIENT ? lane->client_fd : lane->server_fd;
    if (epoll_ctl(L->epfd, EPOLL_CTL_MOD, fd, &ev) < 0)
        return -1;
    lane->mask[side] = want;
    return 0;
}

/* The session goes back to Python at the end of this batch of events (events later in the
 * batch may still name it: it is freed only once Python has it). */
static void finish(LoopObject *L, Lane *lane) {
    if (lane->finished)
        return;
    lane->finished = 1;
    epoll_ctl(L->epfd, EPOLL_CTL_DEL, lane->client_fd, NULL);
    epoll_ctl(L->epfd, EPOLL_CTL_DEL, lane->server_fd, NULL);
    for (Lane **at = &L->sessions; *at; at = &(*at)->next)
        if (*at == lane) {
            *at = lane->next;
            break;
        }
    lane->next = L->finishing;
    L->finishing = lane;
}

static void publish_finished(LoopObject *L) {
    if (!L->finishing)
        return;
    pthread_mutex_lock(&L->mu);
    while (L->finishing) { /* reversed into FIFO order below: stays in the order they finished */
        Lane *lane = L->finishing;
        L->finishing = lane->next;
        lane->next = L->done;
        L->done = lane;
    }
    signal_python(L);
    pthread_mutex_unlock(&L->mu);
}

/* Whether the client's bytes may grow: below the high-water mark, or short of one whole message
 * (a Bind with large parameters may be bigger than the mark; max_message bounds it). */
static int client_room(const Lane *lane) {
    const Buf *b = &lane->cin;
    size_t have = buf_len(b), limit = HIGH_WATER;
    if (have >= 5) {
        size_t need = (size_t)be32(b->p + b->start + 1) + 1;
        if (need > limit)
            limit = need;
    }
    return have < limit;
}

/* A side's bytes in, as plaintext: 1 data, 0 nothing now, -1 EOF, -2 error, -3 no memory. */
static int side_recv(Lane *lane, int side) {
    Buf *in = side == CLIENT ? &lane->cin : &lane->sin;
    int fd = side == CLIENT ? lane->client_fd : lane->server_fd;
    void *ssl = lane->tls[side];
    if (!ssl)
        return buf_recv(in, fd);
    char wire[READ_CHUNK]; /* on the lane thread's stack (glibc: 2 MiB at least) */
    ssize_t n = recv(fd, wire, sizeof wire, MSG_DONTWAIT);
    int got;
    if (n > 0)
        got = tls_feed(ssl, wire, (size_t)n) < 0 ? -3 : 1;
    else if (n == 0)
        got = -1;
    else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        got = 0;
    else
        return -2;
    if (got == -3)
        return got;
    int pulled = tls_pull(ssl, in, &lane->wire[side]); /* the plaintext before an EOF still counts */
    return pulled < 0 ? pulled : got;
}

/* A side's relayed bytes out (encrypted first on a TLS side): 0 fine, -2 error, -3 no memory. */
static int side_send(Lane *lane, int side) {
    Buf *out = side == CLIENT ? &lane->cout : &lane->sout;
    int fd = side == CLIENT ? lane->client_fd : lane->server_fd;
    if (!lane->tls[side])
        return buf_send(out, fd) < 0 ? -2 : 0;
    int sealed = tls_seal(lane->tls[side], out, &lane->wire[side]);
    if (sealed < 0)
        return sealed;
    return buf_send(&lane->wire[side], fd) < 0 ? -2 : 0;
}

/* Bytes relayed to a side that its socket has not taken yet. */
static size_t unsent(const Lane *lane, int side) {
    return buf_len(side == CLIENT ? &lane->cout : &lane->sout) + buf_len(&lane->wire[side]);
}

static int stop_for(int side, int rc) {
    if (rc == -3)
        return STOP_NO_MEMORY;
    if (rc == -1)
        return side == CLIENT ? STOP_CLIENT_EOF : STOP_SERVER_EOF;
    return side == CLIENT ? STOP_CLIENT_ERROR : STOP_SERVER_ERROR;
}

/* Relay what the buffers allow, then stop the session or watch for what it needs next. */
static void advance(LoopObject *L, Lane *lane) {
    if (!lane->stop)
        from_client(lane);
    if (!lane->stop)
        from_server(lane);
    for (int side = SERVER, rc; side >= CLIENT; side--)
        if (!lane->stop && (rc = side_send(lane, side)) < 0)
            lane->stop = stop_for(side, rc);
    /* back to Python at once, with what is in flight: the server may be waiting for the very
     * Sync that sits behind the message the lane stopped at */
    if (!lane->stop && lane->client_stopped)
        lane->stop = STOP_CLIENT;
    publish_records(L, lane);
    if (!lane->stop) {
        int room = lane->p_count + 2 <= MAX_PENDING && client_room(lane) && unsent(lane, SERVER) < HIGH_WATER;
        uint32_t client = (!lane->client_stopped && room ? EPOLLIN : 0) | (unsent(lane, CLIENT) ? EPOLLOUT : 0);
        uint32_t server = (unsent(lane, CLIENT) < HIGH_WATER ? EPOLLIN : 0) | (unsent(lane, SERVER) ? EPOLLOUT : 0);
        if (watch(L, lane, CLIENT, client) < 0 || watch(L, lane, SERVER, server) < 0)
            lane->stop = STOP_NO_MEMORY;
    }
    if (lane->stop)
        finish(L, lane);
}

static void on_event(LoopObject *L, Side *side, uint32_t events) {
    Lane *lane = side->lane;
    if (lane->finished)
        return;
    if (side->side == SERVER) {
        if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
            int got = side_recv(lane, SERVER);
            if (got < 0) {
                from_server(lane); /* what came before the end still goes out */
                if (!lane->stop)
                    lane->stop = stop_for(SERVER, got);
            }
        }
    } else if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        if (lane->mask[CLIENT] & EPOLLIN) {
            int got = side_recv(lane, CLIENT);
            if (got == 1)
                lane->last_client = now_clock(CLOCK_MONOTONIC);
            else if (got < 0)
                lane->stop = stop_for(CLIENT, got);
        } else if (events & (EPOLLERR | EPOLLHUP)) {
            lane->stop = STOP_SLICE; /* the client went away while not read: Python sees to it */
        }
    }
    advance(L, lane);
}

static void adopt(LoopObject *L, Lane *lane) {
    lane->sides[CLIENT] = (Side){lane, CLIENT};
    lane->sides[SERVER] = (Side){lane, SERVER};
    lane->mask[CLIENT] = lane->mask[SERVER] = EPOLLIN;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &lane->sides[CLIENT]};
    lane->next = L->sessions;
    L->sessions = lane;
    if (epoll_ctl(L->epfd, EPOLL_CTL_ADD, lane->client_fd, &ev) < 0) {
        lane->stop = STOP_CLIENT_ERROR;
        lane->finished = 1; /* nothing registered: only unlink it */
        L->sessions = lane->next;
        lane->next = L->finishing;
        L->finishing = lane;
        return;
    }
    ev.data.ptr = &lane->sides[SERVER];
    if (epoll_ctl(L->epfd, EPOLL_CTL_ADD, lane->server_fd, &ev) < 0) {
        lane->stop = STOP_SERVER_ERROR;
        finish(L, lane);
        return;
    }
    if (lane->deadline < L->next_deadline)
        L->next_deadline = lane->deadline;
    for (int side = CLIENT, rc; side <= SERVER; side++) /* whole records Python left in the BIO */
        if (lane->tls[side] && !lane->stop
            && (rc = tls_pull(lane->tls[side], side == CLIENT ? &lane->cin : &lane->sin, &lane->wire[side])) < 0)
            lane->stop = stop_for(side, rc);
    advance(L, lane); /* the bytes Python had already read */
}

/* The time each session's shapes hold (or a recall): then it goes back to Python as it stands. */
static int deadlines(LoopObject *L) {
    double now = now_clock(CLOCK_MONOTONIC), next = INFINITY;
    if (now < L->next_deadline) { /* nothing due: no walk over every session */
        double ms = (L->next_deadline - now) * 1000.0;
        return isinf(L->next_deadline) ? -1 : ms > 60000 ? 60000 : (int)ms + 1;
    }
    Lane *lane = L->sessions;
    while (lane) {
        Lane *following = lane->next; /* finish() unlinks */
        if (lane->deadline <= now) {
            lane->stop = STOP_SLICE;
            finish(L, lane);
        }
        if (!lane->finished && lane->deadline < next)
            next = lane->deadline;
        lane = following;
    }
    L->next_deadline = next;
    if (isinf(next))
        return -1;
    double ms = (next - now) * 1000.0;
    return ms <= 0 ? 0 : ms > 60000 ? 60000 : (int)ms + 1;
}

static void *loop_main(void *arg) {
    LoopObject *L = arg;
    struct epoll_event events[64];
    int timeout = -1;
    for (;;) {
        int n = epoll_wait(L->epfd, events, 64, timeout);
        if (n < 0 && errno != EINTR) {
            pthread_mutex_lock(&L->mu);
            L->failed = 1;
            L->closing = 1;
            pthread_mutex_unlock(&L->mu);
            n = 0;
        }
        int woken = 0;
        for (int i = 0; i < n; i++) {
            if (events[i].data.ptr == NULL)
                woken = 1;
            else
                on_event(L, events[i].data.ptr, events[i].events);
        }
        pthread_mutex_lock(&L->mu);
        int closing = L->closing;
        Lane *adopting = L->adopting;
        L->adopting = NULL;
        size_t n_recalls = 0;
        long recalls[64];
        if (woken) {
            uint64_t count;
            if (read(L->wake_fd, &count, sizeof count) < 0) {
                /* nothing to reset */
            }
            n_recalls = L->n_recalls < 64 ? L->n_recalls : 64;
            memcpy(recalls, L->recalls, n_recalls * sizeof(long));
            memmove(L->recalls, L->recalls + n_recalls, (L->n_recalls - n_recalls) * sizeof(long));
            L->n_recalls -= n_recalls;
            if (L->n_recalls) { /* more than one batch: wake again for the rest */
                uint64_t one = 1;
                if (write(L->wake_fd, &one, sizeof one) < 0) {
                }
            }
        }
        pthread_mutex_unlock(&L->mu);
        while (adopting) { /* oldest first does not matter: each is a session of its own */
            Lane *lane = adopting;
            adopting = lane->next;
            adopt(L, lane);
        }
        for (size_t i = 0; i < n_recalls; i++)
            for (Lane *lane = L->sessions; lane; lane = lane->next)
                if (lane->token == recalls[i]) {
                    lane->deadline = L->next_deadline = 0; /* deadlines() sends it back */
                    break;
                }
        if (closing) {
            while (L->sessions) {
                Lane *lane = L->sessions;
                lane->stop = STOP_SLICE;
                finish(L, lane);
            }
            publish_finished(L);
            return NULL;
        }
        timeout = deadlines(L);
        publish_finished(L);
        pthread_mutex_lock(&L->mu);
        if (L->owed) {
            owe_python(L);
            if (L->owed) {
                int ms = (int)((L->last_signal + L->report_every - now_clock(CLOCK_MONOTONIC)) * 1000.0) + 1;
                timeout = timeout < 0 || ms < timeout ? ms : timeout;
            }
        }
        pthread_mutex_unlock(&L->mu);
    }
}

/* ------------------------------------------------------------------ Python */

static PyObject *buf_bytes(const Buf *b) {
    return PyBytes_FromStringAndSize(b->p ? b->p + b->start : "", (Py_ssize_t)buf_len(b));
}

static PyObject *record_tuple(long token, const Record *r) {
    PyObject *rows = r->rows < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(r->rows);
    PyObject *state = r->sqlstate[0] ? PyUnicode_FromString(r->sqlstate) : Py_NewRef(Py_None);
    PyObject *text = r->text ? PyBytes_FromStringAndSize(r->text, (Py_ssize_t)r->text_len) : Py_NewRef(Py_None);
    PyObject *item = rows && state && text
                         ? Py_BuildValue("(liddOOO)", token, r->statement, r->wall, r->seconds, rows, state, text)
                         : NULL;
    Py_XDECREF(rows);
    Py_XDECREF(state);
    Py_XDECREF(text);
    return item;
}

/* A session handed back: (token, (stop, client_rest, server_rest, to_client, to_server,
 * pending, bound, last_client)). Records it still holds (no memory to publish them) go first
 * into ``records``. */
static PyObject *done_tuple(Lane *lane, PyObject *records) {
    for (Py_ssize_t i = 0; i < lane->n_records; i++) {
        PyObject *item = record_tuple(lane->token, &lane->records[i]);
        if (!item || PyList_Append(records, item) < 0) {
            Py_XDECREF(item);
            return NULL;
        }
        Py_DECREF(item);
    }
    PyObject *pending = PyList_New((Py_ssize_t)lane->p_count);
    if (!pending)
        return NULL;
    for (size_t i = 0; i < lane->p_count; i++) {
        Pending *p = &lane->pending[(lane->p_head + i) % MAX_PENDING];
        PyObject *text = p->text ? PyBytes_FromStringAndSize(p->text, (Py_ssize_t)p->text_len) : Py_NewRef(Py_None);
        PyObject *item = text ? Py_BuildValue("(iildOi)", p->kind, p->statement, p->serial, p->started, text,
                                              p->completed)
                              : NULL;
        Py_XDECREF(text);
        if (!item) {
            Py_DECREF(pending);
            return NULL;
        }
        PyList_SET_ITEM(pending, (Py_ssize_t)i, item);
    }
    for (int side = CLIENT, rc; side <= SERVER; side++) /* a TLS side's unsent bytes go back as ciphertext */
        if (lane->tls[side]
            && (rc = tls_seal(lane->tls[side], side == CLIENT ? &lane->cout : &lane->sout, &lane->wire[side])) < 0)
            lane->stop = stop_for(side, rc); /* what could not be encrypted is lost with the session */
    PyObject *bound = lane->serial ? Py_BuildValue("(li)", lane->serial, lane->bound_statement) : Py_NewRef(Py_None);
    PyObject *cin = buf_bytes(&lane->cin), *sin = buf_bytes(&lane->sin);
    PyObject *cout = buf_bytes(lane->tls[CLIENT] ? &lane->wire[CLIENT] : &lane->cout);
    PyObject *sout = buf_bytes(lane->tls[SERVER] ? &lane->wire[SERVER] : &lane->sout);
    PyObject *result = NULL;
    if (bound && cin && sin && cout && sout)
        result = Py_BuildValue("(l(iOOOOOOdi))", lane->token, lane->stop, cin, sin, cout, sout, pending, bound,
                               lane->last_client, lane->shape);
    Py_XDECREF(bound);
    Py_XDECREF(cin);
    Py_XDECREF(sin);
    Py_XDECREF(cout);
    Py_XDECREF(sout);
    Py_DECREF(pending);
    return result;
}

/* Copy a tuple of bytes into ``blob`` at ``*used``: a table of pointers into the copy. */
static void copy_bytes_tuple(PyObject *tuple, char *blob, size_t *used, Table *t) {
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    t->items = (const char **)(blob + *used);
    *used += ((size_t)n + 1) * sizeof(char *);
    t->lens = (size_t *)(blob + *used);
    *used += ((size_t)n + 1) * sizeof(size_t);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, i);
        size_t len = (size_t)PyBytes_GET_SIZE(item);
        memcpy(blob + *used, PyBytes_AS_STRING(item), len);
        t->items[i] = blob + *used;
        t->lens[i] = len;
        *used += (len + 7) & ~(size_t)7;
    }
    t->n = n;
}

static size_t tuple_size(PyObject *tuple) {
    size_t size = ((size_t)PyTuple_GET_SIZE(tuple) + 1) * (sizeof(char *) + sizeof(size_t));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++)
        size += ((size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(tuple, i)) + 7) & ~(size_t)7;
    return size;
}

static int all_bytes(PyObject *tuple, const char *what) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++)
        if (!PyBytes_Check(PyTuple_GET_ITEM(tuple, i))) {
            PyErr_Format(PyExc_TypeError, "%s must be a tuple of bytes", what);
            return 0;
        }
    return 1;
}

static void wake(LoopObject *L) {
    uint64_t one = 1;
    if (write(L->wake_fd, &one, sizeof one) < 0) {
        /* the counter is far from full: the thread reads it on every wake */
    }
}

static PyObject *loop_adopt(LoopObject *L, PyObject *args) {
    long token, max_message;
    int client_fd, server_fd, inject;
    Py_buffer client_bytes, server_bytes;
    PyObject *statements, *queries, *shapes, *tls_owner[2] = {Py_None, Py_None}, *filters = Py_None;
    double seconds;
    if (!PyArg_ParseTuple(args, "liiy*y*O!O!Opld|OOO", &token, &client_fd, &server_fd, &client_bytes, &server_bytes,
                          &PyTuple_Type, &statements, &PyTuple_Type, &queries, &shapes, &inject, &max_message,
                          &seconds, &tls_owner[CLIENT], &tls_owner[SERVER], &filters))
        return NULL;
    Lane *lane = NULL;
    PyObject *result = NULL;
    if (!L->running) {
        PyErr_SetString(PyExc_RuntimeError, "the lane is closed");
        goto done;
    }
    if (shapes != Py_None && !PyTuple_Check(shapes)) {
        PyErr_SetString(PyExc_TypeError, "shapes must be a tuple of bytes or None");
        goto done;
    }
    if (shapes != Py_None
        && (!PyTuple_Check(filters) || PyTuple_GET_SIZE(filters) != PyTuple_GET_SIZE(shapes))) {
        PyErr_SetString(PyExc_TypeError, "filters must be a tuple of bytes, one per shape");
        goto done;
    }
    if (!all_bytes(statements, "statements") || !all_bytes(queries, "queries")
        || (shapes != Py_None && (!all_bytes(shapes, "shapes") || !all_bytes(filters, "filters"))))
        goto done;
    lane = calloc(1, sizeof(Lane));
    size_t size = tuple_size(statements) + tuple_size(queries)
                  + (shapes != Py_None ? tuple_size(shapes) + tuple_size(filters) : 0);
    size_t used = 0;
    if (!lane || !(lane->blob = malloc(size ? size : 1))) {
        PyErr_NoMemory();
        goto done;
    }
    copy_bytes_tuple(statements, lane->blob, &used, &lane->statements);
    copy_bytes_tuple(queries, lane->blob, &used, &lane->queries);
    lane->shapes.n = -1;
    lane->shape = -1;
    if (shapes != Py_None) {
        copy_bytes_tuple(shapes, lane->blob, &used, &lane->shapes);
        copy_bytes_tuple(filters, lane->blob, &used, &lane->filters);
    }
    if (buf_append(&lane->cin, client_bytes.buf, (size_t)client_bytes.len) < 0
        || buf_append(&lane->sin, server_bytes.buf, (size_t)server_bytes.len) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    for (int side = CLIENT; side <= SERVER; side++)
        if (tls_owner[side] != Py_None) {
            if (!(lane->tls[side] = tls_ssl_of(tls_owner[side]))) {
                PyErr_SetString(PyExc_TypeError, "the lane cannot drive this TLS object");
                goto done;
            }
            lane->tls_owner[side] = Py_NewRef(tls_owner[side]);
        }
    lane->token = token;
    lane->client_fd = client_fd;
    lane->server_fd = server_fd;
    lane->inject = inject;
    lane->max_message = max_message;
    lane->deadline = now_clock(CLOCK_MONOTONIC) + seconds;
    pthread_mutex_lock(&L->mu);
    int closing = L->closing;
    if (!closing) {
        lane->next = L->adopting;
        L->adopting = lane;
    }
    pthread_mutex_unlock(&L->mu);
    if (closing) {
        PyErr_SetString(PyExc_RuntimeError, "the lane is closed");
        goto done;
    }
    lane = NULL;
    wake(L);
    result = Py_NewRef(Py_None);
done:
    lane_free(lane);
    PyBuffer_Release(&client_bytes);
    PyBuffer_Release(&server_bytes);
    return result;
}

static PyObject *loop_recall(LoopObject *L, PyObject *arg) {
    long token = PyLong_AsLong(arg);
    if (token == -1 && PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&L->mu);
    if (L->n_recalls == L->cap_recalls) {
        size_t cap = L->cap_recalls ? L->cap_recalls * 2 : 16;
        long *recalls = realloc(L->recalls, cap * sizeof(long));
        if (!recalls) {
            pthread_mutex_unlock(&L->mu);
            return PyErr_NoMemory();
        }
        L->recalls = recalls;
        L->cap_recalls = cap;
    }
    L->recalls[L->n_recalls++] = token;
    pthread_mutex_unlock(&L->mu);
    wake(L);
    Py_RETURN_NONE;
}

static int add_count(PyObject *counts, long token, long long n) {
    PyObject *key = PyLong_FromLong(token);
    PyObject *had = key ? PyDict_GetItemWithError(counts, key) : NULL;
    PyObject *sum = key && !PyErr_Occurred() ? PyLong_FromLongLong((had ? PyLong_AsLongLong(had) : 0) + n) : NULL;
    int ok = sum ? PyDict_SetItem(counts, key, sum) : -1;
    Py_XDECREF(key);
    Py_XDECREF(sum);
    return ok;
}

/* The shapes a session's records are sealed with: shapes[token] is (statement shapes, query
 * shapes); NULL when it has none. */
static PyObject *session_shapes(PyObject *shapes, long token) {
    PyObject *key = PyLong_FromLong(token);
    PyObject *entry = key ? PyDict_GetItemWithError(shapes, key) : NULL;
    Py_XDECREF(key);
    return entry && PyTuple_Check(entry) && PyTuple_GET_SIZE(entry) == 2 ? entry : NULL;
}

/* A record's shape among its session's; NULL: none. */
static PyObject *record_shape(PyObject *entry, const Record *r) {
    PyObject *table = entry ? PyTuple_GET_ITEM(entry, r->text ? 1 : 0) : NULL;
    if (!table || !PyTuple_Check(table) || r->statement < 0 || r->statement >= PyTuple_GET_SIZE(table))
        return NULL;
    return PyTuple_GET_ITEM(table, r->statement);
}

/* Latency buckets of the records sealed here (Prometheus' histogram: the first upper bound not
 * below each), for Python to add to its histogram at once. */
typedef struct {
    const double *bounds;
    Py_ssize_t n;
    long long *counts;
    double total;
} Buckets;

static void bucket_add(Buckets *b, double seconds) {
    if (!b->n)
        return;
    b->total += seconds;
    for (Py_ssize_t i = 0; i < b->n; i++)
        if (seconds <= b->bounds[i]) {
            b->counts[i]++;
            return;
        }
}

/* Seal the longest run of records from the first that have a shape (see _seal.c); the count of
 * records sealed (0 when none could be, the chain then as it was). */
static size_t seal_records(PyObject *sealer, PyObject *chain, PyObject *shapes, const OutRecord *out, size_t n_out,
                           Buf *lines, PyObject *counts, Buckets *buckets) {
    SealChain c;
    if (seal_chain_read(chain, &c) < 0) {
        PyErr_WriteUnraisable(chain);
        return 0;
    }
    size_t i = 0;
    long last_token = 0;
    long long run = 0; /* records of last_token in a row, added to counts when the token changes */
    PyObject *entry = NULL; /* last_token's shapes, looked up once per run of its records */
    while (i < n_out) {
        const Record *r = &out[i].r;
        if (!run || out[i].token != last_token)
            entry = session_shapes(shapes, out[i].token);
        PyObject *shape = record_shape(entry, r);
        SealRun one = {r->wall, r->seconds, r->rows, r->sqlstate, r->text, r->text_len};
        if (!shape || seal_one(sealer, &c, shape, &one, lines) != 1)
            break;
        i++;
        bucket_add(buckets, r->seconds);
        if (run && out[i - 1].token != last_token) {
            int failed = add_count(counts, last_token, run) < 0;
            run = 0;
            if (failed)
                break; /* no memory: the lines stay, the sessions' counts fall short */
        }
        last_token = out[i - 1].token;
        run++;
    }
    if (run)
        add_count(counts, last_token, run);
    if (PyErr_Occurred())
        PyErr_WriteUnraisable(chain);
    if (i && seal_chain_write(chain, &c) < 0) { /* not advanced: its lines must not be written either */
        PyErr_WriteUnraisable(chain);
        lines->end = 0;
        PyDict_Clear(counts);
        i = 0;
    }
    seal_chain_free(&c);
    return i;
}

/* Sealing (sealer not NULL): (lines, sealed, counts, buckets, records, done); else (records, done). */
static PyObject *drain(LoopObject *L, PyObject *sealer, PyObject *chain, PyObject *shapes, Buckets *buckets) {
    pthread_mutex_lock(&L->mu);
    uint64_t count;
    if (read(L->notify_fd, &count, sizeof count) < 0) {
        /* not signalled: nothing to reset */
    }
    L->signalled = 0;
    OutRecord *out = L->out;
    size_t n_out = L->n_out;
    Lane *done = L->done;
    L->out = NULL;
    L->n_out = L->cap_out = 0;
    L->done = NULL;
    pthread_mutex_unlock(&L->mu);
    PyObject *records = PyList_New(0), *finished = PyList_New(0), *result = NULL;
    PyObject *counts = sealer ? PyDict_New() : NULL;
    Buf lines = {0};
    /* ``done`` is newest first: back to the order the sessions finished in */
    Lane *ordered = NULL;
    while (done) {
        Lane *lane = done;
        done = lane->next;
        lane->next = ordered;
        ordered = lane;
    }
    int ok = records && finished && (!sealer || counts);
    size_t sealed = ok && sealer ? seal_records(sealer, chain, shapes, out, n_out, &lines, counts, buckets) : 0;
    for (size_t i = 0; i < n_out; i++) {
        if (ok && i >= sealed) {
            PyObject *item = record_tuple(out[i].token, &out[i].r);
            ok = item && PyList_Append(records, item) == 0;
            Py_XDECREF(item);
        }
        free(out[i].r.text);
    }
    while (ordered) {
        Lane *lane = ordered;
        ordered = lane->next;
        if (ok) {
            PyObject *item = done_tuple(lane, records);
            ok = item && PyList_Append(finished, item) == 0;
            Py_XDECREF(item);
        }
        lane_free(lane);
    }
    free(out);
    PyObject *histogram = NULL;
    if (ok && sealer && buckets->n) {
        PyObject *by_bucket = PyList_New(buckets->n);
        for (Py_ssize_t i = 0; by_bucket && i < buckets->n; i++) {
            PyObject *n = PyLong_FromLongLong(buckets->counts[i]);
            if (!n) {
                Py_CLEAR(by_bucket);
                break;
            }
            PyList_SET_ITEM(by_bucket, i, n);
        }
        histogram = by_bucket ? Py_BuildValue("(Nd)", by_bucket, buckets->total) : NULL;
        ok = histogram != NULL;
    }
    if (ok && !sealer)
        result = PyTuple_Pack(2, records, finished);
    else if (ok)
        result = Py_BuildValue("(y#nOOOO)", lines.p ? lines.p : "", (Py_ssize_t)lines.end, (Py_ssize_t)sealed, counts,
                               histogram ? histogram : Py_None, records, finished);
    free(lines.p);
    Py_XDECREF(histogram);
    Py_XDECREF(records);
    Py_XDECREF(finished);
    Py_XDECREF(counts);
    return result;
}

static PyObject *loop_drain(LoopObject *L, PyObject *Py_UNUSED(ignored)) { return drain(L, NULL, NULL, NULL, NULL); }

/* drain_sealed(sealer, chain, shapes, bounds): bounds are the latency histogram's upper bounds
 * (or None: no histogram), whose per-bucket counts and sum come back for the sealed records. */
static PyObject *loop_drain_sealed(LoopObject *L, PyObject *args) {
    PyObject *sealer, *chain, *shapes, *bounds;
    if (!PyArg_ParseTuple(args, "O!OO!O", &SealerType, &sealer, &chain, &PyDict_Type, &shapes, &bounds))
        return NULL;
    if (bounds != Py_None && !PyTuple_Check(bounds))
        return PyErr_Format(PyExc_TypeError, "bounds: a tuple of floats or None");
    Buckets buckets = {0};
    Py_ssize_t n = bounds == Py_None ? 0 : PyTuple_GET_SIZE(bounds);
    double *edges = calloc((size_t)n + 1, sizeof(double));
    long long *per_bucket = calloc((size_t)n + 1, sizeof(long long));
    PyObject *result = NULL;
    if (!edges || !per_bucket) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if ((edges[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i))) == -1.0 && PyErr_Occurred())
            goto done;
    buckets = (Buckets){edges, n, per_bucket, 0.0};
    result = drain(L, sealer, chain, shapes, &buckets);
done:
    free(edges);
    free(per_bucket);
    return result;
}

static PyObject *loop_fileno(LoopObject *L, PyObject *Py_UNUSED(ignored)) { return PyLong_FromLong(L->notify_fd); }

static void loop_stop(LoopObject *L) {
    if (!L->running)
        return;
    pthread_mutex_lock(&L->mu);
    L->closing = 1;
    pthread_mutex_unlock(&L->mu);
    wake(L);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(L->thread, NULL);
    Py_END_ALLOW_THREADS
    L->running = 0;
}

static PyObject *loop_close(LoopObject *L, PyObject *Py_UNUSED(ignored)) {
    loop_stop(L);
    Py_RETURN_NONE;
}

static PyObject *loop_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"report_every", "report_records", NULL};
    double report_every = 0.001;
    Py_ssize_t report_records = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|dn:Loop", kwlist, &report_every, &report_records))
        return NULL;
    LoopObject *L = (LoopObject *)type->tp_alloc(type, 0);
    if (!L)
        return NULL;
    L->report_every = report_every > 0 ? report_every : 0;
    L->report_records = report_records > 0 ? (size_t)report_records : 0;
    L->epfd = L->wake_fd = L->notify_fd = -1;
    pthread_mutex_init(&L->mu, NULL);
    L->epfd = epoll_create1(EPOLL_CLOEXEC);
    L->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    L->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (L->epfd < 0 || L->wake_fd < 0 || L->notify_fd < 0 || epoll_ctl(L->epfd, EPOLL_CTL_ADD, L->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(L);
        return NULL;
    }
    L->next_deadline = INFINITY;
    int err = pthread_create(&L->thread, NULL, loop_main, L);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(L);
        return NULL;
    }
    pthread_setname_np(L->thread, LANE_THREAD_NAME); /* how tools (bench/, top -H) tell its CPU apart */
    L->running = 1;
    return (PyObject *)L;
}

static void loop_dealloc(LoopObject *L) {
    loop_stop(L);
    for (Lane *lists[2] = {L->adopting, L->done}, **list = lists; list < lists + 2; list++)
        while (*list) {
            Lane *lane = *list;
            *list = lane->next;
            lane_free(lane);
        }
    free(L->out);
    free(L->recalls);
    if (L->epfd >= 0)
        close(L->epfd);
    if (L->wake_fd >= 0)
        close(L->wake_fd);
    if (L->notify_fd >= 0)
        close(L->notify_fd);
    pthread_mutex_destroy(&L->mu);
    Py_TYPE(L)->tp_free((PyObject *)L);
}

static PyMethodDef loop_methods[] = {
    {"adopt", (PyCFunction)loop_adopt, METH_VARARGS, "Relay a session's steady state from now on."},
    {"recall", (PyCFunction)loop_recall, METH_O, "Send a session back to Python."},
    {"drain", (PyCFunction)loop_drain, METH_NOARGS, "What the lane has for Python: (records, done)."},
    {"drain_sealed", (PyCFunction)loop_drain_sealed, METH_VARARGS,
     "drain(), sealing the records that have a shape: (lines, sealed, counts, buckets, records, done)."},
    {"fileno", (PyCFunction)loop_fileno, METH_NOARGS, "Readable when drain() has something."},
    {"close", (PyCFunction)loop_close, METH_NOARGS, "Every session back to Python; the thread ends."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidegate_proxy._lane.Loop",
    .tp_basicsize = sizeof(LoopObject),
    .tp_dealloc = (destructor)loop_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The native lane's thread and the sessions in it.",
    .tp_methods = loop_methods,
    .tp_new = loop_new,
};

static PyObject *module_literal_key(PyObject *Py_UNUSED(module), PyObject *arg) {
    char *text;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(arg, &text, &n) < 0)
        return NULL;
    Buf key = {0};
    long len = literal_key(text, (size_t)n, &key);
    PyObject *result = len < 0 ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize(key.p ? key.p : "", len);
    free(key.p);
    return result;
}

static PyObject *module_tls_ready(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored)) {
    return PyBool_FromLong(tls_ready());
}

static PyObject *module_tls_drivable(PyObject *Py_UNUSED(module), PyObject *arg) {
    return PyBool_FromLong(tls_ssl_of(arg) != NULL);
}

static PyMethodDef module_methods[] = {
    {"tls_ready", module_tls_ready, METH_NOARGS, "Whether the lane can drive TLS sessions (libssl found)."},
    {"tls_drivable", module_tls_drivable, METH_O, "Whether adopt() can drive this ssl.SSLObject._sslobj."},
    {"literal_key", module_literal_key, METH_O, "The key a simple query's shape is known by in the lane, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sidegate_proxy._lane", "The native lane of PostgreSQL sessions.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__lane(void) {
    if (PyType_Ready(&LoopType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Loop", (PyObject *)&LoopType) < 0 || seal_module_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    static const struct {
        const char *name;
        int value;
    } constants[] = {
        {"BIND", K_BIND}, {"DESCRIBE_PORTAL", K_DESCRIBE_PORTAL}, {"DESCRIBE_STATEMENT", K_DESCRIBE_STATEMENT},
        {"INJECT", K_INJECT}, {"EXECUTE", K_EXECUTE}, {"SYNC", K_SYNC}, {"QUERY", K_QUERY},
        {"STOP_CLIENT", STOP_CLIENT}, {"STOP_SERVER", STOP_SERVER}, {"STOP_SLICE", STOP_SLICE},
        {"STOP_CLIENT_EOF", STOP_CLIENT_EOF}, {"STOP_SERVER_EOF", STOP_SERVER_EOF},
        {"STOP_CLIENT_ERROR", STOP_CLIENT_ERROR}, {"STOP_SERVER_ERROR", STOP_SERVER_ERROR},
        {"STOP_NO_MEMORY", STOP_NO_MEMORY},
    };
    if (PyModule_AddStringConstant(m, "THREAD_NAME", LANE_THREAD_NAME) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++)
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    return m;
}
