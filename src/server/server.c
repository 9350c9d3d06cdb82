/*
 * The `loom serve` service: an evhttp event loop (the caller's thread, inside server_run) and an
 * engine thread.
 *
 *   libevent thread                         engine thread
 *   ---------------                         -------------
 *   HTTP -> api_request_parse/tokenize
 *   srv_request, refs = 2 ----inbound---->  engine_add (reject -> ITEM_REJECTED)
 *   client gone ---------------aborts---->  engine_abort, drop its engine reference
 *                                           engine_step -> copy each event into the
 *   on_wake: outbox items -> JSON / SSE <-- request's outbox, event_active(wake)
 *
 * One mutex (s->lock) guards the queues, the outboxes, the reference counts and the metrics; the
 * engine thread sleeps on s->cond when it has nothing to do. A request is reachable from both
 * threads, so it is reference counted: one reference for the HTTP side (until its response is
 * complete or its client is gone), one for the engine side (until the engine finished, refused
 * or aborted it), and one while it sits in the ready list. The last one frees it, in whichever
 * thread that happens; libevent objects are only ever touched by the libevent thread.
 *
 * Disconnects: evhttp disables reading while a request is being answered, so a client that goes
 * away is noticed by a small read watcher on the socket (EOF through MSG_PEEK, nothing is
 * consumed) or by the connection's close callback when a write fails. Either aborts the request
 * in the engine, which frees its KV blocks at once.
 */
#include "loom/server.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/thread.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define TABLE_BUCKETS 1024

typedef enum { ITEM_ACCEPTED, ITEM_REJECTED, ITEM_EVENT } item_kind;

/* One thing the engine thread tells a request's HTTP side. */
typedef struct srv_item {
    item_kind kind;
    struct srv_item *next;
    api_error *err;  /* ITEM_REJECTED */
    engine_event ev; /* ITEM_EVENT; ev.text is NULL, the text is in text/text_len */
    char *text;
} srv_item;

typedef struct srv_request {
    server *srv;
    uint64_t id; /* the engine's request id */
    int refs;    /* s->lock */
    /* written by the libevent thread before queueing, read-only afterwards */
    api_request api;
    double arrival;
    /* libevent thread only */
    api_response resp;
    struct evhttp_request *evreq; /* NULL once answered or the client is gone */
    struct evhttp_connection *conn;
    struct event *watch;
    bool gone;     /* the client disconnected */
    bool answered; /* the whole response was handed to evhttp */
    bool stream_started;
    struct srv_request *live_prev, *live_next;
    /* engine thread only */
    struct srv_request *table_next;
    double last_token_time;
    /* s->lock */
    srv_item *out_head, *out_tail;
    bool ready;
    struct srv_request *ready_next;
    struct srv_request *inbound_next;
} srv_request;

struct server {
    char *host, *model_name, *api_key, *backend;
    size_t max_body_bytes;
    bool handle_signals;
    int port;
    engine *en;
    const tokenizer *tok;
    api_limits lim;
    double started_wall;

    struct event_base *base;
    struct evhttp *http;
    struct event *wake_ev, *sigint_ev, *sigterm_ev;

    pthread_t engine_thread;
    bool engine_thread_started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    /* s->lock */
    srv_request *inbound_head, *inbound_tail;
    int n_inbound;
    uint64_t *aborts;
    int n_aborts, cap_aborts;
    srv_request *ready_head, *ready_tail;
    bool stopping;
    bool engine_alive;
    server_metrics metrics;
    /* engine thread only */
    srv_request *table[TABLE_BUCKETS];
    /* libevent thread only */
    srv_request *live;
    uint64_t next_id;
};

/* ---------------------------------------------------------------- requests and refs */

static void item_free(srv_item *it)
{
    free(it->err);
    free(it->text);
    free(it);
}

static void request_destroy(srv_request *r)
{
    for (srv_item *it = r->out_head, *next; it; it = next) {
        next = it->next;
        item_free(it);
    }
    api_request_free(&r->api);
    api_response_free(&r->resp);
    free(r);
}

/* Caller holds s->lock. Returns true when this dropped the last reference (r is gone). */
static bool request_unref_locked(srv_request *r)
{
    if (--r->refs > 0)
        return false;
    request_destroy(r);
    return true;
}

static void request_unref(srv_request *r)
{
    server *s = r->srv;
    pthread_mutex_lock(&s->lock);
    request_unref_locked(r);
    pthread_mutex_unlock(&s->lock);
}

