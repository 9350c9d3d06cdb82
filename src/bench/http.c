/*
 * The load generator's HTTP/1.1 client: bufferevents and a small response parser.
 *
 * Why not evhttp's client: a load generator needs the arrival time of every SSE chunk, the
 * response headers of a stream (the serving instance), a hard per-request deadline that
 * cancels cleanly, and a retry when a pooled keep-alive connection turns out to be closed by
 * the server. Each is a few lines here; bench/client_ceiling.c measures the result against a
 * trivial upstream (docs/benchmarks.md).
 *
 * Life of a request: bench_http_send formats the whole request once (`wire`), takes an idle pooled
 * connection to the target or opens one, and writes it. The parser walks
 * STATUS -> HEADERS -> body (chunked, Content-Length, or until close) and feeds body bytes to
 * the SSE splitter (events go to on_event) or to a body buffer. When the response is
 * complete the connection goes back to the pool (keep-alive) or is closed, and on_done runs.
 * A connection that fails before any response byte, if it was a reused one, is retried once
 * on a fresh connection.
 */
#define _GNU_SOURCE /* strcasestr */
#include "bench_http.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/util.h>

#include <ctype.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#define MAX_HEAD_BYTES (64 * 1024)
#define MAX_BODY_BYTES (1024 * 1024)
#define MAX_TARGETS BENCH_MAX_TARGETS

typedef enum {
    P_STATUS,
    P_HEADERS,
    P_CHUNK_SIZE,
    P_CHUNK_DATA,
    P_CHUNK_CRLF,
    P_TRAILERS,
    P_LENGTH,
    P_UNTIL_EOF,
} parse_phase;

typedef struct http_conn http_conn;
typedef struct http_request http_request;

typedef struct http_target {
    char host[256];
    int port;
    char hostport[300];
    struct sockaddr_storage addr;
    socklen_t addrlen;
    http_conn *idle; /* pooled keep-alive connections, LIFO */
} http_target;

struct http_request {
    bench_http *client;
    int target;
    http_conn *conn;
    const bench_http_handler *h;
    void *arg;
    char *wire; /* the formatted request, kept until a response byte arrives (for a retry) */
    size_t wire_len;
    int attempts;
    struct event *deadline;
    http_request *prev, *next; /* in flight */
};

struct http_conn {
    bench_http *client;
    int target;
    struct bufferevent *bev;
    http_request *req;
    http_conn *next_idle;
    bool reused;    /* has carried a response already */
    bool got_bytes; /* this response has started */
    /* response parser */
    parse_phase phase;
    int status;
    int64_t content_length; /* -1 unknown */
    int64_t remaining;
    bool chunked, close_after, sse;
    char *content_type, *instance;
    loom_buf body; /* non-SSE body */
    loom_buf line; /* SSE: a partial line */
    loom_buf data; /* SSE: the data of the event being read */
    bool has_data;
};

struct bench_http {
    struct event_base *base;
    const struct timeval *timeout; /* common timeout */
    char *instance_header;
    char *auth; /* "Authorization: Bearer ...\r\n" or "" */
    http_target targets[MAX_TARGETS];
    int n_targets;
    http_request *inflight;
    int n_inflight;
};

/* ---------------------------------------------------------------- client and targets */

bench_http *bench_http_create(struct event_base *base, double timeout_s,
                              const char *instance_header, const char *api_key)
{
    bench_http *c = xcalloc(1, sizeof(*c));
    c->base = base;
    struct timeval tv = {(time_t)timeout_s,
                         (suseconds_t)((timeout_s - (double)(time_t)timeout_s) * 1e6)};
    c->timeout = event_base_init_common_timeout(base, &tv);
    c->instance_header = xstrdup(instance_header ? instance_header : "x-loom-instance");
    if (api_key && *api_key) {
        loom_buf b;
        buf_init(&b);
        buf_printf(&b, "Authorization: Bearer %s\r\n", api_key);
        c->auth = buf_detach(&b);
    } else {
        c->auth = xstrdup("");
    }
    return c;
}

static void conn_free(http_conn *cn);

