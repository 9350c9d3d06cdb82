/*
 * A reader of the Prometheus text exposition format (0.0.4), for the /metrics pages the gateway
 * scrapes from its upstreams. Lenient and bounded: a line that does not parse is skipped, never
 * fatal, and no line longer than 64 KiB is looked at. Understands vLLM's, SGLang's and
 * llama.cpp server's names for the few gauges routing uses, and loom's own KV size.
 */
#include "loom/gateway.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define PROM_MAX_LINE (64 * 1024)
#define PROM_MAX_LABELS 16

static bool name_start(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
}

static bool name_char(char c)
{
    return name_start(c) || (c >= '0' && c <= '9');
}

static char *skip_blank(char *p)
{
    while (*p == ' ' || *p == '\t')
        p++;
    return p;
}

/* Parses one line in place (it is a NUL-terminated scratch copy). Returns false if malformed. */
static bool parse_line(char *p, gateway_prom_sample *s)
{
    memset(s, 0, sizeof(*s));
    p = skip_blank(p);
    if (!name_start(*p))
        return false;
    s->name = p;
    while (name_char(*p))
        p++;
    char *name_end = p;
    p = skip_blank(p);
    if (*p == '{') {
        *name_end = 0;
        p++;
        for (;;) {
            p = skip_blank(p);
            if (*p == '}') {
                p++;
                break;
            }
            if (!name_start(*p))
                return false;
            char *ln = p;
            while (name_char(*p))
                p++;
            char *ln_end = p;
            p = skip_blank(p);
            if (*p != '=')
                return false;
            *ln_end = 0;
            p = skip_blank(p + 1);
            if (*p != '"')
                return false;
            p++;
            char *val = p, *w = p; /* unescape in place */
            while (*p && *p != '"') {
                if (*p == '\\') {
                    p++;
                    if (*p == 'n')
                        *w++ = '\n';
                    else if (*p == '\\' || *p == '"')
                        *w++ = *p;
                    else
                        return false;
                    p++;
                } else {
                    *w++ = *p++;
                }
            }
            if (*p != '"')
                return false;
            p++;
            *w = 0;
            if (s->n_labels < PROM_MAX_LABELS) {
                s->label_names[s->n_labels] = ln;
                s->label_values[s->n_labels] = val;
                s->n_labels++;
            }
            p = skip_blank(p);
            if (*p == ',')
                p++;
            else if (*p != '}')
                return false;
        }
        p = skip_blank(p);
    } else {
        if (p == name_end)
            return false; /* the value must be separated from the name */
        *name_end = 0;
    }
    if (!*p)
        return false;
    char *end = NULL;
    double v = strtod(p, &end);
    if (end == p)
        return false;
    end = skip_blank(end);
    /* an optional integer timestamp, then nothing */
    if (*end) {
        char *tend = NULL;
        (void)strtoll(end, &tend, 10);
        if (tend == end || *skip_blank(tend))
            return false;
    }
    s->value = v;
    return true;
}

int gateway_prom_parse(const char *text, size_t len,
                       void (*fn)(void *ctx, const gateway_prom_sample *s), void *ctx)
{
    if (!text)
        return 0;
    char *scratch = NULL;
    size_t scratch_cap = 0;
    int count = 0;
    size_t off = 0;
    while (off < len) {
        const char *line = text + off;
        const char *nl = memchr(line, '\n', len - off);
        size_t n = nl ? (size_t)(nl - line) : len - off;
        off += n + (nl ? 1 : 0);
        if (n > 0 && line[n - 1] == '\r')
            n--;
        if (n == 0 || n > PROM_MAX_LINE || line[0] == '#')
            continue;
        if (memchr(line, 0, n))
            continue; /* embedded NUL: not text */
        if (n + 1 > scratch_cap) {
            scratch_cap = n + 1 > 256 ? n + 1 : 256;
            scratch = xrealloc(scratch, scratch_cap);
        }
        memcpy(scratch, line, n);
        scratch[n] = 0;
        gateway_prom_sample s;
        if (!parse_line(scratch, &s))
            continue;
        count++;
        if (fn)
            fn(ctx, &s);
    }
    free(scratch);
    return count;
}

/* ---------------------------------------------------------------- the gauges routing uses */

typedef struct scrape_acc {
    gateway_scrape *out;
    double running, waiting, usage_sum, blocks, cfg_blocks, block_size;
    int n_running, n_waiting, n_usage, n_blocks;
} scrape_acc;

static const char *label(const gateway_prom_sample *s, const char *name)
{
    for (int i = 0; i < s->n_labels; i++)
        if (!strcmp(s->label_names[i], name))
            return s->label_values[i];
    return NULL;
}

static double label_number(const gateway_prom_sample *s, const char *name)
{
    const char *v = label(s, name);
    if (!v || !*v)
        return -1;
    char *end = NULL;
    double d = strtod(v, &end);
    return *end || !isfinite(d) || d < 0 ? -1 : d;
}

static void on_sample(void *ctx, const gateway_prom_sample *s)
{
    scrape_acc *a = ctx;
    double v = s->value;
    if (!isfinite(v) || v < 0)
        return;
    const char *n = s->name;
    if (!strcmp(n, "vllm:num_requests_running") || !strcmp(n, "sglang:num_running_reqs") ||
        !strcmp(n, "llamacpp:requests_processing")) {
        a->running += v;
        a->n_running++;
    } else if (!strcmp(n, "vllm:num_requests_waiting") || !strcmp(n, "sglang:num_queue_reqs") ||
               !strcmp(n, "llamacpp:requests_deferred")) {
        a->waiting += v;
        a->n_waiting++;
    } else if (!strcmp(n, "vllm:kv_cache_usage_perc") || !strcmp(n, "vllm:gpu_cache_usage_perc") ||
               !strcmp(n, "sglang:token_usage") || !strcmp(n, "llamacpp:kv_cache_usage_ratio")) {
        a->usage_sum += v > 1 ? 1 : v;
        a->n_usage++;
    } else if (!strcmp(n, "loom:num_kv_blocks")) {
        a->blocks += v;
        a->n_blocks++;
    } else if (!strcmp(n, "vllm:cache_config_info")) {
        double bs = label_number(s, "block_size");
        double nb = label_number(s, "num_gpu_blocks");
        if (bs > 0)
            a->block_size = bs;
        if (nb > 0)
            a->cfg_blocks = nb;
    }
}

void gateway_scrape_parse(const char *text, size_t len, gateway_scrape *out)
{
    scrape_acc a;
    memset(&a, 0, sizeof(a));
    a.out = out;
    a.block_size = -1;
    a.cfg_blocks = -1;
    out->samples = gateway_prom_parse(text, len, on_sample, &a);
    out->num_running = a.n_running ? a.running : -1;
    out->num_waiting = a.n_waiting ? a.waiting : -1;
    out->kv_usage = a.n_usage ? a.usage_sum / a.n_usage : -1;
    out->num_kv_blocks = a.n_blocks ? a.blocks : a.cfg_blocks;
    out->block_size = a.block_size;
}

double gateway_scrape_kv_tokens(const gateway_scrape *s, int default_block_size)
{
    if (!(s->num_kv_blocks > 0))
        return -1;
    double bs = s->block_size > 0 ? s->block_size : default_block_size;
    return bs > 0 ? s->num_kv_blocks * bs : -1;
}
