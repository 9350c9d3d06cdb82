/*
 * `loom moe`: capacity bounds, link profiles and communication estimates for MoE routing.
 * Argument parsing and printing only; the work is in src/moe.
 *
 *   loom moe bound --d 5120 --experts 16 --delta 0.03 [--tokens T --k K --capacity-factor CF]
 *   loom moe links
 *   loom moe comm --nodes 4 [--ranks-per-node 8] --experts 64 --k 2 --d 4096 [--tokens 4096]
 *                 [--links h100-ndr] [--capacity-factor 1.25] [--bytes-per-elem 2] [--seed 1]
 *   loom moe analyze --model DIR --text FILE [--links NAME --nodes N --ranks-per-node R ...]
 */
#include "cli.h"

#include "loom/base.h"
#include "loom/model.h"
#include "loom/moe.h"
#include "loom/tokenizer.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool parse_double(const char *s, double lo, double hi, double *out)
{
    if (!s || !*s)
        return false;
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v) || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static int bad_value(const char *cmd, const char *flag, const char *value, const char *want)
{
    fprintf(stderr, "loom moe %s: %s '%s' is not valid: %s\n", cmd, flag, value ? value : "", want);
    fprintf(stderr, "HINT: run 'loom moe %s --help'\n", cmd);
    return CLI_EXIT_USAGE;
}

/* ---------------------------------------------------------------- bound */

static void bound_usage(FILE *f)
{
    fprintf(
        f,
        "usage: loom moe bound --d D --experts N --delta DELTA [--tokens T --k K "
        "--capacity-factor CF]\n\n"
        "LocMoE's critical expert capacity (Lemma 3, Theorem 1): the probability p_delta that a\n"
        "token uniform on the sphere of R^d has |cos| >= delta with a gate vector, and the\n"
        "smallest capacity that lets each of N experts receive one such token, in the exact,\n"
        "erfc and exp forms.\n\n"
        "  --d D                 hidden size (>= 2)\n"
        "  --experts N           experts n (>= 1)\n"
        "  --delta DELTA         cosine threshold in (0, 1); the paper reads 0.03 off its data\n"
        "  --tokens T, --k K, --capacity-factor CF\n"
        "                        also print the usual capacity ceil(k T cf / N) to compare\n"
        "  -h, --help            this text\n");
}

static int moe_bound(int argc, char **argv)
{
    enum { OPT_D = 256, OPT_EXPERTS, OPT_DELTA, OPT_TOKENS, OPT_K, OPT_CF };
    static const struct option opts[] = {
        {"d", required_argument, NULL, OPT_D},
        {"experts", required_argument, NULL, OPT_EXPERTS},
        {"delta", required_argument, NULL, OPT_DELTA},
        {"tokens", required_argument, NULL, OPT_TOKENS},
        {"k", required_argument, NULL, OPT_K},
        {"capacity-factor", required_argument, NULL, OPT_CF},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    long long d = 0, n = 0, tokens = 0, k = 1;
    double delta = 0, cf = 1.0;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_D:
            if (!cli_parse_int(optarg, 2, 1LL << 30, &d))
                return bad_value("bound", "--d", optarg, "an integer >= 2");
            break;
        case OPT_EXPERTS:
            if (!cli_parse_int(optarg, 1, 1 << 20, &n))
                return bad_value("bound", "--experts", optarg, "an integer >= 1");
            break;
        case OPT_DELTA:
            if (!parse_double(optarg, 1e-12, 1 - 1e-12, &delta))
                return bad_value("bound", "--delta", optarg, "a number in (0, 1)");
            break;
        case OPT_TOKENS:
            if (!cli_parse_int(optarg, 1, 1LL << 30, &tokens))
                return bad_value("bound", "--tokens", optarg, "an integer >= 1");
            break;
        case OPT_K:
            if (!cli_parse_int(optarg, 1, 1024, &k))
                return bad_value("bound", "--k", optarg, "an integer in [1, 1024]");
            break;
        case OPT_CF:
            if (!parse_double(optarg, 1e-6, 1e6, &cf))
                return bad_value("bound", "--capacity-factor", optarg, "a positive number");
            break;
        case 'h':
            bound_usage(stdout);
            return CLI_EXIT_OK;
        default:
            bound_usage(stderr);
            return CLI_EXIT_USAGE;
        }
    }
    if (!d || !n || delta <= 0) {
        fprintf(stderr, "loom moe bound: --d, --experts and --delta are required\n");
        fprintf(stderr, "HINT: loom moe bound --d 5120 --experts 16 --delta 0.03\n");
        return CLI_EXIT_USAGE;
    }
    loom_err e;
    moe_capacity_bound b;
    if (moe_capacity_bound_compute((int)d, (int)n, delta, &b, &e)) {
        fprintf(stderr, "loom moe bound: %s\n", e.msg);
        return CLI_EXIT_USAGE;
    }
    double z2 = delta * delta * d / (2 - delta * delta);
    printf("LocMoE critical expert capacity: d = %lld, n = %lld experts, delta = %g\n", d, n,
           delta);
    printf("  p_delta = 1 - I_{delta^2}(1/2, (d-1)/2)              %.6g\n", b.p_delta);
    printf("  p_delta, erfc form: erfc(sqrt(delta^2 d/(2-delta^2)))  %.6g\n", b.p_erfc);
    printf("  ec_min exact:  1 / (n p_delta)                       %.4g tokens\n", b.ec_exact);
    printf("  ec_min erfc:   1 / (n erfc(sqrt(%.4g)))              %.4g tokens\n", z2, b.ec_erfc);
    printf("  ec_min exp:    (1/n) exp(%.4g)                       %.4g tokens (< erfc form)\n", z2,
           b.ec_exp);
    printf("  delta = 1/sqrt(d) = %.4g would give p_delta = %.4f\n", 1 / sqrt((double)d),
           moe_cap_probability(1 / sqrt((double)d), (int)d));
    if (tokens > 0)
        printf("  usual capacity ceil(k T cf / n) = ceil(%lld * %lld * %g / %lld) = %d tokens\n", k,
               tokens, cf, n, moe_capacity((int)k, (int)tokens, cf, (int)n, 0));
    return CLI_EXIT_OK;
}

