/*
 * Upstreams: keep-alive connection pools, active health checks, /metrics scraping, the cached
 * /v1/models of each, and passive ejection.
 *
 * Each upstream has one probe connection that carries GET /health, GET /metrics and
 * GET /v1/models one after the other (evhttp queues requests on a connection), each kind at most
 * once in flight; request traffic uses a pool of keep-alive connections. The sweep runs on the
 * gateway's tick and only issues what is due, so a sweep is bounded by the number of upstreams.
 *
 * Health: `unhealthy_threshold` failed checks in a row eject an instance; `healthy_threshold`
 * passes in a row re-admit it (then its prefix cache is assumed lost). Requests eject passively:
 * a refused connection at once (nothing listens there), other transport failures after
 * `max_fails` in a row. With active checks off, an ejected instance comes back after a cool-down.
 */
#include "gateway_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MODELS_REFRESH_S 30.0
#define NO_METRICS_RETRY_S 60.0
#define EJECT_COOLDOWN_S 5.0     /* without active checks */
#define MAX_PROBE_BODY (4 << 20) /* a /metrics page larger than this is refused */
#define MAX_RESPONSE_BODY (64 << 20)

static struct evhttp_connection *conn_new(gw_upstream *up, double timeout_s, size_t max_body)
{
    gateway *g = up->gw;
    struct evhttp_connection *c =
        evhttp_connection_base_new(g->base, NULL, up->spec.host, (ev_uint16_t)up->spec.port);
    if (!c)
        return NULL;
    struct timeval tv = {(time_t)timeout_s, (suseconds_t)((timeout_s - floor(timeout_s)) * 1e6)};
    evhttp_connection_set_timeout_tv(c, &tv);
    evhttp_connection_set_retries(c, 0);
    evhttp_connection_set_max_body_size(c, (ev_ssize_t)max_body);
    evhttp_connection_set_max_headers_size(c, 65536);
    return c;
}

struct evhttp_connection *upstream_conn_get(gw_upstream *up, bool *reused)
{
    if (up->n_idle > 0) {
        *reused = true;
        return up->idle[--up->n_idle];
    }
    *reused = false;
    return conn_new(up, up->gw->cfg.upstream_timeout_s, MAX_RESPONSE_BODY);
}

void upstream_conn_put(gw_upstream *up, struct evhttp_connection *conn)
{
    if (!conn)
        return;
    if (up->n_idle >= up->gw->cfg.max_idle_connections) {
        gateway_defer_free_conn(up->gw, conn);
        return;
    }
    if (up->n_idle == up->cap_idle) {
        up->cap_idle = up->cap_idle ? 2 * up->cap_idle : 8;
        up->idle = xrealloc(up->idle, (size_t)up->cap_idle * sizeof(*up->idle));
    }
    up->idle[up->n_idle++] = conn;
}

bool upstream_available(const gw_upstream *up)
{
    return up->healthy && !up->drained;
}

/* The policy's snapshot follows health and drain state. */
void upstream_sync_availability(gateway *g)
{
    for (int i = 0; i < g->n_ups; i++)
        g->inst[i].available = upstream_available(g->ups[i]);
}

gw_upstream *upstream_find(gateway *g, const char *url)
{
    gateway_upstream_spec want;
    loom_err e;
    if (!url || gateway_upstream_parse(url, &want, &e) != 0)
        return NULL;
    for (int i = 0; i < g->n_ups; i++)
        if (!strcmp(g->ups[i]->spec.url, want.url))
            return g->ups[i];
    return NULL;
}

static void eject(gw_upstream *up, const char *why, double now)
{
    if (!up->healthy)
        return;
    up->healthy = false;
    up->check_ok = 0;
    up->ejected_at = now;
    up->gw->inst[up->idx].available = false;
    LOG_WARN("gateway: upstream %s ejected (%s)", up->spec.url, why);
}

static void readmit(gw_upstream *up)
{
    if (up->healthy)
        return;
    up->healthy = true;
    up->passive_fails = 0;
    up->check_fail = 0;
    up->gw->inst[up->idx].available = upstream_available(up);
    /* it may have restarted: whatever it cached is gone; refresh what it serves */
    policy_reset_instance(up->gw->pol, up->idx);
    up->next_models = 0;
    LOG_INFO("gateway: upstream %s re-admitted", up->spec.url);
    gateway_kick(up->gw);
}

void upstream_request_failed(gw_upstream *up, bool conclusive, double now)
{
    up->passive_fails++;
    if (conclusive)
        eject(up, "connection refused", now);
    else if (up->passive_fails >= up->gw->cfg.max_fails)
        eject(up, "consecutive request failures", now);
}

