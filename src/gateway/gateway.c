/*
 * The `loom gateway` service: one libevent thread, an evhttp server for clients and evhttp client
 * connections to the upstreams.
 *
 *   client ──POST──> handle_generate: inspect the body (model, stream, max_tokens, prompt size
 *                    and prefix hashes), then policy_select (/tokenize and /detokenize skip
 *                    the policy: passthrough_select, the next available instance)
 *                      ├─ an instance: attempt_start (policy_dispatch charges its work)
 *                      └─ POLICY_QUEUE / UNAVAILABLE: the FIFO queue (bounded; 503 +
 *                         Retry-After when full or after queue_timeout_s)
 *   upstream ──headers──> on_up_header: a 502/503/504 with retries left is read and dropped
 *            ──chunks───> on_up_chunk: streams go to the client at once, chunk by chunk (the
 *                         SSE scanner counts tokens on the way); other bodies are gathered
 *            ──done─────> attempt_finish: reply, policy_complete, metrics; or, when no byte has
 *                         reached the client yet, a retry on another instance (front of queue)
 *   kick (deferred)       dispatches queued requests when capacity may have freed: after every
 *                         completion, scrape and re-admission; bounded per run
 *   tick (50 ms)          health checks and scrapes that are due, queue timeouts, the
 *                         embedder's tick_fn (loom up restarts instances from there)
 *
 * A request has at most one attempt at a time; its struct lives until both its client side is
 * done (answered or gone) and its attempt is over. A client that disconnects (a read watcher
 * notices EOF, or the connection's close callback a failed write) cancels its upstream request,
 * which closes that connection, so the instance aborts the request and frees its KV blocks.
 * evhttp_cancel_request never calls the request's callbacks, so nothing refers to a freed
 * request afterwards.
 */
#include "gateway_internal.h"

#include <errno.h>
#include <event2/thread.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/socket.h>

#define TICK_S 0.05
#define KICK_BUDGET 256
#define CLIENT_TIMEOUT_S 120

static void attempt_start(gw_request *r, int idx);
static void dispatch_queue(gateway *g);

void gateway_config_default(gateway_config *c)
{
    memset(c, 0, sizeof(*c));
    c->host = "127.0.0.1";
    c->port = 8080;
    c->policy = "capacity_aware";
    policy_config_default(&c->policy_cfg);
    c->max_body_bytes = 8u << 20;
    c->queue_size = 1024;
    c->queue_timeout_s = 30;
    c->retries = 2;
    c->upstream_timeout_s = 600;
    c->health_interval_s = 1;
    c->health_timeout_s = 2;
    c->healthy_threshold = 2;
    c->unhealthy_threshold = 2;
    c->max_fails = 3;
    c->scrape_interval_s = 1;
    c->kv_block_size = 16;
    c->default_output_tokens = 256;
    c->chars_per_token = 4;
    c->max_client_buffer = 16u << 20;
    c->max_idle_connections = 64;
    c->handle_signals = false;
}

/* ---------------------------------------------------------------- HTTP replies */

static void set_instance_header(struct evhttp_request *evreq, const gw_upstream *up)
{
    if (up)
        evhttp_add_header(evhttp_request_get_output_headers(evreq), "x-loom-instance",
                          up->spec.url);
}

/*
 * Writes what evhttp just queued on a connection at once, instead of an event-loop iteration
 * later when epoll reports the socket writable: the bytes reach the peer a wakeup sooner (this
 * is most of the latency a proxy adds). A bufferevent's output may only be drained by the
 * bufferevent, hence the unfreeze/freeze around the write, as its own write callback does.
 *
 * That callback, finding nothing left to write, will not tell evhttp the write is complete; so
 * when a whole response or request was queued and everything went out, evhttp's "written"
 * callback is triggered here. Never for a stream chunk: evhttp waits for nothing then, and a
 * trigger still pending when the response's end is queued would run evhttp's end-of-response
 * before that end was written. If the write is partial, nothing is triggered and the
 * bufferevent finishes as usual.
 */
typedef enum { FLUSH_CHUNK, FLUSH_RESPONSE, FLUSH_REQUEST } flush_kind;

static void flush_now(struct evhttp_connection *conn, flush_kind kind)
{
    struct bufferevent *bev = conn ? evhttp_connection_get_bufferevent(conn) : NULL;
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    if (fd < 0)
        return;
    struct evbuffer *out = bufferevent_get_output(bev);
    if (evbuffer_get_length(out) == 0)
        return;
    evbuffer_unfreeze(out, 1);
    int n = evbuffer_write(out, fd);
    evbuffer_freeze(out, 1);
    if (kind == FLUSH_CHUNK || n <= 0 || evbuffer_get_length(out) != 0)
        return;
    /* A response's end runs evhttp's end-of-request (which may free the request and read the
     * next one) so it must not run inside our caller: deferred. A request's "written" callback
     * only switches the connection to reading the response and calls nothing of ours: it runs
     * now, so that nothing (a cancel) can come between. */
    bufferevent_trigger(bev, EV_WRITE, kind == FLUSH_RESPONSE ? BEV_TRIG_DEFER_CALLBACKS : 0);
}

static void send_body(struct evhttp_request *evreq, int status, const char *content_type,
                      const char *body, size_t len)
{
    struct evhttp_connection *conn = evhttp_request_get_connection(evreq);
    evhttp_add_header(evhttp_request_get_output_headers(evreq), "Content-Type", content_type);
    struct evbuffer *b = evbuffer_new();
    evbuffer_add(b, body, len);
    evhttp_send_reply(evreq, status, status == 200 ? "OK" : NULL, b);
    evbuffer_free(b);
    flush_now(conn, FLUSH_RESPONSE);
}

static void send_error(struct evhttp_request *evreq, const api_error *err, int retry_after)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(evreq);
    if (err->status == 401)
        evhttp_add_header(h, "WWW-Authenticate", "Bearer");
    if (retry_after > 0) {
        char v[16];
        snprintf(v, sizeof(v), "%d", retry_after);
        evhttp_add_header(h, "Retry-After", v);
    }
    char *json = api_error_json(err);
    send_body(evreq, err->status, "application/json", json, strlen(json));
    free(json);
}

static void reply_simple_error(struct evhttp_request *evreq, int status, const char *type,
                               const char *code, const char *msg)
{
    api_error err;
    api_error_set(&err, status, type, NULL, code, "%s", msg);
    send_error(evreq, &err, 0);
}