/* ---------------------------------------------------------------- links */

static int moe_links(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: loom moe links\n\nThe built-in alpha-beta link profiles (per "
                   "direction; alpha per transfer) used by 'loom moe comm' and the library's\n"
                   "all-to-all model.\n");
            return CLI_EXIT_OK;
        }
        fprintf(stderr, "loom moe links: unexpected argument '%s'\n", argv[i]);
        return CLI_EXIT_USAGE;
    }
    static const char *const tier_names[] = {"rank", "group", "node", "net"};
    int n;
    const moe_link_profile *p = moe_link_profiles(&n);
    for (int i = 0; i < n; i++) {
        printf("%s: %d ranks per node, link groups of %d\n  %s\n", p[i].name, p[i].ranks_per_node,
               p[i].ranks_per_group, p[i].description);
        for (int t = MOE_TIER_GROUP; t < MOE_N_TIERS; t++) {
            if (t == MOE_TIER_NODE && p[i].ranks_per_group == p[i].ranks_per_node)
                continue;
            const moe_link *l = &p[i].tier[t];
            printf("  %-5s alpha %5.1f us  beta %6.1f GB/s  %s\n", tier_names[t], l->alpha * 1e6,
                   l->beta / 1e9, l->per_peer ? "per peer link" : "shared port");
        }
    }
    return CLI_EXIT_OK;
}

/* ---------------------------------------------------------------- comm */

static void comm_usage(FILE *f)
{
    fprintf(f,
            "usage: loom moe comm --nodes N --experts E --k K --d D [options]\n\n"
            "Communication of one MoE layer under balanced random top-k routing (the baseline a\n"
            "learned router should beat): tokens per expert, drops, locality, intra- and\n"
            "inter-node bytes with and without per-node de-duplication, and the modelled\n"
            "all-to-all time.\n\n"
            "  --nodes N             nodes\n"
            "  --ranks-per-node R    ranks per node (default: the link profile's)\n"
            "  --experts E           experts, placed in blocks over the ranks\n"
            "  --k K                 experts per token (default 1)\n"
            "  --d D                 hidden size\n"
            "  --tokens T            tokens per rank (default 4096)\n"
            "  --links NAME          link profile: h100-ndr (default), a100-hdr, ascend-910a,\n"
            "                        ascend-910b ('loom moe links' lists them)\n"
            "  --capacity-factor CF  per-expert capacity ceil(k T_total cf / E); 0 = dropless\n"
            "                        (default 0)\n"
            "  --bytes-per-elem B    bytes per hidden element on the wire (default 2, bf16)\n"
            "  --seed S              routing seed (default 1)\n"
            "  -h, --help            this text\n");
}

