/*
 * Per-layer routing statistics and communication accounting: load balance, drops, locality of
 * the assignments, intra- and inter-node bytes (plain and de-duplicated), and the all-to-all
 * time under the alpha-beta link model of the topology.
 * Dimension letters: T tokens, E experts, k slots per token, R ranks.
 */
#include "loom/moe.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/*
 * Modelled time of one all-to-all whose traffic matrix is M (R, R) bytes (M[s*R + r] from s
 * to r). Tiers work concurrently; on each rank and tier:
 *   shared port (NVSwitch, PCIe, NIC): alpha + max(bytes out, bytes in) / beta
 *   dedicated link per peer (HCCS mesh): alpha + max over peers of max(out, in) / beta
 * and the all-to-all lasts as long as the busiest (rank, tier). This is a lower bound in the
 * sense that the fabric beyond each rank's port is taken as non-blocking.
 */
static double a2a_time(const moe_topology *t, const double *M, int *busiest_rank, int *busiest_tier)
{
    int R = t->n_ranks;
    double worst = 0.0;
    *busiest_rank = -1;
    *busiest_tier = MOE_TIER_RANK;
    for (int r = 0; r < R; r++) {
        double out[MOE_N_TIERS] = {0}, in[MOE_N_TIERS] = {0}, peer[MOE_N_TIERS] = {0};
        for (int p = 0; p < R; p++) {
            if (p == r)
                continue;
            double o = M[(size_t)r * R + p], i = M[(size_t)p * R + r];
            if (o == 0.0 && i == 0.0)
                continue;
            int tier = moe_topology_tier(t, r, p);
            out[tier] += o;
            in[tier] += i;
            double m = o > i ? o : i;
            if (m > peer[tier])
                peer[tier] = m;
        }
        for (int tier = MOE_TIER_GROUP; tier < MOE_N_TIERS; tier++) {
            const moe_link *l = &t->link.tier[tier];
            double bytes = l->per_peer ? peer[tier] : (out[tier] > in[tier] ? out[tier] : in[tier]);
            if (bytes <= 0.0 || !(l->beta > 0))
                continue;
            double time = l->alpha + bytes / l->beta;
            if (time > worst) {
                worst = time;
                *busiest_rank = r;
                *busiest_tier = tier;
            }
        }
    }
    return worst;
}

static void byte_totals(const moe_topology *t, const double *M, double *intra, double *inter)
{
    int R = t->n_ranks, rpn = t->ranks_per_node;
    *intra = *inter = 0.0;
    for (int s = 0; s < R; s++)
        for (int r = 0; r < R; r++) {
            if (s == r)
                continue;
            double b = M[(size_t)s * R + r];
            if (s / rpn == r / rpn)
                *intra += b;
            else
                *inter += b;
        }
}

/* Is value v among the first n of list? */
static bool seen(const int32_t *list, int n, int32_t v)
{
    for (int i = 0; i < n; i++)
        if (list[i] == v)
            return true;
    return false;
}

