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

static void fill(float *x, size_t n, float std)
{
    for (size_t i = 0; i < n; i++)
        x[i] = std * rng_normal(&rng);
}

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

static double check_dir(const char *what, scalar_fn f, void *ctx, float *x, const float *g,
                        size_t n, double h)
{
    float *u = malloc(n * sizeof(float)), *x0 = malloc(n * sizeof(float));
    fill(u, n, 1.0f);
    memcpy(x0, x, n * sizeof(float));
    /* five-point stencil (8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h: truncation O(h^4), so h
     * can be large enough for the f32 rounding of f to matter little; it shrinks while any of
     * the four points routes differently from x */
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
    }
    double an = dot(g, u, n);
    double rel = fabs(fd - an) / fmax(fabs(an), 1e-6);
    printf("  %-58s fd %+.6e  analytic %+.6e  rel %.2e\n", what, fd, an, rel);
    free(u);
    free(x0);
    return rel;
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
        cmocka_unit_test(test_model_dense),  cmocka_unit_test(test_model_topk),
        cmocka_unit_test(test_model_topk_capacity), cmocka_unit_test(test_model_switch),
        cmocka_unit_test(test_model_hash),   cmocka_unit_test(test_model_group),
        cmocka_unit_test(test_model_ec),     cmocka_unit_test(test_model_locmoe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
