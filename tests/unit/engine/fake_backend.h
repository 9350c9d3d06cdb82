/*
 * A fake engine backend for the engine tests. Its "model" is a pure function of the token
 * history, computed through its own paged KV store exactly as a real model reads its cache:
 * each slot holds (token, position, chain hash of the history up to it); a new token at position
 * p reads slot p-1 through the block table, and its logits are a hash of the chain. So a wrong
 * block table, a block shared by mistake or KV overwritten by another sequence changes the
 * outputs (and reading a slot that does not hold position p-1 is counted in kv_errors).
 * It also records what the scheduler asked of it (batch sizes, chunks) for the invariants.
 */
#ifndef FAKE_BACKEND_H
#define FAKE_BACKEND_H

#include "loom/engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct fake_slot {
    int32_t token;
    int32_t pos;
    uint64_t chain;
} fake_slot;

typedef struct fake_backend {
    int n_blocks, block_size, vocab;
    fake_slot *slots; /* (n_blocks, block_size) */
    /* behaviour */
    int32_t favored; /* token whose logit gets +bias, -1 none */
    float favored_bias;
    const int32_t *script; /* when set: the token after position p is script[p + 1 - script_base] */
    int script_len, script_base;
    int fail_at; /* forward call number that fails, -1 never */
    /* observations */
    int n_forward;
    int max_batch_tokens, max_batch_seqs;
    int n_partial_chunks; /* sequences fed tokens without a logit row (chunked prefill) */
    int kv_errors;
    long tokens_fed;
} fake_backend;

#define FAKE_ROOT 0x1234567ULL

static inline uint64_t fake_mix(uint64_t h, uint64_t x)
{
    h ^= x + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

/* Logits of the token after the history whose chain hash is chain. */
static inline void fake_logits(const fake_backend *f, uint64_t chain, int pos, float *out)
{
    if (f->script) {
        int k = pos + 1 - f->script_base;
        int32_t want = k >= 0 && k < f->script_len ? f->script[k] : 0;
        for (int v = 0; v < f->vocab; v++)
            out[v] = v == want ? 10.0f : 0.0f;
        return;
    }
    for (int v = 0; v < f->vocab; v++) {
        uint64_t h = fake_mix(chain, (uint64_t)v + 1);
        out[v] = (float)((double)(h >> 40) / (double)(1 << 24) * 8.0 - 4.0);
    }
    if (f->favored >= 0)
        out[f->favored] += f->favored_bias;
}

static inline uint64_t fake_chain_next(uint64_t parent, int32_t token, int pos)
{
    return fake_mix(fake_mix(parent, (uint64_t)(uint32_t)token), (uint64_t)pos);
}

static int fake_forward(void *ctx, const model_batch *b, float *logits, loom_err *e)
{
    fake_backend *f = ctx;
    int call = f->n_forward++;
    if (call == f->fail_at)
        return loom_errf(e, LOOM_EIO, "fake backend failure on call %d", call);
    if (b->n_tokens > f->max_batch_tokens)
        f->max_batch_tokens = b->n_tokens;
    if (b->n_seqs > f->max_batch_seqs)
        f->max_batch_seqs = b->n_seqs;
    f->tokens_fed += b->n_tokens;
    int row = 0;
    for (int s = 0; s < b->n_seqs; s++) {
        const int32_t *table = b->block_tables[s];
        int n_new = b->seq_start[s + 1] - b->seq_start[s];
        bool has_row = row < b->n_logits && b->logit_rows[row] == b->seq_start[s + 1] - 1;
        if (!has_row)
            f->n_partial_chunks++;
        uint64_t chain = FAKE_ROOT;
        for (int i = 0; i < n_new; i++) {
            int pos = b->ctx_len[s] + i;
            int32_t tok = b->tokens[b->seq_start[s] + i];
            if (pos > 0) {
                int32_t pblk = table[(pos - 1) / f->block_size];
                if (pblk < 0 || pblk >= f->n_blocks) {
                    f->kv_errors++;
                    continue;
                }
                const fake_slot *prev =
                    &f->slots[(size_t)pblk * f->block_size + (pos - 1) % f->block_size];
                if (prev->pos != pos - 1)
                    f->kv_errors++;
                chain = prev->chain;
            }
            int32_t blk = table[pos / f->block_size];
            if (blk < 0 || blk >= f->n_blocks) {
                f->kv_errors++;
                continue;
            }
            fake_slot *slot = &f->slots[(size_t)blk * f->block_size + pos % f->block_size];
            chain = fake_chain_next(chain, tok, pos);
            slot->token = tok;
            slot->pos = pos;
            slot->chain = chain;
            if (i == n_new - 1 && has_row)
                fake_logits(f, chain, pos, logits + (size_t)row * f->vocab);
        }
        if (has_row)
            row++;
    }
    if (row != b->n_logits)
        f->kv_errors++;
    return LOOM_OK;
}

static void fake_destroy(void *ctx)
{
    fake_backend *f = ctx;
    free(f->slots);
    free(f);
}

/* The backend owns a fake_backend; *out_fake lets the test read its observations (valid until
 * the engine is freed). */
static inline engine_backend fake_backend_create(int n_blocks, int block_size, int vocab,
                                                 fake_backend **out_fake)
{
    fake_backend *f = calloc(1, sizeof(*f));
    f->n_blocks = n_blocks;
    f->block_size = block_size;
    f->vocab = vocab;
    f->slots = calloc((size_t)n_blocks * block_size, sizeof(*f->slots));
    for (size_t i = 0; i < (size_t)n_blocks * block_size; i++)
        f->slots[i].pos = -1;
    f->favored = -1;
    f->fail_at = -1;
    *out_fake = f;
    engine_backend be = {
        .name = "fake", .ctx = f, .forward = fake_forward, .destroy = fake_destroy};
    return be;
}

static inline model_config fake_model_config(int vocab, int max_len, int32_t eos)
{
    model_config mc;
    memset(&mc, 0, sizeof(mc));
    mc.vocab_size = vocab;
    mc.max_position_embeddings = max_len;
    mc.bos_token_id = -1;
    mc.n_eos = eos >= 0 ? 1 : 0;
    mc.eos_token_ids[0] = eos;
    return mc;
}

/* Greedy continuation of prompt under the fake model, computed directly (the oracle). Stops at
 * max_tokens or, unless ignore_eos, at eos (included). Returns the number of tokens. */
static inline int fake_reference_greedy(const fake_backend *f, const int32_t *prompt, int n_prompt,
                                        int max_tokens, int32_t eos, bool ignore_eos, int32_t *out)
{
    uint64_t chain = FAKE_ROOT;
    float *logits = malloc((size_t)f->vocab * sizeof(float));
    int pos = 0, n = 0;
    for (; pos < n_prompt; pos++)
        chain = fake_chain_next(chain, prompt[pos], pos);
    for (;;) {
        fake_logits(f, chain, pos - 1, logits);
        int32_t best = 0;
        for (int v = 1; v < f->vocab; v++)
            if (logits[v] > logits[best])
                best = v;
        out[n++] = best;
        if (n >= max_tokens || (!ignore_eos && best == eos))
            break;
        chain = fake_chain_next(chain, best, pos);
        pos++;
    }
    free(logits);
    return n;
}

#endif
