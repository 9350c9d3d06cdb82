/*
 * train: a trainable decoder-only transformer (Llama / Mixtral) in C, its optimiser, data
 * pipeline, checkpoints and expert parallelism over MPI. See docs/train.md.
 *
 * Dimension letters (as model.h): B sequences, T positions per sequence, N = B*T tokens,
 * d hidden, H heads, Hkv kv heads, hd head dim, V vocab, I FFN (per-expert) size, E experts,
 * k experts per token, L layers, R ranks.
 *
 * Parameters live in one allocation carved into named tensors laid out and named exactly like
 * the Hugging Face checkpoint ("model.layers.0.self_attn.q_proj.weight", ...), so gradients
 * compare by name against the fixtures and an export is a plain st_save of the table. The
 * gradients are a second allocation with the same layout.
 */
#ifndef LOOM_TRAIN_H
#define LOOM_TRAIN_H

#include "loom/base.h"
#include "loom/model.h"
#include "loom/moe.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- distributed context */

/* One process per rank. Without MPI (or not started under mpirun) the context is rank 0 of 1. */
typedef struct train_dist {
    int rank, n_ranks;
    int ranks_per_node; /* virtual topology: ranks [n*rpn, (n+1)*rpn) form node n */
    bool mpi;           /* MPI_Init was called by train_dist_init */
    double comm_time;   /* seconds spent in MPI calls since the last reset */
} train_dist;

/* Starts MPI when the process was launched by mpirun (OMPI_COMM_WORLD_SIZE / PMI_SIZE set). */
int train_dist_init(train_dist *d, int *argc, char ***argv, int ranks_per_node, loom_err *e);
void train_dist_finalize(train_dist *d);
/* Sum-all-reduce n floats in place (no-op on one rank); time counted in comm_time. */
void train_dist_allreduce_f32(train_dist *d, float *x, size_t n);
void train_dist_allreduce_f64(train_dist *d, double *x, size_t n);
void train_dist_allreduce_i64(train_dist *d, int64_t *x, size_t n);
void train_dist_bcast(train_dist *d, void *buf, size_t bytes, int root);
void train_dist_barrier(train_dist *d);
/* Variable all-to-all of floats: counts and displacements in floats, per rank. */
void train_dist_alltoallv_f32(train_dist *d, const float *send, const int *send_counts,
                              const int *send_displs, float *recv, const int *recv_counts,
                              const int *recv_displs);
void train_dist_alltoall_i32(train_dist *d, const int32_t *send, int32_t *recv, int per_rank);

/* ---------------------------------------------------------------- model configuration */

typedef struct train_config {
    model_config model;        /* shapes and names; n_experts = 0 for a dense (Llama) model */
    moe_router_kind router;    /* MOE_ROUTER_TOPK (Mixtral/GShard/Switch by k), HASH, LOCMOE, ... */
    int top_k;                 /* experts per token (topk, group_limited); 0 = the model's */
    bool renormalize;          /* Mixtral: divide the k chosen probabilities by their sum */
    double aux_coef;           /* Mixtral's load_balancing_loss_func coefficient (0 = off) */
    double z_coef;             /* ST-MoE router z-loss (0 = off) */
    double loc_coef;           /* LocMoE locality loss mu (LocMoE eq. 6; 0 = off) */
    double capacity_factor;    /* expert capacity ceil(k N cf / E); 0 = dropless */
    int B_max, T_max;          /* largest (local) batch the activations are sized for */
    uint64_t seed;             /* random init, router init */
    float init_std;            /* random init std (0 = 0.02) */
} train_config;

/* Defaults: Mixtral-style renormalised top-k, no aux loss, dropless. */
void train_config_default(train_config *c, const model_config *mc, int B_max, int T_max);
/* --router NAME: topk|mixtral|gshard (k = model's), switch (k = 1), hash, locmoe,
 * group_limited, expert_choice. */
int train_config_set_router(train_config *c, const char *name, loom_err *e);

/* ---------------------------------------------------------------- parameters */

typedef struct train_param {
    char name[128];     /* Hugging Face tensor name */
    int n_dims;
    int64_t shape[2];
    size_t offset;      /* in floats, into params and grads */
    size_t n;           /* elements */
    int expert;         /* -1, or the expert index (expert parallel: hosted by one rank) */
    int layer;          /* -1 for embeddings / final norm / lm_head */
} train_param;

