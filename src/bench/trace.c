/*
 * Workloads for `loom bench`: the two public trace formats (Azure LLM inference CSV, Mooncake
 * JSONL), request length distributions, and the k-th request of a workload.
 *
 * Trace files are untrusted bytes: every line is copied into a NUL-terminated buffer before it
 * is parsed, every number is range-checked, and an error names the line. The fuzz target
 * tests/fuzz/fuzz_trace.c drives bench_trace_parse.
 */
#include "loom/bench.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_TOKENS_PER_REQUEST 10000000 /* 1e7: larger counts are certainly corrupt */
#define MAX_AZURE_LINE 512

/* ---------------------------------------------------------------- line iteration */

typedef struct line_iter {
    const char *p, *end;
    size_t line_no;
} line_iter;

/* Next line (without its '\n' or "\r\n"); false at the end of the text. */
static bool line_next(line_iter *it, const char **line, size_t *len)
{
    if (it->p >= it->end)
        return false;
    const char *nl = memchr(it->p, '\n', (size_t)(it->end - it->p));
    const char *stop = nl ? nl : it->end;
    *line = it->p;
    *len = (size_t)(stop - it->p);
    if (*len > 0 && (*line)[*len - 1] == '\r')
        (*len)--;
    it->p = nl ? nl + 1 : it->end;
    it->line_no++;
    return true;
}

static bool is_blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!isspace((unsigned char)s[i]))
            return false;
    return true;
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *end = s + strlen(s);
    while (end > s && isspace((unsigned char)end[-1]))
        *--end = '\0';
    return s;
}

/* ---------------------------------------------------------------- trace storage */

static void trace_init(bench_trace *t, bench_trace_format format)
{
    memset(t, 0, sizeof(*t));
    t->format = format;
}

void bench_trace_free(bench_trace *t)
{
    if (!t)
        return;
    free(t->entries);
    free(t->hash_pool);
    memset(t, 0, sizeof(*t));
}

typedef struct trace_builder {
    bench_trace *t;
    size_t cap_entries, cap_hash;
    size_t *hash_off; /* (cap_entries) where each entry's hash ids start in hash_pool */
} trace_builder;

static int builder_add(trace_builder *b, double ts, int in, int out, loom_err *e)
{
    bench_trace *t = b->t;
    if (t->n == b->cap_entries) {
        size_t cap = b->cap_entries ? b->cap_entries * 2 : 1024;
        bench_trace_entry *ne = realloc(t->entries, cap * sizeof(*ne));
        size_t *no = realloc(b->hash_off, cap * sizeof(*no));
        if (ne)
            t->entries = ne;
        if (no)
            b->hash_off = no;
        if (!ne || !no)
            return loom_errf(e, LOOM_ENOMEM, "out of memory reading the trace");
        b->cap_entries = cap;
    }
    bench_trace_entry *en = &t->entries[t->n];
    memset(en, 0, sizeof(*en));
    en->timestamp_s = ts;
    en->input_len = in;
    en->output_len = out;
    b->hash_off[t->n] = t->n_hash;
    t->n++;
    return 0;
}

static int builder_add_hash(trace_builder *b, int64_t id, loom_err *e)
{
    bench_trace *t = b->t;
    if (t->n_hash == b->cap_hash) {
        size_t cap = b->cap_hash ? b->cap_hash * 2 : 4096;
        int64_t *np = realloc(t->hash_pool, cap * sizeof(*np));
        if (!np)
            return loom_errf(e, LOOM_ENOMEM, "out of memory reading the trace");
        t->hash_pool = np;
        b->cap_hash = cap;
    }
    t->hash_pool[t->n_hash++] = id;
    t->entries[t->n - 1].n_hash_ids++;
    return 0;
}

typedef struct time_index {
    double t;
    size_t i;
} time_index;

static int cmp_time_index(const void *a, const void *b)
{
    const time_index *x = a, *y = b;
    if (x->t != y->t)
        return x->t < y->t ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i; /* stable: file order among equal times */
}