static int moe_comm(int argc, char **argv)
{
    enum {
        OPT_NODES = 256,
        OPT_RPN,
        OPT_EXPERTS,
        OPT_K,
        OPT_D,
        OPT_TOKENS,
        OPT_LINKS,
        OPT_CF,
        OPT_BPE,
        OPT_SEED
    };
    static const struct option opts[] = {
        {"nodes", required_argument, NULL, OPT_NODES},
        {"ranks-per-node", required_argument, NULL, OPT_RPN},
        {"experts", required_argument, NULL, OPT_EXPERTS},
        {"k", required_argument, NULL, OPT_K},
        {"d", required_argument, NULL, OPT_D},
        {"tokens", required_argument, NULL, OPT_TOKENS},
        {"links", required_argument, NULL, OPT_LINKS},
        {"capacity-factor", required_argument, NULL, OPT_CF},
        {"bytes-per-elem", required_argument, NULL, OPT_BPE},
        {"seed", required_argument, NULL, OPT_SEED},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    long long nodes = 0, rpn = 0, E = 0, k = 1, d = 0, tokens = 4096, bpe = 2, seed = 1;
    double cf = 0;
    const moe_link_profile *link = moe_link_profile_find("h100-ndr");
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_NODES:
            if (!cli_parse_int(optarg, 1, 4096, &nodes))
                return bad_value("comm", "--nodes", optarg, "an integer in [1, 4096]");
            break;
        case OPT_RPN:
            if (!cli_parse_int(optarg, 1, 64, &rpn))
                return bad_value("comm", "--ranks-per-node", optarg, "an integer in [1, 64]");
            break;
        case OPT_EXPERTS:
            if (!cli_parse_int(optarg, 1, 4096, &E))
                return bad_value("comm", "--experts", optarg, "an integer in [1, 4096]");
            break;
        case OPT_K:
            if (!cli_parse_int(optarg, 1, 64, &k))
                return bad_value("comm", "--k", optarg, "an integer in [1, 64]");
            break;
        case OPT_D:
            if (!cli_parse_int(optarg, 1, 1 << 20, &d))
                return bad_value("comm", "--d", optarg, "a positive integer");
            break;
        case OPT_TOKENS:
            if (!cli_parse_int(optarg, 1, 1 << 20, &tokens))
                return bad_value("comm", "--tokens", optarg, "an integer in [1, 1048576]");
            break;
        case OPT_LINKS:
            if (!(link = moe_link_profile_find(optarg)))
                return bad_value("comm", "--links", optarg, "one of 'loom moe links'");
            break;
        case OPT_CF:
            if (!parse_double(optarg, 0, 1e6, &cf))
                return bad_value("comm", "--capacity-factor", optarg, "a number >= 0");
            break;
        case OPT_BPE:
            if (!cli_parse_int(optarg, 1, 8, &bpe))
                return bad_value("comm", "--bytes-per-elem", optarg, "1, 2, 4 or 8");
            break;
        case OPT_SEED:
            if (!cli_parse_int(optarg, 0, INT64_MAX, &seed))
                return bad_value("comm", "--seed", optarg, "a non-negative integer");
            break;
        case 'h':
            comm_usage(stdout);
            return CLI_EXIT_OK;
        default:
            comm_usage(stderr);
            return CLI_EXIT_USAGE;
        }
    }
    if (!nodes || !E || !d) {
        fprintf(stderr, "loom moe comm: --nodes, --experts and --d are required\n");
        fprintf(stderr, "HINT: loom moe comm --nodes 4 --experts 64 --k 2 --d 4096\n");
        return CLI_EXIT_USAGE;
    }
    if (k > E)
        return bad_value("comm", "--k", "", "k must not exceed --experts");
    loom_err e;
    moe_topology topo;
    if (moe_topology_init(&topo, (int)nodes, (int)rpn, (int)E, link, &e)) {
        fprintf(stderr, "loom moe comm: %s\n", e.msg);
        return CLI_EXIT_USAGE;
    }
    int R = topo.n_ranks;
    int64_t T64 = (int64_t)tokens * R;
    if (T64 > (1 << 24)) {
        fprintf(stderr, "loom moe comm: %lld tokens in all is too many (at most 16M)\n",
                (long long)T64);
        moe_topology_free(&topo);
        return CLI_EXIT_USAGE;
    }
    int T = (int)T64, K = (int)k;
    int32_t *idx = malloc(sizeof(int32_t) * T * K);
    float *w = malloc(sizeof(float) * T * K);
    int32_t *rank = malloc(sizeof(int32_t) * T);
    int rc = CLI_EXIT_FAIL;
    moe_plan plan = {0};
    if (!idx || !w || !rank) {
        fprintf(stderr, "loom moe comm: out of memory\n");
        goto done;
    }
    loom_rng rng;
    rng_seed(&rng, (uint64_t)seed);
    for (int t = 0; t < T; t++) { /* uniform random k distinct experts per token */
        rank[t] = t / (int)tokens;
        for (int j = 0; j < K; j++) {
            int x;
            bool dup;
            do {
                x = (int)(rng_next(&rng) % (uint64_t)E);
                dup = false;
                for (int i = 0; i < j; i++)
                    dup |= idx[t * K + i] == x;
            } while (dup);
            idx[t * K + j] = x;
            w[t * K + j] = 1.0f / K;
        }
    }
    if (moe_plan_init(&plan, T, K, (int)E, 0, &e)) {
        fprintf(stderr, "loom moe comm: %s\n", e.msg);
        goto done;
    }
    moe_plan_config pc = {.capacity = cf > 0 ? moe_capacity(K, T, cf, (int)E, 1) : 0};
    moe_layer_stats st;
    if (moe_plan_build(&plan, &pc, idx, w, T, &e) ||
        moe_layer_stats_compute(&topo, idx, T, K, &plan, rank, (size_t)(d * bpe), &st, &e)) {
        fprintf(stderr, "loom moe comm: %s\n", e.msg);
        goto done;
    }
    static const char *const tier_names[] = {"rank", "group", "node", "net"};
    printf("%s: %lld nodes x %d ranks, %lld experts, k = %d, d = %lld, %lld tokens per rank, "
           "%lld B per element\n",
           link->name, nodes, topo.ranks_per_node, E, K, d, tokens, bpe);
    printf("  tokens per expert: max %.0f, mean %.1f, cv %.3f; capacity %s%d, drop rate %.2f%%\n",
           st.load_max, st.load_mean, st.load_cv, cf > 0 ? "" : "(dropless) ", plan.capacity,
           100 * st.drop_rate);
    printf("  assignments on the token's rank %.1f%%, on its node %.1f%%\n", 100 * st.share_rank,
           100 * st.share_node);
    printf("  dispatch bytes: intra-node %.3f MB, inter-node %.3f MB (%.1f%% inter)\n",
           st.bytes_intra_node / 1e6, st.bytes_inter_node / 1e6, 100 * st.inter_node_share);
    printf("  de-duplicated per node: intra-node %.3f MB, inter-node %.3f MB (%.1f%% inter)\n",
           st.bytes_intra_node_dedup / 1e6, st.bytes_inter_node_dedup / 1e6,
           100 * st.inter_node_share_dedup);
    printf("  modelled all-to-all (dispatch + combine): %.1f us, %.1f us de-duplicated; bound by "
           "rank %d on the %s tier\n",
           st.a2a_time * 1e6, st.a2a_time_dedup * 1e6, st.busiest_rank,
           st.busiest_tier >= 0 && st.busiest_tier < MOE_N_TIERS ? tier_names[st.busiest_tier]
                                                                 : "?");
    rc = CLI_EXIT_OK;
