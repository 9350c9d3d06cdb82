/*
 * tensor: CPU kernels. All activations are f32, row-major. Dimension letters:
 *   T tokens in a flat batch, d hidden size, H query heads, Hkv key/value heads, hd head dim.
 * Each fast kernel has a naive *_ref twin beside it; tests use the naive one as the oracle.
 */
#ifndef LOOM_TENSOR_H
#define LOOM_TENSOR_H

#include <stddef.h>
#include <stdint.h>

/*
 * Threads for every kernel here: one pool of n threads (tensor_parallel). GEMMs are split by
 * output rows into one slab per thread, each slab a single-threaded OpenBLAS call (OpenBLAS's own
 * pool is set to 1 thread: two pools on the same cores fight). Attention is split over
 * (sequence, query chunk, head). Default: OpenMP's default count (OMP_NUM_THREADS or the cores).
 */
void tensor_set_threads(int n);
int tensor_get_threads(void);
/* Runs fn(arg, tid, n) on n = tensor_get_threads() threads, the caller being tid 0, and returns
 * when all have finished. Idle workers spin briefly, then yield, then sleep. A call from inside
 * a job, or while another thread's job runs, runs fn(arg, 0, 1) inline. */
void tensor_parallel(void (*fn)(void *arg, int tid, int n), void *arg);
/* Jobs handed to the pool's workers so far (calls that ran inline are not counted): each costs
 * a hand-off, for profiles. */
uint64_t tensor_parallel_jobs(void);
/* For profiles on a machine with fewer cores (set tensor_set_threads(n) too): every parallel
 * call runs on the caller, each tensor_parallel thread share and each task timed, the shares
 * or the tasks (in order, to the simulated thread free first) laid on n threads. Returns the
 * calls' simulated time on n threads (no hand-off, no memory contention) summed so far, and in
 * *wall the time they took here. n <= 1 turns it off. */
void tensor_parallel_simulate(int n);
double tensor_parallel_simulated(double *wall);
/* Runs fn(arg, i, tid) for every task i in 0 .. n-1 on the pool: each thread takes the next
 * task not yet taken, so which thread runs a task depends on timing; tid (below
 * tensor_get_threads()) only picks per-thread scratch. Results do not depend on the thread count
 * when the tasks are a fixed partition of the work, each writing its own part of the output.
 * Must not be called from inside a task. */
void tensor_parallel_for(int n, void (*fn)(void *arg, int i, int tid), void *arg);

/* y (T, out) = x (T, in) @ w^T [+ bias], w (out, in) row-major (Hugging Face Linear layout).
 * Through OpenBLAS SGEMV (T = 1) or SGEMM, or for 2 <= T <= 16 an AVX2 kernel that streams the
 * weights once (decode batches). bias may be NULL. */
void tensor_matmul(float *y, const float *x, const float *w, const float *bias, int T, int in,
                   int out);
void tensor_matmul_ref(float *y, const float *x, const float *w, const float *bias, int T, int in,
                       int out);
/* y (T, out) += x (T, in) @ w^T: a Linear whose output is added to a residual stream. */
void tensor_matmul_add(float *y, const float *x, const float *w, int T, int in, int out);
/* tensor_matmul on the calling thread only, with the kernels tensor_matmul picks (SGEMV at
 * T = 1, the AVX2 kernel at 2..16, SGEMM above), for work that is already split over the pool
 * at a coarser grain, e.g. whole MoE experts per thread. bias may be NULL. */
void tensor_matmul_serial(float *y, const float *x, const float *w, const float *bias, int T,
                          int in, int out);

/* y (T, d) = x / rms(x) * w; y may equal x. */
void tensor_rmsnorm(float *y, const float *x, const float *w, int T, int d, float eps);
void tensor_rmsnorm_ref(float *y, const float *x, const float *w, int T, int d, float eps);

/* Rotate-half RoPE in place on x (T, n_heads*hd) at positions pos (T); inv_freq (hd/2). */
void tensor_rope(float *x, const int32_t *pos, int T, int n_heads, int hd, const float *inv_freq);
void tensor_rope_ref(float *x, const int32_t *pos, int T, int n_heads, int hd,
                     const float *inv_freq);
/* inv_freq (hd/2)[i] = 1 / theta^(2i/hd), computed in f32 like Hugging Face's default RoPE. */
void tensor_rope_inv_freq(float *inv_freq, int hd, float theta);

/* Numerically stable softmax in place over n values. */
void tensor_softmax(float *x, int n);
void tensor_softmax_ref(float *x, int n); /* in double */

/* gate (n) = silu(gate) * up */
void tensor_silu_mul(float *gate, const float *up, size_t n);

/* dtype conversion */
float tensor_bf16_to_f32_1(uint16_t h);
float tensor_f16_to_f32_1(uint16_t h);
uint16_t tensor_f32_to_bf16_1(float f);
void tensor_bf16_to_f32(float *dst, const uint16_t *src, size_t n);
void tensor_f16_to_f32(float *dst, const uint16_t *src, size_t n);

/*
 * Causal attention of one sequence's new tokens over a paged KV cache.
 *   out (n_q, H*hd); q (n_q, H*hd), already RoPE'd; the new tokens sit at positions
 *   start_pos .. start_pos+n_q-1 and their K/V are already written into the cache.
 *   k_cache, v_cache: this layer's block pool, (n_blocks, block_size, Hkv*hd).
 *   block_table: block ids covering positions 0 .. start_pos+n_q-1.
 * Token i attends to positions 0 .. start_pos+i. GQA: head h reads kv head h / (H/Hkv).
 */
void tensor_attention_paged(float *out, const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *block_table, int block_size, int start_pos, int n_q,
                            int n_heads, int n_kv_heads, int hd, float scale);
void tensor_attention_paged_ref(float *out, const float *q, const float *k_cache,
                                const float *v_cache, const int32_t *block_table, int block_size,
                                int start_pos, int n_q, int n_heads, int n_kv_heads, int hd,
                                float scale);

/*
 * The same over a flat varlen batch of n_seqs sequences, parallel over (sequence, query chunk,
 * head) on tensor_get_threads() threads. Sequences with 16 or more new tokens (prefill) go
 * through SGEMM in chunks of 64 queries (K/V gathered from the pages; scratch allocated per
 * call); shorter ones (decode) through an online-softmax kernel that allocates nothing.
 * Sequence s owns rows seq_start[s] .. seq_start[s+1]-1 of q and out; its first new token is at
 * position ctx_len[s]. window > 0 limits each query at position p to keys at positions
 * > p - window (Mistral sliding window); 0 = full causal.
 */
void tensor_attention_paged_varlen(float *out, const float *q, const float *k_cache,
                                   const float *v_cache, int n_seqs, const int32_t *seq_start,
                                   const int32_t *ctx_len, const int32_t *const *block_tables,
                                   int block_size, int n_heads, int n_kv_heads, int hd,
                                   float scale, int window);

#endif
