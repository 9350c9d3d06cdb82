/*
 * The MoE FFN of the trainer: route (src/moe routers), plan (capacity, drops), dispatch, send the
 * rows to the ranks hosting their experts (MPI_Alltoallv; a copy on one rank), run the SwiGLU
 * experts over what arrived, send the outputs back, combine. Backward runs the same exchange in
 * reverse order. Dimension letters as in model.c; El = E / R experts per rank.
 *
 * Expert e lives on rank e / El (moe_topology's block placement), so a plan with the experts
 * in index order already lays the rows out rank after rank: rank r's rows start at
 * plan.offset[r*El]. Received rows are in (source rank, local expert) segments.
 *
 * Load balancing loss: Hugging Face's Mixtral load_balancing_loss_func over all layers' router
 * logits concatenated (L*N rows):
 *   aux = E * sum_e f_e P_e,  f_e = count_e / (L N),  P_e = sum_{l,t} p_{l,t,e} / (L N)
 * (count_e: assignments to e over all k slots). f is piecewise constant, so
 *   d aux / d p_{l,t,e} = E count_e / (L N)^2, the same for every row.
 * On R ranks count, P and N are all-reduced, which gives the same value and gradient as one rank
 * holding the global batch.
 */
#include "train_internal.h"

#include "loom/tensor.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LOC_FLOOR 0.05 /* D_l floor of the locality loss (loss.c) */

static int slots(const train_model *m) { return moe_router_slots(&m->router_cfg); }

int train_moe_init(train_model *m, loom_err *e)
{
    const model_config *c = &m->cfg.model;
    int L = c->n_layers, E = c->n_experts, R = m->dist->n_ranks, k = slots(m);
    int N = m->cfg.B_max * m->cfg.T_max;
    int rpn = m->dist->ranks_per_node > 0 ? m->dist->ranks_per_node : 1;
    if (rpn > R)
        rpn = R;
    if (R % rpn)
        return loom_errf(e, LOOM_EINVAL, "train: %d ranks do not split into nodes of %d", R, rpn);
    int rc = moe_topology_init(&m->topo, R / rpn, rpn, E, NULL, e);
    if (rc)
        return rc;
    m->El = E / R;
    m->e_lo = m->dist->rank * m->El;
    m->e_hi = m->e_lo + m->El;
    m->moe = xcalloc((size_t)L, sizeof(train_moe_layer));
    m->d_weight = xmalloc((size_t)N * k * sizeof(float));
    m->d_scores = xmalloc((size_t)N * E * sizeof(float));
    m->token_rank = xmalloc((size_t)N * sizeof(int32_t));
    for (int t = 0; t < N; t++)
        m->token_rank[t] = m->dist->rank;
    moe_router_config rcfg = m->router_cfg;
    if (R > 1) /* per-rank means of z-loss and locality loss, summed by the all-reduce */
        rcfg.z_loss_coef /= R;
    for (int l = 0; l < L; l++) {
        train_moe_layer *ml = &m->moe[l];
        rcfg.seed = m->cfg.seed + 1000003ull * (uint64_t)(l + 1);
        if ((rc = moe_router_init(&ml->router, &rcfg, e)) ||
            (rc = moe_routing_init(&ml->rt, &rcfg, N, e)) ||
            (rc = moe_plan_init(&ml->plan, N, k, E, N * k, e)))
            return rc;
        /* the gate's weights are the model's: point the router at the parameter table */
        train_layer_weights *w = &m->w.layers[l], *g = &m->g.layers[l];
        if (ml->router.w_gate && w->router_w) {
            free(ml->router.w_gate);
            free(ml->router.grad_w_gate);
            ml->router.w_gate = w->router_w;
            ml->router.grad_w_gate = g->router_w;
        }
        if (ml->router.b_gate && w->router_b) {
            free(ml->router.b_gate);
            free(ml->router.grad_b_gate);
            ml->router.b_gate = w->router_b;
            ml->router.grad_b_gate = g->router_b;
        }
        ml->rows_cap = N * k;
        ml->buf = xmalloc((size_t)ml->rows_cap * c->hidden_size * sizeof(float));
        ml->out = xmalloc((size_t)ml->rows_cap * c->hidden_size * sizeof(float));
        ml->scount = xcalloc((size_t)R * m->El, sizeof(int32_t));
        ml->rcount = xcalloc((size_t)R * m->El, sizeof(int32_t));
    }
    return LOOM_OK;
}

