/*
 * perf: the performance model shared by the planner, the emulated backend and the simulator.
 *
 *   device catalog   vendor figures per accelerator (data/devices.yaml)
 *   model cost       weight bytes, KV bytes per token, FLOPs and bytes moved per step
 *   memory model     weights/TP + reserve must fit in utilization x memory; the rest is KV
 *   latency model    step time = overhead + c_prefill*FLOPs(prompt tokens)/rate
 *                               + c_decode*FLOPs(decode tokens, matmuls)/rate
 *                               + c_attention*FLOPs(decode attention over the cache)/rate
 *                               + c_memory*bytes/bandwidth + c_comm*all-reduce(alpha-beta)
 *                               + host_token*sampled tokens, fitted by least squares; linear
 *                               in a step's composition, so mixed continuous-batching steps add up
 *   throughput       steady-state tokens/s of an instance at the batch its KV capacity allows
 *
 * Depends on base only (loom/model.h for the model_config struct). Units are SI throughout:
 * bytes, FLOP, seconds, bytes/s, FLOP/s. "Device" is one accelerator (one GPU, one NPU, one
 * GCD of an MI250X, one CPU core); an instance is tp devices of one machine.
 */
#ifndef LOOM_PERF_H
#define LOOM_PERF_H

#include "loom/base.h"
#include "loom/model.h"

#include <stdbool.h>
#include <stdint.h>

/* ---------------------------------------------------------------- latency coefficients */

/* step seconds = overhead + compute_prefill * t_compute_prefill + compute_decode *
 * t_compute_decode + attention * t_attention + memory * t_memory + comm * t_comm
 * + host_token * sampled, where the t_ terms are the ideal roofline times (efficiency 1).
 * compute_prefill = 1/0.6 means prompt GEMMs reach 60% of peak. Prompt and decode tokens get
 * their own compute efficiency (GEMM vs GEMV-like shapes); decode attention over the cached
 * context gets a third (on a GPU its cost is the KV read, inside memory, and the default equals
 * compute_decode; on a CPU the per-position dot products are compute-bound and grow with the
 * context much faster than the KV bytes). host_token is host time per sampled token that does
 * not scale with the device (detokenising, streaming a chunk to the client): 0 by default, it
 * matters where the host is the device (a 1-core CPU instance). Memory traffic, communication
 * and the per-step overhead are shared. */
typedef struct perf_coef {
    double overhead; /* seconds per step (scheduling, launches, sampling) */
    double compute_prefill;
    double compute_decode;
    double memory;
    double comm;
    double attention;  /* decode attention FLOPs (QK^T, PV over the cached context) */
    double host_token; /* seconds per sampled token */
} perf_coef;

/* The built-in defaults, used when neither the catalog nor a profile gives coefficients. */
void perf_coef_default(perf_coef *c);

/* ---------------------------------------------------------------- device catalog */

#define PERF_NAME_MAX 32

typedef struct perf_device {
    char name[PERF_NAME_MAX]; /* "H100-80G"; matched case-insensitively */
    char vendor[16];
    char link[24];           /* "NVLink4", "HCCS", "PCIe4", "none" */
    double mem_bytes;        /* per device */
    double flops;            /* dense BF16/F16 FLOP/s (F32 GEMM for cpu) */
    double mem_bw;           /* bytes/s */
    double link_bw;          /* bytes/s, per direction, one device's aggregate */
    double link_latency;     /* seconds per all-reduce step (alpha) */
    double cost_per_hour;    /* per device, 0 = unknown */
    double runtime_overhead; /* bytes per device held by the runtime (context, graphs) */
    int weight_bytes;        /* bytes per weight and per KV element (2; 4 on cpu) */
    bool pooled;             /* cpu: cores share one memory; no all-reduce; any tp */
    perf_coef coef;          /* catalog coefficients (defaults unless the file sets them) */
} perf_device;

typedef struct perf_catalog {
    int n;
    perf_device *devices;
    char *path; /* where it was loaded from, or NULL */
} perf_catalog;

