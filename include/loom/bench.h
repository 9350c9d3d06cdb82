/*
 * bench: `loom bench`, trace-driven load generation against OpenAI-compatible endpoints and the
 * serving metrics computed from it (TTFT, TPOT, ITL, E2E latency, throughput, goodput).
 *
 * Layers, each usable (and tested) without the ones above it:
 *   bench_trace_*     Azure LLM inference CSV and Mooncake JSONL traces (loom/trace.h)
 *   bench_dist_*      request length distributions: fixed, uniform, normal, a trace's histogram
 *   bench_workload_*  the k-th request of a workload (lengths, shared-prefix block ids)
 *   bench_arrival_*   arrival processes: trace timestamps, Poisson, gamma, all-at-once
 *   bench_prompter_*  prompts of an exact token count (token ids, or text for a tokenizer)
 *   bench_stats_*     percentiles, per-target summaries, goodput (pure arithmetic)
 *   bench_run         the load generator: a libevent HTTP/1.1 client streaming SSE
 *   bench_report_*    summary table, result JSON (vLLM's field names), markdown, gnuplot plots
 *
 * Times in records are seconds since the start of the run they belong to; summaries are in
 * milliseconds where vLLM reports milliseconds.
 */
#ifndef LOOM_BENCH_H
#define LOOM_BENCH_H

#include "loom/base.h"
#include "loom/tokenizer.h"
#include "loom/trace.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---------------------------------------------------------------- traces */

/* bench's names for the shared trace parsers (loom/trace.h); messages say "line N: ...". */
#define BENCH_BLOCK_TOKENS TRACE_BLOCK_TOKENS
#define BENCH_TRACE_AZURE TRACE_AZURE
#define BENCH_TRACE_MOONCAKE TRACE_MOONCAKE
typedef loom_trace_format bench_trace_format;
typedef loom_trace_entry bench_trace_entry;
typedef loom_trace bench_trace;

/*
 * Parse a whole trace (formats in loom/trace.h). Blank lines are skipped; any other malformed
 * line, and a trace without requests, is LOOM_EFORMAT with "line N: ..." in the message. Pure
 * over bytes (the fuzz target calls these).
 */
int bench_trace_parse_azure(const char *text, size_t len, bench_trace *out, loom_err *e);
int bench_trace_parse_mooncake(const char *text, size_t len, bench_trace *out, loom_err *e);
/* Format from the content: a line starting with '{' is Mooncake, anything else Azure. */
int bench_trace_parse(const char *text, size_t len, bench_trace *out, loom_err *e);
/* Format from the extension, else the content; messages start "PATH: line N: ". */
int bench_trace_load(const char *path, bench_trace *out, loom_err *e);
void bench_trace_free(bench_trace *t);

/* ---------------------------------------------------------------- length distributions */

typedef enum {
    BENCH_DIST_FIXED,    /* a */
    BENCH_DIST_UNIFORM,  /* integers in [a, b] */
    BENCH_DIST_NORMAL,   /* mean a, standard deviation b, rounded */
    BENCH_DIST_EMPIRICAL /* one of values[], uniformly: a trace's histogram */
} bench_dist_kind;

typedef struct bench_dist {
    bench_dist_kind kind;
    double a, b;
    int *values; /* (n_values) EMPIRICAL only, owned */
    size_t n_values;
} bench_dist;

/*
 * "128", "uniform:64-512", "normal:256,64", or "trace:FILE" (the input or output lengths of
 * FILE, by the side asked for). Samples are clamped to [1, 1e7].
 */
int bench_dist_parse(const char *spec, bool input_side, bench_dist *out, loom_err *e);
int bench_dist_sample(const bench_dist *d, loom_rng *r);
void bench_dist_free(bench_dist *d);

/* ---------------------------------------------------------------- workloads */

/* One request of a workload. */
typedef struct bench_item {
    uint64_t k;         /* its index in the workload */
    double timestamp_s; /* trace time (0 for synthetic) */
    int input_len, output_len;
    const int64_t *hash_ids; /* shared-prefix blocks (Mooncake), or NULL */
    int n_hash_ids;
} bench_item;

typedef struct bench_workload {
    const bench_trace *trace; /* NULL: synthetic lengths from input/output */
    bench_dist input, output; /* used when trace is NULL */
    uint64_t seed;
} bench_workload;

