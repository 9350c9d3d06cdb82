/*
 * Trainable decoder-only transformer (Llama / Mixtral): parameters laid out like the Hugging Face
 * checkpoint, a forward pass that keeps every activation, and its backward in C over the tensor
 * kernels (tensor_matmul forward, pooled cblas_sgemm slabs for the gradient GEMMs).
 *
 * Dimension letters: B sequences, T positions, N = B*T tokens, d hidden, H heads, Hkv kv heads,
 * hd head dim, V vocab, I FFN size (per expert), E experts, k slots per token, L layers,
 * R ranks, El = E/R experts per rank, n rows of one expert segment.
 *
 * One layer, as in transformers' LlamaDecoderLayer / MixtralDecoderLayer:
 *   h1 = rmsnorm(x) * ln1                      rstd1 kept
 *   q, k, v = h1 Wq^T, h1 Wk^T, h1 Wv^T; rope(q), rope(k) (rotate-half)
 *   P = softmax(q k^T / sqrt(hd) + causal)     per (sequence, head), kept
 *   x2 = x + (P v) Wo^T
 *   h2 = rmsnorm(x2) * ln2
 *   x' = x2 + ffn(h2): dense SwiGLU, or the MoE of SwiGLU experts through src/moe/
 * The MoE FFN (moe.c) routes, plans (capacity, drops), dispatches, exchanges rows with the
 * ranks hosting the experts, runs the experts, and combines.
 */
#include "train_internal.h"

#include "loom/tensor.h"

#include <cblas.h>
#undef I /* complex.h, through cblas.h: I is the FFN size here */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ GEMM helpers */

/*
 * The gradient GEMMs run on the tensor pool like tensor_matmul: OpenBLAS is single-threaded
 * (tensor_set_threads), so a large product is split into one slab of output rows per thread,
 * each thread a single-threaded SGEMM. Small products run on the caller.
 */
enum { MM_DX, MM_DW, MM_Y };
typedef struct mm_args {
    int kind, n, in, out;
    float *c;
    const float *a, *b;
} mm_args;

static void mm_rows(const mm_args *g, int r0, int r1)
{
    int n = g->n, in = g->in, out = g->out, rows = r1 - r0;
    if (rows <= 0)
        return;
    switch (g->kind) {
    case MM_DX: /* dx rows r0.. += dy rows r0.. @ w */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, in, out, 1.0f,
                    g->a + (size_t)r0 * out, out, g->b, in, 1.0f, g->c + (size_t)r0 * in, in);
        break;
    case MM_DW: /* dw rows r0.. += (dy columns r0..)^T @ x */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, in, n, 1.0f, g->a + r0, out,
                    g->b, in, 1.0f, g->c + (size_t)r0 * in, in);
        break;
    default: /* y rows r0.. = x rows r0.. @ w^T */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f,
                    g->a + (size_t)r0 * in, in, g->b, in, 0.0f, g->c + (size_t)r0 * out, out);
        break;
    }
}

static void mm_job(void *arg, int tid, int nth)
{
    const mm_args *g = arg;
    int M = g->kind == MM_DW ? g->out : g->n;
    mm_rows(g, (int)((int64_t)M * tid / nth), (int)((int64_t)M * (tid + 1) / nth));
}

static void mm_run(int kind, float *c, const float *a, const float *b, int n, int in, int out)
{
    if (n <= 0)
        return;
    mm_args g = {.kind = kind, .n = n, .in = in, .out = out, .c = c, .a = a, .b = b};
    int M = kind == MM_DW ? out : n;
    if (tensor_get_threads() > 1 && M >= 32 && (double)n * in * out >= 1 << 18)
        tensor_parallel(mm_job, &g);
    else
        mm_rows(&g, 0, M);
}

/* dx (n, in) += dy (n, out) @ w (out, in) */
void train_mm_dx(float *dx, const float *dy, const float *w, int n, int in, int out)
{
    mm_run(MM_DX, dx, dy, w, n, in, out);
}

/* dw (out, in) += dy^T (out, n) @ x (n, in) */
void train_mm_dw(float *dw, const float *dy, const float *x, int n, int in, int out)
{
    mm_run(MM_DW, dw, dy, x, n, in, out);
}

/* y (n, out) = x (n, in) @ w^T */
void train_mm(float *y, const float *x, const float *w, int n, int in, int out)
{
    mm_run(MM_Y, y, x, w, n, in, out);
}

/* ------------------------------------------------------------------ layer kernels */

/* y (N, d) = x * rstd * w, rstd (N) = 1 / sqrt(mean(x^2) + eps) (kept for backward). */
void train_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int N, int d,
                           float eps)
{
    for (int t = 0; t < N; t++) {
        const float *xt = x + (size_t)t * d;
        float *yt = y + (size_t)t * d;
        double ss = 0.0;
        for (int i = 0; i < d; i++)
            ss += (double)xt[i] * xt[i];
        float r = (float)(1.0 / sqrt(ss / d + eps));
        rstd[t] = r;
        for (int i = 0; i < d; i++)
            yt[i] = w[i] * (xt[i] * r);
    }
}

/*
 * Backward of y = w * x * r, r = (mean(x^2) + eps)^-1/2:
 *   dw += sum_t dy * x * r
 *   dx += r * (dy * w) - x * r^3 / d * sum_i (dy_i w_i x_i)
 */
