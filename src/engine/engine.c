/*
 * engine: request lifecycle and the continuous-batching scheduler (vLLM v1 semantics).
 *
 * A request is a token sequence (prompt, then the tokens generated so far) of which n_computed
 * have their KV in the cache. Each step gives every scheduled request a chunk of its uncomputed
 * tokens: 1 for a decode, up to the remaining budget for a prefill (chunked prefill). A request
 * whose chunk reaches its last token gets a logit row and samples the next token. Preemption
 * frees a request's blocks and sets n_computed to 0, so on readmission it recomputes prompt and
 * generated tokens alike (helped by the prefix cache), then samples the next token as if nothing
 * had happened: the generated tokens, rng state and text state are kept.
 *
 * Step order:
 *   1. FINISH_ABORT events for requests aborted since the last step.
 *   2. Running requests in admission order take their chunk; when a block is missing, preempt the
 *      most recently admitted running request (maybe the one being scheduled) and retry.
 *   3. If nothing was preempted: admit waiting requests (FIFO, prefix cache hits first) while
 *      the budget, max_num_seqs and free blocks allow.
 *   4. Build the flat batch, run the backend, register the newly full blocks in the prefix cache,
 *      sample, detokenize, check stop conditions, emit events, free finished requests.
 *
 * Dimension letters: V vocab, T tokens in a step, S scheduled sequences (<= max_num_seqs).
 */
#define _GNU_SOURCE /* memmem */
#include "loom/engine.h"
#include "loom/kv.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct request {
    uint64_t id;
    sampling_params params; /* stop strings owned */
    int32_t *tokens;        /* (n_prompt + max_tokens) prompt, then generated tokens */
    int n_prompt;
    int n_tokens;   /* prompt + generated */
    int n_computed; /* tokens whose KV is in the cache */
    int n_cached;   /* prompt tokens found in the prefix cache at first admission */
    bool admitted_once;
    kv_seq seq;
    loom_rng rng;
    bool seeded;
    detok_state detok;
    /* Text window: n_context bytes already emitted, kept only so that a stop string can match
     * across them (include_stop_str_in_output emits eagerly), then decoded text not yet emitted
     * because it may begin a stop string. */
    loom_buf text;
    size_t n_context;
    size_t max_stop_len;
    bool finished;               /* this step; freed after its event */
    struct request *prev, *next; /* waiting queue or aborted list */
} request;

typedef struct request_list {
    request *head, *tail;
    int n;
} request_list;

struct engine {
    engine_config cfg;
    model_config mc;
    engine_backend backend;
    const tokenizer *tok;
    kv_manager *kv;
    int n_vocab; /* V */
    int n_eos;
    int32_t eos[9];
    loom_rng rng; /* for unseeded requests */

    request_list waiting;
    request_list aborted; /* FINISH_ABORT event owed */
    request **running;    /* (max_num_seqs) in admission order */
    int n_running;

    /* step buffers, sized for the worst case at create */
    request **sched;              /* (S) */
    int32_t *sched_new;           /* (S) tokens scheduled */
    int32_t *batch_tokens;        /* (T) */
    int32_t *seq_start;           /* (S+1) */
    int32_t *ctx_len;             /* (S) */
    const int32_t **block_tables; /* (S) */
    int32_t *logit_rows;          /* (S) */
    float *logits;                /* (S, V) */
    float *sample_row;            /* (V) scratch copy that sampling overwrites */
    int32_t *sample_work;         /* (V) */
    int32_t *hit_blocks;          /* (max_model_len / block_size) */

    /* events of the last step; text in one arena, pointers fixed at the end of the step */
    engine_event *events;
    size_t *event_text_off;
    int n_events, cap_events;
    loom_buf event_text;

    uint64_t n_preempted, prompt_tokens_total, generation_tokens_total;
    uint64_t cache_queries, cache_hits, steps;
};

/* ---------------------------------------------------------------- small helpers */

