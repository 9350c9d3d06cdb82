/*
 * Routers' backward and the router losses against finite differences (acceptance 1).
 *
 * Each router is checked on J = sum_{t,j} cw[t,j] weight[t,j] + sum_{t,e} cs[t,e] scores[t,e]
 * (+ the z-loss when on), with random cw and cs standing for dLoss/dweight (from combine) and
 * dLoss/dscores (from L_aux and L_loc). Two checks per router:
 *   double: the test's own float64 forward of J (same selection) differentiated by central
 *           differences, h = 1e-6, against the library's analytic gradient: rel. error <= 1e-4;
 *   float:  the library's own float forward differentiated by central differences, h = 1e-2,
 *           against the same gradient: rel. error <= 1e-2.
 * A coordinate whose perturbation changes the selection or a ReLU mask is skipped (counted; at
 * most 10% may be). The losses are checked the same way against float64 oracles written here
 * from the definitions in include/loom/moe.h.
 */
#include "testlib.h"

#include "loom/base.h"
#include "loom/moe.h"

#define TOL_DOUBLE 1e-4
#define TOL_FLOAT 1e-2

static double rel_err(double a, double n, double floor)
{
    double m = fabs(a) > fabs(n) ? fabs(a) : fabs(n);
    return fabs(a - n) / (m > floor ? m : floor);
}

/* ------------------------------------------------------------ float64 reference forward */

typedef struct ref_ctx {
    const moe_router_config *c;
    int T, k;
    const int32_t *idx; /* (T, k) selection of the base forward, kept fixed */
    const float *noise; /* (T, d) jitter multipliers or NULL */
    const double *cw;   /* (T, k) */
    const double *cs;   /* (T, E) */
    int32_t *relu_mask; /* (T, E) out: 1 where pre > 0 */
} ref_ctx;

static int grap_lo(int i, int d, int n)
{
    return (int)(((int64_t)i * d + n - 1) / n);
}

static double ref_objective(ref_ctx *r, const double *x, const double *W, const double *b)
{
    const moe_router_config *c = r->c;
    int T = r->T, d = c->d, E = c->n_experts, k = r->k;
    double J = 0.0, zsum = 0.0;
    double gin[64], l[64], s[64];
    assert_true(d <= 64 && E <= 64);
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < d; j++)
            gin[j] = x[t * d + j] * (r->noise ? r->noise[t * d + j] : 1.0);
        for (int i = 0; i < E; i++) {
            double pre = 0.0;
            if (c->gate == MOE_GATE_LINEAR)
                for (int j = 0; j < d; j++)
                    pre += W[i * d + j] * gin[j];
            else {
                for (int j = grap_lo(i, d, E); j < grap_lo(i + 1, d, E); j++)
                    pre += gin[j];
                pre *= (double)E / d; /* LocMoE eq. 4 */
            }
            if (b)
                pre += b[i];
            if (r->relu_mask)
                r->relu_mask[t * E + i] = pre > 0;
            l[i] = c->gate_relu ? (pre > 0 ? pre : 0.0) : pre;
        }
        double m = l[0], z = 0.0;
        for (int i = 1; i < E; i++)
            m = l[i] > m ? l[i] : m;
        for (int i = 0; i < E; i++)
            z += exp(l[i] - m);
        for (int i = 0; i < E; i++)
            s[i] = c->score == MOE_SCORE_SIGMOID ? 1.0 / (1.0 + exp(-l[i])) : exp(l[i] - m) / z;
        zsum += (m + log(z)) * (m + log(z));
        for (int i = 0; i < E; i++)
            J += r->cs[t * E + i] * s[i];
        double w[64], S = 0.0;
        for (int j = 0; j < k; j++) {
            int e = r->idx[t * k + j];
            w[j] = e >= 0 ? s[e] : 0.0;
            S += w[j];
        }
        double scale = c->route_scale != 0.0f ? c->route_scale : 1.0;
        for (int j = 0; j < k; j++)
            J += r->cw[t * k + j] * (c->renormalize && S > 0 ? w[j] / S : w[j]) * scale;
    }
    if (c->z_loss_coef > 0)
        J += c->z_loss_coef * zsum / T;
    return J;
}