void train_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                            const float *rstd, const float *w, int N, int d)
{
    for (int t = 0; t < N; t++) {
        const float *xt = x + (size_t)t * d, *dyt = dy + (size_t)t * d;
        float *dxt = dx + (size_t)t * d;
        double r = rstd[t], dot = 0.0;
        for (int i = 0; i < d; i++) {
            dot += (double)dyt[i] * w[i] * xt[i];
            dw[i] += (float)(dyt[i] * xt[i] * r);
        }
        double c = dot * r * r * r / d;
        for (int i = 0; i < d; i++)
            dxt[i] += (float)(r * dyt[i] * w[i] - c * xt[i]);
    }
}

/*
 * Rotate-half RoPE (sign = +1, as tensor_rope) or its transpose (sign = -1), the backward:
 * the rotation by angle a is orthogonal, so its gradient is the rotation by -a.
 *   x (N, n_heads*hd), pos (N), inv_freq (hd/2).
 */
void train_rope(float *x, const int32_t *pos, int N, int n_heads, int hd, const float *inv_freq,
                int sign)
{
    int half = hd / 2;
    size_t row = (size_t)n_heads * hd;
    for (int t = 0; t < N; t++) {
        float *xt = x + (size_t)t * row;
        float p = (float)pos[t];
        for (int i = 0; i < half; i++) {
            float a = p * inv_freq[i];
            float c = cosf(a), s = sign * sinf(a);
            for (int h = 0; h < n_heads; h++) {
                float *xh = xt + (size_t)h * hd;
                float x1 = xh[i], x2 = xh[i + half];
                xh[i] = x1 * c - x2 * s;
                xh[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

/*
 * Causal GQA attention of B sequences of T tokens, keeping the probabilities.
 *   out (N, H*hd); q (N, H*hd); k, v (N, Hkv*hd); P (B, H, T, T) (zero above the diagonal).
 */
typedef struct attn_args {
    float *out, *P;
    const float *q, *k, *v, *d_out;
    float *dq, *dk, *dv, *scratch;
    int B, T, H, Hkv, hd;
    float scale;
} attn_args;

/* Per (sequence, head), two single-threaded SGEMMs: S = scale q_h k_h^T over the full T x T (the
 * masked upper triangle is computed and thrown away: twice the causal FLOPs, but at GEMM speed,
 * 8x the scalar loops' on the shakespeare-moe shape), row softmax over j <= i, out_h = P v_h. */
static void attn_forward_job(void *arg, int tid, int nth)
{
    attn_args *a = arg;
    int T = a->T, H = a->H, Hkv = a->Hkv, hd = a->hd, group = H / Hkv;
    int qrow = H * hd, kvrow = Hkv * hd;
    for (int bh = tid; bh < a->B * H; bh += nth) {
        int b = bh / H, h = bh % H, kh = h / group;
        const float *qh = a->q + (size_t)b * T * qrow + (size_t)h * hd;
        const float *kb = a->k + (size_t)b * T * kvrow + (size_t)kh * hd;
        const float *vb = a->v + (size_t)b * T * kvrow + (size_t)kh * hd;
        float *P = a->P + (size_t)bh * T * T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, a->scale, qh, qrow, kb,
                    kvrow, 0.0f, P, T);
        for (int i = 0; i < T; i++) {
            float *Pi = P + (size_t)i * T, m = -INFINITY, z = 0.0f;
            for (int j = 0; j <= i; j++)
                m = Pi[j] > m ? Pi[j] : m;
            for (int j = 0; j <= i; j++) {
                Pi[j] = expf(Pi[j] - m);
                z += Pi[j];
            }
            float inv = 1.0f / z;
            for (int j = 0; j <= i; j++)
                Pi[j] *= inv;
            for (int j = i + 1; j < T; j++)
                Pi[j] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1.0f, P, T, vb, kvrow,
                    0.0f, a->out + (size_t)b * T * qrow + (size_t)h * hd, qrow);
    }
}

void train_attention_forward(float *out, float *P, const float *q, const float *k, const float *v,
                             int B, int T, int H, int Hkv, int hd)
{
    attn_args a = {.out = out, .P = P, .q = q, .k = k, .v = v, .B = B, .T = T, .H = H,
                   .Hkv = Hkv, .hd = hd, .scale = 1.0f / sqrtf((float)hd)};
    tensor_parallel(attn_forward_job, &a);
}

/*
 * Backward, per sequence (heads of one kv group write the same dk, dv rows, so the parallel
 * split is over sequences), per head, as SGEMMs over T x T:
 *   dP = dO v^T;  dS_ij = scale P_ij (dP_ij - sum_j' P_ij' dP_ij') (0 above the diagonal)
 *   dq += dS k;  dk += dS^T q;  dv += P^T dO
 * dq, dk, dv are accumulated (+=). scratch: (threads, T*T) floats.
 */
static void attn_backward_job(void *arg, int tid, int nth)
{
    attn_args *a = arg;
    int T = a->T, H = a->H, Hkv = a->Hkv, hd = a->hd, group = H / Hkv;
    int qrow = H * hd, kvrow = Hkv * hd;
    float *dS = a->scratch + (size_t)tid * T * T;
    for (int b = tid; b < a->B; b += nth) {
        for (int h = 0; h < H; h++) {
            int kh = h / group;
            size_t qo = (size_t)b * T * qrow + (size_t)h * hd;
            size_t ko = (size_t)b * T * kvrow + (size_t)kh * hd;
            const float *P = a->P + ((size_t)b * H + h) * T * T;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, 1.0f, a->d_out + qo,
                        qrow, a->v + ko, kvrow, 0.0f, dS, T);
            for (int i = 0; i < T; i++) {
                const float *Pi = P + (size_t)i * T;
                float *dSi = dS + (size_t)i * T;
                double dot = 0.0;
                for (int j = 0; j <= i; j++)
                    dot += (double)dSi[j] * Pi[j];
                for (int j = 0; j <= i; j++)
                    dSi[j] = Pi[j] * (dSi[j] - (float)dot) * a->scale;
                for (int j = i + 1; j < T; j++)
                    dSi[j] = 0.0f;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1.0f, dS, T,
                        a->k + ko, kvrow, 1.0f, a->dq + qo, qrow);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1.0f, dS, T, a->q + qo,
                        qrow, 1.0f, a->dk + ko, kvrow);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1.0f, P, T,
                        a->d_out + qo, qrow, 1.0f, a->dv + ko, kvrow);
        }
    }
}

void train_attention_backward(float *dq, float *dk, float *dv, const float *d_out, const float *P,
                              const float *q, const float *k, const float *v, int B, int T, int H,
                              int Hkv, int hd, float *scratch)
{
    attn_args a = {.P = (float *)P, .q = q, .k = k, .v = v, .d_out = d_out, .dq = dq, .dk = dk,
                   .dv = dv, .scratch = scratch, .B = B, .T = T, .H = H, .Hkv = Hkv, .hd = hd,
                   .scale = 1.0f / sqrtf((float)hd)};
    tensor_parallel(attn_backward_job, &a);
}

/* a (n) = silu(g) * u */
void train_swiglu_forward(float *a, const float *g, const float *u, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float s = 1.0f / (1.0f + expf(-g[i]));
        a[i] = g[i] * s * u[i];
    }
}