void engine_config_default(engine_config *c)
{
    memset(c, 0, sizeof(*c));
    c->block_size = 16;
    c->num_kv_blocks = 0; /* must be set: the number of blocks the backend holds */
    c->max_num_seqs = 256;
    c->max_num_batched_tokens = 2048;
    c->max_model_len = 0;
    c->max_waiting = 0;
    c->enable_prefix_caching = true;
    c->seed = 0;
}

const char *finish_reason_str(finish_reason r)
{
    switch (r) {
    case FINISH_STOP:
        return "stop";
    case FINISH_LENGTH:
        return "length";
    case FINISH_ABORT:
        return "abort";
    case FINISH_ERROR:
        return "error";
    default:
        return NULL;
    }
}

static void list_push_back(request_list *l, request *r)
{
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
    l->n++;
}

static void list_push_front(request_list *l, request *r)
{
    r->prev = NULL;
    r->next = l->head;
    if (l->head)
        l->head->prev = r;
    else
        l->tail = r;
    l->head = r;
    l->n++;
}

static void list_remove(request_list *l, request *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
    l->n--;
}

static void request_free(request *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->params.n_stop; i++)
        free(r->params.stop[i]);
    free(r->tokens);
    kv_seq_destroy(&r->seq);
    buf_free(&r->text);
    free(r);
}

static int n_output(const request *r)
{
    return r->n_tokens - r->n_prompt;
}

static bool is_eos(const engine *en, int32_t t)
{
    for (int i = 0; i < en->n_eos; i++)
        if (en->eos[i] == t)
            return true;
    return false;
}

/* ---------------------------------------------------------------- create / free */

int engine_create(const engine_config *cfg, const model_config *mc, engine_backend backend,
                  const tokenizer *tok, engine **out, loom_err *e)
{
    int rc = LOOM_OK;
    engine *en = NULL;
    *out = NULL;
    engine_config c = *cfg;
    if (c.max_model_len <= 0)
        c.max_model_len = mc->max_position_embeddings;
    if (c.block_size <= 0 || c.num_kv_blocks <= 0 || c.max_num_seqs <= 0 ||
        c.max_num_batched_tokens <= 0 || c.max_model_len <= 0 || mc->vocab_size <= 0) {
        rc = loom_errf(e, LOOM_EINVAL,
                       "engine config needs block_size, num_kv_blocks, max_num_seqs, "
                       "max_num_batched_tokens, max_model_len and vocab > 0 (got %d, %d, %d, %d, "
                       "%d, %d)",
                       c.block_size, c.num_kv_blocks, c.max_num_seqs, c.max_num_batched_tokens,
                       c.max_model_len, mc->vocab_size);
        goto fail;
    }
    en = calloc(1, sizeof(*en));
    if (!en) {
        rc = loom_errf(e, LOOM_ENOMEM, "out of memory for the engine");
        goto fail;
    }
    en->cfg = c;
    en->mc = *mc;
    en->backend = backend;
    en->tok = tok;
    en->n_vocab = mc->vocab_size;
    rng_seed(&en->rng, c.seed);
    for (int i = 0; i < mc->n_eos && i < 8; i++)
        if (mc->eos_token_ids[i] >= 0)
            en->eos[en->n_eos++] = mc->eos_token_ids[i];
    if (tok && tokenizer_eos_id(tok) >= 0 && !is_eos(en, tokenizer_eos_id(tok)))
        en->eos[en->n_eos++] = tokenizer_eos_id(tok);

    rc = kv_create(c.num_kv_blocks, c.block_size, c.enable_prefix_caching, &en->kv, e);
    if (rc)
        goto fail;

    size_t S = (size_t)c.max_num_seqs, T = (size_t)c.max_num_batched_tokens;
    size_t V = (size_t)en->n_vocab, logits_n;
    if (!loom_mul_ok(S, V, &logits_n)) {
        rc = loom_errf(e, LOOM_EINVAL, "max_num_seqs x vocab overflows");
        goto fail;
    }
    en->running = calloc(S, sizeof(*en->running));
    en->sched = calloc(S, sizeof(*en->sched));
    en->sched_new = calloc(S, sizeof(*en->sched_new));
    en->batch_tokens = calloc(T, sizeof(*en->batch_tokens));
    en->seq_start = calloc(S + 1, sizeof(*en->seq_start));
    en->ctx_len = calloc(S, sizeof(*en->ctx_len));
    en->block_tables = calloc(S, sizeof(*en->block_tables));
    en->logit_rows = calloc(S, sizeof(*en->logit_rows));
    en->logits = malloc(logits_n * sizeof(float));
    en->sample_row = malloc(V * sizeof(float));
    en->sample_work = malloc(V * sizeof(int32_t));
    en->hit_blocks = malloc(((size_t)c.max_model_len / c.block_size + 1) * sizeof(int32_t));
    en->cap_events = c.max_num_seqs + 16;
    en->events = calloc((size_t)en->cap_events, sizeof(*en->events));
    en->event_text_off = calloc((size_t)en->cap_events, sizeof(*en->event_text_off));
    if (!en->running || !en->sched || !en->sched_new || !en->batch_tokens || !en->seq_start ||
        !en->ctx_len || !en->block_tables || !en->logit_rows || !en->logits || !en->sample_row ||
        !en->sample_work || !en->hit_blocks || !en->events || !en->event_text_off) {
        rc = loom_errf(e, LOOM_ENOMEM, "out of memory for the engine's step buffers");
        goto fail;
    }
    buf_init(&en->event_text);
    buf_append(&en->event_text, NULL, 0);
    *out = en;
    return LOOM_OK;

fail:
    if (en) {
        engine_free(en); /* destroys the backend too */
    } else if (backend.destroy) {
        backend.destroy(backend.ctx);
    }
    return rc;
}