void bench_http_close_idle(bench_http *c, int target)
{
    for (int t = 0; t < c->n_targets; t++) {
        if (target >= 0 && t != target)
            continue;
        while (c->targets[t].idle) {
            http_conn *cn = c->targets[t].idle;
            c->targets[t].idle = cn->next_idle;
            conn_free(cn);
        }
    }
}

void bench_http_free(bench_http *c)
{
    if (!c)
        return;
    bench_http_cancel_all(c);
    bench_http_close_idle(c, -1);
    free(c->instance_header);
    free(c->auth);
    free(c);
}

int bench_http_add_target(bench_http *c, const char *url, char *path, size_t path_cap, loom_err *e)
{
    if (c->n_targets >= MAX_TARGETS)
        return loom_errf(e, LOOM_EINVAL, "at most %d targets", MAX_TARGETS);
    if (strncasecmp(url, "https://", 8) == 0)
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "%s: https is not supported; put a TLS-"
                         "terminating proxy in front, or use http://",
                         url);
    const char *p = url;
    if (strncasecmp(p, "http://", 7) == 0)
        p += 7;
    else if (strstr(p, "://"))
        return loom_errf(e, LOOM_EUNSUPPORTED, "%s: only http:// URLs are supported", url);
    http_target *t = &c->targets[c->n_targets];
    memset(t, 0, sizeof(*t));
    const char *slash = strchr(p, '/');
    size_t hp_len = slash ? (size_t)(slash - p) : strlen(p);
    if (hp_len == 0 || hp_len >= sizeof(t->host))
        return loom_errf(e, LOOM_EINVAL, "%s: no host in the URL", url);
    char hp[256];
    memcpy(hp, p, hp_len);
    hp[hp_len] = '\0';
    char *port_s = NULL;
    if (hp[0] == '[') { /* [v6]:port */
        char *close = strchr(hp, ']');
        if (!close)
            return loom_errf(e, LOOM_EINVAL, "%s: unclosed '[' in the host", url);
        *close = '\0';
        snprintf(t->host, sizeof(t->host), "%s", hp + 1);
        if (close[1] == ':')
            port_s = close + 2;
    } else {
        char *colon = strrchr(hp, ':');
        if (colon) {
            *colon = '\0';
            port_s = colon + 1;
        }
        snprintf(t->host, sizeof(t->host), "%s", hp);
    }
    t->port = 80;
    if (port_s) {
        char *end;
        long v = strtol(port_s, &end, 10);
        if (!*port_s || *end || v < 1 || v > 65535)
            return loom_errf(e, LOOM_EINVAL, "%s: bad port '%s'", url, port_s);
        t->port = (int)v;
    }
    char hostport[sizeof(t->hostport)];
    snprintf(hostport, sizeof(hostport), "%s:%d", t->host, t->port);
    memcpy(t->hostport, hostport, sizeof(hostport));
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    char port_str[16];
    snprintf(port_str, sizeof(port_str), "%d", t->port);
    int g = getaddrinfo(t->host, port_str, &hints, &res);
    if (g != 0 || !res)
        return loom_errf(e, LOOM_ENOTFOUND, "%s: cannot resolve '%s': %s", url, t->host,
                         gai_strerror(g));
    memcpy(&t->addr, res->ai_addr, res->ai_addrlen);
    t->addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    if (path) {
        const char *pp = slash && strcmp(slash, "/") != 0 ? slash : "";
        snprintf(path, path_cap, "%s", pp);
    }
    return c->n_targets++;
}

const char *bench_http_target_name(const bench_http *c, int target)
{
    return c->targets[target].hostport;
}

int bench_http_inflight(const bench_http *c)
{
    return c->n_inflight;
}

/* ---------------------------------------------------------------- request completion */

static void request_unlink(http_request *r)
{
    bench_http *c = r->client;
    if (r->prev)
        r->prev->next = r->next;
    else
        c->inflight = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->prev = r->next = NULL;
    c->n_inflight--;
}

/* Ends r: it must be detached from any connection already. */
static void request_finish(http_request *r, bench_error err, const char *msg, const char *body,
                           size_t body_len, double now)
{
    request_unlink(r);
    if (r->deadline)
        event_free(r->deadline);
    free(r->wire);
    const bench_http_handler *h = r->h;
    void *arg = r->arg;
    free(r);
    if (h->on_done)
        h->on_done(arg, err, msg, body, body_len, now);
}