/* dg = da * u * silu'(g), du = da * silu(g); silu'(g) = s (1 + g (1 - s)). Overwrites. */
void train_swiglu_backward(float *dg, float *du, const float *da, const float *g, const float *u,
                           size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float s = 1.0f / (1.0f + expf(-g[i]));
        float dai = da[i];
        dg[i] = dai * u[i] * s * (1.0f + g[i] * (1.0f - s));
        du[i] = dai * g[i] * s;
    }
}

/*
 * SwiGLU FFN over n rows: g = x W1^T, u = x W3^T, a = silu(g) u, y = a W2^T
 *   x (n, d); g, u, a (n, I) kept; y (n, d); w1, w3 (I, d); w2 (d, I).
 */
void train_ffn_forward(float *y, float *g, float *u, float *a, const float *x, const float *w1,
                       const float *w3, const float *w2, int n, int d, int I)
{
    if (n <= 0)
        return;
    tensor_matmul(g, x, w1, NULL, n, d, I);
    tensor_matmul(u, x, w3, NULL, n, d, I);
    train_swiglu_forward(a, g, u, (size_t)n * I);
    tensor_matmul(y, a, w2, NULL, n, I, d);
}

/* Backward: dx (n, d) += ..., dw1, dw3, dw2 += ...; scratch dg, du (n, I) (da reuses dg). */
void train_ffn_backward(float *dx, float *dw1, float *dw3, float *dw2, const float *dy,
                        const float *x, const float *g, const float *u, const float *a,
                        const float *w1, const float *w3, const float *w2, int n, int d, int I,
                        float *dg, float *du)
{
    if (n <= 0)
        return;
    train_mm_dw(dw2, dy, a, n, I, d);
    memset(du, 0, (size_t)n * I * sizeof(float));
    train_mm_dx(du, dy, w2, n, I, d); /* du holds da for now */
    train_swiglu_backward(dg, du, du, g, u, (size_t)n * I);
    train_mm_dw(dw1, dg, x, n, d, I);
    train_mm_dw(dw3, du, x, n, d, I);
    train_mm_dx(dx, dg, w1, n, d, I);
    train_mm_dx(dx, du, w3, n, d, I);
}

/* ------------------------------------------------------------------ config */

void train_config_default(train_config *c, const model_config *mc, int B_max, int T_max)
{
    memset(c, 0, sizeof(*c));
    c->model = *mc;
    c->router = MOE_ROUTER_TOPK;
    c->top_k = mc->n_experts_per_tok;
    c->renormalize = true;
    c->B_max = B_max;
    c->T_max = T_max;
    c->seed = 1;
    c->init_std = 0.02f;
}

int train_config_set_router(train_config *c, const char *name, loom_err *e)
{
    int k = c->model.n_experts_per_tok > 0 ? c->model.n_experts_per_tok : 2;
    if (!strcmp(name, "mixtral") || !strcmp(name, "topk")) {
        c->router = MOE_ROUTER_TOPK;
        c->top_k = k;
        c->renormalize = true;
        return LOOM_OK;
    }
    if (!strcmp(name, "switch")) {
        c->router = MOE_ROUTER_TOPK;
        c->top_k = 1;
        c->renormalize = false;
        return LOOM_OK;
    }
    if (!strcmp(name, "gshard")) {
        c->router = MOE_ROUTER_TOPK;
        c->top_k = 2;
        c->renormalize = true;
        return LOOM_OK;
    }
    moe_router_kind kind;
    if (moe_router_kind_parse(name, &kind))
        return loom_errf(e, LOOM_EINVAL,
                         "unknown router '%s' (mixtral, topk, switch, gshard, hash, locmoe, "
                         "group_limited, expert_choice)",
                         name);
    c->router = kind;
    c->top_k = kind == MOE_ROUTER_GROUP_LIMITED ? k : 1;
    c->renormalize = kind == MOE_ROUTER_GROUP_LIMITED;
    return LOOM_OK;
}

