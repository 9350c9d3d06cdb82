/*
 * Trainer steps, checkpoints and export (issue 7): a run resumed from a checkpoint continues
 * bit for bit like the uninterrupted one; an exported directory loads in the engine (model_load)
 * and gives the trainer's logits; bad input fails with a message.
 */
#include "testlib.h"
#include "train_testlib.h"

#include "loom/model.h"
#include "loom/tensor.h"
#include "loom/train.h"

#include <sys/stat.h>

enum { B = 4, T = 16, V = 64, STEPS = 6, HALF = 3 };

static void small_config(train_config *c, int n_experts)
{
    model_config mc = {0};
    mc.arch = n_experts ? ARCH_MIXTRAL : ARCH_LLAMA;
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
    mc.n_experts = n_experts;
    mc.n_experts_per_tok = n_experts ? 2 : 0;
    mc.bos_token_id = -1;
    train_config_default(c, &mc, B, T);
    c->aux_coef = n_experts ? 0.01 : 0.0;
}

static void synthetic_data(train_data *d)
{
    train_test_stream(d, 4000, V, 1, 3);
}

static train_model *make_model(int n_experts)
{
    train_config c;
    small_config(&c, n_experts);
    train_model *m = NULL;
    loom_err e;
    assert_int_equal(train_model_create(&c, NULL, &m, &e), 0);
    train_model_init_random(m, 11);
    return m;
}

static char *tmpdir(void)
{
    char tmpl[] = "/tmp/loom-train-test-XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return strdup(d);
}

static void test_resume_bitwise(void **state)
{
    (void)state;
    train_data d;
    synthetic_data(&d);
    train_opt_config oc;
    train_opt_config_default(&oc);
    oc.steps = STEPS;
    oc.warmup = 2;
    train_step_config sc = {.batch = B, .seq_len = T, .accum = 2, .seed = 5};
    loom_err e = {0};
    double losses[STEPS];

    /* uninterrupted */
    train_model *a = make_model(4);
    train_adamw oa;
    assert_int_equal(train_adamw_init(&oa, &oc, train_model_n_params(a), &e), 0);
    for (int s = 0; s < STEPS; s++) {
        train_step_result r;
        assert_int_equal(train_step(a, &oa, &d, &sc, s, &r, &e), 0);
        losses[s] = r.loss;
    }
    printf("losses: %.5f -> %.5f\n", losses[0], losses[STEPS - 1]);
    assert_true(losses[STEPS - 1] < losses[0]);

    /* HALF steps, checkpoint, a fresh model resumes */
    char *dir = tmpdir();
    char *ck = test_path(dir, "ckpt.safetensors");
    train_model *b = make_model(4);
    train_adamw ob;
    assert_int_equal(train_adamw_init(&ob, &oc, train_model_n_params(b), &e), 0);
    for (int s = 0; s < HALF; s++) {
        train_step_result r;
        assert_int_equal(train_step(b, &ob, &d, &sc, s, &r, &e), 0);
        assert_true(r.loss == losses[s]);
    }
    assert_int_equal(train_checkpoint_save(b, &ob, HALF, sc.seed, ck, &e), 0);
    char *tmp = test_path(dir, "ckpt.safetensors.tmp");
    assert_false(loom_file_exists(tmp)); /* written then renamed */
    train_model_free(b);
    train_adamw_free(&ob);

    train_model *c = make_model(4);
    train_model_init_random(c, 999); /* overwritten by the checkpoint */
    train_adamw occ;
    assert_int_equal(train_adamw_init(&occ, &oc, train_model_n_params(c), &e), 0);
    int64_t step = 0;
    uint64_t seed = 0;
    assert_int_equal(train_checkpoint_load(c, &occ, &step, &seed, ck, &e), 0);
    assert_int_equal(step, HALF);
    assert_int_equal(seed, sc.seed);
    for (int s = HALF; s < STEPS; s++) {
        train_step_result r;
        assert_int_equal(train_step(c, &occ, &d, &sc, s, &r, &e), 0);
        assert_true(r.loss == losses[s]);
    }
    assert_memory_equal(train_model_params(a), train_model_params(c),
                        train_model_n_params(a) * sizeof(float));
    assert_memory_equal(oa.m, occ.m, train_model_n_params(a) * sizeof(float));

    /* a checkpoint of another shape is refused */
    train_config other;
    small_config(&other, 2);
    train_model *o = NULL;
    assert_int_equal(train_model_create(&other, NULL, &o, &e), 0);
    assert_int_not_equal(train_checkpoint_load(o, NULL, NULL, NULL, ck, &e), 0);
    printf("mismatched checkpoint: %s\n", e.msg);
    train_model_free(o);
    /* a truncated one too */
    FILE *f = fopen(ck, "r+b");
    assert_non_null(f);
    assert_int_equal(ftruncate(fileno(f), 100), 0);
    fclose(f);
    assert_int_not_equal(train_checkpoint_load(c, &occ, NULL, NULL, ck, &e), 0);
    printf("truncated checkpoint: %s\n", e.msg);

    unlink(ck);
    rmdir(dir);
    free(tmp);
    free(ck);
    free(dir);
    train_model_free(a);
    train_model_free(c);
    train_adamw_free(&oa);
    train_adamw_free(&occ);
    train_data_free(&d);
}