void engine_free(engine *en)
{
    if (!en)
        return;
    request *r, *next;
    for (r = en->waiting.head; r; r = next) {
        next = r->next;
        request_free(r);
    }
    for (r = en->aborted.head; r; r = next) {
        next = r->next;
        request_free(r);
    }
    for (int i = 0; i < en->n_running; i++) {
        kv_seq_release(en->kv, &en->running[i]->seq);
        request_free(en->running[i]);
    }
    if (en->backend.destroy)
        en->backend.destroy(en->backend.ctx);
    kv_free(en->kv);
    free(en->running);
    free(en->sched);
    free(en->sched_new);
    free(en->batch_tokens);
    free(en->seq_start);
    free(en->ctx_len);
    free(en->block_tables);
    free(en->logit_rows);
    free(en->logits);
    free(en->sample_row);
    free(en->sample_work);
    free(en->hit_blocks);
    free(en->events);
    free(en->event_text_off);
    buf_free(&en->event_text);
    free(en);
}

/* ---------------------------------------------------------------- add / abort */

static int check_params(const engine *en, const sampling_params *p, loom_err *e)
{
    if (!(p->temperature >= 0))
        return loom_errf(e, LOOM_EINVAL, "temperature must be >= 0");
    if (!(p->top_p > 0 && p->top_p <= 1))
        return loom_errf(e, LOOM_EINVAL, "top_p must be in (0, 1]");
    if (p->max_tokens < 1)
        return loom_errf(e, LOOM_EINVAL, "max_tokens must be >= 1");
    if (p->min_tokens < 0 || p->min_tokens > p->max_tokens)
        return loom_errf(e, LOOM_EINVAL, "min_tokens must be in [0, max_tokens]");
    if (p->logprobs < -1 || p->logprobs > ENGINE_MAX_LOGPROBS)
        return loom_errf(e, LOOM_EINVAL, "logprobs must be at most %d", ENGINE_MAX_LOGPROBS);
    if (p->n_stop < 0 || p->n_stop > ENGINE_MAX_STOP)
        return loom_errf(e, LOOM_EINVAL, "at most %d stop strings", ENGINE_MAX_STOP);
    for (int i = 0; i < p->n_stop; i++)
        if (!p->stop[i] || !p->stop[i][0])
            return loom_errf(e, LOOM_EINVAL, "stop strings must not be empty");
    (void)en;
    return LOOM_OK;
}

