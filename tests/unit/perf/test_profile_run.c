/*
 * The perf side of `loom profile`: perf_profile_fit turns timed steps into a profile whose
 * predictions match the timings (steps timed on a known "device"), and the host catalog that
 * `loom profile --host` writes parses back as a pooled cpu device with the measured figures.
 */
#include "testlib.h"

#include "loom/model.h"
#include "loom/perf.h"

#include <math.h>
#include <string.h>

static void grid_model(perf_model *pm, perf_catalog *cat)
{
    model_config mc;
    loom_err e;
    assert_int_equal(model_config_preset("llama-125m", &mc, &e), LOOM_OK);
    assert_int_equal(perf_model_init(pm, &mc, "llama-125m", 4, 4, &e), LOOM_OK);
    const char *text = "devices:\n"
                       "  - {name: cpu, memory_gib: 8, bf16_tflops: 0.1, mem_bw_gbs: 12,\n"
                       "     link: none, link_bw_gbs: 0, link_latency_us: 0, weight_bytes: 4,\n"
                       "     pooled: true}\n";
    assert_int_equal(perf_catalog_parse(text, strlen(text), cat, &e), LOOM_OK);
}

/* Steps of the profiling grid timed by known coefficients with 2% multiplicative noise: the
 * fitted profile predicts every step within 5% and names device, tp and model. */
static void test_fit_timed_grid(void **state)
{
    (void)state;
    perf_model pm;
    perf_catalog cat;
    grid_model(&pm, &cat);
    const perf_device *dev = perf_catalog_find(&cat, "cpu");
    assert_non_null(dev);
    perf_step grid[64];
    int n = perf_profile_grid(512, 2048, 32, 256, grid, 64);
    assert_true(n >= 12 && n <= 64);
    perf_coef truth = {.overhead = 4e-3, .compute_prefill = 1.4, .compute_decode = 3.0,
                       .memory = 1.1, .comm = 1.0, .attention = 9.0, .host_token = 5e-5};
    perf_timed_step steps[64];
    loom_rng rng;
    rng_seed(&rng, 42);
    for (int i = 0; i < n; i++) {
        perf_terms t;
        perf_step_terms(&pm, dev, 2, &grid[i], &t);
        steps[i].step = grid[i];
        steps[i].kind = grid[i].prefill_tokens > 0 ? PERF_STEP_PREFILL : PERF_STEP_DECODE;
        steps[i].seconds = perf_coef_apply(&truth, &t) * (1 + 0.02 * rng_normal(&rng));
    }
    perf_profile prof;
    double errs[64];
    loom_err e;
    assert_int_equal(perf_profile_fit(&pm, dev, 2, "llama-125m", steps, n, NULL, &prof, errs, &e),
                     LOOM_OK);
    assert_string_equal(prof.device, "cpu");
    assert_string_equal(prof.model, "llama-125m");
    assert_int_equal(prof.tp, 2);
    assert_int_equal(prof.n_samples, n);
    assert_true(prof.rel_rms < 0.05);
    for (int i = 0; i < n; i++) {
        perf_terms t;
        perf_step_terms(&pm, dev, 2, &grid[i], &t);
        double truth_s = perf_coef_apply(&truth, &t), fit_s = perf_coef_apply(&prof.coef, &t);
        assert_true(fabs(fit_s - truth_s) / truth_s < 0.05);
        assert_true(fabs(errs[i]) < 0.1);
    }
    /* the written profile reads back with the same coefficients */
    loom_buf b;
    buf_init(&b);
    perf_profile_write(&prof, &b);
    perf_profile back;
    assert_int_equal(perf_profile_parse(b.data, b.len, &back, &e), LOOM_OK);
    assert_true(back.coef.compute_prefill == prof.coef.compute_prefill);
    assert_true(back.rel_rms == prof.rel_rms);
    buf_free(&b);
    assert_int_equal(perf_profile_fit(&pm, dev, 2, "", steps, 0, NULL, &prof, NULL, &e),
                     LOOM_EINVAL);
    perf_catalog_free(&cat);
}

static void test_host_catalog(void **state)
{
    (void)state;
    perf_host h;
    perf_host_basics(&h);
    assert_true(h.cores >= 1);
    assert_true(h.mem_bytes > 0);
    h.mem_bw = perf_host_stream(1, 4u << 20, 2);
    assert_true(h.mem_bw > 1e8); /* any machine moves more than 100 MB/s */
    h.mem_bw_one = h.mem_bw;
    h.gemm_flops = 50e9;
    h.gemm_flops_all = 50e9 * h.cores;
    loom_buf b;
    buf_init(&b);
    perf_host_write_catalog(&h, &b);
    perf_catalog cat;
    loom_err e;
    assert_int_equal(perf_catalog_parse(b.data, b.len, &cat, &e), LOOM_OK);
    const perf_device *cpu = perf_catalog_find(&cat, "cpu");
    assert_non_null(cpu);
    assert_true(cpu->pooled);
    assert_int_equal(cpu->weight_bytes, 4);
    assert_true(fabs(cpu->flops - 50e9) / 50e9 < 0.01);
    assert_true(fabs(cpu->mem_bw - h.mem_bw / h.cores) / (h.mem_bw / h.cores) < 0.01);
    perf_catalog_free(&cat);
    buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fit_timed_grid),
        cmocka_unit_test(test_host_catalog),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
