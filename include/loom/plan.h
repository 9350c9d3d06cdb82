/*
 * plan: deployment planning for heterogeneous clusters (`loom plan`). For every machine, choose
 * how to cut its devices into inference instances (tensor-parallel degrees, mixed degrees on one
 * machine allowed) so that the cluster's throughput is highest, or its cost lowest for a target
 * rate. Every candidate is checked by the memory model and scored by the throughput model of
 * perf; the search is exhaustive over partitions (as multisets of degrees: symmetric partitions
 * are one) and runs once per distinct machine kind (duplicate machines share it).
 *
 *   cluster.yaml + model config + workload --plan_run--> plan_result --> plan.yaml + table
 *
 * Depends on perf and trace (and base).
 */
#ifndef LOOM_PLAN_H
#define LOOM_PLAN_H

#include "loom/base.h"
#include "loom/model.h"
#include "loom/perf.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* ---------------------------------------------------------------- cluster */

#define PLAN_MAX_MACHINES 200000
#define PLAN_MAX_DEVICES_PER_MACHINE 1024

typedef struct plan_machine {
    char name[64];
    char device[PERF_NAME_MAX]; /* a catalog name */
    int count;                  /* devices of that kind */
    char host[128];             /* "" when not given */
    double cost_per_hour;       /* whole machine; 0 = count x the catalog's cost (if any) */
    int line;                   /* in cluster.yaml, for messages */
} plan_machine;

typedef struct plan_cluster {
    int n;
    plan_machine *machines;
} plan_cluster;

/*
 * cluster.yaml (or JSON):
 *   machines:
 *     - {name: a100-0, device: A100-80G, count: 8, host: 10.0.0.5, cost_per_hour: 32.8}
 *     - {name: t4, device: T4, count: 4, replicas: 3}          # t4-0, t4-1, t4-2
 *     - {name: l4, device: L4, count: 2, hosts: [h1, h2]}      # l4-0 on h1, l4-1 on h2
 * Errors name the line. Names must be unique (after replicas expand).
 */
int plan_cluster_parse(const char *text, size_t len, plan_cluster *out, loom_err *e);
int plan_cluster_load(const char *path, plan_cluster *out, loom_err *e);
void plan_cluster_free(plan_cluster *c);

/* ---------------------------------------------------------------- workload */

typedef struct plan_request {
    double t;    /* arrival, seconds from the first request */
    int32_t in;  /* prompt tokens */
    int32_t out; /* generated tokens */
} plan_request;

typedef struct plan_workload {
    char source[256];       /* file name, or "fixed 512/128", "uniform 128:1024/64:256" */
    int64_t n;              /* requests in the trace (0 for a synthetic distribution) */
    plan_request *requests; /* (n) or NULL */
    double mean_in, mean_out, mean_in_sq;
    int max_in, max_out;
    double duration; /* first to last arrival, seconds (0 when unknown) */
    double rate;     /* mean arrival rate, requests/s (0 when unknown) */
} plan_workload;

/* Traces through the shared parsers (formats in loom/trace.h): Azure LLM inference trace CSV
 * (a header naming TIMESTAMP, ContextTokens, GeneratedTokens in any order, or none), Mooncake
 * JSONL. name is used in messages ("name:LINE: ..."); a trace without requests, or whose
 * outputs average under one token, is an error. */
int plan_workload_parse_azure(const char *text, size_t len, const char *name, plan_workload *out,
                              loom_err *e);
int plan_workload_parse_mooncake(const char *text, size_t len, const char *name, plan_workload *out,
                                 loom_err *e);
/* By extension (.csv Azure; .jsonl/.json Mooncake), else by the first byte; name: the
 * file's base name. */
int plan_workload_load(const char *path, plan_workload *out, loom_err *e);
/* Synthetic: each spec is "N" (fixed) or "LO:HI" (uniform integers in [LO, HI]). */
int plan_workload_synthetic(const char *input_spec, const char *output_spec, plan_workload *out,
                            loom_err *e);
void plan_workload_free(plan_workload *w);
void plan_workload_lengths(const plan_workload *w, perf_lengths *out);

/* ---------------------------------------------------------------- search */

typedef enum {
    PLAN_OBJ_THROUGHPUT, /* most output tokens/s (default) */
    PLAN_OBJ_PER_COST,   /* most output tokens/s per dollar of the devices in use */
    PLAN_OBJ_MIN_COST,   /* cheapest set of machines that reaches target_rate requests/s */
} plan_objective;

const char *plan_objective_name(plan_objective o);
int plan_objective_parse(const char *s, plan_objective *out);

typedef struct plan_options {
    perf_limits limits; /* utilization, block size, max_num_seqs, token budget */
    int weight_bytes;   /* 0 = each device's default (2; 4 on cpu) */
    plan_objective objective;
    double target_rate;       /* min-cost: requests/s; 0 = the trace's mean arrival rate */
    const char *profiles_dir; /* NULL: catalog coefficients */
    bool profile_correction;  /* also correct by the profiles' timed steps (perf_correction) */
    int runner_ups;           /* partitions listed after the best, per machine kind (3) */
    int64_t max_nodes;        /* search nodes per machine kind before giving up (4,000,000) */
    int n_tp_allowed;         /* 0 = every degree; else only these (--tp 1,2,4) */
    int tp_allowed[16];
} plan_options;
void plan_options_default(plan_options *o);

