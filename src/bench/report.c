/*
 * Reports of a benchmark: the summary table (terminal and markdown), the result JSON with
 * `vllm bench serve` field names, and gnuplot plots.
 *
 * Every report has one column per target and, from the second target on, its ratio to the
 * first, so that a comparison reads off one line.
 */
#include "loom/bench.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- rows of the summary */

typedef enum { FMT_INT, FMT_F2, FMT_F1 } row_fmt;

typedef struct row {
    const char *section; /* a heading printed before the row, or NULL */
    const char *name;
    row_fmt fmt;
    size_t offset; /* of a double or bench_latency field... see value() */
    int kind;      /* 0 double field, 1 size_t field, 2 int64 field, 3 int field */
    bool needs_slo;
} row;

#define D(field) offsetof(bench_summary, field), 0
#define Z(field) offsetof(bench_summary, field), 1
#define I64(field) offsetof(bench_summary, field), 2
#define INT(field) offsetof(bench_summary, field), 3

/* clang-format off */
static const row rows[] = {
    {NULL, "Successful requests", FMT_INT, Z(completed), false},
    {NULL, "Failed requests", FMT_INT, Z(failed), false},
    {NULL, "Benchmark duration (s)", FMT_F2, D(duration_s), false},
    {NULL, "Total input tokens", FMT_INT, I64(total_input_tokens), false},
    {NULL, "Total generated tokens", FMT_INT, I64(total_output_tokens), false},
    {NULL, "Request throughput (req/s)", FMT_F2, D(request_throughput), false},
    {NULL, "Request goodput (req/s)", FMT_F2, D(request_goodput), true},
    {NULL, "Output token throughput (tok/s)", FMT_F2, D(output_throughput), false},
    {NULL, "Peak output token throughput (tok/s)", FMT_F2, D(max_output_tokens_per_s), false},
    {NULL, "Total token throughput (tok/s)", FMT_F2, D(total_token_throughput), false},
    {NULL, "Peak concurrent requests", FMT_INT, INT(max_concurrent_requests), false},
    {"Time to First Token", "Mean TTFT (ms)", FMT_F2, D(ttft.mean), false},
    {NULL, "Median TTFT (ms)", FMT_F2, D(ttft.median), false},
    {NULL, "P90 TTFT (ms)", FMT_F2, D(ttft.p90), false},
    {NULL, "P99 TTFT (ms)", FMT_F2, D(ttft.p99), false},
    {"Time per Output Token (excl. 1st token)", "Mean TPOT (ms)", FMT_F2, D(tpot.mean), false},
    {NULL, "Median TPOT (ms)", FMT_F2, D(tpot.median), false},
    {NULL, "P90 TPOT (ms)", FMT_F2, D(tpot.p90), false},
    {NULL, "P99 TPOT (ms)", FMT_F2, D(tpot.p99), false},
    {"Inter-token Latency", "Mean ITL (ms)", FMT_F2, D(itl.mean), false},
    {NULL, "Median ITL (ms)", FMT_F2, D(itl.median), false},
    {NULL, "P90 ITL (ms)", FMT_F2, D(itl.p90), false},
    {NULL, "P99 ITL (ms)", FMT_F2, D(itl.p99), false},
    {"End-to-end Latency", "Mean E2EL (ms)", FMT_F2, D(e2el.mean), false},
    {NULL, "Median E2EL (ms)", FMT_F2, D(e2el.median), false},
    {NULL, "P90 E2EL (ms)", FMT_F2, D(e2el.p90), false},
    {NULL, "P99 E2EL (ms)", FMT_F2, D(e2el.p99), false},
};
/* clang-format on */
#define N_ROWS (sizeof(rows) / sizeof(rows[0]))

static double row_value(const row *rw, const bench_summary *s)
{
    const char *base = (const char *)s + rw->offset;
    switch (rw->kind) {
    case 0:
        return *(const double *)base;
    case 1:
        return (double)*(const size_t *)base;
    case 2:
        return (double)*(const int64_t *)base;
    default:
        return (double)*(const int *)base;
    }
}

static void format_value(char *out, size_t cap, row_fmt fmt, double v)
{
    if (fmt == FMT_INT)
        snprintf(out, cap, "%.0f", v);
    else if (fmt == FMT_F1)
        snprintf(out, cap, "%.1f", v);
    else
        snprintf(out, cap, "%.2f", v);
}

