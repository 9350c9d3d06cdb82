/*
 * bench/plan: planning time for a large heterogeneous cluster (issue 3, acceptance 4: 10,000
 * machines of 8 device types in under 1 second). The cluster is generated as cluster.yaml text
 * (device kind, device count 1/2/4/8 and price drawn per machine, every machine named), then
 * each phase is timed over several repetitions: parsing the YAML, the search (throughput and
 * min-cost objectives), writing plan.yaml and parsing it back.
 *
 *   build/bench/plan [--machines 10000] [--model random:llama-1b | DIR | config.json]
 *                    [--input-len 1024] [--output-len 256] [--reps 5] [--markdown FILE]
 *
 * Without --model the model is a Llama-3-8B-shaped config. Exit status 1 when parse + search
 * takes 1 second or more.
 */
#include "loom/plan.h"
#include "loom/base.h"
#include "loom/model.h"
#include "loom/perf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *llama3_8b_json =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": 4096,"
    " \"intermediate_size\": 14336, \"num_hidden_layers\": 32, \"num_attention_heads\": 32,"
    " \"num_key_value_heads\": 8, \"vocab_size\": 128256, \"max_position_embeddings\": 8192,"
    " \"rope_theta\": 500000.0, \"torch_dtype\": \"bfloat16\", \"tie_word_embeddings\": false}";

static const char *const device_types[8] = {"H100-80G", "A100-80G", "A100-40G", "L40S",
                                            "L4",       "T4",       "V100-32G", "Ascend-910B"};

typedef struct timing {
    const char *phase;
    double best, median;
} timing;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void summarize(double *t, int n, timing *out)
{
    qsort(t, (size_t)n, sizeof(double), cmp_double);
    out->best = t[0];
    out->median = t[n / 2];
}

static char *make_cluster(int n_machines, uint64_t seed)
{
    loom_rng rng;
    rng_seed(&rng, seed);
    loom_buf b;
    buf_init(&b);
    buf_puts(&b, "machines:\n");
    static const int counts[4] = {1, 2, 4, 8};
    for (int i = 0; i < n_machines; i++) {
        const char *dev = device_types[rng_next(&rng) % 8];
        int count = counts[rng_next(&rng) % 4];
        double price = (double)(1 + rng_next(&rng) % 3) * count; /* three price levels */
        buf_printf(&b,
                   "  - {name: node-%05d, device: %s, count: %d, host: 10.%d.%d.%d, "
                   "cost_per_hour: %.2f}\n",
                   i, dev, count, (i >> 16) & 255, (i >> 8) & 255, i & 255, price);
    }
    return buf_detach(&b);
}

static int load_model(const char *spec, model_config *mc, loom_err *e)
{
    if (!spec)
        return model_config_parse(llama3_8b_json, strlen(llama3_8b_json), mc, e);
    if (!strncmp(spec, "random:", 7))
        return model_config_preset(spec + 7, mc, e);
    struct stat st;
    if (stat(spec, &st) == 0 && S_ISDIR(st.st_mode)) {
        char *p = loom_path_join(spec, "config.json");
        int rc = model_config_load(p, mc, e);
        free(p);
        return rc;
    }
    return model_config_load(spec, mc, e);
}

