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
    m->router_dl = xmalloc((size_t)N * E * sizeof(double));
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
    free(m->router_dl);
    free(m->token_rank);
    free(m->eg_scratch);
    free(m->eu_scratch);
    free(m->d_rin);
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
        grow(&m->d_rin, (size_t)cap * d);
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

/* ------------------------------------------------------------------ row movement */

/*
 * Dispatch, combine and their backwards over the pool (moe_dispatch and friends, in tasks of
 * TOK rows). A token's rows are visited in buffer order, as moe_dispatch_backward does, so
 * every sum comes out as theirs.
 */
#define TOK 32

typedef struct rows_args {
    const moe_plan *p;
    const float *weight; /* (N, k) */
    const float *src, *src2;
    float *dst, *dst2;
    int d;
} rows_args;

/* buf rows of one task <- rows of x (zero for padding) */
static void dispatch_task(void *arg, int task, int tid)
{
    const rows_args *a = arg;
    const moe_plan *p = a->p;
    int d = a->d;
    for (int r = task * TOK, r1 = r + TOK < p->n_rows ? r + TOK : p->n_rows; r < r1; r++) {
        float *dst = a->dst + (size_t)r * d;
        if (p->src[r] < 0)
            memset(dst, 0, (size_t)d * sizeof(float));
        else
            memcpy(dst, a->src + (size_t)(p->src[r] / p->k) * d, (size_t)d * sizeof(float));
    }
}

/* The buffer rows of token t's kept slots, ascending (k <= 256); returns how many. */
static int token_rows(const moe_plan *p, int t, int *rows)
{
    int n = 0;
    for (int j = 0; j < p->k; j++) {
        int r = p->row[(size_t)t * p->k + j];
        if (r < 0)
            continue;
        int i = n++;
        for (; i > 0 && rows[i - 1] > r; i--)
            rows[i] = rows[i - 1];
        rows[i] = r;
    }
    return n;
}

/* y = x + sum over kept slots (in slot order, as moe_combine) of weight * out[row] */
static void combine_task(void *arg, int task, int tid)
{
    const rows_args *a = arg;
    const moe_plan *p = a->p;
    int d = a->d, k = p->k;
    for (int t = task * TOK, t1 = t + TOK < p->T ? t + TOK : p->T; t < t1; t++) {
        float *yt = a->dst + (size_t)t * d;
        const float *xt = a->src2 + (size_t)t * d;
        int n = 0;
        for (int j = 0; j < k; j++) {
            int r = p->row[(size_t)t * k + j];
            if (r < 0)
                continue;
            float w = a->weight[(size_t)t * k + j];
            const float *o = a->src + (size_t)r * d;
            if (n++ == 0)
                for (int c = 0; c < d; c++)
                    yt[c] = w * o[c];
            else
                for (int c = 0; c < d; c++)
                    yt[c] += w * o[c];
        }
        if (n == 0)
            memcpy(yt, xt, (size_t)d * sizeof(float));
        else
            for (int c = 0; c < d; c++)
                yt[c] = xt[c] + yt[c];
    }
}

/* d_weight (N, k) = dy . out[row]; d_out[row] = weight * dy (moe_combine_backward) */
static void combine_backward_task(void *arg, int task, int tid)
{
    const rows_args *a = arg;
    const moe_plan *p = a->p;
    int d = a->d, k = p->k;
    for (int t = task * TOK, t1 = t + TOK < p->T ? t + TOK : p->T; t < t1; t++) {
        const float *dyt = a->src2 + (size_t)t * d;
        for (int j = 0; j < k; j++) {
            size_t s = (size_t)t * k + j;
            int r = p->row[s];
            if (r < 0) {
                a->dst2[s] = 0.0f;
                continue;
            }
            const float *o = a->src + (size_t)r * d;
            double dot = 0.0;
            for (int c = 0; c < d; c++)
                dot += (double)dyt[c] * o[c];
            a->dst2[s] = (float)dot;
            float w = a->weight[s], *g = a->dst + (size_t)r * d;
            for (int c = 0; c < d; c++)
                g[c] = w * dyt[c];
        }
    }
}

