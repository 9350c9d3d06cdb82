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
           (b->comm == 0 || fabs(a->comm / b->comm - 1) < tol) &&
           (b->attention == 0 || fabs(a->attention / b->attention - 1) < tol) &&
           (b->host_token == 0 || fabs(a->host_token / b->host_token - 1) < tol);
}

/* Seconds one more cached position adds to a decode step of 16 sequences. */
static double ctx_slope(const perf_model *pm, const perf_device *dev, const perf_coef *c)
{
    perf_step a, b;
    perf_terms ta, tb;
    perf_step_decode(&a, 16, 16 * 256);
    perf_step_decode(&b, 16, 16 * 1024);
    perf_step_terms(pm, dev, 1, &a, &ta);
    perf_step_terms(pm, dev, 1, &b, &tb);
    return (perf_coef_apply(c, &tb) - perf_coef_apply(c, &ta)) / (16 * 768);
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
                       .comm = 2.1,
                       .attention = 5.5,
                       .host_token = 4e-5};
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
        fail_msg("tp1: overhead %.6g cp %.6g cd %.6g mem %.6g comm %.6g attn %.6g host %.6g "
                 "err %.3g",
                 got.overhead, got.compute_prefill, got.compute_decode, got.memory, got.comm,
                 got.attention, got.host_token, err);
    /* exact samples at tp 2: the predictions are exact (some terms are collinear there: both
     * the all-reduce and the FLOPs grow with the tokens, so one may keep its prior) */
    n = make_samples(&pm, &dev, 2, &truth, 0, 1, smp);
    assert_int_equal(perf_fit(smp, n, &prior, &got, &err, &e), LOOM_OK);
    if (err > 1e-9)
        fail_msg("tp2: overhead %.6g cp %.6g cd %.6g mem %.6g comm %.6g attn %.6g host %.6g "
                 "err %.3g",
                 got.overhead, got.compute_prefill, got.compute_decode, got.memory, got.comm,
                 got.attention, got.host_token, err);

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
            /* what the grid identifies at tp 1: prompt compute (the quadratic attention pins
             * it) and the cost of one more cached position in a decode step, KV read plus
             * attention FLOPs (the two grow together with the context; on a GPU the
             * attention FLOPs are a few percent of it, so the split is not identifiable) */
            if (tp == 1 && (fabs(got.compute_prefill / truth.compute_prefill - 1) > 0.1 ||
                            fabs(ctx_slope(&pm, &dev, &got) / ctx_slope(&pm, &dev, &truth) - 1) >
                                0.1))
                fail_msg("seed %llu: compute_prefill %.3f memory %.3f attention %.3f",
                         (unsigned long long)seed, got.compute_prefill, got.memory,
                         got.attention);
        }
    }
}

/* Samples whose terms vary independently (log-uniform over two decades): every coefficient is
 * identifiable, and 2% noise on 300 samples must give each back within 5% (the two small terms,
 * overhead and host time per token, 10%). */
