/*
 * `loom plan`: cluster + model + workload -> the best deployment (plan.yaml) and a readable
 * table; `--explain DEVICE:TP` shows the model's terms; `--check PLAN` validates a plan file.
 * Argument parsing and wiring only: the work is in src/plan and src/perf.
 */
#include "cli.h"

#include "loom/model.h"
#include "loom/perf.h"
#include "loom/plan.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#define MAX_EXPLAIN 16

typedef struct plan_cli {
    const char *cluster, *model, *workload, *input_len, *output_len, *catalog, *profiles;
    const char *output, *check;
    const char *explain[MAX_EXPLAIN];
    int n_explain;
    bool quiet, no_output;
    plan_options opts;
} plan_cli;

enum {
    OPT_CLUSTER = 256,
    OPT_MODEL,
    OPT_WORKLOAD,
    OPT_INPUT_LEN,
    OPT_OUTPUT_LEN,
    OPT_CATALOG,
    OPT_PROFILES,
    OPT_OBJECTIVE,
    OPT_TARGET_RATE,
    OPT_TP,
    OPT_UTIL,
    OPT_BLOCK_SIZE,
    OPT_MAX_SEQS,
    OPT_MAX_BATCHED,
    OPT_DTYPE,
    OPT_RUNNER_UPS,
    OPT_OUTPUT,
    OPT_NO_OUTPUT,
    OPT_EXPLAIN,
    OPT_QUIET,
    OPT_CHECK,
    OPT_CORRECTION,
};

