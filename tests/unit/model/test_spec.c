/*
 * YAML model specs (`loom train --model-spec`): the shipped shakespeare-moe spec gives the
 * shakespeare-moe checkpoint's shape; a preset base is overridden key by key; unknown keys,
 * wrong types and impossible shapes fail with the file and line.
 */
#include "testlib.h"

#include "loom/model.h"

static int parse(const char *yaml, model_config *c, bool *has_vocab, loom_err *e)
{
    return model_config_from_yaml(yaml, strlen(yaml), "spec.yaml", c, has_vocab, e);
}

static void test_shakespeare_spec(void **state)
{
    (void)state;
    model_config c;
    bool hv = false;
    loom_err e = {0};
    if (model_config_load_yaml("data/models/shakespeare-moe.yaml", &c, &hv, &e))
        fail_msg("%s", e.msg);
    assert_true(hv);
    assert_int_equal(c.arch, ARCH_MIXTRAL);
    assert_int_equal(c.n_layers, 4);
    assert_int_equal(c.hidden_size, 192);
    assert_int_equal(c.n_heads, 6);
    assert_int_equal(c.n_kv_heads, 2);
    assert_int_equal(c.head_dim, 32);
    assert_int_equal(c.intermediate_size, 384);
    assert_int_equal(c.moe_intermediate_size, 384);
    assert_int_equal(c.n_experts, 8);
    assert_int_equal(c.n_experts_per_tok, 2);
    assert_int_equal(c.vocab_size, 2048);
    assert_false(c.tie_word_embeddings);
    /* the same shape as the checkpoint's config.json, when ../shared has it */
    const char *shared = getenv("LOOM_SHARED") ? getenv("LOOM_SHARED") : "../shared";
    char *path = test_path(shared, "models/shakespeare-moe/config.json");
    model_config ref;
    if (loom_file_exists(path) && model_config_load(path, &ref, &e) == 0) {
        assert_int_equal(model_config_n_params(&c), model_config_n_params(&ref));
        assert_true(c.rope_theta == ref.rope_theta);
        assert_true(c.rms_norm_eps == ref.rms_norm_eps);
        printf("shakespeare-moe.yaml: %zu parameters, as the checkpoint\n",
               model_config_n_params(&c));
    }
    free(path);
}

static void test_preset_base(void **state)
{
    (void)state;
    model_config c;
    bool hv = true;
    loom_err e = {0};
    assert_int_equal(parse("preset: mixtral-tiny\nnum_hidden_layers: 2\nnum_local_experts: 4\n"
                           "rope_theta: 5e5\ntie_word_embeddings: true\n",
                           &c, &hv, &e),
                     0);
    assert_false(hv); /* vocabulary: the tokenizer's */
    assert_int_equal(c.arch, ARCH_MIXTRAL);
    assert_int_equal(c.hidden_size, 256); /* the preset's */
    assert_int_equal(c.n_layers, 2);
    assert_int_equal(c.n_experts, 4);
    assert_int_equal(c.n_experts_per_tok, 2);
    assert_true(c.rope_theta == 5e5f);
    assert_true(c.tie_word_embeddings);
    /* experts 0 on a Mixtral preset: a dense Llama */
    assert_int_equal(parse("preset: mixtral-tiny\nnum_local_experts: 0\n", &c, NULL, &e), 0);
    assert_int_equal(c.arch, ARCH_LLAMA);
    assert_int_equal(c.n_experts, 0);
    /* no preset: the four required keys, the rest defaulted */
    assert_int_equal(parse("hidden_size: 64\nintermediate_size: 96\nnum_hidden_layers: 2\n"
                           "num_attention_heads: 4\n",
                           &c, NULL, &e),
                     0);
    assert_int_equal(c.arch, ARCH_LLAMA);
    assert_int_equal(c.n_kv_heads, 4);
    assert_int_equal(c.head_dim, 16);
    /* JSON is YAML too */
    assert_int_equal(parse("{\"preset\": \"llama-tiny\", \"head_dim\": 32, "
                           "\"num_attention_heads\": 8, \"num_key_value_heads\": 2}",
                           &c, NULL, &e),
                     0);
    assert_int_equal(c.head_dim, 32);
}

static void test_errors(void **state)
{
    (void)state;
    static const struct {
        const char *yaml, *want;
    } bad[] = {
        {"preset: mixtral-tiny\nhidden: 3\n", "unknown key 'hidden'"},
        {"preset: mixtral-tiny\nhidden_size: big\n", "hidden_size must be an integer"},
        {"preset: mixtral-tiny\nrope_theta: [1]\n", "rope_theta"},
        {"preset: mixtral-tiny\ntie_word_embeddings: maybe\n", "true or false"},
        {"preset: mixtral-tiny\nhidden_size: 250\n", "does not divide hidden_size 250"},
        {"preset: mixtral-tiny\nnum_key_value_heads: 3\n", "does not divide num_attention_heads"},
        {"preset: mixtral-tiny\nnum_experts_per_tok: 9\n", "exceeds num_local_experts 8"},
        {"preset: llama-tiny\nnum_experts_per_tok: 2\n", "without num_local_experts"},
        {"preset: gpt-5\n", "unknown preset"},
        {"hidden_size: 64\n", "missing 'intermediate_size'"},
        {"preset: mixtral-tiny\npreset: llama-tiny\n", "given twice"},
        {"- 1\n- 2\n", "model spec"},
        {"preset: [unclosed\n", "spec.yaml"},
        {"", "spec.yaml"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
        model_config c;
        loom_err e = {0};
        int rc = parse(bad[i].yaml, &c, NULL, &e);
        printf("%-40.40s -> %s\n", bad[i].want, e.msg);
        assert_int_not_equal(rc, 0);
        assert_non_null(strstr(e.msg, bad[i].want));
        assert_non_null(strstr(e.msg, "spec.yaml"));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shakespeare_spec),
        cmocka_unit_test(test_preset_base),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