void train_moe_free(train_model *m)
{
    if (!m->moe)
        return;
    for (int l = 0; l < m->cfg.model.n_layers; l++) {
        train_moe_layer *ml = &m->moe[l];
        /* the parameter table owns the gate weights */
        if (m->w.layers[l].router_w && ml->router.w_gate == m->w.layers[l].router_w) {
            ml->router.w_gate = NULL;
            ml->router.grad_w_gate = NULL;
        }
        if (m->w.layers[l].router_b && ml->router.b_gate == m->w.layers[l].router_b) {
            ml->router.b_gate = NULL;
            ml->router.grad_b_gate = NULL;
        }
        moe_router_free(&ml->router);
        moe_routing_free(&ml->rt);
        moe_plan_free(&ml->plan);
        free(ml->buf);
        free(ml->out);
        free(ml->rin);
        free(ml->rg);
        free(ml->ru);
        free(ml->ra);
        free(ml->rout);
        free(ml->scount);
        free(ml->rcount);
    }
    free(m->moe);
    m->moe = NULL;
    free(m->d_weight);
    free(m->d_scores);
    free(m->token_rank);
    free(m->eg_scratch);
    free(m->eu_scratch);
    moe_topology_free(&m->topo);
}

static void grow(float **p, size_t n)
{
    free(*p);
    *p = xmalloc(n * sizeof(float));
}

/* Receive-side buffers of layer l for rrows rows (grow only). */
static void ensure_recv(train_model *m, train_moe_layer *ml, int rrows)
{
    int d = m->cfg.model.hidden_size, I = m->cfg.model.intermediate_size;
    if (rrows > ml->rrows_cap || !ml->rin) {
        int cap = rrows > 1 ? rrows : 1;
        grow(&ml->rin, (size_t)cap * d);
        grow(&ml->rout, (size_t)cap * d);
        grow(&ml->rg, (size_t)cap * I);
        grow(&ml->ru, (size_t)cap * I);
        grow(&ml->ra, (size_t)cap * I);
        ml->rrows_cap = cap;
    }
    if (rrows > m->escratch_cap || !m->eg_scratch) {
        int cap = rrows > 1 ? rrows : 1;
        size_t big = (size_t)cap * (I > d ? I : d);
        grow(&m->eg_scratch, big);
        grow(&m->eu_scratch, big);
        m->escratch_cap = cap;
    }
}

/* Counts and displacements (in floats of row width w) of the plan side and the receive side. */
typedef struct xplan {
    int sc[1024], sd[1024], rc[1024], rd[1024];
} xplan;

static void exchange_plan(const train_model *m, const train_moe_layer *ml, int w, xplan *x)
{
    int R = m->dist->n_ranks, El = m->El;
    int soff = 0, roff = 0;
    for (int r = 0; r < R; r++) {
        int s = 0, q = 0;
        for (int j = 0; j < El; j++) {
            s += ml->scount[r * El + j];
            q += ml->rcount[r * El + j];
        }
        x->sc[r] = s * w;
        x->sd[r] = soff * w;
        x->rc[r] = q * w;
        x->rd[r] = roff * w;
        soff += s;
        roff += q;
    }
}

