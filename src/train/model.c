/*
 * Trainable decoder-only transformer (Llama / Mixtral): parameters laid out like the Hugging Face
 * checkpoint, a forward pass that keeps every activation, and its backward in C over the tensor
 * kernels (GEMMs as task lists of single-threaded cblas_sgemm tiles over the thread pool).
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

/* ------------------------------------------------------------------ parallel pieces */

/*
 * The whole step runs on the tensor pool (tensor_parallel_for) as lists of tasks. Row-wise
 * kernels (RMSNorm, RoPE, cross-entropy, embedding) take TOK_TASK tokens per task; a sum over
 * tokens (the RMSNorm and embedding weight gradients) takes a block of COL_TASK output columns
 * per task and sums over every token in order; attention takes one (sequence, head) or
 * (sequence, kv head) per task. None of these partitions depends on the thread count. GEMMs
 * (the tile lists below, the FFN pieces) are split by output rows or columns, which leaves each
 * output element's sum whole, so results are bitwise the same for every --threads.
 */
#define TOK_TASK 32 /* tokens per task of the row-wise kernels */
#define COL_TASK 32 /* output columns (two cache lines) per task of a sum over tokens */

static int ceil_div(int a, int b) { return (a + b - 1) / b; }
static int imin(int a, int b) { return a < b ? a : b; }

/* The elementwise loops are compiled three times (AVX-512, AVX2 + FMA, baseline x86-64) and
 * the CPU picks at load time. Not under clang (the libFuzzer build), which gets the baseline. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIMD_CLONES
#endif

/*
 * e^x in a form the vectoriser takes (glibc's expf is a call per element): Cephes' expf,
 * e^x = 2^n e^r with n = round(x log2 e), |r| <= ln2/2, a degree-6 polynomial for e^r. Within
 * 1.4 ulp of the correctly rounded value on [-87.3, 88.3]; x is clamped to that range (e^-87.3
 * ~ 1.2e-38 stands in for smaller values, which no sum here notices).
 */
static inline float vexpf(float x)
{
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float t = x * 1.44269504f + 12582912.0f; /* 1.5 * 2^23: rounds to an integer in the mantissa */
    float n = t - 12582912.0f;
    int32_t ni;
    memcpy(&ni, &t, sizeof(ni));
    ni -= 0x4B400000;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t si = (ni + 127) << 23;
    float s;
    memcpy(&s, &si, sizeof(s));
    return p * s;
}

/* dst (n) = src, or 0 when src is NULL, in fixed chunks over the pool. */
typedef struct copy_args {
    float *dst;
    const float *src;
    size_t n;
} copy_args;

#define COPY_TASK ((size_t)1 << 16)

static void copy_task(void *arg, int i, int tid)
{
    const copy_args *a = arg;
    size_t j0 = (size_t)i * COPY_TASK, n = a->n - j0 < COPY_TASK ? a->n - j0 : COPY_TASK;
    if (a->src)
        memcpy(a->dst + j0, a->src + j0, n * sizeof(float));
    else
        memset(a->dst + j0, 0, n * sizeof(float));
}

static void par_copy(float *dst, const float *src, size_t n)
{
    copy_args a = {.dst = dst, .src = src, .n = n};
    tensor_parallel_for((int)((n + COPY_TASK - 1) / COPY_TASK), copy_task, &a);
}

/* ------------------------------------------------------------------ GEMM helpers */

/*
 * The GEMMs run on the tensor pool as task lists over a grid of output tiles, each tile a
 * single-threaded SGEMM (OpenBLAS is single-threaded: tensor_set_threads). A tile keeps each
 * output element's sum whole, so results are the same for every --threads. About two tiles per
 * thread, split over rows and, where rows run short (a 64-row weight gradient at 16 threads),
 * over columns too: a late or descheduled thread delays one tile, not a fixed slab of the
 * product, and on one thread a GEMM is one call (tiles repack the shared operand). Several
 * GEMMs of a layer go in one list (one hand-off to the pool), and GEMMs that add into the same
 * output (then) run one after another on each tile, in order.
 */
enum { MM_DX, MM_DW, MM_Y };
typedef struct mm_op {
    int kind, n, in, out;
    float alpha, beta;
    float *c;
    const float *a, *b;
    const struct mm_op *then; /* added into the same tile of c after this one (beta 1) */
    int tiles_r, tiles_c;     /* tile grid over the rows and columns of c */
} mm_op;

/* Rows and columns of c. */
static int mm_rows_of(const mm_op *g) { return g->kind == MM_DW ? g->out : g->n; }
static int mm_cols_of(const mm_op *g) { return g->kind == MM_Y ? g->out : g->in; }

static void mm_tile(const mm_op *g, int r0, int r1, int c0, int c1, float beta)
{
    int n = g->n, in = g->in, out = g->out, rows = r1 - r0, cols = c1 - c0;
    switch (g->kind) {
    case MM_DX: /* dx (n, in) = beta dx + alpha dy (n, out) @ w (out, in) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, cols, out, g->alpha,
                    g->a + (size_t)r0 * out, out, g->b + c0, in, beta,
                    g->c + (size_t)r0 * in + c0, in);
        break;
    case MM_DW: /* dw (out, in) = beta dw + alpha dy^T (out, n) @ x (n, in) */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, rows, cols, n, g->alpha, g->a + r0,
                    out, g->b + c0, in, beta, g->c + (size_t)r0 * in + c0, in);
        break;
    default: /* y (n, out) = beta y + alpha x (n, in) @ w^T (in, out) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, cols, in, g->alpha,
                    g->a + (size_t)r0 * in, in, g->b + (size_t)c0 * in, in, beta,
                    g->c + (size_t)r0 * out + c0, out);
        break;
    }
}

#define MM_MAX_OPS 8
typedef struct mm_list {
    const mm_op *op;
    int n_op;
    int task0[MM_MAX_OPS + 1]; /* first task of each op */
} mm_list;

