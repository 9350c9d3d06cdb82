/*
 * `loom bench`: flags -> workload, arrival process, prompts and targets; then bench_run and
 * the reports. Argument parsing and wiring only: the work is in src/bench/.
 */
#include "cli.h"

#include "loom/bench.h"
#include "loom/tokenizer.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

enum {
    OPT_URL = 256,
    OPT_LABEL,
    OPT_ENDPOINT,
    OPT_MODEL,
    OPT_API_KEY,
    OPT_INSTANCE_HEADER,
    OPT_TRACE,
    OPT_SYNTHETIC,
    OPT_INPUT_LEN,
    OPT_OUTPUT_LEN,
    OPT_SEED,
    OPT_TIME_SCALE,
    OPT_RATE,
    OPT_BURSTINESS,
    OPT_CONCURRENCY,
    OPT_BATCH,
    OPT_DURATION,
    OPT_MAX_REQUESTS,
    OPT_WARMUP,
    OPT_TIMEOUT,
    OPT_PROMPT_MODE,
    OPT_TOKENIZER,
    OPT_TOKEN_IDS,
    OPT_NO_MIN_TOKENS,
    OPT_NO_STREAM,
    OPT_ROUNDS,
    OPT_INTERLEAVE,
    OPT_SLO,
    OPT_OUT,
    OPT_PLOT,
    OPT_MARKDOWN,
    OPT_NO_PROGRESS,
    OPT_QUIET,
};

