/*
 * LoomMoeForCausalLM exports (issue 7): a model trained a few steps with each non-Mixtral
 * router (switch, hash, LocMoE, group-limited with a moved balance bias) is exported, loaded by
 * the serving engine (model_load), and its logits over a two-sequence batch equal the trainer's
 * forward logits (relative 1e-4). The export also seeds a new trainer (--init): the same logits
 * again. Expert choice refuses to load with a reason.
 */
#include "testlib.h"
#include "train_testlib.h"

#include "loom/model.h"
#include "loom/tensor.h"
#include "loom/train.h"

#include "../../../src/train/router_state.h"

#include <sys/stat.h>

enum { B = 2, T = 12, V = 64, E = 4, D = 32 };

static void small_config(train_config *c, const char *router)
{
    model_config mc = {0};
    mc.arch = ARCH_MIXTRAL;
    mc.vocab_size = V;
    mc.hidden_size = D;
    mc.intermediate_size = 24;
    mc.n_layers = 2;
    mc.n_heads = 4;
    mc.n_kv_heads = 2;
    mc.head_dim = 8;
    mc.rms_norm_eps = 1e-5f;
    mc.rope_theta = 10000.0f;
    mc.max_position_embeddings = 64;
    mc.n_experts = E;
    mc.n_experts_per_tok = 2;
    mc.bos_token_id = -1;
    train_config_default(c, &mc, B, T);
    c->aux_coef = 0.01;
    loom_err e = {0};
    assert_int_equal(train_config_set_router(c, router, &e), 0);
}

static void synthetic_data(train_data *d)
{
    train_test_stream(d, 3000, V, 3, 7);
}

static char *tmpdir(void)
{
    char tmpl[] = "/tmp/loom-router-export-XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return strdup(d);
}

static void rm_export(char *dir)
{
    static const char *const files[] = {"config.json", "model.safetensors"};
    for (size_t i = 0; i < 2; i++) {
        char *p = test_path(dir, files[i]);
        unlink(p);
        free(p);
    }
    rmdir(dir);
    free(dir);
}

/* the batch: two sequences of T tokens, every row's logits */
static int32_t tok[B * T];

static double rel_diff(const float *a, const float *ref, size_t n)
{
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        md = fmax(md, fabs((double)a[i] - ref[i]));
        mr = fmax(mr, fabs(ref[i]));
    }
    return md / mr;
}

/* Engine logits (B*T, V) of the export in dir over tok; 0 or the load error. */
static int engine_logits(const char *dir, float *logits, loom_err *e)
{
    model *em = NULL;
    int rc = model_load(dir, &em, e);
    if (rc)
        return rc;
    const model_config *c = model_get_config(em);
    assert_int_equal(c->arch, ARCH_LOOM_MOE);
    model_kv kv;
    assert_int_equal(model_kv_init(&kv, c, 8, 16, e), 0);
    int32_t b0[1] = {0}, b1[1] = {1}, seq_start[3] = {0, T, 2 * T}, ctx[2] = {0, 0}, rows[B * T];
    for (int t = 0; t < B * T; t++)
        rows[t] = t;
    const int32_t *tables[2] = {b0, b1};
    model_batch b = {.n_seqs = B,
                     .n_tokens = B * T,
                     .tokens = tok,
                     .seq_start = seq_start,
                     .ctx_len = ctx,
                     .block_tables = tables,
                     .n_logits = B * T,
                     .logit_rows = rows};
    rc = model_forward(em, &kv, &b, logits, e);
    model_kv_free(&kv);
    model_free(em);
    return rc;
}