/* Parses a catalog (YAML, or JSON): { devices: [ {name, memory_gib, bf16_tflops, ...} ] }.
 * Errors name the line. Unknown keys are errors (typos would otherwise pass silently). */
int perf_catalog_parse(const char *text, size_t len, perf_catalog *out, loom_err *e);
/* path NULL: perf_catalog_default_path(). */
int perf_catalog_load(const char *path, perf_catalog *out, loom_err *e);
void perf_catalog_free(perf_catalog *c);
const perf_device *perf_catalog_find(const perf_catalog *c, const char *name);
/* $LOOM_CATALOG, else data/devices.yaml under the working directory, else beside the
 * executable (../data or ../../data). Returns a static string; NULL when none exists. */
const char *perf_catalog_default_path(void);

/* ---------------------------------------------------------------- model cost */

/* Parameter counts of one model, split the way the cost model needs them. */
typedef struct perf_model {
    char name[64];
    int n_layers, hidden, n_heads, n_kv_heads, head_dim, vocab;
    int n_experts, n_experts_per_tok; /* 0 for dense */
    int n_moe_layers;
    double params_total;       /* all parameters */
    double params_attn;        /* attention projections + norms, all layers */
    double params_dense_mlp;   /* MLPs of dense layers */
    double params_expert;      /* one routed expert of one layer (3 d I_e) */
    double params_shared;      /* shared experts and routers, all MoE layers */
    double params_embed;       /* input embedding (a row lookup per token) */
    double params_lm_head;     /* output projection (tied: same tensor, read again) */
    double ffn_active_width;   /* mean over layers of the FFN width a token passes through */
    int weight_bytes;          /* bytes per parameter */
    int kv_bytes;              /* bytes per KV element */
    double kv_bytes_per_token; /* 2 L Hkv hd kv_bytes, whole model */
} perf_model;

/* weight_bytes/kv_bytes: 2 for bf16/f16, 4 for f32. */
int perf_model_init(perf_model *pm, const model_config *mc, const char *name, int weight_bytes,
                    int kv_bytes, loom_err *e);
/* Weight bytes of the whole model. */
double perf_model_weight_bytes(const perf_model *pm);

/* The shape of one engine step, as its prompt part and its decode part. A prefill of a prompt
 * of l tokens has prefill_tokens = l, prefill_pairs = l(l+1)/2, prefill_kv_read = l; a decode
 * step of B sequences with C cached tokens in all has decode_seqs = B, decode_ctx = C. A
 * continuous-batching step has both (perf_step_add). */
typedef struct perf_step {
    double prefill_tokens;  /* prompt tokens computed */
    double prefill_seqs;    /* sequences they belong to */
    double prefill_logits;  /* of those, the ones whose prompt ends here (they sample) */
    double prefill_pairs;   /* sum over prompt tokens of the positions each attends to */
    double prefill_kv_read; /* KV positions the prompt chunks read */
    double decode_seqs;     /* sequences adding one token (each samples) */
    double decode_ctx;      /* their cached positions, summed */
} perf_step;

/* Chunk of a prefill: n_tokens prompt tokens of prompts whose lengths have the given mean and
 * mean square (the chunk is a slice of such prompts). */
void perf_step_prefill(perf_step *s, double n_tokens, double mean_len, double mean_len_sq);
/* Decode step of batch sequences with ctx_tokens cached positions in all. */
void perf_step_decode(perf_step *s, double batch, double ctx_tokens);
/* s += t */
void perf_step_add(perf_step *s, const perf_step *t);
double perf_step_tokens(const perf_step *s);

