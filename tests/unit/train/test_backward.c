/*
 * Finite-difference checks of every backward of the trainer (issue 7, acceptance 2): RMSNorm,
 * RoPE, causal GQA attention, SwiGLU FFN, and the whole model with a MoE layer under each router
 * (topk/Mixtral, switch, hash, group_limited, expert_choice, locmoe), with the load-balancing,
 * z and locality losses on.
 *
 * The kernels are f32, so instead of one coordinate at a time (whose central difference drowns
 * in f32 rounding) each check takes a directional derivative along a random direction u of a
 * whole tensor, by the five-point stencil (truncation O(h^4), so a step large enough for the
 * f32 rounding of f to matter little), against <grad, u>: relative error <= 1e-3 for a layer
 * (seen <= 4.2e-5), <= 5e-3 for a whole model (seen <= 1.3e-3). The scalar of a layer test is
 * f = sum(c * y) for a fixed random c. test_backward_f64.c checks the layers, a dense and a
 * Mixtral model coordinate by coordinate against double-precision references (<= 1e-4).
 */
#include "testlib.h"

#include "../src/train/train_internal.h"

#include "loom/tensor.h"

#define LAYER_TOL 1e-3 /* relative error of a layer's directional derivative */
#define MODEL_TOL 5e-3 /* of a whole model's, per tensor */

static loom_rng rng;

static void fill_from(loom_rng *r, float *x, size_t n, float std)
{
    for (size_t i = 0; i < n; i++)
        x[i] = std * rng_normal(r);
}

static void fill(float *x, size_t n, float std) { fill_from(&rng, x, n, std); }

