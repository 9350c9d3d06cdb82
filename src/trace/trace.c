/*
 * The Azure LLM inference trace CSV and Mooncake JSONL parsers behind `loom bench --trace` and
 * `loom plan --workload` (see include/loom/trace.h for the formats).
 */
#include "loom/trace.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_AZURE_LINE 512

/*
 * Sets e to code and "NAME:LINE: what", "NAME: what", "line LINE: what" or "what", as name is
 * given (the caller's file name) and line is known (nonzero).
 */
static int trace_errf(loom_err *e, int code, const char *name, size_t line, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int trace_errf(loom_err *e, int code, const char *name, size_t line, const char *fmt, ...)
{
    if (!e)
        return code;
    char what[sizeof(e->msg)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    if (name && line)
        return loom_errf(e, code, "%s:%zu: %s", name, line, what);
    if (name)
        return loom_errf(e, code, "%s: %s", name, what);
    if (line)
        return loom_errf(e, code, "line %zu: %s", line, what);
    return loom_errf(e, code, "%s", what);
}

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

void trace_free(loom_trace *t)
{
    if (!t)
        return;
    free(t->entries);
    free(t->hash_pool);
    memset(t, 0, sizeof(*t));
}

typedef struct trace_builder {
    loom_trace *t;
    const char *name; /* for messages; may be NULL */
    size_t cap_entries, cap_hash;
    size_t *hash_off; /* (cap_entries) where each entry's hash ids start in hash_pool */
} trace_builder;

static int builder_add(trace_builder *b, double ts, int in, int out, loom_err *e)
{
    loom_trace *t = b->t;
    if (t->n == b->cap_entries) {
        size_t cap = b->cap_entries ? b->cap_entries * 2 : 1024;
        loom_trace_entry *ne = realloc(t->entries, cap * sizeof(*ne));
        size_t *no = realloc(b->hash_off, cap * sizeof(*no));
        if (ne)
            t->entries = ne;
        if (no)
            b->hash_off = no;
        if (!ne || !no)
            return trace_errf(e, LOOM_ENOMEM, b->name, 0, "out of memory reading the trace");
        b->cap_entries = cap;
    }
    loom_trace_entry *en = &t->entries[t->n];
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
    loom_trace *t = b->t;
    if (t->n_hash == b->cap_hash) {
        size_t cap = b->cap_hash ? b->cap_hash * 2 : 4096;
        int64_t *np = realloc(t->hash_pool, cap * sizeof(*np));
        if (!np)
            return trace_errf(e, LOOM_ENOMEM, b->name, 0, "out of memory reading the trace");
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

/*
 * Fixes hash pointers, makes timestamps relative to the first request, sorts by time. empty
 * (nothing but blank lines) and header_missing pick the wording of the no-requests error.
 */
static int builder_finish(trace_builder *b, bool empty, bool header_missing, loom_err *e)
{
    loom_trace *t = b->t;
    if (t->n == 0 && empty)
        return trace_errf(e, LOOM_EFORMAT, b->name, 0, "the trace is empty (%sno requests)",
                          header_missing ? "no header, " : "");
    if (t->n == 0)
        return trace_errf(e, LOOM_EFORMAT, b->name, 0, "the trace has no requests");
    double t0 = INFINITY;
    bool sorted = true;
    for (size_t i = 0; i < t->n; i++) {
        loom_trace_entry *en = &t->entries[i];
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
    loom_trace_entry *copy = malloc(t->n * sizeof(*copy));
    if (!order || !copy) {
        free(order);
        free(copy);
        return trace_errf(e, LOOM_ENOMEM, b->name, 0, "out of memory sorting the trace");
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

enum { COL_TIMESTAMP, COL_CONTEXT, COL_GENERATED, N_AZURE_FIELDS };
static const char *const azure_field_names[N_AZURE_FIELDS] = {"TIMESTAMP", "ContextTokens",
                                                              "GeneratedTokens"};

/*
 * A header line: which column holds each field (any order, extra columns ignored, every field
 * present). False for anything else.
 */
static bool azure_header(char **fields, int nf, int col[N_AZURE_FIELDS])
{
    for (int k = 0; k < N_AZURE_FIELDS; k++)
        col[k] = -1;
    if (nf > TRACE_AZURE_MAX_COLUMNS)
        return false;
    for (int i = 0; i < nf; i++)
        for (int k = 0; k < N_AZURE_FIELDS; k++)
            if (!strcasecmp(fields[i], azure_field_names[k]))
                col[k] = i;
    for (int k = 0; k < N_AZURE_FIELDS; k++)
        if (col[k] < 0)
            return false;
    return true;
}

int trace_parse_azure(const char *text, size_t len, const char *name, loom_trace *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    out->format = TRACE_AZURE;
    trace_builder b = {.t = out, .name = name};
    line_iter it = {text, text + len, 0};
    const char *line;
    size_t n;
    bool first = true, header = false;
    int col[N_AZURE_FIELDS] = {COL_TIMESTAMP, COL_CONTEXT, COL_GENERATED};
    int n_cols = N_AZURE_FIELDS; /* fields a request line has: the header's, else these 3 */
    int64_t base = 0;            /* whole seconds of the first timestamp, to keep precision */
    int rc = 0;
    while (line_next(&it, &line, &n)) {
        if (is_blank(line, n))
            continue;
        if (n >= MAX_AZURE_LINE) {
            rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                            "longer than %d bytes; not an Azure trace line "
                            "(TIMESTAMP,ContextTokens,GeneratedTokens)",
                            MAX_AZURE_LINE);
            goto fail;
        }
        char copy[MAX_AZURE_LINE], whole_line[MAX_AZURE_LINE];
        memcpy(copy, line, n);
        copy[n] = '\0';
        if (memchr(line, '\0', n)) {
            rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no, "contains a NUL byte");
            goto fail;
        }
        memcpy(whole_line, copy, n + 1);
        /* one field more than a line may have, to tell "too many" apart */
        char *fields[TRACE_AZURE_MAX_COLUMNS + 1];
        int nf = 0;
        for (char *p = copy, *tok; nf <= TRACE_AZURE_MAX_COLUMNS && (tok = strsep(&p, ","));)
            fields[nf++] = trim(tok);
        if (first && isalpha((unsigned char)fields[0][0])) {
            first = false; /* a header line */
            if (!azure_header(fields, nf, col)) {
                rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                                "expected the Azure trace header "
                                "TIMESTAMP,ContextTokens,GeneratedTokens (any order, at most %d "
                                "columns); '%.100s' is an unexpected header",
                                TRACE_AZURE_MAX_COLUMNS, whole_line);
                goto fail;
            }
            header = true;
            n_cols = nf;
            continue;
        }
        first = false;
        if (nf != n_cols) {
            const char *more = nf > TRACE_AZURE_MAX_COLUMNS ? "more than " : "";
            int shown = nf > TRACE_AZURE_MAX_COLUMNS ? TRACE_AZURE_MAX_COLUMNS : nf;
            if (header)
                rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                                "%s%d fields, the header has %d (expected %d comma-separated "
                                "fields)",
                                more, shown, n_cols, n_cols);
            else
                rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                                "expected 3 comma-separated fields "
                                "(TIMESTAMP,ContextTokens,GeneratedTokens), got %s%d",
                                nf > 3 ? "more than " : "", nf > 3 ? 3 : nf);
            goto fail;
        }
        const char *ts = fields[col[COL_TIMESTAMP]];
        const char *ctx = fields[col[COL_CONTEXT]], *gen = fields[col[COL_GENERATED]];
        int64_t whole;
        double frac;
        int in, outl;
        if (!parse_timestamp(ts, &whole, &frac)) {
            rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                            "TIMESTAMP '%.64s' is neither "
                            "'YYYY-MM-DD HH:MM:SS[.frac]' nor seconds",
                            ts);
            goto fail;
        }
        if (!parse_count(ctx, TRACE_MAX_TOKENS, &in)) {
            rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                            "ContextTokens '%.32s' is not an integer in [0, %d]", ctx,
                            TRACE_MAX_TOKENS);
            goto fail;
        }
        if (!parse_count(gen, TRACE_MAX_TOKENS, &outl)) {
            rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                            "GeneratedTokens '%.32s' is not an integer in [0, %d]", gen,
                            TRACE_MAX_TOKENS);
            goto fail;
        }
        if (out->n == 0)
            base = whole;
        if ((rc = builder_add(&b, (double)(whole - base) + frac, in, outl, e)) != 0)
            goto fail;
    }
    if ((rc = builder_finish(&b, first, !header, e)) != 0)
        goto fail;
    free(b.hash_off);
    return 0;
