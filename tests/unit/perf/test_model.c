/*
 * perf model cost and memory model against hand-computed cases: a Llama-3-8B-shaped dense
 * model and a Mixtral-8x7B-shaped MoE model on synthetic 80 GiB and 24 GiB devices at several
 * TP degrees. The expected numbers below were worked out by hand (with a calculator) from the
 * formulas in src/perf/estimate.c's header comment, not by calling the code under test.
 */
#include "testlib.h"

#include "loom/model.h"
#include "loom/perf.h"

#define GIB 1073741824.0

static model_config llama8b(void)
{
    model_config c;
    memset(&c, 0, sizeof(c));
    c.arch = ARCH_LLAMA;
    snprintf(c.model_type, sizeof(c.model_type), "llama");
    c.vocab_size = 128256;
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.n_layers = 32;
    c.n_heads = 32;
    c.n_kv_heads = 8;
    c.head_dim = 128;
    return c;
}

static model_config mixtral8x7b(void)
{
    model_config c = llama8b();
    c.arch = ARCH_MIXTRAL;
    snprintf(c.model_type, sizeof(c.model_type), "mixtral");
    c.vocab_size = 32000;
    c.n_experts = 8;
    c.n_experts_per_tok = 2;
    c.moe_intermediate_size = 14336;
    c.decoder_sparse_step = 1;
    return c;
}

static perf_device test_device(double gib)
{
    perf_device d;
    memset(&d, 0, sizeof(d));
    snprintf(d.name, sizeof(d.name), "TEST-%.0f", gib);
    d.mem_bytes = gib * GIB;
    d.flops = 1e15;
    d.mem_bw = 2e12;
    d.link_bw = 4e11;
    d.link_latency = 2e-6;
    d.runtime_overhead = GIB;
    d.weight_bytes = 2;
    perf_coef_default(&d.coef);
    return d;
}

static void test_param_counts(void **state)
{
    (void)state;
    loom_err e;
    model_config c = llama8b();
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &c, "llama8b", 2, 2, &e), LOOM_OK);
    /* per layer: norms 2d + QKV d(q + 2kv) + O qd + MLP 3dI = 218,112,000; x32; + 2 V d + d */
    assert_true(pm.params_total == 8030261248.0);
    assert_true(perf_model_weight_bytes(&pm) == 16060522496.0);
    assert_true(pm.kv_bytes_per_token == 131072.0); /* 2 x 32 x 8 x 128 x 2 */
    /* agrees with the model module's own count */
    assert_true(pm.params_total == (double)model_config_n_params(&c));

    model_config m = mixtral8x7b();
    assert_int_equal(perf_model_init(&pm, &m, "mixtral", 2, 2, &e), LOOM_OK);
    assert_true(pm.params_total == 46702792704.0);
    assert_true(pm.params_total == (double)model_config_n_params(&m));
    assert_int_equal(pm.n_moe_layers, 32);
    assert_true(pm.params_expert == 3.0 * 4096 * 14336);
    assert_true(pm.ffn_active_width == 2 * 14336.0);

    /* every preset agrees with model_config_n_params, MoE and tied ones included */
    for (const char *const *p = model_preset_names(); *p; p++) {
        model_config pc;
        assert_int_equal(model_config_preset(*p, &pc, &e), LOOM_OK);
        assert_int_equal(perf_model_init(&pm, &pc, *p, 4, 4, &e), LOOM_OK);
        assert_true(pm.params_total == (double)model_config_n_params(&pc));
    }
}

