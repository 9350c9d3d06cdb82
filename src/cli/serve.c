/*
 * `loom serve`: flags -> model, tokenizer, CPU backend, engine, server; then serve until
 * SIGINT/SIGTERM. Argument parsing and wiring only: the work is in src/model, src/engine and
 * src/server.
 */
#include "cli.h"

#include "loom/emulated.h"
#include "loom/engine.h"
#include "loom/model.h"
#include "loom/server.h"
#include "loom/tensor.h"
#include "loom/tokenizer.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEFAULT_KV_BYTES (4ull << 30)

typedef struct serve_opts {
    const char *model;
    const char *host;
    long long port;
    const char *served_name;
    long long threads;
    long long block_size;
    long long num_kv_blocks;  /* 0 = from --kv-cache-memory or the default */
    uint64_t kv_cache_memory; /* 0 = default */
    long long max_num_seqs;
    long long max_num_batched_tokens;
    long long max_model_len; /* 0 = the model's */
    long long max_waiting;   /* 0 = unbounded */
    bool prefix_caching;
    const char *api_key;
    uint64_t max_body_bytes;
    long long seed;
    const char *backend;
    const char *device;  /* emulated backend: catalog device name */
    long long tp;        /* emulated backend: tensor-parallel degree */
    const char *catalog; /* emulated backend: device catalog (data/devices.yaml) */
} serve_opts;

enum {
    OPT_MODEL = 256,
    OPT_HOST,
    OPT_PORT,
    OPT_SERVED_NAME,
    OPT_THREADS,
    OPT_BLOCK_SIZE,
    OPT_NUM_KV_BLOCKS,
    OPT_KV_MEMORY,
    OPT_MAX_NUM_SEQS,
    OPT_MAX_BATCHED,
    OPT_MAX_MODEL_LEN,
    OPT_MAX_WAITING,
    OPT_PREFIX_ON,
    OPT_PREFIX_OFF,
    OPT_API_KEY,
    OPT_MAX_BODY,
    OPT_SEED,
    OPT_BACKEND,
    OPT_DEVICE,
    OPT_TP,
    OPT_CATALOG,
};