/* Caller holds s->lock: append an item to r's outbox and make r ready for the libevent loop. */
static void post_locked(server *s, srv_request *r, srv_item *it)
{
    it->next = NULL;
    if (r->out_tail)
        r->out_tail->next = it;
    else
        r->out_head = it;
    r->out_tail = it;
    if (!r->ready) {
        r->ready = true;
        r->refs++;
        r->ready_next = NULL;
        if (s->ready_tail)
            s->ready_tail->ready_next = r;
        else
            s->ready_head = r;
        s->ready_tail = r;
    }
}

/* ---------------------------------------------------------------- engine thread */

static srv_request **table_slot(server *s, uint64_t id)
{
    return &s->table[id % TABLE_BUCKETS];
}

static void table_put(server *s, srv_request *r)
{
    srv_request **slot = table_slot(s, r->id);
    r->table_next = *slot;
    *slot = r;
}

static srv_request *table_get(server *s, uint64_t id)
{
    for (srv_request *r = *table_slot(s, id); r; r = r->table_next)
        if (r->id == id)
            return r;
    return NULL;
}

static srv_request *table_remove(server *s, uint64_t id)
{
    for (srv_request **p = table_slot(s, id); *p; p = &(*p)->table_next) {
        if ((*p)->id == id) {
            srv_request *r = *p;
            *p = r->table_next;
            return r;
        }
    }
    return NULL;
}

static srv_item *item_new(item_kind kind)
{
    srv_item *it = xcalloc(1, sizeof(*it));
    it->kind = kind;
    return it;
}

/* Caller holds s->lock: a request leaves the engine (finished, aborted or failed). */
static void finish_locked(server *s, srv_request *r, finish_reason why, double now)
{
    if (why >= FINISH_STOP && why <= FINISH_ERROR)
        s->metrics.finished[why]++;
    metrics_histogram_observe(&s->metrics.e2e, now - r->arrival);
    request_unref_locked(r); /* the engine's reference */
}

/* The engine's refusal of a request as the HTTP error it becomes. */
static api_error *admit_error(int rc, const loom_err *le)
{
    api_error *err = xcalloc(1, sizeof(*err));
    if (rc == LOOM_EFULL)
        api_error_set(err, 503, "server_error", NULL, "queue_full",
                      "the server is overloaded (waiting queue full): retry later");
    else if (rc == LOOM_EINVAL || rc == LOOM_ETOOLONG)
        api_error_set(err, 400, "invalid_request_error", NULL,
                      rc == LOOM_ETOOLONG ? "context_length_exceeded" : NULL, "%s", le->msg);
    else
        api_error_set(err, 500, "server_error", NULL, NULL, "%s", le->msg);
    return err;
}

static void engine_admit(server *s, srv_request *adds)
{
    for (srv_request *r = adds, *next; r; r = next) {
        next = r->inbound_next;
        loom_err le = {0};
        int rc = engine_add(s->en, r->id, r->api.prompt_ids, r->api.n_prompt, &r->api.params, &le);
        srv_item *it = NULL;
        if (rc != 0) {
            it = item_new(ITEM_REJECTED);
            it->err = admit_error(rc, &le);
        } else {
            r->last_token_time = r->arrival;
            table_put(s, r);
            /* a stream is told it was taken (its headers go out now); a plain request waits */
            if (r->api.stream)
                it = item_new(ITEM_ACCEPTED);
        }
        if (!it)
            continue;
        pthread_mutex_lock(&s->lock);
        post_locked(s, r, it);
        if (rc != 0)
            request_unref_locked(r); /* the engine's reference: it never took the request */
        pthread_mutex_unlock(&s->lock);
    }
}

static void engine_apply_aborts(server *s, const uint64_t *ids, int n)
{
    for (int i = 0; i < n; i++) {
        srv_request *r = table_remove(s, ids[i]);
        if (!r)
            continue; /* already finished: nothing to free */
        engine_abort(s->en, ids[i]);
        pthread_mutex_lock(&s->lock);
        finish_locked(s, r, FINISH_ABORT, loom_now());
        pthread_mutex_unlock(&s->lock);
    }
}

