/*
 * The baseline policies: they look at availability and request counts only, never at capacity
 * or KV, and never hold a request back (no available instance is the only "no").
 *
 *   round_robin           next available instance after the last one chosen
 *   random                uniform over the available instances
 *   least_requests        fewest outstanding requests; ties rotate
 *   power_of_two          two distinct random candidates, the one with fewer outstanding
 *   weighted_round_robin  smooth weighted round robin (nginx's): over any window, instance i
 *                         gets weight_i / sum(weights) of the requests, interleaved
 *
 * select is pure (random draws aside); the cursors move in on_dispatch, so that a select that
 * is not followed by a dispatch changes nothing.
 */
#include "policy_internal.h"

#include <stdlib.h>
#include <string.h>

typedef struct cursor_state {
    uint64_t cursor; /* where the next scan starts */
} cursor_state;

static int cursor_init(policy *p, loom_err *e)
{
    (void)e;
    p->state = xcalloc(1, sizeof(cursor_state));
    return LOOM_OK;
}

static void state_dispose(policy *p)
{
    free(p->state);
    p->state = NULL;
}

static void cursor_after(policy *p, const policy_instance *inst, int n, int chosen,
                         const policy_request *req, double now)
{
    (void)inst;
    (void)n;
    (void)req;
    (void)now;
    ((cursor_state *)p->state)->cursor = (uint64_t)chosen + 1;
}

/* ---------------------------------------------------------------- round_robin */

static int rr_select(policy *p, const policy_instance *inst, int n, const policy_request *req,
                     double now)
{
    (void)now;
    uint64_t start = ((cursor_state *)p->state)->cursor;
    for (int k = 0; k < n; k++) {
        int i = (int)((start + (uint64_t)k) % (uint64_t)n);
        if (policy_candidate(inst, i, req))
            return i;
    }
    return POLICY_UNAVAILABLE;
}

const policy_ops policy_round_robin_ops = {
    .name = "round_robin",
    .summary = "each available instance in turn",
    .init = cursor_init,
    .select = rr_select,
    .on_dispatch = cursor_after,
    .dispose = state_dispose,
};

/* ---------------------------------------------------------------- random */

/* Reservoir sampling over the candidates: no allocation, one pass. */
static int random_select(policy *p, const policy_instance *inst, int n, const policy_request *req,
                         double now)
{
    (void)now;
    int chosen = POLICY_UNAVAILABLE, seen = 0;
    for (int i = 0; i < n; i++) {
        if (!policy_candidate(inst, i, req))
            continue;
        seen++;
        if (rng_next(&p->rng) % (uint64_t)seen == 0)
            chosen = i;
    }
    return chosen;
}

const policy_ops policy_random_ops = {
    .name = "random",
    .summary = "uniformly at random among the available instances",
    .select = random_select,
};

/* ---------------------------------------------------------------- least_requests */

static int lr_select(policy *p, const policy_instance *inst, int n, const policy_request *req,
                     double now)
{
    (void)now;
    uint64_t start = ((cursor_state *)p->state)->cursor;
    int best = POLICY_UNAVAILABLE;
    for (int k = 0; k < n; k++) {
        int i = (int)((start + (uint64_t)k) % (uint64_t)n);
        if (!policy_candidate(inst, i, req))
            continue;
        if (best < 0 || inst[i].outstanding < inst[best].outstanding)
            best = i;
    }
    return best;
}

const policy_ops policy_least_requests_ops = {
    .name = "least_requests",
    .summary = "the instance with the fewest outstanding requests",
    .init = cursor_init,
    .select = lr_select,
    .on_dispatch = cursor_after,
    .dispose = state_dispose,
};

/* ---------------------------------------------------------------- power_of_two */

static int p2_select(policy *p, const policy_instance *inst, int n, const policy_request *req,
                     double now)
{
    (void)now;
    /* two distinct candidates by reservoir sampling (a uniform 2-subset, in random order) */
    int a = -1, b = -1, seen = 0;
    for (int i = 0; i < n; i++) {
        if (!policy_candidate(inst, i, req))
            continue;
        seen++;
        if (seen == 1) {
            a = i;
        } else if (seen == 2) {
            b = i;
        } else {
            uint64_t r = rng_next(&p->rng) % (uint64_t)seen;
            if (r == 0)
                a = i;
            else if (r == 1)
                b = i;
        }
    }
    if (a < 0)
        return POLICY_UNAVAILABLE;
    if (b < 0)
        return a;
    if (rng_next(&p->rng) & 1) { /* random order, so that ties do not favour lower indices */
        int t = a;
        a = b;
        b = t;
    }
    return inst[b].outstanding < inst[a].outstanding ? b : a;
}

const policy_ops policy_power_of_two_ops = {
    .name = "power_of_two",
    .summary = "of two random instances, the one with fewer outstanding requests",
    .select = p2_select,
};

/* ---------------------------------------------------------------- weighted_round_robin */

typedef struct wrr_state {
    double *current; /* (cap) nginx's current_weight per instance */
    int cap;
} wrr_state;

static int wrr_init(policy *p, loom_err *e)
{
    (void)e;
    p->state = xcalloc(1, sizeof(wrr_state));
    return LOOM_OK;
}

static void wrr_dispose(policy *p)
{
    wrr_state *s = p->state;
    if (s)
        free(s->current);
    free(s);
    p->state = NULL;
}

static double wrr_current(const wrr_state *s, int i)
{
    return i < s->cap ? s->current[i] : 0;
}

static int wrr_select(policy *p, const policy_instance *inst, int n, const policy_request *req,
                      double now)
{
    (void)now;
    const wrr_state *s = p->state;
    int best = POLICY_UNAVAILABLE;
    double best_v = 0;
    for (int i = 0; i < n; i++) {
        if (!policy_candidate(inst, i, req))
            continue;
        double v = wrr_current(s, i) + inst[i].weight;
        if (best < 0 || v > best_v) {
            best = i;
            best_v = v;
        }
    }
    return best;
}

/* nginx: every candidate gains its weight; the chosen one pays the total. */
static void wrr_dispatch(policy *p, const policy_instance *inst, int n, int chosen,
                         const policy_request *req, double now)
{
    (void)now;
    wrr_state *s = p->state;
    if (n > s->cap) {
        s->current = xrealloc(s->current, (size_t)n * sizeof(double));
        memset(s->current + s->cap, 0, (size_t)(n - s->cap) * sizeof(double));
        s->cap = n;
    }
    double total = 0;
    for (int i = 0; i < n; i++) {
        if (!policy_candidate(inst, i, req) && i != chosen)
            continue;
        s->current[i] += inst[i].weight;
        total += inst[i].weight;
    }
    s->current[chosen] -= total;
}

const policy_ops policy_weighted_round_robin_ops = {
    .name = "weighted_round_robin",
    .summary = "in proportion to static capacity weights, interleaved",
    .init = wrr_init,
    .select = wrr_select,
    .on_dispatch = wrr_dispatch,
    .dispose = wrr_dispose,
};
