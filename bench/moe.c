/*
 * bench/moe: the routing machinery of one MoE layer against the expert GEMMs it feeds, on one
 * thread. Per configuration: the router forward (gate GEMM, softmax, top-k), the dispatch plan
 * and row gather (capacity factor 1.25, drop by position), the weighted combine, and the
 * SwiGLU experts (three tensor_matmul per expert) over the dispatched rows.
 *
 *   build/bench/moe [--tokens 512] [--reps 5] [--markdown FILE]
 *
 * Configurations: d=4096, E=64, k=2 (fine-grained experts, I = 1408) and d=1024, E=8, k=1
 * (Switch, I = 4096). Expert weights come from a pool of at most 8 distinct experts (256 MiB
 * at most) cycled over the E experts, so memory stays bounded; each pool expert is larger than
 * the caches, so every expert's weights are still read from DRAM. Times are medians over reps.
 */
#include "loom/moe.h"
#include "loom/base.h"
#include "loom/tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct bench_case {
    int d, E, k, I;
    bool renormalize;
    const char *label;
} bench_case;

typedef struct row {
    bench_case c;
    int T, capacity;
    double route_ms, dispatch_ms, combine_ms, gemm_ms;
    double drop_rate;
} row;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static float *random_floats(loom_rng *r, size_t n, float scale)
{
    float *p = loom_alloc_aligned(n * sizeof(float));
    if (!p) {
        fprintf(stderr, "bench/moe: out of memory (%zu floats)\n", n);
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        p[i] = scale * rng_normal(r);
    return p;
}

static int run_case(const bench_case *c, int T, int reps, row *out)
{
    loom_err e;
    loom_rng rng;
    rng_seed(&rng, 42);
    int d = c->d, E = c->E, k = c->k, I = c->I;
    moe_router_config cfg;
    moe_router_config_default(&cfg, MOE_ROUTER_TOPK, d, E);
    cfg.k = k;
    cfg.renormalize = c->renormalize;
    moe_router router;
    moe_routing rt;
    moe_plan plan;
    if (moe_router_init(&router, &cfg, &e) || moe_routing_init(&rt, &router.cfg, T, &e)) {
        fprintf(stderr, "bench/moe: %s\n", e.msg);
        return 1;
    }
    int C = moe_capacity(k, T, 1.25, E, 4);
    moe_plan_config pc = {.capacity = C, .drop = MOE_DROP_BY_POSITION};
    if (moe_plan_init(&plan, T, k, E, 0, &e)) {
        fprintf(stderr, "bench/moe: %s\n", e.msg);
        return 1;
    }
    float *x = random_floats(&rng, (size_t)T * d, 1.0f);
    float *buf = random_floats(&rng, (size_t)T * k * d, 0.0f);
    float *ebuf = random_floats(&rng, (size_t)T * k * d, 0.0f);
    float *y = random_floats(&rng, (size_t)T * d, 0.0f);
    float *h1 = random_floats(&rng, (size_t)T * k * I, 0.0f);
    float *h3 = random_floats(&rng, (size_t)T * k * I, 0.0f);
    size_t expert_floats = (size_t)3 * d * I;
    int pool = (int)((256u << 20) / (expert_floats * sizeof(float)));
    pool = pool < 1 ? 1 : pool > 8 ? 8 : pool > E ? E : pool;
    float **w = malloc(sizeof(float *) * pool);
    for (int p = 0; p < pool; p++)
        w[p] = random_floats(&rng, expert_floats, 0.02f);

    double *tr = malloc(sizeof(double) * reps), *td = malloc(sizeof(double) * reps);
    double *tc = malloc(sizeof(double) * reps), *tg = malloc(sizeof(double) * reps);
    for (int rep = 0; rep < reps; rep++) {
        double t0 = loom_now();
        if (moe_router_forward(&router, x, NULL, T, false, &rt, &e)) {
            fprintf(stderr, "bench/moe: %s\n", e.msg);
            return 1;
        }
        double t1 = loom_now();
        if (moe_plan_build(&plan, &pc, rt.expert_idx, rt.weight, T, &e)) {
            fprintf(stderr, "bench/moe: %s\n", e.msg);
            return 1;
        }
        moe_dispatch(&plan, x, d, buf);
        double t2 = loom_now();
        for (int x_e = 0; x_e < E; x_e++) { /* SwiGLU expert: w2 (silu(w1 h) * (w3 h)) */
            int n = plan.rows[x_e];
            if (!n)
                continue;
            const float *wp = w[x_e % pool];
            const float *in = buf + (size_t)plan.offset[x_e] * d;
            tensor_matmul(h1, in, wp, NULL, n, d, I);
            tensor_matmul(h3, in, wp + (size_t)d * I, NULL, n, d, I);
            tensor_silu_mul(h1, h3, (size_t)n * I);
            tensor_matmul(ebuf + (size_t)plan.offset[x_e] * d, h1, wp + (size_t)2 * d * I, NULL, n,
                          I, d);
        }
        double t3 = loom_now();
        moe_combine(&plan, rt.weight, ebuf, d, y);
        double t4 = loom_now();
        tr[rep] = t1 - t0;
        td[rep] = t2 - t1;
        tg[rep] = t3 - t2;
        tc[rep] = t4 - t3;
    }
    out->c = *c;
    out->T = T;
    out->capacity = C;
    out->route_ms = 1e3 * median(tr, reps);
    out->dispatch_ms = 1e3 * median(td, reps);
    out->combine_ms = 1e3 * median(tc, reps);
    out->gemm_ms = 1e3 * median(tg, reps);
    out->drop_rate = plan.n_assigned ? (double)plan.n_dropped / plan.n_assigned : 0;
    for (int p = 0; p < pool; p++)
        loom_free_aligned(w[p]);
    free(w);
    loom_free_aligned(x), loom_free_aligned(buf), loom_free_aligned(ebuf);
    loom_free_aligned(y), loom_free_aligned(h1), loom_free_aligned(h3);
    free(tr), free(td), free(tc), free(tg);
    moe_plan_free(&plan);
    moe_routing_free(&rt);
    moe_router_free(&router);
    return 0;
}

static void print_table(FILE *f, const row *rows, int n, int reps)
{
    fprintf(f, "| config | T | capacity (drop %%) | route ms | dispatch ms | combine ms | "
               "route+dispatch+combine tok/s | expert GEMMs ms | routing share of layer |\n");
    fprintf(f, "|---|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < n; i++) {
        const row *r = &rows[i];
        double rdc = r->route_ms + r->dispatch_ms + r->combine_ms;
        fprintf(f, "| %s | %d | %d (%.1f) | %.3f | %.3f | %.3f | %.0f | %.1f | %.1f%% |\n",
                r->c.label, r->T, r->capacity, 100 * r->drop_rate, r->route_ms, r->dispatch_ms,
                r->combine_ms, r->T / (rdc * 1e-3), r->gemm_ms, 100 * rdc / (rdc + r->gemm_ms));
    }
    fprintf(f,
            "\nOne thread (tensor_set_threads(1)), medians of %d repetitions. route = gate "
            "GEMM + softmax + top-k (moe_router_forward); dispatch = plan (capacity factor "
            "1.25, drop by position) + row gather; combine = weighted sum back in token "
            "order; expert GEMMs = SwiGLU experts through tensor_matmul (OpenBLAS SGEMM). "
            "Share = (route + dispatch + combine) / (that + expert GEMMs); the all-to-all is "
            "not part of it.\n",
            reps);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: bench/moe [--tokens N] [--reps N] [--markdown FILE]\n"
               "  --tokens N       tokens in the layer's batch (default 512)\n"
               "  --reps N         repetitions, the median is reported (default 5)\n"
               "  --markdown FILE  also write the table to FILE\n");
}

int main(int argc, char **argv)
{
    int T = 512, reps = 5;
    const char *md = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            T = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--markdown") && i + 1 < argc)
            md = argv[++i];
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (T < 1 || reps < 1) {
        usage(stderr);
        return 2;
    }
    tensor_set_threads(1);
    const bench_case cases[] = {
        {4096, 64, 2, 1408, true, "d=4096 E=64 k=2 (I=1408)"},
        {1024, 8, 1, 4096, false, "d=1024 E=8 k=1 (I=4096)"},
    };
    row rows[2];
    for (int i = 0; i < 2; i++) {
        fprintf(stderr, "bench/moe: %s, T=%d ...\n", cases[i].label, T);
        if (run_case(&cases[i], T, reps, &rows[i]))
            return 1;
    }
    print_table(stdout, rows, 2, reps);
    if (md) {
        FILE *f = fopen(md, "w");
        if (!f) {
            fprintf(stderr, "bench/moe: cannot write %s\n", md);
            return 1;
        }
        print_table(f, rows, 2, reps);
        fclose(f);
    }
    return 0;
}
