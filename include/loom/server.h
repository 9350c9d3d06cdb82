/*
 * server: `loom serve`, the OpenAI-compatible HTTP front end of one engine.
 *
 * Three layers, each usable without the one above it:
 *   api_*      pure translation: request JSON bytes -> native request (or an OpenAI-style error),
 *              engine events -> OpenAI response bodies and SSE chunks. No sockets, no threads:
 *              the unit tests and the fuzz target call these directly.
 *   metrics_*  Prometheus counters and fixed-bucket histograms with vLLM's metric names.
 *   server_*   the service: a libevent (evhttp) thread that parses and formats, and an engine
 *              thread that owns the engine; they talk through a mutex-protected queue and
 *              per-request outboxes (see src/server/server.c).
 */
#ifndef LOOM_SERVER_H
#define LOOM_SERVER_H

#include "loom/base.h"
#include "loom/engine.h"
#include "loom/tokenizer.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- API requests (pure) */

typedef enum { API_COMPLETIONS, API_CHAT } api_kind;

/* An OpenAI-style error: {"error":{"message","type","param","code"}} with its HTTP status. */
typedef struct api_error {
    int status;     /* 400, 401, 404, 405, 413, 500, 503 */
    char type[40];  /* "invalid_request_error", "authentication_error", "server_error" */
    char param[40]; /* the offending field; "" = null */
    char code[40];  /* machine-readable reason ("model_not_found", ...); "" = null */
    char message[480];
} api_error;

void api_error_set(api_error *err, int status, const char *type, const char *param,
                   const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));
/* The JSON body of err (malloc'd, NUL-terminated). */
char *api_error_json(const api_error *err);

/* What a request is checked against. */
typedef struct api_limits {
    const char *model_name; /* the served model name; a request's "model" must equal it */
    int max_model_len;      /* prompt + max_tokens at most */
    int vocab_size;         /* token ids in a prompt must be below it */
} api_limits;

/* A parsed request. Strings and arrays are owned (api_request_free). */
typedef struct api_request {
    api_kind kind;
    /* The prompt as given. Completions: prompt_text, or prompt_ids directly. Chat: messages. */
    char *prompt_text;
    chat_message *messages; /* role and content strings owned here */
    int n_messages;
    int32_t *prompt_ids; /* (n_prompt) given, or made by api_request_tokenize */
    int n_prompt;
    bool max_tokens_given;  /* false: completions default 16, chat fills the context */
    sampling_params params; /* stop strings owned here (the engine copies them) */
    bool stream;
    bool include_usage; /* stream_options.include_usage */
    bool chat_logprobs; /* chat "logprobs": true (params.logprobs = top_logprobs) */
} api_request;

/*
 * JSON body -> request. Validates every field it knows (types, ranges, n == 1, echo == false,
 * model name) and leaves the prompt untokenized. Returns 0, or -1 with err filled (status 400 or
 * 404) and out freed. Pure over bytes: the fuzz target calls it.
 */
int api_request_parse(api_kind kind, const char *body, size_t len, const api_limits *lim,
                      api_request *out, api_error *err);
/*
 * Renders the chat template (add_generation_prompt) or encodes the completion prompt text, then
 * checks prompt + max_tokens against the context (400) and fills the chat default max_tokens.
 * Token-id prompts are only checked.
 */
int api_request_tokenize(api_request *r, const tokenizer *tok, const api_limits *lim,
                         api_error *err);
void api_request_free(api_request *r);

/* 'Authorization: Bearer KEY' on evreq matches api_key (constant-time); true when api_key is
 * NULL (no key configured). Used by loom serve and loom gateway. */
struct evhttp_request;
bool http_bearer_authorized(struct evhttp_request *evreq, const char *api_key);

/* vLLM's POST /tokenize ({"prompt"} or {"messages"}, add_special_tokens) and POST /detokenize
 * ({"tokens"}): the JSON reply body into out, or -1 with err (400, 404). */
int api_tokenize(const char *body, size_t len, const api_limits *lim, const tokenizer *tok,
                 loom_buf *out, api_error *err);
int api_detokenize(const char *body, size_t len, const api_limits *lim, const tokenizer *tok,
                   loom_buf *out, api_error *err);

/* ---------------------------------------------------------------- API responses (pure) */

/* One generated token as a response remembers it (only when logprobs were asked for). */
typedef struct api_token {
    int32_t id;
    float logprob;
    int n_top;
    engine_logprob top[ENGINE_MAX_LOGPROBS];
    size_t text_offset; /* completions: characters of completion text before this token */
} api_token;

/*
 * The response to one request, built from its engine events: accumulates text and tokens for a
 * non-streaming body, and remembers what a stream has already said.
 */
typedef struct api_response {
    api_kind kind;
    char id[48];          /* "cmpl-..." / "chatcmpl-..." */
    int64_t created;      /* unix seconds */
    char *model;          /* owned copy of the served model name */
    const tokenizer *tok; /* token strings for logprobs; may be NULL */
    int logprobs;         /* -1 off; else top-N wanted */
    bool chat_logprobs;   /* chat shape for logprobs */
    bool include_usage;
    loom_buf text;     /* non-streaming: the whole completion */
    size_t text_chars; /* characters of completion text so far (for text_offset) */
    api_token *tokens; /* non-streaming, logprobs only */
    int n_tokens, cap_tokens;
    finish_reason finish;
    int prompt_tokens, completion_tokens;
    int cached_tokens;
} api_response;