static const struct option long_opts[] = {
    {"model", required_argument, NULL, OPT_MODEL},
    {"host", required_argument, NULL, OPT_HOST},
    {"port", required_argument, NULL, OPT_PORT},
    {"served-model-name", required_argument, NULL, OPT_SERVED_NAME},
    {"threads", required_argument, NULL, OPT_THREADS},
    {"block-size", required_argument, NULL, OPT_BLOCK_SIZE},
    {"num-kv-blocks", required_argument, NULL, OPT_NUM_KV_BLOCKS},
    {"kv-cache-memory", required_argument, NULL, OPT_KV_MEMORY},
    {"max-num-seqs", required_argument, NULL, OPT_MAX_NUM_SEQS},
    {"max-num-batched-tokens", required_argument, NULL, OPT_MAX_BATCHED},
    {"max-model-len", required_argument, NULL, OPT_MAX_MODEL_LEN},
    {"max-waiting", required_argument, NULL, OPT_MAX_WAITING},
    {"enable-prefix-caching", no_argument, NULL, OPT_PREFIX_ON},
    {"no-enable-prefix-caching", no_argument, NULL, OPT_PREFIX_OFF},
    {"api-key", required_argument, NULL, OPT_API_KEY},
    {"max-body-bytes", required_argument, NULL, OPT_MAX_BODY},
    {"seed", required_argument, NULL, OPT_SEED},
    {"backend", required_argument, NULL, OPT_BACKEND},
    {"device", required_argument, NULL, OPT_DEVICE},
    {"tp", required_argument, NULL, OPT_TP},
    {"catalog", required_argument, NULL, OPT_CATALOG},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* The help text, laid out as it prints. */
/* clang-format off */
static const char serve_help_text[] =
"usage: loom serve --model <HF directory | random:<preset>> [options]\n"
"\n"
"Serves one model with continuous batching over a paged KV cache, behind an OpenAI-compatible\n"
"HTTP API: POST /v1/completions, POST /v1/chat/completions (SSE streaming with\n"
"stream=true), GET /v1/models, GET /health, GET /metrics (Prometheus, vLLM's metric names).\n"
"\n"
"model:\n"
"  --model SPEC                 a Hugging Face directory (config.json, *.safetensors, single or\n"
"                               sharded, tokenizer.json) or random:<preset> for random weights:\n"
"                               llama-tiny, llama-125m, llama-1b, mixtral-tiny, mixtral-1b,\n"
"                               qwen2-tiny, qwen2moe-tiny. Weights are held in F32: BF16/F16\n"
"                               checkpoints are widened to F32 at load (2x their file size).\n"
"  --served-model-name NAME     the name clients send as \"model\" (default: the --model value)\n"
"  --seed N                     seed of random:<preset> weights and of unseeded sampling (0)\n"
"  --backend cpu|emulated       where the forward pass runs: cpu (real compute), or emulated:\n"
"                               the real scheduler and KV accounting, random tokens, and each\n"
"                               step lasts what the performance model predicts for --device\n"
"                               (no weights are loaded; /v1/models and /metrics say emulated)\n"
"  --device NAME                emulated device from the catalog, e.g. H100-80G, V100-32G, T4\n"
"  --tp N                       emulated tensor-parallel degree (1)\n"
"  --catalog FILE               device catalog (data/devices.yaml)\n"
"  --threads N                  BLAS/OpenMP threads of the forward pass (default: online CPUs)\n"
"\n"
"scheduling and KV cache:\n"
"  --block-size N               tokens per KV cache block (16)\n"
"  --num-kv-blocks N            KV cache size in blocks, or\n"
"  --kv-cache-memory BYTES      KV cache size in bytes: 2GiB, 512MiB, 1e9 (default: 4GiB, at\n"
"                               most a quarter of RAM and no more than --max-num-seqs full\n"
"                               contexts need)\n"
"  --max-num-seqs N             sequences running at once at most (256)\n"
"  --max-num-batched-tokens N   tokens per scheduler step at most; longer prompts are\n"
"                               prefilled in chunks (2048)\n"
"  --max-model-len N            prompt + completion tokens at most (default: the model's\n"
"                               max_position_embeddings, lowered to what the KV cache holds)\n"
"  --max-waiting N              requests waiting for admission at most; beyond, 503 (default:\n"
"                               unbounded)\n"
"  --enable-prefix-caching      reuse the KV blocks of shared prompt prefixes (default)\n"
"  --no-enable-prefix-caching   turn that off\n"
"\n"
"HTTP:\n"
"  --host ADDR                  address to listen on (127.0.0.1; 0.0.0.0 for every interface)\n"
"  --port N                     port (8000; 0 picks a free one, printed at start)\n"
"  --api-key KEY                require 'Authorization: Bearer KEY' on /v1/* (default: the\n"
"                               LOOM_API_KEY environment variable, else no key)\n"
"  --max-body-bytes BYTES       request bodies over this get 413 (8MiB)\n"
"  -h, --help                   this text\n"
"\n"
"Exit status: 0 after SIGINT/SIGTERM, 1 if the server cannot start (for example the port is\n"
"in use), 2 for bad flags or a model that cannot be loaded.\n"
"\n"
"example:\n"
"  loom serve --model random:llama-tiny --port 8000\n"
"  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\\n"
"       -d '{\"prompt\": \"Hello\", \"max_tokens\": 16}'\n";
/* clang-format on */

/* A failure after the flags were accepted: one line, the given exit code. */
static int fail(int code, const char *msg)
{
    fprintf(stderr, "loom serve: error: %s\n", msg);
    return code;
}

static int parse_opts(int argc, char **argv, serve_opts *o, bool *help)
{
    memset(o, 0, sizeof(*o));
    o->host = "127.0.0.1";
    o->port = 8000;
    o->threads = sysconf(_SC_NPROCESSORS_ONLN) > 0 ? sysconf(_SC_NPROCESSORS_ONLN) : 1;
    o->block_size = 16;
    o->max_num_seqs = 256;
    o->max_num_batched_tokens = 2048;
    o->prefix_caching = true;
    o->api_key = getenv("LOOM_API_KEY");
    o->max_body_bytes = 8ull << 20;
    o->backend = "cpu";
    o->tp = 1;
    *help = false;

    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":h", long_opts, NULL)) != -1) {
        const char *a = optarg;
        bool ok = true;
        switch (c) {
        case OPT_MODEL:
            o->model = a;
            break;
        case OPT_HOST:
            o->host = a;
            break;
        case OPT_PORT:
            ok = cli_parse_int(a, 0, 65535, &o->port);
            break;
        case OPT_SERVED_NAME:
            o->served_name = a;
            ok = *a != 0;
            break;
        case OPT_THREADS:
            ok = cli_parse_int(a, 1, 4096, &o->threads);
            break;
        case OPT_BLOCK_SIZE:
            ok = cli_parse_int(a, 1, 4096, &o->block_size);
            break;
        case OPT_NUM_KV_BLOCKS:
            ok = cli_parse_int(a, 1, 1LL << 30, &o->num_kv_blocks);
            break;
        case OPT_KV_MEMORY:
            ok = cli_parse_bytes(a, &o->kv_cache_memory) && o->kv_cache_memory > 0;
            break;
        case OPT_MAX_NUM_SEQS:
            ok = cli_parse_int(a, 1, 1 << 20, &o->max_num_seqs);
            break;
        case OPT_MAX_BATCHED:
            ok = cli_parse_int(a, 1, 1 << 24, &o->max_num_batched_tokens);
            break;
        case OPT_MAX_MODEL_LEN:
            ok = cli_parse_int(a, 1, 1 << 24, &o->max_model_len);
            break;
        case OPT_MAX_WAITING:
            ok = cli_parse_int(a, 1, 1 << 30, &o->max_waiting);
            break;
        case OPT_PREFIX_ON:
            o->prefix_caching = true;
            break;
        case OPT_PREFIX_OFF:
            o->prefix_caching = false;
            break;
        case OPT_API_KEY:
            o->api_key = a;
            break;
        case OPT_MAX_BODY:
            ok = cli_parse_bytes(a, &o->max_body_bytes) && o->max_body_bytes > 0;
            break;
        case OPT_SEED:
            ok = cli_parse_int(a, 0, INT64_MAX, &o->seed);
            break;
        case OPT_BACKEND:
            o->backend = a;
            break;
        case OPT_DEVICE:
            o->device = a;
            break;
        case OPT_TP:
            ok = cli_parse_int(a, 1, 64, &o->tp);
            break;
        case OPT_CATALOG:
            o->catalog = a;
            break;
        case 'h':
            *help = true;
            return 0;
        case ':':
            return cli_usage_error("serve", "option '%s' needs a value", argv[optind - 1]);
        default:
            return cli_usage_error("serve", "unknown option '%s'", argv[optind - 1]);
        }
        if (!ok) {
            /* long_opts is in enum order: c - OPT_MODEL indexes it */
            return cli_usage_error("serve", "invalid value '%s' for --%s", a,
                                   long_opts[c - OPT_MODEL].name);
        }
    }
    if (optind < argc)
        return cli_usage_error("serve", "unexpected argument '%s'", argv[optind]);
    if (!o->model)
        return cli_usage_error("serve", "%s",
                               "--model is required (a Hugging Face directory or "
                               "random:<preset>, e.g. random:llama-tiny)");
    if (o->num_kv_blocks && o->kv_cache_memory)
        return cli_usage_error("serve", "%s",
                               "give --num-kv-blocks or --kv-cache-memory, not both");
    if (strcmp(o->backend, "cpu") != 0 && strcmp(o->backend, "emulated") != 0)
        return cli_usage_error(
            "serve", "backend '%s' is not available in this build (cpu or emulated)", o->backend);
    bool emulated = !strcmp(o->backend, "emulated");
    if (emulated && !o->device)
        return cli_usage_error("serve", "%s",
                               "--backend emulated needs --device (e.g. H100-80G; the catalog "
                               "is data/devices.yaml)");
    if (!emulated && (o->device || o->tp != 1))
        return cli_usage_error("serve", "%s", "--device and --tp are for --backend emulated");
    return 0;
}

