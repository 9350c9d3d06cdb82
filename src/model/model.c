/*
 * The transformer: weights (one f32 allocation carved into named pointers), loading from a
 * Hugging Face checkpoint or random initialisation, the paged KV cache storage, and the batched
 * forward pass over a flat varlen token batch.
 *
 * Dimension letters: T tokens in the batch, d hidden, H heads, Hkv kv heads, hd head dim,
 * q = H*hd, kv = Hkv*hd, V vocab, I dense FFN size, E experts, k experts per token,
 * Ie expert FFN size, Is shared-expert FFN size, L layers, bs KV block size.
 */
#include "loom/model.h"
#include "loom/moe.h"
#include "loom/tensor.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct model_layer {
    bool moe;
    float *attn_norm; /* (d) */
    float *wqkv;      /* (q + 2*kv, d): q_proj rows, then k_proj, then v_proj */
    float *bqkv;      /* (q + 2*kv) or NULL */
    float *wo;        /* (d, q) */
    float *bo;        /* (d) or NULL (Llama with attention_bias) */
    float *ffn_norm;  /* (d) */
    /* dense FFN (SwiGLU) */
    float *w_gate_up; /* (2*I, d): gate_proj rows, then up_proj */
    float *w_down;    /* (d, I) */
    /* MoE */
    float *router;      /* (E, d) linear gate; NULL for LoomMoe hash and locmoe routers */
    float *router_b;    /* (E) LoomMoe locmoe: the GrAP gate's bias (LocMoE eps), or NULL */
    float *score_bias;  /* (E) LoomMoe group_limited: selection-only balance bias, or NULL */
    int32_t *hash_table;/* (V) LoomMoe hash: expert of each token id, or NULL */
    moe_router gate;    /* LoomMoe: loom train's router over the tensors above */
    float *exp_gate_up; /* (E, 2*Ie, d): per expert w1 (gate) rows, then w3 (up) */
    float *exp_down;    /* (E, d, Ie): w2 */
    float *sh_gate_up;  /* (2*Is, d) Qwen2-MoE shared expert */
    float *sh_down;     /* (d, Is) */
    float *sh_gate;     /* (d) shared_expert_gate, a (1, d) Linear */
} model_layer;

/* Activations for a batch of up to cap_tokens tokens and cap_logits logit rows. */
typedef struct workspace {
    int cap_tokens, cap_logits;
    void *mem;
    float *x;         /* (T, d) residual stream */
    float *xn;        /* (T, d) normed input of a sub-layer */
    float *qkv;       /* (T, q + 2*kv) */
    float *q;         /* (T, q) */
    float *k;         /* (T, kv) */
    float *att;       /* (T, q) attention output */
    float *h;         /* (T, 2*Imax) gate and up projections */
    float *act;       /* (T, Imax) silu(gate) * up */
    float *xe;        /* (T, d) tokens gathered for one expert */
    float *ye;        /* (T, d) one expert's (or the shared expert's) output */
    float *ya;        /* (T*k, d) expert output of each assignment a = t*k + j */
    float *rl;        /* (T, E) router logits */
    float *ew;        /* (T, k) routing weights */
    float *xl;        /* (n_logits, d) rows that get logits */
    int32_t *pos;     /* (T) */
    int32_t *eidx;    /* (T, k) */
    int32_t *order;   /* (T*k) */
    int32_t *counts;  /* (E) */
    int32_t *offsets; /* (E+1) */
    int32_t *eorder;  /* (E) experts with tokens, most tokens first */
    int32_t *owner;   /* (E) thread that runs each expert (expert-per-thread MoE path) */
    /* Per-thread scratch of the expert-per-thread MoE path, its own allocation: grown when a
     * batch has more tokens, or the pool more threads, than any before. */
    void *moe_mem;
    int moe_cap_tokens, moe_cap_threads;
    size_t moe_stride; /* floats per thread: xe (T, d), h (T, 2*Ie), act (T, Ie) */
    const struct model_layer *moe_layer; /* the layer moe_experts_run works on */
    int n_active;                        /* experts with tokens, in eorder */
    moe_routing rt; /* LoomMoe routing of one layer, sized for rt.T_max tokens (0: none yet) */
} workspace;

struct model {
    model_config cfg;
    float *arena; /* every weight, one allocation */
    size_t arena_floats;
    float *embed;        /* (V, d) */
    float *lm_head;      /* (V, d); == embed when tied */
    float *final_norm;   /* (d) */
    model_layer *layers; /* (L) */
    float *inv_freq;     /* (hd/2) */
    int imax;            /* largest FFN width over dense, expert and shared FFNs */
    workspace ws;
};

/* ---------------------------------------------------------------- weight layout */

/* Bump allocator over the arena: a first pass with base NULL only counts. Each piece starts on
 * a 64-byte boundary. */
typedef struct carver {
    float *base;
    size_t off; /* floats */
} carver;

static float *carve(carver *c, size_t n)
{
    float *p = c->base ? c->base + c->off : NULL;
    c->off += (n + 15) & ~(size_t)15;
    return p;
}

static void layout_weights(model *m, carver *cv)
{
    const model_config *c = &m->cfg;
    size_t d = c->hidden_size, V = c->vocab_size, q = (size_t)c->n_heads * c->head_dim,
           kv = (size_t)c->n_kv_heads * c->head_dim;
    m->embed = carve(cv, V * d);
    m->lm_head = c->tie_word_embeddings ? m->embed : carve(cv, V * d);
    m->final_norm = carve(cv, d);
    for (int l = 0; l < c->n_layers; l++) {
        model_layer *ly = &m->layers[l];
        memset(ly, 0, sizeof(*ly));
        ly->moe = model_config_is_moe_layer(c, l);
        ly->attn_norm = carve(cv, d);
        ly->wqkv = carve(cv, (q + 2 * kv) * d);
        if (c->attention_bias)
            ly->bqkv = carve(cv, q + 2 * kv);
        ly->wo = carve(cv, d * q);
        if (c->attention_bias && (c->arch == ARCH_LLAMA))
            ly->bo = carve(cv, d);
        ly->ffn_norm = carve(cv, d);
        if (!ly->moe) {
            size_t I = c->intermediate_size;
            ly->w_gate_up = carve(cv, 2 * I * d);
            ly->w_down = carve(cv, d * I);
            continue;
        }
        size_t E = c->n_experts, Ie = c->moe_intermediate_size;
        if (c->arch != ARCH_LOOM_MOE || c->router_kind == MOE_ROUTER_TOPK ||
            c->router_kind == MOE_ROUTER_GROUP_LIMITED)
            ly->router = carve(cv, E * d);
        if (c->arch == ARCH_LOOM_MOE && c->router_kind == MOE_ROUTER_LOCMOE)
            ly->router_b = carve(cv, E);
        if (c->arch == ARCH_LOOM_MOE && c->router_kind == MOE_ROUTER_GROUP_LIMITED)
            ly->score_bias = carve(cv, E);
        if (c->arch == ARCH_LOOM_MOE && c->router_kind == MOE_ROUTER_HASH) /* int32 in floats */
            ly->hash_table = (int32_t *)carve(cv, V);
        ly->exp_gate_up = carve(cv, E * 2 * Ie * d);
        ly->exp_down = carve(cv, E * d * Ie);
        if (c->shared_expert_intermediate_size > 0) {
            size_t Is = c->shared_expert_intermediate_size;
            ly->sh_gate_up = carve(cv, 2 * Is * d);
            ly->sh_down = carve(cv, d * Is);
            ly->sh_gate = carve(cv, d);
        }
    }
}