/* Pointers into one parameter (or gradient) allocation. */
typedef struct train_layer_weights {
    float *ln1;      /* (d) input_layernorm */
    float *wq;       /* (H*hd, d) */
    float *wk;       /* (Hkv*hd, d) */
    float *wv;       /* (Hkv*hd, d) */
    float *wo;       /* (d, H*hd) */
    float *ln2;      /* (d) post_attention_layernorm */
    float *w_gate;   /* (I, d) dense mlp.gate_proj, or NULL */
    float *w_up;     /* (I, d) */
    float *w_down;   /* (d, I) */
    float *router_w; /* (E, d) block_sparse_moe.gate.weight, or NULL (GrAP, hash, dense) */
    float *router_b; /* (E) block_sparse_moe.gate.bias (LocMoE eps), or NULL */
    float *experts;  /* (E, 3, ...) expert e: w1 (I, d), w2 (d, I), w3 (I, d) at e*3*I*d */
} train_layer_weights;

typedef struct train_weights {
    float *embed;    /* (V, d) */
    float *norm;     /* (d) */
    float *lm_head;  /* (V, d); = embed when tied */
    train_layer_weights *layers; /* (L) */
} train_weights;

typedef struct train_model train_model; /* opaque: weights, gradients, activations */

int train_model_create(const train_config *c, train_dist *dist, train_model **out, loom_err *e);
void train_model_free(train_model *m);
const train_config *train_model_config(const train_model *m);

/* Random init (normal init_std, norms 1), the same on every rank for a seed. */
void train_model_init_random(train_model *m, uint64_t seed);
/* Load f32/bf16/f16 weights from a Hugging Face directory (per-expert or fused MoE layout). */
int train_model_load_hf(train_model *m, const char *dir, loom_err *e);
/* Reads dir/config.json plus router_aux_loss_coef; fills c with its shapes. */
int train_config_from_hf(train_config *c, const char *dir, int B_max, int T_max, loom_err *e);

/* Switch-style gate-input jitter in training forwards (--router-jitter): the gate sees
 * x * U(1 - jitter, 1 + jitter), elementwise, drawn from each MoE layer's own generator
 * (saved in checkpoints); validation and greedy forwards never jitter. 0 turns it off;
 * jitter must be in [0, 1); the hash router has no gate to jitter (LOOM_EINVAL). */
int train_router_set_jitter(train_model *m, float jitter, loom_err *e);

size_t train_model_n_params(const train_model *m);
int train_model_n_tensors(const train_model *m);
const train_param *train_model_tensor(const train_model *m, int i);
const train_param *train_model_find(const train_model *m, const char *name);
float *train_model_params(train_model *m);  /* (n_params) */
float *train_model_grads(train_model *m);   /* (n_params) */
/* Whether this rank owns (computes, updates) tensor i: every dense tensor; its experts. */
bool train_model_owns(const train_model *m, int i);

/* ---------------------------------------------------------------- forward / backward */

typedef struct train_loss {
    double ce;        /* mean next-token cross-entropy over the global valid targets */
    double aux;       /* Mixtral load-balancing loss (unscaled, over all layers) */
    double z;         /* router z-loss (scaled) */
    double loc;       /* locality loss (scaled) */
    double total;     /* ce + aux_coef*aux + z + loc: what backward differentiates */
    int64_t n_targets;/* global valid targets */
} train_loss;

/*
 * Forward over this rank's batch tokens (B, T) with targets (B, T) (-1 = ignored), keeping every
 * activation for backward. CE is averaged over the valid targets of all ranks (an all-reduce
 * of the count and the sum). Expert layers exchange rows with MPI_Alltoallv when R > 1.
 */
int train_forward(train_model *m, const int32_t *tokens, const int32_t *targets, int B, int T,
                  train_loss *loss, loom_err *e);
/* Logits (B*T, V) of the last forward (valid until the next backward). */
const float *train_logits(const train_model *m);
/* Backward of the last forward: accumulates d(total loss)/d(param) * scale into the gradients
 * (scale = 1/n_micro for gradient accumulation). Dense grads are not all-reduced here. */
int train_backward(train_model *m, float scale, loom_err *e);
void train_zero_grad(train_model *m);
/* Data parallel: all-reduce (sum) of the dense gradients; expert gradients stay on their rank. */
void train_allreduce_grads(train_model *m);

/* Routing statistics of layer l in the last forward, global over ranks (NULL: dense). */
typedef struct train_layer_stat {
    moe_layer_stats s;       /* tokens per expert (load_max/mean/cv), drops, shares, bytes */
    int64_t load[256];       /* global assignments per expert (E <= 256 recorded) */
} train_layer_stat;
const train_layer_stat *train_model_layer_stats(const train_model *m, int l);

