/*
 * gateway: `loom gateway`, one OpenAI-compatible endpoint in front of many instances (loom serve,
 * vLLM, SGLang, llama.cpp server: anything that speaks the OpenAI HTTP API). A dispatch policy
 * (loom/policy.h) picks the instance for each request, or holds it in a bounded queue until an
 * instance has room.
 *
 * Two layers, each usable without the one above it:
 *   pure helpers   request inspection (the few fields routing needs, from untrusted JSON),
 *                  the Prometheus text parser for scraped /metrics, the SSE scanner that counts
 *                  tokens in a passing stream, upstream URL parsing. No sockets: the unit tests
 *                  and fuzz targets call them directly.
 *   gateway_*      the service: one libevent thread (evhttp server for clients, evhttp client
 *                  connections to upstreams), health checks, scraping, the queue, /metrics and
 *                  the admin endpoints (see src/gateway/gateway.c).
 *
 * Depends on policy and base; reuses the server module's OpenAI error bodies and Prometheus
 * histogram helpers (api_error_*, metrics_*) so that both front doors speak alike.
 */
#ifndef LOOM_GATEWAY_H
#define LOOM_GATEWAY_H

#include "loom/base.h"
#include "loom/policy.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- upstreams */

#define GATEWAY_MAX_UPSTREAMS 1024

/*
 * One instance behind the gateway. From --upstream URL[=weight], or from a plan (`loom plan`'s
 * plan.yaml, `--plan`), which also fills the rates and KV size it predicts for the instance.
 */
typedef struct gateway_upstream_spec {
    char url[256]; /* "http://host:port" with an optional path prefix, no trailing slash */
    char host[128];
    int port;
    char base_path[96];  /* "" or "/prefix" */
    double weight;       /* static capacity weight (1) */
    double prefill_rate; /* prompt tokens/s; 0 = weight x the default */
    double decode_rate;  /* output tokens/s; 0 = weight x the default */
    double kv_tokens;    /* KV cache size in tokens; 0 = learnt from /metrics */
    int max_batch;       /* sequences the instance runs at once (the plan's); 0 = unknown */
} gateway_upstream_spec;

/*
 * "http://host:port[/prefix][=weight]" (http only; the scheme may be omitted). A trailing
 * "=W" with W a positive number is the weight. Returns 0, or LOOM_EINVAL with a message.
 */
int gateway_upstream_parse(const char *arg, gateway_upstream_spec *out, loom_err *e);

/* ---------------------------------------------------------------- plans (`--plan`, `loom up`) */

struct plan_file; /* loom/plan.h */

/* Where instances of a plan listen when nothing else says: a plan has hosts, not ports, so the
 * k-th instance (from 0, in plan order) on a host listens on GATEWAY_PLAN_BASE_PORT + k. */
#define GATEWAY_PLAN_BASE_PORT 8001

/*
 * One upstream per instance of p, in plan order, into out (p->n_instances of them). Address:
 * the instance's host (127.0.0.1 when it has none) and ports[i], or, when ports is NULL,
 * base_port + its rank among the plan's instances on that host. Rates: the plan's predicted
 * prefill and decode tokens/s (capacity_aware's starting rates); KV size: kv_blocks x
 * block_size tokens; max_batch: the plan's (capacity_aware's waves); weight (weighted_round_robin): predicted output tokens/s relative to the
 * slowest instance's. Pure. Returns 0, or LOOM_EINVAL (an empty plan, a port out of range).
 */
int gateway_upstreams_from_plan(const struct plan_file *p, const int *ports, int base_port,
                                gateway_upstream_spec *out, loom_err *e);

/* Whether host names this machine: empty, "localhost", loopback, this host's name, or an
 * address of one of its interfaces (getifaddrs). */
bool gateway_host_is_local(const char *host);

/* A TCP port free on host right now (bind to port 0, read it back, close); < 0 with a message
 * in e when none. Another process may take it before the caller binds it: callers retry. */
int gateway_free_port(const char *host, loom_err *e);

