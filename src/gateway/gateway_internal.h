/*
 * Shared by the files of src/gateway: the service's objects. Everything here is owned by the one
 * libevent thread that runs gateway_run; nothing is locked.
 *
 *   gateway.c   lifecycle, routes, the request lifecycle (queue, dispatch, attempts, retries)
 *   upstream.c  upstreams: keep-alive connection pools, health checks, /metrics scraping,
 *               /v1/models, ejection and re-admission
 *   render.c    /metrics, /v1/models and the admin endpoints' JSON
 */
#ifndef LOOM_GATEWAY_INTERNAL_H
#define LOOM_GATEWAY_INTERNAL_H

#include "loom/gateway.h"
#include "loom/server.h" /* api_error_*, metrics_* */

#include <cJSON.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>

typedef struct gateway gateway;
typedef struct gw_upstream gw_upstream;

typedef enum { PROBE_HEALTH, PROBE_METRICS, PROBE_MODELS, N_PROBES } probe_kind;

typedef struct gw_probe {
    gw_upstream *up;
    probe_kind kind;
    bool pending;
} gw_probe;

struct gw_upstream {
    gateway *gw;
    int idx; /* in gw->ups and gw->inst */
    gateway_upstream_spec spec;
    char hostport[160];                       /* the Host header */
    char uri_completions[128], uri_chat[128]; /* base path + endpoint */
    char uri_tokenize[128], uri_detokenize[128];
    /* state */
    bool healthy;             /* active checks (or passive ejection) say it serves */
    bool drained;             /* admin: no new requests */
    bool checked;             /* a health check has passed at least once */
    int check_ok, check_fail; /* consecutive health check results */
    int passive_fails;        /* consecutive failed requests */
    double ejected_at;        /* when it was last ejected (< 0 never) */
    double next_health, next_scrape, next_models;
    bool has_metrics; /* /metrics answered with something we read */
    bool no_metrics;  /* /metrics is not there (404): asked rarely */
    cJSON *models;    /* the "data" array of its /v1/models, or NULL */
    /* connections */
    struct evhttp_connection *probe_conn;
    gw_probe probes[N_PROBES];
    struct evhttp_connection **idle;
    int n_idle, cap_idle;
    /* counters */
    uint64_t requests, errors, dispatched, retried_away, prompt_tokens, generation_tokens;
    int64_t in_flight;
    metrics_histogram ttft, e2e;
};

/* One attempt of a request on one upstream (a request has at most one at a time). */
typedef struct gw_attempt {
    bool active; /* between start and finish */
    gw_upstream *up;
    struct evhttp_connection *conn;
    struct evhttp_request *ureq; /* NULL once libevent is done with it */
    policy_ticket ticket;
    bool reused;    /* the connection had served a request before */
    bool got_error; /* libevent's error callback ran */
    int error;      /* enum evhttp_request_error */
    int status;     /* HTTP status, 0 before headers */
    bool discard;   /* a retryable status: read and drop the body, then retry */
    char content_type[128];
    gateway_sse sse;
    loom_buf body; /* non-streaming: the whole body */
    double first_byte_at;
    int64_t produced; /* content frames reported to the policy */
} gw_attempt;

typedef struct gw_request {
    gateway *gw;
    uint64_t id;
    gateway_endpoint ep;
    bool passthrough; /* /tokenize, /detokenize: no policy, no books, any available instance */
    char *body;
    size_t body_len;
    char *accept, *authorization, *request_id; /* client headers passed on (or NULL) */
    gateway_request_info info;
    policy_request preq;
    double arrival, queued_at;
    int attempts; /* started */
    /* client side */
    struct evhttp_request *client; /* NULL once answered or gone */
    struct evhttp_connection *client_conn;
    evutil_socket_t client_fd;
    struct event *watch;
    bool in_unwatched; /* on gw->unwatched: its watch is added once it has lasted a tick */
    struct gw_request *w_prev, *w_next;
    bool gone, answered;
    bool started;       /* bytes reached the client: no more retries */
    bool abort_pending; /* the client is too slow: drop it at the next kick */
    /* queue and live list */
    bool queued;
    bool queued_front; /* a retry, put at the front */
    struct gw_request *q_prev, *q_next;
    struct gw_request *live_prev, *live_next;
    gw_attempt att;
    bool *start_flag; /* set while attempt_start waits in evhttp_make_request */
    int last_status;  /* of the last failed attempt, for the final error */
    char last_error[320];
} gw_request;

struct gateway {
    gateway_config cfg; /* strings below are owned copies */
    char *host, *api_key, *upstream_api_key, *policy_name;
    struct event_base *base;
    struct evhttp *http;
    struct event *tick_ev, *kick_ev, *sigint_ev, *sigterm_ev;
    int port;
    double started_wall;
    policy *pol;
    policy_length_model lengths;
    gw_upstream **ups;
    policy_instance *inst; /* (n_ups) the policy's snapshot, one row per upstream */
    int n_ups;
    /* requests */
    gw_request *q_head, *q_tail;
    int q_len;
    double q_prefill, q_decode; /* the queued requests' prompt and expected output tokens */
    double q_moved_at;          /* when a request last left the queue for an instance */
    gw_request *live;
    gw_request *unwatched_head, *unwatched_tail; /* by arrival */
    int n_abort_pending;
    uint64_t next_id;
    bool kick_pending;
    int passthrough_cursor; /* where the next pass-through request starts looking */
    /* connections to free once their requests are gone */
    struct evhttp_connection **dead;
    int n_dead, cap_dead;
    /* counters */
    uint64_t requests_total, dispatched_total, retries_total, client_gone_total;
    uint64_t rejected_full, rejected_timeout, rejected_unavailable, bad_requests;
    metrics_histogram ttft, e2e, queue_time;
    double completion_rate; /* requests/s, moving average (for Retry-After) */
    double last_completion;
};

/* upstream.c */
int upstreams_create(gateway *g, loom_err *e);
void upstreams_free(gateway *g);
struct evhttp_connection *upstream_conn_get(gw_upstream *up, bool *reused);
void upstream_conn_put(gw_upstream *up, struct evhttp_connection *conn);
void upstream_probe_sweep(gateway *g, double now);
void upstream_request_failed(gw_upstream *up, bool conclusive, double now);
void upstream_request_ok(gw_upstream *up);
bool upstream_available(const gw_upstream *up);
void upstream_sync_availability(gateway *g);
gw_upstream *upstream_find(gateway *g, const char *url);
void gateway_defer_free_conn(gateway *g, struct evhttp_connection *conn);
void gateway_kick(gateway *g);

/* render.c */
void render_metrics(gateway *g, loom_buf *out);
void render_models(gateway *g, loom_buf *out, int *n_models);
void render_upstream_json(gateway *g, const gw_upstream *up, loom_buf *out);
void render_upstreams_json(gateway *g, loom_buf *out);

#endif