/*
 * LoomMoe: each MoE layer gets a src/moe router configured as loom train configures it
 * (moe_router_config_default for the kind, then k, renormalisation, score, groups and scale
 * from config.json) and pointed at the layer's gate tensors, so serving routes with the
 * trainer's own code: moe_router_forward without jitter.
 */
static int routers_init(model *m, loom_err *e)
{
    const model_config *c = &m->cfg;
    for (int l = 0; l < c->n_layers; l++) {
        model_layer *ly = &m->layers[l];
        if (!ly->moe)
            continue;
        moe_router_config rc;
        moe_router_config_default(&rc, (moe_router_kind)c->router_kind, c->hidden_size,
                                  c->n_experts);
        rc.k = c->n_experts_per_tok;
        rc.renormalize = c->norm_topk_prob;
        rc.score = c->router_sigmoid ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
        if (c->router_kind == MOE_ROUTER_GROUP_LIMITED) {
            rc.n_groups = c->router_n_groups;
            rc.topk_groups = c->router_topk_groups;
        }
        rc.route_scale = c->router_route_scale > 0 ? c->router_route_scale : 1.0f;
        rc.bias_rate = 0;  /* the bias is the checkpoint's, never updated here */
        rc.vocab_size = 0; /* no table built: the checkpoint's is used */
        int rc_ = moe_router_init(&ly->gate, &rc, e);
        if (rc_)
            return rc_;
        moe_router *g = &ly->gate;
        free(g->w_gate);
        free(g->grad_w_gate);
        free(g->b_gate);
        free(g->grad_b_gate);
        g->grad_w_gate = g->grad_b_gate = NULL;
        g->w_gate = ly->router;
        g->b_gate = ly->router_b;
        g->balance_bias = ly->score_bias;
        g->hash_table = ly->hash_table;
        g->cfg.vocab_size = ly->hash_table ? c->vocab_size : 0;
    }
    return LOOM_OK;
}

static void routers_free(model *m)
{
    for (int l = 0; m->cfg.arch == ARCH_LOOM_MOE && l < m->cfg.n_layers; l++) {
        moe_router *g = &m->layers[l].gate;
        g->w_gate = g->b_gate = g->balance_bias = NULL; /* the arena's */
        g->hash_table = NULL;
        moe_router_free(g);
    }
}

/* A model with its arena allocated (weights uninitialised). */
static int model_alloc(const model_config *c, model **out, loom_err *e)
{
    model *m = xcalloc(1, sizeof(*m));
    m->cfg = *c;
    m->layers = xcalloc((size_t)c->n_layers, sizeof(model_layer));
    carver cv = {NULL, 0};
    layout_weights(m, &cv);
    size_t bytes;
    if (!loom_mul_ok(cv.off, sizeof(float), &bytes) || !(m->arena = loom_alloc_aligned(bytes))) {
        loom_errf(e, LOOM_ENOMEM, "cannot allocate %.2f GB for the weights of %s",
                  (double)cv.off * 4 / 1e9, c->architecture);
        free(m->layers);
        free(m);
        return LOOM_ENOMEM;
    }
    m->arena_floats = cv.off;
    cv = (carver){m->arena, 0};
    layout_weights(m, &cv);
    m->inv_freq = xmalloc((size_t)(c->head_dim / 2) * sizeof(float));
    model_config_rope_inv_freq(c, m->inv_freq);
    m->imax = c->intermediate_size;
    if (c->moe_intermediate_size > m->imax)
        m->imax = c->moe_intermediate_size;
    if (c->shared_expert_intermediate_size > m->imax)
        m->imax = c->shared_expert_intermediate_size;
    if (c->arch == ARCH_LOOM_MOE) {
        int rc = routers_init(m, e);
        if (rc) {
            model_free(m);
            return rc;
        }
    }
    *out = m;
    return LOOM_OK;
}

void model_free(model *m)
{
    if (!m)
        return;
    routers_free(m);
    moe_routing_free(&m->ws.rt);
    loom_free_aligned(m->arena);
    free(m->layers);
    free(m->inv_freq);
    free(m->ws.mem);
    loom_free_aligned(m->ws.moe_mem);
    free(m);
}

const model_config *model_get_config(const model *m)
{
    return &m->cfg;
}

size_t model_weight_bytes(const model *m)
{
    return m->arena_floats * sizeof(float);
}

/* ---------------------------------------------------------------- loading */

typedef struct loader {
    const st_set *set;
    const char *dir;
    loom_err *e;
} loader;

static void fmt_shape(char *buf, size_t n, int nd, const int64_t *shape)
{
    size_t k = 0;
    k += snprintf(buf + k, n - k, "[");
    for (int i = 0; i < nd && k < n; i++)
        k += snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < n)
        snprintf(buf + k, n - k, "]");
}

/* Copies tensor name (widened to f32) into dst after checking its shape is exactly
 * shape[0..nd). */
static int load_tensor(loader *ld, const char *name, float *dst, int nd, const int64_t *shape)
{
    const st_tensor *t = st_set_find(ld->set, name);
    if (!t)
        return loom_errf(ld->e, LOOM_ENOTFOUND, "%s: tensor '%s' not found in the checkpoint",
                         ld->dir, name);
    bool ok = t->n_dims == nd;
    for (int i = 0; ok && i < nd; i++)
        ok = t->shape[i] == shape[i];
    if (!ok) {
        char got[128], want[128];
        fmt_shape(got, sizeof(got), t->n_dims, t->shape);
        fmt_shape(want, sizeof(want), nd, shape);
        return loom_errf(ld->e, LOOM_EFORMAT, "%s: tensor '%s' has shape %s, expected %s", ld->dir,
                         name, got, want);
    }
    int rc = st_tensor_to_f32(t, dst, ld->e);
    if (rc && ld->e) {
        char msg[sizeof(ld->e->msg)];
        memcpy(msg, ld->e->msg, sizeof(msg));
        msg[sizeof(msg) - 1] = 0;
        loom_errf(ld->e, rc, "%s: %s", ld->dir, msg);
    }
    return rc;
}

static int load_1d(loader *ld, const char *name, float *dst, int64_t a)
{
    int64_t s[1] = {a};
    return load_tensor(ld, name, dst, 1, s);
}

static int load_2d(loader *ld, const char *name, float *dst, int64_t a, int64_t b)
{
    int64_t s[2] = {a, b};
    return load_tensor(ld, name, dst, 2, s);
}

static bool has(loader *ld, const char *name)
{
    return st_set_find(ld->set, name) != NULL;
}

/* SwiGLU weights gate (I, d), up (I, d), down (d, I) into gate_up (2I, d) and down. */
static int load_mlp(loader *ld, const char *gate, const char *up, const char *down, float *gate_up,
                    float *w_down, int64_t I, int64_t d)
{
    int rc = load_2d(ld, gate, gate_up, I, d);
    if (!rc)
        rc = load_2d(ld, up, gate_up + I * d, I, d);
    if (!rc)
        rc = load_2d(ld, down, w_down, d, I);
    return rc;
}

/*
 * LoomMoe gate of layer l (prefix p): the linear gate's weight (topk, group_limited), the GrAP
 * bias (locmoe), the group-limited balance bias (e_score_correction_bias, DeepSeek-V3's name;
 * zeros when absent, as a fresh trainer has it) or the hash router's token -> expert table
 * (an I32 tensor of vocab_size entries, each in [0, E)).
 */
