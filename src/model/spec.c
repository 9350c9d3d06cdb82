/*
 * Model shapes from YAML (`loom train --model-spec FILE.yaml`). The keys are Hugging Face
 * config.json's, so a spec reads like the config.json the export will carry; `preset: NAME`
 * starts from a named preset and the other keys override it. Every check that would otherwise
 * fail deep in the trainer (heads that do not divide the width, kv heads that do not divide the
 * heads, top-k above the expert count) is made here, with the file and line.
 */
#include "loom/model.h"

#include "../perf/yaml_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const spec_keys[] = {"preset",
                                        "hidden_size",
                                        "intermediate_size",
                                        "num_hidden_layers",
                                        "num_attention_heads",
                                        "num_key_value_heads",
                                        "head_dim",
                                        "vocab_size",
                                        "num_local_experts",
                                        "num_experts_per_tok",
                                        "rope_theta",
                                        "rms_norm_eps",
                                        "max_position_embeddings",
                                        "tie_word_embeddings",
                                        "bos_token_id",
                                        "eos_token_id",
                                        NULL};

static void set_arch_names(model_config *c, model_arch arch)
{
    static const char *const names[][2] = {
        [ARCH_LLAMA] = {"LlamaForCausalLM", "llama"},
        [ARCH_MISTRAL] = {"MistralForCausalLM", "mistral"},
        [ARCH_QWEN2] = {"Qwen2ForCausalLM", "qwen2"},
        [ARCH_MIXTRAL] = {"MixtralForCausalLM", "mixtral"},
        [ARCH_QWEN2_MOE] = {"Qwen2MoeForCausalLM", "qwen2_moe"},
        [ARCH_LOOM_MOE] = {"LoomMoeForCausalLM", "loom_moe"},
    };
    c->arch = arch;
    snprintf(c->architecture, sizeof(c->architecture), "%s", names[arch][0]);
    snprintf(c->model_type, sizeof(c->model_type), "%s", names[arch][1]);
}

/* An integer key into *dst when present (required: an error when absent). */
static int int_key(perf_yaml *y, yaml_node_t *root, const char *key, bool required, long long lo,
                   long long hi, int *dst, bool *given, loom_err *e)
{
    long long v = *dst;
    bool present = perf_yaml_get(y, root, key) != NULL;
    int rc = perf_yaml_int(y, root, key, required, v, lo, hi, &v, e);
    if (!rc)
        *dst = (int)v;
    if (given)
        *given = present;
    return rc;
}