/* Fixes hash pointers, makes timestamps relative to the first request, sorts by time. */
static int builder_finish(trace_builder *b, loom_err *e)
{
    bench_trace *t = b->t;
    if (t->n == 0)
        return loom_errf(e, LOOM_EFORMAT, "the trace has no requests");
    double t0 = INFINITY;
    bool sorted = true;
    for (size_t i = 0; i < t->n; i++) {
        bench_trace_entry *en = &t->entries[i];
        en->hash_ids = en->n_hash_ids ? t->hash_pool + b->hash_off[i] : NULL;
        if (en->timestamp_s < t0)
            t0 = en->timestamp_s;
        if (i > 0 && en->timestamp_s < t->entries[i - 1].timestamp_s)
            sorted = false;
    }
    for (size_t i = 0; i < t->n; i++)
        t->entries[i].timestamp_s -= t0;
    if (sorted)
        return 0;
    time_index *order = malloc(t->n * sizeof(*order));
    bench_trace_entry *copy = malloc(t->n * sizeof(*copy));
    if (!order || !copy) {
        free(order);
        free(copy);
        return loom_errf(e, LOOM_ENOMEM, "out of memory sorting the trace");
    }
    for (size_t i = 0; i < t->n; i++)
        order[i] = (time_index){t->entries[i].timestamp_s, i};
    qsort(order, t->n, sizeof(*order), cmp_time_index);
    for (size_t i = 0; i < t->n; i++)
        copy[i] = t->entries[order[i].i];
    free(t->entries);
    t->entries = copy;
    free(order);
    return 0;
}

/* ---------------------------------------------------------------- numbers */