void upstream_request_ok(gw_upstream *up)
{
    up->passive_fails = 0;
}

/* ---------------------------------------------------------------- probes */

static void on_health(gw_upstream *up, int status, double now)
{
    const gateway_config *cfg = &up->gw->cfg;
    if (status == 200) {
        up->check_fail = 0;
        up->check_ok++;
        up->checked = true;
        if (!up->healthy && up->check_ok >= cfg->healthy_threshold)
            readmit(up);
        else if (up->healthy)
            gateway_kick(up->gw); /* first confirmation: queued requests may go */
    } else {
        up->check_ok = 0;
        up->check_fail++;
        if (up->healthy && up->check_fail >= cfg->unhealthy_threshold)
            eject(up, status ? "health check failed" : "health check: no answer", now);
    }
}

static void on_metrics(gw_upstream *up, int status, const char *body, size_t len, double now)
{
    gateway *g = up->gw;
    if (status == 404) {
        up->no_metrics = true;
        up->has_metrics = false;
        return;
    }
    if (status != 200)
        return;
    gateway_scrape s;
    gateway_scrape_parse(body, len, &s);
    if (s.num_running < 0 && s.num_waiting < 0 && s.kv_usage < 0 && s.num_kv_blocks < 0) {
        up->has_metrics = false; /* a page, but none of the gauges we read */
        return;
    }
    up->has_metrics = true;
    up->no_metrics = false;
    policy_metrics m = {.num_running = s.num_running,
                        .num_waiting = s.num_waiting,
                        .kv_usage = s.kv_usage,
                        .kv_capacity_tokens = gateway_scrape_kv_tokens(&s, g->cfg.kv_block_size)};
    if (up->spec.kv_tokens > 0)
        m.kv_capacity_tokens = -1; /* the operator's (plan's) figure stands */
    policy_observe_metrics(g->pol, &g->inst[up->idx], &m, now);
    gateway_kick(g); /* room may have appeared */
}

static void on_models(gw_upstream *up, int status, const char *body, size_t len)
{
    if (status != 200)
        return;
    cJSON *root = cJSON_ParseWithLength(body, len);
    cJSON *data = root ? cJSON_DetachItemFromObjectCaseSensitive(root, "data") : NULL;
    cJSON_Delete(root);
    if (!cJSON_IsArray(data)) {
        cJSON_Delete(data);
        return;
    }
    cJSON_Delete(up->models);
    up->models = data;
}

static void on_probe_done(struct evhttp_request *req, void *arg)
{
    gw_probe *pr = arg;
    gw_upstream *up = pr->up;
    pr->pending = false;
    double now = loom_now();
    int status = req ? evhttp_request_get_response_code(req) : 0;
    struct evbuffer *in = req ? evhttp_request_get_input_buffer(req) : NULL;
    size_t len = in ? evbuffer_get_length(in) : 0;
    const char *body = len ? (const char *)evbuffer_pullup(in, -1) : "";
    switch (pr->kind) {
    case PROBE_HEALTH:
        on_health(up, status, now);
        break;
    case PROBE_METRICS:
        on_metrics(up, status, body, len, now);
        break;
    case PROBE_MODELS:
        on_models(up, status, body, len);
        break;
    default:
        break;
    }
}

static void probe_send(gw_upstream *up, probe_kind kind, const char *path)
{
    gateway *g = up->gw;
    gw_probe *pr = &up->probes[kind];
    if (pr->pending)
        return;
    if (!up->probe_conn) {
        double t = g->cfg.health_timeout_s > 0 ? g->cfg.health_timeout_s : 2;
        up->probe_conn = conn_new(up, t, MAX_PROBE_BODY);
        if (!up->probe_conn)
            return;
    }
    struct evhttp_request *req = evhttp_request_new(on_probe_done, pr);
    if (!req)
        return;
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Host", up->hostport);
    if (g->upstream_api_key) {
        char auth[300];
        snprintf(auth, sizeof(auth), "Bearer %s", g->upstream_api_key);
        evhttp_add_header(h, "Authorization", auth);
    }
    char uri[256];
    snprintf(uri, sizeof(uri), "%s%s", up->spec.base_path, path);
    pr->pending = true;
    if (evhttp_make_request(up->probe_conn, req, EVHTTP_REQ_GET, uri) != 0)
        pr->pending = false; /* libevent freed or failed it; try again next sweep */
}

