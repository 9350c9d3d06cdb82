/*
 * Trainable routers: forward and backward of the gate, the score function and the selection.
 * Dimension letters: T tokens, d gate input size, E experts, k slots per token.
 *
 * A router is three stages, each with its backward:
 *   gate      logits (T, E) = x (T, d) W^T (+ b)            linear (Switch, GShard, Mixtral)
 *                           = omega x (+ eps), omega fixed   GrAP (LocMoE eq. 4)
 *             optionally ReLU'd (LocMoE eq. 2: G = ReLU(omega x + eps))
 *   score     scores (T, E) = softmax(logits) over experts, or sigmoid per expert (DeepSeek-V3)
 *   selection top-k per token (ties to the lower index, as moe_topk_route), top groups then
 *             top-k (group-limited), or top-C tokens per expert (expert choice); the combine
 *             weight of a slot is its score, renormalised over the chosen slots when asked
 *             (LocMoE eq. 3: R = 1{i = i*} softmax(G)_i, not renormalised).
 * The hash router has no gate: a fixed table maps the token id to one expert with weight 1.
 */
#include "loom/moe.h"
#include "loom/tensor.h"

#include "moe_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const kind_names[] = {"topk", "hash", "group_limited", "expert_choice",
                                         "locmoe"};

const char *moe_router_kind_name(moe_router_kind kind)
{
    return (unsigned)kind < sizeof(kind_names) / sizeof(kind_names[0]) ? kind_names[kind]
                                                                       : "unknown";
}

int moe_router_kind_parse(const char *name, moe_router_kind *kind)
{
    static const struct {
        const char *name;
        moe_router_kind kind;
    } aliases[] = {
        {"topk", MOE_ROUTER_TOPK},
        {"switch", MOE_ROUTER_TOPK},
        {"gshard", MOE_ROUTER_TOPK},
        {"hash", MOE_ROUTER_HASH},
        {"group_limited", MOE_ROUTER_GROUP_LIMITED},
        {"group-limited", MOE_ROUTER_GROUP_LIMITED},
        {"deepseek", MOE_ROUTER_GROUP_LIMITED},
        {"expert_choice", MOE_ROUTER_EXPERT_CHOICE},
        {"expert-choice", MOE_ROUTER_EXPERT_CHOICE},
        {"locmoe", MOE_ROUTER_LOCMOE},
    };
    for (size_t i = 0; i < sizeof(aliases) / sizeof(aliases[0]); i++)
        if (!strcmp(name, aliases[i].name)) {
            *kind = aliases[i].kind;
            return LOOM_OK;
        }
    return LOOM_EINVAL;
}

/* The largest divisor of E that is at most 8: DeepSeek-V3 has 8 groups of 32 experts. */
static int default_groups(int E)
{
    for (int g = E < 8 ? E : 8; g > 1; g--)
        if (E % g == 0)
            return g;
    return 1;
}

void moe_router_config_default(moe_router_config *cfg, moe_router_kind kind, int d, int E)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->kind = kind;
    cfg->d = d;
    cfg->n_experts = E;
    cfg->k = 1;
    cfg->gate = MOE_GATE_LINEAR;
    cfg->score = MOE_SCORE_SOFTMAX;
    cfg->route_scale = 1.0f;
    cfg->capacity_factor = 1.0;
    cfg->seed = 1;
    switch (kind) {
    case MOE_ROUTER_TOPK:
    case MOE_ROUTER_HASH:
    case MOE_ROUTER_EXPERT_CHOICE:
        break;
    case MOE_ROUTER_GROUP_LIMITED:
        cfg->k = E >= 2 ? 2 : 1;
        cfg->score = MOE_SCORE_SIGMOID;
        cfg->renormalize = true;
        cfg->n_groups = default_groups(E);
        cfg->topk_groups = cfg->n_groups >= 2 ? cfg->n_groups / 2 : 1;
        cfg->bias_rate = 1e-3f;
        break;
    case MOE_ROUTER_LOCMOE:
        cfg->gate = MOE_GATE_GRAP;
        cfg->gate_bias = true;
        cfg->gate_relu = true;
        break;
    }
}

