/*
 * tensor: CPU kernels. All activations are f32, row-major. Dimension letters:
 *   T tokens in a flat batch, d hidden size, H query heads, Hkv key/value heads, hd head dim.
 * Each fast kernel has a naive *_ref twin beside it; tests use the naive one as the oracle.
 */
#ifndef LOOM_TENSOR_H
#define LOOM_TENSOR_H

#include <stddef.h>
#include <stdint.h>

/* Threads used by BLAS and by our own parallel loops (OpenMP). */
void tensor_set_threads(int n);
int tensor_get_threads(void);

/* y (T, out) = x (T, in) @ w^T [+ bias], w (out, in) row-major (Hugging Face Linear layout).
 * Through OpenBLAS SGEMM. bias may be NULL. */
void tensor_matmul(float *y, const float *x, const float *w, const float *bias, int T, int in,
                   int out);
void tensor_matmul_ref(float *y, const float *x, const float *w, const float *bias, int T, int in,
                       int out);

/* y (T, d) = x / rms(x) * w; y may equal x. */
void tensor_rmsnorm(float *y, const float *x, const float *w, int T, int d, float eps);

/* Rotate-half RoPE in place on x (T, n_heads*hd) at positions pos (T); inv_freq (hd/2). */
void tensor_rope(float *x, const int32_t *pos, int T, int n_heads, int hd, const float *inv_freq);

/* Numerically stable softmax in place over n values. */
void tensor_softmax(float *x, int n);

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

#endif
