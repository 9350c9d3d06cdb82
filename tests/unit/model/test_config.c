/* config.json variants, errors, presets. */
#include "testlib.h"

#include "loom/model.h"

#include <math.h>

static int parse(const char *json, model_config *c, loom_err *e)
{
    return model_config_parse(json, strlen(json), c, e);
}

#define LLAMA_BASE                                                                                 \
    "\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":2048,\"hidden_size\":128,"            \
    "\"intermediate_size\":256,\"num_hidden_layers\":2,\"num_attention_heads\":4,"                 \
    "\"num_key_value_heads\":2,\"rms_norm_eps\":1e-05"

static void test_rope_variants(void **state)
{
    (void)state;
    model_config c;
    loom_err e = {0};
    /* transformers 5: rope_parameters.rope_theta */
    assert_int_equal(parse("{" LLAMA_BASE ",\"rope_parameters\":{\"rope_theta\":500000.0,"
                           "\"rope_type\":\"default\"}}",
                           &c, &e),
                     0);
    assert_true(c.rope_theta == 500000.0f);
    assert_int_equal(c.rope_type, ROPE_DEFAULT);
    /* older: top-level rope_theta, rope_scaling null */
    assert_int_equal(
        parse("{" LLAMA_BASE ",\"rope_theta\":1000000.0,\"rope_scaling\":null}", &c, &e), 0);
    assert_true(c.rope_theta == 1000000.0f);
    /* neither: default 10000 */
    assert_int_equal(parse("{" LLAMA_BASE "}", &c, &e), 0);
    assert_true(c.rope_theta == 10000.0f);
    /* llama3 scaling */
    assert_int_equal(parse("{" LLAMA_BASE ",\"rope_theta\":500000.0,\"rope_scaling\":{\"factor\":"
                           "32.0,\"high_freq_factor\":4.0,\"low_freq_factor\":1.0,"
                           "\"original_max_position_embeddings\":8192,\"rope_type\":\"llama3\"}}",
                           &c, &e),
                     0);
    assert_int_equal(c.rope_type, ROPE_LLAMA3);
    float inv[16];
    model_config_rope_inv_freq(&c, inv);
    for (int i = 0; i < 16; i++) {
        double f = pow(500000.0, -2.0 * i / 32), wl = 2 * M_PI / f, want = f;
        if (wl > 8192.0)
            want = f / 32;
        else if (wl >= 2048.0) {
            double s = (8192.0 / wl - 1.0) / 3.0;
            want = (1 - s) * f / 32 + s * f;
        }
        assert_true(fabs(inv[i] - want) < 1e-5 * want);
    }
    /* unsupported rope type names itself */
    assert_int_equal(parse("{" LLAMA_BASE ",\"rope_parameters\":{\"rope_type\":\"yarn\","
                           "\"factor\":4.0}}",
                           &c, &e),
                     LOOM_EUNSUPPORTED);
    assert_non_null(strstr(e.msg, "yarn"));
}

static void test_head_dim_and_tokens(void **state)
{
    (void)state;
    model_config c;
    loom_err e = {0};
    assert_int_equal(parse("{" LLAMA_BASE ",\"head_dim\":null,\"eos_token_id\":[2,7],"
                           "\"bos_token_id\":null,\"tie_word_embeddings\":true}",
                           &c, &e),
                     0);
    assert_int_equal(c.head_dim, 32);
    assert_int_equal(c.n_eos, 2);
    assert_int_equal(c.eos_token_ids[1], 7);
    assert_int_equal(c.bos_token_id, -1);
    assert_true(c.tie_word_embeddings);
    assert_int_equal(c.arch, ARCH_LLAMA);
    assert_int_equal(parse("{" LLAMA_BASE ",\"head_dim\":64,\"eos_token_id\":2,"
                           "\"bos_token_id\":1,\"attention_bias\":true}",
                           &c, &e),
                     0);
    assert_int_equal(c.head_dim, 64);
    assert_int_equal(c.n_eos, 1);
    assert_int_equal(c.eos_token_ids[0], 2);
    assert_int_equal(c.bos_token_id, 1);
    assert_true(c.attention_bias);
    assert_false(c.tie_word_embeddings);
    /* head_dim absent */
    assert_int_equal(parse("{" LLAMA_BASE "}", &c, &e), 0);
    assert_int_equal(c.head_dim, 32);
    assert_int_equal(c.n_kv_heads, 2);
    assert_int_equal(c.n_experts, 0);
    assert_false(model_config_is_moe_layer(&c, 0));
}

