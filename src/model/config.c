/*
 * Hugging Face config.json for the supported architectures, and named presets (the same
 * architectures at benchmark sizes, used with random weights).
 */
#include "loom/model.h"
#include "loom/moe.h"
#include "loom/tensor.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *architecture;
    const char *model_type;
    model_arch arch;
} arch_table[] = {
    {"LlamaForCausalLM", "llama", ARCH_LLAMA},
    {"MistralForCausalLM", "mistral", ARCH_MISTRAL},
    {"Qwen2ForCausalLM", "qwen2", ARCH_QWEN2},
    {"MixtralForCausalLM", "mixtral", ARCH_MIXTRAL},
    {"Qwen2MoeForCausalLM", "qwen2_moe", ARCH_QWEN2_MOE},
    {"LoomMoeForCausalLM", "loom_moe", ARCH_LOOM_MOE},
};
#define N_ARCH (sizeof(arch_table) / sizeof(arch_table[0]))
#define REQUIRED INT32_MIN

/*
 * Integer field key of obj into *out: absent or null gives def (or an error when def is
 * REQUIRED); present, it must be an integer in [lo, hi].
 */
static int get_int(const cJSON *obj, const char *key, int def, int lo, int hi, int *out,
                   loom_err *e)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j || cJSON_IsNull(j)) {
        if (def == REQUIRED)
            return loom_errf(e, LOOM_EFORMAT, "config.json: missing %s", key);
        *out = def;
        return LOOM_OK;
    }
    double v = cJSON_IsNumber(j) ? j->valuedouble : NAN;
    if (!(v >= lo && v <= hi) || floor(v) != v)
        return loom_errf(e, LOOM_EFORMAT, "config.json: %s must be an integer in [%d, %d]", key, lo,
                         hi);
    *out = (int)v;
    return LOOM_OK;
}

static int get_float(const cJSON *obj, const char *key, float def, float *out, loom_err *e)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j || cJSON_IsNull(j)) {
        *out = def;
        return LOOM_OK;
    }
    if (!cJSON_IsNumber(j) || !isfinite(j->valuedouble) || fabs(j->valuedouble) > 1e30)
        return loom_errf(e, LOOM_EFORMAT, "config.json: %s must be a finite number", key);
    *out = (float)j->valuedouble;
    return LOOM_OK;
}

static int get_bool(const cJSON *obj, const char *key, bool def, bool *out, loom_err *e)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!j || cJSON_IsNull(j)) {
        *out = def;
        return LOOM_OK;
    }
    if (!cJSON_IsBool(j))
        return loom_errf(e, LOOM_EFORMAT, "config.json: %s must be true or false", key);
    *out = cJSON_IsTrue(j);
    return LOOM_OK;
}

static void get_str(const cJSON *obj, const char *key, char *dst, size_t n)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (cJSON_IsString(j))
        snprintf(dst, n, "%s", j->valuestring);
}