/* Requests a workload has before it repeats (the trace's length); 0 = unbounded (synthetic). */
uint64_t bench_workload_size(const bench_workload *w);
/* The k-th request: deterministic in (w, k). A trace is replayed cyclically past its end. */
void bench_workload_item(const bench_workload *w, uint64_t k, bench_item *out);

/* ---------------------------------------------------------------- arrival processes */

typedef enum {
    BENCH_ARRIVAL_TRACE,  /* the trace's timestamps times time_scale */
    BENCH_ARRIVAL_GAMMA,  /* gamma inter-arrival gaps: burstiness 1 is a Poisson process */
    BENCH_ARRIVAL_AT_ONCE /* every request at time 0 (batch, closed loop, rate = inf) */
} bench_arrival_kind;

typedef struct bench_arrival {
    bench_arrival_kind kind;
    double rate;       /* requests per second (GAMMA) */
    double burstiness; /* gamma shape (GAMMA): the squared coefficient of variation of the gaps
                          is 1 / burstiness */
    double time_scale; /* TRACE: arrival = timestamp * time_scale (0.5 replays twice as fast) */
    loom_rng rng;
    double next; /* GAMMA: time of the next arrival */
} bench_arrival;

void bench_arrival_init(bench_arrival *a, bench_arrival_kind kind, double rate, double burstiness,
                        double time_scale, uint64_t seed);
/* Arrival time (seconds from the run's start) of the next request, which is item. */
double bench_arrival_next(bench_arrival *a, const bench_item *item);
/* A gamma(shape, scale) variate (Marsaglia-Tsang); shape > 0, scale > 0. */
double bench_gamma_sample(loom_rng *r, double shape, double scale);

/* ---------------------------------------------------------------- prompts */

typedef struct bench_prompter bench_prompter;

/* A prompt as it goes into a completions request: token ids or text. */
typedef struct bench_prompt {
    int32_t *ids; /* (n_ids) token-id prompts, else NULL */
    int n_ids;
    char *text; /* text prompts, else NULL; ASCII letters and spaces only */
    size_t text_len;
    int expected_tokens; /* what the server should count, special tokens included */
} bench_prompt;

/* Token-id prompts: ids drawn from [id_lo, id_hi). Exact for any server that accepts ids. */
bench_prompter *bench_prompter_ids(int32_t id_lo, int32_t id_hi);
/*
 * Text prompts for a tokenizer: words are the tokenizer's own single-token " word" pieces
 * (ASCII letters after one space), so a prompt of n words is n tokens plus the special tokens
 * the tokenizer adds (n_special). LOOM_EUNSUPPORTED when the tokenizer has too few such words.
 */
int bench_prompter_from_tokenizer(const tokenizer *tok, bench_prompter **out, loom_err *e);
/*
 * Text prompts from words already known to be one token each (" word" with its leading
 * space), for a server measured through its /tokenize endpoint; n_special is what the server
 * adds to every prompt (a BOS).
 */
int bench_prompter_from_words(const char *const *words, int n_words, int n_special,
                              bench_prompter **out, loom_err *e);
/* Overrides what the server adds around every prompt (the chat template's tokens, for
 * /v1/chat/completions). */
void bench_prompter_set_special(bench_prompter *p, int n_special);
/*
 * The tokens a chat template adds around one user message's content, for tok's own template
 * (rendered with add_generation_prompt, encoded without special tokens, as servers do).
 * LOOM_ENOTFOUND without a template; LOOM_EUNSUPPORTED when the count depends on the content.
 */
int bench_chat_overhead(const bench_prompter *p, const tokenizer *tok, int *n_special, loom_err *e);
void bench_prompter_free(bench_prompter *p);
bool bench_prompter_is_text(const bench_prompter *p);
int bench_prompter_n_special(const bench_prompter *p);

/*
 * The prompt of item: exactly item->input_len tokens as the server counts them (at least
 * n_special + 1). Blocks of BENCH_BLOCK_TOKENS named by item->hash_ids are generated from
 * (seed, hash id) alone, so requests that share leading hash ids share those leading tokens;
 * the rest comes from (seed, salt), salt telling requests apart.
 */
void bench_prompt_build(const bench_prompter *p, const bench_item *item, uint64_t seed,
                        uint64_t salt, bench_prompt *out);
void bench_prompt_free(bench_prompt *pr);
/* The prompt as a JSON value: [1,2,...] or "text". */
void bench_prompt_json(const bench_prompt *pr, loom_buf *out);

