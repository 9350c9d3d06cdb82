/*
 * The trainable top-k router reproduces the routing of ../shared/fixtures/tiny-mixtral
 * (acceptance 3): for every prompt and layer, pN.router_logits.lL from reference.safetensors
 * (Hugging Face's pre-softmax gate outputs) is fed through
 *   (a) an independent float64 top-2 written here (argmax twice, ties to the lower index),
 *   (b) moe_topk_route (the inference path), and
 *   (c) moe_router_forward with a linear gate whose weight is the identity (so its logits are
 *       exactly the fixture's),
 * and the expert choices must be equal, and (b) and (c) weights bit-identical. Then the
 * fixture's own gate weight is loaded to check the router's shapes against the checkpoint.
 */
#include "testlib.h"

#include "loom/base.h"
#include "loom/model.h"
#include "loom/moe.h"

static void top2_double(const float *l, int E, int32_t *idx, double *w)
{
    double m = l[0], z = 0;
    for (int e = 1; e < E; e++)
        m = l[e] > m ? l[e] : m;
    for (int e = 0; e < E; e++)
        z += exp((double)l[e] - m);
    int a = 0;
    for (int e = 1; e < E; e++)
        if (l[e] > l[a])
            a = e;
    int b = a == 0 ? 1 : 0;
    for (int e = 0; e < E; e++)
        if (e != a && l[e] > l[b])
            b = e;
    idx[0] = a;
    idx[1] = b;
    double pa = exp(l[a] - m) / z, pb = exp(l[b] - m) / z;
    w[0] = pa / (pa + pb);
    w[1] = pb / (pa + pb);
}

static void test_tiny_mixtral(void **state)
{
    (void)state;
    const char *shared = test_require_shared();
    char *path = test_path(shared, "fixtures/tiny-mixtral/reference.safetensors");
    loom_err e;
    st_file f;
    if (st_open(path, &f, &e) != 0) {
        printf("SKIP: %s: %s\n", path, e.msg);
        free(path);
        exit(TEST_SKIP_CODE);
    }
    const int E = 8, k = 2;
    moe_router_config c;
    moe_router_config_default(&c, MOE_ROUTER_TOPK, E, E);
    c.k = k;
    c.renormalize = true; /* Mixtral */
    moe_router r;
    moe_routing rt;
    assert_int_equal(moe_router_init(&r, &c, &e), 0);
    assert_int_equal(moe_routing_init(&rt, &r.cfg, 256, &e), 0);
    memset(r.w_gate, 0, sizeof(float) * E * E);
    for (int i = 0; i < E; i++)
        r.w_gate[i * E + i] = 1.0f;

    int n_checked = 0, n_tokens = 0;
    double max_w_err = 0;
    for (int p = 0; p < 16; p++)
        for (int l = 0; l < 8; l++) {
            char name[64];
            snprintf(name, sizeof(name), "p%d.router_logits.l%d", p, l);
            const st_tensor *t = st_find(&f, name);
            if (!t)
                continue;
            assert_int_equal(t->n_dims, 2);
            assert_int_equal(t->shape[1], E);
            int T = (int)t->shape[0];
            assert_true(T <= 256);
            float *logits = malloc(sizeof(float) * T * E);
            assert_int_equal(st_tensor_to_f32(t, logits, &e), 0);
            int32_t *idx_b = malloc(sizeof(int32_t) * T * k);
            float *w_b = malloc(sizeof(float) * T * k);
            moe_topk_route(logits, T, E, k, true, idx_b, w_b);
            assert_int_equal(moe_router_forward(&r, logits, NULL, T, false, &rt, &e), 0);
            for (int tok = 0; tok < T; tok++) {
                int32_t idx_a[2];
                double w_a[2];
                top2_double(logits + tok * E, E, idx_a, w_a);
                for (int j = 0; j < k; j++) {
                    assert_int_equal(rt.expert_idx[tok * k + j], idx_a[j]);
                    assert_int_equal(rt.expert_idx[tok * k + j], idx_b[tok * k + j]);
                    assert_true(rt.weight[tok * k + j] == w_b[tok * k + j]); /* bit-identical */
                    double err = fabs(rt.weight[tok * k + j] - w_a[j]);
                    max_w_err = err > max_w_err ? err : max_w_err;
                }
            }
            n_checked++;
            n_tokens += T;
            free(logits);
            free(idx_b);
            free(w_b);
        }
    printf("tiny-mixtral: %d (prompt, layer) pairs, %d token routings: top-2 choices equal the "
           "float64 top-2 and moe_topk_route; weights bit-identical to moe_topk_route, max |diff| "
           "to float64 %.2e\n",
           n_checked, n_tokens, max_w_err);
    assert_true(n_checked == 8);
    assert_true(max_w_err < 1e-6);
    st_close(&f);
    free(path);

    /* the checkpoint's gate weight has the router's layout, (E, d) */
    path = test_path(shared, "fixtures/tiny-mixtral/model.safetensors");
    if (st_open(path, &f, &e) == 0) {
        const st_tensor *g = st_find(&f, "model.layers.0.block_sparse_moe.gate.weight");
        assert_non_null(g);
        assert_int_equal(g->shape[0], E);
        moe_router_config c2;
        moe_router_config_default(&c2, MOE_ROUTER_TOPK, (int)g->shape[1], E);
        c2.k = 2;
        c2.renormalize = true;
        moe_router r2;
        assert_int_equal(moe_router_init(&r2, &c2, &e), 0);
        assert_int_equal(st_tensor_to_f32(g, r2.w_gate, &e), 0);
        moe_router_free(&r2);
        st_close(&f);
    }
    free(path);
    moe_routing_free(&rt);
    moe_router_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_mixtral),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
