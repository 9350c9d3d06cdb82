/* Shared by the files of src/policy: the policy object and the per-policy tables. */
#ifndef LOOM_POLICY_INTERNAL_H
#define LOOM_POLICY_INTERNAL_H

#include "loom/policy.h"

/* One outstanding request's remaining work, as its ticket last reported it. */
typedef struct policy_work {
    int instance; /* -1: a free entry */
    double prefill_left, decode_left;
} policy_work;

struct policy {
    const policy_ops *ops;
    policy_config cfg;
    loom_rng rng;
    void *state; /* the policy's own, made by init, freed by dispose */
    /* every outstanding request's remaining work (ticket.slot indexes it), for the time until
     * a full instance frees a slot (policy_slot_wait) */
    policy_work *work;
    int n_work, cap_work;
    double *scratch; /* (cap_work) */
    double backlog_prefill, backlog_decode; /* policy_set_backlog */
};

/* Seconds until instance i (of max batch B, rates pr and dr) has finished j of its outstanding
 * requests: the j-th smallest of prefill_left / pr + decode_left B / dr over them (a running
 * sequence gets one token per full-batch step). 0 when it has fewer than j outstanding. */
double policy_slot_wait(policy *p, int instance, int j, double B, double pr, double dr);

extern const policy_ops policy_round_robin_ops;
extern const policy_ops policy_random_ops;
extern const policy_ops policy_least_requests_ops;
extern const policy_ops policy_power_of_two_ops;
extern const policy_ops policy_weighted_round_robin_ops;
extern const policy_ops policy_capacity_aware_ops;

/* Whether inst[i] may take req: available and not on req's avoid list. */
static inline bool policy_candidate(const policy_instance *inst, int i, const policy_request *req)
{
    if (!inst[i].available)
        return false;
    if (req)
        for (int k = 0; k < req->n_avoid && k < POLICY_MAX_AVOID; k++)
            if (req->avoid[k] == i)
                return false;
    return true;
}

/* capacity_aware.c: the prompt tokens of req the instance's prefix index holds (0 when off). */
double policy_capacity_prefix_credit(const policy *p, int instance, const policy_request *req);

#endif
