/*
 * tensor: CPU kernels (threads, GEMM through OpenBLAS, RMSNorm, RoPE, softmax, SwiGLU, dtype
 * conversion). Attention over the paged KV cache lives in attention.c.
 * Dimension letters: T tokens, d hidden size, hd head dim. All activations f32, row-major.
 */
#include "loom/tensor.h"
#include "tensor_internal.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <pthread.h>
#include <stdbool.h>
#include <string.h>

/* ---------------------------------------------------------------- threads */

static int g_threads; /* 0 = not set: OpenMP's default */

/*
 * One pool of threads does all the parallel work (pool.c). A GEMM is split by output rows
 * (weight rows) into one slab per thread, and each thread runs single-threaded OpenBLAS on its
 * slab. Letting OpenBLAS's own pthread pool run the GEMMs beside another pool is slower on a
 * small machine: the idle threads of one spin on the cores the other needs; measured on 2
 * cores, decode of llama-125m streamed 7 GB/s of weights that way instead of 22 GB/s. The
 * OpenMP count is set too, for any OpenMP code elsewhere.
 */
void tensor_set_threads(int n)
{
    if (n < 1)
        n = 1;
    g_threads = n;
    openblas_set_num_threads(1);
    omp_set_num_threads(n);
}

int tensor_get_threads(void)
{
    if (g_threads > 0)
        return g_threads;
    int n = omp_get_max_threads();
    return n > 0 ? n : 1;
}

/* ---------------------------------------------------------------- matmul */

static void bias_rows(float *y, const float *bias, int T, int out)
{
    for (int t = 0; t < T; t++)
        memcpy(y + (size_t)t * out, bias, (size_t)out * sizeof(float));
}

static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static void blas_init_once(void);

/* Rows o0..o1 of y (T, out) = beta*y + x (T, in) @ w (out, in)^T, single-threaded. At T == 1
 * SGEMV streams w once without the packing SGEMM does, which is what a decode step wants. */
static void gemm_slab(float *y, const float *x, const float *w, int T, int in, int out, int o0,
                      int o1, float beta)
{
    if (T == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, o1 - o0, in, 1.0f, w + (size_t)o0 * in, in, x, 1,
                    beta, y + o0, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, o1 - o0, in, 1.0f, x, in,
                    w + (size_t)o0 * in, in, beta, y + o0, out);
}

/*
 * Small-batch GEMM (decode steps of 2..SMALL_T_MAX sequences): OpenBLAS SGEMM packs the weights
 * on every call, and at M <= 16 that packing caps it at ~5-6 GB/s of weights per core, a third
 * of what SGEMV streams. This kernel reads each group of 3 weight rows once (it then sits in L1)
 * and applies it to all T tokens, 4 at a time: 12 accumulators + 3 weight vectors + 1 token
 * vector fill the 16 ymm registers. On the 2-core test machine, llama-125m decode at batch 8
 * went from 53 ms to 29 ms per step with it (2 threads).
 */
#define SMALL_T_MAX 16
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_SMALL_GEMM 1

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static void gemm_small_avx2(float *y, const float *x,
                                                                const float *w, int T, int in,
                                                                int out, int o0, int o1, float beta)
{
    int in8 = in & ~7;
    for (int o = o0; o < o1; o += 3) {
        int no = o1 - o < 3 ? o1 - o : 3;
        const float *w0 = w + (size_t)o * in;
        const float *w1 = w + (size_t)(o + (no > 1 ? 1 : 0)) * in;
        const float *w2 = w + (size_t)(o + (no > 2 ? 2 : no - 1)) * in;
        for (int t = 0; t < T; t += 4) {
            int nt = T - t < 4 ? T - t : 4;
            const float *xr[4];
            for (int i = 0; i < 4; i++)
                xr[i] = x + (size_t)(t + (i < nt ? i : nt - 1)) * in;
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a10 = a00, a11 = a00, a12 = a00,
                   a20 = a00, a21 = a00, a22 = a00, a30 = a00, a31 = a00, a32 = a00;
            for (int k = 0; k < in8; k += 8) {
                __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k),
                       v2 = _mm256_loadu_ps(w2 + k), u;
                u = _mm256_loadu_ps(xr[0] + k);
                a00 = _mm256_fmadd_ps(u, v0, a00);
                a01 = _mm256_fmadd_ps(u, v1, a01);
                a02 = _mm256_fmadd_ps(u, v2, a02);
                u = _mm256_loadu_ps(xr[1] + k);
                a10 = _mm256_fmadd_ps(u, v0, a10);
                a11 = _mm256_fmadd_ps(u, v1, a11);
                a12 = _mm256_fmadd_ps(u, v2, a12);
                u = _mm256_loadu_ps(xr[2] + k);
                a20 = _mm256_fmadd_ps(u, v0, a20);
                a21 = _mm256_fmadd_ps(u, v1, a21);
                a22 = _mm256_fmadd_ps(u, v2, a22);
                u = _mm256_loadu_ps(xr[3] + k);
                a30 = _mm256_fmadd_ps(u, v0, a30);
                a31 = _mm256_fmadd_ps(u, v1, a31);
                a32 = _mm256_fmadd_ps(u, v2, a32);
            }
            float acc[4][3] = {
                {hsum256(a00), hsum256(a01), hsum256(a02)},
                {hsum256(a10), hsum256(a11), hsum256(a12)},
                {hsum256(a20), hsum256(a21), hsum256(a22)},
                {hsum256(a30), hsum256(a31), hsum256(a32)},
            };
            const float *wr[3] = {w0, w1, w2};
            for (int i = 0; i < nt; i++) {
                for (int r = 0; r < no; r++) {
                    float sum = acc[i][r];
                    for (int k = in8; k < in; k++)
                        sum += xr[i][k] * wr[r][k];
                    float *yy = y + (size_t)(t + i) * out + o + r;
                    *yy = beta == 0.0f ? sum : beta * *yy + sum;
                }
            }
        }
    }
}
#else
#define HAVE_SMALL_GEMM 0
#endif