static const struct option long_opts[] = {
    {"url", required_argument, NULL, OPT_URL},
    {"label", required_argument, NULL, OPT_LABEL},
    {"endpoint", required_argument, NULL, OPT_ENDPOINT},
    {"model", required_argument, NULL, OPT_MODEL},
    {"api-key", required_argument, NULL, OPT_API_KEY},
    {"instance-header", required_argument, NULL, OPT_INSTANCE_HEADER},
    {"trace", required_argument, NULL, OPT_TRACE},
    {"synthetic", no_argument, NULL, OPT_SYNTHETIC},
    {"input-len", required_argument, NULL, OPT_INPUT_LEN},
    {"output-len", required_argument, NULL, OPT_OUTPUT_LEN},
    {"seed", required_argument, NULL, OPT_SEED},
    {"time-scale", required_argument, NULL, OPT_TIME_SCALE},
    {"rate", required_argument, NULL, OPT_RATE},
    {"request-rate", required_argument, NULL, OPT_RATE},
    {"burstiness", required_argument, NULL, OPT_BURSTINESS},
    {"concurrency", required_argument, NULL, OPT_CONCURRENCY},
    {"max-concurrency", required_argument, NULL, OPT_CONCURRENCY},
    {"batch", required_argument, NULL, OPT_BATCH},
    {"duration", required_argument, NULL, OPT_DURATION},
    {"max-requests", required_argument, NULL, OPT_MAX_REQUESTS},
    {"num-prompts", required_argument, NULL, OPT_MAX_REQUESTS},
    {"warmup", required_argument, NULL, OPT_WARMUP},
    {"timeout", required_argument, NULL, OPT_TIMEOUT},
    {"prompt-mode", required_argument, NULL, OPT_PROMPT_MODE},
    {"tokenizer", required_argument, NULL, OPT_TOKENIZER},
    {"token-ids", required_argument, NULL, OPT_TOKEN_IDS},
    {"no-min-tokens", no_argument, NULL, OPT_NO_MIN_TOKENS},
    {"no-stream", no_argument, NULL, OPT_NO_STREAM},
    {"rounds", required_argument, NULL, OPT_ROUNDS},
    {"interleave", required_argument, NULL, OPT_INTERLEAVE},
    {"slo", required_argument, NULL, OPT_SLO},
    {"goodput", required_argument, NULL, OPT_SLO},
    {"out", required_argument, NULL, OPT_OUT},
    {"plot", required_argument, NULL, OPT_PLOT},
    {"markdown", required_argument, NULL, OPT_MARKDOWN},
    {"no-progress", no_argument, NULL, OPT_NO_PROGRESS},
    {"quiet", no_argument, NULL, OPT_QUIET},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* The help text, laid out as it prints. */
/* clang-format off */
static const char bench_help_text[] =
"usage: loom bench --url URL [--url URL2 ...] [workload] [arrival] [options]\n"
"\n"
"Replays a trace or a synthetic load against OpenAI-compatible endpoints (loom serve,\n"
"loom gateway, vLLM, SGLang, ...), streaming every response, and reports TTFT, TPOT\n"
"(excluding the first token), inter-token latency, end-to-end latency, request and token\n"
"throughput, goodput, errors by kind and the share of each serving instance.\n"
"\n"
"targets:\n"
"  --url URL                  http://host:port, or with the endpoint path; repeat to compare\n"
"                             several targets (the summary shows ratios to the first)\n"
"  --label NAME               a name per --url, in order (default host:port)\n"
"  --endpoint PATH            /v1/completions (default) or /v1/chat/completions\n"
"  --model NAME               the \"model\" field (default: the first id of GET /v1/models)\n"
"  --api-key KEY              'Authorization: Bearer KEY' (default: $OPENAI_API_KEY, else\n"
"                             $LOOM_API_KEY, else none)\n"
"  --instance-header NAME     response header naming the serving instance, as a gateway\n"
"                             sets it (x-loom-instance)\n"
"\n"
"workload:\n"
"  --trace FILE               Azure LLM inference CSV (TIMESTAMP,ContextTokens,\n"
"                             GeneratedTokens) or Mooncake JSONL (timestamp ms, input_length,\n"
"                             output_length, hash_ids); requests sharing leading hash_ids get\n"
"                             prompts sharing those 512-token blocks\n"
"  --synthetic                synthetic lengths (the default without --trace):\n"
"  --input-len SPEC           prompt tokens: N, uniform:A-B, normal:MU,SIGMA, or trace:FILE\n"
"                             (that trace's prompt-length histogram) (default 1024)\n"
"  --output-len SPEC          generated tokens, same forms (default 128)\n"
"  --seed N                   seed of lengths, arrivals and prompts (0)\n"
"\n"
"arrival (default: trace timestamps with --trace, else everything at once):\n"
"  --time-scale X             replay trace timestamps multiplied by X (0.5 = twice as fast)\n"
"  --rate R                   requests/s as a Poisson process (inf = all at once);\n"
"                             alias --request-rate\n"
"  --burstiness B             gamma-distributed gaps of shape B instead (1 = Poisson, < 1\n"
"                             burstier, > 1 more regular), mean rate still R\n"
"  --concurrency N            closed loop: N requests in flight, each answer sends the next;\n"
"                             with --rate or --time-scale, at most N in flight; alias\n"
"                             --max-concurrency\n"
"  --batch N                  offline: N requests submitted at once; throughput is total\n"
"                             tokens over the makespan\n"
"  --duration S               send no new request after S seconds\n"
"  --max-requests N           requests per run (default: the trace's, 1000 synthetic, or\n"
"                             unbounded with --duration); alias --num-prompts\n"
"  --warmup N                 N unmeasured requests before each target's first run\n"
"  --timeout S                per-request limit, send to last byte (300)\n"
"\n"
"prompts (exactly the requested prompt tokens; outputs forced with max_tokens + ignore_eos\n"
"+ min_tokens):\n"
"  --prompt-mode MODE         auto (default): --tokenizer if given, else the server's POST\n"
"                             /tokenize, else token-id prompts; or tokenizer, tokenize, ids\n"
"  --tokenizer DIR            a Hugging Face tokenizer directory (tokenizer.json)\n"
"  --token-ids LO-HI          token-id prompts draw ids from [LO, HI) (16-256)\n"
"  --no-min-tokens            do not send min_tokens (for servers that reject it)\n"
"  --no-stream                \"stream\": false: one JSON body per request instead of a chunk\n"
"                             per token (least client and server work per token, for\n"
"                             saturating throughput runs; TTFT and ITL are not measured)\n"
"\n"
"comparison:\n"
"  --rounds R                 repeat the workload R times per target (1); round r uses the\n"
"                             same prompts for every target, new ones for each round\n"
"  --interleave MODE          runs (default): targets take turns, a whole run each (A B A B);\n"
"                             requests: every request goes to every target at once\n"
"\n"
"reports:\n"
"  --slo LIST                 goodput objectives: ttft=2s,tpot=200ms,e2el=10s (s, ms, us;\n"
"                             bare numbers are ms); alias --goodput\n"
"  --out FILE                 result JSON: vllm bench serve's fields for the first target,\n"
"                             \"targets\" with every target's, \"requests\" with every request\n"
"  --plot DIR                 PNGs through gnuplot: latency CDFs, throughput over time,\n"
"                             per-instance share (data and plots.gp are written regardless)\n"
"  --markdown FILE            the summary as a markdown table\n"
"  --no-progress              no live progress line (shown only when stderr is a terminal)\n"
"  --quiet                    no summary table on stdout\n"
"  -h, --help                 this text\n"
"\n"
"Exit status: 0 when every request succeeded, 1 when some failed or the run was interrupted\n"
"(Ctrl-C; the report and files are still written), 2 for bad flags or inputs.\n"
"\n"
"examples:\n"
"  loom bench --url http://127.0.0.1:8000 --input-len 512 --output-len 128 --rate 4 \\\n"
"             --max-requests 200 --slo ttft=2s,tpot=200ms --out result.json --plot plots\n"
"  loom bench --url http://127.0.0.1:9000 --trace mooncake_conversation.jsonl \\\n"
"             --time-scale 0.1 --max-requests 500 --out mooncake.json\n"
"  loom bench --url http://a:8000 --url http://b:8000 --label rr --label capacity \\\n"
"             --concurrency 64 --max-requests 500 --rounds 3\n";
/* clang-format on */

static void bench_help(FILE *f)
{
    fputs(bench_help_text, f);
}

static bool parse_positive(const char *s, double *out, bool allow_inf)
{
    if (allow_inf && (!strcasecmp(s, "inf") || !strcasecmp(s, "infinity"))) {
        *out = INFINITY;
        return true;
    }
    errno = 0;
    char *end;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v <= 0)
        return false;
    *out = v;
    return true;
}