static const struct option long_opts[] = {
    {"cluster", required_argument, NULL, OPT_CLUSTER},
    {"model", required_argument, NULL, OPT_MODEL},
    {"workload", required_argument, NULL, OPT_WORKLOAD},
    {"input-len", required_argument, NULL, OPT_INPUT_LEN},
    {"output-len", required_argument, NULL, OPT_OUTPUT_LEN},
    {"catalog", required_argument, NULL, OPT_CATALOG},
    {"profiles", required_argument, NULL, OPT_PROFILES},
    {"objective", required_argument, NULL, OPT_OBJECTIVE},
    {"target-rate", required_argument, NULL, OPT_TARGET_RATE},
    {"tp", required_argument, NULL, OPT_TP},
    {"gpu-memory-utilization", required_argument, NULL, OPT_UTIL},
    {"block-size", required_argument, NULL, OPT_BLOCK_SIZE},
    {"max-num-seqs", required_argument, NULL, OPT_MAX_SEQS},
    {"max-num-batched-tokens", required_argument, NULL, OPT_MAX_BATCHED},
    {"dtype", required_argument, NULL, OPT_DTYPE},
    {"runner-ups", required_argument, NULL, OPT_RUNNER_UPS},
    {"output", required_argument, NULL, OPT_OUTPUT},
    {"no-output", no_argument, NULL, OPT_NO_OUTPUT},
    {"explain", required_argument, NULL, OPT_EXPLAIN},
    {"quiet", no_argument, NULL, OPT_QUIET},
    {"check", required_argument, NULL, OPT_CHECK},
    {"profile-correction", no_argument, NULL, OPT_CORRECTION},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* clang-format off */
static void plan_help(FILE *f)
{
    fprintf(f,
"usage: loom plan --cluster FILE --model SPEC [--workload TRACE | --input-len N --output-len N]\n"
"                 [options]\n"
"       loom plan --check PLAN [--cluster FILE] [--model SPEC]\n"
"\n"
"Chooses, for every machine, how to cut its accelerators into inference instances (tensor-\n"
"parallel degrees; mixed degrees on one machine allowed) so that the cluster serves the\n"
"workload at the highest throughput (or lowest cost). Each candidate is checked by a memory\n"
"model and scored by a roofline latency model; the search is exhaustive. Writes plan.yaml and\n"
"prints a table with runner-ups and why each rejected configuration was rejected.\n"
"See docs/planner.md for the models.\n"
"\n"
"inputs:\n"
"  --cluster FILE               machines, YAML or JSON:\n"
"                                 machines:\n"
"                                   - {name: a, device: H100-80G, count: 8, host: 10.0.0.5,\n"
"                                      cost_per_hour: 98.3}\n"
"                                   - {name: t4, device: T4, count: 4, replicas: 10}\n"
"                               devices are names from the catalog; see data/clusters/\n"
"  --model SPEC                 a Hugging Face directory (its config.json), a config.json file,\n"
"                               or a preset (random:llama-1b or llama-1b)\n"
"  --workload TRACE             Azure LLM trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)\n"
"                               or Mooncake JSONL (timestamp, input_length, output_length)\n"
"  --input-len N|LO:HI          synthetic prompt lengths, fixed or uniform (default 512)\n"
"  --output-len N|LO:HI         synthetic output lengths (default 128)\n"
"  --catalog FILE               device catalog (default data/devices.yaml; $LOOM_CATALOG)\n"
"  --profiles DIR               latency profiles from `loom profile` (device, tp, fitted\n"
"                               coefficients); configurations without one use the catalog's\n"
"  --profile-correction         also correct the fitted model by the profiles' timed steps\n"
"                               (their residuals, interpolated): follows the timings inside\n"
"                               the profiled grid, and their noise (docs/planner.md)\n"
"\n"
"search:\n"
"  --objective NAME             throughput (default): most output tokens/s;\n"
"                               throughput-per-cost: most tokens per dollar of the devices in\n"
"                               use (idle devices are not charged); min-cost: the cheapest set\n"
"                               of machines that reaches --target-rate\n"
"  --target-rate R              min-cost target in requests/s (default: the trace's mean\n"
"                               arrival rate)\n"
"  --tp LIST                    allowed degrees, e.g. 1,2,4 (default: every degree that divides\n"
"                               the heads and KV heads)\n"
"  --gpu-memory-utilization F   fraction of device memory an instance may use (0.9)\n"
"  --block-size N               tokens per KV block (16)\n"
"  --max-num-seqs N             running sequences per instance at most (256)\n"
"  --max-num-batched-tokens N   tokens per step; sizes the activation reserve (2048)\n"
"  --dtype bf16|f16|f32         weight and KV width (default: the device's; bf16 on\n"
"                               accelerators, f32 on cpu, as loom's CPU backend holds them)\n"
"  --runner-ups N               partitions shown after the best, per machine kind (3)\n"
"\n"
"output:\n"
"  --output FILE                where to write the plan (default plan.yaml; - for stdout)\n"
"  --no-output                  do not write a plan file\n"
"  --explain DEVICE:TP          print the model's terms for one configuration (repeatable),\n"
"                               for example --explain H100-80G:2\n"
"  --quiet                      no table\n"
"  --check PLAN                 validate PLAN and check that it round-trips; with --cluster,\n"
"                               that its machines and devices exist; with --model, that each\n"
"                               instance's KV blocks fit the memory model\n"
"  -h, --help                   this text\n"
"\n"
"exit status: 0 planned, 1 a file could not be written, 2 bad flags or impossible inputs\n"
"(unknown device, a model that fits on no machine, an empty trace, a TP that divides nothing).\n");
}
/* clang-format on */

static bool parse_double(const char *s, double lo, double hi, double *out)
{
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        return false;
    *out = v;
    return true;
}

static bool parse_tp_list(const char *s, plan_options *o)
{
    o->n_tp_allowed = 0;
    const char *p = s;
    while (*p) {
        char *end = NULL;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 1 || v > PLAN_MAX_DEVICES_PER_MACHINE ||
            o->n_tp_allowed == (int)(sizeof(o->tp_allowed) / sizeof(o->tp_allowed[0])))
            return false;
        o->tp_allowed[o->n_tp_allowed++] = (int)v;
        if (*end == ',')
            end++;
        else if (*end)
            return false;
        p = end;
    }
    return o->n_tp_allowed > 0;
}