static bool g_small_gemm; /* the CPU has AVX2 and FMA */

/* OpenBLAS runs single-threaded inside our slabs even if tensor_set_threads was never called;
 * the CPU check rides along. */
static void blas_init_once(void)
{
    openblas_set_num_threads(1);
#if HAVE_SMALL_GEMM
    __builtin_cpu_init();
    g_small_gemm = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
}

void tensor_blas_init(void)
{
    pthread_once(&blas_once, blas_init_once);
}

static void gemm_part(float *y, const float *x, const float *w, int T, int in, int out, int o0,
                      int o1, float beta)
{
#if HAVE_SMALL_GEMM
    if (g_small_gemm && T > 1 && T <= SMALL_T_MAX) {
        gemm_small_avx2(y, x, w, T, in, out, o0, o1, beta);
        return;
    }
#endif
    gemm_slab(y, x, w, T, in, out, o0, o1, beta);
}

typedef struct gemm_job {
    float *y;
    const float *x, *w;
    int T, in, out;
    float beta;
} gemm_job;

/* Thread tid of n takes its slab of output rows, whole cache lines of y each. */
static void gemm_run(void *arg, int tid, int n)
{
    const gemm_job *j = arg;
    int per = ((j->out + n - 1) / n + 15) & ~15;
    int o0 = tid * per, o1 = o0 + per < j->out ? o0 + per : j->out;
    if (o0 < o1)
        gemm_part(j->y, j->x, j->w, j->T, j->in, j->out, o0, o1, j->beta);
}

static void gemm_xwt(float *y, const float *x, const float *w, int T, int in, int out, float beta)
{
    if (T <= 0 || out <= 0)
        return;
    if (in <= 0) {
        for (size_t i = 0; i < (size_t)T * out; i++)
            y[i] *= beta;
        return;
    }
    tensor_blas_init();
    double work = (double)T * in * out;
    if (tensor_get_threads() == 1 || work < 1 << 15 || out < 32) {
        gemm_part(y, x, w, T, in, out, 0, out, beta);
        return;
    }
    gemm_job job = {y, x, w, T, in, out, beta};
    tensor_parallel(gemm_run, &job);
}

void tensor_matmul(float *y, const float *x, const float *w, const float *bias, int T, int in,
                   int out)
{
    if (bias) {
        bias_rows(y, bias, T, out);
        gemm_xwt(y, x, w, T, in, out, 1.0f);
    } else {
        gemm_xwt(y, x, w, T, in, out, 0.0f);
    }
}

void tensor_matmul_add(float *y, const float *x, const float *w, int T, int in, int out)
{
    gemm_xwt(y, x, w, T, in, out, 1.0f);
}

/* The kernel choice of gemm_xwt (SGEMV, small-M AVX2, SGEMM) over all rows on this thread. */
void tensor_matmul_serial(float *y, const float *x, const float *w, const float *bias, int T,
                          int in, int out)
{
    if (T <= 0 || out <= 0)
        return;
    float beta = 0.0f;
    if (bias) {
        bias_rows(y, bias, T, out);
        beta = 1.0f;
    }
    if (in <= 0) {
        if (!bias)
            memset(y, 0, (size_t)T * out * sizeof(float));
        return;
    }
    tensor_blas_init();
    gemm_part(y, x, w, T, in, out, 0, out, beta);
}