static int load_loom_gate(loader *ld, model *m, int l, const char *p)
{
    const model_config *c = &m->cfg;
    model_layer *ly = &m->layers[l];
    int64_t d = c->hidden_size, E = c->n_experts, V = c->vocab_size;
    char n[192];
    int rc = LOOM_OK;
    if (ly->router) {
        snprintf(n, sizeof(n), "%s.gate.weight", p);
        rc = load_2d(ld, n, ly->router, E, d);
    }
    if (!rc && ly->router_b) {
        snprintf(n, sizeof(n), "%s.gate.bias", p);
        rc = load_1d(ld, n, ly->router_b, E);
    }
    if (!rc && ly->score_bias) {
        snprintf(n, sizeof(n), "%s.gate.e_score_correction_bias", p);
        if (has(ld, n))
            rc = load_1d(ld, n, ly->score_bias, E);
        else
            memset(ly->score_bias, 0, (size_t)E * sizeof(float));
    }
    if (!rc && ly->hash_table) {
        snprintf(n, sizeof(n), "%s.gate.hash_table", p);
        const st_tensor *t = st_set_find(ld->set, n);
        if (!t)
            return loom_errf(ld->e, LOOM_ENOTFOUND,
                             "%s: tensor '%s' not found (HINT: the hash router's table is "
                             "written by loom train --export; re-export the checkpoint)",
                             ld->dir, n);
        if (t->dtype != ST_I32 || t->n_dims != 1 || t->shape[0] != V)
            return loom_errf(ld->e, LOOM_EFORMAT, "%s: tensor '%s' must be I32 of shape [%lld]",
                             ld->dir, n, (long long)V);
        memcpy(ly->hash_table, t->data, (size_t)V * sizeof(int32_t));
        for (int64_t v = 0; v < V; v++)
            if (ly->hash_table[v] < 0 || ly->hash_table[v] >= E)
                return loom_errf(ld->e, LOOM_EFORMAT,
                                 "%s: tensor '%s': token %lld goes to expert %d of %lld", ld->dir,
                                 n, (long long)v, ly->hash_table[v], (long long)E);
    }
    return rc;
}

/*
 * Routed experts of layer l. Layouts:
 *   Mixtral per-expert:  P.gate.weight, P.experts.N.w1/w3/w2.weight, P = block_sparse_moe or mlp
 *   Qwen2-MoE per-expert: P.experts.N.gate_proj/up_proj/down_proj.weight
 *   fused (transformers 5): P.experts.gate_up_proj (E, 2Ie, d), gate rows first;
 *                           P.experts.down_proj (E, d, Ie)
 */
static int load_moe(loader *ld, model *m, int l)
{
    const model_config *c = &m->cfg;
    model_layer *ly = &m->layers[l];
    int64_t d = c->hidden_size, E = c->n_experts, Ie = c->moe_intermediate_size;
    char p[96], n1[192], n2[192], n3[192];
    snprintf(p, sizeof(p), "model.layers.%d.block_sparse_moe", l);
    snprintf(n1, sizeof(n1), "%s.gate.weight", p);
    int rc;
    if (c->arch == ARCH_LOOM_MOE) {
        if ((rc = load_loom_gate(ld, m, l, p)))
            return rc;
    } else if (!has(ld, n1)) {
        snprintf(p, sizeof(p), "model.layers.%d.mlp", l);
        snprintf(n1, sizeof(n1), "%s.gate.weight", p);
        if (!has(ld, n1))
            return loom_errf(ld->e, LOOM_ENOTFOUND,
                             "%s: tensor 'model.layers.%d.block_sparse_moe.gate.weight' (or "
                             "'%s') not found in the checkpoint",
                             ld->dir, l, n1);
    }
    if (c->arch != ARCH_LOOM_MOE && (rc = load_2d(ld, n1, ly->router, E, d)))
        return rc;
    snprintf(n1, sizeof(n1), "%s.experts.gate_up_proj", p);
    if (has(ld, n1)) {
        int64_t s1[3] = {E, 2 * Ie, d}, s2[3] = {E, d, Ie};
        snprintf(n2, sizeof(n2), "%s.experts.down_proj", p);
        rc = load_tensor(ld, n1, ly->exp_gate_up, 3, s1);
        if (!rc)
            rc = load_tensor(ld, n2, ly->exp_down, 3, s2);
        E = 0; /* skip the per-expert loop */
    }
    snprintf(n1, sizeof(n1), "%s.experts.0.w1.weight", p);
    bool mixtral_names = has(ld, n1);
    for (int x = 0; x < E && !rc; x++) {
        if (mixtral_names) {
            snprintf(n1, sizeof(n1), "%s.experts.%d.w1.weight", p, x);
            snprintf(n2, sizeof(n2), "%s.experts.%d.w3.weight", p, x);
            snprintf(n3, sizeof(n3), "%s.experts.%d.w2.weight", p, x);
        } else {
            snprintf(n1, sizeof(n1), "%s.experts.%d.gate_proj.weight", p, x);
            snprintf(n2, sizeof(n2), "%s.experts.%d.up_proj.weight", p, x);
            snprintf(n3, sizeof(n3), "%s.experts.%d.down_proj.weight", p, x);
        }
        rc = load_mlp(ld, n1, n2, n3, ly->exp_gate_up + (size_t)x * 2 * Ie * d,
                      ly->exp_down + (size_t)x * d * Ie, Ie, d);
    }
    if (rc || !ly->sh_gate_up)
        return rc;
    int64_t Is = c->shared_expert_intermediate_size;
    snprintf(n1, sizeof(n1), "%s.shared_expert.gate_proj.weight", p);
    snprintf(n2, sizeof(n2), "%s.shared_expert.up_proj.weight", p);
    snprintf(n3, sizeof(n3), "%s.shared_expert.down_proj.weight", p);
    rc = load_mlp(ld, n1, n2, n3, ly->sh_gate_up, ly->sh_down, Is, d);
    snprintf(n1, sizeof(n1), "%s.shared_expert_gate.weight", p);
    if (!rc)
        rc = load_2d(ld, n1, ly->sh_gate, 1, d);
    return rc;
}

static int load_layer(loader *ld, model *m, int l)
{
    const model_config *c = &m->cfg;
    model_layer *ly = &m->layers[l];
    int64_t d = c->hidden_size, q = (int64_t)c->n_heads * c->head_dim,
            kv = (int64_t)c->n_kv_heads * c->head_dim;
    char n[192];
    int rc;
#define NAME(...) snprintf(n, sizeof(n), __VA_ARGS__)
    NAME("model.layers.%d.input_layernorm.weight", l);
    if ((rc = load_1d(ld, n, ly->attn_norm, d)))
        return rc;
    NAME("model.layers.%d.post_attention_layernorm.weight", l);
    if ((rc = load_1d(ld, n, ly->ffn_norm, d)))
        return rc;
    static const char *proj[3] = {"q_proj", "k_proj", "v_proj"};
    int64_t rows[3] = {q, kv, kv}, off = 0;
    for (int i = 0; i < 3; i++) {
        NAME("model.layers.%d.self_attn.%s.weight", l, proj[i]);
        if ((rc = load_2d(ld, n, ly->wqkv + off * d, rows[i], d)))
            return rc;
        if (ly->bqkv) {
            NAME("model.layers.%d.self_attn.%s.bias", l, proj[i]);
            if ((rc = load_1d(ld, n, ly->bqkv + off, rows[i])))
                return rc;
        }
        off += rows[i];
    }
    NAME("model.layers.%d.self_attn.o_proj.weight", l);
    if ((rc = load_2d(ld, n, ly->wo, d, q)))
        return rc;
    if (ly->bo) {
        NAME("model.layers.%d.self_attn.o_proj.bias", l);
        if ((rc = load_1d(ld, n, ly->bo, d)))
            return rc;
    }
    if (ly->moe)
        return load_moe(ld, m, l);
    char n2[192], n3[192];
    NAME("model.layers.%d.mlp.gate_proj.weight", l);
    snprintf(n2, sizeof(n2), "model.layers.%d.mlp.up_proj.weight", l);
    snprintf(n3, sizeof(n3), "model.layers.%d.mlp.down_proj.weight", l);
#undef NAME
    return load_mlp(ld, n, n2, n3, ly->w_gate_up, ly->w_down, c->intermediate_size, d);
}