/* rope_parameters (transformers 5) or rope_scaling (older): theta and the scaling type. */
static int parse_rope(const cJSON *root, model_config *c, loom_err *e)
{
    int rc = get_float(root, "rope_theta", 10000.0f, &c->rope_theta, e);
    if (rc)
        return rc;
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    if (!rp || cJSON_IsNull(rp))
        rp = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    c->rope_type = ROPE_DEFAULT;
    c->rope_factor = 1.0f;
    if (!rp || cJSON_IsNull(rp))
        return LOOM_OK;
    if (!cJSON_IsObject(rp))
        return loom_errf(e, LOOM_EFORMAT, "config.json: rope_parameters must be an object");
    if ((rc = get_float(rp, "rope_theta", c->rope_theta, &c->rope_theta, e)))
        return rc;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(rp, "rope_type");
    if (!type)
        type = cJSON_GetObjectItemCaseSensitive(rp, "type");
    const char *t = cJSON_IsString(type) ? type->valuestring : "default";
    if (strcmp(t, "default") == 0) {
        c->rope_type = ROPE_DEFAULT;
    } else if (strcmp(t, "linear") == 0) {
        c->rope_type = ROPE_LINEAR;
        rc = get_float(rp, "factor", 1.0f, &c->rope_factor, e);
    } else if (strcmp(t, "llama3") == 0) {
        c->rope_type = ROPE_LLAMA3;
        if (!rc)
            rc = get_float(rp, "factor", 8.0f, &c->rope_factor, e);
        if (!rc)
            rc = get_float(rp, "low_freq_factor", 1.0f, &c->rope_low_freq_factor, e);
        if (!rc)
            rc = get_float(rp, "high_freq_factor", 4.0f, &c->rope_high_freq_factor, e);
        if (!rc)
            rc = get_int(rp, "original_max_position_embeddings", 8192, 1, 1 << 24,
                         &c->rope_original_max_position, e);
        if (!rc && !(c->rope_high_freq_factor > c->rope_low_freq_factor))
            rc = loom_errf(e, LOOM_EFORMAT,
                           "config.json: llama3 rope needs high_freq_factor > low_freq_factor");
    } else {
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "config.json: rope type '%.40s' is not supported (default, linear, "
                         "llama3)",
                         t);
    }
    if (!rc && !(c->rope_factor > 0.0f))
        rc = loom_errf(e, LOOM_EFORMAT, "config.json: rope factor must be positive");
    if (!rc && !(c->rope_theta > 1.0f))
        rc = loom_errf(e, LOOM_EFORMAT, "config.json: rope_theta must be greater than 1");
    return rc;
}

static int parse_special(const cJSON *root, model_config *c, loom_err *e)
{
    int rc = get_int(root, "bos_token_id", -1, -1, INT32_MAX, &c->bos_token_id, e);
    if (rc)
        return rc;
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    c->n_eos = 0;
    if (cJSON_IsArray(eos)) {
        const cJSON *j;
        cJSON_ArrayForEach(j, eos)
        {
            double v = cJSON_IsNumber(j) ? j->valuedouble : -1.0;
            if (!(v >= 0 && v <= INT32_MAX) || floor(v) != v)
                return loom_errf(e, LOOM_EFORMAT, "config.json: bad eos_token_id entry");
            if (c->n_eos < (int)(sizeof(c->eos_token_ids) / sizeof(c->eos_token_ids[0])))
                c->eos_token_ids[c->n_eos++] = (int)v;
        }
    } else if (eos && !cJSON_IsNull(eos)) {
        int id;
        if ((rc = get_int(root, "eos_token_id", -1, 0, INT32_MAX, &id, e)))
            return rc;
        c->eos_token_ids[c->n_eos++] = id;
    }
    return LOOM_OK;
}

/*
 * LoomMoeForCausalLM: the Mixtral layout (block_sparse_moe.experts.N.w1/w2/w3) routed by one of
 * loom train's routers, named by loom_router. The defaults of each field are the trainer's
 * (moe_router_config_default), so an export carries only what it changed; the checks are
 * moe_router_init's, made here so that a bad config.json fails at load with the key's name.
 */
