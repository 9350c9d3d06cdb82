/* train: what the files of src/train/ share. Dimension letters as in model.c. */
#ifndef LOOM_TRAIN_INTERNAL_H
#define LOOM_TRAIN_INTERNAL_H

#include "loom/train.h"

/* One MoE layer's routing and expert rows of the last forward. The rows a rank computes are in
 * segments: from source rank s, for local expert x, rcount[s*El + x] rows, in (s, x) order. */
typedef struct train_moe_layer {
    moe_router router;
    moe_routing rt;
    moe_plan plan;
    int rows_cap;         /* rows the plan-side buffers hold */
    float *buf;           /* (rows_cap, d) dispatched rows in plan order (send side) */
    float *out;           /* (rows_cap, d) expert outputs in plan order */
    int rrows, rrows_cap; /* rows received for this rank's experts */
    float *rin;           /* (rrows_cap, d) received rows (= buf on one rank) */
    float *rg, *ru, *ra;  /* (rrows_cap, I) expert gate, up, silu(gate)*up */
    float *rout;          /* (rrows_cap, d) expert outputs (= out on one rank) */
    int32_t *scount;      /* (R*El) rows sent to rank r for its local expert x */
    int32_t *rcount;      /* (R*El) rows received from rank s for local expert x */
    double psum[256];     /* sum over tokens of the router probabilities (E) */
    int64_t count[256];   /* assignments per expert (E), before capacity */
    train_layer_stat stat;
    int64_t step_load[256]; /* global load summed over a step's micro-batches (E) */
} train_moe_layer;

struct train_model {
    train_config cfg;
    moe_router_config router_cfg; /* the template every layer's router starts from */
    train_dist *dist;
    train_dist local_dist;
    int n_tensors;
    train_param *tensors;
    size_t n_params;
    float *params, *grads; /* (n_params) each, carved by the table */
    train_weights w, g;    /* named pointers into params and grads */
    float *inv_freq;       /* (hd/2) */
    float *rope_cos, *rope_sin; /* (T_max, hd/2) cos, sin of pos * inv_freq */

    /* activations of the last forward, sized for (B_max, T_max) */
    int B, T, N;
    bool training; /* the forward is a training step's: router jitter applies */
    int32_t *tokens, *targets, *pos; /* (N) */
    float *act_mem;
    size_t act_floats;
    float *x;      /* (L+1, N, d) residual stream entering layer l; x[L] leaves the last */
    float *h1;     /* (L, N, d) rmsnorm(x) * ln1 */
    float *rstd1;  /* (L, N) */
    float *q;      /* (L, N, H*hd) after RoPE */
    float *k, *v;  /* (L, N, Hkv*hd), k after RoPE */
    float *att;    /* (L, B, H, T, T) attention probabilities */
    float *ao;     /* (L, N, H*hd) attention output before o_proj */
    float *x2;     /* (L, N, d) residual after attention */
    float *h2;     /* (L, N, d) rmsnorm(x2) * ln2 */
    float *rstd2;  /* (L, N) */
    float *fg, *fu, *fa; /* (L, N, I) dense FFN gate, up, silu(gate)*up */
    float *hf;     /* (N, d) final norm output */
    float *rstdf;  /* (N) */
    float *logits; /* (N, V) */
    /* backward scratch */
    float *dlogits;        /* (N, V) */
    float *dx, *dh, *dx2;  /* (N, d) */
    float *dq, *dao;       /* (N, H*hd) */
    float *dk, *dv;        /* (N, Hkv*hd) */
    float *dfg, *dfu;      /* (N, I) */
    float *att_scratch;    /* (att_threads, T*T) per-thread dS of the attention backward */
    int att_threads;
    double *tok_loss;      /* (N) cross-entropy of each token (0 without a target) */
    int64_t n_targets_global;
    train_loss last_loss;

    /* MoE */
    train_moe_layer *moe;  /* (L) */
    moe_topology topo;
    int e_lo, e_hi;        /* experts hosted here: [e_lo, e_hi) */
    int El;                /* E / R */
    float *d_weight;       /* (N, k) */
    float *d_scores;       /* (N, E) */
    double *router_dl;     /* (N, E) backward: d logits of the router */
    int32_t *token_rank;   /* (N) this rank, for the stats and the locality loss */
    float *eg_scratch, *eu_scratch; /* (rrows_cap, I) backward */
    float *d_rin;          /* (rrows_cap, d) backward: gradient of the received rows */
    int escratch_cap;
    bool moe_aux_ready;
    double aux_grad[256];  /* d aux / d prob of expert e, the same for every token and layer */
};

