/*
 * The deployment search on tiny spaces, against brute force written independently here: every
 * ordered sequence of instance degrees (symmetric duplicates included) for each machine, every
 * subset of machines for min-cost. Plus the planner's impossible inputs.
 */
#include "testlib.h"

#include "loom/plan.h"

/* Small synthetic devices, so that memory decides which degrees fit. */
static const char *catalog_text =
    "devices:\n"
    "  - {name: S, memory_gib: 1.2, bf16_tflops: 20, mem_bw_gbs: 300, link: PCIe, link_bw_gbs: 16,"
    " link_latency_us: 8, runtime_overhead_gib: 0.1, cost_per_hour: 0.5}\n"
    "  - {name: M, memory_gib: 2.5, bf16_tflops: 60, mem_bw_gbs: 900, link: NVLink, link_bw_gbs: "
    "150,"
    " link_latency_us: 3, runtime_overhead_gib: 0.1, cost_per_hour: 2}\n"
    "  - {name: L, memory_gib: 8, bf16_tflops: 300, mem_bw_gbs: 2000, link: NVLink, link_bw_gbs: "
    "300,"
    " link_latency_us: 2, runtime_overhead_gib: 0.2, cost_per_hour: 6,"
    " efficiency: {overhead_s: 0.003}}\n"
    "  - {name: C, memory_gib: 2, bf16_tflops: 0.1, mem_bw_gbs: 10, runtime_overhead_gib: 0.05,"
    " weight_bytes: 4, pooled: true, cost_per_hour: 0.05}\n";

static perf_catalog catalog;

static int setup(void **state)
{
    (void)state;
    loom_err e;
    if (perf_catalog_parse(catalog_text, strlen(catalog_text), &catalog, &e))
        fail_msg("%s", e.msg);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    perf_catalog_free(&catalog);
    return 0;
}

/* ---------------------------------------------------------------- brute force */

typedef struct bf_best {
    double tokens;   /* max output tok/s of one machine */
    double requests; /* its request rate */
    double ratio;    /* max tokens per dollar-hour of the devices in use */
    double top[4];   /* the four best distinct scores (throughput) */
    int n_top;
} bf_best;

/* One instance's output tok/s on dev at tp, or -1 when the degree is not allowed. */
static double instance_rate(const model_config *mc, const perf_device *dev, int tp,
                            const perf_lengths *w, const plan_options *o, double *req)
{
    bool pooled = dev->pooled;
    if (!pooled && (mc->n_heads % tp || mc->n_kv_heads % tp))
        return -1;
    perf_model pm;
    loom_err e;
    assert_int_equal(perf_model_init(&pm, mc, "m", dev->weight_bytes, dev->weight_bytes, &e),
                     LOOM_OK);
    perf_setup s;
    perf_setup_init(&s, &pm, dev, tp);
    s.limits = o->limits;
    perf_estimate est;
    perf_estimate_instance(&s, w, &est);
    if (!est.mem.fits)
        return -1;
    *req = est.requests_per_s;
    return est.output_tokens_per_s;
}

static void bf_note(bf_best *b, double score)
{
    for (int i = 0; i < b->n_top; i++)
        if (fabs(b->top[i] - score) <= 1e-9 * score)
            return;
    if (b->n_top < 4)
        b->top[b->n_top++] = score;
    else if (score > b->top[3])
        b->top[3] = score;
    for (int i = b->n_top - 1; i > 0 && b->top[i] > b->top[i - 1]; i--) {
        double t = b->top[i];
        b->top[i] = b->top[i - 1];
        b->top[i - 1] = t;
    }
}

