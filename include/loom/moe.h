/*
 * moe: Mixture-of-Experts routing. Depends only on base and tensor.
 * The engine's MoE layers, the trainer and `loom moe` all route through here.
 * Dimension letters: T tokens, E experts, k experts per token.
 */
#ifndef LOOM_MOE_H
#define LOOM_MOE_H

#include <stdbool.h>
#include <stdint.h>

/*
 * Top-k softmax router (Mixtral, Qwen2-MoE): probs = softmax(logits) over all E experts, keep the
 * k largest (ties broken by lower expert index), and when renormalize is set divide the kept
 * probabilities by their sum (Mixtral always; Qwen2-MoE when norm_topk_prob).
 *   logits (T, E) -> expert_idx (T, k), expert_weight (T, k), in descending weight order.
 */
void moe_topk_route(const float *logits, int T, int E, int k, bool renormalize,
                    int32_t *expert_idx, float *expert_weight);

/*
 * Token grouping for dispatch: for each expert, the list of (token, slot) pairs routed to it.
 *   expert_idx (T, k). counts (E), offsets (E+1) and order (T*k) give, for expert e, the flat
 *   assignment indices a = t*k + j in order[offsets[e] .. offsets[e+1]).
 */
void moe_group_by_expert(const int32_t *expert_idx, int T, int k, int E, int32_t *counts,
                         int32_t *offsets, int32_t *order);

/* ======================================================================================
 * Trainable routers, losses, capacity, dispatch/combine and communication accounting
 * (issue 6; docs/moe.md). More dimension letters: d hidden size, C capacity (rows per expert),
 * R ranks, N nodes. Every (T, k) array is token-major: slot j of token t is at t*k + j.
 * ====================================================================================== */

#include "loom/base.h"

#include <stddef.h>

/* ---------------------------------------------------------------- routers (router.c) */

typedef enum moe_router_kind {
    MOE_ROUTER_TOPK,          /* learned gate, softmax, top-k: Switch (k=1), GShard/Mixtral (k=2) */
    MOE_ROUTER_HASH,          /* fixed token-id -> expert table (Hash layers, PanGu-Sigma RRE) */
    MOE_ROUTER_GROUP_LIMITED, /* DeepSeek-V3: top groups, then top-k inside; balance bias */
    MOE_ROUTER_EXPERT_CHOICE, /* each expert takes its top-C tokens (Zhou et al. 2022) */
    MOE_ROUTER_LOCMOE,        /* GrAP gate + eps, ReLU, softmax, top-1 (LocMoE eqs. 2-4) */
} moe_router_kind;

typedef enum moe_gate_kind {
    MOE_GATE_LINEAR, /* logits = x W^T (+ b), W (E, d) learned */
    MOE_GATE_GRAP,   /* logits = omega x (+ eps), omega fixed (LocMoE eq. 4) */
} moe_gate_kind;

typedef enum moe_score_fn { MOE_SCORE_SOFTMAX, MOE_SCORE_SIGMOID } moe_score_fn;

typedef struct moe_router_config {
    moe_router_kind kind;
    int d;                  /* gate input size */
    int n_experts;          /* E */
    int k;                  /* experts per token; expert choice: mean experts per token */
    moe_gate_kind gate;     /* LOCMOE forces GRAP; HASH has none */
    bool gate_bias;         /* learned per-expert bias on the gate output (LocMoE eps_i) */
    bool gate_relu;         /* ReLU between gate and score (LocMoE eq. 2) */
    moe_score_fn score;     /* softmax over experts (default) or per-expert sigmoid (DeepSeek-V3) */
    bool renormalize;       /* divide the k chosen scores by their sum (Mixtral, DeepSeek-V3) */
    float route_scale;      /* combine weights *= route_scale (DeepSeek-V3 routed_scaling_factor);
                               0 means 1 */
    float z_loss_coef;      /* router z-loss (ST-MoE) coefficient; 0 = off */
    float jitter;           /* training only: gate input *= U(1 - jitter, 1 + jitter) (Switch) */
    int n_groups;           /* group_limited: expert groups (one per node), E % n_groups == 0 */
    int topk_groups;        /* group_limited: groups a token may use */
    float bias_rate;        /* group_limited: aux-loss-free bias step gamma; 0 = no bias */
    double capacity_factor; /* expert_choice: C = ceil(k * T * cf / E) */
    int vocab_size;         /* hash: table size (token ids outside go through a mixing hash) */
    float init_std;         /* linear gate init N(0, init_std^2); 0 means 1/sqrt(d) */
    uint64_t seed;          /* gate init, jitter stream, hash table */
} moe_router_config;

