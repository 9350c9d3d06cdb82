/*
 * Gradient parity with Hugging Face (issue 7, acceptance 1): the trainer's loss and every
 * parameter gradient on the fixed batch of the fixtures' grads.safetensors, against
 * transformers' (eager, float32): |loss - ce_loss| <= 1e-4, max|dg| <= 1e-3 max|g| per tensor.
 */
#include "testlib.h"

#include "loom/train.h"

#include <cJSON.h>

/* Under mpirun (tests/e2e/test_train_mpi.sh) the batch rows and the experts are spread over the
 * ranks; every rank compares the dense gradients (all-reduced) and its own experts'. */
static train_dist dist;

static double json_number(const char *dir, const char *key)
{
    char *p = test_path(dir, "grads.json");
    char *txt = NULL;
    size_t len = 0;
    assert_int_equal(loom_read_file(p, &txt, &len, NULL), 0);
    cJSON *j = cJSON_ParseWithLength(txt, len);
    assert_non_null(j);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    assert_true(cJSON_IsNumber(v));
    double x = v->valuedouble;
    cJSON_Delete(j);
    free(txt);
    free(p);
    return x;
}

/* Loads dir, runs the batch of grads_file with aux_coef, compares against it. */
static void check_model(const char *name, const char *grads_file, bool with_aux)
{
    const char *shared = test_require_shared();
    char *fx = test_path(shared, "fixtures");
    char *dir = test_path(fx, name);
    char *gpath = test_path(dir, grads_file);
    loom_err e = {0};
    st_file gf;
    assert_int_equal(st_open(gpath, &gf, &e), 0);
    const st_tensor *ids = st_find(&gf, "input_ids");
    assert_non_null(ids);
    int B0 = (int)ids->shape[0], T = (int)ids->shape[1], R = dist.n_ranks;
    /* The fixture batch has B0 sequences; on R ranks that B0 does not split over (4 ranks, 2
     * sequences) the batch is the fixture's repeated lcm(B0, R) / B0 times. The mean CE, the
     * load-balancing loss (means of assignments and probabilities over tokens) and so every
     * gradient are those of the fixture batch. */
    int B = B0;
    while (B % R)
        B += B0;
    int32_t *tok = malloc(sizeof(int32_t) * B * T), *tgt = malloc(sizeof(int32_t) * B * T);
    for (int c = 0; c < B / B0; c++)
        memcpy(tok + (size_t)c * B0 * T, ids->data, sizeof(int32_t) * B0 * T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            tgt[b * T + t] = t + 1 < T ? tok[b * T + t + 1] : -1;

    int rows = B / R, row0 = dist.rank * rows;
    train_config cfg;
    assert_int_equal(train_config_from_hf(&cfg, dir, rows, T, &e), 0);
    double coef = cfg.aux_coef;
    if (!with_aux)
        cfg.aux_coef = 0.0;
    train_model *m = NULL;
    int rc = train_model_create(&cfg, &dist, &m, &e);
    if (rc)
        fail_msg("%s", e.msg);
    rc = train_model_load_hf(m, dir, &e);
    if (rc)
        fail_msg("%s", e.msg);
    train_loss lo;
    train_zero_grad(m);
    assert_int_equal(train_forward(m, tok + row0 * T, tgt + row0 * T, rows, T, &lo, &e), 0);
    assert_int_equal(train_backward(m, 1.0f, &e), 0);
    train_allreduce_grads(m);

    double ce_ref = json_number(dir, "ce_loss");
    printf("%s %s: ce %.7f (HF %.7f, |d| %.2e)", name, grads_file, lo.ce, ce_ref,
           fabs(lo.ce - ce_ref));
    assert_true(fabs(lo.ce - ce_ref) <= 1e-4);
    if (with_aux) {
        double aux_ref = json_number(dir, "aux_loss");
        double tot_ref = json_number(dir, "total_loss_with_aux");
        printf(", aux %.7f (HF %.7f), total %.7f (HF %.7f)", lo.aux, aux_ref, lo.total, tot_ref);
        assert_true(fabs(lo.aux - aux_ref) <= 1e-4 * fmax(1.0, aux_ref));
        assert_true(fabs(lo.total - tot_ref) <= 1e-4);
        assert_true(fabs(coef - json_number(dir, "router_aux_loss_coef")) < 1e-12);
    }
    printf("\n");

    double worst = 0.0;
    const char *worst_name = "";
    int n_checked = 0;
    for (int i = 0; i < train_model_n_tensors(m); i++) {
        const train_param *p = train_model_tensor(m, i);
        if (!train_model_owns(m, i))
            continue;
        char gname[160];
        snprintf(gname, sizeof(gname), "grad.%s", p->name);
        const st_tensor *gt = st_find(&gf, gname);
        if (!gt)
            fail_msg("%s: no %s in the fixture", name, gname);
        float *ref = malloc(p->n * sizeof(float));
        assert_int_equal(st_tensor_to_f32(gt, ref, &e), 0);
        const float *g = train_model_grads(m) + p->offset;
        double gmax = 0.0, dmax = 0.0;
        for (size_t j = 0; j < p->n; j++) {
            gmax = fmax(gmax, fabs(ref[j]));
            dmax = fmax(dmax, fabs((double)g[j] - ref[j]));
        }
        double rel = gmax > 0 ? dmax / gmax : dmax;
        if (rel > worst) {
            worst = rel;
            worst_name = p->name;
        }
        if (rel > 1e-3)
            fail_msg("%s: %s max|dg| %.3e vs max|g| %.3e (rel %.3e)", name, p->name, dmax, gmax,
                     rel);
        free(ref);
        n_checked++;
    }
    printf("rank %d/%d: %s %s: %d gradients, worst max|dg|/max|g| = %.3e (%s)\n",
           dist.rank, R, name, grads_file, n_checked, worst, worst_name);
    train_model_free(m);
    st_close(&gf);
    free(tok);
    free(tgt);
    free(gpath);
    free(dir);
    free(fx);
}

static void test_llama(void **state)
{
    (void)state;
    check_model("tiny-llama", "grads.safetensors", false);
}

static void test_mixtral(void **state)
{
    (void)state;
    check_model("tiny-mixtral", "grads.safetensors", false);
}

static void test_mixtral_aux(void **state)
{
    (void)state;
    check_model("tiny-mixtral", "grads_with_aux.safetensors", true);
}

int main(int argc, char **argv)
{
    test_require_shared();
    loom_err e;
    if (train_dist_init(&dist, &argc, &argv, 1, &e)) {
        printf("%s\n", e.msg);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama),
        cmocka_unit_test(test_mixtral),
        cmocka_unit_test(test_mixtral_aux),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    train_dist_finalize(&dist);
    return rc;
}
