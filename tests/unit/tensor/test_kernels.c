/* tensor kernels against their naive _ref twins; dtype conversions against known bit patterns. */
#include "testlib.h"

#include "loom/base.h"
#include "loom/tensor.h"

#include <math.h>
#include <sys/wait.h>

static float *randn(loom_rng *r, size_t n, float scale)
{
    float *p = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++)
        p[i] = rng_normal(r) * scale;
    return p;
}

static double max_abs_diff(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= m))
            m = d;
    }
    return m;
}

static void test_matmul(void **state)
{
    (void)state;
    loom_rng r;
    rng_seed(&r, 1);
    int Ts[] = {1, 2, 3, 4, 5, 8, 13, 16, 17, 33}, ins[] = {1, 5, 64, 130},
        outs[] = {1, 3, 64, 257};
    for (int a = 0; a < 10; a++) {
        for (int b = 0; b < 4; b++) {
            for (int c = 0; c < 4; c++) {
                int T = Ts[a], in = ins[b], out = outs[c];
                float *x = randn(&r, (size_t)T * in, 1), *w = randn(&r, (size_t)out * in, 1);
                float *bias = randn(&r, out, 1);
                float *y = malloc((size_t)T * out * 4), *yr = malloc((size_t)T * out * 4);
                for (int with_bias = 0; with_bias < 2; with_bias++) {
                    const float *bb = with_bias ? bias : NULL;
                    tensor_matmul(y, x, w, bb, T, in, out);
                    tensor_matmul_ref(yr, x, w, bb, T, in, out);
                    assert_true(max_abs_diff(y, yr, (size_t)T * out) < 1e-5 * sqrt(in) * 4);
                    /* the single-threaded entry point, e.g. from inside a pool job */
                    for (size_t i = 0; i < (size_t)T * out; i++)
                        y[i] = NAN; /* every element must be written */
                    tensor_matmul_serial(y, x, w, bb, T, in, out);
                    assert_true(max_abs_diff(y, yr, (size_t)T * out) < 1e-5 * sqrt(in) * 4);
                }
                /* y += x @ w^T */
                for (size_t i = 0; i < (size_t)T * out; i++)
                    y[i] = 1.5f;
                tensor_matmul_add(y, x, w, T, in, out);
                tensor_matmul_ref(yr, x, w, NULL, T, in, out);
                for (size_t i = 0; i < (size_t)T * out; i++)
                    yr[i] += 1.5f;
                assert_true(max_abs_diff(y, yr, (size_t)T * out) < 1e-5 * sqrt(in) * 4);
                free(x);
                free(w);
                free(bias);
                free(y);
                free(yr);
            }
        }
    }
}

static void test_rmsnorm(void **state)
{
    (void)state;
    loom_rng r;
    rng_seed(&r, 2);
    int T = 5, d = 96;
    float *x = randn(&r, (size_t)T * d, 3), *w = randn(&r, d, 1);
    float *y = malloc((size_t)T * d * 4), *yr = malloc((size_t)T * d * 4);
    tensor_rmsnorm(y, x, w, T, d, 1e-5f);
    tensor_rmsnorm_ref(yr, x, w, T, d, 1e-5f);
    assert_true(max_abs_diff(y, yr, (size_t)T * d) < 1e-5);
    tensor_rmsnorm(x, x, w, T, d, 1e-5f); /* in place */
    assert_true(max_abs_diff(x, yr, (size_t)T * d) < 1e-5);
    free(x);
    free(w);
    free(y);
    free(yr);
}

static void test_rope(void **state)
{
    (void)state;
    loom_rng r;
    rng_seed(&r, 3);
    int T = 6, H = 3, hd = 64;
    int32_t pos[6] = {0, 1, 2, 17, 511, 4999};
    float inv[32];
    tensor_rope_inv_freq(inv, hd, 10000.0f);
    for (int i = 0; i < hd / 2; i++)
        assert_true(fabs(inv[i] - pow(10000.0, -2.0 * i / hd)) < 1e-6 * fabs(inv[i]) + 1e-12);
    float *x = randn(&r, (size_t)T * H * hd, 1);
    float *xr = malloc((size_t)T * H * hd * 4);
    memcpy(xr, x, (size_t)T * H * hd * 4);
    tensor_rope(x, pos, T, H, hd, inv);
    tensor_rope_ref(xr, pos, T, H, hd, inv);
    assert_true(max_abs_diff(x, xr, (size_t)T * H * hd) < 1e-5);
    /* position 0 is the identity; rotation keeps each (i, i+hd/2) pair's norm */
    float *y = randn(&r, (size_t)H * hd, 1), *y0 = malloc((size_t)H * hd * 4);
    memcpy(y0, y, (size_t)H * hd * 4);
    int32_t p0 = 0;
    tensor_rope(y, &p0, 1, H, hd, inv);
    assert_true(max_abs_diff(y, y0, (size_t)H * hd) == 0);
    int32_t p1 = 123;
    tensor_rope(y, &p1, 1, H, hd, inv);
    for (int i = 0; i < hd / 2; i++) {
        double n0 = hypot(y0[i], y0[i + hd / 2]), n1 = hypot(y[i], y[i + hd / 2]);
        assert_true(fabs(n0 - n1) < 1e-5);
    }
    free(x);
    free(xr);
    free(y);
    free(y0);
}