/* ------------------------------------------------------------------ parameter table */

static void add_param(train_model *m, const char *name, int n_dims, int64_t d0, int64_t d1,
                      int layer, int expert)
{
    train_param *p = &m->tensors[m->n_tensors++];
    snprintf(p->name, sizeof(p->name), "%s", name);
    p->n_dims = n_dims;
    p->shape[0] = d0;
    p->shape[1] = n_dims > 1 ? d1 : 1;
    p->n = (size_t)d0 * (size_t)p->shape[1];
    p->offset = m->n_params;
    p->layer = layer;
    p->expert = expert;
    m->n_params += p->n;
}

/* Table of every tensor in checkpoint order; expert tensors w1, w2, w3 of one expert adjacent,
 * experts of a layer adjacent (a rank's experts form one block). */
static void build_table(train_model *m)
{
    const model_config *c = &m->cfg.model;
    int d = c->hidden_size, V = c->vocab_size, H = c->n_heads, Hkv = c->n_kv_heads,
        hd = c->head_dim, I = c->intermediate_size, E = c->n_experts;
    char n[128];
    m->n_tensors = 0;
    m->n_params = 0;
    add_param(m, "model.embed_tokens.weight", 2, V, d, -1, -1);
    for (int l = 0; l < c->n_layers; l++) {
        snprintf(n, sizeof(n), "model.layers.%d.input_layernorm.weight", l);
        add_param(m, n, 1, d, 0, l, -1);
        snprintf(n, sizeof(n), "model.layers.%d.self_attn.q_proj.weight", l);
        add_param(m, n, 2, (int64_t)H * hd, d, l, -1);
        snprintf(n, sizeof(n), "model.layers.%d.self_attn.k_proj.weight", l);
        add_param(m, n, 2, (int64_t)Hkv * hd, d, l, -1);
        snprintf(n, sizeof(n), "model.layers.%d.self_attn.v_proj.weight", l);
        add_param(m, n, 2, (int64_t)Hkv * hd, d, l, -1);
        snprintf(n, sizeof(n), "model.layers.%d.self_attn.o_proj.weight", l);
        add_param(m, n, 2, d, (int64_t)H * hd, l, -1);
        snprintf(n, sizeof(n), "model.layers.%d.post_attention_layernorm.weight", l);
        add_param(m, n, 1, d, 0, l, -1);
        if (E > 0) {
            if (m->router_cfg.gate == MOE_GATE_LINEAR && m->cfg.router != MOE_ROUTER_HASH) {
                snprintf(n, sizeof(n), "model.layers.%d.block_sparse_moe.gate.weight", l);
                add_param(m, n, 2, E, d, l, -1);
            }
            if (m->router_cfg.gate_bias && m->cfg.router != MOE_ROUTER_HASH) {
                snprintf(n, sizeof(n), "model.layers.%d.block_sparse_moe.gate.bias", l);
                add_param(m, n, 1, E, 0, l, -1);
            }
            for (int x = 0; x < E; x++) {
                snprintf(n, sizeof(n), "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l,
                         x);
                add_param(m, n, 2, I, d, l, x);
                snprintf(n, sizeof(n), "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l,
                         x);
                add_param(m, n, 2, d, I, l, x);
                snprintf(n, sizeof(n), "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l,
                         x);
                add_param(m, n, 2, I, d, l, x);
            }
        } else {
            snprintf(n, sizeof(n), "model.layers.%d.mlp.gate_proj.weight", l);
            add_param(m, n, 2, I, d, l, -1);
            snprintf(n, sizeof(n), "model.layers.%d.mlp.up_proj.weight", l);
            add_param(m, n, 2, I, d, l, -1);
            snprintf(n, sizeof(n), "model.layers.%d.mlp.down_proj.weight", l);
            add_param(m, n, 2, d, I, l, -1);
        }
    }
    add_param(m, "model.norm.weight", 1, d, 0, -1, -1);
    if (!c->tie_word_embeddings)
        add_param(m, "lm_head.weight", 2, V, d, -1, -1);
}

const train_param *train_model_find(const train_model *m, const char *name)
{
    for (int i = 0; i < m->n_tensors; i++)
        if (!strcmp(m->tensors[i].name, name))
            return &m->tensors[i];
    return NULL;
}

/* Carve base (params or grads) into named pointers, by looking the names up in the table. */
static float *at(const train_model *m, float *base, const char *fmt, int l)
{
    char n[128];
    snprintf(n, sizeof(n), fmt, l);
    const train_param *p = train_model_find(m, n);
    return p ? base + p->offset : NULL;
}

static void carve(train_model *m, float *base, train_weights *w)
{
    const model_config *c = &m->cfg.model;
    w->embed = at(m, base, "model.embed_tokens.weight%.0d", 0);
    w->norm = at(m, base, "model.norm.weight%.0d", 0);
    w->lm_head = c->tie_word_embeddings ? w->embed : at(m, base, "lm_head.weight%.0d", 0);
    for (int l = 0; l < c->n_layers; l++) {
        train_layer_weights *lw = &w->layers[l];
        lw->ln1 = at(m, base, "model.layers.%d.input_layernorm.weight", l);
        lw->wq = at(m, base, "model.layers.%d.self_attn.q_proj.weight", l);
        lw->wk = at(m, base, "model.layers.%d.self_attn.k_proj.weight", l);
        lw->wv = at(m, base, "model.layers.%d.self_attn.v_proj.weight", l);
        lw->wo = at(m, base, "model.layers.%d.self_attn.o_proj.weight", l);
        lw->ln2 = at(m, base, "model.layers.%d.post_attention_layernorm.weight", l);
        lw->w_gate = at(m, base, "model.layers.%d.mlp.gate_proj.weight", l);
        lw->w_up = at(m, base, "model.layers.%d.mlp.up_proj.weight", l);
        lw->w_down = at(m, base, "model.layers.%d.mlp.down_proj.weight", l);
        lw->router_w = at(m, base, "model.layers.%d.block_sparse_moe.gate.weight", l);
        lw->router_b = at(m, base, "model.layers.%d.block_sparse_moe.gate.bias", l);
        lw->experts = at(m, base, "model.layers.%d.block_sparse_moe.experts.0.w1.weight", l);
    }
}