/* ---------------------------------------------------------------- connections */

static void conn_reset_parser(http_conn *cn)
{
    cn->phase = P_STATUS;
    cn->status = 0;
    cn->content_length = -1;
    cn->remaining = 0;
    cn->chunked = cn->close_after = cn->sse = false;
    free(cn->content_type);
    free(cn->instance);
    cn->content_type = cn->instance = NULL;
    cn->body.len = cn->line.len = cn->data.len = 0;
    cn->has_data = false;
    cn->got_bytes = false;
}

static void conn_free(http_conn *cn)
{
    if (!cn)
        return;
    if (cn->bev)
        bufferevent_free(cn->bev);
    free(cn->content_type);
    free(cn->instance);
    buf_free(&cn->body);
    buf_free(&cn->line);
    buf_free(&cn->data);
    free(cn);
}

static void conn_read_cb(struct bufferevent *bev, void *arg);
static void conn_event_cb(struct bufferevent *bev, short what, void *arg);
static void request_start(http_request *r);

static http_conn *conn_open(bench_http *c, int target, int *err)
{
    http_target *t = &c->targets[target];
    struct bufferevent *bev = bufferevent_socket_new(c->base, -1, BEV_OPT_CLOSE_ON_FREE);
    if (!bev) {
        *err = ENOMEM;
        return NULL;
    }
    http_conn *cn = xcalloc(1, sizeof(*cn));
    cn->client = c;
    cn->target = target;
    cn->bev = bev;
    buf_init(&cn->body);
    buf_init(&cn->line);
    buf_init(&cn->data);
    conn_reset_parser(cn);
    bufferevent_setcb(bev, conn_read_cb, NULL, conn_event_cb, cn);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    if (bufferevent_socket_connect(bev, (struct sockaddr *)&t->addr, (int)t->addrlen) < 0) {
        *err = errno ? errno : ECONNREFUSED;
        cn->bev = NULL;
        bufferevent_free(bev);
        conn_free(cn);
        return NULL;
    }
    return cn;
}

/* The response on cn is complete: pool or close the connection, then end the request. */
static void conn_response_done(http_conn *cn, double now)
{
    http_request *r = cn->req;
    bench_http *c = cn->client;
    cn->req = NULL;
    r->conn = NULL;
    /* hand the body over before the connection can be reused by on_done */
    char *body = NULL;
    size_t body_len = cn->body.len;
    if (body_len) {
        body = xmalloc(body_len + 1);
        memcpy(body, cn->body.data, body_len);
        body[body_len] = '\0';
    }
    bool keep = !cn->close_after && cn->phase != P_UNTIL_EOF &&
                evbuffer_get_length(bufferevent_get_input(cn->bev)) == 0;
    if (keep) {
        conn_reset_parser(cn);
        cn->reused = true;
        cn->next_idle = c->targets[cn->target].idle;
        c->targets[cn->target].idle = cn;
    } else {
        conn_free(cn);
    }
    request_finish(r, BENCH_OK, NULL, body, body_len, now);
    free(body);
}

/* A transport failure on cn: retry once on a fresh connection, or end the request. */
static void conn_fail(http_conn *cn, bench_error err, const char *msg, double now)
{
    http_request *r = cn->req;
    bool retry = r && cn->reused && !cn->got_bytes && r->attempts < 2;
    conn_free(cn);
    if (!r)
        return;
    r->conn = NULL;
    if (retry) {
        request_start(r);
        return;
    }
    request_finish(r, err, msg, NULL, 0, now);
}

/* ---------------------------------------------------------------- SSE */

static void sse_dispatch(http_conn *cn, double now)
{
    if (cn->has_data && cn->req && cn->req->h->on_event)
        cn->req->h->on_event(cn->req->arg, cn->data.data ? cn->data.data : "", cn->data.len, now);
    cn->data.len = 0;
    cn->has_data = false;
}