static double dot(const float *a, const float *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

/* f(ctx) evaluated with x perturbed along u; returns the relative error of the directional
 * derivative against <g, u>. */
typedef double (*scalar_fn)(void *ctx);

/* Routing signature of the last model forward (0 for layer tests): the selection and the drops
 * are piecewise constant, so a difference across one makes no sense; the step then shrinks. */
static uint64_t last_sig;

/* The five-point directional derivative of f along u at step h (shrunk while any of the four
 * points routes differently from x). */
static double fd_dir(scalar_fn f, void *ctx, float *x, const float *x0, const float *u, size_t n,
                     double h)
{
    double fv[4] = {0}, fd = 0;
    static const double at[4] = {1, -1, 2, -2};
    for (int tries = 0; tries < 8; tries++, h /= 4) {
        f(ctx);
        uint64_t sig0 = last_sig;
        bool same = true;
        for (int j = 0; j < 4; j++) {
            for (size_t i = 0; i < n; i++)
                x[i] = x0[i] + (float)(at[j] * h) * u[i];
            fv[j] = f(ctx);
            same &= last_sig == sig0;
        }
        memcpy(x, x0, n * sizeof(float));
        fd = (8 * (fv[0] - fv[1]) - (fv[2] - fv[3])) / (12 * h);
        if (same)
            break;
        if (tries == 7)
            fd = NAN; /* x0 sits on a routing tie: no step gives a clean difference */
    }
    f(ctx); /* leave the state of x0 behind */
    return fd;
}

static double check_dir(const char *what, scalar_fn f, void *ctx, float *x, const float *g,
                        size_t n, double h)
{
    float *u = malloc(n * sizeof(float)), *x0 = malloc(n * sizeof(float));
    fill(u, n, 1.0f);
    memcpy(x0, x, n * sizeof(float));
    /* five-point stencil (8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h: truncation O(h^4), so h
     * can be large enough for the f32 rounding of f to matter little. Where f bends sharply
     * along u (some random draws of a whole model) h is too large for that truncation, so the
     * best of h, h/3 and h/10 counts: a wrong gradient agrees at none of them. */
    /* the error is relative to |<g, u>| or to ||g||, the typical size of <g, u> for a random u
     * (E <g, u>^2 = ||g||^2), whichever is larger: a u nearly orthogonal to g leaves a tiny
     * derivative that f32 differences cannot resolve to 1e-3 of itself */
    double an = dot(g, u, n), gnorm = sqrt(dot(g, g, n)), best = INFINITY, best_fd = 0;
    static const double scale[3] = {1, 1.0 / 3, 0.1};
    for (int i = 0; i < 3; i++) {
        double fd = fd_dir(f, ctx, x, x0, u, n, h * scale[i]);
        double rel = fabs(fd - an) / fmax(fmax(fabs(an), gnorm), 1e-6);
        if (isnan(fd))
            fail_msg("%s: the routing changes at every step down to %.1e (a tie at x)", what,
                     h * scale[i] / 16384);
        if (rel < best) {
            best = rel;
            best_fd = fd;
        }
    }
    printf("  %-58s fd %+.6e  analytic %+.6e  rel %.2e\n", what, best_fd, an, best);
    free(u);
    free(x0);
    return best;
}

/* ------------------------------------------------------------------ RMSNorm */

enum { N_ = 6, D_ = 16 };
typedef struct norm_ctx {
    float x[N_ * D_], w[D_], c[N_ * D_], y[N_ * D_], r[N_];
} norm_ctx;

static double norm_f(void *p)
{
    norm_ctx *s = p;
    train_rmsnorm_forward(s->y, s->r, s->x, s->w, N_, D_, 1e-5f);
    return dot(s->c, s->y, N_ * D_);
}

static void test_rmsnorm(void **state)
{
    (void)state;
    norm_ctx s;
    fill(s.x, N_ * D_, 1.0f);
    fill(s.w, D_, 1.0f);
    fill(s.c, N_ * D_, 1.0f);
    float dx[N_ * D_] = {0}, dw[D_] = {0};
    norm_f(&s);
    train_rmsnorm_backward(dx, dw, s.c, s.x, s.r, s.w, N_, D_);
    assert_true(check_dir("rmsnorm dx", norm_f, &s, s.x, dx, N_ * D_, 1e-2) < LAYER_TOL);
    assert_true(check_dir("rmsnorm dw", norm_f, &s, s.w, dw, D_, 1e-2) < LAYER_TOL);
}

/* ------------------------------------------------------------------ RoPE */

typedef struct rope_ctx {
    float x[N_ * D_], y[N_ * D_], c[N_ * D_], inv[4];
    int32_t pos[N_];
} rope_ctx;

static double rope_f(void *p)
{
    rope_ctx *s = p;
    memcpy(s->y, s->x, sizeof(s->x));
    train_rope(s->y, s->pos, N_, 2, 8, s->inv, 1);
    return dot(s->c, s->y, N_ * D_);
}

static void test_rope(void **state)
{
    (void)state;
    rope_ctx s;
    fill(s.x, N_ * D_, 1.0f);
    fill(s.c, N_ * D_, 1.0f);
    tensor_rope_inv_freq(s.inv, 8, 10000.0f);
    for (int t = 0; t < N_; t++)
        s.pos[t] = 3 * t + 1;
    /* forward agrees with the engine's kernel */
    float ref[N_ * D_];
    memcpy(ref, s.x, sizeof(ref));
    tensor_rope(ref, s.pos, N_, 2, 8, s.inv);
    rope_f(&s);
    for (int i = 0; i < N_ * D_; i++)
        assert_float_equal(ref[i], s.y[i], 1e-6);
    float dx[N_ * D_];
    memcpy(dx, s.c, sizeof(dx));
    train_rope(dx, s.pos, N_, 2, 8, s.inv, -1);
    assert_true(check_dir("rope dx", rope_f, &s, s.x, dx, N_ * D_, 1e-2) < LAYER_TOL);
}

/* ------------------------------------------------------------------ attention */

enum { AB = 2, AT = 5, AH = 4, AKV = 2, AHD = 8 };
typedef struct attn_ctx {
    float q[AB * AT * AH * AHD], k[AB * AT * AKV * AHD], v[AB * AT * AKV * AHD];
    float out[AB * AT * AH * AHD], c[AB * AT * AH * AHD], P[AB * AH * AT * AT];
} attn_ctx;

static double attn_f(void *p)
{
    attn_ctx *s = p;
    train_attention_forward(s->out, s->P, s->q, s->k, s->v, AB, AT, AH, AKV, AHD);
    return dot(s->c, s->out, sizeof(s->out) / sizeof(float));
}

static void test_attention(void **state)
{
    (void)state;
    static attn_ctx s;
    fill(s.q, sizeof(s.q) / 4, 1.0f);
    fill(s.k, sizeof(s.k) / 4, 1.0f);
    fill(s.v, sizeof(s.v) / 4, 1.0f);
    fill(s.c, sizeof(s.c) / 4, 1.0f);
    static float dq[sizeof(s.q) / 4], dk[sizeof(s.k) / 4], dv[sizeof(s.v) / 4];
    float scratch[64 * AT + AT];
    attn_f(&s);
    memset(dq, 0, sizeof(dq));
    memset(dk, 0, sizeof(dk));
    memset(dv, 0, sizeof(dv));
    train_attention_backward(dq, dk, dv, s.c, s.P, s.q, s.k, s.v, AB, AT, AH, AKV, AHD, scratch);
    assert_true(check_dir("attention dq", attn_f, &s, s.q, dq, sizeof(s.q) / 4, 1e-2) < LAYER_TOL);
    assert_true(check_dir("attention dk", attn_f, &s, s.k, dk, sizeof(s.k) / 4, 1e-2) < LAYER_TOL);
    assert_true(check_dir("attention dv", attn_f, &s, s.v, dv, sizeof(s.v) / 4, 1e-2) < LAYER_TOL);
}

/* ------------------------------------------------------------------ SwiGLU FFN */

enum { FI = 12 };
typedef struct ffn_ctx {
    float x[N_ * D_], w1[FI * D_], w3[FI * D_], w2[D_ * FI], c[N_ * D_], y[N_ * D_];
    float g[N_ * FI], u[N_ * FI], a[N_ * FI];
} ffn_ctx;

static double ffn_f(void *p)
{
    ffn_ctx *s = p;
    train_ffn_forward(s->y, s->g, s->u, s->a, s->x, s->w1, s->w3, s->w2, N_, D_, FI);
    return dot(s->c, s->y, N_ * D_);
}

static void test_swiglu(void **state)
{
    (void)state;
    ffn_ctx s;
    fill(s.x, N_ * D_, 1.0f);
    fill(s.w1, FI * D_, 0.3f);
    fill(s.w3, FI * D_, 0.3f);
    fill(s.w2, FI * D_, 0.3f);
    fill(s.c, N_ * D_, 1.0f);
    float dx[N_ * D_] = {0}, d1[FI * D_] = {0}, d3[FI * D_] = {0}, d2[FI * D_] = {0};
    float sg[N_ * FI], su[N_ * FI];
    ffn_f(&s);
    train_ffn_backward(dx, d1, d3, d2, s.c, s.x, s.g, s.u, s.a, s.w1, s.w3, s.w2, N_, D_, FI, sg,
                       su);
    assert_true(check_dir("swiglu dx", ffn_f, &s, s.x, dx, N_ * D_, 1e-2) < LAYER_TOL);
    assert_true(check_dir("swiglu dw1", ffn_f, &s, s.w1, d1, FI * D_, 1e-2) < LAYER_TOL);
    assert_true(check_dir("swiglu dw3", ffn_f, &s, s.w3, d3, FI * D_, 1e-2) < LAYER_TOL);
    assert_true(check_dir("swiglu dw2", ffn_f, &s, s.w2, d2, FI * D_, 1e-2) < LAYER_TOL);
}

/*
 * Segments that share an expert's gradients (on R ranks, one per source rank): the weight
 * gradients are the sums over the segments, the same on a pool of 4 threads as on one, and the
 * same from one run to the next (two segments' tasks once added into one gradient at once).
 */
enum { SD = 64, SI = 96, SE = 2, SS = 6, SN = 40 };

/* max |a - b| / max |b| */
static double max_rel_diff(const float *a, const float *b, size_t n)
{
    double d = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        m = fmax(m, fabs((double)b[i]));
    }
    return m > 0 ? d / m : d;
}