static void format_ratio(char *out, size_t cap, double v, double first)
{
    if (first != 0 && isfinite(v / first))
        snprintf(out, cap, "x%.3f", v / first);
    else
        snprintf(out, cap, "-");
}

typedef struct summaries {
    bench_summary s[BENCH_MAX_TARGETS];
    int n;
} summaries;

static void summaries_make(summaries *all, const bench_result *r, const bench_slo *slo)
{
    all->n = r->n_targets;
    for (int t = 0; t < r->n_targets; t++)
        bench_summarize(r, t, slo, &all->s[t]);
}

static void summaries_free(summaries *all)
{
    for (int t = 0; t < all->n; t++)
        bench_summary_free(&all->s[t]);
}

static void describe_arrival(char *out, size_t cap, const bench_result *r)
{
    if (r->time_scale > 0)
        snprintf(out, cap, "trace timestamps x %g", r->time_scale);
    else if (isfinite(r->rate))
        snprintf(out, cap, "%s at %g req/s%s", r->burstiness == 1 ? "Poisson" : "gamma", r->rate,
                 r->burstiness == 1 ? "" : " (burstiness set)");
    else if (r->concurrency > 0)
        snprintf(out, cap, "closed loop, %d in flight", r->concurrency);
    else
        snprintf(out, cap, "all at once");
    if (r->concurrency > 0 && (r->time_scale > 0 || isfinite(r->rate))) {
        size_t n = strlen(out);
        snprintf(out + n, cap - n, ", at most %d in flight", r->concurrency);
    }
}

/* ---------------------------------------------------------------- terminal table */

void bench_report_print(FILE *f, const bench_result *r, const bench_slo *slo)
{
    summaries all;
    summaries_make(&all, r, slo);
    int n = all.n;
    const int name_w = 40;
    int col_w = 14;
    for (int t = 0; t < n; t++) {
        int w = (int)strlen(r->labels[t]) + 2;
        if (w > col_w)
            col_w = w < 40 ? w : 40;
    }
    int width = name_w + n * col_w + (n - 1) * 9;
    char arrival[128];
    describe_arrival(arrival, sizeof(arrival), r);
    fprintf(f, "%.*s\n", width,
            "================================================================================"
            "================================================================================");
    fprintf(f, "loom bench: model %s, %s prompts, %s%s\n", *r->model ? r->model : "(default)",
            r->prompt_kind ? r->prompt_kind : "token ids", arrival,
            r->interrupted ? "  [INTERRUPTED]" : "");
    fprintf(f, "%-*s", name_w, "");
    for (int t = 0; t < n; t++)
        fprintf(f, "%*.*s", col_w, col_w - 1, r->labels[t]);
    for (int t = 1; t < n; t++)
        fprintf(f, "  %7s", "ratio");
    fputc('\n', f);
    char v[64];
    for (size_t i = 0; i < N_ROWS; i++) {
        const row *rw = &rows[i];
        if (rw->needs_slo && !all.s[0].slo_set)
            continue;
        if (rw->section)
            fprintf(f, "%s\n", rw->section);
        fprintf(f, "%-*s", name_w, rw->name);
        for (int t = 0; t < n; t++) {
            format_value(v, sizeof(v), rw->fmt, row_value(rw, &all.s[t]));
            fprintf(f, "%*s", col_w, v);
        }
        for (int t = 1; t < n; t++) {
            format_ratio(v, sizeof(v), row_value(rw, &all.s[t]), row_value(rw, &all.s[0]));
            fprintf(f, "  %7s", v);
        }
        fputc('\n', f);
    }
    /* errors by kind */
    bool any_error = false;
    for (int t = 0; t < n; t++)
        any_error |= all.s[t].failed > 0;
    if (any_error) {
        fprintf(f, "Errors\n");
        for (int k = 1; k < BENCH_ERR_COUNT; k++) {
            size_t total = 0;
            for (int t = 0; t < n; t++)
                total += all.s[t].errors[k];
            if (!total)
                continue;
            fprintf(f, "%-*s", name_w, bench_error_name((bench_error)k));
            for (int t = 0; t < n; t++)
                fprintf(f, "%*zu", col_w, all.s[t].errors[k]);
            fputc('\n', f);
        }
        for (int t = 0; t < n; t++)
            for (int j = 0; j < all.s[t].n_status; j++)
                fprintf(f, "  %s: HTTP %d x %zu\n", r->labels[t], all.s[t].status_codes[j],
                        all.s[t].status_counts[j]);
        /* the first message of each kind, so the cause is on screen */
        for (int k = 1; k < BENCH_ERR_COUNT; k++)
            for (size_t i = 0; i < r->n_records; i++)
                if (r->records[i].error == (bench_error)k) {
                    fprintf(f, "  first %s error: %s\n", bench_error_name((bench_error)k),
                            r->records[i].error_msg ? r->records[i].error_msg : "");
                    break;
                }
    }
    if (r->n_instances > 0) {
        fprintf(f, "Serving instance (share of completed requests)\n");
        for (int i = 0; i < r->n_instances; i++) {
            fprintf(f, "%-*.*s", name_w, name_w - 1, r->instances[i]);
            for (int t = 0; t < n; t++) {
                double share = all.s[t].completed ? 100.0 * (double)all.s[t].instance_counts[i] /
                                                        (double)all.s[t].completed
                                                  : 0;
                snprintf(v, sizeof(v), "%zu (%.1f%%)", all.s[t].instance_counts[i], share);
                fprintf(f, "%*s", col_w, v);
            }
            fputc('\n', f);
        }
    }
    fprintf(f, "%.*s\n", width,
            "================================================================================"
            "================================================================================");
    summaries_free(&all);
}

