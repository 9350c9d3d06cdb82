/*
 * capacity_aware: the heterogeneous-serving paper's scheduler as loom implements it (the paper's
 * own pseudo-code is not public; see ../shared/papers/heterogeneous-inference.md section 5 and
 * docs/gateway.md for what is ours).
 *
 *   admission  instance s is eligible for request r when its KV use (reservations of its
 *              outstanding requests, corrected by its /metrics) plus r's prompt and expected
 *              output fits in θ·C_s (θ = 0.95 by default). An idle instance is always eligible.
 *   choice     the smallest expected finish time
 *                  T_s = (P_s + p_r - c_s(r)) / prefill_rate_s + (D_s + o_r) / decode_rate_s
 *              with P_s, D_s the prefill and decode tokens s still owes, p_r and o_r r's prompt
 *              and expected output, c_s(r) the prompt tokens s likely caches (prefix affinity,
 *              else 0). Rates come from the plan (or weights) and are refined online
 *              (policy.c, maybe_update_rates).
 *   waves      with the instance's max batch B known (the plan's max_batch), T_s is at least
 *                  W_s = floor(n / B) B (P_s / n / prefill_rate_s + D_s / n / decode_rate_s)
 *                        + ((m - 1) P_s / n + p_r - c_s(r)) / prefill_rate_s
 *                        + o_r (B / decode_rate_s) (f + (1 - f) m / B),   m = n mod B + 1
 *              (n outstanding requests). The instance is B slots filled in order: r waits for
 *              the full waves ahead of it (the mean outstanding request each), then runs with m
 *              sequences, one decode step lasting f + (1 - f) m / B of a full-batch step (f:
 *              decode_step_fixed, 0.5; the aggregate rate is the one at the full batch). The
 *              aggregate estimate is right for the instance's total work but lets a request
 *              past the B-th count as 1/B of a wave; in an offline batch the slow instance then
 *              gets a ninth request that runs alone after the first eight and sets the
 *              makespan. The waves bound says no request finishes before its own tokens are
 *              produced a step at a time. Its cost: for staggered requests (steady online
 *              load) the wait for a slot is overstated, up to one request's duration, which
 *              leans toward instances with free slots. The service clock (policy.c) counts
 *              a second at m < B sequences as the share of a full-batch second the step model
 *              gives them, so the learnt rates stay full-batch rates while a batch drains.
 *   slots      with B known and hold_beyond_batch (default), an instance running B requests
 *              is not eligible: the gateway holds r and places it when a slot frees, with what
 *              it knows then (late binding). Such an instance's finish time for r is at least
 *              the time until it has finished n - B + 1 of its requests (their remaining work
 *              from the streamed progress, one token per full-batch step: policy_slot_wait)
 *              plus r at the full-batch pace.
 *   waiting    none eligible: POLICY_QUEUE (the caller holds r and asks again when capacity
 *              frees). Also, by default (wait_for_soonest), when the soonest finish is on an
 *              instance that is not eligible: T_s counts the work that must drain before r, so
 *              waiting for that instance still finishes r sooner than sending it where there is
 *              room. Without this rule a slow instance with a large KV cache soaks up a burst
 *              while the fast one is full, and finishes its share long after the fast one is
 *              idle: in an offline batch on a 3.45x pair that costs over a third of the gain
 *              (tests/unit/policy/test_capacity_aware.c, test_offline_batch_beats_round_robin).
 *              Except (with hold_beyond_batch) when the instance with room finishes r before
 *              the cluster could drain what it owes plus what the gateway holds back
 *              (policy_set_backlog), at the instances' summed rates: then waiting for the
 *              faster one gains the batch nothing and leaves a slot idle. Without this the
 *              slow instance of a 3.4x pair took only the few requests short enough to beat
 *              the fast one's next slot and idled (1.99x round_robin live, 2.24x with it).
 *
 * Prefix affinity: each instance has an approximate index of the hashed prompt blocks sent to
 * it (a 4-way set-associative table with least-recently-used replacement, sized like a KV
 * cache), as SGLang's and llm-d's routers keep. The credit only shortens the prefill term, so a
 * hot prefix cannot pile load onto one instance: once its queue outweighs the saved prefill,
 * another instance finishes sooner.
 *
 * Ties (equal finish times, e.g. idle identical instances) go to the first in a scan that starts
 * one past the last chosen instance, so they rotate.
 */
#include "policy_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define WAYS 4

