/*
 * kv_blocks: paged KV block manager with automatic prefix caching (see include/loom/kv.h).
 *
 * Every block is in exactly one state:
 *   live       refcount > 0, in one or more sequences' tables
 *   evictable  refcount 0, cached (its hash is in the map), on the LRU list (head = oldest)
 *   free       refcount 0, not cached, on the free stack
 * A cached live block keeps its hash while it is shared; only eviction forgets it. The hash map
 * is a bucket array with chains threaded through the blocks, so nothing allocates after
 * kv_create. A hit is verified against the block's parent hash and token ids, so a 64-bit hash
 * collision can never hand a request another prefix's KV.
 */
#include "loom/kv.h"

#include <stdlib.h>
#include <string.h>

#define KV_NONE (-1)

typedef struct kv_block {
    int32_t refcount;
    bool cached;        /* registered in the hash map */
    uint64_t hash;      /* chain hash, when cached */
    uint64_t parent;    /* parent's chain hash, when cached */
    int32_t prev, next; /* LRU links (evictable) or free-stack link (free) */
    int32_t hash_next;  /* next block in the same hash bucket */
} kv_block;

struct kv_manager {
    int num_blocks;
    int block_size;
    bool prefix_caching;
    kv_block *blocks;      /* (num_blocks) */
    int32_t *block_tokens; /* (num_blocks, block_size) token ids of cached blocks */
    int32_t free_top;      /* free stack */
    int n_free;
    int32_t lru_head, lru_tail; /* evictable blocks, least recently freed first */
    int n_evictable;
    int32_t *buckets; /* (n_buckets) first block of each hash chain */
    uint64_t bucket_mask;
};

uint64_t kv_root_hash(void)
{
    return 0x6c6f6f6d6b760001ULL; /* "loomkv" */
}

uint64_t kv_hash_block(uint64_t parent, const int32_t *tokens, int block_size)
{
    return loom_hash64(tokens, (size_t)block_size * sizeof(int32_t), parent);
}

int kv_create(int num_blocks, int block_size, bool enable_prefix_caching, kv_manager **out,
              loom_err *e)
{
    if (num_blocks <= 0 || block_size <= 0)
        return loom_errf(e, LOOM_EINVAL,
                         "kv cache needs blocks > 0 and block size > 0 (got %d, %d)", num_blocks,
                         block_size);
    size_t n_tok;
    if (!loom_mul_ok((size_t)num_blocks, (size_t)block_size, &n_tok))
        return loom_errf(e, LOOM_EINVAL, "kv cache size overflows");
    kv_manager *kv = calloc(1, sizeof(*kv));
    if (!kv)
        return loom_errf(e, LOOM_ENOMEM, "out of memory for the kv block manager");
    uint64_t n_buckets = 16;
    while (n_buckets < 2 * (uint64_t)num_blocks)
        n_buckets *= 2;
    kv->num_blocks = num_blocks;
    kv->block_size = block_size;
    kv->prefix_caching = enable_prefix_caching;
    kv->blocks = calloc((size_t)num_blocks, sizeof(*kv->blocks));
    kv->buckets = malloc(n_buckets * sizeof(*kv->buckets));
    kv->block_tokens = enable_prefix_caching ? malloc(n_tok * sizeof(int32_t)) : NULL;
    if (!kv->blocks || !kv->buckets || (enable_prefix_caching && !kv->block_tokens)) {
        kv_free(kv);
        return loom_errf(e, LOOM_ENOMEM, "out of memory for %d kv blocks", num_blocks);
    }
    kv->bucket_mask = n_buckets - 1;
    for (uint64_t i = 0; i < n_buckets; i++)
        kv->buckets[i] = KV_NONE;
    /* Stack with block 0 on top: a fresh cache hands out blocks 0, 1, 2, ... */
    kv->free_top = KV_NONE;
    for (int32_t b = num_blocks - 1; b >= 0; b--) {
        kv_block *blk = &kv->blocks[b];
        blk->prev = blk->hash_next = KV_NONE;
        blk->next = kv->free_top;
        kv->free_top = b;
    }
    kv->n_free = num_blocks;
    kv->lru_head = kv->lru_tail = KV_NONE;
    *out = kv;
    return LOOM_OK;
}