/* Common English words for calibrating text prompts through a server's /tokenize. */
extern const char *const bench_candidate_words[];
extern const int bench_n_candidate_words;

/* ---------------------------------------------------------------- records and statistics */

typedef enum {
    BENCH_OK = 0,
    BENCH_ERR_CONNECT,   /* could not connect, or the connection closed before a response */
    BENCH_ERR_HTTP,      /* a response status other than 200 */
    BENCH_ERR_TIMEOUT,   /* the per-request time limit passed */
    BENCH_ERR_MALFORMED, /* a stream that is cut short, unparsable, or has no tokens */
    BENCH_ERR_STREAM,    /* the server reported an error inside the stream */
    BENCH_ERR_CANCELLED, /* the run was interrupted */
    BENCH_ERR_COUNT
} bench_error;

const char *bench_error_name(bench_error e); /* "connect", "http", ... */

/* One request as measured. */
typedef struct bench_record {
    int target, round;
    uint64_t k;                /* workload index */
    int input_len, output_len; /* requested */
    int prompt_tokens;         /* server's count (usage), else the prompt's expected count */
    int output_tokens;         /* server's count (usage), else content chunks */
    bool usage_seen;
    double scheduled_s;   /* arrival time in the schedule */
    double start_s;       /* request written */
    double first_token_s; /* first content chunk; < 0 if none */
    double end_s;         /* response complete or failed */
    float *itl;           /* (n_itl) gaps between content chunks, seconds */
    int n_itl, cap_itl;
    int n_chunks;    /* content chunks */
    int http_status; /* 0 if none */
    bench_error error;
    char *error_msg; /* NULL if ok */
    int instance;    /* index into bench_result.instances, -1 if no header */
} bench_record;

/* Latency statistics in milliseconds (numpy's mean, median, std, linear percentiles). */
typedef struct bench_latency {
    double mean, median, std, p50, p90, p99, min, max;
    size_t n;
} bench_latency;

/* Linear-interpolation percentile (numpy's default) of sorted[0..n); 0 when n == 0. */
double bench_percentile(const double *sorted, size_t n, double pct);
/* Fills s from unsorted values (values are sorted in place). */
void bench_latency_compute(double *values, size_t n, double scale, bench_latency *s);

/* Service-level objectives, in seconds; 0 = not checked. */
typedef struct bench_slo {
    double ttft, tpot, e2el;
} bench_slo;

/* "ttft=2s,tpot=200ms,e2el=10s" (units s, ms, us; bare numbers are milliseconds, as in vLLM). */
int bench_slo_parse(const char *spec, bench_slo *out, loom_err *e);

/* TTFT, TPOT and E2E of a successful record, in seconds. TPOT excludes the first token:
 * (e2e - ttft) / (output_tokens - 1), 0 for a single token. */
double bench_record_ttft(const bench_record *r);
double bench_record_tpot(const bench_record *r);
double bench_record_e2el(const bench_record *r);
/* A successful record within every objective of slo. */
bool bench_record_good(const bench_record *r, const bench_slo *slo);

#define BENCH_MAX_STATUS 8

/* Aggregates over one target's records (all its rounds). */
typedef struct bench_summary {
    size_t n_requests, completed, failed;
    size_t errors[BENCH_ERR_COUNT];
    int status_codes[BENCH_MAX_STATUS]; /* distinct non-200 statuses seen */
    size_t status_counts[BENCH_MAX_STATUS];
    int n_status;
    int64_t total_input_tokens, total_output_tokens;
    double duration_s;             /* summed makespans of the target's runs */
    double request_throughput;     /* completed / duration */
    double output_throughput;      /* output tokens / duration */
    double total_token_throughput; /* (input + output tokens) / duration */
    double request_goodput;        /* requests within the SLO / duration */
    size_t good;
    bool slo_set;
    double max_output_tokens_per_s; /* best one-second window */
    int max_concurrent_requests;
    bench_latency ttft, tpot, itl, e2el; /* ms */
    size_t *instance_counts;             /* (n_instances) completed requests per instance */
    int n_instances;
} bench_summary;

/* ---------------------------------------------------------------- running */

typedef enum {
    BENCH_INTERLEAVE_RUNS,    /* targets take turns, one whole run each, round after round */
    BENCH_INTERLEAVE_REQUESTS /* one run per round; every request goes to every target */
} bench_interleave;