int moe_router_slots(const moe_router_config *cfg)
{
    if (cfg->kind == MOE_ROUTER_EXPERT_CHOICE)
        return cfg->n_experts;
    if (cfg->kind == MOE_ROUTER_HASH)
        return 1;
    return cfg->k;
}

static int check_config(const moe_router_config *c, loom_err *e)
{
    if (c->n_experts < 1 || c->d < 1)
        return loom_errf(e, LOOM_EINVAL,
                         "moe router: need d >= 1 and n_experts >= 1 (got d=%d, "
                         "E=%d)",
                         c->d, c->n_experts);
    if (c->kind != MOE_ROUTER_HASH && (c->k < 1 || c->k > c->n_experts))
        return loom_errf(e, LOOM_EINVAL, "moe router: k=%d must be in [1, E=%d]", c->k,
                         c->n_experts);
    if ((c->gate == MOE_GATE_GRAP || c->kind == MOE_ROUTER_LOCMOE) && c->d < c->n_experts)
        return loom_errf(e, LOOM_EINVAL, "moe router: the GrAP gate needs d >= E (d=%d, E=%d)",
                         c->d, c->n_experts);
    if (c->kind == MOE_ROUTER_GROUP_LIMITED) {
        if (c->n_groups < 1 || c->n_experts % c->n_groups)
            return loom_errf(e, LOOM_EINVAL, "moe router: %d groups do not divide %d experts",
                             c->n_groups, c->n_experts);
        if (c->topk_groups < 1 || c->topk_groups > c->n_groups)
            return loom_errf(e, LOOM_EINVAL, "moe router: topk_groups=%d not in [1, %d]",
                             c->topk_groups, c->n_groups);
        if (c->k > c->topk_groups * (c->n_experts / c->n_groups))
            return loom_errf(e, LOOM_EINVAL, "moe router: k=%d exceeds the experts of %d groups",
                             c->k, c->topk_groups);
    }
    if (c->kind == MOE_ROUTER_EXPERT_CHOICE && !(c->capacity_factor > 0))
        return loom_errf(e, LOOM_EINVAL, "moe router: expert choice needs capacity_factor > 0");
    if (c->jitter < 0 || c->jitter >= 1)
        return loom_errf(e, LOOM_EINVAL, "moe router: jitter %g not in [0, 1)", c->jitter);
    return LOOM_OK;
}

void moe_hash_table_build(int32_t *table, int vocab_size, int E, const int64_t *token_freq,
                          uint64_t seed)
{
    loom_rng rng;
    rng_seed(&rng, seed);
    int32_t *perm = xmalloc((size_t)vocab_size * sizeof(int32_t));
    for (int v = 0; v < vocab_size; v++)
        perm[v] = v;
    for (int v = vocab_size - 1; v > 0; v--) { /* Fisher-Yates */
        int u = (int)(rng_next(&rng) % (uint64_t)(v + 1));
        int32_t tmp = perm[v];
        perm[v] = perm[u];
        perm[u] = tmp;
    }
    if (!token_freq) {
        for (int i = 0; i < vocab_size; i++)
            table[perm[i]] = i % E;
        free(perm);
        return;
    }
    /* Greedy LPT: most frequent token first, each to the expert with the least token mass so
     * far. Shell sort by descending frequency over the shuffled ids (vocabularies reach 150k,
     * and qsort has no context pointer for the frequencies). */
    for (int gap = vocab_size / 2; gap > 0; gap /= 2)
        for (int i = gap; i < vocab_size; i++) {
            int32_t v = perm[i];
            int j = i;
            while (j >= gap && token_freq[perm[j - gap]] < token_freq[v]) {
                perm[j] = perm[j - gap];
                j -= gap;
            }
            perm[j] = v;
        }
    int64_t *mass = xcalloc((size_t)E, sizeof(int64_t));
    for (int i = 0; i < vocab_size; i++) {
        int best = 0;
        for (int x = 1; x < E; x++)
            if (mass[x] < mass[best])
                best = x;
        table[perm[i]] = best;
        mass[best] += token_freq[perm[i]] > 0 ? token_freq[perm[i]] : 0;
    }
    free(mass);
    free(perm);
}