void kv_free(kv_manager *kv)
{
    if (!kv)
        return;
    free(kv->blocks);
    free(kv->block_tokens);
    free(kv->buckets);
    free(kv);
}

int kv_num_blocks(const kv_manager *kv)
{
    return kv->num_blocks;
}

int kv_block_size(const kv_manager *kv)
{
    return kv->block_size;
}

int kv_num_free(const kv_manager *kv)
{
    return kv->n_free + kv->n_evictable;
}

int kv_num_evictable(const kv_manager *kv)
{
    return kv->n_evictable;
}

int kv_blocks_for(const kv_manager *kv, int n_tokens)
{
    return n_tokens <= 0 ? 0 : (n_tokens + kv->block_size - 1) / kv->block_size;
}

int kv_block_refcount(const kv_manager *kv, int32_t block)
{
    return kv->blocks[block].refcount;
}

bool kv_block_is_cached(const kv_manager *kv, int32_t block)
{
    return kv->blocks[block].cached;
}

/* ---------------------------------------------------------------- sequences */

int kv_seq_init(kv_seq *s, int max_tokens, int block_size, loom_err *e)
{
    memset(s, 0, sizeof(*s));
    if (max_tokens <= 0 || block_size <= 0)
        return loom_errf(e, LOOM_EINVAL, "kv sequence needs max_tokens > 0");
    s->max_blocks = (max_tokens + block_size - 1) / block_size;
    s->blocks = malloc((size_t)s->max_blocks * sizeof(*s->blocks));
    if (!s->blocks)
        return loom_errf(e, LOOM_ENOMEM, "out of memory for a block table");
    s->last_hash = kv_root_hash();
    return LOOM_OK;
}

void kv_seq_destroy(kv_seq *s)
{
    free(s->blocks);
    s->blocks = NULL;
    s->n_blocks = s->max_blocks = 0;
}

/* ---------------------------------------------------------------- lists and map */

static void lru_remove(kv_manager *kv, int32_t b)
{
    kv_block *blk = &kv->blocks[b];
    if (blk->prev != KV_NONE)
        kv->blocks[blk->prev].next = blk->next;
    else
        kv->lru_head = blk->next;
    if (blk->next != KV_NONE)
        kv->blocks[blk->next].prev = blk->prev;
    else
        kv->lru_tail = blk->prev;
    blk->prev = blk->next = KV_NONE;
    kv->n_evictable--;
}

static void lru_append(kv_manager *kv, int32_t b)
{
    kv_block *blk = &kv->blocks[b];
    blk->next = KV_NONE;
    blk->prev = kv->lru_tail;
    if (kv->lru_tail != KV_NONE)
        kv->blocks[kv->lru_tail].next = b;
    else
        kv->lru_head = b;
    kv->lru_tail = b;
    kv->n_evictable++;
}

static void free_push(kv_manager *kv, int32_t b)
{
    kv->blocks[b].next = kv->free_top;
    kv->blocks[b].prev = KV_NONE;
    kv->free_top = b;
    kv->n_free++;
}

static int32_t map_find(const kv_manager *kv, uint64_t hash, uint64_t parent, const int32_t *tokens)
{
    for (int32_t b = kv->buckets[hash & kv->bucket_mask]; b != KV_NONE;
         b = kv->blocks[b].hash_next) {
        const kv_block *blk = &kv->blocks[b];
        if (blk->hash == hash && blk->parent == parent &&
            memcmp(kv->block_tokens + (size_t)b * kv->block_size, tokens,
                   (size_t)kv->block_size * sizeof(int32_t)) == 0)
            return b;
    }
    return KV_NONE;
}

