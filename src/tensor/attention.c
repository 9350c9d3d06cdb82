/*
 * Causal attention over a paged KV cache.
 * Dimension letters: H query heads, Hkv kv heads, hd head dim, bs block size.
 *   q, out:            (n_q, H*hd) rows of one sequence's new tokens
 *   k_cache, v_cache:  (n_blocks, bs, Hkv*hd) one layer's block pool
 *   block_table:       (ceil(n_ctx/bs)) block id of positions [i*bs, (i+1)*bs)
 */
#include "loom/tensor.h"
#include "tensor_internal.h"

#include <cblas.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define ATT_CHUNK 64 /* keys scored per pass of the online softmax */

/*
 * One query vector of one head against keys at positions lo .. hi-1. Online softmax over chunks
 * of keys (flash-attention style): scores of a chunk go into a small stack buffer, the running
 * maximum m and normaliser l are updated once per chunk, and the output accumulates in o.
 */
static void attend_query(float *o, const float *qv, const float *k_cache, const float *v_cache,
                         const int32_t *block_table, int bs, size_t kv_dim, size_t koff, int hd,
                         int lo, int hi, float scale)
{
    float sc[ATT_CHUNK];
    float m = -INFINITY, l = 0.0f;
    memset(o, 0, (size_t)hd * sizeof(float));
    for (int p0 = lo; p0 < hi; p0 += ATT_CHUNK) {
        int n = hi - p0 < ATT_CHUNK ? hi - p0 : ATT_CHUNK;
        int bi = p0 / bs, off = p0 % bs;
        float cm = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float *kp = k_cache + ((size_t)block_table[bi] * bs + off) * kv_dim + koff;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int d = 0; d < hd; d++)
                s += qv[d] * kp[d];
            s *= scale;
            sc[j] = s;
            cm = s > cm ? s : cm;
            if (++off == bs) {
                off = 0;
                bi++;
            }
        }
        if (cm > m) {
            float r = expf(m - cm); /* 0 on the first chunk (m = -inf) */
            l *= r;
            for (int d = 0; d < hd; d++)
                o[d] *= r;
            m = cm;
        }
        bi = p0 / bs;
        off = p0 % bs;
        for (int j = 0; j < n; j++) {
            const float *vp = v_cache + ((size_t)block_table[bi] * bs + off) * kv_dim + koff;
            float p = expf(sc[j] - m);
            l += p;
#pragma omp simd
            for (int d = 0; d < hd; d++)
                o[d] += p * vp[d];
            if (++off == bs) {
                off = 0;
                bi++;
            }
        }
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int d = 0; d < hd; d++)
        o[d] *= inv;
}

/*
 * A chunk of n consecutive queries of one head (positions p0 .. p0+n-1) with GEMMs: the keys
 * and values it needs are gathered from the paged cache into contiguous kb, vb (nk, hd), then
 * S (n, nk) = scale * Q K^T, masked row softmax, O = P V, both GEMMs single-threaded OpenBLAS.
 * Prefill spends most of its attention time here; per key the online kernel above does one dot
 * product with a horizontal reduction, which SGEMM replaces with register-blocked FMAs.
 */
static void attend_chunk_gemm(float *out, const float *q, size_t row, const float *k_cache,
                              const float *v_cache, const int32_t *block_table, int bs,
                              size_t kv_dim, size_t koff, int hd, int p0, int n, int window,
                              float scale, float *kb, float *vb, float *sb)
{
    int lo = window > 0 && p0 - window + 1 > 0 ? p0 - window + 1 : 0;
    int nk = p0 + n - lo;
    for (int j = 0; j < nk; j++) {
        int p = lo + j;
        size_t slot = ((size_t)block_table[p / bs] * bs + p % bs) * kv_dim + koff;
        memcpy(kb + (size_t)j * hd, k_cache + slot, (size_t)hd * sizeof(float));
        memcpy(vb + (size_t)j * hd, v_cache + slot, (size_t)hd * sizeof(float));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, nk, hd, scale, q, (int)row, kb, hd,
                0.0f, sb, nk);
    for (int i = 0; i < n; i++) {
        int p = p0 + i;
        int a = (window > 0 && p - window + 1 > lo ? p - window + 1 : lo) - lo, b = p - lo + 1;
        float *si = sb + (size_t)i * nk;
        for (int j = 0; j < a; j++)
            si[j] = 0.0f;
        tensor_softmax(si + a, b - a);
        for (int j = b; j < nk; j++)
            si[j] = 0.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hd, nk, 1.0f, sb, nk, vb, hd, 0.0f,
                out, (int)row);
}