/* Defaults for a kind: Switch-like top-1 for TOPK (set k = 2 for GShard), LocMoE's GrAP top-1,
 * DeepSeek-V3's sigmoid + renormalised top-k with bias for GROUP_LIMITED, cf 1 for expert
 * choice. */
void moe_router_config_default(moe_router_config *cfg, moe_router_kind kind, int d, int E);
const char *moe_router_kind_name(moe_router_kind kind);
int moe_router_kind_parse(const char *name, moe_router_kind *kind); /* "topk", "switch", ... */
/* Slots per token in a routing: k, or E for expert choice (a token may be taken by any expert). */
int moe_router_slots(const moe_router_config *cfg);

typedef struct moe_router {
    moe_router_config cfg;
    float *w_gate;       /* (E, d) linear gate weight; NULL for GrAP and hash */
    float *b_gate;       /* (E) gate bias (LocMoE eps_i); NULL when cfg.gate_bias is off */
    float *balance_bias; /* (E) selection-only bias (aux-loss-free balancing); NULL when off */
    int32_t *hash_table; /* (vocab_size) expert of each token id; hash router only */
    float *grad_w_gate;  /* (E, d) accumulated by moe_router_backward */
    float *grad_b_gate;  /* (E) */
    loom_rng rng;        /* jitter noise */
} moe_router;

int moe_router_init(moe_router *r, const moe_router_config *cfg, loom_err *e);
void moe_router_free(moe_router *r);
void moe_router_zero_grad(moe_router *r);

/* What a forward pass produced, and what its backward needs. Sized once for T_max tokens. */
typedef struct moe_routing {
    int T, T_max, E, k, d; /* k = slots per token (moe_router_slots) */
    int32_t *expert_idx;   /* (T, k) expert of each slot, descending weight; -1 = empty slot */
    float *weight;         /* (T, k) combine weight of each slot (0 for empty slots) */
    float *logits;         /* (T, E) gate output fed to the score (G of LocMoE eq. 2) */
    float *scores;         /* (T, E) router probabilities: softmax or sigmoid of logits */
    float *pre_relu;       /* (T, E) gate output before ReLU; NULL unless gate_relu */
    float *gate_in;        /* (T, d) jittered gate input of the last training forward, or NULL */
    float *jitter_noise;   /* (T, d) its multipliers U(1 - jitter, 1 + jitter), or NULL */
    bool jittered;         /* gate_in holds this forward's input */
    double z_loss;         /* z-loss of this batch (0 when off); its gradient is in backward */
} moe_routing;

int moe_routing_init(moe_routing *rt, const moe_router_config *cfg, int T_max, loom_err *e);
void moe_routing_free(moe_routing *rt);

/*
 * Forward: x (T, d) gate inputs; token_ids (T) are needed by the hash router only (NULL
 * otherwise). training turns jitter on. Selection ties go to the lower expert index and the
 * slots are in descending weight order, as in moe_topk_route.
 */
int moe_router_forward(moe_router *r, const float *x, const int32_t *token_ids, int T,
                       bool training, moe_routing *rt, loom_err *e);

/*
 * Backward of a forward over the same x:
 *   d_weight (T, k): dLoss/d combine weights (moe_combine_backward), or NULL;
 *   d_scores (T, E): dLoss/d router probabilities (moe_aux_loss, moe_locality_loss), or NULL;
 * plus the z-loss gradient when it is on. Accumulates (+=) into d_x (T, d) (NULL to skip),
 * r->grad_w_gate and r->grad_b_gate. The hash router has no gradient.
 */
int moe_router_backward(moe_router *r, const float *x, const moe_routing *rt,
                        const float *d_weight, const float *d_scores, float *d_x, loom_err *e);