/* ---------------------------------------------------------------- request bookkeeping */

static void live_add(gateway *g, gw_request *r)
{
    r->live_prev = NULL;
    r->live_next = g->live;
    if (g->live)
        g->live->live_prev = r;
    g->live = r;
}

static void live_remove(gateway *g, gw_request *r)
{
    if (r->live_prev)
        r->live_prev->live_next = r->live_next;
    else if (g->live == r)
        g->live = r->live_next;
    if (r->live_next)
        r->live_next->live_prev = r->live_prev;
    r->live_prev = r->live_next = NULL;
}

/*
 * Watching a client's socket for EOF costs two epoll changes per request, as much as the rest of
 * a short request; so a request gets its watch only once it has lasted a tick. A client that
 * leaves earlier is still noticed when its answer cannot be written.
 */
static void unwatched_push(gateway *g, gw_request *r)
{
    r->in_unwatched = true;
    r->w_next = NULL;
    r->w_prev = g->unwatched_tail;
    if (g->unwatched_tail)
        g->unwatched_tail->w_next = r;
    else
        g->unwatched_head = r;
    g->unwatched_tail = r;
}

static void unwatched_remove(gateway *g, gw_request *r)
{
    if (!r->in_unwatched)
        return;
    if (r->w_prev)
        r->w_prev->w_next = r->w_next;
    else
        g->unwatched_head = r->w_next;
    if (r->w_next)
        r->w_next->w_prev = r->w_prev;
    else
        g->unwatched_tail = r->w_prev;
    r->w_prev = r->w_next = NULL;
    r->in_unwatched = false;
}

static void on_client_watch(evutil_socket_t fd, short what, void *arg);

static void watch_old_requests(gateway *g, double now)
{
    while (g->unwatched_head && now - g->unwatched_head->arrival >= TICK_S) {
        gw_request *r = g->unwatched_head;
        unwatched_remove(g, r);
        if (r->client && r->client_fd >= 0 && !r->watch) {
            r->watch = event_new(g->base, r->client_fd, EV_READ | EV_PERSIST, on_client_watch, r);
            if (r->watch)
                event_add(r->watch, NULL);
        }
    }
}

/* The queued work the policy is told of (policy_set_backlog): r's prompt and expected output
 * tokens added (sign +1) or taken away (-1); pass-through requests generate nothing. */
static void queue_count(gateway *g, gw_request *r, double sign)
{
    if (r->passthrough)
        return;
    g->q_prefill += sign * (r->preq.prompt_tokens > 0 ? r->preq.prompt_tokens : 0);
    g->q_decode += sign * (r->preq.expected_output > 0 ? r->preq.expected_output : 0);
}

static void queue_push(gateway *g, gw_request *r, bool front)
{
    if (g->q_len == 0)
        g->q_moved_at = loom_now(); /* the queue's clock starts with its first request */
    r->queued = true;
    r->queued_front = front;
    r->queued_at = loom_now();
    queue_count(g, r, +1);
    if (front) {
        r->q_prev = NULL;
        r->q_next = g->q_head;
        if (g->q_head)
            g->q_head->q_prev = r;
        else
            g->q_tail = r;
        g->q_head = r;
    } else {
        r->q_next = NULL;
        r->q_prev = g->q_tail;
        if (g->q_tail)
            g->q_tail->q_next = r;
        else
            g->q_head = r;
        g->q_tail = r;
    }
    g->q_len++;
}

static void queue_remove(gateway *g, gw_request *r)
{
    if (!r->queued)
        return;
    if (r->q_prev)
        r->q_prev->q_next = r->q_next;
    else
        g->q_head = r->q_next;
    if (r->q_next)
        r->q_next->q_prev = r->q_prev;
    else
        g->q_tail = r->q_prev;
    r->q_prev = r->q_next = NULL;
    r->queued = false;
    g->q_len--;
    queue_count(g, r, -1);
    if (g->q_len == 0 || g->q_prefill < 0 || g->q_decode < 0) /* no drift from the sums */
        g->q_prefill = g->q_decode = 0;
}

static void attempt_clear(gw_attempt *a)
{
    gateway_sse_free(&a->sse);
    buf_free(&a->body);
    memset(a, 0, sizeof(*a));
}

static void request_free(gw_request *r)
{
    unwatched_remove(r->gw, r);
    if (r->watch)
        event_free(r->watch);
    if (r->abort_pending)
        r->gw->n_abort_pending--;
    attempt_clear(&r->att);
    free(r->body);
    free(r->accept);
    free(r->authorization);
    free(r->request_id);
    free(r);
}

/* Stop watching the client's connection: before the last write of a response. */
static void client_detach(gw_request *r)
{
    unwatched_remove(r->gw, r);
    if (r->watch) {
        event_free(r->watch);
        r->watch = NULL;
    }
    if (r->client_conn)
        evhttp_connection_set_closecb(r->client_conn, NULL, NULL);
}

/* The response is complete (the client has it, or is gone): the request ends here. */
static void request_done(gw_request *r)
{
    r->client = NULL;
    r->client_conn = NULL;
    r->answered = true;
    live_remove(r->gw, r);
    request_free(r);
}

void gateway_kick(gateway *g)
{
    if (!g->kick_pending && g->kick_ev) {
        g->kick_pending = true;
        event_active(g->kick_ev, EV_TIMEOUT, 0);
    }
}

void gateway_defer_free_conn(gateway *g, struct evhttp_connection *conn)
{
    if (g->n_dead == g->cap_dead) {
        g->cap_dead = g->cap_dead ? 2 * g->cap_dead : 16;
        g->dead = xrealloc(g->dead, (size_t)g->cap_dead * sizeof(*g->dead));
    }
    g->dead[g->n_dead++] = conn;
    gateway_kick(g);
}

/* Seconds a refused client should wait: the queue over the recent completion rate. */
static int retry_after_s(const gateway *g)
{
    if (!(g->completion_rate > 0))
        return 1;
    double s = ceil((g->q_len + 1) / g->completion_rate);
    return s < 1 ? 1 : s > 60 ? 60 : (int)s;
}

/* Answers a request that never reached an instance (refused or timed out in the queue). */
static void reject(gw_request *r, int status, const char *code, const char *msg, bool retry)
{
    gateway *g = r->gw;
    queue_remove(g, r);
    if (r->client) {
        api_error err;
        api_error_set(&err, status, status >= 500 ? "server_error" : "invalid_request_error", NULL,
                      code, "%s", msg);
        client_detach(r);
        send_error(r->client, &err, retry ? retry_after_s(g) : 0);
    }
    request_done(r);
}

