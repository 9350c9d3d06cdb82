/*
 * Workloads for the planner: request traces (Azure LLM inference CSV, Mooncake JSONL) and
 * synthetic length distributions. The planner needs the length moments; the arrival rate sets
 * the default target of the min-cost objective. Parsers report "name:LINE: what".
 */
#include "loom/plan.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_TOKENS 100000000 /* per request; larger is surely a corrupt line */

static void push_request(plan_workload *w, int64_t *cap, double t, int in, int out)
{
    if (w->n == *cap) {
        *cap = *cap ? *cap * 2 : 1024;
        w->requests = xrealloc(w->requests, sizeof(plan_request) * (size_t)*cap);
    }
    w->requests[w->n++] = (plan_request){t, in, out};
}

/* Moments and rate from the requests; times are made relative to the earliest arrival. */
static int summarize(plan_workload *w, const char *name, loom_err *e)
{
    if (w->n == 0)
        return loom_errf(e, LOOM_EINVAL, "%s: the trace has no requests", name);
    double t0 = INFINITY, t1 = -INFINITY, sin = 0, sout = 0, ssq = 0;
    for (int64_t i = 0; i < w->n; i++) {
        const plan_request *r = &w->requests[i];
        t0 = fmin(t0, r->t);
        t1 = fmax(t1, r->t);
        sin += r->in;
        sout += r->out;
        ssq += (double)r->in * r->in;
        if (r->in > w->max_in)
            w->max_in = r->in;
        if (r->out > w->max_out)
            w->max_out = r->out;
    }
    for (int64_t i = 0; i < w->n; i++)
        w->requests[i].t -= t0;
    w->mean_in = sin / (double)w->n;
    w->mean_out = sout / (double)w->n;
    w->mean_in_sq = ssq / (double)w->n;
    w->duration = t1 - t0;
    w->rate = w->duration > 0 ? (double)(w->n - 1) / w->duration : 0;
    if (w->mean_out < 1)
        return loom_errf(e, LOOM_EINVAL,
                         "%s: requests generate %.2f tokens on average; the "
                         "planner needs outputs of at least 1 token",
                         name, w->mean_out);
    return LOOM_OK;
}

static bool parse_count(const char *s, size_t n, int *out)
{
    if (n == 0 || n > 12)
        return false;
    long long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return false;
        v = v * 10 + (s[i] - '0');
    }
    if (v > MAX_TOKENS)
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

/* "2023-11-16 18:17:03.9799600" (or with 'T'), or plain seconds. */
static bool parse_timestamp(const char *s, size_t n, double *out)
{
    char buf[64];
    if (n == 0 || n >= sizeof(buf))
        return false;
    memcpy(buf, s, n);
    buf[n] = 0;
    int Y, M, D, h, mi, consumed = 0;
    double sec;
    if (sscanf(buf, "%4d-%2d-%2d%*1[ T]%2d:%2d:%lf%n", &Y, &M, &D, &h, &mi, &sec, &consumed) == 6 &&
        consumed == (int)n) {
        if (M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || mi > 59 || !(sec >= 0 && sec < 61))
            return false;
        *out = (double)days_from_civil(Y, M, D) * 86400.0 + h * 3600.0 + mi * 60.0 + sec;
        return true;
    }
    char *end = NULL;
    errno = 0;
    double v = strtod(buf, &end);
    if (errno || end == buf || *end || !isfinite(v))
        return false;
    *out = v;
    return true;
}

/* Splits one CSV line (no quoting in these traces) into at most max fields. */
static int split_csv(const char *line, size_t len, const char **f, size_t *fl, int max)
{
    int n = 0;
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || line[i] == ',') {
            if (n == max)
                return max + 1;
            size_t a = start, b = i;
            while (a < b && (line[a] == ' ' || line[a] == '\t'))
                a++;
            while (b > a && (line[b - 1] == ' ' || line[b - 1] == '\t'))
                b--;
            f[n] = line + a;
            fl[n] = b - a;
            n++;
            start = i + 1;
        }
    }
    return n;
}

static bool field_is(const char *f, size_t n, const char *name)
{
    return strlen(name) == n && !strncasecmp(f, name, n);
}

