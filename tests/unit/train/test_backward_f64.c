/*
 * Double-precision finite-difference checks of the trainer's backwards (issue 7, acceptance 2):
 * RMSNorm, RoPE, causal GQA attention, SwiGLU FFN, and a whole 1-layer dense and Mixtral model
 * (output head, mean cross-entropy, top-2 router and its load-balancing loss included).
 *
 * Each layer has a naive double-precision forward here, written from the definitions (the same
 * functions the f32 kernels compute: the test first checks that both forwards agree). The
 * scalar f = sum(c * y) (the CE for the head) is differenced in double, one coordinate at a
 * time, central, h = 1e-6: truncation ~h^2 and rounding ~1e-16/h leave the reference exact to
 * ~1e-9 relative. Every coordinate of the f32 analytic gradient must then agree with it to
 * max|dg| <= 1e-4 * max|g| per tensor — f32 rounding, nothing else (seen: <= 1.3e-6).
 * test_backward.c keeps the checks of the other routers (switch, hash, group_limited,
 * expert_choice, locmoe; capacity drops; z and locality losses), f32 directional derivatives.
 */
#include "testlib.h"

#include "../src/train/train_internal.h"

#include "loom/tensor.h"

static loom_rng rng;

#define TOL 1e-4

static void fill(float *x, size_t n, float std)
{
    for (size_t i = 0; i < n; i++)
        x[i] = std * rng_normal(&rng);
}

static void widen(double *y, const float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        y[i] = x[i];
}

