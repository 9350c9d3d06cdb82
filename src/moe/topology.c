/*
 * Expert-parallel topology: ranks grouped in nodes (and, inside a node, link groups), which
 * rank hosts each expert, and the alpha-beta link profile of each tier.
 * Dimension letters: E experts, R ranks, N nodes.
 *
 * Link figures are nominal per-direction rates from the vendors' data sheets; the alphas are
 * assumptions of a few microseconds per transfer. They are a model's prior, to be refitted from
 * a measured all-to-all on the real cluster (docs/moe.md lists the sources and caveats).
 */
#include "loom/moe.h"

#include <stdlib.h>
#include <string.h>

#define GB 1e9
#define US 1e-6

static const moe_link_profile profiles[] = {
    {"h100-ndr",
     "8x H100 SXM per node on NVSwitch (NVLink 4, 18 links x 25 GB/s = 450 GB/s per direction); "
     "one 400 Gb/s NDR InfiniBand HCA per GPU (50 GB/s)",
     8,
     8,
     {[MOE_TIER_GROUP] = {3 * US, 450 * GB, false},
      [MOE_TIER_NODE] = {3 * US, 450 * GB, false},
      [MOE_TIER_NET] = {5 * US, 50 * GB, false}}},
    {"a100-hdr",
     "8x A100 SXM per node on NVSwitch (NVLink 3, 12 links x 25 GB/s = 300 GB/s per direction); "
     "one 200 Gb/s HDR InfiniBand HCA per GPU (25 GB/s)",
     8,
     8,
     {[MOE_TIER_GROUP] = {3 * US, 300 * GB, false},
      [MOE_TIER_NODE] = {3 * US, 300 * GB, false},
      [MOE_TIER_NET] = {5 * US, 25 * GB, false}}},
    {"ascend-910a",
     "Atlas 800 (model 9000): 8x Ascend 910A in two groups of 4; HCCS full mesh inside a group "
     "(a 30 GB/s link to each peer); PCIe 4.0 x16 between the groups (32 GB/s); one 100 GbE "
     "RoCE port per NPU between servers (12.5 GB/s)",
     8,
     4,
     {[MOE_TIER_GROUP] = {5 * US, 30 * GB, true},
      [MOE_TIER_NODE] = {10 * US, 32 * GB, false},
      [MOE_TIER_NET] = {10 * US, 12.5 * GB, false}}},
    {"ascend-910b",
     "Atlas 800T A2: 8x Ascend 910B on an HCCS full mesh (7 links, 392 GB/s both directions in "
     "total: 28 GB/s to each peer per direction); one 200 GbE RoCE port per NPU (25 GB/s)",
     8,
     8,
     {[MOE_TIER_GROUP] = {5 * US, 28 * GB, true},
      [MOE_TIER_NODE] = {5 * US, 28 * GB, true},
      [MOE_TIER_NET] = {10 * US, 25 * GB, false}}},
};

const moe_link_profile *moe_link_profiles(int *n)
{
    *n = (int)(sizeof(profiles) / sizeof(profiles[0]));
    return profiles;
}

const moe_link_profile *moe_link_profile_find(const char *name)
{
    for (size_t i = 0; i < sizeof(profiles) / sizeof(profiles[0]); i++)
        if (!strcmp(profiles[i].name, name))
            return &profiles[i];
    return NULL;
}

void moe_topology_free(moe_topology *t)
{
    if (!t)
        return;
    free(t->expert_rank);
    memset(t, 0, sizeof(*t));
}

int moe_topology_init(moe_topology *t, int n_nodes, int ranks_per_node, int E,
                      const moe_link_profile *link, loom_err *e)
{
    memset(t, 0, sizeof(*t));
    if (!link)
        link = &profiles[0];
    if (ranks_per_node <= 0)
        ranks_per_node = link->ranks_per_node;
    if (n_nodes < 1 || ranks_per_node < 1 || E < 1 || (int64_t)n_nodes * ranks_per_node > 65536)
        return loom_errf(e, LOOM_EINVAL,
                         "moe topology: need nodes >= 1, ranks per node >= 1, "
                         "experts >= 1 and at most 65536 ranks (got %d x %d, E=%d)",
                         n_nodes, ranks_per_node, E);
    t->n_nodes = n_nodes;
    t->ranks_per_node = ranks_per_node;
    t->n_ranks = n_nodes * ranks_per_node;
    t->n_experts = E;
    t->link = *link;
    t->ranks_per_group = link->ranks_per_group;
    if (t->ranks_per_group < 1 || t->ranks_per_group > ranks_per_node ||
        ranks_per_node % t->ranks_per_group)
        t->ranks_per_group = ranks_per_node; /* a profile's groups do not fit: one tier */
    t->expert_rank = malloc((size_t)E * sizeof(int32_t));
    if (!t->expert_rank)
        return loom_errf(e, LOOM_ENOMEM, "moe topology: out of memory");
    for (int x = 0; x < E; x++)
        t->expert_rank[x] = (int32_t)((int64_t)x * t->n_ranks / E);
    return LOOM_OK;
}

int moe_topology_set_placement(moe_topology *t, const int32_t *expert_rank, loom_err *e)
{
    for (int x = 0; x < t->n_experts; x++)
        if (expert_rank[x] < 0 || expert_rank[x] >= t->n_ranks)
            return loom_errf(e, LOOM_EINVAL, "moe topology: expert %d on rank %d, not in [0, %d)",
                             x, expert_rank[x], t->n_ranks);
    memcpy(t->expert_rank, expert_rank, (size_t)t->n_experts * sizeof(int32_t));
    return LOOM_OK;
}

int moe_topology_tier(const moe_topology *t, int src_rank, int dst_rank)
{
    if (src_rank == dst_rank)
        return MOE_TIER_RANK;
    int rpn = t->ranks_per_node;
    if (src_rank / rpn != dst_rank / rpn)
        return MOE_TIER_NET;
    int rpg = t->ranks_per_group;
    return (src_rank % rpn) / rpg == (dst_rank % rpn) / rpg ? MOE_TIER_GROUP : MOE_TIER_NODE;
}

void moe_topology_expert_order(const moe_topology *t, int32_t *order)
{
    int n = 0;
    /* stable insertion sort by rank: O(E^2) at worst, E is at most a few hundred */
    for (int x = 0; x < t->n_experts; x++) {
        int i = n++;
        while (i > 0 && t->expert_rank[order[i - 1]] > t->expert_rank[x]) {
            order[i] = order[i - 1];
            i--;
        }
        order[i] = x;
    }
}

void moe_send_counts(const moe_plan *p, const int32_t *expert_idx, const int32_t *token_rank,
                     const moe_topology *t, int64_t *send)
{
    int R = t->n_ranks, k = p->k;
    memset(send, 0, (size_t)R * R * sizeof(int64_t));
    for (int tok = 0; tok < p->T; tok++)
        for (int j = 0; j < k; j++) {
            size_t a = (size_t)tok * k + j;
            if (p->row[a] < 0)
                continue;
            int s = token_rank ? token_rank[tok] : 0;
            send[(size_t)s * R + t->expert_rank[expert_idx[a]]]++;
        }
}