/* Every ordered sequence of degrees with sum <= left. */
static void bf_walk(const double *rate, const double *req, int count, int left, int used,
                    double tokens, double requests, int n_inst, double dev_cost, bf_best *b)
{
    if (n_inst > 0) {
        if (tokens > b->tokens + 1e-12) {
            b->tokens = tokens;
            b->requests = requests;
        }
        double ratio = tokens / (dev_cost * used);
        if (ratio > b->ratio)
            b->ratio = ratio;
        bf_note(b, tokens);
    }
    for (int tp = 1; tp <= left; tp++)
        if (rate[tp] >= 0)
            bf_walk(rate, req, count, left - tp, used + tp, tokens + rate[tp], requests + req[tp],
                    n_inst + 1, dev_cost, b);
}

static bf_best brute_machine(const model_config *mc, const perf_device *dev, int count,
                             const perf_lengths *w, const plan_options *o)
{
    double rate[16], req[16];
    for (int tp = 1; tp <= count; tp++)
        rate[tp] = instance_rate(mc, dev, tp, w, o, &req[tp]);
    bf_best b;
    memset(&b, 0, sizeof(b));
    b.tokens = -1;
    bf_walk(rate, req, count, count, 0, 0, 0, 0, dev->cost_per_hour, &b);
    return b;
}

/* ---------------------------------------------------------------- tests */

static void random_cluster(loom_rng *rng, plan_cluster *c, int n)
{
    static const char *devs[] = {"S", "M", "L", "C"};
    c->n = n;
    c->machines = calloc((size_t)n, sizeof(plan_machine));
    for (int i = 0; i < n; i++) {
        plan_machine *m = &c->machines[i];
        snprintf(m->name, sizeof(m->name), "m%d", i);
        snprintf(m->device, sizeof(m->device), "%s", devs[rng_next(rng) % 4]);
        m->count = 1 + (int)(rng_next(rng) % 7);
        m->line = i + 2;
    }
}

static void test_search_vs_brute_force(void **state)
{
    (void)state;
    const char *models[] = {"llama-1b", "qwen2-tiny", "mixtral-1b", "llama-125m"};
    const char *lens[][2] = {{"512", "128"}, {"2000", "500"}, {"100:3000", "10:400"}};
    loom_rng rng;
    rng_seed(&rng, 42);
    int checked = 0;
    for (int trial = 0; trial < 24; trial++) {
        loom_err e;
        model_config mc;
        assert_int_equal(model_config_preset(models[trial % 4], &mc, &e), LOOM_OK);
        plan_workload w;
        assert_int_equal(plan_workload_synthetic(lens[trial % 3][0], lens[trial % 3][1], &w, &e),
                         LOOM_OK);
        plan_cluster c;
        random_cluster(&rng, &c, 1 + (int)(rng_next(&rng) % 6));
        plan_options o;
        plan_options_default(&o);
        o.limits.max_num_seqs = 64;
        o.runner_ups = 3;
        for (int obj = 0; obj < 2; obj++) {
            o.objective = obj ? PLAN_OBJ_PER_COST : PLAN_OBJ_THROUGHPUT;
            plan_result r;
            int rc = plan_run(&c, &mc, models[trial % 4], &w, &catalog, &o, &r, &e);
            double total = 0;
            bool any = false;
            for (int i = 0; i < c.n; i++) {
                const perf_device *dev = perf_catalog_find(&catalog, c.machines[i].device);
                perf_lengths pl;
                plan_workload_lengths(&w, &pl);
                bf_best b = brute_machine(&mc, dev, c.machines[i].count, &pl, &o);
                if (b.tokens < 0) {
                    if (rc == LOOM_OK)
                        assert_false(r.kinds[r.machine_kind[i]].feasible);
                    continue;
                }
                any = true;
                assert_int_equal(rc, LOOM_OK);
                const plan_kind *k = &r.kinds[r.machine_kind[i]];
                assert_true(k->feasible && !k->truncated);
                if (obj == 0) {
                    if (fabs(k->best.tokens_per_s - b.tokens) > 1e-9 * b.tokens)
                        fail_msg("trial %d machine %d (%d x %s): search %.6f, brute force %.6f",
                                 trial, i, k->count, dev->name, k->best.tokens_per_s, b.tokens);
                    /* the runner-ups are the next distinct scores */
                    for (int j = 0; j < k->n_runner_ups && j + 1 < b.n_top; j++)
                        assert_true(fabs(k->runner_ups[j].tokens_per_s - b.top[j + 1]) <=
                                    1e-9 * b.top[j + 1]);
                    total += b.tokens;
                } else {
                    assert_true(fabs(k->best.score - b.ratio) <= 1e-9 * b.ratio);
                }
                checked++;
            }
            if (!any) {
                assert_int_equal(rc, LOOM_EINVAL);
                assert_non_null(strstr(e.msg, "fits on no machine"));
                break;
            }
            if (obj == 0)
                assert_true(fabs(r.tokens_per_s - total) <= 1e-9 * total);
            plan_result_free(&r);
        }
        plan_cluster_free(&c);
    }
    assert_true(checked > 40);
}