typedef enum {
    BENCH_PROMPTS_AUTO,      /* --tokenizer if given, else the server's /tokenize, else ids */
    BENCH_PROMPTS_TOKENIZE,  /* the server's /tokenize (an error if it has none) */
    BENCH_PROMPTS_TOKENIZER, /* the local tokenizer */
    BENCH_PROMPTS_IDS        /* token-id prompts */
} bench_prompt_mode;

#define BENCH_MAX_TARGETS 16

typedef struct bench_config {
    const char *urls[BENCH_MAX_TARGETS];   /* http://host:port[/path] */
    const char *labels[BENCH_MAX_TARGETS]; /* NULL: host:port */
    int n_targets;
    const char *endpoint;        /* NULL: the URL's path if any, else /v1/completions */
    const char *model;           /* NULL: the first model of GET /v1/models */
    const char *api_key;         /* NULL: none */
    const char *instance_header; /* "x-loom-instance" */

    bench_workload workload;
    bench_arrival_kind arrival;
    double rate, burstiness, time_scale;
    int concurrency;       /* 0: unlimited; with AT_ONCE arrivals this is a closed loop */
    uint64_t max_requests; /* per run; 0: the trace's length, or unbounded with duration */
    double duration_s;     /* 0: none; no new requests after it */
    int warmup;            /* unmeasured requests before each target's first run */
    double timeout_s;      /* per request */

    bench_prompt_mode prompt_mode;
    const tokenizer *tok; /* BENCH_PROMPTS_TOKENIZER */
    int32_t id_lo, id_hi; /* token-id prompts */
    bool min_tokens;      /* send min_tokens = max_tokens as well as ignore_eos */
    bool no_stream;       /* "stream": false: one JSON body per request, no per-token chunks
                             (TTFT and ITL are not measured; throughput and E2E latency are) */

    int rounds;
    bench_interleave interleave;
    bool progress;       /* live progress line on stderr */
    bool handle_signals; /* SIGINT stops the run; the report is still made */
} bench_config;

void bench_config_default(bench_config *c);

/* The outcome of a whole benchmark: every record of every target and round. */
typedef struct bench_result {
    bench_record *records; /* (n_records) */
    size_t n_records, cap_records;
    char **instances; /* (n_instances) serving-instance names seen */
    int n_instances;
    int n_targets;
    char *labels[BENCH_MAX_TARGETS];
    char *urls[BENCH_MAX_TARGETS];
    char *model;                          /* the model name sent ("" if none) */
    char *prompt_kind;                    /* "token ids", "text (tokenizer)", "text (/tokenize)" */
    double duration_s[BENCH_MAX_TARGETS]; /* summed makespans per target */
    int max_concurrent[BENCH_MAX_TARGETS];
    double started_wall; /* unix time of the first run */
    bool interrupted;
    /* what was asked, for the report */
    double rate, burstiness, time_scale;
    int concurrency;
    bench_slo slo;
} bench_result;

/*
 * Runs the benchmark. Failures of requests are recorded, not returned: the return value is
 * an error only when nothing could be measured (a bad URL, an impossible configuration).
 */
int bench_run(const bench_config *cfg, bench_result **out, loom_err *e);
void bench_result_free(bench_result *r);

/* Summary of target t (free with bench_summary_free). */
void bench_summarize(const bench_result *r, int target, const bench_slo *slo, bench_summary *s);
void bench_summary_free(bench_summary *s);
/* Whether every request of every target completed (and the run was not interrupted). */
bool bench_result_ok(const bench_result *r);

/* ---------------------------------------------------------------- reports */

/* The summary table (one column per target, ratios to the first). */
void bench_report_print(FILE *f, const bench_result *r, const bench_slo *slo);
/* The same as a markdown table. */
void bench_report_markdown(loom_buf *out, const bench_result *r, const bench_slo *slo);
/* vLLM-style result JSON: the first target's fields at top level, "targets" with every
 * target's aggregates, "requests" with every record. */
int bench_report_json(const char *path, const bench_result *r, const bench_slo *slo, loom_err *e);
/* PNGs through gnuplot: latency CDFs, throughput over time, per-instance shares.
 * LOOM_ENOTFOUND (and nothing written but the data files) when gnuplot is absent. */
int bench_report_plots(const char *dir, const bench_result *r, loom_err *e);

#endif
