/*
 * model: Hugging Face checkpoints (config.json, safetensors, sharded or not), model presets with
 * random weights, and the batched transformer forward pass over a paged KV cache.
 * Dimension letters: T tokens in the flat batch, d hidden, H heads, Hkv kv heads, hd head dim,
 * V vocab, I intermediate (FFN) size, E experts, L layers.
 */
#ifndef LOOM_MODEL_H
#define LOOM_MODEL_H

#include "loom/base.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- safetensors */

typedef enum { ST_F32, ST_F16, ST_BF16, ST_I32, ST_I64, ST_OTHER } st_dtype;

typedef struct st_tensor {
    char *name;
    st_dtype dtype;
    char dtype_name[16];
    int n_dims;
    int64_t shape[8];
    size_t offset;  /* from start of data section */
    size_t nbytes;
    const void *data; /* into the mapping (NULL until mapped) */
} st_tensor;

typedef struct st_file {
    char *path;
    void *map;          /* mmap of the whole file */
    size_t map_len;
    size_t n_tensors;
    st_tensor *tensors;
} st_file;

/* Parse a safetensors header (the JSON after the 8-byte length) against a file of file_len
 * bytes. Validates dtypes, shapes (overflow), offsets inside the data section, no overlap.
 * Pure function over bytes: the fuzz target calls it. */
int st_parse(const uint8_t *bytes, size_t file_len, st_file *out, loom_err *e);
int st_open(const char *path, st_file *out, loom_err *e);  /* mmap + parse */
void st_close(st_file *f);
const st_tensor *st_find(const st_file *f, const char *name);

/* A checkpoint: one or many safetensors files (model.safetensors.index.json). */
typedef struct st_set {
    int n_files;
    st_file *files;
} st_set;
int st_set_open_dir(const char *dir, st_set *out, loom_err *e);
void st_set_close(st_set *s);
const st_tensor *st_set_find(const st_set *s, const char *name);
/* Copy a tensor widened to f32 into dst (n elements); error if dtype unsupported. */
int st_tensor_to_f32(const st_tensor *t, float *dst, loom_err *e);
/* Write a safetensors file: each tensor's name, dtype (F32, F16, BF16, I32, I64), n_dims, shape
 * and data are used (offset and nbytes are computed). The header is padded to 8 bytes. */
int st_save(const char *path, const st_tensor *tensors, size_t n, loom_err *e);

/* ---------------------------------------------------------------- config */

typedef enum {
    ARCH_LLAMA,
    ARCH_MISTRAL,
    ARCH_QWEN2,
    ARCH_MIXTRAL,
    ARCH_QWEN2_MOE,
    ARCH_LOOM_MOE, /* LoomMoeForCausalLM: Mixtral layout with a loom train router */
} model_arch;

typedef enum { ROPE_DEFAULT, ROPE_LINEAR, ROPE_LLAMA3 } model_rope_type;

typedef struct model_config {
    char architecture[64]; /* as in config.json, e.g. "MixtralForCausalLM" */
    model_arch arch;
    char model_type[32];
    char dtype[16];        /* "float32", "bfloat16", "float16" */
    int vocab_size;
    int hidden_size;       /* d */
    int intermediate_size; /* I (dense FFN, or per-expert for Mixtral) */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;          /* hd; hidden_size / n_heads when absent or null */
    int max_position_embeddings;
    float rms_norm_eps;
    float rope_theta;      /* from rope_theta or rope_parameters.rope_theta */
    bool tie_word_embeddings;
    bool attention_bias;   /* q/k/v bias (Qwen2 always) */
    /* MoE */
    int n_experts;         /* 0 for dense */
    int n_experts_per_tok;
    bool norm_topk_prob;
    int moe_intermediate_size;           /* Qwen2-MoE routed expert size */
    int shared_expert_intermediate_size; /* Qwen2-MoE shared expert, 0 if none */
    int decoder_sparse_step;             /* Qwen2-MoE: layer l is MoE if (l+1) % step == 0 */
    /* special tokens */
    int bos_token_id;      /* -1 if none */
    int n_eos;
    int eos_token_ids[8];
    /* added for the model module (zero = off) */
    int sliding_window;    /* Mistral/Mixtral sliding_window; 0 = full causal attention */
    int n_mlp_only_layers; /* Qwen2-MoE mlp_only_layers: dense layers among the MoE ones */
    int mlp_only_layers[64];
    model_rope_type rope_type;  /* from rope_parameters / rope_scaling */
    float rope_factor;          /* linear and llama3 scaling */
    float rope_low_freq_factor, rope_high_freq_factor; /* llama3 */
    int rope_original_max_position;                    /* llama3 */
    /* LoomMoeForCausalLM (exports of `loom train --router hash|locmoe|group_limited|switch`):
     * the router as loom_router* in config.json; renormalisation is norm_topk_prob and k is
     * n_experts_per_tok. Zero for every other architecture. */
    int router_kind;          /* moe_router_kind of loom/moe.h (0 = MOE_ROUTER_TOPK) */
    bool router_sigmoid;      /* per-expert sigmoid scores instead of a softmax */
    int router_n_groups;      /* group_limited: expert groups */
    int router_topk_groups;   /* group_limited: groups a token may use */
    float router_route_scale; /* combine weights times this (0 = 1) */
} model_config;