static void segs_backward(float *grads, float *dx, const float *w, const float *x,
                          const float *dy, float *g, float *u, float *a, float *sg, float *su)
{
    size_t en = (size_t)3 * SI * SD;
    train_ffn_seg seg[SS];
    memset(grads, 0, SE * en * sizeof(float));
    for (int i = 0; i < SS; i++) {
        int e = i % SE; /* (source rank i / SE, expert e) */
        seg[i] = (train_ffn_seg){.r0 = i * SN, .n = SN - 7 * (i == 3), .w1 = w + e * en,
                                 .w2 = w + e * en + SI * SD, .w3 = w + e * en + 2 * SI * SD,
                                 .g1 = grads + e * en, .g2 = grads + e * en + SI * SD,
                                 .g3 = grads + e * en + 2 * SI * SD};
    }
    train_ffn_forward_segs(dx, g, u, a, x, seg, SS, SD, SI, 0.0f); /* dx: scratch for y */
    train_ffn_backward_segs(dx, dy, x, g, u, a, seg, SS, SD, SI, sg, su, 0.0f);
}

static void test_ffn_shared_segments(void **state)
{
    (void)state;
    size_t en = (size_t)3 * SI * SD, rows = (size_t)SS * SN;
    float *w = malloc(SE * en * sizeof(float)), *x = malloc(rows * SD * sizeof(float));
    float *dy = malloc(rows * SD * sizeof(float)), *dx = malloc(rows * SD * sizeof(float));
    float *g = malloc(rows * SI * sizeof(float)), *u = malloc(rows * SI * sizeof(float));
    float *a = malloc(rows * SI * sizeof(float)), *sg = malloc(rows * SI * sizeof(float));
    float *su = malloc(rows * SI * sizeof(float));
    float *ref = malloc(SE * en * sizeof(float)), *got = malloc(SE * en * sizeof(float));
    float *first = malloc(SE * en * sizeof(float));
    loom_rng r; /* its own stream: the model checks' data stay as they were */
    rng_seed(&r, 777);
    fill_from(&r, w, SE * en, 0.1f);
    fill_from(&r, x, rows * SD, 1.0f);
    fill_from(&r, dy, rows * SD, 1.0f);
    segs_backward(ref, dx, w, x, dy, g, u, a, sg, su);
    /* the reference: each expert's rows gathered into one segment, one thread */
    {
        float *xe = malloc(rows * SD * sizeof(float)), *dye = malloc(rows * SD * sizeof(float));
        float *dxe = malloc(rows * SD * sizeof(float));
        for (int e = 0; e < SE; e++) {
            int n = 0;
            for (int i = e; i < SS; i += SE) {
                int ni = SN - 7 * (i == 3);
                memcpy(xe + (size_t)n * SD, x + (size_t)i * SN * SD, ni * SD * sizeof(float));
                memcpy(dye + (size_t)n * SD, dy + (size_t)i * SN * SD, ni * SD * sizeof(float));
                n += ni;
            }
            float *ge = got + e * en, *we = w + e * en;
            memset(ge, 0, en * sizeof(float));
            train_ffn_forward(dxe, g, u, a, xe, we, we + 2 * SI * SD, we + SI * SD, n, SD, SI);
            train_ffn_backward(dxe, ge, ge + 2 * SI * SD, ge + SI * SD, dye, xe, g, u, a, we,
                               we + 2 * SI * SD, we + SI * SD, n, SD, SI, sg, su);
        }
        double worst = max_rel_diff(got, ref, SE * en);
        printf("shared segments vs gathered rows: max|d| / max|g| = %.2e\n", worst);
        assert_true(worst < 1e-4);
        free(xe);
        free(dye);
        free(dxe);
    }
    tensor_set_threads(4);
    for (int rep = 0; rep < 200; rep++) {
        segs_backward(got, dx, w, x, dy, g, u, a, sg, su);
        if (rep == 0)
            memcpy(first, got, SE * en * sizeof(float));
        double worst = max_rel_diff(got, ref, SE * en);
        if (worst >= 1e-5)
            fail_msg("4 threads, run %d: gradient off by %.2e (relative)", rep, worst);
        if (memcmp(first, got, SE * en * sizeof(float)))
            fail_msg("4 threads, run %d: gradients differ from run 0", rep);
    }
    tensor_set_threads(1);
    free(w), free(x), free(dy), free(dx), free(g), free(u), free(a), free(sg), free(su);
    free(ref), free(got), free(first);
}