/* Blocks for the KV cache: explicit, from a byte budget, or the default budget capped at what
 * max_num_seqs full contexts can use and at a quarter of RAM. */
static long long kv_blocks(const serve_opts *o, const model_config *mc, int max_model_len,
                           size_t *bytes_per_block)
{
    *bytes_per_block = model_kv_bytes_per_block(mc, (int)o->block_size);
    if (o->num_kv_blocks)
        return o->num_kv_blocks;
    if (*bytes_per_block == 0)
        return 0;
    if (o->kv_cache_memory)
        return (long long)(o->kv_cache_memory / *bytes_per_block);
    uint64_t budget = DEFAULT_KV_BYTES;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0 && (uint64_t)pages * (uint64_t)page / 4 < budget)
        budget = (uint64_t)pages * (uint64_t)page / 4;
    long long blocks = (long long)(budget / *bytes_per_block);
    long long per_seq = (max_model_len + o->block_size - 1) / o->block_size;
    if (blocks > per_seq * o->max_num_seqs)
        blocks = per_seq * o->max_num_seqs;
    return blocks;
}

static bool loom_file_exists_in(const char *dir, const char *name)
{
    char *path = loom_path_join(dir, name);
    bool ok = loom_file_exists(path);
    free(path);
    return ok;
}

