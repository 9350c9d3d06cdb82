/*
 * The planner's parsers: cluster.yaml, Azure CSV and Mooncake JSONL traces, synthetic lengths
 * and plan.yaml (round trip, validation). Malformed input must name its line.
 */
#include "testlib.h"

#include "loom/plan.h"

static void expect_cluster_error(const char *text, const char *needle)
{
    plan_cluster c;
    loom_err e;
    if (plan_cluster_parse(text, strlen(text), &c, &e) == LOOM_OK)
        fail_msg("accepted:\n%s", text);
    if (!strstr(e.msg, needle))
        fail_msg("error '%s' lacks '%s'", e.msg, needle);
}

static void test_cluster_ok(void **state)
{
    (void)state;
    const char *text = "# a comment\n"
                       "machines:\n"
                       "  - name: big\n"
                       "    device: H100-80G\n"
                       "    count: 8\n"
                       "    host: 10.0.0.1\n"
                       "    cost_per_hour: 98.5\n"
                       "  - {name: t4, device: T4, count: 4, replicas: 3}\n"
                       "  - {name: l4, device: L4, count: 2, hosts: [h1, h2]}\n";
    plan_cluster c;
    loom_err e;
    assert_int_equal(plan_cluster_parse(text, strlen(text), &c, &e), LOOM_OK);
    assert_int_equal(c.n, 6);
    assert_string_equal(c.machines[0].name, "big");
    assert_string_equal(c.machines[0].host, "10.0.0.1");
    assert_int_equal(c.machines[0].count, 8);
    assert_true(c.machines[0].cost_per_hour == 98.5);
    assert_int_equal(c.machines[0].line, 3);
    assert_string_equal(c.machines[1].name, "t4-0");
    assert_string_equal(c.machines[3].name, "t4-2");
    assert_int_equal(c.machines[3].line, 8);
    assert_string_equal(c.machines[4].name, "l4-0");
    assert_string_equal(c.machines[5].host, "h2");
    assert_true(c.machines[5].cost_per_hour == 0);
    plan_cluster_free(&c);
    /* JSON works as well */
    const char *json = "{\"machines\": [{\"name\": \"a\", \"device\": \"cpu\", \"count\": 2}]}";
    assert_int_equal(plan_cluster_parse(json, strlen(json), &c, &e), LOOM_OK);
    assert_int_equal(c.n, 1);
    plan_cluster_free(&c);
}

static void test_cluster_malformed(void **state)
{
    (void)state;
    expect_cluster_error("machines:\n  - name: a\n    device: T4\n", ":2: missing 'count'");
    expect_cluster_error("machines:\n  - name: a\n    device: T4\n    count: 0\n",
                         ":4: count must be an integer in [1, 1024]");
    expect_cluster_error("machines:\n  - name: a\n    device: T4\n    count: two\n", ":4: count");
    expect_cluster_error("machines:\n  - name: a\n    device: T4\n    count: 1\n    gpus: 2\n",
                         ":5: machine 1: unknown key 'gpus'");
    expect_cluster_error("machines:\n  - {name: a, device: T4, count: 1}\n"
                         "  - {name: a, device: T4, count: 2}\n",
                         ":3: machine name 'a' is also used on line 2");
    expect_cluster_error("machines:\n  - {name: a, device: T4, count: 1, replicas: 2}\n"
                         "  - {name: a-1, device: T4, count: 2}\n",
                         "'a-1' is also used");
    expect_cluster_error("machines:\n  - {name: a, device: T4, count: 1, host: x, replicas: 2}\n",
                         ":2: machine 1: host names one machine");
    expect_cluster_error("machines:\n  - {name: a, device: T4, count: 1, hosts: [x], "
                         "replicas: 2}\n",
                         "replicas 2 but 1 hosts");
    expect_cluster_error("machines: []\n", "no machines");
    expect_cluster_error("machines: {a: 1}\n", ":1: machines must be a list");
    expect_cluster_error("nodes: []\n", "unknown key 'nodes'");
    expect_cluster_error("machines:\n  - name: a\n   device: T4\n", ":3:"); /* bad indentation */
    expect_cluster_error("", "empty");
    expect_cluster_error("machines:\n  - {name: \"\", device: T4, count: 1}\n", "empty");
    expect_cluster_error("machines:\n  - {name: a, device: T4, count: 1, replicas: 2000000}\n",
                         "replicas must be an integer");
}

