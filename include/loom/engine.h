/*
 * engine: the clock-agnostic inference core. Request lifecycle, continuous-batching scheduler
 * (chunked prefill under a token budget mixed with decodes, preemption by recompute), paged KV
 * block manager with automatic prefix caching, sampling, incremental detokenization and stop
 * strings. engine_step() forms one batch, runs it on the backend and returns what happened and
 * how long the step took. `loom serve` drives it in real time; `loom sim` on a virtual clock.
 *
 * Not thread-safe: one thread owns an engine (the server talks to it through queues).
 */
#ifndef LOOM_ENGINE_H
#define LOOM_ENGINE_H

#include "loom/base.h"
#include "loom/model.h"
#include "loom/tokenizer.h"

#include <stdbool.h>
#include <stdint.h>

/* ---------------------------------------------------------------- backends */

/* A backend runs batches. The engine owns block allocation; the backend owns KV storage. */
typedef struct engine_backend {
    const char *name;   /* "cpu", "cuda", "emulated" */
    void *ctx;
    /* Run b (see model_batch); write logits (n_logits, V). */
    int (*forward)(void *ctx, const model_batch *b, float *logits, loom_err *e);
    void (*destroy)(void *ctx);
} engine_backend;

/* CPU backend over a loaded model: allocates num_blocks KV blocks. Does not own m. */
int engine_backend_cpu_create(model *m, int num_blocks, int block_size, engine_backend *out,
                              loom_err *e);

/* ---------------------------------------------------------------- requests */

#define ENGINE_MAX_STOP 8
#define ENGINE_MAX_LOGPROBS 20

typedef struct sampling_params {
    float temperature;   /* 0 = greedy */
    float top_p;         /* 1 = off */
    int top_k;           /* <= 0 = off */
    int64_t seed;        /* < 0 = unseeded */
    int max_tokens;      /* >= 1 */
    int min_tokens;      /* EOS and stop strings are ignored before this many tokens */
    bool ignore_eos;
    int logprobs;        /* top-N logprobs per generated token, 0..ENGINE_MAX_LOGPROBS; -1 off */
    int n_stop;
    char *stop[ENGINE_MAX_STOP];       /* owned by the engine once added (copied) */
    bool include_stop_str_in_output;
    bool skip_special_tokens;          /* in decoded text (default true) */
} sampling_params;

void sampling_params_default(sampling_params *p);

typedef enum {
    FINISH_NONE = 0,
    FINISH_STOP,    /* EOS or a stop string */
    FINISH_LENGTH,  /* max_tokens or the context limit */
    FINISH_ABORT,   /* aborted by the client */
    FINISH_ERROR,   /* backend failure */
} finish_reason;
const char *finish_reason_str(finish_reason r); /* "stop", "length", "abort", "error" */

typedef struct engine_logprob {
    int32_t token;
    float logprob;
} engine_logprob;

/* One thing that happened to one request in a step. Strings are valid until the next step. */
typedef struct engine_event {
    uint64_t req_id;
    int32_t token;          /* the new token, or -1 when the event only finishes the request */
    float logprob;          /* of token, when logprobs >= 0 */
    int n_top;
    engine_logprob top[ENGINE_MAX_LOGPROBS];
    const char *text;       /* text delta (complete UTF-8 characters; stop strings cut) */
    size_t text_len;
    finish_reason finish;
    int prompt_tokens;
    int completion_tokens;  /* so far */
    int cached_tokens;      /* prompt tokens served from the prefix cache */
    bool first_token;       /* this event carries the first generated token */
} engine_event;

/* ---------------------------------------------------------------- engine */

typedef struct engine_config {
    int block_size;              /* tokens per KV block (16) */
    int num_kv_blocks;           /* total blocks */
    int max_num_seqs;            /* running sequences at most (256) */
    int max_num_batched_tokens;  /* token budget per step (2048) */
    int max_model_len;           /* prompt + generated at most (model's max positions) */
    int max_waiting;             /* waiting queue bound; engine_add returns LOOM_EFULL beyond */
    bool enable_prefix_caching;  /* (true) */
    uint64_t seed;               /* engine rng for requests without a seed (0) */
} engine_config;