/* ------------------------------------------------------------------ whole model, each router */

enum { MB = 2, MT = 6 };
typedef struct model_ctx {
    train_model *m;
    int32_t tok[MB * MT], tgt[MB * MT];
} model_ctx;

static double model_f(void *p)
{
    model_ctx *s = p;
    train_loss lo;
    loom_err e;
    assert_int_equal(train_forward(s->m, s->tok, s->tgt, MB, MT, &lo, &e), 0);
    last_sig = 0;
    train_model *m = s->m;
    for (int l = 0; m->moe && l < m->cfg.model.n_layers; l++) {
        const train_moe_layer *ml = &m->moe[l];
        size_t nk = (size_t)m->N * ml->rt.k;
        last_sig = loom_hash64(ml->rt.expert_idx, nk * sizeof(int32_t), last_sig);
        last_sig = loom_hash64(ml->plan.row, nk * sizeof(int32_t), last_sig);
    }
    return lo.total;
}

static void check_model(const char *router, int n_experts, double cf)
{
    model_config mc = {0};
    snprintf(mc.architecture, sizeof(mc.architecture), "MixtralForCausalLM");
    mc.arch = n_experts ? ARCH_MIXTRAL : ARCH_LLAMA;
    mc.vocab_size = 32;
    mc.hidden_size = 16;
    mc.intermediate_size = 12;
    mc.n_layers = 2;
    mc.n_heads = 2;
    mc.n_kv_heads = 1;
    mc.head_dim = 8;
    mc.rms_norm_eps = 1e-5f;
    mc.rope_theta = 10000.0f;
    mc.n_experts = n_experts;
    mc.n_experts_per_tok = n_experts ? 2 : 0;
    train_config c;
    train_config_default(&c, &mc, MB, MT);
    loom_err e = {0};
    if (n_experts)
        assert_int_equal(train_config_set_router(&c, router, &e), 0);
    c.init_std = 0.3f;
    c.aux_coef = n_experts ? 0.1 : 0.0;
    c.z_coef = n_experts && strcmp(router, "hash") ? 0.01 : 0.0;
    c.loc_coef = !strcmp(router, "locmoe") ? 0.1 : 0.0;
    c.capacity_factor = cf;
    model_ctx s;
    int rc = train_model_create(&c, NULL, &s.m, &e);
    if (rc)
        fail_msg("%s", e.msg);
    train_model_init_random(s.m, 7);
    /* LocMoE's eps and the norms start away from their init so their gradients are generic */
    for (int i = 0; i < train_model_n_tensors(s.m); i++) {
        const train_param *p = train_model_tensor(s.m, i);
        if (p->n_dims == 1)
            for (size_t j = 0; j < p->n; j++)
                train_model_params(s.m)[p->offset + j] += 0.2f * rng_normal(&rng);
    }
    for (int i = 0; i < MB * MT; i++) {
        s.tok[i] = (int32_t)(rng_next(&rng) % 32);
        s.tgt[i] = (i % MT) == MT - 1 ? -1 : (int32_t)(rng_next(&rng) % 32);
    }
    /* sequences that start alike give their tokens equal router inputs: an exact tie in
     * expert_choice's selection that rounding flips at any step, so no difference is clean */
    for (int b = 1; b < MB; b++)
        while (s.tok[b * MT] == s.tok[0])
            s.tok[b * MT] = (int32_t)(rng_next(&rng) % 32);
    printf("model, router %s, E=%d, capacity factor %g\n", n_experts ? router : "dense",
           n_experts, cf);
    model_f(&s);
    train_zero_grad(s.m);
    assert_int_equal(train_backward(s.m, 1.0f, &e), 0);
    double worst = 0;
    for (int i = 0; i < train_model_n_tensors(s.m); i++) {
        const train_param *p = train_model_tensor(s.m, i);
        /* one layer's tensors and the shared ones are enough per router; skip most experts */
        if (p->expert > 1 || p->layer == 0)
            continue;
        double rel = check_dir(p->name, model_f, &s, train_model_params(s.m) + p->offset,
                               train_model_grads(s.m) + p->offset, p->n, 1e-2);
        worst = fmax(worst, rel);
        if (rel > MODEL_TOL)
            fail_msg("router %s: %s rel %.3e", router, p->name, rel);
    }
    printf("  worst rel %.2e\n", worst);
    train_model_free(s.m);
}