/* Waits in the queue, or is refused (and freed) when the queue is full: returns false then. */
static bool enqueue(gw_request *r, bool front)
{
    gateway *g = r->gw;
    if (!front && g->q_len >= g->cfg.queue_size) {
        g->rejected_full++;
        char msg[200];
        snprintf(msg, sizeof(msg),
                 "the gateway is overloaded: %d requests are already waiting for an instance "
                 "(--queue-size); retry later",
                 g->q_len);
        reject(r, 503, "queue_full", msg, true);
        return false;
    }
    queue_push(g, r, front);
    return true;
}

/* ---------------------------------------------------------------- client disconnects */

static void attempt_cancel(gw_request *r)
{
    gateway *g = r->gw;
    gw_attempt *a = &r->att;
    if (!a->active)
        return;
    if (a->ureq) {
        /* no callback may run for it any more: cancel skips the done callback, and these */
        evhttp_request_set_error_cb(a->ureq, NULL);
        evhttp_request_set_chunked_cb(a->ureq, NULL);
        evhttp_request_set_header_cb(a->ureq, NULL);
        evhttp_cancel_request(a->ureq); /* resets the connection: the instance sees EOF */
        a->ureq = NULL;
    }
    a->up->in_flight--;
    if (!r->passthrough) {
        policy_outcome o = {.ok = false, .prompt_tokens = -1, .completion_tokens = -1};
        policy_complete(g->pol, g->inst, &a->ticket, &o, loom_now());
    }
    upstream_conn_put(a->up, a->conn);
    attempt_clear(a);
    gateway_kick(g);
}

/*
 * The client went away before its response was complete. from_closecb: evhttp is freeing the
 * connection; if it already detached the request (a failed write) the request is ours to free,
 * otherwise evhttp frees it with the connection. From the watcher the connection is still alive
 * in evhttp's eyes, so we free it (and its request with it). As in src/server/server.c.
 */
static void request_gone(gw_request *r, bool from_closecb)
{
    if (r->gone || r->answered)
        return;
    gateway *g = r->gw;
    r->gone = true;
    g->client_gone_total++;
    queue_remove(g, r);
    attempt_cancel(r);
    struct evhttp_connection *conn = r->client_conn;
    struct evhttp_request *evreq = r->client;
    client_detach(r);
    if (from_closecb) {
        if (evreq && !evhttp_request_get_connection(evreq))
            evhttp_request_free(evreq);
    } else if (conn) {
        evhttp_connection_free(conn);
    }
    r->client = NULL;
    r->client_conn = NULL;
    live_remove(g, r);
    request_free(r);
}

static void on_client_close(struct evhttp_connection *conn, void *arg)
{
    (void)conn;
    request_gone(arg, true);
}