/* Edge i of n even tiles over `size`, on a multiple of 16 (whole cache lines of c's rows). */
static int tile_edge(int i, int n, int size)
{
    return i >= n ? size : (int)((int64_t)size * i / n) & ~15;
}

static void mm_task(void *arg, int t, int tid)
{
    const mm_list *l = arg;
    int i = 0;
    while (l->task0[i + 1] <= t)
        i++;
    const mm_op *g = &l->op[i];
    int M = mm_rows_of(g), C = mm_cols_of(g), j = t - l->task0[i];
    int ri = j / g->tiles_c, ci = j % g->tiles_c;
    int r0 = tile_edge(ri, g->tiles_r, M), r1 = tile_edge(ri + 1, g->tiles_r, M);
    int c0 = tile_edge(ci, g->tiles_c, C), c1 = tile_edge(ci + 1, g->tiles_c, C);
    mm_tile(g, r0, r1, c0, c1, g->beta);
    for (const mm_op *x = g->then; x; x = x->then)
        mm_tile(x, r0, r1, c0, c1, 1.0f);
}

/* Runs n_op (<= MM_MAX_OPS) GEMMs with disjoint outputs as one task list. */
static void mm_list_run(const mm_op *op, int n_op)
{
    mm_list l = {.op = op, .n_op = n_op};
    for (int i = 0; i < n_op; i++) {
        int M = mm_rows_of(&op[i]), C = mm_cols_of(&op[i]);
        l.task0[i + 1] = l.task0[i] + (M > 0 && C > 0 && op[i].n > 0
                                           ? op[i].tiles_r * op[i].tiles_c : 0);
    }
    tensor_parallel_for(l.task0[n_op], mm_task, &l);
}

/* The tile grid for the thread count: 2 tiles per thread (1 on one thread), even splits of at
 * least 32 rows (a weight gradient, whose sum runs over every token) or 64 (token rows) and 64
 * columns. No thin tiles: OpenBLAS takes its small-matrix kernels for them, whose sums round
 * differently from the blocked kernel's (a 16-row x @ w^T tile differs in the last bit). */
static mm_op mm_make(int kind, float *c, const float *a, const float *b, int n, int in, int out,
                     float alpha, float beta)
{
    mm_op g = {.kind = kind, .n = n, .in = in, .out = out, .alpha = alpha, .beta = beta, .c = c,
               .a = a, .b = b};
    int nth = tensor_get_threads(), want = nth > 1 ? 2 * nth : 1;
    int M = mm_rows_of(&g) > 0 ? mm_rows_of(&g) : 1, C = mm_cols_of(&g) > 0 ? mm_cols_of(&g) : 1;
    int rt = imin(want, M / (kind == MM_DW ? 32 : 64));
    g.tiles_r = rt < 1 ? 1 : rt;
    int ct = imin(ceil_div(want, g.tiles_r), C / 64);
    g.tiles_c = ct < 1 ? 1 : ct;
    return g;
}

static void mm_run(int kind, float *c, const float *a, const float *b, int n, int in, int out,
                   float alpha, float beta)
{
    mm_op g = mm_make(kind, c, a, b, n, in, out, alpha, beta);
    mm_list_run(&g, 1);
}

/* dx (n, in) += dy (n, out) @ w (out, in) */
void train_mm_dx(float *dx, const float *dy, const float *w, int n, int in, int out)
{
    mm_run(MM_DX, dx, dy, w, n, in, out, 1.0f, 1.0f);
}

/* dw (out, in) += dy^T (out, n) @ x (n, in) */
void train_mm_dw(float *dw, const float *dy, const float *x, int n, int in, int out)
{
    mm_run(MM_DW, dw, dy, x, n, in, out, 1.0f, 1.0f);
}

/* y (n, out) = x (n, in) @ w^T */
void train_mm(float *y, const float *x, const float *w, int n, int in, int out)
{
    mm_run(MM_Y, y, x, w, n, in, out, 1.0f, 0.0f);
}

/* ------------------------------------------------------------------ layer kernels */

typedef struct rms_args {
    float *y, *rstd, *dx, *dw;
    const float *x, *w, *dy, *r, *base;
    int N, d;
    float eps;
} rms_args;

SIMD_CLONES static void rms_forward_task(void *arg, int task, int tid)
{
    const rms_args *a = arg;
    int d = a->d;
    for (int t = task * TOK_TASK, t1 = imin(t + TOK_TASK, a->N); t < t1; t++) {
        const float *xt = a->x + (size_t)t * d;
        float *yt = a->y + (size_t)t * d;
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < d; i++)
            ss += (double)xt[i] * xt[i];
        float r = (float)(1.0 / sqrt(ss / d + a->eps));
        a->rstd[t] = r;
#pragma omp simd
        for (int i = 0; i < d; i++)
            yt[i] = a->w[i] * (xt[i] * r);
    }
}

/* y (N, d) = x * rstd * w, rstd (N) = 1 / sqrt(mean(x^2) + eps) (kept for backward). */
void train_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int N, int d,
                           float eps)
{
    rms_args a = {.y = y, .rstd = rstd, .x = x, .w = w, .N = N, .d = d, .eps = eps};
    tensor_parallel_for(ceil_div(N, TOK_TASK), rms_forward_task, &a);
}

/* Tasks below ceil(d / COL_TASK) take a block of dw's columns, summed over every token in order
 * (the long tasks first, so they do not finish last); the others rows of dx. */
