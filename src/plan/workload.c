/*
 * Workloads for the planner: request traces (Azure LLM inference CSV, Mooncake JSONL, parsed by
 * the shared module in src/trace/) and synthetic length distributions. The planner needs the
 * length moments; the arrival rate sets the default target of the min-cost objective. Trace
 * errors read "name:LINE: what".
 */
#include "loom/plan.h"
#include "loom/trace.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 100000000 /* per request of a synthetic workload; larger is surely a typo */

/*
 * The workload of a parsed trace: its requests, length moments and mean arrival rate (the
 * parser has made times relative to the earliest arrival and sorted them).
 */
static int from_trace(const loom_trace *t, const char *name, plan_workload *w, loom_err *e)
{
    w->n = (int64_t)t->n;
    w->requests = xmalloc(sizeof(plan_request) * t->n);
    double sin = 0, sout = 0, ssq = 0;
    for (size_t i = 0; i < t->n; i++) {
        const loom_trace_entry *en = &t->entries[i];
        w->requests[i] = (plan_request){en->timestamp_s, en->input_len, en->output_len};
        sin += en->input_len;
        sout += en->output_len;
        ssq += (double)en->input_len * en->input_len;
        if (en->input_len > w->max_in)
            w->max_in = en->input_len;
        if (en->output_len > w->max_out)
            w->max_out = en->output_len;
    }
    w->mean_in = sin / (double)w->n;
    w->mean_out = sout / (double)w->n;
    w->mean_in_sq = ssq / (double)w->n;
    w->duration = t->entries[t->n - 1].timestamp_s - t->entries[0].timestamp_s;
    w->rate = w->duration > 0 ? (double)(w->n - 1) / w->duration : 0;
    if (w->mean_out < 1)
        return loom_errf(e, LOOM_EINVAL,
                         "%s: requests generate %.2f tokens on average; the "
                         "planner needs outputs of at least 1 token",
                         name, w->mean_out);
    return LOOM_OK;
}

/* Parsed (rc from the parser) into a workload; t is freed either way. */
static int finish(int rc, loom_trace *t, const char *name, plan_workload *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    snprintf(out->source, sizeof(out->source), "%s", name);
    if (rc == LOOM_OK && (rc = from_trace(t, name, out, e)) != LOOM_OK)
        plan_workload_free(out);
    trace_free(t);
    return rc;
}

int plan_workload_parse_azure(const char *text, size_t len, const char *name, plan_workload *out,
                              loom_err *e)
{
    loom_trace t;
    return finish(trace_parse_azure(text, len, name, &t, e), &t, name, out, e);
}

int plan_workload_parse_mooncake(const char *text, size_t len, const char *name, plan_workload *out,
                                 loom_err *e)
{
    loom_trace t;
    return finish(trace_parse_mooncake(text, len, name, &t, e), &t, name, out, e);
}

int plan_workload_load(const char *path, plan_workload *out, loom_err *e)
{
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    loom_trace t;
    return finish(trace_load(path, base, &t, e), &t, base, out, e);
}

/* "N" or "LO:HI" into lo, hi. */
static bool parse_range(const char *s, long long *lo, long long *hi)
{
    char *end = NULL;
    errno = 0;
    *lo = strtoll(s, &end, 10);
    if (errno || end == s)
        return false;
    if (*end == ':') {
        const char *t = end + 1;
        *hi = strtoll(t, &end, 10);
        if (errno || end == t)
            return false;
    } else {
        *hi = *lo;
    }
    return !*end && *lo >= 0 && *hi >= *lo && *hi <= MAX_TOKENS;
}

int plan_workload_synthetic(const char *input_spec, const char *output_spec, plan_workload *out,
                            loom_err *e)
{
    memset(out, 0, sizeof(*out));
    long long ilo, ihi, olo, ohi;
    if (!input_spec || !parse_range(input_spec, &ilo, &ihi) || ihi < 1)
        return loom_errf(e, LOOM_EINVAL, "input length '%s' must be N or LO:HI tokens (N >= 1)",
                         input_spec ? input_spec : "");
    if (!output_spec || !parse_range(output_spec, &olo, &ohi) || ohi < 1)
        return loom_errf(e, LOOM_EINVAL, "output length '%s' must be N or LO:HI tokens (N >= 1)",
                         output_spec ? output_spec : "");
    bool fixed = ilo == ihi && olo == ohi;
    snprintf(out->source, sizeof(out->source), "%s input %s, output %s",
             fixed ? "fixed" : "uniform", input_spec, output_spec);
    out->mean_in = (ilo + ihi) / 2.0;
    out->mean_out = (olo + ohi) / 2.0;
    /* discrete uniform on [a, b]: variance ((b - a + 1)^2 - 1) / 12 */
    double width = (double)(ihi - ilo + 1);
    out->mean_in_sq = (width * width - 1) / 12.0 + out->mean_in * out->mean_in;
    out->max_in = (int)ihi;
    out->max_out = (int)ohi;
    return LOOM_OK;
}

void plan_workload_free(plan_workload *w)
{
    if (!w)
        return;
    free(w->requests);
    w->requests = NULL;
    w->n = 0;
}

void plan_workload_lengths(const plan_workload *w, perf_lengths *out)
{
    out->mean_in = w->mean_in;
    out->mean_out = w->mean_out;
    out->mean_in_sq = w->mean_in_sq;
}