static void sse_line(http_conn *cn, const char *s, size_t n, double now)
{
    if (n > 0 && s[n - 1] == '\r')
        n--;
    if (n == 0) {
        sse_dispatch(cn, now);
        return;
    }
    if (n >= 5 && memcmp(s, "data:", 5) == 0) {
        s += 5;
        n -= 5;
        if (n > 0 && *s == ' ') {
            s++;
            n--;
        }
        if (cn->has_data)
            buf_append(&cn->data, "\n", 1);
        buf_append(&cn->data, s, n);
        cn->has_data = true;
    }
    /* comments (':'), event:, id:, retry: carry nothing a benchmark needs */
}

static void sse_feed(http_conn *cn, const char *p, size_t n, double now)
{
    while (n > 0) {
        const char *nl = memchr(p, '\n', n);
        if (!nl) {
            buf_append(&cn->line, p, n);
            return;
        }
        size_t take = (size_t)(nl - p);
        if (cn->line.len) {
            buf_append(&cn->line, p, take);
            sse_line(cn, cn->line.data, cn->line.len, now);
            cn->line.len = 0;
        } else {
            sse_line(cn, p, take, now);
        }
        p = nl + 1;
        n -= take + 1;
    }
}

/* Moves up to n body bytes from the input buffer to the SSE splitter or the body buffer. */
static void body_take(http_conn *cn, struct evbuffer *in, size_t n, double now)
{
    struct evbuffer_iovec vec[8];
    size_t left = n;
    while (left > 0) {
        int nv = evbuffer_peek(in, (ev_ssize_t)left, NULL, vec, 8);
        if (nv <= 0)
            break;
        size_t used = 0;
        for (int i = 0; i < nv && i < 8 && used < left; i++) {
            size_t len = vec[i].iov_len < left - used ? vec[i].iov_len : left - used;
            if (cn->sse)
                sse_feed(cn, vec[i].iov_base, len, now);
            else if (cn->body.len < MAX_BODY_BYTES)
                buf_append(&cn->body, vec[i].iov_base, len);
            used += len;
        }
        evbuffer_drain(in, used);
        left -= used;
    }
}

/* ---------------------------------------------------------------- response parser */

