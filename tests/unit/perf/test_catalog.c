/*
 * The device catalog: data/devices.yaml parses and has the devices issue 3 lists with sane
 * figures; malformed catalogs are refused with the line named.
 */
#include "testlib.h"

#include "loom/perf.h"

static void test_repository_catalog(void **state)
{
    (void)state;
    const char *path = perf_catalog_default_path();
    if (!path)
        skip();
    perf_catalog c;
    loom_err e;
    if (perf_catalog_load(path, &c, &e) != LOOM_OK)
        fail_msg("%s", e.msg);
    const char *want[] = {"V100-32G",    "T4",          "A10",    "L4",     "L40S", "A100-40G",
                          "A100-80G",    "H100-80G",    "H200",   "H20",    "B200", "Ascend-910A",
                          "Ascend-910B", "Ascend-310P", "MI250X", "MI300X", "cpu"};
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        const perf_device *d = perf_catalog_find(&c, want[i]);
        if (!d)
            fail_msg("catalog lacks %s", want[i]);
        assert_true(d->mem_bytes >= 4e9 || d->pooled);
        assert_true(d->flops > 0 && d->mem_bw > 0);
        if (!d->pooled)
            assert_true(d->link_bw > 0 && d->link_latency > 0);
        /* machine balance (FLOP per byte) of real accelerators lies between 20 and 600 */
        double balance = d->flops / d->mem_bw;
        if (!d->pooled && (balance < 20 || balance > 600))
            fail_msg("%s: %.0f FLOP/byte is implausible", d->name, balance);
    }
    /* spot checks against the datasheets */
    const perf_device *h100 = perf_catalog_find(&c, "h100-80g"); /* case-insensitive */
    assert_non_null(h100);
    assert_true(fabs(h100->flops - 989e12) < 1e9);
    assert_true(fabs(h100->mem_bw - 3350e9) < 1e6);
    assert_true(fabs(h100->mem_bytes - 80.0 * 1073741824.0) < 1);
    assert_true(perf_catalog_find(&c, "cpu")->pooled);
    assert_int_equal(perf_catalog_find(&c, "cpu")->weight_bytes, 4);
    assert_int_equal(h100->weight_bytes, 2);
    assert_null(perf_catalog_find(&c, "H900"));
    perf_catalog_free(&c);
}

static void expect_error(const char *text, const char *needle)
{
    perf_catalog c;
    loom_err e;
    int rc = perf_catalog_parse(text, strlen(text), &c, &e);
    if (rc == LOOM_OK)
        fail_msg("accepted: %s", text);
    if (!strstr(e.msg, needle))
        fail_msg("error '%s' lacks '%s'", e.msg, needle);
}

static void test_malformed(void **state)
{
    (void)state;
    expect_error("devices:\n  - name: X\n    memory_gib: 16\n    bf16_tflops: 10\n",
                 ":2: missing 'mem_bw_gbs'");
    expect_error("devices:\n  - name: X\n    memory_gib: lots\n",
                 ":3: memory_gib must be a number");
    expect_error("devices:\n  - name: X\n    memory_gib: 16\n    bf16_tflops: 10\n"
                 "    mem_bw_gbs: 100\n    bandwith: 3\n",
                 ":6: device 1: unknown key 'bandwith'");
    expect_error("devices: []\n", "empty");
    expect_error("gpus: []\n", "unknown key 'gpus'");
    expect_error("devices:\n  - [1, 2]\n", ":2: device 1 must be a mapping");
    expect_error("devices:\n  - {name: A, memory_gib: 1, bf16_tflops: 1, mem_bw_gbs: 1}\n"
                 "  - {name: a, memory_gib: 1, bf16_tflops: 1, mem_bw_gbs: 1}\n",
                 ":3: device 'a' listed twice");
    expect_error("devices:\n  - {name: A, memory_gib: 1, bf16_tflops: 1, mem_bw_gbs: 1,\n"
                 "     link: NVLink, link_bw_gbs: 0}\n",
                 "link_bw_gbs must be > 0");
    expect_error("devices:\n  - {name: A, memory_gib: 1, bf16_tflops: 1, mem_bw_gbs: 1,\n"
                 "     efficiency: {memory: 1, speed: 2}}\n",
                 "unknown key 'speed'");
    expect_error("devices: [\n", ":");
    expect_error("", "empty");
}

static void test_parse_units_and_coefficients(void **state)
{
    (void)state;
    const char *text = "devices:\n"
                       "  - name: Z\n"
                       "    memory_gib: 2\n"
                       "    bf16_tflops: 3.5\n"
                       "    mem_bw_gbs: 100\n"
                       "    link: PCIe4\n"
                       "    link_bw_gbs: 32\n"
                       "    link_latency_us: 7\n"
                       "    cost_per_hour: 1.25\n"
                       "    runtime_overhead_gib: 0.5\n"
                       "    efficiency: {overhead_s: 0.004, memory: 1.1}\n";
    perf_catalog c;
    loom_err e;
    assert_int_equal(perf_catalog_parse(text, strlen(text), &c, &e), LOOM_OK);
    const perf_device *d = &c.devices[0];
    assert_true(d->mem_bytes == 2.0 * 1073741824.0);
    assert_true(d->flops == 3.5e12);
    assert_true(d->mem_bw == 100e9);
    assert_true(d->link_bw == 32e9);
    assert_true(fabs(d->link_latency - 7e-6) < 1e-15);
    assert_true(d->cost_per_hour == 1.25);
    assert_true(d->runtime_overhead == 0.5 * 1073741824.0);
    assert_true(d->coef.overhead == 0.004 && d->coef.memory == 1.1);
    perf_coef def;
    perf_coef_default(&def);
    /* keys not given keep the defaults */
    assert_true(d->coef.compute_prefill == def.compute_prefill);
    assert_true(d->coef.compute_decode == def.compute_decode && d->coef.comm == def.comm);
    perf_catalog_free(&c);
    /* JSON is accepted too */
    const char *json = "{\"devices\": [{\"name\": \"J\", \"memory_gib\": 8, \"bf16_tflops\": 1,"
                       " \"mem_bw_gbs\": 50, \"pooled\": true}]}";
    assert_int_equal(perf_catalog_parse(json, strlen(json), &c, &e), LOOM_OK);
    assert_true(c.devices[0].pooled);
    perf_catalog_free(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_repository_catalog),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_parse_units_and_coefficients),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
