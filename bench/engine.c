/*
 * bench/engine: prefill and decode throughput of the CPU forward pass, beside two ceilings
 * measured in the same run: the machine's memory bandwidth (STREAM-like copy) and OpenBLAS
 * SGEMM GFLOP/s. Decode at batch 1 is compared with the bandwidth roofline for the bytes the
 * step must read (weights it touches + KV); prefill with the SGEMM ceiling.
 *
 *   build/bench/engine [--threads 2] [--models random:llama-125m,random:mixtral-tiny]
 *                      [--batches 1,8,32] [--prompt 128] [--decode-steps 16] [--markdown FILE]
 */
#include "loom/base.h"
#include "loom/model.h"
#include "loom/tensor.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct row {
    char model[64];
    int batch;
    double prefill_tok_s, prefill_gflops, prefill_frac; /* frac of SGEMM ceiling */
    double decode_tok_s, decode_gbs, decode_frac;       /* frac of bandwidth roofline */
    double decode_read_frac;                            /* frac of the read-only stream */
} row;

/* STREAM-like copy: bytes read + written per second, over a buffer far larger than cache. */
static double measure_copy_bandwidth(int threads)
{
    /* 1 GiB each way: well past the last-level cache (480 MiB on the machine we measure on) */
    size_t n = (size_t)1 << 30;
    char *a = loom_alloc_aligned(n), *b = loom_alloc_aligned(n);
    memset(a, 1, n);
    memset(b, 2, n);
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = loom_now();
#pragma omp parallel num_threads(threads)
        {
            int nt = omp_get_num_threads(), id = omp_get_thread_num();
            size_t chunk = n / (size_t)nt;
            memcpy(b + chunk * (size_t)id, a + chunk * (size_t)id, chunk);
        }
        double dt = loom_now() - t0;
        double gbs = 2.0 * (double)n / dt / 1e9;
        if (gbs > best)
            best = gbs;
    }
    loom_free_aligned(a);
    loom_free_aligned(b);
    return best;
}

/* Read-only stream: one load per 64-byte line over 1 GiB, the ceiling for a decode step, which
 * reads weights and writes almost nothing (a copy's figure counts its writes too). */
static double measure_read_bandwidth(int threads)
{
    size_t n = ((size_t)1 << 30) / sizeof(float);
    float *a = loom_alloc_aligned(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        a[i] = (float)(i & 7);
    double best = 0, sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = loom_now(), sum = 0;
#pragma omp parallel for reduction(+ : sum) num_threads(threads)
        for (size_t i = 0; i < n; i += 16)
            sum += a[i];
        double dt = loom_now() - t0;
        sink += sum;
        double gbs = (double)n * sizeof(float) / dt / 1e9;
        if (gbs > best)
            best = gbs;
    }
    loom_free_aligned(a);
    return sink < 0 ? 0 : best;
}

static double measure_sgemm(int threads)
{
    int M = 1024, N = 2048, K = 2048;
    float *A = loom_alloc_aligned(sizeof(float) * (size_t)M * K);
    float *B = loom_alloc_aligned(sizeof(float) * (size_t)N * K);
    float *C = loom_alloc_aligned(sizeof(float) * (size_t)M * N);
    for (size_t i = 0; i < (size_t)M * K; i++)
        A[i] = (float)(i % 7) * 0.01f;
    for (size_t i = 0; i < (size_t)N * K; i++)
        B[i] = (float)(i % 5) * 0.01f;
    /* the forward runs single-threaded BLAS slabs on its own pool; the ceiling is plain
     * multi-threaded OpenBLAS, and the pool's setting is restored afterwards */
    openblas_set_num_threads(threads);
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = loom_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, A, K, B, K, 0.0f, C,
                    N);
        double dt = loom_now() - t0;
        double g = 2.0 * M * N * K / dt / 1e9;
        if (g > best)
            best = g;
    }
    loom_free_aligned(A);
    loom_free_aligned(B);
    loom_free_aligned(C);
    tensor_set_threads(threads);
    return best;
}