static void test_step_flops(void **state)
{
    (void)state;
    loom_err e;
    model_config c = llama8b();
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &c, "llama8b", 2, 2, &e), LOOM_OK);
    perf_device dev = test_device(80);
    perf_step st;
    perf_terms t;
    /* decode, batch 1, context 0: 2 x (non-embedding matmul params) + 2 V d for the LM head +
     * 4 H hd L x 1 attention pair */
    perf_step_decode(&st, 1, 0);
    perf_step_terms(&pm, &dev, 1, &st, &t);
    double matmul = 8030261248.0 - 2.0 * 128256 * 4096 - 4096; /* norms count too: tiny */
    double expect = 2 * matmul + 2.0 * 128256 * 4096 + 4.0 * 4096 * 32;
    assert_true(fabs(t.flops - expect) / expect < 1e-12);
    /* weights read once per step: everything but the embedding table, + 1 embedding row */
    double wexp = (8030261248.0 - 128256.0 * 4096) * 2 + 4096 * 2;
    assert_true(fabs(t.weight_bytes - wexp) / wexp < 1e-12);
    /* KV: read 1 position + write 1 */
    assert_true(t.kv_bytes == 2 * 131072.0);
    assert_true(t.t_comm == 0);
    /* tp 2 halves FLOPs and bytes and adds 2 all-reduces per layer + a logits gather */
    perf_terms t2;
    perf_step_terms(&pm, &dev, 2, &st, &t2);
    assert_true(fabs(t2.flops - expect / 2) / expect < 1e-12);
    double ar = 2 * 2e-6 + 1.0 * 4096 * 2 / 4e11; /* 2(t-1) alpha + 2(t-1)/t S / beta */
    double gather = 1 * 2e-6 + 0.5 * 128256 * 4 / 4e11;
    assert_true(fabs(t2.t_comm - (64 * ar + gather)) < 1e-12);
    /* a 1024-token prompt: l(l+1)/2 attention pairs */
    perf_step_prefill(&st, 1024, 1024, 1024.0 * 1024);
    assert_true(st.prefill_pairs == 1024.0 * 1025 / 2);
    assert_true(fabs(st.prefill_seqs - 1) < 1e-12);
    /* a mixed step costs the FLOPs of its parts: prompt and decode FLOPs add up */
    perf_step mixed = st, dec;
    perf_step_decode(&dec, 1, 0);
    perf_step_add(&mixed, &dec);
    perf_terms tm, tpre;
    perf_step_terms(&pm, &dev, 1, &mixed, &tm);
    perf_step_terms(&pm, &dev, 1, &st, &tpre);
    assert_true(fabs(tm.flops - tpre.flops - t.flops) < 1e-3 * t.flops);
    assert_true(tm.t_compute_prefill == tpre.t_compute_prefill);
    assert_true(fabs(tm.t_compute_decode - t.t_compute_decode) < 1e-15);
}

static void test_moe_experts_touched(void **state)
{
    (void)state;
    loom_err e;
    model_config c = mixtral8x7b();
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &c, "mixtral", 2, 2, &e), LOOM_OK);
    perf_device dev = test_device(80);
    perf_step st;
    perf_terms t1, t256;
    double expert = 3.0 * 4096 * 14336 * 2 * 32; /* one expert in every layer, bytes */
    perf_step_decode(&st, 1, 0);
    perf_step_terms(&pm, &dev, 1, &st, &t1);
    perf_step_decode(&st, 256, 0);
    perf_step_terms(&pm, &dev, 1, &st, &t256);
    /* 1 token touches k = 2 experts; 256 tokens touch all 8 (1 - (3/4)^256 ~ 1) */
    double diff = t256.weight_bytes - t1.weight_bytes - 255 * 4096 * 2; /* minus embedding rows */
    assert_true(fabs(diff - 6 * expert) / expert < 1e-9);
    /* FLOPs use the k active experts, not all */
    double per_token_moe = 2 * 2 * 3.0 * 4096 * 14336 * 32;
    assert_true(t1.flops > per_token_moe && t1.flops < per_token_moe * 1.5);
}

typedef struct mem_case {
    bool moe;
    double gib;
    int tp;
    bool fits;
    int64_t blocks;
    int batch;
    double activations;
} mem_case;