int plan_workload_parse_azure(const char *text, size_t len, const char *name, plan_workload *out,
                              loom_err *e)
{
    memset(out, 0, sizeof(*out));
    snprintf(out->source, sizeof(out->source), "%s", name);
    int64_t cap = 0;
    int col_t = -1, col_in = -1, col_out = -1, n_cols = 0, rc = LOOM_OK;
    size_t pos = 0;
    for (int64_t line = 1; pos < len; line++) {
        const char *s = text + pos;
        const char *nl = memchr(s, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - s) : len - pos;
        pos += n + (nl ? 1 : 0);
        if (n && s[n - 1] == '\r')
            n--;
        if (memchr(s, '\0', n)) {
            rc = loom_errf(e, LOOM_EFORMAT, "%s:%lld: NUL byte in a text file", name,
                           (long long)line);
            goto fail;
        }
        bool blank = true;
        for (size_t i = 0; i < n; i++)
            blank = blank && isspace((unsigned char)s[i]);
        if (blank)
            continue;
        const char *f[8];
        size_t fl[8];
        int nf = split_csv(s, n, f, fl, 8);
        if (n_cols == 0) { /* header */
            if (nf > 8) {
                rc = loom_errf(e, LOOM_EFORMAT, "%s:%lld: header has more than 8 columns", name,
                               (long long)line);
                goto fail;
            }
            for (int i = 0; i < nf; i++) {
                if (field_is(f[i], fl[i], "TIMESTAMP"))
                    col_t = i;
                else if (field_is(f[i], fl[i], "ContextTokens"))
                    col_in = i;
                else if (field_is(f[i], fl[i], "GeneratedTokens"))
                    col_out = i;
            }
            if (col_t < 0 || col_in < 0 || col_out < 0) {
                rc = loom_errf(e, LOOM_EFORMAT,
                               "%s:%lld: expected the Azure trace header "
                               "TIMESTAMP,ContextTokens,GeneratedTokens",
                               name, (long long)line);
                goto fail;
            }
            n_cols = nf;
            continue;
        }
        if (nf != n_cols) {
            rc = loom_errf(e, LOOM_EFORMAT, "%s:%lld: %d fields, the header has %d", name,
                           (long long)line, nf > 8 ? 9 : nf, n_cols);
            goto fail;
        }
        double t;
        int in, outn;
        if (!parse_timestamp(f[col_t], fl[col_t], &t)) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "%s:%lld: TIMESTAMP '%.*s' is not a date-time "
                           "(YYYY-MM-DD hh:mm:ss.frac) or a number of seconds",
                           name, (long long)line, (int)(fl[col_t] > 40 ? 40 : fl[col_t]), f[col_t]);
            goto fail;
        }
        if (!parse_count(f[col_in], fl[col_in], &in)) {
            rc = loom_errf(e, LOOM_EFORMAT, "%s:%lld: ContextTokens '%.*s' is not a token count",
                           name, (long long)line, (int)(fl[col_in] > 40 ? 40 : fl[col_in]),
                           f[col_in]);
            goto fail;
        }
        if (!parse_count(f[col_out], fl[col_out], &outn)) {
            rc = loom_errf(e, LOOM_EFORMAT, "%s:%lld: GeneratedTokens '%.*s' is not a token count",
                           name, (long long)line, (int)(fl[col_out] > 40 ? 40 : fl[col_out]),
                           f[col_out]);
            goto fail;
        }
        push_request(out, &cap, t, in, outn);
    }
    if (n_cols == 0) {
        rc = loom_errf(e, LOOM_EINVAL, "%s: the trace is empty (no header, no requests)", name);
        goto fail;
    }
    if ((rc = summarize(out, name, e)))
        goto fail;
    return LOOM_OK;
fail:
    plan_workload_free(out);
    return rc;
}

static int json_count(const cJSON *obj, const char *key, bool required, int *out)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j)
        return required ? -1 : 0;
    if (!cJSON_IsNumber(j) || !(j->valuedouble >= 0) || j->valuedouble > MAX_TOKENS ||
        floor(j->valuedouble) != j->valuedouble)
        return -2;
    *out = (int)j->valuedouble;
    return 0;
}

int plan_workload_parse_mooncake(const char *text, size_t len, const char *name, plan_workload *out,
                                 loom_err *e)
{
    memset(out, 0, sizeof(*out));
    snprintf(out->source, sizeof(out->source), "%s", name);
    int64_t cap = 0;
    int rc = LOOM_OK;
    size_t pos = 0;
    for (int64_t line = 1; pos < len; line++) {
        const char *s = text + pos;
        const char *nl = memchr(s, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - s) : len - pos;
        pos += n + (nl ? 1 : 0);
        bool blank = true;
        for (size_t i = 0; i < n; i++)
            blank = blank && isspace((unsigned char)s[i]);
        if (blank)
            continue;
        cJSON *obj = cJSON_ParseWithLength(s, n);
        if (!obj || !cJSON_IsObject(obj)) {
            cJSON_Delete(obj);
            rc = loom_errf(e, LOOM_EFORMAT, "%s:%lld: not a JSON object", name, (long long)line);
            goto fail;
        }
        const cJSON *ts = cJSON_GetObjectItemCaseSensitive(obj, "timestamp");
        int in = 0, outn = 0, r1, r2;
        const char *bad = NULL;
        if (!cJSON_IsNumber(ts) || !isfinite(ts->valuedouble))
            bad = "timestamp (milliseconds) is missing or not a number";
        else if ((r1 = json_count(obj, "input_length", true, &in)))
            bad = r1 == -1 ? "input_length is missing" : "input_length is not a token count";
        else if ((r2 = json_count(obj, "output_length", true, &outn)))
            bad = r2 == -1 ? "output_length is missing" : "output_length is not a token count";
        else {
            const cJSON *h = cJSON_GetObjectItemCaseSensitive(obj, "hash_ids");
            if (h && !cJSON_IsArray(h))
                bad = "hash_ids is not a list";
        }
        double t = bad ? 0 : ts->valuedouble / 1000.0;
        cJSON_Delete(obj);
        if (bad) {
            rc = loom_errf(e, LOOM_EFORMAT, "%s:%lld: %s", name, (long long)line, bad);
            goto fail;
        }
        push_request(out, &cap, t, in, outn);
    }
    if ((rc = summarize(out, name, e)))
        goto fail;
    return LOOM_OK;
fail:
    plan_workload_free(out);
    return rc;
}

static bool has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcasecmp(s + n - m, suffix);
}

int plan_workload_load(const char *path, plan_workload *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    char *text = NULL;
    size_t len = 0;
    int rc = loom_read_file(path, &text, &len, e);
    if (rc)
        return rc;
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t i = 0;
    while (i < len && isspace((unsigned char)text[i]))
        i++;
    bool mooncake = has_suffix(path, ".jsonl") || has_suffix(path, ".json") ||
                    (!has_suffix(path, ".csv") && i < len && text[i] == '{');
    rc = mooncake ? plan_workload_parse_mooncake(text, len, base, out, e)
                  : plan_workload_parse_azure(text, len, base, out, e);
    free(text);
    return rc;
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