done:
    moe_plan_free(&plan);
    free(idx);
    free(w);
    free(rank);
    moe_topology_free(&topo);
    return rc;
}

/* ---------------------------------------------------------------- analyze */

static void analyze_usage(FILE *f)
{
    fprintf(
        f, "usage: loom moe analyze --model DIR --text FILE [options]\n\n"
           "Runs the model over the text, then re-routes every MoE layer's tokens with each\n"
           "router that works on the checkpoint's gate logits (the model's own top-k, Switch\n"
           "top-1, group-limited with one group per node, expert choice) and with hash routing\n"
           "(a table balanced on the text's own token frequencies), and re-routes the MoE\n"
           "layers' input hidden states with LocMoE's GrAP gate (fixed slice-mean scores; its\n"
           "learned eps is untrained here: one common value keeps the ReLU inactive),\n"
           "and prints per router, summed over layers: tokens per expert (max/mean, worst-layer\n"
           "CV), drops, the share of assignments on the token's rank and node, intra- and\n"
           "inter-node bytes (plain and de-duplicated per node) and the modelled all-to-all time.\n"
           "Tokens are spread over the ranks in contiguous blocks (data parallel).\n\n"
           "  --model DIR           Hugging Face MoE checkpoint directory (or random:<preset>)\n"
           "  --text FILE           UTF-8 text to run\n"
           "  --links NAME          link profile (default h100-ndr; 'loom moe links')\n"
           "  --nodes N             nodes (default 2)\n"
           "  --ranks-per-node R    ranks per node (default 4)\n"
           "  --max-tokens T        tokens of the text used (default 2048)\n"
           "  --seq-len S           tokens per forward sequence (default 256)\n"
           "  --capacity-factor CF  capacity ceil(k T cf / E) per layer; 0 = dropless (1.25)\n"
           "  --bytes-per-elem B    bytes per hidden element on the wire (default 2)\n"
           "  -h, --help            this text\n");
}