/* ---------------------------------------------------------------- markdown */

void bench_report_markdown(loom_buf *out, const bench_result *r, const bench_slo *slo)
{
    summaries all;
    summaries_make(&all, r, slo);
    int n = all.n;
    char arrival[128];
    describe_arrival(arrival, sizeof(arrival), r);
    buf_printf(out, "Model `%s`, %s prompts, %s.\n\n", *r->model ? r->model : "(default)",
               r->prompt_kind ? r->prompt_kind : "token ids", arrival);
    buf_puts(out, "| metric |");
    for (int t = 0; t < n; t++)
        buf_printf(out, " %s |", r->labels[t]);
    for (int t = 1; t < n; t++)
        buf_printf(out, " %s / %s |", r->labels[t], r->labels[0]);
    buf_puts(out, "\n|---|");
    for (int t = 0; t < 2 * n - 1; t++)
        buf_puts(out, "---:|");
    buf_puts(out, "\n");
    char v[64];
    for (size_t i = 0; i < N_ROWS; i++) {
        const row *rw = &rows[i];
        if (rw->needs_slo && !all.s[0].slo_set)
            continue;
        buf_printf(out, "| %s |", rw->name);
        for (int t = 0; t < n; t++) {
            format_value(v, sizeof(v), rw->fmt, row_value(rw, &all.s[t]));
            buf_printf(out, " %s |", v);
        }
        for (int t = 1; t < n; t++) {
            format_ratio(v, sizeof(v), row_value(rw, &all.s[t]), row_value(rw, &all.s[0]));
            buf_printf(out, " %s |", v);
        }
        buf_puts(out, "\n");
    }
    summaries_free(&all);
}

/* ---------------------------------------------------------------- JSON */

static void jstr(loom_buf *b, const char *s)
{
    buf_append(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        if (*p == '"' || *p == '\\') {
            char esc[2] = {'\\', (char)*p};
            buf_append(b, esc, 2);
        } else if (*p < 0x20) {
            buf_printf(b, "\\u%04x", *p);
        } else {
            buf_append(b, p, 1);
        }
    }
    buf_append(b, "\"", 1);
}

/* A finite number, else null (JSON has no inf/nan). */
static void jnum(loom_buf *b, double v)
{
    if (isfinite(v))
        buf_printf(b, "%.9g", v);
    else
        buf_puts(b, "null");
}

static void jlatency(loom_buf *b, const char *name, const bench_latency *l)
{
    buf_printf(b, ",\"mean_%s_ms\":", name);
    jnum(b, l->mean);
    buf_printf(b, ",\"median_%s_ms\":", name);
    jnum(b, l->median);
    buf_printf(b, ",\"std_%s_ms\":", name);
    jnum(b, l->std);
    buf_printf(b, ",\"p50_%s_ms\":", name);
    jnum(b, l->p50);
    buf_printf(b, ",\"p90_%s_ms\":", name);
    jnum(b, l->p90);
    buf_printf(b, ",\"p99_%s_ms\":", name);
    jnum(b, l->p99);
}

