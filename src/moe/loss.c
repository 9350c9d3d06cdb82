/*
 * Router losses and their gradients with respect to the router probabilities (scores) or the
 * logits. Dimension letters: T tokens, E experts, k slots per token, N nodes.
 * Sums are taken in double; gradients are added into caller buffers (+=).
 */
#include "loom/moe.h"

#include "moe_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/*
 * LocMoE eq. 5 (Switch): L_aux = alpha * n * sum_i f_i * P_i.
 *   f_i = (1 / (T k)) * #{(t, j): expert_idx[t, j] = i}  -- fraction of assignments, piecewise
 *         constant in the scores, so it carries no gradient (as in Switch Transformer);
 *   P_i = (1 / T) * sum_t scores[t, i];
 *   dL/dscores[t, i] = alpha * n * f_i / T.
 */
double moe_aux_loss(const float *scores, const int32_t *expert_idx, int T, int E, int k,
                    double alpha, float *d_scores)
{
    if (T <= 0 || E <= 0 || k <= 0)
        return 0.0;
    double *f = calloc((size_t)E, sizeof(double));
    double *P = calloc((size_t)E, sizeof(double));
    if (!f || !P) {
        free(f);
        free(P);
        return NAN;
    }
    for (size_t a = 0; a < (size_t)T * k; a++)
        if (expert_idx[a] >= 0 && expert_idx[a] < E)
            f[expert_idx[a]] += 1.0;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < E; i++)
            P[i] += scores[(size_t)t * E + i];
    double loss = 0.0;
    for (int i = 0; i < E; i++) {
        f[i] /= (double)T * k;
        P[i] /= T;
        loss += f[i] * P[i];
    }
    loss *= alpha * E;
    if (d_scores)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < E; i++)
                d_scores[(size_t)t * E + i] += (float)(alpha * E * f[i] / T);
    free(f);
    free(P);
    return loss;
}

/* ST-MoE router z-loss: L_z = coef * (1/T) sum_t (log sum_i exp logits[t, i])^2. */
double moe_z_loss(const float *logits, int T, int E, double coef, float *d_logits)
{
    double loss = 0.0;
    for (int t = 0; t < T; t++) {
        const float *lt = logits + (size_t)t * E;
        double m, z = moe_exp_sum(lt, E, &m);
        double lse = m + log(z);
        loss += lse * lse;
        if (d_logits)
            for (int i = 0; i < E; i++)
                d_logits[(size_t)t * E + i] += (float)(2.0 * coef / T * lse * exp(lt[i] - m) / z);
    }
    return T > 0 ? coef * loss / T : 0.0;
}

/*
 * LocMoE eq. 6: L_loc = mu * KL(D_c || D_l). The paper names the two distributions but does
 * not define them; the definition implemented here (papers/locmoe.md, section 3.2) is:
 *
 *   For each node g holding T_g > 0 tokens of the batch and hosting the experts L_g (|L_g| > 0):
 *     D_c(g)_i = (1 / T_g) sum_{t on g} scores[t, i]          the node's batch-mean routing
 *                                                              distribution (differentiable)
 *     D_l(g)_i = (1 - floor) / |L_g| * 1{i in L_g} + floor / E the fully localised distribution:
 *                                                              uniform over the node's experts,
 *                                                              mixed with floor of uniform so
 *                                                              KL stays finite
 *     L_loc = mu * sum_g sum_i D_c(g)_i ln(D_c(g)_i / D_l(g)_i)     (0 ln 0 = 0)
 *
 *   dL/dscores[t, i] = mu / T_g * (ln(D_c(g)_i / D_l(g)_i) + 1) for t on g.
 *
 * Choices, and why: the batch mean of the probabilities (not routed counts) keeps the loss
 * differentiable, like P_i in eq. 5; per node (not per rank), because LocMoE's aim is to keep
 * traffic off the inter-node links; the KL direction is the paper's (current || local), which
 * charges ln(1/floor)-sized costs for mass sent off the node; a uniform target over local
 * experts leaves the balance among them to L_aux. Nodes without tokens or without experts (more
 * nodes than experts, where the paper says LocMoE stops helping) contribute nothing. Summed,
 * not averaged, over nodes, so mu is per node.
 */
/* The rank of token t: token_rank[t], or with NULL equal contiguous blocks (data parallel), as
 * moe_layer_stats_compute assumes. */
static int token_rank_of(const moe_topology *topo, const int32_t *token_rank, int t, int T)
{
    int r = token_rank ? token_rank[t] : (int)((int64_t)t * topo->n_ranks / T);
    return r >= 0 && r < topo->n_ranks ? r : 0;
}

double moe_locality_loss(const float *scores, int T, int E, const moe_topology *topo,
                         const int32_t *token_rank, double mu, double floor, float *d_scores)
{
    int N = topo->n_nodes;
    if (T <= 0 || N <= 0)
        return 0.0;
    if (!(floor > 0.0) || floor >= 1.0)
        floor = 1e-6;
    double *Dc = calloc((size_t)N * E, sizeof(double));
    int64_t *Tg = calloc((size_t)N, sizeof(int64_t));
    int32_t *n_local = calloc((size_t)N, sizeof(int32_t));
    int32_t *expert_node = malloc((size_t)E * sizeof(int32_t));
    if (!Dc || !Tg || !n_local || !expert_node) {
        free(Dc);
        free(Tg);
        free(n_local);
        free(expert_node);
        return NAN;
    }
    for (int i = 0; i < E; i++) {
        expert_node[i] = moe_topology_node_of_rank(topo, topo->expert_rank[i]);
        n_local[expert_node[i]]++;
    }
    for (int t = 0; t < T; t++) {
        int g = moe_topology_node_of_rank(topo, token_rank_of(topo, token_rank, t, T));
        Tg[g]++;
        for (int i = 0; i < E; i++)
            Dc[(size_t)g * E + i] += scores[(size_t)t * E + i];
    }
    double loss = 0.0;
    for (int g = 0; g < N; g++) {
        if (!Tg[g] || !n_local[g])
            continue;
        double *dc = Dc + (size_t)g * E;
        for (int i = 0; i < E; i++) {
            dc[i] /= (double)Tg[g];
            double dl = floor / E + (expert_node[i] == g ? (1.0 - floor) / n_local[g] : 0.0);
            double ratio = dc[i] > 0 ? log(dc[i] / dl) : 0.0;
            if (dc[i] > 0)
                loss += dc[i] * ratio;
            /* reuse dc[i] to hold dKL/dD_c(g)_i; ln(0) is clamped for the gradient */
            dc[i] = (dc[i] > 0 ? ratio : log(1e-300 / dl)) + 1.0;
        }
    }
    if (d_scores)
        for (int t = 0; t < T; t++) {
            int g = moe_topology_node_of_rank(topo, token_rank_of(topo, token_rank, t, T));
            if (!n_local[g])
                continue;
            for (int i = 0; i < E; i++)
                d_scores[(size_t)t * E + i] += (float)(mu / Tg[g] * Dc[(size_t)g * E + i]);
        }
    free(Dc);
    free(Tg);
    free(n_local);
    free(expert_node);
    return mu * loss;
}
