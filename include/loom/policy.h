/*
 * policy: dispatch policies. Given a snapshot of the instances behind a gateway (their health,
 * capacity, outstanding work and KV use), pick the instance for the next request, or say that it
 * must wait. The gateway and the simulator call the same code, so what the simulator predicts is
 * what the gateway does. Pure code: no sockets, no threads, no clock (every call takes `now`, in
 * seconds on whatever clock the caller keeps).
 *
 * Three layers:
 *   policy_instance     the snapshot row of one instance, a plain struct the caller owns (one
 *                       array, indexed by instance). The caller sets the fields in the first
 *                       section; policy_dispatch / policy_progress / policy_complete /
 *                       policy_observe_metrics maintain the rest, so that every driver keeps the
 *                       same books.
 *   policy (opaque)     one policy: a table of functions (init/select/on_dispatch/on_complete/
 *                       on_reset/dispose, after h2o's balancers) plus its private state (the
 *                       round-robin cursor, the prefix index, ...). policy_create by name.
 *   helpers             the expected-output-length model and prompt prefix hashing.
 *
 * Policies: round_robin, random, least_requests, power_of_two, weighted_round_robin,
 * capacity_aware (the heterogeneous-serving paper's scheduler as loom implements it; see
 * src/policy/capacity_aware.c and docs/gateway.md).
 *
 * Depends on base only.
 */
#ifndef LOOM_POLICY_H
#define LOOM_POLICY_H

#include "loom/base.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* policy_select's answers besides an instance index */
#define POLICY_QUEUE (-1)       /* instances are available but none admits the request now */
#define POLICY_UNAVAILABLE (-2) /* no instance may receive requests (unhealthy, drained, avoided)  \
                                 */

#define POLICY_MAX_AVOID 8           /* instances a retry may exclude */
#define POLICY_MAX_PREFIX_BLOCKS 256 /* hashed prompt blocks a request carries at most */

/* ---------------------------------------------------------------- configuration */

typedef struct policy_config {
    uint64_t seed;            /* random and power_of_two */
    double kv_headroom;       /* θ: admit while KV use + need <= θ x capacity (0.95) */
    double rate_ema_alpha;    /* weight of one rate observation in the moving average (0.2) */
    double rate_window_s;     /* service seconds gathered per rate observation (0.5) */
    double metrics_max_age_s; /* a /metrics correction older than this is ignored (5) */
    bool prefix_affinity;     /* capacity_aware: credit instances with cached prompt prefixes */
    bool wait_for_soonest;    /* capacity_aware: queue when the soonest-finish instance lacks
                                 KV headroom rather than use a slower one with room (true) */
    int prefix_index_blocks;  /* per-instance prefix index size, in blocks (16384) */
    /* capacity_aware: rates per unit of weight when an instance has none (tokens/s) */
    double default_prefill_rate; /* 4000 */
    double default_decode_rate;  /* 400 */
    /* capacity_aware, instances with a known max_batch: the share of a full-batch decode step
     * that does not shrink with fewer sequences (reading the weights, fixed overheads). 0: the
     * aggregate rate holds at any occupancy (no waves); 1: a sequence decodes at
     * decode_rate / max_batch however few run. (0.5) */
    double decode_step_fixed;
    /* capacity_aware, instances with a known max_batch: an instance with max_batch requests
     * outstanding takes no more; the gateway holds the rest and places each when a slot frees,
     * with what it knows then (true) */
    bool hold_beyond_batch;
} policy_config;

void policy_config_default(policy_config *c);

/* ---------------------------------------------------------------- instance snapshot */