int model_load(const char *dir, model **out, loom_err *e)
{
    *out = NULL;
    model_config c;
    st_set set = {0};
    model *m = NULL;
    char *cfg_path = loom_path_join(dir, "config.json");
    int rc = model_config_load(cfg_path, &c, e);
    free(cfg_path);
    if (rc)
        return rc;
    if ((rc = st_set_open_dir(dir, &set, e)))
        return rc;
    if ((rc = model_alloc(&c, &m, e)))
        goto fail;
    loader ld = {&set, dir, e};
    int64_t V = c.vocab_size, d = c.hidden_size;
    if ((rc = load_2d(&ld, "model.embed_tokens.weight", m->embed, V, d)) ||
        (rc = load_1d(&ld, "model.norm.weight", m->final_norm, d)))
        goto fail;
    if (!c.tie_word_embeddings) {
        if (has(&ld, "lm_head.weight")) {
            if ((rc = load_2d(&ld, "lm_head.weight", m->lm_head, V, d)))
                goto fail;
        } else {
            /* untied in config but no lm_head: transformers ties them; so do we (the arena
             * keeps the unused slot, which is harmless) */
            m->lm_head = m->embed;
        }
    }
    for (int l = 0; l < c.n_layers; l++)
        if ((rc = load_layer(&ld, m, l)))
            goto fail;
    st_set_close(&set);
    LOG_INFO("loaded %s (%s, %d layers, %.1f M params) from %s", c.architecture, c.dtype,
             c.n_layers, (double)model_config_n_params(&c) / 1e6, dir);
    *out = m;
    return LOOM_OK;
fail:
    st_set_close(&set);
    model_free(m);
    return rc;
}

/* ---------------------------------------------------------------- random weights */

/* splitmix64 finaliser: a counter-based generator, so that element i's value depends only on
 * (seed, i) and the fill parallelises without changing the weights. */
static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Approximately normal(0, std): Irwin-Hall sum of four 16-bit uniforms from one 64-bit draw
 * (mean 2*65535, sd 65536/sqrt(3)); plenty for benchmark weights and ~10x faster than
 * Box-Muller, which matters for the 4 GB presets. */
typedef struct fill_job {
    float *p;
    size_t n;
    uint64_t seed;
    float std;
} fill_job;

static void fill_run(void *arg, int tid, int n_threads)
{
    const fill_job *j = arg;
    const float scale = j->std * 1.7320508f / 65536.0f;
    size_t per = (j->n + (size_t)n_threads - 1) / (size_t)n_threads;
    size_t a = per * (size_t)tid, b = a + per < j->n ? a + per : j->n;
    for (size_t i = a; i < b; i++) {
        uint64_t r = mix64(j->seed + i * 0x9e3779b97f4a7c15ULL);
        int s = (int)(r & 0xffff) + (int)((r >> 16) & 0xffff) + (int)((r >> 32) & 0xffff) +
                (int)(r >> 48);
        j->p[i] = (float)(s - 131070) * scale;
    }
}

static void fill_normal(float *p, size_t n, uint64_t seed, float std)
{
    fill_job j = {p, n, seed, std};
    tensor_parallel(fill_run, &j);
}

static void fill_const(float *p, size_t n, float v)
{
    for (size_t i = 0; i < n; i++)
        p[i] = v;
}

int model_create_random(const char *preset, uint64_t seed, model **out, loom_err *e)
{
    *out = NULL;
    model_config c;
    int rc = model_config_preset(preset, &c, e);
    if (rc)
        return rc;
    model *m;
    if ((rc = model_alloc(&c, &m, e)))
        return rc;
    fill_normal(m->arena, m->arena_floats, mix64(seed ^ 0x6c6f6f6dULL), 0.02f);
    /* norms start at one as transformers initialises them; biases stay random (transformers
     * zeroes them) so that tests exercise them */
    size_t d = c.hidden_size;
    fill_const(m->final_norm, d, 1.0f);
    for (int l = 0; l < c.n_layers; l++) {
        fill_const(m->layers[l].attn_norm, d, 1.0f);
        fill_const(m->layers[l].ffn_norm, d, 1.0f);
    }
    *out = m;
    return LOOM_OK;
}

int model_open(const char *spec, model **out, loom_err *e)
{
    if (strncmp(spec, "random:", 7) == 0)
        return model_create_random(spec + 7, 0, out, e);
    return model_load(spec, out, e);
}

/* ---------------------------------------------------------------- saving */