/*
 * GET /health on host:port, blocking, at most timeout_s seconds in all: the HTTP status, or
 * -1 when the connection fails or no status line comes in time. For `loom up` waiting for the
 * instances it started (the gateway's own checks are asynchronous, in its event loop).
 */
int gateway_probe_health(const char *host, int port, double timeout_s);

/* ---------------------------------------------------------------- request inspection (pure) */

/* The routes proxied to an instance. Completions and chat go through the dispatch policy;
 * /tokenize and /detokenize (vLLM's) are passed through to any available instance. */
typedef enum {
    GATEWAY_COMPLETIONS,
    GATEWAY_CHAT,
    GATEWAY_TOKENIZE,
    GATEWAY_DETOKENIZE
} gateway_endpoint;

#define GATEWAY_PREFIX_BLOCK_BYTES 64 /* text prompts hash 64-byte blocks (~16 tokens) */
#define GATEWAY_PREFIX_BLOCK_IDS 16   /* token-id prompts hash blocks of 16 ids */

/* What routing needs from a request body; the body itself is passed on unchanged. */
typedef struct gateway_request_info {
    char model[128]; /* "" when absent (or too long: truncated) */
    bool stream;
    bool include_usage;  /* stream_options.include_usage */
    int64_t max_tokens;  /* max_tokens or max_completion_tokens; 0 = not given */
    double prompt_chars; /* characters of text prompt (chat: all message text) */
    double prompt_ids;   /* token ids given directly (completions prompt as ids) */
    /* chained hashes of the prompt's leading blocks (policy_prefix_hashes), seeded by model */
    uint64_t prefix[POLICY_MAX_PREFIX_BLOCKS];
    int n_prefix;
    bool prefix_is_ids; /* blocks are GATEWAY_PREFIX_BLOCK_IDS ids, else 64 bytes of text */
} gateway_request_info;

/*
 * Reads the fields above from a JSON body; the prefix hashes only when hash_prefix (routing
 * with prefix affinity). Only a body that is not a JSON object is refused (return -1 with a
 * message in err): every other check is the upstream's, which answers with its own error. Pure
 * over bytes: the fuzz target calls it.
 */
int gateway_request_inspect(gateway_endpoint ep, const char *body, size_t len, bool hash_prefix,
                            gateway_request_info *out, char *err, size_t err_cap);

/* ---------------------------------------------------------------- scraped metrics (pure) */

/* The gauges the gateway reads from an upstream's /metrics. Unknown ones stay < 0. */
typedef struct gateway_scrape {
    double num_running;   /* vllm:num_requests_running, summed over series */
    double num_waiting;   /* vllm:num_requests_waiting, summed */
    double kv_usage;      /* vllm:kv_cache_usage_perc (or gpu_cache_usage_perc), mean, 0..1 */
    double num_kv_blocks; /* loom:num_kv_blocks, else cache_config_info's num_gpu_blocks */
    double block_size;    /* vllm:cache_config_info{block_size=...} */
    int samples;          /* samples parsed (any name) */
} gateway_scrape;

/* One sample of the Prometheus text format. Strings point into the parser's scratch space and
 * live until the callback returns. */
typedef struct gateway_prom_sample {
    const char *name;
    int n_labels;
    const char *label_names[16];
    const char *label_values[16];
    double value;
} gateway_prom_sample;

/*
 * Prometheus text exposition format 0.0.4: calls fn for every well-formed sample line; comment,
 * blank and malformed lines are skipped (a malformed line never stops the parse). Returns the
 * number of samples. Bounded: lines over 64 KiB are skipped.
 */
int gateway_prom_parse(const char *text, size_t len,
                       void (*fn)(void *ctx, const gateway_prom_sample *s), void *ctx);
/* The gauges above from a /metrics page. */
void gateway_scrape_parse(const char *text, size_t len, gateway_scrape *out);
/* The KV size in tokens it implies (default_block_size when the page does not say), or -1. */
double gateway_scrape_kv_tokens(const gateway_scrape *s, int default_block_size);