static void test_min_cost_vs_brute_force(void **state)
{
    (void)state;
    loom_rng rng;
    rng_seed(&rng, 7);
    for (int trial = 0; trial < 12; trial++) {
        loom_err e;
        model_config mc;
        assert_int_equal(model_config_preset(trial % 2 ? "llama-125m" : "qwen2-tiny", &mc, &e),
                         LOOM_OK);
        plan_workload w;
        assert_int_equal(plan_workload_synthetic("300", "100", &w, &e), LOOM_OK);
        plan_cluster c;
        random_cluster(&rng, &c, 4 + (int)(rng_next(&rng) % 7));
        for (int i = 0; i < c.n; i++) /* machine prices with some spread */
            c.machines[i].cost_per_hour = 1 + (double)(rng_next(&rng) % 50) / 10;
        plan_options o;
        plan_options_default(&o);
        /* per-machine rates (each machine at its best partition), by brute force */
        double rate[16], cost[16], capacity = 0;
        for (int i = 0; i < c.n; i++) {
            perf_lengths pl;
            plan_workload_lengths(&w, &pl);
            bf_best b = brute_machine(&mc, perf_catalog_find(&catalog, c.machines[i].device),
                                      c.machines[i].count, &pl, &o);
            rate[i] = b.tokens > 0 ? b.requests : 0;
            cost[i] = c.machines[i].cost_per_hour;
            capacity += rate[i];
        }
        o.objective = PLAN_OBJ_MIN_COST;
        o.target_rate = capacity * (0.2 + 0.6 * rng_uniform(&rng));
        double best = INFINITY;
        for (unsigned mask = 1; mask < (1u << c.n); mask++) {
            double r = 0, k = 0;
            for (int i = 0; i < c.n; i++)
                if (mask & (1u << i))
                    r += rate[i], k += cost[i];
            if (r >= o.target_rate * (1 - 1e-12) && k < best)
                best = k;
        }
        plan_result res;
        if (plan_run(&c, &mc, "m", &w, &catalog, &o, &res, &e) != LOOM_OK)
            fail_msg("trial %d: %s", trial, e.msg);
        assert_true(res.min_cost_proven);
        if (fabs(res.cost_per_hour - best) > 1e-9 * best)
            fail_msg("trial %d: min-cost %.4f, brute force %.4f", trial, res.cost_per_hour, best);
        assert_true(res.requests_per_s >= o.target_rate * (1 - 1e-9));
        plan_result_free(&res);
        /* a target above the capacity is refused */
        o.target_rate = capacity * 1.01;
        assert_int_equal(plan_run(&c, &mc, "m", &w, &catalog, &o, &res, &e), LOOM_EINVAL);
        assert_non_null(strstr(e.msg, "exceeds the cluster's capacity"));
        plan_cluster_free(&c);
    }
}