static void map_insert(kv_manager *kv, int32_t b, uint64_t hash, uint64_t parent,
                       const int32_t *tokens)
{
    kv_block *blk = &kv->blocks[b];
    blk->cached = true;
    blk->hash = hash;
    blk->parent = parent;
    memcpy(kv->block_tokens + (size_t)b * kv->block_size, tokens,
           (size_t)kv->block_size * sizeof(int32_t));
    int32_t *head = &kv->buckets[hash & kv->bucket_mask];
    blk->hash_next = *head;
    *head = b;
}

static void map_remove(kv_manager *kv, int32_t b)
{
    kv_block *blk = &kv->blocks[b];
    int32_t *link = &kv->buckets[blk->hash & kv->bucket_mask];
    while (*link != KV_NONE && *link != b)
        link = &kv->blocks[*link].hash_next;
    if (*link == b)
        *link = blk->hash_next;
    blk->hash_next = KV_NONE;
    blk->cached = false;
}

/* A block for new tokens: a free one, else the least recently freed evictable one (its cached
 * content is forgotten). The caller has checked that one exists. */
static int32_t take_fresh(kv_manager *kv)
{
    int32_t b;
    if (kv->free_top != KV_NONE) {
        b = kv->free_top;
        kv->free_top = kv->blocks[b].next;
        kv->n_free--;
    } else {
        b = kv->lru_head;
        lru_remove(kv, b);
        map_remove(kv, b);
    }
    kv_block *blk = &kv->blocks[b];
    blk->prev = blk->next = KV_NONE;
    blk->refcount = 1;
    return b;
}

/* ---------------------------------------------------------------- operations */

int kv_find_cached(const kv_manager *kv, const int32_t *tokens, int n_tokens, int32_t *blocks,
                   uint64_t *last_hash)
{
    uint64_t parent = kv_root_hash();
    int n = 0;
    if (kv->prefix_caching) {
        int n_full = n_tokens / kv->block_size;
        for (; n < n_full; n++) {
            const int32_t *t = tokens + (size_t)n * kv->block_size;
            uint64_t h = kv_hash_block(parent, t, kv->block_size);
            int32_t b = map_find(kv, h, parent, t);
            if (b == KV_NONE)
                break;
            blocks[n] = b;
            parent = h;
        }
    }
    if (last_hash)
        *last_hash = parent;
    return n;
}

int kv_seq_allocate(kv_manager *kv, kv_seq *s, const int32_t *hit_blocks, int n_hits,
                    uint64_t hit_last_hash, int n_tokens)
{
    if (n_hits > 0 && s->n_blocks != 0)
        return LOOM_EINVAL;
    int need = kv_blocks_for(kv, n_tokens);
    if (need > s->max_blocks || n_hits > s->max_blocks)
        return LOOM_ETOOLONG;
    int have = s->n_blocks + n_hits;
    int fresh = need > have ? need - have : 0;
    int revive = 0;
    for (int i = 0; i < n_hits; i++)
        revive += kv->blocks[hit_blocks[i]].refcount == 0;
    if (fresh + revive > kv_num_free(kv))
        return LOOM_EFULL;

    for (int i = 0; i < n_hits; i++) {
        int32_t b = hit_blocks[i];
        if (kv->blocks[b].refcount == 0)
            lru_remove(kv, b);
        kv->blocks[b].refcount++;
        s->blocks[s->n_blocks++] = b;
    }
    if (n_hits > 0) {
        s->n_hashed = n_hits;
        s->last_hash = hit_last_hash;
    }
    for (int i = 0; i < fresh; i++)
        s->blocks[s->n_blocks++] = take_fresh(kv);
    return LOOM_OK;
}