static int parse_loom_router(const cJSON *root, model_config *c, loom_err *e)
{
    const cJSON *kj = cJSON_GetObjectItemCaseSensitive(root, "loom_router");
    moe_router_kind kind;
    if (!cJSON_IsString(kj))
        return loom_errf(e, LOOM_EFORMAT, "config.json: LoomMoeForCausalLM needs loom_router");
    if (moe_router_kind_parse(kj->valuestring, &kind))
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "config.json: loom_router '%.40s' (topk, hash, locmoe, group_limited)",
                         kj->valuestring);
    if (kind == MOE_ROUTER_EXPERT_CHOICE)
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "config.json: loom_router expert_choice cannot be served: an expert picks "
                         "its tokens from the whole batch, so a token's route depends on the "
                         "others (HINT: train with --router topk, group_limited, locmoe or hash)");
    moe_router_config def;
    moe_router_config_default(&def, kind, c->hidden_size, c->n_experts);
    c->router_kind = (int)kind;
    int rc = get_bool(root, "loom_router_renormalize", def.renormalize, &c->norm_topk_prob, e);
    const cJSON *sj = cJSON_GetObjectItemCaseSensitive(root, "loom_router_score");
    c->router_sigmoid = def.score == MOE_SCORE_SIGMOID;
    if (!rc && sj && !cJSON_IsNull(sj)) {
        if (cJSON_IsString(sj) && !strcmp(sj->valuestring, "sigmoid"))
            c->router_sigmoid = true;
        else if (cJSON_IsString(sj) && !strcmp(sj->valuestring, "softmax"))
            c->router_sigmoid = false;
        else
            rc = loom_errf(e, LOOM_EFORMAT, "config.json: loom_router_score must be \"softmax\" "
                           "or \"sigmoid\"");
    }
    if (!rc)
        rc = get_int(root, "loom_router_n_groups", def.n_groups, 1, c->n_experts,
                     &c->router_n_groups, e);
    if (!rc)
        rc = get_int(root, "loom_router_topk_groups", def.topk_groups, 1, c->n_experts,
                     &c->router_topk_groups, e);
    if (!rc)
        rc = get_float(root, "loom_router_route_scale", 1.0f, &c->router_route_scale, e);
    if (rc)
        return rc;
    int E = c->n_experts, k = c->n_experts_per_tok;
    if ((kind == MOE_ROUTER_HASH || kind == MOE_ROUTER_LOCMOE) && k != 1)
        return loom_errf(e, LOOM_EFORMAT, "config.json: the %s router takes one expert per token "
                         "(num_experts_per_tok is %d)", kj->valuestring, k);
    if (kind == MOE_ROUTER_LOCMOE && c->hidden_size < E)
        return loom_errf(e, LOOM_EFORMAT, "config.json: the locmoe (GrAP) router needs "
                         "hidden_size >= num_local_experts");
    if (kind == MOE_ROUTER_GROUP_LIMITED) {
        int G = c->router_n_groups, tg = c->router_topk_groups;
        if (E % G || tg > G || k > tg * (E / G))
            return loom_errf(e, LOOM_EFORMAT, "config.json: group_limited router: %d groups, %d "
                             "used, top-%d of %d experts is impossible", G, tg, k, E);
    }
    return LOOM_OK;
}

static int parse_moe(const cJSON *root, model_config *c, loom_err *e)
{
    int rc = 0;
    if (c->arch == ARCH_LOOM_MOE) {
        rc = get_int(root, "num_local_experts", REQUIRED, 1, 4096, &c->n_experts, e);
        if (!rc)
            rc = get_int(root, "num_experts_per_tok", 1, 1, c->n_experts, &c->n_experts_per_tok,
                         e);
        c->moe_intermediate_size = c->intermediate_size;
        c->decoder_sparse_step = 1;
        if (!rc)
            rc = parse_loom_router(root, c, e);
    } else if (c->arch == ARCH_MIXTRAL) {
        rc = get_int(root, "num_local_experts", 8, 1, 4096, &c->n_experts, e);
        if (!rc)
            rc = get_int(root, "num_experts_per_tok", 2, 1, 4096, &c->n_experts_per_tok, e);
        c->norm_topk_prob = true;
        c->moe_intermediate_size = c->intermediate_size;
        c->decoder_sparse_step = 1;
    } else if (c->arch == ARCH_QWEN2_MOE) {
        /* defaults are transformers' Qwen2MoeConfig defaults */
        rc = get_int(root, "num_experts", 60, 1, 4096, &c->n_experts, e);
        if (!rc)
            rc = get_int(root, "num_experts_per_tok", 4, 1, 4096, &c->n_experts_per_tok, e);
        if (!rc)
            rc = get_bool(root, "norm_topk_prob", false, &c->norm_topk_prob, e);
        if (!rc)
            rc = get_int(root, "moe_intermediate_size", 1408, 1, 1 << 20, &c->moe_intermediate_size,
                         e);
        if (!rc)
            rc = get_int(root, "shared_expert_intermediate_size", 5632, 0, 1 << 20,
                         &c->shared_expert_intermediate_size, e);
        if (!rc)
            rc = get_int(root, "decoder_sparse_step", 1, 1, 1 << 16, &c->decoder_sparse_step, e);
        const cJSON *mo = cJSON_GetObjectItemCaseSensitive(root, "mlp_only_layers");
        if (!rc && cJSON_IsArray(mo)) {
            const cJSON *j;
            cJSON_ArrayForEach(j, mo)
            {
                double v = cJSON_IsNumber(j) ? j->valuedouble : -1.0;
                if (!(v >= 0 && v < c->n_layers) || floor(v) != v)
                    return loom_errf(e, LOOM_EFORMAT, "config.json: bad mlp_only_layers entry");
                if (c->n_mlp_only_layers >= (int)(sizeof(c->mlp_only_layers) / sizeof(int)))
                    return loom_errf(e, LOOM_EUNSUPPORTED,
                                     "config.json: more than 64 mlp_only_layers");
                c->mlp_only_layers[c->n_mlp_only_layers++] = (int)v;
            }
        }
    }
    if (!rc && c->n_experts_per_tok > c->n_experts)
        rc = loom_errf(e, LOOM_EFORMAT, "config.json: num_experts_per_tok %d > %d experts",
                       c->n_experts_per_tok, c->n_experts);
    return rc;
}

