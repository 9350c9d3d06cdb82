/* kv block manager: allocation, refcounts, prefix-cache hits, LRU eviction, and a random-ops
 * property test against a simple model of who holds which block. */
#include "loom/kv.h"
#include "testlib.h"

static void check_ok(const kv_manager *kv)
{
    loom_err e = {0};
    int rc = kv_check(kv, &e);
    if (rc)
        fail_msg("kv_check: %s", e.msg);
}

static void seq_new(kv_seq *s, int max_tokens, int bs)
{
    loom_err e = {0};
    assert_int_equal(kv_seq_init(s, max_tokens, bs, &e), 0);
}

static void test_alloc_release(void **state)
{
    kv_manager *kv;
    loom_err e = {0};
    assert_int_equal(kv_create(8, 4, true, &kv, &e), 0);
    assert_int_equal(kv_num_free(kv), 8);
    assert_int_equal(kv_blocks_for(kv, 0), 0);
    assert_int_equal(kv_blocks_for(kv, 4), 1);
    assert_int_equal(kv_blocks_for(kv, 5), 2);
    kv_seq a, b;
    seq_new(&a, 32, 4);
    seq_new(&b, 32, 4);
    assert_int_equal(kv_seq_allocate(kv, &a, NULL, 0, 0, 10), 0);
    assert_int_equal(a.n_blocks, 3);
    for (int i = 0; i < 3; i++) /* a fresh cache hands out blocks in order */
        assert_int_equal(a.blocks[i], i);
    assert_int_equal(kv_num_free(kv), 5);
    /* growing within the last block takes nothing */
    assert_int_equal(kv_seq_allocate(kv, &a, NULL, 0, 0, 12), 0);
    assert_int_equal(a.n_blocks, 3);
    assert_int_equal(kv_seq_allocate(kv, &a, NULL, 0, 0, 24), 0);
    assert_int_equal(a.n_blocks, 6);
    /* all or nothing */
    assert_int_equal(kv_seq_allocate(kv, &b, NULL, 0, 0, 9), LOOM_EFULL);
    assert_int_equal(b.n_blocks, 0);
    assert_int_equal(kv_num_free(kv), 2);
    assert_int_equal(kv_seq_allocate(kv, &b, NULL, 0, 0, 8), 0);
    assert_int_equal(kv_num_free(kv), 0);
    for (int i = 0; i < 8; i++)
        assert_int_equal(kv_block_refcount(kv, i), 1);
    check_ok(kv);
    /* a table never exceeds its sequence's maximum */
    assert_int_equal(kv_seq_allocate(kv, &b, NULL, 0, 0, 33), LOOM_ETOOLONG);
    kv_seq_release(kv, &a);
    kv_seq_release(kv, &b);
    assert_int_equal(kv_num_free(kv), 8);
    assert_int_equal(kv_num_evictable(kv), 0); /* nothing was cached */
    check_ok(kv);
    kv_seq_destroy(&a);
    kv_seq_destroy(&b);
    kv_free(kv);
}