fail:
    free(b.hash_off);
    trace_free(out);
    return rc;
}

/* ---------------------------------------------------------------- Mooncake JSONL */

/* 0: a token count in out; -1: missing; -2: not an integer in [0, TRACE_MAX_TOKENS]. */
static int json_count(const cJSON *o, const char *key, int *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v)
        return -1;
    double d = cJSON_IsNumber(v) ? v->valuedouble : -1;
    if (!(d >= 0 && d <= TRACE_MAX_TOKENS) || d != floor(d))
        return -2;
    *out = (int)d;
    return 0;
}

int trace_parse_mooncake(const char *text, size_t len, const char *name, loom_trace *out,
                         loom_err *e)
{
    memset(out, 0, sizeof(*out));
    out->format = TRACE_MOONCAKE;
    trace_builder b = {.t = out, .name = name};
    line_iter it = {text, text + len, 0};
    const char *line;
    size_t n;
    char *copy = NULL;
    size_t cap = 0;
    cJSON *root = NULL;
    bool empty = true;
    int rc = 0;
    while (line_next(&it, &line, &n)) {
        if (is_blank(line, n))
            continue;
        empty = false;
        if (n + 1 > cap) {
            cap = n + 1 > 2 * cap ? n + 1 : 2 * cap;
            char *nc = realloc(copy, cap);
            if (!nc) {
                rc = trace_errf(e, LOOM_ENOMEM, name, it.line_no, "out of memory");
                goto fail;
            }
            copy = nc;
        }
        memcpy(copy, line, n);
        copy[n] = '\0';
        if (strlen(copy) != n) {
            rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no, "contains a NUL byte");
            goto fail;
        }
        root = cJSON_Parse(copy);
        if (!cJSON_IsObject(root)) {
            rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                            "not a JSON object; a Mooncake trace has "
                            "one {\"timestamp\", \"input_length\", \"output_length\", "
                            "\"hash_ids\"} object per line");
            goto fail;
        }
        const cJSON *ts = cJSON_GetObjectItemCaseSensitive(root, "timestamp");
        if (!cJSON_IsNumber(ts) || !(ts->valuedouble >= 0 && ts->valuedouble <= 1e15)) {
            rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                            "'timestamp' (milliseconds) is missing or "
                            "not a non-negative number");
            goto fail;
        }
        const char *keys[2] = {"input_length", "output_length"};
        int lens[2];
        for (int k = 0; k < 2; k++) {
            int bad = json_count(root, keys[k], &lens[k]);
            if (bad == -1)
                rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no, "'%s' is missing", keys[k]);
            else if (bad)
                rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                                "'%s' is not an integer in [0, %d]", keys[k], TRACE_MAX_TOKENS);
            if (bad)
                goto fail;
        }
        if ((rc = builder_add(&b, ts->valuedouble / 1000.0, lens[0], lens[1], e)) != 0)
            goto fail;
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(root, "hash_ids");
        if (ids && !cJSON_IsNull(ids)) {
            if (!cJSON_IsArray(ids)) {
                rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no, "'hash_ids' is not an array");
                goto fail;
            }
            const cJSON *id;
            cJSON_ArrayForEach(id, ids)
            {
                double d = cJSON_IsNumber(id) ? id->valuedouble : -1;
                if (!(d >= 0 && d <= 9007199254740992.0) || d != floor(d)) {
                    rc = trace_errf(e, LOOM_EFORMAT, name, it.line_no,
                                    "'hash_ids' holds something other "
                                    "than a non-negative integer");
                    goto fail;
                }
                if ((rc = builder_add_hash(&b, (int64_t)d, e)) != 0)
                    goto fail;
            }
        }
        cJSON_Delete(root);
        root = NULL;
    }
    if ((rc = builder_finish(&b, empty, false, e)) != 0)
        goto fail;
    free(copy);
    free(b.hash_off);
    return 0;
