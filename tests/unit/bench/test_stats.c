/* Percentile, TTFT/TPOT/E2E and goodput arithmetic against hand-computed cases. */
#include "testlib.h"

#include "loom/bench.h"

#define NEAR(a, b) assert_true(fabs((a) - (b)) < 1e-9)

static void test_percentiles(void **state)
{
    /* numpy.percentile([1, 2, 3, 4], q): 50 -> 2.5, 90 -> 3.7, 99 -> 3.97, 0 -> 1 */
    double v[] = {1, 2, 3, 4};
    NEAR(bench_percentile(v, 4, 50), 2.5);
    NEAR(bench_percentile(v, 4, 90), 3.7);
    NEAR(bench_percentile(v, 4, 99), 3.97);
    NEAR(bench_percentile(v, 4, 0), 1);
    NEAR(bench_percentile(v, 4, 100), 4);
    double one[] = {7};
    NEAR(bench_percentile(one, 1, 99), 7);
    NEAR(bench_percentile(NULL, 0, 50), 0);
    /* 0..100: the p-th percentile is p */
    double h[101];
    for (int i = 0; i <= 100; i++)
        h[i] = i;
    NEAR(bench_percentile(h, 101, 90), 90);
    NEAR(bench_percentile(h, 101, 12.5), 12.5);
}

static void test_latency_summary(void **state)
{
    double v[] = {0.004, 0.001, 0.003, 0.002}; /* seconds, unsorted */
    bench_latency l;
    bench_latency_compute(v, 4, 1e3, &l); /* in ms */
    NEAR(l.mean, 2.5);
    NEAR(l.median, 2.5);
    NEAR(l.std, sqrt(1.25)); /* population std, as numpy.std */
    NEAR(l.p90, 3.7);
    NEAR(l.p99, 3.97);
    NEAR(l.min, 1);
    NEAR(l.max, 4);
    assert_int_equal(l.n, 4);
    bench_latency_compute(NULL, 0, 1e3, &l);
    NEAR(l.mean, 0);
}

static bench_record make_record(double start, double first, double end, int out)
{
    bench_record r;
    memset(&r, 0, sizeof(r));
    r.start_s = start;
    r.first_token_s = first;
    r.end_s = end;
    r.output_tokens = out;
    r.n_chunks = out;
    r.instance = -1;
    return r;
}

static void test_record_metrics(void **state)
{
    bench_record r = make_record(1.0, 1.5, 3.5, 5);
    NEAR(bench_record_ttft(&r), 0.5);
    NEAR(bench_record_e2el(&r), 2.5);
    NEAR(bench_record_tpot(&r), 0.5); /* (2.5 - 0.5) / (5 - 1) */
    bench_record one = make_record(0, 0.2, 0.2, 1);
    NEAR(bench_record_tpot(&one), 0);

    bench_slo slo = {.ttft = 0.6, .tpot = 0.5};
    assert_true(bench_record_good(&r, &slo));
    slo.tpot = 0.49;
    assert_false(bench_record_good(&r, &slo));
    slo = (bench_slo){.e2el = 2.4};
    assert_false(bench_record_good(&r, &slo));
    r.error = BENCH_ERR_TIMEOUT;
    slo = (bench_slo){0};
    assert_false(bench_record_good(&r, &slo));
}