/* ---------------------------------------------------------------- SSE scanning (pure) */

/*
 * Watches a passing text/event-stream without holding it up: bytes are forwarded by the caller
 * as they come; this only keeps the current unfinished line (bounded) to count content frames
 * and read a usage object when one goes by.
 */
typedef struct gateway_sse {
    char *line;               /* partial line carried between chunks */
    size_t len, cap;          /* cap grows to at most 64 KiB; longer lines are skipped */
    bool skipping;            /* inside an over-long line */
    int64_t frames;           /* data frames seen (not [DONE]) */
    int64_t content_frames;   /* frames carrying generated text (about one token each) */
    double prompt_tokens;     /* from a usage object; < 0 none seen */
    double completion_tokens; /* likewise */
    bool done;                /* saw "data: [DONE]" */
    bool error;               /* saw a frame with an "error" object */
} gateway_sse;

void gateway_sse_init(gateway_sse *s);
void gateway_sse_feed(gateway_sse *s, const char *data, size_t len);
void gateway_sse_free(gateway_sse *s);
/* usage.prompt_tokens / completion_tokens of a complete JSON body (non-streaming), from its last
 * "usage" object alone; -1 each when absent. */
void gateway_usage_parse(const char *body, size_t len, double *prompt_tokens,
                         double *completion_tokens);

/* ---------------------------------------------------------------- the service */

typedef struct gateway_config {
    const char *host; /* "127.0.0.1" */
    int port;         /* 8080; 0 = any free port (gateway_port says which) */
    const char *policy;
    policy_config policy_cfg;
    const gateway_upstream_spec *upstreams;
    int n_upstreams;
    const char *api_key;          /* clients must send it (Bearer); NULL: open */
    const char *upstream_api_key; /* sent to upstreams; NULL: pass the client's header on
                                     (dropped when the gateway has its own key) */
    size_t max_body_bytes;        /* larger request bodies get 413 (8 MiB) */
    int queue_size;               /* requests waiting in the gateway at most (1024) */
    double queue_timeout_s;       /* longest wait before 503 + Retry-After (30) */
    int retries;                  /* other instances tried when nothing reached the client (2) */
    double upstream_timeout_s;    /* silence on an upstream connection before it fails (600) */
    double health_interval_s;     /* active health checks: GET /health every (1; 0 = off) */
    double health_timeout_s;      /* (2) */
    int healthy_threshold;        /* consecutive passes to (re)admit (2) */
    int unhealthy_threshold;      /* consecutive failures to eject (2) */
    int max_fails;                /* consecutive failed requests that eject passively (3) */
    double scrape_interval_s;     /* GET /metrics every (1; 0 = never) */
    int kv_block_size;            /* tokens per KV block when /metrics does not say (16) */
    double default_output_tokens; /* expected output before any is observed (256) */
    double chars_per_token;       /* text prompt size before any is observed (4) */
    size_t max_client_buffer;     /* a client this far behind a stream is dropped (16 MiB) */
    int max_idle_connections;     /* idle keep-alive connections kept per upstream (64) */
    bool handle_signals;          /* SIGINT/SIGTERM end gateway_run */
    /* called on the gateway's thread every tick (50 ms) while gateway_run runs, for an embedder's
     * own bounded housekeeping (`loom up` watches its instances); NULL: none */
    void (*tick_fn)(void *arg, double now);
    void *tick_arg;
} gateway_config;

void gateway_config_default(gateway_config *c);

typedef struct gateway gateway;

/* Binds the listening socket and sets up the upstreams (nothing is contacted until run). */
int gateway_create(const gateway_config *cfg, gateway **out, loom_err *e);
int gateway_port(const gateway *g);
/* Runs the event loop until gateway_stop or a handled signal. Ignores SIGPIPE. */
int gateway_run(gateway *g, loom_err *e);
/* Thread-safe: makes gateway_run return. */
void gateway_stop(gateway *g);
void gateway_free(gateway *g);

#endif