void moe_router_free(moe_router *r)
{
    if (!r)
        return;
    free(r->w_gate);
    free(r->b_gate);
    free(r->balance_bias);
    free(r->hash_table);
    free(r->grad_w_gate);
    free(r->grad_b_gate);
    memset(r, 0, sizeof(*r));
}

int moe_router_init(moe_router *r, const moe_router_config *cfg, loom_err *e)
{
    memset(r, 0, sizeof(*r));
    int rc = check_config(cfg, e);
    if (rc)
        return rc;
    r->cfg = *cfg;
    moe_router_config *c = &r->cfg;
    if (c->kind == MOE_ROUTER_LOCMOE) {
        c->gate = MOE_GATE_GRAP;
        c->gate_bias = true;
        c->gate_relu = true;
    }
    if (c->route_scale == 0.0f)
        c->route_scale = 1.0f;
    int E = c->n_experts, d = c->d;
    rng_seed(&r->rng, c->seed);
    if (c->kind == MOE_ROUTER_HASH) {
        if (c->vocab_size > 0) {
            r->hash_table = malloc((size_t)c->vocab_size * sizeof(int32_t));
            if (!r->hash_table)
                goto nomem;
            moe_hash_table_build(r->hash_table, c->vocab_size, E, NULL, c->seed);
        }
        return LOOM_OK;
    }
    if (c->gate == MOE_GATE_LINEAR) {
        r->w_gate = malloc((size_t)E * d * sizeof(float));
        r->grad_w_gate = calloc((size_t)E * d, sizeof(float));
        if (!r->w_gate || !r->grad_w_gate)
            goto nomem;
        float std = c->init_std > 0 ? c->init_std : 1.0f / sqrtf((float)d);
        for (size_t i = 0; i < (size_t)E * d; i++)
            r->w_gate[i] = std * rng_normal(&r->rng);
    }
    if (c->gate_bias) {
        r->b_gate = calloc((size_t)E, sizeof(float));
        r->grad_b_gate = calloc((size_t)E, sizeof(float));
        if (!r->b_gate || !r->grad_b_gate)
            goto nomem;
    }
    if (c->bias_rate > 0 && (c->kind == MOE_ROUTER_TOPK || c->kind == MOE_ROUTER_GROUP_LIMITED)) {
        r->balance_bias = calloc((size_t)E, sizeof(float));
        if (!r->balance_bias)
            goto nomem;
    }
    return LOOM_OK;
nomem:
    moe_router_free(r);
    return loom_errf(e, LOOM_ENOMEM, "moe router: out of memory");
}

void moe_router_zero_grad(moe_router *r)
{
    size_t E = (size_t)r->cfg.n_experts;
    if (r->grad_w_gate)
        memset(r->grad_w_gate, 0, E * (size_t)r->cfg.d * sizeof(float));
    if (r->grad_b_gate)
        memset(r->grad_b_gate, 0, E * sizeof(float));
}

void moe_routing_free(moe_routing *rt)
{
    if (!rt)
        return;
    free(rt->expert_idx);
    free(rt->weight);
    free(rt->logits);
    free(rt->scores);
    free(rt->pre_relu);
    free(rt->gate_in);
    free(rt->jitter_noise);
    memset(rt, 0, sizeof(*rt));
}

