/*
 * Least squares: perf_lstsq against exact and noisy systems, and perf_fit recovering known
 * latency coefficients from noisy synthetic samples (the "lightweight profiling" of the paper:
 * a few dozen timed batches).
 */
#include "testlib.h"

#include "loom/model.h"
#include "loom/perf.h"

static void test_lstsq_exact(void **state)
{
    (void)state;
    /* y = 3 + 2 x1 - 0.5 x2 on 6 points, columns of very different scales */
    double A[6 * 3], y[6], x[3], rss;
    double x1[6] = {1e-4, 2e-4, 5e-4, 1e-3, 3e-3, 7e-3}, x2[6] = {10, 3, 7, 1, 9, 4};
    for (int i = 0; i < 6; i++) {
        A[i * 3 + 0] = 1;
        A[i * 3 + 1] = x1[i];
        A[i * 3 + 2] = x2[i];
        y[i] = 3 + 2 * x1[i] - 0.5 * x2[i];
    }
    loom_err e;
    assert_int_equal(perf_lstsq(A, y, 6, 3, x, &rss, &e), LOOM_OK);
    assert_true(fabs(x[0] - 3) < 1e-9);
    assert_true(fabs(x[1] - 2) < 1e-6);
    assert_true(fabs(x[2] + 0.5) < 1e-9);
    assert_true(rss < 1e-18);
}

static void test_lstsq_overdetermined(void **state)
{
    (void)state;
    /* the mean is the least-squares constant; the residual is the sum of squared deviations */
    double A[5] = {1, 1, 1, 1, 1}, y[5] = {1, 2, 3, 4, 10}, x, rss;
    loom_err e;
    assert_int_equal(perf_lstsq(A, y, 5, 1, &x, &rss, &e), LOOM_OK);
    assert_true(fabs(x - 4) < 1e-12);
    assert_true(fabs(rss - (9 + 4 + 1 + 0 + 36)) < 1e-9);
    /* a straight line through noisy points equals the closed form */
    double B[8 * 2], z[8], ab[2];
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (int i = 0; i < 8; i++) {
        double xi = i * 0.7, yi = 1.5 * xi - 2 + ((i * 37) % 11 - 5) * 0.01;
        B[i * 2] = 1;
        B[i * 2 + 1] = xi;
        z[i] = yi;
        sx += xi, sy += yi, sxx += xi * xi, sxy += xi * yi;
    }
    assert_int_equal(perf_lstsq(B, z, 8, 2, ab, NULL, &e), LOOM_OK);
    double slope = (8 * sxy - sx * sy) / (8 * sxx - sx * sx), icept = (sy - slope * sx) / 8;
    assert_true(fabs(ab[1] - slope) < 1e-10 && fabs(ab[0] - icept) < 1e-10);
}

static void test_lstsq_rank_deficient(void **state)
{
    (void)state;
    double A[4 * 2] = {1, 2, 2, 4, 3, 6, 4, 8}, y[4] = {1, 2, 3, 4}, x[2];
    loom_err e;
    assert_int_equal(perf_lstsq(A, y, 4, 2, x, NULL, &e), LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "depends"));
    assert_int_equal(perf_lstsq(A, y, 1, 2, x, NULL, &e), LOOM_EINVAL); /* n < p */
}

static perf_device fit_device(void)
{
    perf_device d;
    memset(&d, 0, sizeof(d));
    snprintf(d.name, sizeof(d.name), "FIT");
    d.mem_bytes = 80.0 * 1073741824.0;
    d.flops = 3e14;
    d.mem_bw = 1.5e12;
    d.link_bw = 1e11;
    d.link_latency = 5e-6;
    d.runtime_overhead = 1073741824.0;
    d.weight_bytes = 2;
    perf_coef_default(&d.coef);
    return d;
}

/* The lightweight profiling grid of `loom profile`, timed by a "device" that follows the
 * model with the true coefficients, times (1 + noise). */
static int make_samples(const perf_model *pm, const perf_device *dev, int tp,
                        const perf_coef *truth, double noise, uint64_t seed, perf_sample *out)
{
    loom_rng rng;
    rng_seed(&rng, seed);
    perf_step grid[64];
    int n = perf_profile_grid(2048, 2048, 256, 4096, grid, 64);
    assert_true(n >= 20 && n <= 64);
    for (int i = 0; i < n; i++) {
        perf_step_terms(pm, dev, tp, &grid[i], &out[i].terms);
        out[i].seconds = perf_coef_apply(truth, &out[i].terms) * (1 + noise * rng_normal(&rng));
    }
    return n;
}

static bool coef_close(const perf_coef *a, const perf_coef *b, double tol)
{
    return fabs(a->overhead / b->overhead - 1) < tol &&
           fabs(a->compute_prefill / b->compute_prefill - 1) < tol &&
           fabs(a->compute_decode / b->compute_decode - 1) < tol &&
           fabs(a->memory / b->memory - 1) < tol &&
           (b->comm == 0 || fabs(a->comm / b->comm - 1) < tol);
}

