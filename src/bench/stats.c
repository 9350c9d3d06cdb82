/*
 * Serving metrics from request records, computed the way `vllm bench serve` computes them so
 * that numbers can be compared across tools:
 *   TTFT  first content chunk - request sent
 *   TPOT  (E2E - TTFT) / (output tokens - 1), per request, first token excluded
 *   ITL   gaps between successive content chunks, all requests pooled
 *   E2E   response complete - request sent
 * Only successful requests enter latency statistics and throughput; percentiles interpolate
 * linearly between order statistics (numpy.percentile's default), std is the population one.
 * Goodput counts the requests within every given objective (vLLM's --goodput).
 */
#include "loom/bench.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const char *bench_error_name(bench_error e)
{
    switch (e) {
    case BENCH_OK:
        return "ok";
    case BENCH_ERR_CONNECT:
        return "connect";
    case BENCH_ERR_HTTP:
        return "http";
    case BENCH_ERR_TIMEOUT:
        return "timeout";
    case BENCH_ERR_MALFORMED:
        return "malformed";
    case BENCH_ERR_STREAM:
        return "stream_error";
    case BENCH_ERR_CANCELLED:
        return "cancelled";
    case BENCH_ERR_COUNT:
        break;
    }
    return "unknown";
}

/* ---------------------------------------------------------------- percentiles */

double bench_percentile(const double *sorted, size_t n, double pct)
{
    if (n == 0)
        return 0;
    if (pct <= 0)
        return sorted[0];
    if (pct >= 100)
        return sorted[n - 1];
    double pos = pct / 100.0 * (double)(n - 1);
    size_t lo = (size_t)floor(pos);
    size_t hi = lo + 1 < n ? lo + 1 : lo;
    double frac = pos - (double)lo;
    return sorted[lo] + (sorted[hi] - sorted[lo]) * frac;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

void bench_latency_compute(double *values, size_t n, double scale, bench_latency *s)
{
    memset(s, 0, sizeof(*s));
    s->n = n;
    if (n == 0)
        return;
    for (size_t i = 0; i < n; i++)
        values[i] *= scale;
    qsort(values, n, sizeof(double), cmp_double);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += values[i];
    s->mean = sum / (double)n;
    double var = 0;
    for (size_t i = 0; i < n; i++)
        var += (values[i] - s->mean) * (values[i] - s->mean);
    s->std = sqrt(var / (double)n);
    s->median = s->p50 = bench_percentile(values, n, 50);
    s->p90 = bench_percentile(values, n, 90);
    s->p99 = bench_percentile(values, n, 99);
    s->min = values[0];
    s->max = values[n - 1];
}

/* ---------------------------------------------------------------- SLOs */

/* "2s", "200ms", "500us", "150" (ms) -> seconds */
static bool parse_duration(const char *s, double *out)
{
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || end == s || !isfinite(v) || v < 0)
        return false;
    double mult;
    if (!*end || !strcasecmp(end, "ms"))
        mult = 1e-3;
    else if (!strcasecmp(end, "s"))
        mult = 1;
    else if (!strcasecmp(end, "us"))
        mult = 1e-6;
    else
        return false;
    *out = v * mult;
    return true;
}