/* random:<preset>, <preset>, a directory holding config.json, or a config.json file. */
static int load_model(const char *spec, model_config *mc, char *name, size_t cap, loom_err *e)
{
    const char *preset = strncmp(spec, "random:", 7) == 0 ? spec + 7 : NULL;
    struct stat st;
    if (!preset && stat(spec, &st) != 0) {
        for (const char *const *p = model_preset_names(); *p; p++)
            if (!strcmp(*p, spec))
                preset = spec;
    }
    if (preset) {
        snprintf(name, cap, "%s", preset);
        return model_config_preset(preset, mc, e);
    }
    if (stat(spec, &st) != 0)
        return loom_errf(e, LOOM_ENOTFOUND,
                         "model '%s' is not a directory, a config.json or "
                         "a preset (random:llama-1b, ...)",
                         spec);
    char *path = S_ISDIR(st.st_mode) ? loom_path_join(spec, "config.json") : xstrdup(spec);
    int rc = model_config_load(path, mc, e);
    /* the name: the directory's base name (of the file's directory for a config.json) */
    char *dir = xstrdup(spec);
    if (!S_ISDIR(st.st_mode)) {
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = 0;
        else
            dir[0] = 0;
    }
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/')
        dir[--n] = 0;
    const char *base = strrchr(dir, '/');
    base = base ? base + 1 : dir;
    snprintf(name, cap, "%s", *base && strcmp(base, ".") ? base : "model");
    free(dir);
    free(path);
    return rc;
}

static int run_check(plan_cli *o)
{
    loom_err e = {0};
    plan_file p, again;
    plan_cluster cluster = {0};
    perf_catalog catalog = {0};
    model_config mc;
    char name[128];
    loom_buf first, second;
    buf_init(&first);
    buf_init(&second);
    int rc = CLI_EXIT_USAGE;
    if (plan_file_load(o->check, &p, &e)) {
        fprintf(stderr, "loom plan: %s\n", e.msg);
        return CLI_EXIT_USAGE;
    }
    plan_file_write(&p, &first);
    if (plan_file_parse(first.data, first.len, &again, &e)) {
        fprintf(stderr, "loom plan: %s: the rewritten plan does not parse: %s\n", o->check, e.msg);
        goto out_p;
    }
    plan_file_write(&again, &second);
    bool round_trips = plan_file_equal(&p, &again) && first.len == second.len &&
                       !memcmp(first.data, second.data, first.len);
    plan_file_free(&again);
    if (!round_trips) {
        fprintf(stderr, "loom plan: %s does not round-trip (parse, write, parse differ)\n",
                o->check);
        goto out_p;
    }
    if (o->cluster && plan_cluster_load(o->cluster, &cluster, &e)) {
        fprintf(stderr, "loom plan: %s\n", e.msg);
        goto out_p;
    }
    bool with_model = o->model != NULL;
    if (with_model && (load_model(o->model, &mc, name, sizeof(name), &e) ||
                       perf_catalog_load(o->catalog, &catalog, &e))) {
        fprintf(stderr, "loom plan: %s\n", e.msg);
        goto out_c;
    }
    if (plan_file_check(&p, o->cluster ? &cluster : NULL, with_model ? &mc : NULL,
                        with_model ? &catalog : NULL, &o->opts, &e)) {
        fprintf(stderr, "loom plan: %s: %s\n", o->check, e.msg);
        goto out_c;
    }
    printf("%s: valid, %d instances, %.1f output tok/s predicted; round-trips%s%s\n", o->check,
           p.n_instances, p.output_tokens_per_s, o->cluster ? "; matches the cluster" : "",
           o->model ? "; fits the memory model" : "");
    rc = CLI_EXIT_OK;
out_c:
    plan_cluster_free(&cluster);
    perf_catalog_free(&catalog);
out_p:
    plan_file_free(&p);
    buf_free(&first);
    buf_free(&second);
    return rc;
}

static int write_plan(const plan_result *r, const char *path)
{
    loom_err e = {0};
    plan_file pf;
    if (plan_result_to_file(r, &pf, &e)) {
        fprintf(stderr, "loom plan: %s\n", e.msg);
        return CLI_EXIT_FAIL;
    }
    loom_buf b;
    buf_init(&b);
    plan_file_write(&pf, &b);
    plan_file_free(&pf);
    int rc = CLI_EXIT_OK;
    if (!strcmp(path, "-")) {
        fwrite(b.data, 1, b.len, stdout);
    } else {
        FILE *f = fopen(path, "w");
        if (!f || fwrite(b.data, 1, b.len, f) != b.len || fclose(f) != 0) {
            fprintf(stderr,
                    "loom plan: cannot write %s: %s\nHINT: pass --output to a "
                    "writable path, or --no-output\n",
                    path, strerror(errno));
            if (f)
                fclose(f);
            rc = CLI_EXIT_FAIL;
        } else {
            fprintf(stderr, "wrote %s (%d instances); check it with: loom plan --check %s\n", path,
                    r->n_instances, path);
        }
    }
    buf_free(&b);
    return rc;
}