static double dot64(const double *a, const double *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* f(ctx) in double with its inputs in ctx; x is one of them (n doubles). */
typedef double (*f64_fn)(void *ctx);

/* Coordinate-wise central differences of f along x against the f32 analytic gradient g:
 * returns max|fd - g| / max|fd|. */
static double check_coords(const char *what, f64_fn f, void *ctx, double *x, const float *g,
                           size_t n)
{
    const double h = 1e-6;
    double dmax = 0, gmax = 0;
    for (size_t i = 0; i < n; i++) {
        double x0 = x[i];
        x[i] = x0 + h;
        double fp = f(ctx);
        x[i] = x0 - h;
        double fm = f(ctx);
        x[i] = x0;
        double fd = (fp - fm) / (2 * h);
        gmax = fmax(gmax, fabs(fd));
        dmax = fmax(dmax, fabs(fd - g[i]));
    }
    double rel = dmax / fmax(gmax, 1e-30);
    printf("  %-22s %5zu coords  max|fd| %.4e  max|fd - analytic| %.3e  rel %.2e\n", what, n,
           gmax, dmax, rel);
    return rel;
}

/* The f32 forward y32 against the double reference y64 (the same function?). */
static void check_forward(const char *what, const float *y32, const double *y64, size_t n)
{
    double dmax = 0, ymax = 0;
    for (size_t i = 0; i < n; i++) {
        ymax = fmax(ymax, fabs(y64[i]));
        dmax = fmax(dmax, fabs(y32[i] - y64[i]));
    }
    printf("  %-22s forward f32 vs f64 rel %.2e\n", what, dmax / ymax);
    assert_true(dmax <= 1e-5 * ymax);
}

/* ------------------------------------------------------------------ RMSNorm */

enum { N_ = 6, D_ = 16 };
typedef struct norm64 {
    double x[N_ * D_], w[D_], c[N_ * D_], y[N_ * D_];
} norm64;

static void rmsnorm64(double *y, const double *x, const double *w, int N, int d, double eps)
{
    for (int t = 0; t < N; t++) {
        double ss = 0;
        for (int i = 0; i < d; i++)
            ss += x[t * d + i] * x[t * d + i];
        double r = 1.0 / sqrt(ss / d + eps);
        for (int i = 0; i < d; i++)
            y[t * d + i] = w[i] * x[t * d + i] * r;
    }
}

static double norm_f64(void *p)
{
    norm64 *s = p;
    rmsnorm64(s->y, s->x, s->w, N_, D_, 1e-5);
    return dot64(s->c, s->y, N_ * D_);
}

static void test_rmsnorm(void **state)
{
    (void)state;
    float x[N_ * D_], w[D_], c[N_ * D_], y[N_ * D_], r[N_];
    fill(x, N_ * D_, 1.0f);
    fill(w, D_, 1.0f);
    fill(c, N_ * D_, 1.0f);
    norm64 s;
    widen(s.x, x, N_ * D_);
    widen(s.w, w, D_);
    widen(s.c, c, N_ * D_);
    train_rmsnorm_forward(y, r, x, w, N_, D_, 1e-5f);
    norm_f64(&s);
    check_forward("rmsnorm", y, s.y, N_ * D_);
    float dx[N_ * D_] = {0}, dw[D_] = {0};
    train_rmsnorm_backward(dx, dw, c, x, r, w, N_, D_);
    assert_true(check_coords("rmsnorm dx", norm_f64, &s, s.x, dx, N_ * D_) < TOL);
    assert_true(check_coords("rmsnorm dw", norm_f64, &s, s.w, dw, D_) < TOL);
}

/* ------------------------------------------------------------------ RoPE */

enum { RH = 2, RHD = 8 };
typedef struct rope64 {
    double x[N_ * RH * RHD], y[N_ * RH * RHD], c[N_ * RH * RHD], inv[RHD / 2];
    int32_t pos[N_];
} rope64;

/* rotate-half RoPE: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), angle pos * inv_freq[i] */
static double rope_f64(void *p)
{
    rope64 *s = p;
    int half = RHD / 2;
    for (int t = 0; t < N_; t++)
        for (int h = 0; h < RH; h++)
            for (int i = 0; i < half; i++) {
                const double *xh = s->x + (t * RH + h) * RHD;
                double *yh = s->y + (t * RH + h) * RHD;
                double a = s->pos[t] * s->inv[i], co = cos(a), si = sin(a);
                yh[i] = xh[i] * co - xh[i + half] * si;
                yh[i + half] = xh[i + half] * co + xh[i] * si;
            }
    return dot64(s->c, s->y, N_ * RH * RHD);
}

static void test_rope(void **state)
{
    (void)state;
    enum { n = N_ * RH * RHD };
    float x[n], c[n], inv[RHD / 2];
    fill(x, n, 1.0f);
    fill(c, n, 1.0f);
    tensor_rope_inv_freq(inv, RHD, 10000.0f);
    rope64 s;
    widen(s.x, x, n);
    widen(s.c, c, n);
    widen(s.inv, inv, RHD / 2);
    for (int t = 0; t < N_; t++)
        s.pos[t] = 3 * t + 1;
    float y[n];
    memcpy(y, x, sizeof(y));
    train_rope(y, s.pos, N_, RH, RHD, inv, 1);
    rope_f64(&s);
    check_forward("rope", y, s.y, n);
    float dx[n];
    memcpy(dx, c, sizeof(dx));
    train_rope(dx, s.pos, N_, RH, RHD, inv, -1);
    assert_true(check_coords("rope dx", rope_f64, &s, s.x, dx, n) < TOL);
}

/* ------------------------------------------------------------------ attention */

enum { AB = 2, AT = 5, AH = 4, AKV = 2, AHD = 8 };
enum { NQ = AB * AT * AH * AHD, NKV = AB * AT * AKV * AHD };
typedef struct attn64 {
    double q[NQ], k[NKV], v[NKV], c[NQ], out[NQ];
} attn64;

/* causal GQA: head h reads kv head h / (H / Hkv); scores q.k / sqrt(hd), softmax over s <= t */
static double attn_f64(void *p)
{
    attn64 *s = p;
    int group = AH / AKV;
    double scale = 1.0 / sqrt((double)AHD);
    for (int b = 0; b < AB; b++)
        for (int t = 0; t < AT; t++)
            for (int h = 0; h < AH; h++) {
                const double *qt = s->q + ((b * AT + t) * AH + h) * AHD;
                double sc[AT], mx = -1e300, z = 0;
                for (int u = 0; u <= t; u++) {
                    const double *ku = s->k + ((b * AT + u) * AKV + h / group) * AHD;
                    sc[u] = dot64(qt, ku, AHD) * scale;
                    mx = fmax(mx, sc[u]);
                }
                for (int u = 0; u <= t; u++)
                    z += (sc[u] = exp(sc[u] - mx));
                double *ot = s->out + ((b * AT + t) * AH + h) * AHD;
                for (int i = 0; i < AHD; i++) {
                    double acc = 0;
                    for (int u = 0; u <= t; u++)
                        acc += sc[u] / z * s->v[((b * AT + u) * AKV + h / group) * AHD + i];
                    ot[i] = acc;
                }
            }
    return dot64(s->c, s->out, NQ);
}

static void test_attention(void **state)
{
    (void)state;
    static float q[NQ], k[NKV], v[NKV], c[NQ], out[NQ], P[AB * AH * AT * AT];
    static float dq[NQ], dk[NKV], dv[NKV];
    static attn64 s;
    fill(q, NQ, 1.0f);
    fill(k, NKV, 1.0f);
    fill(v, NKV, 1.0f);
    fill(c, NQ, 1.0f);
    widen(s.q, q, NQ);
    widen(s.k, k, NKV);
    widen(s.v, v, NKV);
    widen(s.c, c, NQ);
    train_attention_forward(out, P, q, k, v, AB, AT, AH, AKV, AHD);
    attn_f64(&s);
    check_forward("attention", out, s.out, NQ);
    float scratch[64 * AT + AT];
    memset(dq, 0, sizeof(dq));
    memset(dk, 0, sizeof(dk));
    memset(dv, 0, sizeof(dv));
    train_attention_backward(dq, dk, dv, c, P, q, k, v, AB, AT, AH, AKV, AHD, scratch);
    assert_true(check_coords("attention dq", attn_f64, &s, s.q, dq, NQ) < TOL);
    assert_true(check_coords("attention dk", attn_f64, &s, s.k, dk, NKV) < TOL);
    assert_true(check_coords("attention dv", attn_f64, &s, s.v, dv, NKV) < TOL);
}

/* ------------------------------------------------------------------ SwiGLU FFN */

enum { FI = 12 };
typedef struct ffn64 {
    double x[N_ * D_], w1[FI * D_], w3[FI * D_], w2[D_ * FI], c[N_ * D_], y[N_ * D_];
} ffn64;

/* y = w2 (silu(w1 x) * (w3 x)); w1, w3 (I, d), w2 (d, I) */
static double ffn_f64(void *p)
{
    ffn64 *s = p;
    for (int t = 0; t < N_; t++) {
        double a[FI];
        for (int j = 0; j < FI; j++) {
            double g = dot64(s->w1 + j * D_, s->x + t * D_, D_);
            double u = dot64(s->w3 + j * D_, s->x + t * D_, D_);
            a[j] = g / (1.0 + exp(-g)) * u;
        }
        for (int i = 0; i < D_; i++)
            s->y[t * D_ + i] = dot64(s->w2 + i * FI, a, FI);
    }
    return dot64(s->c, s->y, N_ * D_);
}

static void test_swiglu(void **state)
{
    (void)state;
    float x[N_ * D_], w1[FI * D_], w3[FI * D_], w2[D_ * FI], c[N_ * D_], y[N_ * D_];
    float g[N_ * FI], u[N_ * FI], a[N_ * FI];
    fill(x, N_ * D_, 1.0f);
    fill(w1, FI * D_, 0.3f);
    fill(w3, FI * D_, 0.3f);
    fill(w2, FI * D_, 0.3f);
    fill(c, N_ * D_, 1.0f);
    ffn64 s;
    widen(s.x, x, N_ * D_);
    widen(s.w1, w1, FI * D_);
    widen(s.w3, w3, FI * D_);
    widen(s.w2, w2, FI * D_);
    widen(s.c, c, N_ * D_);
    train_ffn_forward(y, g, u, a, x, w1, w3, w2, N_, D_, FI);
    ffn_f64(&s);
    check_forward("swiglu ffn", y, s.y, N_ * D_);
    float dx[N_ * D_] = {0}, d1[FI * D_] = {0}, d3[FI * D_] = {0}, d2[FI * D_] = {0};
    float sg[N_ * FI], su[N_ * FI];
    train_ffn_backward(dx, d1, d3, d2, c, x, g, u, a, w1, w3, w2, N_, D_, FI, sg, su);
    assert_true(check_coords("swiglu dx", ffn_f64, &s, s.x, dx, N_ * D_) < TOL);
    assert_true(check_coords("swiglu dw1", ffn_f64, &s, s.w1, d1, FI * D_) < TOL);
    assert_true(check_coords("swiglu dw3", ffn_f64, &s, s.w3, d3, FI * D_) < TOL);
    assert_true(check_coords("swiglu dw2", ffn_f64, &s, s.w2, d2, FI * D_) < TOL);
}

/* ------------------------------------------------------------------ whole model, end to end */

/*
 * A 1-layer Llama (d 16, 2/1 heads, I 12, V 32) or Mixtral (4 experts top-2 renormalised,
 * load-balancing loss 0.1): the whole trainer forward and backward (train_forward,
 * train_backward, through src/moe for the router) against a double forward of the same network
 * written from the definitions: embedding, RMSNorm, q/k/v, RoPE, attention, o, residual,
 * RMSNorm, SwiGLU FFN or MoE, residual, final RMSNorm, lm_head, mean CE (+ aux). Every
 * coordinate of every tensor.
 */
enum { MB = 2, MT = 6, MV = 32, MD = 16, MH = 2, MKV = 1, MHD = 8, MI = 12, ME = 4, MK = 2 };
typedef struct model64 {
    double *p;                 /* (n_params) the trainer's layout */
    const train_model *m;      /* for the offsets */
    int32_t tok[MB * MT], tgt[MB * MT];
    double inv[MHD / 2], eps;
    bool moe;                  /* Mixtral FFN: ME experts, top-MK softmax renormalised */
    double aux_coef;           /* Mixtral load-balancing loss coefficient */
    int sel[MB * MT * MK];     /* experts chosen in the last evaluation */
} model64;

static const double *tensor64(const model64 *s, const char *name)
{
    const train_param *p = train_model_find(s->m, name);
    assert_non_null(p);
    return s->p + p->offset;
}

/* y (n, out) = x (n, in) W^T, W (out, in) */
static void mm64(double *y, const double *x, const double *w, int n, int in, int out)
{
    for (int t = 0; t < n; t++)
        for (int o = 0; o < out; o++)
            y[t * out + o] = dot64(x + t * in, w + o * in, in);
}

static double model_f64(void *p)
{
    model64 *s = p;
    enum { N = MB * MT };
    double x[N * MD], h[N * MD], q[N * MH * MHD], k[N * MKV * MHD], v[N * MKV * MHD];
    double ao[N * MH * MHD], o[N * MD], g[N * MI], u[N * MI], y[N * MD], lg[N * MV];
    const double *emb = tensor64(s, "model.embed_tokens.weight");
    for (int t = 0; t < N; t++)
        memcpy(x + t * MD, emb + s->tok[t] * MD, MD * sizeof(double));
    rmsnorm64(h, x, tensor64(s, "model.layers.0.input_layernorm.weight"), N, MD, s->eps);
    mm64(q, h, tensor64(s, "model.layers.0.self_attn.q_proj.weight"), N, MD, MH * MHD);
    mm64(k, h, tensor64(s, "model.layers.0.self_attn.k_proj.weight"), N, MD, MKV * MHD);
    mm64(v, h, tensor64(s, "model.layers.0.self_attn.v_proj.weight"), N, MD, MKV * MHD);
    /* RoPE on q and k, positions t mod T */
    for (int t = 0; t < N; t++)
        for (int hh = 0; hh < MH + MKV; hh++) {
            double *xh = hh < MH ? q + (t * MH + hh) * MHD : k + (t * MKV + hh - MH) * MHD;
            for (int i = 0; i < MHD / 2; i++) {
                double a = (t % MT) * s->inv[i], co = cos(a), si = sin(a);
                double x1 = xh[i], x2 = xh[i + MHD / 2];
                xh[i] = x1 * co - x2 * si;
                xh[i + MHD / 2] = x2 * co + x1 * si;
            }
        }
    int group = MH / MKV;
    for (int b = 0; b < MB; b++)
        for (int t = 0; t < MT; t++)
            for (int hh = 0; hh < MH; hh++) {
                const double *qt = q + ((b * MT + t) * MH + hh) * MHD;
                double sc[MT], mx = -1e300, z = 0;
                for (int w = 0; w <= t; w++) {
                    sc[w] = dot64(qt, k + ((b * MT + w) * MKV + hh / group) * MHD, MHD) /
                            sqrt((double)MHD);
                    mx = fmax(mx, sc[w]);
                }
                for (int w = 0; w <= t; w++)
                    z += (sc[w] = exp(sc[w] - mx));
                for (int i = 0; i < MHD; i++) {
                    double acc = 0;
                    for (int w = 0; w <= t; w++)
                        acc += sc[w] / z * v[((b * MT + w) * MKV + hh / group) * MHD + i];
                    ao[((b * MT + t) * MH + hh) * MHD + i] = acc;
                }
            }
    mm64(o, ao, tensor64(s, "model.layers.0.self_attn.o_proj.weight"), N, MH * MHD, MD);
    for (int i = 0; i < N * MD; i++)
        x[i] += o[i];
    rmsnorm64(h, x, tensor64(s, "model.layers.0.post_attention_layernorm.weight"), N, MD,
              s->eps);
    double aux = 0;
    if (!s->moe) {
        mm64(g, h, tensor64(s, "model.layers.0.mlp.gate_proj.weight"), N, MD, MI);
        mm64(u, h, tensor64(s, "model.layers.0.mlp.up_proj.weight"), N, MD, MI);
        for (int i = 0; i < N * MI; i++)
            g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        mm64(y, g, tensor64(s, "model.layers.0.mlp.down_proj.weight"), N, MI, MD);
        for (int i = 0; i < N * MD; i++)
            x[i] += y[i];
    } else {
        /* Mixtral: softmax over the gate logits, top-k, the k weights renormalised; the
         * load-balancing loss E * sum_e f_e P_e with f_e = count_e / N (assignments over all
         * k slots) and P_e the mean probability: transformers' load_balancing_loss_func */
        double lgt[N * ME], count[ME] = {0}, psum[ME] = {0};
        mm64(lgt, h, tensor64(s, "model.layers.0.block_sparse_moe.gate.weight"), N, MD, ME);
        for (int t = 0; t < N; t++) {
            double *pr = lgt + t * ME, mx = -1e300, z = 0;
            for (int e = 0; e < ME; e++)
                mx = fmax(mx, pr[e]);
            for (int e = 0; e < ME; e++)
                z += (pr[e] = exp(pr[e] - mx));
            for (int e = 0; e < ME; e++)
                psum[e] += (pr[e] /= z);
            int top[MK];
            double wsum = 0;
            for (int j = 0; j < MK; j++) {
                int best = -1;
                for (int e = 0; e < ME; e++) {
                    bool used = false;
                    for (int i = 0; i < j; i++)
                        used |= top[i] == e;
                    if (!used && (best < 0 || pr[e] > pr[best]))
                        best = e;
                }
                top[j] = best;
                s->sel[t * MK + j] = best;
                count[best] += 1;
                wsum += pr[best];
            }
            for (int i = 0; i < MD; i++)
                y[t * MD + i] = 0;
            for (int j = 0; j < MK; j++) {
                char name[96];
                const double *w[3];
                for (int q3 = 0; q3 < 3; q3++) {
                    snprintf(name, sizeof(name), "model.layers.0.block_sparse_moe.experts.%d.w%d.weight",
                             top[j], q3 + 1);
                    w[q3] = tensor64(s, name);
                }
                double a[MI];
                for (int r = 0; r < MI; r++) {
                    double gg = dot64(w[0] + r * MD, h + t * MD, MD);
                    a[r] = gg / (1.0 + exp(-gg)) * dot64(w[2] + r * MD, h + t * MD, MD);
                }
                for (int i = 0; i < MD; i++)
                    y[t * MD + i] += pr[top[j]] / wsum * dot64(w[1] + i * MI, a, MI);
            }
        }
        for (int e = 0; e < ME; e++)
            aux += ME * (count[e] / N) * (psum[e] / N);
        for (int i = 0; i < N * MD; i++)
            x[i] += y[i];
    }
    rmsnorm64(h, x, tensor64(s, "model.norm.weight"), N, MD, s->eps);
    mm64(lg, h, tensor64(s, "lm_head.weight"), N, MD, MV);
    double ce = 0;
    int n_valid = 0;
    for (int t = 0; t < N; t++) {
        if (s->tgt[t] < 0)
            continue;
        double mx = -1e300, z = 0;
        for (int i = 0; i < MV; i++)
            mx = fmax(mx, lg[t * MV + i]);
        for (int i = 0; i < MV; i++)
            z += exp(lg[t * MV + i] - mx);
        ce += log(z) + mx - lg[t * MV + s->tgt[t]];
        n_valid++;
    }
    return ce / n_valid + s->aux_coef * aux;
}

static void check_model(bool moe)
{
    model_config mc = {0};
    snprintf(mc.architecture, sizeof(mc.architecture), moe ? "MixtralForCausalLM" : "LlamaForCausalLM");
    mc.arch = moe ? ARCH_MIXTRAL : ARCH_LLAMA;
    mc.n_experts = moe ? ME : 0;
    mc.n_experts_per_tok = moe ? MK : 0;
    mc.vocab_size = MV;
    mc.hidden_size = MD;
    mc.intermediate_size = MI;
    mc.n_layers = 1;
    mc.n_heads = MH;
    mc.n_kv_heads = MKV;
    mc.head_dim = MHD;
    mc.rms_norm_eps = 1e-5f;
    mc.rope_theta = 10000.0f;
    train_config c;
    train_config_default(&c, &mc, MB, MT);
    c.init_std = 0.3f;
    c.aux_coef = moe ? 0.1 : 0.0;
    loom_err e = {0};
    train_model *m = NULL;
    if (train_model_create(&c, NULL, &m, &e))
        fail_msg("%s", e.msg);
    assert_false(train_model_find(m, "lm_head.weight") == NULL);
    train_model_init_random(m, 11);
    size_t n = train_model_n_params(m);
    for (int i = 0; i < train_model_n_tensors(m); i++) {
        const train_param *p = train_model_tensor(m, i);
        if (p->n_dims == 1)
            for (size_t j = 0; j < p->n; j++)
                train_model_params(m)[p->offset + j] += 0.2f * rng_normal(&rng);
    }
    model64 s = {.m = m, .eps = 1e-5, .moe = moe, .aux_coef = c.aux_coef};
    s.p = malloc(n * sizeof(double));
    widen(s.p, train_model_params(m), n);
    float inv[MHD / 2];
    tensor_rope_inv_freq(inv, MHD, 10000.0f);
    widen(s.inv, inv, MHD / 2);
    for (int i = 0; i < MB * MT; i++) {
        s.tok[i] = (int32_t)(rng_next(&rng) % MV);
        s.tgt[i] = i % MT == MT - 1 ? -1 : (int32_t)(rng_next(&rng) % MV);
    }
    train_loss lo;
    assert_int_equal(train_forward(m, s.tok, s.tgt, MB, MT, &lo, &e), 0);
    double f64 = model_f64(&s);
    int sel0[MB * MT * MK];
    memcpy(sel0, s.sel, sizeof(sel0));
    printf("  %s model: loss f32 %.7f, f64 reference %.7f\n", moe ? "Mixtral" : "dense",
           lo.total, f64);
    assert_true(fabs(lo.total - f64) <= 1e-5 * fabs(f64));
    train_zero_grad(m);
    assert_int_equal(train_backward(m, 1.0f, &e), 0);
    double worst = 0;
    for (int i = 0; i < train_model_n_tensors(m); i++) {
        const train_param *p = train_model_tensor(m, i);
        double rel = check_coords(p->name + (strncmp(p->name, "model.", 6) ? 0 : 6),
                                  model_f64, &s, s.p + p->offset,
                                  train_model_grads(m) + p->offset, p->n);
        worst = fmax(worst, rel);
        if (rel > TOL)
            fail_msg("%s: rel %.3e", p->name, rel);
    }
    /* the differences never crossed a routing decision (h = 1e-6 against gaps of ~1e-2) */
    model_f64(&s);
    assert_memory_equal(sel0, s.sel, sizeof(sel0));
    printf("  %s model: worst rel %.2e over %d tensors\n", moe ? "Mixtral" : "dense", worst,
           train_model_n_tensors(m));
    free(s.p);
    train_model_free(m);
}

static void test_dense_model(void **state) { (void)state; check_model(false); }
static void test_mixtral_model(void **state) { (void)state; check_model(true); }

int main(void)
{
    rng_seed(&rng, 4242);
    tensor_set_threads(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmsnorm),   cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention), cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_dense_model), cmocka_unit_test(test_mixtral_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
