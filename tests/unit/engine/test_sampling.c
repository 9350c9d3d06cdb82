/* sampling: greedy, temperature, top_k, top_p, seeds, logprobs (pure functions). */
#include "loom/engine.h"
#include "testlib.h"

#include <math.h>

enum { V = 50 };

static void random_logits(loom_rng *r, float *x, int n)
{
    for (int i = 0; i < n; i++)
        x[i] = rng_normal(r) * 2.0f;
}

static int32_t sample_copy(const float *logits, const sampling_params *p, loom_rng *rng)
{
    float tmp[V];
    int32_t work[V];
    memcpy(tmp, logits, sizeof(tmp));
    return sampling_sample(tmp, V, p, rng, work);
}

static void test_greedy(void **state)
{
    float x[V];
    for (int i = 0; i < V; i++)
        x[i] = (float)(i % 7);
    /* ties go to the lowest id: 6 first appears at id 6 */
    assert_int_equal(sampling_argmax(x, V), 6);
    sampling_params p;
    sampling_params_default(&p);
    p.temperature = 0;
    loom_rng rng;
    rng_seed(&rng, 1);
    assert_int_equal(sample_copy(x, &p, &rng), 6);
    /* top_k = 1 and a tiny top_p are greedy too, at any temperature, ties included */
    p.temperature = 5.0f;
    p.top_k = 1;
    for (int i = 0; i < 20; i++)
        assert_int_equal(sample_copy(x, &p, &rng), 6);
    p.top_k = 0;
    p.top_p = 1e-6f;
    for (int i = 0; i < 20; i++)
        assert_int_equal(sample_copy(x, &p, &rng), 6);
    p.top_k = 3;
    for (int i = 0; i < 20; i++)
        assert_int_equal(sample_copy(x, &p, &rng), 6);
    loom_rng r2;
    rng_seed(&r2, 3);
    for (int t = 0; t < 50; t++) {
        random_logits(&r2, x, V);
        int32_t g = sampling_argmax(x, V);
        p.temperature = 0.7f;
        p.top_k = 1;
        p.top_p = 1;
        assert_int_equal(sample_copy(x, &p, &rng), g);
        p.top_k = 0;
        p.top_p = 1e-6f;
        assert_int_equal(sample_copy(x, &p, &rng), g);
    }
}

/* Empirical frequencies against the exact processed distribution. */
static void check_distribution(const float *x, const sampling_params *p, const double *want)
{
    loom_rng rng;
    rng_seed(&rng, 99);
    int counts[V] = {0};
    int n = 40000;
    for (int i = 0; i < n; i++)
        counts[sample_copy(x, p, &rng)]++;
    for (int i = 0; i < V; i++) {
        double f = (double)counts[i] / n;
        double sd = sqrt(want[i] * (1 - want[i]) / n) + 1e-9;
        if (fabs(f - want[i]) > 5 * sd + 1e-4)
            fail_msg("token %d: frequency %.4f, want %.4f", i, f, want[i]);
    }
}

/* The SSE argmax against the naive loop: random rows of every length around the vector widths,
 * ties (first index wins), -inf, and NaN (falls back to the reference definition). */
static void test_argmax_vs_ref(void **state)
{
    loom_rng rng;
    rng_seed(&rng, 11);
    float x[300];
    for (int trial = 0; trial < 2000; trial++) {
        int n = 1 + (int)(rng_next(&rng) % 300);
        int levels = 1 + (int)(rng_next(&rng) % 8); /* few levels: many ties */
        for (int i = 0; i < n; i++)
            x[i] = (float)(rng_next(&rng) % (uint64_t)levels) - 3.0f;
        if (trial % 7 == 0)
            x[rng_next(&rng) % (uint64_t)n] = -INFINITY;
        if (trial % 11 == 0)
            x[rng_next(&rng) % (uint64_t)n] = NAN;
        assert_int_equal(sampling_argmax(x, n), sampling_argmax_ref(x, n));
    }
}