/* export, then the engine's forward over one sequence against the trainer's logits */
static void check_export(int n_experts)
{
    train_model *m = make_model(n_experts);
    loom_err e = {0};
    int32_t tok[T], tgt[T];
    for (int t = 0; t < T; t++) {
        tok[t] = (7 * t + 3) % V;
        tgt[t] = -1;
    }
    train_loss lo;
    assert_int_equal(train_forward(m, tok, tgt, 1, T, &lo, &e), 0);
    char *dir = tmpdir();
    if (train_export_hf(m, dir, NULL, &e))
        fail_msg("%s", e.msg);
    model *em = NULL;
    if (model_load(dir, &em, &e))
        fail_msg("model_load of the export: %s", e.msg);
    const model_config *c = model_get_config(em);
    assert_int_equal(c->n_experts, n_experts);
    model_kv kv;
    assert_int_equal(model_kv_init(&kv, c, 4, 16, &e), 0);
    int32_t blocks[1] = {0}, seq_start[2] = {0, T}, ctx[1] = {0}, rows[T];
    for (int t = 0; t < T; t++)
        rows[t] = t;
    const int32_t *tables[1] = {blocks};
    model_batch b = {.n_seqs = 1, .n_tokens = T, .tokens = tok, .seq_start = seq_start,
                     .ctx_len = ctx, .block_tables = tables, .n_logits = T, .logit_rows = rows};
    float *logits = malloc(sizeof(float) * T * V);
    assert_int_equal(model_forward(em, &kv, &b, logits, &e), 0);
    const float *ref = train_logits(m);
    double md = 0, mr = 0;
    for (int i = 0; i < T * V; i++) {
        md = fmax(md, fabs((double)logits[i] - ref[i]));
        mr = fmax(mr, fabs(ref[i]));
    }
    printf("export (E=%d): engine vs trainer logits max|d|/max = %.2e\n", n_experts, md / mr);
    assert_true(md / mr < 1e-4);
    free(logits);
    model_kv_free(&kv);
    model_free(em);
    char *p1 = test_path(dir, "config.json"), *p2 = test_path(dir, "model.safetensors");
    unlink(p1);
    unlink(p2);
    rmdir(dir);
    free(p1);
    free(p2);
    free(dir);
    train_model_free(m);
}

static void test_export_mixtral(void **state)
{
    (void)state;
    check_export(4);
}

static void test_export_llama(void **state)
{
    (void)state;
    check_export(0);
}

static void test_bad_input(void **state)
{
    (void)state;
    train_config c;
    small_config(&c, 4);
    train_dist three = {.rank = 0, .n_ranks = 3, .ranks_per_node = 1};
    train_model *m = NULL;
    loom_err e = {0};
    assert_int_not_equal(train_model_create(&c, &three, &m, &e), 0);
    printf("4 experts on 3 ranks: %s\n", e.msg);
    /* out of data */
    train_data d = {0};
    int32_t few[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    d.tokens = few;
    d.n_tokens = 8;
    d.n_train = 8;
    int32_t tok[T], tgt[T];
    assert_int_not_equal(train_data_batch(&d, 1, 0, 1, T, 0, 1, false, tok, tgt, &e), 0);
    printf("out of data: %s\n", e.msg);
    /* token ids beyond the model's vocabulary */
    m = make_model(0);
    for (int t = 0; t < T; t++)
        tok[t] = t == 3 ? V + 5 : t;
    assert_int_not_equal(train_forward(m, tok, NULL, 1, T, NULL, &e), 0);
    printf("bad token: %s\n", e.msg);
    train_model_free(m);
}

/* The same steps on 1 and on 3 threads (on 2 cores: workers preempted mid-task too) give the
 * same losses and parameters, bit for bit: every parallel sum of the step has a fixed order. */
static void test_threads_bitwise(void **state)
{
    (void)state;
    train_data d;
    synthetic_data(&d);
    train_opt_config oc;
    train_opt_config_default(&oc);
    oc.steps = 3;
    train_step_config sc = {.batch = B, .seq_len = T, .accum = 1, .seed = 9};
    loom_err e = {0};
    const int threads[2] = {1, 3};
    train_model *m[2];
    double loss[2][3];
    for (int v = 0; v < 2; v++) {
        tensor_set_threads(threads[v]);
        m[v] = make_model(4);
        train_adamw o;
        assert_int_equal(train_adamw_init(&o, &oc, train_model_n_params(m[v]), &e), 0);
        for (int s = 0; s < 3; s++) {
            train_step_result r;
            assert_int_equal(train_step(m[v], &o, &d, &sc, s, &r, &e), 0);
            loss[v][s] = r.loss;
        }
        train_adamw_free(&o);
    }
    tensor_set_threads(1);
    for (int s = 0; s < 3; s++)
        if (loss[0][s] != loss[1][s])
            fail_msg("step %d: loss %.9g on 1 thread, %.9g on 3", s, loss[0][s], loss[1][s]);
    size_t n = train_model_n_params(m[0]);
    assert_int_equal(memcmp(train_model_params(m[0]), train_model_params(m[1]), n * sizeof(float)),
                     0);
    printf("3 steps on 1 and 3 threads: losses and %zu parameters identical\n", n);
    train_model_free(m[0]);
    train_model_free(m[1]);
    train_data_free(&d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_resume_bitwise),
        cmocka_unit_test(test_threads_bitwise),
        cmocka_unit_test(test_export_mixtral),
        cmocka_unit_test(test_export_llama),
        cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