static void test_duplicates_share_one_search(void **state)
{
    (void)state;
    loom_err e;
    model_config mc;
    assert_int_equal(model_config_preset("llama-1b", &mc, &e), LOOM_OK);
    plan_workload w;
    assert_int_equal(plan_workload_synthetic("512", "128", &w, &e), LOOM_OK);
    const char *text = "machines:\n"
                       "  - {name: a, device: L, count: 8, replicas: 500}\n"
                       "  - {name: b, device: M, count: 4, replicas: 300}\n"
                       "  - {name: c, device: L, count: 8, replicas: 2, cost_per_hour: 1}\n";
    plan_cluster c;
    assert_int_equal(plan_cluster_parse(text, strlen(text), &c, &e), LOOM_OK);
    plan_options o;
    plan_options_default(&o);
    plan_result r;
    assert_int_equal(plan_run(&c, &mc, "llama-1b", &w, &catalog, &o, &r, &e), LOOM_OK);
    assert_int_equal(r.n_kinds, 3); /* (L, 8, $48), (M, 4, $8), (L, 8, $1) */
    assert_int_equal(r.n_machines_used, 802);
    for (int k = 0; k < r.n_kinds; k++)
        assert_true(r.kinds[k].nodes < 200); /* multisets of {1,2,4,8} with sum <= 8, pruned */
    /* the plan file round-trips and checks against the cluster and the memory model */
    plan_file pf, back;
    assert_int_equal(plan_result_to_file(&r, &pf, &e), LOOM_OK);
    assert_int_equal(pf.n_instances, r.n_instances);
    loom_buf b;
    buf_init(&b);
    plan_file_write(&pf, &b);
    assert_int_equal(plan_file_parse(b.data, b.len, &back, &e), LOOM_OK);
    assert_true(plan_file_equal(&pf, &back));
    if (plan_file_check(&back, &c, &mc, &catalog, &o, &e) != LOOM_OK)
        fail_msg("%s", e.msg);
    buf_free(&b);
    plan_file_free(&pf);
    plan_file_free(&back);
    /* the explanation exists for a configuration in the cluster, not for others */
    loom_buf x;
    buf_init(&x);
    assert_int_equal(plan_explain(&r, "L", 2, &x, &e), LOOM_OK);
    assert_non_null(strstr(x.data, "decode step"));
    buf_free(&x);
    buf_init(&x);
    assert_int_equal(plan_explain(&r, "S", 1, &x, &e), LOOM_ENOTFOUND);
    buf_free(&x);
    plan_result_free(&r);
    plan_cluster_free(&c);
}

/* A pooled machine with many cores: every degree 1..128 is a candidate, far too many partitions
 * to list, yet the bound settles it without hitting the node limit, and the answer beats every
 * uniform partition. */
static void test_many_cores(void **state)
{
    (void)state;
    loom_err e;
    model_config mc;
    assert_int_equal(model_config_preset("llama-tiny", &mc, &e), LOOM_OK);
    plan_workload w;
    assert_int_equal(plan_workload_synthetic("256", "64", &w, &e), LOOM_OK);
    const char *text = "machines:\n  - {name: box, device: C, count: 128, cost_per_hour: 6.4}\n";
    plan_cluster c;
    assert_int_equal(plan_cluster_parse(text, strlen(text), &c, &e), LOOM_OK);
    plan_options o;
    plan_options_default(&o);
    for (int obj = 0; obj < 2; obj++) {
        o.objective = obj ? PLAN_OBJ_PER_COST : PLAN_OBJ_THROUGHPUT;
        plan_result r;
        assert_int_equal(plan_run(&c, &mc, "llama-tiny", &w, &catalog, &o, &r, &e), LOOM_OK);
        const plan_kind *k = &r.kinds[0];
        assert_false(k->truncated);
        assert_true(k->nodes < 200000);
        assert_int_equal(k->n_tps, 128);
        for (int j = 0; j < k->n_tps; j++) {
            const plan_config *cf = k->tps[j];
            double uniform = (128 / cf->tp) * cf->est.output_tokens_per_s;
            double ratio = uniform / (0.05 * (128 / cf->tp) * cf->tp);
            assert_true(obj ? k->best.score >= ratio * (1 - 1e-12)
                            : k->best.tokens_per_s >= uniform * (1 - 1e-12));
        }
        plan_result_free(&r);
    }
    plan_cluster_free(&c);
}