static void check_router(const char *router)
{
    train_config c;
    small_config(&c, router);
    train_model *m = NULL;
    loom_err e = {0};
    assert_int_equal(train_model_create(&c, NULL, &m, &e), 0);
    train_model_init_random(m, 5);

    /* a few steps, so the gates have learnt something and group-limited's bias has moved */
    train_data d;
    synthetic_data(&d);
    train_opt_config oc;
    train_opt_config_default(&oc);
    oc.steps = 3;
    oc.warmup = 1;
    oc.lr = 1e-2;
    train_adamw o;
    assert_int_equal(train_adamw_init(&o, &oc, train_model_n_params(m), &e), 0);
    train_step_config sc = {.batch = B, .seq_len = T, .accum = 1, .seed = 3};
    for (int s = 0; s < 3; s++) {
        train_step_result r;
        assert_int_equal(train_step(m, &o, &d, &sc, s, &r, &e), 0);
    }
    /* a bias large enough to change choices (sigmoid scores sit near 0.5): 60 more moves */
    for (int i = 0; i < 60; i++)
        train_router_update_balance(m);

    for (int t = 0; t < B * T; t++)
        tok[t] = (int32_t)((11 * t + 5 + (t >= T ? 17 : 0)) % V);
    train_loss lo;
    assert_int_equal(train_forward(m, tok, NULL, B, T, &lo, &e), 0);
    size_t n = (size_t)B * T * V;
    float *ref = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float));
    memcpy(ref, train_logits(m), n * sizeof(float));

    char *dir = tmpdir();
    if (train_export_hf(m, dir, NULL, &e))
        fail_msg("%s", e.msg);
    if (engine_logits(dir, got, &e))
        fail_msg("%s: model_load/forward of the export: %s", router, e.msg);
    double r1 = rel_diff(got, ref, n);

    if (!strcmp(router, "group_limited")) { /* the bias is in the export, and not zero */
        st_set s;
        assert_int_equal(st_set_open_dir(dir, &s, &e), 0);
        const st_tensor *tb =
            st_set_find(&s, "model.layers.1.block_sparse_moe.gate.e_score_correction_bias");
        assert_non_null(tb);
        float bias[E];
        assert_int_equal(st_tensor_to_f32(tb, bias, &e), 0);
        double babs = 0;
        for (int x = 0; x < E; x++)
            babs += fabs(bias[x]);
        printf("group_limited: |balance bias| of layer 1 = %.3f\n", babs);
        assert_true(babs > 0.05);
        st_set_close(&s);
    }

    /* --init from the export: the trainer rebuilt from config.json and the tensors */
    train_config c2;
    assert_int_equal(train_config_from_hf(&c2, dir, B, T, &e), 0);
    c2.seed = 99; /* the hash table must come from the export, not this seed */
    train_model *m2 = NULL;
    assert_int_equal(train_model_create(&c2, NULL, &m2, &e), 0);
    train_model_init_random(m2, 99);
    if (train_model_load_hf(m2, dir, &e))
        fail_msg("%s: --init from the export: %s", router, e.msg);
    assert_int_equal(train_forward(m2, tok, NULL, B, T, &lo, &e), 0);
    double r2 = rel_diff(train_logits(m2), ref, n);
    printf("%-14s engine vs trainer logits max|d|/max = %.2e; --init trainer %.2e\n", router, r1,
           r2);
    assert_true(r1 < 1e-4);
    assert_true(r2 < 1e-6);

    train_model_free(m2);
    rm_export(dir);
    free(ref);
    free(got);
    train_adamw_free(&o);
    train_data_free(&d);
    train_model_free(m);
}

static void test_switch(void **state)
{
    (void)state;
    check_router("switch");
}

static void test_hash(void **state)
{
    (void)state;
    check_router("hash");
}

static void test_locmoe(void **state)
{
    (void)state;
    check_router("locmoe");
}

static void test_group_limited(void **state)
{
    (void)state;
    check_router("group_limited");
}

static void test_expert_choice_refused(void **state)
{
    (void)state;
    train_config c;
    small_config(&c, "expert_choice");
    train_model *m = NULL;
    loom_err e = {0};
    assert_int_equal(train_model_create(&c, NULL, &m, &e), 0);
    train_model_init_random(m, 5);
    char *dir = tmpdir();
    assert_int_equal(train_export_hf(m, dir, NULL, &e), 0);
    model *em = NULL;
    assert_int_equal(model_load(dir, &em, &e), LOOM_EUNSUPPORTED);
    printf("expert_choice export: %s\n", e.msg);
    assert_non_null(strstr(e.msg, "expert_choice"));
    rm_export(dir);
    train_model_free(m);
}

/* a hand-written config.json with an impossible group-limited router is refused at load */
static void test_bad_router_config(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "\"loom_router\": \"group_limited\", \"loom_router_n_groups\": 3",
        "\"loom_router\": \"hash\", \"num_experts_per_tok\": 2", "\"loom_router\": \"nonsense\"",
        "\"loom_router_score\": \"softmax\"", /* no loom_router at all */
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        char json[1024];
        snprintf(json, sizeof(json),
                 "{\"architectures\": [\"LoomMoeForCausalLM\"], \"vocab_size\": 64, "
                 "\"hidden_size\": 32, \"intermediate_size\": 24, \"num_hidden_layers\": 2, "
                 "\"num_attention_heads\": 4, \"num_local_experts\": 4, %s}",
                 bad[i]);
        model_config mc;
        loom_err e = {0};
        assert_int_not_equal(model_config_parse(json, strlen(json), &mc, &e), 0);
        printf("bad LoomMoe config %zu: %s\n", i, e.msg);
    }
}

int main(void)
{
    tensor_set_threads(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_switch),
        cmocka_unit_test(test_hash),
        cmocka_unit_test(test_locmoe),
        cmocka_unit_test(test_group_limited),
        cmocka_unit_test(test_expert_choice_refused),
        cmocka_unit_test(test_bad_router_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