fail:
    cJSON_Delete(root);
    free(copy);
    free(b.hash_off);
    trace_free(out);
    return rc;
}

/* ---------------------------------------------------------------- format detection, files */

static bool starts_with_brace(const char *text, size_t len)
{
    size_t i = 0;
    while (i < len && isspace((unsigned char)text[i]))
        i++;
    return i < len && text[i] == '{';
}

int trace_parse(const char *text, size_t len, const char *name, loom_trace *out, loom_err *e)
{
    if (starts_with_brace(text, len))
        return trace_parse_mooncake(text, len, name, out, e);
    return trace_parse_azure(text, len, name, out, e);
}

static bool has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcasecmp(s + n - m, suffix);
}

int trace_load(const char *path, const char *name, loom_trace *out, loom_err *e)
{
    char *text = NULL;
    size_t len = 0;
    memset(out, 0, sizeof(*out));
    int rc = loom_read_file(path, &text, &len, e);
    if (rc != 0)
        return rc;
    bool mooncake = has_suffix(path, ".jsonl") || has_suffix(path, ".json") ||
                    (!has_suffix(path, ".csv") && starts_with_brace(text, len));
    rc = mooncake ? trace_parse_mooncake(text, len, name, out, e)
                  : trace_parse_azure(text, len, name, out, e);
    free(text);
    if (rc != 0 && !name && e) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        loom_errf(e, rc, "%s: %s", path, msg);
    }
    return rc;
}