#define GEMM_MIN_Q 16 /* sequences with fewer new tokens (decode) use the online kernel */
#define GEMM_CHUNK 64 /* queries per GEMM work item */

static int seq_chunks(int nq)
{
    return nq >= GEMM_MIN_Q ? (nq + GEMM_CHUNK - 1) / GEMM_CHUNK : 1;
}

/*
 * Work items are (sequence, query chunk, head): one chunk per decode-like sequence, several for a
 * long prefill so that one prompt still feeds every thread. Threads claim item numbers from a
 * shared counter and walk the item list in order to find theirs, which avoids building a list
 * (nothing is allocated on the decode path). GEMM scratch is allocated per thread, and only
 * when a thread meets a prefill chunk.
 */
typedef struct att_job {
    float *out;
    const float *q, *k_cache, *v_cache;
    int n_seqs;
    const int32_t *seq_start, *ctx_len;
    const int32_t *const *block_tables;
    int block_size, n_heads, group, hd, window, n_items, max_ctx;
    size_t kv_dim, row;
    float scale;
    atomic_int next;
} att_job;

static void att_run(void *arg, int tid, int n_threads)
{
    att_job *j = arg;
    float *kb = NULL, *vb = NULL, *sb = NULL;
    bool scratch_failed = false;
    int mine = atomic_fetch_add(&j->next, 1), idx = 0;
    size_t row = j->row;
    for (int s = 0; s < j->n_seqs && mine < j->n_items; s++) {
        int nq = j->seq_start[s + 1] - j->seq_start[s], nc = seq_chunks(nq);
        for (int c = 0; c < nc && mine < j->n_items; c++) {
            for (int h = 0; h < j->n_heads; h++, idx++) {
                if (idx != mine)
                    continue;
                size_t koff = (size_t)(h / j->group) * j->hd;
                int t0 = j->seq_start[s], t1 = j->seq_start[s + 1];
                if (nq >= GEMM_MIN_Q) {
                    t0 += c * GEMM_CHUNK;
                    t1 = t0 + GEMM_CHUNK < t1 ? t0 + GEMM_CHUNK : t1;
                    if (!kb && !scratch_failed) {
                        kb = malloc((size_t)j->max_ctx * j->hd * sizeof(float));
                        vb = malloc((size_t)j->max_ctx * j->hd * sizeof(float));
                        sb = malloc((size_t)GEMM_CHUNK * j->max_ctx * sizeof(float));
                        if (!kb || !vb || !sb) { /* fall back to the online kernel */
                            free(kb);
                            free(vb);
                            free(sb);
                            kb = vb = sb = NULL;
                            scratch_failed = true;
                        }
                    }
                }
                if (nq >= GEMM_MIN_Q && kb) {
                    attend_chunk_gemm(j->out + t0 * row + (size_t)h * j->hd,
                                      j->q + t0 * row + (size_t)h * j->hd, row, j->k_cache,
                                      j->v_cache, j->block_tables[s], j->block_size, j->kv_dim,
                                      koff, j->hd, j->ctx_len[s] + (t0 - j->seq_start[s]), t1 - t0,
                                      j->window, j->scale, kb, vb, sb);
                } else {
                    for (int t = t0; t < t1; t++) {
                        int pos = j->ctx_len[s] + (t - j->seq_start[s]);
                        int lo = j->window > 0 && pos - j->window + 1 > 0 ? pos - j->window + 1 : 0;
                        attend_query(j->out + t * row + (size_t)h * j->hd,
                                     j->q + t * row + (size_t)h * j->hd, j->k_cache, j->v_cache,
                                     j->block_tables[s], j->block_size, j->kv_dim, koff, j->hd, lo,
                                     pos + 1, j->scale);
                    }
                }
                mine = atomic_fetch_add(&j->next, 1);
            }
        }
    }
    free(kb);
    free(vb);
    free(sb);
    (void)tid;
    (void)n_threads;
}