/* J from the library's float forward. */
static double lib_objective(moe_router *r, const float *x, const int32_t *tokens, int T,
                            bool training, moe_routing *rt, const double *cw, const double *cs)
{
    loom_err e;
    assert_int_equal(moe_router_forward(r, x, tokens, T, training, rt, &e), 0);
    double J = rt->z_loss;
    for (int a = 0; a < T * rt->k; a++)
        J += cw[a] * rt->weight[a];
    for (int a = 0; a < T * rt->E; a++)
        J += cs[a] * rt->scores[a];
    return J;
}

static bool same_selection(const moe_routing *rt, const int32_t *idx0, const float *pre0, int T)
{
    if (memcmp(rt->expert_idx, idx0, sizeof(int32_t) * (size_t)T * rt->k))
        return false;
    if (pre0)
        for (int a = 0; a < T * rt->E; a++)
            if ((rt->pre_relu[a] > 0) != (pre0[a] > 0))
                return false;
    return true;
}

/*
 * The whole check for one router configuration: builds the router with random parameters,
 * runs forward + backward, then both finite-difference checks over every x, W and b entry.
 */
static void check_router(moe_router_config *c, int T, uint64_t seed, bool training)
{
    loom_err e;
    loom_rng rng;
    rng_seed(&rng, seed);
    moe_router r;
    moe_routing rt;
    assert_int_equal(moe_router_init(&r, c, &e), 0);
    assert_int_equal(moe_routing_init(&rt, &r.cfg, T, &e), 0);
    c = &r.cfg;
    int d = c->d, E = c->n_experts, k = rt.k;
    float *x = malloc(sizeof(float) * T * d);
    for (int i = 0; i < T * d; i++)
        x[i] = rng_normal(&rng);
    if (r.w_gate)
        for (int i = 0; i < E * d; i++)
            r.w_gate[i] = 0.5f * rng_normal(&rng);
    if (r.b_gate)
        for (int i = 0; i < E; i++)
            r.b_gate[i] = (float)rng_uniform(&rng) * 0.8f;
    if (r.balance_bias)
        for (int i = 0; i < E; i++)
            r.balance_bias[i] = 0.05f * rng_normal(&rng);
    double *cw = malloc(sizeof(double) * T * k), *cs = malloc(sizeof(double) * T * E);
    float *cwf = malloc(sizeof(float) * T * k), *csf = malloc(sizeof(float) * T * E);
    for (int i = 0; i < T * k; i++)
        cwf[i] = (float)(cw[i] = rng_normal(&rng));
    for (int i = 0; i < T * E; i++)
        csf[i] = (float)(cs[i] = 0.5 * rng_normal(&rng));

    loom_rng rng0 = r.rng; /* the jitter stream: every forward below replays the same noise */
    lib_objective(&r, x, NULL, T, training, &rt, cw, cs);
    int32_t *idx0 = malloc(sizeof(int32_t) * T * k);
    memcpy(idx0, rt.expert_idx, sizeof(int32_t) * T * k);
    float *pre0 = NULL, *noise = NULL;
    if (c->gate_relu) {
        pre0 = malloc(sizeof(float) * T * E);
        memcpy(pre0, rt.pre_relu, sizeof(float) * T * E);
    }
    if (rt.jittered) {
        noise = malloc(sizeof(float) * T * d);
        memcpy(noise, rt.jitter_noise, sizeof(float) * T * d);
    }
    /* forward invariants: <= k experts, distinct, descending weights */
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            int ej = idx0[t * k + j];
            assert_true(ej >= -1 && ej < E);
            for (int i = 0; i < j; i++)
                assert_true(ej < 0 || idx0[t * k + i] != ej);
            if (j > 0 && ej >= 0)
                assert_true(rt.weight[t * k + j] <= rt.weight[t * k + j - 1]);
        }

    float *dx = calloc((size_t)T * d, sizeof(float));
    moe_router_zero_grad(&r);
    assert_int_equal(moe_router_backward(&r, x, &rt, cwf, csf, dx, &e), 0);

    /* parameters as one list of (float pointer, analytic gradient) */
    int n_par = T * d + (r.w_gate ? E * d : 0) + (r.b_gate ? E : 0);
    float **par = malloc(sizeof(float *) * n_par);
    double *grad = malloc(sizeof(double) * n_par);
    int p = 0;
    for (int i = 0; i < T * d; i++, p++)
        par[p] = &x[i], grad[p] = dx[i];
    if (r.w_gate)
        for (int i = 0; i < E * d; i++, p++)
            par[p] = &r.w_gate[i], grad[p] = r.grad_w_gate[i];
    if (r.b_gate)
        for (int i = 0; i < E; i++, p++)
            par[p] = &r.b_gate[i], grad[p] = r.grad_b_gate[i];

    /* The analytic gradient comes from a float forward: an element that is a sum of terms of
     * the gradient's typical size (d_x sums over experts) carries an absolute error of about
     * 1e-7 of that size, so elements below 1/100 of the RMS are measured against that. */
    double rms = 0.0;
    for (int q = 0; q < n_par; q++)
        rms += grad[q] * grad[q];
    rms = sqrt(rms / n_par);
    const double floor_d = 1e-2 * rms > 1e-9 ? 1e-2 * rms : 1e-9;

    /* float64 check */
    double *xd = malloc(sizeof(double) * T * d), *Wd = malloc(sizeof(double) * E * d);
    double *bd = malloc(sizeof(double) * E);
    int32_t *mask0 = malloc(sizeof(int32_t) * T * E), *mask = malloc(sizeof(int32_t) * T * E);
    ref_ctx ref = {c, T, k, idx0, noise, cw, cs, mask0};
    for (int i = 0; i < T * d; i++)
        xd[i] = x[i];
    for (int i = 0; i < E * d && r.w_gate; i++)
        Wd[i] = r.w_gate[i];
    for (int i = 0; i < E && r.b_gate; i++)
        bd[i] = r.b_gate[i];
    ref_objective(&ref, xd, Wd, r.b_gate ? bd : NULL); /* fills the base ReLU mask */
    ref.relu_mask = mask;
    double max_d = 0.0, max_f = 0.0;
    int skip_d = 0, skip_f = 0;
    const double hd = 1e-6;
    for (int q = 0; q < n_par; q++) {
        double *slot = q < T * d ? &xd[q]
                       : q < T * d + (r.w_gate ? E * d : 0)
                           ? &Wd[q - T * d]
                           : &bd[q - T * d - (r.w_gate ? E * d : 0)];
        double v = *slot;
        *slot = v + hd;
        double jp = ref_objective(&ref, xd, Wd, r.b_gate ? bd : NULL);
        bool ok = !c->gate_relu || !memcmp(mask, mask0, sizeof(int32_t) * T * E);
        *slot = v - hd;
        double jm = ref_objective(&ref, xd, Wd, r.b_gate ? bd : NULL);
        ok = ok && (!c->gate_relu || !memcmp(mask, mask0, sizeof(int32_t) * T * E));
        *slot = v;
        if (!ok) {
            skip_d++;
            continue;
        }
        double num = (jp - jm) / (2 * hd), err = rel_err(grad[q], num, floor_d);
        if (err > max_d)
            max_d = err;
        if (err > TOL_DOUBLE)
            printf("  double: param %d analytic %.9g numeric %.9g rel %.3g\n", q, grad[q], num,
                   err);
    }

    /* float check through the library's forward. Float rounding of J gives the differences an
     * absolute error of about eps |J| / h, so elements far below the gradient's typical size are
     * measured against a tenth of its RMS instead of their own size. */
    const double floor_f = 0.1 * rms > 1e-3 ? 0.1 * rms : 1e-3;
    const float hf = 1e-2f;
    for (int q = 0; q < n_par; q++) {
        /* a step that flips the selection is retried 5x smaller before the coordinate is
         * skipped */
        float v = *par[q], h = hf;
        double jp = 0, jm = 0;
        bool ok = false;
        for (int attempt = 0; attempt < 2 && !ok; attempt++, h *= 0.2f) {
            *par[q] = v + h;
            r.rng = rng0;
            jp = lib_objective(&r, x, NULL, T, training, &rt, cw, cs);
            ok = same_selection(&rt, idx0, pre0, T);
            *par[q] = v - h;
            r.rng = rng0;
            jm = lib_objective(&r, x, NULL, T, training, &rt, cw, cs);
            ok = ok && same_selection(&rt, idx0, pre0, T);
            *par[q] = v;
        }
        if (!ok) {
            skip_f++;
            continue;
        }
        h /= 0.2f;
        double num = (jp - jm) / (2.0 * h), err = rel_err(grad[q], num, floor_f);
        if (err > max_f)
            max_f = err;
        if (err > TOL_FLOAT)
            printf("  float: param %d analytic %.7g numeric %.7g rel %.3g\n", q, grad[q], num, err);
    }
    printf("%-14s k=%d renorm=%d score=%s relu=%d z=%g jitter=%g: %d params, max rel err "
           "double %.2e (skipped %d), float %.2e (skipped %d)\n",
           moe_router_kind_name(c->kind), k, c->renormalize,
           c->score == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax", c->gate_relu, c->z_loss_coef,
           training ? c->jitter : 0.0f, n_par, max_d, skip_d, max_f, skip_f);
    assert_true(max_d <= TOL_DOUBLE);
    assert_true(max_f <= TOL_FLOAT);
    assert_true(skip_d * 10 <= n_par && skip_f * 10 <= n_par);

    free(x);
    free(cw);
    free(cs);
    free(cwf);
    free(csf);
    free(idx0);
    free(pre0);
    free(noise);
    free(dx);
    free(par);
    free(grad);
    free(xd);
    free(Wd);
    free(bd);
    free(mask0);
    free(mask);
    moe_routing_free(&rt);
    moe_router_free(&r);
}