static void test_impossible_inputs(void **state)
{
    (void)state;
    loom_err e;
    model_config mc;
    assert_int_equal(model_config_preset("llama-1b", &mc, &e), LOOM_OK);
    plan_workload w;
    assert_int_equal(plan_workload_synthetic("512", "128", &w, &e), LOOM_OK);
    plan_options o;
    plan_options_default(&o);
    plan_result r;
    plan_cluster c;
    const char *unknown = "machines:\n  - {name: a, device: S, count: 2}\n"
                          "  - {name: b, device: X1000, count: 2}\n";
    assert_int_equal(plan_cluster_parse(unknown, strlen(unknown), &c, &e), LOOM_OK);
    assert_int_equal(plan_run(&c, &mc, "m", &w, &catalog, &o, &r, &e), LOOM_ENOTFOUND);
    assert_non_null(strstr(e.msg, "machine 'b' (line 3): unknown device 'X1000'"));
    plan_cluster_free(&c);

    /* larger than every machine: S and M hold 1.1 and 2.4 GiB, llama-1b is 1.7 GB in bf16
     * and a single device of each */
    const char *small = "machines:\n  - {name: a, device: S, count: 1}\n";
    assert_int_equal(plan_cluster_parse(small, strlen(small), &c, &e), LOOM_OK);
    assert_int_equal(plan_run(&c, &mc, "llama-1b", &w, &catalog, &o, &r, &e), LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "llama-1b fits on no machine"));
    assert_non_null(strstr(e.msg, "TP=1 on S: weights"));

    /* a degree that divides nothing */
    o.n_tp_allowed = 1;
    o.tp_allowed[0] = 3;
    assert_int_equal(plan_run(&c, &mc, "llama-1b", &w, &catalog, &o, &r, &e), LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "TP=3: 3 does not divide 32 heads and 8 KV heads"));
    plan_options_default(&o);

    /* an empty workload */
    plan_workload empty;
    memset(&empty, 0, sizeof(empty));
    assert_int_equal(plan_run(&c, &mc, "llama-1b", &empty, &catalog, &o, &r, &e), LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "workload is empty"));

    /* costs needed but absent */
    plan_cluster_free(&c);
    const char *nocost = "machines:\n  - {name: a, device: L, count: 1}\n";
    assert_int_equal(plan_cluster_parse(nocost, strlen(nocost), &c, &e), LOOM_OK);
    perf_catalog free_cat;
    const char *cat2 = "devices:\n  - {name: L, memory_gib: 8, bf16_tflops: 300, "
                       "mem_bw_gbs: 2000, link_bw_gbs: 300, link: NVLink}\n";
    assert_int_equal(perf_catalog_parse(cat2, strlen(cat2), &free_cat, &e), LOOM_OK);
    o.objective = PLAN_OBJ_PER_COST;
    assert_int_equal(plan_run(&c, &mc, "m", &w, &free_cat, &o, &r, &e), LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "needs costs"));
    /* min-cost without a rate (synthetic workloads have no arrivals) */
    o.objective = PLAN_OBJ_MIN_COST;
    assert_int_equal(plan_run(&c, &mc, "m", &w, &catalog, &o, &r, &e), LOOM_EINVAL);
    assert_non_null(strstr(e.msg, "target rate"));
    perf_catalog_free(&free_cat);
    plan_cluster_free(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_search_vs_brute_force),
        cmocka_unit_test(test_min_cost_vs_brute_force),
        cmocka_unit_test(test_duplicates_share_one_search),
        cmocka_unit_test(test_many_cores),
        cmocka_unit_test(test_impossible_inputs),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