/* The scalar fields of one target, vLLM's names (without braces). */
static void jsummary(loom_buf *b, const bench_result *r, int t, const bench_summary *s)
{
    buf_puts(b, "\"label\":");
    jstr(b, r->labels[t]);
    buf_puts(b, ",\"url\":");
    jstr(b, r->urls[t]);
    buf_printf(b, ",\"num_prompts\":%zu,\"completed\":%zu,\"failed\":%zu", s->n_requests,
               s->completed, s->failed);
    buf_puts(b, ",\"duration\":");
    jnum(b, s->duration_s);
    buf_printf(b, ",\"total_input_tokens\":%lld,\"total_output_tokens\":%lld",
               (long long)s->total_input_tokens, (long long)s->total_output_tokens);
    buf_puts(b, ",\"request_throughput\":");
    jnum(b, s->request_throughput);
    buf_puts(b, ",\"request_goodput\":");
    if (s->slo_set)
        jnum(b, s->request_goodput);
    else
        buf_puts(b, "null");
    buf_puts(b, ",\"output_throughput\":");
    jnum(b, s->output_throughput);
    buf_puts(b, ",\"total_token_throughput\":");
    jnum(b, s->total_token_throughput);
    buf_puts(b, ",\"max_output_tokens_per_s\":");
    jnum(b, s->max_output_tokens_per_s);
    buf_printf(b, ",\"max_concurrent_requests\":%d", s->max_concurrent_requests);
    jlatency(b, "ttft", &s->ttft);
    jlatency(b, "tpot", &s->tpot);
    jlatency(b, "itl", &s->itl);
    jlatency(b, "e2el", &s->e2el);
    buf_puts(b, ",\"errors_by_kind\":{");
    bool first = true;
    for (int k = 1; k < BENCH_ERR_COUNT; k++) {
        if (!s->errors[k])
            continue;
        buf_printf(b, "%s\"%s\":%zu", first ? "" : ",", bench_error_name((bench_error)k),
                   s->errors[k]);
        first = false;
    }
    buf_puts(b, "},\"http_statuses\":{");
    for (int j = 0; j < s->n_status; j++)
        buf_printf(b, "%s\"%d\":%zu", j ? "," : "", s->status_codes[j], s->status_counts[j]);
    buf_puts(b, "},\"instances\":{");
    for (int i = 0; i < s->n_instances; i++) {
        if (i)
            buf_puts(b, ",");
        jstr(b, r->instances[i]);
        buf_printf(b, ":%zu", s->instance_counts[i]);
    }
    buf_puts(b, "}");
}

static void jrecord(loom_buf *b, const bench_result *r, const bench_record *rec)
{
    buf_printf(b,
               "{\"target\":%d,\"round\":%d,\"index\":%llu,\"input_len\":%d,\"output_len\":%d,"
               "\"prompt_tokens\":%d,\"output_tokens\":%d,\"usage\":%s,\"scheduled_s\":",
               rec->target, rec->round, (unsigned long long)rec->k, rec->input_len, rec->output_len,
               rec->prompt_tokens, rec->output_tokens, rec->usage_seen ? "true" : "false");
    jnum(b, rec->scheduled_s);
    buf_puts(b, ",\"start_s\":");
    jnum(b, rec->start_s);
    buf_puts(b, ",\"end_s\":");
    jnum(b, rec->end_s);
    bool ok = rec->error == BENCH_OK;
    buf_puts(b, ",\"ttft_s\":");
    if (ok)
        jnum(b, bench_record_ttft(rec));
    else
        buf_puts(b, "null");
    buf_puts(b, ",\"tpot_s\":");
    if (ok)
        jnum(b, bench_record_tpot(rec));
    else
        buf_puts(b, "null");
    buf_puts(b, ",\"e2el_s\":");
    if (ok)
        jnum(b, bench_record_e2el(rec));
    else
        buf_puts(b, "null");
    buf_printf(b, ",\"chunks\":%d,\"itl_s\":[", rec->n_chunks);
    for (int j = 0; j < rec->n_itl; j++)
        buf_printf(b, j ? ",%.6g" : "%.6g", (double)rec->itl[j]);
    buf_printf(b, "],\"http_status\":%d,\"error\":", rec->http_status);
    jstr(b, bench_error_name(rec->error));
    buf_puts(b, ",\"error_msg\":");
    if (rec->error_msg)
        jstr(b, rec->error_msg);
    else
        buf_puts(b, "null");
    buf_puts(b, ",\"instance\":");
    if (rec->instance >= 0 && rec->instance < r->n_instances)
        jstr(b, r->instances[rec->instance]);
    else
        buf_puts(b, "null");
    buf_puts(b, "}");
}