static void test_grad_switch(void **state)
{
    (void)state;
    moe_router_config c;
    moe_router_config_default(&c, MOE_ROUTER_TOPK, 16, 8);
    check_router(&c, 7, 11, false); /* Switch: k = 1, weight = p */
}

static void test_grad_gshard_zloss_jitter(void **state)
{
    (void)state;
    moe_router_config c;
    moe_router_config_default(&c, MOE_ROUTER_TOPK, 16, 8);
    c.k = 2;
    c.renormalize = true; /* Mixtral */
    check_router(&c, 7, 12, false);
    c.z_loss_coef = 0.01f;
    c.jitter = 0.1f;
    c.gate_bias = true;
    check_router(&c, 7, 13, true);
    c.renormalize = false; /* GShard without renormalisation, Qwen2-MoE norm_topk_prob=false */
    check_router(&c, 7, 14, true);
}

static void test_grad_locmoe(void **state)
{
    (void)state;
    moe_router_config c;
    moe_router_config_default(&c, MOE_ROUTER_LOCMOE, 16, 8);
    check_router(&c, 9, 21, false);
    c.z_loss_coef = 0.01f;
    check_router(&c, 9, 22, false);
    /* GrAP as the gate of a top-2 router, d not a multiple of E */
    moe_router_config g;
    moe_router_config_default(&g, MOE_ROUTER_TOPK, 19, 8);
    g.gate = MOE_GATE_GRAP;
    g.gate_bias = true;
    g.k = 2;
    g.renormalize = true;
    check_router(&g, 7, 23, false);
}