int moe_layer_stats_compute(const moe_topology *t, const int32_t *expert_idx, int T, int k,
                            const moe_plan *plan, const int32_t *token_rank, size_t bytes_per_row,
                            moe_layer_stats *out, loom_err *e)
{
    int E = t->n_experts, R = t->n_ranks, rpn = t->ranks_per_node;
    memset(out, 0, sizeof(*out));
    out->n_layers = 1;
    out->busiest_rank = -1;
    if (plan && (plan->T != T || plan->k != k || plan->E != E))
        return loom_errf(e, LOOM_EINVAL,
                         "moe stats: plan (T=%d, k=%d, E=%d) does not match "
                         "(T=%d, k=%d, E=%d)",
                         plan->T, plan->k, plan->E, T, k, E);
    if (R > 4096)
        return loom_errf(e, LOOM_EUNSUPPORTED, "moe stats: at most 4096 ranks (R x R matrix)");
    double *M = calloc((size_t)R * R, sizeof(double));
    double *Md = calloc((size_t)R * R, sizeof(double));
    double *load = calloc((size_t)E, sizeof(double));
    double *kept_count = calloc((size_t)E, sizeof(double));
    int32_t *ranks = malloc((size_t)(k > 0 ? k : 1) * sizeof(int32_t));
    int32_t *nodes = malloc((size_t)(k > 0 ? k : 1) * sizeof(int32_t));
    if (!M || !Md || !load || !kept_count || !ranks || !nodes) {
        free(M);
        free(Md);
        free(load);
        free(kept_count);
        free(ranks);
        free(nodes);
        return loom_errf(e, LOOM_ENOMEM, "moe stats: out of memory");
    }
    double b = (double)bytes_per_row;
    int64_t same_rank = 0, same_node = 0;
    out->tokens = T;
    for (int tok = 0; tok < T; tok++) {
        int s = token_rank ? token_rank[tok] : (int)((int64_t)tok * R / (T > 0 ? T : 1));
        if (s < 0 || s >= R)
            s = 0;
        int ns = s / rpn, n_ranks = 0, n_nodes = 0;
        for (int j = 0; j < k; j++) {
            size_t a = (size_t)tok * k + j;
            int x = expert_idx[a];
            if (x < 0 || x >= E)
                continue;
            out->assigned++;
            load[x] += 1.0;
            if (plan && plan->row[a] < 0)
                continue;
            out->kept++;
            kept_count[x] += 1.0;
            int r = t->expert_rank[x];
            same_rank += r == s;
            same_node += r / rpn == ns;
            M[(size_t)s * R + r] += b;
            if (!seen(ranks, n_ranks, r))
                ranks[n_ranks++] = r;
            if (!seen(nodes, n_nodes, r / rpn))
                nodes[n_nodes++] = r / rpn;
        }
        /* De-duplicated path: one copy per (token, rank) inside the token's node; one copy per
         * (token, remote node) over the network to the rank with the same local index there
         * (rail-aligned, as DeepEP does), which forwards it to the other ranks of that node
         * that need it. */
        for (int i = 0; i < n_ranks; i++) {
            int r = ranks[i];
            if (r / rpn == ns) {
                Md[(size_t)s * R + r] += b;
            } else {
                int land = (r / rpn) * rpn + s % rpn;
                if (land != r)
                    Md[(size_t)land * R + r] += b;
            }
        }
        for (int i = 0; i < n_nodes; i++)
            if (nodes[i] != ns)
                Md[(size_t)s * R + nodes[i] * rpn + s % rpn] += b;
    }
    out->dropped = out->assigned - out->kept;
    out->drop_rate = out->assigned ? (double)out->dropped / out->assigned : 0.0;
    double mean = (double)out->assigned / E, var = 0.0;
    for (int x = 0; x < E; x++) {
        if (load[x] > out->load_max)
            out->load_max = load[x];
        if (kept_count[x] > out->kept_max)
            out->kept_max = kept_count[x];
        var += (load[x] - mean) * (load[x] - mean);
    }
    out->load_mean = mean;
    out->load_cv = mean > 0 ? sqrt(var / E) / mean : 0.0;
    out->share_rank = out->kept ? (double)same_rank / out->kept : 0.0;
    out->share_node = out->kept ? (double)same_node / out->kept : 0.0;
    byte_totals(t, M, &out->bytes_intra_node, &out->bytes_inter_node);
    byte_totals(t, Md, &out->bytes_intra_node_dedup, &out->bytes_inter_node_dedup);
    double tot = out->bytes_intra_node + out->bytes_inter_node;
    double totd = out->bytes_intra_node_dedup + out->bytes_inter_node_dedup;
    out->inter_node_share = tot > 0 ? out->bytes_inter_node / tot : 0.0;
    out->inter_node_share_dedup = totd > 0 ? out->bytes_inter_node_dedup / totd : 0.0;
    /* combine is the mirror image of dispatch (M transposed): the same modelled time */
    int br, bt;
    out->a2a_time = 2.0 * a2a_time(t, M, &out->busiest_rank, &out->busiest_tier);
    out->a2a_time_dedup = 2.0 * a2a_time(t, Md, &br, &bt);
    out->a2a_time_max_layer = out->a2a_time;
    free(M);
    free(Md);
    free(load);
    free(kept_count);
    free(ranks);
    free(nodes);
    return LOOM_OK;
}

void moe_stats_add(moe_layer_stats *step, const moe_layer_stats *l)
{
    if (step->n_layers == 0) {
        *step = *l;
        return;
    }
    step->n_layers += l->n_layers;
    step->tokens += l->tokens;
    step->assigned += l->assigned;
    step->kept += l->kept;
    step->dropped += l->dropped;
    step->drop_rate = step->assigned ? (double)step->dropped / step->assigned : 0.0;
    /* shares of the sums: weight each part by its kept assignments */
    double kept_prev = (double)(step->kept - l->kept);
    if (step->kept > 0) {
        step->share_rank = (step->share_rank * kept_prev + l->share_rank * l->kept) / step->kept;
        step->share_node = (step->share_node * kept_prev + l->share_node * l->kept) / step->kept;
    }
    if (l->load_max > step->load_max)
        step->load_max = l->load_max;
    if (l->kept_max > step->kept_max)
        step->kept_max = l->kept_max;
    if (l->load_cv > step->load_cv)
        step->load_cv = l->load_cv;
    step->load_mean =
        (step->load_mean * (step->n_layers - l->n_layers) + l->load_mean * l->n_layers) /
        step->n_layers;
    step->bytes_intra_node += l->bytes_intra_node;
    step->bytes_inter_node += l->bytes_inter_node;
    step->bytes_intra_node_dedup += l->bytes_intra_node_dedup;
    step->bytes_inter_node_dedup += l->bytes_inter_node_dedup;
    double tot = step->bytes_intra_node + step->bytes_inter_node;
    double totd = step->bytes_intra_node_dedup + step->bytes_inter_node_dedup;
    step->inter_node_share = tot > 0 ? step->bytes_inter_node / tot : 0.0;
    step->inter_node_share_dedup = totd > 0 ? step->bytes_inter_node_dedup / totd : 0.0;
    if (l->a2a_time_max_layer > step->a2a_time_max_layer) { /* the slowest layer's bottleneck */
        step->a2a_time_max_layer = l->a2a_time_max_layer;
        step->busiest_rank = l->busiest_rank;
        step->busiest_tier = l->busiest_tier;
    }
    step->a2a_time += l->a2a_time;
    step->a2a_time_dedup += l->a2a_time_dedup;
}