/* A whole non-negative integer (surrounding spaces allowed) in [0, max]. */
static bool parse_count(const char *s, long max, int *out)
{
    while (isspace((unsigned char)*s))
        s++;
    if (!isdigit((unsigned char)*s))
        return false;
    errno = 0;
    char *end;
    long v = strtol(s, &end, 10);
    while (isspace((unsigned char)*end))
        end++;
    if (errno || *end || v < 0 || v > max)
        return false;
    *out = (int)v;
    return true;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/*
 * "YYYY-MM-DD HH:MM:SS[.fraction]" (a 'T' may separate date and time) or plain seconds, as
 * whole seconds plus a fraction (the sum would lose microseconds at epoch magnitudes).
 */
static bool parse_timestamp(const char *s, int64_t *whole, double *frac)
{
    while (isspace((unsigned char)*s))
        s++;
    int y, mo, d, h, mi, sec, n = 0;
    if (sscanf(s, "%4d-%2d-%2d%*1[ T]%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &n) == 6 &&
        n > 0) {
        if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60 || y < 0 ||
            h < 0 || mi < 0 || sec < 0)
            return false;
        const char *p = s + n;
        double f = 0;
        if (*p == '.') {
            double scale = 0.1;
            p++;
            if (!isdigit((unsigned char)*p))
                return false;
            for (int digits = 0; isdigit((unsigned char)*p); p++, digits++)
                if (digits < 12) {
                    f += (*p - '0') * scale;
                    scale /= 10;
                }
        }
        while (isspace((unsigned char)*p))
            p++;
        if (*p == 'Z')
            p++;
        if (*p)
            return false;
        *whole = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec;
        *frac = f;
        return true;
    }
    /* plain seconds */
    if (!isdigit((unsigned char)*s) && *s != '.')
        return false;
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    while (isspace((unsigned char)*end))
        end++;
    if (errno || *end || !isfinite(v) || v < 0 || v > 1e12)
        return false;
    *whole = (int64_t)v;
    *frac = v - (double)*whole;
    return true;
}

/* ---------------------------------------------------------------- Azure CSV */

int bench_trace_parse_azure(const char *text, size_t len, bench_trace *out, loom_err *e)
{
    trace_init(out, BENCH_TRACE_AZURE);
    trace_builder b = {.t = out};
    line_iter it = {text, text + len, 0};
    const char *line;
    size_t n;
    bool first = true;
    int64_t base = 0; /* whole seconds of the first timestamp, to keep precision */
    int rc = 0;
    while (line_next(&it, &line, &n)) {
        if (is_blank(line, n))
            continue;
        if (n >= MAX_AZURE_LINE) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "line %zu: longer than %d bytes; not an Azure trace "
                           "line (TIMESTAMP,ContextTokens,GeneratedTokens)",
                           it.line_no, MAX_AZURE_LINE);
            goto fail;
        }
        char copy[MAX_AZURE_LINE];
        memcpy(copy, line, n);
        copy[n] = '\0';
        if (memchr(line, '\0', n)) {
            rc = loom_errf(e, LOOM_EFORMAT, "line %zu: contains a NUL byte", it.line_no);
            goto fail;
        }
        char *fields[4];
        int nf = 0;
        for (char *p = copy, *tok; nf < 4 && (tok = strsep(&p, ",")) != NULL;)
            fields[nf++] = trim(tok);
        if (first && nf >= 1 && isalpha((unsigned char)fields[0][0])) {
            first = false; /* a header line */
            if (strcasecmp(fields[0], "TIMESTAMP") != 0 || nf != 3) {
                rc = loom_errf(e, LOOM_EFORMAT,
                               "line %zu: unexpected header '%s'; an Azure "
                               "trace starts with TIMESTAMP,ContextTokens,GeneratedTokens",
                               it.line_no, copy);
                goto fail;
            }
            continue;
        }
        first = false;
        if (nf != 3) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "line %zu: expected 3 comma-separated fields "
                           "(TIMESTAMP,ContextTokens,GeneratedTokens), got %s%d",
                           it.line_no, nf > 3 ? "more than " : "", nf > 3 ? 3 : nf);
            goto fail;
        }
        int64_t whole;
        double frac;
        int in, outl;
        if (!parse_timestamp(fields[0], &whole, &frac)) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "line %zu: TIMESTAMP '%.64s' is neither "
                           "'YYYY-MM-DD HH:MM:SS[.frac]' nor seconds",
                           it.line_no, fields[0]);
            goto fail;
        }
        if (!parse_count(fields[1], MAX_TOKENS_PER_REQUEST, &in)) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "line %zu: ContextTokens '%.32s' is not an integer "
                           "in [0, %d]",
                           it.line_no, fields[1], MAX_TOKENS_PER_REQUEST);
            goto fail;
        }
        if (!parse_count(fields[2], MAX_TOKENS_PER_REQUEST, &outl)) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "line %zu: GeneratedTokens '%.32s' is not an "
                           "integer in [0, %d]",
                           it.line_no, fields[2], MAX_TOKENS_PER_REQUEST);
            goto fail;
        }
        if (out->n == 0)
            base = whole;
        if ((rc = builder_add(&b, (double)(whole - base) + frac, in, outl, e)) != 0)
            goto fail;
    }
    if ((rc = builder_finish(&b, e)) != 0)
        goto fail;
    free(b.hash_off);
    return 0;
fail:
    free(b.hash_off);
    bench_trace_free(out);
    return rc;
}

/* ---------------------------------------------------------------- Mooncake JSONL */

static bool json_count(const cJSON *o, const char *name, int *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsNumber(v))
        return false;
    double d = v->valuedouble;
    if (!(d >= 0 && d <= MAX_TOKENS_PER_REQUEST) || d != floor(d))
        return false;
    *out = (int)d;
    return true;
}