int moe_routing_init(moe_routing *rt, const moe_router_config *cfg, int T_max, loom_err *e)
{
    memset(rt, 0, sizeof(*rt));
    if (T_max < 1)
        return loom_errf(e, LOOM_EINVAL, "moe routing: T_max must be >= 1");
    rt->T_max = T_max;
    rt->E = cfg->n_experts;
    rt->k = moe_router_slots(cfg);
    rt->d = cfg->d;
    size_t TE = (size_t)T_max * rt->E, Tk = (size_t)T_max * rt->k, Td = (size_t)T_max * rt->d;
    rt->expert_idx = malloc(Tk * sizeof(int32_t));
    rt->weight = malloc(Tk * sizeof(float));
    rt->logits = malloc(TE * sizeof(float));
    rt->scores = malloc(TE * sizeof(float));
    bool ok = rt->expert_idx && rt->weight && rt->logits && rt->scores;
    if (cfg->gate_relu || cfg->kind == MOE_ROUTER_LOCMOE) {
        rt->pre_relu = malloc(TE * sizeof(float));
        ok = ok && rt->pre_relu;
    }
    if (cfg->jitter > 0 && cfg->kind != MOE_ROUTER_HASH) {
        rt->gate_in = malloc(Td * sizeof(float));
        rt->jitter_noise = malloc(Td * sizeof(float));
        ok = ok && rt->gate_in && rt->jitter_noise;
    }
    if (!ok) {
        moe_routing_free(rt);
        return loom_errf(e, LOOM_ENOMEM, "moe routing: out of memory for T_max=%d", T_max);
    }
    return LOOM_OK;
}

/* ------------------------------------------------------------------ gate */

/* GrAP chunk of expert i: columns j with i*d/n <= j < (i+1)*d/n (LocMoE eq. 4). */
static inline int grap_lo(int i, int d, int n)
{
    return (int)(((int64_t)i * d + n - 1) / n);
}

/* LocMoE eq. 4: logits[t, i] = sum_j omega_ij x[t, j], omega_ij = (n/d) 1{j in chunk i}: the
 * mean of chunk i when n divides d. */
static void grap_forward(const float *x, int T, int d, int n, float *logits)
{
    float scale = (float)n / (float)d;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * d;
        for (int i = 0; i < n; i++) {
            int lo = grap_lo(i, d, n), hi = grap_lo(i + 1, d, n);
            float s = 0.0f;
            for (int j = lo; j < hi; j++)
                s += xt[j];
            logits[(size_t)t * n + i] = scale * s;
        }
    }
}

/* ------------------------------------------------------------------ selection */

/* The k largest of key (E) not masked, strict '>' so ties keep the lower index (the rule of
 * moe_topk_route). mask may be NULL. */
static void select_topk(const float *key, const bool *mask, int E, int k, int32_t *idx)
{
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            if (mask && !mask[e])
                continue;
            bool taken = false;
            for (int i = 0; i < j; i++)
                taken |= idx[i] == e;
            if (!taken && (best < 0 || key[e] > key[best]))
                best = e;
        }
        idx[j] = best;
    }
}

/* Combine weights of the chosen slots: the score, renormalised over the slots when asked
 * (summed in slot order, as moe_topk_route), times route_scale. */
static void slot_weights(const moe_router_config *c, const float *st, const int32_t *idx, int k,
                         float *wt)
{
    float sum = 0.0f;
    for (int j = 0; j < k; j++) {
        wt[j] = idx[j] >= 0 ? st[idx[j]] : 0.0f;
        sum += wt[j];
    }
    if (c->renormalize && sum > 0.0f)
        for (int j = 0; j < k; j++)
            wt[j] /= sum;
    if (c->route_scale != 1.0f)
        for (int j = 0; j < k; j++)
            wt[j] *= c->route_scale;
}

/* DeepSeek-V3 node-limited routing: the selection key is score + balance bias (the bias steers
 * the choice only, never the weight). A group's score is the sum of its two largest keys; the
 * topk_groups best groups (ties to the lower group) are eligible, and the top-k of their experts
 * are chosen. */
static void select_group_limited(const moe_router_config *c, const float *key, int32_t *idx)
{
    int E = c->n_experts, G = c->n_groups, per = E / G;
    float gscore[256];
    bool gmask[256], emask[4096];
    int32_t gidx[256], top2[2];
    for (int g = 0; g < G; g++) {
        int m = per >= 2 ? 2 : 1;
        select_topk(key + g * per, NULL, per, m, top2);
        gscore[g] = 0.0f;
        for (int j = 0; j < m; j++)
            gscore[g] += key[g * per + top2[j]];
    }
    select_topk(gscore, NULL, G, c->topk_groups, gidx);
    memset(gmask, 0, sizeof(bool) * (size_t)G);
    for (int j = 0; j < c->topk_groups; j++)
        gmask[gidx[j]] = true;
    for (int x = 0; x < E; x++)
        emask[x] = gmask[x / per];
    select_topk(key, emask, E, c->k, idx);
}

