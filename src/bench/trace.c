/*
 * Workloads for `loom bench`: traces (parsed by the shared module in src/trace/, under bench's
 * names, with "line N: ..." messages), request length distributions, and the k-th request of a
 * workload.
 */
#include "loom/bench.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- traces */

int bench_trace_parse_azure(const char *text, size_t len, bench_trace *out, loom_err *e)
{
    return trace_parse_azure(text, len, NULL, out, e);
}

int bench_trace_parse_mooncake(const char *text, size_t len, bench_trace *out, loom_err *e)
{
    return trace_parse_mooncake(text, len, NULL, out, e);
}

int bench_trace_parse(const char *text, size_t len, bench_trace *out, loom_err *e)
{
    return trace_parse(text, len, NULL, out, e);
}

int bench_trace_load(const char *path, bench_trace *out, loom_err *e)
{
    return trace_load(path, NULL, out, e);
}

void bench_trace_free(bench_trace *t)
{
    trace_free(t);
}

/* ---------------------------------------------------------------- length distributions */

void bench_dist_free(bench_dist *d)
{
    if (!d)
        return;
    free(d->values);
    memset(d, 0, sizeof(*d));
}

static bool parse_double(const char *s, double *out)
{
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v))
        return false;
    *out = v;
    return true;
}

int bench_dist_parse(const char *spec, bool input_side, bench_dist *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    const char *side = input_side ? "input" : "output";
    if (!spec || !*spec)
        return loom_errf(e, LOOM_EINVAL, "empty %s length", side);
    if (!strncmp(spec, "trace:", 6)) {
        bench_trace t;
        int rc = bench_trace_load(spec + 6, &t, e);
        if (rc != 0)
            return rc;
        out->kind = BENCH_DIST_EMPIRICAL;
        out->values = xmalloc(t.n * sizeof(int));
        out->n_values = t.n;
        for (size_t i = 0; i < t.n; i++)
            out->values[i] = input_side ? t.entries[i].input_len : t.entries[i].output_len;
        bench_trace_free(&t);
        return 0;
    }
    char buf[128];
    snprintf(buf, sizeof(buf), "%s", spec);
    char *colon = strchr(buf, ':');
    if (!colon) {
        double v;
        if (!parse_double(buf, &v) || v < 1 || v > TRACE_MAX_TOKENS || v != floor(v))
            return loom_errf(e, LOOM_EINVAL,
                             "%s length '%s': want an integer >= 1, "
                             "uniform:A-B, normal:MU,SIGMA or trace:FILE",
                             side, spec);
        out->kind = BENCH_DIST_FIXED;
        out->a = v;
        return 0;
    }
    *colon = '\0';
    char *args = colon + 1;
    char *sep = strpbrk(args, ",-");
    double a, b;
    if (!sep)
        goto bad;
    *sep = '\0';
    if (!parse_double(args, &a) || !parse_double(sep + 1, &b))
        goto bad;
    if (!strcmp(buf, "uniform")) {
        if (a < 1 || b < a || b > TRACE_MAX_TOKENS)
            return loom_errf(e, LOOM_EINVAL, "%s length '%s': uniform:A-B wants 1 <= A <= B", side,
                             spec);
        out->kind = BENCH_DIST_UNIFORM;
    } else if (!strcmp(buf, "normal")) {
        if (a < 1 || b < 0 || a > TRACE_MAX_TOKENS)
            return loom_errf(e, LOOM_EINVAL,
                             "%s length '%s': normal:MU,SIGMA wants MU >= 1 and "
                             "SIGMA >= 0",
                             side, spec);
        out->kind = BENCH_DIST_NORMAL;
    } else {
        goto bad;
    }
    out->a = a;
    out->b = b;
    return 0;
bad:
    return loom_errf(e, LOOM_EINVAL,
                     "%s length '%s': want N, uniform:A-B, normal:MU,SIGMA or "
                     "trace:FILE",
                     side, spec);
}

static double normal_sample(loom_rng *r)
{
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static int clamp_len(double v)
{
    if (!(v >= 1))
        return 1;
    if (v > TRACE_MAX_TOKENS)
        return TRACE_MAX_TOKENS;
    return (int)v;
}

int bench_dist_sample(const bench_dist *d, loom_rng *r)
{
    switch (d->kind) {
    case BENCH_DIST_FIXED:
        return clamp_len(d->a);
    case BENCH_DIST_UNIFORM: {
        uint64_t span = (uint64_t)(d->b - d->a) + 1;
        return clamp_len(d->a + (double)(rng_next(r) % span));
    }
    case BENCH_DIST_NORMAL:
        return clamp_len(floor(d->a + d->b * normal_sample(r) + 0.5));
    case BENCH_DIST_EMPIRICAL:
        if (d->n_values == 0)
            return 1;
        return clamp_len(d->values[rng_next(r) % d->n_values]);
    }
    return 1;
}

/* ---------------------------------------------------------------- workloads */

uint64_t bench_workload_size(const bench_workload *w)
{
    return w->trace ? w->trace->n : 0;
}

void bench_workload_item(const bench_workload *w, uint64_t k, bench_item *out)
{
    memset(out, 0, sizeof(*out));
    out->k = k;
    if (w->trace && w->trace->n > 0) {
        const bench_trace *t = w->trace;
        const bench_trace_entry *en = &t->entries[k % t->n];
        uint64_t cycle = k / t->n;
        double span = t->entries[t->n - 1].timestamp_s;
        double period = span + (t->n > 1 ? span / (double)(t->n - 1) : 1.0);
        out->timestamp_s = en->timestamp_s + (double)cycle * period;
        out->input_len = en->input_len > 0 ? en->input_len : 1;
        out->output_len = en->output_len > 0 ? en->output_len : 1;
        out->hash_ids = en->hash_ids;
        out->n_hash_ids = en->n_hash_ids;
        return;
    }
    loom_rng r;
    rng_seed(&r, w->seed ^ (0x9e3779b97f4a7c15ULL * (k + 1)));
    out->input_len = bench_dist_sample(&w->input, &r);
    out->output_len = bench_dist_sample(&w->output, &r);
}
