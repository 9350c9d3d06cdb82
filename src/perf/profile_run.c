/*
 * The perf side of `loom profile`: timed steps -> roofline terms -> fitted coefficients
 * (heterogeneous-inference paper sec. 3: "fitted using least squares over sampled batches"),
 * and the host measurements behind the catalog's `cpu` entry.
 *
 * What drives the instance (the engine in process, HTTP batches against a live server) is not
 * here: perf depends on base only. src/cli/profile.c produces perf_timed_step records and calls
 * perf_profile_fit; the GEMM rate of --host is measured there too (BLAS lives in tensor).
 */
#include "perf_internal.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int perf_profile_fit(const perf_model *pm, const perf_device *dev, int tp, const char *model_name,
                     const perf_timed_step *steps, int n, const perf_coef *prior,
                     perf_profile *out, double *errors, loom_err *e)
{
    if (n < 1)
        return loom_errf(e, LOOM_EINVAL, "no timed steps to fit");
    perf_sample *samples = xmalloc(sizeof(*samples) * (size_t)n);
    for (int i = 0; i < n; i++) {
        perf_step_terms(pm, dev, tp, &steps[i].step, &samples[i].terms);
        samples[i].seconds = steps[i].seconds;
    }
    memset(out, 0, sizeof(*out));
    snprintf(out->device, sizeof(out->device), "%s", dev->name);
    snprintf(out->model, sizeof(out->model), "%s", model_name ? model_name : "");
    out->tp = tp;
    out->n_samples = n;
    int rc = perf_fit(samples, n, prior ? prior : &dev->coef, &out->coef, &out->rel_rms, e);
    if (!rc && errors)
        for (int i = 0; i < n; i++)
            errors[i] = (perf_coef_apply(&out->coef, &samples[i].terms) - samples[i].seconds) /
                        samples[i].seconds;
    free(samples);
    return rc;
}

/* ---------------------------------------------------------------- host */

void perf_host_basics(perf_host *h)
{
    memset(h, 0, sizeof(*h));
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    h->cores = n > 0 ? (int)n : 1;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    h->mem_bytes = pages > 0 && page > 0 ? (double)pages * (double)page : 0;
}

typedef struct stream_job {
    size_t n; /* doubles per array */
    int reps;
    pthread_barrier_t *barrier;
    double best; /* seconds of the fastest repetition (all threads start together) */
    double sink;
} stream_job;

static void *stream_thread(void *arg)
{
    stream_job *j = arg;
    double *a = xmalloc(sizeof(double) * j->n), *b = xmalloc(sizeof(double) * j->n),
           *c = xmalloc(sizeof(double) * j->n);
    for (size_t i = 0; i < j->n; i++) { /* touch every page before timing */
        a[i] = 0;
        b[i] = (double)i;
        c[i] = 1.0;
    }
    j->best = INFINITY;
    for (int r = 0; r < j->reps; r++) {
        pthread_barrier_wait(j->barrier);
        double t0 = loom_now();
        for (size_t i = 0; i < j->n; i++)
            a[i] = b[i] + 3.0 * c[i];
        double t = loom_now() - t0;
        if (t < j->best)
            j->best = t;
        j->sink += a[j->n / 2];
    }
    free(a);
    free(b);
    free(c);
    return NULL;
}

double perf_host_stream(int threads, size_t bytes, int reps)
{
    if (threads < 1)
        threads = 1;
    if (reps < 1)
        reps = 1;
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, (unsigned)threads);
    stream_job *jobs = xcalloc((size_t)threads, sizeof(*jobs));
    pthread_t *tids = xcalloc((size_t)threads, sizeof(*tids));
    for (int t = 0; t < threads; t++) {
        jobs[t] = (stream_job){.n = bytes / sizeof(double), .reps = reps, .barrier = &barrier};
        pthread_create(&tids[t], NULL, stream_thread, &jobs[t]);
    }
    double worst_best = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        if (jobs[t].best > worst_best)
            worst_best = jobs[t].best;
    }
    /* every thread moved 3 arrays of n doubles; the slowest bounds the aggregate rate */
    double moved = 3.0 * (double)(bytes / sizeof(double)) * sizeof(double) * threads;
    free(jobs);
    free(tids);
    pthread_barrier_destroy(&barrier);
    return worst_best > 0 ? moved / worst_best : 0;
}

void perf_host_write_catalog(const perf_host *h, loom_buf *b)
{
    int cores = h->cores > 0 ? h->cores : 1;
    double mem_gib = h->mem_bytes / cores / (1024.0 * 1024 * 1024);
    buf_printf(b,
               "# loom device catalog holding this host as the pooled `cpu` device, measured by\n"
               "# `loom profile --host`. Use it with --catalog, or copy the entry over the `cpu`\n"
               "# entry of data/devices.yaml.\n"
               "#   cores %d, memory %.1f GiB\n"
               "#   triad bandwidth: %.2f GB/s all cores together, %.2f GB/s one core alone\n"
               "#   F32 GEMM: %.1f GFLOP/s one core, %.1f GFLOP/s all cores\n"
               "# Per core (what one device is): memory and bandwidth are the host's share, FLOP/s\n"
               "# the one-core GEMM rate.\n",
               h->cores, h->mem_bytes / (1024.0 * 1024 * 1024), h->mem_bw / 1e9,
               h->mem_bw_one / 1e9, h->gemm_flops / 1e9, h->gemm_flops_all / 1e9);
    char mem[32], tflops[32], bw[32];
    perf_fmt_double(floor(mem_gib * 100) / 100, mem, sizeof(mem));
    perf_fmt_double(round(h->gemm_flops / 1e9) / 1e3, tflops, sizeof(tflops));
    perf_fmt_double(round(h->mem_bw / cores / 1e7) / 1e2, bw, sizeof(bw));
    buf_printf(b,
               "devices:\n"
               "  - name: cpu\n"
               "    vendor: host\n"
               "    memory_gib: %s\n"
               "    bf16_tflops: %s\n"
               "    mem_bw_gbs: %s\n"
               "    link: none\n"
               "    link_bw_gbs: 0\n"
               "    link_latency_us: 0\n"
               "    runtime_overhead_gib: 0.05\n"
               "    weight_bytes: 4\n"
               "    pooled: true\n",
               mem, tflops, bw);
}
