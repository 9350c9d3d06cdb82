/*
 * `loom profile`: time a small grid of batches on an instance and fit the latency model's
 * coefficients (docs/planner.md), or measure the host for the catalog's `cpu` entry.
 *
 *   --model SPEC --backend cpu [--threads N]   drives the engine in process: engine_step wall
 *                                              time per batch shape (no HTTP in the way)
 *   --url URL --model SPEC [--device D --tp N] offline batches against a live OpenAI-compatible
 *                                              server: prefill from TTFT, decode from the
 *                                              inter-token gaps while the whole batch decodes
 *   --host                                     cores, memory bandwidth, F32 GEMM rate
 *
 * Wiring only: the grid, the terms and the fit are perf's (perf_profile_grid, perf_profile_fit),
 * the HTTP client is bench's, the engine is the engine's.
 */
#include "cli.h"

#include "loom/bench.h"
#include "loom/engine.h"
#include "loom/model.h"
#include "loom/perf.h"
#include "loom/tensor.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#define PROFILE_MAX_STEPS 256

typedef struct profile_opts {
    const char *url, *model, *backend, *device, *catalog, *out, *name, *api_key, *refit;
    bool host, any_model, quiet, progress;
    long long threads, tp, max_prompt, max_batch, max_context, max_tokens, repeat, seed;
} profile_opts;

enum {
    OPT_URL = 256,
    OPT_MODEL,
    OPT_BACKEND,
    OPT_THREADS,
    OPT_HOST,
    OPT_DEVICE,
    OPT_TP,
    OPT_CATALOG,
    OPT_OUT,
    OPT_NAME,
    OPT_ANY_MODEL,
    OPT_MAX_PROMPT,
    OPT_MAX_BATCH,
    OPT_MAX_CONTEXT,
    OPT_MAX_TOKENS,
    OPT_REPEAT,
    OPT_SEED,
    OPT_API_KEY,
    OPT_NO_PROGRESS,
    OPT_QUIET,
    OPT_REFIT,
};