int model_config_parse(const char *json, size_t len, model_config *c, loom_err *e)
{
    memset(c, 0, sizeof(*c));
    cJSON *root = cJSON_ParseWithLength(json, len);
    int rc = LOOM_OK;
    if (!root || !cJSON_IsObject(root)) {
        rc = loom_errf(e, LOOM_EFORMAT, "config.json: not a JSON object");
        goto done;
    }
    /* architecture: architectures[0], else model_type */
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    const cJSON *a0 = cJSON_IsArray(archs) ? cJSON_GetArrayItem(archs, 0) : NULL;
    get_str(root, "model_type", c->model_type, sizeof(c->model_type));
    int found = -1;
    if (cJSON_IsString(a0)) {
        snprintf(c->architecture, sizeof(c->architecture), "%s", a0->valuestring);
        for (size_t i = 0; i < N_ARCH; i++)
            if (strcmp(arch_table[i].architecture, a0->valuestring) == 0)
                found = (int)i;
    } else {
        for (size_t i = 0; i < N_ARCH; i++)
            if (strcmp(arch_table[i].model_type, c->model_type) == 0)
                found = (int)i;
        snprintf(c->architecture, sizeof(c->architecture), "%s",
                 found >= 0 ? arch_table[found].architecture
                            : (c->model_type[0] ? c->model_type : "(none)"));
    }
    if (found < 0) {
        rc = loom_errf(e, LOOM_EUNSUPPORTED,
                       "unsupported architecture '%s' (supported: LlamaForCausalLM, "
                       "MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM, "
                       "Qwen2MoeForCausalLM, LoomMoeForCausalLM)",
                       c->architecture);
        goto done;
    }
    c->arch = arch_table[found].arch;
    if (!c->model_type[0])
        snprintf(c->model_type, sizeof(c->model_type), "%s", arch_table[found].model_type);
    snprintf(c->dtype, sizeof(c->dtype), "float32");
    get_str(root, "torch_dtype", c->dtype, sizeof(c->dtype));
    get_str(root, "dtype", c->dtype, sizeof(c->dtype));

    if ((rc = get_int(root, "vocab_size", REQUIRED, 1, 1 << 24, &c->vocab_size, e)) ||
        (rc = get_int(root, "hidden_size", REQUIRED, 1, 1 << 16, &c->hidden_size, e)) ||
        (rc = get_int(root, "intermediate_size", REQUIRED, 1, 1 << 20, &c->intermediate_size, e)) ||
        (rc = get_int(root, "num_hidden_layers", REQUIRED, 1, 1024, &c->n_layers, e)) ||
        (rc = get_int(root, "num_attention_heads", REQUIRED, 1, 1024, &c->n_heads, e)) ||
        (rc = get_int(root, "num_key_value_heads", c->n_heads, 1, c->n_heads, &c->n_kv_heads, e)) ||
        (rc = get_int(root, "head_dim", c->hidden_size / c->n_heads, 0, 4096, &c->head_dim, e)) ||
        (rc = get_int(root, "max_position_embeddings", 2048, 1, 1 << 24,
                      &c->max_position_embeddings, e)) ||
        (rc = get_float(root, "rms_norm_eps", 1e-6f, &c->rms_norm_eps, e)) ||
        (rc = get_bool(root, "tie_word_embeddings", false, &c->tie_word_embeddings, e)) ||
        (rc = get_bool(root, "attention_bias", false, &c->attention_bias, e)) ||
        (rc = parse_rope(root, c, e)) || (rc = parse_special(root, c, e)))
        goto done;
    if (c->head_dim < 2 || c->head_dim % 2) {
        rc = loom_errf(e, LOOM_EFORMAT, "config.json: head_dim %d must be even and positive",
                       c->head_dim);
        goto done;
    }
    if (c->n_heads % c->n_kv_heads) {
        rc = loom_errf(e, LOOM_EFORMAT,
                       "config.json: num_attention_heads %d is not a multiple of "
                       "num_key_value_heads %d",
                       c->n_heads, c->n_kv_heads);
        goto done;
    }
    if (!(c->rms_norm_eps >= 0.0f)) {
        rc = loom_errf(e, LOOM_EFORMAT, "config.json: rms_norm_eps must be >= 0");
        goto done;
    }
    if (c->arch == ARCH_QWEN2 || c->arch == ARCH_QWEN2_MOE)
        c->attention_bias = true; /* Qwen2 always has q/k/v bias */

    /* things we would compute wrongly rather than refuse */
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (cJSON_IsString(act) && strcmp(act->valuestring, "silu") != 0) {
        rc = loom_errf(e, LOOM_EUNSUPPORTED, "config.json: hidden_act '%.40s' (only silu)",
                       act->valuestring);
        goto done;
    }
    bool flag = false;
    if ((rc = get_bool(root, "mlp_bias", false, &flag, e)))
        goto done;
    if (flag) {
        rc = loom_errf(e, LOOM_EUNSUPPORTED, "config.json: mlp_bias is not supported");
        goto done;
    }
    if (c->arch == ARCH_MISTRAL || c->arch == ARCH_MIXTRAL || c->arch == ARCH_LOOM_MOE) {
        if ((rc = get_int(root, "sliding_window", 0, 0, INT32_MAX, &c->sliding_window, e)))
            goto done;
    } else if (c->arch == ARCH_QWEN2 || c->arch == ARCH_QWEN2_MOE) {
        if ((rc = get_bool(root, "use_sliding_window", false, &flag, e)))
            goto done;
        if (flag) {
            rc = loom_errf(e, LOOM_EUNSUPPORTED,
                           "config.json: use_sliding_window is not supported for Qwen2");
            goto done;
        }
    }
    rc = parse_moe(root, c, e);
done:
    cJSON_Delete(root);
    return rc;
}