int engine_add(engine *en, uint64_t req_id, const int32_t *prompt, int n_prompt,
               const sampling_params *p, loom_err *e)
{
    if (!prompt || n_prompt <= 0)
        return loom_errf(e, LOOM_EINVAL, "the prompt is empty");
    int rc = check_params(en, p, e);
    if (rc)
        return rc;
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= en->n_vocab)
            return loom_errf(e, LOOM_EINVAL,
                             "prompt token %d at position %d is outside the "
                             "vocabulary (%d)",
                             prompt[i], i, en->n_vocab);
    int64_t total = (int64_t)n_prompt + p->max_tokens;
    if (total > en->cfg.max_model_len)
        return loom_errf(e, LOOM_ETOOLONG,
                         "prompt (%d tokens) + max_tokens (%d) is over the model's context "
                         "length (%d)",
                         n_prompt, p->max_tokens, en->cfg.max_model_len);
    /* The last generated token is never fed back, so the KV holds at most total - 1 tokens. */
    if (kv_blocks_for(en->kv, (int)total - 1) > kv_num_blocks(en->kv))
        return loom_errf(e, LOOM_ETOOLONG,
                         "prompt (%d tokens) + max_tokens (%d) needs more KV blocks than the "
                         "cache has (%d of %d tokens)",
                         n_prompt, p->max_tokens, kv_num_blocks(en->kv), kv_block_size(en->kv));
    if (en->cfg.max_waiting > 0 && en->waiting.n >= en->cfg.max_waiting)
        return loom_errf(e, LOOM_EFULL, "the waiting queue is full (%d requests)", en->waiting.n);

    request *r = calloc(1, sizeof(*r));
    if (!r)
        return loom_errf(e, LOOM_ENOMEM, "out of memory for a request");
    r->id = req_id;
    r->params = *p;
    r->params.n_stop = 0;
    for (int i = 0; i < p->n_stop; i++) {
        r->params.stop[i] = strdup(p->stop[i]);
        if (!r->params.stop[i])
            goto nomem;
        r->params.n_stop++;
    }
    for (int i = p->n_stop; i < ENGINE_MAX_STOP; i++)
        r->params.stop[i] = NULL;
    r->tokens = malloc((size_t)total * sizeof(int32_t));
    if (!r->tokens)
        goto nomem;
    memcpy(r->tokens, prompt, (size_t)n_prompt * sizeof(int32_t));
    r->n_prompt = r->n_tokens = n_prompt;
    if (kv_seq_init(&r->seq, (int)total, en->cfg.block_size, e))
        goto nomem;
    r->seeded = p->seed >= 0;
    if (r->seeded)
        rng_seed(&r->rng, (uint64_t)p->seed);
    detok_init(&r->detok);
    buf_init(&r->text);
    for (int i = 0; i < r->params.n_stop; i++)
        if (strlen(r->params.stop[i]) > r->max_stop_len)
            r->max_stop_len = strlen(r->params.stop[i]);
    list_push_back(&en->waiting, r);
    return LOOM_OK;

nomem:
    request_free(r);
    return loom_errf(e, LOOM_ENOMEM, "out of memory for a request");
}

static void running_remove_at(engine *en, int i)
{
    memmove(en->running + i, en->running + i + 1,
            (size_t)(en->n_running - i - 1) * sizeof(*en->running));
    en->n_running--;
}

void engine_abort(engine *en, uint64_t req_id)
{
    for (int i = 0; i < en->n_running; i++) {
        request *r = en->running[i];
        if (r->id == req_id) {
            kv_seq_release(en->kv, &r->seq);
            running_remove_at(en, i);
            list_push_back(&en->aborted, r);
            return;
        }
    }
    for (request *r = en->waiting.head; r; r = r->next) {
        if (r->id == req_id) {
            list_remove(&en->waiting, r);
            list_push_back(&en->aborted, r);
            return;
        }
    }
}

bool engine_has_work(const engine *en)
{
    return en->n_running > 0 || en->waiting.n > 0 || en->aborted.n > 0;
}

/* ---------------------------------------------------------------- events */