static void test_grad_group_limited(void **state)
{
    (void)state;
    moe_router_config c;
    moe_router_config_default(&c, MOE_ROUTER_GROUP_LIMITED, 16, 8);
    c.n_groups = 4;
    c.topk_groups = 2;
    c.route_scale = 2.5f; /* DeepSeek-V3 */
    check_router(&c, 8, 31, false);
    c.score = MOE_SCORE_SOFTMAX; /* DeepSeek-V2 */
    c.renormalize = false;
    c.route_scale = 1.0f;
    check_router(&c, 8, 32, false);
}

static void test_grad_expert_choice(void **state)
{
    (void)state;
    moe_router_config c;
    moe_router_config_default(&c, MOE_ROUTER_EXPERT_CHOICE, 16, 8);
    c.k = 2;
    check_router(&c, 8, 41, false);
}

static void test_hash_router(void **state)
{
    (void)state;
    loom_err e;
    moe_router_config c;
    moe_router_config_default(&c, MOE_ROUTER_HASH, 8, 4);
    c.vocab_size = 100;
    moe_router r;
    moe_routing rt;
    assert_int_equal(moe_router_init(&r, &c, &e), 0);
    assert_int_equal(moe_routing_init(&rt, &r.cfg, 200, &e), 0);
    int32_t tok[200];
    for (int t = 0; t < 200; t++)
        tok[t] = t; /* half in the table, half through the mixing hash */
    float x[200 * 8] = {0};
    assert_int_equal(moe_router_forward(&r, x, tok, 200, true, &rt, &e), 0);
    int count[4] = {0};
    for (int t = 0; t < 100; t++) {
        assert_true(rt.expert_idx[t] >= 0 && rt.expert_idx[t] < 4);
        assert_true(rt.weight[t] == 1.0f);
        count[rt.expert_idx[t]]++;
    }
    for (int i = 0; i < 4; i++)
        assert_int_equal(count[i], 25); /* balanced table */
    /* the same token always goes to the same expert */
    int32_t again[2] = {7, 7};
    moe_routing rt2;
    assert_int_equal(moe_routing_init(&rt2, &r.cfg, 2, &e), 0);
    assert_int_equal(moe_router_forward(&r, x, again, 2, false, &rt2, &e), 0);
    assert_int_equal(rt2.expert_idx[0], rt.expert_idx[7]);
    assert_int_equal(rt2.expert_idx[1], rt.expert_idx[7]);
    /* no parameters, no gradient */
    float dx[200 * 8] = {0}, dw[200];
    for (int i = 0; i < 200; i++)
        dw[i] = 1.0f;
    assert_int_equal(moe_router_backward(&r, x, &rt, dw, NULL, dx, &e), 0);
    for (int i = 0; i < 200 * 8; i++)
        assert_true(dx[i] == 0.0f);
    /* frequency-balanced table: the masses end up within the largest single frequency */
    int64_t freq[100];
    for (int v = 0; v < 100; v++)
        freq[v] = 1000 / (v + 1);
    int32_t table[100];
    moe_hash_table_build(table, 100, 4, freq, 5);
    int64_t mass[4] = {0};
    for (int v = 0; v < 100; v++)
        mass[table[v]] += freq[v];
    int64_t lo = mass[0], hi = mass[0];
    for (int i = 1; i < 4; i++)
        lo = mass[i] < lo ? mass[i] : lo, hi = mass[i] > hi ? mass[i] : hi;
    assert_true(hi - lo <= freq[0]);
    moe_routing_free(&rt);
    moe_routing_free(&rt2);
    moe_router_free(&r);
}

