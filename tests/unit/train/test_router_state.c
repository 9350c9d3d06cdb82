/*
 * Router state in checkpoints (issue 7): test_loop's bitwise resume, for every router that has
 * state besides its parameters: the group-limited balance bias (moved after every step), the
 * jitter generator (topk, switch, LocMoE with jitter on) and the hash table. The resumed model
 * is created with another seed, so its own generators and table differ from the run's: only
 * the checkpoint can make it continue bit for bit. A control run that keeps the fresh model's
 * router state shows that the state matters (its losses differ).
 */
#include "testlib.h"
#include "train_testlib.h"

#include "../../../src/train/router_state.h"
#include "../../../src/train/train_internal.h"

enum { B = 4, T = 16, V = 64, STEPS = 6, HALF = 3 };

typedef struct router_case {
    const char *router;
    float jitter;
    float bias_rate; /* group_limited: a step large enough to change choices within the test */
} router_case;

static train_model *make_model(const router_case *rc, uint64_t seed)
{
    model_config mc = {0};
    mc.arch = ARCH_MIXTRAL;
    mc.vocab_size = V;
    mc.hidden_size = 32;
    mc.intermediate_size = 24;
    mc.n_layers = 2;
    mc.n_heads = 4;
    mc.n_kv_heads = 2;
    mc.head_dim = 8;
    mc.rms_norm_eps = 1e-5f;
    mc.rope_theta = 10000.0f;
    mc.max_position_embeddings = 64;
    mc.n_experts = 4;
    mc.n_experts_per_tok = 2;
    mc.bos_token_id = -1;
    train_config c;
    train_config_default(&c, &mc, B, T);
    c.aux_coef = 0.01;
    c.seed = seed;
    loom_err e = {0};
    assert_int_equal(train_config_set_router(&c, rc->router, &e), 0);
    train_model *m = NULL;
    assert_int_equal(train_model_create(&c, NULL, &m, &e), 0);
    train_model_init_random(m, seed);
    if (rc->jitter > 0)
        assert_int_equal(train_router_set_jitter(m, rc->jitter, &e), 0);
    for (int l = 0; l < mc.n_layers; l++)
        if (rc->bias_rate > 0)
            m->moe[l].router.cfg.bias_rate = rc->bias_rate;
    return m;
}

static void synthetic_data(train_data *d)
{
    train_test_stream(d, 4000, V, 1, 3);
}

static void run_steps(train_model *m, train_adamw *o, const train_data *d,
                      const train_step_config *sc, int from, int to, double *losses)
{
    loom_err e = {0};
    for (int s = from; s < to; s++) {
        train_step_result r;
        if (train_step(m, o, d, sc, s, &r, &e))
            fail_msg("step %d: %s", s, e.msg);
        losses[s] = r.loss;
    }
}