static void test_fit_recovers_known_coefficients(void **state)
{
    (void)state;
    perf_coef truth = {.overhead = 2.5e-3,
                       .compute_prefill = 1.8,
                       .compute_decode = 2.4,
                       .memory = 1.3,
                       .comm = 2.2,
                       .attention = 6.0,
                       .host_token = 1e-4};
    perf_coef prior = {.overhead = 1e-2,
                       .compute_prefill = 1,
                       .compute_decode = 1,
                       .memory = 1,
                       .comm = 1,
                       .attention = 1,
                       .host_token = 0};
    for (uint64_t seed = 1; seed <= 20; seed++) {
        loom_rng rng;
        rng_seed(&rng, seed);
        perf_sample s[300];
        memset(s, 0, sizeof(s));
        for (int i = 0; i < 300; i++) {
            s[i].terms.t_compute_prefill = 1e-4 * pow(100, rng_uniform(&rng));
            s[i].terms.t_compute_decode = 1e-4 * pow(100, rng_uniform(&rng));
            s[i].terms.t_memory = 1e-4 * pow(100, rng_uniform(&rng));
            s[i].terms.t_comm = 1e-4 * pow(100, rng_uniform(&rng));
            s[i].terms.t_attention = 1e-4 * pow(100, rng_uniform(&rng));
            s[i].terms.sampled = pow(100, rng_uniform(&rng)); /* 1..100 tokens */
            s[i].seconds = perf_coef_apply(&truth, &s[i].terms) * (1 + 0.02 * rng_normal(&rng));
        }
        perf_coef got;
        double err;
        loom_err e;
        assert_int_equal(perf_fit(s, 300, &prior, &got, &err, &e), LOOM_OK);
        perf_coef loose = got;
        loose.overhead = truth.overhead; /* the two small terms are checked at 10% below */
        loose.host_token = truth.host_token;
        if (!coef_close(&loose, &truth, 0.05) || fabs(got.overhead / truth.overhead - 1) > 0.1 ||
            fabs(got.host_token / truth.host_token - 1) > 0.1 ||
            err > 0.03)
            fail_msg("seed %llu: overhead %.5f cp %.3f cd %.3f memory %.3f comm %.3f attn %.3f "
                     "host %.3g rms %.4f",
                     (unsigned long long)seed, got.overhead, got.compute_prefill,
                     got.compute_decode, got.memory, got.comm, got.attention, got.host_token,
                     err);
    }
}

/*
 * A CPU-like device (llama-125m in F32 on one core: 100 GFLOP/s, 12 GB/s): decode attention is
 * dot products over the cache, far slower per FLOP than the matmuls, so decode steps grow with
 * the context much faster than the KV bytes. Timed with attention 8x the decode matmuls'
 * coefficient and a host cost per sampled token, the profiling grid must give back the cost of
 * a cached position (10% under 2% noise: KV bytes and attention FLOPs both grow with the
 * context, so the grid pins their sum, not the split) and predict steps within 5%; the form
 * without the attention term (decode attention at the decode tokens' efficiency) cannot fit it.
 */
static void test_fit_cpu_attention(void **state)
{
    (void)state;
    loom_err e;
    model_config c;
    assert_int_equal(model_config_preset("llama-125m", &c, &e), LOOM_OK);
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &c, "llama-125m", 4, 4, &e), LOOM_OK);
    perf_device dev = fit_device();
    dev.flops = 1e11;
    dev.mem_bw = 1.2e10;
    dev.weight_bytes = 4;
    dev.pooled = true;
    perf_coef truth = {.overhead = 1e-3,
                       .compute_prefill = 1.3,
                       .compute_decode = 2.0,
                       .memory = 1.1,
                       .comm = 1,
                       .attention = 16.0,
                       .host_token = 2e-4};
    perf_coef prior;
    perf_coef_default(&prior);
    perf_step grid[64];
    int n = perf_profile_grid(512, 2048, 32, 1024, grid, 64);
    perf_sample smp[64], folded[64];
    for (uint64_t seed = 1; seed <= 10; seed++) {
        loom_rng rng;
        rng_seed(&rng, seed);
        for (int i = 0; i < n; i++) {
            perf_step_terms(&pm, &dev, 1, &grid[i], &smp[i].terms);
            smp[i].seconds =
                perf_coef_apply(&truth, &smp[i].terms) * (1 + 0.02 * rng_normal(&rng));
            folded[i] = smp[i];
            folded[i].terms.t_compute_decode += folded[i].terms.t_attention;
            folded[i].terms.t_attention = 0;
            folded[i].terms.sampled = 0;
        }
        perf_coef got, old;
        double err, old_err;
        assert_int_equal(perf_fit(smp, n, &prior, &got, &err, &e), LOOM_OK);
        assert_int_equal(perf_fit(folded, n, &prior, &old, &old_err, &e), LOOM_OK);
        double slope = ctx_slope(&pm, &dev, &got), want = ctx_slope(&pm, &dev, &truth);
        if (fabs(slope / want - 1) > 0.1 || err > 0.035 || old_err < 2 * err)
            fail_msg("seed %llu: %.3g s per cached position (truth %.3g), attention %.3f, "
                     "error %.4f, without the term %.4f",
                     (unsigned long long)seed, slope, want, got.attention, err, old_err);
        /* a decode step at batch 16 and 160 cached tokens, and a 2 x 128 prompt step */
        perf_step st;
        perf_terms t;
        perf_step_decode(&st, 16, 16 * 160);
        perf_step_terms(&pm, &dev, 1, &st, &t);
        assert_true(fabs(perf_coef_apply(&got, &t) / perf_coef_apply(&truth, &t) - 1) < 0.05);
        perf_step_prefill(&st, 256, 128, 128 * 128);
        perf_step_terms(&pm, &dev, 1, &st, &t);
        assert_true(fabs(perf_coef_apply(&got, &t) / perf_coef_apply(&truth, &t) - 1) < 0.05);
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
    assert_true(got.attention == prior.attention && got.host_token == prior.host_token);
    /* bad samples */
    s[2].seconds = 0;
    assert_int_equal(perf_fit(s, 8, &prior, &got, NULL, &e), LOOM_EINVAL);
}

