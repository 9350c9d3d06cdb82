/* moe_topk_route (order, ties, renormalisation) and moe_group_by_expert (conservation). */
#include "testlib.h"

#include "loom/base.h"
#include "loom/moe.h"

#include <math.h>

static void test_basic(void **state)
{
    (void)state;
    float logits[4] = {1, 3, 2, 0};
    int32_t idx[2];
    float w[2];
    moe_topk_route(logits, 1, 4, 2, true, idx, w);
    assert_int_equal(idx[0], 1);
    assert_int_equal(idx[1], 2);
    double a = exp(3.0), b = exp(2.0);
    assert_true(fabs(w[0] - a / (a + b)) < 1e-6);
    assert_true(fabs(w[1] - b / (a + b)) < 1e-6);
    /* without renormalisation: the full softmax probabilities */
    moe_topk_route(logits, 1, 4, 2, false, idx, w);
    double z = exp(1.0) + exp(3.0) + exp(2.0) + 1.0;
    assert_true(fabs(w[0] - a / z) < 1e-6);
    assert_true(fabs(w[1] - b / z) < 1e-6);
}

static void test_ties(void **state)
{
    (void)state;
    float eq[4] = {0.5f, 0.5f, 0.5f, 0.5f};
    int32_t idx[3];
    float w[3];
    moe_topk_route(eq, 1, 4, 2, true, idx, w);
    assert_int_equal(idx[0], 0);
    assert_int_equal(idx[1], 1);
    assert_true(fabs(w[0] - 0.5) < 1e-6 && fabs(w[1] - 0.5) < 1e-6);
    moe_topk_route(eq, 1, 4, 2, false, idx, w);
    assert_true(fabs(w[0] - 0.25) < 1e-6 && fabs(w[1] - 0.25) < 1e-6);
    /* tie for second place: lower index wins */
    float t2[5] = {0, 1, 7, 1, 1};
    moe_topk_route(t2, 1, 5, 3, true, idx, w);
    assert_int_equal(idx[0], 2);
    assert_int_equal(idx[1], 1);
    assert_int_equal(idx[2], 3);
    assert_true(fabs(w[1] - w[2]) < 1e-7);
    assert_true(fabs(w[0] + w[1] + w[2] - 1) < 1e-6);
}

static void test_extremes(void **state)
{
    (void)state;
    /* huge logits stay finite; k == E selects every expert */
    float big[3] = {1000, -1000, 999};
    int32_t idx[3];
    float w[3];
    moe_topk_route(big, 1, 3, 3, true, idx, w);
    assert_int_equal(idx[0], 0);
    assert_int_equal(idx[1], 2);
    assert_int_equal(idx[2], 1);
    for (int j = 0; j < 3; j++)
        assert_true(isfinite(w[j]));
    assert_true(w[2] == 0.0f);
    assert_true(fabs(w[0] + w[1] + w[2] - 1) < 1e-6);
    /* k = 1 renormalised is weight 1 */
    moe_topk_route(big, 1, 3, 1, true, idx, w);
    assert_int_equal(idx[0], 0);
    assert_true(w[0] == 1.0f);
}

/* Property test: the chosen experts dominate the rest, weights descend and sum to 1. */
static void test_random(void **state)
{
    (void)state;
    loom_rng r;
    rng_seed(&r, 5);
    int T = 64, E = 8, k = 2;
    float *logits = malloc((size_t)T * E * 4), *w = malloc((size_t)T * k * 4);
    int32_t *idx = malloc((size_t)T * k * 4);
    for (int i = 0; i < T * E; i++)
        logits[i] = rng_normal(&r) * 2;
    moe_topk_route(logits, T, E, k, true, idx, w);
    for (int t = 0; t < T; t++) {
        const float *lt = logits + t * E;
        assert_true(w[t * k] >= w[t * k + 1]);
        assert_true(fabs(w[t * k] + w[t * k + 1] - 1) < 1e-6);
        assert_true(idx[t * k] != idx[t * k + 1]);
        for (int e = 0; e < E; e++) {
            if (e == idx[t * k] || e == idx[t * k + 1])
                continue;
            assert_true(lt[e] <= lt[idx[t * k + 1]]);
        }
    }
    /* grouping: every assignment lands once, under its expert, in batch order */
    int32_t counts[8], offsets[9], *order = malloc((size_t)T * k * 4);
    moe_group_by_expert(idx, T, k, E, counts, offsets, order);
    assert_int_equal(offsets[0], 0);
    assert_int_equal(offsets[E], T * k);
    int *seen = calloc((size_t)T * k, sizeof(int));
    for (int e = 0; e < E; e++) {
        assert_int_equal(offsets[e + 1] - offsets[e], counts[e]);
        for (int i = offsets[e]; i < offsets[e + 1]; i++) {
            assert_int_equal(idx[order[i]], e);
            if (i > offsets[e])
                assert_true(order[i] > order[i - 1]);
            seen[order[i]]++;
        }
    }
    for (int a = 0; a < T * k; a++)
        assert_int_equal(seen[a], 1);
    free(seen);
    free(order);
    free(logits);
    free(w);
    free(idx);
}

static void test_group_dropped(void **state)
{
    (void)state;
    /* out-of-range ids (dropped assignments) are left out */
    int32_t idx[6] = {1, 0, -1, 1, 2, 7};
    int32_t counts[3], offsets[4], order[6];
    moe_group_by_expert(idx, 3, 2, 3, counts, offsets, order);
    assert_int_equal(counts[0], 1);
    assert_int_equal(counts[1], 2);
    assert_int_equal(counts[2], 1);
    assert_int_equal(offsets[3], 4);
    assert_int_equal(order[0], 1);
    assert_int_equal(order[1], 0);
    assert_int_equal(order[2], 3);
    assert_int_equal(order[3], 4);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_basic),         cmocka_unit_test(test_ties),
        cmocka_unit_test(test_extremes),      cmocka_unit_test(test_random),
        cmocka_unit_test(test_group_dropped),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
