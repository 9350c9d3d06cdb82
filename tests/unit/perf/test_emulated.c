/*
 * The emulated backend: a step lasts what the perf model says, logits make sampling pick
 * random non-EOS tokens, impossible devices are refused, and the real engine runs on it.
 */
#include "testlib.h"

#include "loom/emulated.h"
#include "loom/engine.h"
#include "loom/perf.h"

static void need_catalog(void)
{
    if (!perf_catalog_default_path()) {
        printf("SKIP: data/devices.yaml not found\n");
        exit(TEST_SKIP_CODE);
    }
}

/* The modelled seconds of a step, computed independently of the backend's batch walk. */
static double modelled(const model_config *mc, const char *device, int tp, const perf_step *st)
{
    perf_catalog cat;
    loom_err e;
    assert_int_equal(perf_catalog_load(NULL, &cat, &e), LOOM_OK);
    const perf_device *d = perf_catalog_find(&cat, device);
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, mc, "m", d->weight_bytes, d->weight_bytes, &e), LOOM_OK);
    perf_setup s;
    perf_setup_init(&s, &pm, d, tp);
    double t = perf_step_seconds(&s, st, NULL);
    perf_catalog_free(&cat);
    return t;
}

static void test_step_time_and_logits(void **state)
{
    (void)state;
    need_catalog();
    loom_err e;
    model_config mc;
    assert_int_equal(model_config_preset("llama-1b", &mc, &e), LOOM_OK);
    engine_backend be;
    assert_int_equal(
        engine_backend_emulated_create(&mc, "V100-32G", 1, NULL, 2000, 16, 0, 0, &be, &e), LOOM_OK);
    assert_string_equal(be.name, "emulated");

    /* decode of 8 sequences with 100..107 cached tokens */
    enum { B = 8 };
    int32_t tokens[B], seq_start[B + 1], ctx[B], rows[B];
    int32_t table[4] = {0, 1, 2, 3};
    const int32_t *tables[B];
    double C = 0;
    for (int i = 0; i < B; i++) {
        tokens[i] = 5;
        seq_start[i] = i;
        ctx[i] = 100 + i;
        C += ctx[i];
        rows[i] = i;
        tables[i] = table;
    }
    seq_start[B] = B;
    model_batch b = {.n_seqs = B,
                     .n_tokens = B,
                     .tokens = tokens,
                     .seq_start = seq_start,
                     .ctx_len = ctx,
                     .block_tables = tables,
                     .n_logits = B,
                     .logit_rows = rows};
    float *logits = malloc(sizeof(float) * (size_t)B * (size_t)mc.vocab_size);
    perf_step st;
    perf_step_decode(&st, B, C);
    double want = modelled(&mc, "V100-32G", 1, &st);
    int32_t first[B];
    /* The first step lasts the modelled time; later ones keep the modelled period from start
     * to start, the host time between them (checking logits here) included. The deadlines are
     * chained and a late wake-up is taken out of the next step (up to 1 ms of learnt
     * early wake-up too), so one period may come out shorter, but step k never starts before
     * k modelled periods after the first (less that 1 ms and 0.2 ms of slack). How much
     * longer depends on the host's load (sanitizer builds on 2 shared cores), so above it
     * only a unit slip (a second instead of a millisecond) fails. */
    double first_start = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = loom_now();
        if (rep > 0) {
            double elapsed = t0 - first_start;
            if (elapsed < rep * want - 1.2e-3 || elapsed > rep * want + 1.0)
                fail_msg("step %d started %.3f ms after the first, modelled %d x %.3f ms", rep,
                         elapsed * 1e3, rep, want * 1e3);
        } else {
            first_start = t0;
        }
        assert_int_equal(be.forward(be.ctx, &b, logits, &e), LOOM_OK);
        double took = loom_now() - t0;
        if (rep == 0 && (took < want - 2e-4 || took > want + 1.0))
            fail_msg("step took %.3f ms, modelled %.3f ms", took * 1e3, want * 1e3);
        for (int r = 0; r < B; r++) {
            const float *row = logits + (size_t)r * mc.vocab_size;
            int32_t top = sampling_argmax(row, mc.vocab_size);
            assert_true(row[top] > 10);
            for (int k = 0; k < mc.n_eos; k++)
                assert_true(top != mc.eos_token_ids[k] && row[mc.eos_token_ids[k]] < -1e6);
            int big = 0;
            for (int v = 0; v < mc.vocab_size; v++)
                big += row[v] != 0 && v != top && row[v] > -1e6;
            assert_int_equal(big, 0);
            if (rep == 0)
                first[r] = top;
        }
    }
    int same = 0;
    for (int r = 0; r < B; r++)
        same += sampling_argmax(logits + (size_t)r * mc.vocab_size, mc.vocab_size) == first[r];
    assert_true(same < B); /* tokens change from step to step */
    emulated_stats stats;
    engine_backend_emulated_stats(be.ctx, &stats);
    assert_true(stats.steps == 5 && fabs(stats.last_step_seconds - want) < 1e-12);

    /* a prefill chunk of one 512-token prompt */
    int32_t ptoks[512], pstart[2] = {0, 512}, pctx[1] = {0}, prow[1] = {511};
    int32_t ptable[32];
    for (int i = 0; i < 512; i++)
        ptoks[i] = 7;
    for (int i = 0; i < 32; i++)
        ptable[i] = i;
    const int32_t *ptables[1] = {ptable};
    model_batch pb = {.n_seqs = 1,
                      .n_tokens = 512,
                      .tokens = ptoks,
                      .seq_start = pstart,
                      .ctx_len = pctx,
                      .block_tables = ptables,
                      .n_logits = 1,
                      .logit_rows = prow};
    assert_int_equal(be.forward(be.ctx, &pb, logits, &e), LOOM_OK);
    perf_step_prefill(&st, 512, 512, 512.0 * 512);
    engine_backend_emulated_stats(be.ctx, &stats);
    assert_true(fabs(stats.last_step_seconds - modelled(&mc, "V100-32G", 1, &st)) < 1e-12);
    be.destroy(be.ctx);
    free(logits);
}

