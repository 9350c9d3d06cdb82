/*
 * Training data: text files tokenised with the engine's tokenizer, concatenated (EOS between
 * files), the tail held out for validation. A global batch is B windows of T+1 tokens at offsets
 * drawn from (seed, step, row) alone, so every rank count sees the same global batch and a
 * resumed run the same batches as an uninterrupted one.
 */
#include "loom/tokenizer.h"
#include "train_internal.h"

#include <stdlib.h>
#include <string.h>

int train_data_load(train_data *d, const char *const *files, int n_files, const tokenizer *tok,
                    double val_fraction, loom_err *e)
{
    memset(d, 0, sizeof(*d));
    int32_t eos = tokenizer_eos_id(tok);
    if (eos < 0)
        eos = 0;
    size_t cap = 0;
    for (int f = 0; f < n_files; f++) {
        char *text = NULL;
        size_t len = 0;
        int rc = loom_read_file(files[f], &text, &len, e);
        if (rc) {
            train_data_free(d);
            return rc;
        }
        int32_t *ids = NULL;
        int n = 0;
        rc = tokenizer_encode(tok, text, len, false, &ids, &n, e);
        free(text);
        if (rc) {
            train_data_free(d);
            return rc;
        }
        if ((size_t)d->n_tokens + n + 1 > cap) {
            cap = ((size_t)d->n_tokens + n + 1) * 2;
            d->tokens = xrealloc(d->tokens, cap * sizeof(int32_t));
        }
        memcpy(d->tokens + d->n_tokens, ids, (size_t)n * sizeof(int32_t));
        d->n_tokens += n;
        if (f + 1 < n_files)
            d->tokens[d->n_tokens++] = eos;
        free(ids);
    }
    if (val_fraction < 0 || val_fraction >= 1)
        val_fraction = 0.1;
    d->n_train = d->n_tokens - (int64_t)(d->n_tokens * val_fraction);
    return LOOM_OK;
}

void train_data_free(train_data *d)
{
    free(d->tokens);
    memset(d, 0, sizeof(*d));
}

static uint64_t mix(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t v[3] = {a, b, c};
    return loom_hash64(v, sizeof(v), 0x9e3779b97f4a7c15ull);
}

int train_data_batch(const train_data *d, uint64_t seed, int64_t step, int B, int T, int row0,
                     int n_rows, bool val, int32_t *tokens, int32_t *targets, loom_err *e)
{
    int64_t lo = val ? d->n_train : 0, hi = val ? d->n_tokens : d->n_train;
    int64_t span = hi - lo - T; /* windows of T+1 tokens start in [lo, lo + span) */
    if (span < 1)
        return loom_errf(e, LOOM_EINVAL,
                         "train: the %s split has %lld tokens, fewer than one sequence of %d + 1 "
                         "(HINT: more --data, a shorter --seq-len or a smaller --val-fraction)",
                         val ? "validation" : "training", (long long)(hi - lo), T);
    for (int r = 0; r < n_rows; r++) {
        int row = row0 + r;
        if (row >= B)
            return loom_errf(e, LOOM_EINVAL, "train: batch row %d out of %d", row, B);
        int64_t start = lo + (int64_t)(mix(seed, (uint64_t)step * 2 + val, (uint64_t)row) %
                                       (uint64_t)span);
        memcpy(tokens + (size_t)r * T, d->tokens + start, (size_t)T * sizeof(int32_t));
        memcpy(targets + (size_t)r * T, d->tokens + start + 1, (size_t)T * sizeof(int32_t));
    }
    return LOOM_OK;
}