typedef struct policy_instance {
    /* --- set by the caller (policy_instance_init fills defaults) */
    bool available;           /* healthy and not drained: may receive new requests */
    double weight;            /* static capacity weight, > 0 (weighted_round_robin; rate prior) */
    double prefill_rate;      /* prompt tokens/s while busy: the plan's figure, refined online */
    double decode_rate;       /* output tokens/s, all sequences together, while busy: likewise */
    double kv_capacity;       /* KV cache size in tokens; 0 = unknown */
    int64_t max_batch;        /* sequences it runs at once (the plan's max_batch); 0 = unknown:
                                 finish times from the aggregate rates alone */
    double decode_step_fixed; /* policy_config.decode_step_fixed, copied by init */

    /* --- maintained by policy_dispatch / policy_progress / policy_complete */
    int64_t outstanding;    /* requests sent and not finished */
    double pending_prefill; /* prompt tokens sent and not yet prefilled (after prefix credit) */
    double pending_decode;  /* expected output tokens sent and not yet generated */
    double kv_reserved;     /* sum of prompt + expected output of the outstanding requests */
    double kv_held;         /* sum of prompt + output produced so far: KV likely in use */
    int64_t dispatched;     /* requests sent, ever */
    int64_t completed;      /* requests finished, ever (success or failure) */
    int64_t failed;         /* of which failed */
    /* rate refinement (see policy_complete) */
    double busy_mark;      /* last time the service clock was advanced */
    double service_clock;  /* integral of 1/outstanding over busy time: the seconds of service
                              one request received, if the instance shares itself evenly */
    double window_service; /* service seconds of the requests finished in the window */
    double window_prefill; /* their prompt tokens */
    double window_decode;  /* their output tokens */
    int64_t rate_updates;  /* observations folded into the rates so far */

    /* --- maintained by policy_observe_metrics (from the instance's /metrics) */
    double kv_external;  /* KV tokens in use beyond what kv_held explains (other clients...) */
    double metrics_at;   /* time of the last observation; < 0: never */
    double kv_usage;     /* last vllm:kv_cache_usage_perc (0..1); < 0 unknown */
    int64_t num_running; /* last vllm:num_requests_running; < 0 unknown */
    int64_t num_waiting; /* last vllm:num_requests_waiting; < 0 unknown */
} policy_instance;

/*
 * Zeroes inst and sets the caller's fields. Rates of 0 become weight x the config's default
 * rates; weight <= 0 becomes 1. Available by default; max_batch 0 (unknown) until the caller
 * sets it.
 */
void policy_instance_init(policy_instance *inst, const policy_config *cfg, double weight,
                          double prefill_rate, double decode_rate, double kv_capacity_tokens);

/* ---------------------------------------------------------------- requests and tickets */

typedef struct policy_request {
    double prompt_tokens;   /* (estimated) prompt length */
    double expected_output; /* max_tokens when given, else policy_lengths_expected */
    /* chained hashes of the prompt's first full blocks (policy_prefix_hashes); may be NULL */
    const uint64_t *prefix;
    int n_prefix;
    double prefix_block_tokens;  /* tokens per hashed block */
    int avoid[POLICY_MAX_AVOID]; /* instances not to choose (already failed this request) */
    int n_avoid;
} policy_request;

/* What one dispatched request charged to its instance; the caller keeps it until completion. */
typedef struct policy_ticket {
    int instance;
    double prompt;        /* prompt tokens charged */
    double credit;        /* of which expected to be cached (prefix affinity) */
    double output;        /* expected output tokens charged */
    double prefill_left;  /* still in the instance's pending_prefill */
    double decode_left;   /* still in its pending_decode */
    double kv;            /* reserved in kv_reserved */
    double produced;      /* output tokens seen so far */
    double dispatched_at; /* now at policy_dispatch */
    double service_start; /* the instance's service_clock at policy_dispatch */
    int slot;             /* its entry in the policy's table of outstanding work (-1: none) */
    bool active;          /* charged and not yet completed */
} policy_ticket;

/* How a request ended, for policy_complete. Unknown counts are < 0 (the charged figures are
 * used instead). */
typedef struct policy_outcome {
    bool ok;                  /* the instance served it (a failure never feeds the rates) */
    double prompt_tokens;     /* usage.prompt_tokens */
    double completion_tokens; /* usage.completion_tokens, or counted stream frames */
} policy_outcome;

/* What an instance's /metrics said. Unknown fields are < 0. */
typedef struct policy_metrics {
    double num_running;
    double num_waiting;
    double kv_usage;           /* 0..1 */
    double kv_capacity_tokens; /* KV blocks x block size, when the instance tells */
} policy_metrics;

/* ---------------------------------------------------------------- policies */

typedef struct policy policy;

/*
 * A policy's table of functions. select must not change the snapshot; on_dispatch and
 * on_complete let a policy keep private state (cursors, prefix indexes). Indices are positions
 * in the caller's array, which may grow between calls (never shrink or reorder).
 */
typedef struct policy_ops {
    const char *name;
    const char *summary; /* one line for --help */
    int (*init)(policy *p, loom_err *e);
    int (*select)(policy *p, const policy_instance *inst, int n, const policy_request *req,
                  double now);
    void (*on_dispatch)(policy *p, const policy_instance *inst, int n, int chosen,
                        const policy_request *req, double now);
    void (*on_complete)(policy *p, int instance, const policy_ticket *t, bool ok, double now);
    void (*on_reset)(policy *p, int instance); /* the instance restarted: forget its cache */
    void (*dispose)(policy *p);
} policy_ops;

/* The registry, for lookups and for listing in --help. */
int policy_count(void);
const policy_ops *policy_at(int i);
const policy_ops *policy_find(const char *name);