static void test_fit_profiling_grid(void **state)
{
    (void)state;
    loom_err e;
    model_config c;
    assert_int_equal(model_config_preset("llama-1b", &c, &e), LOOM_OK);
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &c, "llama-1b", 2, 2, &e), LOOM_OK);
    perf_device dev = fit_device();
    perf_coef truth = {.overhead = 3e-3,
                       .compute_prefill = 1.7,
                       .compute_decode = 2.6,
                       .memory = 1.3,
                       .comm = 2.1};
    perf_coef prior;
    perf_coef_default(&prior);
    perf_sample smp[64];
    perf_coef got;
    double err;

    /* exact samples at tp 1: every coefficient but comm comes back exactly, comm keeps the
     * prior (no sample exercises the link) */
    int n = make_samples(&pm, &dev, 1, &truth, 0, 1, smp);
    assert_int_equal(perf_fit(smp, n, &prior, &got, &err, &e), LOOM_OK);
    perf_coef want = truth;
    want.comm = prior.comm;
    if (!coef_close(&got, &want, 1e-6) || got.comm != prior.comm || err > 1e-9)
        fail_msg("tp1: overhead %.6g cp %.6g cd %.6g mem %.6g comm %.6g err %.3g", got.overhead,
                 got.compute_prefill, got.compute_decode, got.memory, got.comm, err);
    /* exact samples at tp 2: the predictions are exact (some terms are collinear there: both
     * the all-reduce and the FLOPs grow with the tokens, so one may keep its prior) */
    n = make_samples(&pm, &dev, 2, &truth, 0, 1, smp);
    assert_int_equal(perf_fit(smp, n, &prior, &got, &err, &e), LOOM_OK);
    assert_true(err < 1e-9);

    /* 2% noise, 10 seeds: every sample's prediction within 5% of the noiseless truth, the
     * fit's error matches the noise, and at tp 1 the dominant coefficients (prompt compute,
     * memory) come back within 10% */
    for (uint64_t seed = 1; seed <= 10; seed++) {
        for (int tp = 1; tp <= 2; tp++) {
            n = make_samples(&pm, &dev, tp, &truth, 0.02, seed, smp);
            assert_int_equal(perf_fit(smp, n, &prior, &got, &err, &e), LOOM_OK);
            if (err > 0.035 || err < 0.008)
                fail_msg("seed %llu tp %d: rel rms %.4f", (unsigned long long)seed, tp, err);
            for (int i = 0; i < n; i++) {
                double t = perf_coef_apply(&truth, &smp[i].terms);
                if (fabs(perf_coef_apply(&got, &smp[i].terms) / t - 1) > 0.05)
                    fail_msg("seed %llu tp %d sample %d off by more than 5%%",
                             (unsigned long long)seed, tp, i);
            }
            if (tp == 1 && (fabs(got.compute_prefill / truth.compute_prefill - 1) > 0.1 ||
                            fabs(got.memory / truth.memory - 1) > 0.1))
                fail_msg("seed %llu: compute_prefill %.3f memory %.3f", (unsigned long long)seed,
                         got.compute_prefill, got.memory);
        }
    }
}

/* Samples whose terms vary independently (log-uniform over two decades): every coefficient is
 * identifiable, and 2% noise on 50 samples must give each back within 5% (overhead 10%). */
static void test_fit_recovers_known_coefficients(void **state)
{
    (void)state;
    perf_coef truth = {.overhead = 2.5e-3,
                       .compute_prefill = 1.8,
                       .compute_decode = 2.4,
                       .memory = 1.3,
                       .comm = 2.2};
    perf_coef prior = {
        .overhead = 1e-2, .compute_prefill = 1, .compute_decode = 1, .memory = 1, .comm = 1};
    for (uint64_t seed = 1; seed <= 20; seed++) {
        loom_rng rng;
        rng_seed(&rng, seed);
        perf_sample s[50];
        memset(s, 0, sizeof(s));
        for (int i = 0; i < 50; i++) {
            s[i].terms.t_compute_prefill = 1e-4 * pow(100, rng_uniform(&rng));
            s[i].terms.t_compute_decode = 1e-4 * pow(100, rng_uniform(&rng));
            s[i].terms.t_memory = 1e-4 * pow(100, rng_uniform(&rng));
            s[i].terms.t_comm = 1e-4 * pow(100, rng_uniform(&rng));
            s[i].seconds = perf_coef_apply(&truth, &s[i].terms) * (1 + 0.02 * rng_normal(&rng));
        }
        perf_coef got;
        double err;
        loom_err e;
        assert_int_equal(perf_fit(s, 50, &prior, &got, &err, &e), LOOM_OK);
        perf_coef loose = got;
        loose.overhead = truth.overhead; /* checked at 10% below */
        if (!coef_close(&loose, &truth, 0.05) || fabs(got.overhead / truth.overhead - 1) > 0.1 ||
            err > 0.03)
            fail_msg("seed %llu: overhead %.5f cp %.3f cd %.3f memory %.3f comm %.3f rms %.4f",
                     (unsigned long long)seed, got.overhead, got.compute_prefill,
                     got.compute_decode, got.memory, got.comm, err);
    }
}