void kv_seq_cache(kv_manager *kv, kv_seq *s, const int32_t *tokens, int n_computed)
{
    if (!kv->prefix_caching)
        return;
    int n_full = n_computed / kv->block_size;
    if (n_full > s->n_blocks)
        n_full = s->n_blocks;
    for (int i = s->n_hashed; i < n_full; i++) {
        const int32_t *t = tokens + (size_t)i * kv->block_size;
        uint64_t h = kv_hash_block(s->last_hash, t, kv->block_size);
        int32_t b = s->blocks[i];
        if (!kv->blocks[b].cached && map_find(kv, h, s->last_hash, t) == KV_NONE)
            map_insert(kv, b, h, s->last_hash, t);
        s->last_hash = h;
        s->n_hashed = i + 1;
    }
}

void kv_seq_release(kv_manager *kv, kv_seq *s)
{
    for (int i = s->n_blocks - 1; i >= 0; i--) {
        int32_t b = s->blocks[i];
        kv_block *blk = &kv->blocks[b];
        if (--blk->refcount > 0)
            continue;
        if (blk->cached)
            lru_append(kv, b);
        else
            free_push(kv, b);
    }
    s->n_blocks = 0;
    s->n_hashed = 0;
    s->last_hash = kv_root_hash();
}

/* ---------------------------------------------------------------- consistency check */

int kv_check(const kv_manager *kv, loom_err *e)
{
    int rc = LOOM_OK;
    /* where[b]: 1 on the free stack, 2 on the LRU list, 4 in the hash map (bits). */
    uint8_t *where = calloc((size_t)kv->num_blocks, 1);
    if (!where)
        return loom_errf(e, LOOM_ENOMEM, "out of memory");
    int n = 0;
    for (int32_t b = kv->free_top; b != KV_NONE; b = kv->blocks[b].next) {
        if (b < 0 || b >= kv->num_blocks || where[b] || ++n > kv->num_blocks) {
            rc = loom_errf(e, LOOM_EINVAL, "free stack corrupt at block %d", b);
            goto out;
        }
        where[b] |= 1;
    }
    if (n != kv->n_free) {
        rc = loom_errf(e, LOOM_EINVAL, "free count %d but %d on the stack", kv->n_free, n);
        goto out;
    }
    n = 0;
    int32_t prev = KV_NONE;
    for (int32_t b = kv->lru_head; b != KV_NONE; prev = b, b = kv->blocks[b].next) {
        if (b < 0 || b >= kv->num_blocks || where[b] || ++n > kv->num_blocks ||
            kv->blocks[b].prev != prev) {
            rc = loom_errf(e, LOOM_EINVAL, "lru list corrupt at block %d", b);
            goto out;
        }
        where[b] |= 2;
    }
    if (n != kv->n_evictable || prev != kv->lru_tail) {
        rc = loom_errf(e, LOOM_EINVAL, "evictable count %d but %d on the list", kv->n_evictable, n);
        goto out;
    }
    int n_in_map = 0;
    for (uint64_t i = 0; i <= kv->bucket_mask; i++) {
        for (int32_t b = kv->buckets[i]; b != KV_NONE; b = kv->blocks[b].hash_next) {
            if (b < 0 || b >= kv->num_blocks || (where[b] & 4) || !kv->blocks[b].cached ||
                (kv->blocks[b].hash & kv->bucket_mask) != i || ++n_in_map > kv->num_blocks) {
                rc = loom_errf(e, LOOM_EINVAL, "hash map corrupt at block %d", b);
                goto out;
            }
            where[b] |= 4;
        }
    }
    for (int32_t b = 0; b < kv->num_blocks; b++) {
        const kv_block *blk = &kv->blocks[b];
        bool ok;
        if (blk->refcount < 0)
            ok = false;
        else if (blk->refcount > 0)
            ok = (where[b] & 3) == 0;
        else
            ok = (where[b] & 3) == (blk->cached ? 2 : 1);
        ok = ok && ((where[b] & 4) != 0) == blk->cached;
        if (!ok) {
            rc = loom_errf(e, LOOM_EINVAL, "block %d: refcount %d cached %d but lists %d", b,
                           blk->refcount, blk->cached, where[b]);
            goto out;
        }
    }
out:
    free(where);
    return rc;
}