/* Slots by descending score, lower expert index on ties (insertion sort: k is small). */
static bool slot_before(const float *st, int32_t a, int32_t b) /* a sorts before b */
{
    if (a < 0 || b < 0)
        return b < 0 && a >= 0; /* empty slots last */
    return st[a] > st[b] || (st[a] == st[b] && a < b);
}

static void sort_slots(const float *st, int32_t *idx, int k)
{
    for (int i = 1; i < k; i++) {
        int32_t v = idx[i];
        int j = i;
        while (j > 0 && slot_before(st, v, idx[j - 1])) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = v;
    }
}

typedef struct ec_item {
    float score;
    int32_t t;
} ec_item;

static int ec_cmp(const void *a, const void *b)
{
    const ec_item *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    return x->t < y->t ? -1 : (x->t > y->t);
}

/* Expert choice (Zhou et al. 2022): expert e takes the C tokens with the largest scores[:, e]
 * (ties to the earlier token), C = ceil(k T cf / E). A token's slots then list the experts that
 * took it, by descending weight; unused slots are -1. */
static int route_expert_choice(const moe_router_config *c, moe_routing *rt, loom_err *e)
{
    int T = rt->T, E = c->n_experts;
    int C = moe_capacity(c->k, T, c->capacity_factor, E, 1);
    if (C > T)
        C = T;
    ec_item *items = malloc((size_t)T * sizeof(ec_item));
    int32_t *taken = calloc((size_t)T, sizeof(int32_t));
    if (!items || !taken) {
        free(items);
        free(taken);
        return loom_errf(e, LOOM_ENOMEM, "moe router: out of memory (expert choice)");
    }
    for (size_t a = 0; a < (size_t)T * E; a++) {
        rt->expert_idx[a] = -1;
        rt->weight[a] = 0.0f;
    }
    for (int x = 0; x < E; x++) {
        for (int t = 0; t < T; t++)
            items[t] = (ec_item){rt->scores[(size_t)t * E + x], t};
        qsort(items, (size_t)T, sizeof(ec_item), ec_cmp);
        for (int i = 0; i < C; i++) {
            int t = items[i].t;
            rt->expert_idx[(size_t)t * E + taken[t]++] = x;
        }
    }
    for (int t = 0; t < T; t++) {
        int32_t *idx = rt->expert_idx + (size_t)t * E;
        const float *st = rt->scores + (size_t)t * E;
        sort_slots(st, idx, taken[t]);
        slot_weights(c, st, idx, E, rt->weight + (size_t)t * E);
    }
    free(items);
    free(taken);
    return LOOM_OK;
}

/* ------------------------------------------------------------------ forward */

static int32_t hash_expert(const moe_router *r, int32_t token)
{
    if (r->hash_table && token >= 0 && token < r->cfg.vocab_size)
        return r->hash_table[token];
    return (int32_t)(loom_hash64(&token, sizeof(token), r->cfg.seed) % (uint64_t)r->cfg.n_experts);
}

#define ROUTE_TOK 64

typedef struct route_job {
    const moe_router *r;
    const float *gin;
    float *pre;
    moe_routing *rt;
    int T;
    bool select; /* also choose each token's experts and weights */
} route_job;

