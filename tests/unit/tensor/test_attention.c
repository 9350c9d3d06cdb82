/* Paged attention against the naive reference: random shuffled block tables, GQA group sizes,
 * several block sizes and context lengths, varlen batches and the sliding window. */
#include "testlib.h"

#include "loom/base.h"
#include "loom/tensor.h"

#include <math.h>

static void fill(loom_rng *r, float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = rng_normal(r);
}

static void shuffle(loom_rng *r, int32_t *a, int n)
{
    for (int i = 0; i < n; i++)
        a[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rng_next(r) % (uint64_t)(i + 1));
        int32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
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

static void test_single_sequence(void **state)
{
    (void)state;
    loom_rng r;
    rng_seed(&r, 11);
    int bss[] = {1, 4, 16}, starts[] = {0, 5, 37, 130}, nqs[] = {1, 7, 20};
    int heads[][2] = {{8, 8}, {8, 2}, {8, 1}, {6, 3}};
    int hds[] = {16, 64};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 3; c++)
                for (int g = 0; g < 4; g++)
                    for (int h = 0; h < 2; h++) {
                        int bs = bss[a], start = starts[b], nq = nqs[c], H = heads[g][0],
                            Hkv = heads[g][1], hd = hds[h];
                        int n_ctx = start + nq, n_blocks = (n_ctx + bs - 1) / bs + 3;
                        size_t kvd = (size_t)Hkv * hd;
                        float *kc = malloc((size_t)n_blocks * bs * kvd * 4);
                        float *vc = malloc((size_t)n_blocks * bs * kvd * 4);
                        float *q = malloc((size_t)nq * H * hd * 4);
                        float *o = malloc((size_t)nq * H * hd * 4);
                        float *orf = malloc((size_t)nq * H * hd * 4);
                        int32_t *table = malloc((size_t)n_blocks * 4);
                        fill(&r, kc, (size_t)n_blocks * bs * kvd);
                        fill(&r, vc, (size_t)n_blocks * bs * kvd);
                        fill(&r, q, (size_t)nq * H * hd);
                        shuffle(&r, table, n_blocks);
                        float scale = 1.0f / sqrtf((float)hd);
                        tensor_attention_paged(o, q, kc, vc, table, bs, start, nq, H, Hkv, hd,
                                               scale);
                        tensor_attention_paged_ref(orf, q, kc, vc, table, bs, start, nq, H, Hkv, hd,
                                                   scale);
                        double d = max_abs_diff(o, orf, (size_t)nq * H * hd);
                        if (d > 1e-5)
                            fail_msg("bs %d start %d nq %d H %d Hkv %d hd %d: diff %g", bs, start,
                                     nq, H, Hkv, hd, d);
                        free(kc);
                        free(vc);
                        free(q);
                        free(o);
                        free(orf);
                        free(table);
                    }
}