/* Matmul parameters a token passes through (dense FFN, or k of E experts), plus lm_head. */
static double flops_per_token(const model_config *c, int ctx)
{
    double d = c->hidden_size, hd = c->head_dim, H = c->n_heads, Hkv = c->n_kv_heads;
    double attn_w = d * H * hd * 2 + d * Hkv * hd * 2;
    double ffn_w = 0;
    for (int l = 0; l < c->n_layers; l++) {
        if (model_config_is_moe_layer(c, l)) {
            int inter = c->moe_intermediate_size ? c->moe_intermediate_size : c->intermediate_size;
            ffn_w += d * c->n_experts + 3.0 * d * inter * c->n_experts_per_tok +
                     3.0 * d * c->shared_expert_intermediate_size;
        } else {
            ffn_w += 3.0 * d * c->intermediate_size;
        }
    }
    double attn_scores = 2.0 * H * hd * ctx; /* QK^T and PV per token, average context */
    return 2.0 * (attn_w * c->n_layers + ffn_w) + 2.0 * attn_scores * c->n_layers +
           2.0 * d * c->vocab_size;
}

/* Bytes one decode step must read at batch B with context ctx (f32 weights + KV). */
static double decode_bytes(const model_config *c, int B, int ctx)
{
    double d = c->hidden_size, hd = c->head_dim, H = c->n_heads, Hkv = c->n_kv_heads;
    double w = (d * H * hd * 2 + d * Hkv * hd * 2) * c->n_layers + d * c->vocab_size;
    for (int l = 0; l < c->n_layers; l++) {
        if (model_config_is_moe_layer(c, l)) {
            int inter = c->moe_intermediate_size ? c->moe_intermediate_size : c->intermediate_size;
            double E = c->n_experts, k = c->n_experts_per_tok;
            double touched = E * (1.0 - pow(1.0 - k / E, B)); /* expected distinct experts */
            w += d * E + 3.0 * d * inter * touched + 3.0 * d * c->shared_expert_intermediate_size;
        } else {
            w += 3.0 * d * c->intermediate_size;
        }
    }
    double kv = 2.0 * c->n_layers * Hkv * hd * (double)ctx * B;
    return 4.0 * (w + kv);
}

