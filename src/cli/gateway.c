/*
 * `loom gateway`: flags -> gateway_config (policy, upstreams, limits), then serve until
 * SIGINT/SIGTERM. Argument parsing and wiring only: the work is in src/gateway and src/policy.
 */
#include "cli.h"

#include "loom/gateway.h"
#include "loom/plan.h"
#include "loom/policy.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct gateway_opts {
    gateway_config cfg;
    gateway_upstream_spec *ups;
    int n_ups;
    const char *plan;
    int plan_base_port;
} gateway_opts;

enum {
    OPT_POLICY = 256,
    OPT_HOST,
    OPT_PORT,
    OPT_UPSTREAM,
    OPT_PLAN,
    OPT_PREFIX_AFFINITY,
    OPT_KV_HEADROOM,
    OPT_NO_WAIT_SOONEST,
    OPT_NO_HOLD_BEYOND_BATCH,
    OPT_API_KEY,
    OPT_UPSTREAM_API_KEY,
    OPT_MAX_BODY,
    OPT_QUEUE_SIZE,
    OPT_QUEUE_TIMEOUT,
    OPT_RETRIES,
    OPT_UPSTREAM_TIMEOUT,
    OPT_HEALTH_INTERVAL,
    OPT_HEALTH_TIMEOUT,
    OPT_HEALTHY_THRESHOLD,
    OPT_UNHEALTHY_THRESHOLD,
    OPT_MAX_FAILS,
    OPT_SCRAPE_INTERVAL,
    OPT_KV_BLOCK_SIZE,
    OPT_DEFAULT_OUTPUT,
    OPT_RATE_ALPHA,
    OPT_PREFILL_RATE,
    OPT_DECODE_RATE,
    OPT_MAX_CLIENT_BUFFER,
    OPT_SEED,
    OPT_PLAN_BASE_PORT,
};