static void test_distributions(void **state)
{
    float x[V];
    for (int i = 0; i < V; i++)
        x[i] = -10.0f;
    /* five tokens with logits 0, 1, 2, 3, 4 at ids 10..14, the rest negligible */
    for (int i = 0; i < 5; i++)
        x[10 + i] = (float)i;
    sampling_params p;
    sampling_params_default(&p);
    double want[V], z = 0;

    /* temperature 2 */
    p.temperature = 2.0f;
    for (int i = 0; i < V; i++)
        z += want[i] = exp(x[i] / 2.0);
    for (int i = 0; i < V; i++)
        want[i] /= z;
    check_distribution(x, &p, want);

    /* top_k = 2: ids 13, 14 */
    p.temperature = 1.0f;
    p.top_k = 2;
    memset(want, 0, sizeof(want));
    want[13] = exp(3.0) / (exp(3.0) + exp(4.0));
    want[14] = 1 - want[13];
    check_distribution(x, &p, want);

    /* top_p = 0.8: probs (of 0..4) .012 .032 .087 .237 .644 (+tail): 14 alone is 0.64 < 0.8, 14 +
     * 13 reach 0.88: the nucleus is {13, 14}, renormalised */
    p.top_k = 0;
    p.top_p = 0.8f;
    check_distribution(x, &p, want);

    /* top_k = 3 then top_p = 0.9 over the renormalised top 3 (.097 .264 .718 -> 14 + 13 = .98) */
    p.top_k = 3;
    p.top_p = 0.9f;
    check_distribution(x, &p, want);
}

static void test_seeded(void **state)
{
    float x[V];
    loom_rng r;
    rng_seed(&r, 5);
    random_logits(&r, x, V);
    sampling_params p;
    sampling_params_default(&p);
    p.temperature = 1.3f;
    p.top_p = 0.95f;
    p.top_k = 20;
    loom_rng a, b;
    rng_seed(&a, 1234);
    rng_seed(&b, 1234);
    int differ = 0;
    int32_t first = sample_copy(x, &p, &a);
    rng_seed(&a, 1234);
    for (int i = 0; i < 100; i++) {
        int32_t ta = sample_copy(x, &p, &a), tb = sample_copy(x, &p, &b);
        assert_int_equal(ta, tb);
        differ += ta != first;
    }
    assert_true(differ > 0); /* it does sample */
}

static void test_logprobs(void **state)
{
    float x[V];
    loom_rng r;
    rng_seed(&r, 11);
    random_logits(&r, x, V);
    x[7] = x[8] = 9.0f; /* a tie at the top */
    double z = 0;
    for (int i = 0; i < V; i++)
        z += exp(x[i]);
    engine_logprob top[5];
    float lp = sampling_logprobs(x, V, 3, 5, top);
    assert_true(fabs(lp - (x[3] - log(z))) < 1e-4);
    assert_int_equal(top[0].token, 7);
    assert_int_equal(top[1].token, 8);
    for (int i = 0; i < 5; i++) {
        assert_true(fabs(top[i].logprob - (x[top[i].token] - log(z))) < 1e-4);
        if (i > 0)
            assert_true(top[i].logprob <= top[i - 1].logprob);
    }
    /* every token not listed is below the last listed one */
    for (int t = 0; t < V; t++) {
        bool listed = false;
        for (int i = 0; i < 5; i++)
            listed |= top[i].token == t;
        if (!listed)
            assert_true(x[t] <= x[top[4].token]);
    }
    /* probabilities sum to 1 */
    double s = 0;
    for (int t = 0; t < V; t++)
        s += exp(sampling_logprobs(x, V, t, 0, NULL));
    assert_true(fabs(s - 1) < 1e-4);
}

static void test_masked(void **state)
{
    /* -inf logits (the min_tokens EOS mask) are never drawn */
    float x[V];
    for (int i = 0; i < V; i++)
        x[i] = 0;
    x[2] = -INFINITY;
    sampling_params p;
    sampling_params_default(&p);
    loom_rng rng;
    rng_seed(&rng, 2);
    for (int i = 0; i < 2000; i++)
        assert_int_not_equal(sample_copy(x, &p, &rng), 2);
    p.top_p = 0.5f;
    for (int i = 0; i < 2000; i++)
        assert_int_not_equal(sample_copy(x, &p, &rng), 2);
    x[0] = -INFINITY;
    p.temperature = 0;
    assert_int_equal(sample_copy(x, &p, &rng), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy), cmocka_unit_test(test_argmax_vs_ref),
        cmocka_unit_test(test_distributions),
        cmocka_unit_test(test_seeded), cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_masked),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