int train_moe_forward(train_model *m, int l, const float *h2, float *y, loom_err *e)
{
    const model_config *c = &m->cfg.model;
    train_moe_layer *ml = &m->moe[l];
    int N = m->N, d = c->hidden_size, I = c->intermediate_size, E = c->n_experts, k = slots(m);
    int R = m->dist->n_ranks, El = m->El;
    if (R > 1024)
        return loom_errf(e, LOOM_EUNSUPPORTED, "train: at most 1024 ranks");
    int rc = moe_router_forward(&ml->router, h2, m->tokens, N, true, &ml->rt, e);
    if (rc)
        return rc;
    moe_plan_config pc = {0};
    pc.capacity = m->cfg.capacity_factor > 0
                      ? moe_capacity(k, N, m->cfg.capacity_factor, E, 1)
                      : 0;
    pc.drop = MOE_DROP_BY_POSITION;
    if ((rc = moe_plan_build(&ml->plan, &pc, ml->rt.expert_idx, ml->rt.weight, N, e)))
        return rc;
    const moe_plan *p = &ml->plan;
    moe_dispatch(p, h2, d, ml->buf);

    /* rows per (destination rank, its local expert), then what this rank receives */
    for (int x = 0; x < E; x++)
        ml->scount[x] = p->rows[x];
    train_dist_alltoall_i32(m->dist, ml->scount, ml->rcount, El);
    int rrows = 0;
    for (int i = 0; i < R * El; i++)
        rrows += ml->rcount[i];
    ensure_recv(m, ml, rrows);
    ml->rrows = rrows;
    xplan xp;
    exchange_plan(m, ml, d, &xp);
    train_dist_alltoallv_f32(m->dist, ml->buf, xp.sc, xp.sd, ml->rin, xp.rc, xp.rd);

    /* experts over their segments */
    size_t expert_n = (size_t)3 * I * d;
    int off = 0;
    for (int s = 0; s < R; s++)
        for (int j = 0; j < El; j++) {
            int n = ml->rcount[s * El + j];
            const float *w1 = m->w.layers[l].experts + (size_t)(m->e_lo + j) * expert_n;
            const float *w2 = w1 + (size_t)I * d, *w3 = w2 + (size_t)I * d;
            train_ffn_forward(ml->rout + (size_t)off * d, ml->rg + (size_t)off * I,
                              ml->ru + (size_t)off * I, ml->ra + (size_t)off * I,
                              ml->rin + (size_t)off * d, w1, w3, w2, n, d, I);
            off += n;
        }
    train_dist_alltoallv_f32(m->dist, ml->rout, xp.rc, xp.rd, ml->out, xp.sc, xp.sd);
    moe_combine(p, ml->rt.weight, ml->out, d, m->dh);
    for (size_t i = 0; i < (size_t)N * d; i++)
        y[i] += m->dh[i];

    /* what the losses and the stats need */
    for (int x = 0; x < E; x++) {
        ml->psum[x] = 0.0;
        ml->count[x] = 0;
    }
    for (int t = 0; t < N; t++) {
        const float *st = ml->rt.scores + (size_t)t * E;
        for (int x = 0; x < E; x++)
            ml->psum[x] += st[x];
        for (int j = 0; j < k; j++) {
            int x = ml->rt.expert_idx[(size_t)t * k + j];
            if (x >= 0)
                ml->count[x]++;
        }
    }
    moe_layer_stats *st = &ml->stat.s;
    if ((rc = moe_layer_stats_compute(&m->topo, ml->rt.expert_idx, N, k, p, m->token_rank,
                                      (size_t)d * sizeof(float), st, e)))
        return rc;
    if (R > 1) {
        double v[8] = {(double)st->tokens, (double)st->assigned, (double)st->kept,
                       (double)st->dropped, st->share_rank * st->kept, st->share_node * st->kept,
                       st->bytes_intra_node, st->bytes_inter_node};
        train_dist_allreduce_f64(m->dist, v, 8);
        st->tokens = (int64_t)v[0];
        st->assigned = (int64_t)v[1];
        st->kept = (int64_t)v[2];
        st->dropped = (int64_t)v[3];
        st->share_rank = v[2] > 0 ? v[4] / v[2] : 0;
        st->share_node = v[2] > 0 ? v[5] / v[2] : 0;
        st->bytes_intra_node = v[6];
        st->bytes_inter_node = v[7];
        st->drop_rate = v[1] > 0 ? v[3] / v[1] : 0;
        double tot = v[6] + v[7];
        st->inter_node_share = tot > 0 ? v[7] / tot : 0;
    }
    for (int x = 0; x < E && x < 256; x++)
        ml->stat.load[x] = p->load[x];
    train_dist_allreduce_i64(m->dist, ml->stat.load, (size_t)(E < 256 ? E : 256));
    double mx = 0, mean = 0, var = 0;
    for (int x = 0; x < E; x++) {
        mx = ml->stat.load[x] > mx ? (double)ml->stat.load[x] : mx;
        mean += (double)ml->stat.load[x] / E;
    }
    for (int x = 0; x < E; x++)
        var += ((double)ml->stat.load[x] - mean) * ((double)ml->stat.load[x] - mean) / E;
    st->load_max = mx;
    st->load_mean = mean;
    st->load_cv = mean > 0 ? sqrt(var) / mean : 0;
    return LOOM_OK;
}

void train_moe_losses(train_model *m, train_loss *lo)
{
    const model_config *c = &m->cfg.model;
    int L = c->n_layers, E = c->n_experts, R = m->dist->n_ranks;
    double buf[2 * 256 + 3];
    for (int x = 0; x < 2 * E + 3; x++)
        buf[x] = 0.0;
    for (int l = 0; l < L; l++) {
        const train_moe_layer *ml = &m->moe[l];
        for (int x = 0; x < E; x++) {
            buf[x] += (double)ml->count[x];
            buf[E + x] += ml->psum[x];
        }
        buf[2 * E] += ml->rt.z_loss;
        if (m->cfg.loc_coef > 0)
            buf[2 * E + 1] += moe_locality_loss(ml->rt.scores, m->N, E, &m->topo, m->token_rank,
                                                m->cfg.loc_coef / R, LOC_FLOOR, NULL);
    }
    buf[2 * E + 2] = m->N;
    train_dist_allreduce_f64(m->dist, buf, (size_t)(2 * E + 3));
    double LN = (double)L * buf[2 * E + 2], aux = 0.0;
    for (int x = 0; x < E; x++) {
        aux += buf[x] * buf[E + x];
        m->aux_grad[x] = m->cfg.aux_coef * E * buf[x] / (LN * LN);
    }
    lo->aux = E * aux / (LN * LN);
    lo->z = buf[2 * E];
    lo->loc = buf[2 * E + 1];
    m->moe_aux_ready = true;
}