SIMD_CLONES static void rms_backward_task(void *arg, int task, int tid)
{
    const rms_args *a = arg;
    int d = a->d, n_col = ceil_div(d, COL_TASK);
    const float *w = a->w;
    if (task >= n_col) {
        task -= n_col;
        for (int t = task * TOK_TASK, t1 = imin(t + TOK_TASK, a->N); t < t1; t++) {
            const float *xt = a->x + (size_t)t * d, *dyt = a->dy + (size_t)t * d;
            float *dxt = a->dx + (size_t)t * d;
            const float *bt = a->base ? a->base + (size_t)t * d : NULL;
            float r = a->r[t];
            double dot = 0.0;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < d; i++)
                dot += (double)(dyt[i] * w[i]) * xt[i];
            float c = (float)(dot * r * r * r / d);
            if (bt) {
#pragma omp simd
                for (int i = 0; i < d; i++)
                    dxt[i] = bt[i] + (r * (dyt[i] * w[i]) - c * xt[i]);
            } else {
#pragma omp simd
                for (int i = 0; i < d; i++)
                    dxt[i] = r * (dyt[i] * w[i]) - c * xt[i];
            }
        }
        return;
    }
    int i0 = task * COL_TASK, n = imin(COL_TASK, d - i0);
    float acc[COL_TASK];
    memcpy(acc, a->dw + i0, (size_t)n * sizeof(float));
    for (int t = 0; t < a->N; t++) {
        const float *xt = a->x + (size_t)t * d + i0, *dyt = a->dy + (size_t)t * d + i0;
        float r = a->r[t];
#pragma omp simd
        for (int i = 0; i < n; i++)
            acc[i] += dyt[i] * xt[i] * r;
    }
    memcpy(a->dw + i0, acc, (size_t)n * sizeof(float));
}

/*
 * Backward of y = w * x * r, r = (mean(x^2) + eps)^-1/2:
 *   dw += sum_t dy * x * r
 *   dx += r * (dy * w) - x * r^3 / d * sum_i (dy_i w_i x_i)
 */
/* dx = base + d rmsnorm / dx (base NULL: 0; base = dx: accumulate), dw += ... */
static void rmsnorm_backward(float *dx, const float *base, float *dw, const float *dy,
                             const float *x, const float *rstd, const float *w, int N, int d)
{
    rms_args a = {.dx = dx, .base = base, .dw = dw, .dy = dy, .x = x, .r = rstd, .w = w, .N = N,
                  .d = d};
    tensor_parallel_for(ceil_div(N, TOK_TASK) + ceil_div(d, COL_TASK), rms_backward_task, &a);
}

void train_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                            const float *rstd, const float *w, int N, int d)
{
    rmsnorm_backward(dx, dx, dw, dy, x, rstd, w, N, d);
}

/*
 * Rotate-half RoPE (sign = +1, as tensor_rope) or its transpose (sign = -1), the backward:
 * the rotation by angle a is orthogonal, so its gradient is the rotation by -a.
 *   x (N, n_heads*hd), pos (N), inv_freq (hd/2). The reference; the model uses rope_run, the
 *   same rotation from a table of cos and sin per position.
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

typedef struct rope_args {
    float *x;
    const int32_t *pos;
    const float *cos, *sin; /* (T_max, hd/2) */
    int N, n_heads, hd;
    float sign;
} rope_args;

SIMD_CLONES static void rope_task(void *arg, int task, int tid)
{
    const rope_args *a = arg;
    int half = a->hd / 2;
    for (int t = task * TOK_TASK, t1 = imin(t + TOK_TASK, a->N); t < t1; t++) {
        const float *c = a->cos + (size_t)a->pos[t] * half, *s = a->sin + (size_t)a->pos[t] * half;
        for (int h = 0; h < a->n_heads; h++) {
            float *x1 = a->x + ((size_t)t * a->n_heads + h) * a->hd, *x2 = x1 + half;
#pragma omp simd
            for (int i = 0; i < half; i++) {
                float u = x1[i], v = x2[i], si = a->sign * s[i];
                x1[i] = u * c[i] - v * si;
                x2[i] = v * c[i] + u * si;
            }
        }
    }
}

/* train_rope over the model's table of angles (positions < T_max). */
static void rope_run(const train_model *m, float *x, int n_heads, int sign)
{
    rope_args a = {.x = x, .pos = m->pos, .cos = m->rope_cos, .sin = m->rope_sin, .N = m->N,
                   .n_heads = n_heads, .hd = m->cfg.model.head_dim, .sign = (float)sign};
    tensor_parallel_for(ceil_div(m->N, TOK_TASK), rope_task, &a);
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
    float scale, beta;
} attn_args;

/* Per (sequence, head) task, two single-threaded SGEMMs: S = scale q_h k_h^T over the full
 * T x T (the masked upper triangle is computed and thrown away: twice the causal FLOPs, but at
 * GEMM speed, 8x the scalar loops' on the shakespeare-moe shape), row softmax over j <= i,
 * out_h = P v_h. */
SIMD_CLONES static void attn_forward_task(void *arg, int bh, int tid)
{
    attn_args *a = arg;
    int T = a->T, H = a->H, Hkv = a->Hkv, hd = a->hd, group = H / Hkv;
    int qrow = H * hd, kvrow = Hkv * hd;
    int b = bh / H, h = bh % H, kh = h / group;
    const float *qh = a->q + (size_t)b * T * qrow + (size_t)h * hd;
    const float *kb = a->k + (size_t)b * T * kvrow + (size_t)kh * hd;
    const float *vb = a->v + (size_t)b * T * kvrow + (size_t)kh * hd;
    float *P = a->P + (size_t)bh * T * T;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, a->scale, qh, qrow, kb, kvrow,
                0.0f, P, T);
    for (int i = 0; i < T; i++) {
        float *Pi = P + (size_t)i * T, m = -INFINITY, z = 0.0f;
#pragma omp simd reduction(max : m)
        for (int j = 0; j <= i; j++)
            m = Pi[j] > m ? Pi[j] : m;
#pragma omp simd
        for (int j = 0; j <= i; j++)
            Pi[j] = vexpf(Pi[j] - m);
#pragma omp simd reduction(+ : z)
        for (int j = 0; j <= i; j++)
            z += Pi[j];
        float inv = 1.0f / z;
#pragma omp simd
        for (int j = 0; j <= i; j++)
            Pi[j] *= inv;
        memset(Pi + i + 1, 0, (size_t)(T - i - 1) * sizeof(float));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1.0f, P, T, vb, kvrow, 0.0f,
                a->out + (size_t)b * T * qrow + (size_t)h * hd, qrow);
}