static void on_client_watch(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    gw_request *r = arg;
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

/* ---------------------------------------------------------------- upstream callbacks */

static bool retryable_status(int status)
{
    return status == 502 || status == 503 || status == 504;
}

static int on_up_header(struct evhttp_request *ureq, void *arg)
{
    gw_request *r = arg;
    gw_attempt *a = &r->att;
    a->status = evhttp_request_get_response_code(ureq);
    const char *ct = evhttp_find_header(evhttp_request_get_input_headers(ureq), "Content-Type");
    snprintf(a->content_type, sizeof(a->content_type), "%s", ct ? ct : "application/json");
    if (retryable_status(a->status) && !r->started && r->attempts <= r->gw->cfg.retries)
        a->discard = true; /* another instance may do better; this body is not forwarded */
    return 0;
}

/* First bytes of a stream: the client gets the instance's status and headers now. */
static void stream_start(gw_request *r)
{
    gw_attempt *a = &r->att;
    struct evkeyvalq *h = evhttp_request_get_output_headers(r->client);
    evhttp_add_header(h, "Content-Type", a->content_type);
    evhttp_add_header(h, "Cache-Control", "no-cache");
    set_instance_header(r->client, a->up);
    evhttp_send_reply_start(r->client, a->status, a->status == 200 ? "OK" : NULL);
    r->started = true;
}

static size_t client_backlog(const gw_request *r)
{
    struct evhttp_connection *c = r->client ? evhttp_request_get_connection(r->client) : NULL;
    struct bufferevent *bev = c ? evhttp_connection_get_bufferevent(c) : NULL;
    return bev ? evbuffer_get_length(bufferevent_get_output(bev)) : 0;
}

static void on_up_chunk(struct evhttp_request *ureq, void *arg)
{
    gw_request *r = arg;
    gw_attempt *a = &r->att;
    gateway *g = r->gw;
    struct evbuffer *in = evhttp_request_get_input_buffer(ureq);
    size_t n = evbuffer_get_length(in);
    if (n == 0 || a->discard || !r->client || r->abort_pending)
        return; /* libevent drains what we leave */
    double now = loom_now();
    if (a->first_byte_at == 0)
        a->first_byte_at = now;
    if (!r->info.stream) { /* gathered whole: it may still be retried elsewhere */
        size_t need = a->body.len + n + 1;
        if (need > a->body.cap) {
            size_t cap = a->body.cap ? a->body.cap : 4096;
            while (cap < need)
                cap *= 2;
            a->body.data = xrealloc(a->body.data, cap);
            a->body.cap = cap;
        }
        evbuffer_remove(in, a->body.data + a->body.len, n);
        a->body.len += n;
        a->body.data[a->body.len] = 0;
        return;
    }
    if (!r->started) {
        stream_start(r);
        double ttft = now - r->arrival;
        metrics_histogram_observe(&a->up->ttft, ttft);
        metrics_histogram_observe(&g->ttft, ttft);
    }
    gateway_sse_feed(&a->sse, (const char *)evbuffer_pullup(in, -1), n);
    evhttp_send_reply_chunk(r->client, in); /* moves the bytes: no copy */
    flush_now(r->client_conn, FLUSH_CHUNK);
    if (a->sse.content_frames > a->produced) {
        a->produced = a->sse.content_frames;
        policy_progress(g->pol, g->inst, &a->ticket, (double)a->produced, now);
    }
    if (client_backlog(r) > g->cfg.max_client_buffer) {
        /* the client reads slower than the instance writes: drop it (never from inside this
         * callback; the kick does it) rather than buffer without bound */
        if (!r->abort_pending) {
            r->abort_pending = true;
            g->n_abort_pending++;
        }
        gateway_kick(g);
    }
}

static void on_up_error(enum evhttp_request_error err, void *arg)
{
    gw_request *r = arg;
    r->att.got_error = true;
    r->att.error = (int)err;
}

static const char *transport_error_name(const gw_attempt *a)
{
    if (!a->got_error)
        return "connection refused";
    switch (a->error) {
    case EVREQ_HTTP_TIMEOUT:
        return "timed out";
    case EVREQ_HTTP_EOF:
        return "connection closed";
    case EVREQ_HTTP_INVALID_HEADER:
        return "invalid response headers";
    case EVREQ_HTTP_BUFFER_ERROR:
        return "connection error";
    case EVREQ_HTTP_DATA_TOO_LONG:
        return "response too large or malformed";
    default:
        return "failed";
    }
}

static void observe_completion(gateway *g, double now)
{
    if (g->last_completion > 0 && now > g->last_completion) {
        double inst_rate = 1.0 / (now - g->last_completion);
        g->completion_rate += 0.05 * (inst_rate - g->completion_rate);
    }
    g->last_completion = now;
}

/*
 * An attempt ended: transport_ok says an HTTP response arrived whole; refused that nothing
 * listened. Either answers the client, or (nothing forwarded yet, retries left) puts the request
 * back at the front of the queue with this instance on its avoid list.
 */
static void attempt_finish(gw_request *r, bool transport_ok, bool refused)
{
    gateway *g = r->gw;
    gw_attempt *a = &r->att;
    gw_upstream *up = a->up;
    double now = loom_now();
    up->in_flight--;
    upstream_conn_put(up, a->conn);
    a->conn = NULL;

    double prompt = -1, completion = -1;
    if (transport_ok && !a->discard && !r->passthrough) {
        if (r->info.stream) {
            prompt = a->sse.prompt_tokens;
            completion = a->sse.completion_tokens >= 0 ? a->sse.completion_tokens
                                                       : (double)a->sse.content_frames;
        } else {
            gateway_usage_parse(a->body.data ? a->body.data : "", a->body.len, &prompt,
                                &completion);
        }
    }
    bool served =
        transport_ok && !a->discard && a->status >= 200 && a->status < 300 && !a->sse.error;
    /* a reused keep-alive connection the instance had closed: not the instance's fault */
    bool stale = !transport_ok && a->reused && a->first_byte_at == 0 && a->status == 0 &&
                 a->got_error && a->error == EVREQ_HTTP_EOF;
    bool fault = (!transport_ok && !stale) || a->status == 502 || a->status == 504;
    if (!transport_ok || a->status >= 500)
        up->errors++;
    if (transport_ok)
        up->requests++;
    if (fault)
        upstream_request_failed(up, refused, now);
    else if (transport_ok && a->status < 500)
        upstream_request_ok(up);

    if (!r->passthrough) {
        policy_outcome o = {.ok = served, .prompt_tokens = prompt, .completion_tokens = completion};
        policy_complete(g->pol, g->inst, &a->ticket, &o, now);
    }
    if (served && !r->passthrough) {
        if (prompt > 0)
            up->prompt_tokens += (uint64_t)prompt;
        if (completion > 0)
            up->generation_tokens += (uint64_t)completion;
        policy_lengths_observe(&g->lengths, r->info.model,
                               r->info.prompt_ids > 0 ? -1 : r->info.prompt_chars, prompt,
                               completion);
        observe_completion(g, now);
    }

    bool retry =
        !r->started && !r->gone && (!transport_ok || a->discard) && r->attempts <= g->cfg.retries;
    if (retry) {
        if (a->discard)
            snprintf(r->last_error, sizeof(r->last_error), "instance %s answered %d", up->spec.url,
                     a->status);
        else
            snprintf(r->last_error, sizeof(r->last_error), "instance %s: %s", up->spec.url,
                     transport_error_name(a));
        r->last_status = a->discard ? a->status : (a->error == EVREQ_HTTP_TIMEOUT ? 504 : 502);
        if (!stale && r->preq.n_avoid < POLICY_MAX_AVOID)
            r->preq.avoid[r->preq.n_avoid++] = up->idx;
        g->retries_total++;
        up->retried_away++;
        attempt_clear(a);
        enqueue(r, true);
        gateway_kick(g);
        return;
    }

    if (r->client) {
        client_detach(r);
        if (r->started) {
            if (!transport_ok) { /* the stream broke: tell the client in its own terms */
                api_error err;
                api_error_set(&err, 502, "server_error", NULL, "upstream_error",
                              "instance %s failed mid-stream: %s", up->spec.url,
                              transport_error_name(a));
                loom_buf b;
                buf_init(&b);
                api_stream_error(&err, &b);
                struct evbuffer *eb = evbuffer_new();
                evbuffer_add(eb, b.data, b.len);
                evhttp_send_reply_chunk(r->client, eb);
                evbuffer_free(eb);
                buf_free(&b);
            }
            struct evhttp_connection *conn = r->client_conn;
            evhttp_send_reply_end(r->client);
            flush_now(conn, FLUSH_RESPONSE);
        } else if (transport_ok && !a->discard) {
            set_instance_header(r->client, up);
            send_body(r->client, a->status, a->content_type, a->body.data ? a->body.data : "",
                      a->body.len);
        } else {
            api_error err;
            int status = a->discard ? a->status
                                    : (a->got_error && a->error == EVREQ_HTTP_TIMEOUT ? 504 : 502);
            if (a->discard)
                api_error_set(&err, status, "server_error", NULL, "upstream_error",
                              "instance %s answered %d (after %d attempt(s))", up->spec.url, status,
                              r->attempts);
            else
                api_error_set(&err, status, "server_error", NULL, "upstream_error",
                              "instance %s: %s (after %d attempt(s))", up->spec.url,
                              transport_error_name(a), r->attempts);
            set_instance_header(r->client, up);
            send_error(r->client, &err, status == 503 ? 1 : 0);
        }
        if (served && !r->passthrough) {
            metrics_histogram_observe(&up->e2e, now - r->arrival);
            metrics_histogram_observe(&g->e2e, now - r->arrival);
        }
    }
    attempt_clear(a);
    request_done(r);
    gateway_kick(g);
}

static void on_up_done(struct evhttp_request *ureq, void *arg)
{
    gw_request *r = arg;
    gw_attempt *a = &r->att;
    a->ureq = NULL;      /* libevent frees it after we return */
    if (r->start_flag) { /* called back from inside attempt_start's evhttp_make_request */
        *r->start_flag = true;
        r->start_flag = NULL;
    }
    if (!a->active)
        return;
    int code = ureq ? evhttp_request_get_response_code(ureq) : 0;
    bool transport_ok = ureq && code != 0 && !a->got_error;
    /* a connect failure comes back as the request itself with no status and no error */
    bool refused = ureq && code == 0 && !a->got_error;
    if (transport_ok)
        a->status = code;
    attempt_finish(r, transport_ok, refused);
}

/* ---------------------------------------------------------------- dispatch */

static void attempt_start(gw_request *r, int idx)
{
    gateway *g = r->gw;
    gw_upstream *up = g->ups[idx];
    gw_attempt *a = &r->att;
    double now = loom_now();
    attempt_clear(a);
    a->active = true;
    a->up = up;
    gateway_sse_init(&a->sse);
    buf_init(&a->body);
    r->attempts++;
    up->in_flight++;
    if (!r->passthrough) {
        policy_dispatch(g->pol, g->inst, g->n_ups, idx, &r->preq, now, &a->ticket);
        up->dispatched++;
        g->dispatched_total++;
    }

    a->conn = upstream_conn_get(up, &a->reused);
    struct evhttp_request *ureq = a->conn ? evhttp_request_new(on_up_done, r) : NULL;
    if (!ureq) {
        attempt_finish(r, false, false);
        return;
    }
    evhttp_request_set_header_cb(ureq, on_up_header);
    evhttp_request_set_chunked_cb(ureq, on_up_chunk);
    evhttp_request_set_error_cb(ureq, on_up_error);
    struct evkeyvalq *h = evhttp_request_get_output_headers(ureq);
    evhttp_add_header(h, "Host", up->hostport);
    evhttp_add_header(h, "Content-Type", "application/json");
    evhttp_add_header(h, "Accept", r->accept ? r->accept : "*/*");
    if (g->upstream_api_key) {
        char auth[300];
        snprintf(auth, sizeof(auth), "Bearer %s", g->upstream_api_key);
        evhttp_add_header(h, "Authorization", auth);
    } else if (r->authorization) {
        evhttp_add_header(h, "Authorization", r->authorization);
    }
    if (r->request_id)
        evhttp_add_header(h, "X-Request-Id", r->request_id);
    evbuffer_add(evhttp_request_get_output_buffer(ureq), r->body, r->body_len);
    const char *uri = r->ep == GATEWAY_CHAT         ? up->uri_chat
                      : r->ep == GATEWAY_TOKENIZE   ? up->uri_tokenize
                      : r->ep == GATEWAY_DETOKENIZE ? up->uri_detokenize
                                                    : up->uri_completions;
    a->ureq = ureq;
    /* A connect that fails at once calls on_up_done before evhttp_make_request returns, which
     * may answer and free r: the flag on our stack says so, and then r is not touched again. */
    bool called = false;
    r->start_flag = &called;
    int rc = evhttp_make_request(a->conn, ureq, EVHTTP_REQ_POST, uri);
    if (called)
        return;
    r->start_flag = NULL;
    if (rc != 0) {
        evhttp_request_free(ureq); /* never queued, never called back */
        a->ureq = NULL;
        attempt_finish(r, false, false);
        return;
    }
    /* a kept-alive connection has the request queued now: send it without waiting a turn
     * (no TCP_NODELAY needed upstream: a request goes out in one write, nothing unacked) */
    if (a->reused)
        flush_now(a->conn, FLUSH_REQUEST);
}

/*
 * A pass-through request (/tokenize, /detokenize) goes to the next available instance in turn,
 * one it has not failed on if there is one; the policy is not asked and its books are not
 * touched (the request generates nothing). POLICY_UNAVAILABLE when none is available.
 */
static int passthrough_select(gateway *g, gw_request *r)
{
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < g->n_ups; k++) {
            int i = (g->passthrough_cursor + k) % g->n_ups;
            if (!upstream_available(g->ups[i]))
                continue;
            bool avoided = false;
            for (int j = 0; pass == 0 && j < r->preq.n_avoid; j++)
                avoided |= r->preq.avoid[j] == i;
            if (avoided)
                continue;
            g->passthrough_cursor = (i + 1) % g->n_ups;
            return i;
        }
    }
    return POLICY_UNAVAILABLE;
}