static void test_model_dense(void **state) { (void)state; check_model("", 0, 0); }
static void test_model_topk(void **state) { (void)state; check_model("mixtral", 4, 0); }
static void test_model_topk_capacity(void **state) { (void)state; check_model("mixtral", 4, 1.0); }
static void test_model_switch(void **state) { (void)state; check_model("switch", 4, 0); }
static void test_model_hash(void **state) { (void)state; check_model("hash", 4, 0); }
static void test_model_group(void **state) { (void)state; check_model("group_limited", 4, 0); }
static void test_model_ec(void **state) { (void)state; check_model("expert_choice", 4, 0); }
static void test_model_locmoe(void **state) { (void)state; check_model("locmoe", 4, 0); }

int main(void)
{
    rng_seed(&rng, 12345);
    tensor_set_threads(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmsnorm),      cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),    cmocka_unit_test(test_swiglu),
        cmocka_unit_test(test_ffn_shared_segments),
        cmocka_unit_test(test_model_dense),  cmocka_unit_test(test_model_topk),
        cmocka_unit_test(test_model_topk_capacity), cmocka_unit_test(test_model_switch),
        cmocka_unit_test(test_model_hash),   cmocka_unit_test(test_model_group),
        cmocka_unit_test(test_model_ec),     cmocka_unit_test(test_model_locmoe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
