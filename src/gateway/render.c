/*
 * What the gateway shows: /metrics (Prometheus text, per-upstream series labelled
 * upstream="URL"), the union of the upstreams' /v1/models, and the admin endpoints' JSON.
 */
#include "gateway_internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static void header(loom_buf *out, const char *name, const char *type, const char *help)
{
    buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void upstream_label(loom_buf *lb, const gw_upstream *up)
{
    lb->len = 0;
    buf_puts(lb, "upstream=\"");
    metrics_escape_label(lb, up->spec.url);
    buf_puts(lb, "\"");
}

static void sample(loom_buf *out, const char *name, const char *labels, double v)
{
    if (labels && *labels)
        buf_printf(out, "%s{%s} ", name, labels);
    else
        buf_printf(out, "%s ", name);
    if (v == floor(v) && fabs(v) < 1e15)
        buf_printf(out, "%.1f\n", v);
    else
        buf_printf(out, "%.17g\n", v);
}

typedef double (*upstream_value)(const gateway *g, const gw_upstream *up);

/* One metric family with a sample per upstream. */
static void per_upstream(loom_buf *out, gateway *g, const char *name, const char *type,
                         const char *help, upstream_value fn)
{
    header(out, name, type, help);
    loom_buf lb;
    buf_init(&lb);
    for (int i = 0; i < g->n_ups; i++) {
        upstream_label(&lb, g->ups[i]);
        sample(out, name, lb.data, fn(g, g->ups[i]));
    }
    buf_free(&lb);
}

/* Histograms by upstream: metrics_write_histogram writes HELP/TYPE each time, so the copies
 * after the first are kept without their comment lines (one family, many label sets). */
static void per_upstream_histogram(loom_buf *out, gateway *g, const char *name, const char *help,
                                   bool ttft)
{
    loom_buf lb, tmp;
    buf_init(&lb);
    buf_init(&tmp);
    for (int i = 0; i < g->n_ups; i++) {
        upstream_label(&lb, g->ups[i]);
        tmp.len = 0;
        metrics_write_histogram(&tmp, name, help, lb.data,
                                ttft ? &g->ups[i]->ttft : &g->ups[i]->e2e);
        if (i == 0) {
            buf_append(out, tmp.data, tmp.len);
            continue;
        }
        for (size_t off = 0; off < tmp.len;) {
            const char *line = tmp.data + off;
            const char *nl = memchr(line, '\n', tmp.len - off);
            size_t n = nl ? (size_t)(nl - line) + 1 : tmp.len - off;
            if (line[0] != '#')
                buf_append(out, line, n);
            off += n;
        }
    }
    buf_free(&lb);
    buf_free(&tmp);
}

static double v_healthy(const gateway *g, const gw_upstream *up)
{
    (void)g;
    return up->healthy;
}
static double v_drained(const gateway *g, const gw_upstream *up)
{
    (void)g;
    return up->drained;
}
static double v_requests(const gateway *g, const gw_upstream *up)
{
    (void)g;
    return (double)up->requests;
}
static double v_errors(const gateway *g, const gw_upstream *up)
{
    (void)g;
    return (double)up->errors;
}
static double v_in_flight(const gateway *g, const gw_upstream *up)
{
    (void)g;
    return (double)up->in_flight;
}
static double v_share(const gateway *g, const gw_upstream *up)
{
    return g->dispatched_total ? (double)up->dispatched / (double)g->dispatched_total : 0;
}
static double v_prompt(const gateway *g, const gw_upstream *up)
{
    (void)g;
    return (double)up->prompt_tokens;
}
static double v_generation(const gateway *g, const gw_upstream *up)
{
    (void)g;
    return (double)up->generation_tokens;
}
static double v_prefill_rate(const gateway *g, const gw_upstream *up)
{
    return g->inst[up->idx].prefill_rate;
}
static double v_decode_rate(const gateway *g, const gw_upstream *up)
{
    return g->inst[up->idx].decode_rate;
}
static double v_kv_used(const gateway *g, const gw_upstream *up)
{
    return policy_kv_used(g->pol, &g->inst[up->idx], loom_now());
}
static double v_kv_capacity(const gateway *g, const gw_upstream *up)
{
    return g->inst[up->idx].kv_capacity;
}
static double v_pending(const gateway *g, const gw_upstream *up)
{
    return g->inst[up->idx].pending_prefill + g->inst[up->idx].pending_decode;
}

void render_metrics(gateway *g, loom_buf *out)
{
    per_upstream(out, g, "loom:gateway_upstream_healthy", "gauge",
                 "1 if the upstream passes health checks and is not ejected.", v_healthy);
    per_upstream(out, g, "loom:gateway_upstream_drained", "gauge",
                 "1 if the upstream is drained by an admin (no new requests).", v_drained);
    per_upstream(out, g, "loom:gateway_requests_total", "counter",
                 "Requests answered by the upstream (any status).", v_requests);
    per_upstream(out, g, "loom:gateway_errors_total", "counter",
                 "Failed attempts on the upstream (transport errors and 5xx).", v_errors);
    per_upstream(out, g, "loom:gateway_in_flight", "gauge", "Requests on the upstream now.",
                 v_in_flight);
    per_upstream(out, g, "loom:gateway_dispatch_share", "gauge",
                 "Fraction of all dispatches that went to the upstream.", v_share);
    per_upstream(out, g, "loom:gateway_prompt_tokens_total", "counter",
                 "Prompt tokens served by the upstream (from usage).", v_prompt);
    per_upstream(out, g, "loom:gateway_generation_tokens_total", "counter",
                 "Generated tokens served by the upstream (usage, else stream frames).",
                 v_generation);
    per_upstream(out, g, "loom:gateway_upstream_prefill_rate", "gauge",
                 "Believed prompt tokens/s of the upstream while busy.", v_prefill_rate);
    per_upstream(out, g, "loom:gateway_upstream_decode_rate", "gauge",
                 "Believed output tokens/s of the upstream while busy.", v_decode_rate);
    per_upstream(out, g, "loom:gateway_upstream_pending_tokens", "gauge",
                 "Prefill and decode tokens the upstream still owes (estimate).", v_pending);
    per_upstream(out, g, "loom:gateway_upstream_kv_used_tokens", "gauge",
                 "KV tokens believed used or reserved on the upstream.", v_kv_used);
    per_upstream(out, g, "loom:gateway_upstream_kv_capacity_tokens", "gauge",
                 "KV cache size of the upstream in tokens (0 unknown).", v_kv_capacity);
    per_upstream_histogram(out, g, "loom:gateway_time_to_first_token_seconds",
                           "Time from arrival at the gateway to the first streamed byte.", true);
    per_upstream_histogram(out, g, "loom:gateway_e2e_request_latency_seconds",
                           "Time from arrival at the gateway to the last byte.", false);

    metrics_write_scalar(out, "loom:gateway_queue_depth", "gauge",
                         "Requests waiting in the gateway for an instance.", "", g->q_len);
    metrics_write_scalar(out, "loom:gateway_requests_received_total", "counter",
                         "Generation requests received.", "", (double)g->requests_total);
    metrics_write_scalar(out, "loom:gateway_retries_total", "counter",
                         "Attempts retried on another instance.", "", (double)g->retries_total);
    metrics_write_scalar(out, "loom:gateway_client_disconnects_total", "counter",
                         "Requests whose client went away first.", "",
                         (double)g->client_gone_total);
    metrics_write_scalar(out, "loom:gateway_bad_requests_total", "counter",
                         "Requests refused by the gateway itself (4xx).", "",
                         (double)g->bad_requests);
    header(out, "loom:gateway_rejected_total", "counter",
           "Requests answered 503 by the gateway, by reason.");
    sample(out, "loom:gateway_rejected_total", "reason=\"queue_full\"", (double)g->rejected_full);
    sample(out, "loom:gateway_rejected_total", "reason=\"queue_timeout\"",
           (double)g->rejected_timeout);
    sample(out, "loom:gateway_rejected_total", "reason=\"no_upstream\"",
           (double)g->rejected_unavailable);
    metrics_write_histogram(out, "loom:gateway_queue_time_seconds",
                            "Time requests waited in the gateway queue.", "", &g->queue_time);
    metrics_write_histogram(out, "loom:gateway_all_time_to_first_token_seconds",
                            "Time to first streamed byte, all upstreams.", "", &g->ttft);
    metrics_write_histogram(out, "loom:gateway_all_e2e_request_latency_seconds",
                            "End-to-end latency, all upstreams.", "", &g->e2e);
    loom_buf pl;
    buf_init(&pl);
    buf_puts(&pl, "policy=\"");
    metrics_escape_label(&pl, g->policy_name);
    buf_puts(&pl, "\"");
    metrics_write_scalar(out, "loom:gateway_info", "gauge", "The gateway's dispatch policy.",
                         pl.data, 1);
    buf_free(&pl);
}

void render_models(gateway *g, loom_buf *out, int *n_models)
{
    cJSON *data = cJSON_CreateArray();
    int n = 0;
    /* available upstreams first, then the rest: a model is listed while anyone serves it */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < g->n_ups; i++) {
            gw_upstream *up = g->ups[i];
            if (upstream_available(up) != (pass == 0) || !up->models)
                continue;
            const cJSON *m;
            cJSON_ArrayForEach(m, up->models)
            {
                const cJSON *id = cJSON_GetObjectItemCaseSensitive(m, "id");
                if (!cJSON_IsString(id))
                    continue;
                bool seen = false;
                const cJSON *have;
                cJSON_ArrayForEach(have, data)
                {
                    const cJSON *hid = cJSON_GetObjectItemCaseSensitive(have, "id");
                    if (cJSON_IsString(hid) && !strcmp(hid->valuestring, id->valuestring)) {
                        seen = true;
                        break;
                    }
                }
                if (!seen) {
                    cJSON_AddItemToArray(data, cJSON_Duplicate(m, true));
                    n++;
                }
            }
        }
    }
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON_AddItemToObject(root, "data", data);
    char *s = cJSON_PrintUnformatted(root);
    buf_puts(out, s);
    cJSON_free(s);
    cJSON_Delete(root);
    *n_models = n;
}