int cli_serve(int argc, char **argv)
{
    serve_opts o;
    bool help;
    int rc = parse_opts(argc, argv, &o, &help);
    if (rc)
        return rc;
    if (help) {
        fputs(serve_help_text, stdout);
        return CLI_EXIT_OK;
    }

    loom_err e = {0};
    model *m = NULL;
    tokenizer *tok = NULL;
    engine *en = NULL;
    server *srv = NULL;
    char msg[700];
    int exit_code = CLI_EXIT_OK;

    tensor_set_threads((int)o.threads);
    bool random_model = strncmp(o.model, "random:", 7) == 0;
    bool emulated = !strcmp(o.backend, "emulated");
    model_config emu_config;
    const model_config *mc;
    if (emulated) { /* the config is all an emulated device needs: no weights */
        if (random_model) {
            rc = model_config_preset(o.model + 7, &emu_config, &e);
        } else {
            char *path = loom_path_join(o.model, "config.json");
            rc = model_config_load(path, &emu_config, &e);
            free(path);
        }
        mc = &emu_config;
    } else {
        if (random_model)
            rc = model_create_random(o.model + 7, (uint64_t)o.seed, &m, &e);
        else
            rc = model_load(o.model, &m, &e);
        mc = rc ? NULL : model_get_config(m);
    }
    if (rc) {
        exit_code = fail(CLI_EXIT_USAGE, e.msg);
        goto done;
    }
    if (random_model) {
        tok = tokenizer_create_bytes(mc->vocab_size);
    } else if (emulated && !loom_file_exists_in(o.model, "tokenizer.json")) {
        /* an emulated device needs only config.json; its tokens are random anyway */
        tok = tokenizer_create_bytes(mc->vocab_size);
    } else if ((rc = tokenizer_load_dir(o.model, &tok, &e))) {
        snprintf(msg, sizeof(msg), "tokenizer: %s", e.msg);
        exit_code = fail(CLI_EXIT_USAGE, msg);
        goto done;
    }

    int max_model_len = o.max_model_len ? (int)o.max_model_len : mc->max_position_embeddings;
    if (max_model_len > mc->max_position_embeddings) {
        snprintf(msg, sizeof(msg),
                 "--max-model-len %d is over the model's "
                 "max_position_embeddings (%d)",
                 max_model_len, mc->max_position_embeddings);
        exit_code = fail(CLI_EXIT_USAGE, msg);
        goto done;
    }
    size_t block_bytes;
    long long blocks = kv_blocks(&o, mc, max_model_len, &block_bytes);
    if (emulated && !o.num_kv_blocks && !o.kv_cache_memory) {
        /* the emulated device's memory decides, as the planner models it */
        int64_t cap = 0;
        if ((rc = engine_backend_emulated_capacity(mc, o.device, (int)o.tp, o.catalog,
                                                   (int)o.block_size, (int)o.max_num_seqs,
                                                   (int)o.max_num_batched_tokens, 0.9, &cap, &e))) {
            exit_code = fail(CLI_EXIT_USAGE, e.msg);
            goto done;
        }
        blocks = cap;
    }
    if (blocks > (1LL << 30)) {
        snprintf(msg, sizeof(msg), "a KV cache of %lld blocks is more than loom handles (2^30)",
                 blocks);
        exit_code = fail(CLI_EXIT_USAGE, msg);
        goto done;
    }
    if (blocks < 1) {
        char have[32], need[32];
        cli_format_bytes(o.kv_cache_memory, have, sizeof(have));
        cli_format_bytes(block_bytes, need, sizeof(need));
        snprintf(msg, sizeof(msg),
                 "--kv-cache-memory %s holds no KV block (one block of %lld "
                 "tokens takes %s)",
                 have, o.block_size, need);
        exit_code = fail(CLI_EXIT_USAGE, msg);
        goto done;
    }

    /* a request must fit the cache: the context is at most what the cache holds */
    if (blocks * o.block_size < max_model_len) {
        if (o.max_model_len) {
            snprintf(msg, sizeof(msg),
                     "the KV cache holds %lld tokens, fewer than --max-model-len "
                     "%d: give more --num-kv-blocks/--kv-cache-memory or a smaller "
                     "--max-model-len",
                     blocks * o.block_size, max_model_len);
            exit_code = fail(CLI_EXIT_USAGE, msg);
            goto done;
        }
        printf("loom serve: note: max-model-len lowered from %d to %lld, what the KV cache holds\n",
               max_model_len, blocks * o.block_size);
        max_model_len = (int)(blocks * o.block_size);
    }

    engine_backend backend;
    if (emulated) {
        if ((rc = engine_backend_emulated_create(mc, o.device, (int)o.tp, o.catalog, (int)blocks,
                                                 (int)o.block_size, (int)o.max_num_seqs,
                                                 (int)o.max_num_batched_tokens, &backend, &e))) {
            exit_code = fail(CLI_EXIT_USAGE, e.msg);
            goto done;
        }
    } else if ((rc = engine_backend_cpu_create(m, (int)blocks, (int)o.block_size, &backend, &e))) {
        snprintf(msg, sizeof(msg), "KV cache of %lld blocks: %s", blocks, e.msg);
        exit_code = fail(CLI_EXIT_FAIL, msg);
        goto done;
    }
    engine_config ec;
    engine_config_default(&ec);
    ec.block_size = (int)o.block_size;
    ec.num_kv_blocks = (int)blocks;
    ec.max_num_seqs = (int)o.max_num_seqs;
    ec.max_num_batched_tokens = (int)o.max_num_batched_tokens;
    ec.max_model_len = max_model_len;
    ec.max_waiting = (int)o.max_waiting;
    ec.enable_prefix_caching = o.prefix_caching;
    ec.seed = (uint64_t)o.seed;
    if ((rc = engine_create(&ec, mc, backend, tok, &en, &e))) { /* destroys backend on failure */
        exit_code = fail(CLI_EXIT_USAGE, e.msg);
        goto done;
    }

    server_config sc;
    server_config_default(&sc);
    sc.host = o.host;
    sc.port = (int)o.port;
    sc.model_name = o.served_name ? o.served_name : o.model;
    sc.api_key = o.api_key;
    sc.max_body_bytes = (size_t)o.max_body_bytes;
    sc.handle_signals = true;
    if ((rc =
             server_create(&sc, en, &ec, mc, tok, backend.name ? backend.name : "cpu", &srv, &e))) {
        engine_free(en); /* server_create only takes the engine on success */
        en = NULL;
        exit_code = fail(CLI_EXIT_FAIL, e.msg);
        goto done;
    }
    en = NULL;

    char kv_size[32], weights[32] = "";
    cli_format_bytes((uint64_t)blocks * block_bytes, kv_size, sizeof(kv_size));
    if (m)
        cli_format_bytes(model_weight_bytes(m), weights, sizeof(weights));
    /* the address to print: a wildcard is reached through loopback, IPv6 goes in brackets */
    const char *shown_host = !strcmp(o.host, "0.0.0.0") ? "127.0.0.1"
                             : !strcmp(o.host, "::")    ? "::1"
                                                        : o.host;
    const char *lb = strchr(shown_host, ':') ? "[" : "", *rb = *lb ? "]" : "";
    if (emulated)
        printf("loom serve: model %s (%s, %d layers), backend emulated: %s x%lld (modelled step "
               "times; no weights loaded)\n",
               o.model, mc->architecture, mc->n_layers, o.device, o.tp);
    else
        printf("loom serve: model %s (%s, %d layers, %s of f32 weights), backend cpu, %lld "
               "threads\n",
               o.model, mc->architecture, mc->n_layers, weights, o.threads);
    printf("loom serve: KV cache %lld blocks x %lld tokens (%s), max-model-len %d, "
           "max-num-seqs %lld, prefix caching %s\n",
           blocks, o.block_size, kv_size, max_model_len, o.max_num_seqs,
           o.prefix_caching ? "on" : "off");
    printf("loom serve: listening on http://%s%s%s:%d (Ctrl-C to stop)\n", lb, shown_host, rb,
           server_port(srv));
    printf("  try: curl http://%s%s%s:%d/v1/completions -H 'Content-Type: application/json'%s "
           "-d '{\"model\": \"%s\", \"prompt\": \"Hello\", \"max_tokens\": 16}'\n",
           lb, shown_host, rb, server_port(srv),
           o.api_key ? " -H \"Authorization: Bearer $LOOM_API_KEY\"" : "", sc.model_name);
    fflush(stdout);

    if ((rc = server_run(srv, &e)))
        exit_code = fail(CLI_EXIT_FAIL, e.msg);
    else
        printf("loom serve: stopped\n");

done:
    server_free(srv);
    engine_free(en);
    tokenizer_free(tok);
    model_free(m);
    return exit_code;
}