static void test_architectures(void **state)
{
    (void)state;
    model_config c;
    loom_err e = {0};
    /* Qwen2: q/k/v bias whatever attention_bias says */
    assert_int_equal(parse("{\"architectures\":[\"Qwen2ForCausalLM\"],\"vocab_size\":100,"
                           "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":1,"
                           "\"num_attention_heads\":4,\"use_sliding_window\":false,"
                           "\"sliding_window\":131072}",
                           &c, &e),
                     0);
    assert_int_equal(c.arch, ARCH_QWEN2);
    assert_true(c.attention_bias);
    assert_int_equal(c.sliding_window, 0);
    /* Mistral sliding window */
    assert_int_equal(parse("{\"architectures\":[\"MistralForCausalLM\"],\"vocab_size\":100,"
                           "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":1,"
                           "\"num_attention_heads\":4,\"sliding_window\":4096}",
                           &c, &e),
                     0);
    assert_int_equal(c.sliding_window, 4096);
    /* Mixtral */
    assert_int_equal(parse("{\"architectures\":[\"MixtralForCausalLM\"],\"vocab_size\":100,"
                           "\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":2,"
                           "\"num_attention_heads\":4,\"num_local_experts\":8,"
                           "\"num_experts_per_tok\":2,\"sliding_window\":null}",
                           &c, &e),
                     0);
    assert_int_equal(c.n_experts, 8);
    assert_int_equal(c.n_experts_per_tok, 2);
    assert_int_equal(c.moe_intermediate_size, 96);
    assert_true(c.norm_topk_prob);
    assert_true(model_config_is_moe_layer(&c, 1));
    /* Qwen2-MoE: sparse step, mlp_only_layers, shared expert */
    assert_int_equal(parse("{\"architectures\":[\"Qwen2MoeForCausalLM\"],\"vocab_size\":100,"
                           "\"hidden_size\":64,\"intermediate_size\":96,\"num_hidden_layers\":6,"
                           "\"num_attention_heads\":4,\"num_experts\":6,\"num_experts_per_tok\":"
                           "3,\"moe_intermediate_size\":32,\"shared_expert_intermediate_size\":"
                           "48,\"norm_topk_prob\":false,\"decoder_sparse_step\":2,"
                           "\"mlp_only_layers\":[3]}",
                           &c, &e),
                     0);
    assert_int_equal(c.arch, ARCH_QWEN2_MOE);
    assert_false(c.norm_topk_prob);
    assert_int_equal(c.shared_expert_intermediate_size, 48);
    bool want[6] = {false, true, false, false, false, true};
    for (int l = 0; l < 6; l++)
        assert_int_equal(model_config_is_moe_layer(&c, l), want[l]);
    /* model_type when architectures is absent */
    assert_int_equal(parse("{\"model_type\":\"mistral\",\"vocab_size\":100,\"hidden_size\":64,"
                           "\"intermediate_size\":128,\"num_hidden_layers\":1,"
                           "\"num_attention_heads\":4}",
                           &c, &e),
                     0);
    assert_int_equal(c.arch, ARCH_MISTRAL);
    assert_string_equal(c.architecture, "MistralForCausalLM");
}