static void header_line(http_conn *cn, char *line)
{
    char *colon = strchr(line, ':');
    if (!colon)
        return;
    *colon = '\0';
    char *v = colon + 1;
    while (*v == ' ' || *v == '\t')
        v++;
    size_t vl = strlen(v);
    while (vl > 0 && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
        v[--vl] = '\0';
    if (!strcasecmp(line, "content-length")) {
        char *end;
        long long n = strtoll(v, &end, 10);
        if (*v && !*end && n >= 0)
            cn->content_length = n;
    } else if (!strcasecmp(line, "transfer-encoding")) {
        if (strcasestr(v, "chunked"))
            cn->chunked = true;
    } else if (!strcasecmp(line, "connection")) {
        if (strcasestr(v, "close"))
            cn->close_after = true;
    } else if (!strcasecmp(line, "content-type")) {
        free(cn->content_type);
        cn->content_type = xstrdup(v);
    } else if (!strcasecmp(line, cn->client->instance_header)) {
        free(cn->instance);
        cn->instance = xstrdup(v);
    }
}

/* Headers complete: choose how the body is delimited. Returns false if the response is over. */
static bool headers_done(http_conn *cn)
{
    cn->sse = cn->status == 200 && cn->content_type &&
              strncasecmp(cn->content_type, "text/event-stream", 17) == 0;
    if (cn->req && cn->req->h->on_head)
        cn->req->h->on_head(cn->req->arg, cn->status, cn->content_type, cn->instance);
    if (cn->status == 204 || cn->status == 304)
        return false;
    if (cn->chunked) {
        cn->phase = P_CHUNK_SIZE;
    } else if (cn->content_length >= 0) {
        cn->phase = P_LENGTH;
        cn->remaining = cn->content_length;
        if (cn->remaining == 0)
            return false;
    } else {
        cn->phase = P_UNTIL_EOF;
        cn->close_after = true;
    }
    return true;
}

/* Parses what is buffered. Returns 1 when the response completed, 0 to wait for more, -1 on
 * a malformed response (msg set). */
static int conn_parse(http_conn *cn, struct evbuffer *in, double now, const char **msg)
{
    for (;;) {
        switch (cn->phase) {
        case P_STATUS:
        case P_HEADERS:
        case P_CHUNK_SIZE:
        case P_CHUNK_CRLF:
        case P_TRAILERS: {
            size_t n = 0;
            char *line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF);
            if (!line) {
                if (evbuffer_get_length(in) > MAX_HEAD_BYTES) {
                    *msg = "response line too long";
                    return -1;
                }
                return 0;
            }
            int rc = 0;
            if (cn->phase == P_STATUS) {
                int major, minor, status;
                if (n == 0) {
                    free(line);
                    continue; /* tolerate a stray CRLF between responses */
                }
                if (sscanf(line, "HTTP/%d.%d %d", &major, &minor, &status) != 3 || status < 100 ||
                    status > 999) {
                    *msg = "not an HTTP response";
                    rc = -1;
                } else {
                    cn->status = status;
                    if (major == 1 && minor == 0)
                        cn->close_after = true;
                    cn->phase = P_HEADERS;
                }
            } else if (cn->phase == P_HEADERS) {
                if (n == 0) {
                    if (cn->status >= 100 && cn->status < 200) {
                        cn->phase = P_STATUS; /* 100 Continue and friends */
                        cn->content_length = -1;
                        cn->chunked = false;
                    } else if (!headers_done(cn)) {
                        rc = 1;
                    }
                } else {
                    header_line(cn, line);
                }
            } else if (cn->phase == P_CHUNK_SIZE) {
                char *end;
                errno = 0;
                unsigned long long size = strtoull(line, &end, 16);
                if (end == line || errno || (*end && *end != ';' && *end != ' ') ||
                    size > (1ull << 40)) {
                    *msg = "bad chunk size in a chunked response";
                    rc = -1;
                } else if (size == 0) {
                    cn->phase = P_TRAILERS;
                } else {
                    cn->remaining = (int64_t)size;
                    cn->phase = P_CHUNK_DATA;
                }
            } else if (cn->phase == P_CHUNK_CRLF) {
                if (n != 0) {
                    *msg = "missing CRLF after a chunk";
                    rc = -1;
                } else {
                    cn->phase = P_CHUNK_SIZE;
                }
            } else { /* trailers: an empty line ends the response */
                if (n == 0)
                    rc = 1;
            }
            free(line);
            if (rc != 0)
                return rc;
            break;
        }
        case P_CHUNK_DATA:
        case P_LENGTH: {
            size_t avail = evbuffer_get_length(in);
            if (avail == 0)
                return 0;
            size_t take = (int64_t)avail < cn->remaining ? avail : (size_t)cn->remaining;
            body_take(cn, in, take, now);
            cn->remaining -= (int64_t)take;
            if (cn->remaining > 0)
                return 0;
            if (cn->phase == P_LENGTH)
                return 1;
            cn->phase = P_CHUNK_CRLF;
            break;
        }
        case P_UNTIL_EOF: {
            size_t avail = evbuffer_get_length(in);
            if (avail)
                body_take(cn, in, avail, now);
            return 0;
        }
        }
    }
}

/* Takes an idle connection out of its pool and closes it. */
static void idle_drop(http_conn *cn)
{
    http_target *t = &cn->client->targets[cn->target];
    for (http_conn **pp = &t->idle; *pp; pp = &(*pp)->next_idle)
        if (*pp == cn) {
            *pp = cn->next_idle;
            break;
        }
    conn_free(cn);
}

static void conn_read_cb(struct bufferevent *bev, void *arg)
{
    http_conn *cn = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    double now = loom_now();
    if (!cn->req) { /* bytes on an idle connection: the server is confused; drop it */
        idle_drop(cn);
        return;
    }
    if (!cn->got_bytes && evbuffer_get_length(in) > 0) {
        cn->got_bytes = true;
        free(cn->req->wire); /* no retry once the server has answered */
        cn->req->wire = NULL;
    }
    const char *msg = NULL;
    int rc = conn_parse(cn, in, now, &msg);
    if (rc < 0) {
        conn_fail(cn, BENCH_ERR_MALFORMED, msg, now);
        return;
    }
    if (rc > 0) {
        if (cn->sse)
            sse_dispatch(cn, now); /* an event without its blank line */
        conn_response_done(cn, now);
    }
}