/* Aux-loss-free bias: overloaded experts get their bias lowered, and routing drifts to balance. */
static void test_balance_bias(void **state)
{
    (void)state;
    loom_err e;
    moe_router_config c;
    moe_router_config_default(&c, MOE_ROUTER_GROUP_LIMITED, 16, 8);
    c.n_groups = 2;
    c.topk_groups = 2;
    c.bias_rate = 0.01f;
    moe_router r;
    moe_routing rt;
    assert_int_equal(moe_router_init(&r, &c, &e), 0);
    int T = 256;
    assert_int_equal(moe_routing_init(&rt, &r.cfg, T, &e), 0);
    for (int i = 0; i < 16; i++)
        r.w_gate[i] += 1.0f; /* expert 0 is everyone's favourite */
    loom_rng rng;
    rng_seed(&rng, 3);
    float *x = malloc(sizeof(float) * T * 16);
    for (int i = 0; i < T * 16; i++)
        x[i] = rng_normal(&rng) + 0.5f;
    double cv_first = 0, cv_last = 0;
    for (int step = 0; step < 300; step++) {
        assert_int_equal(moe_router_forward(&r, x, NULL, T, true, &rt, &e), 0);
        int32_t load[8] = {0};
        for (int a = 0; a < T * rt.k; a++)
            load[rt.expert_idx[a]]++;
        double m = (double)T * rt.k / 8, v = 0;
        for (int i = 0; i < 8; i++)
            v += (load[i] - m) * (load[i] - m);
        double cv = sqrt(v / 8) / m;
        if (step == 0)
            cv_first = cv;
        cv_last = cv;
        moe_router_update_balance_bias(&r, load);
    }
    printf("aux-loss-free bias: load cv %.3f -> %.3f after 300 updates\n", cv_first, cv_last);
    assert_true(cv_last < 0.5 * cv_first);
    free(x);
    moe_routing_free(&rt);
    moe_router_free(&r);
}

/* ------------------------------------------------------------ losses */

static double ref_aux(const double *s, const int32_t *idx, int T, int E, int k, double alpha)
{
    double L = 0.0;
    for (int i = 0; i < E; i++) {
        double f = 0.0, P = 0.0;
        for (int a = 0; a < T * k; a++)
            f += idx[a] == i;
        for (int t = 0; t < T; t++)
            P += s[t * E + i];
        L += (f / (T * k)) * (P / T);
    }
    return alpha * E * L;
}