void train_attention_forward(float *out, float *P, const float *q, const float *k, const float *v,
                             int B, int T, int H, int Hkv, int hd)
{
    attn_args a = {.out = out, .P = P, .q = q, .k = k, .v = v, .B = B, .T = T, .H = H,
                   .Hkv = Hkv, .hd = hd, .scale = 1.0f / sqrtf((float)hd)};
    tensor_parallel_for(B * H, attn_forward_task, &a);
}

/*
 * Backward, one task per (sequence, kv head): the heads of one kv group write the same dk, dv
 * rows, so they run in order in one task. Per head, as SGEMMs over T x T:
 *   dP = dO v^T;  dS_ij = scale P_ij (dP_ij - sum_j' P_ij' dP_ij') (0 above the diagonal)
 *   dq = beta dq + dS k;  dk = beta dk + dS^T q;  dv = beta dv + P^T dO
 * (beta applies once: the first head of a group overwrites dk, dv when beta is 0).
 * scratch: (threads, T*T) floats.
 */
SIMD_CLONES static void attn_backward_task(void *arg, int bk, int tid)
{
    attn_args *a = arg;
    int T = a->T, H = a->H, Hkv = a->Hkv, hd = a->hd, group = H / Hkv;
    int qrow = H * hd, kvrow = Hkv * hd;
    int b = bk / Hkv, kh = bk % Hkv;
    float *dS = a->scratch + (size_t)tid * T * T;
    size_t ko = (size_t)b * T * kvrow + (size_t)kh * hd;
    for (int h = kh * group; h < (kh + 1) * group; h++) {
        size_t qo = (size_t)b * T * qrow + (size_t)h * hd;
        const float *P = a->P + ((size_t)b * H + h) * T * T;
        float beta_kv = h == kh * group ? a->beta : 1.0f;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hd, 1.0f, a->d_out + qo, qrow,
                    a->v + ko, kvrow, 0.0f, dS, T);
        for (int i = 0; i < T; i++) {
            const float *Pi = P + (size_t)i * T;
            float *dSi = dS + (size_t)i * T;
            double dot = 0.0;
#pragma omp simd reduction(+ : dot)
            for (int j = 0; j <= i; j++)
                dot += (double)dSi[j] * Pi[j];
            float dotf = (float)dot;
#pragma omp simd
            for (int j = 0; j <= i; j++)
                dSi[j] = Pi[j] * (dSi[j] - dotf) * a->scale;
            memset(dSi + i + 1, 0, (size_t)(T - i - 1) * sizeof(float));
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hd, T, 1.0f, dS, T, a->k + ko,
                    kvrow, a->beta, a->dq + qo, qrow);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1.0f, dS, T, a->q + qo,
                    qrow, beta_kv, a->dk + ko, kvrow);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hd, T, 1.0f, P, T, a->d_out + qo,
                    qrow, beta_kv, a->dv + ko, kvrow);
    }
}

static void attention_backward(float *dq, float *dk, float *dv, const float *d_out,
                               const float *P, const float *q, const float *k, const float *v,
                               int B, int T, int H, int Hkv, int hd, float *scratch, float beta)
{
    attn_args a = {.P = (float *)P, .q = q, .k = k, .v = v, .d_out = d_out, .dq = dq, .dk = dk,
                   .dv = dv, .scratch = scratch, .B = B, .T = T, .H = H, .Hkv = Hkv, .hd = hd,
                   .scale = 1.0f / sqrtf((float)hd), .beta = beta};
    tensor_parallel_for(B * Hkv, attn_backward_task, &a);
}

/* dq, dk, dv are accumulated (+=). scratch: (threads, T*T) floats. */
void train_attention_backward(float *dq, float *dk, float *dv, const float *d_out, const float *P,
                              const float *q, const float *k, const float *v, int B, int T, int H,
                              int Hkv, int hd, float *scratch)
{
    attention_backward(dq, dk, dv, d_out, P, q, k, v, B, T, H, Hkv, hd, scratch, 1.0f);
}

/* a (n) = silu(g) * u */
SIMD_CLONES void train_swiglu_forward(float *a, const float *g, const float *u, size_t n)
{
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        float s = 1.0f / (1.0f + vexpf(-g[i]));
        a[i] = g[i] * s * u[i];
    }
}

/* dg = da * u * silu'(g), du = da * silu(g); silu'(g) = s (1 + g (1 - s)). Overwrites; da may
 * be du. */
SIMD_CLONES void train_swiglu_backward(float *dg, float *du, const float *da, const float *g,
                                       const float *u, size_t n)
{
#pragma omp simd
    for (size_t i = 0; i < n; i++) {
        float s = 1.0f / (1.0f + vexpf(-g[i]));
        float dai = da[i];
        dg[i] = dai * u[i] * s * (1.0f + g[i] * (1.0f - s));
        du[i] = dai * g[i] * s;
    }
}

