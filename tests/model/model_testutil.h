/* Helpers shared by tests/model/test_*.c: reading reference tensors and running batches. */
#ifndef LOOM_MODEL_TESTUTIL_H
#define LOOM_MODEL_TESTUTIL_H

#include "testlib.h"

#include "loom/model.h"

#include <math.h>

/* Tensor "fmt..." of a reference file, or NULL. */
static inline const st_tensor *ref_find(const st_file *f, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static inline const st_tensor *ref_find(const st_file *f, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    return st_find(f, name);
}

/* I32 tensor copied out (the mapping is only byte-aligned). */
static inline int32_t *ref_ids(const st_tensor *t, int *n)
{
    *n = (int)(t->nbytes / 4);
    int32_t *ids = malloc(t->nbytes + 4);
    memcpy(ids, t->data, t->nbytes);
    return ids;
}

static inline float *ref_f32(const st_tensor *t)
{
    float *p = malloc(t->nbytes + 4);
    memcpy(p, t->data, t->nbytes);
    return p;
}

/* max |a - b| / max |b| over n values */
static inline double rel_err(const float *a, const float *b, size_t n)
{
    double md = 0, mr = 0;
    for (size_t i = 0; i < n; i++) {
        double dd = fabs((double)a[i] - b[i]);
        if (!(dd <= md)) /* catches nan */
            md = dd;
        if (fabs(b[i]) > mr)
            mr = fabs(b[i]);
    }
    return mr > 0 ? md / mr : md;
}

static inline int argmax(const float *x, int n, float *gap)
{
    int best = 0, second = -1;
    for (int i = 1; i < n; i++) {
        if (x[i] > x[best]) {
            second = best;
            best = i;
        } else if (second < 0 || x[i] > x[second]) {
            second = i;
        }
    }
    if (gap)
        *gap = second >= 0 ? x[best] - x[second] : INFINITY;
    return best;
}

/*
 * A block allocator for tests: sequence s gets blocks table[s][0..max_blocks), taken from a
 * shuffled pool so that a sequence's blocks are not contiguous.
 */
typedef struct test_blocks {
    int n_seqs, max_blocks;
    int32_t *ids;     /* (n_seqs, max_blocks) */
    int32_t **tables; /* (n_seqs) */
} test_blocks;

static inline void test_blocks_init(test_blocks *tb, int n_seqs, int max_blocks, uint64_t seed)
{
    int n = n_seqs * max_blocks;
    tb->n_seqs = n_seqs;
    tb->max_blocks = max_blocks;
    tb->ids = malloc((size_t)n * sizeof(int32_t));
    tb->tables = malloc((size_t)n_seqs * sizeof(int32_t *));
    for (int i = 0; i < n; i++)
        tb->ids[i] = i;
    uint64_t x = seed * 2654435761u + 1;
    for (int i = n - 1; i > 0; i--) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        int j = (int)((x >> 33) % (uint64_t)(i + 1));
        int32_t t = tb->ids[i];
        tb->ids[i] = tb->ids[j];
        tb->ids[j] = t;
    }
    for (int s = 0; s < n_seqs; s++)
        tb->tables[s] = tb->ids + (size_t)s * max_blocks;
}

static inline void test_blocks_free(test_blocks *tb)
{
    free(tb->ids);
    free(tb->tables);
}

/*
 * Runs n_seqs sequences as one batch: sequence s feeds n_new[s] tokens toks[s] after ctx[s]
 * cached ones, with logits for every new token (written sequence after sequence into logits)
 * and router logits into router[l] when given.
 */
static inline int run_batch(model *m, model_kv *kv, int n_seqs, const int32_t *const *toks,
                            const int *n_new, const int *ctx, int32_t *const *tables, float *logits,
                            float *const *router, loom_err *e)
{
    int T = 0;
    for (int s = 0; s < n_seqs; s++)
        T += n_new[s];
    int32_t *tokens = malloc((size_t)T * sizeof(int32_t));
    int32_t *rows = malloc((size_t)T * sizeof(int32_t));
    int32_t *start = malloc((size_t)(n_seqs + 1) * sizeof(int32_t));
    int32_t *ctx_len = malloc((size_t)n_seqs * sizeof(int32_t));
    int t = 0;
    for (int s = 0; s < n_seqs; s++) {
        start[s] = t;
        ctx_len[s] = ctx[s];
        for (int i = 0; i < n_new[s]; i++, t++)
            tokens[t] = toks[s][i];
    }
    start[n_seqs] = T;
    for (int i = 0; i < T; i++)
        rows[i] = i;
    model_batch b = {
        .n_seqs = n_seqs,
        .n_tokens = T,
        .tokens = tokens,
        .seq_start = start,
        .ctx_len = ctx_len,
        .block_tables = (const int32_t *const *)tables,
        .n_logits = T,
        .logit_rows = rows,
        .router_logits = router,
    };
    int rc = model_forward(m, kv, &b, logits, e);
    free(tokens);
    free(rows);
    free(start);
    free(ctx_len);
    return rc;
}

#endif