static void test_refusals(void **state)
{
    (void)state;
    need_catalog();
    loom_err e;
    model_config mc;
    assert_int_equal(model_config_preset("llama-1b", &mc, &e), LOOM_OK);
    engine_backend be;
    assert_int_equal(engine_backend_emulated_create(&mc, "H900", 1, NULL, 10, 16, 0, 0, &be, &e),
                     LOOM_ENOTFOUND);
    assert_non_null(strstr(e.msg, "unknown device"));
    assert_int_equal(
        engine_backend_emulated_create(&mc, "H100-80G", 3, NULL, 10, 16, 0, 0, &be, &e),
        LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "does not divide"));
    int64_t cap = 0;
    assert_int_equal(engine_backend_emulated_capacity(&mc, "T4", 1, NULL, 16, 0, 0, 0.9, &cap, &e),
                     LOOM_OK);
    assert_true(cap > 1000);
    assert_int_equal(
        engine_backend_emulated_create(&mc, "T4", 1, NULL, (int)cap + 1, 16, 0, 0, &be, &e),
        LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "holds at most"));
    assert_int_equal(
        engine_backend_emulated_create(&mc, "T4", 1, NULL, (int)cap, 16, 0, 0, &be, &e), LOOM_OK);
    be.destroy(be.ctx);
    /* fewer running sequences reserve less activation memory: more KV fits, and the backend
     * accepts the larger count when told the engine's limits (as a plan made with them says) */
    int64_t cap8 = 0;
    assert_int_equal(
        engine_backend_emulated_capacity(&mc, "T4", 1, NULL, 16, 8, 512, 0.9, &cap8, &e), LOOM_OK);
    assert_true(cap8 > cap);
    assert_int_equal(
        engine_backend_emulated_create(&mc, "T4", 1, NULL, (int)cap8, 16, 8, 512, &be, &e),
        LOOM_OK);
    be.destroy(be.ctx);
    /* a model larger than the device */
    model_config big = mc;
    big.n_layers = 400; /* about 20 B parameters: 40 GB in bf16 on a 16 GB T4 */
    assert_int_equal(engine_backend_emulated_create(&big, "T4", 1, NULL, 10, 16, 0, 0, &be, &e),
                     LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "usable"));
}

static void test_engine_on_emulated(void **state)
{
    (void)state;
    need_catalog();
    loom_err e;
    model_config mc;
    assert_int_equal(model_config_preset("llama-tiny", &mc, &e), LOOM_OK);
    engine_backend be;
    assert_int_equal(
        engine_backend_emulated_create(&mc, "H100-80G", 2, NULL, 256, 16, 0, 0, &be, &e), LOOM_OK);
    void *ctx = be.ctx;
    engine_config cfg;
    engine_config_default(&cfg);
    cfg.num_kv_blocks = 256;
    engine *en;
    assert_int_equal(engine_create(&cfg, &mc, be, NULL, &en, &e), LOOM_OK);
    sampling_params p;
    sampling_params_default(&p);
    p.max_tokens = 12;
    p.temperature = 1.0f;
    int32_t prompt[40];
    for (int i = 0; i < 40; i++)
        prompt[i] = 10 + i;
    for (uint64_t id = 1; id <= 6; id++)
        assert_int_equal(engine_add(en, id, prompt, 40, &p, &e), LOOM_OK);
    int finished = 0, tokens = 0;
    double slept = 0, t_start = loom_now();
    for (int step = 0; step < 200 && engine_has_work(en); step++) {
        const engine_event *ev;
        int n;
        double secs;
        assert_int_equal(engine_step(en, &ev, &n, &secs, &e), LOOM_OK);
        slept += secs;
        for (int i = 0; i < n; i++) {
            tokens += ev[i].token >= 0;
            if (ev[i].finish != FINISH_NONE) {
                assert_int_equal(ev[i].finish, FINISH_LENGTH); /* never EOS */
                assert_int_equal(ev[i].completion_tokens, 12);
                finished++;
            }
        }
    }
    assert_int_equal(finished, 6);
    assert_int_equal(tokens, 72);
    emulated_stats st;
    engine_backend_emulated_stats(ctx, &st);
    /* the wall time of the steps adds up to the modelled step times: the backend sleeps for
     * the model minus the engine's own host time between steps */
    double wall = loom_now() - t_start;
    printf("wall %.4f s, modelled %.4f s\n", wall, st.modelled_seconds);
    /* never faster than the modelled device; slower only by what a loaded host adds */
    if (wall < st.modelled_seconds * 0.97 || wall > st.modelled_seconds + 1.0)
        fail_msg("wall %.4f s, modelled %.4f s", wall, st.modelled_seconds);
    assert_true(slept <= wall);
    assert_int_equal(engine_check(en, &e), LOOM_OK);
    engine_free(en);
}