static void test_memory_model(void **state)
{
    (void)state;
    /* workload: 1000 prompt + 200 output tokens = 75 blocks of 16 per request */
    const mem_case cases[] = {
        {false, 80, 1, true, 28424, 256, 564658176.0},
        {false, 80, 2, true, 64603, 256, 463994880.0},
        {false, 80, 4, true, 136960, 256, 413663232.0},
        {false, 80, 8, true, 281675, 256, 388497408.0},
        {false, 24, 1, true, 2619, 34, 564658176.0},
        {false, 24, 2, true, 12993, 173, 463994880.0},
        {false, 24, 4, true, 33741, 256, 413663232.0},
        {true, 80, 1, false, 0, 0, 543686656.0},
        {true, 80, 2, true, 27826, 256, 354942976.0},
        {true, 80, 4, true, 100371, 256, 260571136.0},
        {true, 80, 8, true, 245462, 256, 213385216.0},
    };
    perf_lengths w = {1000, 200, 1000.0 * 1000};
    loom_err e;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const mem_case *mc = &cases[i];
        model_config c = mc->moe ? mixtral8x7b() : llama8b();
        perf_model pm;
        assert_int_equal(perf_model_init(&pm, &c, "m", 2, 2, &e), LOOM_OK);
        perf_device dev = test_device(mc->gib);
        perf_setup s;
        perf_setup_init(&s, &pm, &dev, mc->tp);
        perf_memory m;
        perf_memory_plan(&s, &w, &m);
        if (fabs(m.activations - mc->activations) > 1 || m.fits != mc->fits ||
            (mc->fits && (m.kv_blocks != mc->blocks || m.max_batch != mc->batch)))
            fail_msg("case %zu (%s, %.0f GiB, tp %d): fits %d blocks %lld batch %d act %.0f", i,
                     mc->moe ? "moe" : "dense", mc->gib, mc->tp, m.fits, (long long)m.kv_blocks,
                     m.max_batch, m.activations);
        assert_true(fabs(m.usable - 0.9 * mc->gib * GIB) < 1);
        assert_true(fabs(m.weights - pm.params_total * 2 / mc->tp) < 1);
        if (!mc->fits) {
            /* "weights 87.0 GiB + reserve 1.5 GiB > 72.0 GiB usable" */
            assert_non_null(strstr(m.why, "weights 87.0 GiB"));
            assert_non_null(strstr(m.why, "> 72.0 GiB usable"));
        } else {
            assert_true(m.kv_tokens == m.kv_blocks * 16);
        }
    }
}

static void test_memory_no_request_fits(void **state)
{
    (void)state;
    loom_err e;
    model_config c = llama8b();
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &c, "m", 2, 2, &e), LOOM_OK);
    perf_device dev = test_device(24);
    perf_setup s;
    perf_setup_init(&s, &pm, &dev, 1);
    perf_lengths w = {100000, 1000, 1e10}; /* 101,000 tokens > 41,904 the KV holds */
    perf_memory m;
    perf_memory_plan(&s, &w, &m);
    assert_false(m.fits);
    assert_non_null(strstr(m.why, "one request of 101000 tokens"));
}

static void test_tp_valid(void **state)
{
    (void)state;
    loom_err e;
    model_config c = llama8b();
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &c, "m", 2, 2, &e), LOOM_OK);
    perf_device dev = test_device(80);
    char why[160];
    assert_true(perf_tp_valid(&pm, &dev, 8, why, sizeof(why)));
    assert_false(perf_tp_valid(&pm, &dev, 16, why, sizeof(why))); /* 8 KV heads */
    assert_false(perf_tp_valid(&pm, &dev, 3, why, sizeof(why)));
    assert_non_null(strstr(why, "32 heads and 8 KV heads"));
    dev.pooled = true; /* cpu threads: any degree */
    assert_true(perf_tp_valid(&pm, &dev, 3, why, sizeof(why)));
}

