/*
 * Top-k softmax routing (Mixtral, Qwen2-MoE) and token grouping by expert.
 * Dimension letters: T tokens, E experts, k experts per token.
 */
#include "loom/moe.h"

#include "moe_internal.h"

#include <math.h>
#include <string.h>

/* Softmax over one token's E logits in f32 (transformers computes routing weights in f32),
 * then k selection passes; a strict '>' keeps the lower expert index on ties. */
void moe_topk_route(const float *logits, int T, int E, int k, bool renormalize, int32_t *expert_idx,
                    float *expert_weight)
{
    for (int t = 0; t < T; t++) {
        const float *lt = logits + (size_t)t * E;
        int32_t *idx = expert_idx + (size_t)t * k;
        float *wt = expert_weight + (size_t)t * k;
        float m, z = moe_softmax_norm(lt, E, &m);
        float sum = 0.0f;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                bool taken = false;
                for (int i = 0; i < j; i++)
                    taken |= idx[i] == e;
                if (!taken && (best < 0 || lt[e] > lt[best]))
                    best = e;
            }
            idx[j] = best;
            if (best < 0) { /* k > E */
                wt[j] = 0.0f;
                continue;
            }
            wt[j] = expf(lt[best] - m) / z;
            sum += wt[j];
        }
        if (renormalize && sum > 0.0f)
            for (int j = 0; j < k; j++)
                wt[j] /= sum;
    }
}

/* Counting sort of the T*k assignments by expert; within an expert, assignments keep their
 * flat order a = t*k + j (so tokens stay in batch order). Out-of-range ids (for example -1
 * for a dropped assignment) are left out. */
void moe_group_by_expert(const int32_t *expert_idx, int T, int k, int E, int32_t *counts,
                         int32_t *offsets, int32_t *order)
{
    memset(counts, 0, (size_t)E * sizeof(int32_t));
    int n = T * k;
    for (int a = 0; a < n; a++)
        if (expert_idx[a] >= 0 && expert_idx[a] < E)
            counts[expert_idx[a]]++;
    offsets[0] = 0;
    for (int e = 0; e < E; e++)
        offsets[e + 1] = offsets[e] + counts[e];
    for (int e = 0; e < E; e++)
        counts[e] = 0;
    for (int a = 0; a < n; a++) {
        int e = expert_idx[a];
        if (e >= 0 && e < E)
            order[offsets[e] + counts[e]++] = a;
    }
}