static void test_softmax(void **state)
{
    (void)state;
    float x[7] = {1, 2, 3, -1, 1000, 999, -1e30f}, xr[7];
    memcpy(xr, x, sizeof(x));
    tensor_softmax(x, 7);
    tensor_softmax_ref(xr, 7);
    double s = 0;
    for (int i = 0; i < 7; i++) {
        assert_true(isfinite(x[i]));
        assert_true(fabs(x[i] - xr[i]) < 1e-6);
        s += x[i];
    }
    assert_true(fabs(s - 1) < 1e-5);
    float one[1] = {-5};
    tensor_softmax(one, 1);
    assert_true(one[0] == 1.0f);
}

static void test_silu_mul(void **state)
{
    (void)state;
    float g[4] = {-3, 0, 0.5f, 10}, u[4] = {2, 5, -1, 0.25f};
    float want[4];
    for (int i = 0; i < 4; i++)
        want[i] = (float)(g[i] / (1 + exp(-(double)g[i])) * u[i]);
    tensor_silu_mul(g, u, 4);
    assert_true(max_abs_diff(g, want, 4) < 1e-6);
}

static void test_dtypes(void **state)
{
    (void)state;
    assert_true(tensor_f16_to_f32_1(0x3c00) == 1.0f);
    assert_true(tensor_f16_to_f32_1(0xc000) == -2.0f);
    assert_true(tensor_f16_to_f32_1(0x7bff) == 65504.0f);
    assert_true(tensor_f16_to_f32_1(0x0001) == ldexpf(1, -24)); /* smallest subnormal */
    assert_true(tensor_f16_to_f32_1(0x03ff) == ldexpf(1023, -24));
    assert_true(isinf(tensor_f16_to_f32_1(0x7c00)));
    assert_true(isnan(tensor_f16_to_f32_1(0x7e00)));
    assert_true(signbit(tensor_f16_to_f32_1(0x8000)));
    assert_true(tensor_bf16_to_f32_1(0x3f80) == 1.0f);
    assert_true(tensor_bf16_to_f32_1(0xc040) == -3.0f);
    assert_true(tensor_f32_to_bf16_1(1.0f) == 0x3f80);
    float f;
    uint32_t u = 0x3f808000; /* halfway: rounds to even (down) */
    memcpy(&f, &u, 4);
    assert_true(tensor_f32_to_bf16_1(f) == 0x3f80);
    u = 0x3f818000; /* halfway: rounds to even (up) */
    memcpy(&f, &u, 4);
    assert_true(tensor_f32_to_bf16_1(f) == 0x3f82);
    assert_true(isnan(tensor_bf16_to_f32_1(tensor_f32_to_bf16_1(NAN))));
    /* bulk conversions from an unaligned source */
    unsigned char raw[1 + 2 * 3];
    uint16_t h[3] = {0x3c00, 0xc000, 0x0000};
    memcpy(raw + 1, h, sizeof(h));
    float out[3];
    tensor_f16_to_f32(out, (const uint16_t *)(raw + 1), 3);
    assert_true(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.0f);
    uint16_t b[2] = {0x3f80, 0x4000};
    memcpy(raw + 1, b, sizeof(b));
    tensor_bf16_to_f32(out, (const uint16_t *)(raw + 1), 2);
    assert_true(out[0] == 1.0f && out[1] == 2.0f);
}

typedef struct pool_job {
    int hits[8];
    int n_seen;
} pool_job;

static void pool_fn(void *arg, int tid, int n)
{
    pool_job *j = arg;
    j->hits[tid]++;
    if (tid == 0)
        j->n_seen = n;
}

static void nested_fn(void *arg, int tid, int n)
{
    (void)tid;
    (void)n;
    pool_job inner = {{0}, 0};
    tensor_parallel(pool_fn, &inner); /* from inside a job: runs inline */
    if (inner.n_seen != 1 || inner.hits[0] != 1)
        ((pool_job *)arg)->n_seen = -1;
}

/* Every thread runs a job exactly once; nested calls and thread-count changes work; a forked
 * child can still run jobs. */
static void test_pool(void **state)
{
    (void)state;
    for (int n = 1; n <= 3; n++) {
        tensor_set_threads(n);
        for (int rep = 0; rep < 200; rep++) {
            pool_job j = {{0}, 0};
            tensor_parallel(pool_fn, &j);
            assert_int_equal(j.n_seen, n);
            for (int t = 0; t < n; t++)
                assert_int_equal(j.hits[t], 1);
        }
        pool_job outer = {{0}, 0};
        tensor_parallel(nested_fn, &outer);
        assert_true(outer.n_seen != -1);
    }
    tensor_set_threads(2);
#ifndef __SANITIZE_THREAD__ /* TSan does not support threads after a fork */
    pid_t pid = fork();
    if (pid == 0) {
        pool_job j = {{0}, 0};
        tensor_parallel(pool_fn, &j);
        _exit(j.hits[0] == 1 && j.n_seen >= 1 ? 0 : 1);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
#endif
}

int main(void)
{
    tensor_set_threads(2);
    assert_int_equal(tensor_get_threads(), 2);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),   cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),     cmocka_unit_test(test_softmax),
        cmocka_unit_test(test_silu_mul), cmocka_unit_test(test_dtypes),
        cmocka_unit_test(test_pool),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