static engine_event *event_new(engine *en, const request *r, int32_t token, finish_reason finish)
{
    if (en->n_events == en->cap_events) {
        int cap = en->cap_events * 2;
        en->events = xrealloc(en->events, (size_t)cap * sizeof(*en->events));
        en->event_text_off = xrealloc(en->event_text_off, (size_t)cap * sizeof(size_t));
        en->cap_events = cap;
    }
    engine_event *ev = &en->events[en->n_events];
    en->event_text_off[en->n_events] = en->event_text.len;
    en->n_events++;
    ev->req_id = r->id;
    ev->token = token;
    ev->logprob = 0;
    ev->n_top = 0;
    ev->text = NULL;
    ev->text_len = 0;
    ev->finish = finish;
    ev->prompt_tokens = r->n_prompt;
    ev->completion_tokens = n_output(r);
    ev->cached_tokens = r->n_cached;
    ev->first_token = token >= 0 && n_output(r) == 1;
    return ev;
}

/* Moves the next n not-yet-emitted bytes of r's text into the event. Events are built one after
 * another, so each event's text is the arena from its offset to the next event's. */
static void event_take_text(engine *en, engine_event *ev, request *r, size_t n)
{
    loom_buf *t = &r->text;
    buf_append(&en->event_text, t->data + r->n_context, n);
    ev->text_len = n;
    size_t emitted = r->n_context + n;
    size_t keep = 0;
    if (r->params.include_stop_str_in_output && r->max_stop_len > 1)
        keep = emitted < r->max_stop_len - 1 ? emitted : r->max_stop_len - 1;
    size_t drop = emitted - keep;
    if (drop) {
        t->len -= drop;
        memmove(t->data, t->data + drop, t->len);
        t->data[t->len] = 0;
    }
    r->n_context = keep;
}

static void events_finalize(engine *en)
{
    for (int i = 0; i < en->n_events; i++)
        en->events[i].text = en->event_text.data + en->event_text_off[i];
}

/* ---------------------------------------------------------------- stop strings */

/* Earliest occurrence of a stop string in text that ends after its first n_context bytes (those
 * were searched before); *len gets its length. -1 if none. */
static long find_stop(const sampling_params *p, const char *text, size_t n, size_t n_context,
                      size_t *len)
{
    long best = -1;
    for (int i = 0; i < p->n_stop; i++) {
        size_t sl = strlen(p->stop[i]);
        size_t from = n_context >= sl ? n_context - sl + 1 : 0;
        if (from + sl > n)
            continue;
        const char *hit = memmem(text + from, n - from, p->stop[i], sl);
        if (hit && (best < 0 || hit - text < best || (hit - text == best && sl > *len))) {
            best = hit - text;
            *len = sl;
        }
    }
    return best;
}

/* Length of the longest suffix of text that is a proper prefix of a stop string: text that must
 * be held back because the next tokens may complete a stop string there. */
static size_t stop_holdback(const sampling_params *p, const char *text, size_t n)
{
    size_t hold = 0;
    for (int i = 0; i < p->n_stop; i++) {
        size_t sl = strlen(p->stop[i]);
        for (size_t k = (sl - 1 < n ? sl - 1 : n); k > hold; k--) {
            if (memcmp(text + n - k, p->stop[i], k) == 0) {
                hold = k;
                break;
            }
        }
    }
    return hold;
}

/* ---------------------------------------------------------------- scheduling */

static void preempt(engine *en, int i)
{
    request *r = en->running[i];
    kv_seq_release(en->kv, &r->seq);
    r->n_computed = 0;
    running_remove_at(en, i);
    list_push_front(&en->waiting, r);
    en->n_preempted++;
}