void tensor_matmul_ref(float *y, const float *x, const float *w, const float *bias, int T, int in,
                       int out)
{
    for (int t = 0; t < T; t++) {
        for (int o = 0; o < out; o++) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < in; i++)
                s += (double)x[(size_t)t * in + i] * w[(size_t)o * in + i];
            y[(size_t)t * out + o] = (float)s;
        }
    }
}

/* ---------------------------------------------------------------- norms, activations */

void tensor_rmsnorm(float *y, const float *x, const float *w, int T, int d, float eps)
{
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * d;
        float *yt = y + (size_t)t * d;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < d; i++)
            ss += xt[i] * xt[i];
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        /* Hugging Face: weight * (x * rsqrt(mean(x^2) + eps)) */
        for (int i = 0; i < d; i++)
            yt[i] = w[i] * (xt[i] * inv);
    }
}

void tensor_rmsnorm_ref(float *y, const float *x, const float *w, int T, int d, float eps)
{
    for (int t = 0; t < T; t++) {
        double ss = 0.0;
        for (int i = 0; i < d; i++)
            ss += (double)x[(size_t)t * d + i] * x[(size_t)t * d + i];
        double inv = 1.0 / sqrt(ss / d + eps);
        for (int i = 0; i < d; i++)
            y[(size_t)t * d + i] = (float)(w[i] * (x[(size_t)t * d + i] * inv));
    }
}

void tensor_softmax(float *x, int n)
{
    if (n <= 0)
        return;
    float m = x[0];
    for (int i = 1; i < n; i++)
        m = x[i] > m ? x[i] : m;
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    float inv = 1.0f / s;
    for (int i = 0; i < n; i++)
        x[i] *= inv;
}

void tensor_softmax_ref(float *x, int n)
{
    if (n <= 0)
        return;
    double m = x[0], s = 0.0;
    for (int i = 1; i < n; i++)
        m = x[i] > m ? x[i] : m;
    for (int i = 0; i < n; i++)
        s += exp((double)x[i] - m);
    for (int i = 0; i < n; i++)
        x[i] = (float)(exp((double)x[i] - m) / s);
}

void tensor_silu_mul(float *gate, const float *up, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

/* ---------------------------------------------------------------- RoPE */

void tensor_rope_inv_freq(float *inv_freq, int hd, float theta)
{
    /* transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in f32 */
    for (int i = 0; i < hd / 2; i++)
        inv_freq[i] = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
}

/* Rotate-half: head vector (x1, x2) with halves of hd/2 becomes
 * (x1*cos - x2*sin, x2*cos + x1*sin). The angle is pos*inv_freq in f32, as transformers does. */
void tensor_rope(float *x, const int32_t *pos, int T, int n_heads, int hd, const float *inv_freq)
{
    int half = hd / 2;
    size_t row = (size_t)n_heads * hd;
    for (int t = 0; t < T; t++) {
        float *xt = x + (size_t)t * row;
        float p = (float)pos[t];
        for (int i = 0; i < half; i++) {
            float a = p * inv_freq[i];
            float c = cosf(a), s = sinf(a);
            for (int h = 0; h < n_heads; h++) {
                float *xh = xt + (size_t)h * hd;
                float x1 = xh[i], x2 = xh[i + half];
                xh[i] = x1 * c - x2 * s;
                xh[i + half] = x2 * c + x1 * s;
            }
        }
    }
}

void tensor_rope_ref(float *x, const int32_t *pos, int T, int n_heads, int hd,
                     const float *inv_freq)
{
    int half = hd / 2;
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < n_heads; h++) {
            float *xh = x + ((size_t)t * n_heads + h) * hd;
            for (int i = 0; i < half; i++) {
                double a = (double)((float)pos[t] * inv_freq[i]);
                double c = cos(a), s = sin(a);
                double x1 = xh[i], x2 = xh[i + half];
                xh[i] = (float)(x1 * c - x2 * s);
                xh[i + half] = (float)(x2 * c + x1 * s);
            }
        }
    }
}

/* ---------------------------------------------------------------- dtype conversion */

float tensor_bf16_to_f32_1(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float tensor_f16_to_f32_1(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400));
            man &= 0x3ff;
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13); /* inf or nan */
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t tensor_f32_to_bf16_1(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40); /* quiet nan */
    u += 0x7fffu + ((u >> 16) & 1);          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* src may be unaligned (safetensors offsets are only byte-aligned), hence memcpy loads. */
void tensor_bf16_to_f32(float *dst, const uint16_t *src, size_t n)
{
    const unsigned char *p = (const unsigned char *)src;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        uint32_t u = (uint32_t)h << 16;
        memcpy(dst + i, &u, 4);
    }
}

void tensor_f16_to_f32(float *dst, const uint16_t *src, size_t n)
{
    const unsigned char *p = (const unsigned char *)src;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        dst[i] = tensor_f16_to_f32_1(h);
    }
}