static void test_prefix_hits(void **state)
{
    kv_manager *kv;
    loom_err e = {0};
    assert_int_equal(kv_create(16, 4, true, &kv, &e), 0);
    int32_t toks[16];
    for (int i = 0; i < 16; i++)
        toks[i] = 100 + i;
    int32_t hits[8];
    uint64_t last;
    assert_int_equal(kv_find_cached(kv, toks, 15, hits, &last), 0);
    assert_true(last == kv_root_hash());

    kv_seq a, b, c;
    seq_new(&a, 16, 4);
    seq_new(&b, 16, 4);
    seq_new(&c, 16, 4);
    assert_int_equal(kv_seq_allocate(kv, &a, NULL, 0, 0, 14), 0);
    /* computed 10 tokens: blocks 0 and 1 are full */
    kv_seq_cache(kv, &a, toks, 10);
    assert_int_equal(a.n_hashed, 2);
    assert_true(kv_block_is_cached(kv, a.blocks[0]));
    assert_true(kv_block_is_cached(kv, a.blocks[1]));
    assert_false(kv_block_is_cached(kv, a.blocks[2]));
    uint64_t h0 = kv_hash_block(kv_root_hash(), toks, 4);
    uint64_t h1 = kv_hash_block(h0, toks + 4, 4);
    assert_true(a.last_hash == h1);

    /* the same prefix finds 2 blocks; lookups never change state */
    assert_int_equal(kv_find_cached(kv, toks, 15, hits, &last), 2);
    assert_int_equal(hits[0], a.blocks[0]);
    assert_int_equal(hits[1], a.blocks[1]);
    assert_true(last == h1);
    assert_int_equal(kv_find_cached(kv, toks, 7, hits, &last), 1);
    /* a different first block breaks the chain even if the second block matches */
    int32_t other[16];
    memcpy(other, toks, sizeof(toks));
    other[0] = 7;
    assert_int_equal(kv_find_cached(kv, other, 15, hits, &last), 0);

    int n = kv_find_cached(kv, toks, 15, hits, &last);
    assert_int_equal(kv_seq_allocate(kv, &b, hits, n, last, 15), 0);
    assert_int_equal(b.n_blocks, 4);
    assert_int_equal(b.blocks[0], a.blocks[0]);
    assert_int_equal(kv_block_refcount(kv, a.blocks[0]), 2);
    assert_int_equal(kv_block_refcount(kv, a.blocks[1]), 2);
    assert_int_equal(b.n_hashed, 2);
    check_ok(kv);
    /* b computes the rest: block 2 of b gets cached (its content is b's own) */
    kv_seq_cache(kv, &b, toks, 15);
    assert_int_equal(b.n_hashed, 3);
    assert_true(kv_block_is_cached(kv, b.blocks[2]));
    /* a then computes its block 2 with the same tokens: the hash is taken, a's block stays
     * uncached, but a's chain goes on */
    kv_seq_cache(kv, &a, toks, 12);
    assert_false(kv_block_is_cached(kv, a.blocks[2]));
    assert_int_equal(a.n_hashed, 3);
    check_ok(kv);

    int free_before = kv_num_free(kv);
    kv_seq_release(kv, &a); /* shared blocks stay live with b; a's block 2 and 3 become free */
    assert_int_equal(kv_num_free(kv), free_before + 2);
    assert_int_equal(kv_block_refcount(kv, b.blocks[0]), 1);
    kv_seq_release(kv, &b);
    assert_int_equal(kv_num_free(kv), 16);
    assert_int_equal(kv_num_evictable(kv), 3); /* b's three cached blocks */
    check_ok(kv);

    /* a later request revives the evictable blocks */
    n = kv_find_cached(kv, toks, 16, hits, &last);
    assert_int_equal(n, 3);
    assert_int_equal(kv_seq_allocate(kv, &c, hits, n, last, 16), 0);
    assert_int_equal(kv_num_evictable(kv), 0);
    assert_int_equal(kv_num_free(kv), 12);
    assert_int_equal(kv_block_refcount(kv, hits[0]), 1);
    check_ok(kv);
    kv_seq_release(kv, &c);
    kv_seq_destroy(&a);
    kv_seq_destroy(&b);
    kv_seq_destroy(&c);
    kv_free(kv);
}

