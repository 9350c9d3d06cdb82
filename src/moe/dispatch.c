/*
 * Dispatch and combine: token rows permuted into per-expert contiguous buffers with a capacity
 * and a drop policy, and the weighted sum back in token order; both with their backward.
 * Dimension letters: T tokens, d row size, E experts, k slots per token, C capacity.
 * An assignment is a slot a = t*k + j whose expert_idx is in [0, E).
 */
#include "loom/moe.h"

#include <stdlib.h>
#include <string.h>

void moe_plan_free(moe_plan *p)
{
    if (!p)
        return;
    free(p->load);
    free(p->count);
    free(p->offset);
    free(p->rows);
    free(p->row);
    free(p->src);
    free(p->scratch);
    memset(p, 0, sizeof(*p));
}

int moe_plan_init(moe_plan *p, int T_max, int k, int E, int rows_max, loom_err *e)
{
    memset(p, 0, sizeof(*p));
    size_t Tk;
    if (T_max < 1 || k < 1 || E < 1 || !loom_mul_ok((size_t)T_max, (size_t)k, &Tk) ||
        Tk > INT32_MAX)
        return loom_errf(e, LOOM_EINVAL, "moe plan: bad sizes T_max=%d k=%d E=%d", T_max, k, E);
    if (rows_max <= 0)
        rows_max = (int)Tk;
    p->T_max = T_max;
    p->k = k;
    p->E = E;
    p->load = calloc((size_t)E, sizeof(int32_t));
    p->count = calloc((size_t)E, sizeof(int32_t));
    p->offset = calloc((size_t)E, sizeof(int32_t));
    p->rows = calloc((size_t)E, sizeof(int32_t));
    p->row = malloc(Tk * sizeof(int32_t));
    p->src = malloc((size_t)rows_max * sizeof(int32_t));
    p->scratch = malloc(Tk * sizeof(int32_t));
    if (!p->load || !p->count || !p->offset || !p->rows || !p->row || !p->src || !p->scratch) {
        moe_plan_free(p);
        return loom_errf(e, LOOM_ENOMEM, "moe plan: out of memory");
    }
    p->rows_max = rows_max;
    return LOOM_OK;
}

typedef struct prio_item {
    float weight;
    int32_t a;
} prio_item;

static int prio_cmp(const void *x, const void *y)
{
    const prio_item *p = x, *q = y;
    if (p->weight != q->weight)
        return p->weight > q->weight ? -1 : 1;
    return p->a < q->a ? -1 : (p->a > q->a);
}

/*
 * Which assignments fit: experts fill up to C in priority order and the rest are dropped.
 *   by position: slot 0 of every token (in token order) before slot 1, ... (GShard: first
 *                choices win over second choices);
 *   by weight:   descending combine weight, earlier assignment on ties (batch-prioritised
 *                routing, Riquelme et al. 2021).
 * keep (T*k) gets 1 for kept assignments.
 */
static int choose_kept(moe_plan *p, const moe_plan_config *cfg, const int32_t *expert_idx,
                       const float *weight, int C, int32_t *keep, loom_err *e)
{
    int T = p->T, k = p->k, E = p->E;
    size_t n = (size_t)T * k;
    memset(p->count, 0, (size_t)E * sizeof(int32_t));
    memset(keep, 0, n * sizeof(int32_t));
    if (cfg->drop == MOE_DROP_BY_WEIGHT) {
        if (!weight)
            return loom_errf(e, LOOM_EINVAL, "moe plan: drop by weight needs the weights");
        prio_item *items = malloc((n ? n : 1) * sizeof(prio_item));
        if (!items)
            return loom_errf(e, LOOM_ENOMEM, "moe plan: out of memory");
        size_t m = 0;
        for (size_t a = 0; a < n; a++)
            if (expert_idx[a] >= 0 && expert_idx[a] < E)
                items[m++] = (prio_item){weight[a], (int32_t)a};
        qsort(items, m, sizeof(prio_item), prio_cmp);
        for (size_t i = 0; i < m; i++) {
            int x = expert_idx[items[i].a];
            if (p->count[x] < C) {
                p->count[x]++;
                keep[items[i].a] = 1;
            }
        }
        free(items);
        return LOOM_OK;
    }
    for (int j = 0; j < k; j++)
        for (int t = 0; t < T; t++) {
            size_t a = (size_t)t * k + j;
            int x = expert_idx[a];
            if (x >= 0 && x < E && p->count[x] < C) {
                p->count[x]++;
                keep[a] = 1;
            }
        }
    return LOOM_OK;
}