/*
 * SwiGLU FFNs over segments of rows (one segment per expert, or one for a dense FFN):
 *   g = x W1^T, u = x W3^T, a = silu(g) u, y = a W2^T
 *   x (rows, d); g, u, a (rows, I) kept; y (rows, d); w1, w3 (I, d); w2 (d, I).
 * Forward tasks: a piece of one segment's rows, the whole FFN on it with single-threaded
 * SGEMMs. Backward, in two rounds of tasks:
 *   1. blocks of rows of dW2 += dy^T a; and pieces of rows: da = dy W2,
 *      (dg, du) = swiglu', dx = beta dx + dg W1 + du W3
 *   2. blocks of rows of dW1 += dg^T x, of dW3 += du^T x
 * A weight-gradient block sums over all of its segment's rows in one SGEMM, so no sum is split.
 * The pieces are as large as the thread count allows (each SGEMM packs its weights again: on
 * one thread a whole expert is one piece, as many rows as one GEMM per weight had); since GEMM
 * rows and output blocks are computed independently, the split changes no result.
 */
typedef struct ffn_args {
    const train_ffn_seg *seg;
    int n_seg, d, I;
    int *task0, *piece; /* (n_seg + 1) first row task of each segment; (n_seg) rows per task */
    int blocks;         /* row blocks of each weight gradient */
    /* Segments that share gradients (one expert's rows from several source ranks) are summed by
     * one task, in segment order: lead[0..n_lead) the first segment of each gradient target,
     * next[s] the following segment with s's target (-1: none). */
    int *lead, *next, n_lead;
    float *y, *g, *u, *a, *dx, *dg, *du;
    const float *x, *dy;
    float beta; /* of y (forward), of dx (backward) */
} ffn_args;

/* Row pieces for the thread count: about 4 tasks per thread, rows per piece within [64, 512]. */
static void ffn_plan(ffn_args *f)
{
    int nth = tensor_get_threads(), rows = 0;
    for (int s = 0; s < f->n_seg; s++)
        rows += f->seg[s].n > 0 ? f->seg[s].n : 0;
    int per = rows / (4 * nth);
    per = per < 64 ? 64 : per > 512 ? 512 : per;
    f->task0 = xmalloc((size_t)(2 * f->n_seg + 1) * sizeof(int));
    f->piece = f->task0 + f->n_seg + 1;
    f->task0[0] = 0;
    for (int s = 0; s < f->n_seg; s++) {
        int n = f->seg[s].n > 0 ? f->seg[s].n : 0, k = ceil_div(n, per);
        f->piece[s] = k ? ceil_div(n, k) : 0;
        f->task0[s + 1] = f->task0[s] + k;
    }
}

/* For the backward: the segments grouped by gradient target, and weight-gradient blocks for
 * the thread count (about 4/3 tasks per thread over all groups). */
static void ffn_plan_gradients(ffn_args *f)
{
    int nth = tensor_get_threads();
    f->lead = xmalloc((size_t)(2 * f->n_seg + 1) * sizeof(int));
    f->next = f->lead + f->n_seg;
    f->n_lead = 0;
    for (int s = 0; s < f->n_seg; s++) {
        f->next[s] = -1;
        int p = s - 1;
        while (p >= 0 && f->seg[p].g2 != f->seg[s].g2)
            p--;
        if (p < 0 || !f->seg[s].g2)
            f->lead[f->n_lead++] = s;
        else
            f->next[p] = s;
    }
    int b = ceil_div(4 * nth, 3 * (f->n_lead > 0 ? f->n_lead : 1));
    f->blocks = b < 1 ? 1 : b;
}

static void ffn_plan_free(ffn_args *f)
{
    free(f->task0);
    free(f->lead);
}

/* Segment, first row and row count of row task i. */
static const train_ffn_seg *ffn_row_task(const ffn_args *f, int i, int *r, int *n)
{
    int s = 0;
    while (f->task0[s + 1] <= i)
        s++;
    int c = (i - f->task0[s]) * f->piece[s];
    *r = f->seg[s].r0 + c;
    *n = imin(f->piece[s], f->seg[s].n - c);
    return &f->seg[s];
}

/* Rows [*i0, *i0 + return) of a weight gradient of `rows` rows, block j of f->blocks (whole
 * multiples of 16 rows). */
static int ffn_block(const ffn_args *f, int rows, int j, int *i0)
{
    int per = (ceil_div(rows, f->blocks) + 15) & ~15;
    *i0 = j * per;
    return *i0 < rows ? imin(per, rows - *i0) : 0;
}

static void ffn_forward_task(void *arg, int i, int tid)
{
    const ffn_args *f = arg;
    int r, n, d = f->d, I = f->I;
    const train_ffn_seg *s = ffn_row_task(f, i, &r, &n);
    float *g = f->g + (size_t)r * I, *u = f->u + (size_t)r * I, *a = f->a + (size_t)r * I;
    const float *x = f->x + (size_t)r * d;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, I, d, 1.0f, x, d, s->w1, d, 0.0f, g,
                I);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, I, d, 1.0f, x, d, s->w3, d, 0.0f, u,
                I);
    train_swiglu_forward(a, g, u, (size_t)n * I);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, I, 1.0f, a, I, s->w2, I, f->beta,
                f->y + (size_t)r * d, d);
}

void train_ffn_forward_segs(float *y, float *g, float *u, float *a, const float *x,
                            const train_ffn_seg *seg, int n_seg, int d, int I, float beta)
{
    ffn_args f = {.seg = seg, .n_seg = n_seg, .d = d, .I = I, .y = y, .g = g, .u = u, .a = a,
                  .x = x, .beta = beta};
    ffn_plan(&f);
    tensor_parallel_for(f.task0[n_seg], ffn_forward_task, &f);
    ffn_plan_free(&f);
}

