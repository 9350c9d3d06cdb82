/* moe: helpers shared by the files of src/moe (not part of loom/moe.h). */
#ifndef LOOM_MOE_INTERNAL_H
#define LOOM_MOE_INTERNAL_H

#include <math.h>

/* Softmax normaliser of E logits in f32: *max = max_i l_i, returns sum_i expf(l_i - max),
 * summed in order. moe_topk_route and moe_router_forward both use it, so their routing
 * weights agree bit for bit (and, computed in f32, with transformers'). */
static inline float moe_softmax_norm(const float *l, int E, float *max)
{
    float m = l[0];
    for (int i = 1; i < E; i++)
        m = l[i] > m ? l[i] : m;
    float z = 0.0f;
    for (int i = 0; i < E; i++)
        z += expf(l[i] - m);
    *max = m;
    return z;
}

/* The same in double, for the log-sum-exp of the z-loss (lse = *max + log(return)) and its
 * gradient (softmax_i = exp(l_i - *max) / return). */
static inline double moe_exp_sum(const float *l, int E, double *max)
{
    double m = l[0];
    for (int i = 1; i < E; i++)
        m = l[i] > m ? l[i] : m;
    double z = 0.0;
    for (int i = 0; i < E; i++)
        z += exp(l[i] - m);
    *max = m;
    return z;
}

#endif