static void test_throughput_shape(void **state)
{
    (void)state;
    loom_err e;
    model_config c = llama8b();
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &c, "m", 2, 2, &e), LOOM_OK);
    perf_device dev = test_device(80);
    perf_setup s;
    perf_setup_init(&s, &pm, &dev, 1);
    perf_lengths w = {1000, 200, 1e6};
    perf_estimate est;
    perf_estimate_instance(&s, &w, &est);
    assert_int_equal(est.batch, 256);
    /* batch-bound: 256 running, each 199 decode steps + 1 prompt step -> x = 256/200 = 1.28
     * requests a step (1.28 x 1000 + 254.72 = 1535 tokens < the 2048 budget) */
    assert_false(est.token_bound);
    assert_true(fabs(est.requests_per_step - 1.28) < 1e-9);
    perf_step want, dec;
    perf_step_prefill(&want, 1280, 1000, 1e6);
    perf_step_decode(&dec, 1.28 * 199, 1.28 * 199 * 1099);
    perf_step_add(&want, &dec);
    assert_true(fabs(est.step.prefill_tokens - want.prefill_tokens) < 1e-6);
    assert_true(fabs(est.step.decode_seqs - want.decode_seqs) < 1e-6);
    assert_true(fabs(est.step.decode_ctx - want.decode_ctx) < 1e-3);
    assert_true(fabs(est.t_step - perf_step_seconds(&s, &want, NULL)) < 1e-9);
    /* throughput identities */
    assert_true(fabs(est.output_tokens_per_s * est.t_step - 1.28 * 200) < 1e-9);
    assert_true(fabs(est.total_tokens_per_s * est.t_step - 1.28 * 1200) < 1e-9);
    assert_true(fabs(est.requests_per_s * est.t_step - 1.28) < 1e-12);
    assert_true(est.prefill_fraction > 0 && est.prefill_fraction < 1);

    /* long prompts, short outputs: the token budget binds; a prompt spans 2 steps */
    perf_lengths lw = {4000, 10, 16e6};
    perf_estimate_instance(&s, &lw, &est);
    assert_true(est.token_bound);
    assert_true(fabs(est.requests_per_step - 2048.0 / 4009) < 1e-12);

    /* a 10x faster memory makes decode (memory-bound) faster, prefill barely */
    perf_estimate_instance(&s, &w, &est);
    perf_device fast = dev;
    fast.mem_bw *= 10;
    perf_setup s2 = s;
    s2.device = &fast;
    perf_estimate est2;
    perf_estimate_instance(&s2, &w, &est2);
    assert_true(est2.decode_tokens_per_s > 2 * est.decode_tokens_per_s);
    assert_true(est2.prefill_tokens_per_s < 1.5 * est.prefill_tokens_per_s);
    assert_true(est2.output_tokens_per_s > est.output_tokens_per_s);
    /* an instance that does not fit has zero rates */
    perf_device tiny = test_device(8);
    s2.device = &tiny;
    perf_estimate_instance(&s2, &w, &est2);
    assert_false(est2.mem.fits);
    assert_true(est2.output_tokens_per_s == 0);
}

/*
 * The profile correction: at a timed step the corrected model gives the measured time; between
 * timed decode batches (or prompt lengths) it interpolates the residual in the logarithms,
 * beyond the grid it holds the edge's; a mixed step gets each part's correction; without steps
 * nothing changes. Also the steps: list through write and parse.
 */
