/*
 * Issue 2, acceptance point 2, through the engine with the real CPU model: the reference prompts
 * of each fixture give the same greedy tokens (ignore_eos) whether they run
 *   (a) one at a time, (b) all together, (c) together with max_num_batched_tokens = 5 (chunked
 *   prefill), (d) together in a KV cache just big enough for the longest request (preemption),
 *   (e) twice, the copies arriving after the first ones finished (prefix cache hits),
 * and the tokens equal the reference greedy_ids (a bf16 near-tie, top-2 logprobs within 1e-4,
 * may flip one token: it is printed and the rest of that sequence is not compared).
 * (The model-level batching invariance of the forward pass is tests/model/test_batching.c.)
 */
#include "loom/engine.h"
#include "loom/model.h"
#include "testlib.h"

#include <math.h>

enum { MAX_PROMPTS = 8, BLOCK = 4 };

typedef struct fixture {
    const char *name;
    model *m;
    int n;
    int32_t *ids[MAX_PROMPTS];
    int len[MAX_PROMPTS];
    int32_t *greedy[MAX_PROMPTS];
    int n_new[MAX_PROMPTS];
} fixture;

typedef struct outputs {
    int32_t *tok[2 * MAX_PROMPTS];
    float gap[2 * MAX_PROMPTS][64]; /* top-1 minus top-2 logprob per token */
    int n[2 * MAX_PROMPTS];
    engine_stats stats;
} outputs;

static int32_t *copy_ids(const st_tensor *t, int *n)
{
    assert_non_null(t);
    assert_int_equal(t->dtype, ST_I32);
    *n = (int)(t->nbytes / 4);
    int32_t *ids = malloc(t->nbytes + 4);
    memcpy(ids, t->data, t->nbytes); /* the mapping is only byte-aligned */
    return ids;
}

/* Loads dir (relative to ../shared) and its reference prompts; false when absent. */
static bool fixture_load(const char *shared, const char *dir, fixture *fx)
{
    memset(fx, 0, sizeof(*fx));
    fx->name = dir;
    char *path = test_path(shared, dir);
    char *ref_path = test_path(path, "reference.safetensors");
    bool ok = access(ref_path, R_OK) == 0;
    if (ok) {
        loom_err e = {0};
        if (model_load(path, &fx->m, &e))
            fail_msg("model_load %s: %s", path, e.msg);
        st_file ref;
        if (st_open(ref_path, &ref, &e))
            fail_msg("st_open %s: %s", ref_path, e.msg);
        for (int p = 0; p < MAX_PROMPTS; p++) {
            char name[64];
            snprintf(name, sizeof(name), "p%d.input_ids", p);
            const st_tensor *t = st_find(&ref, name);
            if (!t)
                break;
            fx->ids[p] = copy_ids(t, &fx->len[p]);
            snprintf(name, sizeof(name), "p%d.greedy_ids", p);
            fx->greedy[p] = copy_ids(st_find(&ref, name), &fx->n_new[p]);
            assert_true(fx->n_new[p] <= 64);
            fx->n++;
        }
        st_close(&ref);
    } else {
        printf("SKIP %s: %s is absent\n", dir, ref_path);
    }
    free(ref_path);
    free(path);
    return ok;
}

static void fixture_free(fixture *fx)
{
    for (int p = 0; p < fx->n; p++) {
        free(fx->ids[p]);
        free(fx->greedy[p]);
    }
    model_free(fx->m);
}

static void outputs_free(outputs *o)
{
    for (int i = 0; i < 2 * MAX_PROMPTS; i++)
        free(o->tok[i]);
    memset(o, 0, sizeof(*o));
}

/*
 * Runs the fixture's prompts through one engine. Request r (0..n_req) is prompt r % n, added at
 * step arrival(r): 0 for all, or one at a time (each after the previous finished: solo), or the
 * second copies after the first ones finished (twice).
 */
typedef enum { ALL, SOLO, TWICE } arrival_mode;

static void run(const fixture *fx, int num_blocks, int budget, arrival_mode mode, outputs *o)
{
    memset(o, 0, sizeof(*o));
    const model_config *mc = model_get_config(fx->m);
    engine_backend be;
    loom_err e = {0};
    if (engine_backend_cpu_create(fx->m, num_blocks, BLOCK, &be, &e))
        fail_msg("backend: %s", e.msg);
    engine_config c;
    engine_config_default(&c);
    c.block_size = BLOCK;
    c.num_kv_blocks = num_blocks;
    c.max_num_seqs = 2 * MAX_PROMPTS;
    c.max_num_batched_tokens = budget;
    engine *en;
    if (engine_create(&c, mc, be, NULL, &en, &e))
        fail_msg("engine_create: %s", e.msg);

    int n_req = mode == TWICE ? 2 * fx->n : fx->n;
    int next = 0, live = 0;
    for (int step = 0; next < n_req || engine_has_work(en); step++) {
        assert_true(step < 20000);
        /* admit per mode */
        while (next < n_req) {
            bool go = mode == ALL || (mode == SOLO && live == 0) ||
                      (mode == TWICE && (next < fx->n || live == 0));
            if (!go)
                break;
            int p = next % fx->n;
            sampling_params sp;
            sampling_params_default(&sp);
            sp.temperature = 0;
            sp.ignore_eos = true;
            sp.max_tokens = fx->n_new[p];
            sp.logprobs = 2;
            if (engine_add(en, (uint64_t)next, fx->ids[p], fx->len[p], &sp, &e))
                fail_msg("engine_add: %s", e.msg);
            o->tok[next] = calloc(64, sizeof(int32_t));
            next++;
            live++;
        }
        const engine_event *ev;
        int n_ev;
        double secs;
        assert_int_equal(engine_step(en, &ev, &n_ev, &secs, &e), 0);
        for (int k = 0; k < n_ev; k++) {
            int r = (int)ev[k].req_id;
            if (ev[k].token >= 0) {
                assert_true(o->n[r] < 64);
                o->gap[r][o->n[r]] = ev[k].top[0].logprob - ev[k].top[1].logprob;
                o->tok[r][o->n[r]++] = ev[k].token;
            }
            if (ev[k].finish != FINISH_NONE) {
                assert_int_equal(ev[k].finish, FINISH_LENGTH);
                live--;
            }
        }
        loom_err ce = {0};
        if (engine_check(en, &ce))
            fail_msg("engine_check: %s", ce.msg);
    }
    engine_get_stats(en, &o->stats);
    assert_int_equal(o->stats.num_free_blocks, num_blocks);
    engine_free(en);
}