typedef struct analyze_opts {
    const char *model, *text;
    const moe_link_profile *link;
    long long nodes, rpn, max_tokens, seq_len, bpe;
    double cf;
} analyze_opts;

/* Runs ids through the model in sequences of seq_len tokens; router[l] (n, E) gets layer l's
 * gate logits (NULL for dense layers). */
static int analyze_forward(model *m, const int32_t *ids, int n, int seq_len, float **router,
                           float **hidden, loom_err *e)
{
    const model_config *c = model_get_config(m);
    const int block = 16, n_blocks = (seq_len + block - 1) / block;
    model_kv kv;
    int rc = model_kv_init(&kv, c, n_blocks, block, e);
    if (rc)
        return rc;
    int32_t *table = malloc(sizeof(int32_t) * n_blocks);
    float *logits = malloc(sizeof(float) * c->vocab_size);
    float **rl = calloc((size_t)c->n_layers, sizeof(float *));
    float **hl = calloc((size_t)c->n_layers, sizeof(float *));
    if (!table || !logits || !rl || !hl) {
        rc = loom_errf(e, LOOM_ENOMEM, "out of memory");
        goto done;
    }
    for (int i = 0; i < n_blocks; i++)
        table[i] = i;
    for (int start = 0; start < n; start += seq_len) {
        int len = n - start < seq_len ? n - start : seq_len;
        for (int l = 0; l < c->n_layers; l++) {
            rl[l] = router[l] ? router[l] + (size_t)start * c->n_experts : NULL;
            hl[l] = hidden[l] ? hidden[l] + (size_t)start * c->hidden_size : NULL;
        }
        int32_t seq_start[2] = {0, len}, ctx = 0, last = len - 1;
        const int32_t *tables[1] = {table};
        model_batch b = {
            .n_seqs = 1,
            .n_tokens = len,
            .tokens = ids + start,
            .seq_start = seq_start,
            .ctx_len = &ctx,
            .block_tables = tables,
            .n_logits = 1,
            .logit_rows = &last,
            .router_logits = rl,
            .moe_inputs = hl,
        };
        if ((rc = model_forward(m, &kv, &b, logits, e)))
            goto done;
    }
done:
    free(table);
    free(logits);
    free(rl);
    free(hl);
    model_kv_free(&kv);
    return rc;
}

/* One router over every MoE layer's logits; the per-layer statistics summed into *step. */
static int analyze_router(const moe_router_config *cfg, const model_config *c, float **router,
                          const int32_t *ids, int n, const int64_t *freq, const moe_topology *topo,
                          double cf, size_t row_bytes, float eps_shift, moe_layer_stats *step,
                          loom_err *e)
{
    moe_router r;
    moe_routing rt;
    moe_plan plan;
    memset(step, 0, sizeof(*step));
    int rc = moe_router_init(&r, cfg, e);
    if (rc)
        return rc;
    if ((rc = moe_routing_init(&rt, &r.cfg, n, e))) {
        moe_router_free(&r);
        return rc;
    }
    int E = c->n_experts, k = rt.k;
    if ((rc = moe_plan_init(&plan, n, k, E, 0, e)))
        goto done;
    if (r.hash_table && freq) /* balanced on the text's own token frequencies (Hash layers) */
        moe_hash_table_build(r.hash_table, cfg->vocab_size, E, freq, cfg->seed);
    if (r.w_gate) { /* the checkpoint's gate already ran: identity on its logits */
        memset(r.w_gate, 0, sizeof(float) * E * E);
        for (int i = 0; i < E; i++)
            r.w_gate[i * E + i] = 1.0f;
    }
    if (r.b_gate) /* untrained GrAP: one common eps for every expert (see moe_analyze) */
        for (int i = 0; i < E; i++)
            r.b_gate[i] = eps_shift;
    moe_plan_config pc = {.drop = MOE_DROP_BY_POSITION};
    for (int l = 0; l < c->n_layers; l++) {
        if (!router[l])
            continue;
        if ((rc = moe_router_forward(&r, router[l], ids, n, false, &rt, e)))
            goto done;
        int assign_k = cfg->kind == MOE_ROUTER_EXPERT_CHOICE ? cfg->k : k;
        pc.capacity = cfg->kind == MOE_ROUTER_EXPERT_CHOICE || cf <= 0
                          ? 0
                          : moe_capacity(assign_k, n, cf, E, 1);
        moe_layer_stats st;
        if ((rc = moe_plan_build(&plan, &pc, rt.expert_idx, rt.weight, n, e)) ||
            (rc = moe_layer_stats_compute(topo, rt.expert_idx, n, k, &plan, NULL, row_bytes, &st,
                                          e)))
            goto done;
        moe_stats_add(step, &st);
    }
done:
    moe_plan_free(&plan);
    moe_routing_free(&rt);
    moe_router_free(&r);
    return rc;
}

