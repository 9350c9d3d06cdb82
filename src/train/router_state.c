/*
 * Router state that evolves between steps without being a parameter: the group-limited
 * balance bias and the jitter generator. Checkpoints carry both (io.c), so a resumed run routes
 * the next step exactly as the uninterrupted one.
 */
#include "router_state.h"

#include "train_internal.h"

void train_router_update_balance(train_model *m)
{
    int E = m->cfg.model.n_experts;
    if (!m->moe || E > 256)
        return;
    int32_t load[256];
    /* a step's tokens fit int32 */
    for (int l = 0; l < m->cfg.model.n_layers; l++) {
        moe_router *r = &m->moe[l].router;
        if (!r->balance_bias)
            continue;
        for (int x = 0; x < E; x++)
            load[x] = (int32_t)m->moe[l].step_load[x];
        moe_router_update_balance_bias(r, load);
    }
}

int train_router_set_jitter(train_model *m, float jitter, loom_err *e)
{
    if (!(jitter >= 0.0f && jitter < 1.0f))
        return loom_errf(e, LOOM_EINVAL, "train: router jitter %g not in [0, 1)", jitter);
    if (!m->moe)
        return LOOM_OK;
    if (m->cfg.router == MOE_ROUTER_HASH && jitter > 0)
        return loom_errf(e, LOOM_EINVAL, "train: the hash router has no gate to jitter");
    int N = m->cfg.B_max * m->cfg.T_max;
    m->router_cfg.jitter = jitter;
    for (int l = 0; l < m->cfg.model.n_layers; l++) {
        train_moe_layer *ml = &m->moe[l];
        ml->router.cfg.jitter = jitter;
        /* the routing buffers hold the jittered input and noise only when sized for them */
        moe_routing_free(&ml->rt);
        int rc = moe_routing_init(&ml->rt, &ml->router.cfg, N, e);
        if (rc)
            return rc;
    }
    return LOOM_OK;
}