static void check_resume(const router_case *rc)
{
    train_data d;
    synthetic_data(&d);
    train_opt_config oc;
    train_opt_config_default(&oc);
    oc.steps = STEPS;
    oc.warmup = 2;
    train_step_config sc = {.batch = B, .seq_len = T, .accum = 2, .seed = 5};
    loom_err e = {0};
    double la[STEPS], lb[STEPS], lc[STEPS], lx[STEPS];

    /* uninterrupted */
    train_model *a = make_model(rc, 11);
    train_adamw oa;
    assert_int_equal(train_adamw_init(&oa, &oc, train_model_n_params(a), &e), 0);
    run_steps(a, &oa, &d, &sc, 0, STEPS, la);

    /* HALF steps and a checkpoint */
    char tmpl[] = "/tmp/loom-router-state-XXXXXX";
    char *dir = mkdtemp(tmpl);
    assert_non_null(dir);
    char *ck = test_path(dir, "ckpt.safetensors");
    train_model *b = make_model(rc, 11);
    train_adamw ob;
    assert_int_equal(train_adamw_init(&ob, &oc, train_model_n_params(b), &e), 0);
    run_steps(b, &ob, &d, &sc, 0, HALF, lb);
    assert_int_equal(train_checkpoint_save(b, &ob, HALF, sc.seed, ck, &e), 0);
    train_model_free(b);
    train_adamw_free(&ob);

    /* resumed by a model of another seed: its generators and hash table are not the run's */
    train_model *c = make_model(rc, 77);
    train_adamw occ;
    assert_int_equal(train_adamw_init(&occ, &oc, train_model_n_params(c), &e), 0);
    assert_int_equal(train_checkpoint_load(c, &occ, NULL, NULL, ck, &e), 0);
    run_steps(c, &occ, &d, &sc, HALF, STEPS, lc);
    for (int s = HALF; s < STEPS; s++)
        assert_true(lc[s] == la[s]);
    assert_memory_equal(train_model_params(a), train_model_params(c),
                        train_model_n_params(a) * sizeof(float));
    assert_memory_equal(oa.m, occ.m, train_model_n_params(a) * sizeof(float));
    for (int l = 0; l < 2; l++) {
        const moe_router *ra = &a->moe[l].router, *rcr = &c->moe[l].router;
        assert_memory_equal(ra->rng.s, rcr->rng.s, sizeof(ra->rng.s));
        if (ra->balance_bias)
            assert_memory_equal(ra->balance_bias, rcr->balance_bias, 4 * sizeof(float));
    }

    /* control: the same checkpoint, but the router state put back to the fresh model's */
    train_model *x = make_model(rc, 77), *fresh = make_model(rc, 77);
    train_adamw ox;
    assert_int_equal(train_adamw_init(&ox, &oc, train_model_n_params(x), &e), 0);
    assert_int_equal(train_checkpoint_load(x, &ox, NULL, NULL, ck, &e), 0);
    for (int l = 0; l < 2; l++) {
        moe_router *rx = &x->moe[l].router, *rf = &fresh->moe[l].router;
        rx->rng = rf->rng;
        if (rx->balance_bias)
            memcpy(rx->balance_bias, rf->balance_bias, 4 * sizeof(float));
        if (rx->hash_table)
            memcpy(rx->hash_table, rf->hash_table, V * sizeof(int32_t));
    }
    run_steps(x, &ox, &d, &sc, HALF, STEPS, lx);
    bool differs = false;
    for (int s = HALF; s < STEPS; s++)
        differs |= lx[s] != la[s];
    printf("%-14s jitter %.2f: resumed losses bit-identical (%.6f -> %.6f); without the router "
           "state the last loss is %.6f\n",
           rc->router, rc->jitter, la[HALF], la[STEPS - 1], lx[STEPS - 1]);
    assert_true(differs);

    unlink(ck);
    rmdir(dir);
    free(ck);
    train_model_free(a);
    train_model_free(c);
    train_model_free(x);
    train_model_free(fresh);
    train_adamw_free(&oa);
    train_adamw_free(&occ);
    train_adamw_free(&ox);
    train_data_free(&d);
}

static void test_group_limited(void **state)
{
    (void)state;
    router_case rc = {"group_limited", 0.0f, 0.05f};
    check_resume(&rc);
}

static void test_group_limited_jitter(void **state)
{
    (void)state;
    router_case rc = {"group_limited", 0.2f, 0.05f};
    check_resume(&rc);
}

static void test_topk_jitter(void **state)
{
    (void)state;
    router_case rc = {"mixtral", 0.3f, 0.0f};
    check_resume(&rc);
}

static void test_switch_jitter(void **state)
{
    (void)state;
    router_case rc = {"switch", 0.3f, 0.0f};
    check_resume(&rc);
}

static void test_locmoe_jitter(void **state)
{
    (void)state;
    router_case rc = {"locmoe", 0.3f, 0.0f};
    check_resume(&rc);
}

static void test_hash(void **state)
{
    (void)state;
    router_case rc = {"hash", 0.0f, 0.0f};
    check_resume(&rc);
}

/* a checkpoint's router state does not fit a model with another router */
static void test_mismatch(void **state)
{
    (void)state;
    router_case gl = {"group_limited", 0.0f, 0.05f}, hs = {"hash", 0.0f, 0.0f};
    train_model *g = make_model(&gl, 1), *h = make_model(&hs, 1);
    char tmpl[] = "/tmp/loom-router-state-XXXXXX";
    char *dir = mkdtemp(tmpl);
    char *ck = test_path(dir, "ckpt.safetensors");
    loom_err e = {0};
    assert_int_equal(train_checkpoint_save(h, NULL, 0, 1, ck, &e), 0);
    /* same parameter count? the hash router has no gate, so the shapes already differ */
    assert_int_not_equal(train_checkpoint_load(g, NULL, NULL, NULL, ck, &e), 0);
    printf("hash checkpoint into group_limited: %s\n", e.msg);
    unlink(ck);
    rmdir(dir);
    free(ck);
    train_model_free(g);
    train_model_free(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_group_limited), cmocka_unit_test(test_group_limited_jitter),
        cmocka_unit_test(test_topk_jitter),   cmocka_unit_test(test_switch_jitter),
        cmocka_unit_test(test_locmoe_jitter), cmocka_unit_test(test_hash),
        cmocka_unit_test(test_mismatch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