/* Tokens [task * ROUTE_TOK, ...): gate output, ReLU, scores and, with j->select, the slots. */
static void route_task(void *arg, int task, int tid)
{
    (void)tid;
    const route_job *j = arg;
    const moe_router *r = j->r;
    const moe_router_config *c = &r->cfg;
    moe_routing *rt = j->rt;
    int E = c->n_experts, d = c->d, k = moe_router_slots(c);
    int t0 = task * ROUTE_TOK, n = j->T - t0 < ROUTE_TOK ? j->T - t0 : ROUTE_TOK;
    float *pre = j->pre + (size_t)t0 * E;
    const float *gin = j->gin + (size_t)t0 * d;
    if (c->gate == MOE_GATE_LINEAR) {
        tensor_matmul(pre, gin, r->w_gate, r->b_gate, n, d, E);
    } else {
        grap_forward(gin, n, d, E, pre);
        if (r->b_gate)
            for (int t = 0; t < n; t++)
                for (int i = 0; i < E; i++)
                    pre[(size_t)t * E + i] += r->b_gate[i];
    }
    if (c->gate_relu) /* LocMoE eq. 2: G = ReLU(omega x + eps) */
        for (size_t i = 0; i < (size_t)n * E; i++)
            rt->logits[(size_t)t0 * E + i] = pre[i] > 0.0f ? pre[i] : 0.0f;

    float key[4096]; /* E <= 4096, checked by the caller */
    for (int t = t0; t < t0 + n; t++) {
        /* Scores. The softmax shares moe_topk_route's normaliser (moe_softmax_norm), so the
         * weights match it bit for bit. */
        const float *lt = rt->logits + (size_t)t * E;
        float *st = rt->scores + (size_t)t * E;
        if (c->score == MOE_SCORE_SIGMOID) {
            for (int x_e = 0; x_e < E; x_e++)
                st[x_e] = 1.0f / (1.0f + expf(-lt[x_e]));
        } else {
            float m, z = moe_softmax_norm(lt, E, &m);
            for (int x_e = 0; x_e < E; x_e++)
                st[x_e] = expf(lt[x_e] - m) / z;
        }
        if (!j->select)
            continue;
        int32_t *idx = rt->expert_idx + (size_t)t * k;
        /* Softmax is monotone, so the softmax top-k compares logits, as moe_topk_route does;
         * the sigmoid and the balance bias compare scores (+ bias). */
        const float *sel = c->score == MOE_SCORE_SOFTMAX ? lt : st;
        if (r->balance_bias) {
            for (int x_e = 0; x_e < E; x_e++)
                key[x_e] = st[x_e] + r->balance_bias[x_e];
            sel = key;
        }
        if (c->kind == MOE_ROUTER_GROUP_LIMITED)
            select_group_limited(c, sel, idx);
        else
            select_topk(sel, NULL, E, k, idx);
        if (r->balance_bias)
            sort_slots(st, idx, k); /* the bias chose them; the weights order them */
        slot_weights(c, st, idx, k, rt->weight + (size_t)t * k);
    }
}