/*
 * The queue, head first, while the policy places requests. FIFO: when the head must wait, so
 * does everything behind it (the policy answered for the cluster, not for this request alone).
 * A retry whose avoided instances are the only ones left may go back to one of them.
 */
static void dispatch_queue(gateway *g)
{
    double now = loom_now();
    int budget = KICK_BUDGET;
    while (g->q_head && budget-- > 0) {
        gw_request *r = g->q_head;
        if (!r->passthrough)
            policy_set_backlog(g->pol, g->q_prefill, g->q_decode);
        int i = r->passthrough ? passthrough_select(g, r)
                               : policy_select(g->pol, g->inst, g->n_ups, &r->preq, now);
        if (i == POLICY_UNAVAILABLE && r->preq.n_avoid > 0 && !r->passthrough) {
            r->preq.n_avoid = 0;
            i = policy_select(g->pol, g->inst, g->n_ups, &r->preq, now);
        }
        if (i < 0)
            break;
        queue_remove(g, r);
        g->q_moved_at = now;
        metrics_histogram_observe(&g->queue_time, now - r->queued_at);
        attempt_start(r, i);
    }
    if (g->q_head && budget < 0)
        gateway_kick(g); /* more may go: after other events have had their turn */
}

static void on_kick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    gateway *g = arg;
    g->kick_pending = false;
    for (int i = 0; i < g->n_dead; i++)
        evhttp_connection_free(g->dead[i]);
    g->n_dead = 0;
    for (gw_request *r = g->n_abort_pending ? g->live : NULL, *next; r; r = next) {
        next = r->live_next;
        if (r->abort_pending && !r->gone && !r->answered) {
            LOG_WARN("gateway: dropping a client more than %zu bytes behind its stream",
                     g->cfg.max_client_buffer);
            request_gone(r, false);
        }
    }
    dispatch_queue(g);
}