static const struct option long_opts[] = {
    {"url", required_argument, NULL, OPT_URL},
    {"model", required_argument, NULL, OPT_MODEL},
    {"backend", required_argument, NULL, OPT_BACKEND},
    {"threads", required_argument, NULL, OPT_THREADS},
    {"host", no_argument, NULL, OPT_HOST},
    {"device", required_argument, NULL, OPT_DEVICE},
    {"tp", required_argument, NULL, OPT_TP},
    {"catalog", required_argument, NULL, OPT_CATALOG},
    {"out", required_argument, NULL, OPT_OUT},
    {"model-name", required_argument, NULL, OPT_NAME},
    {"any-model", no_argument, NULL, OPT_ANY_MODEL},
    {"max-prompt", required_argument, NULL, OPT_MAX_PROMPT},
    {"max-batch", required_argument, NULL, OPT_MAX_BATCH},
    {"max-context", required_argument, NULL, OPT_MAX_CONTEXT},
    {"max-num-batched-tokens", required_argument, NULL, OPT_MAX_TOKENS},
    {"repeat", required_argument, NULL, OPT_REPEAT},
    {"seed", required_argument, NULL, OPT_SEED},
    {"api-key", required_argument, NULL, OPT_API_KEY},
    {"no-progress", no_argument, NULL, OPT_NO_PROGRESS},
    {"quiet", no_argument, NULL, OPT_QUIET},
    {"refit", required_argument, NULL, OPT_REFIT},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* clang-format off */
static const char profile_help_text[] =
"usage: loom profile --model SPEC --backend cpu [--threads N] [options]\n"
"       loom profile --url URL --model SPEC [--device NAME --tp N] [options]\n"
"       loom profile --host [--out FILE]\n"
"       loom profile --refit PROFILE --model SPEC [--out FILE]\n"
"\n"
"Times a small grid of batches (a few dozen: prompt steps of 1, 2 and 4 prompts of 64 tokens\n"
"up to --max-prompt; decode steps of 1, 4, 16, ... --max-batch sequences at --max-context\n"
"cached tokens and its quarters down to 8) on one instance, fits the latency model's\n"
"coefficients by least squares and writes them, with the fit's error, as a profile for\n"
"`loom plan --profiles DIR`.\n"
"See docs/planner.md.\n"
"\n"
"where the batches run:\n"
"  --model SPEC                 the model: a Hugging Face directory, a config.json (with --url)\n"
"                               or random:<preset> (llama-125m, llama-1b, mixtral-tiny, ...)\n"
"  --backend cpu                run loom's engine in this process on the CPU backend and time\n"
"                               each engine step (scheduling, forward and sampling)\n"
"  --threads N                  CPU threads of the forward pass; the profile's tp (default:\n"
"                               online CPUs)\n"
"  --url URL                    or: a live OpenAI-compatible server (loom serve, vLLM, ...);\n"
"                               prompt steps are timed by the time to first token of offline\n"
"                               batches, decode steps by the median gap between tokens while\n"
"                               the whole batch decodes. Prompts are token ids.\n"
"  --api-key KEY                'Authorization: Bearer KEY' for --url (default $LOOM_API_KEY)\n"
"  --host                       or: measure this host (cores, memory bandwidth with one core\n"
"                               and with all, F32 GEMM rate) and write a device catalog with a\n"
"                               `cpu` entry from it (to use with --catalog, or to paste into\n"
"                               data/devices.yaml); stdout unless --out\n"
"  --refit PROFILE              or: fit the timed steps a profile keeps (its steps: list) again,\n"
"                               with this build's model, without measuring anything; the device\n"
"                               and tp are the profile's (written to --out, default stdout)\n"
"\n"
"what the profile describes:\n"
"  --device NAME                catalog device of the instance (default cpu)\n"
"  --tp N                       its tensor-parallel degree (--url; default 1; with --backend\n"
"                               cpu it is --threads)\n"
"  --catalog FILE               device catalog (default data/devices.yaml; $LOOM_CATALOG)\n"
"  --model-name NAME            model name written in the profile (default: the preset, or the\n"
"                               directory's base name); the planner prefers a profile naming\n"
"                               its model over one for any model\n"
"  --any-model                  write no model name (the profile applies to any model)\n"
"\n"
"grid (keep it inside what the instance holds):\n"
"  --max-prompt N               longest prompt of the prompt steps (1024; at most\n"
"                               --max-num-batched-tokens)\n"
"  --max-batch N                largest decode batch (64; 256 with --url)\n"
"  --max-context N              longest cached context of the decode steps (1024)\n"
"  --max-num-batched-tokens N   the instance's token budget per step (2048)\n"
"  --repeat N                   times each cell is measured; the median counts (3)\n"
"  --seed N                     seed of the random prompts and random weights (0)\n"
"\n"
"output:\n"
"  --out FILE                   the profile (default profile-DEVICE-tpN[-MODEL].yaml)\n"
"  --no-progress                no progress bar (shown only when stderr is a terminal)\n"
"  --quiet                      no table of samples\n"
"  -h, --help                   this text\n"
"\n"
"exit status: 0 written, 1 a run or the file failed, 2 bad flags or inputs.\n"
"\n"
"examples:\n"
"  loom profile --model random:llama-125m --backend cpu --threads 2 --out profiles/cpu-tp2.yaml\n"
"  loom profile --url http://127.0.0.1:8000 --model ~/models/Llama-3-8B --device H100-80G \\\n"
"               --tp 2 --out profiles/h100-tp2.yaml\n"
"  loom profile --host --out host.yaml && loom plan --catalog host.yaml ...\n";
/* clang-format on */

/* ---------------------------------------------------------------- progress */

typedef struct progress {
    bool on;
    int done, total;
} progress;

static void progress_show(progress *p, const char *what)
{
    if (!p->on)
        return;
    int width = 30, fill = p->total > 0 ? p->done * width / p->total : 0;
    char bar[64];
    for (int i = 0; i < width; i++)
        bar[i] = i < fill ? '#' : '.';
    bar[width] = 0;
    fprintf(stderr, "\r  [%s] %3d/%-3d %-36s", bar, p->done, p->total, what);
    fflush(stderr);
}

static void progress_end(progress *p)
{
    if (p->on)
        fprintf(stderr, "\r%*s\r", 80, "");
}

/* The fit error of the model without its decode-attention and per-token terms (decode
 * attention counted at the decode tokens' efficiency, no host cost per token): what the step
 * times would be fitted to before those terms existed, reported beside the full fit. */
static double roofline_only_error(const perf_model *pm, const perf_device *dev, int tp,
                                  const perf_timed_step *steps, int n)
{
    perf_sample *smp = xmalloc(sizeof(*smp) * (size_t)n);
    for (int i = 0; i < n; i++) {
        perf_step_terms(pm, dev, tp, &steps[i].step, &smp[i].terms);
        smp[i].terms.t_compute_decode += smp[i].terms.t_attention;
        smp[i].terms.t_attention = 0;
        smp[i].terms.sampled = 0;
        smp[i].seconds = steps[i].seconds;
    }
    perf_coef prior = dev->coef, got;
    double err = NAN;
    loom_err e;
    if (perf_fit(smp, n, &prior, &got, &err, &e))
        err = NAN;
    free(smp);
    return err;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* The grid split into its prompt cells (len, seqs) and decode cells (batch, ctx per seq). */
typedef struct grid_cell {
    int kind;
    int a, b; /* prefill: len, seqs; decode: batch, ctx per sequence */
} grid_cell;

static int make_grid(const profile_opts *o, grid_cell *cells, int cap)
{
    perf_step steps[PROFILE_MAX_STEPS];
    int n = perf_profile_grid((int)o->max_prompt, (int)o->max_tokens, (int)o->max_batch,
                              (int)o->max_context, steps, PROFILE_MAX_STEPS);
    if (n > PROFILE_MAX_STEPS)
        n = PROFILE_MAX_STEPS;
    int m = 0;
    for (int i = 0; i < n && m < cap; i++) {
        if (steps[i].prefill_tokens > 0) {
            int seqs = (int)steps[i].prefill_seqs;
            cells[m++] =
                (grid_cell){PERF_STEP_PREFILL, (int)(steps[i].prefill_tokens / seqs), seqs};
        } else {
            int b = (int)steps[i].decode_seqs;
            cells[m++] = (grid_cell){PERF_STEP_DECODE, b, (int)(steps[i].decode_ctx / b)};
        }
    }
    return m;
}

/* ---------------------------------------------------------------- in process: the engine */

typedef struct engine_run {
    engine *en;
    const model_config *mc;
    loom_rng rng;
    uint64_t next_id;
    int32_t *prompt; /* scratch, (max_context) */
} engine_run;

static int add_requests(engine_run *r, int n, int len, int max_tokens, uint64_t *ids, loom_err *e)
{
    sampling_params sp;
    sampling_params_default(&sp);
    sp.max_tokens = max_tokens;
    sp.ignore_eos = true;
    sp.temperature = 0;
    for (int i = 0; i < n; i++) {
        for (int t = 0; t < len; t++) /* distinct random prompts: no prefix cache hits */
            r->prompt[t] = 16 + (int32_t)(rng_next(&r->rng) % (uint64_t)(r->mc->vocab_size - 16));
        uint64_t id = r->next_id++;
        int rc = engine_add(r->en, id, r->prompt, len, &sp, e);
        if (rc)
            return rc;
        if (ids)
            ids[i] = id;
    }
    return LOOM_OK;
}

/* One engine_step, timed by the wall clock around it (what a serving loop's period is). */
static int timed_step(engine_run *r, double *seconds, int *n_tokens, int *n_first,
                      const engine_event **evs_out, loom_err *e)
{
    const engine_event *evs;
    int n;
    double fwd, t0 = loom_now();
    int rc = engine_step(r->en, &evs, &n, &fwd, e);
    *seconds = loom_now() - t0;
    *n_tokens = *n_first = 0;
    for (int i = 0; i < n; i++) {
        if (evs[i].token >= 0)
            (*n_tokens)++;
        if (evs[i].first_token)
            (*n_first)++;
        if (evs[i].finish == FINISH_ERROR)
            return loom_errf(e, LOOM_EINVAL, "a profiling request failed in the backend");
    }
    if (evs_out)
        *evs_out = evs;
    return rc;
}

static int drain(engine_run *r, loom_err *e)
{
    while (engine_has_work(r->en)) {
        double s;
        int a, b;
        int rc = timed_step(r, &s, &a, &b, NULL, e);
        if (rc)
            return rc;
    }
    return LOOM_OK;
}

/* A prompt step: seqs prompts of len tokens in one step (len * seqs <= the token budget). */
static int engine_prefill_cell(engine_run *r, const grid_cell *c, int repeat, perf_timed_step *out,
                               loom_err *e)
{
    double t[64];
    int got = 0;
    for (int k = 0; k < repeat && k < 64; k++) {
        int rc = add_requests(r, c->b, c->a, 1, NULL, e);
        if (rc)
            return rc;
        double s;
        int n_tok, n_first;
        if ((rc = timed_step(r, &s, &n_tok, &n_first, NULL, e)) || (rc = drain(r, e)))
            return rc;
        if (n_first == c->b) /* the whole cell ran in that one step */
            t[got++] = s;
    }
    if (!got)
        return loom_errf(e, LOOM_EINVAL, "%d prompts of %d tokens did not run in one step", c->b,
                         c->a);
    perf_step_prefill(&out->step, (double)c->a * c->b, c->a, (double)c->a * c->a);
    out->seconds = median(t, got);
    out->kind = PERF_STEP_PREFILL;
    return LOOM_OK;
}

/*
 * The decode cells of one context length, largest batch first: max_batch prompts of ctx tokens
 * are prefilled once (untimed), then each smaller batch is reached by aborting sequences, so
 * the prompts are paid for once per context rather than once per cell.
 */
static int engine_decode_ctx(engine_run *r, int ctx, const int *batches, int n_batches, int repeat,
                             perf_timed_step *out, progress *pg, loom_err *e)
{
    int bmax = batches[0];
    int gen = n_batches * (repeat + 2) + 4;
    uint64_t *ids = xcalloc((size_t)bmax, sizeof(*ids));
    int rc = add_requests(r, bmax, ctx, gen, ids, e), first = 0, alive = bmax;
    while (!rc && first < bmax) {
        double s;
        int n_tok, n_first;
        rc = timed_step(r, &s, &n_tok, &n_first, NULL, e);
        first += n_first;
        if (!rc && !engine_has_work(r->en))
            rc = loom_errf(e, LOOM_EINVAL, "decode setup finished early");
    }
    for (int lv = 0; !rc && lv < n_batches; lv++) {
        int b = batches[lv];
        while (alive > b)
            engine_abort(r->en, ids[--alive]);
        double s, t[64], ctx_sum = 0;
        int n_tok, n_first, got = 0;
        const engine_event *evs;
        if ((rc = timed_step(r, &s, &n_tok, &n_first, NULL, e))) /* settles the aborts */
            break;
        for (int k = 0; k < repeat && k < 64; k++) {
            if ((rc = timed_step(r, &s, &n_tok, &n_first, &evs, e)))
                break;
            if (n_tok != b)
                continue;
            double cs = 0;
            for (int i = 0; i < n_tok + n_first; i++) /* the token input sat at ctx + g - 2 */
                if (evs[i].token >= 0)
                    cs += evs[i].prompt_tokens + evs[i].completion_tokens - 2;
            ctx_sum += cs;
            t[got++] = s;
        }
        if (rc)
            break;
        if (!got) {
            rc = loom_errf(e, LOOM_EINVAL, "decode batch %d did not run whole", b);
            break;
        }
        perf_step_decode(&out[lv].step, b, ctx_sum / got);
        out[lv].seconds = median(t, got);
        out[lv].kind = PERF_STEP_DECODE;
        pg->done++;
        char what[64];
        snprintf(what, sizeof(what), "decode: batch %d at %d tokens", b, ctx);
        progress_show(pg, what);
    }
    while (alive > 0)
        engine_abort(r->en, ids[--alive]);
    free(ids);
    if (!rc)
        rc = drain(r, e);
    return rc;
}

static int cmp_int_desc(const void *a, const void *b)
{
    return *(const int *)b - *(const int *)a;
}

/* Runs the grid's cells; returns the timed steps written to out. */
static int run_engine(const profile_opts *o, model *m, const grid_cell *cells, int n_cells,
                      perf_timed_step *out, int *n_out, progress *pg, loom_err *e)
{
    const model_config *mc = model_get_config(m);
    int gen_max = 64, bs = 16;
    int ctx_blocks = (int)((o->max_context + gen_max + bs) / bs);
    int blocks = (int)o->max_batch * ctx_blocks;
    int pre_blocks = 4 * (int)((o->max_prompt + 2 * bs) / bs);
    if (blocks < pre_blocks)
        blocks = pre_blocks;
    engine_backend backend;
    int rc = engine_backend_cpu_create(m, blocks, bs, &backend, e);
    if (rc)
        return rc;
    engine_config ec;
    engine_config_default(&ec);
    ec.block_size = bs;
    ec.num_kv_blocks = blocks;
    ec.max_num_seqs = (int)o->max_batch;
    ec.max_num_batched_tokens = (int)o->max_tokens;
    ec.max_model_len =
        (int)(o->max_context > o->max_prompt ? o->max_context : o->max_prompt) + gen_max + bs;
    if (ec.max_model_len > mc->max_position_embeddings)
        ec.max_model_len = mc->max_position_embeddings;
    ec.enable_prefix_caching = false;
    ec.seed = (uint64_t)o->seed;
    engine_run r = {0};
    r.mc = mc;
    rng_seed(&r.rng, (uint64_t)o->seed * 7919 + 17);
    if ((rc = engine_create(&ec, mc, backend, NULL, &r.en, e)))
        return rc;
    r.prompt = xmalloc(sizeof(int32_t) * (size_t)(ec.max_model_len + 1));

    /* warm-up: page in the weights and the pool threads */
    if ((rc = add_requests(&r, 1, 64, 4, NULL, e)) || (rc = drain(&r, e)))
        goto out;
    int n = 0;
    for (int i = 0; i < n_cells && !rc; i++) {
        if (cells[i].kind != PERF_STEP_PREFILL)
            continue;
        char what[64];
        snprintf(what, sizeof(what), "prompt: %d x %d tokens", cells[i].b, cells[i].a);
        progress_show(pg, what);
        rc = engine_prefill_cell(&r, &cells[i], (int)o->repeat, &out[n++], e);
        pg->done++;
    }
    /* decode cells, grouped by context */
    for (int i = 0; i < n_cells && !rc; i++) {
        if (cells[i].kind != PERF_STEP_DECODE)
            continue;
        int batches[64], nb = 0, ctx = cells[i].b;
        for (int j = 0; j < n_cells; j++)
            if (cells[j].kind == PERF_STEP_DECODE && cells[j].b == ctx && nb < 64)
                batches[nb++] = cells[j].a;
        bool first_of_ctx = true;
        for (int j = 0; j < i; j++)
            if (cells[j].kind == PERF_STEP_DECODE && cells[j].b == ctx)
                first_of_ctx = false;
        if (!first_of_ctx)
            continue;
        qsort(batches, (size_t)nb, sizeof(int), cmp_int_desc);
        char what[64];
        snprintf(what, sizeof(what), "decode: %d prompts of %d tokens", batches[0], ctx);
        progress_show(pg, what);
        rc = engine_decode_ctx(&r, ctx, batches, nb, (int)o->repeat, &out[n], pg, e);
        n += nb;
    }
    *n_out = n;
out:
    free(r.prompt);
    engine_free(r.en);
    return rc;
}

/* ---------------------------------------------------------------- over HTTP */

static int http_batch(const profile_opts *o, int n, int in, int outl, uint64_t seed,
                      bench_result **res, loom_err *e)
{
    bench_config bc;
    bench_config_default(&bc);
    bc.urls[0] = o->url;
    bc.n_targets = 1;
    bc.api_key = o->api_key;
    bc.workload.input = (bench_dist){.kind = BENCH_DIST_FIXED, .a = in};
    bc.workload.output = (bench_dist){.kind = BENCH_DIST_FIXED, .a = outl};
    bc.workload.seed = seed;
    bc.arrival = BENCH_ARRIVAL_AT_ONCE;
    bc.max_requests = (uint64_t)n;
    bc.prompt_mode = BENCH_PROMPTS_IDS;
    int rc = bench_run(&bc, res, e);
    if (rc)
        return rc;
    if (!bench_result_ok(*res)) {
        const char *why = "";
        for (size_t i = 0; i < (*res)->n_records; i++)
            if ((*res)->records[i].error_msg) {
                why = (*res)->records[i].error_msg;
                break;
            }
        rc = loom_errf(e, LOOM_EINVAL, "a batch of %d requests of %d+%d tokens failed: %s", n, in,
                       outl, why);
        bench_result_free(*res);
        *res = NULL;
    }
    return rc;
}

static int run_http(const profile_opts *o, const grid_cell *cells, int n_cells,
                    perf_timed_step *out, int *n_out, progress *pg, loom_err *e)
{
    int n = 0, rc = LOOM_OK;
    uint64_t seed = (uint64_t)o->seed * 1000003 + 1;
    bench_result *res = NULL;
    /* warm-up (connection, first-request costs) */
    if ((rc = http_batch(o, 1, 16, 4, seed++, &res, e)))
        return rc;
    bench_result_free(res);
    for (int i = 0; i < n_cells && !rc; i++) {
        const grid_cell *c = &cells[i];
        char what[64];
        double t[64];
        int got = 0;
        if (c->kind == PERF_STEP_PREFILL) {
            snprintf(what, sizeof(what), "prompt: %d x %d tokens", c->b, c->a);
            progress_show(pg, what);
            for (int k = 0; k < o->repeat && k < 64 && !rc; k++) {
                if ((rc = http_batch(o, c->b, c->a, 1, seed++, &res, e)))
                    break;
                /* they all ran in one step: the last first token closes it */
                double last = 0;
                for (size_t j = 0; j < res->n_records; j++)
                    if (bench_record_ttft(&res->records[j]) > last)
                        last = bench_record_ttft(&res->records[j]);
                t[got++] = last;
                bench_result_free(res);
            }
            if (rc)
                break;
            perf_step_prefill(&out[n].step, (double)c->a * c->b, c->a, (double)c->a * c->a);
            out[n].kind = PERF_STEP_PREFILL;
        } else {
            int b = c->a, ctx = c->b;
            snprintf(what, sizeof(what), "decode: batch %d at %d tokens", b, ctx);
            progress_show(pg, what);
            int prefill_steps = (int)(((long long)b * ctx + o->max_tokens - 1) / o->max_tokens);
            int outl = prefill_steps + 12;
            double ctx_sum = 0;
            int ctx_n = 0;
            for (int k = 0; k < o->repeat && k < 64 && !rc; k++) {
                if ((rc = http_batch(o, b, ctx, outl, seed++, &res, e)))
                    break;
                /* gaps while every request of the batch is decoding: after the last first
                 * token, before the first request ends */
                double all_in = 0, first_end = INFINITY;
                for (size_t j = 0; j < res->n_records; j++) {
                    const bench_record *rec = &res->records[j];
                    if (rec->first_token_s > all_in)
                        all_in = rec->first_token_s;
                    if (rec->end_s < first_end)
                        first_end = rec->end_s;
                }
                size_t cap = 0;
                for (size_t j = 0; j < res->n_records; j++)
                    cap += (size_t)res->records[j].n_itl;
                double *gaps = xmalloc(sizeof(double) * (cap + 1));
                int ng = 0;
                /* one figure per request: the mean of its gaps in the window. Chunks that
                 * reach the client in one read carry gaps of 0 and the next gap spans several
                 * steps, so single gaps (and their median) misstate a fast server's step; their
                 * mean over a stretch does not */
                for (size_t j = 0; j < res->n_records; j++) {
                    const bench_record *rec = &res->records[j];
                    double at = rec->first_token_s, sum = 0;
                    int cnt = 0;
                    for (int g = 0; g < rec->n_itl; g++) {
                        at += rec->itl[g];
                        if (at - rec->itl[g] >= all_in && at <= first_end) {
                            sum += rec->itl[g];
                            cnt++;
                            ctx_sum += ctx + g; /* token g + 1 was the input */
                            ctx_n++;
                        }
                    }
                    if (cnt > 0 && sum > 0)
                        gaps[ng++] = sum / cnt;
                }
                if (ng > 0)
                    t[got++] = median(gaps, ng);
                free(gaps);
                bench_result_free(res);
            }
            if (rc)
                break;
            if (!got) {
                rc = loom_errf(e, LOOM_EINVAL,
                               "decode batch %d at %d tokens: no gap while the whole batch "
                               "decoded (is the server's --max-num-seqs below %d?)",
                               b, ctx, b);
                break;
            }
            perf_step_decode(&out[n].step, b, b * (ctx_sum / ctx_n));
            out[n].kind = PERF_STEP_DECODE;
        }
        out[n++].seconds = median(t, got);
        pg->done++;
    }
    *n_out = n;
    return rc;
}

/* ---------------------------------------------------------------- --host */

static double gemm_rate(int threads, int reps)
{
    enum { T = 256, IN = 1024, OUT = 1024 };
    float *x = xmalloc(sizeof(float) * T * IN), *w = xmalloc(sizeof(float) * OUT * IN),
          *y = xmalloc(sizeof(float) * T * OUT);
    for (int i = 0; i < T * IN; i++)
        x[i] = (float)((i % 13) - 6) * 0.01f;
    for (int i = 0; i < OUT * IN; i++)
        w[i] = (float)((i % 7) - 3) * 0.01f;
    int saved = tensor_get_threads();
    tensor_set_threads(threads);
    tensor_matmul(y, x, w, NULL, T, IN, OUT);
    double best = INFINITY;
    for (int r = 0; r < reps; r++) {
        double t0 = loom_now();
        for (int k = 0; k < 4; k++)
            tensor_matmul(y, x, w, NULL, T, IN, OUT);
        double t = (loom_now() - t0) / 4;
        if (t < best)
            best = t;
    }
    tensor_set_threads(saved);
    free(x);
    free(w);
    free(y);
    return 2.0 * T * IN * OUT / best;
}

static int write_text(const char *path, const loom_buf *b, const char *what)
{
    if (!path || !strcmp(path, "-")) {
        fwrite(b->data, 1, b->len, stdout);
        return CLI_EXIT_OK;
    }
    FILE *f = fopen(path, "w");
    if (!f || fwrite(b->data, 1, b->len, f) != b->len || fclose(f) != 0) {
        fprintf(stderr, "loom profile: cannot write %s: %s\nHINT: pass --out to a writable path\n",
                path, strerror(errno));
        if (f)
            fclose(f);
        return CLI_EXIT_FAIL;
    }
    fprintf(stderr, "wrote %s (%s)\n", path, what);
    return CLI_EXIT_OK;
}

static int run_host(const profile_opts *o)
{
    perf_host h;
    perf_host_basics(&h);
    if (!o->quiet)
        fprintf(stderr, "measuring %d cores: memory bandwidth, F32 GEMM ...\n", h.cores);
    size_t bytes = 64u << 20; /* per array per thread: far beyond any cache */
    h.mem_bw_one = perf_host_stream(1, bytes, 5);
    h.mem_bw = perf_host_stream(h.cores, bytes, 5);
    h.gemm_flops = gemm_rate(1, 5);
    h.gemm_flops_all = gemm_rate(h.cores, 5);
    loom_buf b;
    buf_init(&b);
    perf_host_write_catalog(&h, &b);
    int rc = write_text(o->out, &b, "a catalog with the measured cpu entry");
    buf_free(&b);
    return rc;
}

/* ---------------------------------------------------------------- main */

static const char *model_name_of(const char *spec, char *buf, size_t cap)
{
    if (!strncmp(spec, "random:", 7))
        return spec + 7;
    snprintf(buf, cap, "%s", spec);
    size_t n = strlen(buf);
    while (n > 1 && buf[n - 1] == '/')
        buf[--n] = 0;
    if (n > 12 && !strcmp(buf + n - 12, "/config.json"))
        buf[n - 12] = 0;
    const char *base = strrchr(buf, '/');
    return base ? base + 1 : buf;
}

static int load_config(const char *spec, model_config *mc, loom_err *e)
{
    if (!strncmp(spec, "random:", 7))
        return model_config_preset(spec + 7, mc, e);
    struct stat st;
    if (stat(spec, &st) != 0)
        return loom_errf(e, LOOM_ENOTFOUND,
                         "model '%s' is not a directory, a config.json or "
                         "random:<preset>",
                         spec);
    char *path = S_ISDIR(st.st_mode) ? loom_path_join(spec, "config.json") : xstrdup(spec);
    int rc = model_config_load(path, mc, e);
    free(path);
    return rc;
}

static int parse_opts(int argc, char **argv, profile_opts *o, bool *help)
{
    memset(o, 0, sizeof(*o));
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    o->threads = n > 0 ? n : 1;
    o->tp = 0;
    o->max_prompt = 1024;
    o->max_batch = 0;
    o->max_context = 1024;
    o->max_tokens = 2048;
    o->repeat = 3;
    o->api_key = getenv("LOOM_API_KEY");
    o->progress = isatty(2);
    *help = false;
    bool threads_set = false;
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":h", long_opts, NULL)) != -1) {
        const char *a = optarg;
        bool ok = true;
        switch (c) {
        case OPT_URL:
            o->url = a;
            break;
        case OPT_MODEL:
            o->model = a;
            break;
        case OPT_BACKEND:
            o->backend = a;
            break;
        case OPT_THREADS:
            ok = cli_parse_int(a, 1, 4096, &o->threads);
            threads_set = true;
            break;
        case OPT_HOST:
            o->host = true;
            break;
        case OPT_DEVICE:
            o->device = a;
            break;
        case OPT_TP:
            ok = cli_parse_int(a, 1, 1024, &o->tp);
            break;
        case OPT_CATALOG:
            o->catalog = a;
            break;
        case OPT_OUT:
            o->out = a;
            break;
        case OPT_NAME:
            o->name = a;
            ok = *a != 0;
            break;
        case OPT_ANY_MODEL:
            o->any_model = true;
            break;
        case OPT_MAX_PROMPT:
            ok = cli_parse_int(a, 1, 1 << 20, &o->max_prompt);
            break;
        case OPT_MAX_BATCH:
            ok = cli_parse_int(a, 1, 1 << 16, &o->max_batch);
            break;
        case OPT_MAX_CONTEXT:
            ok = cli_parse_int(a, 1, 1 << 20, &o->max_context);
            break;
        case OPT_MAX_TOKENS:
            ok = cli_parse_int(a, 1, 1 << 24, &o->max_tokens);
            break;
        case OPT_REPEAT:
            ok = cli_parse_int(a, 1, 64, &o->repeat);
            break;
        case OPT_SEED:
            ok = cli_parse_int(a, 0, INT64_MAX, &o->seed);
            break;
        case OPT_API_KEY:
            o->api_key = a;
            break;
        case OPT_NO_PROGRESS:
            o->progress = false;
            break;
        case OPT_REFIT:
            o->refit = a;
            break;
        case OPT_QUIET:
            o->quiet = true;
            break;
        case 'h':
            *help = true;
            return 0;
        case ':':
            return cli_usage_error("profile", "flag '%s' needs a value", argv[optind - 1]);
        default:
            return cli_usage_error("profile", "unknown flag '%s'", argv[optind - 1]);
        }
        if (!ok) {
            return cli_usage_error("profile", "invalid value '%s' for --%s", a,
                                   long_opts[c - OPT_URL].name);
        }
    }
    if (optind < argc)
        return cli_usage_error("profile", "unexpected argument '%s'", argv[optind]);
    int modes = (o->url != NULL) + (o->backend != NULL) + o->host + (o->refit != NULL);
    if (modes != 1)
        return cli_usage_error("profile", "%s",
                               "give one of --url URL, --backend cpu (with --model), --host or "
                               "--refit PROFILE");
    if (o->host)
        return 0;
    if (!o->model)
        return cli_usage_error("profile", "%s",
                               "--model is required: the model the instance serves (a Hugging "
                               "Face directory, config.json or random:<preset>)");
    if (o->backend && strcmp(o->backend, "cpu"))
        return cli_usage_error(
            "profile",
            "--backend '%s': only cpu runs in process (profile others with --url "
            "against `loom serve`)",
            o->backend);
    if (o->backend && o->tp && o->tp != o->threads)
        return cli_usage_error("profile", "%s",
                               "--tp with --backend cpu is --threads: give --threads");
    if (o->refit && (o->device || o->tp || threads_set))
        return cli_usage_error("profile", "%s",
                               "--refit takes the device and tp from the profile: drop "
                               "--device, --tp and --threads");
    if (o->url && threads_set)
        return cli_usage_error("profile", "%s",
                               "--threads is for --backend cpu (the server has its own)");
    if (o->backend) {
        if (o->device && strcasecmp(o->device, "cpu"))
            return cli_usage_error(
                "profile", "--device '%s': the CPU backend is the catalog's cpu device", o->device);
        o->tp = o->threads;
    }
    if (!o->tp)
        o->tp = 1;
    if (!o->device)
        o->device = "cpu";
    if (!o->max_batch)
        o->max_batch = o->url ? 256 : 64;
    if (o->max_prompt > o->max_tokens)
        o->max_prompt = o->max_tokens;
    return 0;
}

