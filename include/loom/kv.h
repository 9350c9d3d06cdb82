/*
 * kv: the paged KV block manager behind the engine (vLLM's KVCacheManager/BlockPool).
 *
 * The cache is num_blocks fixed-size blocks of block_size token slots. A sequence owns a block
 * table (kv_seq) listing the blocks that hold its tokens in order. Blocks are refcounted: a block
 * is live (refcount > 0, in one or more tables), evictable (refcount 0 but holding a cached full
 * block that a later request may reuse), or free.
 *
 * Automatic prefix caching: a FULL block is identified by its chain hash
 *     h_i = hash(h_{i-1}, tokens of block i)        (h_{-1} = a fixed root)
 * so equal hashes mean equal prefixes. When a sequence's block becomes full (its KV computed),
 * kv_seq_cache registers it in a hash -> block map. A new sequence looks up its leading full
 * blocks (kv_find_cached) and shares them (refcount++). A cached block whose refcount drops to 0
 * goes to an LRU list of evictable blocks: a later hit revives it, and when a fresh block is
 * needed and no free one is left the least recently freed evictable block is evicted (its hash
 * forgotten). The number of free blocks reported counts free + evictable blocks.
 *
 * Nothing here allocates after kv_create (kv_seq_init allocates a sequence's table once).
 * Not thread-safe; the engine's thread owns it.
 */
#ifndef LOOM_KV_H
#define LOOM_KV_H

#include "loom/base.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct kv_manager kv_manager;

/* A sequence's block table. */
typedef struct kv_seq {
    int32_t *blocks; /* (max_blocks) block ids; the first n_blocks are in use */
    int n_blocks;
    int max_blocks;
    int n_hashed;       /* leading full blocks whose chain hash is known (registered or not) */
    uint64_t last_hash; /* chain hash of block n_hashed-1 (the root when n_hashed == 0) */
} kv_seq;

int kv_create(int num_blocks, int block_size, bool enable_prefix_caching, kv_manager **out,
              loom_err *e);
void kv_free(kv_manager *kv);

int kv_num_blocks(const kv_manager *kv);
int kv_block_size(const kv_manager *kv);
/* Free blocks: never-used/uncached free blocks plus evictable cached ones. */
int kv_num_free(const kv_manager *kv);
int kv_num_evictable(const kv_manager *kv);
/* Blocks needed to hold n_tokens tokens. */
int kv_blocks_for(const kv_manager *kv, int n_tokens);

/* Allocates the table for a sequence of at most max_tokens tokens. */
int kv_seq_init(kv_seq *s, int max_tokens, int block_size, loom_err *e);
/* Frees the table itself (release the blocks first). */
void kv_seq_destroy(kv_seq *s);

/*
 * Prefix lookup, no side effects: the leading full blocks of tokens[0..n_tokens) that are cached.
 * Writes their ids to blocks (room for n_tokens / block_size) and the chain hash of the last one
 * to *last_hash; returns how many. Always 0 when prefix caching is off.
 * The caller passes n_tokens = prompt length - 1 so that the last prompt token is always computed.
 */
int kv_find_cached(const kv_manager *kv, const int32_t *tokens, int n_tokens, int32_t *blocks,
                   uint64_t *last_hash);

/*
 * Makes s hold enough blocks for n_tokens tokens. An empty s first takes the n_hits blocks found
 * by kv_find_cached (refcount++, evictable ones revived). All or nothing: LOOM_EFULL, with
 * nothing changed, when the free blocks do not suffice.
 */
int kv_seq_allocate(kv_manager *kv, kv_seq *s, const int32_t *hit_blocks, int n_hits,
                    uint64_t hit_last_hash, int n_tokens);

/* Registers the chain hashes of s's full blocks among the first n_computed tokens (whose KV is
 * now in the cache). A block whose hash another block already holds stays unregistered. */
void kv_seq_cache(kv_manager *kv, kv_seq *s, const int32_t *tokens, int n_computed);

/* Returns all of s's blocks (refcount--; tail blocks first, so they are evicted first). */
void kv_seq_release(kv_manager *kv, kv_seq *s);

/* Introspection for tests. */
int kv_block_refcount(const kv_manager *kv, int32_t block);
bool kv_block_is_cached(const kv_manager *kv, int32_t block);
/* Full consistency check (lists, counts, refcounts vs. state, hash map): 0 or LOOM_EINVAL. */
int kv_check(const kv_manager *kv, loom_err *e);
/* Chain hash of one block, as kv_seq_cache computes it. */
uint64_t kv_hash_block(uint64_t parent, const int32_t *tokens, int block_size);
uint64_t kv_root_hash(void);

#endif