/* Writes out what b holds once it is large (or always, with force): a run of a million
 * requests is written without holding its whole JSON in memory. */
static void spill(FILE *f, loom_buf *b, bool force, bool *failed)
{
    if (!force && b->len < (1u << 20))
        return;
    if (b->len && fwrite(b->data, 1, b->len, f) != b->len)
        *failed = true;
    b->len = 0;
}

int bench_report_json(const char *path, const bench_result *r, const bench_slo *slo, loom_err *e)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return loom_errf(e, LOOM_EIO, "cannot write %s: %s", path, strerror(errno));
    bool failed = false;
    summaries all;
    summaries_make(&all, r, slo);
    loom_buf b;
    buf_init(&b);
    char date[32];
    time_t now = (time_t)(r->started_wall > 0 ? r->started_wall : (double)time(NULL));
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(date, sizeof(date), "%Y%m%d-%H%M%S", &tm);
    buf_puts(&b, "{\"date\":");
    jstr(&b, date);
    buf_puts(&b, ",\"backend\":\"openai\",\"model_id\":");
    jstr(&b, r->model);
    buf_puts(&b, ",\"prompt_kind\":");
    jstr(&b, r->prompt_kind);
    buf_puts(&b, ",\"request_rate\":");
    if (isfinite(r->rate))
        jnum(&b, r->rate);
    else
        buf_puts(&b, "\"inf\"");
    buf_puts(&b, ",\"burstiness\":");
    jnum(&b, r->burstiness);
    buf_puts(&b, ",\"max_concurrency\":");
    if (r->concurrency > 0)
        buf_printf(&b, "%d", r->concurrency);
    else
        buf_puts(&b, "null");
    buf_puts(&b, ",\"time_scale\":");
    if (r->time_scale > 0)
        jnum(&b, r->time_scale);
    else
        buf_puts(&b, "null");
    buf_printf(&b, ",\"interrupted\":%s,\"goodput_slo_ms\":", r->interrupted ? "true" : "false");
    if (all.s[0].slo_set) {
        buf_puts(&b, "{");
        bool first = true;
        const char *names[3] = {"ttft", "tpot", "e2el"};
        double vals[3] = {slo->ttft, slo->tpot, slo->e2el};
        for (int i = 0; i < 3; i++)
            if (vals[i] > 0) {
                buf_printf(&b, "%s\"%s\":", first ? "" : ",", names[i]);
                jnum(&b, vals[i] * 1e3);
                first = false;
            }
        buf_puts(&b, "}");
    } else {
        buf_puts(&b, "null");
    }
    /* the first target's aggregates at top level, as `vllm bench serve` writes them */
    buf_puts(&b, ",");
    jsummary(&b, r, 0, &all.s[0]);
    /* its per-request arrays, in vLLM's shape (failed requests: 0 and []) */
    const char *arrays[] = {"input_lens", "output_lens", "ttfts",  "tpots",
                            "e2els",      "itls",        "errors", "start_times"};
    for (size_t a = 0; a < sizeof(arrays) / sizeof(arrays[0]); a++) {
        buf_printf(&b, ",\"%s\":[", arrays[a]);
        bool first = true;
        for (size_t i = 0; i < r->n_records; i++) {
            const bench_record *rec = &r->records[i];
            if (rec->target != 0)
                continue;
            bool ok = rec->error == BENCH_OK;
            if (!first)
                buf_puts(&b, ",");
            first = false;
            switch (a) {
            case 0:
                buf_printf(&b, "%d", rec->prompt_tokens);
                break;
            case 1:
                buf_printf(&b, "%d", ok ? rec->output_tokens : 0);
                break;
            case 2:
                jnum(&b, ok ? bench_record_ttft(rec) : 0);
                break;
            case 3:
                jnum(&b, ok ? bench_record_tpot(rec) : 0);
                break;
            case 4:
                jnum(&b, ok ? bench_record_e2el(rec) : 0);
                break;
            case 5:
                buf_puts(&b, "[");
                for (int j = 0; ok && j < rec->n_itl; j++)
                    buf_printf(&b, j ? ",%.6g" : "%.6g", (double)rec->itl[j]);
                buf_puts(&b, "]");
                break;
            case 6:
                jstr(&b, ok ? "" : rec->error_msg);
                break;
            default:
                jnum(&b, rec->start_s);
            }
            spill(f, &b, false, &failed);
        }
        buf_puts(&b, "]");
    }
    buf_puts(&b, ",\"targets\":[");
    for (int t = 0; t < all.n; t++) {
        buf_puts(&b, t ? ",{" : "{");
        jsummary(&b, r, t, &all.s[t]);
        if (t > 0) {
            buf_puts(&b, ",\"ratio_to_first\":{");
            const char *keys[] = {"request_throughput", "output_throughput", "mean_ttft_ms",
                                  "p99_ttft_ms",        "mean_tpot_ms",      "p99_tpot_ms",
                                  "mean_e2el_ms",       "p99_e2el_ms"};
            double mine[] = {all.s[t].request_throughput, all.s[t].output_throughput,
                             all.s[t].ttft.mean,          all.s[t].ttft.p99,
                             all.s[t].tpot.mean,          all.s[t].tpot.p99,
                             all.s[t].e2el.mean,          all.s[t].e2el.p99};
            double first[] = {all.s[0].request_throughput, all.s[0].output_throughput,
                              all.s[0].ttft.mean,          all.s[0].ttft.p99,
                              all.s[0].tpot.mean,          all.s[0].tpot.p99,
                              all.s[0].e2el.mean,          all.s[0].e2el.p99};
            for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
                buf_printf(&b, "%s\"%s\":", k ? "," : "", keys[k]);
                jnum(&b, first[k] != 0 ? mine[k] / first[k] : NAN);
            }
            buf_puts(&b, "}");
        }
        buf_puts(&b, "}");
    }
    buf_puts(&b, "],\"requests\":[");
    for (size_t i = 0; i < r->n_records; i++) {
        if (i)
            buf_puts(&b, ",\n");
        jrecord(&b, r, &r->records[i]);
        spill(f, &b, false, &failed);
    }
    buf_puts(&b, "]}\n");
    summaries_free(&all);
    spill(f, &b, true, &failed);
    buf_free(&b);
    if (fclose(f) != 0)
        failed = true;
    if (failed)
        return loom_errf(e, LOOM_EIO, "cannot write %s: %s", path, strerror(errno));
    return 0;
}