static void test_profile_grid(void **state)
{
    (void)state;
    perf_step g[64];
    int n = perf_profile_grid(2048, 2048, 256, 4096, g, 64);
    assert_int_equal(n, 29); /* 9 prompt steps, 5 batches x 4 contexts */
    int pre = 0, dec = 0;
    for (int i = 0; i < n; i++) {
        assert_true(perf_step_tokens(&g[i]) <= 2048 && g[i].decode_seqs <= 256);
        pre += g[i].prefill_tokens > 0;
        dec += g[i].decode_seqs > 0;
        assert_true((g[i].prefill_tokens > 0) != (g[i].decode_seqs > 0));
    }
    assert_int_equal(pre, 9);
    assert_int_equal(dec, 20);
    /* the decode contexts are max_context and its quarters: 64, 256, 1024, 4096 */
    double seen[4] = {64, 256, 1024, 4096};
    for (int k = 0; k < 4; k++) {
        bool found = false;
        for (int i = 0; i < n; i++)
            found |= g[i].decode_seqs == 1 && g[i].decode_ctx == seen[k];
        assert_true(found);
    }
    /* tiny limits still give both kinds, within the limits: contexts 12 and 50 */
    n = perf_profile_grid(100, 64, 3, 50, g, 64);
    assert_int_equal(n, 6);
    for (int i = 0; i < n; i++)
        assert_true(perf_step_tokens(&g[i]) <= 64 && g[i].decode_seqs <= 3);
    assert_true(g[5].decode_seqs == 3 && g[5].decode_ctx == 150);
    assert_true(g[2].decode_seqs == 1 && g[2].decode_ctx == 12);
    /* cap: the count of the full grid, only cap written */
    assert_int_equal(perf_profile_grid(2048, 2048, 256, 4096, g, 2), 29);
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
    p.coef = (perf_coef){0.00213, 1.6180339887, 2.0, 1.3333333333333333, 1.75, 7.25, 3.5e-5};
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
    /* a profile written before the attention term: decode attention keeps compute_decode */
    const char *old = "device: X\ntp: 1\ncoefficients: {overhead_s: 0.001, compute_prefill: 1.5, "
                      "compute_decode: 3.25, memory: 1.1, comm: 1}\n";
    assert_int_equal(perf_profile_parse(old, strlen(old), &q, &e), LOOM_OK);
    assert_true(q.coef.attention == 3.25 && q.coef.host_token == 0);
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
        cmocka_unit_test(test_fit_cpu_attention),
        cmocka_unit_test(test_fit_clamps_negative),
        cmocka_unit_test(test_profile_grid),
        cmocka_unit_test(test_profile_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