/* L_loc written out from its definition (moe.h), node of expert i and of token t given. */
static double ref_loc(const double *s, int T, int E, const int *tok_node, const int *exp_node,
                      int N, double mu, double fl)
{
    double L = 0.0;
    for (int g = 0; g < N; g++) {
        int Tg = 0, Lg = 0;
        for (int t = 0; t < T; t++)
            Tg += tok_node[t] == g;
        for (int i = 0; i < E; i++)
            Lg += exp_node[i] == g;
        if (!Tg || !Lg)
            continue;
        for (int i = 0; i < E; i++) {
            double dc = 0.0;
            for (int t = 0; t < T; t++)
                if (tok_node[t] == g)
                    dc += s[t * E + i];
            dc /= Tg;
            double dl = (exp_node[i] == g ? (1.0 - fl) / Lg : 0.0) + fl / E;
            if (dc > 0)
                L += dc * log(dc / dl);
        }
    }
    return mu * L;
}

static void random_probs(loom_rng *rng, float *s, int T, int E)
{
    for (int t = 0; t < T; t++) {
        double z = 0.0;
        for (int i = 0; i < E; i++)
            z += (s[t * E + i] = expf(rng_normal(rng)));
        for (int i = 0; i < E; i++)
            s[t * E + i] = (float)(s[t * E + i] / z);
    }
}

