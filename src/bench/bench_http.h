/*
 * bench_http: the load generator's HTTP/1.1 client (internal to src/bench/).
 *
 * One libevent loop, bufferevents, and a small response parser (status line, headers,
 * Content-Length / chunked / read-until-close bodies, Server-Sent Events). Keep-alive
 * connections are pooled per target, so thousands of concurrent streams cost one socket each
 * and no handshake per request. Every request ends exactly once, through on_done, with a
 * bench_error saying how the transport went; what the response means is the caller's business.
 */
#ifndef LOOM_BENCH_HTTP_H
#define LOOM_BENCH_HTTP_H

#include "loom/bench.h"

#include <event2/event.h>

typedef struct bench_http bench_http;

typedef struct bench_http_handler {
    /* Status and headers read. content_type and instance (the instance header) may be NULL. */
    void (*on_head)(void *arg, int status, const char *content_type, const char *instance);
    /* One Server-Sent Event's data, for 200 responses of type text/event-stream. Must not
     * cancel requests. */
    void (*on_event)(void *arg, const char *data, size_t len, double now);
    /* The request is over. err BENCH_OK: the whole response arrived, body holds what was not
     * SSE (an error body, a JSON response; truncated at 1 MiB). Otherwise msg says why. */
    void (*on_done)(void *arg, bench_error err, const char *msg, const char *body, size_t body_len,
                    double now);
} bench_http_handler;

/* timeout_s: per-request limit from send to the last byte. api_key may be NULL. */
bench_http *bench_http_create(struct event_base *base, double timeout_s,
                              const char *instance_header, const char *api_key);
void bench_http_free(bench_http *c);

/* Adds a target from "http://host[:port][/path]"; returns its index (>= 0) or an error code.
 * The URL's path ("" when none or "/") is copied into path. */
int bench_http_add_target(bench_http *c, const char *url, char *path, size_t path_cap, loom_err *e);
/* "host:port" of a target. */
const char *bench_http_target_name(const bench_http *c, int target);

/*
 * Sends a request (body may be NULL for GET). The handler's callbacks run from the event loop,
 * on_done possibly before bench_http_send returns (a socket that cannot be created). Returns the
 * time the request was handed to the connection (loom_now()).
 */
double bench_http_send(bench_http *c, int target, const char *method, const char *path,
                       const char *body, size_t body_len, const bench_http_handler *h, void *arg);
int bench_http_inflight(const bench_http *c);
/* Ends every request in flight with BENCH_ERR_CANCELLED. */
void bench_http_cancel_all(bench_http *c);
/* Closes the pooled idle connections of a target (-1: all). */
void bench_http_close_idle(bench_http *c, int target);

/* One request, run to completion on the client's loop (for set-up calls: /v1/models,
 * /tokenize). Returns 0 with the status and body (malloc'd), or a transport error. */
int bench_http_fetch(bench_http *c, int target, const char *method, const char *path,
                     const char *body, int *status, char **resp_body, size_t *resp_len,
                     loom_err *e);
/* n requests (bodies[i], or no body when bodies is NULL), at most max_inflight at once. Fills
 * statuses[i] and resp_bodies[i] (malloc'd). A transport failure of any is an error. */
int bench_http_fetch_many(bench_http *c, int target, const char *method, const char *path, int n,
                          const char *const *bodies, int max_inflight, int *statuses,
                          char **resp_bodies, loom_err *e);

#endif