/* Same tokens as the one-at-a-time run. */
static void expect_same(const fixture *fx, const outputs *solo, const outputs *o, int n_req,
                        const char *what)
{
    for (int r = 0; r < n_req; r++) {
        int p = r % fx->n;
        assert_int_equal(o->n[r], fx->n_new[p]);
        for (int k = 0; k < o->n[r]; k++) {
            if (o->tok[r][k] != solo->tok[p][k])
                fail_msg("%s, %s: request %d (prompt %d) token %d is %d, one at a time gave %d "
                         "(top-2 gap %.3g)",
                         fx->name, what, r, p, k, o->tok[r][k], solo->tok[p][k], solo->gap[p][k]);
        }
    }
}

static void check_fixture(const char *dir)
{
    const char *shared = test_require_shared();
    fixture fx;
    if (!fixture_load(shared, dir, &fx))
        return;
    int max_tokens = 0;
    for (int p = 0; p < fx.n; p++)
        if (fx.len[p] + fx.n_new[p] - 1 > max_tokens)
            max_tokens = fx.len[p] + fx.n_new[p] - 1;
    int tiny = (max_tokens + BLOCK - 1) / BLOCK; /* the longest request, alone */
    int roomy = 2 * fx.n * tiny;

    outputs solo, o;
    run(&fx, roomy, 2048, SOLO, &solo);
    /* against the reference */
    for (int p = 0; p < fx.n; p++) {
        assert_int_equal(solo.n[p], fx.n_new[p]);
        for (int k = 0; k < fx.n_new[p]; k++) {
            if (solo.tok[p][k] == fx.greedy[p][k])
                continue;
            if (solo.gap[p][k] < 1e-4f) {
                printf("%s: prompt %d token %d: %d vs reference %d on a near-tie (top-2 gap "
                       "%.3g); not comparing the rest of this sequence\n",
                       dir, p, k, solo.tok[p][k], fx.greedy[p][k], solo.gap[p][k]);
                break;
            }
            fail_msg("%s: prompt %d token %d is %d, reference greedy_ids has %d (top-2 gap %.3g)",
                     dir, p, k, solo.tok[p][k], fx.greedy[p][k], solo.gap[p][k]);
        }
    }

    run(&fx, roomy, 2048, ALL, &o);
    expect_same(&fx, &solo, &o, fx.n, "all together");
    assert_int_equal(o.stats.num_preempted_total, 0);
    outputs_free(&o);

    run(&fx, roomy, 5, ALL, &o);
    expect_same(&fx, &solo, &o, fx.n, "chunked prefill (budget 5)");
    outputs_free(&o);

    run(&fx, tiny, 2048, ALL, &o);
    expect_same(&fx, &solo, &o, fx.n, "tiny KV cache");
    printf("%s: tiny cache of %d blocks: %d preemptions\n", dir, tiny, o.stats.num_preempted_total);
    assert_true(o.stats.num_preempted_total > 0);
    outputs_free(&o);

    run(&fx, roomy, 2048, TWICE, &o);
    expect_same(&fx, &solo, &o, 2 * fx.n, "prefix cache");
    printf("%s: prefix cache hits %llu of %llu prompt tokens\n", dir,
           (unsigned long long)o.stats.prefix_cache_hits,
           (unsigned long long)o.stats.prefix_cache_queries);
    assert_true(o.stats.prefix_cache_hits > 0);
    outputs_free(&o);

    outputs_free(&solo);
    fixture_free(&fx);
}

static void test_tiny_llama(void **state)
{
    check_fixture("fixtures/tiny-llama");
}

static void test_tiny_mixtral(void **state)
{
    check_fixture("fixtures/tiny-mixtral");
}

static void test_shakespeare_moe(void **state)
{
    check_fixture("models/shakespeare-moe");
}

int main(void)
{
    test_require_shared();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_llama),
        cmocka_unit_test(test_tiny_mixtral),
        cmocka_unit_test(test_shakespeare_moe),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
