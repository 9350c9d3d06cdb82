/* Expected output lengths (max_tokens, else a running mean per model), prompt characters per
 * token, and prompt prefix hashing. */
#include "testlib.h"

#include "loom/policy.h"

static void test_expected_output(void **state)
{
    (void)state;
    policy_length_model m;
    policy_lengths_init(&m, 200, 4);
    assert_true(policy_lengths_expected(&m, "llama", 0) == 200); /* nothing seen: the default */
    assert_true(policy_lengths_expected(&m, "llama", 32) == 32); /* max_tokens wins */
    for (int i = 0; i < 10; i++)
        policy_lengths_observe(&m, "llama", -1, -1, i < 5 ? 100 : 300);
    assert_true(fabs(policy_lengths_expected(&m, "llama", 0) - 200) < 1e-9); /* exact mean */
    assert_true(policy_lengths_expected(&m, "llama", 7) == 7);
    /* per model */
    policy_lengths_observe(&m, "qwen", -1, -1, 40);
    assert_true(fabs(policy_lengths_expected(&m, "qwen", 0) - 40) < 1e-9);
    assert_true(fabs(policy_lengths_expected(&m, "llama", 0) - 200) < 1e-9);
    assert_true(policy_lengths_expected(&m, NULL, 0) == 200); /* unnamed: default until seen */
    /* after many observations the mean follows a shift (moving average) */
    for (int i = 0; i < 400; i++)
        policy_lengths_observe(&m, "qwen", -1, -1, 1000);
    assert_true(fabs(policy_lengths_expected(&m, "qwen", 0) - 1000) < 1);
    /* more models than slots: the overflow keeps the default, nothing breaks */
    for (int i = 0; i < 2 * POLICY_LENGTH_MODELS; i++) {
        char name[32];
        snprintf(name, sizeof(name), "model-%d", i);
        policy_lengths_observe(&m, name, 10, 5, 9);
        double v = policy_lengths_expected(&m, name, 0);
        assert_true(v == 9 || v == 200);
    }
}

static void test_chars_per_token(void **state)
{
    (void)state;
    policy_length_model m;
    policy_lengths_init(&m, 256, 4);
    assert_true(fabs(policy_lengths_prompt_tokens(&m, "x", 400) - 100) < 1e-9);
    assert_true(policy_lengths_prompt_tokens(&m, "x", 0) == 1); /* at least one token */
    policy_lengths_observe(&m, "x", 300, 100, -1);              /* 3 chars a token */
    assert_true(fabs(policy_lengths_chars_per_token(&m, "x") - 3) < 1e-9);
    assert_true(fabs(policy_lengths_prompt_tokens(&m, "x", 300) - 100) < 1e-9);
    policy_lengths_observe(&m, "x", 1e9, 1, -1); /* absurd ratios are clamped */
    assert_true(policy_lengths_chars_per_token(&m, "x") <= 20);
    /* a completion-only observation leaves the ratio alone */
    double before = policy_lengths_chars_per_token(&m, "x");
    policy_lengths_observe(&m, "x", -1, -1, 50);
    assert_true(policy_lengths_chars_per_token(&m, "x") == before);
}

static void test_prefix_hashes(void **state)
{
    (void)state;
    char a[300], b[300];
    for (int i = 0; i < 300; i++)
        a[i] = b[i] = (char)('a' + i % 26);
    uint64_t ha[8], hb[8];
    /* 300 bytes in 64-byte blocks: 4 full blocks, the partial fifth is not hashed */
    assert_int_equal(policy_prefix_hashes(a, 300, 64, 0, ha, 8), 4);
    assert_int_equal(policy_prefix_hashes(b, 300, 64, 0, hb, 8), 4);
    assert_memory_equal(ha, hb, sizeof(uint64_t) * 4);
    for (int i = 0; i < 4; i++)
        assert_true(ha[i] != 0);
    /* a change in block 2 changes block 2 and every block after it (the hashes chain) */
    b[150] = '#';
    assert_int_equal(policy_prefix_hashes(b, 300, 64, 0, hb, 8), 4);
    assert_true(ha[0] == hb[0] && ha[1] == hb[1]);
    assert_true(ha[2] != hb[2] && ha[3] != hb[3]);
    /* identical blocks at different positions hash differently */
    char z[128];
    memset(z, 'z', sizeof(z));
    uint64_t hz[2];
    assert_int_equal(policy_prefix_hashes(z, 128, 64, 0, hz, 2), 2);
    assert_true(hz[0] != hz[1]);
    /* the seed separates models; max bounds the output */
    uint64_t hs[8];
    policy_prefix_hashes(a, 300, 64, 99, hs, 8);
    assert_true(hs[0] != ha[0]);
    assert_int_equal(policy_prefix_hashes(a, 300, 64, 0, hs, 2), 2);
    assert_int_equal(policy_prefix_hashes(a, 10, 64, 0, hs, 8), 0);
    assert_int_equal(policy_prefix_hashes(NULL, 10, 64, 0, hs, 8), 0);
    assert_int_equal(policy_prefix_hashes(a, 300, 0, 0, hs, 8), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expected_output),
        cmocka_unit_test(test_chars_per_token),
        cmocka_unit_test(test_prefix_hashes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