static void test_lru_eviction(void **state)
{
    kv_manager *kv;
    loom_err e = {0};
    int bs = 2;
    assert_int_equal(kv_create(6, bs, true, &kv, &e), 0);
    /* three sequences of two full blocks each, each with its own tokens */
    int32_t toks[3][4] = {{1, 2, 3, 4}, {5, 6, 7, 8}, {9, 10, 11, 12}};
    kv_seq s[3];
    for (int i = 0; i < 3; i++) {
        seq_new(&s[i], 4, bs);
        assert_int_equal(kv_seq_allocate(kv, &s[i], NULL, 0, 0, 4), 0);
        kv_seq_cache(kv, &s[i], toks[i], 4);
    }
    assert_int_equal(kv_num_free(kv), 0);
    int32_t blocks[3][2];
    for (int i = 0; i < 3; i++)
        memcpy(blocks[i], s[i].blocks, sizeof(blocks[i]));
    /* free in the order 1, 0, 2: the LRU order is 1's tail, 1's head, 0's tail, 0's head, ... */
    kv_seq_release(kv, &s[1]);
    kv_seq_release(kv, &s[0]);
    kv_seq_release(kv, &s[2]);
    assert_int_equal(kv_num_evictable(kv), 6);
    check_ok(kv);
    int32_t hits[2];
    uint64_t last;

    kv_seq t;
    seq_new(&t, 12, bs);
    /* one fresh block: evicts sequence 1's tail block */
    assert_int_equal(kv_seq_allocate(kv, &t, NULL, 0, 0, 1), 0);
    assert_int_equal(t.blocks[0], blocks[1][1]);
    assert_false(kv_block_is_cached(kv, blocks[1][1]));
    assert_int_equal(kv_find_cached(kv, toks[1], 4, hits, &last), 1); /* head still cached */
    /* next: sequence 1's head, then sequence 0's tail */
    assert_int_equal(kv_seq_allocate(kv, &t, NULL, 0, 0, 5), 0);
    assert_int_equal(t.blocks[1], blocks[1][0]);
    assert_int_equal(t.blocks[2], blocks[0][1]);
    assert_int_equal(kv_find_cached(kv, toks[1], 4, hits, &last), 0);
    assert_int_equal(kv_find_cached(kv, toks[0], 4, hits, &last), 1);
    assert_int_equal(kv_find_cached(kv, toks[2], 4, hits, &last), 2);
    check_ok(kv);
    kv_seq_release(kv, &t);
    /* t's blocks were never cached: they go back to the free stack and are used before any
     * evictable block */
    assert_int_equal(kv_num_evictable(kv), 3);
    assert_int_equal(kv_seq_allocate(kv, &t, NULL, 0, 0, 6), 0);
    assert_int_equal(kv_num_evictable(kv), 3);
    assert_int_equal(kv_find_cached(kv, toks[2], 4, hits, &last), 2);
    kv_seq_release(kv, &t);
    check_ok(kv);
    for (int i = 0; i < 3; i++)
        kv_seq_destroy(&s[i]);
    kv_seq_destroy(&t);
    kv_free(kv);
}

static void test_caching_off(void **state)
{
    kv_manager *kv;
    loom_err e = {0};
    assert_int_equal(kv_create(4, 2, false, &kv, &e), 0);
    int32_t toks[4] = {1, 2, 3, 4}, hits[2];
    kv_seq s;
    seq_new(&s, 4, 2);
    assert_int_equal(kv_seq_allocate(kv, &s, NULL, 0, 0, 4), 0);
    kv_seq_cache(kv, &s, toks, 4);
    assert_false(kv_block_is_cached(kv, s.blocks[0]));
    kv_seq_release(kv, &s);
    assert_int_equal(kv_num_evictable(kv), 0);
    assert_int_equal(kv_find_cached(kv, toks, 4, hits, NULL), 0);
    check_ok(kv);
    kv_seq_destroy(&s);
    kv_free(kv);
    assert_int_equal(kv_create(0, 2, true, &kv, &e), LOOM_EINVAL);
}

/*
 * Random operations on a few sequences whose tokens come from a few shared prefixes. After each
 * operation: kv_check, refcount == number of tables holding the block, a block in two tables is
 * a cached block at the same index, live + free == total.
 */