/* A policy by name; unknown names are LOOM_ENOTFOUND with the list of known ones. */
int policy_create(const char *name, const policy_config *cfg, policy **out, loom_err *e);
void policy_free(policy *p);
const char *policy_name(const policy *p);
const policy_config *policy_get_config(const policy *p);

/*
 * The work the caller holds back (queued requests' prompt tokens and expected output, the one
 * being placed included), for capacity_aware's projection of when the cluster drains: a slower
 * instance with a free slot takes a request it finishes before then rather than leave it to
 * wait for a faster, full one. Stays until set again (0 at creation).
 */
void policy_set_backlog(policy *p, double prefill_tokens, double decode_tokens);

/*
 * The instance for req: an index in [0, n), POLICY_QUEUE or POLICY_UNAVAILABLE. Unavailable
 * instances and req->avoid are never chosen.
 */
int policy_select(policy *p, const policy_instance *inst, int n, const policy_request *req,
                  double now);

/* req goes to inst[chosen]: charges its work and fills t. */
void policy_dispatch(policy *p, policy_instance *inst, int n, int chosen, const policy_request *req,
                     double now, policy_ticket *t);

/* A streamed request has produced `produced` output tokens so far (the first one ends its
 * prefill). Optional: non-streaming requests go straight to policy_complete. */
void policy_progress(policy *p, policy_instance *inst, policy_ticket *t, double produced,
                     double now);

/*
 * The request ended: releases what its ticket charged and, when it succeeded, folds its tokens
 * and the service it received into the instance's rate estimate. Idempotent.
 */
void policy_complete(policy *p, policy_instance *inst, policy_ticket *t, const policy_outcome *o,
                     double now);

/* The instance's /metrics: corrects the KV estimate and, when it reports its KV size, the
 * capacity. */
void policy_observe_metrics(const policy *p, policy_instance *inst, const policy_metrics *m,
                            double now);

/* The instance restarted or was ejected: forget what it was believed to cache. */
void policy_reset_instance(policy *p, int instance);

/* ---------------------------------------------------------------- capacity model */

/* KV tokens the instance is believed to hold or have promised (reservations plus the fresh
 * /metrics correction). */
double policy_kv_used(const policy *p, const policy_instance *inst, double now);
/* Whether inst can take req under the KV headroom θ (an idle instance always can). */
bool policy_admits(const policy *p, const policy_instance *inst, const policy_request *req,
                   double now);
/*
 * Expected seconds until inst finishes req if req were sent now, with `credit` prompt tokens of
 * req assumed cached: its queued prefill and decode work plus req's, over its rates; when its
 * max_batch is known, at least the wait for a free slot plus req's own service at the speed of
 * one sequence among those it runs with (capacity_aware.c explains the model).
 */
double policy_finish_time(const policy_instance *inst, const policy_request *req, double credit);
/* Prompt tokens of req that instance `instance` likely caches (prefix_affinity only; else 0). */
double policy_prefix_credit(const policy *p, int instance, const policy_request *req);

/* ---------------------------------------------------------------- expected lengths */

#define POLICY_LENGTH_MODELS 64

/*
 * Running estimates per model name: mean output tokens (when a request gives no max_tokens) and
 * prompt characters per token (to size text prompts before the instance tokenizes them). A mean
 * for the first observations, then an exponential moving average.
 */
typedef struct policy_length_model {
    double default_output;  /* before any observation (256) */
    double chars_per_token; /* before any observation (4) */
    struct {
        uint64_t key; /* hash of the model name; 0 = empty */
        int64_t n_out, n_prompt;
        double mean_out;
        double chars_per_token;
    } slot[POLICY_LENGTH_MODELS];
} policy_length_model;

void policy_lengths_init(policy_length_model *m, double default_output, double chars_per_token);
/* max_tokens if given (> 0), else the running mean output for model (NULL: the default slot). */
double policy_lengths_expected(const policy_length_model *m, const char *model, int64_t max_tokens);
/* Prompt tokens of a text of `chars` characters. */
double policy_lengths_prompt_tokens(const policy_length_model *m, const char *model, double chars);
double policy_lengths_chars_per_token(const policy_length_model *m, const char *model);
void policy_lengths_observe(policy_length_model *m, const char *model, double prompt_chars,
                            double prompt_tokens, double completion_tokens);

/* ---------------------------------------------------------------- prompt prefixes */

/*
 * Chained hashes of the full `block_bytes`-byte blocks of data (a partial last block is not
 * hashed: caches hold full blocks): out[i] = hash(block i, out[i-1]). Writes at most max,
 * returns how many.
 */
int policy_prefix_hashes(const void *data, size_t len, size_t block_bytes, uint64_t seed,
                         uint64_t *out, int max);

#endif