/* A varlen batch equals each sequence run alone; the pools are shared, tables disjoint. */
static void test_varlen(void **state)
{
    (void)state;
    loom_rng r;
    rng_seed(&r, 12);
    int bs = 8, H = 4, Hkv = 2, hd = 32, n_blocks = 64;
    int ctx[4] = {0, 9, 40, 3}, nq[4] = {20, 1, 70, 1}; /* 20, 70: GEMM path */
    int32_t seq_start[5] = {0};
    for (int s = 0; s < 4; s++)
        seq_start[s + 1] = seq_start[s] + nq[s];
    int T = seq_start[4];
    size_t kvd = (size_t)Hkv * hd, row = (size_t)H * hd;
    float *kc = malloc((size_t)n_blocks * bs * kvd * 4),
          *vc = malloc((size_t)n_blocks * bs * kvd * 4);
    float *q = malloc(T * row * 4), *o = malloc(T * row * 4), *orf = malloc(T * row * 4);
    fill(&r, kc, (size_t)n_blocks * bs * kvd);
    fill(&r, vc, (size_t)n_blocks * bs * kvd);
    fill(&r, q, T * row);
    int32_t pool[64];
    shuffle(&r, pool, n_blocks);
    const int32_t *tables[4] = {pool, pool + 16, pool + 32, pool + 48};
    tensor_attention_paged_varlen(o, q, kc, vc, 4, seq_start, ctx, tables, bs, H, Hkv, hd, 0.2f, 0);
    for (int s = 0; s < 4; s++)
        tensor_attention_paged_ref(orf + seq_start[s] * row, q + seq_start[s] * row, kc, vc,
                                   tables[s], bs, ctx[s], nq[s], H, Hkv, hd, 0.2f);
    assert_true(max_abs_diff(o, orf, T * row) < 1e-5);

    /* sliding window W: query at position p sees keys p-W+1 .. p. Check against a naive loop. */
    int W = 6;
    tensor_attention_paged_varlen(o, q, kc, vc, 4, seq_start, ctx, tables, bs, H, Hkv, hd, 0.2f, W);
    for (int s = 0; s < 4; s++) {
        for (int i = 0; i < nq[s]; i++) {
            int p = ctx[s] + i, lo = p - W + 1 > 0 ? p - W + 1 : 0;
            for (int h = 0; h < H; h++) {
                const float *qv = q + (seq_start[s] + i) * row + (size_t)h * hd;
                int kvh = h / (H / Hkv);
                double sc[64], m = -INFINITY, z = 0;
                for (int j = lo; j <= p; j++) {
                    const float *kp =
                        kc + ((size_t)tables[s][j / bs] * bs + j % bs) * kvd + (size_t)kvh * hd;
                    double dot = 0;
                    for (int d = 0; d < hd; d++)
                        dot += (double)qv[d] * kp[d];
                    sc[j - lo] = dot * 0.2;
                    m = sc[j - lo] > m ? sc[j - lo] : m;
                }
                for (int j = lo; j <= p; j++)
                    z += exp(sc[j - lo] - m);
                for (int d = 0; d < hd; d++) {
                    double acc = 0;
                    for (int j = lo; j <= p; j++)
                        acc += exp(sc[j - lo] - m) / z *
                               vc[((size_t)tables[s][j / bs] * bs + j % bs) * kvd +
                                  (size_t)kvh * hd + d];
                    assert_true(fabs(acc - o[(seq_start[s] + i) * row + (size_t)h * hd + d]) <
                                1e-5);
                }
            }
        }
    }
    free(kc);
    free(vc);
    free(q);
    free(o);
    free(orf);
}

/* Long context: more keys than one online-softmax chunk, with a spike far from the query. */
static void test_long_context(void **state)
{
    (void)state;
    loom_rng r;
    rng_seed(&r, 13);
    int bs = 16, H = 2, Hkv = 1, hd = 8, start = 300, nq = 3;
    int n_blocks = (start + nq + bs - 1) / bs;
    size_t kvd = (size_t)Hkv * hd;
    float *kc = malloc((size_t)n_blocks * bs * kvd * 4),
          *vc = malloc((size_t)n_blocks * bs * kvd * 4);
    float q[3 * 2 * 8], o[3 * 2 * 8], orf[3 * 2 * 8];
    fill(&r, kc, (size_t)n_blocks * bs * kvd);
    fill(&r, vc, (size_t)n_blocks * bs * kvd);
    fill(&r, q, sizeof(q) / 4);
    for (int d = 0; d < hd; d++)
        kc[5 * kvd + d] = 8.0f * q[d]; /* slot 5 of physical block 0 dominates head 0 */
    int32_t table[32];
    shuffle(&r, table, n_blocks);
    tensor_attention_paged(o, q, kc, vc, table, bs, start, nq, H, Hkv, hd, 1.0f);
    tensor_attention_paged_ref(orf, q, kc, vc, table, bs, start, nq, H, Hkv, hd, 1.0f);
    assert_true(max_abs_diff(o, orf, sizeof(o) / 4) < 1e-5);
    free(kc);
    free(vc);
}

int main(void)
{
    tensor_set_threads(2);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_sequence),
        cmocka_unit_test(test_varlen),
        cmocka_unit_test(test_long_context),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