static int moe_analyze(int argc, char **argv)
{
    enum {
        OPT_MODEL = 256,
        OPT_TEXT,
        OPT_LINKS,
        OPT_NODES,
        OPT_RPN,
        OPT_MAXTOK,
        OPT_SEQ,
        OPT_CF,
        OPT_BPE
    };
    static const struct option opts[] = {
        {"model", required_argument, NULL, OPT_MODEL},
        {"text", required_argument, NULL, OPT_TEXT},
        {"links", required_argument, NULL, OPT_LINKS},
        {"nodes", required_argument, NULL, OPT_NODES},
        {"ranks-per-node", required_argument, NULL, OPT_RPN},
        {"max-tokens", required_argument, NULL, OPT_MAXTOK},
        {"seq-len", required_argument, NULL, OPT_SEQ},
        {"capacity-factor", required_argument, NULL, OPT_CF},
        {"bytes-per-elem", required_argument, NULL, OPT_BPE},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    analyze_opts o = {.link = moe_link_profile_find("h100-ndr"),
                      .nodes = 2,
                      .rpn = 4,
                      .max_tokens = 2048,
                      .seq_len = 256,
                      .bpe = 2,
                      .cf = 1.25};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL:
            o.model = optarg;
            break;
        case OPT_TEXT:
            o.text = optarg;
            break;
        case OPT_LINKS:
            if (!(o.link = moe_link_profile_find(optarg)))
                return bad_value("analyze", "--links", optarg, "one of 'loom moe links'");
            break;
        case OPT_NODES:
            if (!cli_parse_int(optarg, 1, 1024, &o.nodes))
                return bad_value("analyze", "--nodes", optarg, "an integer in [1, 1024]");
            break;
        case OPT_RPN:
            if (!cli_parse_int(optarg, 1, 64, &o.rpn))
                return bad_value("analyze", "--ranks-per-node", optarg, "an integer in [1, 64]");
            break;
        case OPT_MAXTOK:
            if (!cli_parse_int(optarg, 1, 1 << 22, &o.max_tokens))
                return bad_value("analyze", "--max-tokens", optarg, "a positive integer");
            break;
        case OPT_SEQ:
            if (!cli_parse_int(optarg, 1, 1 << 20, &o.seq_len))
                return bad_value("analyze", "--seq-len", optarg, "a positive integer");
            break;
        case OPT_CF:
            if (!parse_double(optarg, 0, 1e6, &o.cf))
                return bad_value("analyze", "--capacity-factor", optarg, "a number >= 0");
            break;
        case OPT_BPE:
            if (!cli_parse_int(optarg, 1, 8, &o.bpe))
                return bad_value("analyze", "--bytes-per-elem", optarg, "1, 2, 4 or 8");
            break;
        case 'h':
            analyze_usage(stdout);
            return CLI_EXIT_OK;
        default:
            analyze_usage(stderr);
            return CLI_EXIT_USAGE;
        }
    }
    if (!o.model || !o.text) {
        fprintf(stderr, "loom moe analyze: --model and --text are required\n"
                        "HINT: loom moe analyze --model ../shared/models/shakespeare-moe --text "
                        "../shared/data/tinyshakespeare.txt\n");
        return CLI_EXIT_USAGE;
    }
    loom_err e;
    model *m = NULL;
    tokenizer *tok = NULL;
    moe_topology topo = {0};
    char *text = NULL;
    int32_t *ids = NULL;
    float **router = NULL, **hidden = NULL;
    int64_t *freq = NULL;
    int rc = CLI_EXIT_FAIL, n_ids = 0, L = 0;
    size_t text_len;
    if (model_open(o.model, &m, &e)) {
        fprintf(stderr,
                "loom moe analyze: %s\nHINT: --model takes a Hugging Face directory or "
                "random:<preset>\n",
                e.msg);
        return CLI_EXIT_USAGE;
    }
    const model_config *cfg = model_get_config(m);
    L = cfg->n_layers;
    if (cfg->n_experts < 1) {
        fprintf(stderr, "loom moe analyze: %s has no MoE layers\n", o.model);
        rc = CLI_EXIT_USAGE;
        goto done;
    }
    if (o.seq_len > cfg->max_position_embeddings)
        o.seq_len = cfg->max_position_embeddings;
    if (!strncmp(o.model, "random:", 7))
        tok = tokenizer_create_bytes(cfg->vocab_size);
    else if (tokenizer_load_dir(o.model, &tok, &e)) {
        fprintf(stderr, "loom moe analyze: %s\n", e.msg);
        goto done;
    }
    if (loom_read_file(o.text, &text, &text_len, &e) ||
        tokenizer_encode(tok, text, text_len, false, &ids, &n_ids, &e)) {
        fprintf(stderr, "loom moe analyze: %s\n", e.msg);
        rc = CLI_EXIT_USAGE;
        goto done;
    }
    int n = n_ids < o.max_tokens ? n_ids : (int)o.max_tokens;
    int E = cfg->n_experts;
    if (n < 1) {
        fprintf(stderr, "loom moe analyze: %s has no tokens\n", o.text);
        rc = CLI_EXIT_USAGE;
        goto done;
    }
    router = calloc((size_t)L, sizeof(float *));
    hidden = calloc((size_t)L, sizeof(float *));
    for (int l = 0; l < L && router && hidden; l++)
        if (model_config_is_moe_layer(cfg, l) &&
            (!(router[l] = malloc(sizeof(float) * n * E)) ||
             !(hidden[l] = malloc(sizeof(float) * n * cfg->hidden_size)))) {
            fprintf(stderr, "loom moe analyze: out of memory\n");
            goto done;
        }
    if (!router || !hidden || analyze_forward(m, ids, n, (int)o.seq_len, router, hidden, &e) ||
        moe_topology_init(&topo, (int)o.nodes, (int)o.rpn, E, o.link, &e)) {
        fprintf(stderr, "loom moe analyze: %s\n", router ? e.msg : "out of memory");
        goto done;
    }

    int k = cfg->n_experts_per_tok > 0 ? cfg->n_experts_per_tok : 1;
    bool renorm = cfg->arch == ARCH_MIXTRAL || cfg->norm_topk_prob;
    moe_router_config rcfg[6];
    const char *names[6] = {"model top-k",
                            "switch top-1",
                            "group-limited",
                            "expert choice",
                            "hash (frequency-balanced)",
                            "locmoe (GrAP, untrained eps)"};
    moe_router_config_default(&rcfg[0], MOE_ROUTER_TOPK, E, E);
    rcfg[0].k = k;
    rcfg[0].renormalize = renorm;
    moe_router_config_default(&rcfg[1], MOE_ROUTER_TOPK, E, E);
    moe_router_config_default(&rcfg[2], MOE_ROUTER_GROUP_LIMITED, E, E);
    rcfg[2].score = MOE_SCORE_SOFTMAX;
    rcfg[2].bias_rate = 0;
    rcfg[2].k = k;
    rcfg[2].renormalize = renorm;
    if (o.nodes > 1 && E % o.nodes == 0 && k <= E / o.nodes * (o.nodes / 2 > 0 ? o.nodes / 2 : 1))
        rcfg[2].n_groups = (int)o.nodes; /* one group per node */
    rcfg[2].topk_groups = rcfg[2].n_groups / 2 > 0 ? rcfg[2].n_groups / 2 : 1;
    if (k > rcfg[2].topk_groups * (E / rcfg[2].n_groups))
        rcfg[2].topk_groups = rcfg[2].n_groups;
    moe_router_config_default(&rcfg[3], MOE_ROUTER_EXPERT_CHOICE, E, E);
    rcfg[3].k = k;
    moe_router_config_default(&rcfg[4], MOE_ROUTER_HASH, E, E);
    rcfg[4].vocab_size = cfg->vocab_size;

    int n_moe = 0;
    for (int l = 0; l < L; l++)
        n_moe += router[l] != NULL;
    printf("%s: %d tokens of %s, %d MoE layers, E = %d, k = %d; %s, %lld nodes x %lld ranks; "
           "capacity factor %g%s\n",
           o.model, n, o.text, n_moe, E, k, o.link->name, o.nodes, o.rpn, o.cf,
           o.cf > 0 ? "" : " (dropless)");
    printf(
        "| router | max/mean tokens per expert | worst-layer CV | drop %% | on rank %% | on node "
        "%% | intra MB | inter MB | inter MB dedup | a2a ms (all layers) |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|\n");
    freq = calloc((size_t)cfg->vocab_size, sizeof(int64_t));
    if (!freq) {
        fprintf(stderr, "loom moe analyze: out of memory\n");
        goto done;
    }
    for (int t = 0; t < n; t++)
        if (ids[t] >= 0 && ids[t] < cfg->vocab_size)
            freq[ids[t]]++;
    /* LocMoE's GrAP gate (eqs. 2-4) reads the hidden states themselves: expert i scores the
     * mean of the i-th slice. Its eps is learned in training; untrained, one common eps larger
     * than any |slice mean| keeps the ReLU inactive, so the ranking is the gate's own. */
    float eps_shift = 0;
    for (int l = 0; l < L; l++)
        for (size_t i = 0; hidden[l] && i < (size_t)n * cfg->hidden_size; i++)
            eps_shift = fabsf(hidden[l][i]) > eps_shift ? fabsf(hidden[l][i]) : eps_shift;
    eps_shift += 1.0f;
    moe_router_config_default(&rcfg[5], MOE_ROUTER_LOCMOE, cfg->hidden_size, E);
    for (int i = 0; i < 6; i++) {
        moe_layer_stats st;
        if (analyze_router(&rcfg[i], cfg, i == 5 ? hidden : router, ids, n, freq, &topo, o.cf,
                           (size_t)(cfg->hidden_size * o.bpe), eps_shift, &st, &e)) {
            fprintf(stderr, "loom moe analyze: %s: %s\n", names[i], e.msg);
            goto done;
        }
        printf("| %s | %.2f | %.3f | %.2f | %.1f | %.1f | %.3f | %.3f | %.3f | %.3f |\n", names[i],
               st.load_mean > 0 ? st.load_max / st.load_mean : 0, st.load_cv, 100 * st.drop_rate,
               100 * st.share_rank, 100 * st.share_node, st.bytes_intra_node / 1e6,
               st.bytes_inter_node / 1e6, st.bytes_inter_node_dedup / 1e6, st.a2a_time * 1e3);
    }
    rc = CLI_EXIT_OK;