typedef struct prefix_index {
    uint64_t *keys;   /* (n_sets * WAYS), 0 = empty */
    uint32_t *stamps; /* (n_sets * WAYS), last use */
    size_t n_sets;    /* power of two */
    uint32_t clock;
} prefix_index;

typedef struct capacity_state {
    uint64_t cursor;
    prefix_index *index; /* (cap) per instance, allocated on first insert */
    int cap;
    size_t sets_per_index;
} capacity_state;

static int cap_init(policy *p, loom_err *e)
{
    (void)e;
    capacity_state *s = xcalloc(1, sizeof(*s));
    int blocks = p->cfg.prefix_index_blocks > WAYS ? p->cfg.prefix_index_blocks : 16384;
    size_t sets = 1;
    while (sets * WAYS < (size_t)blocks)
        sets *= 2;
    s->sets_per_index = sets;
    p->state = s;
    return LOOM_OK;
}

static void index_clear(prefix_index *ix)
{
    free(ix->keys);
    free(ix->stamps);
    memset(ix, 0, sizeof(*ix));
}

static void cap_dispose(policy *p)
{
    capacity_state *s = p->state;
    if (!s)
        return;
    for (int i = 0; i < s->cap; i++)
        index_clear(&s->index[i]);
    free(s->index);
    free(s);
    p->state = NULL;
}

static bool index_contains(const prefix_index *ix, uint64_t key)
{
    if (!ix->keys)
        return false;
    const uint64_t *set = ix->keys + (key & (ix->n_sets - 1)) * WAYS;
    for (int w = 0; w < WAYS; w++)
        if (set[w] == key)
            return true;
    return false;
}

static void index_insert(capacity_state *s, int instance, uint64_t key)
{
    if (instance >= s->cap) {
        int cap = s->cap ? s->cap : 4;
        while (cap <= instance)
            cap *= 2;
        s->index = xrealloc(s->index, (size_t)cap * sizeof(*s->index));
        memset(s->index + s->cap, 0, (size_t)(cap - s->cap) * sizeof(*s->index));
        s->cap = cap;
    }
    prefix_index *ix = &s->index[instance];
    if (!ix->keys) {
        ix->n_sets = s->sets_per_index;
        ix->keys = xcalloc(ix->n_sets * WAYS, sizeof(uint64_t));
        ix->stamps = xcalloc(ix->n_sets * WAYS, sizeof(uint32_t));
    }
    size_t base = (key & (ix->n_sets - 1)) * WAYS;
    uint32_t now = ++ix->clock;
    for (int w = 0; w < WAYS; w++) {
        if (ix->keys[base + w] == key) {
            ix->stamps[base + w] = now;
            return;
        }
    }
    /* an empty way, else the least recently used (unsigned ages survive the clock wrapping) */
    int victim = 0;
    for (int w = 0; w < WAYS; w++) {
        if (ix->keys[base + w] == 0) {
            victim = w;
            break;
        }
        if (now - ix->stamps[base + w] > now - ix->stamps[base + victim])
            victim = w;
    }
    ix->keys[base + victim] = key;
    ix->stamps[base + victim] = now;
}

double policy_capacity_prefix_credit(const policy *p, int instance, const policy_request *req)
{
    const capacity_state *s = p->state;
    if (!s || instance < 0 || instance >= s->cap || !req->prefix || req->n_prefix <= 0)
        return 0;
    const prefix_index *ix = &s->index[instance];
    int n = req->n_prefix < POLICY_MAX_PREFIX_BLOCKS ? req->n_prefix : POLICY_MAX_PREFIX_BLOCKS;
    int matched = 0;
    while (matched < n && index_contains(ix, req->prefix[matched]))
        matched++; /* chained hashes: a block matches only if every block before it did */
    double credit = matched * (req->prefix_block_tokens > 0 ? req->prefix_block_tokens : 0);
    double prompt = req->prompt_tokens > 0 ? req->prompt_tokens : 0;
    return credit < prompt ? credit : prompt;
}

/*
 * Held beyond a full batch: r starts when the instance has finished n - B + 1 of its n
 * outstanding requests (the gateway sends it then), at the soonest their remaining work allows
 * one token per full-batch step (policy_slot_wait), and then runs among B sequences. Never
 * before the aggregate estimate (all the work ahead at the aggregate rates).
 */