int moe_router_forward(moe_router *r, const float *x, const int32_t *token_ids, int T,
                       bool training, moe_routing *rt, loom_err *e)
{
    const moe_router_config *c = &r->cfg;
    int E = c->n_experts, d = c->d, k = moe_router_slots(c);
    if (T < 0 || T > rt->T_max || rt->E != E || rt->k != k || rt->d != d)
        return loom_errf(e, LOOM_EINVAL,
                         "moe router: routing buffers (T_max=%d, E=%d, k=%d) do "
                         "not fit T=%d, E=%d, k=%d",
                         rt->T_max, rt->E, rt->k, T, E, k);
    rt->T = T;
    rt->z_loss = 0.0;
    rt->jittered = false;
    size_t TE = (size_t)T * E;

    if (c->kind == MOE_ROUTER_HASH) {
        if (!token_ids && T > 0)
            return loom_errf(e, LOOM_EINVAL, "moe router: the hash router needs token ids");
        memset(rt->logits, 0, TE * sizeof(float));
        memset(rt->scores, 0, TE * sizeof(float));
        for (int t = 0; t < T; t++) {
            int32_t x_e = hash_expert(r, token_ids[t]);
            rt->expert_idx[t] = x_e;
            rt->weight[t] = 1.0f;
            rt->scores[(size_t)t * E + x_e] = 1.0f; /* one-hot: the losses see the assignment */
        }
        return LOOM_OK;
    }

    /* Switch jitter: the gate sees x * U(1 - eps, 1 + eps), elementwise, in training only. */
    const float *gin = x;
    if (training && c->jitter > 0) {
        if (!rt->gate_in)
            return loom_errf(e, LOOM_EINVAL, "moe router: routing was sized without jitter");
        for (size_t i = 0; i < (size_t)T * d; i++) {
            float u = (float)rng_uniform(&r->rng);
            rt->jitter_noise[i] = 1.0f - c->jitter + 2.0f * c->jitter * u;
            rt->gate_in[i] = x[i] * rt->jitter_noise[i];
        }
        gin = rt->gate_in;
        rt->jittered = true;
    }

    float *pre = c->gate_relu ? rt->pre_relu : rt->logits;
    if (c->gate_relu && !pre)
        return loom_errf(e, LOOM_EINVAL, "moe router: routing was sized without ReLU buffers");
    if (E > 4096)
        return loom_errf(e, LOOM_EUNSUPPORTED, "moe router: at most 4096 experts");
    if (c->kind == MOE_ROUTER_GROUP_LIMITED && c->n_groups > 256)
        return loom_errf(e, LOOM_EUNSUPPORTED, "moe router: at most 256 expert groups");

    /* Gate, scores and (but for expert choice, which ranks tokens per expert) each token's
     * selection, over the pool in blocks of ROUTE_TOK tokens: every token's result depends on
     * that token alone, and the blocks are the same for every thread count. */
    route_job j = {.r = r, .gin = gin, .pre = pre, .rt = rt, .T = T,
                   .select = c->kind != MOE_ROUTER_EXPERT_CHOICE};
    tensor_parallel_for((T + ROUTE_TOK - 1) / ROUTE_TOK, route_task, &j);
    if (c->z_loss_coef > 0)
        rt->z_loss = moe_z_loss(rt->logits, T, E, c->z_loss_coef, NULL);
    if (c->kind == MOE_ROUTER_EXPERT_CHOICE)
        return route_expert_choice(c, rt, e);
    return LOOM_OK;
}

/* ------------------------------------------------------------------ backward */

void moe_router_token_dlogits(const moe_router *r, const moe_routing *rt, int t,
                              const float *d_weight, const float *d_scores, double *ds, double *dl)
{
    const moe_router_config *c = &r->cfg;
    int T = rt->T, E = c->n_experts, k = rt->k;
    const double scale = c->route_scale;
    const float *st = rt->scores + (size_t)t * E;
    const float *lt = rt->logits + (size_t)t * E;
    const int32_t *idx = rt->expert_idx + (size_t)t * k;
    const float *wt = rt->weight + (size_t)t * k;
    for (int i = 0; i < E; i++)
        ds[i] = d_scores ? d_scores[(size_t)t * E + i] : 0.0;

    /* Through the slot weights w_j = scale * s_j (/ S, S = sum of chosen s, when
     * renormalised): dL/ds_i = (scale * dw_i - sum_j dw_j w_j) / S for a chosen i. */
    if (d_weight) {
        const float *dw = d_weight + (size_t)t * k;
        if (c->renormalize) {
            double S = 0.0, dot = 0.0;
            for (int j = 0; j < k; j++)
                if (idx[j] >= 0) {
                    S += st[idx[j]];
                    dot += (double)dw[j] * wt[j];
                }
            if (S > 0)
                for (int j = 0; j < k; j++)
                    if (idx[j] >= 0)
                        ds[idx[j]] += (scale * dw[j] - dot) / S;
        } else {
            for (int j = 0; j < k; j++)
                if (idx[j] >= 0)
                    ds[idx[j]] += scale * dw[j];
        }
    }

    /* Through the score function. */
    if (c->score == MOE_SCORE_SOFTMAX) {
        double dot = 0.0;
        for (int i = 0; i < E; i++)
            dot += ds[i] * st[i];
        for (int i = 0; i < E; i++)
            dl[i] = st[i] * (ds[i] - dot);
    } else {
        for (int i = 0; i < E; i++)
            dl[i] = ds[i] * st[i] * (1.0 - st[i]);
    }

    /* ST-MoE z-loss: coef/T * lse^2 per token, d/dl_i = 2 coef/T * lse * softmax(l)_i. */
    if (c->z_loss_coef > 0 && T > 0) {
        double m, z = moe_exp_sum(lt, E, &m);
        double lse = m + log(z), g = 2.0 * c->z_loss_coef / T * lse;
        for (int i = 0; i < E; i++)
            dl[i] += g * exp(lt[i] - m) / z;
    }

    /* Through the ReLU of LocMoE eq. 2 (subgradient 0 at 0). */
    if (c->gate_relu)
        for (int i = 0; i < E; i++)
            if (!(rt->pre_relu[(size_t)t * E + i] > 0.0f))
                dl[i] = 0.0;
}