static void test_azure(void **state)
{
    (void)state;
    const char *text = "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
                       "2023-11-16 18:17:03.9799600,4808,10\r\n"
                       "2023-11-16 18:17:04.0319600,3180,8\r\n"
                       "\r\n"
                       "2023-11-16 18:18:03.9799600,1000,30\r\n";
    plan_workload w;
    loom_err e;
    assert_int_equal(plan_workload_parse_azure(text, strlen(text), "t.csv", &w, &e), LOOM_OK);
    assert_int_equal(w.n, 3);
    assert_true(fabs(w.mean_in - (4808 + 3180 + 1000) / 3.0) < 1e-9);
    assert_true(fabs(w.mean_out - 16) < 1e-9);
    assert_true(fabs(w.mean_in_sq - (4808.0 * 4808 + 3180.0 * 3180 + 1e6) / 3) < 1e-3);
    assert_int_equal(w.max_in, 4808);
    assert_true(fabs(w.requests[1].t - 0.052) < 1e-6);
    assert_true(fabs(w.duration - 60) < 1e-6);
    assert_true(fabs(w.rate - 2 / 60.0) < 1e-9);
    plan_workload_free(&w);
    /* columns in another order, plain-second timestamps */
    const char *re = "GeneratedTokens,TIMESTAMP,ContextTokens\n5,0.5,10\n7,2.5,20\n";
    assert_int_equal(plan_workload_parse_azure(re, strlen(re), "r.csv", &w, &e), LOOM_OK);
    assert_true(w.mean_in == 15 && w.mean_out == 6 && w.duration == 2);
    plan_workload_free(&w);
    /* no header: TIMESTAMP,ContextTokens,GeneratedTokens (the parser loom bench uses) */
    const char *bare = "2.5,10,5\n0.5,20,7\n";
    assert_int_equal(plan_workload_parse_azure(bare, strlen(bare), "n.csv", &w, &e), LOOM_OK);
    assert_true(w.mean_in == 15 && w.mean_out == 6 && w.duration == 2 && w.rate == 0.5);
    assert_true(w.requests[0].t == 0 && w.requests[0].in == 20); /* sorted by arrival */
    plan_workload_free(&w);

    struct {
        const char *text, *needle;
    } bad[] = {
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n4,x,6\n", "b.csv:3: ContextTokens 'x'"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n4,5\n",
         "b.csv:3: 2 fields, the header has 3"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,-3\n", "b.csv:2: GeneratedTokens '-3'"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-13-01 00:00:00,2,3\n",
         "b.csv:2: TIMESTAMP"},
        {"time,in,out\n1,2,3\n", "b.csv:1: expected the Azure trace header"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"},
        {"", "empty"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,999999999999\n", "GeneratedTokens"},
        {"TIMESTAMP,ContextTokens,GeneratedTokens\n1,5,0\n2,6,0\n", "at least 1 token"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (plan_workload_parse_azure(bad[i].text, strlen(bad[i].text), "b.csv", &w, &e) == LOOM_OK)
            fail_msg("accepted %s", bad[i].text);
        if (!strstr(e.msg, bad[i].needle))
            fail_msg("error '%s' lacks '%s'", e.msg, bad[i].needle);
    }
}

static void test_mooncake(void **state)
{
    (void)state;
    const char *text = "{\"timestamp\": 0, \"input_length\": 6758, \"output_length\": 500, "
                       "\"hash_ids\": [0, 1, 2]}\n"
                       "\n"
                       "{\"timestamp\": 2000, \"input_length\": 242, \"output_length\": 100}\n";
    plan_workload w;
    loom_err e;
    assert_int_equal(plan_workload_parse_mooncake(text, strlen(text), "m.jsonl", &w, &e), LOOM_OK);
    assert_int_equal(w.n, 2);
    assert_true(w.mean_in == 3500 && w.mean_out == 300);
    assert_true(w.duration == 2.0 && w.rate == 0.5);
    plan_workload_free(&w);
    struct {
        const char *text, *needle;
    } bad[] = {
        {"{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1}\n{oops\n",
         "m.jsonl:2: not a JSON object"},
        {"{\"timestamp\": 0, \"output_length\": 1}\n", "m.jsonl:1: 'input_length' is missing"},
        {"\n\n{\"timestamp\": 0, \"input_length\": 1.5, \"output_length\": 1}\n",
         "m.jsonl:3: 'input_length' is not"},
        {"{\"timestamp\": \"x\", \"input_length\": 1, \"output_length\": 1}\n",
         "m.jsonl:1: 'timestamp'"},
        {"{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": 3}\n",
         "hash_ids"},
        {"[1, 2]\n", "m.jsonl:1: not a JSON object"},
        {"\n  \n", "no requests"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (plan_workload_parse_mooncake(bad[i].text, strlen(bad[i].text), "m.jsonl", &w, &e) ==
            LOOM_OK)
            fail_msg("accepted %s", bad[i].text);
        if (!strstr(e.msg, bad[i].needle))
            fail_msg("error '%s' lacks '%s'", e.msg, bad[i].needle);
    }
}

static void test_shared_traces(void **state)
{
    (void)state;
    const char *shared = test_shared_dir();
    if (!shared)
        skip();
    const char *files[] = {"data/traces/azure2023_code.csv", "data/traces/azure2023_conv.csv",
                           "data/traces/mooncake_conversation.jsonl"};
    const int64_t counts[] = {8819, 19366, 12031}; /* ../shared/data/README.md */
    for (int i = 0; i < 3; i++) {
        char *path = test_path(shared, files[i]);
        plan_workload w;
        loom_err e;
        if (plan_workload_load(path, &w, &e) != LOOM_OK)
            fail_msg("%s", e.msg);
        assert_int_equal(w.n, counts[i]);
        assert_true(w.mean_in > 100 && w.mean_out > 1 && w.rate > 0);
        plan_workload_free(&w);
        free(path);
    }
}

static void test_synthetic(void **state)
{
    (void)state;
    plan_workload w;
    loom_err e;
    assert_int_equal(plan_workload_synthetic("512", "128", &w, &e), LOOM_OK);
    assert_true(w.mean_in == 512 && w.mean_out == 128 && w.mean_in_sq == 512.0 * 512);
    assert_int_equal(plan_workload_synthetic("100:200", "10:20", &w, &e), LOOM_OK);
    assert_true(w.mean_in == 150 && w.mean_out == 15);
    /* E[l^2] of the discrete uniform on [100, 200], summed out */
    double sq = 0;
    for (int l = 100; l <= 200; l++)
        sq += (double)l * l;
    assert_true(fabs(w.mean_in_sq - sq / 101) < 1e-6);
    assert_int_equal(plan_workload_synthetic("0", "5", &w, &e), LOOM_EINVAL);
    assert_int_equal(plan_workload_synthetic("200:100", "5", &w, &e), LOOM_EINVAL);
    assert_int_equal(plan_workload_synthetic("12x", "5", &w, &e), LOOM_EINVAL);
    assert_int_equal(plan_workload_synthetic("10", "0", &w, &e), LOOM_EINVAL);
}

static const char *good_plan =
    "model: \"m\"\n"
    "objective: throughput\n"
    "workload: \"fixed\"\n"
    "mean_input: 512\n"
    "mean_output: 128\n"
    "predicted:\n"
    "  output_tokens_per_s: 300.5\n"
    "  total_tokens_per_s: 1500.25\n"
    "  requests_per_s: 2.5\n"
    "  cost_per_hour: 3\n"
    "instances:\n"
    "  - machine: \"a\"\n"
    "    host: \"10.0.0.1\"\n"
    "    device: \"T4\"\n"
    "    tp: 2\n"
    "    devices: [0, 1]\n"
    "    block_size: 16\n"
    "    kv_blocks: 1000\n"
    "    max_batch: 20\n"
    "    prefill_tokens_per_s: 5000\n"
    "    decode_tokens_per_s: 400\n"
    "    output_tokens_per_s: 200.25\n"
    "    total_tokens_per_s: 1000\n"
    "    requests_per_s: 1.5\n"
    "  - {machine: a, host: 10.0.0.1, device: T4, tp: 1, devices: [3], block_size: 16,\n"
    "     kv_blocks: 300, max_batch: 5, prefill_tokens_per_s: 2500, decode_tokens_per_s: 100,\n"
    "     output_tokens_per_s: 100.25, total_tokens_per_s: 500.25, requests_per_s: 1}\n";

static void test_plan_file_roundtrip(void **state)
{
    (void)state;
    plan_file p, q;
    loom_err e;
    if (plan_file_parse(good_plan, strlen(good_plan), &p, &e) != LOOM_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(p.n_instances, 2);
    assert_int_equal(p.instances[1].devices[0], 3);
    loom_buf b1, b2;
    buf_init(&b1);
    buf_init(&b2);
    plan_file_write(&p, &b1);
    assert_int_equal(plan_file_parse(b1.data, b1.len, &q, &e), LOOM_OK);
    assert_true(plan_file_equal(&p, &q));
    plan_file_write(&q, &b2);
    assert_int_equal(b1.len, b2.len);
    assert_memory_equal(b1.data, b2.data, b1.len);

    /* names with quotes, backslashes, control bytes and YAML line breaks (NEL, U+2028) */
    snprintf(p.model, sizeof(p.model),
             "a\"b\\c\nd\xe2\x80\xa8"
             "e\xc2\x85"
             "f\x01g");
    plan_file r;
    buf_free(&b2);
    buf_init(&b2);
    plan_file_write(&p, &b2);
    assert_int_equal(plan_file_parse(b2.data, b2.len, &r, &e), LOOM_OK);
    assert_string_equal(r.model, p.model);
    plan_file_free(&r);

    /* against a cluster */
    const char *cl = "machines:\n  - {name: a, device: T4, count: 4, host: 10.0.0.1}\n";
    plan_cluster c;
    assert_int_equal(plan_cluster_parse(cl, strlen(cl), &c, &e), LOOM_OK);
    assert_int_equal(plan_file_check(&p, &c, NULL, NULL, NULL, &e), LOOM_OK);
    c.machines[0].count = 3; /* device 3 no longer exists */
    assert_int_equal(plan_file_check(&p, &c, NULL, NULL, NULL, &e), LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "device 3"));
    snprintf(c.machines[0].name, sizeof(c.machines[0].name), "b");
    assert_int_equal(plan_file_check(&p, &c, NULL, NULL, NULL, &e), LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "not in the cluster"));
    plan_cluster_free(&c);
    plan_file_free(&p);
    plan_file_free(&q);
    buf_free(&b1);
    buf_free(&b2);
}

static char *replace(const char *s, const char *from, const char *to)
{
    const char *at = strstr(s, from);
    assert_non_null(at);
    size_t n = strlen(s) - strlen(from) + strlen(to) + 1;
    char *out = malloc(n);
    snprintf(out, n, "%.*s%s%s", (int)(at - s), s, to, at + strlen(from));
    return out;
}

static void test_plan_file_invalid(void **state)
{
    (void)state;
    struct {
        const char *from, *to, *needle;
    } cases[] = {
        {"devices: [0, 1]", "devices: [0]", ":16: instance 1: tp 2 but 1 devices"},
        {"devices: [3]", "devices: [1]", "device 1 of machine 'a' is in two instances"},
        {"output_tokens_per_s: 300.5", "output_tokens_per_s: 301", "not the sums"},
        {"objective: throughput", "objective: fastest", ":2: objective must be"},
        {"kv_blocks: 1000", "kv_blocks: -5", ":18: kv_blocks must be an integer"},
        {"tp: 2", "tp: 2\n    colour: red", ":16: instance 1: unknown key 'colour'"},
        {"device: \"T4\"", "device: \"L4\"", "different devices or hosts"},
        {"mean_input: 512\n", "", "missing 'mean_input'"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *text = replace(good_plan, cases[i].from, cases[i].to);
        plan_file p;
        loom_err e;
        if (plan_file_parse(text, strlen(text), &p, &e) == LOOM_OK)
            fail_msg("case %zu accepted", i);
        if (!strstr(e.msg, cases[i].needle))
            fail_msg("case %zu: error '%s' lacks '%s'", i, e.msg, cases[i].needle);
        free(text);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cluster_ok),
        cmocka_unit_test(test_cluster_malformed),
        cmocka_unit_test(test_azure),
        cmocka_unit_test(test_mooncake),
        cmocka_unit_test(test_shared_traces),
        cmocka_unit_test(test_synthetic),
        cmocka_unit_test(test_plan_file_roundtrip),
        cmocka_unit_test(test_plan_file_invalid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