static void conn_event_cb(struct bufferevent *bev, short what, void *arg)
{
    http_conn *cn = arg;
    double now = loom_now();
    if (what & BEV_EVENT_CONNECTED) {
        int fd = (int)bufferevent_getfd(bev);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        return;
    }
    if (!(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)))
        return;
    if (!cn->req) { /* an idle pooled connection closed by the server */
        idle_drop(cn);
        return;
    }
    /* whatever is still buffered belongs to the response */
    struct evbuffer *in = bufferevent_get_input(bev);
    if (evbuffer_get_length(in) > 0)
        cn->got_bytes = true;
    const char *msg = NULL;
    int rc = conn_parse(cn, in, now, &msg);
    if (rc < 0) {
        conn_fail(cn, BENCH_ERR_MALFORMED, msg, now);
        return;
    }
    if (rc > 0 || (cn->phase == P_UNTIL_EOF && (what & BEV_EVENT_EOF))) {
        if (cn->sse)
            sse_dispatch(cn, now);
        cn->close_after = true;
        conn_response_done(cn, now);
        return;
    }
    char buf[200];
    if (!cn->got_bytes) {
        int err = EVUTIL_SOCKET_ERROR();
        if ((what & BEV_EVENT_ERROR) && err)
            snprintf(buf, sizeof(buf), "%s: %s", cn->client->targets[cn->target].hostport,
                     evutil_socket_error_to_string(err));
        else
            snprintf(buf, sizeof(buf), "%s: connection closed before a response",
                     cn->client->targets[cn->target].hostport);
        conn_fail(cn, BENCH_ERR_CONNECT, buf, now);
    } else {
        snprintf(buf, sizeof(buf), "connection closed in the middle of the response%s",
                 cn->sse ? " stream" : "");
        conn_fail(cn, BENCH_ERR_MALFORMED, buf, now);
    }
}

/* ---------------------------------------------------------------- sending */

static void deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    http_request *r = arg;
    if (r->conn) {
        r->conn->req = NULL;
        conn_free(r->conn);
        r->conn = NULL;
    }
    char msg[96];
    snprintf(msg, sizeof(msg), "no complete response within the time limit");
    request_finish(r, BENCH_ERR_TIMEOUT, msg, NULL, 0, loom_now());
}

/* Writes r on a pooled or new connection. */
static void request_start(http_request *r)
{
    bench_http *c = r->client;
    http_target *t = &c->targets[r->target];
    r->attempts++;
    http_conn *cn = t->idle;
    if (cn) {
        t->idle = cn->next_idle;
        cn->next_idle = NULL;
    } else {
        int err = 0;
        cn = conn_open(c, r->target, &err);
        if (!cn) {
            char msg[200];
            snprintf(msg, sizeof(msg), "%s: cannot open a connection: %s", t->hostport,
                     strerror(err));
            request_finish(r, BENCH_ERR_CONNECT, msg, NULL, 0, loom_now());
            return;
        }
    }
    cn->req = r;
    r->conn = cn;
    bufferevent_write(cn->bev, r->wire, r->wire_len);
}

double bench_http_send(bench_http *c, int target, const char *method, const char *path,
                       const char *body, size_t body_len, const bench_http_handler *h, void *arg)
{
    http_request *r = xcalloc(1, sizeof(*r));
    r->client = c;
    r->target = target;
    r->h = h;
    r->arg = arg;
    loom_buf w;
    buf_init(&w);
    buf_printf(&w,
               "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: loom-bench\r\n"
               "Accept: */*\r\n%s",
               method, path, c->targets[target].hostport, c->auth);
    if (body)
        buf_printf(&w, "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n", body_len);
    else
        buf_puts(&w, "\r\n");
    if (body)
        buf_append(&w, body, body_len);
    r->wire_len = w.len;
    r->wire = buf_detach(&w);
    r->next = c->inflight;
    if (c->inflight)
        c->inflight->prev = r;
    c->inflight = r;
    c->n_inflight++;
    r->deadline = evtimer_new(c->base, deadline_cb, r);
    evtimer_add(r->deadline, c->timeout);
    double sent = loom_now();
    request_start(r);
    return sent;
}

