/* Trace parsers (Azure CSV, Mooncake JSONL) with their error messages, length distributions
 * and workloads. */
#include "testlib.h"

#include "loom/bench.h"

static const char *AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                           "2023-11-16 18:17:03.9799600,4808,10\n"
                           "2023-11-16 18:17:04.0319600,3180,8\r\n"
                           "\n"
                           "2023-11-16 23:59:59.5000000,10,1\n"
                           "2023-11-17 00:00:00.2500000,20,0\n";

static void test_azure_parses(void **state)
{
    bench_trace t;
    loom_err e;
    assert_int_equal(bench_trace_parse(AZURE, strlen(AZURE), &t, &e), 0);
    assert_int_equal(t.format, BENCH_TRACE_AZURE);
    assert_int_equal(t.n, 4);
    assert_true(fabs(t.entries[0].timestamp_s) < 1e-9);
    assert_true(fabs(t.entries[1].timestamp_s - 0.052) < 1e-6);
    /* across midnight: 18:17:03.97996 -> 23:59:59.5 -> 00:00:00.25 next day */
    double to_eod = (23 - 18) * 3600 + (59 - 17) * 60 + (59.5 - 3.97996);
    assert_true(fabs(t.entries[2].timestamp_s - to_eod) < 1e-6);
    assert_true(fabs(t.entries[3].timestamp_s - (to_eod + 0.75)) < 1e-6);
    assert_int_equal(t.entries[0].input_len, 4808);
    assert_int_equal(t.entries[0].output_len, 10);
    assert_int_equal(t.entries[1].input_len, 3180);
    assert_int_equal(t.entries[3].output_len, 0);
    assert_null(t.entries[0].hash_ids);
    bench_trace_free(&t);
}

static void test_azure_plain_seconds_unsorted(void **state)
{
    const char *csv = "10.5,100,5\n2.5,200,6\n2.5,300,7\n";
    bench_trace t;
    loom_err e;
    assert_int_equal(bench_trace_parse_azure(csv, strlen(csv), &t, &e), 0);
    assert_int_equal(t.n, 3);
    /* sorted by time, stable among equal times, relative to the first */
    assert_int_equal(t.entries[0].input_len, 200);
    assert_int_equal(t.entries[1].input_len, 300);
    assert_int_equal(t.entries[2].input_len, 100);
    assert_true(fabs(t.entries[2].timestamp_s - 8.0) < 1e-9);
    bench_trace_free(&t);
}

/* A header may name the columns in any order, with extra ones (ignored) among them. */
static void test_azure_header_columns(void **state)
{
    const char *csv = "ContextTokens, Model ,TIMESTAMP,GeneratedTokens\n"
                      "100,m1,0.5,5\n"
                      "200,m2,1.5,6\n";
    bench_trace t;
    loom_err e;
    assert_int_equal(bench_trace_parse_azure(csv, strlen(csv), &t, &e), 0);
    assert_int_equal(t.n, 2);
    assert_int_equal(t.entries[1].input_len, 200);
    assert_int_equal(t.entries[1].output_len, 6);
    assert_true(fabs(t.entries[1].timestamp_s - 1.0) < 1e-12);
    bench_trace_free(&t);
    /* the shared parser names the file when given one (plan's style) */
    const char *bad = "ContextTokens,TIMESTAMP,GeneratedTokens\n1,2,3\n4,5\n";
    assert_int_equal(trace_parse(bad, strlen(bad), "t.csv", &t, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "t.csv:3: 2 fields, the header has 3"));
    assert_null(t.entries);
}

/* A malformed trace fails with LOOM_EFORMAT and a message naming the line. */
static void expect_error(const char *text, const char *needle, const char *line)
{
    bench_trace t;
    loom_err e = {0};
    int rc = bench_trace_parse(text, strlen(text), &t, &e);
    if (rc != LOOM_EFORMAT || !strstr(e.msg, needle) || (line && !strstr(e.msg, line)))
        fail_msg("input %s: rc %d, message '%s' (want '%s', '%s')", text, rc, e.msg, needle,
                 line ? line : "");
    assert_null(t.entries);
}

static void test_azure_malformed(void **state)
{
    expect_error("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,12\n",
                 "expected 3 comma-separated fields", "line 2:");
    expect_error("2023-11-16 18:17:03,12,5\n2023-11-16 18:17:04,12,5,9\n", "got more than 3",
                 "line 2:");
    expect_error("2023-11-16 18:17:03,12,5\n\n2023-13-16 18:17:04,12,5\n", "TIMESTAMP", "line 3:");
    expect_error("2023-11-16 18:17:03,-4,5\n", "ContextTokens", "line 1:");
    expect_error("2023-11-16 18:17:03,4,five\n", "GeneratedTokens", "line 1:");
    expect_error("2023-11-16 18:17:03,4,99999999999\n", "GeneratedTokens", "line 1:");
    expect_error("time,in,out\n1,2,3\n", "unexpected header", "line 1:");
    expect_error("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests", NULL);
    expect_error("", "no requests", NULL);
    expect_error("1,2,3\n2023-11-16 18:17:03.,4,5\n", "TIMESTAMP", "line 2:");
    char nul[] = "1,2,3\n4,5\0,6\n";
    bench_trace t;
    loom_err e;
    assert_int_equal(bench_trace_parse_azure(nul, sizeof(nul) - 1, &t, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "line 2:"));
}