/* Fills en->sched with (request, new tokens); returns how many. */
static int schedule(engine *en)
{
    int budget = en->cfg.max_num_batched_tokens;
    int n_sched = 0;
    bool preempted = false;

    for (int i = 0; i < en->n_running && budget > 0;) {
        request *r = en->running[i];
        int n_new = r->n_tokens - r->n_computed;
        if (n_new > budget)
            n_new = budget;
        bool self_preempted = false;
        while (kv_seq_allocate(en->kv, &r->seq, NULL, 0, 0, r->n_computed + n_new) != LOOM_OK) {
            /* Out of blocks: preempt the most recently admitted request. It is never one that was
             * scheduled already in this step (those come before index i). */
            int victim = en->n_running - 1;
            self_preempted = victim == i;
            preempt(en, victim);
            preempted = true;
            if (self_preempted)
                break;
        }
        if (self_preempted)
            break;
        en->sched[n_sched] = r;
        en->sched_new[n_sched] = n_new;
        n_sched++;
        budget -= n_new;
        i++;
    }

    if (preempted)
        return n_sched; /* as vLLM: no admissions in a step that had to preempt */

    while (en->waiting.head && budget > 0 && en->n_running < en->cfg.max_num_seqs) {
        request *r = en->waiting.head;
        uint64_t last_hash = 0;
        int n_hits = 0;
        if (en->cfg.enable_prefix_caching)
            n_hits = kv_find_cached(en->kv, r->tokens, r->n_tokens - 1, en->hit_blocks, &last_hash);
        int n_cached = n_hits * en->cfg.block_size;
        int n_new = r->n_tokens - n_cached;
        if (n_new > budget)
            n_new = budget;
        if (kv_seq_allocate(en->kv, &r->seq, en->hit_blocks, n_hits, last_hash, n_cached + n_new) !=
            LOOM_OK)
            break; /* FIFO: later requests wait behind this one */
        list_remove(&en->waiting, r);
        r->n_computed = n_cached;
        if (!r->admitted_once) {
            r->n_cached = n_cached;
            r->admitted_once = true;
        }
        if (en->cfg.enable_prefix_caching) {
            en->cache_queries += (uint64_t)r->n_tokens;
            en->cache_hits += (uint64_t)n_cached;
        }
        en->running[en->n_running++] = r;
        en->sched[n_sched] = r;
        en->sched_new[n_sched] = n_new;
        n_sched++;
        budget -= n_new;
    }
    return n_sched;
}

/* Flat batch of the scheduled chunks. A chunk that reaches its request's last token asks for the
 * logits of that token (rows in the order of the sequences). */
static void build_batch(engine *en, int n_sched, model_batch *b)
{
    int t = 0, n_logits = 0;
    for (int s = 0; s < n_sched; s++) {
        request *r = en->sched[s];
        int n_new = en->sched_new[s];
        en->seq_start[s] = t;
        en->ctx_len[s] = r->n_computed;
        en->block_tables[s] = r->seq.blocks;
        memcpy(en->batch_tokens + t, r->tokens + r->n_computed, (size_t)n_new * sizeof(int32_t));
        t += n_new;
        if (r->n_computed + n_new == r->n_tokens)
            en->logit_rows[n_logits++] = t - 1;
    }
    en->seq_start[n_sched] = t;
    memset(b, 0, sizeof(*b));
    b->n_seqs = n_sched;
    b->n_tokens = t;
    b->tokens = en->batch_tokens;
    b->seq_start = en->seq_start;
    b->ctx_len = en->ctx_len;
    b->block_tables = en->block_tables;
    b->n_logits = n_logits;
    b->logit_rows = en->logit_rows;
}

/* Samples r's next token from its logit row, appends it, and emits its event. Returns true when
 * the request finished. */