/* d_x[t] = sum of d_buf over token t's rows, in buffer order (moe_dispatch_backward into 0) */
static void dispatch_backward_task(void *arg, int task, int tid)
{
    const rows_args *a = arg;
    const moe_plan *p = a->p;
    int d = a->d, rows[256];
    for (int t = task * TOK, t1 = t + TOK < p->T ? t + TOK : p->T; t < t1; t++) {
        float *g = a->dst + (size_t)t * d;
        int n = token_rows(p, t, rows);
        memset(g, 0, (size_t)d * sizeof(float));
        for (int i = 0; i < n; i++) {
            const float *b = a->src + (size_t)rows[i] * d;
            for (int c = 0; c < d; c++)
                g[c] += b[c];
        }
    }
}

static int n_tok_tasks(int n) { return (n + TOK - 1) / TOK; }

/* The experts' segments of the received rows, in (source rank, local expert) order. */
static int expert_segs(const train_model *m, int l, train_ffn_seg *seg, bool grads)
{
    const model_config *c = &m->cfg.model;
    const train_moe_layer *ml = &m->moe[l];
    int d = c->hidden_size, I = c->intermediate_size, R = m->dist->n_ranks, El = m->El;
    size_t expert_n = (size_t)3 * I * d;
    int n = 0, off = 0;
    for (int s = 0; s < R; s++)
        for (int j = 0; j < El; j++) {
            size_t eo = (size_t)(m->e_lo + j) * expert_n;
            const float *w1 = m->w.layers[l].experts + eo;
            train_ffn_seg *g = &seg[n++];
            g->r0 = off;
            g->n = ml->rcount[s * El + j];
            g->w1 = w1;
            g->w2 = w1 + (size_t)I * d;
            g->w3 = w1 + (size_t)2 * I * d;
            if (grads) {
                g->g1 = m->g.layers[l].experts + eo;
                g->g2 = g->g1 + (size_t)I * d;
                g->g3 = g->g1 + (size_t)2 * I * d;
            }
            off += g->n;
        }
    return n;
}