/* ---------------------------------------------------------------- plots */

static bool find_in_path(const char *exe)
{
    const char *path = getenv("PATH");
    if (!path)
        return false;
    char *copy = xstrdup(path), *save = NULL;
    bool found = false;
    for (char *dir = strtok_r(copy, ":", &save); dir && !found; dir = strtok_r(NULL, ":", &save)) {
        char *p = loom_path_join(dir, exe);
        found = access(p, X_OK) == 0;
        free(p);
    }
    free(copy);
    return found;
}

/* A label as gnuplot title text: no quotes or backslashes. */
static void plot_title(char *out, size_t cap, const char *label)
{
    size_t j = 0;
    for (const char *p = label; *p && j + 1 < cap; p++)
        out[j++] = (*p == '"' || *p == '\\' || *p == '\'') ? '_' : *p;
    out[j] = '\0';
}

static int write_file(const char *path, const loom_buf *b, loom_err *e)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return loom_errf(e, LOOM_EIO, "cannot write %s: %s", path, strerror(errno));
    size_t n = fwrite(b->data ? b->data : "", 1, b->len, f);
    int c = fclose(f);
    if (n != b->len || c != 0)
        return loom_errf(e, LOOM_EIO, "cannot write %s: %s", path, strerror(errno));
    return 0;
}

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* metric: 0 ttft, 1 tpot, 2 itl, 3 e2el. Sorted values in ms with their CDF. */
static void cdf_data(const bench_result *r, int t, int metric, loom_buf *out)
{
    size_t n = 0, cap = 1024;
    double *v = xmalloc(cap * sizeof(double));
    for (size_t i = 0; i < r->n_records; i++) {
        const bench_record *rec = &r->records[i];
        if (rec->target != t || rec->error != BENCH_OK)
            continue;
        int add = metric == 2 ? rec->n_itl : 1;
        if (metric == 1 && rec->output_tokens <= 1)
            continue;
        while (n + (size_t)add > cap) {
            cap *= 2;
            v = xrealloc(v, cap * sizeof(double));
        }
        if (metric == 0)
            v[n++] = bench_record_ttft(rec) * 1e3;
        else if (metric == 1)
            v[n++] = bench_record_tpot(rec) * 1e3;
        else if (metric == 3)
            v[n++] = bench_record_e2el(rec) * 1e3;
        else
            for (int j = 0; j < rec->n_itl; j++)
                v[n++] = rec->itl[j] * 1e3;
    }
    qsort(v, n, sizeof(double), cmp_dbl);
    /* at most ~2000 points: a CDF needs no more */
    size_t step = n > 2000 ? n / 2000 : 1;
    for (size_t i = 0; i < n; i += step)
        buf_printf(out, "%.6g %.6g\n", v[i], (double)(i + 1) / (double)n);
    if (n && (n - 1) % step)
        buf_printf(out, "%.6g 1\n", v[n - 1]);
    free(v);
}