/* ------------------------------------------------------------------ create / free */

static int check_config(const train_config *c, const train_dist *dist, loom_err *e)
{
    const model_config *mc = &c->model;
    if (mc->hidden_size < 1 || mc->n_layers < 1 || mc->n_heads < 1 || mc->n_kv_heads < 1 ||
        mc->head_dim < 2 || mc->head_dim % 2 || mc->n_heads % mc->n_kv_heads ||
        mc->vocab_size < 2 || mc->intermediate_size < 1)
        return loom_errf(e, LOOM_EINVAL, "train: unsupported model shape (d=%d L=%d H=%d Hkv=%d "
                         "hd=%d V=%d I=%d)", mc->hidden_size, mc->n_layers, mc->n_heads,
                         mc->n_kv_heads, mc->head_dim, mc->vocab_size, mc->intermediate_size);
    if (mc->arch == ARCH_QWEN2 || mc->arch == ARCH_QWEN2_MOE || mc->attention_bias)
        return loom_errf(e, LOOM_EUNSUPPORTED, "train: only Llama/Mistral/Mixtral architectures "
                         "(no attention bias, no shared experts)");
    if (c->B_max < 1 || c->T_max < 2)
        return loom_errf(e, LOOM_EINVAL, "train: batch %d x %d too small", c->B_max, c->T_max);
    if (mc->n_experts > 0 && dist && mc->n_experts % dist->n_ranks)
        return loom_errf(e, LOOM_EINVAL,
                         "train: %d experts do not divide over %d ranks (HINT: use a rank count "
                         "that divides the expert count)",
                         mc->n_experts, dist->n_ranks);
    if (mc->n_experts > 256)
        return loom_errf(e, LOOM_EUNSUPPORTED, "train: at most 256 experts");
    return LOOM_OK;
}

int train_model_create(const train_config *cfg, train_dist *dist, train_model **out, loom_err *e)
{
    *out = NULL;
    int rc = check_config(cfg, dist, e);
    if (rc)
        return rc;
    train_model *m = xcalloc(1, sizeof(*m));
    m->cfg = *cfg;
    if (!dist) {
        m->local_dist.n_ranks = 1;
        m->local_dist.ranks_per_node = 1;
        dist = &m->local_dist;
    }
    m->dist = dist;
    const model_config *c = &m->cfg.model;
    int L = c->n_layers, d = c->hidden_size, E = c->n_experts;
    if (E > 0) {
        moe_router_config *rc_ = &m->router_cfg;
        moe_router_config_default(rc_, cfg->router, d, E);
        if (cfg->router == MOE_ROUTER_TOPK || cfg->router == MOE_ROUTER_GROUP_LIMITED) {
            rc_->k = cfg->top_k > 0 ? cfg->top_k : (c->n_experts_per_tok > 0 ? c->n_experts_per_tok : 1);
            rc_->renormalize = cfg->renormalize;
        }
        if (cfg->router == MOE_ROUTER_HASH)
            rc_->vocab_size = c->vocab_size;
        rc_->z_loss_coef = (float)cfg->z_coef;
        rc_->init_std = cfg->init_std > 0 ? cfg->init_std : 0.02f;
    }
    /* table: count first, then fill */
    int max_tensors = 3 + L * (8 + 3 * (E > 0 ? E : 1));
    m->tensors = xcalloc((size_t)max_tensors, sizeof(train_param));
    build_table(m);
    m->params = loom_alloc_aligned(m->n_params * sizeof(float));
    m->grads = loom_alloc_aligned(m->n_params * sizeof(float));
    if (!m->params || !m->grads) {
        train_model_free(m);
        return loom_errf(e, LOOM_ENOMEM, "train: out of memory for %zu parameters", m->n_params);
    }
    memset(m->params, 0, m->n_params * sizeof(float));
    memset(m->grads, 0, m->n_params * sizeof(float));
    m->w.layers = xcalloc((size_t)L, sizeof(train_layer_weights));
    m->g.layers = xcalloc((size_t)L, sizeof(train_layer_weights));
    carve(m, m->params, &m->w);
    carve(m, m->grads, &m->g);
    m->inv_freq = xmalloc((size_t)(c->head_dim / 2) * sizeof(float));
    model_config_rope_inv_freq(c, m->inv_freq);
    if ((rc = train_acts_init(m, e)) || (E > 0 && (rc = train_moe_init(m, e)))) {
        train_model_free(m);
        return rc;
    }
    *out = m;
    return LOOM_OK;
}

void train_model_free(train_model *m)
{
    if (!m)
        return;
    train_moe_free(m);
    train_acts_free(m);
    loom_free_aligned(m->params);
    loom_free_aligned(m->grads);
    free(m->w.layers);
    free(m->g.layers);
    free(m->tensors);
    free(m->inv_freq);
    free(m);
}