/* moe_router_backward's first part for token t alone: dLoss/d router logits into dl (E), through
 * the slot weights, the score function, the z-loss and LocMoE's ReLU; ds (E) is scratch. For
 * callers that split the tokens over threads (src/train/moe.c). */
void moe_router_token_dlogits(const moe_router *r, const moe_routing *rt, int t,
                              const float *d_weight, const float *d_scores, double *ds, double *dl);

/* DeepSeek-V3 aux-loss-free balancing: b_e += bias_rate * sign(mean(load) - load_e). */
void moe_router_update_balance_bias(moe_router *r, const int32_t *load);

/* A balanced hash table: with token_freq (V) the tokens, most frequent first, go to the expert
 * with the least mass so far (greedy LPT); without it a seeded permutation dealt round-robin. */
void moe_hash_table_build(int32_t *table, int vocab_size, int E, const int64_t *token_freq,
                          uint64_t seed);

/* ---------------------------------------------------------------- losses (loss.c) */

/*
 * Switch load-balancing loss, LocMoE eq. 5: L_aux = alpha * E * sum_i f_i * P_i, with
 * f_i = (assignments to expert i) / (T * k) and P_i = mean_t scores[t, i]. At k = 1 this is
 * eq. 5 exactly; Hugging Face's Mixtral loss at k = 2 is k times this value. Adds
 * dL/dscores into d_scores (T, E) when non-NULL (f is piecewise constant, so only P carries a
 * gradient, as in Switch). Returns L_aux.
 */
double moe_aux_loss(const float *scores, const int32_t *expert_idx, int T, int E, int k,
                    double alpha, float *d_scores); /* NaN if out of memory */

/* ST-MoE router z-loss: coef * mean_t (logsumexp_e logits[t, e])^2; adds into d_logits. */
double moe_z_loss(const float *logits, int T, int E, double coef, float *d_logits);

typedef struct moe_topology moe_topology;

/*
 * LocMoE locality loss, eq. 6: L_loc = mu * sum_g KL(D_c(g) || D_l(g)) over nodes g that hold
 * tokens and host experts, with
 *   D_c(g)_i = mean over the tokens t on node g of scores[t, i]  (batch-mean routing distribution)
 *   D_l(g)_i = (1 - floor) / |L_g| * 1{i in L_g} + floor / E     (fully local, floored)
 * where L_g is the set of experts hosted on g. token_rank (T) gives each token's rank (NULL:
 * equal contiguous blocks, as in moe_layer_stats_compute). Adds dL/dscores into d_scores when
 * non-NULL. Returns L_loc (NaN if out of memory). See loss.c for the reasoning.
 */
double moe_locality_loss(const float *scores, int T, int E, const moe_topology *topo,
                         const int32_t *token_rank, double mu, double floor, float *d_scores);

/* ---------------------------------------------------------------- capacity (capacity.c) */

/* ceil(k * T * cf / E), at least min_capacity (MindSpore / GShard / Switch). */
int moe_capacity(int k, int T, double capacity_factor, int E, int min_capacity);

/* p_delta = P(|cos(x, w)| >= delta) for x uniform on the unit sphere of R^d:
 * 1 - I_{delta^2}(1/2, (d-1)/2) (LocMoE Lemma 3), through GSL's gsl_sf_beta_inc. */
double moe_cap_probability(double delta, int d);

typedef struct moe_capacity_bound {
    int d, n;
    double delta;
    double p_delta;  /* exact, Lemma 3 */
    double ec_exact; /* 1 / (n p_delta): Theorem 1 */
    double p_erfc;   /* erfc(sqrt(delta^2 d / (2 - delta^2))), large-d form of p_delta */
    double ec_erfc;  /* 1 / (n p_erfc) */
    double ec_exp;   /* (1/n) exp(delta^2 d / (2 - delta^2)), strictly below ec_erfc */
} moe_capacity_bound;

int moe_capacity_bound_compute(int d, int n, double delta, moe_capacity_bound *out, loom_err *e);

/*
 * delta estimated from data: the cosine between each token x_t (gate input) and the gate vector
 * of the expert its first slot went to (w_e for a linear gate, omega_e for GrAP), over a batch.
 * LocMoE's statistic is the smallest of these (delta = min); quantiles are reported beside it
 * because the minimum of a large batch is fragile.
 */