static void test_errors(void **state)
{
    (void)state;
    model_config c;
    loom_err e = {0};
    assert_int_equal(parse("{\"architectures\":[\"GPT2LMHeadModel\"],\"vocab_size\":100}", &c, &e),
                     LOOM_EUNSUPPORTED);
    assert_non_null(strstr(e.msg, "unsupported architecture 'GPT2LMHeadModel'"));
    assert_int_equal(parse("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":100}", &c, &e),
                     LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "hidden_size"));
    assert_int_equal(parse("{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":100,"
                           "\"hidden_size\":128,\"intermediate_size\":256,"
                           "\"num_hidden_layers\":2,\"num_attention_heads\":4,"
                           "\"num_key_value_heads\":3}",
                           &c, &e),
                     LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "num_key_value_heads"));
    /* (cJSON keeps the first of duplicate keys, so these spell the whole config) */
    const char *bad_sizes[] = {"-5", "12.5", "\"128\"", "1e300", "null"};
    for (int i = 0; i < 5; i++) {
        char json[512];
        snprintf(json, sizeof(json),
                 "{\"architectures\":[\"LlamaForCausalLM\"],\"vocab_size\":100,"
                 "\"hidden_size\":%s,\"intermediate_size\":256,\"num_hidden_layers\":2,"
                 "\"num_attention_heads\":4}",
                 bad_sizes[i]);
        assert_int_equal(parse(json, &c, &e), LOOM_EFORMAT);
        assert_non_null(strstr(e.msg, "hidden_size"));
    }
    assert_int_equal(parse("{" LLAMA_BASE ",\"head_dim\":33}", &c, &e), LOOM_EFORMAT);
    assert_int_equal(parse("{" LLAMA_BASE ",\"hidden_act\":\"gelu\"}", &c, &e), LOOM_EUNSUPPORTED);
    assert_int_equal(parse("{" LLAMA_BASE ",\"mlp_bias\":true}", &c, &e), LOOM_EUNSUPPORTED);
    assert_int_equal(parse("{" LLAMA_BASE ",\"eos_token_id\":[1,\"x\"]}", &c, &e), LOOM_EFORMAT);
    assert_int_equal(parse("[1]", &c, &e), LOOM_EFORMAT);
    assert_int_equal(parse("{", &c, &e), LOOM_EFORMAT);
    assert_int_equal(parse("", &c, &e), LOOM_EFORMAT);
    assert_int_equal(model_config_load("/nonexistent/config.json", &c, &e), LOOM_ENOTFOUND);
}

static void test_presets(void **state)
{
    (void)state;
    const char *const *names = model_preset_names();
    int n = 0;
    for (; names[n]; n++) {
        model_config c;
        loom_err e = {0};
        assert_int_equal(model_config_preset(names[n], &c, &e), 0);
        assert_true(c.hidden_size == c.n_heads * c.head_dim);
        assert_true(model_config_n_active_params(&c) <= model_config_n_params(&c));
        printf("  %-14s %-20s %8.1f M params (%.1f M active), KV %zu B/token\n", names[n],
               c.architecture, model_config_n_params(&c) / 1e6,
               model_config_n_active_params(&c) / 1e6, model_kv_bytes_per_block(&c, 1));
    }
    assert_int_equal(n, 7);
    model_config c;
    loom_err e = {0};
    assert_int_equal(model_config_preset("llama-1b", &c, &e), 0);
    double p = model_config_n_params(&c) / 1e9;
    assert_true(p > 0.7 && p < 1.2);
    assert_int_equal(model_config_preset("mixtral-1b", &c, &e), 0);
    p = model_config_n_params(&c) / 1e9;
    assert_true(p > 0.9 && p < 1.2);
    assert_int_equal(model_config_preset("gpt-17", &c, &e), LOOM_ENOTFOUND);
    assert_non_null(strstr(e.msg, "gpt-17"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rope_variants), cmocka_unit_test(test_head_dim_and_tokens),
        cmocka_unit_test(test_architectures), cmocka_unit_test(test_errors),
        cmocka_unit_test(test_presets),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
