/* Shared by the train unit tests: a small learnable token stream. */
#ifndef LOOM_TRAIN_TESTLIB_H
#define LOOM_TRAIN_TESTLIB_H

#include "loom/base.h"
#include "loom/train.h"

#include <stdlib.h>
#include <string.h>

/* n tokens of vocab V (the first 90% for training): mostly the previous token + step mod V,
 * sometimes a random one, from a seeded generator. */
static inline void train_test_stream(train_data *d, int64_t n, int V, int step, uint64_t seed)
{
    memset(d, 0, sizeof(*d));
    d->n_tokens = n;
    d->n_train = n * 9 / 10;
    d->tokens = malloc(sizeof(int32_t) * (size_t)n);
    loom_rng r;
    rng_seed(&r, seed);
    int32_t x = 0;
    for (int64_t i = 0; i < n; i++) {
        x = rng_uniform(&r) < 0.8 ? (x + step) % V : (int32_t)(rng_next(&r) % (uint64_t)V);
        d->tokens[i] = x;
    }
}

#endif