static const char *MOONCAKE =
    "{\"timestamp\": 0, \"input_length\": 1100, \"output_length\": 5, \"hash_ids\": [0, 1, 2]}\n"
    "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 7, \"hash_ids\": [0, 3]}\n"
    "\n"
    "{\"timestamp\": 2500, \"input_length\": 10, \"output_length\": 1}\n";

static void test_mooncake_parses(void **state)
{
    bench_trace t;
    loom_err e;
    assert_int_equal(bench_trace_parse(MOONCAKE, strlen(MOONCAKE), &t, &e), 0);
    assert_int_equal(t.format, BENCH_TRACE_MOONCAKE);
    assert_int_equal(t.n, 3);
    assert_int_equal(t.entries[0].input_len, 1100);
    assert_int_equal(t.entries[0].n_hash_ids, 3);
    assert_int_equal(t.entries[0].hash_ids[2], 2);
    assert_int_equal(t.entries[1].n_hash_ids, 2);
    assert_int_equal(t.entries[1].hash_ids[0], 0);
    assert_int_equal(t.entries[1].hash_ids[1], 3);
    assert_true(fabs(t.entries[2].timestamp_s - 2.5) < 1e-12);
    assert_int_equal(t.entries[2].n_hash_ids, 0);
    assert_null(t.entries[2].hash_ids);
    bench_trace_free(&t);
}

static void test_mooncake_malformed(void **state)
{
    expect_error(
        "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n{\"timestamp\": 1,",
        "not a JSON object", "line 2:");
    expect_error("{\"timestamp\": 0, \"output_length\": 1}\n", "'input_length'", "line 1:");
    expect_error("{\"timestamp\": 0, \"input_length\": 1.5, \"output_length\": 1}\n",
                 "'input_length'", "line 1:");
    expect_error("{\"timestamp\": -3, \"input_length\": 1, \"output_length\": 1}\n", "'timestamp'",
                 "line 1:");
    expect_error("\n\n{\"timestamp\": 0, \"input_length\": 1, \"output_length\": \"2\"}\n",
                 "'output_length'", "line 3:");
    expect_error("{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": 4}\n",
                 "'hash_ids' is not an array", "line 1:");
    expect_error(
        "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1, -2]}\n",
        "'hash_ids'", "line 1:");
    expect_error("{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n[1, 2]\n",
                 "not a JSON object", "line 2:");
}

static void test_shared_traces(void **state)
{
    const char *shared = test_shared_dir();
    if (!shared)
        skip();
    struct {
        const char *file;
        size_t n;
        bench_trace_format format;
    } cases[] = {
        {"data/traces/azure2023_code.csv", 8819, BENCH_TRACE_AZURE},
        {"data/traces/azure2023_conv.csv", 19366, BENCH_TRACE_AZURE},
        {"data/traces/mooncake_conversation.jsonl", 12031, BENCH_TRACE_MOONCAKE},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *path = test_path(shared, cases[i].file);
        bench_trace t;
        loom_err e;
        if (bench_trace_load(path, &t, &e) != 0)
            fail_msg("%s", e.msg);
        assert_int_equal(t.n, cases[i].n);
        assert_int_equal(t.format, cases[i].format);
        for (size_t j = 1; j < t.n; j++)
            assert_true(t.entries[j].timestamp_s >= t.entries[j - 1].timestamp_s);
        if (t.format == BENCH_TRACE_MOONCAKE) {
            /* one hash id per started 512-token block */
            for (size_t j = 0; j < t.n; j++)
                assert_int_equal(t.entries[j].n_hash_ids,
                                 (t.entries[j].input_len + BENCH_BLOCK_TOKENS - 1) /
                                     BENCH_BLOCK_TOKENS);
        }
        bench_trace_free(&t);
        free(path);
    }
}

static void test_load_missing_file(void **state)
{
    bench_trace t;
    loom_err e;
    assert_true(bench_trace_load("/nonexistent/trace.csv", &t, &e) != 0);
    assert_non_null(strstr(e.msg, "/nonexistent/trace.csv"));
}

/* ---------------------------------------------------------------- distributions */