static int bench_model(const char *spec, const int *batches, int n_batches, int prompt,
                       int decode_steps, double gemm_ceiling, double bw_ceiling, row *rows)
{
    loom_err e = {0};
    model *m = NULL;
    double t0 = loom_now();
    if (model_open(spec, &m, &e) != 0) {
        fprintf(stderr, "bench/engine: %s: %s\n", spec, e.msg);
        return -1;
    }
    const model_config *c = model_get_config(m);
    fprintf(stderr, "loaded %s in %.1fs (%.0f MB of f32 weights)\n", spec, loom_now() - t0,
            model_weight_bytes(m) / 1e6);
    int block = 16, max_b = 0;
    for (int i = 0; i < n_batches; i++)
        max_b = batches[i] > max_b ? batches[i] : max_b;
    int blocks_per_seq = (prompt + decode_steps + block - 1) / block + 1;
    model_kv kv;
    if (model_kv_init(&kv, c, blocks_per_seq * max_b, block, &e) != 0) {
        fprintf(stderr, "bench/engine: %s\n", e.msg);
        model_free(m);
        return -1;
    }
    int32_t *tokens = xmalloc(sizeof(int32_t) * (size_t)max_b * prompt);
    int32_t *seq_start = xmalloc(sizeof(int32_t) * (size_t)(max_b + 1));
    int32_t *ctx = xmalloc(sizeof(int32_t) * (size_t)max_b);
    int32_t *rows_idx = xmalloc(sizeof(int32_t) * (size_t)max_b);
    int32_t *tables = xmalloc(sizeof(int32_t) * (size_t)max_b * blocks_per_seq);
    const int32_t **tab = xmalloc(sizeof(int32_t *) * (size_t)max_b);
    float *logits = xmalloc(sizeof(float) * (size_t)max_b * c->vocab_size);
    loom_rng rng;
    rng_seed(&rng, 7);
    for (int bi = 0; bi < n_batches; bi++) {
        int B = batches[bi];
        row *r = &rows[bi];
        snprintf(r->model, sizeof(r->model), "%s", spec);
        r->batch = B;
        for (int s = 0; s < B; s++) {
            for (int j = 0; j < blocks_per_seq; j++)
                tables[s * blocks_per_seq + j] = s * blocks_per_seq + j;
            tab[s] = tables + s * blocks_per_seq;
        }
        /* prefill: B prompts of `prompt` tokens in one batch */
        for (int i = 0; i < B * prompt; i++)
            tokens[i] = 3 + (int32_t)(rng_next(&rng) % (uint64_t)(c->vocab_size - 3));
        for (int s = 0; s <= B; s++)
            seq_start[s] = s * prompt;
        for (int s = 0; s < B; s++) {
            ctx[s] = 0;
            rows_idx[s] = (s + 1) * prompt - 1;
        }
        model_batch b = {.n_seqs = B, .n_tokens = B * prompt, .tokens = tokens,
                         .seq_start = seq_start, .ctx_len = ctx, .block_tables = tab,
                         .n_logits = B, .logit_rows = rows_idx};
        model_forward(m, &kv, &b, logits, &e); /* warm-up: grows the workspace */
        int reps = B * prompt >= 2048 ? 1 : 3;
        double best = 1e30;
        for (int rep = 0; rep < reps; rep++) {
            double ts = loom_now();
            if (model_forward(m, &kv, &b, logits, &e) != 0) {
                fprintf(stderr, "forward failed: %s\n", e.msg);
                break;
            }
            double dt = loom_now() - ts;
            best = dt < best ? dt : best;
        }
        r->prefill_tok_s = B * prompt / best;
        r->prefill_gflops = flops_per_token(c, prompt / 2) * B * prompt / best / 1e9;
        r->prefill_frac = r->prefill_gflops / gemm_ceiling;
        /* decode: B sequences at context `prompt`, one new token each, decode_steps steps */
        for (int s = 0; s <= B; s++)
            seq_start[s] = s;
        for (int s = 0; s < B; s++)
            rows_idx[s] = s;
        double total = 0;
        for (int step = 0; step < decode_steps + 1; step++) {
            for (int s = 0; s < B; s++) {
                ctx[s] = prompt + step;
                tokens[s] = 3 + (int32_t)(rng_next(&rng) % (uint64_t)(c->vocab_size - 3));
            }
            model_batch db = {.n_seqs = B, .n_tokens = B, .tokens = tokens,
                              .seq_start = seq_start, .ctx_len = ctx, .block_tables = tab,
                              .n_logits = B, .logit_rows = rows_idx};
            double ts = loom_now();
            model_forward(m, &kv, &db, logits, &e);
            if (step > 0) /* first step is warm-up */
                total += loom_now() - ts;
        }
        double per_step = total / decode_steps;
        r->decode_tok_s = B / per_step;
        double bytes = decode_bytes(c, B, prompt + decode_steps / 2);
        r->decode_gbs = bytes / per_step / 1e9;
        r->decode_frac = r->decode_gbs / bw_ceiling;
        fprintf(stderr, "  %s B=%d: prefill %.0f tok/s, decode %.1f tok/s\n", spec, B,
                r->prefill_tok_s, r->decode_tok_s);
    }
    free(tokens);
    free(seq_start);
    free(ctx);
    free(rows_idx);
    free(tables);
    free(tab);
    free(logits);
    model_kv_free(&kv);
    model_free(m);
    return 0;
}

static int parse_ints(const char *s, int *out, int max)
{
    int n = 0;
    while (*s && n < max) {
        out[n++] = atoi(s);
        const char *comma = strchr(s, ',');
        if (!comma)
            break;
        s = comma + 1;
    }
    return n;
}