int train_moe_backward(train_model *m, int l, const float *h2, const float *dy, float *dh2,
                       float scale, loom_err *e)
{
    const model_config *c = &m->cfg.model;
    train_moe_layer *ml = &m->moe[l];
    const moe_plan *p = &ml->plan;
    int N = m->N, d = c->hidden_size, I = c->intermediate_size, E = c->n_experts, k = slots(m);
    int R = m->dist->n_ranks, El = m->El;

    /* combine: d_weight (N, k), d_out (rows, d) into buf (the forward input is in rin) */
    moe_combine_backward(p, ml->rt.weight, ml->out, dy, d, m->d_weight, ml->buf);
    xplan xp;
    exchange_plan(m, ml, d, &xp);
    train_dist_alltoallv_f32(m->dist, ml->buf, xp.sc, xp.sd, ml->rout, xp.rc, xp.rd);

    /* experts: d_rin into out-of-the-way scratch, then back to the plan side into buf */
    size_t expert_n = (size_t)3 * I * d;
    float *d_rin = xmalloc((size_t)(ml->rrows > 0 ? ml->rrows : 1) * d * sizeof(float));
    memset(d_rin, 0, (size_t)ml->rrows * d * sizeof(float));
    int off = 0;
    for (int s = 0; s < R; s++)
        for (int j = 0; j < El; j++) {
            int n = ml->rcount[s * El + j];
            size_t eo = (size_t)(m->e_lo + j) * expert_n;
            const float *w1 = m->w.layers[l].experts + eo;
            const float *w2 = w1 + (size_t)I * d, *w3 = w2 + (size_t)I * d;
            float *g1 = m->g.layers[l].experts + eo;
            float *g2 = g1 + (size_t)I * d, *g3 = g2 + (size_t)I * d;
            train_ffn_backward(d_rin + (size_t)off * d, g1, g3, g2, ml->rout + (size_t)off * d,
                               ml->rin + (size_t)off * d, ml->rg + (size_t)off * I,
                               ml->ru + (size_t)off * I, ml->ra + (size_t)off * I, w1, w3, w2, n,
                               d, I, m->eg_scratch, m->eu_scratch);
            off += n;
        }
    train_dist_alltoallv_f32(m->dist, d_rin, xp.rc, xp.rd, ml->buf, xp.sc, xp.sd);
    free(d_rin);
    moe_dispatch_backward(p, ml->buf, d, dh2);

    /* router: through the combine weights, the load-balancing and locality losses */
    float *ds = NULL;
    if (m->cfg.aux_coef > 0 || m->cfg.loc_coef > 0) {
        ds = m->d_scores;
        for (int t = 0; t < N; t++)
            for (int x = 0; x < E; x++)
                ds[(size_t)t * E + x] = (float)(m->aux_grad[x] * scale);
        if (m->cfg.loc_coef > 0)
            moe_locality_loss(ml->rt.scores, N, E, &m->topo, m->token_rank,
                              m->cfg.loc_coef / R * scale, LOC_FLOOR, ds);
    }
    (void)k;
    if (ml->router.cfg.z_loss_coef > 0 && scale != 1.0f) {
        /* the router's z-loss gradient is unscaled: scale its coefficient for this call */
        float zc = ml->router.cfg.z_loss_coef;
        ml->router.cfg.z_loss_coef = zc * scale;
        int rc = moe_router_backward(&ml->router, h2, &ml->rt, m->d_weight, ds, dh2, e);
        ml->router.cfg.z_loss_coef = zc;
        return rc;
    }
    return moe_router_backward(&ml->router, h2, &ml->rt, m->d_weight, ds, dh2, e);
}

const train_layer_stat *train_model_layer_stats(const train_model *m, int l)
{
    return m->moe && l >= 0 && l < m->cfg.model.n_layers ? &m->moe[l].stat : NULL;
}