int bench_trace_parse_mooncake(const char *text, size_t len, bench_trace *out, loom_err *e)
{
    trace_init(out, BENCH_TRACE_MOONCAKE);
    trace_builder b = {.t = out};
    line_iter it = {text, text + len, 0};
    const char *line;
    size_t n;
    char *copy = NULL;
    size_t cap = 0;
    cJSON *root = NULL;
    int rc = 0;
    while (line_next(&it, &line, &n)) {
        if (is_blank(line, n))
            continue;
        if (n + 1 > cap) {
            cap = n + 1 > 2 * cap ? n + 1 : 2 * cap;
            char *nc = realloc(copy, cap);
            if (!nc) {
                rc = loom_errf(e, LOOM_ENOMEM, "line %zu: out of memory", it.line_no);
                goto fail;
            }
            copy = nc;
        }
        memcpy(copy, line, n);
        copy[n] = '\0';
        if (strlen(copy) != n) {
            rc = loom_errf(e, LOOM_EFORMAT, "line %zu: contains a NUL byte", it.line_no);
            goto fail;
        }
        root = cJSON_Parse(copy);
        if (!cJSON_IsObject(root)) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "line %zu: not a JSON object; a Mooncake trace has "
                           "one {\"timestamp\", \"input_length\", \"output_length\", "
                           "\"hash_ids\"} object per line",
                           it.line_no);
            goto fail;
        }
        const cJSON *ts = cJSON_GetObjectItemCaseSensitive(root, "timestamp");
        if (!cJSON_IsNumber(ts) || !(ts->valuedouble >= 0 && ts->valuedouble <= 1e15)) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "line %zu: 'timestamp' (milliseconds) is missing or "
                           "not a non-negative number",
                           it.line_no);
            goto fail;
        }
        int in, outl;
        if (!json_count(root, "input_length", &in)) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "line %zu: 'input_length' is missing or not an "
                           "integer in [0, %d]",
                           it.line_no, MAX_TOKENS_PER_REQUEST);
            goto fail;
        }
        if (!json_count(root, "output_length", &outl)) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "line %zu: 'output_length' is missing or not an "
                           "integer in [0, %d]",
                           it.line_no, MAX_TOKENS_PER_REQUEST);
            goto fail;
        }
        if ((rc = builder_add(&b, ts->valuedouble / 1000.0, in, outl, e)) != 0)
            goto fail;
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(root, "hash_ids");
        if (ids && !cJSON_IsNull(ids)) {
            if (!cJSON_IsArray(ids)) {
                rc = loom_errf(e, LOOM_EFORMAT, "line %zu: 'hash_ids' is not an array", it.line_no);
                goto fail;
            }
            const cJSON *id;
            cJSON_ArrayForEach(id, ids)
            {
                double d = cJSON_IsNumber(id) ? id->valuedouble : -1;
                if (!(d >= 0 && d <= 9007199254740992.0) || d != floor(d)) {
                    rc = loom_errf(e, LOOM_EFORMAT,
                                   "line %zu: 'hash_ids' holds something other "
                                   "than a non-negative integer",
                                   it.line_no);
                    goto fail;
                }
                if ((rc = builder_add_hash(&b, (int64_t)d, e)) != 0)
                    goto fail;
            }
        }
        cJSON_Delete(root);
        root = NULL;
    }
    if ((rc = builder_finish(&b, e)) != 0)
        goto fail;
    free(copy);
    free(b.hash_off);
    return 0;
fail:
    cJSON_Delete(root);
    free(copy);
    free(b.hash_off);
    bench_trace_free(out);
    return rc;
}

int bench_trace_parse(const char *text, size_t len, bench_trace *out, loom_err *e)
{
    size_t i = 0;
    while (i < len && isspace((unsigned char)text[i]))
        i++;
    if (i < len && text[i] == '{')
        return bench_trace_parse_mooncake(text, len, out, e);
    return bench_trace_parse_azure(text, len, out, e);
}

int bench_trace_load(const char *path, bench_trace *out, loom_err *e)
{
    char *text = NULL;
    size_t len = 0;
    memset(out, 0, sizeof(*out));
    int rc = loom_read_file(path, &text, &len, e);
    if (rc != 0)
        return rc;
    rc = bench_trace_parse(text, len, out, e);
    free(text);
    if (rc != 0 && e) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        loom_errf(e, rc, "%s: %s", path, msg);
    }
    return rc;
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
        if (!parse_double(buf, &v) || v < 1 || v > MAX_TOKENS_PER_REQUEST || v != floor(v))
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
        if (a < 1 || b < a || b > MAX_TOKENS_PER_REQUEST)
            return loom_errf(e, LOOM_EINVAL, "%s length '%s': uniform:A-B wants 1 <= A <= B", side,
                             spec);
        out->kind = BENCH_DIST_UNIFORM;
    } else if (!strcmp(buf, "normal")) {
        if (a < 1 || b < 0 || a > MAX_TOKENS_PER_REQUEST)
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
    if (v > MAX_TOKENS_PER_REQUEST)
        return MAX_TOKENS_PER_REQUEST;
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
