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

#endif
