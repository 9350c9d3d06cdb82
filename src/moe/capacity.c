/*
 * Expert capacity: the usual capacity-factor formula, LocMoE's critical capacity (Lemma 3 and
 * Theorem 1) in its exact, erfc and exp forms, and the estimate of delta from data.
 * Dimension letters: T tokens, d hidden size, E (= n in the paper) experts, k slots per token.
 */
#include "loom/moe.h"

#include <gsl/gsl_errno.h>
#include <gsl/gsl_sf_gamma.h> /* gsl_sf_beta_inc_e */
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ceil(k T cf / E) (GShard, Switch, MindSpore's calculate_expert_capacity). The relative nudge
 * keeps an exact product such as 2 * 4096 * 1.25 / 64 = 160 from rounding up to 161. */
int moe_capacity(int k, int T, double capacity_factor, int E, int min_capacity)
{
    if (E <= 0)
        return min_capacity;
    double v = (double)k * T * capacity_factor / E;
    double c = ceil(v * (1.0 - 1e-12));
    if (c > 2147483647.0)
        c = 2147483647.0;
    int cap = (int)c;
    return cap < min_capacity ? min_capacity : cap;
}

/*
 * LocMoE Lemma 3: for x uniform on the unit sphere of R^d and a fixed unit w,
 *   p_delta = P(|<x, w>| >= delta) = 1 - I_{delta^2}(1/2, (d-1)/2)
 * (cos^2 is Beta(1/2, (d-1)/2) distributed). Evaluated as I_{1-delta^2}((d-1)/2, 1/2), the same
 * value by I_x(a, b) = 1 - I_{1-x}(b, a), which keeps its relative precision when p_delta is
 * tiny. GSL's error handler aborts by default; it is switched off around the call (and put back)
 * so an underflow returns 0 instead of ending the process. Not thread-safe for that reason.
 */
double moe_cap_probability(double delta, int d)
{
    if (d < 2 || !(delta >= 0.0))
        return NAN;
    if (delta >= 1.0)
        return 0.0;
    if (delta == 0.0)
        return 1.0;
    gsl_error_handler_t *old = gsl_set_error_handler_off();
    gsl_sf_result res;
    int status = gsl_sf_beta_inc_e(0.5 * (d - 1), 0.5, 1.0 - delta * delta, &res);
    gsl_set_error_handler(old);
    if (status == GSL_EUNDRFLW)
        return 0.0;
    return status == GSL_SUCCESS ? res.val : NAN;
}

/*
 * LocMoE Theorem 1: ec_min = 1 / p_i >= 1 / (n p_delta)                         (exact form)
 *   with the large-d approximation I_{delta^2}(1/2, (d-1)/2) ~ 1 - erfc(sqrt(delta^2 d / (2 -
 * delta^2))) ec_min >= 1 / (n erfc(sqrt(delta^2 d / (2 - delta^2))))                       (erfc
 * form) >  (1/n) exp(delta^2 d / (2 - delta^2))                                (exp form) The last
 * step is erfc(z) < exp(-z^2) for z > 0.
 */
int moe_capacity_bound_compute(int d, int n, double delta, moe_capacity_bound *out, loom_err *e)
{
    if (d < 2 || n < 1 || !(delta > 0.0 && delta < 1.0))
        return loom_errf(e, LOOM_EINVAL,
                         "capacity bound: need d >= 2, n >= 1, 0 < delta < 1 "
                         "(got d=%d, n=%d, delta=%g)",
                         d, n, delta);
    memset(out, 0, sizeof(*out));
    out->d = d;
    out->n = n;
    out->delta = delta;
    out->p_delta = moe_cap_probability(delta, d);
    out->ec_exact = out->p_delta > 0 ? 1.0 / (n * out->p_delta) : INFINITY;
    double z2 = delta * delta * d / (2.0 - delta * delta);
    out->p_erfc = erfc(sqrt(z2));
    out->ec_erfc = out->p_erfc > 0 ? 1.0 / (n * out->p_erfc) : INFINITY;
    out->ec_exp = exp(z2) / n;
    return LOOM_OK;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Linear interpolation between order statistics (type 7, as numpy's default). */
static double quantile(const double *sorted, int n, double q)
{
    double pos = q * (n - 1);
    int lo = (int)pos;
    if (lo >= n - 1)
        return sorted[n - 1];
    return sorted[lo] + (pos - lo) * (sorted[lo + 1] - sorted[lo]);
}

/*
 * The angle statistic behind LocMoE's delta: for each token t routed by its first slot to
 * expert i, cos(theta_t) = <w_i, x_t> / (|w_i| |x_t|), with w_i the gate vector (a row of the
 * linear gate, or GrAP's omega_i = (n/d) 1{chunk i}, whose cosine is sum_{chunk i} x / (sqrt(len)
 * |x|)). The gate bias is not part of the angle. delta = the minimum over the batch (the paper's
 * "minimum token-gate angle"); quantiles are reported beside it.
 */
int moe_delta_estimate(const moe_router *r, const float *x, const moe_routing *rt,
                       moe_delta_stats *out, loom_err *e)
{
    const moe_router_config *c = &r->cfg;
    memset(out, 0, sizeof(*out));
    if (c->kind == MOE_ROUTER_HASH)
        return loom_errf(e, LOOM_EINVAL, "delta estimate: the hash router has no gate vectors");
    int T = rt->T, d = c->d, E = c->n_experts, k = rt->k;
    double *cosv = malloc((size_t)(T > 0 ? T : 1) * sizeof(double));
    if (!cosv)
        return loom_errf(e, LOOM_ENOMEM, "delta estimate: out of memory");
    int n = 0;
    for (int t = 0; t < T; t++) {
        int i = rt->expert_idx[(size_t)t * k];
        if (i < 0)
            continue;
        const float *xt = x + (size_t)t * d;
        double xx = 0.0, dot = 0.0, ww = 0.0;
        for (int j = 0; j < d; j++)
            xx += (double)xt[j] * xt[j];
        if (c->gate == MOE_GATE_LINEAR) {
            const float *w = r->w_gate + (size_t)i * d;
            for (int j = 0; j < d; j++) {
                dot += (double)w[j] * xt[j];
                ww += (double)w[j] * w[j];
            }
        } else {
            int lo = (int)(((int64_t)i * d + E - 1) / E),
                hi = (int)(((int64_t)(i + 1) * d + E - 1) / E);
            for (int j = lo; j < hi; j++)
                dot += xt[j];
            ww = hi - lo; /* the (n/d) scale cancels in the cosine */
        }
        if (xx > 0 && ww > 0)
            cosv[n++] = dot / sqrt(xx * ww);
    }
    out->n = n;
    if (n == 0) {
        free(cosv);
        return loom_errf(e, LOOM_EINVAL, "delta estimate: no routed token with a non-zero input");
    }
    qsort(cosv, (size_t)n, sizeof(double), cmp_double);
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += cosv[i];
    out->min = cosv[0];
    out->p01 = quantile(cosv, n, 0.01);
    out->p05 = quantile(cosv, n, 0.05);
    out->median = quantile(cosv, n, 0.5);
    out->mean = sum / n;
    out->delta = out->min;
    free(cosv);
    return LOOM_OK;
}