typedef struct moe_delta_stats {
    int n;          /* tokens measured */
    double min;     /* the paper's statistic; also in .delta */
    double p01, p05, median, mean;
    double delta;   /* = min */
} moe_delta_stats;

int moe_delta_estimate(const moe_router *r, const float *x, const moe_routing *rt,
                       moe_delta_stats *out, loom_err *e);

/* ---------------------------------------------------------------- dispatch (dispatch.c) */

typedef enum moe_drop_policy {
    MOE_DROP_BY_POSITION, /* first slots before second slots, then earlier tokens (GShard) */
    MOE_DROP_BY_WEIGHT,   /* larger combine weight first (batch-prioritised routing, V-MoE) */
} moe_drop_policy;

typedef struct moe_plan_config {
    int capacity;               /* rows per expert; <= 0 = dropless (no limit) */
    moe_drop_policy drop;
    bool pad;                   /* each expert buffer padded to capacity rows (zeros) */
    const int32_t *expert_order;/* (E) buffer order of the experts, or NULL for 0..E-1; give
                                   experts sorted by rank so each rank's rows are contiguous */
} moe_plan_config;

/* Where every assignment goes: per-expert contiguous buffers with capacity and drops. */
typedef struct moe_plan {
    int T, T_max, k, E;
    int capacity;          /* per-expert limit applied (dropless: the largest load) */
    int n_rows;            /* rows in the expert buffer (kept assignments + padding) */
    int rows_max;          /* rows the buffers were sized for */
    int64_t n_assigned, n_kept, n_dropped;
    int32_t *load;         /* (E) assignments routed to each expert, before capacity */
    int32_t *count;        /* (E) kept assignments */
    int32_t *offset;       /* (E) first buffer row of each expert */
    int32_t *rows;         /* (E) rows of each expert buffer (count, or capacity when padded) */
    int32_t *row;          /* (T*k) buffer row of each assignment; -1 dropped or empty slot */
    int32_t *src;          /* (n_rows) assignment t*k+j of each buffer row; -1 = padding */
    int32_t *scratch;      /* (T*k) */
} moe_plan;

int moe_plan_init(moe_plan *p, int T_max, int k, int E, int rows_max, loom_err *e);
void moe_plan_free(moe_plan *p);
/* weight (T, k) is needed for MOE_DROP_BY_WEIGHT only. Fails if the buffer would exceed the
 * rows_max given to moe_plan_init (T_max*k always suffices without padding). */
int moe_plan_build(moe_plan *p, const moe_plan_config *cfg, const int32_t *expert_idx,
                   const float *weight, int T, loom_err *e);

/* buf (n_rows, d) <- rows of x (T, d); padding rows are zeroed. */
void moe_dispatch(const moe_plan *p, const float *x, int d, float *buf);
/* y (T, d) = sum over kept slots j of weight[t, j] * out[row(t, j)]; dropped slots add nothing. */
void moe_combine(const moe_plan *p, const float *weight, const float *out, int d, float *y);
/* Backward of moe_combine: d_weight (T, k) = <d_y[t], out[row]> (0 for dropped slots),
 * d_out (n_rows, d) = weight * d_y[t] (0 on padding). Either output may be NULL. */
void moe_combine_backward(const moe_plan *p, const float *weight, const float *out,
                          const float *d_y, int d, float *d_weight, float *d_out);
/* Backward of moe_dispatch: d_x (T, d) += the rows of d_buf scattered back. */
void moe_dispatch_backward(const moe_plan *p, const float *d_buf, int d, float *d_x);

/* ---------------------------------------------------------------- topology (topology.c) */

typedef enum moe_tier {
    MOE_TIER_RANK,  /* same rank: no transfer */
    MOE_TIER_GROUP, /* same node, same link group (NVLink/NVSwitch, HCCS) */
    MOE_TIER_NODE,  /* same node, across groups (PCIe between 910A's HCCS groups) */
    MOE_TIER_NET,   /* across nodes (InfiniBand, RoCE) */
    MOE_N_TIERS,
} moe_tier;