void bench_http_cancel_all(bench_http *c)
{
    while (c->inflight) {
        http_request *r = c->inflight;
        if (r->conn) {
            r->conn->req = NULL;
            conn_free(r->conn);
            r->conn = NULL;
        }
        request_finish(r, BENCH_ERR_CANCELLED, "the run was interrupted", NULL, 0, loom_now());
    }
}

/* ---------------------------------------------------------------- blocking fetches */

typedef struct fetch_batch fetch_batch;

typedef struct fetch_state {
    fetch_batch *batch;
    bool finished;
    int status;
    bench_error err;
    char msg[256];
    char *body;
    size_t len;
} fetch_state;

struct fetch_batch {
    bench_http *c;
    int target;
    const char *method, *path;
    const char *const *bodies;
    fetch_state *states;
    int n, next, done;
};

static void fetch_send_next(fetch_batch *b);

static void fetch_head(void *arg, int status, const char *ct, const char *inst)
{
    ((fetch_state *)arg)->status = status;
}

static void fetch_done(void *arg, bench_error err, const char *msg, const char *body, size_t len,
                       double now)
{
    fetch_state *f = arg;
    f->finished = true;
    f->err = err;
    if (msg)
        snprintf(f->msg, sizeof(f->msg), "%s", msg);
    if (body && len) {
        f->body = xmalloc(len + 1);
        memcpy(f->body, body, len);
        f->body[len] = '\0';
        f->len = len;
    }
    f->batch->done++;
    fetch_send_next(f->batch);
}

static const bench_http_handler fetch_handler = {fetch_head, NULL, fetch_done};

static void fetch_send_next(fetch_batch *b)
{
    if (b->next >= b->n)
        return;
    int i = b->next++;
    const char *body = b->bodies ? b->bodies[i] : NULL;
    bench_http_send(b->c, b->target, b->method, b->path, body, body ? strlen(body) : 0,
                    &fetch_handler, &b->states[i]);
}

int bench_http_fetch_many(bench_http *c, int target, const char *method, const char *path, int n,
                          const char *const *bodies, int max_inflight, int *statuses,
                          char **resp_bodies, loom_err *e)
{
    fetch_batch b = {
        .c = c, .target = target, .method = method, .path = path, .bodies = bodies, .n = n};
    b.states = xcalloc((size_t)(n > 0 ? n : 1), sizeof(fetch_state));
    for (int i = 0; i < n; i++)
        b.states[i].batch = &b;
    for (int i = 0; i < max_inflight && i < n; i++)
        fetch_send_next(&b);
    while (b.done < n)
        if (event_base_loop(c->base, EVLOOP_ONCE) < 0) {
            b.next = n; /* send nothing more; end what is in flight */
            bench_http_cancel_all(c);
            break;
        }
    int rc = 0;
    for (int i = 0; i < n; i++) {
        fetch_state *f = &b.states[i];
        if (rc == 0 && (!f->finished || f->err != BENCH_OK))
            rc = loom_errf(e, LOOM_EIO, "%s %s: %s", method, path,
                           f->finished ? f->msg : "the event loop failed");
        statuses[i] = f->status;
        resp_bodies[i] = f->body ? f->body : xstrdup("");
    }
    free(b.states);
    if (rc != 0)
        for (int i = 0; i < n; i++) {
            free(resp_bodies[i]);
            resp_bodies[i] = NULL;
        }
    return rc;
}

int bench_http_fetch(bench_http *c, int target, const char *method, const char *path,
                     const char *body, int *status, char **resp_body, size_t *resp_len, loom_err *e)
{
    char *out = NULL;
    int rc = bench_http_fetch_many(c, target, method, path, 1, &body, 1, status, &out, e);
    if (rc != 0)
        return rc;
    if (resp_len)
        *resp_len = strlen(out);
    if (resp_body)
        *resp_body = out;
    else
        free(out);
    return 0;
}