static void test_random_ops(void **state)
{
    enum { NB = 24, BS = 3, NSEQ = 6, MAXT = 30, NFAM = 3 };
    kv_manager *kv;
    loom_err e = {0};
    assert_int_equal(kv_create(NB, BS, true, &kv, &e), 0);
    loom_rng rng;
    rng_seed(&rng, 7);
    int32_t fam[NFAM][MAXT];
    for (int f = 0; f < NFAM; f++)
        for (int i = 0; i < MAXT; i++)
            fam[f][i] = (int32_t)(rng_next(&rng) % 5); /* small alphabet: equal blocks happen */
    kv_seq seq[NSEQ];
    int32_t tokens[NSEQ][MAXT];
    int n_tok[NSEQ] = {0}, computed[NSEQ] = {0};
    for (int i = 0; i < NSEQ; i++)
        seq_new(&seq[i], MAXT, BS);
    int32_t hits[MAXT];
    int n_hit_total = 0, n_full = 0;
    for (int step = 0; step < 4000; step++) {
        int i = (int)(rng_next(&rng) % NSEQ);
        int op = (int)(rng_next(&rng) % 4);
        if (seq[i].n_blocks == 0 && op != 3) {
            /* admit: tokens from a family, maybe diverging after a random point */
            int f = (int)(rng_next(&rng) % NFAM);
            int len = 1 + (int)(rng_next(&rng) % MAXT);
            int split = (int)(rng_next(&rng) % (MAXT + 1));
            for (int k = 0; k < len; k++)
                tokens[i][k] = k < split ? fam[f][k] : (int32_t)(rng_next(&rng) % 5);
            uint64_t last;
            int n = kv_find_cached(kv, tokens[i], len - 1, hits, &last);
            int want = n * BS + 1 + (int)(rng_next(&rng) % (len - n * BS));
            int rc = kv_seq_allocate(kv, &seq[i], hits, n, last, want);
            if (rc == LOOM_OK) {
                n_tok[i] = len;
                computed[i] = n * BS;
                n_hit_total += n;
                for (int k = 0; k < n; k++)
                    assert_int_equal(seq[i].blocks[k], hits[k]);
            } else {
                assert_int_equal(rc, LOOM_EFULL);
                assert_int_equal(seq[i].n_blocks, 0);
            }
        } else if (op == 0 || op == 1) {
            /* compute what is allocated, maybe grow */
            int cap = seq[i].n_blocks * BS;
            if (cap > n_tok[i])
                cap = n_tok[i];
            computed[i] = cap;
            kv_seq_cache(kv, &seq[i], tokens[i], computed[i]);
            if (computed[i] < n_tok[i]) {
                int want = computed[i] + 1 + (int)(rng_next(&rng) % (n_tok[i] - computed[i]));
                int before = seq[i].n_blocks;
                int rc = kv_seq_allocate(kv, &seq[i], NULL, 0, 0, want);
                if (rc != LOOM_OK)
                    assert_int_equal(seq[i].n_blocks, before);
            }
        } else if (op == 2 && seq[i].n_blocks > 0 && n_tok[i] < MAXT) {
            /* decode-like: append a token */
            tokens[i][n_tok[i]++] = (int32_t)(rng_next(&rng) % 5);
        } else {
            kv_seq_release(kv, &seq[i]);
            computed[i] = n_tok[i] = 0;
        }

        check_ok(kv);
        int refs[NB] = {0}, where[NB];
        int live = 0;
        for (int s = 0; s < NSEQ; s++) {
            for (int k = 0; k < seq[s].n_blocks; k++) {
                int32_t b = seq[s].blocks[k];
                if (refs[b]++ == 0) {
                    where[b] = k;
                    live++;
                } else {
                    assert_true(kv_block_is_cached(kv, b));
                    assert_int_equal(where[b], k);
                }
            }
        }
        for (int b = 0; b < NB; b++) {
            assert_int_equal(refs[b], kv_block_refcount(kv, b));
            n_full += kv_block_is_cached(kv, b);
        }
        assert_int_equal(live + kv_num_free(kv), NB);
    }
    assert_true(n_hit_total > 50); /* the workload did exercise sharing */
    assert_true(n_full > 0);
    for (int i = 0; i < NSEQ; i++) {
        kv_seq_release(kv, &seq[i]);
        kv_seq_destroy(&seq[i]);
    }
    assert_int_equal(kv_num_free(kv), NB);
    check_ok(kv);
    kv_free(kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alloc_release), cmocka_unit_test(test_prefix_hits),
        cmocka_unit_test(test_lru_eviction),  cmocka_unit_test(test_caching_off),
        cmocka_unit_test(test_random_ops),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