static void test_grad_losses(void **state)
{
    (void)state;
    loom_err e;
    loom_rng rng;
    rng_seed(&rng, 77);
    enum { T = 12, E = 8, K = 2 };
    float s[T * E];
    random_probs(&rng, s, T, E);
    int32_t idx[T * K];
    for (int t = 0; t < T; t++) {
        idx[t * K] = (int32_t)(rng_next(&rng) % E);
        idx[t * K + 1] = (idx[t * K] + 1 + (int32_t)(rng_next(&rng) % (E - 1))) % E;
    }
    moe_topology topo;
    assert_int_equal(moe_topology_init(&topo, 3, 2, E, moe_link_profile_find("h100-ndr"), &e), 0);
    int32_t tok_rank[T];
    int tok_node[T], exp_node[E];
    for (int t = 0; t < T; t++) {
        tok_rank[t] = (int32_t)(rng_next(&rng) % 6);
        tok_node[t] = tok_rank[t] / 2;
    }
    for (int i = 0; i < E; i++)
        exp_node[i] = topo.expert_rank[i] / 2;
    const double alpha = 0.01, mu = 0.3, fl = 1e-3;

    float ga[T * E] = {0}, gl[T * E] = {0};
    double La = moe_aux_loss(s, idx, T, E, K, alpha, ga);
    double Ll = moe_locality_loss(s, T, E, &topo, tok_rank, mu, fl, gl);
    double sd[T * E];
    for (int i = 0; i < T * E; i++)
        sd[i] = s[i];
    assert_true(rel_err(La, ref_aux(sd, idx, T, E, K, alpha), 1e-12) < 1e-6);
    assert_true(rel_err(Ll, ref_loc(sd, T, E, tok_node, exp_node, 3, mu, fl), 1e-12) < 1e-6);
    printf("L_aux = %.6f, L_loc = %.6f\n", La, Ll);

    double max_ad = 0, max_ld = 0, max_af = 0, max_lf = 0;
    for (int q = 0; q < T * E; q++) {
        double v = sd[q], h = 1e-6;
        sd[q] = v + h;
        double ap = ref_aux(sd, idx, T, E, K, alpha),
               lp = ref_loc(sd, T, E, tok_node, exp_node, 3, mu, fl);
        sd[q] = v - h;
        double am = ref_aux(sd, idx, T, E, K, alpha),
               lm = ref_loc(sd, T, E, tok_node, exp_node, 3, mu, fl);
        sd[q] = v;
        double ea = rel_err(ga[q], (ap - am) / (2 * h), 1e-6);
        double el = rel_err(gl[q], (lp - lm) / (2 * h), 1e-6);
        max_ad = ea > max_ad ? ea : max_ad;
        max_ld = el > max_ld ? el : max_ld;
        /* float: the library function itself, perturbed in float */
        float sv = s[q], hf = 1e-3f;
        s[q] = sv + hf;
        double apf = moe_aux_loss(s, idx, T, E, K, alpha, NULL);
        double lpf = moe_locality_loss(s, T, E, &topo, tok_rank, mu, fl, NULL);
        s[q] = sv - hf;
        double amf = moe_aux_loss(s, idx, T, E, K, alpha, NULL);
        double lmf = moe_locality_loss(s, T, E, &topo, tok_rank, mu, fl, NULL);
        s[q] = sv;
        ea = rel_err(ga[q], (apf - amf) / (2 * hf), 1e-3);
        el = rel_err(gl[q], (lpf - lmf) / (2 * hf), 1e-3);
        max_af = ea > max_af ? ea : max_af;
        max_lf = el > max_lf ? el : max_lf;
    }
    printf("L_aux grad max rel err: double %.2e, float %.2e\n", max_ad, max_af);
    printf("L_loc grad max rel err: double %.2e, float %.2e\n", max_ld, max_lf);
    assert_true(max_ad <= TOL_DOUBLE && max_ld <= TOL_DOUBLE);
    assert_true(max_af <= TOL_FLOAT && max_lf <= TOL_FLOAT);

    /* z-loss against its definition */
    float lg[T * E], gz[T * E] = {0};
    for (int i = 0; i < T * E; i++)
        lg[i] = 2.0f * rng_normal(&rng);
    moe_z_loss(lg, T, E, 0.01, gz);
    double max_z = 0;
    for (int q = 0; q < T * E; q++) {
        float v = lg[q];
        lg[q] = v + 1e-2f;
        double zp = moe_z_loss(lg, T, E, 0.01, NULL);
        lg[q] = v - 1e-2f;
        double zm = moe_z_loss(lg, T, E, 0.01, NULL);
        lg[q] = v;
        double ez = rel_err(gz[q], (zp - zm) / 2e-2, 1e-4);
        max_z = ez > max_z ? ez : max_z;
    }
    printf("z-loss grad max rel err (float) %.2e\n", max_z);
    assert_true(max_z <= TOL_FLOAT);

    /* balanced routing reaches the minimum alpha; a fully local routing has L_loc ~ 0 */
    float u[4 * 4];
    int32_t id[4];
    for (int t = 0; t < 4; t++) {
        for (int i = 0; i < 4; i++)
            u[t * 4 + i] = 0.25f;
        id[t] = t;
    }
    assert_true(fabs(moe_aux_loss(u, id, 4, 4, 1, alpha, NULL) - alpha) < 1e-9);
    moe_topology t4;
    assert_int_equal(moe_topology_init(&t4, 2, 2, 4, NULL, &e), 0);
    int32_t tr[4] = {0, 1, 2, 3};
    float loc[16] = {0.5f, 0.5f, 0, 0, 0.5f, 0.5f, 0, 0, 0, 0, 0.5f, 0.5f, 0, 0, 0.5f, 0.5f};
    double l0 = moe_locality_loss(loc, 4, 4, &t4, tr, 1.0, 1e-6, NULL);
    double l1 = moe_locality_loss(u, 4, 4, &t4, tr, 1.0, 1e-6, NULL);
    /* uniform: per node, half the mass on the 2 local experts (target ~1/2 each), half on the 2
     * remote ones (target floor/E each) */
    double on = (1 - 1e-6) / 2 + 1e-6 / 4, off = 1e-6 / 4;
    double want = 2 * (2 * 0.25 * log(0.25 / on) + 2 * 0.25 * log(0.25 / off));
    printf("L_loc fully local %.3g, uniform %.4f (expected %.4f)\n", l0, l1, want);
    assert_true(fabs(l0) < 1e-5);
    assert_true(fabs(l1 - want) < 1e-4 * want);
    moe_topology_free(&t4);
    moe_topology_free(&topo);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grad_switch),        cmocka_unit_test(test_grad_gshard_zloss_jitter),
        cmocka_unit_test(test_grad_locmoe),        cmocka_unit_test(test_grad_group_limited),
        cmocka_unit_test(test_grad_expert_choice), cmocka_unit_test(test_hash_router),
        cmocka_unit_test(test_balance_bias),       cmocka_unit_test(test_grad_losses),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