int model_config_load(const char *path, model_config *c, loom_err *e)
{
    char *text = NULL;
    size_t len = 0;
    int rc = loom_read_file(path, &text, &len, e);
    if (rc)
        return rc;
    rc = model_config_parse(text, len, c, e);
    if (rc && e) {
        char msg[sizeof(e->msg)];
        memcpy(msg, e->msg, sizeof(msg));
        msg[sizeof(msg) - 1] = 0;
        /* "config.json: x" -> "<path>: x" */
        const char *rest = strncmp(msg, "config.json: ", 13) == 0 ? msg + 13 : msg;
        loom_errf(e, rc, "%s: %s", path, rest);
    }
    free(text);
    return rc;
}

/* ---------------------------------------------------------------- presets */

typedef struct preset {
    const char *name;
    model_arch arch;
    int vocab, d, I, L, H, Hkv, max_pos;
    bool tie;
    int E, k, moe_I, shared_I, sparse_step, mlp_only0; /* mlp_only0: layer 0 dense if 1 */
    float theta;
} preset;

/* Sizes: the -tiny ones load in milliseconds (tests, the embedded default of `loom serve`);
 * llama-125m is GPT-2-small-sized; llama-1b is TinyLlama's shape with 16 layers (0.84 B params,
 * 3.3 GB in f32); mixtral-1b has 8 experts top-2 and about 1.0 B params (0.33 B active). */
