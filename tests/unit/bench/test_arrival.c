/* Arrival processes: the rate and burstiness asked for are recovered from the schedules
 * they generate. */
#include "testlib.h"

#include "loom/bench.h"

#define N_ARRIVALS 200000

/* Mean and squared coefficient of variation of the gaps of a schedule. */
static void gap_stats(bench_arrival *a, size_t n, double *mean, double *cv2, double *first)
{
    double prev = bench_arrival_next(a, NULL);
    *first = prev;
    double sum = 0, sq = 0;
    for (size_t i = 0; i < n; i++) {
        double t = bench_arrival_next(a, NULL);
        double gap = t - prev;
        assert_true(gap >= 0);
        sum += gap;
        sq += gap * gap;
        prev = t;
    }
    *mean = sum / (double)n;
    double var = sq / (double)n - *mean * *mean;
    *cv2 = var / (*mean * *mean);
}

static void test_poisson_rate(void **state)
{
    bench_arrival a;
    bench_arrival_init(&a, BENCH_ARRIVAL_GAMMA, 50.0, 1.0, 1.0, 7);
    double mean, cv2, first;
    gap_stats(&a, N_ARRIVALS, &mean, &cv2, &first);
    assert_true(first == 0); /* the first request goes at once */
    /* standard error of the mean gap: 0.02 / sqrt(2e5) = 4.5e-5 */
    assert_true(fabs(mean - 0.02) < 0.02 * 0.01);
    assert_true(fabs(cv2 - 1.0) < 0.03);
}

/* Poisson counts in fixed windows: mean rate * window, variance equal to the mean. */
static void test_poisson_counts(void **state)
{
    bench_arrival a;
    double rate = 200, window = 1.0;
    bench_arrival_init(&a, BENCH_ARRIVAL_GAMMA, rate, 1.0, 1.0, 11);
    int n_windows = 2000;
    int *counts = calloc((size_t)n_windows, sizeof(int));
    for (;;) {
        double t = bench_arrival_next(&a, NULL);
        int w = (int)(t / window);
        if (w >= n_windows)
            break;
        counts[w]++;
    }
    double sum = 0, sq = 0;
    for (int i = 0; i < n_windows; i++) {
        sum += counts[i];
        sq += (double)counts[i] * counts[i];
    }
    double mean = sum / n_windows, var = sq / n_windows - mean * mean;
    assert_true(fabs(mean - rate) < 2.0);
    assert_true(fabs(var / mean - 1.0) < 0.1); /* index of dispersion */
    free(counts);
}

static void test_gamma_burstiness(void **state)
{
    double shapes[] = {0.25, 0.5, 2.0, 4.0};
    for (size_t i = 0; i < sizeof(shapes) / sizeof(shapes[0]); i++) {
        bench_arrival a;
        double rate = 10;
        bench_arrival_init(&a, BENCH_ARRIVAL_GAMMA, rate, shapes[i], 1.0, 100 + i);
        double mean, cv2, first;
        gap_stats(&a, N_ARRIVALS, &mean, &cv2, &first);
        double want_cv2 = 1.0 / shapes[i];
        if (fabs(mean - 1.0 / rate) > 0.015 / rate || fabs(cv2 - want_cv2) > 0.06 * want_cv2)
            fail_msg("burstiness %g: mean gap %g (want %g), cv^2 %g (want %g)", shapes[i], mean,
                     1.0 / rate, cv2, want_cv2);
    }
}

/* Moments of the gamma sampler itself: mean k*theta, variance k*theta^2. */
static void test_gamma_sampler(void **state)
{
    double shapes[] = {0.3, 1.0, 3.5};
    loom_rng r;
    rng_seed(&r, 5);
    for (size_t i = 0; i < 3; i++) {
        double k = shapes[i], theta = 2.0, sum = 0, sq = 0;
        int n = 200000;
        for (int j = 0; j < n; j++) {
            double v = bench_gamma_sample(&r, k, theta);
            assert_true(v >= 0);
            sum += v;
            sq += v * v;
        }
        double mean = sum / n, var = sq / n - mean * mean;
        assert_true(fabs(mean - k * theta) < 0.02 * k * theta);
        assert_true(fabs(var - k * theta * theta) < 0.05 * k * theta * theta);
    }
}

static void test_trace_and_at_once(void **state)
{
    bench_arrival a;
    bench_item item = {.timestamp_s = 8.0};
    bench_arrival_init(&a, BENCH_ARRIVAL_TRACE, 0, 1, 0.25, 1);
    assert_true(fabs(bench_arrival_next(&a, &item) - 2.0) < 1e-12);
    bench_arrival_init(&a, BENCH_ARRIVAL_AT_ONCE, 0, 1, 1, 1);
    for (int i = 0; i < 10; i++)
        assert_true(bench_arrival_next(&a, &item) == 0);
    /* rate = inf means everything at once, as in vLLM */
    bench_arrival_init(&a, BENCH_ARRIVAL_GAMMA, INFINITY, 1, 1, 1);
    assert_int_equal(a.kind, BENCH_ARRIVAL_AT_ONCE);
    assert_true(bench_arrival_next(&a, &item) == 0);
}

/* The same seed gives the same schedule (runs are reproducible). */
static void test_deterministic(void **state)
{
    bench_arrival a, b;
    bench_arrival_init(&a, BENCH_ARRIVAL_GAMMA, 3, 0.5, 1, 99);
    bench_arrival_init(&b, BENCH_ARRIVAL_GAMMA, 3, 0.5, 1, 99);
    for (int i = 0; i < 1000; i++)
        assert_true(bench_arrival_next(&a, NULL) == bench_arrival_next(&b, NULL));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_poisson_rate),      cmocka_unit_test(test_poisson_counts),
        cmocka_unit_test(test_gamma_burstiness),  cmocka_unit_test(test_gamma_sampler),
        cmocka_unit_test(test_trace_and_at_once), cmocka_unit_test(test_deterministic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