const train_config *train_model_config(const train_model *m) { return &m->cfg; }
size_t train_model_n_params(const train_model *m) { return m->n_params; }
int train_model_n_tensors(const train_model *m) { return m->n_tensors; }
const train_param *train_model_tensor(const train_model *m, int i) { return &m->tensors[i]; }
float *train_model_params(train_model *m) { return m->params; }
float *train_model_grads(train_model *m) { return m->grads; }
const float *train_logits(const train_model *m) { return m->logits; }

bool train_model_owns(const train_model *m, int i)
{
    int x = m->tensors[i].expert;
    return x < 0 || (x >= m->e_lo && x < m->e_hi);
}

void train_zero_grad(train_model *m)
{
    memset(m->grads, 0, m->n_params * sizeof(float));
}

/* Norm weights start at 1, everything else N(0, std^2); one stream over the table in order,
 * so every rank draws the same weights. */
void train_model_init_random(train_model *m, uint64_t seed)
{
    loom_rng r;
    rng_seed(&r, seed);
    float std = m->cfg.init_std > 0 ? m->cfg.init_std : 0.02f;
    for (int i = 0; i < m->n_tensors; i++) {
        const train_param *p = &m->tensors[i];
        float *x = m->params + p->offset;
        bool norm = p->n_dims == 1 && strstr(p->name, "norm");
        bool bias = p->n_dims == 1 && !norm;
        for (size_t j = 0; j < p->n; j++)
            x[j] = norm ? 1.0f : bias ? 0.0f : std * rng_normal(&r);
    }
}

/* ------------------------------------------------------------------ activations */

#define CARVE(ptr, count)                                                                          \
    do {                                                                                           \
        (ptr) = base + off;                                                                        \
        off += ((size_t)(count) + 15) & ~(size_t)15;                                               \
    } while (0)

/* Sizes every activation and backward scratch for (B_max, T_max) once; the MoE expert rows,
 * which vary with the routing, grow on demand in moe.c. */
int train_acts_init(train_model *m, loom_err *e)
{
    const model_config *c = &m->cfg.model;
    size_t B = m->cfg.B_max, T = m->cfg.T_max, N = B * T, L = c->n_layers, d = c->hidden_size,
           H = c->n_heads, Hkv = c->n_kv_heads, hd = c->head_dim, V = c->vocab_size,
           I = c->intermediate_size;
    bool dense = c->n_experts == 0;
    int nth = tensor_get_threads();
    for (int pass = 0; pass < 2; pass++) {
        float *base = pass ? m->act_mem : NULL;
        size_t off = 0;
        CARVE(m->x, (L + 1) * N * d);
        CARVE(m->h1, L * N * d);
        CARVE(m->rstd1, L * N);
        CARVE(m->q, L * N * H * hd);
        CARVE(m->k, L * N * Hkv * hd);
        CARVE(m->v, L * N * Hkv * hd);
        CARVE(m->att, L * B * H * T * T);
        CARVE(m->ao, L * N * H * hd);
        CARVE(m->x2, L * N * d);
        CARVE(m->h2, L * N * d);
        CARVE(m->rstd2, L * N);
        CARVE(m->fg, dense ? L * N * I : 0);
        CARVE(m->fu, dense ? L * N * I : 0);
        CARVE(m->fa, dense ? L * N * I : 0);
        CARVE(m->hf, N * d);
        CARVE(m->rstdf, N);
        CARVE(m->logits, N * V);
        CARVE(m->dlogits, N * V);
        CARVE(m->dx, N * d);
        CARVE(m->dh, N * d);
        CARVE(m->dx2, N * d);
        CARVE(m->dq, N * H * hd);
        CARVE(m->dk, N * Hkv * hd);
        CARVE(m->dv, N * Hkv * hd);
        CARVE(m->dao, N * H * hd);
        CARVE(m->dfg, dense ? N * I : 0);
        CARVE(m->dfu, dense ? N * I : 0);
        CARVE(m->att_scratch, (size_t)(nth > 0 ? nth : 1) * T * T + T);
        if (!pass) {
            m->act_floats = off;
            m->act_mem = loom_alloc_aligned(off * sizeof(float));
            if (!m->act_mem)
                return loom_errf(e, LOOM_ENOMEM,
                                 "train: out of memory for activations (%.1f MB; HINT: lower "
                                 "--batch or --seq-len)",
                                 off * 4.0 / 1e6);
            memset(m->act_mem, 0, off * sizeof(float));
        }
    }
    m->tokens = xcalloc(N, sizeof(int32_t));
    m->targets = xcalloc(N, sizeof(int32_t));
    m->pos = xcalloc(N, sizeof(int32_t));
    return LOOM_OK;
}

void train_acts_free(train_model *m)
{
    loom_free_aligned(m->act_mem);
    m->act_mem = NULL;
    free(m->tokens);
    free(m->targets);
    free(m->pos);
}

/* ------------------------------------------------------------------ forward */