void tensor_attention_paged_varlen(float *out, const float *q, const float *k_cache,
                                   const float *v_cache, int n_seqs, const int32_t *seq_start,
                                   const int32_t *ctx_len, const int32_t *const *block_tables,
                                   int block_size, int n_heads, int n_kv_heads, int hd, float scale,
                                   int window)
{
    att_job j = {
        .out = out,
        .q = q,
        .k_cache = k_cache,
        .v_cache = v_cache,
        .n_seqs = n_seqs,
        .seq_start = seq_start,
        .ctx_len = ctx_len,
        .block_tables = block_tables,
        .block_size = block_size,
        .n_heads = n_heads,
        .group = n_heads / n_kv_heads,
        .hd = hd,
        .window = window,
        .kv_dim = (size_t)n_kv_heads * hd,
        .row = (size_t)n_heads * hd,
        .scale = scale,
    };
    for (int s = 0; s < n_seqs; s++) {
        int nq = seq_start[s + 1] - seq_start[s];
        j.n_items += seq_chunks(nq) * n_heads;
        if (nq >= GEMM_MIN_Q && ctx_len[s] + nq > j.max_ctx)
            j.max_ctx = ctx_len[s] + nq;
    }
    atomic_init(&j.next, 0);
    tensor_blas_init();
    if (j.n_items > 1)
        tensor_parallel(att_run, &j);
    else
        att_run(&j, 0, 1);
}

void tensor_attention_paged(float *out, const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *block_table, int block_size, int start_pos, int n_q,
                            int n_heads, int n_kv_heads, int hd, float scale)
{
    int32_t seq_start[2] = {0, n_q};
    int32_t ctx = start_pos;
    const int32_t *tables[1] = {block_table};
    tensor_attention_paged_varlen(out, q, k_cache, v_cache, 1, seq_start, &ctx, tables, block_size,
                                  n_heads, n_kv_heads, hd, scale, 0);
}

/* Naive two-pass softmax attention in double: the oracle for the kernel above. */
void tensor_attention_paged_ref(float *out, const float *q, const float *k_cache,
                                const float *v_cache, const int32_t *block_table, int block_size,
                                int start_pos, int n_q, int n_heads, int n_kv_heads, int hd,
                                float scale)
{
    int n_ctx = start_pos + n_q;
    double *sc = malloc((size_t)(n_ctx > 0 ? n_ctx : 1) * sizeof(double));
    if (!sc)
        return;
    size_t kv_dim = (size_t)n_kv_heads * hd;
    for (int i = 0; i < n_q; i++) {
        int last = start_pos + i;
        for (int h = 0; h < n_heads; h++) {
            int kvh = h / (n_heads / n_kv_heads);
            const float *qv = q + ((size_t)i * n_heads + h) * hd;
            double m = -INFINITY, sum = 0.0;
            for (int p = 0; p <= last; p++) {
                const float *kp =
                    k_cache +
                    ((size_t)block_table[p / block_size] * block_size + p % block_size) * kv_dim +
                    (size_t)kvh * hd;
                double s = 0.0;
                for (int d = 0; d < hd; d++)
                    s += (double)qv[d] * kp[d];
                sc[p] = s * scale;
                if (sc[p] > m)
                    m = sc[p];
            }
            for (int p = 0; p <= last; p++) {
                sc[p] = exp(sc[p] - m);
                sum += sc[p];
            }
            float *o = out + ((size_t)i * n_heads + h) * hd;
            for (int d = 0; d < hd; d++) {
                double acc = 0.0;
                for (int p = 0; p <= last; p++) {
                    const float *vp =
                        v_cache +
                        ((size_t)block_table[p / block_size] * block_size + p % block_size) *
                            kv_dim +
                        (size_t)kvh * hd;
                    acc += sc[p] * vp[d];
                }
                o[d] = (float)(acc / sum);
            }
        }
    }
    free(sc);
}