/* Per second of run time: output tokens/s and completed requests/s, averaged over rounds. */
static void timeline_data(const bench_result *r, int t, loom_buf *out)
{
    double max_t = 0;
    int rounds = 1;
    for (size_t i = 0; i < r->n_records; i++) {
        const bench_record *rec = &r->records[i];
        if (rec->target != t)
            continue;
        if (rec->end_s > max_t)
            max_t = rec->end_s;
        if (rec->round + 1 > rounds)
            rounds = rec->round + 1;
    }
    size_t n_bins = (size_t)max_t + 1;
    if (n_bins > 1000000)
        n_bins = 1000000;
    double *tok = xcalloc(n_bins, sizeof(double)), *req = xcalloc(n_bins, sizeof(double));
    for (size_t i = 0; i < r->n_records; i++) {
        const bench_record *rec = &r->records[i];
        if (rec->target != t || rec->error != BENCH_OK)
            continue;
        size_t eb = (size_t)rec->end_s < n_bins ? (size_t)rec->end_s : n_bins - 1;
        req[eb] += 1;
        if (rec->first_token_s < 0 || rec->n_chunks == 0)
            continue;
        double per = (double)rec->output_tokens / rec->n_chunks, at = rec->first_token_s;
        tok[(size_t)at < n_bins ? (size_t)at : n_bins - 1] += per;
        for (int j = 0; j < rec->n_itl; j++) {
            at += rec->itl[j];
            tok[(size_t)at < n_bins ? (size_t)at : n_bins - 1] += per;
        }
    }
    for (size_t i = 0; i < n_bins; i++)
        buf_printf(out, "%zu %.6g %.6g\n", i, tok[i] / rounds, req[i] / rounds);
    free(tok);
    free(req);
}