int bench_slo_parse(const char *spec, bench_slo *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    char buf[256];
    if (!spec || strlen(spec) >= sizeof(buf))
        return loom_errf(e, LOOM_EINVAL, "bad --slo value");
    snprintf(buf, sizeof(buf), "%s", spec);
    char *save = NULL;
    int n = 0;
    for (char *item = strtok_r(buf, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        while (isspace((unsigned char)*item))
            item++;
        char *eq = strchr(item, '=');
        if (!eq)
            eq = strchr(item, ':');
        if (!eq)
            return loom_errf(e, LOOM_EINVAL,
                             "--slo '%s': want KEY=VALUE items, for example "
                             "ttft=2s,tpot=200ms",
                             spec);
        *eq = '\0';
        double v;
        if (!parse_duration(eq + 1, &v))
            return loom_errf(e, LOOM_EINVAL,
                             "--slo: '%s' is not a duration (2s, 200ms, 500us; "
                             "bare numbers are ms)",
                             eq + 1);
        if (!strcasecmp(item, "ttft"))
            out->ttft = v;
        else if (!strcasecmp(item, "tpot"))
            out->tpot = v;
        else if (!strcasecmp(item, "e2el") || !strcasecmp(item, "e2e"))
            out->e2el = v;
        else
            return loom_errf(e, LOOM_EINVAL, "--slo: unknown objective '%s' (ttft, tpot, e2el)",
                             item);
        n++;
    }
    if (n == 0)
        return loom_errf(e, LOOM_EINVAL, "--slo: no objective given");
    return 0;
}

/* ---------------------------------------------------------------- per record */

double bench_record_ttft(const bench_record *r)
{
    double first = r->first_token_s >= 0 ? r->first_token_s : r->end_s;
    return first - r->start_s;
}

double bench_record_e2el(const bench_record *r)
{
    return r->end_s - r->start_s;
}

double bench_record_tpot(const bench_record *r)
{
    if (r->output_tokens <= 1)
        return 0;
    return (bench_record_e2el(r) - bench_record_ttft(r)) / (double)(r->output_tokens - 1);
}

bool bench_record_good(const bench_record *r, const bench_slo *slo)
{
    if (r->error != BENCH_OK)
        return false;
    if (slo->ttft > 0 && bench_record_ttft(r) > slo->ttft)
        return false;
    if (slo->tpot > 0 && bench_record_tpot(r) > slo->tpot)
        return false;
    if (slo->e2el > 0 && bench_record_e2el(r) > slo->e2el)
        return false;
    return true;
}

/* ---------------------------------------------------------------- summaries */

bool bench_result_ok(const bench_result *r)
{
    if (r->interrupted)
        return false;
    for (size_t i = 0; i < r->n_records; i++)
        if (r->records[i].error != BENCH_OK)
            return false;
    return true;
}

static void add_status(bench_summary *s, int status)
{
    for (int i = 0; i < s->n_status; i++)
        if (s->status_codes[i] == status) {
            s->status_counts[i]++;
            return;
        }
    if (s->n_status < BENCH_MAX_STATUS) {
        s->status_codes[s->n_status] = status;
        s->status_counts[s->n_status++] = 1;
    }
}

/* Output tokens in the best one-second window of any run, tokens spread over the chunks. */
static double peak_token_rate(const bench_result *res, int target)
{
    int max_round = 0;
    double max_t = 0;
    for (size_t i = 0; i < res->n_records; i++) {
        const bench_record *r = &res->records[i];
        if (r->target != target || r->error != BENCH_OK)
            continue;
        if (r->round > max_round)
            max_round = r->round;
        if (r->end_s > max_t)
            max_t = r->end_s;
    }
    size_t n_bins = (size_t)max_t + 1;
    if (n_bins > 10000000)
        return 0;
    double best = 0;
    double *bins = xcalloc(n_bins, sizeof(double));
    for (int round = 0; round <= max_round; round++) {
        memset(bins, 0, n_bins * sizeof(double));
        for (size_t i = 0; i < res->n_records; i++) {
            const bench_record *r = &res->records[i];
            if (r->target != target || r->round != round || r->error != BENCH_OK ||
                r->first_token_s < 0 || r->n_chunks == 0)
                continue;
            double per_chunk = (double)r->output_tokens / (double)r->n_chunks;
            double t = r->first_token_s;
            bins[(size_t)t] += per_chunk;
            for (int j = 0; j < r->n_itl; j++) {
                t += r->itl[j];
                size_t b = (size_t)t < n_bins ? (size_t)t : n_bins - 1;
                bins[b] += per_chunk;
            }
        }
        for (size_t b = 0; b < n_bins; b++)
            if (bins[b] > best)
                best = bins[b];
    }
    free(bins);
    return best;
}

void bench_summarize(const bench_result *res, int target, const bench_slo *slo, bench_summary *s)
{
    memset(s, 0, sizeof(*s));
    s->n_instances = res->n_instances;
    s->instance_counts =
        xcalloc((size_t)(res->n_instances > 0 ? res->n_instances : 1), sizeof(size_t));
    size_t n_itl = 0;
    for (size_t i = 0; i < res->n_records; i++) {
        const bench_record *r = &res->records[i];
        if (r->target != target)
            continue;
        s->n_requests++;
        if (r->error != BENCH_OK) {
            s->failed++;
            s->errors[r->error]++;
            if (r->error == BENCH_ERR_HTTP)
                add_status(s, r->http_status);
            continue;
        }
        s->completed++;
        s->total_input_tokens += r->prompt_tokens;
        s->total_output_tokens += r->output_tokens;
        n_itl += (size_t)r->n_itl;
        if (r->instance >= 0 && r->instance < res->n_instances)
            s->instance_counts[r->instance]++;
    }
    s->duration_s = res->duration_s[target];
    s->max_concurrent_requests = res->max_concurrent[target];
    double *ttft = xmalloc((s->completed + 1) * sizeof(double));
    double *tpot = xmalloc((s->completed + 1) * sizeof(double));
    double *e2el = xmalloc((s->completed + 1) * sizeof(double));
    double *itl = xmalloc((n_itl + 1) * sizeof(double));
    size_t n_ttft = 0, n_tpot = 0, n_e2el = 0, k_itl = 0;
    s->slo_set = slo && (slo->ttft > 0 || slo->tpot > 0 || slo->e2el > 0);
    for (size_t i = 0; i < res->n_records; i++) {
        const bench_record *r = &res->records[i];
        if (r->target != target || r->error != BENCH_OK)
            continue;
        ttft[n_ttft++] = bench_record_ttft(r);
        e2el[n_e2el++] = bench_record_e2el(r);
        if (r->output_tokens > 1)
            tpot[n_tpot++] = bench_record_tpot(r);
        for (int j = 0; j < r->n_itl; j++)
            itl[k_itl++] = r->itl[j];
        if (s->slo_set && bench_record_good(r, slo))
            s->good++;
    }
    bench_latency_compute(ttft, n_ttft, 1e3, &s->ttft);
    bench_latency_compute(tpot, n_tpot, 1e3, &s->tpot);
    bench_latency_compute(itl, k_itl, 1e3, &s->itl);
    bench_latency_compute(e2el, n_e2el, 1e3, &s->e2el);
    free(ttft);
    free(tpot);
    free(e2el);
    free(itl);
    if (s->duration_s > 0) {
        s->request_throughput = (double)s->completed / s->duration_s;
        s->output_throughput = (double)s->total_output_tokens / s->duration_s;
        s->total_token_throughput =
            (double)(s->total_input_tokens + s->total_output_tokens) / s->duration_s;
        s->request_goodput = (double)s->good / s->duration_s;
    }
    s->max_output_tokens_per_s = peak_token_rate(res, target);
}

void bench_summary_free(bench_summary *s)
{
    if (!s)
        return;
    free(s->instance_counts);
    s->instance_counts = NULL;
}