static void on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    gateway *g = arg;
    double now = loom_now();
    if (g->cfg.tick_fn)
        g->cfg.tick_fn(g->cfg.tick_arg, now);
    upstream_probe_sweep(g, now);
    watch_old_requests(g, now);
    /* queue timeouts: a request that has waited longer than the timeout while the queue did
     * not move for as long (no request left it for an instance). A queue that moves is the
     * cluster's waiting room (capacity_aware holds requests beyond the instances' batches), not
     * a stall. Behind the retries (pushed to the front, each with a fresh clock) the queue is
     * in order of arrival, so the scan stops at the first one still in time. */
    bool stalled = now - g->q_moved_at > g->cfg.queue_timeout_s;
    for (gw_request *r = g->q_head, *next; r && stalled; r = next) {
        next = r->q_next;
        if (now - r->queued_at <= g->cfg.queue_timeout_s) {
            if (r->queued_front)
                continue;
            break;
        }
        bool any = false;
        for (int i = 0; i < g->n_ups; i++)
            any |= upstream_available(g->ups[i]);
        char msg[400];
        if (any) {
            g->rejected_timeout++;
            snprintf(msg, sizeof(msg),
                     "no instance had room for this request, and the queue did not move, for "
                     "%g s (--queue-timeout); retry later",
                     g->cfg.queue_timeout_s);
            reject(r, 503, "queue_timeout", msg, true);
        } else {
            g->rejected_unavailable++;
            snprintf(msg, sizeof(msg), "no healthy instance for %g s%s%.300s",
                     g->cfg.queue_timeout_s, r->last_error[0] ? "; last error: " : "",
                     r->last_error);
            reject(r, 503, "no_healthy_upstream", msg, true);
        }
    }
    if (g->q_head)
        dispatch_queue(g);
}

/* ---------------------------------------------------------------- endpoints */

static char *header_copy(struct evhttp_request *evreq, const char *name)
{
    const char *v = evhttp_find_header(evhttp_request_get_input_headers(evreq), name);
    return v && strlen(v) < 4096 ? xstrdup(v) : NULL;
}