/* Saturating load on an emulated V100: the steady-state output tokens/s the engine reaches (from
 * the end of the first batch to the start of the last) is what perf_estimate_instance predicts,
 * within 5% (issue 3, acceptance 3, at engine level: no server in between). */
static void test_throughput_matches_model(void **state)
{
    (void)state;
    need_catalog();
    loom_err e;
    model_config mc;
    assert_int_equal(model_config_preset("llama-tiny", &mc, &e), LOOM_OK);
    perf_catalog cat;
    assert_int_equal(perf_catalog_load(NULL, &cat, &e), LOOM_OK);
    const perf_device *dev = perf_catalog_find(&cat, "V100-32G");
    perf_model pm;
    assert_int_equal(perf_model_init(&pm, &mc, "llama-tiny", 2, 2, &e), LOOM_OK);
    perf_setup s;
    perf_setup_init(&s, &pm, dev, 1);
    s.limits.max_num_seqs = 32;
    enum { IN = 128, OUT = 32 };
    perf_lengths w = {IN, OUT, IN * IN};
    perf_estimate est;
    perf_estimate_instance(&s, &w, &est);
    assert_int_equal(est.batch, 32);

    engine_backend be;
    assert_int_equal(
        engine_backend_emulated_create(&mc, "V100-32G", 1, NULL, 4096, 16, 0, 0, &be, &e), LOOM_OK);
    engine_config cfg;
    engine_config_default(&cfg);
    cfg.num_kv_blocks = 4096;
    cfg.max_num_seqs = est.batch;
    engine *en;
    assert_int_equal(engine_create(&cfg, &mc, be, NULL, &en, &e), LOOM_OK);
    sampling_params p;
    sampling_params_default(&p);
    p.max_tokens = OUT;
    p.ignore_eos = true;
    const int n = 6 * est.batch;
    int32_t prompt[IN];
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < IN; k++) /* distinct prompts: no prefix-cache hits */
            prompt[k] = 3 + (int)(((unsigned)i * 7919u + (unsigned)k * 31u) % 2000u);
        assert_int_equal(engine_add(en, (uint64_t)i + 1, prompt, IN, &p, &e), LOOM_OK);
    }
    int done = 0;
    long tokens = 0, tok0 = 0, tok1 = 0;
    double t0 = 0, t1 = 0;
    while (engine_has_work(en)) {
        const engine_event *ev;
        int ne;
        double secs;
        assert_int_equal(engine_step(en, &ev, &ne, &secs, &e), LOOM_OK);
        for (int i = 0; i < ne; i++) {
            tokens += ev[i].token >= 0;
            if (ev[i].finish == FINISH_NONE)
                continue;
            done++;
            if (done == est.batch)
                t0 = loom_now(), tok0 = tokens;
            if (done == n - est.batch)
                t1 = loom_now(), tok1 = tokens;
        }
    }
    assert_int_equal(done, n);
    assert_int_equal(tokens, (long)n * OUT);
    double measured = (double)(tok1 - tok0) / (t1 - t0);
    printf("emulated V100: measured %.1f output tok/s, model %.1f (%+.1f%%)\n", measured,
           est.output_tokens_per_s, 100 * (measured / est.output_tokens_per_s - 1));
    /* The 5% agreement is a benchmark figure (bench/emulated_validate.sh) measured on a quiet
     * host; here only the direction that load cannot cause is checked: the emulation never
     * runs faster than the device it models. */
    if (measured > est.output_tokens_per_s * 1.05)
        fail_msg("measured %.1f output tok/s, model %.1f (%+.1f%%)", measured,
                 est.output_tokens_per_s, 100 * (measured / est.output_tokens_per_s - 1));
    engine_free(en);
    perf_catalog_free(&cat);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_step_time_and_logits),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_engine_on_emulated),
        cmocka_unit_test(test_throughput_matches_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