int moe_plan_build(moe_plan *p, const moe_plan_config *cfg, const int32_t *expert_idx,
                   const float *weight, int T, loom_err *e)
{
    int k = p->k, E = p->E;
    if (T < 0 || T > p->T_max)
        return loom_errf(e, LOOM_EINVAL, "moe plan: T=%d over T_max=%d", T, p->T_max);
    p->T = T;
    size_t n = (size_t)T * k;
    memset(p->load, 0, (size_t)E * sizeof(int32_t));
    p->n_assigned = 0;
    int max_load = 0;
    for (size_t a = 0; a < n; a++) {
        int x = expert_idx[a];
        if (x >= 0 && x < E) {
            p->load[x]++;
            p->n_assigned++;
            if (p->load[x] > max_load)
                max_load = p->load[x];
        }
    }
    int C = cfg->capacity > 0 ? cfg->capacity : max_load; /* <= 0: dropless */
    p->capacity = C;
    int32_t *keep = p->scratch;
    int rc = choose_kept(p, cfg, expert_idx, weight, C, keep, e);
    if (rc)
        return rc;

    /* Buffer layout: experts in cfg->expert_order (or 0..E-1), each `rows` long. */
    int64_t cur = 0;
    for (int i = 0; i < E; i++) {
        int x = cfg->expert_order ? cfg->expert_order[i] : i;
        if (x < 0 || x >= E)
            return loom_errf(e, LOOM_EINVAL, "moe plan: expert_order[%d]=%d out of range", i, x);
        p->offset[x] = (int32_t)cur;
        p->rows[x] = cfg->pad ? C : p->count[x];
        cur += p->rows[x];
    }
    if (cur > p->rows_max)
        return loom_errf(e, LOOM_EINVAL,
                         "moe plan: %lld buffer rows exceed rows_max=%d (padding "
                         "to capacity %d needs E*C rows)",
                         (long long)cur, p->rows_max, C);
    p->n_rows = (int)cur;
    for (int r = 0; r < p->n_rows; r++)
        p->src[r] = -1;

    /* Kept rows fill each expert's buffer in token order. */
    int32_t *fill = p->count; /* recounted below */
    memset(fill, 0, (size_t)E * sizeof(int32_t));
    p->n_kept = 0;
    for (size_t a = 0; a < n; a++) {
        if (!keep[a]) {
            p->row[a] = -1;
            continue;
        }
        int x = expert_idx[a];
        int r = p->offset[x] + fill[x]++;
        p->row[a] = r;
        p->src[r] = (int32_t)a;
        p->n_kept++;
    }
    p->n_dropped = p->n_assigned - p->n_kept;
    return LOOM_OK;
}

void moe_dispatch(const moe_plan *p, const float *x, int d, float *buf)
{
    for (int r = 0; r < p->n_rows; r++) {
        float *dst = buf + (size_t)r * d;
        if (p->src[r] < 0)
            memset(dst, 0, (size_t)d * sizeof(float));
        else
            memcpy(dst, x + (size_t)(p->src[r] / p->k) * d, (size_t)d * sizeof(float));
    }
}

void moe_combine(const moe_plan *p, const float *weight, const float *out, int d, float *y)
{
    int k = p->k;
    for (int t = 0; t < p->T; t++) {
        float *yt = y + (size_t)t * d;
        memset(yt, 0, (size_t)d * sizeof(float));
        for (int j = 0; j < k; j++) {
            int r = p->row[(size_t)t * k + j];
            if (r < 0)
                continue;
            float w = weight[(size_t)t * k + j];
            const float *o = out + (size_t)r * d;
            for (int c = 0; c < d; c++)
                yt[c] += w * o[c];
        }
    }
}

void moe_combine_backward(const moe_plan *p, const float *weight, const float *out,
                          const float *d_y, int d, float *d_weight, float *d_out)
{
    int k = p->k;
    if (d_out)
        for (int r = 0; r < p->n_rows; r++)
            if (p->src[r] < 0)
                memset(d_out + (size_t)r * d, 0, (size_t)d * sizeof(float));
    for (int t = 0; t < p->T; t++) {
        const float *dyt = d_y + (size_t)t * d;
        for (int j = 0; j < k; j++) {
            size_t a = (size_t)t * k + j;
            int r = p->row[a];
            if (r < 0) {
                if (d_weight)
                    d_weight[a] = 0.0f;
                continue;
            }
            if (d_weight) {
                const float *o = out + (size_t)r * d;
                double dot = 0.0;
                for (int c = 0; c < d; c++)
                    dot += (double)dyt[c] * o[c];
                d_weight[a] = (float)dot;
            }
            if (d_out) {
                float w = weight[a], *g = d_out + (size_t)r * d;
                for (int c = 0; c < d; c++)
                    g[c] = w * dyt[c];
            }
        }
    }
}

void moe_dispatch_backward(const moe_plan *p, const float *d_buf, int d, float *d_x)
{
    for (int r = 0; r < p->n_rows; r++) {
        if (p->src[r] < 0)
            continue;
        float *g = d_x + (size_t)(p->src[r] / p->k) * d;
        const float *b = d_buf + (size_t)r * d;
        for (int c = 0; c < d; c++)
            g[c] += b[c];
    }
}