/* What a step costs one device of a tp-way instance, and the ideal time of each term. */
typedef struct perf_terms {
    double flops;                               /* per device */
    double weight_bytes;                        /* weights read, per device */
    double kv_bytes;                            /* KV read + written, per device */
    double act_bytes;                           /* activations read + written, per device */
    double comm_bytes;                          /* all-reduce payload per device */
    int comm_steps;                             /* all-reduce steps (alpha terms) */
    double t_compute;                           /* flops / rate */
    double t_compute_prefill, t_compute_decode; /* its split by token kind; decode without */
    double t_attention; /* decode attention over the cache: 4 H hd L (ctx + 1) / rate */
    double sampled;     /* tokens sampled (decode sequences + prompts that end here) */
    double t_memory;                            /* (weights + kv + act) / bandwidth */
    double t_comm; /* sum of ring all-reduces by the alpha-beta link model */
} perf_terms;

void perf_step_terms(const perf_model *pm, const perf_device *dev, int tp, const perf_step *s,
                     perf_terms *out);
double perf_coef_apply(const perf_coef *c, const perf_terms *t);
/* Ring all-reduce of bytes over tp devices: 2(tp-1) alpha + 2(tp-1)/tp bytes/beta. */
double perf_allreduce_seconds(double bytes, int tp, double alpha, double beta);

/* ---------------------------------------------------------------- memory model */

typedef struct perf_limits {
    double mem_utilization;     /* fraction of device memory the instance may use (0.9) */
    int block_size;             /* tokens per KV block (16) */
    int max_num_seqs;           /* engine cap on the running batch (256) */
    int max_num_batched_tokens; /* token budget of one step, sizes the activation reserve (2048) */
} perf_limits;
void perf_limits_default(perf_limits *l);

/* Request lengths of a workload, as the model needs them. */
typedef struct perf_lengths {
    double mean_in, mean_out;
    double mean_in_sq; /* E[l_in^2], for the quadratic attention term of prefill */
} perf_lengths;

/* One step as it ran on an instance (its composition) and how long it took there. Whatever
 * drives the instance (the engine in process, or HTTP batches against a server) produces
 * these; perf turns them into roofline terms and fits (perf_profile_fit). */
typedef struct perf_timed_step {
    perf_step step;
    double seconds;
    int kind; /* PERF_STEP_PREFILL or PERF_STEP_DECODE: what the sample was meant to time */
} perf_timed_step;

enum { PERF_STEP_PREFILL = 0, PERF_STEP_DECODE = 1 };

#define PERF_PROFILE_MAX_STEPS 64 /* timed steps a profile keeps at most */

/* Where a profile timed steps, how far the fitted model was off: a step's prompt part and its
 * decode part are each corrected by the relative residual (measured - model) / model of the
 * timed steps of that kind, interpolated at its shape (prompts: mean length, tokens; decodes:
 * batch, context per sequence; linear in the logarithms, held constant beyond the grid). So
 * inside the profiled grid a prediction follows the timings where the linear model cannot
 * (a CPU's GEMM efficiency keeps rising with the batch: docs/planner.md). */
typedef struct perf_correction_point {
    int kind;      /* PERF_STEP_PREFILL or PERF_STEP_DECODE */
    double x, y;   /* log mean prompt length, log tokens; log batch, log context per sequence */
    double rho;    /* (measured - model) / model */
} perf_correction_point;

typedef struct perf_correction {
    int n; /* 0: none */
    perf_correction_point pt[PERF_PROFILE_MAX_STEPS];
} perf_correction;

/* One instance: a model on tp devices of one kind, with coefficients and engine limits. */
typedef struct perf_setup {
    const perf_model *model;
    const perf_device *device;
    int tp;
    perf_coef coef;
    perf_limits limits;
    perf_correction corr; /* from a profile's steps (perf_setup_correct); n = 0: none */
} perf_setup;

/* Fills s with the device's catalog coefficients and default limits. */
void perf_setup_init(perf_setup *s, const perf_model *pm, const perf_device *dev, int tp);
/* The residuals of s's model (its coefficients as set now) on timed steps: perf_correction. */
void perf_setup_correct(perf_setup *s, const perf_timed_step *steps, int n);