int main(int argc, char **argv)
{
    int n_machines = 10000, reps = 5;
    const char *model_spec = NULL, *markdown = NULL, *in_len = "1024", *out_len = "256";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: %s [--machines N] [--model SPEC] [--input-len N] [--output-len N] "
                   "[--reps N] [--markdown FILE]\n",
                   argv[0]);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: %s needs a value\n", argv[0], argv[i]);
            return 2;
        }
        if (!strcmp(argv[i], "--machines"))
            n_machines = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--model"))
            model_spec = argv[++i];
        else if (!strcmp(argv[i], "--input-len"))
            in_len = argv[++i];
        else if (!strcmp(argv[i], "--output-len"))
            out_len = argv[++i];
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--markdown"))
            markdown = argv[++i];
        else {
            fprintf(stderr, "%s: unknown flag %s (try --help)\n", argv[0], argv[i]);
            return 2;
        }
    }
    if (n_machines < 1 || n_machines > PLAN_MAX_MACHINES || reps < 1 || reps > 100) {
        fprintf(stderr, "%s: --machines 1..%d, --reps 1..100\n", argv[0], PLAN_MAX_MACHINES);
        return 2;
    }
    loom_err e;
    perf_catalog catalog;
    model_config mc;
    plan_workload w;
    if (perf_catalog_load(NULL, &catalog, &e) || load_model(model_spec, &mc, &e) ||
        plan_workload_synthetic(in_len, out_len, &w, &e)) {
        fprintf(stderr, "bench/plan: %s\n", e.msg);
        return 2;
    }
    char *yaml = make_cluster(n_machines, 1);
    size_t yaml_len = strlen(yaml);
    double *t_parse = calloc((size_t)reps, sizeof(double)),
           *t_plan = calloc((size_t)reps, sizeof(double)),
           *t_mincost = calloc((size_t)reps, sizeof(double)),
           *t_write = calloc((size_t)reps, sizeof(double)),
           *t_check = calloc((size_t)reps, sizeof(double));
    plan_result last;
    memset(&last, 0, sizeof(last));
    plan_cluster cluster;
    memset(&cluster, 0, sizeof(cluster));
    int64_t nodes = 0;
    size_t plan_bytes = 0;
    double mincost_cost = 0, mincost_target = 0;
    int mincost_machines = 0;
    bool mincost_proven = false;
    double mincost_lb = 0;
    for (int r = 0; r < reps; r++) {
        plan_cluster_free(&cluster);
        plan_result_free(&last);
        double t0 = loom_now();
        if (plan_cluster_parse(yaml, yaml_len, &cluster, &e)) {
            fprintf(stderr, "bench/plan: %s\n", e.msg);
            return 1;
        }
        double t1 = loom_now();
        plan_options o;
        plan_options_default(&o);
        if (plan_run(&cluster, &mc, "model", &w, &catalog, &o, &last, &e)) {
            fprintf(stderr, "bench/plan: %s\n", e.msg);
            return 1;
        }
        double t2 = loom_now();
        plan_options mo = o;
        mo.objective = PLAN_OBJ_MIN_COST;
        mo.target_rate = last.requests_per_s / 2;
        plan_result mr;
        if (plan_run(&cluster, &mc, "model", &w, &catalog, &mo, &mr, &e)) {
            fprintf(stderr, "bench/plan: min-cost: %s\n", e.msg);
            return 1;
        }
        double t3 = loom_now();
        mincost_cost = mr.cost_per_hour;
        mincost_target = mo.target_rate;
        mincost_machines = mr.n_machines_used;
        mincost_proven = mr.min_cost_proven;
        mincost_lb = mr.min_cost_lower_bound;
        plan_result_free(&mr);
        plan_file pf, back;
        loom_buf b;
        buf_init(&b);
        double t4 = loom_now();
        if (plan_result_to_file(&last, &pf, &e)) {
            fprintf(stderr, "bench/plan: %s\n", e.msg);
            return 1;
        }
        plan_file_write(&pf, &b);
        double t5 = loom_now();
        if (plan_file_parse(b.data, b.len, &back, &e) || !plan_file_equal(&pf, &back)) {
            fprintf(stderr, "bench/plan: plan.yaml does not round-trip: %s\n", e.msg);
            return 1;
        }
        double t6 = loom_now();
        plan_bytes = b.len;
        plan_file_free(&pf);
        plan_file_free(&back);
        buf_free(&b);
        t_parse[r] = t1 - t0;
        t_plan[r] = t2 - t1;
        t_mincost[r] = t3 - t2;
        t_write[r] = t5 - t4;
        t_check[r] = t6 - t5;
    }
    for (int k = 0; k < last.n_kinds; k++)
        nodes += last.kinds[k].nodes;
    double parse_plus_plan[100];
    for (int r = 0; r < reps; r++)
        parse_plus_plan[r] = t_parse[r] + t_plan[r];
    timing rows[6] = {{"parse cluster.yaml", 0, 0},
                      {"search (throughput)", 0, 0},
                      {"search (min-cost, half the capacity)", 0, 0},
                      {"write plan.yaml", 0, 0},
                      {"parse plan.yaml back (--check)", 0, 0},
                      {"parse + search: the acceptance figure", 0, 0}};
    summarize(t_parse, reps, &rows[0]);
    summarize(t_plan, reps, &rows[1]);
    summarize(t_mincost, reps, &rows[2]);
    summarize(t_write, reps, &rows[3]);
    summarize(t_check, reps, &rows[4]);
    summarize(parse_plus_plan, reps, &rows[5]);

    char summary[512];
    int devices = 0;
    for (int i = 0; i < cluster.n; i++)
        devices += cluster.machines[i].count;
    snprintf(summary, sizeof(summary),
             "%d machines (%d devices) of 8 device types, %.1f MB of cluster.yaml; %d machine "
             "kinds searched (%lld search nodes in all), %d (device, TP) configurations; plan: "
             "%d instances, %.0f output tok/s predicted, %.1f MB of plan.yaml; min-cost for "
             "%.1f requests/s: %d machines at $%.2f/h (%s%.3f%% above the LP lower bound)",
             n_machines, devices, yaml_len / 1e6, last.n_kinds, (long long)nodes, last.n_configs,
             last.n_instances, last.tokens_per_s, plan_bytes / 1e6, mincost_target,
             mincost_machines, mincost_cost,
             mincost_proven ? "proven optimal; " : "best found within the node limit, ",
             mincost_lb > 0 ? 100 * (mincost_cost / mincost_lb - 1) : 0.0);
    printf("%s\n\n", summary);
    printf("%-40s %12s %12s\n", "phase", "median ms", "best ms");
    for (int i = 0; i < 6; i++)
        printf("%-40s %12.2f %12.2f\n", rows[i].phase, rows[i].median * 1e3, rows[i].best * 1e3);
    bool ok = rows[5].median < 1.0;
    printf("\n%s: parse + search of %d machines in %.0f ms (limit 1000 ms)\n", ok ? "PASS" : "FAIL",
           n_machines, rows[5].median * 1e3);
    if (markdown) {
        FILE *f = fopen(markdown, "w");
        if (!f) {
            fprintf(stderr, "cannot write %s\n", markdown);
            return 1;
        }
        fprintf(f, "%s. Median and best of %d runs.\n\n", summary, reps);
        fprintf(f, "| phase | median ms | best ms |\n|---|---:|---:|\n");
        for (int i = 0; i < 6; i++)
            fprintf(f, "| %s | %.2f | %.2f |\n", rows[i].phase, rows[i].median * 1e3,
                    rows[i].best * 1e3);
        fclose(f);
    }
    plan_result_free(&last);
    plan_cluster_free(&cluster);
    perf_catalog_free(&catalog);
    free(yaml);
    free(t_parse);
    free(t_plan);
    free(t_mincost);
    free(t_write);
    free(t_check);
    return ok ? 0 : 1;
}