/* A failed step: every request in the engine ends with an error, the engine keeps serving. */
static void engine_fail_all(server *s, const char *msg)
{
    LOG_ERROR("engine step failed: %s", msg);
    for (int b = 0; b < TABLE_BUCKETS; b++) {
        while (s->table[b]) {
            srv_request *r = s->table[b];
            s->table[b] = r->table_next;
            engine_abort(s->en, r->id);
            srv_item *it = item_new(ITEM_EVENT);
            it->ev.req_id = r->id;
            it->ev.token = -1;
            it->ev.finish = FINISH_ERROR;
            pthread_mutex_lock(&s->lock);
            post_locked(s, r, it);
            finish_locked(s, r, FINISH_ERROR, loom_now());
            pthread_mutex_unlock(&s->lock);
        }
    }
}

static void engine_run_step(server *s)
{
    const engine_event *evs = NULL;
    int n = 0;
    double dt = 0;
    loom_err le = {0};
    if (engine_step(s->en, &evs, &n, &dt, &le) != 0) {
        engine_fail_all(s, le.msg);
        return;
    }
    double now = loom_now();
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < n; i++) {
        const engine_event *ev = &evs[i];
        srv_request *r = table_get(s, ev->req_id);
        if (!r)
            continue; /* aborted by us already */
        srv_item *it = item_new(ITEM_EVENT);
        it->ev = *ev;
        it->ev.text = NULL;
        if (ev->text_len > 0) { /* events live until the next step: copy the text */
            it->text = xmalloc(ev->text_len + 1);
            memcpy(it->text, ev->text, ev->text_len);
            it->text[ev->text_len] = 0;
        }
        if (ev->token >= 0) {
            if (ev->first_token)
                metrics_histogram_observe(&s->metrics.ttft, now - r->arrival);
            else
                metrics_histogram_observe(&s->metrics.tpot, now - r->last_token_time);
            r->last_token_time = now;
        }
        post_locked(s, r, it);
        if (ev->finish != FINISH_NONE) {
            table_remove(s, r->id);
            finish_locked(s, r, ev->finish, now);
        }
    }
    pthread_mutex_unlock(&s->lock);
}