int cli_plan(int argc, char **argv)
{
    plan_cli o;
    memset(&o, 0, sizeof(o));
    plan_options_default(&o.opts);
    o.output = "plan.yaml";
    long long v;
    double dv;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        switch (c) {
        case OPT_CLUSTER:
            o.cluster = optarg;
            break;
        case OPT_MODEL:
            o.model = optarg;
            break;
        case OPT_WORKLOAD:
            o.workload = optarg;
            break;
        case OPT_INPUT_LEN:
            o.input_len = optarg;
            break;
        case OPT_OUTPUT_LEN:
            o.output_len = optarg;
            break;
        case OPT_CATALOG:
            o.catalog = optarg;
            break;
        case OPT_PROFILES:
            o.profiles = optarg;
            break;
        case OPT_CORRECTION:
            o.opts.profile_correction = true;
            break;
        case OPT_OBJECTIVE:
            if (plan_objective_parse(optarg, &o.opts.objective))
                return cli_usage_error("plan",
                                       "--objective '%s': use throughput, throughput-per-cost or "
                                       "min-cost",
                                       optarg);
            break;
        case OPT_TARGET_RATE:
            if (!parse_double(optarg, 1e-12, 1e12, &o.opts.target_rate))
                return cli_usage_error(
                    "plan", "--target-rate '%s': a positive number of requests/s", optarg);
            break;
        case OPT_TP:
            if (!parse_tp_list(optarg, &o.opts))
                return cli_usage_error(
                    "plan", "--tp '%s': a comma-separated list of degrees, e.g. 1,2,4", optarg);
            break;
        case OPT_UTIL:
            if (!parse_double(optarg, 0.01, 1.0, &dv))
                return cli_usage_error(
                    "plan", "--gpu-memory-utilization '%s': a fraction in (0, 1]", optarg);
            o.opts.limits.mem_utilization = dv;
            break;
        case OPT_BLOCK_SIZE:
            if (!cli_parse_int(optarg, 1, 1 << 16, &v))
                return cli_usage_error("plan", "--block-size '%s': an integer in [1, 65536]",
                                       optarg);
            o.opts.limits.block_size = (int)v;
            break;
        case OPT_MAX_SEQS:
            if (!cli_parse_int(optarg, 1, 1 << 20, &v))
                return cli_usage_error("plan", "--max-num-seqs '%s': an integer >= 1", optarg);
            o.opts.limits.max_num_seqs = (int)v;
            break;
        case OPT_MAX_BATCHED:
            if (!cli_parse_int(optarg, 1, 1 << 24, &v))
                return cli_usage_error("plan", "--max-num-batched-tokens '%s': an integer >= 1",
                                       optarg);
            o.opts.limits.max_num_batched_tokens = (int)v;
            break;
        case OPT_DTYPE:
            if (!strcasecmp(optarg, "bf16") || !strcasecmp(optarg, "bfloat16") ||
                !strcasecmp(optarg, "f16") || !strcasecmp(optarg, "float16"))
                o.opts.weight_bytes = 2;
            else if (!strcasecmp(optarg, "f32") || !strcasecmp(optarg, "float32"))
                o.opts.weight_bytes = 4;
            else
                return cli_usage_error("plan", "--dtype '%s': bf16, f16 or f32", optarg);
            break;
        case OPT_RUNNER_UPS:
            if (!cli_parse_int(optarg, 0, 100, &v))
                return cli_usage_error("plan", "--runner-ups '%s': an integer in [0, 100]", optarg);
            o.opts.runner_ups = (int)v;
            break;
        case OPT_OUTPUT:
            o.output = optarg;
            break;
        case OPT_NO_OUTPUT:
            o.no_output = true;
            break;
        case OPT_EXPLAIN:
            if (o.n_explain == MAX_EXPLAIN)
                return cli_usage_error("plan", "--explain: at most %s configurations", "16");
            o.explain[o.n_explain++] = optarg;
            break;
        case OPT_QUIET:
            o.quiet = true;
            break;
        case OPT_CHECK:
            o.check = optarg;
            break;
        case 'h':
            plan_help(stdout);
            return CLI_EXIT_OK;
        default:
            return cli_usage_error("plan", "%s", "unknown flag");
        }
    }
    if (optind < argc)
        return cli_usage_error("plan", "unexpected argument '%s'", argv[optind]);
    if (o.check)
        return run_check(&o);
    if (!o.cluster || !o.model)
        return cli_usage_error("plan", "%s",
                               "--cluster and --model are required (or --check PLAN)");
    if (o.workload && (o.input_len || o.output_len))
        return cli_usage_error("plan", "%s",
                               "give --workload or --input-len/--output-len, not both");
    o.opts.profiles_dir = o.profiles;

    loom_err e = {0};
    int rc = CLI_EXIT_USAGE;
    plan_cluster cluster = {0};
    perf_catalog catalog = {0};
    plan_workload w;
    memset(&w, 0, sizeof(w));
    plan_result r;
    memset(&r, 0, sizeof(r));
    model_config mc;
    char name[128];
    if (plan_cluster_load(o.cluster, &cluster, &e)) {
        fprintf(stderr, "loom plan: %s\nHINT: see data/clusters/ for examples\n", e.msg);
        goto out;
    }
    if (perf_catalog_load(o.catalog, &catalog, &e)) {
        fprintf(stderr, "loom plan: %s\n", e.msg);
        goto out;
    }
    if (load_model(o.model, &mc, name, sizeof(name), &e)) {
        fprintf(stderr, "loom plan: %s\n", e.msg);
        goto out;
    }
    int wrc = o.workload ? plan_workload_load(o.workload, &w, &e)
                         : plan_workload_synthetic(o.input_len ? o.input_len : "512",
                                                   o.output_len ? o.output_len : "128", &w, &e);
    if (wrc) {
        fprintf(stderr, "loom plan: %s\n", e.msg);
        goto out;
    }
    if (plan_run(&cluster, &mc, name, &w, &catalog, &o.opts, &r, &e)) {
        fprintf(stderr, "loom plan: %s\n", e.msg);
        if (strstr(e.msg, "fits on no machine"))
            fprintf(stderr, "HINT: machines with more memory per device, a larger "
                            "--gpu-memory-utilization, a smaller --max-num-batched-tokens or "
                            "--max-num-seqs, or --dtype bf16 on cpu may make it fit\n");
        else if (strstr(e.msg, "unknown device"))
            fprintf(stderr,
                    "HINT: device names are those of the catalog (%s); add an entry "
                    "there or pass --catalog FILE\n",
                    catalog.path ? catalog.path : "data/devices.yaml");
        goto out;
    }
    if (!o.quiet)
        plan_print_table(&r, stdout);
    for (int i = 0; i < o.n_explain; i++) {
        char dev[64];
        const char *colon = strrchr(o.explain[i], ':');
        long long tp = 0;
        if (!colon || colon == o.explain[i] || (size_t)(colon - o.explain[i]) >= sizeof(dev) ||
            !cli_parse_int(colon + 1, 1, PLAN_MAX_DEVICES_PER_MACHINE, &tp)) {
            rc = cli_usage_error("plan", "--explain '%s': DEVICE:TP, for example H100-80G:2",
                                 o.explain[i]);
            goto out;
        }
        snprintf(dev, sizeof(dev), "%.*s", (int)(colon - o.explain[i]), o.explain[i]);
        loom_buf b;
        buf_init(&b);
        if (plan_explain(&r, dev, (int)tp, &b, &e)) {
            buf_free(&b);
            fprintf(stderr, "loom plan: --explain %s: %s\n", o.explain[i], e.msg);
            goto out;
        }
        printf("\n%s", b.data ? b.data : "");
        buf_free(&b);
    }
    rc = o.no_output ? CLI_EXIT_OK : write_plan(&r, o.output);
out:
    plan_result_free(&r);
    plan_workload_free(&w);
    perf_catalog_free(&catalog);
    plan_cluster_free(&cluster);
    return rc;
}