/* Issues the probes that are due. Called on every tick; bounded by the number of upstreams. */
void upstream_probe_sweep(gateway *g, double now)
{
    const gateway_config *cfg = &g->cfg;
    for (int i = 0; i < g->n_ups; i++) {
        gw_upstream *up = g->ups[i];
        if (cfg->health_interval_s > 0) {
            if (now >= up->next_health) {
                up->next_health = now + cfg->health_interval_s;
                probe_send(up, PROBE_HEALTH, "/health");
            }
        } else if (!up->healthy && up->ejected_at >= 0 &&
                   now - up->ejected_at >= EJECT_COOLDOWN_S) {
            readmit(up); /* no active checks: passive ejection is a cool-down */
        }
        bool reachable = up->healthy || cfg->health_interval_s <= 0;
        if (cfg->scrape_interval_s > 0 && reachable && now >= up->next_scrape) {
            up->next_scrape = now + (up->no_metrics ? NO_METRICS_RETRY_S : cfg->scrape_interval_s);
            probe_send(up, PROBE_METRICS, "/metrics");
        }
        if (reachable && now >= up->next_models) {
            up->next_models = now + (up->models ? MODELS_REFRESH_S : 1.0);
            probe_send(up, PROBE_MODELS, "/v1/models");
        }
    }
}

/* ---------------------------------------------------------------- lifecycle */

int upstreams_create(gateway *g, loom_err *e)
{
    const gateway_config *cfg = &g->cfg;
    if (cfg->n_upstreams < 1)
        return loom_errf(e, LOOM_EINVAL,
                         "gateway: no upstreams (give --upstream http://HOST:PORT, repeatable)");
    if (cfg->n_upstreams > GATEWAY_MAX_UPSTREAMS)
        return loom_errf(e, LOOM_EINVAL, "gateway: %d upstreams, at most %d", cfg->n_upstreams,
                         GATEWAY_MAX_UPSTREAMS);
    g->ups = xcalloc((size_t)cfg->n_upstreams, sizeof(*g->ups));
    g->inst = xcalloc((size_t)cfg->n_upstreams, sizeof(*g->inst));
    const policy_config *pc = policy_get_config(g->pol);
    for (int i = 0; i < cfg->n_upstreams; i++) {
        const gateway_upstream_spec *s = &cfg->upstreams[i];
        for (int j = 0; j < i; j++)
            if (!strcmp(cfg->upstreams[j].url, s->url))
                return loom_errf(e, LOOM_EINVAL, "gateway: upstream %s given twice", s->url);
        if (!s->host[0] || s->port <= 0)
            return loom_errf(e, LOOM_EINVAL,
                             "gateway: upstream %d has no host/port (parse it with "
                             "gateway_upstream_parse)",
                             i);
        gw_upstream *up = xcalloc(1, sizeof(*up));
        up->gw = g;
        up->idx = i;
        up->spec = *s;
        snprintf(up->hostport, sizeof(up->hostport), "%s%s%s:%d", strchr(s->host, ':') ? "[" : "",
                 s->host, strchr(s->host, ':') ? "]" : "", s->port);
        snprintf(up->uri_completions, sizeof(up->uri_completions), "%s/v1/completions",
                 s->base_path);
        snprintf(up->uri_chat, sizeof(up->uri_chat), "%s/v1/chat/completions", s->base_path);
        snprintf(up->uri_tokenize, sizeof(up->uri_tokenize), "%s/tokenize", s->base_path);
        snprintf(up->uri_detokenize, sizeof(up->uri_detokenize), "%s/detokenize", s->base_path);
        up->healthy = true; /* until shown otherwise: serve at once */
        up->checked = cfg->health_interval_s <= 0;
        up->ejected_at = -1;
        for (int k = 0; k < N_PROBES; k++) {
            up->probes[k].up = up;
            up->probes[k].kind = (probe_kind)k;
        }
        metrics_histogram_init(&up->ttft, metrics_ttft_buckets, metrics_ttft_n_buckets);
        metrics_histogram_init(&up->e2e, metrics_e2e_buckets, metrics_e2e_n_buckets);
        g->ups[i] = up;
        g->n_ups = i + 1;
        policy_instance_init(&g->inst[i], pc, s->weight, s->prefill_rate, s->decode_rate,
                             s->kv_tokens);
        g->inst[i].max_batch = s->max_batch > 0 ? s->max_batch : 0;
    }
    return LOOM_OK;
}

void upstreams_free(gateway *g)
{
    for (int i = 0; i < g->n_ups; i++) {
        gw_upstream *up = g->ups[i];
        if (up->probe_conn)
            evhttp_connection_free(up->probe_conn); /* pending probes die without callbacks */
        for (int k = 0; k < up->n_idle; k++)
            evhttp_connection_free(up->idle[k]);
        free(up->idle);
        cJSON_Delete(up->models);
        free(up);
    }
    free(g->ups);
    free(g->inst);
    g->ups = NULL;
    g->inst = NULL;
    g->n_ups = 0;
}