static const preset presets[] = {
    {"llama-tiny", ARCH_LLAMA, 2048, 256, 768, 4, 4, 2, 2048, false, 0, 0, 0, 0, 0, 0, 10000.0f},
    {"llama-125m", ARCH_LLAMA, 32000, 768, 2048, 12, 12, 12, 2048, false, 0, 0, 0, 0, 0, 0,
     10000.0f},
    {"llama-1b", ARCH_LLAMA, 32000, 2048, 5632, 16, 32, 8, 2048, false, 0, 0, 0, 0, 0, 0, 10000.0f},
    {"mixtral-tiny", ARCH_MIXTRAL, 2048, 256, 512, 4, 4, 2, 2048, false, 8, 2, 512, 0, 1, 0,
     1000000.0f},
    {"mixtral-1b", ARCH_MIXTRAL, 32000, 1024, 2304, 16, 16, 4, 2048, false, 8, 2, 2304, 0, 1, 0,
     1000000.0f},
    {"qwen2-tiny", ARCH_QWEN2, 2048, 256, 768, 4, 4, 2, 2048, true, 0, 0, 0, 0, 0, 0, 1000000.0f},
    {"qwen2moe-tiny", ARCH_QWEN2_MOE, 2048, 256, 768, 4, 4, 2, 2048, false, 8, 2, 256, 512, 1, 1,
     1000000.0f},
};
#define N_PRESETS (sizeof(presets) / sizeof(presets[0]))

const char *const *model_preset_names(void)
{
    static const char *names[N_PRESETS + 1];
    for (size_t i = 0; i < N_PRESETS; i++)
        names[i] = presets[i].name;
    names[N_PRESETS] = NULL;
    return names;
}

int model_config_preset(const char *name, model_config *c, loom_err *e)
{
    memset(c, 0, sizeof(*c));
    const preset *p = NULL;
    for (size_t i = 0; i < N_PRESETS; i++)
        if (strcmp(presets[i].name, name) == 0)
            p = &presets[i];
    if (!p)
        return loom_errf(e, LOOM_ENOTFOUND,
                         "unknown preset '%.100s' (llama-tiny, llama-125m, llama-1b, "
                         "mixtral-tiny, mixtral-1b, qwen2-tiny, qwen2moe-tiny)",
                         name);
    for (size_t i = 0; i < N_ARCH; i++) {
        if (arch_table[i].arch == p->arch) {
            snprintf(c->architecture, sizeof(c->architecture), "%s", arch_table[i].architecture);
            snprintf(c->model_type, sizeof(c->model_type), "%s", arch_table[i].model_type);
        }
    }
    c->arch = p->arch;
    snprintf(c->dtype, sizeof(c->dtype), "float32");
    c->vocab_size = p->vocab;
    c->hidden_size = p->d;
    c->intermediate_size = p->I;
    c->n_layers = p->L;
    c->n_heads = p->H;
    c->n_kv_heads = p->Hkv;
    c->head_dim = p->d / p->H;
    c->max_position_embeddings = p->max_pos;
    c->rms_norm_eps = 1e-5f;
    c->rope_theta = p->theta;
    c->rope_type = ROPE_DEFAULT;
    c->rope_factor = 1.0f;
    c->tie_word_embeddings = p->tie;
    c->attention_bias = p->arch == ARCH_QWEN2 || p->arch == ARCH_QWEN2_MOE;
    c->n_experts = p->E;
    c->n_experts_per_tok = p->k;
    c->norm_topk_prob = p->arch == ARCH_MIXTRAL;
    c->moe_intermediate_size = p->moe_I;
    c->shared_expert_intermediate_size = p->shared_I;
    c->decoder_sparse_step = p->sparse_step;
    if (p->mlp_only0) {
        c->n_mlp_only_layers = 1;
        c->mlp_only_layers[0] = 0;
    }
    /* the special tokens of tokenizer_create_bytes */
    c->bos_token_id = -1;
    c->n_eos = 2;
    c->eos_token_ids[0] = 0; /* <|endoftext|> */
    c->eos_token_ids[1] = 2; /* <|im_end|> */
    return LOOM_OK;
}