done:
    for (int l = 0; l < L; l++) {
        if (router)
            free(router[l]);
        if (hidden)
            free(hidden[l]);
    }
    free(router);
    free(hidden);
    free(freq);
    free(ids);
    free(text);
    moe_topology_free(&topo);
    tokenizer_free(tok);
    model_free(m);
    return rc;
}

/* ---------------------------------------------------------------- dispatch */

static void usage(FILE *f)
{
    fprintf(f, "usage: loom moe <subcommand> [options]\n\n"
               "  bound     LocMoE's critical expert capacity for d, n experts and delta\n"
               "  links     the alpha-beta link profiles (H100+NDR, A100+HDR, Ascend 910A/910B)\n"
               "  comm      bytes and modelled all-to-all time of one MoE layer on a topology\n"
               "  analyze   run a model over a text and compare the routers' statistics\n\n"
               "Run 'loom moe <subcommand> --help' for its options.\n");
}

int cli_moe(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return CLI_EXIT_USAGE;
    }
    const char *sub = argv[1];
    if (!strcmp(sub, "--help") || !strcmp(sub, "-h") || !strcmp(sub, "help")) {
        usage(stdout);
        return CLI_EXIT_OK;
    }
    if (!strcmp(sub, "bound"))
        return moe_bound(argc - 1, argv + 1);
    if (!strcmp(sub, "links"))
        return moe_links(argc - 1, argv + 1);
    if (!strcmp(sub, "comm"))
        return moe_comm(argc - 1, argv + 1);
    if (!strcmp(sub, "analyze"))
        return moe_analyze(argc - 1, argv + 1);
    fprintf(stderr, "loom moe: unknown subcommand '%s'\n", sub);
    usage(stderr);
    return CLI_EXIT_USAGE;
}