static void test_profile_correction(void **state)
{
    (void)state;
    loom_err e;
    model_config c = llama8b();
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &c, "m", 2, 2, &e), LOOM_OK);
    perf_device dev = test_device(80);
    perf_setup s;
    perf_setup_init(&s, &pm, &dev, 1);
    /* "measured": decode 10% slower than the model at batch 16, 10% faster at batch 64, at
     * contexts 100 and 400; prompts of 512 tokens 20% slower */
    perf_timed_step ts[5];
    const double B[4] = {16, 16, 64, 64}, ctx[4] = {100, 400, 100, 400}, f[4] = {1.1, 1.1, 0.9, 0.9};
    for (int i = 0; i < 4; i++) {
        ts[i].kind = PERF_STEP_DECODE;
        perf_step_decode(&ts[i].step, B[i], B[i] * ctx[i]);
        ts[i].seconds = f[i] * perf_step_seconds(&s, &ts[i].step, NULL);
    }
    ts[4].kind = PERF_STEP_PREFILL;
    perf_step_prefill(&ts[4].step, 512, 512, 512.0 * 512);
    ts[4].seconds = 1.2 * perf_step_seconds(&s, &ts[4].step, NULL);

    perf_setup corr = s;
    perf_setup_correct(&corr, ts, 5);
    assert_int_equal(corr.corr.n, 5);
    for (int i = 0; i < 5; i++)
        assert_true(fabs(perf_step_seconds(&corr, &ts[i].step, NULL) / ts[i].seconds - 1) < 1e-9);
    /* batch 32, halfway in log between 16 and 64: no correction; batch 128: the 64's (-10%);
     * batch 4: the 16's (+10%); context 200 at batch 16: still +10% */
    perf_step q;
    const double qb[4] = {32, 128, 4, 16}, qc[4] = {200, 200, 200, 200}, want[4] = {1, 0.9, 1.1, 1.1};
    for (int i = 0; i < 4; i++) {
        perf_step_decode(&q, qb[i], qb[i] * qc[i]);
        double r = perf_step_seconds(&corr, &q, NULL) / perf_step_seconds(&s, &q, NULL);
        if (fabs(r - want[i]) > 1e-9)
            fail_msg("batch %.0f: corrected / model %.6f, want %.2f", qb[i], r, want[i]);
    }
    /* a mixed step: each part's correction on its model time */
    perf_step mixed, pre, dec;
    perf_step_prefill(&pre, 512, 512, 512.0 * 512);
    perf_step_decode(&dec, 64, 64 * 400.0);
    mixed = pre;
    perf_step_add(&mixed, &dec);
    double want_mixed = perf_step_seconds(&s, &mixed, NULL) +
                        0.2 * perf_step_seconds(&s, &pre, NULL) -
                        0.1 * perf_step_seconds(&s, &dec, NULL);
    assert_true(fabs(perf_step_seconds(&corr, &mixed, NULL) / want_mixed - 1) < 1e-9);
    /* no steps, no change */
    perf_setup none = s;
    perf_setup_correct(&none, ts, 0);
    assert_true(perf_step_seconds(&none, &mixed, NULL) == perf_step_seconds(&s, &mixed, NULL));

    /* the steps: list survives write and parse */
    perf_profile p;
    memset(&p, 0, sizeof(p));
    snprintf(p.device, sizeof(p.device), "%s", dev.name);
    p.tp = 1;
    p.coef = s.coef;
    loom_buf b;
    buf_init(&b);
    perf_profile_write(&p, &b);
    perf_profile_write_steps(ts, 5, &b);
    perf_profile back;
    assert_int_equal(perf_profile_parse(b.data, b.len, &back, &e), LOOM_OK);
    assert_int_equal(back.n_steps, 5);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(back.steps[i].kind, ts[i].kind);
        assert_true(back.steps[i].seconds == ts[i].seconds);
        assert_true(back.steps[i].step.decode_ctx == ts[i].step.decode_ctx);
        assert_true(back.steps[i].step.prefill_pairs == ts[i].step.prefill_pairs);
    }
    buf_free(&b);
    /* a damaged step is an error that names the line */
    const char *bad = "device: cpu\ntp: 1\ncoefficients: {overhead_s: 0.001}\n"
                      "steps:\n  - {kind: sideways, seconds: 1}\n";
    assert_int_equal(perf_profile_parse(bad, strlen(bad), &back, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "sideways"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_param_counts),           cmocka_unit_test(test_step_flops),
        cmocka_unit_test(test_moe_experts_touched),    cmocka_unit_test(test_memory_model),
        cmocka_unit_test(test_memory_no_request_fits), cmocka_unit_test(test_tp_valid),
        cmocka_unit_test(test_throughput_shape),       cmocka_unit_test(test_profile_correction),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