static void ffn_backward_task1(void *arg, int i, int tid)
{
    const ffn_args *f = arg;
    int d = f->d, I = f->I, n_w = f->n_lead * f->blocks; /* dW2 blocks first: the long tasks */
    if (i >= n_w) {
        int r, n;
        i -= n_w;
        const train_ffn_seg *s = ffn_row_task(f, i, &r, &n);
        float *dg = f->dg + (size_t)r * I, *du = f->du + (size_t)r * I;
        float *dx = f->dx + (size_t)r * d;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, I, d, 1.0f,
                    f->dy + (size_t)r * d, d, s->w2, I, 0.0f, du, I); /* du holds da for now */
        train_swiglu_backward(dg, du, du, f->g + (size_t)r * I, f->u + (size_t)r * I,
                              (size_t)n * I);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, I, 1.0f, dg, I, s->w1, d,
                    f->beta, dx, d);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, I, 1.0f, du, I, s->w3, d,
                    1.0f, dx, d);
        return;
    }
    int j0, m = ffn_block(f, d, i % f->blocks, &j0);
    if (m <= 0)
        return;
    for (int q = f->lead[i / f->blocks]; q >= 0; q = f->next[q]) {
        const train_ffn_seg *s = &f->seg[q];
        if (s->n > 0)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, I, s->n, 1.0f,
                        f->dy + (size_t)s->r0 * d + j0, d, f->a + (size_t)s->r0 * I, I, 1.0f,
                        s->g2 + (size_t)j0 * I, I);
    }
}

static void ffn_backward_task2(void *arg, int i, int tid)
{
    const ffn_args *f = arg;
    int d = f->d, I = f->I;
    int which = i / f->blocks % 2, i0, m = ffn_block(f, I, i % f->blocks, &i0);
    if (m <= 0)
        return;
    for (int q = f->lead[i / (2 * f->blocks)]; q >= 0; q = f->next[q]) {
        const train_ffn_seg *s = &f->seg[q];
        if (s->n > 0)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, d, s->n, 1.0f,
                        (which ? f->du : f->dg) + (size_t)s->r0 * I + i0, I,
                        f->x + (size_t)s->r0 * d, d, 1.0f,
                        (which ? s->g3 : s->g1) + (size_t)i0 * d, d);
    }
}

void train_ffn_backward_segs(float *dx, const float *dy, const float *x, const float *g,
                             const float *u, const float *a, const train_ffn_seg *seg, int n_seg,
                             int d, int I, float *dg, float *du, float beta)
{
    ffn_args f = {.seg = seg, .n_seg = n_seg, .d = d, .I = I, .dx = dx, .dy = dy, .x = x,
                  .g = (float *)g, .u = (float *)u, .a = (float *)a, .dg = dg, .du = du,
                  .beta = beta};
    ffn_plan(&f);
    ffn_plan_gradients(&f);
    int n_rows = f.task0[n_seg];
    tensor_parallel_for(n_rows + f.n_lead * f.blocks, ffn_backward_task1, &f);
    tensor_parallel_for(f.n_lead * 2 * f.blocks, ffn_backward_task2, &f);
    ffn_plan_free(&f);
}

/* The dense FFN over n rows: one segment. */
void train_ffn_forward(float *y, float *g, float *u, float *a, const float *x, const float *w1,
                       const float *w3, const float *w2, int n, int d, int I)
{
    train_ffn_seg s = {.r0 = 0, .n = n, .w1 = w1, .w3 = w3, .w2 = w2};
    if (n > 0)
        train_ffn_forward_segs(y, g, u, a, x, &s, 1, d, I, 0.0f);
}

/* Backward: dx (n, d) += ..., dw1, dw3, dw2 += ...; scratch dg, du (n, I). */
void train_ffn_backward(float *dx, float *dw1, float *dw3, float *dw2, const float *dy,
                        const float *x, const float *g, const float *u, const float *a,
                        const float *w1, const float *w3, const float *w2, int n, int d, int I,
                        float *dg, float *du)
{
    train_ffn_seg s = {.r0 = 0, .n = n, .w1 = w1, .w3 = w3, .w2 = w2, .g1 = dw1, .g3 = dw3,
                       .g2 = dw2};
    if (n > 0)
        train_ffn_backward_segs(dx, dy, x, g, u, a, &s, 1, d, I, dg, du, 1.0f);
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
    par_copy(m->grads, NULL, m->n_params);
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
    m->tok_loss = xcalloc(N, sizeof(double));
    /* RoPE angles of every position, in f32 as train_rope (and transformers) computes them */
    size_t half = hd / 2;
    m->rope_cos = xmalloc(T * half * sizeof(float));
    m->rope_sin = xmalloc(T * half * sizeof(float));
    for (size_t p = 0; p < T; p++)
        for (size_t i = 0; i < half; i++) {
            float a = (float)p * m->inv_freq[i];
            m->rope_cos[p * half + i] = cosf(a);
            m->rope_sin[p * half + i] = sinf(a);
        }
    return LOOM_OK;
}

void train_acts_free(train_model *m)
{
    loom_free_aligned(m->act_mem);
    m->act_mem = NULL;
    free(m->tokens);
    free(m->targets);
    free(m->pos);
    free(m->tok_loss);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m->att_scratch);
    m->att_scratch = NULL;
}

/* ------------------------------------------------------------------ forward */

/* Per-thread scratch of the attention backward, for the thread count of now. */
static void ensure_att_scratch(train_model *m)
{
    int nth = tensor_get_threads();
    if (m->att_scratch && m->att_threads >= nth)
        return;
    size_t T = m->cfg.T_max;
    free(m->att_scratch);
    m->att_scratch = xmalloc((size_t)nth * T * T * sizeof(float));
    m->att_threads = nth;
}