int train_forward(train_model *m, const int32_t *tokens, const int32_t *targets, int B, int T,
                  train_loss *loss, loom_err *e)
{
    const model_config *c = &m->cfg.model;
    int L = c->n_layers, d = c->hidden_size, H = c->n_heads, Hkv = c->n_kv_heads,
        hd = c->head_dim, V = c->vocab_size, I = c->intermediate_size;
    if (B < 1 || T < 1 || B > m->cfg.B_max || T > m->cfg.T_max)
        return loom_errf(e, LOOM_EINVAL, "train: batch %d x %d exceeds the %d x %d sized for", B,
                         T, m->cfg.B_max, m->cfg.T_max);
    int N = B * T;
    for (int t = 0; t < N; t++) {
        if (tokens[t] < 0 || tokens[t] >= V || (targets && targets[t] >= V))
            return loom_errf(e, LOOM_EINVAL,
                             "train: token id %d out of the vocabulary (%d) (HINT: the tokenizer "
                             "does not fit the model)",
                             tokens[t] < 0 || tokens[t] >= V ? tokens[t] : targets[t], V);
    }
    m->B = B;
    m->T = T;
    m->N = N;
    memcpy(m->tokens, tokens, (size_t)N * sizeof(int32_t));
    for (int t = 0; t < N; t++) {
        m->targets[t] = targets ? targets[t] : -1;
        m->pos[t] = t % T;
    }
    size_t Nd = (size_t)N * d, Nq = (size_t)N * H * hd, Nkv = (size_t)N * Hkv * hd;
    size_t NI = (size_t)N * I, att_l = (size_t)B * H * T * T;

    /* embedding */
    for (int t = 0; t < N; t++)
        memcpy(m->x + (size_t)t * d, m->w.embed + (size_t)tokens[t] * d, d * sizeof(float));

    m->moe_aux_ready = false;
    for (int l = 0; l < L; l++) {
        const train_layer_weights *w = &m->w.layers[l];
        float *x = m->x + l * Nd, *xn = m->x + (l + 1) * Nd;
        float *h1 = m->h1 + l * Nd, *h2 = m->h2 + l * Nd, *x2 = m->x2 + l * Nd;
        float *q = m->q + l * Nq, *k = m->k + l * Nkv, *v = m->v + l * Nkv;
        float *ao = m->ao + l * Nq, *P = m->att + l * att_l;
        train_rmsnorm_forward(h1, m->rstd1 + (size_t)l * N, x, w->ln1, N, d, c->rms_norm_eps);
        tensor_matmul(q, h1, w->wq, NULL, N, d, H * hd);
        tensor_matmul(k, h1, w->wk, NULL, N, d, Hkv * hd);
        tensor_matmul(v, h1, w->wv, NULL, N, d, Hkv * hd);
        train_rope(q, m->pos, N, H, hd, m->inv_freq, 1);
        train_rope(k, m->pos, N, Hkv, hd, m->inv_freq, 1);
        train_attention_forward(ao, P, q, k, v, B, T, H, Hkv, hd);
        memcpy(x2, x, Nd * sizeof(float));
        tensor_matmul_add(x2, ao, w->wo, N, H * hd, d);
        train_rmsnorm_forward(h2, m->rstd2 + (size_t)l * N, x2, w->ln2, N, d, c->rms_norm_eps);
        memcpy(xn, x2, Nd * sizeof(float));
        if (c->n_experts > 0) {
            int rc = train_moe_forward(m, l, h2, xn, e);
            if (rc)
                return rc;
        } else {
            float *fg = m->fg + l * NI, *fu = m->fu + l * NI, *fa = m->fa + l * NI;
            tensor_matmul(fg, h2, w->w_gate, NULL, N, d, I);
            tensor_matmul(fu, h2, w->w_up, NULL, N, d, I);
            train_swiglu_forward(fa, fg, fu, NI);
            tensor_matmul_add(xn, fa, w->w_down, N, I, d);
        }
    }

    /* final norm, lm_head, cross-entropy (sum here, mean over the global target count) */
    train_rmsnorm_forward(m->hf, m->rstdf, m->x + (size_t)L * Nd, m->w.norm, N, d,
                          c->rms_norm_eps);
    tensor_matmul(m->logits, m->hf, m->w.lm_head, NULL, N, d, V);
    double sums[2] = {0.0, 0.0}; /* CE sum, valid targets */
    for (int t = 0; t < N; t++) {
        int y = m->targets[t];
        if (y < 0)
            continue;
        const float *lt = m->logits + (size_t)t * V;
        float mx = lt[0];
        for (int i = 1; i < V; i++)
            mx = lt[i] > mx ? lt[i] : mx;
        double z = 0.0;
        for (int i = 0; i < V; i++)
            z += exp((double)lt[i] - mx);
        sums[0] += log(z) + mx - lt[y];
        sums[1] += 1.0;
    }
    train_dist_allreduce_f64(m->dist, sums, 2);
    m->n_targets_global = (int64_t)sums[1];
    train_loss lo = {0};
    lo.n_targets = m->n_targets_global;
    lo.ce = sums[1] > 0 ? sums[0] / sums[1] : 0.0;
    if (c->n_experts > 0)
        train_moe_losses(m, &lo);
    lo.total = lo.ce + m->cfg.aux_coef * lo.aux + lo.z + lo.loc;
    m->last_loss = lo;
    if (loss)
        *loss = lo;
    return LOOM_OK;
}

/* ------------------------------------------------------------------ backward */