typedef struct perf_memory {
    double usable;      /* per device: utilization x memory */
    double weights;     /* per device */
    double activations; /* per device: workspace for one step at the token budget */
    double runtime;     /* per device: runtime overhead */
    double reserve;     /* activations + runtime */
    double kv;          /* per device, left for the KV cache (may be negative) */
    int64_t kv_tokens;  /* whole instance */
    int64_t kv_blocks;
    int max_batch; /* sequences of mean length that fit (capped by max_num_seqs) */
    bool fits;     /* weights + reserve fit and at least one request fits */
    char why[160]; /* when !fits: one line, for example
                      "weights 26.1 GiB + reserve 3.0 GiB > 28.8 GiB usable" */
} perf_memory;

/* tp must be a valid degree for the model (perf_tp_valid). */
void perf_memory_plan(const perf_setup *s, const perf_lengths *w, perf_memory *out);
/* tp divides heads and KV heads (any tp on a pooled device); writes why not into why. */
bool perf_tp_valid(const perf_model *pm, const perf_device *dev, int tp, char *why, size_t cap);

/* ---------------------------------------------------------------- latency and throughput */

/* Modelled seconds of a step; terms (may be NULL) receives the roofline terms. */
double perf_step_seconds(const perf_setup *s, const perf_step *st, perf_terms *terms);

typedef struct perf_estimate {
    perf_memory mem;
    int batch;                   /* sequences running at steady state */
    double requests_per_step;    /* x: requests admitted (and finished) per step */
    perf_step step;              /* the steady-state step: x prompts + the running decodes */
    double t_step;               /* its seconds */
    double t_prefill_chunk;      /* a pure prefill step of max_num_batched_tokens tokens */
    double t_decode_step;        /* a pure decode step at batch */
    double prefill_tokens_per_s; /* prompt tokens/s of pure prefill steps */
    double decode_tokens_per_s;  /* generated tokens/s of pure decode steps at batch */
    double output_tokens_per_s;  /* steady state, generated tokens */
    double total_tokens_per_s;   /* steady state, prompt + generated */
    double requests_per_s;
    double prefill_fraction; /* share of the step time the prompt tokens cost */
    bool token_bound;        /* x limited by the token budget (else by the batch) */
} perf_estimate;

/*
 * Steady-state throughput of one instance under a saturating workload, as loom's engine (and
 * vLLM with chunked prefill) runs it: every step carries the decodes of the running sequences
 * plus prompt tokens up to the token budget, with at most `batch` sequences running (the memory
 * model's max_batch, which the plan sets as the instance's max_num_seqs). In steady state x
 * requests enter and leave per step:
 *   x = min( budget / (in + out - 1),  batch / (out - 1 + s_p) )
 * where s_p is the steps a prompt spends in prefill (in / room left by the decodes, >= 1). The
 * step then has x in prompt tokens and x (out - 1) decodes at mean context in + out/2, and
 * throughput is x out / t_step. Zero rates when the instance does not fit.
 */
void perf_estimate_instance(const perf_setup *s, const perf_lengths *w, perf_estimate *out);

/* ---------------------------------------------------------------- fitting */

/* Least squares min |A x - y| by Householder QR. A is (n, p) row-major, n >= p, p <= 16.
 * rss (may be NULL) receives the residual sum of squares. LOOM_EINVAL when A is rank deficient. */
int perf_lstsq(const double *A, const double *y, int n, int p, double *x, double *rss, loom_err *e);

typedef struct perf_sample {
    perf_terms terms; /* from perf_step_terms for the step that was timed */
    double seconds;   /* measured */
} perf_sample;

/*
 * Fits coefficients to samples (prefill, decode and mixed steps together) by least squares on
 * relative error: each row is divided by its measured time, so short and long steps weigh
 * alike. A term whose column is zero in every sample (comm at tp=1), or that the samples cannot
 * tell apart from the others, keeps its value from prior; a coefficient that comes out negative
 * is clamped to 0 and the rest refitted. rel_rms: root-mean-square relative error of the fit.
 */
int perf_fit(const perf_sample *samples, int n, const perf_coef *prior, perf_coef *out,
             double *rel_rms, loom_err *e);

/* ---------------------------------------------------------------- profiles */