typedef struct tok_args {
    train_model *m;
    const float *src;
    float *dst;
    float scale; /* cross-entropy */
} tok_args;

static void embed_task(void *arg, int task, int tid)
{
    const tok_args *a = arg;
    const train_model *m = a->m;
    int d = m->cfg.model.hidden_size;
    for (int t = task * TOK_TASK, t1 = imin(t + TOK_TASK, m->N); t < t1; t++)
        memcpy(m->x + (size_t)t * d, m->w.embed + (size_t)m->tokens[t] * d, d * sizeof(float));
}

/* Embedding backward: a block of columns of the table, every token in order. */
SIMD_CLONES static void embed_backward_task(void *arg, int task, int tid)
{
    const tok_args *a = arg;
    train_model *m = a->m;
    int d = m->cfg.model.hidden_size, i0 = task * COL_TASK, n = imin(COL_TASK, d - i0);
    for (int t = 0; t < m->N; t++) {
        float *ge = m->g.embed + (size_t)m->tokens[t] * d + i0;
        const float *dxt = m->dx + (size_t)t * d + i0;
#pragma omp simd
        for (int i = 0; i < n; i++)
            ge[i] += dxt[i];
    }
}

/*
 * Cross-entropy of each token and, for the backward, dlogits = softmax - onehot (unscaled: the
 * backward's GEMMs apply 1 / n_targets). Rows without a target get 0.
 */