static const struct option long_opts[] = {
    {"policy", required_argument, NULL, OPT_POLICY},
    {"host", required_argument, NULL, OPT_HOST},
    {"port", required_argument, NULL, OPT_PORT},
    {"upstream", required_argument, NULL, OPT_UPSTREAM},
    {"plan", required_argument, NULL, OPT_PLAN},
    {"prefix-affinity", no_argument, NULL, OPT_PREFIX_AFFINITY},
    {"kv-headroom", required_argument, NULL, OPT_KV_HEADROOM},
    {"no-wait-for-soonest", no_argument, NULL, OPT_NO_WAIT_SOONEST},
    {"no-hold-beyond-batch", no_argument, NULL, OPT_NO_HOLD_BEYOND_BATCH},
    {"api-key", required_argument, NULL, OPT_API_KEY},
    {"upstream-api-key", required_argument, NULL, OPT_UPSTREAM_API_KEY},
    {"max-body-bytes", required_argument, NULL, OPT_MAX_BODY},
    {"queue-size", required_argument, NULL, OPT_QUEUE_SIZE},
    {"queue-timeout", required_argument, NULL, OPT_QUEUE_TIMEOUT},
    {"retries", required_argument, NULL, OPT_RETRIES},
    {"upstream-timeout", required_argument, NULL, OPT_UPSTREAM_TIMEOUT},
    {"health-interval", required_argument, NULL, OPT_HEALTH_INTERVAL},
    {"health-timeout", required_argument, NULL, OPT_HEALTH_TIMEOUT},
    {"healthy-threshold", required_argument, NULL, OPT_HEALTHY_THRESHOLD},
    {"unhealthy-threshold", required_argument, NULL, OPT_UNHEALTHY_THRESHOLD},
    {"max-fails", required_argument, NULL, OPT_MAX_FAILS},
    {"scrape-interval", required_argument, NULL, OPT_SCRAPE_INTERVAL},
    {"kv-block-size", required_argument, NULL, OPT_KV_BLOCK_SIZE},
    {"default-output-tokens", required_argument, NULL, OPT_DEFAULT_OUTPUT},
    {"rate-ema-alpha", required_argument, NULL, OPT_RATE_ALPHA},
    {"prefill-rate", required_argument, NULL, OPT_PREFILL_RATE},
    {"decode-rate", required_argument, NULL, OPT_DECODE_RATE},
    {"max-client-buffer", required_argument, NULL, OPT_MAX_CLIENT_BUFFER},
    {"seed", required_argument, NULL, OPT_SEED},
    {"plan-base-port", required_argument, NULL, OPT_PLAN_BASE_PORT},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* clang-format off */
static const char gateway_help_head[] =
"usage: loom gateway --upstream URL[=WEIGHT] [--upstream ...] [options]\n"
"       loom gateway --plan plan.yaml [--upstream URL ...] [options]\n"
"\n"
"One OpenAI-compatible endpoint in front of many instances (loom serve, vLLM, SGLang,\n"
"llama.cpp server). A dispatch policy picks the instance for each request; when none has room\n"
"the request waits in a bounded queue. POST /v1/completions and /v1/chat/completions are\n"
"proxied (SSE streams pass through chunk by chunk; the response header x-loom-instance names\n"
"the instance); GET /v1/models lists the union of the instances' models; GET /health is 200\n"
"while an instance is healthy; GET /metrics (Prometheus) has per-upstream requests, errors,\n"
"in-flight, dispatch share, token counts, believed rates and KV use, queue depth, TTFT and\n"
"end-to-end histograms. Admin: GET /admin/upstreams, POST /admin/drain?upstream=URL,\n"
"POST /admin/undrain?upstream=URL.\n"
"\n"
"upstreams and policy:\n"
"  --upstream URL[=WEIGHT]      an instance, http://HOST:PORT[/prefix]; repeatable. WEIGHT\n"
"                               (default 1) is its static capacity: weighted_round_robin's\n"
"                               share, and capacity_aware's rate prior when no rates are known\n"
"  --plan FILE                  the instances of a plan.yaml of `loom plan`, with their\n"
"                               predicted prefill/decode tokens/s (capacity_aware's starting\n"
"                               rates), KV sizes (kv_blocks x block_size) and, as weights,\n"
"                               predicted output tokens/s relative to the slowest. A plan has\n"
"                               hosts, not ports: the k-th instance on a host (from 0) is\n"
"                               expected at --plan-base-port + k, as `loom up` prints for\n"
"                               remote hosts. With --upstream too, one per instance in plan\n"
"                               order, the URLs give the addresses (a =WEIGHT overrides)\n"
"  --plan-base-port N           (8001)\n"
"  --policy NAME                the dispatch policy (capacity_aware), one of:\n";

static const char gateway_help_tail[] =
"  --prefix-affinity            capacity_aware: credit instances with the prompt prefixes\n"
"                               they likely cache, against their load\n"
"  --kv-headroom THETA          capacity_aware: admit while KV use + need <= THETA x capacity\n"
"                               (0.95)\n"
"  --no-wait-for-soonest        capacity_aware: send to the soonest-finishing instance with\n"
"                               room, rather than wait for a sooner one that is full\n"
"  --no-hold-beyond-batch       capacity_aware: send to an instance already running its max\n"
"                               batch (the plan's max_batch) instead of holding the request\n"
"                               here until a slot frees\n"
"  --prefill-rate TOKENS/S      capacity_aware prior per unit of weight (4000)\n"
"  --decode-rate TOKENS/S       capacity_aware prior per unit of weight (400); both are\n"
"                               refined online from what each instance does while busy\n"
"  --rate-ema-alpha A           weight of one rate observation (0.2)\n"
"  --kv-block-size N            tokens per KV block when /metrics gives blocks only (16)\n"
"  --default-output-tokens N    expected output of a request without max_tokens before any\n"
"                               has been seen (256)\n"
"  --seed N                     random and power_of_two draws (65553)\n"
"\n"
"robustness:\n"
"  --queue-size N               requests waiting in the gateway at most (1024); beyond, 503\n"
"  --queue-timeout SECONDS      503 + Retry-After for a request that waited this long while\n"
"                               the queue did not move (no request left it) (30)\n"
"  --retries N                  other instances tried while no byte has reached the client\n"
"                               (2)\n"
"  --upstream-timeout SECONDS   silence on an upstream connection before it fails (600)\n"
"  --health-interval SECONDS    GET /health of every instance this often (1; 0 = off, then\n"
"                               an ejected instance returns after 5 s)\n"
"  --health-timeout SECONDS     (2)\n"
"  --healthy-threshold N        passed checks in a row that re-admit an instance (2)\n"
"  --unhealthy-threshold N      failed checks in a row that eject it (2)\n"
"  --max-fails N                failed requests in a row that eject it (3; a refused\n"
"                               connection ejects at once)\n"
"  --scrape-interval SECONDS    GET /metrics of every instance this often (1; 0 = off):\n"
"                               running/waiting requests and KV use correct the estimates\n"
"  --max-client-buffer BYTES    a streaming client this far behind is dropped (16MiB; up\n"
"                               to 4MiB it also caps the kernel's socket buffer)\n"
"\n"
"HTTP:\n"
"  --host ADDR                  address to listen on (127.0.0.1)\n"
"  --port N                     port (8080; 0 picks a free one, printed at start)\n"
"  --api-key KEY                require 'Authorization: Bearer KEY' on /v1/* and /admin/*\n"
"  --upstream-api-key KEY       send this key to the instances (default: pass the client's\n"
"                               Authorization header on when the gateway has no key)\n"
"  --max-body-bytes BYTES       request bodies over this get 413 (8MiB)\n"
"  -h, --help                   this text\n"
"\n"
"Exit status: 0 after SIGINT/SIGTERM, 1 if the gateway cannot start (for example the port is\n"
"in use), 2 for bad flags.\n"
"\n"
"example:\n"
"  loom serve --model random:llama-tiny --port 8001 &\n"
"  loom serve --model random:llama-tiny --port 8002 --threads 1 &\n"
"  loom gateway --policy capacity_aware --port 8000 \\\n"
"       --upstream http://127.0.0.1:8001=4 --upstream http://127.0.0.1:8002=1\n"
"  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\\n"
"       -d '{\"prompt\": \"Hello\", \"max_tokens\": 16}'\n";
/* clang-format on */

static void print_help(void)
{
    fputs(gateway_help_head, stdout);
    for (int i = 0; i < policy_count(); i++)
        printf("    %-21s %s\n", policy_at(i)->name, policy_at(i)->summary);
    fputs(gateway_help_tail, stdout);
}

static bool parse_seconds(const char *s, double lo, double hi, double *out)
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

/*
 * --plan: one upstream per plan instance. Given --upstream URLs as well (as many as instances),
 * they are the addresses, in plan order, and an explicit =WEIGHT stays; the plan's rates, KV
 * sizes and (otherwise) weights apply to them.
 */
static int apply_plan(gateway_opts *o)
{
    loom_err e = {0};
    plan_file pf;
    memset(&pf, 0, sizeof(pf));
    if (plan_file_load(o->plan, &pf, &e)) {
        fprintf(stderr,
                "loom gateway: --plan %s: %s\nHINT: write one with `loom plan`; check it "
                "with `loom plan --check %s`\n",
                o->plan, e.msg, o->plan);
        return CLI_EXIT_USAGE;
    }
    int rc = 0;
    gateway_upstream_spec *ups =
        calloc((size_t)(pf.n_instances > 0 ? pf.n_instances : 1), sizeof(*ups));
    if (!ups) {
        rc = cli_usage_error("gateway", "%s", "out of memory");
        goto out;
    }
    if (o->n_ups && o->n_ups != pf.n_instances) {
        fprintf(stderr,
                "loom gateway: --plan %s has %d instances but %d --upstream were given: give "
                "none (addresses from the plan) or one per instance, in plan order\n",
                o->plan, pf.n_instances, o->n_ups);
        rc = CLI_EXIT_USAGE;
        goto out;
    }
    int *ports = NULL;
    if (o->n_ups) {
        ports = calloc((size_t)o->n_ups, sizeof(*ports));
        for (int i = 0; ports && i < o->n_ups; i++)
            ports[i] = o->ups[i].port;
    }
    int base = o->plan_base_port ? o->plan_base_port : GATEWAY_PLAN_BASE_PORT;
    int prc = gateway_upstreams_from_plan(&pf, ports, base, ups, &e);
    free(ports);
    if (prc) {
        fprintf(stderr, "loom gateway: --plan %s: %s\n", o->plan, e.msg);
        rc = CLI_EXIT_USAGE;
        goto out;
    }
    for (int i = 0; i < o->n_ups; i++) {
        gateway_upstream_spec given = o->ups[i];
        double plan_weight = ups[i].weight;
        ups[i] = given;
        ups[i].weight = given.weight > 0 ? given.weight : plan_weight;
        ups[i].prefill_rate = pf.instances[i].prefill_tokens_per_s;
        ups[i].decode_rate = pf.instances[i].decode_tokens_per_s;
        ups[i].kv_tokens = (double)pf.instances[i].kv_blocks * pf.instances[i].block_size;
        ups[i].max_batch = pf.instances[i].max_batch;
    }
    free(o->ups);
    o->ups = ups;
    o->n_ups = pf.n_instances;
    ups = NULL;
out:
    free(ups);
    plan_file_free(&pf);
    return rc;
}

static int parse_opts(int argc, char **argv, gateway_opts *o, bool *help)
{
    gateway_config *c = &o->cfg;
    *help = false;
    optind = 1;
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, ":h", long_opts, NULL)) != -1) {
        const char *a = optarg;
        bool ok = true;
        long long n = 0;
        uint64_t bytes = 0;
        double d = 0;
        switch (ch) {
        case OPT_POLICY:
            c->policy = a;
            if (!cli_policy_known("gateway", a))
                return CLI_EXIT_USAGE;
            break;
        case OPT_HOST:
            c->host = a;
            break;
        case OPT_PORT:
            ok = cli_parse_int(a, 0, 65535, &n);
            c->port = (int)n;
            break;
        case OPT_UPSTREAM: {
            if (o->n_ups >= GATEWAY_MAX_UPSTREAMS)
                return cli_usage_error("gateway", "too many --upstream (at most %s)", "1024");
            loom_err e = {0};
            gateway_upstream_spec spec;
            if (gateway_upstream_parse(a, &spec, &e) != 0)
                return cli_usage_error("gateway", "%s", e.msg);
            if (!strchr(a, '='))
                spec.weight = 0; /* not given: 1, or the plan's */
            o->ups = realloc(o->ups, (size_t)(o->n_ups + 1) * sizeof(*o->ups));
            if (!o->ups)
                return cli_usage_error("gateway", "%s", "out of memory");
            o->ups[o->n_ups++] = spec;
            break;
        }
        case OPT_PLAN:
            o->plan = a;
            break;
        case OPT_PREFIX_AFFINITY:
            c->policy_cfg.prefix_affinity = true;
            break;
        case OPT_KV_HEADROOM:
            ok = parse_seconds(a, 0.01, 1.0, &c->policy_cfg.kv_headroom);
            break;
        case OPT_NO_WAIT_SOONEST:
            c->policy_cfg.wait_for_soonest = false;
            break;
        case OPT_NO_HOLD_BEYOND_BATCH:
            c->policy_cfg.hold_beyond_batch = false;
            break;
        case OPT_API_KEY:
            c->api_key = a;
            break;
        case OPT_UPSTREAM_API_KEY:
            c->upstream_api_key = a;
            break;
        case OPT_MAX_BODY:
            ok = cli_parse_bytes(a, &bytes) && bytes > 0;
            c->max_body_bytes = (size_t)bytes;
            break;
        case OPT_QUEUE_SIZE:
            ok = cli_parse_int(a, 0, 1 << 24, &n);
            c->queue_size = (int)n;
            break;
        case OPT_QUEUE_TIMEOUT:
            ok = parse_seconds(a, 0, 86400, &c->queue_timeout_s);
            break;
        case OPT_RETRIES:
            ok = cli_parse_int(a, 0, 16, &n);
            c->retries = (int)n;
            break;
        case OPT_UPSTREAM_TIMEOUT:
            ok = parse_seconds(a, 0.001, 86400, &c->upstream_timeout_s);
            break;
        case OPT_HEALTH_INTERVAL:
            ok = parse_seconds(a, 0, 86400, &c->health_interval_s);
            break;
        case OPT_HEALTH_TIMEOUT:
            ok = parse_seconds(a, 0.001, 3600, &c->health_timeout_s);
            break;
        case OPT_HEALTHY_THRESHOLD:
            ok = cli_parse_int(a, 1, 1000, &n);
            c->healthy_threshold = (int)n;
            break;
        case OPT_UNHEALTHY_THRESHOLD:
            ok = cli_parse_int(a, 1, 1000, &n);
            c->unhealthy_threshold = (int)n;
            break;
        case OPT_MAX_FAILS:
            ok = cli_parse_int(a, 1, 1000, &n);
            c->max_fails = (int)n;
            break;
        case OPT_SCRAPE_INTERVAL:
            ok = parse_seconds(a, 0, 86400, &c->scrape_interval_s);
            break;
        case OPT_KV_BLOCK_SIZE:
            ok = cli_parse_int(a, 1, 1 << 20, &n);
            c->kv_block_size = (int)n;
            break;
        case OPT_DEFAULT_OUTPUT:
            ok = cli_parse_int(a, 1, 1 << 24, &n);
            c->default_output_tokens = (double)n;
            break;
        case OPT_RATE_ALPHA:
            ok = parse_seconds(a, 0, 1, &c->policy_cfg.rate_ema_alpha);
            break;
        case OPT_PREFILL_RATE:
            ok = parse_seconds(a, 1e-3, 1e12, &d);
            c->policy_cfg.default_prefill_rate = d;
            break;
        case OPT_DECODE_RATE:
            ok = parse_seconds(a, 1e-3, 1e12, &d);
            c->policy_cfg.default_decode_rate = d;
            break;
        case OPT_MAX_CLIENT_BUFFER:
            ok = cli_parse_bytes(a, &bytes) && bytes >= 4096;
            c->max_client_buffer = (size_t)bytes;
            break;
        case OPT_SEED:
            ok = cli_parse_int(a, 0, INT64_MAX, &n);
            c->policy_cfg.seed = (uint64_t)n;
            break;
        case OPT_PLAN_BASE_PORT:
            ok = cli_parse_int(a, 1, 65535, &n);
            o->plan_base_port = (int)n;
            break;
        case 'h':
            *help = true;
            return 0;
        case ':':
            return cli_usage_error("gateway", "option '%s' needs a value", argv[optind - 1]);
        default:
            return cli_usage_error("gateway", "unknown option '%s'", argv[optind - 1]);
        }
        if (!ok) {
            /* long_opts is in enum order: ch - OPT_POLICY indexes it */
            return cli_usage_error("gateway", "invalid value '%s' for --%s", a,
                                   long_opts[ch - OPT_POLICY].name);
        }
    }
    if (optind < argc)
        return cli_usage_error("gateway", "unexpected argument '%s'", argv[optind]);
    if (o->plan) {
        int rc = apply_plan(o);
        if (rc)
            return rc;
    }
    if (o->n_ups == 0)
        return cli_usage_error("gateway", "%s",
                               "no upstreams: give --upstream http://HOST:PORT (repeatable) "
                               "or --plan plan.yaml");
    for (int i = 0; i < o->n_ups; i++)
        if (o->ups[i].weight <= 0)
            o->ups[i].weight = 1;
    return 0;
}