int cli_profile(int argc, char **argv)
{
    profile_opts o;
    bool help;
    int rc = parse_opts(argc, argv, &o, &help);
    if (rc)
        return rc;
    if (help) {
        fputs(profile_help_text, stdout);
        return CLI_EXIT_OK;
    }
    if (o.host)
        return run_host(&o);

    loom_err e = {0};
    int exit_code = CLI_EXIT_USAGE;
    model_config mc;
    perf_catalog catalog = {0};
    perf_model pm;
    model *m = NULL;
    char namebuf[256], outbuf[512];
    const char *name = o.name ? o.name : model_name_of(o.model, namebuf, sizeof(namebuf));
    perf_timed_step steps[PROFILE_MAX_STEPS];
    int n_steps = 0;
    if (o.refit) {
        static char devbuf[PERF_NAME_MAX];
        static perf_profile old;
        if (perf_profile_load(o.refit, &old, &e)) {
            fprintf(stderr, "loom profile: %s\n", e.msg);
            goto out;
        }
        n_steps = old.n_steps;
        memcpy(steps, old.steps, sizeof(steps[0]) * (size_t)n_steps);
        if (n_steps == 0) {
            fprintf(stderr,
                    "loom profile: %s keeps no timed steps (profiles written before they kept "
                    "a steps: list cannot be refitted; profile again)\n",
                    o.refit);
            goto out;
        }
        snprintf(devbuf, sizeof(devbuf), "%s", old.device);
        o.device = devbuf;
        o.tp = old.tp;
        if (!o.name && old.model[0]) {
            snprintf(namebuf, sizeof(namebuf), "%s", old.model);
            name = namebuf;
        }
        if (!o.out)
            o.out = "-";
    }
    if (load_config(o.model, &mc, &e) || perf_catalog_load(o.catalog, &catalog, &e)) {
        fprintf(stderr, "loom profile: %s\n", e.msg);
        goto out;
    }
    const perf_device *dev = perf_catalog_find(&catalog, o.device);
    if (!dev) {
        fprintf(stderr,
                "loom profile: unknown device '%s'\nHINT: device names are those of the "
                "catalog (%s)\n",
                o.device, catalog.path ? catalog.path : "data/devices.yaml");
        goto out;
    }
    char why[160];
    int wb = dev->weight_bytes;
    if (perf_model_init(&pm, &mc, name, wb, wb, &e)) {
        fprintf(stderr, "loom profile: %s\n", e.msg);
        goto out;
    }
    if (!perf_tp_valid(&pm, dev, (int)o.tp, why, sizeof(why))) {
        fprintf(stderr, "loom profile: --tp %lld: %s\n", o.tp, why);
        goto out;
    }
    if (!o.refit && o.max_context + 64 > mc.max_position_embeddings) {
        fprintf(stderr, "loom profile: --max-context %lld is over the model's %d positions\n",
                o.max_context, mc.max_position_embeddings);
        goto out;
    }

    grid_cell cells[PROFILE_MAX_STEPS];
    int n_cells = o.refit ? 0 : make_grid(&o, cells, PROFILE_MAX_STEPS);
    progress pg = {.on = o.progress && !o.refit, .total = n_cells};
    exit_code = CLI_EXIT_FAIL;
    double t0 = loom_now();
    if (o.refit) {
        if (!o.quiet)
            fprintf(stderr, "refitting %d timed steps of %s (%s, tp %lld)\n", n_steps, o.refit,
                    dev->name, o.tp);
        rc = 0;
    } else if (o.backend) {
        tensor_set_threads((int)o.threads);
        rc = !strncmp(o.model, "random:", 7)
                 ? model_create_random(o.model + 7, (uint64_t)o.seed, &m, &e)
                 : model_load(o.model, &m, &e);
        if (rc) {
            fprintf(stderr, "loom profile: %s\n", e.msg);
            exit_code = CLI_EXIT_USAGE;
            goto out;
        }
        if (!o.quiet)
            fprintf(stderr, "profiling %s on the CPU backend, %lld threads: %d cells x %lld\n",
                    name, o.threads, n_cells, o.repeat);
        rc = run_engine(&o, m, cells, n_cells, steps, &n_steps, &pg, &e);
    } else {
        if (!o.quiet)
            fprintf(stderr, "profiling %s at %s (%s, tp %lld): %d cells x %lld\n", name, o.url,
                    dev->name, o.tp, n_cells, o.repeat);
        rc = run_http(&o, cells, n_cells, steps, &n_steps, &pg, &e);
    }
    progress_end(&pg);
    if (rc) {
        fprintf(stderr, "loom profile: %s\n", e.msg);
        goto out;
    }
    double wall = loom_now() - t0;

    perf_profile prof;
    double errs[PROFILE_MAX_STEPS];
    if (perf_profile_fit(&pm, dev, (int)o.tp, o.any_model ? "" : name, steps, n_steps, NULL, &prof,
                         errs, &e)) {
        fprintf(stderr, "loom profile: fit: %s\n", e.msg);
        goto out;
    }
    FILE *tf = o.out && !strcmp(o.out, "-") ? stderr : stdout; /* the table, beside the profile */
    if (!o.quiet) {
        fprintf(tf, "%-8s %6s %8s %10s %10s %7s\n", "step", "seqs", "tokens", "measured", "fitted",
               "error");
        for (int i = 0; i < n_steps; i++) {
            const perf_step *s = &steps[i].step;
            bool pre = steps[i].kind == PERF_STEP_PREFILL;
            double seqs = pre ? s->prefill_seqs : s->decode_seqs;
            double toks = pre ? s->prefill_tokens : s->decode_ctx / s->decode_seqs;
            fprintf(tf, "%-8s %6.0f %8.0f %8.2fms %8.2fms %+6.1f%%\n", pre ? "prompt" : "decode", seqs,
                   toks, steps[i].seconds * 1e3, steps[i].seconds * (1 + errs[i]) * 1e3,
                   100 * errs[i]);
        }
        fprintf(tf, "(decode rows: tokens = cached context per sequence)\n");
        const perf_coef *c = &prof.coef;
        fprintf(tf, "without the attention and per-token terms (decode attention at the decode "
               "tokens' efficiency, no host cost per token) the fit error would be %.1f%%\n",
               100 * roofline_only_error(&pm, dev, (int)o.tp, steps, n_steps));
        fprintf(tf, "fitted on %d steps in %.1f s: overhead %.3f ms, compute_prefill %.3f, "
               "compute_decode %.3f, attention %.3f, memory %.3f, comm %.3f, host_token "
               "%.4f ms; relative RMS error %.1f%%\n",
               n_steps, wall, c->overhead * 1e3, c->compute_prefill, c->compute_decode,
               c->attention, c->memory, c->comm, c->host_token * 1e3, 100 * prof.rel_rms);
    }
    if (!o.out) {
        snprintf(outbuf, sizeof(outbuf), "profile-%s-tp%lld%s%s.yaml", dev->name, o.tp,
                 o.any_model ? "" : "-", o.any_model ? "" : name);
        o.out = outbuf;
    }
    loom_buf b;
    buf_init(&b);
    perf_profile_write(&prof, &b);
    perf_profile_write_steps(steps, n_steps, &b);
    char what[96];
    snprintf(what, sizeof(what), "%s tp %lld, %d steps, fit error %.1f%%", dev->name, o.tp, n_steps,
             100 * prof.rel_rms);
    exit_code = write_text(o.out, &b, what);
    buf_free(&b);
    if (exit_code == CLI_EXIT_OK && strcmp(o.out, "-"))
        fprintf(stderr, "use it with: loom plan --profiles %s ...\n",
                strchr(o.out, '/') ? "<its directory>" : ".");
out:
    model_free(m);
    perf_catalog_free(&catalog);
    return exit_code;
}