static void *engine_main(void *arg)
{
    server *s = arg;
    bool busy = false;
    pthread_mutex_lock(&s->lock);
    s->engine_alive = true;
    for (;;) {
        while (!s->stopping && !s->inbound_head && !s->n_aborts && !busy)
            pthread_cond_wait(&s->cond, &s->lock);
        if (s->stopping)
            break;
        srv_request *adds = s->inbound_head;
        s->inbound_head = s->inbound_tail = NULL;
        s->n_inbound = 0;
        uint64_t *aborts = s->aborts;
        int n_aborts = s->n_aborts;
        s->aborts = NULL;
        s->n_aborts = s->cap_aborts = 0;
        pthread_mutex_unlock(&s->lock);

        /* adds before aborts: an abort always follows its request's add */
        engine_admit(s, adds);
        engine_apply_aborts(s, aborts, n_aborts);
        free(aborts);
        if (engine_has_work(s->en))
            engine_run_step(s);
        busy = engine_has_work(s->en);

        engine_stats st;
        engine_get_stats(s->en, &st);
        pthread_mutex_lock(&s->lock);
        s->metrics.engine = st;
        bool wake = s->ready_head != NULL;
        pthread_mutex_unlock(&s->lock);
        if (wake)
            event_active(s->wake_ev, EV_READ, 0);
        pthread_mutex_lock(&s->lock);
    }
    s->engine_alive = false;
    /* drop the engine's references: the requests still queued or running are abandoned */
    for (srv_request *r = s->inbound_head, *next; r; r = next) {
        next = r->inbound_next;
        request_unref_locked(r);
    }
    s->inbound_head = s->inbound_tail = NULL;
    for (int b = 0; b < TABLE_BUCKETS; b++) {
        for (srv_request *r = s->table[b], *next; r; r = next) {
            next = r->table_next;
            request_unref_locked(r);
        }
        s->table[b] = NULL;
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* ---------------------------------------------------------------- HTTP replies */

static void send_body(struct evhttp_request *evreq, int status, const char *content_type,
                      const char *body, size_t len)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(evreq);
    evhttp_add_header(h, "Content-Type", content_type);
    struct evbuffer *b = evbuffer_new();
    evbuffer_add(b, body, len);
    const char *reason = status == 200 ? "OK" : NULL; /* NULL: libevent's standard phrase */
    evhttp_send_reply(evreq, status, reason, b);
    evbuffer_free(b);
}

static void send_error(struct evhttp_request *evreq, const api_error *err)
{
    char *json = api_error_json(err);
    if (err->status == 401)
        evhttp_add_header(evhttp_request_get_output_headers(evreq), "WWW-Authenticate", "Bearer");
    send_body(evreq, err->status, "application/json", json, strlen(json));
    free(json);
}

static void live_remove(server *s, srv_request *r)
{
    if (r->live_prev)
        r->live_prev->live_next = r->live_next;
    else if (s->live == r)
        s->live = r->live_next;
    if (r->live_next)
        r->live_next->live_prev = r->live_prev;
    r->live_prev = r->live_next = NULL;
}

/* Stop watching the connection: before the last write of a response (which may free it). */
static void request_detach(srv_request *r)
{
    if (r->watch) {
        event_free(r->watch);
        r->watch = NULL;
    }
    if (r->conn)
        evhttp_connection_set_closecb(r->conn, NULL, NULL);
}

/* The response is complete: drop the HTTP side's reference. */
static void request_answered(srv_request *r)
{
    r->evreq = NULL;
    r->conn = NULL;
    r->answered = true;
    live_remove(r->srv, r);
    request_unref(r);
}

static void send_chunk(srv_request *r, const loom_buf *b)
{
    if (b->len == 0)
        return;
    struct evbuffer *eb = evbuffer_new();
    evbuffer_add(eb, b->data, b->len);
    evhttp_send_reply_chunk(r->evreq, eb);
    evbuffer_free(eb);
}

/* Ends the request with err: a JSON error reply, or an error frame if the stream has begun. */
static void reply_error(srv_request *r, const api_error *err)
{
    request_detach(r);
    if (r->stream_started) {
        loom_buf b;
        buf_init(&b);
        api_stream_error(err, &b);
        send_chunk(r, &b);
        buf_free(&b);
        evhttp_send_reply_end(r->evreq);
    } else {
        send_error(r->evreq, err);
    }
    request_answered(r);
}

static void stream_start(srv_request *r)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(r->evreq);
    evhttp_add_header(h, "Content-Type", "text/event-stream; charset=utf-8");
    evhttp_add_header(h, "Cache-Control", "no-cache");
    evhttp_send_reply_start(r->evreq, 200, "OK");
    r->stream_started = true;
    loom_buf b;
    buf_init(&b);
    api_stream_begin(&r->resp, &b);
    send_chunk(r, &b);
    buf_free(&b);
}

static void deliver_event(srv_request *r, const srv_item *it)
{
    const engine_event *ev = &it->ev;
    if (ev->finish == FINISH_ERROR) {
        api_error err;
        api_error_set(&err, 500, "server_error", NULL, NULL,
                      "the engine failed while running this request");
        reply_error(r, &err);
        return;
    }
    if (r->api.stream) {
        if (!r->stream_started)
            stream_start(r);
        loom_buf b;
        buf_init(&b);
        api_stream_event(&r->resp, ev, it->text ? it->text : "", it->text ? ev->text_len : 0, &b);
        if (ev->finish != FINISH_NONE) {
            api_stream_end(&r->resp, &b);
            request_detach(r);
            send_chunk(r, &b);
            evhttp_send_reply_end(r->evreq);
            request_answered(r);
        } else {
            send_chunk(r, &b);
        }
        buf_free(&b);
        return;
    }
    api_response_add(&r->resp, ev, it->text ? it->text : "", it->text ? ev->text_len : 0);
    if (ev->finish != FINISH_NONE) {
        char *body = api_response_json(&r->resp);
        request_detach(r);
        send_body(r->evreq, 200, "application/json", body, strlen(body));
        free(body);
        request_answered(r);
    }
}

static void deliver(srv_request *r, const srv_item *it)
{
    if (r->gone || r->answered)
        return; /* nobody to tell */
    switch (it->kind) {
    case ITEM_ACCEPTED:
        if (r->api.stream) /* headers now: the client sees the request was taken */
            stream_start(r);
        break;
    case ITEM_REJECTED:
        reply_error(r, it->err);
        break;
    case ITEM_EVENT:
        deliver_event(r, it);
        break;
    }
}