int bench_report_plots(const char *dir, const bench_result *r, loom_err *e)
{
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return loom_errf(e, LOOM_EIO, "cannot create %s: %s", dir, strerror(errno));
    static const char *const metrics[] = {"ttft", "tpot", "itl", "e2el"};
    static const char *const titles[] = {"Time to first token", "Time per output token",
                                         "Inter-token latency", "End-to-end latency"};
    int rc = 0;
    loom_buf b, gp;
    buf_init(&b);
    buf_init(&gp);
    char name[64];
    for (int t = 0; t < r->n_targets && rc == 0; t++) {
        for (int m = 0; m < 4 && rc == 0; m++) {
            b.len = 0;
            cdf_data(r, t, m, &b);
            snprintf(name, sizeof(name), "%s_%d.dat", metrics[m], t);
            char *p = loom_path_join(dir, name);
            rc = write_file(p, &b, e);
            free(p);
        }
        b.len = 0;
        timeline_data(r, t, &b);
        snprintf(name, sizeof(name), "throughput_%d.dat", t);
        char *p = loom_path_join(dir, name);
        if (rc == 0)
            rc = write_file(p, &b, e);
        free(p);
    }
    if (rc == 0 && r->n_instances > 0) {
        b.len = 0;
        for (int i = 0; i < r->n_instances; i++) {
            char title[128];
            plot_title(title, sizeof(title), r->instances[i]);
            buf_printf(&b, "\"%s\"", title);
            for (int t = 0; t < r->n_targets; t++) {
                size_t n = 0, done = 0;
                for (size_t j = 0; j < r->n_records; j++) {
                    const bench_record *rec = &r->records[j];
                    if (rec->target != t || rec->error != BENCH_OK)
                        continue;
                    done++;
                    n += rec->instance == i;
                }
                buf_printf(&b, " %.4g", done ? 100.0 * (double)n / (double)done : 0.0);
            }
            buf_puts(&b, "\n");
        }
        char *p = loom_path_join(dir, "instances.dat");
        rc = write_file(p, &b, e);
        free(p);
    }
    if (rc != 0)
        goto done;

    /* the gnuplot script, kept beside the data so plots can be re-made or restyled */
    buf_puts(&gp,
             "set terminal pngcairo size 900,600 noenhanced\nset grid\nset key bottom right\n");
    for (int m = 0; m < 4; m++) {
        buf_printf(&gp,
                   "set output '%s/%s_cdf.png'\nset title '%s (CDF)'\n"
                   "set xlabel '%s (ms)'\nset ylabel 'fraction of %s'\nset logscale x\n"
                   "set yrange [0:1]\nplot ",
                   dir, metrics[m], titles[m], metrics[m], m == 2 ? "gaps" : "requests");
        for (int t = 0; t < r->n_targets; t++) {
            char title[128];
            plot_title(title, sizeof(title), r->labels[t]);
            buf_printf(&gp, "%s'%s/%s_%d.dat' using 1:2 with steps lw 2 title '%s'", t ? ", " : "",
                       dir, metrics[m], t, title);
        }
        buf_puts(&gp, "\nunset logscale x\nset autoscale y\n");
    }
    buf_printf(&gp,
               "set output '%s/throughput.png'\nset title 'Throughput over time'\n"
               "set xlabel 'time since run start (s)'\nset ylabel 'output tokens/s'\n"
               "set y2label 'completed requests/s'\nset y2tics\nset key top right\nplot ",
               dir);
    for (int t = 0; t < r->n_targets; t++) {
        char title[128];
        plot_title(title, sizeof(title), r->labels[t]);
        buf_printf(&gp,
                   "%s'%s/throughput_%d.dat' using 1:2 with steps lw 2 title '%s tok/s', "
                   "'%s/throughput_%d.dat' using 1:3 axes x1y2 with steps dt 2 title '%s req/s'",
                   t ? ", " : "", dir, t, title, dir, t, title);
    }
    buf_puts(&gp, "\nunset y2tics\nunset y2label\n");
    if (r->n_instances > 0) {
        buf_printf(&gp,
                   "set output '%s/instances.png'\nset title 'Share of requests per "
                   "serving instance'\nset xlabel 'instance'\nset ylabel 'share of completed "
                   "requests (%%)'\nset style data histograms\nset style histogram clustered\n"
                   "set style fill solid 0.7\nset yrange [0:100]\nset key top right\nplot ",
                   dir);
        for (int t = 0; t < r->n_targets; t++) {
            char title[128];
            plot_title(title, sizeof(title), r->labels[t]);
            if (t == 0)
                buf_printf(&gp, "'%s/instances.dat' using 2:xtic(1) title '%s'", dir, title);
            else
                buf_printf(&gp, ", '' using %d title '%s'", t + 2, title);
        }
        buf_puts(&gp, "\n");
    }
    char *gp_path = loom_path_join(dir, "plots.gp");
    rc = write_file(gp_path, &gp, e);
    free(gp_path);
    if (rc != 0)
        goto done;
    if (!find_in_path("gnuplot")) {
        rc = loom_errf(e, LOOM_ENOTFOUND,
                       "gnuplot is not installed: wrote the data and %s/"
                       "plots.gp, but no PNGs (install gnuplot, then run 'gnuplot %s/plots.gp')",
                       dir, dir);
        goto done;
    }
    /* gnuplot's warnings (an empty range in a tiny run) are noise here; a real failure shows
     * in its exit status, and 'gnuplot DIR/plots.gp' repeats it with the messages */
    FILE *pipe = popen("gnuplot 2>/dev/null", "w");
    if (!pipe) {
        rc = loom_errf(e, LOOM_EIO, "cannot run gnuplot: %s", strerror(errno));
        goto done;
    }
    fwrite(gp.data, 1, gp.len, pipe);
    int status = pclose(pipe);
    if (status != 0)
        rc = loom_errf(e, LOOM_EIO, "gnuplot failed (status %d) on %s/plots.gp", status, dir);
done:
    buf_free(&b);
    buf_free(&gp);
    return rc;
}