bool model_config_is_moe_layer(const model_config *c, int layer)
{
    if (c->n_experts <= 0)
        return false;
    if (c->arch != ARCH_QWEN2_MOE)
        return true;
    for (int i = 0; i < c->n_mlp_only_layers; i++)
        if (c->mlp_only_layers[i] == layer)
            return false;
    return c->decoder_sparse_step > 0 && (layer + 1) % c->decoder_sparse_step == 0;
}

static size_t layer_params(const model_config *c, int l, bool active_only)
{
    size_t d = (size_t)c->hidden_size, q = (size_t)c->n_heads * c->head_dim,
           kv = (size_t)c->n_kv_heads * c->head_dim;
    size_t n = 2 * d + d * (q + 2 * kv) + q * d;
    if (c->attention_bias)
        n += q + 2 * kv;
    if (model_config_is_moe_layer(c, l)) {
        size_t E = (size_t)c->n_experts, Ie = (size_t)c->moe_intermediate_size;
        size_t used = active_only ? (size_t)c->n_experts_per_tok : E;
        size_t gate = E * d; /* LoomMoe: no gate (hash), or GrAP's bias only (locmoe) */
        if (c->arch == ARCH_LOOM_MOE && c->router_kind == MOE_ROUTER_HASH)
            gate = 0;
        else if (c->arch == ARCH_LOOM_MOE && c->router_kind == MOE_ROUTER_LOCMOE)
            gate = E;
        n += gate + used * 3 * d * Ie;
        if (c->shared_expert_intermediate_size > 0)
            n += 3 * d * (size_t)c->shared_expert_intermediate_size + d;
    } else {
        n += 3 * d * (size_t)c->intermediate_size;
    }
    return n;
}

size_t model_config_n_params(const model_config *c)
{
    size_t n = (size_t)c->vocab_size * c->hidden_size * (c->tie_word_embeddings ? 1 : 2) +
               (size_t)c->hidden_size;
    for (int l = 0; l < c->n_layers; l++)
        n += layer_params(c, l, false);
    return n;
}

size_t model_config_n_active_params(const model_config *c)
{
    /* the embedding is a row lookup; lm_head is read whole */
    size_t n = (size_t)c->vocab_size * c->hidden_size + (size_t)c->hidden_size;
    for (int l = 0; l < c->n_layers; l++)
        n += layer_params(c, l, true);
    return n;
}

/*
 * transformers' default RoPE frequencies, then the scaling:
 *   linear: inv_freq / factor (positions divided by factor);
 *   llama3: low frequencies (wavelength > original_max / low_freq_factor) divided by factor,
 *           high frequencies kept, the band between interpolated smoothly.
 */
void model_config_rope_inv_freq(const model_config *c, float *inv_freq)
{
    int half = c->head_dim / 2;
    tensor_rope_inv_freq(inv_freq, c->head_dim, c->rope_theta);
    if (c->rope_type == ROPE_LINEAR) {
        for (int i = 0; i < half; i++)
            inv_freq[i] /= c->rope_factor;
    } else if (c->rope_type == ROPE_LLAMA3) {
        float old = (float)c->rope_original_max_position;
        float low_wl = old / c->rope_low_freq_factor, high_wl = old / c->rope_high_freq_factor;
        for (int i = 0; i < half; i++) {
            float f = inv_freq[i], wl = 2.0f * (float)M_PI / f;
            if (wl > low_wl) {
                inv_freq[i] = f / c->rope_factor;
            } else if (wl >= high_wl) {
                float s = (old / wl - c->rope_low_freq_factor) /
                          (c->rope_high_freq_factor - c->rope_low_freq_factor);
                inv_freq[i] = (1.0f - s) * f / c->rope_factor + s * f;
            }
        }
    }
}