void engine_config_default(engine_config *c);

typedef struct engine engine;

/* tok may be NULL (no text in events, no stop strings). The engine takes ownership of backend,
 * also when it fails (the backend is destroyed then). cfg->num_kv_blocks must be the number of
 * blocks the backend was created with. max_model_len <= 0 means the model's
 * max_position_embeddings. All step buffers are allocated here, for the worst case. */
int engine_create(const engine_config *cfg, const model_config *mc, engine_backend backend,
                  const tokenizer *tok, engine **out, loom_err *e);
void engine_free(engine *en);

/* Queue a request. prompt is copied; p's stop strings are copied. Errors: LOOM_EINVAL (bad
 * params, empty prompt, token out of vocab), LOOM_ETOOLONG (prompt + max_tokens over
 * max_model_len, or more blocks than the cache has), LOOM_EFULL (waiting queue full).
 * req_id must be unique among the requests not yet finished. Once added, a request gets exactly
 * one event with finish != FINISH_NONE, after which the engine forgets it. */
int engine_add(engine *en, uint64_t req_id, const int32_t *prompt, int n_prompt,
               const sampling_params *p, loom_err *e);
/* Abort: the request's blocks are freed now; a FINISH_ABORT event is emitted next step.
 * Unknown ids are ignored. */
void engine_abort(engine *en, uint64_t req_id);
bool engine_has_work(const engine *en);

/* One scheduler step. *events points into engine storage valid until the next call (event text
 * included; finished requests are already freed, their events stay valid).
 * step_seconds: wall time of the backend forward (0 when nothing ran).
 * A backend failure does not fail the step: the batch's requests finish with FINISH_ERROR events
 * (the message is logged) and 0 is returned, so callers must always deliver the events. */
int engine_step(engine *en, const engine_event **events, int *n_events, double *step_seconds,
                loom_err *e);

typedef struct engine_stats {
    int num_running;
    int num_waiting;
    int num_preempted_total;
    int num_kv_blocks;
    int num_free_blocks;          /* free (including evictable cached) */
    double kv_usage;              /* 1 - free/total, in [0,1] */
    uint64_t prompt_tokens_total;
    uint64_t generation_tokens_total;
    uint64_t prefix_cache_queries; /* prompt tokens looked up */
    uint64_t prefix_cache_hits;    /* prompt tokens found */
    uint64_t steps;
} engine_stats;
void engine_get_stats(const engine *en, engine_stats *s);

/* Consistency check for tests: block refcounts equal the live block tables' references, shared
 * blocks are cached prefix blocks, waiting requests hold no blocks, counts add up. O(blocks +
 * requests); 0 or LOOM_EINVAL with the first violation in e. */
int engine_check(const engine *en, loom_err *e);

/* ---------------------------------------------------------------- sampling (pure functions) */

/* Index of the largest logit, ties to the lowest id. */
int32_t sampling_argmax(const float *logits, int n_vocab);
int32_t sampling_argmax_ref(const float *logits, int n_vocab); /* naive loop: the oracle */
/*
 * Draws one token from logits (n_vocab) under p: temperature 0 (below 1e-5) is greedy; otherwise
 * logits / temperature, then top_k (the k largest; ties to the lower id), then top_p (the
 * shortest prefix of the sorted, renormalised distribution whose mass reaches top_p, at least
 * one token), then one draw from rng. Overwrites logits (pass a scratch copy); work: (n_vocab).
 */
int32_t sampling_sample(float *logits, int n_vocab, const sampling_params *p, loom_rng *rng,
                        int32_t *work);
/* sampling_sample under p is the argmax (temperature below 1e-5, or top_k 1), which reads the
 * logits without changing them. */
bool sampling_is_greedy(const sampling_params *p);
/*
 * log_softmax of the RAW logits (before temperature, top_k/top_p and the min_tokens EOS mask;
 * vLLM's "raw_logprobs"): returns the logprob of token and writes the n_top most likely tokens
 * (descending, ties to the lower id) to top.
 */
float sampling_logprobs(const float *logits, int n_vocab, int32_t token, int n_top,
                        engine_logprob *top);

#endif