int train_backward(train_model *m, float scale, loom_err *e)
{
    const model_config *c = &m->cfg.model;
    int L = c->n_layers, d = c->hidden_size, H = c->n_heads, Hkv = c->n_kv_heads,
        hd = c->head_dim, V = c->vocab_size, I = c->intermediate_size;
    int N = m->N, B = m->B, T = m->T;
    if (N == 0)
        return loom_errf(e, LOOM_EINVAL, "train: backward without a forward");
    size_t Nd = (size_t)N * d, Nq = (size_t)N * H * hd, Nkv = (size_t)N * Hkv * hd;
    size_t NI = (size_t)N * I, att_l = (size_t)B * H * T * T;

    /* d CE / d logits = (softmax - onehot) / n_targets */
    float inv = m->n_targets_global > 0 ? scale / (float)m->n_targets_global : 0.0f;
    for (int t = 0; t < N; t++) {
        const float *lt = m->logits + (size_t)t * V;
        float *dl = m->dlogits + (size_t)t * V;
        int y = m->targets[t];
        if (y < 0) {
            memset(dl, 0, (size_t)V * sizeof(float));
            continue;
        }
        float mx = lt[0];
        for (int i = 1; i < V; i++)
            mx = lt[i] > mx ? lt[i] : mx;
        double z = 0.0;
        for (int i = 0; i < V; i++)
            z += exp((double)lt[i] - mx);
        for (int i = 0; i < V; i++)
            dl[i] = (float)(exp((double)lt[i] - mx) / z) * inv;
        dl[y] -= inv;
    }
    train_mm_dw(m->g.lm_head, m->dlogits, m->hf, N, d, V);
    memset(m->dh, 0, Nd * sizeof(float));
    train_mm_dx(m->dh, m->dlogits, m->w.lm_head, N, d, V);
    memset(m->dx, 0, Nd * sizeof(float));
    train_rmsnorm_backward(m->dx, m->g.norm, m->dh, m->x + (size_t)L * Nd, m->rstdf, m->w.norm,
                           N, d);

    for (int l = L - 1; l >= 0; l--) {
        const train_layer_weights *w = &m->w.layers[l];
        train_layer_weights *g = &m->g.layers[l];
        float *x = m->x + l * Nd, *h1 = m->h1 + l * Nd, *h2 = m->h2 + l * Nd;
        float *x2 = m->x2 + l * Nd;
        float *q = m->q + l * Nq, *k = m->k + l * Nkv, *v = m->v + l * Nkv;
        float *ao = m->ao + l * Nq, *P = m->att + l * att_l;
        /* m->dx holds dL/dx_{l+1}; the FFN's output and the residual both get it */
        memset(m->dh, 0, Nd * sizeof(float));
        if (c->n_experts > 0) {
            int rc = train_moe_backward(m, l, h2, m->dx, m->dh, scale, e);
            if (rc)
                return rc;
        } else {
            train_ffn_backward(m->dh, g->w_gate, g->w_up, g->w_down, m->dx, h2, m->fg + l * NI,
                               m->fu + l * NI, m->fa + l * NI, w->w_gate, w->w_up, w->w_down, N,
                               d, I, m->dfg, m->dfu);
        }
        memcpy(m->dx2, m->dx, Nd * sizeof(float));
        train_rmsnorm_backward(m->dx2, g->ln2, m->dh, x2, m->rstd2 + (size_t)l * N, w->ln2, N, d);
        /* attention */
        train_mm_dw(g->wo, m->dx2, ao, N, H * hd, d);
        memset(m->dao, 0, Nq * sizeof(float));
        train_mm_dx(m->dao, m->dx2, w->wo, N, H * hd, d);
        memset(m->dq, 0, Nq * sizeof(float));
        memset(m->dk, 0, Nkv * sizeof(float));
        memset(m->dv, 0, Nkv * sizeof(float));
        train_attention_backward(m->dq, m->dk, m->dv, m->dao, P, q, k, v, B, T, H, Hkv, hd,
                                 m->att_scratch);
        train_rope(m->dq, m->pos, N, H, hd, m->inv_freq, -1);
        train_rope(m->dk, m->pos, N, Hkv, hd, m->inv_freq, -1);
        train_mm_dw(g->wq, m->dq, h1, N, d, H * hd);
        train_mm_dw(g->wk, m->dk, h1, N, d, Hkv * hd);
        train_mm_dw(g->wv, m->dv, h1, N, d, Hkv * hd);
        memset(m->dh, 0, Nd * sizeof(float));
        train_mm_dx(m->dh, m->dq, w->wq, N, d, H * hd);
        train_mm_dx(m->dh, m->dk, w->wk, N, d, Hkv * hd);
        train_mm_dx(m->dh, m->dv, w->wv, N, d, Hkv * hd);
        memcpy(m->dx, m->dx2, Nd * sizeof(float));
        train_rmsnorm_backward(m->dx, g->ln1, m->dh, x, m->rstd1 + (size_t)l * N, w->ln1, N, d);
    }
    /* embedding: scatter-add */
    for (int t = 0; t < N; t++) {
        float *ge = m->g.embed + (size_t)m->tokens[t] * d;
        const float *dxt = m->dx + (size_t)t * d;
        for (int i = 0; i < d; i++)
            ge[i] += dxt[i];
    }
    return LOOM_OK;
}

/* Dense gradients are summed over ranks; expert gradients already live on their rank. */
void train_allreduce_grads(train_model *m)
{
    if (m->dist->n_ranks <= 1)
        return;
    for (int i = 0; i < m->n_tensors;) {
        if (m->tensors[i].expert >= 0) {
            i++;
            continue;
        }
        /* merge runs of adjacent dense tensors into one call */
        int j = i;
        while (j + 1 < m->n_tensors && m->tensors[j + 1].expert < 0)
            j++;
        size_t off = m->tensors[i].offset,
               n = m->tensors[j].offset + m->tensors[j].n - off;
        train_dist_allreduce_f32(m->dist, m->grads + off, n);
        i = j + 1;
    }
}
