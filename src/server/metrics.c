/*
 * Prometheus metrics in the text exposition format 0.0.4, named like vLLM's so that dashboards,
 * gateways and autoscalers built for vLLM read loom unchanged. Histograms use vLLM's fixed
 * bucket bounds. Not thread-safe: the server keeps one server_metrics under its lock and renders
 * a copy.
 */
#include "loom/server.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* vLLM v1's bounds (vllm/v1/metrics/loggers.py). */
const double metrics_ttft_buckets[] = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                       0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                       20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
const int metrics_ttft_n_buckets = sizeof(metrics_ttft_buckets) / sizeof(double);
const double metrics_tpot_buckets[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                       0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
const int metrics_tpot_n_buckets = sizeof(metrics_tpot_buckets) / sizeof(double);
const double metrics_e2e_buckets[] = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                                      5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                                      60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
const int metrics_e2e_n_buckets = sizeof(metrics_e2e_buckets) / sizeof(double);

void metrics_histogram_init(metrics_histogram *h, const double *bounds, int n_bounds)
{
    memset(h->counts, 0, sizeof(h->counts));
    h->sum = 0;
    h->count = 0;
    h->bounds = bounds;
    h->n_bounds = n_bounds < METRICS_MAX_BUCKETS ? n_bounds : METRICS_MAX_BUCKETS;
}

void metrics_histogram_observe(metrics_histogram *h, double v)
{
    if (isnan(v))
        return;
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i]) /* le: a value equal to a bound is inside */
        i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