int cli_gateway(int argc, char **argv)
{
    gateway_opts o;
    memset(&o, 0, sizeof(o));
    gateway_config_default(&o.cfg);
    bool help;
    int rc = parse_opts(argc, argv, &o, &help);
    if (rc || help) {
        free(o.ups);
        if (help)
            print_help();
        return rc ? rc : CLI_EXIT_OK;
    }
    o.cfg.upstreams = o.ups;
    o.cfg.n_upstreams = o.n_ups;
    o.cfg.handle_signals = true;

    loom_err e = {0};
    gateway *g = NULL;
    if ((rc = gateway_create(&o.cfg, &g, &e))) {
        fprintf(stderr, "loom gateway: error: %s\n", e.msg);
        free(o.ups);
        return rc == LOOM_EIO ? CLI_EXIT_FAIL : CLI_EXIT_USAGE;
    }
    const char *host = o.cfg.host;
    const char *shown = !strcmp(host, "0.0.0.0") ? "127.0.0.1" : !strcmp(host, "::") ? "::1" : host;
    const char *lb = strchr(shown, ':') ? "[" : "", *rb = *lb ? "]" : "";
    printf("loom gateway: policy %s%s, %d upstream%s:", o.cfg.policy,
           o.cfg.policy_cfg.prefix_affinity ? " with prefix affinity" : "", o.n_ups,
           o.n_ups == 1 ? "" : "s");
    for (int i = 0; i < o.n_ups; i++)
        printf(" %s(w=%g)", o.ups[i].url, o.ups[i].weight);
    if (o.plan)
        printf("\nloom gateway: rates and KV sizes from %s", o.plan);
    printf("\nloom gateway: listening on http://%s%s%s:%d (Ctrl-C to stop)\n", lb, shown, rb,
           gateway_port(g));
    fflush(stdout);

    int exit_code = CLI_EXIT_OK;
    if ((rc = gateway_run(g, &e))) {
        fprintf(stderr, "loom gateway: error: %s\n", e.msg);
        exit_code = CLI_EXIT_FAIL;
    } else {
        printf("loom gateway: stopped\n");
    }
    gateway_free(g);
    free(o.ups);
    return exit_code;
}