static cJSON *config_to_json(const model_config *c)
{
    cJSON *j = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString(c->architecture));
    cJSON_AddStringToObject(j, "model_type", c->model_type);
    cJSON_AddStringToObject(j, "dtype", "float32");
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddNumberToObject(j, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(j, "hidden_size", c->hidden_size);
    cJSON_AddNumberToObject(j, "intermediate_size", c->intermediate_size);
    cJSON_AddNumberToObject(j, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(j, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(j, "num_key_value_heads", c->n_kv_heads);
    cJSON_AddNumberToObject(j, "head_dim", c->head_dim);
    cJSON_AddNumberToObject(j, "max_position_embeddings", c->max_position_embeddings);
    cJSON_AddNumberToObject(j, "rms_norm_eps", c->rms_norm_eps);
    cJSON_AddNumberToObject(j, "rope_theta", c->rope_theta);
    if (c->rope_type != ROPE_DEFAULT) {
        cJSON *rs = cJSON_AddObjectToObject(j, "rope_scaling");
        cJSON_AddStringToObject(rs, "rope_type", c->rope_type == ROPE_LINEAR ? "linear" : "llama3");
        cJSON_AddNumberToObject(rs, "factor", c->rope_factor);
        if (c->rope_type == ROPE_LLAMA3) {
            cJSON_AddNumberToObject(rs, "low_freq_factor", c->rope_low_freq_factor);
            cJSON_AddNumberToObject(rs, "high_freq_factor", c->rope_high_freq_factor);
            cJSON_AddNumberToObject(rs, "original_max_position_embeddings",
                                    c->rope_original_max_position);
        }
    }
    cJSON_AddBoolToObject(j, "tie_word_embeddings", c->tie_word_embeddings);
    cJSON_AddBoolToObject(j, "attention_bias", c->attention_bias);
    if (c->bos_token_id >= 0)
        cJSON_AddNumberToObject(j, "bos_token_id", c->bos_token_id);
    else
        cJSON_AddNullToObject(j, "bos_token_id");
    if (c->n_eos == 1) {
        cJSON_AddNumberToObject(j, "eos_token_id", c->eos_token_ids[0]);
    } else if (c->n_eos > 1) {
        cJSON *eos = cJSON_AddArrayToObject(j, "eos_token_id");
        for (int i = 0; i < c->n_eos; i++)
            cJSON_AddItemToArray(eos, cJSON_CreateNumber(c->eos_token_ids[i]));
    }
    if (c->arch == ARCH_MISTRAL || c->arch == ARCH_MIXTRAL) {
        if (c->sliding_window > 0)
            cJSON_AddNumberToObject(j, "sliding_window", c->sliding_window);
        else
            cJSON_AddNullToObject(j, "sliding_window");
    }
    if (c->arch == ARCH_MIXTRAL) {
        cJSON_AddNumberToObject(j, "num_local_experts", c->n_experts);
        cJSON_AddNumberToObject(j, "num_experts_per_tok", c->n_experts_per_tok);
    } else if (c->arch == ARCH_QWEN2_MOE) {
        cJSON_AddNumberToObject(j, "num_experts", c->n_experts);
        cJSON_AddNumberToObject(j, "num_experts_per_tok", c->n_experts_per_tok);
        cJSON_AddNumberToObject(j, "moe_intermediate_size", c->moe_intermediate_size);
        cJSON_AddNumberToObject(j, "shared_expert_intermediate_size",
                                c->shared_expert_intermediate_size);
        cJSON_AddBoolToObject(j, "norm_topk_prob", c->norm_topk_prob);
        cJSON_AddNumberToObject(j, "decoder_sparse_step", c->decoder_sparse_step);
        cJSON *mo = cJSON_AddArrayToObject(j, "mlp_only_layers");
        for (int i = 0; i < c->n_mlp_only_layers; i++)
            cJSON_AddItemToArray(mo, cJSON_CreateNumber(c->mlp_only_layers[i]));
    }
    if (c->arch == ARCH_QWEN2 || c->arch == ARCH_QWEN2_MOE)
        cJSON_AddBoolToObject(j, "use_sliding_window", false);
    return j;
}

/* A growing list of tensors to save, pointing into the arena. */
typedef struct save_list {
    st_tensor *t;
    size_t n, cap;
} save_list;

static void save_add(save_list *sl, const char *name, const float *data, int nd, int64_t a,
                     int64_t b)
{
    if (sl->n == sl->cap) {
        sl->cap = sl->cap ? sl->cap * 2 : 64;
        sl->t = xrealloc(sl->t, sl->cap * sizeof(st_tensor));
    }
    st_tensor *t = &sl->t[sl->n++];
    memset(t, 0, sizeof(*t));
    t->name = xstrdup(name);
    t->dtype = ST_F32;
    t->n_dims = nd;
    t->shape[0] = a;
    t->shape[1] = b;
    t->data = data;
}

/* Gate (I, d), up (I, d) rows of gate_up (2I, d) and down (d, I) under three names. */
static void save_mlp(save_list *sl, const char *gate, const char *up, const char *down,
                     const float *gate_up, const float *w_down, int64_t I, int64_t d)
{
    save_add(sl, gate, gate_up, 2, I, d);
    save_add(sl, up, gate_up + I * d, 2, I, d);
    save_add(sl, down, w_down, 2, d, I);
}

int model_save(const model *m, const char *dir, loom_err *e)
{
    const model_config *c = &m->cfg;
    if (c->arch == ARCH_LOOM_MOE)
        return loom_errf(e, LOOM_EUNSUPPORTED, "model_save: LoomMoeForCausalLM is written by "
                         "loom train --export only");
    int64_t d = c->hidden_size, V = c->vocab_size, q = (int64_t)c->n_heads * c->head_dim,
            kv = (int64_t)c->n_kv_heads * c->head_dim;
    save_list sl = {0};
    char n1[192], n2[192], n3[192];
    save_add(&sl, "model.embed_tokens.weight", m->embed, 2, V, d);
    if (m->lm_head != m->embed)
        save_add(&sl, "lm_head.weight", m->lm_head, 2, V, d);
    save_add(&sl, "model.norm.weight", m->final_norm, 1, d, 0);
    for (int l = 0; l < c->n_layers; l++) {
        const model_layer *ly = &m->layers[l];
        static const char *proj[3] = {"q_proj", "k_proj", "v_proj"};
        int64_t rows[3] = {q, kv, kv}, off = 0;
        snprintf(n1, sizeof(n1), "model.layers.%d.input_layernorm.weight", l);
        save_add(&sl, n1, ly->attn_norm, 1, d, 0);
        snprintf(n1, sizeof(n1), "model.layers.%d.post_attention_layernorm.weight", l);
        save_add(&sl, n1, ly->ffn_norm, 1, d, 0);
        for (int i = 0; i < 3; i++) {
            snprintf(n1, sizeof(n1), "model.layers.%d.self_attn.%s.weight", l, proj[i]);
            save_add(&sl, n1, ly->wqkv + off * d, 2, rows[i], d);
            if (ly->bqkv) {
                snprintf(n1, sizeof(n1), "model.layers.%d.self_attn.%s.bias", l, proj[i]);
                save_add(&sl, n1, ly->bqkv + off, 1, rows[i], 0);
            }
            off += rows[i];
        }
        snprintf(n1, sizeof(n1), "model.layers.%d.self_attn.o_proj.weight", l);
        save_add(&sl, n1, ly->wo, 2, d, q);
        if (ly->bo) {
            snprintf(n1, sizeof(n1), "model.layers.%d.self_attn.o_proj.bias", l);
            save_add(&sl, n1, ly->bo, 1, d, 0);
        }
        if (!ly->moe) {
            snprintf(n1, sizeof(n1), "model.layers.%d.mlp.gate_proj.weight", l);
            snprintf(n2, sizeof(n2), "model.layers.%d.mlp.up_proj.weight", l);
            snprintf(n3, sizeof(n3), "model.layers.%d.mlp.down_proj.weight", l);
            save_mlp(&sl, n1, n2, n3, ly->w_gate_up, ly->w_down, c->intermediate_size, d);
            continue;
        }
        bool mixtral = c->arch == ARCH_MIXTRAL;
        const char *p = mixtral ? "block_sparse_moe" : "mlp";
        int64_t E = c->n_experts, Ie = c->moe_intermediate_size;
        snprintf(n1, sizeof(n1), "model.layers.%d.%s.gate.weight", l, p);
        save_add(&sl, n1, ly->router, 2, E, d);
        for (int x = 0; x < E; x++) {
            snprintf(n1, sizeof(n1), "model.layers.%d.%s.experts.%d.%s.weight", l, p, x,
                     mixtral ? "w1" : "gate_proj");
            snprintf(n2, sizeof(n2), "model.layers.%d.%s.experts.%d.%s.weight", l, p, x,
                     mixtral ? "w3" : "up_proj");
            snprintf(n3, sizeof(n3), "model.layers.%d.%s.experts.%d.%s.weight", l, p, x,
                     mixtral ? "w2" : "down_proj");
            save_mlp(&sl, n1, n2, n3, ly->exp_gate_up + (size_t)x * 2 * Ie * d,
                     ly->exp_down + (size_t)x * d * Ie, Ie, d);
        }
        if (ly->sh_gate_up) {
            snprintf(n1, sizeof(n1), "model.layers.%d.mlp.shared_expert.gate_proj.weight", l);
            snprintf(n2, sizeof(n2), "model.layers.%d.mlp.shared_expert.up_proj.weight", l);
            snprintf(n3, sizeof(n3), "model.layers.%d.mlp.shared_expert.down_proj.weight", l);
            save_mlp(&sl, n1, n2, n3, ly->sh_gate_up, ly->sh_down,
                     c->shared_expert_intermediate_size, d);
            snprintf(n1, sizeof(n1), "model.layers.%d.mlp.shared_expert_gate.weight", l);
            save_add(&sl, n1, ly->sh_gate, 2, 1, d);
        }
    }
    char *wpath = loom_path_join(dir, "model.safetensors");
    int rc = st_save(wpath, sl.t, sl.n, e);
    free(wpath);
    for (size_t i = 0; i < sl.n; i++)
        free(sl.t[i].name);
    free(sl.t);
    if (rc)
        return rc;
    cJSON *j = config_to_json(c);
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    char *cpath = loom_path_join(dir, "config.json");
    FILE *f = fopen(cpath, "w");
    bool ok = f && fputs(text, f) >= 0 && fputc('\n', f) != EOF;
    if (f && fclose(f) != 0)
        ok = false;
    if (!ok)
        rc = loom_errf(e, LOOM_EIO, "cannot write %s", cpath);
    free(cpath);
    free(text);
    return rc;
}

/* ---------------------------------------------------------------- KV cache */

size_t model_kv_bytes_per_block(const model_config *c, int block_size)
{
    return 2 * (size_t)c->n_layers * (size_t)block_size * c->n_kv_heads * c->head_dim *
           sizeof(float);
}

int model_kv_init(model_kv *kv, const model_config *c, int n_blocks, int block_size, loom_err *e)
{
    memset(kv, 0, sizeof(*kv));
    if (n_blocks <= 0 || block_size <= 0)
        return loom_errf(e, LOOM_EINVAL, "KV cache needs positive blocks (%d) and block size (%d)",
                         n_blocks, block_size);
    size_t kv_dim = (size_t)c->n_kv_heads * c->head_dim, n, bytes;
    if (!loom_mul_ok((size_t)c->n_layers, (size_t)n_blocks, &n) ||
        !loom_mul_ok(n, (size_t)block_size, &n) || !loom_mul_ok(n, kv_dim, &n) ||
        !loom_mul_ok(n, sizeof(float), &bytes))
        return loom_errf(e, LOOM_ENOMEM, "KV cache of %d blocks of %d tokens overflows", n_blocks,
                         block_size);
    kv->k = loom_alloc_aligned(bytes);
    kv->v = kv->k ? loom_alloc_aligned(bytes) : NULL;
    if (!kv->v) {
        loom_free_aligned(kv->k);
        kv->k = NULL;
        return loom_errf(e, LOOM_ENOMEM, "cannot allocate %.2f GB for the KV cache",
                         2.0 * (double)bytes / 1e9);
    }
    kv->n_layers = c->n_layers;
    kv->n_blocks = n_blocks;
    kv->block_size = block_size;
    kv->kv_dim = (int)kv_dim;
    return LOOM_OK;
}

void model_kv_free(model_kv *kv)
{
    if (!kv)
        return;
    loom_free_aligned(kv->k);
    loom_free_aligned(kv->v);
    memset(kv, 0, sizeof(*kv));
}

/* ---------------------------------------------------------------- workspace */

/* Scratch of the expert-per-thread MoE path for batches of T tokens on n threads. */
static int moe_scratch_reserve(model *m, int T, int n, loom_err *e)
{
    workspace *w = &m->ws;
    const model_config *c = &m->cfg;
    if (c->n_experts <= 0 || (T <= w->moe_cap_tokens && n <= w->moe_cap_threads))
        return LOOM_OK;
    int capT = T > w->moe_cap_tokens ? T : w->moe_cap_tokens;
    int capN = n > w->moe_cap_threads ? n : w->moe_cap_threads;
    /* each piece a whole number of cache lines, so threads never share one */
    size_t stride = ((size_t)capT * (c->hidden_size + 3 * (size_t)c->moe_intermediate_size) + 15) &
                    ~(size_t)15;
    size_t bytes;
    void *mem = NULL;
    if (!loom_mul_ok(stride * sizeof(float), (size_t)capN, &bytes) ||
        !(mem = loom_alloc_aligned(bytes)))
        return loom_errf(e, LOOM_ENOMEM, "cannot allocate MoE scratch for %d tokens on %d threads",
                         T, n);
    loom_free_aligned(w->moe_mem);
    w->moe_mem = mem;
    w->moe_stride = stride;
    w->moe_cap_tokens = capT;
    w->moe_cap_threads = capN;
    return LOOM_OK;
}

static int workspace_reserve(model *m, int T, int n_logits, loom_err *e)
{
    workspace *w = &m->ws;
    int rc = moe_scratch_reserve(m, T, tensor_get_threads(), e);
    if (rc)
        return rc;
    if (m->cfg.arch == ARCH_LOOM_MOE && T > w->rt.T_max) {
        int cap = T > w->cap_tokens ? T : w->cap_tokens;
        const moe_router_config *rcfg = NULL;
        for (int l = 0; l < m->cfg.n_layers && !rcfg; l++)
            if (m->layers[l].moe)
                rcfg = &m->layers[l].gate.cfg;
        moe_routing_free(&w->rt);
        if (rcfg && (rc = moe_routing_init(&w->rt, rcfg, cap, e)))
            return rc;
    }
    if (T <= w->cap_tokens && n_logits <= w->cap_logits)
        return LOOM_OK;
    int capT = T > w->cap_tokens ? T : w->cap_tokens;
    int capL = n_logits > w->cap_logits ? n_logits : w->cap_logits;
    const model_config *c = &m->cfg;
    size_t Tn = capT, d = c->hidden_size, q = (size_t)c->n_heads * c->head_dim,
           kv = (size_t)c->n_kv_heads * c->head_dim, E = c->n_experts > 0 ? c->n_experts : 1,
           k = c->n_experts_per_tok > 0 ? c->n_experts_per_tok : 1, I = m->imax;
    size_t floats = Tn * (d * 4 + (q + 2 * kv) + q * 2 + kv + 3 * I + E + k + k * d) +
                    (size_t)capL * d;
    size_t ints = Tn + 2 * Tn * k + 4 * E + 1;
    size_t bytes = (floats + ints + 64) * 4;
    void *mem = malloc(bytes);
    if (!mem)
        return loom_errf(e, LOOM_ENOMEM, "cannot allocate %zu bytes of activations for %d tokens",
                         bytes, T);
    free(w->mem);
    w->mem = mem;
    w->cap_tokens = capT;
    w->cap_logits = capL;
    float *p = mem;
#define TAKE(n) (p += (n), p - (n))
    w->x = TAKE(Tn * d);
    w->xn = TAKE(Tn * d);
    w->qkv = TAKE(Tn * (q + 2 * kv));
    w->q = TAKE(Tn * q);
    w->k = TAKE(Tn * kv);
    w->att = TAKE(Tn * q);
    w->h = TAKE(Tn * 2 * I);
    w->act = TAKE(Tn * I);
    w->xe = TAKE(Tn * d);
    w->ye = TAKE(Tn * d);
    w->ya = TAKE(Tn * k * d);
    w->rl = TAKE(Tn * E);
    w->ew = TAKE(Tn * k);
    w->xl = TAKE((size_t)capL * d);
#undef TAKE
    int32_t *ip = (int32_t *)p;
    w->pos = ip;
    w->eidx = ip + Tn;
    w->order = w->eidx + Tn * k;
    w->counts = w->order + Tn * k;
    w->offsets = w->counts + E;
    w->eorder = w->offsets + E + 1;
    w->owner = w->eorder + E;
    return LOOM_OK;
}

/* ---------------------------------------------------------------- forward */

/* act (n, I) = silu(h[:, :I]) * h[:, I:], h (n, 2I) */
static void swiglu_rows(float *act, const float *h, int n, int I)
{
    for (int t = 0; t < n; t++) {
        const float *g = h + (size_t)t * 2 * I, *u = g + I;
        float *a = act + (size_t)t * I;
        for (int i = 0; i < I; i++)
            a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* y (n, d) = down(silu(gate(x)) * up(x)) for x (n, d) */
static void swiglu_ffn(workspace *w, float *y, const float *x, const float *gate_up,
                       const float *down, int n, int d, int I, bool accumulate)
{
    tensor_matmul(w->h, x, gate_up, NULL, n, d, 2 * I);
    swiglu_rows(w->act, w->h, n, I);
    if (accumulate)
        tensor_matmul_add(y, w->act, down, n, I, d);
    else
        tensor_matmul(y, w->act, down, NULL, n, I, d);
}

/*
 * Expert x's FFN over the n tokens routed to it (assignments ord[0..n)), each output row written
 * to ya at its assignment index. xe (n, d), h (n, 2*Ie), act (n, Ie) are scratch. serial: run the
 * GEMMs on this thread (the caller split the work by experts); else split each over the pool.
 */
static void expert_ffn(const model *m, const model_layer *ly, int x, const int32_t *ord, int n,
                       float *xe, float *h, float *act, bool serial)
{
    const model_config *c = &m->cfg;
    const workspace *w = &m->ws;
    int d = c->hidden_size, k = c->n_experts_per_tok, Ie = c->moe_intermediate_size;
    const float *gate_up = ly->exp_gate_up + (size_t)x * 2 * Ie * d; /* (2*Ie, d) */
    const float *down = ly->exp_down + (size_t)x * d * Ie;           /* (d, Ie) */
    void (*matmul)(float *, const float *, const float *, const float *, int, int, int) =
        serial ? tensor_matmul_serial : tensor_matmul;
    for (int r = 0; r < n; r++)
        memcpy(xe + (size_t)r * d, w->xn + (size_t)(ord[r] / k) * d, (size_t)d * sizeof(float));
    matmul(h, xe, gate_up, NULL, n, d, 2 * Ie);
    swiglu_rows(act, h, n, Ie);
    matmul(xe, act, down, NULL, n, Ie, d); /* xe is free again: the (n, d) output */
    for (int r = 0; r < n; r++)
        memcpy(w->ya + (size_t)ord[r] * d, xe + (size_t)r * d, (size_t)d * sizeof(float));
}

/* Thread tid of n runs the experts assigned to it (owner % n, so a pool smaller than planned
 * still covers them all), in its own slice of the scratch. */
static void moe_experts_run(void *arg, int tid, int n)
{
    const model *m = arg;
    const model_config *c = &m->cfg;
    const workspace *w = &m->ws;
    const model_layer *ly = w->moe_layer;
    size_t Tn = w->moe_cap_tokens;
    for (int i = 0; i < w->n_active; i++) {
        int x = w->eorder[i];
        if (w->owner[x] % n != tid)
            continue;
        /* owner < moe_cap_threads, so tid is too */
        float *xe = (float *)w->moe_mem + (size_t)tid * w->moe_stride;
        float *h = xe + Tn * c->hidden_size, *act = h + Tn * 2 * c->moe_intermediate_size;
        expert_ffn(m, ly, x, w->order + w->offsets[x], w->counts[x], xe, h, act, true);
    }
}

/*
 * Which way to run the routed experts on N threads. Split-each-expert runs every expert's GEMMs
 * over the pool: 2 hand-offs per active expert, and each thread packs the same token rows.
 * Expert-per-thread runs whole experts on one thread each (one hand-off per layer, no duplicated
 * packing) but leaves threads idle when the token counts are uneven. Experts go to threads
 * greedily, most tokens first, each onto the least loaded thread; expert-per-thread is taken
 * when every thread gets an expert, the experts average at least MOE_MIN_TOKENS tokens, and the
 * busiest thread has at most MOE_MAX_IMBALANCE times the mean load. Measured on 2 cores with
 * random:mixtral-tiny (d = 256, Ie = 512, 8 experts top-2, random routing, so near-even loads):
 * expert-per-thread made prefill of 128 to 4096 tokens 12-20% faster (even at ~1000 tokens per
 * expert), but decode at batch 8 (~2 tokens per expert, a step streams weights and token
 * counts say little about the cost) no faster or up to ~8% slower in bench/engine, hence the
 * token floor. Uneven loads (a trained router's hot experts) fall back to splitting.
 */
#define MOE_MAX_IMBALANCE 1.25
#define MOE_MIN_TOKENS 8

static bool moe_plan_experts(workspace *w, int E, int N)
{
    w->n_active = 0;
    for (int x = 0; x < E; x++) {
        if (w->counts[x] == 0)
            continue;
        int i = w->n_active++;
        while (i > 0 && w->counts[w->eorder[i - 1]] < w->counts[x]) { /* stable: ties by index */
            w->eorder[i] = w->eorder[i - 1];
            i--;
        }
        w->eorder[i] = x;
    }
    if (N <= 1)
        return false;
    int64_t load[64] = {0}, total = 0, busiest = 0;
    if (N > 64)
        N = 64;
    for (int i = 0; i < w->n_active; i++) {
        int x = w->eorder[i], best = 0;
        for (int t = 1; t < N; t++)
            if (load[t] < load[best])
                best = t;
        w->owner[x] = best;
        load[best] += w->counts[x];
        total += w->counts[x];
    }
    for (int t = 0; t < N; t++)
        busiest = load[t] > busiest ? load[t] : busiest;
    return w->n_active >= N && total >= (int64_t)MOE_MIN_TOKENS * w->n_active &&
           (double)busiest <= MOE_MAX_IMBALANCE * (double)total / N;
}

/*
 * MoE block on xn (T, d), output added to the residual x: router logits, top-k routing, then each
 * expert's SwiGLU over the tokens routed to it into ya (one row per assignment), combined in
 * token order, x[t] += sum_j w[t,j] * ya[t*k+j], so the sum does not depend on which thread ran
 * which expert. Qwen2-MoE adds the shared expert, scaled by sigmoid(shared_expert_gate(xn)).
 */
static int moe_block(model *m, model_layer *ly, const int32_t *tokens, int T, float *router_out,
                     loom_err *e)
{
    const model_config *c = &m->cfg;
    workspace *w = &m->ws;
    int d = c->hidden_size, E = c->n_experts, k = c->n_experts_per_tok;
    if (c->arch == ARCH_LOOM_MOE) {
        /* loom train's router, as in training but without jitter; it fills every slot */
        int rc = moe_router_forward(&ly->gate, w->xn, tokens, T, false, &w->rt, e);
        if (rc)
            return rc;
        memcpy(w->eidx, w->rt.expert_idx, (size_t)T * k * sizeof(int32_t));
        memcpy(w->ew, w->rt.weight, (size_t)T * k * sizeof(float));
        if (router_out)
            memcpy(router_out, w->rt.logits, (size_t)T * E * sizeof(float));
    } else {
        tensor_matmul(w->rl, w->xn, ly->router, NULL, T, d, E);
        if (router_out)
            memcpy(router_out, w->rl, (size_t)T * E * sizeof(float));
        moe_topk_route(w->rl, T, E, k, c->norm_topk_prob, w->eidx, w->ew);
    }
    moe_group_by_expert(w->eidx, T, k, E, w->counts, w->offsets, w->order);
    int N = tensor_get_threads();
    if (N > w->moe_cap_threads)
        N = w->moe_cap_threads;
    if (moe_plan_experts(w, E, N)) {
        w->moe_layer = ly;
        tensor_parallel(moe_experts_run, m);
    } else {
        for (int i = 0; i < w->n_active; i++) {
            int x = w->eorder[i];
            expert_ffn(m, ly, x, w->order + w->offsets[x], w->counts[x], w->xe, w->h, w->act,
                       false);
        }
    }
    for (int t = 0; t < T; t++) {
        float *xt = w->x + (size_t)t * d;
        for (int j = 0; j < k; j++) {
            float g = w->ew[(size_t)t * k + j];
            const float *yr = w->ya + ((size_t)t * k + j) * d;
            for (int i = 0; i < d; i++)
                xt[i] += g * yr[i];
        }
    }
    if (!ly->sh_gate_up)
        return LOOM_OK;
    int Is = c->shared_expert_intermediate_size;
    swiglu_ffn(w, w->ye, w->xn, ly->sh_gate_up, ly->sh_down, T, d, Is, false);
    for (int t = 0; t < T; t++) {
        const float *xt = w->xn + (size_t)t * d, *yt = w->ye + (size_t)t * d;
        float s = 0.0f;
        for (int i = 0; i < d; i++)
            s += xt[i] * ly->sh_gate[i];
        float g = 1.0f / (1.0f + expf(-s));
        float *out = w->x + (size_t)t * d;
        for (int i = 0; i < d; i++)
            out[i] += g * yt[i];
    }
    return LOOM_OK;
}

static int check_batch(const model *m, const model_kv *kv, const model_batch *b, loom_err *e)
{
    const model_config *c = &m->cfg;
    if (kv->n_layers != c->n_layers || kv->kv_dim != c->n_kv_heads * c->head_dim || !kv->k)
        return loom_errf(e, LOOM_EINVAL, "KV cache does not match the model");
    if (b->n_seqs < 1 || b->n_tokens < 1 || b->n_logits < 0 || !b->tokens || !b->seq_start ||
        !b->ctx_len || !b->block_tables || (b->n_logits > 0 && !b->logit_rows))
        return loom_errf(e, LOOM_EINVAL, "empty or incomplete batch");
    if (b->seq_start[0] != 0 || b->seq_start[b->n_seqs] != b->n_tokens)
        return loom_errf(e, LOOM_EINVAL, "seq_start must run from 0 to n_tokens");
    for (int s = 0; s < b->n_seqs; s++) {
        int n = b->seq_start[s + 1] - b->seq_start[s];
        if (n < 0 || b->ctx_len[s] < 0 || !b->block_tables[s] ||
            (int64_t)b->ctx_len[s] + n > INT32_MAX - kv->block_size)
            return loom_errf(e, LOOM_EINVAL, "sequence %d: bad token range or context", s);
        int n_blocks = (b->ctx_len[s] + n + kv->block_size - 1) / kv->block_size;
        for (int i = 0; i < n_blocks; i++) {
            int32_t id = b->block_tables[s][i];
            if (id < 0 || id >= kv->n_blocks)
                return loom_errf(e, LOOM_EINVAL, "sequence %d: block id %d out of range [0, %d)", s,
                                 id, kv->n_blocks);
        }
    }
    for (int t = 0; t < b->n_tokens; t++)
        if (b->tokens[t] < 0 || b->tokens[t] >= c->vocab_size)
            return loom_errf(e, LOOM_EINVAL, "token %d out of vocabulary (%d)", b->tokens[t],
                             c->vocab_size);
    for (int r = 0; r < b->n_logits; r++)
        if (b->logit_rows[r] < 0 || b->logit_rows[r] >= b->n_tokens)
            return loom_errf(e, LOOM_EINVAL, "logit row %d out of the batch", b->logit_rows[r]);
    return LOOM_OK;
}

int model_forward(model *m, model_kv *kv, const model_batch *b, float *logits, loom_err *e)
{
    int rc = check_batch(m, kv, b, e);
    if (rc)
        return rc;
    if ((rc = workspace_reserve(m, b->n_tokens, b->n_logits, e)))
        return rc;
    const model_config *c = &m->cfg;
    workspace *w = &m->ws;
    int T = b->n_tokens, d = c->hidden_size, H = c->n_heads, Hkv = c->n_kv_heads, hd = c->head_dim,
        q = H * hd, kvd = Hkv * hd, bs = kv->block_size;
    size_t layer_stride = (size_t)kv->n_blocks * bs * kvd;
    float scale = 1.0f / sqrtf((float)hd);

    for (int s = 0; s < b->n_seqs; s++)
        for (int t = b->seq_start[s]; t < b->seq_start[s + 1]; t++)
            w->pos[t] = b->ctx_len[s] + (t - b->seq_start[s]);
    for (int t = 0; t < T; t++)
        memcpy(w->x + (size_t)t * d, m->embed + (size_t)b->tokens[t] * d,
               (size_t)d * sizeof(float));

    for (int l = 0; l < c->n_layers; l++) {
        model_layer *ly = &m->layers[l];
        float *kc = kv->k + l * layer_stride, *vc = kv->v + l * layer_stride;
        /* attention: one GEMM for q, k, v over the whole batch */
        tensor_rmsnorm(w->xn, w->x, ly->attn_norm, T, d, c->rms_norm_eps);
        tensor_matmul(w->qkv, w->xn, ly->wqkv, ly->bqkv, T, d, q + 2 * kvd);
        for (int t = 0; t < T; t++) {
            const float *row = w->qkv + (size_t)t * (q + 2 * kvd);
            memcpy(w->q + (size_t)t * q, row, (size_t)q * sizeof(float));
            memcpy(w->k + (size_t)t * kvd, row + q, (size_t)kvd * sizeof(float));
        }
        tensor_rope(w->q, w->pos, T, H, hd, m->inv_freq);
        tensor_rope(w->k, w->pos, T, Hkv, hd, m->inv_freq);
        for (int s = 0; s < b->n_seqs; s++) {
            for (int t = b->seq_start[s]; t < b->seq_start[s + 1]; t++) {
                int p = w->pos[t];
                size_t slot = ((size_t)b->block_tables[s][p / bs] * bs + p % bs) * kvd;
                memcpy(kc + slot, w->k + (size_t)t * kvd, (size_t)kvd * sizeof(float));
                memcpy(vc + slot, w->qkv + (size_t)t * (q + 2 * kvd) + q + kvd,
                       (size_t)kvd * sizeof(float));
            }
        }
        tensor_attention_paged_varlen(w->att, w->q, kc, vc, b->n_seqs, b->seq_start, b->ctx_len,
                                      b->block_tables, bs, H, Hkv, hd, scale, c->sliding_window);
        tensor_matmul_add(w->x, w->att, ly->wo, T, q, d);
        if (ly->bo)
            for (int t = 0; t < T; t++)
                for (int i = 0; i < d; i++)
                    w->x[(size_t)t * d + i] += ly->bo[i];
        /* feed-forward */
        tensor_rmsnorm(w->xn, w->x, ly->ffn_norm, T, d, c->rms_norm_eps);
        if (ly->moe) {
            if (b->moe_inputs && b->moe_inputs[l]) /* the normalised hidden state it routes */
                memcpy(b->moe_inputs[l], w->xn, (size_t)T * d * sizeof(float));
            if ((rc = moe_block(m, ly, b->tokens, T,
                                b->router_logits ? b->router_logits[l] : NULL, e)))
                return rc;
        } else {
            swiglu_ffn(w, w->x, w->xn, ly->w_gate_up, ly->w_down, T, d, c->intermediate_size, true);
        }
    }

    if (b->n_logits == 0)
        return LOOM_OK;
    for (int r = 0; r < b->n_logits; r++)
        memcpy(w->xl + (size_t)r * d, w->x + (size_t)b->logit_rows[r] * d,
               (size_t)d * sizeof(float));
    tensor_rmsnorm(w->xl, w->xl, m->final_norm, b->n_logits, d, c->rms_norm_eps);
    tensor_matmul(logits, w->xl, m->lm_head, NULL, b->n_logits, d, c->vocab_size);
    return LOOM_OK;
}