SIMD_CLONES static void ce_task(void *arg, int task, int tid)
{
    const tok_args *a = arg;
    train_model *m = a->m;
    int V = m->cfg.model.vocab_size;
    for (int t = task * TOK_TASK, t1 = imin(t + TOK_TASK, m->N); t < t1; t++) {
        const float *lt = m->logits + (size_t)t * V;
        float *dl = m->dlogits + (size_t)t * V;
        int y = m->targets[t];
        if (y < 0) {
            memset(dl, 0, (size_t)V * sizeof(float));
            m->tok_loss[t] = 0.0;
            continue;
        }
        float mx = lt[0];
#pragma omp simd reduction(max : mx)
        for (int i = 0; i < V; i++)
            mx = lt[i] > mx ? lt[i] : mx;
#pragma omp simd
        for (int i = 0; i < V; i++)
            dl[i] = vexpf(lt[i] - mx);
        double z = 0.0;
#pragma omp simd reduction(+ : z)
        for (int i = 0; i < V; i++)
            z += dl[i];
        m->tok_loss[t] = log(z) + mx - lt[y];
        float inv = (float)(1.0 / z);
#pragma omp simd
        for (int i = 0; i < V; i++)
            dl[i] *= inv;
        dl[y] -= 1.0f;
    }
}

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
    tok_args ta = {.m = m};
    tensor_parallel_for(ceil_div(N, TOK_TASK), embed_task, &ta);
    TRAIN_PROF(TP_EMBED);

    m->moe_aux_ready = false;
    for (int l = 0; l < L; l++) {
        const train_layer_weights *w = &m->w.layers[l];
        float *x = m->x + l * Nd, *xn = m->x + (l + 1) * Nd;
        float *h1 = m->h1 + l * Nd, *h2 = m->h2 + l * Nd, *x2 = m->x2 + l * Nd;
        float *q = m->q + l * Nq, *k = m->k + l * Nkv, *v = m->v + l * Nkv;
        float *ao = m->ao + l * Nq, *P = m->att + l * att_l;
        train_rmsnorm_forward(h1, m->rstd1 + (size_t)l * N, x, w->ln1, N, d, c->rms_norm_eps);
        TRAIN_PROF(TP_NORM);
        if (N > 16) {
            mm_op qkv[3] = {mm_make(MM_Y, q, h1, w->wq, N, d, H * hd, 1.0f, 0.0f),
                            mm_make(MM_Y, k, h1, w->wk, N, d, Hkv * hd, 1.0f, 0.0f),
                            mm_make(MM_Y, v, h1, w->wv, N, d, Hkv * hd, 1.0f, 0.0f)};
            mm_list_run(qkv, 3);
        } else { /* a few tokens (greedy decode): tensor_matmul's kernels, as the engine's */
            tensor_matmul(q, h1, w->wq, NULL, N, d, H * hd);
            tensor_matmul(k, h1, w->wk, NULL, N, d, Hkv * hd);
            tensor_matmul(v, h1, w->wv, NULL, N, d, Hkv * hd);
        }
        TRAIN_PROF(TP_QKV);
        rope_run(m, q, H, 1);
        rope_run(m, k, Hkv, 1);
        TRAIN_PROF(TP_ROPE);
        train_attention_forward(ao, P, q, k, v, B, T, H, Hkv, hd);
        TRAIN_PROF(TP_ATTN);
        par_copy(x2, x, Nd);
        if (N > 16)
            mm_run(MM_Y, x2, ao, w->wo, N, H * hd, d, 1.0f, 1.0f);
        else
            tensor_matmul_add(x2, ao, w->wo, N, H * hd, d);
        TRAIN_PROF(TP_OPROJ);
        train_rmsnorm_forward(h2, m->rstd2 + (size_t)l * N, x2, w->ln2, N, d, c->rms_norm_eps);
        TRAIN_PROF(TP_NORM);
        if (c->n_experts > 0) {
            int rc = train_moe_forward(m, l, h2, x2, xn, e);
            if (rc)
                return rc;
        } else {
            train_ffn_seg s = {.r0 = 0, .n = N, .w1 = w->w_gate, .w3 = w->w_up,
                               .w2 = w->w_down};
            par_copy(xn, x2, Nd);
            train_ffn_forward_segs(xn, m->fg + l * NI, m->fu + l * NI, m->fa + l * NI, h2, &s,
                                   1, d, I, 1.0f);
            TRAIN_PROF(TP_EXPERT);
        }
    }

    /* final norm, lm_head, cross-entropy (sum here, mean over the global target count) */
    train_rmsnorm_forward(m->hf, m->rstdf, m->x + (size_t)L * Nd, m->w.norm, N, d,
                          c->rms_norm_eps);
    if (N > 16)
        mm_run(MM_Y, m->logits, m->hf, m->w.lm_head, N, d, V, 1.0f, 0.0f);
    else
        tensor_matmul(m->logits, m->hf, m->w.lm_head, NULL, N, d, V);
    TRAIN_PROF(TP_LMHEAD);
    tensor_parallel_for(ceil_div(N, TOK_TASK), ce_task, &ta);
    double sums[2] = {0.0, 0.0}; /* CE sum, valid targets */
    for (int t = 0; t < N; t++)
        if (m->targets[t] >= 0) {
            sums[0] += m->tok_loss[t];
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
    TRAIN_PROF(TP_CE);
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
    ensure_att_scratch(m);

    /* d CE / d logits = (softmax - onehot) / n_targets: the forward left softmax - onehot */
    float inv = m->n_targets_global > 0 ? scale / (float)m->n_targets_global : 0.0f;
    mm_op head[2] = {mm_make(MM_DW, m->g.lm_head, m->dlogits, m->hf, N, d, V, inv, 1.0f),
                     mm_make(MM_DX, m->dh, m->dlogits, m->w.lm_head, N, d, V, inv, 0.0f)};
    mm_list_run(head, 2);
    TRAIN_PROF(TP_LMHEAD_B);
    rmsnorm_backward(m->dx, NULL, m->g.norm, m->dh, m->x + (size_t)L * Nd, m->rstdf, m->w.norm,
                     N, d);
    TRAIN_PROF(TP_NORM_B);

    for (int l = L - 1; l >= 0; l--) {
        const train_layer_weights *w = &m->w.layers[l];
        train_layer_weights *g = &m->g.layers[l];
        float *x = m->x + l * Nd, *h1 = m->h1 + l * Nd, *h2 = m->h2 + l * Nd;
        float *x2 = m->x2 + l * Nd;
        float *q = m->q + l * Nq, *k = m->k + l * Nkv, *v = m->v + l * Nkv;
        float *ao = m->ao + l * Nq, *P = m->att + l * att_l;
        /* m->dx holds dL/dx_{l+1}; the FFN's output and the residual both get it */
        if (c->n_experts > 0) {
            int rc = train_moe_backward(m, l, h2, m->dx, m->dh, scale, e);
            if (rc)
                return rc;
        } else {
            train_ffn_seg s = {.r0 = 0, .n = N, .w1 = w->w_gate, .w3 = w->w_up,
                               .w2 = w->w_down, .g1 = g->w_gate, .g3 = g->w_up,
                               .g2 = g->w_down};
            train_ffn_backward_segs(m->dh, m->dx, h2, m->fg + l * NI, m->fu + l * NI,
                                    m->fa + l * NI, &s, 1, d, I, m->dfg, m->dfu, 0.0f);
            TRAIN_PROF(TP_EXPERT_B);
        }
        rmsnorm_backward(m->dx2, m->dx, g->ln2, m->dh, x2, m->rstd2 + (size_t)l * N, w->ln2, N,
                         d);
        TRAIN_PROF(TP_NORM_B);
        /* attention */
        mm_op o_bwd[2] = {mm_make(MM_DW, g->wo, m->dx2, ao, N, H * hd, d, 1.0f, 1.0f),
                          mm_make(MM_DX, m->dao, m->dx2, w->wo, N, H * hd, d, 1.0f, 0.0f)};
        mm_list_run(o_bwd, 2);
        TRAIN_PROF(TP_OPROJ_B);
        attention_backward(m->dq, m->dk, m->dv, m->dao, P, q, k, v, B, T, H, Hkv, hd,
                           m->att_scratch, 0.0f);
        TRAIN_PROF(TP_ATTN_B);
        rope_run(m, m->dq, H, -1);
        rope_run(m, m->dk, Hkv, -1);
        TRAIN_PROF(TP_ROPE_B);
        /* dh = dq Wq + dk Wk + dv Wv, added in that order on each tile */
        mm_op dh_v = mm_make(MM_DX, m->dh, m->dv, w->wv, N, d, Hkv * hd, 1.0f, 1.0f);
        mm_op dh_k = mm_make(MM_DX, m->dh, m->dk, w->wk, N, d, Hkv * hd, 1.0f, 1.0f);
        dh_k.then = &dh_v;
        mm_op qkv_bwd[4] = {mm_make(MM_DW, g->wq, m->dq, h1, N, d, H * hd, 1.0f, 1.0f),
                            mm_make(MM_DW, g->wk, m->dk, h1, N, d, Hkv * hd, 1.0f, 1.0f),
                            mm_make(MM_DW, g->wv, m->dv, h1, N, d, Hkv * hd, 1.0f, 1.0f),
                            mm_make(MM_DX, m->dh, m->dq, w->wq, N, d, H * hd, 1.0f, 0.0f)};
        qkv_bwd[3].then = &dh_k;
        mm_list_run(qkv_bwd, 4);
        TRAIN_PROF(TP_QKV_B);
        rmsnorm_backward(m->dx, m->dx2, g->ln1, m->dh, x, m->rstd1 + (size_t)l * N, w->ln1, N,
                         d);
        TRAIN_PROF(TP_NORM_B);
    }
    tok_args ta = {.m = m};
    tensor_parallel_for(ceil_div(d, COL_TASK), embed_backward_task, &ta);
    TRAIN_PROF(TP_EMBED_B);
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