/* Transfer time of b bytes over one link: alpha + b / beta. */
typedef struct moe_link {
    double alpha;  /* s per transfer */
    double beta;   /* bytes/s, one direction */
    bool per_peer; /* a dedicated link to each peer (mesh); else one port shared by all peers */
} moe_link;

typedef struct moe_link_profile {
    const char *name;
    const char *description;
    int ranks_per_node;
    int ranks_per_group;       /* ranks sharing the GROUP tier; = ranks_per_node if one tier */
    moe_link tier[MOE_N_TIERS]; /* RANK unused */
} moe_link_profile;

/* Built-in profiles: "h100-ndr", "a100-hdr", "ascend-910a", "ascend-910b". */
const moe_link_profile *moe_link_profiles(int *n);
const moe_link_profile *moe_link_profile_find(const char *name);

struct moe_topology {
    int n_nodes, ranks_per_node, n_ranks, ranks_per_group, n_experts;
    int32_t *expert_rank; /* (E) rank hosting each expert */
    moe_link_profile link;
};

/* n_nodes x ranks_per_node ranks (0 = the profile's); experts placed in blocks: expert e on
 * rank floor(e * R / E). link NULL = "h100-ndr". */
int moe_topology_init(moe_topology *t, int n_nodes, int ranks_per_node, int E,
                      const moe_link_profile *link, loom_err *e);
void moe_topology_free(moe_topology *t);
int moe_topology_set_placement(moe_topology *t, const int32_t *expert_rank, loom_err *e);
static inline int moe_topology_node_of_rank(const moe_topology *t, int rank)
{
    return rank / t->ranks_per_node;
}
int moe_topology_tier(const moe_topology *t, int src_rank, int dst_rank);
/* (E) experts sorted by (rank, expert): a moe_plan_config.expert_order. */
void moe_topology_expert_order(const moe_topology *t, int32_t *order);

/* send (R, R): send[s*R + r] = kept rows that tokens on rank s send to experts on rank r.
 * token_rank (T); with NULL every token is on rank 0. */
void moe_send_counts(const moe_plan *p, const int32_t *expert_idx,
                     const int32_t *token_rank, const moe_topology *t, int64_t *send);

/* ---------------------------------------------------------------- statistics (stats.c) */

/* Per layer (or, summed with moe_stats_add, per step). Bytes are for the dispatch direction;
 * combine sends the same bytes back, and a2a_time covers both. */
typedef struct moe_layer_stats {
    int n_layers;
    int64_t tokens, assigned, kept, dropped;
    double drop_rate;                    /* dropped / assigned */
    double load_max, load_mean, load_cv; /* assignments per expert before capacity; cv = sd/mean */
    double kept_max;                     /* kept rows of the fullest expert */
    double share_rank, share_node;       /* kept assignments whose expert is on the token's
                                            rank / node (node includes rank) */
    double bytes_intra_node, bytes_inter_node; /* one row per kept assignment */
    double bytes_intra_node_dedup, bytes_inter_node_dedup; /* hierarchical (DeepEP-style): one
                                            row per (token, remote node) over the network, to
                                            the rank with the sender's local index, which
                                            forwards it inside that node; one row per
                                            (token, rank) inside a node */
    double inter_node_share, inter_node_share_dedup; /* inter / (intra + inter) bytes */
    double a2a_time, a2a_time_dedup;     /* modelled dispatch + combine all-to-all, s */
    double a2a_time_max_layer;           /* the slowest layer's a2a_time */
    int busiest_rank;                    /* rank that bounds a2a_time (of the slowest layer) */
    int busiest_tier;                    /* and its tier (moe_tier) */
} moe_layer_stats;

/*
 * expert_idx (T, k); plan NULL = nothing dropped; token_rank (T) NULL = tokens spread over the
 * ranks in equal contiguous blocks (data parallel). bytes_per_row = d * element size.
 */
int moe_layer_stats_compute(const moe_topology *t, const int32_t *expert_idx, int T, int k,
                            const moe_plan *plan, const int32_t *token_rank, size_t bytes_per_row,
                            moe_layer_stats *out, loom_err *e);
/* step += layer: counts and bytes summed, times summed (layers run one after another), loads
 * and cv the maximum over layers, shares recomputed from the sums. */
void moe_stats_add(moe_layer_stats *step, const moe_layer_stats *layer);

#endif