/* The engine thread posted something: hand every ready request its items. */
static void on_wake(evutil_socket_t fd, short what, void *arg)
{
    server *s = arg;
    pthread_mutex_lock(&s->lock);
    int n = 0;
    for (srv_request *r = s->ready_head; r; r = r->ready_next)
        n++;
    srv_request **reqs = xmalloc((size_t)(n ? n : 1) * sizeof(*reqs));
    srv_item **items = xmalloc((size_t)(n ? n : 1) * sizeof(*items));
    int k = 0;
    for (srv_request *r = s->ready_head; r; r = r->ready_next, k++) {
        reqs[k] = r;
        items[k] = r->out_head;
        r->out_head = r->out_tail = NULL;
        r->ready = false;
    }
    s->ready_head = s->ready_tail = NULL;
    pthread_mutex_unlock(&s->lock);

    for (int i = 0; i < n; i++) {
        for (srv_item *it = items[i], *next; it; it = next) {
            next = it->next;
            deliver(reqs[i], it);
            item_free(it);
        }
        request_unref(reqs[i]); /* the ready list's reference */
    }
    free(reqs);
    free(items);
}

/* ---------------------------------------------------------------- disconnects */

static void queue_abort(server *s, uint64_t id)
{
    pthread_mutex_lock(&s->lock);
    if (s->n_aborts == s->cap_aborts) {
        s->cap_aborts = s->cap_aborts ? 2 * s->cap_aborts : 16;
        s->aborts = xrealloc(s->aborts, (size_t)s->cap_aborts * sizeof(*s->aborts));
    }
    s->aborts[s->n_aborts++] = id;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

/*
 * The client went away before its response was complete. from_closecb: evhttp is freeing the
 * connection; if it already detached the request (a failed write) the request is ours to free,
 * otherwise evhttp frees it with the connection. From the watcher the connection is still
 * alive in evhttp's eyes, so we free it (and the request with it).
 */
static void request_gone(srv_request *r, bool from_closecb)
{
    if (r->gone || r->answered)
        return;
    r->gone = true;
    queue_abort(r->srv, r->id);
    struct evhttp_connection *conn = r->conn;
    struct evhttp_request *evreq = r->evreq;
    request_detach(r);
    if (from_closecb) {
        if (evreq && !evhttp_request_get_connection(evreq))
            evhttp_request_free(evreq);
    } else if (conn) {
        evhttp_connection_free(conn);
    }
    r->evreq = NULL;
    r->conn = NULL;
    live_remove(r->srv, r);
    request_unref(r); /* the HTTP side's reference */
}

static void on_conn_close(struct evhttp_connection *conn, void *arg)
{
    request_gone(arg, true);
}

static void on_watch(evutil_socket_t fd, short what, void *arg)
{
    srv_request *r = arg;
    char c;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0) {
        /* a pipelined request: leave the bytes to evhttp, rely on write errors from now on */
        event_del(r->watch);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    request_gone(r, false);
}

/* ---------------------------------------------------------------- endpoints */

static void reply_simple_error(struct evhttp_request *evreq, int status, const char *type,
                               const char *code, const char *msg)
{
    api_error err;
    api_error_set(&err, status, type, NULL, code, "%s", msg);
    send_error(evreq, &err);
}

static void handle_generate(server *s, struct evhttp_request *evreq, api_kind kind)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(evreq);
    size_t len = evbuffer_get_length(in);
    api_error err;
    if (len > s->max_body_bytes) {
        char msg[160];
        snprintf(msg, sizeof(msg),
                 "the request body (%zu bytes) is over the limit of %zu bytes "
                 "(--max-body-bytes)",
                 len, s->max_body_bytes);
        reply_simple_error(evreq, 413, "invalid_request_error", "request_too_large", msg);
        return;
    }
    const char *body = len ? (const char *)evbuffer_pullup(in, -1) : "";
    srv_request *r = xcalloc(1, sizeof(*r));
    r->srv = s;
    if (api_request_parse(kind, body, len, &s->lim, &r->api, &err) != 0 ||
        api_request_tokenize(&r->api, s->tok, &s->lim, &err) != 0) {
        send_error(evreq, &err);
        api_request_free(&r->api);
        free(r);
        return;
    }
    r->id = ++s->next_id;
    r->arrival = loom_now();
    api_response_init(&r->resp, &r->api, r->id, s->model_name, s->tok);
    r->evreq = evreq;
    r->conn = evhttp_request_get_connection(evreq);
    r->refs = 2; /* HTTP side + engine side */

    /* tokens go out as they come: no Nagle delay on small SSE frames */
    struct bufferevent *bev = evhttp_connection_get_bufferevent(r->conn);
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        r->watch = event_new(s->base, fd, EV_READ | EV_PERSIST, on_watch, r);
        event_add(r->watch, NULL);
    }
    evhttp_connection_set_closecb(r->conn, on_conn_close, r);
    r->live_next = s->live;
    if (s->live)
        s->live->live_prev = r;
    s->live = r;

    pthread_mutex_lock(&s->lock);
    r->inbound_next = NULL;
    if (s->inbound_tail)
        s->inbound_tail->inbound_next = r;
    else
        s->inbound_head = r;
    s->inbound_tail = r;
    s->n_inbound++;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