static void handle_generate(gateway *g, struct evhttp_request *evreq, gateway_endpoint ep)
{
    struct evbuffer *in = evhttp_request_get_input_buffer(evreq);
    size_t len = evbuffer_get_length(in);
    g->requests_total++;
    if (len > g->cfg.max_body_bytes) {
        char msg[200];
        snprintf(msg, sizeof(msg),
                 "the request body (%zu bytes) is over the gateway's limit of %zu bytes "
                 "(--max-body-bytes)",
                 len, g->cfg.max_body_bytes);
        g->bad_requests++;
        reply_simple_error(evreq, 413, "invalid_request_error", "request_too_large", msg);
        return;
    }
    gw_request *r = xcalloc(1, sizeof(*r));
    r->gw = g;
    r->ep = ep;
    r->passthrough = ep == GATEWAY_TOKENIZE || ep == GATEWAY_DETOKENIZE;
    r->body = xmalloc(len + 1);
    evbuffer_remove(in, r->body, len);
    r->body[len] = 0;
    r->body_len = len;
    char why[160];
    bool hash_prefix = g->cfg.policy_cfg.prefix_affinity && !r->passthrough;
    if (gateway_request_inspect(ep, r->body, len, hash_prefix, &r->info, why, sizeof(why)) != 0) {
        g->bad_requests++;
        reply_simple_error(evreq, 400, "invalid_request_error", "invalid_json", why);
        request_free(r);
        return;
    }
    r->id = ++g->next_id;
    r->arrival = loom_now();
    r->accept = header_copy(evreq, "Accept");
    if (!g->api_key) /* with a key of its own the gateway does not pass the client's on */
        r->authorization = header_copy(evreq, "Authorization");
    r->request_id = header_copy(evreq, "X-Request-Id");

    /* what the policy sees */
    const char *model = r->info.model;
    policy_request *pr = &r->preq;
    pr->prompt_tokens = r->info.prompt_ids > 0 ? r->info.prompt_ids
                                               : policy_lengths_prompt_tokens(&g->lengths, model,
                                                                              r->info.prompt_chars);
    pr->expected_output = policy_lengths_expected(&g->lengths, model, r->info.max_tokens);
    pr->prefix = r->info.prefix;
    pr->n_prefix = r->info.n_prefix;
    pr->prefix_block_tokens =
        r->info.prefix_is_ids
            ? GATEWAY_PREFIX_BLOCK_IDS
            : GATEWAY_PREFIX_BLOCK_BYTES / policy_lengths_chars_per_token(&g->lengths, model);

    /* the client side: tokens go out as they come (no Nagle), and a vanished client is seen */
    r->client = evreq;
    r->client_conn = evhttp_request_get_connection(evreq);
    struct bufferevent *bev = evhttp_connection_get_bufferevent(r->client_conn);
    r->client_fd = bev ? bufferevent_getfd(bev) : -1;
    if (r->client_fd >= 0 && r->info.stream && g->cfg.max_client_buffer <= (4u << 20)) {
        /* a small limit must count the kernel's buffer too, or autotuning hides megabytes of
         * backlog from it (Linux doubles the value it is given) */
        int sndbuf = (int)(g->cfg.max_client_buffer / 2);
        setsockopt(r->client_fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    }
    evhttp_connection_set_closecb(r->client_conn, on_client_close, r);
    live_add(g, r);
    unwatched_push(g, r);

    if (r->passthrough) {
        /* nothing to book and nothing to wait for but an available instance: not behind the
         * requests the policy holds back */
        r->info.stream = false; /* the answer is gathered whole, so it can be retried */
        int i = passthrough_select(g, r);
        if (i >= 0) {
            attempt_start(r, i);
            return;
        }
    } else if (g->q_len == 0) {
        policy_set_backlog(g->pol, pr->prompt_tokens, pr->expected_output); /* r alone */
        int i = policy_select(g->pol, g->inst, g->n_ups, pr, r->arrival);
        if (i >= 0) {
            attempt_start(r, i);
            return;
        }
    }
    if (enqueue(r, false))
        gateway_kick(g);
}

static void handle_completions(gateway *g, struct evhttp_request *evreq)
{
    handle_generate(g, evreq, GATEWAY_COMPLETIONS);
}

static void handle_chat(gateway *g, struct evhttp_request *evreq)
{
    handle_generate(g, evreq, GATEWAY_CHAT);
}

static void handle_tokenize(gateway *g, struct evhttp_request *evreq)
{
    handle_generate(g, evreq, GATEWAY_TOKENIZE);
}

static void handle_detokenize(gateway *g, struct evhttp_request *evreq)
{
    handle_generate(g, evreq, GATEWAY_DETOKENIZE);
}

static void handle_models(gateway *g, struct evhttp_request *evreq)
{
    loom_buf b;
    buf_init(&b);
    int n = 0;
    render_models(g, &b, &n);
    if (n == 0) {
        api_error err;
        api_error_set(&err, 503, "server_error", NULL, "no_models",
                      "no instance has answered /v1/models yet; retry shortly");
        send_error(evreq, &err, 1);
    } else {
        send_body(evreq, 200, "application/json", b.data, b.len);
    }
    buf_free(&b);
}

static void handle_health(gateway *g, struct evhttp_request *evreq)
{
    int ready = 0;
    for (int i = 0; i < g->n_ups; i++)
        ready += upstream_available(g->ups[i]) && g->ups[i]->checked;
    char body[160];
    int n =
        snprintf(body, sizeof(body), "{\"status\":\"%s\",\"ready_upstreams\":%d,\"upstreams\":%d}",
                 ready ? "ok" : "unavailable", ready, g->n_ups);
    if (ready)
        send_body(evreq, 200, "application/json", body, (size_t)n);
    else
        reply_simple_error(evreq, 503, "server_error", "no_healthy_upstream",
                           "no upstream is healthy (see GET /admin/upstreams)");
}

static void handle_metrics(gateway *g, struct evhttp_request *evreq)
{
    loom_buf b;
    buf_init(&b);
    render_metrics(g, &b);
    send_body(evreq, 200, "text/plain; version=0.0.4; charset=utf-8", b.data, b.len);
    buf_free(&b);
}

static void handle_upstreams(gateway *g, struct evhttp_request *evreq)
{
    loom_buf b;
    buf_init(&b);
    render_upstreams_json(g, &b);
    send_body(evreq, 200, "application/json", b.data, b.len);
    buf_free(&b);
}

/* POST /admin/drain?upstream=URL and /admin/undrain?upstream=URL */
static void handle_drain(gateway *g, struct evhttp_request *evreq, bool drain)
{
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(evreq);
    const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
    struct evkeyvalq params;
    TAILQ_INIT(&params);
    const char *url = NULL;
    if (query && evhttp_parse_query_str(query, &params) == 0)
        url = evhttp_find_header(&params, "upstream");
    gw_upstream *up = url ? upstream_find(g, url) : NULL;
    if (!up) {
        char msg[320];
        snprintf(msg, sizeof(msg), "%s%.200s%s", url ? "no upstream " : "",
                 url ? url : "give the upstream as ?upstream=http://HOST:PORT",
                 url ? " (GET /admin/upstreams lists them)" : "");
        reply_simple_error(evreq, url ? 404 : 400, "invalid_request_error",
                           url ? "upstream_not_found" : "missing_upstream", msg);
        evhttp_clear_headers(&params);
        return;
    }
    evhttp_clear_headers(&params);
    if (up->drained != drain) {
        up->drained = drain;
        LOG_INFO("gateway: upstream %s %s", up->spec.url, drain ? "drained" : "re-added");
        if (!drain)
            policy_reset_instance(g->pol, up->idx);
    }
    upstream_sync_availability(g);
    if (!drain)
        gateway_kick(g);
    loom_buf b;
    buf_init(&b);
    render_upstream_json(g, up, &b);
    send_body(evreq, 200, "application/json", b.data, b.len);
    buf_free(&b);
}

static void handle_drain_on(gateway *g, struct evhttp_request *evreq)
{
    handle_drain(g, evreq, true);
}

static void handle_drain_off(gateway *g, struct evhttp_request *evreq)
{
    handle_drain(g, evreq, false);
}

typedef struct route {
    const char *path;
    enum evhttp_cmd_type method;
    const char *method_name;
    bool needs_key;
    void (*handle)(gateway *g, struct evhttp_request *evreq);
} route;

static const route routes[] = {
    {"/v1/completions", EVHTTP_REQ_POST, "POST", true, handle_completions},
    {"/v1/chat/completions", EVHTTP_REQ_POST, "POST", true, handle_chat},
    {"/v1/models", EVHTTP_REQ_GET, "GET", true, handle_models},
    {"/tokenize", EVHTTP_REQ_POST, "POST", true, handle_tokenize},
    {"/detokenize", EVHTTP_REQ_POST, "POST", true, handle_detokenize},
    {"/health", EVHTTP_REQ_GET, "GET", false, handle_health},
    {"/metrics", EVHTTP_REQ_GET, "GET", false, handle_metrics},
    {"/admin/upstreams", EVHTTP_REQ_GET, "GET", true, handle_upstreams},
    {"/admin/drain", EVHTTP_REQ_POST, "POST", true, handle_drain_on},
    {"/admin/undrain", EVHTTP_REQ_POST, "POST", true, handle_drain_off},
};

static void on_request(struct evhttp_request *evreq, void *arg)
{
    gateway *g = arg;
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
        if (rt->needs_key && !http_bearer_authorized(evreq, g->api_key)) {
            g->bad_requests++;
            reply_simple_error(evreq, 401, "authentication_error", "invalid_api_key",
                               "invalid or missing API key: send 'Authorization: Bearer <key>'");
            return;
        }
        rt->handle(g, evreq);
        return;
    }
    char msg[200];
    snprintf(msg, sizeof(msg), "no such endpoint: %.120s", path);
    reply_simple_error(evreq, 404, "invalid_request_error", "not_found", msg);
}

/* ---------------------------------------------------------------- lifecycle */

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    gateway *g = arg;
    LOG_INFO("gateway: %s received, shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
    event_base_loopbreak(g->base);
}

static pthread_once_t threads_once = PTHREAD_ONCE_INIT;
static int threads_rc;

static void init_threads(void)
{
    threads_rc = evthread_use_pthreads();
}