int main(int argc, char **argv)
{
    int threads = 2, prompt = 128, decode_steps = 16;
    int batches[8] = {1, 8, 32}, n_batches = 3;
    const char *models = "random:llama-125m,random:mixtral-tiny";
    const char *markdown = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: %s [--threads N] [--models SPEC,SPEC] [--batches 1,8,32] "
                   "[--prompt TOKENS] [--decode-steps N] [--markdown FILE]\n"
                   "Prefill and decode tokens/s of the CPU forward pass beside the memory "
                   "bandwidth and SGEMM ceilings measured in the same run.\n",
                   argv[0]);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: %s needs a value\n", argv[0], argv[i]);
            return 2;
        }
        if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--models"))
            models = argv[++i];
        else if (!strcmp(argv[i], "--batches"))
            n_batches = parse_ints(argv[++i], batches, 8);
        else if (!strcmp(argv[i], "--prompt"))
            prompt = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--decode-steps"))
            decode_steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--markdown"))
            markdown = argv[++i];
        else {
            fprintf(stderr, "%s: unknown flag %s (try --help)\n", argv[0], argv[i]);
            return 2;
        }
    }
    tensor_set_threads(threads);
    /* Ceilings are measured before each model and once more at the end; the fractions use the
     * best seen, which is the conservative choice on a shared, noisy machine. */
    double bw = 0, gemm = 0, rd = 0;
    row rows[64];
    int n_rows = 0;
    char *list = xstrdup(models);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        double b1 = measure_copy_bandwidth(threads), g1 = measure_sgemm(threads);
        double r1 = measure_read_bandwidth(threads);
        bw = b1 > bw ? b1 : bw;
        rd = r1 > rd ? r1 : rd;
        gemm = g1 > gemm ? g1 : gemm;
        fprintf(stderr, "ceilings: copy %.1f GB/s, SGEMM %.1f GFLOP/s (%d threads)\n", b1, g1,
                threads);
        if (bench_model(tok, batches, n_batches, prompt, decode_steps, 1, 1, rows + n_rows) == 0)
            n_rows += n_batches;
    }
    free(list);
    double b2 = measure_copy_bandwidth(threads), g2 = measure_sgemm(threads);
    double r2 = measure_read_bandwidth(threads);
    bw = b2 > bw ? b2 : bw;
    rd = r2 > rd ? r2 : rd;
    gemm = g2 > gemm ? g2 : gemm;
    for (int i = 0; i < n_rows; i++) {
        rows[i].prefill_frac = rows[i].prefill_gflops / gemm;
        rows[i].decode_frac = rows[i].decode_gbs / bw;
        rows[i].decode_read_frac = rows[i].decode_gbs / rd;
    }

    loom_buf out;
    buf_init(&out);
    buf_printf(&out, "Ceilings, best of those measured before each model and at the end of the "
                     "run (%d threads): memory copy %.1f GB/s (STREAM-like over 1 GiB buffers, "
                     "read+write), read-only stream %.1f GB/s (one load per cache line over 1 GiB), "
                     "OpenBLAS SGEMM %.1f GFLOP/s (1024x2048x2048). Prefill: %d-token prompts, "
                     "one forward; decode: context %d, mean of %d steps. Decode bytes = f32 "
                     "weights the step touches (expected distinct experts for MoE) + KV read.\n\n",
               threads, bw, rd, gemm, prompt, prompt, decode_steps);
    buf_printf(&out, "| model | batch | prefill tok/s | prefill GFLOP/s | %% of SGEMM | "
                     "decode tok/s | decode GB/s | %% of copy | %% of read stream |\n");
    buf_printf(&out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < n_rows; i++) {
        row *r = &rows[i];
        buf_printf(&out, "| %s | %d | %.0f | %.1f | %.0f%% | %.1f | %.1f | %.0f%% | %.0f%% |\n",
                   r->model, r->batch, r->prefill_tok_s, r->prefill_gflops, 100 * r->prefill_frac,
                   r->decode_tok_s, r->decode_gbs, 100 * r->decode_frac,
                   100 * r->decode_read_frac);
    }
    fputs(out.data, stdout);
    if (markdown) {
        FILE *f = fopen(markdown, "w");
        if (!f) {
            fprintf(stderr, "cannot write %s\n", markdown);
            return 1;
        }
        fputs(out.data, f);
        fclose(f);
    }
    buf_free(&out);
    return n_rows ? 0 : 1;
}