/* A profile: coefficients fitted on one device kind at one tp (and, optionally, one model), and
 * the timed steps they were fitted on (when the file keeps them: its steps: list). */
typedef struct perf_profile {
    char device[PERF_NAME_MAX];
    int tp;
    char model[64]; /* "" = any model */
    int n_samples;
    perf_coef coef;
    double rel_rms; /* fit error over all samples, relative RMS */
    int n_steps;    /* 0: the file keeps none */
    perf_timed_step steps[PERF_PROFILE_MAX_STEPS];
} perf_profile;

/*
 * The lightweight profiling grid `loom profile` times (a few dozen steps): pure prompt steps of
 * 1, 2 and 4 prompts of 64..max_prompt tokens (chunks of at most max_tokens) and pure decode
 * steps of 1..max_batch sequences (powers of 4 between) at max_context cached tokens each and
 * at its quarters down to 8 tokens, four contexts at most. Writes at most cap steps to out;
 * returns how many the full grid has (29 for 2048-token prompts, batch 256 and 4096-token
 * contexts).
 */
int perf_profile_grid(int max_prompt, int max_tokens, int max_batch, int max_context,
                      perf_step *out, int cap);

int perf_profile_parse(const char *text, size_t len, perf_profile *out, loom_err *e);
int perf_profile_load(const char *path, perf_profile *out, loom_err *e);
/* YAML text of p into b (buf_init'ed by the caller). */
void perf_profile_write(const perf_profile *p, loom_buf *b);
/* The profile in dir (*.yaml, *.yml, *.json) for device and tp; one naming model wins over one
 * for any model. LOOM_ENOTFOUND when none matches; other errors when a file is malformed. */
int perf_profile_find(const char *dir, const char *device, int tp, const char *model,
                      perf_profile *out, loom_err *e);

/* ---------------------------------------------------------------- profiling runs */

/*
 * Fits the latency coefficients of model pm on tp devices of kind dev to timed steps, starting
 * from prior (dev->coef when NULL), and fills out: device name, tp, model_name ("" = any
 * model), the sample count, the coefficients and the fit's relative RMS error. errors (may be
 * NULL) receives each step's relative error (predicted - measured) / measured.
 */
int perf_profile_fit(const perf_model *pm, const perf_device *dev, int tp, const char *model_name,
                     const perf_timed_step *steps, int n, const perf_coef *prior,
                     perf_profile *out, double *errors, loom_err *e);

/* Appends the timed steps to a profile written by perf_profile_write, as its `steps:` list
 * (what `loom profile --refit` fits again when the model changes, without re-measuring). */
void perf_profile_write_steps(const perf_timed_step *steps, int n, loom_buf *b);

/* What `loom profile --host` measures: the host as the catalog's pooled `cpu` device. */
typedef struct perf_host {
    int cores;          /* online CPUs */
    double mem_bytes;   /* physical memory, whole host */
    double mem_bw;      /* bytes/s, all cores streaming together (whole host) */
    double mem_bw_one;  /* bytes/s, one core streaming alone */
    double gemm_flops;  /* F32 GEMM FLOP/s of one core (the caller measures it: perf has no BLAS) */
    double gemm_flops_all; /* F32 GEMM FLOP/s with every core, whole host */
} perf_host;

/* Physical memory and online CPUs. */
void perf_host_basics(perf_host *h);
/* Triad bandwidth (a[i] = b[i] + s c[i], 24 bytes per element moved) over buffers of `bytes`
 * each, on `threads` threads at once, best of `reps`: bytes/s of all threads together. */
double perf_host_stream(int threads, size_t bytes, int reps);
/* A catalog holding one `cpu` entry with the host's figures (per core: memory and bandwidth
 * are the host's shares, FLOP/s the one-core GEMM rate), commented with what was measured. */
void perf_host_write_catalog(const perf_host *h, loom_buf *b);

/* Bytes as "26.1 GiB" into out. */
void perf_format_bytes(double bytes, char *out, size_t cap);

#endif