int moe_router_backward(moe_router *r, const float *x, const moe_routing *rt, const float *d_weight,
                        const float *d_scores, float *d_x, loom_err *e)
{
    const moe_router_config *c = &r->cfg;
    if (c->kind == MOE_ROUTER_HASH)
        return LOOM_OK; /* no parameters, and the table does not depend on x */
    int T = rt->T, E = c->n_experts, d = c->d;
    double *ds = malloc((size_t)E * sizeof(double));
    double *dl = malloc((size_t)E * sizeof(double));
    double *dgin = malloc((size_t)d * sizeof(double));
    /* this batch's parameter gradients, summed over tokens in double, then added to the float
     * accumulators once (token terms cancel, and float sums would lose the difference) */
    double *gw = r->grad_w_gate ? calloc((size_t)E * d, sizeof(double)) : NULL;
    double *gb = calloc((size_t)E, sizeof(double));
    if (!ds || !dl || !dgin || (r->grad_w_gate && !gw) || !gb) {
        free(ds);
        free(dl);
        free(dgin);
        free(gw);
        free(gb);
        return loom_errf(e, LOOM_ENOMEM, "moe router: out of memory (backward)");
    }
    const float *gin = rt->jittered ? rt->gate_in : x;
    for (int t = 0; t < T; t++) {
        moe_router_token_dlogits(r, rt, t, d_weight, d_scores, ds, dl);
        for (int i = 0; i < E; i++)
            gb[i] += dl[i];

        /* Through the gate. */
        const float *gt = gin + (size_t)t * d;
        if (c->gate == MOE_GATE_LINEAR) {
            for (int j = 0; j < d; j++)
                dgin[j] = 0.0;
            for (int i = 0; i < E; i++) {
                if (dl[i] == 0.0)
                    continue;
                const float *wrow = r->w_gate + (size_t)i * d;
                double *grow = gw + (size_t)i * d;
                for (int j = 0; j < d; j++) {
                    dgin[j] += dl[i] * wrow[j];
                    grow[j] += dl[i] * gt[j];
                }
            }
        } else {
            double w = (double)E / d;
            for (int i = 0; i < E; i++)
                for (int j = grap_lo(i, d, E); j < grap_lo(i + 1, d, E); j++)
                    dgin[j] = w * dl[i];
        }
        if (d_x) {
            float *dxt = d_x + (size_t)t * d;
            const float *noise = rt->jittered ? rt->jitter_noise + (size_t)t * d : NULL;
            for (int j = 0; j < d; j++)
                dxt[j] += (float)(noise ? dgin[j] * noise[j] : dgin[j]);
        }
    }
    if (r->grad_w_gate)
        for (size_t i = 0; i < (size_t)E * d; i++)
            r->grad_w_gate[i] += (float)gw[i];
    if (r->grad_b_gate)
        for (int i = 0; i < E; i++)
            r->grad_b_gate[i] += (float)gb[i];
    free(ds);
    free(dl);
    free(dgin);
    free(gw);
    free(gb);
    return LOOM_OK;
}

void moe_router_update_balance_bias(moe_router *r, const int32_t *load)
{
    if (!r->balance_bias)
        return;
    int E = r->cfg.n_experts;
    double mean = 0.0;
    for (int i = 0; i < E; i++)
        mean += load[i];
    mean /= E;
    for (int i = 0; i < E; i++) {
        double gap = mean - load[i];
        r->balance_bias[i] += gap > 0 ? r->cfg.bias_rate : gap < 0 ? -r->cfg.bias_rate : 0.0f;
    }
}