/* One (device kind, tp) configuration: memory and throughput of a single instance. */
typedef struct plan_config {
    const perf_device *device;
    int tp;
    bool tp_ok;       /* tp divides heads and KV heads */
    bool fits;        /* and the memory model accepts it */
    char why[200];    /* when not */
    perf_setup setup; /* the coefficients used */
    bool profiled;    /* coefficients from a profile file */
    perf_model model; /* at the device's dtype width */
    perf_estimate est;
} plan_config;

/* A partition of one machine's devices: counts[j] instances of the kind's j-th fitting tp. */
typedef struct plan_partition {
    int *counts;
    int n_instances, devices_used;
    double tokens_per_s; /* output tokens/s of the machine */
    double requests_per_s;
    double cost_per_hour; /* of the devices in use (per-cost) or of the machine */
    double score;         /* what the objective ranks */
} plan_partition;

/* Machines with the same device kind, count and cost: searched once. */
typedef struct plan_kind {
    const perf_device *device;
    int count;
    double cost_per_hour; /* machine */
    int n_machines;
    int n_tps;
    plan_config **tps; /* (n_tps) fitting configurations, descending tp */
    plan_partition best;
    int n_runner_ups;
    plan_partition *runner_ups;
    bool feasible;  /* some instance fits */
    bool truncated; /* node limit reached: best found, not proven */
    int64_t nodes;
    int machines_used; /* min-cost: how many of them the plan uses */
} plan_kind;

typedef struct plan_result {
    plan_options opts;
    char model_name[128];
    double model_params, model_active_params;
    plan_workload workload; /* summary copy (requests not kept) */
    perf_lengths lengths;
    const plan_cluster *cluster; /* borrowed */
    int n_configs;
    plan_config *configs; /* every (device kind in use, tp <= its largest count) */
    int n_kinds;
    plan_kind *kinds;
    int *machine_kind;  /* (cluster->n) */
    bool *machine_used; /* (cluster->n) */
    int n_reasons;
    char (*reasons)[240]; /* rejected configuration classes, one line each */
    double tokens_per_s, total_tokens_per_s, requests_per_s, cost_per_hour, target_rate;
    int n_instances, n_machines_used;
    bool min_cost_proven;
    double min_cost_lower_bound; /* LP relaxation: no set of machines is cheaper */
} plan_result;

/*
 * Plans. Errors (LOOM_EINVAL / LOOM_ENOTFOUND, message in e): unknown device, a model that
 * fits on no machine, an empty workload, a min-cost target above the cluster's capacity, a cost
 * objective without costs.
 */
int plan_run(const plan_cluster *cluster, const model_config *mc, const char *model_name,
             const plan_workload *w, const perf_catalog *catalog, const plan_options *opts,
             plan_result *out, loom_err *e);
void plan_result_free(plan_result *r);

/* The readable report: the winner per machine kind with runner-ups, each configuration's
 * figures and the rejected configuration classes with the reason. */
void plan_print_table(const plan_result *r, FILE *f);
/* The model's terms for one configuration (device kind name and tp), as text into b. */
int plan_explain(const plan_result *r, const char *device, int tp, loom_buf *b, loom_err *e);

/* ---------------------------------------------------------------- plan.yaml */

typedef struct plan_file_instance {
    char machine[64];
    char host[128];
    char device[PERF_NAME_MAX];
    int tp;
    int *devices; /* (tp) device indices on the machine, owned */
    int block_size;
    int64_t kv_blocks;
    int max_batch;
    double prefill_tokens_per_s, decode_tokens_per_s;
    double output_tokens_per_s, total_tokens_per_s, requests_per_s;
} plan_file_instance;

typedef struct plan_file {
    char model[128];
    char objective[32];
    char workload[256];
    double mean_input, mean_output;
    double output_tokens_per_s, total_tokens_per_s, requests_per_s, cost_per_hour;
    int n_instances;
    plan_file_instance *instances;
} plan_file;

/* The deployment of r (instances of every machine in use, devices numbered from 0). */
int plan_result_to_file(const plan_result *r, plan_file *out, loom_err *e);
void plan_file_write(const plan_file *p, loom_buf *b);
/* Parses and validates: tp = number of devices, devices of one machine disjoint and in range
 * [0, 1024), rates >= 0, totals equal the sums of the instances. */
int plan_file_parse(const char *text, size_t len, plan_file *out, loom_err *e);
int plan_file_load(const char *path, plan_file *out, loom_err *e);
void plan_file_free(plan_file *p);
bool plan_file_equal(const plan_file *a, const plan_file *b);
/* Checks p against a cluster when non-NULL (machines exist, device kinds match, device indices
 * < count) and against the memory model when mc and catalog are non-NULL (tp valid, kv_blocks
 * within capacity). */
int plan_file_check(const plan_file *p, const plan_cluster *cluster, const model_config *mc,
                    const perf_catalog *catalog, const plan_options *opts, loom_err *e);

#endif