static bool process_token(engine *en, request *r, const float *row)
{
    const sampling_params *p = &r->params;
    int V = en->n_vocab;

    loom_rng *rng = r->seeded ? &r->rng : &en->rng;
    int32_t token = -1;
    bool mask_eos = n_output(r) < p->min_tokens && en->n_eos > 0;
    if (sampling_is_greedy(p)) {
        /* greedy reads the row in place, no copy per token; under the min_tokens mask the
         * unmasked argmax stands unless it is an EOS id (the lowest-id maximum stays the
         * lowest-id maximum once other tokens are masked) */
        token = sampling_argmax(row, V);
        if (mask_eos && is_eos(en, token))
            token = -1;
    }
    if (token < 0) {
        memcpy(en->sample_row, row, (size_t)V * sizeof(float));
        if (mask_eos) {
            for (int i = 0; i < en->n_eos; i++)
                if (en->eos[i] < V)
                    en->sample_row[en->eos[i]] = -INFINITY;
        }
        token = sampling_sample(en->sample_row, V, p, rng, en->sample_work);
    }

    r->tokens[r->n_tokens++] = token;
    en->generation_tokens_total++;
    if (n_output(r) == 1)
        en->prompt_tokens_total += (uint64_t)r->n_prompt;

    finish_reason finish = FINISH_NONE;
    bool eos_stop = !p->ignore_eos && n_output(r) >= p->min_tokens && is_eos(en, token);
    if (eos_stop)
        finish = FINISH_STOP;

    size_t emit = 0;
    bool cut = false;
    if (en->tok) {
        loom_buf *t = &r->text;
        size_t ctx = r->n_context;
        /* The EOS that ends a request is not part of its text (vLLM). */
        if (!eos_stop || p->include_stop_str_in_output)
            detok_push(en->tok, &r->detok, token, p->skip_special_tokens, t);
        bool check = p->n_stop > 0 && n_output(r) >= p->min_tokens;
        if (finish == FINISH_NONE && check && t->len > ctx) {
            size_t len = 0;
            long at = find_stop(p, t->data, t->len, ctx, &len);
            if (at >= 0) {
                finish = FINISH_STOP;
                emit = (size_t)at + (p->include_stop_str_in_output ? len : 0) - ctx;
                cut = true;
            }
        }
        if (!cut) {
            size_t hold = check && !p->include_stop_str_in_output
                              ? stop_holdback(p, t->data + ctx, t->len - ctx)
                              : 0;
            emit = t->len - ctx - hold;
        }
    }
    if (finish == FINISH_NONE &&
        (n_output(r) >= p->max_tokens || r->n_tokens >= en->cfg.max_model_len))
        finish = FINISH_LENGTH;
    if (finish != FINISH_NONE && en->tok && !cut) {
        detok_flush(&r->detok, &r->text);
        emit = r->text.len - r->n_context;
    }

    engine_event *ev = event_new(en, r, token, finish);
    if (p->logprobs >= 0) {
        ev->logprob = sampling_logprobs(row, V, token, p->logprobs, ev->top);
        ev->n_top = p->logprobs < V ? p->logprobs : V;
    }
    if (en->tok)
        event_take_text(en, ev, r, emit);
    return finish != FINISH_NONE;
}

int engine_step(engine *en, const engine_event **events, int *n_events, double *step_seconds,
                loom_err *e)
{
    en->n_events = 0;
    en->event_text.len = 0;
    if (step_seconds)
        *step_seconds = 0;

    while (en->aborted.head) {
        request *r = en->aborted.head;
        list_remove(&en->aborted, r);
        event_new(en, r, -1, FINISH_ABORT);
        request_free(r);
    }

    int n_sched = schedule(en);
    if (n_sched > 0) {
        model_batch b;
        build_batch(en, n_sched, &b);
        loom_err be = {0};
        double t0 = loom_now();
        int rc = en->backend.forward(en->backend.ctx, &b, en->logits, &be);
        if (step_seconds)
            *step_seconds = loom_now() - t0;
        en->steps++;
        if (rc != LOOM_OK) {
            LOG_ERROR("engine: backend %s failed: %s; finishing %d requests with an error",
                      en->backend.name ? en->backend.name : "?", be.msg, n_sched);
            for (int s = 0; s < n_sched; s++) {
                en->sched[s]->finished = true;
                kv_seq_release(en->kv, &en->sched[s]->seq);
                event_new(en, en->sched[s], -1, FINISH_ERROR);
            }
        } else {
            int row = 0;
            for (int s = 0; s < n_sched; s++) {
                request *r = en->sched[s];
                r->n_computed += en->sched_new[s];
                kv_seq_cache(en->kv, &r->seq, r->tokens, r->n_computed);
                if (r->n_computed < r->n_tokens)
                    continue; /* prefill chunk: no token yet */
                const float *logits = en->logits + (size_t)row * en->n_vocab;
                row++;
                if (process_token(en, r, logits)) {
                    r->finished = true;
                    kv_seq_release(en->kv, &r->seq);
                }
            }
        }
        /* Drop finished requests from the running list, keeping admission order. */
        int kept = 0;
        for (int i = 0; i < en->n_running; i++) {
            request *r = en->running[i];
            if (r->finished)
                request_free(r);
            else
                en->running[kept++] = r;
        }
        en->n_running = kept;
    }

    events_finalize(en);
    *events = en->events;
    *n_events = en->n_events;
    (void)e;
    return LOOM_OK;
}