int model_config_parse(const char *json, size_t len, model_config *c, loom_err *e);
int model_config_load(const char *path, model_config *c, loom_err *e);
/* Named presets with the same architectures: llama-tiny, llama-125m, llama-1b, mixtral-tiny,
 * mixtral-1b, qwen2-tiny, qwen2moe-tiny. */
int model_config_preset(const char *name, model_config *c, loom_err *e);
const char *const *model_preset_names(void); /* NULL-terminated */
/*
 * A model shape from YAML (`loom train --model-spec FILE.yaml`): Hugging Face config.json key
 * names (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
 * num_key_value_heads, head_dim, vocab_size, num_local_experts, num_experts_per_tok,
 * rope_theta, rms_norm_eps, max_position_embeddings, tie_word_embeddings, bos_token_id,
 * eos_token_id), optionally on top of `preset: NAME`. vocab_size may be left out (*has_vocab
 * false: the caller takes its tokenizer's). Unknown keys, wrong types and impossible shapes are
 * LOOM_EFORMAT with what (the file name) and the line in the message.
 */
int model_config_from_yaml(const char *text, size_t len, const char *what, model_config *c,
                           bool *has_vocab, loom_err *e);
int model_config_load_yaml(const char *path, model_config *c, bool *has_vocab, loom_err *e);
bool model_config_is_moe_layer(const model_config *c, int layer);
/* Parameter counts and bytes (f32 as stored in memory). */
size_t model_config_n_params(const model_config *c);
/* Parameters read per token by a forward pass (MoE: only the k routed experts of each layer). */
size_t model_config_n_active_params(const model_config *c);
/* RoPE inverse frequencies (head_dim/2) for c, with its rope scaling applied. */
void model_config_rope_inv_freq(const model_config *c, float *inv_freq);

/* ---------------------------------------------------------------- KV cache storage */

typedef struct model_kv {
    int n_layers, n_blocks, block_size, kv_dim; /* kv_dim = Hkv*hd */
    float *k; /* (L, n_blocks, block_size, kv_dim) */
    float *v; /* (L, n_blocks, block_size, kv_dim) */
} model_kv;

size_t model_kv_bytes_per_block(const model_config *c, int block_size);
int model_kv_init(model_kv *kv, const model_config *c, int n_blocks, int block_size, loom_err *e);
void model_kv_free(model_kv *kv);

/* ---------------------------------------------------------------- model and forward */

typedef struct model model; /* opaque: config + f32 weights + workspace */

/* Load a Hugging Face directory (config.json + safetensors). BF16/F16 are widened to f32. */
int model_load(const char *dir, model **out, loom_err *e);
/* Random weights (normal, std 0.02, fixed seed) for a preset name. */
int model_create_random(const char *preset, uint64_t seed, model **out, loom_err *e);
/* "random:<preset>" or a directory. */
int model_open(const char *spec, model **out, loom_err *e);
void model_free(model *m);
/* Write m as a Hugging Face directory: config.json and model.safetensors (f32, per-expert MoE
 * layout, Hugging Face tensor names). dir must exist. */
int model_save(const model *m, const char *dir, loom_err *e);
const model_config *model_get_config(const model *m);
size_t model_weight_bytes(const model *m);

typedef struct model_batch {
    int n_seqs;
    int n_tokens;
    const int32_t *tokens;              /* (T) flat, sequence after sequence */
    const int32_t *seq_start;           /* (n_seqs+1) seq s owns tokens [seq_start[s], seq_start[s+1]) */
    const int32_t *ctx_len;             /* (n_seqs) tokens of s already in the cache; new token i
                                           of s has position ctx_len[s] + i */
    const int32_t *const *block_tables; /* (n_seqs) block ids covering ctx_len + new tokens */
    int n_logits;
    const int32_t *logit_rows;          /* (n_logits) flat token indices whose logits are wanted */
    float *const *router_logits;        /* optional: (L) each (T, E) pre-softmax gate outputs, or
                                           NULL entries for dense layers; NULL to skip */
    float *const *moe_inputs;           /* optional: (L) each (T, d) the normalised hidden states
                                           entering each MoE layer (what its router reads), or
                                           NULL entries; NULL to skip */
} model_batch;

/*
 * Runs the batch: writes K/V of every new token into kv at its block-table slot, and logits
 * (n_logits, V) for the rows asked. Workspace grows to the largest batch seen (no allocation on
 * the steady-state decode path). One forward at a time per model (the workspace is the
 * model's); the batch is validated first (tokens in vocabulary, block ids in range, logit rows
 * in the batch: LOOM_EINVAL otherwise).
 */
int model_forward(model *m, model_kv *kv, const model_batch *b, float *logits, loom_err *e);

#endif