static void test_fit_clamps_negative(void **state)
{
    (void)state;
    /* times that fall with compute would need a negative compute coefficient: it is clamped to
     * 0 and the rest refitted */
    perf_sample s[8];
    memset(s, 0, sizeof(s));
    for (int i = 0; i < 8; i++) {
        s[i].terms.t_compute_prefill = 1e-3 * (i + 1);
        s[i].terms.t_memory = 1e-3 * ((i * 5) % 8 + 1);
        s[i].seconds = 1e-3 + s[i].terms.t_memory - 0.2 * s[i].terms.t_compute_prefill + 1e-2;
    }
    perf_coef prior, got;
    perf_coef_default(&prior);
    loom_err e;
    assert_int_equal(perf_fit(s, 8, &prior, &got, NULL, &e), LOOM_OK);
    assert_true(got.compute_prefill == 0);
    assert_true(got.memory > 0 && got.overhead > 0);
    assert_true(got.compute_decode == prior.compute_decode); /* never exercised */
    /* bad samples */
    s[2].seconds = 0;
    assert_int_equal(perf_fit(s, 8, &prior, &got, NULL, &e), LOOM_EINVAL);
}

static void test_profile_grid(void **state)
{
    (void)state;
    perf_step g[64];
    int n = perf_profile_grid(2048, 2048, 256, 4096, g, 64);
    assert_int_equal(n, 24); /* 9 prompt steps, 5 batches x 3 contexts */
    int pre = 0, dec = 0;
    for (int i = 0; i < n; i++) {
        assert_true(perf_step_tokens(&g[i]) <= 2048 && g[i].decode_seqs <= 256);
        pre += g[i].prefill_tokens > 0;
        dec += g[i].decode_seqs > 0;
        assert_true((g[i].prefill_tokens > 0) != (g[i].decode_seqs > 0));
    }
    assert_int_equal(pre, 9);
    assert_int_equal(dec, 15);
    /* tiny limits still give both kinds, within the limits */
    n = perf_profile_grid(100, 64, 3, 50, g, 64);
    assert_int_equal(n, 4);
    for (int i = 0; i < n; i++)
        assert_true(perf_step_tokens(&g[i]) <= 64 && g[i].decode_seqs <= 3);
    assert_true(g[3].decode_seqs == 3 && g[3].decode_ctx == 150);
    /* cap: the count of the full grid, only cap written */
    assert_int_equal(perf_profile_grid(2048, 2048, 256, 4096, g, 2), 24);
}

static void test_profile_roundtrip(void **state)
{
    (void)state;
    perf_profile p;
    memset(&p, 0, sizeof(p));
    snprintf(p.device, sizeof(p.device), "H100-80G");
    p.tp = 2;
    snprintf(p.model, sizeof(p.model), "llama \"1b\"");
    p.n_samples = 33;
    p.coef = (perf_coef){0.00213, 1.6180339887, 2.0, 1.3333333333333333, 1.75};
    p.rel_rms = 0.0123456789;
    loom_buf b;
    buf_init(&b);
    perf_profile_write(&p, &b);
    perf_profile q;
    loom_err e;
    if (perf_profile_parse(b.data, b.len, &q, &e) != LOOM_OK)
        fail_msg("%s\n%s", e.msg, b.data);
    assert_string_equal(q.device, p.device);
    assert_string_equal(q.model, p.model);
    assert_int_equal(q.tp, 2);
    assert_int_equal(q.n_samples, 33);
    assert_memory_equal(&q.coef, &p.coef, sizeof(perf_coef));
    assert_true(q.rel_rms == p.rel_rms);
    buf_free(&b);
    /* malformed: line numbers */
    const char *bad = "device: X\ntp: 2\ncoefficients: {memory: -1}\n";
    assert_int_equal(perf_profile_parse(bad, strlen(bad), &q, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, ":3:"));
    const char *missing = "device: X\ntp: 2\n";
    assert_int_equal(perf_profile_parse(missing, strlen(missing), &q, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "coefficients"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lstsq_exact),
        cmocka_unit_test(test_lstsq_overdetermined),
        cmocka_unit_test(test_lstsq_rank_deficient),
        cmocka_unit_test(test_fit_profiling_grid),
        cmocka_unit_test(test_fit_recovers_known_coefficients),
        cmocka_unit_test(test_fit_clamps_negative),
        cmocka_unit_test(test_profile_grid),
        cmocka_unit_test(test_profile_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