static double held_finish_time(policy *p, const policy_instance *s, int i,
                               const policy_request *req, double credit, double aggregate)
{
    double B = (double)s->max_batch;
    double pr = s->prefill_rate > 1e-9 ? s->prefill_rate : 1e-9;
    double dr = s->decode_rate > 1e-9 ? s->decode_rate : 1e-9;
    double prompt = req->prompt_tokens > 0 ? req->prompt_tokens : 0;
    double prefill = prompt - credit > 0 ? prompt - credit : 0;
    double out = req->expected_output > 0 ? req->expected_output : 0;
    int j = (int)(s->outstanding - s->max_batch + 1);
    double t = policy_slot_wait(p, i, j, B, pr, dr) + prefill / pr + out * B / dr;
    return t > aggregate ? t : aggregate;
}

/* Seconds for the available instances, working together at their aggregate rates, to finish
 * what they owe and what the caller holds back (r included, when the caller counts it). */
static double drain_time(const policy *p, const policy_instance *inst, int n,
                         const policy_request *req)
{
    double pf = p->backlog_prefill, dc = p->backlog_decode, pr = 0, dr = 0;
    for (int i = 0; i < n; i++) {
        if (!policy_candidate(inst, i, req))
            continue;
        pf += inst[i].pending_prefill;
        dc += inst[i].pending_decode;
        pr += inst[i].prefill_rate;
        dr += inst[i].decode_rate;
    }
    return (pr > 0 ? pf / pr : 0) + (dr > 0 ? dc / dr : 0);
}

static int cap_select(policy *p, const policy_instance *inst, int n, const policy_request *req,
                      double now)
{
    const capacity_state *s = p->state;
    int best = -1, best_any = -1;
    double best_t = INFINITY, best_any_t = INFINITY;
    for (int k = 0; k < n; k++) {
        int i = (int)((s->cursor + (uint64_t)k) % (uint64_t)n);
        if (!policy_candidate(inst, i, req))
            continue;
        double credit = p->cfg.prefix_affinity ? policy_capacity_prefix_credit(p, i, req) : 0;
        double t = policy_finish_time(&inst[i], req, credit);
        bool full = p->cfg.hold_beyond_batch && inst[i].max_batch > 0 &&
                    inst[i].outstanding >= inst[i].max_batch;
        if (full)
            t = held_finish_time(p, &inst[i], i, req, credit, t);
        /* strictly sooner (beyond rounding) wins; otherwise the earlier in the scan keeps it */
        if (best_any < 0 || t < best_any_t - 1e-12 * (fabs(best_any_t) + 1)) {
            best_any = i;
            best_any_t = t;
        }
        if (!policy_admits(p, &inst[i], req, now) || full)
            continue;
        if (best < 0 || t < best_t - 1e-12 * (fabs(best_t) + 1)) {
            best = i;
            best_t = t;
        }
    }
    if (best_any < 0)
        return POLICY_UNAVAILABLE;
    if (best < 0)
        return POLICY_QUEUE;
    /* The soonest finish is on an instance without headroom: the request finishes sooner by
     * waiting for it (its finish time already counts the work that must drain first) than by
     * going where there is room, unless the room is a free slot that finishes it before the
     * whole cluster can drain what it has and what waits: then waiting gains nothing for the
     * batch and leaves the slot idle. */
    if (best != best_any && p->cfg.wait_for_soonest &&
        !(p->cfg.hold_beyond_batch && best_t <= drain_time(p, inst, n, req)))
        return POLICY_QUEUE;
    return best;
}

static void cap_dispatch(policy *p, const policy_instance *inst, int n, int chosen,
                         const policy_request *req, double now)
{
    (void)inst;
    (void)n;
    (void)now;
    capacity_state *s = p->state;
    s->cursor = (uint64_t)chosen + 1;
    if (!p->cfg.prefix_affinity || !req->prefix)
        return;
    int m = req->n_prefix < POLICY_MAX_PREFIX_BLOCKS ? req->n_prefix : POLICY_MAX_PREFIX_BLOCKS;
    for (int b = 0; b < m; b++)
        index_insert(s, chosen, req->prefix[b]);
}

static void cap_reset(policy *p, int instance)
{
    capacity_state *s = p->state;
    if (instance >= 0 && instance < s->cap)
        index_clear(&s->index[instance]);
}

const policy_ops policy_capacity_aware_ops = {
    .name = "capacity_aware",
    .summary = "soonest expected finish among instances with KV room, else wait",
    .init = cap_init,
    .select = cap_select,
    .on_dispatch = cap_dispatch,
    .on_reset = cap_reset,
    .dispose = cap_dispose,
};