static void test_dist_specs(void **state)
{
    bench_dist d;
    loom_err e;
    loom_rng r;
    rng_seed(&r, 1);
    assert_int_equal(bench_dist_parse("128", true, &d, &e), 0);
    assert_int_equal(d.kind, BENCH_DIST_FIXED);
    assert_int_equal(bench_dist_sample(&d, &r), 128);

    assert_int_equal(bench_dist_parse("uniform:10-20", true, &d, &e), 0);
    int seen[11] = {0};
    for (int i = 0; i < 20000; i++) {
        int v = bench_dist_sample(&d, &r);
        assert_true(v >= 10 && v <= 20);
        seen[v - 10]++;
    }
    for (int i = 0; i <= 10; i++) /* each about 1818 */
        assert_true(seen[i] > 1600 && seen[i] < 2050);

    assert_int_equal(bench_dist_parse("normal:300,50", false, &d, &e), 0);
    double sum = 0, sq = 0;
    int n = 50000;
    for (int i = 0; i < n; i++) {
        double v = bench_dist_sample(&d, &r);
        sum += v;
        sq += v * v;
    }
    double mean = sum / n, sd = sqrt(sq / n - mean * mean);
    assert_true(fabs(mean - 300) < 1.5);
    assert_true(fabs(sd - 50) < 1.5);

    /* clamped to >= 1 */
    assert_int_equal(bench_dist_parse("normal:2,100", false, &d, &e), 0);
    for (int i = 0; i < 1000; i++)
        assert_true(bench_dist_sample(&d, &r) >= 1);

    const char *bad[] = {
        "",           "0",           "-5",          "1.5",        "uniform:5", "uniform:9-3",
        "normal:0,1", "poisson:3,4", "uniform:a-b", "normal:5,-1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (bench_dist_parse(bad[i], true, &d, &e) != LOOM_EINVAL)
            fail_msg("'%s' accepted", bad[i]);
    }
}

static void test_dist_trace_histogram(void **state)
{
    char path[] = "/tmp/loom-test-trace-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *csv = "1,100,7\n2,200,7\n3,200,9\n";
    assert_int_equal(write(fd, csv, strlen(csv)), (ssize_t)strlen(csv));
    close(fd);
    char spec[64];
    snprintf(spec, sizeof(spec), "trace:%s", path);
    bench_dist in, out;
    loom_err e;
    assert_int_equal(bench_dist_parse(spec, true, &in, &e), 0);
    assert_int_equal(bench_dist_parse(spec, false, &out, &e), 0);
    loom_rng r;
    rng_seed(&r, 3);
    int n200 = 0, n9 = 0;
    for (int i = 0; i < 30000; i++) {
        int a = bench_dist_sample(&in, &r), b = bench_dist_sample(&out, &r);
        assert_true(a == 100 || a == 200);
        assert_true(b == 7 || b == 9);
        n200 += a == 200;
        n9 += b == 9;
    }
    assert_true(n200 > 19500 && n200 < 20500); /* 2/3 */
    assert_true(n9 > 9500 && n9 < 10500);      /* 1/3 */
    bench_dist_free(&in);
    bench_dist_free(&out);
    unlink(path);
}

/* ---------------------------------------------------------------- workloads */

static void test_workload_items(void **state)
{
    bench_workload w = {0};
    loom_err e;
    assert_int_equal(bench_dist_parse("uniform:1-1000", true, &w.input, &e), 0);
    assert_int_equal(bench_dist_parse("uniform:1-1000", false, &w.output, &e), 0);
    w.seed = 42;
    assert_int_equal(bench_workload_size(&w), 0);
    bench_item a, b, c;
    bench_workload_item(&w, 7, &a);
    bench_workload_item(&w, 7, &b);
    bench_workload_item(&w, 8, &c);
    assert_int_equal(a.input_len, b.input_len); /* deterministic in k */
    assert_int_equal(a.output_len, b.output_len);
    assert_int_equal(a.k, 7);
    assert_true(a.input_len != c.input_len || a.output_len != c.output_len);

    bench_trace t;
    assert_int_equal(bench_trace_parse(MOONCAKE, strlen(MOONCAKE), &t, &e), 0);
    bench_workload tw = {.trace = &t};
    assert_int_equal(bench_workload_size(&tw), 3);
    bench_workload_item(&tw, 1, &a);
    assert_int_equal(a.input_len, 600);
    assert_int_equal(a.n_hash_ids, 2);
    /* cyclic past the end, later in time */
    bench_workload_item(&tw, 4, &b);
    assert_int_equal(b.input_len, 600);
    assert_true(b.timestamp_s > t.entries[2].timestamp_s);
    bench_trace_free(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_azure_parses),
        cmocka_unit_test(test_azure_plain_seconds_unsorted),
        cmocka_unit_test(test_azure_header_columns),
        cmocka_unit_test(test_azure_malformed),
        cmocka_unit_test(test_mooncake_parses),
        cmocka_unit_test(test_mooncake_malformed),
        cmocka_unit_test(test_shared_traces),
        cmocka_unit_test(test_load_missing_file),
        cmocka_unit_test(test_dist_specs),
        cmocka_unit_test(test_dist_trace_histogram),
        cmocka_unit_test(test_workload_items),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
