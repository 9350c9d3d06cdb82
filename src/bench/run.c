/*
 * The load generator: set-up calls (model name, /tokenize calibration), then runs of the
 * workload against each target, on one libevent loop.
 *
 * A run has an arrival schedule (trace timestamps, gamma/Poisson gaps, or everything at once)
 * and per target a send counter and an in-flight count: a request is sent when it has arrived
 * and the target is under the concurrency limit. A closed loop of N users is "everything has
 * arrived, at most N in flight"; an offline batch is "everything has arrived, no limit".
 * Completions never send directly: they schedule the pump event, so a target that refuses
 * connections cannot recurse the stack.
 *
 * Comparisons: with BENCH_INTERLEAVE_RUNS the targets take turns (A B A B ... for --rounds);
 * with BENCH_INTERLEAVE_REQUESTS each arrival goes to every target at the same moment. Round r
 * uses prompts seeded by r, identical across targets, so every target sees the same requests
 * and no round warms another's prefix cache.
 */
#include "bench_http.h"

#include <cJSON.h>
#include <event2/event.h>

#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define DEFAULT_SYNTHETIC_REQUESTS 1000
#define CALIBRATION_CHECK_TOKENS 300

void bench_config_default(bench_config *c)
{
    memset(c, 0, sizeof(*c));
    c->instance_header = "x-loom-instance";
    c->arrival = BENCH_ARRIVAL_AT_ONCE;
    c->rate = INFINITY;
    c->burstiness = 1.0;
    c->time_scale = 1.0;
    c->timeout_s = 300;
    c->prompt_mode = BENCH_PROMPTS_AUTO;
    c->id_lo = 16;
    c->id_hi = 256;
    c->min_tokens = true;
    c->rounds = 1;
    c->interleave = BENCH_INTERLEAVE_RUNS;
}

/* ---------------------------------------------------------------- state */

typedef struct run_state run_state;

typedef struct run_target {
    int target;
    uint64_t sent;   /* items sent in this run */
    uint64_t cutoff; /* no sends at or beyond this item (duration reached, interrupt) */
    int inflight;
} run_target;

/* One request in flight: the handler's argument. */
typedef struct req_ctx {
    run_state *rs;
    run_target *rt;
    size_t rec; /* index into res->records, unless warmup */
    bool warmup;
    bench_record local; /* the record of a warmup request */
    bool sse;
    double last_chunk; /* absolute time of the last content chunk */
} req_ctx;

struct run_state {
    const bench_config *cfg;
    bench_result *res;
    struct event_base *base;
    bench_http *http;
    bench_prompter *prompters[BENCH_MAX_TARGETS];
    char *models[BENCH_MAX_TARGETS];
    char paths[BENCH_MAX_TARGETS][256];
    int max_model_len[BENCH_MAX_TARGETS];
    bool chat;

    /* the current run */
    int round;
    run_target rts[BENCH_MAX_TARGETS];
    int n_rts;
    double t0;
    bench_arrival arrival;
    uint64_t arrived, limit;
    bool arrivals_done;
    double next_time;
    double *arrival_times; /* (cap_times) by item, open-loop runs */
    size_t cap_times;
    uint64_t done, failed; /* this run, for progress */
    size_t first_record;   /* records of this run start here */
    bool warming;
    struct event *pump_ev, *arrival_ev, *duration_ev, *progress_ev, *sigint_ev;
    bool stopping;
    bool progress_shown;
};

static bench_record *ctx_record(req_ctx *x)
{
    return x->warmup ? &x->local : &x->rs->res->records[x->rec];
}

/* ---------------------------------------------------------------- JSON helpers */