/* A sample value as Prometheus (and Python's client) writes it: "+Inf", "5.0", "0.25". */
static void write_value(loom_buf *out, double v)
{
    if (isinf(v)) {
        buf_puts(out, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    if (isnan(v)) {
        buf_puts(out, "NaN");
        return;
    }
    if (v == floor(v) && fabs(v) < 1e15) {
        buf_printf(out, "%.1f", v);
        return;
    }
    /* shortest form that reads back to the same double */
    char s[40];
    for (int prec = 6; prec <= 17; prec++) {
        snprintf(s, sizeof(s), "%.*g", prec, v);
        if (strtod(s, NULL) == v)
            break;
    }
    buf_puts(out, s);
}

void metrics_escape_label(loom_buf *out, const char *value)
{
    for (const char *p = value; *p; p++) {
        if (*p == '\\')
            buf_puts(out, "\\\\");
        else if (*p == '"')
            buf_puts(out, "\\\"");
        else if (*p == '\n')
            buf_puts(out, "\\n");
        else
            buf_append(out, p, 1);
    }
}

static void write_header(loom_buf *out, const char *name, const char *type, const char *help)
{
    buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void write_sample(loom_buf *out, const char *name, const char *suffix, const char *labels,
                         const char *extra_label, double value)
{
    buf_printf(out, "%s%s", name, suffix);
    if (*labels || extra_label) {
        buf_puts(out, "{");
        buf_puts(out, labels);
        if (extra_label)
            buf_printf(out, "%s%s", *labels ? "," : "", extra_label);
        buf_puts(out, "}");
    }
    buf_puts(out, " ");
    write_value(out, value);
    buf_puts(out, "\n");
}

void metrics_write_scalar(loom_buf *out, const char *name, const char *type, const char *help,
                          const char *labels, double value)
{
    write_header(out, name, type, help);
    write_sample(out, name, "", labels, NULL, value);
}

void metrics_write_histogram(loom_buf *out, const char *name, const char *help, const char *labels,
                             const metrics_histogram *h)
{
    write_header(out, name, "histogram", help);
    uint64_t cumulative = 0;
    for (int i = 0; i <= h->n_bounds; i++) {
        cumulative += h->counts[i];
        loom_buf le;
        buf_init(&le);
        buf_puts(&le, "le=\"");
        write_value(&le, i < h->n_bounds ? h->bounds[i] : INFINITY);
        buf_puts(&le, "\"");
        write_sample(out, name, "_bucket", labels, le.data, (double)cumulative);
        buf_free(&le);
    }
    write_sample(out, name, "_sum", labels, NULL, h->sum);
    write_sample(out, name, "_count", labels, NULL, (double)h->count);
}

void server_metrics_init(server_metrics *m)
{
    memset(m, 0, sizeof(*m));
    metrics_histogram_init(&m->ttft, metrics_ttft_buckets, metrics_ttft_n_buckets);
    metrics_histogram_init(&m->tpot, metrics_tpot_buckets, metrics_tpot_n_buckets);
    metrics_histogram_init(&m->e2e, metrics_e2e_buckets, metrics_e2e_n_buckets);
}

void server_metrics_render(const server_metrics *m, const char *model_name, const char *backend,
                           loom_buf *out)
{
    loom_buf lb;
    buf_init(&lb);
    buf_puts(&lb, "model_name=\"");
    metrics_escape_label(&lb, model_name);
    buf_puts(&lb, "\",engine=\"0\"");
    const char *labels = lb.data;
    const engine_stats *s = &m->engine;

    metrics_write_scalar(out, "vllm:num_requests_running", "gauge",
                         "Number of requests in model execution batches.", labels, s->num_running);
    metrics_write_scalar(out, "vllm:num_requests_waiting", "gauge",
                         "Number of requests waiting to be processed.", labels, s->num_waiting);
    metrics_write_scalar(out, "vllm:kv_cache_usage_perc", "gauge",
                         "KV-cache usage. 1 means 100 percent usage.", labels, s->kv_usage);
    metrics_write_scalar(out, "vllm:prompt_tokens_total", "counter",
                         "Number of prefill tokens processed.", labels,
                         (double)s->prompt_tokens_total);
    metrics_write_scalar(out, "vllm:generation_tokens_total", "counter",
                         "Number of generation tokens processed.", labels,
                         (double)s->generation_tokens_total);
    metrics_write_scalar(out, "vllm:prefix_cache_queries_total", "counter",
                         "Prefix cache queries, in terms of number of queried tokens.", labels,
                         (double)s->prefix_cache_queries);
    metrics_write_scalar(out, "vllm:prefix_cache_hits_total", "counter",
                         "Prefix cache hits, in terms of number of cached tokens.", labels,
                         (double)s->prefix_cache_hits);
    metrics_write_scalar(out, "vllm:num_preemptions_total", "counter",
                         "Cumulative number of preemption from the engine.", labels,
                         (double)s->num_preempted_total);

    write_header(out, "vllm:request_success_total", "counter",
                 "Count of successfully processed requests.");
    static const finish_reason reasons[] = {FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR};
    for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++) {
        char extra[64];
        snprintf(extra, sizeof(extra), "finished_reason=\"%s\"", finish_reason_str(reasons[i]));
        write_sample(out, "vllm:request_success_total", "", labels, extra,
                     (double)m->finished[reasons[i]]);
    }

    metrics_write_histogram(out, "vllm:time_to_first_token_seconds",
                            "Histogram of time to first token in seconds.", labels, &m->ttft);
    metrics_write_histogram(out, "vllm:time_per_output_token_seconds",
                            "Histogram of time per output token in seconds.", labels, &m->tpot);
    metrics_write_histogram(out, "vllm:e2e_request_latency_seconds",
                            "Histogram of end to end request latency in seconds.", labels, &m->e2e);

    /* loom's own: the KV cache size and the backend (an emulated device says so here) */
    metrics_write_scalar(out, "loom:num_kv_blocks", "gauge", "KV cache blocks in total.", labels,
                         s->num_kv_blocks);
    metrics_write_scalar(out, "loom:num_free_kv_blocks", "gauge",
                         "KV cache blocks free (including evictable cached blocks).", labels,
                         s->num_free_blocks);
    char extra[96];
    loom_buf bl;
    buf_init(&bl);
    metrics_escape_label(&bl, backend ? backend : "");
    snprintf(extra, sizeof(extra), "backend=\"%s\"", bl.data ? bl.data : "");
    write_header(out, "loom:backend_info", "gauge", "The backend this instance runs on.");
    write_sample(out, "loom:backend_info", "", labels, extra, 1.0);
    buf_free(&bl);
    buf_free(&lb);
}