int gateway_create(const gateway_config *cfg, gateway **out, loom_err *e)
{
    *out = NULL;
    if (cfg->max_body_bytes == 0 || cfg->queue_size < 0 || cfg->retries < 0 || cfg->max_fails < 1 ||
        cfg->healthy_threshold < 1 || cfg->unhealthy_threshold < 1 ||
        !(cfg->upstream_timeout_s > 0) || cfg->max_idle_connections < 0)
        return loom_errf(e, LOOM_EINVAL,
                         "gateway: invalid configuration (limits must be "
                         "positive)");
    if (cfg->port < 0 || cfg->port > 65535)
        return loom_errf(e, LOOM_EINVAL, "port %d is not in 0..65535", cfg->port);
    pthread_once(&threads_once, init_threads);
    if (threads_rc != 0)
        return loom_errf(e, LOOM_EINVAL, "gateway: libevent has no pthreads support");

    gateway *g = xcalloc(1, sizeof(*g));
    g->cfg = *cfg;
    g->host = xstrdup(cfg->host ? cfg->host : "127.0.0.1");
    g->api_key = cfg->api_key && *cfg->api_key ? xstrdup(cfg->api_key) : NULL;
    g->upstream_api_key =
        cfg->upstream_api_key && *cfg->upstream_api_key ? xstrdup(cfg->upstream_api_key) : NULL;
    g->policy_name = xstrdup(cfg->policy ? cfg->policy : "capacity_aware");
    g->cfg.host = g->host;
    g->cfg.api_key = g->api_key;
    g->cfg.upstream_api_key = g->upstream_api_key;
    g->cfg.policy = g->policy_name;
    g->started_wall = loom_wall();
    policy_lengths_init(&g->lengths, cfg->default_output_tokens, cfg->chars_per_token);
    metrics_histogram_init(&g->ttft, metrics_ttft_buckets, metrics_ttft_n_buckets);
    metrics_histogram_init(&g->e2e, metrics_e2e_buckets, metrics_e2e_n_buckets);
    metrics_histogram_init(&g->queue_time, metrics_ttft_buckets, metrics_ttft_n_buckets);

    int rc = policy_create(g->policy_name, &cfg->policy_cfg, &g->pol, e);
    if (rc != 0)
        goto fail;
    rc = upstreams_create(g, e);
    g->cfg.upstreams = NULL; /* copied into the upstreams: the caller's array is not kept */
    if (rc != 0)
        goto fail;

    /* the epoll changelist folds the many enable/disable calls evhttp makes within one loop
     * iteration into one epoll_ctl each (or none): most of a short request's syscalls */
    struct event_config *ec = event_config_new();
    if (ec)
        event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    g->base = ec ? event_base_new_with_config(ec) : NULL;
    if (ec)
        event_config_free(ec);
    if (!g->base)
        g->base = event_base_new();
    g->http = g->base ? evhttp_new(g->base) : NULL;
    g->kick_ev = g->base ? event_new(g->base, -1, 0, on_kick, g) : NULL;
    g->tick_ev = g->base ? event_new(g->base, -1, EV_PERSIST, on_tick, g) : NULL;
    if (!g->base || !g->http || !g->kick_ev || !g->tick_ev) {
        rc = loom_errf(e, LOOM_ENOMEM, "gateway: cannot create the event loop");
        goto fail;
    }
    /* bodies a little over the limit get our JSON 413; far over, evhttp cuts them short */
    size_t hard = cfg->max_body_bytes > ((size_t)1 << 40) ? cfg->max_body_bytes
                                                          : 2 * cfg->max_body_bytes + 65536;
    evhttp_set_max_body_size(g->http, (ev_ssize_t)hard);
    evhttp_set_max_headers_size(g->http, 65536);
    evhttp_set_timeout(g->http, CLIENT_TIMEOUT_S);
    evhttp_set_allowed_methods(g->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                            EVHTTP_REQ_OPTIONS | EVHTTP_REQ_PATCH);
    evhttp_set_gencb(g->http, on_request, g);
    struct evhttp_bound_socket *sock =
        evhttp_bind_socket_with_handle(g->http, g->host, (ev_uint16_t)cfg->port);
    if (!sock) {
        int err = errno;
        rc = loom_errf(e, LOOM_EIO, "cannot listen on %s:%d: %s%s", g->host, cfg->port,
                       err ? strerror(err) : "bind failed",
                       err == EADDRINUSE ? " (another server is using this port; pick another "
                                           "with --port)"
                                         : "");
        goto fail;
    }
    /* accepted sockets inherit TCP_NODELAY (Linux): tokens go out as they come */
    int one = 1;
    setsockopt(evhttp_bound_socket_get_fd(sock), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    g->port = cfg->port;
    if (getsockname(evhttp_bound_socket_get_fd(sock), (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET)
            g->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            g->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    *out = g;
    return LOOM_OK;
fail:
    gateway_free(g);
    return rc;
}

int gateway_port(const gateway *g)
{
    return g->port;
}

void gateway_stop(gateway *g)
{
    event_base_loopbreak(g->base);
}

int gateway_run(gateway *g, loom_err *e)
{
    signal(SIGPIPE, SIG_IGN); /* a client that vanishes mid-write must not kill the process */
    if (g->cfg.handle_signals && !g->sigint_ev) {
        g->sigint_ev = evsignal_new(g->base, SIGINT, on_signal, g);
        g->sigterm_ev = evsignal_new(g->base, SIGTERM, on_signal, g);
        if (!g->sigint_ev || !g->sigterm_ev || event_add(g->sigint_ev, NULL) != 0 ||
            event_add(g->sigterm_ev, NULL) != 0)
            return loom_errf(e, LOOM_EINVAL, "gateway: cannot install signal handlers");
    }
    struct timeval tick = {0, (suseconds_t)(TICK_S * 1e6)};
    event_add(g->tick_ev, &tick);
    upstream_probe_sweep(g, loom_now()); /* first health checks and scrapes at once */
    int rc = event_base_dispatch(g->base);
    event_del(g->tick_ev);
    if (rc < 0)
        return loom_errf(e, LOOM_EIO, "gateway: the event loop failed");
    return LOOM_OK;
}

void gateway_free(gateway *g)
{
    if (!g)
        return;
    /* closing every client connection ends the requests in flight (request_gone cancels their
     * upstream attempts) */
    if (g->http)
        evhttp_free(g->http);
    while (g->live) { /* connections evhttp freed without telling us: their objects are gone */
        g->live->client = NULL;
        g->live->client_conn = NULL;
        g->live->gone = false;
        request_gone(g->live, true);
    }
    for (int i = 0; i < g->n_dead; i++)
        evhttp_connection_free(g->dead[i]);
    free(g->dead);
    if (g->ups)
        upstreams_free(g);
    if (g->kick_ev)
        event_free(g->kick_ev);
    if (g->tick_ev)
        event_free(g->tick_ev);
    if (g->sigint_ev)
        event_free(g->sigint_ev);
    if (g->sigterm_ev)
        event_free(g->sigterm_ev);
    if (g->base)
        event_base_free(g->base);
    policy_free(g->pol);
    free(g->host);
    free(g->api_key);
    free(g->upstream_api_key);
    free(g->policy_name);
    free(g);
}