static void handle_completions(server *s, struct evhttp_request *evreq)
{
    handle_generate(s, evreq, API_COMPLETIONS);
}

static void handle_chat(server *s, struct evhttp_request *evreq)
{
    handle_generate(s, evreq, API_CHAT);
}

static void handle_models(server *s, struct evhttp_request *evreq)
{
    loom_buf b;
    buf_init(&b);
    buf_puts(&b, "{\"object\":\"list\",\"data\":[{\"id\":");
    api_json_string(&b, s->model_name, strlen(s->model_name));
    buf_printf(&b, ",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"loom\",\"root\":",
               (long long)s->started_wall);
    api_json_string(&b, s->model_name, strlen(s->model_name));
    buf_printf(&b, ",\"parent\":null,\"max_model_len\":%d,\"backend\":", s->lim.max_model_len);
    api_json_string(&b, s->backend, strlen(s->backend));
    buf_puts(&b, "}]}");
    send_body(evreq, 200, "application/json", b.data, b.len);
    buf_free(&b);
}

static void handle_health(server *s, struct evhttp_request *evreq)
{
    pthread_mutex_lock(&s->lock);
    bool alive = s->engine_alive;
    pthread_mutex_unlock(&s->lock);
    if (alive)
        send_body(evreq, 200, "text/plain; charset=utf-8", "ok", 2);
    else
        reply_simple_error(evreq, 503, "server_error", NULL, "the engine thread is not running");
}

static void handle_metrics(server *s, struct evhttp_request *evreq)
{
    pthread_mutex_lock(&s->lock);
    server_metrics m = s->metrics;
    m.engine.num_waiting += s->n_inbound; /* taken, not yet handed to the engine */
    pthread_mutex_unlock(&s->lock);
    loom_buf b;
    buf_init(&b);
    server_metrics_render(&m, s->model_name, s->backend, &b);
    send_body(evreq, 200, "text/plain; version=0.0.4; charset=utf-8", b.data, b.len);
    buf_free(&b);
}

/* POST /tokenize and /detokenize (vLLM): pure translation on this thread, the tokenizer is
 * read-only. */
static void handle_token_api(server *s, struct evhttp_request *evreq, bool tokenize)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(evreq);
    size_t len = evbuffer_get_length(in);
    if (len > s->max_body_bytes) {
        reply_simple_error(evreq, 413, "invalid_request_error", "request_too_large",
                           "the request body is over the limit (--max-body-bytes)");
        return;
    }
    const char *body = len ? (const char *)evbuffer_pullup(in, -1) : "";
    api_error err;
    loom_buf out;
    buf_init(&out);
    int rc = tokenize ? api_tokenize(body, len, &s->lim, s->tok, &out, &err)
                      : api_detokenize(body, len, &s->lim, s->tok, &out, &err);
    if (rc == 0)
        send_body(evreq, 200, "application/json", out.data, out.len);
    else
        send_error(evreq, &err);
    buf_free(&out);
}

static void handle_tokenize(server *s, struct evhttp_request *evreq)
{
    handle_token_api(s, evreq, true);
}

static void handle_detokenize(server *s, struct evhttp_request *evreq)
{
    handle_token_api(s, evreq, false);
}

typedef struct route {
    const char *path;
    enum evhttp_cmd_type method;
    const char *method_name;
    bool needs_key;
    void (*handle)(server *s, struct evhttp_request *evreq);
} route;

static const route routes[] = {
    {"/v1/completions", EVHTTP_REQ_POST, "POST", true, handle_completions},
    {"/v1/chat/completions", EVHTTP_REQ_POST, "POST", true, handle_chat},
    {"/v1/models", EVHTTP_REQ_GET, "GET", true, handle_models},
    {"/tokenize", EVHTTP_REQ_POST, "POST", true, handle_tokenize},
    {"/detokenize", EVHTTP_REQ_POST, "POST", true, handle_detokenize},
    {"/health", EVHTTP_REQ_GET, "GET", false, handle_health},
    {"/metrics", EVHTTP_REQ_GET, "GET", false, handle_metrics},
};

