/*
 * Arrival processes: when each request of a run is sent.
 *
 * Open loop, as in `vllm bench serve`: gaps between requests are gamma distributed with shape
 * k = burstiness and scale theta = 1 / (rate * k), so the mean gap is 1 / rate and the squared
 * coefficient of variation of the gaps is 1 / k; k = 1 is a Poisson process, k < 1 is
 * burstier. The first request goes at time 0. Trace replay uses the trace's timestamps scaled
 * by time_scale. Closed loops and offline batches have every request "arrive" at 0 and are
 * throttled by the concurrency limit in the runner.
 */
#include "loom/bench.h"

#include <math.h>
#include <string.h>

static double std_normal(loom_rng *r)
{
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/*
 * Marsaglia & Tsang (2000), "A simple method for generating gamma variables". For shape < 1,
 * gamma(k) = gamma(k + 1) * U^(1/k).
 */
double bench_gamma_sample(loom_rng *r, double shape, double scale)
{
    if (shape < 1.0) {
        double u = rng_uniform(r);
        if (u < 1e-300)
            u = 1e-300;
        return bench_gamma_sample(r, shape + 1.0, scale) * pow(u, 1.0 / shape);
    }
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x, v;
        do {
            x = std_normal(r);
            v = 1.0 + c * x;
        } while (v <= 0);
        v = v * v * v;
        double u = rng_uniform(r);
        if (u < 1.0 - 0.0331 * x * x * x * x)
            return d * v * scale;
        if (u > 0 && log(u) < 0.5 * x * x + d * (1.0 - v + log(v)))
            return d * v * scale;
    }
}

void bench_arrival_init(bench_arrival *a, bench_arrival_kind kind, double rate, double burstiness,
                        double time_scale, uint64_t seed)
{
    memset(a, 0, sizeof(*a));
    a->kind = kind;
    a->rate = rate;
    a->burstiness = burstiness > 0 ? burstiness : 1.0;
    a->time_scale = time_scale > 0 ? time_scale : 1.0;
    rng_seed(&a->rng, seed ^ 0xa17a1ULL);
    a->next = 0;
    if (kind == BENCH_ARRIVAL_GAMMA && !(rate > 0 && isfinite(rate)))
        a->kind = BENCH_ARRIVAL_AT_ONCE; /* rate = inf: everything at once, as vLLM does */
}

double bench_arrival_next(bench_arrival *a, const bench_item *item)
{
    switch (a->kind) {
    case BENCH_ARRIVAL_TRACE:
        return item ? item->timestamp_s * a->time_scale : 0;
    case BENCH_ARRIVAL_GAMMA: {
        double t = a->next;
        double k = a->burstiness;
        a->next += bench_gamma_sample(&a->rng, k, 1.0 / (a->rate * k));
        return t;
    }
    case BENCH_ARRIVAL_AT_ONCE:
        return 0;
    }
    return 0;
}