static void test_slo_parse(void **state)
{
    bench_slo s;
    loom_err e;
    assert_int_equal(bench_slo_parse("ttft=2s,tpot=200ms", &s, &e), 0);
    NEAR(s.ttft, 2.0);
    NEAR(s.tpot, 0.2);
    NEAR(s.e2el, 0);
    assert_int_equal(bench_slo_parse("e2el=1500,ttft:250us", &s, &e), 0); /* bare = ms */
    NEAR(s.e2el, 1.5);
    NEAR(s.ttft, 250e-6);
    const char *bad[] = {"", "ttft", "ttft=fast", "latency=2s", "ttft=2h", "ttft=-1s"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (bench_slo_parse(bad[i], &s, &e) == 0)
            fail_msg("'%s' accepted", bad[i]);
}

/* Three completed requests and one failure over a 2 s run, by hand. */
static void test_summary(void **state)
{
    bench_result res;
    memset(&res, 0, sizeof(res));
    res.n_targets = 1;
    char *inst[] = {"a", "b"};
    res.instances = inst;
    res.n_instances = 2;
    res.duration_s[0] = 2.0;
    res.max_concurrent[0] = 3;
    bench_record recs[5];
    float itl0[] = {0.1f, 0.3f}, itl1[] = {0.2f};
    recs[0] = make_record(0.0, 0.5, 0.9, 3); /* ttft .5 e2el .9 tpot .2 */
    recs[0].itl = itl0;
    recs[0].n_itl = 2;
    recs[0].prompt_tokens = 10;
    recs[0].instance = 0;
    recs[1] = make_record(0.1, 1.1, 1.3, 2); /* ttft 1.0 e2el 1.2 tpot .2 */
    recs[1].itl = itl1;
    recs[1].n_itl = 1;
    recs[1].prompt_tokens = 20;
    recs[1].instance = 1;
    recs[2] = make_record(0.2, 0.4, 0.4, 1); /* ttft .2 e2el .2 */
    recs[2].prompt_tokens = 30;
    recs[2].instance = 0;
    recs[3] = make_record(0.3, -1, 0.35, 0);
    recs[3].error = BENCH_ERR_HTTP;
    recs[3].http_status = 503;
    recs[3].prompt_tokens = 40;
    recs[4] = make_record(0, 0.1, 0.2, 2); /* another target: ignored */
    recs[4].target = 1;
    res.records = recs;
    res.n_records = 5;

    bench_slo slo = {.ttft = 0.6}; /* requests 0 and 2 */
    bench_summary s;
    bench_summarize(&res, 0, &slo, &s);
    assert_int_equal(s.n_requests, 4);
    assert_int_equal(s.completed, 3);
    assert_int_equal(s.failed, 1);
    assert_int_equal(s.errors[BENCH_ERR_HTTP], 1);
    assert_int_equal(s.n_status, 1);
    assert_int_equal(s.status_codes[0], 503);
    assert_int_equal(s.total_input_tokens, 60);
    assert_int_equal(s.total_output_tokens, 6);
    NEAR(s.request_throughput, 1.5);
    NEAR(s.output_throughput, 3.0);
    NEAR(s.total_token_throughput, 33.0);
    assert_true(s.slo_set);
    assert_int_equal(s.good, 2);
    NEAR(s.request_goodput, 1.0);
    /* TTFT {.5, 1.0, .2} ms */
    assert_true(fabs(s.ttft.mean - 1700.0 / 3) < 1e-6);
    assert_true(fabs(s.ttft.median - 500) < 1e-6);
    /* TPOT only for requests with more than one token: {.2, .2} */
    assert_int_equal(s.tpot.n, 2);
    assert_true(fabs(s.tpot.mean - 200) < 1e-3);
    /* ITL pooled: {.1, .3, .2} */
    assert_int_equal(s.itl.n, 3);
    assert_true(fabs(s.itl.median - 200) < 1e-3);
    assert_true(fabs(s.e2el.max - 1200) < 1e-6);
    assert_int_equal(s.instance_counts[0], 2);
    assert_int_equal(s.instance_counts[1], 1);
    assert_int_equal(s.max_concurrent_requests, 3);
    /* tokens by one-second window: all six fall in [0, 1) except request 1's two (1.1, 1.3):
     * first window 3 + 1 = 4, second 2 */
    NEAR(s.max_output_tokens_per_s, 4);
    bench_summary_free(&s);
    assert_false(bench_result_ok(&res));

    bench_summarize(&res, 0, NULL, &s);
    assert_false(s.slo_set);
    assert_int_equal(s.good, 0);
    bench_summary_free(&s);
}

static void test_error_names(void **state)
{
    for (int k = 0; k < BENCH_ERR_COUNT; k++)
        assert_string_not_equal(bench_error_name((bench_error)k), "unknown");
    assert_string_equal(bench_error_name(BENCH_ERR_CONNECT), "connect");
    assert_string_equal(bench_error_name(BENCH_ERR_TIMEOUT), "timeout");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_percentiles),    cmocka_unit_test(test_latency_summary),
        cmocka_unit_test(test_record_metrics), cmocka_unit_test(test_slo_parse),
        cmocka_unit_test(test_summary),        cmocka_unit_test(test_error_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