/* id_seq makes the id unique within the process (the server passes a counter). */
void api_response_init(api_response *r, const api_request *req, uint64_t id_seq, const char *model,
                       const tokenizer *tok);
void api_response_free(api_response *r);
/* Non-streaming: fold one event (text is the event's copied text delta) into the response. */
void api_response_add(api_response *r, const engine_event *ev, const char *text, size_t text_len);
/* Non-streaming: the full body once the request finished. */
char *api_response_json(const api_response *r);

/* Streaming: each call appends whole SSE frames ("data: {...}\n\n") to out. */
void api_stream_begin(api_response *r, loom_buf *out); /* chat: the delta.role chunk */
void api_stream_event(api_response *r, const engine_event *ev, const char *text, size_t text_len,
                      loom_buf *out);
void api_stream_end(api_response *r, loom_buf *out);        /* usage chunk if asked, [DONE] */
void api_stream_error(const api_error *err, loom_buf *out); /* error frame then [DONE] */

/* "data: <json>\n\n" */
void api_sse_frame(loom_buf *out, const char *json, size_t len);
/* Appends s (n bytes, may contain NUL) as a quoted JSON string; invalid UTF-8 -> U+FFFD. */
void api_json_string(loom_buf *out, const char *s, size_t n);
/* The text of a token for logprobs: its bytes if they are valid UTF-8, else "bytes:\xNN..."
 * (vLLM's convention). Written into out (NUL-terminated), returns its length. */
size_t api_token_text(const tokenizer *tok, int32_t id, char *out, size_t cap);

/* ---------------------------------------------------------------- metrics */

#define METRICS_MAX_BUCKETS 32

typedef struct metrics_histogram {
    const double *bounds; /* upper bounds, increasing; +Inf is implied */
    int n_bounds;
    uint64_t counts[METRICS_MAX_BUCKETS + 1]; /* per bucket (not cumulative); last = +Inf */
    double sum;
    uint64_t count;
} metrics_histogram;

/* vLLM's bucket bounds. */
extern const double metrics_ttft_buckets[];
extern const int metrics_ttft_n_buckets;
extern const double metrics_tpot_buckets[];
extern const int metrics_tpot_n_buckets;
extern const double metrics_e2e_buckets[];
extern const int metrics_e2e_n_buckets;

void metrics_histogram_init(metrics_histogram *h, const double *bounds, int n_bounds);
void metrics_histogram_observe(metrics_histogram *h, double v);

/* Prometheus text format 0.0.4. labels: 'a="x",b="y"' (already escaped) or "". */
void metrics_write_scalar(loom_buf *out, const char *name, const char *type, const char *help,
                          const char *labels, double value);
void metrics_write_histogram(loom_buf *out, const char *name, const char *help, const char *labels,
                             const metrics_histogram *h);
/* Escapes a label value (backslash, double quote, newline). */
void metrics_escape_label(loom_buf *out, const char *value);

/* Everything /metrics shows, as one snapshot. */
typedef struct server_metrics {
    engine_stats engine;
    uint64_t finished[5];   /* by finish_reason: [FINISH_STOP], [FINISH_LENGTH], ... */
    metrics_histogram ttft; /* vllm:time_to_first_token_seconds */
    metrics_histogram tpot; /* vllm:time_per_output_token_seconds (per token) */
    metrics_histogram e2e;  /* vllm:e2e_request_latency_seconds */
} server_metrics;

void server_metrics_init(server_metrics *m);
/* The whole /metrics page for model_name. */
void server_metrics_render(const server_metrics *m, const char *model_name, const char *backend,
                           loom_buf *out);

/* ---------------------------------------------------------------- server */

typedef struct server_config {
    const char *host;       /* "127.0.0.1" */
    int port;               /* 8000; 0 = any free port (server_port says which) */
    const char *model_name; /* served model name */
    const char *api_key;    /* NULL: no authentication */
    size_t max_body_bytes;  /* larger request bodies get 413 */
    bool handle_signals;    /* SIGINT/SIGTERM end server_run */
} server_config;

void server_config_default(server_config *c);

typedef struct server server;

/*
 * Binds the listening socket (an address in use is LOOM_EIO with a message saying so) and
 * takes ownership of en. mc and tok are borrowed and must outlive the server; backend_name is
 * shown in /v1/models and /metrics. Nothing runs until server_run.
 */
int server_create(const server_config *cfg, engine *en, const engine_config *ecfg,
                  const model_config *mc, const tokenizer *tok, const char *backend_name,
                  server **out, loom_err *e);
/* The port actually bound. */
int server_port(const server *s);
/* Starts the engine thread and runs the event loop until server_stop or a handled signal.
 * Ignores SIGPIPE for the process (a client that vanishes must not kill the server). */
int server_run(server *s, loom_err *e);
/* Thread-safe: makes server_run return. */
void server_stop(server *s);
void server_free(server *s);

#endif