/* ---------------------------------------------------------------- stats and checks */

void engine_get_stats(const engine *en, engine_stats *s)
{
    memset(s, 0, sizeof(*s));
    s->num_running = en->n_running;
    s->num_waiting = en->waiting.n;
    s->num_preempted_total = (int)en->n_preempted;
    s->num_kv_blocks = kv_num_blocks(en->kv);
    s->num_free_blocks = kv_num_free(en->kv);
    s->kv_usage = 1.0 - (double)s->num_free_blocks / s->num_kv_blocks;
    s->prompt_tokens_total = en->prompt_tokens_total;
    s->generation_tokens_total = en->generation_tokens_total;
    s->prefix_cache_queries = en->cache_queries;
    s->prefix_cache_hits = en->cache_hits;
    s->steps = en->steps;
}

int engine_check(const engine *en, loom_err *e)
{
    int rc = kv_check(en->kv, e);
    if (rc)
        return rc;
    int nb = kv_num_blocks(en->kv);
    int *refs = calloc((size_t)nb, sizeof(int));
    int *first_pos = malloc((size_t)nb * sizeof(int));
    if (!refs || !first_pos) {
        free(refs);
        free(first_pos);
        return loom_errf(e, LOOM_ENOMEM, "out of memory");
    }
    int live = 0;
    if (en->n_running > en->cfg.max_num_seqs) {
        rc = loom_errf(e, LOOM_EINVAL, "%d running > max_num_seqs %d", en->n_running,
                       en->cfg.max_num_seqs);
        goto out;
    }
    for (int i = 0; i < en->n_running; i++) {
        const request *r = en->running[i];
        const kv_seq *s = &r->seq;
        if (s->n_blocks < kv_blocks_for(en->kv, r->n_computed) || r->n_computed >= r->n_tokens) {
            rc = loom_errf(e, LOOM_EINVAL, "request %llu: %d blocks for %d computed of %d tokens",
                           (unsigned long long)r->id, s->n_blocks, r->n_computed, r->n_tokens);
            goto out;
        }
        for (int j = 0; j < s->n_blocks; j++) {
            int32_t b = s->blocks[j];
            if (b < 0 || b >= nb) {
                rc = loom_errf(e, LOOM_EINVAL, "request %llu: bad block id %d",
                               (unsigned long long)r->id, b);
                goto out;
            }
            if (refs[b]++ == 0) {
                first_pos[b] = j;
                live++;
            } else if (!kv_block_is_cached(en->kv, b) || first_pos[b] != j) {
                /* Only a cached full prefix block may be shared, at the same position. */
                rc = loom_errf(e, LOOM_EINVAL, "block %d shared at positions %d and %d (cached %d)",
                               b, first_pos[b], j, kv_block_is_cached(en->kv, b));
                goto out;
            }
        }
    }
    for (const request *r = en->waiting.head; r; r = r->next) {
        if (r->seq.n_blocks != 0 || r->n_computed != 0) {
            rc = loom_errf(e, LOOM_EINVAL, "waiting request %llu holds blocks",
                           (unsigned long long)r->id);
            goto out;
        }
    }
    for (int32_t b = 0; b < nb; b++) {
        if (refs[b] != kv_block_refcount(en->kv, b)) {
            rc = loom_errf(e, LOOM_EINVAL, "block %d: refcount %d but %d table references", b,
                           kv_block_refcount(en->kv, b), refs[b]);
            goto out;
        }
    }
    if (live + kv_num_free(en->kv) != nb) {
        rc = loom_errf(e, LOOM_EINVAL, "%d live + %d free blocks != %d", live, kv_num_free(en->kv),
                       nb);
        goto out;
    }
out:
    free(refs);
    free(first_pos);
    return rc;
}