/* kernels (model.c) */
void train_mm(float *y, const float *x, const float *w, int n, int in, int out);
void train_mm_dx(float *dx, const float *dy, const float *w, int n, int in, int out);
void train_mm_dw(float *dw, const float *dy, const float *x, int n, int in, int out);
void train_rmsnorm_forward(float *y, float *rstd, const float *x, const float *w, int N, int d,
                           float eps);
void train_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x,
                            const float *rstd, const float *w, int N, int d);
void train_rope(float *x, const int32_t *pos, int N, int n_heads, int hd, const float *inv_freq,
                int sign);
void train_attention_forward(float *out, float *P, const float *q, const float *k, const float *v,
                             int B, int T, int H, int Hkv, int hd);
void train_attention_backward(float *dq, float *dk, float *dv, const float *d_out, const float *P,
                              const float *q, const float *k, const float *v, int B, int T, int H,
                              int Hkv, int hd, float *scratch);
void train_swiglu_forward(float *a, const float *g, const float *u, size_t n);
void train_swiglu_backward(float *dg, float *du, const float *da, const float *g, const float *u,
                           size_t n);
/* One SwiGLU FFN's rows: n rows from row r0 of the row buffers, its weights, its gradients. */
typedef struct train_ffn_seg {
    int r0, n;
    const float *w1, *w3, *w2; /* (I, d), (I, d), (d, I) */
    float *g1, *g3, *g2;       /* gradients of the same shapes (backward only) */
} train_ffn_seg;
/* y (rows, d) = beta y + ffn(x), each segment with its weights, g, u, a (rows, I) kept. */
void train_ffn_forward_segs(float *y, float *g, float *u, float *a, const float *x,
                            const train_ffn_seg *seg, int n_seg, int d, int I, float beta);
/* dx (rows, d) = beta dx + d ffn / dx; every segment's g1, g3, g2 += its weight gradients
 * (segments may share gradients: they are summed in segment order, never concurrently);
 * dg, du (rows, I) scratch. */
void train_ffn_backward_segs(float *dx, const float *dy, const float *x, const float *g,
                             const float *u, const float *a, const train_ffn_seg *seg, int n_seg,
                             int d, int I, float *dg, float *du, float beta);
void train_ffn_forward(float *y, float *g, float *u, float *a, const float *x, const float *w1,
                       const float *w3, const float *w2, int n, int d, int I);
void train_ffn_backward(float *dx, float *dw1, float *dw3, float *dw2, const float *dy,
                        const float *x, const float *g, const float *u, const float *a,
                        const float *w1, const float *w3, const float *w2, int n, int d, int I,
                        float *dg, float *du);

int train_acts_init(train_model *m, loom_err *e);
void train_acts_free(train_model *m);

/* MoE FFN (moe.c) */
int train_moe_init(train_model *m, loom_err *e);
void train_moe_free(train_model *m);
/* y (N, d) = x (N, d) + moe(h2 (N, d)) of layer l */
int train_moe_forward(train_model *m, int l, const float *h2, const float *x, float *y,
                      loom_err *e);
/* the losses of all layers once they have all run: aux (global over ranks), z, locality */
void train_moe_losses(train_model *m, train_loss *lo);
/* dh2 (N, d) = backward of layer l's MoE given dy (N, d) (overwritten) */
int train_moe_backward(train_model *m, int l, const float *h2, const float *dy, float *dh2,
                       float scale, loom_err *e);

/*
 * LOOM_TRAIN_PROFILE=1 (loop.c): wall time and pool jobs of each phase of train_step, the mean
 * per step (the first step, a warm-up, left out) printed to stderr at exit. TRAIN_PROF(ph)
 * charges the time since the previous mark to phase ph; off, it costs one branch.
 */
enum {
    TP_ZERO, TP_DATA, TP_EMBED, TP_NORM, TP_QKV, TP_ROPE, TP_ATTN, TP_OPROJ, TP_ROUTER, TP_PLAN,
    TP_DISPATCH, TP_EXPERT, TP_COMBINE, TP_MOE_STATS, TP_LMHEAD, TP_CE,
    TP_LMHEAD_B, TP_NORM_B, TP_COMBINE_B, TP_EXPERT_B, TP_DISPATCH_B, TP_ROUTER_B, TP_OPROJ_B,
    TP_ATTN_B, TP_ROPE_B, TP_QKV_B, TP_EMBED_B, TP_OPT, TP_N
};
extern bool train_prof_enabled;
void train_prof_mark(int phase);
#define TRAIN_PROF(ph)                                                                             \
    do {                                                                                           \
        if (train_prof_enabled)                                                                    \
            train_prof_mark(ph);                                                                   \
    } while (0)

#endif