void render_upstream_json(gateway *g, const gw_upstream *up, loom_buf *out)
{
    const policy_instance *in = &g->inst[up->idx];
    buf_puts(out, "{\"url\":");
    api_json_string(out, up->spec.url, strlen(up->spec.url));
    buf_printf(out,
               ",\"healthy\":%s,\"drained\":%s,\"available\":%s,\"checked\":%s,"
               "\"weight\":%g,\"in_flight\":%lld,\"requests\":%llu,\"errors\":%llu,"
               "\"dispatched\":%llu,\"prefill_rate\":%.6g,\"decode_rate\":%.6g,"
               "\"kv_capacity_tokens\":%.6g,\"kv_used_tokens\":%.6g,\"pending_tokens\":%.6g,"
               "\"scraped\":%s,\"models\":%d}",
               up->healthy ? "true" : "false", up->drained ? "true" : "false",
               upstream_available(up) ? "true" : "false", up->checked ? "true" : "false",
               up->spec.weight, (long long)up->in_flight, (unsigned long long)up->requests,
               (unsigned long long)up->errors, (unsigned long long)up->dispatched, in->prefill_rate,
               in->decode_rate, in->kv_capacity, policy_kv_used(g->pol, in, loom_now()),
               in->pending_prefill + in->pending_decode, up->has_metrics ? "true" : "false",
               up->models ? cJSON_GetArraySize(up->models) : 0);
}

void render_upstreams_json(gateway *g, loom_buf *out)
{
    buf_puts(out, "{\"policy\":");
    api_json_string(out, g->policy_name, strlen(g->policy_name));
    buf_printf(out, ",\"queue_depth\":%d,\"upstreams\":[", g->q_len);
    for (int i = 0; i < g->n_ups; i++) {
        if (i)
            buf_puts(out, ",");
        render_upstream_json(g, g->ups[i], out);
    }
    buf_puts(out, "]}");
}