int cli_bench(int argc, char **argv)
{
    bench_config cfg;
    bench_config_default(&cfg);
    bench_slo slo = {0};
    const char *trace_path = NULL, *input_spec = NULL, *output_spec = NULL;
    const char *tokenizer_dir = NULL, *out_path = NULL, *plot_dir = NULL, *md_path = NULL;
    bool synthetic = false, no_progress = false, quiet = false, time_scale_given = false;
    bool rate_given = false;
    long long batch = 0;
    int n_labels = 0;
    loom_err e = {0};
    long long v;
    double d;

    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        switch (c) {
        case OPT_URL:
            if (cfg.n_targets >= BENCH_MAX_TARGETS)
                return cli_usage_error("bench", "at most %s targets", "16");
            cfg.urls[cfg.n_targets++] = optarg;
            break;
        case OPT_LABEL:
            if (n_labels >= BENCH_MAX_TARGETS)
                return cli_usage_error("bench", "at most %s labels", "16");
            cfg.labels[n_labels++] = optarg;
            break;
        case OPT_ENDPOINT:
            if (optarg[0] != '/')
                return cli_usage_error(
                    "bench", "--endpoint '%s': want a path such as /v1/completions", optarg);
            cfg.endpoint = optarg;
            break;
        case OPT_MODEL:
            cfg.model = optarg;
            break;
        case OPT_API_KEY:
            cfg.api_key = optarg;
            break;
        case OPT_INSTANCE_HEADER:
            cfg.instance_header = optarg;
            break;
        case OPT_TRACE:
            trace_path = optarg;
            break;
        case OPT_SYNTHETIC:
            synthetic = true;
            break;
        case OPT_INPUT_LEN:
            input_spec = optarg;
            break;
        case OPT_OUTPUT_LEN:
            output_spec = optarg;
            break;
        case OPT_SEED:
            if (!cli_parse_int(optarg, 0, INT64_MAX, &v))
                return cli_usage_error("bench", "--seed '%s': want a non-negative integer", optarg);
            cfg.workload.seed = (uint64_t)v;
            break;
        case OPT_TIME_SCALE:
            if (!parse_positive(optarg, &cfg.time_scale, false))
                return cli_usage_error("bench", "--time-scale '%s': want a positive number",
                                       optarg);
            time_scale_given = true;
            break;
        case OPT_RATE:
            if (!parse_positive(optarg, &cfg.rate, true))
                return cli_usage_error("bench", "--rate '%s': want requests per second > 0, or inf",
                                       optarg);
            cfg.arrival = isfinite(cfg.rate) ? BENCH_ARRIVAL_GAMMA : BENCH_ARRIVAL_AT_ONCE;
            rate_given = true;
            break;
        case OPT_BURSTINESS:
            if (!parse_positive(optarg, &cfg.burstiness, false))
                return cli_usage_error("bench", "--burstiness '%s': want a positive number",
                                       optarg);
            break;
        case OPT_CONCURRENCY:
            if (!cli_parse_int(optarg, 1, 1000000, &v))
                return cli_usage_error("bench", "--concurrency '%s': want an integer >= 1", optarg);
            cfg.concurrency = (int)v;
            break;
        case OPT_BATCH:
            if (!cli_parse_int(optarg, 1, 100000000, &batch))
                return cli_usage_error("bench", "--batch '%s': want an integer >= 1", optarg);
            break;
        case OPT_DURATION:
            if (!parse_positive(optarg, &cfg.duration_s, false))
                return cli_usage_error("bench", "--duration '%s': want seconds > 0", optarg);
            break;
        case OPT_MAX_REQUESTS:
            if (!cli_parse_int(optarg, 1, INT64_MAX, &v))
                return cli_usage_error("bench", "--max-requests '%s': want an integer >= 1",
                                       optarg);
            cfg.max_requests = (uint64_t)v;
            break;
        case OPT_WARMUP:
            if (!cli_parse_int(optarg, 0, 1000000, &v))
                return cli_usage_error("bench", "--warmup '%s': want an integer >= 0", optarg);
            cfg.warmup = (int)v;
            break;
        case OPT_TIMEOUT:
            if (!parse_positive(optarg, &d, false))
                return cli_usage_error("bench", "--timeout '%s': want seconds > 0", optarg);
            cfg.timeout_s = d;
            break;
        case OPT_PROMPT_MODE:
            if (!strcmp(optarg, "auto"))
                cfg.prompt_mode = BENCH_PROMPTS_AUTO;
            else if (!strcmp(optarg, "tokenizer"))
                cfg.prompt_mode = BENCH_PROMPTS_TOKENIZER;
            else if (!strcmp(optarg, "tokenize"))
                cfg.prompt_mode = BENCH_PROMPTS_TOKENIZE;
            else if (!strcmp(optarg, "ids"))
                cfg.prompt_mode = BENCH_PROMPTS_IDS;
            else
                return cli_usage_error(
                    "bench", "--prompt-mode '%s': want auto, tokenizer, tokenize or ids", optarg);
            break;
        case OPT_TOKENIZER:
            tokenizer_dir = optarg;
            break;
        case OPT_TOKEN_IDS: {
            int lo, hi, n = 0;
            if (sscanf(optarg, "%d-%d%n", &lo, &hi, &n) != 2 || optarg[n] || lo < 0 || hi <= lo)
                return cli_usage_error("bench", "--token-ids '%s': want LO-HI with 0 <= LO < HI",
                                       optarg);
            cfg.id_lo = lo;
            cfg.id_hi = hi;
            break;
        }
        case OPT_NO_MIN_TOKENS:
            cfg.min_tokens = false;
            break;
        case OPT_NO_STREAM:
            cfg.no_stream = true;
            break;
        case OPT_ROUNDS:
            if (!cli_parse_int(optarg, 1, 1000, &v))
                return cli_usage_error("bench", "--rounds '%s': want an integer in [1, 1000]",
                                       optarg);
            cfg.rounds = (int)v;
            break;
        case OPT_INTERLEAVE:
            if (!strcmp(optarg, "runs"))
                cfg.interleave = BENCH_INTERLEAVE_RUNS;
            else if (!strcmp(optarg, "requests"))
                cfg.interleave = BENCH_INTERLEAVE_REQUESTS;
            else
                return cli_usage_error("bench", "--interleave '%s': want runs or requests", optarg);
            break;
        case OPT_SLO:
            if (bench_slo_parse(optarg, &slo, &e) != 0)
                return cli_usage_error("bench", "%s", e.msg);
            break;
        case OPT_OUT:
            out_path = optarg;
            break;
        case OPT_PLOT:
            plot_dir = optarg;
            break;
        case OPT_MARKDOWN:
            md_path = optarg;
            break;
        case OPT_NO_PROGRESS:
            no_progress = true;
            break;
        case OPT_QUIET:
            quiet = true;
            break;
        case 'h':
            bench_help(stdout);
            return CLI_EXIT_OK;
        default:
            fprintf(stderr, "Run 'loom bench --help' for the options.\n");
            return CLI_EXIT_USAGE;
        }
    }
    if (optind < argc)
        return cli_usage_error("bench", "unexpected argument '%s'", argv[optind]);
    if (cfg.n_targets == 0)
        return cli_usage_error("bench", "%s", "no target: give --url http://host:port");
    if (n_labels > cfg.n_targets)
        return cli_usage_error("bench", "%s", "more --label than --url");
    if (trace_path && (synthetic || input_spec || output_spec))
        return cli_usage_error("bench", "%s",
                               "--trace gives the lengths; for a trace's length histogram "
                               "with synthetic arrivals use --input-len trace:FILE");
    if (batch && (isfinite(cfg.rate) || time_scale_given))
        return cli_usage_error("bench", "%s",
                               "--batch submits everything at once: no --rate or "
                               "--time-scale with it");
    if (batch && cfg.max_requests)
        return cli_usage_error("bench", "%s", "--batch N already says how many requests");
    if (!cfg.api_key) {
        cfg.api_key = getenv("OPENAI_API_KEY");
        if (!cfg.api_key || !*cfg.api_key)
            cfg.api_key = getenv("LOOM_API_KEY");
    }

    int rc = CLI_EXIT_OK;
    bench_trace trace = {0};
    bench_result *res = NULL;
    tokenizer *tok = NULL;
    if (trace_path) {
        if (bench_trace_load(trace_path, &trace, &e) != 0) {
            fprintf(stderr, "loom bench: error: %s\n", e.msg);
            return CLI_EXIT_USAGE;
        }
        cfg.workload.trace = &trace;
    } else {
        if (bench_dist_parse(input_spec ? input_spec : "1024", true, &cfg.workload.input, &e) !=
                0 ||
            bench_dist_parse(output_spec ? output_spec : "128", false, &cfg.workload.output, &e) !=
                0) {
            fprintf(stderr, "loom bench: error: %s\n", e.msg);
            rc = CLI_EXIT_USAGE;
            goto done;
        }
    }
    /* arrivals: --batch, --rate, trace timestamps, or all at once (closed loop) */
    if (batch) {
        cfg.arrival = BENCH_ARRIVAL_AT_ONCE;
        cfg.max_requests = (uint64_t)batch;
    } else if (!rate_given && trace_path && (cfg.concurrency == 0 || time_scale_given)) {
        cfg.arrival = BENCH_ARRIVAL_TRACE; /* replay the timestamps */
    }
    if (time_scale_given && cfg.arrival != BENCH_ARRIVAL_TRACE) {
        fprintf(stderr, "loom bench: error: --time-scale scales trace timestamps: give --trace "
                        "and no --rate\n");
        rc = CLI_EXIT_USAGE;
        goto done;
    }
    if (tokenizer_dir) {
        if (tokenizer_load_dir(tokenizer_dir, &tok, &e) != 0) {
            fprintf(stderr,
                    "loom bench: error: %s\nHINT: --tokenizer wants a directory with "
                    "tokenizer.json\n",
                    e.msg);
            rc = CLI_EXIT_USAGE;
            goto done;
        }
        cfg.tok = tok;
    }
    cfg.progress = !no_progress && isatty(STDERR_FILENO);
    cfg.handle_signals = true;

    if (bench_run(&cfg, &res, &e) != 0) {
        fprintf(stderr, "loom bench: error: %s\n", e.msg);
        rc = e.code == LOOM_EINVAL || e.code == LOOM_ENOTFOUND || e.code == LOOM_EUNSUPPORTED
                 ? CLI_EXIT_USAGE
                 : CLI_EXIT_FAIL;
        goto done;
    }
    res->slo = slo;
    if (!quiet)
        bench_report_print(stdout, res, &slo);
    fflush(stdout);
    if (out_path) {
        if (bench_report_json(out_path, res, &slo, &e) != 0) {
            fprintf(stderr, "loom bench: error: %s\n", e.msg);
            rc = CLI_EXIT_FAIL;
        } else if (!quiet) {
            fprintf(stderr, "wrote %s\n", out_path);
        }
    }
    if (md_path) {
        loom_buf md;
        buf_init(&md);
        bench_report_markdown(&md, res, &slo);
        FILE *f = fopen(md_path, "w");
        if (!f || fwrite(md.data, 1, md.len, f) != md.len) {
            fprintf(stderr, "loom bench: error: cannot write %s: %s\n", md_path, strerror(errno));
            rc = CLI_EXIT_FAIL;
        }
        if (f)
            fclose(f);
        buf_free(&md);
    }
    if (plot_dir) {
        int prc = bench_report_plots(plot_dir, res, &e);
        if (prc == LOOM_ENOTFOUND)
            fprintf(stderr, "loom bench: warning: %s\n", e.msg);
        else if (prc != 0) {
            fprintf(stderr, "loom bench: error: %s\n", e.msg);
            rc = CLI_EXIT_FAIL;
        } else if (!quiet) {
            fprintf(stderr, "wrote plots to %s/\n", plot_dir);
        }
    }
    if (!bench_result_ok(res)) {
        size_t failed = 0;
        for (size_t i = 0; i < res->n_records; i++)
            failed += res->records[i].error != BENCH_OK;
        fprintf(stderr, "loom bench: %zu of %zu requests failed%s\n", failed, res->n_records,
                res->interrupted ? " (interrupted)" : "");
        rc = CLI_EXIT_FAIL;
    }
done:
    bench_result_free(res);
    tokenizer_free(tok);
    bench_trace_free(&trace);
    bench_dist_free(&cfg.workload.input);
    bench_dist_free(&cfg.workload.output);
    return rc;
}