static void on_request(struct evhttp_request *evreq, void *arg)
{
    server *s = arg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(evreq);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    if (!path || !*path)
        path = "/";
    enum evhttp_cmd_type method = evhttp_request_get_command(evreq);
    for (size_t i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
        const route *rt = &routes[i];
        if (strcmp(path, rt->path) != 0)
            continue;
        if (method != rt->method) {
            evhttp_add_header(evhttp_request_get_output_headers(evreq), "Allow", rt->method_name);
            char msg[160];
            snprintf(msg, sizeof(msg), "%s only accepts %s", rt->path, rt->method_name);
            reply_simple_error(evreq, 405, "invalid_request_error", "method_not_allowed", msg);
            return;
        }
        if (rt->needs_key && !http_bearer_authorized(evreq, s->api_key)) {
            reply_simple_error(evreq, 401, "authentication_error", "invalid_api_key",
                               "invalid or missing API key: send 'Authorization: Bearer <key>'");
            return;
        }
        rt->handle(s, evreq);
        return;
    }
    char msg[200];
    snprintf(msg, sizeof(msg), "no such endpoint: %.120s", path);
    reply_simple_error(evreq, 404, "invalid_request_error", "not_found", msg);
}

/* ---------------------------------------------------------------- lifecycle */

void server_config_default(server_config *c)
{
    memset(c, 0, sizeof(*c));
    c->host = "127.0.0.1";
    c->port = 8000;
    c->model_name = "loom";
    c->api_key = NULL;
    c->max_body_bytes = 8u << 20;
    c->handle_signals = false;
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    server *s = arg;
    LOG_INFO("serve: %s received, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
    event_base_loopbreak(s->base);
}

/* libevent's pthread locking, once per process and before any event_base: the engine thread
 * wakes the loop with event_active. */
static pthread_once_t threads_once = PTHREAD_ONCE_INIT;
static int threads_rc;

static void init_threads(void)
{
    threads_rc = evthread_use_pthreads();
}

int server_create(const server_config *cfg, engine *en, const engine_config *ecfg,
                  const model_config *mc, const tokenizer *tok, const char *backend_name,
                  server **out, loom_err *e)
{
    *out = NULL;
    if (!cfg->model_name || !*cfg->model_name || cfg->max_body_bytes == 0)
        return loom_errf(e, LOOM_EINVAL, "server: a model name and a body limit are needed");

    pthread_once(&threads_once, init_threads);
    if (threads_rc != 0)
        return loom_errf(e, LOOM_EINVAL, "server: libevent has no pthreads support");

    server *s = xcalloc(1, sizeof(*s));
    s->host = xstrdup(cfg->host ? cfg->host : "127.0.0.1");
    s->model_name = xstrdup(cfg->model_name);
    s->api_key = cfg->api_key && *cfg->api_key ? xstrdup(cfg->api_key) : NULL;
    s->backend = xstrdup(backend_name ? backend_name : "cpu");
    s->max_body_bytes = cfg->max_body_bytes;
    s->handle_signals = cfg->handle_signals;
    s->tok = tok;
    s->lim.model_name = s->model_name;
    s->lim.max_model_len = ecfg->max_model_len;
    s->lim.vocab_size = mc->vocab_size;
    s->started_wall = loom_wall();
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    server_metrics_init(&s->metrics);
    engine_get_stats(en, &s->metrics.engine);

    int rc = LOOM_OK;
    s->base = event_base_new();
    s->http = s->base ? evhttp_new(s->base) : NULL;
    s->wake_ev = s->base ? event_new(s->base, -1, 0, on_wake, s) : NULL;
    if (!s->base || !s->http || !s->wake_ev) {
        rc = loom_errf(e, LOOM_ENOMEM, "server: cannot create the event loop");
        goto fail;
    }
    /* Bodies a little over the limit still get a JSON 413 from us; far over it, evhttp cuts the
     * connection short with its own 413 so that nobody can make us buffer unbounded input. */
    size_t hard = cfg->max_body_bytes > ((size_t)1 << 40) ? cfg->max_body_bytes
                                                          : 2 * cfg->max_body_bytes + 65536;
    evhttp_set_max_body_size(s->http, (ev_ssize_t)hard);
    evhttp_set_max_headers_size(s->http, 65536);
    evhttp_set_allowed_methods(s->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                            EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
    evhttp_set_gencb(s->http, on_request, s);

    if (cfg->port < 0 || cfg->port > 65535) {
        rc = loom_errf(e, LOOM_EINVAL, "port %d is not in 0..65535", cfg->port);
        goto fail;
    }
    struct evhttp_bound_socket *sock =
        evhttp_bind_socket_with_handle(s->http, s->host, (ev_uint16_t)cfg->port);
    if (!sock) {
        int err = errno;
        rc = loom_errf(e, LOOM_EIO, "cannot listen on %s:%d: %s%s", s->host, cfg->port,
                       err ? strerror(err) : "bind failed",
                       err == EADDRINUSE ? " (another server is using this port; pick another "
                                           "with --port)"
                                         : "");
        goto fail;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    s->port = cfg->port;
    if (getsockname(evhttp_bound_socket_get_fd(sock), (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET)
            s->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            s->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    s->en = en;
    *out = s;
    return LOOM_OK;
fail:
    s->en = NULL; /* ownership passes only on success */
    server_free(s);
    return rc;
}

int server_port(const server *s)
{
    return s->port;
}

void server_stop(server *s)
{
    event_base_loopbreak(s->base);
}

int server_run(server *s, loom_err *e)
{
    /* a client that vanishes mid-write must not kill the process */
    signal(SIGPIPE, SIG_IGN);
    if (s->handle_signals) {
        s->sigint_ev = evsignal_new(s->base, SIGINT, on_signal, s);
        s->sigterm_ev = evsignal_new(s->base, SIGTERM, on_signal, s);
        if (!s->sigint_ev || !s->sigterm_ev || event_add(s->sigint_ev, NULL) != 0 ||
            event_add(s->sigterm_ev, NULL) != 0)
            return loom_errf(e, LOOM_EINVAL, "server: cannot install signal handlers");
    }
    if (pthread_create(&s->engine_thread, NULL, engine_main, s) != 0)
        return loom_errf(e, LOOM_ENOMEM, "server: cannot start the engine thread");
    s->engine_thread_started = true;

    int rc = event_base_dispatch(s->base);

    pthread_mutex_lock(&s->lock);
    s->stopping = true;
    pthread_cond_signal(&s->cond);
    pthread_mutex_unlock(&s->lock);
    pthread_join(s->engine_thread, NULL);
    s->engine_thread_started = false;
    if (rc < 0)
        return loom_errf(e, LOOM_EIO, "server: the event loop failed");
    return LOOM_OK;
}

void server_free(server *s)
{
    if (!s)
        return;
    if (s->engine_thread_started) { /* server_run did not return normally */
        pthread_mutex_lock(&s->lock);
        s->stopping = true;
        pthread_cond_signal(&s->cond);
        pthread_mutex_unlock(&s->lock);
        pthread_join(s->engine_thread, NULL);
    }
    /* closing every connection ends the requests still in flight (request_gone) */
    if (s->http)
        evhttp_free(s->http);
    while (s->live) { /* connections evhttp freed without telling us: their objects are gone */
        s->live->evreq = NULL;
        s->live->conn = NULL;
        request_gone(s->live, true);
    }
    /* what the engine posted last and nobody delivered */
    pthread_mutex_lock(&s->lock);
    srv_request *ready = s->ready_head;
    s->ready_head = s->ready_tail = NULL;
    pthread_mutex_unlock(&s->lock);
    for (srv_request *r = ready, *next; r; r = next) {
        next = r->ready_next;
        r->ready = false;
        request_unref(r);
    }
    /* requests queued to an engine thread that never ran */
    for (srv_request *r = s->inbound_head, *next; r; r = next) {
        next = r->inbound_next;
        request_unref(r);
    }
    if (s->wake_ev)
        event_free(s->wake_ev);
    if (s->sigint_ev)
        event_free(s->sigint_ev);
    if (s->sigterm_ev)
        event_free(s->sigterm_ev);
    if (s->base)
        event_base_free(s->base);
    if (s->en)
        engine_free(s->en);
    free(s->aborts);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    free(s->host);
    free(s->model_name);
    free(s->api_key);
    free(s->backend);
    free(s);
}