static void json_str(loom_buf *b, const char *s)
{
    buf_append(b, "\"", 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
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

/* The "message" of an OpenAI-style error body, else the body's start. */
static char *error_message(const char *body, size_t len)
{
    if (!body || !len)
        return NULL;
    cJSON *root = cJSON_ParseWithLength(body, len);
    const cJSON *err = root ? cJSON_GetObjectItemCaseSensitive(root, "error") : NULL;
    const cJSON *msg = cJSON_IsObject(err)   ? cJSON_GetObjectItemCaseSensitive(err, "message")
                       : cJSON_IsString(err) ? err
                                             : NULL;
    if (!msg && root)
        msg = cJSON_GetObjectItemCaseSensitive(root, "message");
    char *out =
        cJSON_IsString(msg) ? xstrdup(msg->valuestring) : xstrndup(body, len < 200 ? len : 200);
    cJSON_Delete(root);
    return out;
}

static void record_error(bench_record *r, bench_error err, const char *msg)
{
    if (r->error != BENCH_OK)
        return; /* the first cause wins */
    r->error = err;
    free(r->error_msg);
    r->error_msg = xstrdup(msg ? msg : bench_error_name(err));
}

static int intern_instance(bench_result *res, const char *name)
{
    for (int i = 0; i < res->n_instances; i++)
        if (!strcmp(res->instances[i], name))
            return i;
    res->instances = xrealloc(res->instances, (size_t)(res->n_instances + 1) * sizeof(char *));
    res->instances[res->n_instances] = xstrdup(name);
    return res->n_instances++;
}

/* ---------------------------------------------------------------- response handling */

static void on_head(void *arg, int status, const char *content_type, const char *instance)
{
    req_ctx *x = arg;
    bench_record *r = ctx_record(x);
    r->http_status = status;
    x->sse =
        status == 200 && content_type && strncasecmp(content_type, "text/event-stream", 17) == 0;
    if (instance && *instance && !x->warmup)
        r->instance = intern_instance(x->rs->res, instance);
}

static void itl_push(bench_record *r, float gap)
{
    if (r->n_itl == r->cap_itl) {
        r->cap_itl = r->cap_itl ? 2 * r->cap_itl : 16;
        r->itl = xrealloc(r->itl, (size_t)r->cap_itl * sizeof(float));
    }
    r->itl[r->n_itl++] = gap;
}

static void take_usage(bench_record *r, const cJSON *usage)
{
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(usage, "completion_tokens");
    if (cJSON_IsNumber(p) && cJSON_IsNumber(c)) {
        r->prompt_tokens = (int)p->valuedouble;
        r->output_tokens = (int)c->valuedouble;
        r->usage_seen = true;
    }
}

/* The text a chunk carries: completions choices[0].text, chat choices[0].delta.content. */
static const char *chunk_text(const cJSON *choice)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(choice, "text");
    if (!cJSON_IsString(t)) {
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(choice, "delta");
        if (!d)
            d = cJSON_GetObjectItemCaseSensitive(choice, "message");
        t = d ? cJSON_GetObjectItemCaseSensitive(d, "content") : NULL;
    }
    return cJSON_IsString(t) ? t->valuestring : NULL;
}

/*
 * One SSE event. A content chunk is one whose choices[0] text is non-empty (a chat stream's
 * role-only first chunk and a bare finish chunk are not tokens); the usage chunk gives the
 * server's token counts.
 */
static void on_event(void *arg, const char *data, size_t len, double now)
{
    req_ctx *x = arg;
    bench_record *r = ctx_record(x);
    if (len == 6 && memcmp(data, "[DONE]", 6) == 0)
        return;
    cJSON *root = cJSON_ParseWithLength(data, len);
    if (!cJSON_IsObject(root)) {
        record_error(r, BENCH_ERR_MALFORMED, "an SSE event is not a JSON object");
        cJSON_Delete(root);
        return;
    }
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(root, "error");
    if (err && !cJSON_IsNull(err)) {
        char *text = cJSON_PrintUnformatted(root);
        char *msg = error_message(text, strlen(text));
        record_error(r, BENCH_ERR_STREAM, msg);
        free(msg);
        free(text);
        cJSON_Delete(root);
        return;
    }
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    const cJSON *choice = cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
    const char *text = choice ? chunk_text(choice) : NULL;
    if (text && *text) {
        double t = now - x->rs->t0;
        if (r->first_token_s < 0)
            r->first_token_s = t;
        else
            itl_push(r, (float)(now - x->last_chunk));
        x->last_chunk = now;
        r->n_chunks++;
    }
    const cJSON *usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
    if (cJSON_IsObject(usage))
        take_usage(r, usage);
    cJSON_Delete(root);
}

/* A non-streaming 200 response: one JSON body, all tokens at once. */
static void take_plain_body(req_ctx *x, bench_record *r, const char *body, size_t len)
{
    cJSON *root = body ? cJSON_ParseWithLength(body, len) : NULL;
    if (!cJSON_IsObject(root)) {
        record_error(r, BENCH_ERR_MALFORMED, "a 200 response that is neither SSE nor JSON");
        cJSON_Delete(root);
        return;
    }
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    const cJSON *choice = cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
    const char *text = choice ? chunk_text(choice) : NULL;
    if (text && *text) {
        r->first_token_s = r->end_s;
        r->n_chunks = 1;
    }
    const cJSON *usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
    if (cJSON_IsObject(usage))
        take_usage(r, usage);
    cJSON_Delete(root);
}

static void schedule_pump(run_state *rs)
{
    event_active(rs->pump_ev, EV_TIMEOUT, 0);
}

static void on_done(void *arg, bench_error err, const char *msg, const char *body, size_t body_len,
                    double now)
{
    req_ctx *x = arg;
    run_state *rs = x->rs;
    bench_record *r = ctx_record(x);
    r->end_s = now - rs->t0;
    if (err != BENCH_OK) {
        record_error(r, err, msg);
    } else if (r->http_status != 200) {
        char *m = error_message(body, body_len);
        char full[600];
        snprintf(full, sizeof(full), "HTTP %d%s%s", r->http_status, m ? ": " : "", m ? m : "");
        record_error(r, BENCH_ERR_HTTP, full);
        free(m);
    } else if (!x->sse) {
        take_plain_body(x, r, body, body_len);
    }
    if (r->error == BENCH_OK) {
        if (!r->usage_seen)
            r->output_tokens = r->n_chunks;
        if (r->n_chunks == 0 && r->output_tokens == 0)
            record_error(r, BENCH_ERR_MALFORMED, "the response ended without any token");
    }
    x->rt->inflight--;
    if (x->warmup) {
        if (r->error != BENCH_OK && r->error != BENCH_ERR_CANCELLED)
            LOG_WARN("bench: warmup request failed: %s", r->error_msg);
        free(r->error_msg);
        free(r->itl);
    } else {
        rs->done++;
        if (r->error != BENCH_OK)
            rs->failed++;
    }
    free(x);
    schedule_pump(rs);
}

/* ---------------------------------------------------------------- sending */

static const bench_http_handler handler = {on_head, on_event, on_done};

static uint64_t round_seed(const run_state *rs, int round)
{
    return rs->cfg->workload.seed * 0x100000001b3ULL + (uint64_t)round * 0x9e3779b97f4a7c15ULL + 1;
}

static void build_body(run_state *rs, int target, const bench_item *item, uint64_t salt, int round,
                       loom_buf *b, int *expected)
{
    bench_prompt pr;
    bench_prompt_build(rs->prompters[target], item, round_seed(rs, round), salt, &pr);
    *expected = pr.expected_tokens;
    buf_puts(b, "{");
    if (rs->models[target] && *rs->models[target]) {
        buf_puts(b, "\"model\":");
        json_str(b, rs->models[target]);
        buf_puts(b, ",");
    }
    if (rs->chat) {
        buf_puts(b, "\"messages\":[{\"role\":\"user\",\"content\":");
        bench_prompt_json(&pr, b);
        buf_puts(b, "}],");
    } else {
        buf_puts(b, "\"prompt\":");
        bench_prompt_json(&pr, b);
        buf_puts(b, ",");
    }
    buf_printf(b, "\"max_tokens\":%d,\"ignore_eos\":true,", item->output_len);
    if (rs->cfg->min_tokens)
        buf_printf(b, "\"min_tokens\":%d,", item->output_len);
    if (rs->cfg->no_stream)
        buf_puts(b, "\"temperature\":0,\"stream\":false}");
    else
        buf_puts(b, "\"temperature\":0,\"stream\":true,\"stream_options\":{\"include_usage\":true}}");
    bench_prompt_free(&pr);
}

static void send_one(run_state *rs, run_target *rt, uint64_t k, bool warmup)
{
    const bench_config *cfg = rs->cfg;
    bench_result *res = rs->res;
    bench_item item;
    bench_workload_item(&cfg->workload, k, &item);
    req_ctx *x = xcalloc(1, sizeof(*x));
    x->rs = rs;
    x->rt = rt;
    x->warmup = warmup;
    if (!warmup) {
        if (res->n_records == res->cap_records) {
            res->cap_records = res->cap_records ? 2 * res->cap_records : 1024;
            res->records = xrealloc(res->records, res->cap_records * sizeof(bench_record));
        }
        x->rec = res->n_records++;
    }
    bench_record *r = ctx_record(x);
    memset(r, 0, sizeof(*r));
    r->target = rt->target;
    r->round = rs->round;
    r->k = k;
    r->input_len = item.input_len;
    r->output_len = item.output_len;
    r->first_token_s = -1;
    r->instance = -1;
    if (!warmup && k < rs->cap_times && rs->arrival_times)
        r->scheduled_s = rs->arrival_times[k];
    loom_buf body;
    buf_init(&body);
    uint64_t salt = warmup ? (k | (1ull << 62)) : k;
    build_body(rs, rt->target, &item, salt, warmup ? 0x7fff : rs->round, &body, &r->prompt_tokens);
    rt->inflight++;
    if (!warmup && rt->inflight > res->max_concurrent[rt->target])
        res->max_concurrent[rt->target] = rt->inflight;
    /* the record's start is set before sending: on_done may run inside bench_http_send */
    r->start_s = loom_now() - rs->t0;
    bench_http_send(rs->http, rt->target, "POST", rs->paths[rt->target], body.data, body.len,
                    &handler, x);
    buf_free(&body);
}

static bool run_finished(run_state *rs)
{
    if (!rs->arrivals_done)
        return false;
    for (int i = 0; i < rs->n_rts; i++) {
        run_target *rt = &rs->rts[i];
        uint64_t avail = rs->arrived < rt->cutoff ? rs->arrived : rt->cutoff;
        if (rt->inflight > 0 || rt->sent < avail)
            return false;
    }
    return true;
}

static void pump(run_state *rs)
{
    int cap = rs->cfg->concurrency;
    if (!rs->stopping) {
        /* one request per target in turn, so that targets fed in parallel stay in step */
        bool progress = true;
        while (progress) {
            progress = false;
            for (int i = 0; i < rs->n_rts; i++) {
                run_target *rt = &rs->rts[i];
                uint64_t avail = rs->arrived < rt->cutoff ? rs->arrived : rt->cutoff;
                if (rt->sent < avail && (cap <= 0 || rt->inflight < cap)) {
                    send_one(rs, rt, rt->sent++, rs->warming);
                    progress = true;
                }
            }
        }
    }
    if (run_finished(rs))
        event_base_loopbreak(rs->base);
}

static void pump_cb(evutil_socket_t fd, short what, void *arg)
{
    pump(arg);
}

/* ---------------------------------------------------------------- arrivals and timers */

static void remember_arrival(run_state *rs, uint64_t k, double t)
{
    if (k >= rs->cap_times) {
        size_t cap = rs->cap_times ? rs->cap_times * 2 : 4096;
        while (cap <= k)
            cap *= 2;
        rs->arrival_times = xrealloc(rs->arrival_times, cap * sizeof(double));
        rs->cap_times = cap;
    }
    rs->arrival_times[k] = t;
}

/* Computes the time of item rs->arrived; marks the arrivals done past the limits. */
static void plan_next_arrival(run_state *rs)
{
    const bench_config *cfg = rs->cfg;
    if (rs->arrived >= rs->limit) {
        rs->arrivals_done = true;
        return;
    }
    bench_item item;
    bench_workload_item(&cfg->workload, rs->arrived, &item);
    rs->next_time = bench_arrival_next(&rs->arrival, &item);
    if (cfg->duration_s > 0 && rs->next_time >= cfg->duration_s) {
        rs->arrivals_done = true;
        return;
    }
    remember_arrival(rs, rs->arrived, rs->next_time);
}

static void arrival_cb(evutil_socket_t fd, short what, void *arg)
{
    run_state *rs = arg;
    if (rs->stopping || rs->arrivals_done)
        return;
    double now = loom_now() - rs->t0;
    /* everything due (within half a millisecond) arrives now */
    while (!rs->arrivals_done && rs->next_time <= now + 5e-4) {
        rs->arrived++;
        plan_next_arrival(rs);
    }
    if (!rs->arrivals_done) {
        double wait = rs->next_time - now;
        struct timeval tv = {(time_t)wait, (suseconds_t)((wait - floor(wait)) * 1e6)};
        evtimer_add(rs->arrival_ev, &tv);
    }
    pump(rs);
}

static void stop_sending(run_state *rs)
{
    rs->arrivals_done = true;
    for (int i = 0; i < rs->n_rts; i++)
        rs->rts[i].cutoff = rs->rts[i].sent;
    if (rs->arrival_ev)
        evtimer_del(rs->arrival_ev);
}

static void duration_cb(evutil_socket_t fd, short what, void *arg)
{
    run_state *rs = arg;
    stop_sending(rs);
    pump(rs);
}

static void sigint_cb(evutil_socket_t fd, short what, void *arg)
{
    run_state *rs = arg;
    if (rs->stopping)
        return;
    rs->stopping = true;
    rs->res->interrupted = true;
    if (rs->cfg->progress)
        fprintf(stderr, "\ninterrupted: cancelling the requests in flight\n");
    stop_sending(rs);
    bench_http_cancel_all(rs->http);
    schedule_pump(rs);
}

static void progress_cb(evutil_socket_t fd, short what, void *arg)
{
    run_state *rs = arg;
    const bench_config *cfg = rs->cfg;
    double t = loom_now() - rs->t0;
    int inflight = 0;
    for (int i = 0; i < rs->n_rts; i++)
        inflight += rs->rts[i].inflight;
    uint64_t total = rs->limit == UINT64_MAX ? 0 : rs->limit * (uint64_t)rs->n_rts;
    double frac = total                 ? (double)rs->done / (double)total
                  : cfg->duration_s > 0 ? t / cfg->duration_s
                                        : 0;
    if (frac > 1)
        frac = 1;
    char bar[31];
    int filled = (int)(frac * 30);
    for (int i = 0; i < 30; i++)
        bar[i] = i < filled ? '#' : '.';
    bar[30] = '\0';
    const char *label = rs->n_rts == 1 ? rs->res->labels[rs->rts[0].target] : "all targets";
    char totals[32] = "";
    if (total)
        snprintf(totals, sizeof(totals), "/%llu", (unsigned long long)total);
    fprintf(stderr,
            "\r\033[K%s round %d/%d [%s] %llu%s done  %.1f req/s  %llu errors  "
            "%d in flight  %.1fs",
            label, rs->round + 1, cfg->rounds, bar, (unsigned long long)rs->done, totals,
            t > 0 ? (double)rs->done / t : 0.0, (unsigned long long)rs->failed, inflight, t);
    fflush(stderr);
    rs->progress_shown = true;
}

/* ---------------------------------------------------------------- runs */

static void loop_until_finished(run_state *rs)
{
    if (run_finished(rs))
        return;
    event_base_dispatch(rs->base);
}

/* Unmeasured requests to the targets of the run, all at once (at most --concurrency). */
static void warmup(run_state *rs)
{
    if (rs->cfg->warmup <= 0)
        return;
    rs->warming = true;
    rs->arrived = (uint64_t)rs->cfg->warmup;
    rs->arrivals_done = true;
    for (int i = 0; i < rs->n_rts; i++) {
        rs->rts[i].sent = 0;
        rs->rts[i].cutoff = UINT64_MAX;
    }
    rs->t0 = loom_now();
    pump(rs);
    loop_until_finished(rs);
    rs->warming = false;
}

static void run_once(run_state *rs, const int *targets, int n_targets, int round)
{
    const bench_config *cfg = rs->cfg;
    bench_result *res = rs->res;
    rs->round = round;
    rs->n_rts = n_targets;
    for (int i = 0; i < n_targets; i++) {
        rs->rts[i] = (run_target){.target = targets[i], .cutoff = UINT64_MAX};
    }
    if (round == 0)
        warmup(rs);
    if (rs->stopping)
        return;
    for (int i = 0; i < n_targets; i++)
        rs->rts[i] = (run_target){.target = targets[i], .cutoff = UINT64_MAX};

    /* how many requests: --max-requests, else until --duration (unless that would send
     * without bound all at once), else the trace's length or the synthetic default */
    uint64_t limit = cfg->max_requests;
    if (limit == 0) {
        uint64_t size = bench_workload_size(&cfg->workload);
        bool throttled = cfg->arrival != BENCH_ARRIVAL_AT_ONCE || cfg->concurrency > 0;
        if (cfg->duration_s > 0 && throttled)
            limit = UINT64_MAX;
        else
            limit = size ? size : DEFAULT_SYNTHETIC_REQUESTS;
    }
    rs->limit = limit;
    rs->done = rs->failed = 0;
    rs->first_record = res->n_records;
    rs->progress_shown = false;
    bench_arrival_init(&rs->arrival, cfg->arrival, cfg->rate, cfg->burstiness, cfg->time_scale,
                       cfg->workload.seed + (uint64_t)round);
    rs->t0 = loom_now();
    if (res->started_wall == 0)
        res->started_wall = loom_wall();
    if (rs->arrival.kind == BENCH_ARRIVAL_AT_ONCE) {
        rs->arrived = limit;
        rs->arrivals_done = true;
    } else {
        rs->arrived = 0;
        rs->arrivals_done = false;
        plan_next_arrival(rs);
        event_active(rs->arrival_ev, EV_TIMEOUT, 0);
    }
    if (cfg->duration_s > 0) {
        double d = cfg->duration_s;
        struct timeval tv = {(time_t)d, (suseconds_t)((d - floor(d)) * 1e6)};
        evtimer_add(rs->duration_ev, &tv);
    }
    if (cfg->progress) {
        struct timeval tv = {0, 250000};
        event_add(rs->progress_ev, &tv);
    }
    pump(rs);
    loop_until_finished(rs);
    evtimer_del(rs->duration_ev);
    evtimer_del(rs->arrival_ev);
    if (cfg->progress) {
        event_del(rs->progress_ev);
        progress_cb(-1, 0, rs);
        fputc('\n', stderr);
    }
    /* makespan per target: from the run's start to its last answer */
    for (int i = 0; i < n_targets; i++) {
        int t = targets[i];
        double last = 0;
        for (size_t j = rs->first_record; j < res->n_records; j++)
            if (res->records[j].target == t && res->records[j].end_s > last)
                last = res->records[j].end_s;
        res->duration_s[t] += last;
        bench_http_close_idle(rs->http, t); /* every run starts from the same, cold, state */
    }
}

/* ---------------------------------------------------------------- set-up calls */

/* GET /v1/models: the first model's id (and max_model_len when the server says). */
static char *discover_model(run_state *rs, int target)
{
    int status = 0;
    char *body = NULL;
    size_t len = 0;
    loom_err le;
    if (bench_http_fetch(rs->http, target, "GET", "/v1/models", NULL, &status, &body, &len, &le) !=
        0) {
        LOG_WARN("bench: %s: %s", rs->res->labels[target], le.msg);
        return NULL;
    }
    char *id = NULL;
    cJSON *root = status == 200 ? cJSON_ParseWithLength(body, len) : NULL;
    const cJSON *data = root ? cJSON_GetObjectItemCaseSensitive(root, "data") : NULL;
    const cJSON *first = cJSON_IsArray(data) ? cJSON_GetArrayItem(data, 0) : NULL;
    const cJSON *v = first ? cJSON_GetObjectItemCaseSensitive(first, "id") : NULL;
    if (cJSON_IsString(v))
        id = xstrdup(v->valuestring);
    const cJSON *mml = first ? cJSON_GetObjectItemCaseSensitive(first, "max_model_len") : NULL;
    if (cJSON_IsNumber(mml))
        rs->max_model_len[target] = (int)mml->valuedouble;
    if (!id)
        LOG_WARN("bench: %s: GET /v1/models gave no model id (status %d); requests go "
                 "without \"model\"",
                 rs->res->labels[target], status);
    cJSON_Delete(root);
    free(body);
    return id;
}

/* The token count in a /tokenize answer (vLLM: {"tokens": [...], "count": N,
 * "max_model_len": M}), or 0 when the answer is not one. */
static int tokenize_answer(run_state *rs, int target, int status, const char *body)
{
    if (status != 200)
        return 0;
    int count = 0;
    cJSON *root = cJSON_Parse(body);
    const cJSON *c = root ? cJSON_GetObjectItemCaseSensitive(root, "count") : NULL;
    const cJSON *tokens = root ? cJSON_GetObjectItemCaseSensitive(root, "tokens") : NULL;
    if (cJSON_IsNumber(c))
        count = c->valuedouble >= 1 && c->valuedouble < 1e9 ? (int)c->valuedouble : 0;
    else if (cJSON_IsArray(tokens))
        count = cJSON_GetArraySize(tokens);
    const cJSON *mml = root ? cJSON_GetObjectItemCaseSensitive(root, "max_model_len") : NULL;
    if (cJSON_IsNumber(mml))
        rs->max_model_len[target] = (int)mml->valuedouble;
    cJSON_Delete(root);
    return count;
}

/* POST /tokenize {"model", "prompt"} for each text, 16 at a time: counts[i] >= 1, or 0 when
 * the server has no usable /tokenize. Returns a transport error, else 0. */
static int tokenize_counts(run_state *rs, int target, const char *const *texts, int n, int *counts,
                           loom_err *e)
{
    char **bodies = xcalloc((size_t)n, sizeof(char *));
    char **answers = xcalloc((size_t)n, sizeof(char *));
    int *status = xcalloc((size_t)n, sizeof(int));
    for (int i = 0; i < n; i++) {
        loom_buf b;
        buf_init(&b);
        buf_puts(&b, "{");
        if (rs->models[target]) {
            buf_puts(&b, "\"model\":");
            json_str(&b, rs->models[target]);
            buf_puts(&b, ",");
        }
        buf_puts(&b, "\"prompt\":");
        json_str(&b, texts[i]);
        buf_puts(&b, "}");
        bodies[i] = buf_detach(&b);
    }
    int rc = bench_http_fetch_many(rs->http, target, "POST", "/tokenize", n,
                                   (const char *const *)bodies, 16, status, answers, e);
    for (int i = 0; i < n; i++) {
        if (rc == 0)
            counts[i] = tokenize_answer(rs, target, status[i], answers[i]);
        free(bodies[i]);
        free(answers[i]);
    }
    free(bodies);
    free(answers);
    free(status);
    return rc;
}

/*
 * Text prompts through the server's /tokenize. A word is one token when " w w" counts one
 * more than " w"; what " w" counts beyond that is what the server adds (a BOS). Most
 * tokenizers hold every candidate word as one token, which three requests show; otherwise
 * each word is measured. A prompt built from the words is checked at the end. Returns
 * LOOM_ENOTFOUND when the server has no /tokenize.
 */
static int calibrate_tokenize(run_state *rs, int target, bench_prompter **out, loom_err *e)
{
    const int n = bench_n_candidate_words;
    const char *const *cand = bench_candidate_words;
    const char **words = xmalloc((size_t)n * sizeof(char *));
    const char **texts = xmalloc((size_t)(2 * n) * sizeof(char *));
    char **owned = xcalloc((size_t)(2 * n), sizeof(char *));
    int *counts = xcalloc((size_t)(2 * n), sizeof(int));
    int n_words = 0, n_special = -1, rc;

    /* the short way: " w", " w w", and every word at once */
    loom_buf all;
    buf_init(&all);
    for (int i = 0; i < n; i++)
        buf_puts(&all, cand[i]);
    owned[0] = xmalloc(2 * strlen(cand[0]) + 1);
    sprintf(owned[0], "%s%s", cand[0], cand[0]);
    owned[1] = buf_detach(&all);
    const char *quick[3] = {cand[0], owned[0], owned[1]};
    if ((rc = tokenize_counts(rs, target, quick, 3, counts, e)) != 0)
        goto done;
    if (counts[0] == 0) {
        rc = loom_errf(e, LOOM_ENOTFOUND, "%s has no usable POST /tokenize",
                       rs->res->labels[target]);
        goto done;
    }
    if (counts[2] > 2 * n + 8) {
        /* a byte-level or character tokenizer: words are several tokens, text prompts of an
         * exact length would need a tokenizer-specific search */
        rc = loom_errf(e, LOOM_EUNSUPPORTED,
                       "%s: the server's tokenizer splits common words "
                       "into several tokens",
                       rs->res->labels[target]);
        goto done;
    }
    if (counts[1] - counts[0] == 1 && counts[2] == n + counts[0] - 1) {
        n_special = counts[0] - 1;
        for (int i = 0; i < n; i++)
            words[n_words++] = cand[i];
    } else {
        /* word by word */
        for (int i = 0; i < n; i++) {
            free(owned[i]);
            owned[i] = xmalloc(2 * strlen(cand[i]) + 1);
            sprintf(owned[i], "%s%s", cand[i], cand[i]);
            texts[2 * i] = cand[i];
            texts[2 * i + 1] = owned[i];
        }
        if ((rc = tokenize_counts(rs, target, texts, 2 * n, counts, e)) != 0)
            goto done;
        int specials[8] = {0};
        for (int i = 0; i < n; i++) {
            int c1 = counts[2 * i], c2 = counts[2 * i + 1];
            if (c1 >= 1 && c1 <= 8 && c2 - c1 == 1)
                specials[c1 - 1]++;
        }
        n_special = 0;
        for (int i = 1; i < 8; i++)
            if (specials[i] > specials[n_special])
                n_special = i;
        for (int i = 0; i < n; i++)
            if (counts[2 * i] == n_special + 1 && counts[2 * i + 1] == n_special + 2)
                words[n_words++] = cand[i];
    }
    if ((rc = bench_prompter_from_words(words, n_words, n_special, out, e)) != 0)
        goto done;
    /* check a whole prompt */
    bench_item item = {.input_len = CALIBRATION_CHECK_TOKENS};
    bench_prompt pr;
    bench_prompt_build(*out, &item, 1, 1, &pr);
    const char *check[1] = {pr.text};
    int got = 0;
    rc = tokenize_counts(rs, target, check, 1, &got, e);
    if (rc == 0 && got != pr.expected_tokens)
        rc = loom_errf(e, LOOM_EUNSUPPORTED,
                       "%s: a %d-token text prompt counts %d tokens at "
                       "/tokenize",
                       rs->res->labels[target], pr.expected_tokens, got);
    bench_prompt_free(&pr);
    if (rc != 0) {
        bench_prompter_free(*out);
        *out = NULL;
    }
done:
    for (int i = 0; i < 2 * n; i++)
        free(owned[i]);
    free(owned);
    free(words);
    free(texts);
    free(counts);
    return rc;
}

static int setup_prompts(run_state *rs, loom_err *e)
{
    const bench_config *cfg = rs->cfg;
    bench_result *res = rs->res;
    for (int t = 0; t < cfg->n_targets; t++) {
        bench_prompter *p = NULL;
        const char *kind = "token ids";
        bench_prompt_mode mode = cfg->prompt_mode;
        if (mode == BENCH_PROMPTS_AUTO && cfg->tok)
            mode = BENCH_PROMPTS_TOKENIZER;
        if (mode == BENCH_PROMPTS_TOKENIZER) {
            if (!cfg->tok)
                return loom_errf(e, LOOM_EINVAL, "tokenizer prompts need --tokenizer DIR");
            int rc = bench_prompter_from_tokenizer(cfg->tok, &p, e);
            if (rc != 0)
                return rc;
            kind = "text (tokenizer)";
            int overhead = 0;
            loom_err le;
            if (rs->chat) {
                if (bench_chat_overhead(p, cfg->tok, &overhead, &le) == 0)
                    bench_prompter_set_special(p, overhead);
                else
                    LOG_WARN("bench: %s: chat template tokens are not counted in the prompt "
                             "lengths",
                             le.msg);
            }
        } else if (mode == BENCH_PROMPTS_AUTO || mode == BENCH_PROMPTS_TOKENIZE) {
            loom_err le = {0};
            int rc = calibrate_tokenize(rs, t, &p, &le);
            if (rc != 0) {
                if (mode == BENCH_PROMPTS_TOKENIZE)
                    return loom_errf(e, rc, "%s", le.msg);
                if (rc == LOOM_ENOTFOUND)
                    LOG_INFO("bench: %s: no /tokenize; sending token-id prompts", res->labels[t]);
                else if (rc == LOOM_EUNSUPPORTED)
                    LOG_INFO("bench: %s; sending token-id prompts", le.msg);
                else
                    LOG_WARN("bench: %s; sending token-id prompts", le.msg);
                p = NULL;
            } else {
                kind = "text (/tokenize)";
                if (rs->chat)
                    LOG_WARN("bench: %s: /tokenize counts the content, not the chat template "
                             "around it: give --tokenizer DIR for exact chat prompt lengths",
                             res->labels[t]);
            }
        }
        if (!p) {
            if (rs->chat)
                return loom_errf(e, LOOM_EUNSUPPORTED,
                                 "the chat endpoint needs text prompts: "
                                 "give --tokenizer DIR or use a server with /tokenize");
            p = bench_prompter_ids(cfg->id_lo, cfg->id_hi);
        }
        rs->prompters[t] = p;
        if (t == 0)
            res->prompt_kind = xstrdup(kind);
    }
    return 0;
}

/* ---------------------------------------------------------------- entry point */

static int check_config(const bench_config *cfg, loom_err *e)
{
    if (cfg->n_targets < 1 || cfg->n_targets > BENCH_MAX_TARGETS)
        return loom_errf(e, LOOM_EINVAL, "give 1 to %d target URLs", BENCH_MAX_TARGETS);
    if (cfg->arrival == BENCH_ARRIVAL_TRACE && !cfg->workload.trace)
        return loom_errf(e, LOOM_EINVAL, "trace arrivals need a trace");
    if (cfg->arrival == BENCH_ARRIVAL_GAMMA && !(cfg->rate > 0))
        return loom_errf(e, LOOM_EINVAL, "the request rate must be positive");
    if (!(cfg->timeout_s > 0))
        return loom_errf(e, LOOM_EINVAL, "the per-request timeout must be positive");
    if (cfg->rounds < 1)
        return loom_errf(e, LOOM_EINVAL, "at least one round");
    return 0;
}

int bench_run(const bench_config *cfg, bench_result **out, loom_err *e)
{
    int rc = check_config(cfg, e);
    if (rc != 0)
        return rc;
    /* a server that closes a socket must not kill the load generator */
    signal(SIGPIPE, SIG_IGN);
    run_state rs;
    memset(&rs, 0, sizeof(rs));
    rs.cfg = cfg;
    bench_result *res = xcalloc(1, sizeof(*res));
    rs.res = res;
    res->n_targets = cfg->n_targets;
    res->rate = cfg->arrival == BENCH_ARRIVAL_GAMMA ? cfg->rate : INFINITY;
    res->burstiness = cfg->burstiness;
    res->time_scale = cfg->arrival == BENCH_ARRIVAL_TRACE ? cfg->time_scale : 0;
    res->concurrency = cfg->concurrency;
    struct event_config *ecfg = event_config_new();
    event_config_set_flag(ecfg, EVENT_BASE_FLAG_PRECISE_TIMER);
    rs.base = event_base_new_with_config(ecfg);
    event_config_free(ecfg);
    if (!rs.base) {
        free(res);
        return loom_errf(e, LOOM_EIO, "cannot create an event loop");
    }
    rs.http = bench_http_create(rs.base, cfg->timeout_s, cfg->instance_header, cfg->api_key);
    const char *default_path = cfg->endpoint ? cfg->endpoint : NULL;
    for (int t = 0; t < cfg->n_targets; t++) {
        char path[256];
        int idx = bench_http_add_target(rs.http, cfg->urls[t], path, sizeof(path), e);
        if (idx < 0) {
            rc = idx;
            goto fail;
        }
        const char *p = default_path ? default_path : *path ? path : "/v1/completions";
        snprintf(rs.paths[t], sizeof(rs.paths[t]), "%s", p);
        res->urls[t] = xstrdup(cfg->urls[t]);
        res->labels[t] =
            xstrdup(cfg->labels[t] ? cfg->labels[t] : bench_http_target_name(rs.http, t));
    }
    rs.chat = strstr(rs.paths[0], "chat") != NULL;
    for (int t = 0; t < cfg->n_targets; t++)
        rs.models[t] = cfg->model ? xstrdup(cfg->model) : discover_model(&rs, t);
    res->model = xstrdup(rs.models[0] ? rs.models[0] : "");
    if ((rc = setup_prompts(&rs, e)) != 0)
        goto fail;
    for (int t = 0; t < cfg->n_targets; t++) {
        if (rs.max_model_len[t] <= 0)
            continue;
        uint64_t size = bench_workload_size(&cfg->workload);
        uint64_t n = size ? size : 1000;
        uint64_t over = 0;
        for (uint64_t k = 0; k < n; k++) {
            bench_item item;
            bench_workload_item(&cfg->workload, k, &item);
            if (item.input_len + item.output_len > rs.max_model_len[t])
                over++;
        }
        if (over)
            LOG_WARN("bench: %s: %llu of %llu requests exceed max_model_len %d and will be "
                     "refused",
                     res->labels[t], (unsigned long long)over, (unsigned long long)n,
                     rs.max_model_len[t]);
    }

    rs.pump_ev = event_new(rs.base, -1, 0, pump_cb, &rs);
    rs.arrival_ev = evtimer_new(rs.base, arrival_cb, &rs);
    rs.duration_ev = evtimer_new(rs.base, duration_cb, &rs);
    rs.progress_ev = event_new(rs.base, -1, EV_PERSIST, progress_cb, &rs);
    if (cfg->handle_signals) {
        rs.sigint_ev = evsignal_new(rs.base, SIGINT, sigint_cb, &rs);
        evsignal_add(rs.sigint_ev, NULL);
    }
    for (int round = 0; round < cfg->rounds && !rs.stopping; round++) {
        if (cfg->interleave == BENCH_INTERLEAVE_REQUESTS || cfg->n_targets == 1) {
            int all[BENCH_MAX_TARGETS];
            for (int t = 0; t < cfg->n_targets; t++)
                all[t] = t;
            run_once(&rs, all, cfg->n_targets, round);
        } else {
            for (int t = 0; t < cfg->n_targets && !rs.stopping; t++)
                run_once(&rs, &t, 1, round);
        }
    }
    rc = 0;
fail:
    if (rs.sigint_ev)
        event_free(rs.sigint_ev);
    if (rs.pump_ev)
        event_free(rs.pump_ev);
    if (rs.arrival_ev)
        event_free(rs.arrival_ev);
    if (rs.duration_ev)
        event_free(rs.duration_ev);
    if (rs.progress_ev)
        event_free(rs.progress_ev);
    bench_http_free(rs.http);
    event_base_free(rs.base);
    for (int t = 0; t < BENCH_MAX_TARGETS; t++) {
        bench_prompter_free(rs.prompters[t]);
        free(rs.models[t]);
    }
    free(rs.arrival_times);
    if (rc != 0) {
        bench_result_free(res);
        return rc;
    }
    *out = res;
    return 0;
}

void bench_result_free(bench_result *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->n_records; i++) {
        free(r->records[i].itl);
        free(r->records[i].error_msg);
    }
    free(r->records);
    for (int i = 0; i < r->n_instances; i++)
        free(r->instances[i]);
    free(r->instances);
    for (int t = 0; t < BENCH_MAX_TARGETS; t++) {
        free(r->labels[t]);
        free(r->urls[t]);
    }
    free(r->model);
    free(r->prompt_kind);
    free(r);
}