int train_moe_forward(train_model *m, int l, const float *h2, const float *x2, float *y,
                      loom_err *e)
{
    const model_config *c = &m->cfg.model;
    train_moe_layer *ml = &m->moe[l];
    int N = m->N, d = c->hidden_size, I = c->intermediate_size, E = c->n_experts, k = slots(m);
    int R = m->dist->n_ranks, El = m->El;
    if (R > 1024)
        return loom_errf(e, LOOM_EUNSUPPORTED, "train: at most 1024 ranks");
    int rc = moe_router_forward(&ml->router, h2, m->tokens, N, m->training, &ml->rt, e);
    if (rc)
        return rc;
    TRAIN_PROF(TP_ROUTER);
    moe_plan_config pc = {0};
    pc.capacity = m->cfg.capacity_factor > 0
                      ? moe_capacity(k, N, m->cfg.capacity_factor, E, 1)
                      : 0;
    pc.drop = MOE_DROP_BY_POSITION;
    if ((rc = moe_plan_build(&ml->plan, &pc, ml->rt.expert_idx, ml->rt.weight, N, e)))
        return rc;
    TRAIN_PROF(TP_PLAN);
    const moe_plan *p = &ml->plan;
    rows_args ra = {.p = p, .weight = ml->rt.weight, .src = h2, .dst = ml->buf, .d = d};
    tensor_parallel_for(n_tok_tasks(p->n_rows), dispatch_task, &ra);

    /* rows per (destination rank, its local expert), then what this rank receives */
    for (int x_e = 0; x_e < E; x_e++)
        ml->scount[x_e] = p->rows[x_e];
    train_dist_alltoall_i32(m->dist, ml->scount, ml->rcount, El);
    int rrows = 0;
    for (int i = 0; i < R * El; i++)
        rrows += ml->rcount[i];
    ensure_recv(m, ml, rrows);
    ml->rrows = rrows;
    /* one rank: the experts read the plan-side rows and write the plan-side outputs */
    float *in = ml->buf, *out = ml->out;
    xplan xp;
    if (R > 1) {
        exchange_plan(m, ml, d, &xp);
        train_dist_alltoallv_f32(m->dist, ml->buf, xp.sc, xp.sd, ml->rin, xp.rc, xp.rd);
        in = ml->rin;
        out = ml->rout;
    }

    /* experts over their segments */
    train_ffn_seg seg[256]; /* R * El = E <= 256 */
    int n_seg = expert_segs(m, l, seg, false);
    TRAIN_PROF(TP_DISPATCH);
    train_ffn_forward_segs(out, ml->rg, ml->ru, ml->ra, in, seg, n_seg, d, I, 0.0f);
    TRAIN_PROF(TP_EXPERT);
    if (R > 1)
        train_dist_alltoallv_f32(m->dist, ml->rout, xp.rc, xp.rd, ml->out, xp.sc, xp.sd);
    ra = (rows_args){.p = p, .weight = ml->rt.weight, .src = ml->out, .src2 = x2, .dst = y,
                     .d = d};
    tensor_parallel_for(n_tok_tasks(N), combine_task, &ra);
    TRAIN_PROF(TP_COMBINE);

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
    TRAIN_PROF(TP_MOE_STATS);
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

/*
 * moe_router_backward for a linear gate, over the pool: tasks of TOK tokens
 * compute each token's d logits (kept, N x E in double) and add its d x; then tasks of one
 * expert's row of the gate and COL columns sum dW over every token in order, as the serial
 * loop does (bitwise the same as moe_router_backward where the compiler contracts no
 * multiply-add into an FMA, i.e. the baseline x86-64 build). Other gates go to
 * moe_router_backward.
 */
#define COL 64

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIMD_CLONES
#endif

typedef struct rb_args {
    const moe_router *r;
    const moe_routing *rt;
    const float *d_weight, *d_scores, *gin;
    float *d_x;
    double *dl;   /* (T, E) */
    double *dgin; /* (threads, d) */
    int E, d, k;
} rb_args;

SIMD_CLONES static void router_token_task(void *arg, int task, int tid)
{
    const rb_args *a = arg;
    const moe_routing *rt = a->rt;
    int T = rt->T, E = a->E, d = a->d;
    double ds[256], *dgin = a->dgin + (size_t)tid * d;
    for (int t = task * TOK, t1 = t + TOK < T ? t + TOK : T; t < t1; t++) {
        double *dl = a->dl + (size_t)t * E;
        moe_router_token_dlogits(a->r, rt, t, a->d_weight, a->d_scores, ds, dl);
        if (!a->d_x)
            continue;
        for (int j = 0; j < d; j++)
            dgin[j] = 0.0;
        for (int i = 0; i < E; i++) {
            if (dl[i] == 0.0)
                continue;
            const float *wrow = a->r->w_gate + (size_t)i * d;
            double dli = dl[i];
#pragma omp simd
            for (int j = 0; j < d; j++)
                dgin[j] += dli * wrow[j];
        }
        float *dxt = a->d_x + (size_t)t * d;
        const float *noise = rt->jittered ? rt->jitter_noise + (size_t)t * d : NULL;
        for (int j = 0; j < d; j++)
            dxt[j] += (float)(noise ? dgin[j] * noise[j] : dgin[j]);
    }
}

SIMD_CLONES static void router_weight_task(void *arg, int task, int tid)
{
    const rb_args *a = arg;
    int E = a->E, d = a->d, per = (d + COL - 1) / COL, T = a->rt->T;
    int i = task / per, j0 = task % per * COL, n = d - j0 < COL ? d - j0 : COL;
    double acc[COL] = {0};
    for (int t = 0; t < T; t++) {
        double dli = a->dl[(size_t)t * E + i];
        if (dli == 0.0)
            continue;
        const float *gt = a->gin + (size_t)t * d + j0;
#pragma omp simd
        for (int j = 0; j < n; j++)
            acc[j] += dli * gt[j];
    }
    float *g = a->r->grad_w_gate + (size_t)i * d + j0;
    for (int j = 0; j < n; j++)
        g[j] += (float)acc[j];
}

static int router_backward(train_model *m, moe_router *r, const float *x, const moe_routing *rt,
                           const float *d_weight, const float *d_scores, float *d_x, loom_err *e)
{
    const moe_router_config *c = &r->cfg;
    int E = c->n_experts, d = c->d, T = rt->T;
    if (c->kind == MOE_ROUTER_HASH || c->gate != MOE_GATE_LINEAR || !r->w_gate ||
        !r->grad_w_gate || E > 256 || T > m->cfg.B_max * m->cfg.T_max)
        return moe_router_backward(r, x, rt, d_weight, d_scores, d_x, e);
    int nth = tensor_get_threads();
    rb_args a = {.r = r, .rt = rt, .d_weight = d_weight, .d_scores = d_scores,
                 .gin = rt->jittered ? rt->gate_in : x, .d_x = d_x, .dl = m->router_dl,
                 .dgin = xmalloc((size_t)nth * d * sizeof(double)), .E = E, .d = d, .k = rt->k};
    tensor_parallel_for(n_tok_tasks(T), router_token_task, &a);
    tensor_parallel_for(E * ((d + COL - 1) / COL), router_weight_task, &a);
    if (r->grad_b_gate)
        for (int i = 0; i < E; i++) {
            double gb = 0.0;
            for (int t = 0; t < T; t++)
                gb += a.dl[(size_t)t * E + i];
            r->grad_b_gate[i] += (float)gb;
        }
    free(a.dgin);
    return LOOM_OK;
}

int train_moe_backward(train_model *m, int l, const float *h2, const float *dy, float *dh2,
                       float scale, loom_err *e)
{
    const model_config *c = &m->cfg.model;
    train_moe_layer *ml = &m->moe[l];
    const moe_plan *p = &ml->plan;
    int N = m->N, d = c->hidden_size, I = c->intermediate_size, E = c->n_experts, k = slots(m);
    int R = m->dist->n_ranks;

    /* combine: d_weight (N, k), d_out (rows, d); on R ranks into buf (the forward input is in
     * rin), then to the experts' ranks in rout; on one rank straight into rout (the forward
     * input is in buf) */
    float *d_out = R > 1 ? ml->buf : ml->rout;
    for (int r = 0; r < p->n_rows; r++)
        if (p->src[r] < 0)
            memset(d_out + (size_t)r * d, 0, (size_t)d * sizeof(float));
    rows_args ra = {.p = p, .weight = ml->rt.weight, .src = ml->out, .src2 = dy, .dst = d_out,
                    .dst2 = m->d_weight, .d = d};
    tensor_parallel_for(n_tok_tasks(N), combine_backward_task, &ra);
    xplan xp;
    if (R > 1) {
        exchange_plan(m, ml, d, &xp);
        train_dist_alltoallv_f32(m->dist, ml->buf, xp.sc, xp.sd, ml->rout, xp.rc, xp.rd);
    }
    TRAIN_PROF(TP_COMBINE_B);

    /* experts: d_rin, then back to the plan side into buf */
    train_ffn_seg seg[256];
    int n_seg = expert_segs(m, l, seg, true);
    train_ffn_backward_segs(m->d_rin, ml->rout, R > 1 ? ml->rin : ml->buf, ml->rg, ml->ru, ml->ra,
                            seg, n_seg, d, I, m->eg_scratch, m->eu_scratch, 0.0f);
    TRAIN_PROF(TP_EXPERT_B);
    float *d_buf = m->d_rin;
    if (R > 1) {
        train_dist_alltoallv_f32(m->dist, m->d_rin, xp.rc, xp.rd, ml->buf, xp.sc, xp.sd);
        d_buf = ml->buf;
    }
    ra = (rows_args){.p = p, .src = d_buf, .dst = dh2, .d = d};
    tensor_parallel_for(n_tok_tasks(N), dispatch_backward_task, &ra);
    TRAIN_PROF(TP_DISPATCH_B);

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
    /* the router's z-loss gradient is unscaled: scale its coefficient for this call */
    float zc = ml->router.cfg.z_loss_coef;
    if (zc > 0 && scale != 1.0f)
        ml->router.cfg.z_loss_coef = zc * scale;
    int rc = router_backward(m, &ml->router, h2, &ml->rt, m->d_weight, ds, dh2, e);
    ml->router.cfg.z_loss_coef = zc;
    TRAIN_PROF(TP_ROUTER_B);
    return rc;
}

const train_layer_stat *train_model_layer_stats(const train_model *m, int l)
{
    return m->moe && l >= 0 && l < m->cfg.model.n_layers ? &m->moe[l].stat : NULL;
}