/* ---------------------------------------------------------------- optimiser */

typedef struct train_opt_config {
    double lr, min_lr;       /* peak and final learning rate (cosine) */
    int warmup, steps;       /* linear warmup steps, total steps */
    double beta1, beta2, eps;
    double weight_decay;     /* decoupled (AdamW); not applied to norms */
    double grad_clip;        /* global L2 norm clip; 0 = off */
} train_opt_config;

void train_opt_config_default(train_opt_config *c);
double train_lr_at(const train_opt_config *c, int step); /* warmup + cosine; step from 0 */

typedef struct train_adamw {
    train_opt_config cfg;
    size_t n;
    float *m, *v;            /* (n_params) moments */
    int64_t t;               /* updates done */
} train_adamw;

int train_adamw_init(train_adamw *o, const train_opt_config *c, size_t n, loom_err *e);
void train_adamw_free(train_adamw *o);
/* Clips (global norm over owned tensors, all-reduced for experts) and updates the owned
 * tensors at step's learning rate. Returns the pre-clip gradient norm. */
double train_adamw_step(train_adamw *o, train_model *m, int step);

/* ---------------------------------------------------------------- data */

typedef struct train_data {
    int32_t *tokens;         /* (n_tokens) every file tokenised and concatenated, EOS between */
    int64_t n_tokens;
    int64_t n_train;         /* tokens [0, n_train) train, [n_train, n_tokens) validation */
    loom_rng rng;
} train_data;

struct tokenizer;
int train_data_load(train_data *d, const char *const *files, int n_files,
                    const struct tokenizer *tok,
                    double val_fraction, loom_err *e);
void train_data_free(train_data *d);
/* Global batch b (the same for every rank count): sequence i of B starts at a seeded random
 * offset of step s; rows [row0, row0+n_rows) are returned. tokens/targets (n_rows, T). */
int train_data_batch(const train_data *d, uint64_t seed, int64_t step, int B, int T, int row0,
                     int n_rows, bool val, int32_t *tokens, int32_t *targets, loom_err *e);

/* ---------------------------------------------------------------- steps (loop.c) */

typedef struct train_step_config {
    int batch;      /* global sequences per micro-batch (split over the ranks) */
    int seq_len;    /* T */
    int accum;      /* micro-batches per step (gradient accumulation) */
    uint64_t seed;  /* data order */
} train_step_config;

typedef struct train_step_result {
    double loss, ce, aux;   /* means over the micro-batches */
    double lr, grad_norm;   /* pre-clip global norm */
    double time, comm_time; /* seconds: whole step, of which MPI */
    int64_t tokens;         /* global tokens this step */
} train_step_result;

/* One optimisation step (see loop.c). */
int train_step(train_model *m, train_adamw *o, const train_data *d, const train_step_config *sc,
               int step, train_step_result *out, loom_err *e);
/* Mean CE over n_batches fixed validation batches. */
int train_evaluate(train_model *m, const train_data *d, const train_step_config *sc,
                   int n_batches, double *val_loss, loom_err *e);
/* Greedy continuation of prompt by n_new tokens into out (n_new): the forward recomputed over
 * the last T_max tokens for each one, argmax (lowest id on ties), no EOS stop. The oracle the
 * exported checkpoint's `loom serve` output is checked against. Collective under mpirun. */
int train_greedy(train_model *m, const int32_t *prompt, int n_prompt, int n_new, int32_t *out,
                 loom_err *e);

/* ---------------------------------------------------------------- checkpoints and export */

/* Resumable checkpoint: parameters, AdamW moments, step, data seed, in one safetensors file
 * written to path.tmp and renamed. On R ranks rank 0 writes after gathering the experts. */
int train_checkpoint_save(train_model *m, const train_adamw *o, int64_t step, uint64_t seed,
                          const char *path, loom_err *e);
int train_checkpoint_load(train_model *m, train_adamw *o, int64_t *step, uint64_t *seed,
                          const char *path, loom_err *e);
/* Hugging Face directory: config.json, model.safetensors (per-expert Mixtral layout), tokenizer
 * files copied from tokenizer_dir (may be NULL). Creates dir. Rank 0 writes. */
int train_export_hf(train_model *m, const char *dir, const char *tokenizer_dir, loom_err *e);

#endif