int model_config_from_yaml(const char *text, size_t len, const char *what, model_config *c,
                           bool *has_vocab, loom_err *e)
{
    perf_yaml y;
    int rc = perf_yaml_load(&y, text, len, what, e);
    if (rc)
        return rc;
    yaml_node_t *root = perf_yaml_root(&y);
    char preset[64] = "";
    bool given_heads = false, given_hidden = false, given_hd = false, given_vocab = false;
    bool given_e = false, given_k = false;
    if ((rc = perf_yaml_expect_map(&y, root, "model spec", e)) ||
        (rc = perf_yaml_check_keys(&y, root, spec_keys, "model spec", e)) ||
        (rc = perf_yaml_string(&y, root, "preset", false, "", preset, sizeof(preset), e)))
        goto out;
    bool have_preset = preset[0] != 0;
    if (have_preset) {
        if ((rc = model_config_preset(preset, c, e))) {
            char msg[sizeof(e->msg)];
            snprintf(msg, sizeof(msg), "%s", e ? e->msg : "");
            rc = loom_errf(e, rc, "%s:%d: %s", y.what,
                           perf_yaml_line(perf_yaml_get(&y, root, "preset")), msg);
            goto out;
        }
        c->bos_token_id = -1; /* the presets' are the bytes tokenizer's: the caller's decides */
        c->n_eos = 0;
    } else {
        memset(c, 0, sizeof(*c));
        set_arch_names(c, ARCH_LLAMA);
        snprintf(c->dtype, sizeof(c->dtype), "float32");
        c->max_position_embeddings = 2048;
        c->rms_norm_eps = 1e-5f;
        c->rope_theta = 10000.0f;
        c->rope_type = ROPE_DEFAULT;
        c->rope_factor = 1.0f;
        c->bos_token_id = -1;
    }
    bool req = !have_preset;
    if ((rc = int_key(&y, root, "hidden_size", req, 2, 1 << 16, &c->hidden_size, &given_hidden,
                      e)) ||
        (rc = int_key(&y, root, "intermediate_size", req, 1, 1 << 20, &c->intermediate_size, NULL,
                      e)) ||
        (rc = int_key(&y, root, "num_hidden_layers", req, 1, 1024, &c->n_layers, NULL, e)) ||
        (rc = int_key(&y, root, "num_attention_heads", req, 1, 1024, &c->n_heads, &given_heads, e)))
        goto out;
    if (!have_preset)
        c->n_kv_heads = c->n_heads;
    c->head_dim = c->n_heads > 0 ? c->hidden_size / c->n_heads : 0;
    if ((rc = int_key(&y, root, "num_key_value_heads", false, 1, 1024, &c->n_kv_heads, NULL, e)) ||
        (rc = int_key(&y, root, "head_dim", false, 2, 4096, &c->head_dim, &given_hd, e)) ||
        (rc =
             int_key(&y, root, "vocab_size", false, 2, 1 << 24, &c->vocab_size, &given_vocab, e)) ||
        (rc = int_key(&y, root, "num_local_experts", false, 0, 256, &c->n_experts, &given_e, e)) ||
        (rc = int_key(&y, root, "num_experts_per_tok", false, 1, 256, &c->n_experts_per_tok,
                      &given_k, e)) ||
        (rc = int_key(&y, root, "max_position_embeddings", false, 2, 1 << 24,
                      &c->max_position_embeddings, NULL, e)) ||
        (rc = int_key(&y, root, "bos_token_id", false, 0, 1 << 24, &c->bos_token_id, NULL, e)))
        goto out;
    int eos = c->n_eos > 0 ? c->eos_token_ids[0] : -1;
    bool given_eos = false;
    if ((rc = int_key(&y, root, "eos_token_id", false, 0, 1 << 24, &eos, &given_eos, e)))
        goto out;
    if (given_eos) {
        c->n_eos = 1;
        c->eos_token_ids[0] = eos;
    }
    double theta = c->rope_theta, eps = c->rms_norm_eps;
    if ((rc = perf_yaml_number(&y, root, "rope_theta", false, theta, 1.0000001, 1e12, &theta, e)) ||
        (rc = perf_yaml_number(&y, root, "rms_norm_eps", false, eps, 0.0, 1.0, &eps, e)) ||
        (rc = perf_yaml_bool(&y, root, "tie_word_embeddings", c->tie_word_embeddings,
                             &c->tie_word_embeddings, e)))
        goto out;
    c->rope_theta = (float)theta;
    c->rms_norm_eps = (float)eps;

    /* impossible shapes */
    int line = perf_yaml_line(root);
    if (!given_hd && c->hidden_size % c->n_heads) {
        yaml_node_t *n =
            perf_yaml_get(&y, root, given_heads ? "num_attention_heads" : "hidden_size");
        rc = loom_errf(e, LOOM_EFORMAT,
                       "%s:%d: num_attention_heads %d does not divide hidden_size %d (or give "
                       "head_dim)",
                       y.what, n ? perf_yaml_line(n) : line, c->n_heads, c->hidden_size);
        goto out;
    }
    if (c->head_dim % 2) {
        rc = loom_errf(e, LOOM_EFORMAT, "%s:%d: head_dim %d must be even (RoPE rotates pairs)",
                       y.what, line, c->head_dim);
        goto out;
    }
    if (c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads) {
        yaml_node_t *n = perf_yaml_get(&y, root, "num_key_value_heads");
        rc = loom_errf(e, LOOM_EFORMAT,
                       "%s:%d: num_key_value_heads %d does not divide num_attention_heads %d",
                       y.what, n ? perf_yaml_line(n) : line, c->n_kv_heads, c->n_heads);
        goto out;
    }
    if (given_e) {
        if (c->n_experts > 0 && c->arch != ARCH_MIXTRAL)
            set_arch_names(c, ARCH_MIXTRAL);
        else if (c->n_experts == 0 && (c->arch == ARCH_MIXTRAL || c->arch == ARCH_QWEN2_MOE))
            set_arch_names(c, ARCH_LLAMA);
    }
    if (c->n_experts > 0) {
        if (!given_k && c->n_experts_per_tok < 1)
            c->n_experts_per_tok = c->n_experts < 2 ? c->n_experts : 2;
        if (c->n_experts_per_tok > c->n_experts) {
            yaml_node_t *n = perf_yaml_get(&y, root, "num_experts_per_tok");
            rc = loom_errf(e, LOOM_EFORMAT,
                           "%s:%d: num_experts_per_tok %d exceeds num_local_experts %d", y.what,
                           n ? perf_yaml_line(n) : line, c->n_experts_per_tok, c->n_experts);
            goto out;
        }
        if (c->arch == ARCH_MIXTRAL) {
            c->moe_intermediate_size = c->intermediate_size;
            c->decoder_sparse_step = 1;
            c->norm_topk_prob = true;
        }
    } else {
        if (given_k) {
            yaml_node_t *n = perf_yaml_get(&y, root, "num_experts_per_tok");
            rc = loom_errf(e, LOOM_EFORMAT,
                           "%s:%d: num_experts_per_tok without num_local_experts (a dense model)",
                           y.what, perf_yaml_line(n));
            goto out;
        }
        c->n_experts_per_tok = 0;
    }
    if (has_vocab)
        *has_vocab = given_vocab;
out:
    perf_yaml_free(&y);
    return rc;
}

int model_config_load_yaml(const char *path, model_config *c, bool *has_vocab, loom_err *e)
{
    char *text = NULL;
    size_t len = 0;
    int rc = loom_read_file(path, &text, &len, e);
    if (rc)
        return rc;
    rc = model_config_from_yaml(text, len, path, c, has_vocab, e);
    free(text);
    return rc;
}
