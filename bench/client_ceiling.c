/*
 * bench/client_ceiling: how fast can `loom bench` drive a server? The load generator runs
 * closed loops against bench/fake_upstream (a separate process that streams N tokens per
 * request as SSE chunks as fast as it can, or paced), so the client, not a model, is the
 * limit. Acceptance: >= 20,000 streamed tokens/s and >= 2,000 requests/s on this machine.
 * For comparison the same load is driven by bench/client_evhttp (libevent's evhttp client)
 * when it is built beside this program.
 *
 *   build/bench/client_ceiling [--upstream build/bench/fake_upstream] [--seconds 2]
 *                              [--markdown FILE]
 *
 * Both processes share the machine's cores: on 2 cores, each gets about one.
 */
#include "loom/bench.h"

#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct config {
    int tokens;      /* per request */
    int concurrency; /* streams in flight */
    int itl_us;      /* upstream pacing between tokens; 0 = as fast as possible */
} config;

static const config configs[] = {
    {1, 64, 0},    {10, 256, 0},       {100, 256, 0},       {1000, 64, 0},
    {10, 4096, 0}, {20, 5000, 100000}, {20, 10000, 200000},
};
#define N_CONFIGS (sizeof(configs) / sizeof(configs[0]))

typedef struct row {
    config c;
    const char *client;
    double req_s, tok_s, cpu_per_kreq, ttft_p50_ms, itl_p99_ms;
    size_t requests, failed;
} row;

typedef struct upstream {
    pid_t pid;
    char url[64];
} upstream;

/* Starts fake_upstream with the config's pacing and reads its URL. */
static int upstream_start(const char *exe, const config *c, upstream *u)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
        char itl[32], tokens[32];
        snprintf(itl, sizeof(itl), "%d", c->itl_us);
        snprintf(tokens, sizeof(tokens), "%d", c->tokens);
        execl(exe, exe, "--port", "0", "--tokens", tokens, "--itl-us", itl, (char *)NULL);
        perror("exec fake_upstream");
        _exit(127);
    }
    close(fds[1]);
    FILE *f = fdopen(fds[0], "r");
    char line[256];
    int rc = -1;
    while (fgets(line, sizeof(line), f)) {
        char *p = strstr(line, "http://");
        if (p) {
            p[strcspn(p, "\r\n")] = '\0';
            snprintf(u->url, sizeof(u->url), "%s", p);
            rc = 0;
            break;
        }
    }
    fclose(f);
    u->pid = pid;
    if (rc != 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    return rc;
}

static void upstream_stop(upstream *u)
{
    kill(u->pid, SIGTERM);
    waitpid(u->pid, NULL, 0);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

static int run_loom(const config *c, const char *url, double seconds, row *out)
{
    bench_config cfg;
    bench_config_default(&cfg);
    cfg.urls[0] = url;
    cfg.n_targets = 1;
    cfg.model = "fake";
    cfg.prompt_mode = BENCH_PROMPTS_IDS;
    cfg.workload.input = (bench_dist){.kind = BENCH_DIST_FIXED, .a = 16};
    cfg.workload.output = (bench_dist){.kind = BENCH_DIST_FIXED, .a = c->tokens};
    cfg.concurrency = c->concurrency;
    cfg.duration_s = seconds; /* closed loop for this long, then the tail drains */
    cfg.timeout_s = 60;
    loom_err e;
    bench_result *res = NULL;
    double cpu0 = cpu_seconds();
    if (bench_run(&cfg, &res, &e) != 0) {
        fprintf(stderr, "client_ceiling: %s\n", e.msg);
        return -1;
    }
    double cpu = cpu_seconds() - cpu0;
    bench_summary s;
    bench_slo slo = {0};
    bench_summarize(res, 0, &slo, &s);
    out->c = *c;
    out->client = "loom bench";
    out->requests = s.n_requests;
    out->failed = s.failed;
    out->req_s = s.request_throughput;
    out->tok_s = s.output_throughput;
    out->cpu_per_kreq = s.n_requests ? cpu / (double)s.n_requests * 1000 : 0;
    out->ttft_p50_ms = s.ttft.p50;
    out->itl_p99_ms = s.itl.p99;
    bench_summary_free(&s);
    bench_result_free(res);
    return 0;
}

/* bench/client_evhttp prints "requests failed seconds tokens cpu_seconds"; it runs as many
 * requests as loom bench did. */
static int run_evhttp(const char *exe, const config *c, const char *url, size_t requests, row *out)
{
    char cmd[PATH_MAX + 256];
    snprintf(cmd, sizeof(cmd), "%s --url %s --concurrency %d --tokens %d --requests %zu", exe, url,
             c->concurrency, c->tokens, requests);
    FILE *p = popen(cmd, "r");
    if (!p)
        return -1;
    unsigned long long n = 0, failed = 0;
    double secs = 0, tokens = 0, cpu = 0;
    int got = fscanf(p, "%llu %llu %lf %lf %lf", &n, &failed, &secs, &tokens, &cpu);
    pclose(p);
    if (got != 5 || secs <= 0)
        return -1;
    memset(out, 0, sizeof(*out));
    out->c = *c;
    out->client = "evhttp client";
    out->requests = n;
    out->failed = failed;
    out->req_s = (double)(n - failed) / secs;
    out->tok_s = tokens / secs;
    out->cpu_per_kreq = n ? cpu / (double)n * 1000 : 0;
    out->ttft_p50_ms = NAN;
    out->itl_p99_ms = NAN;
    return 0;
}

static void print_row(FILE *f, const row *r, bool md)
{
    char pacing[32];
    if (r->c.itl_us > 0)
        snprintf(pacing, sizeof(pacing), "%d ms", r->c.itl_us / 1000);
    else
        snprintf(pacing, sizeof(pacing), "none");
    char ttft[32], itl[32];
    snprintf(ttft, sizeof(ttft), isnan(r->ttft_p50_ms) ? "-" : "%.2f", r->ttft_p50_ms);
    snprintf(itl, sizeof(itl), isnan(r->itl_p99_ms) ? "-" : "%.2f", r->itl_p99_ms);
    if (md)
        fprintf(f, "| %s | %d | %d | %s | %zu | %zu | %.0f | %.0f | %.3f | %s | %s |\n", r->client,
                r->c.tokens, r->c.concurrency, pacing, r->requests, r->failed, r->req_s, r->tok_s,
                r->cpu_per_kreq, ttft, itl);
    else
        fprintf(f, "%-14s %7d %7d %7s %9zu %6zu %10.0f %11.0f %9.3f %9s %9s\n", r->client,
                r->c.tokens, r->c.concurrency, pacing, r->requests, r->failed, r->req_s, r->tok_s,
                r->cpu_per_kreq, ttft, itl);
}

int main(int argc, char **argv)
{
    char self[PATH_MAX];
    snprintf(self, sizeof(self), "%s", argv[0]);
    char *dir = dirname(self);
    char upstream_exe[PATH_MAX], evhttp_exe[PATH_MAX];
    snprintf(upstream_exe, sizeof(upstream_exe), "%s/fake_upstream", dir);
    snprintf(evhttp_exe, sizeof(evhttp_exe), "%s/client_evhttp", dir);
    const char *md_path = NULL;
    double seconds = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--upstream") && i + 1 < argc)
            snprintf(upstream_exe, sizeof(upstream_exe), "%s", argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--markdown") && i + 1 < argc)
            md_path = argv[++i];
        else {
            fprintf(stderr, "usage: client_ceiling [--upstream PATH] [--seconds S] "
                            "[--markdown FILE]\n");
            return 2;
        }
    }
    if (access(upstream_exe, X_OK) != 0) {
        fprintf(stderr, "client_ceiling: %s not found; build it with 'make benches'\n",
                upstream_exe);
        return 1;
    }
    bool have_evhttp = access(evhttp_exe, X_OK) == 0;
    loom_log_level = 1;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    row rows[2 * N_CONFIGS];
    int n_rows = 0;
    printf("%-14s %7s %7s %7s %9s %6s %10s %11s %9s %9s %9s\n", "client", "tok/req", "streams",
           "ITL", "requests", "failed", "req/s", "tok/s", "cpu-s/1k", "p50 TTFT", "p99 ITL");
    bool pass = false;
    for (size_t i = 0; i < N_CONFIGS; i++) {
        const config *c = &configs[i];
        upstream u;
        if (upstream_start(upstream_exe, c, &u) != 0) {
            fprintf(stderr, "client_ceiling: cannot start %s\n", upstream_exe);
            return 1;
        }
        size_t done = 0;
        if (run_loom(c, u.url, seconds, &rows[n_rows]) == 0) {
            done = rows[n_rows].requests;
            print_row(stdout, &rows[n_rows], false);
            /* the acceptance point: one config meets both numbers at once */
            if (rows[n_rows].req_s >= 2000 && rows[n_rows].tok_s >= 20000 &&
                rows[n_rows].failed == 0)
                pass = true;
            n_rows++;
        }
        if (have_evhttp && done > 0 && run_evhttp(evhttp_exe, c, u.url, done, &rows[n_rows]) == 0) {
            print_row(stdout, &rows[n_rows], false);
            n_rows++;
        }
        upstream_stop(&u);
        fflush(stdout);
    }
    printf("acceptance (>= 2,000 req/s and >= 20,000 tok/s in one run): %s\n",
           pass ? "PASS" : "FAIL");
    if (md_path) {
        FILE *f = fopen(md_path, "w");
        if (!f) {
            fprintf(stderr, "client_ceiling: cannot write %s: %s\n", md_path, strerror(errno));
            return 1;
        }
        fprintf(f, "Closed loops against bench/fake_upstream on the same machine (client and "
                   "upstream share the cores). cpu-s/1k: client CPU seconds per 1000 requests. "
                   "ITL: the upstream's pacing between tokens (none = as fast as it can).\n\n");
        fprintf(f, "| client | tokens/request | streams in flight | ITL | requests | failed | "
                   "requests/s | tokens/s | cpu-s/1k | p50 TTFT (ms) | p99 ITL (ms) |\n");
        fprintf(f, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (int i = 0; i < n_rows; i++)
            print_row(f, &rows[i], true);
        fprintf(f, "\nAcceptance (>= 2,000 requests/s and >= 20,000 streamed tokens/s): %s.\n",
                pass ? "met" : "NOT met");
        fclose(f);
    }
    return pass ? 0 : 1;
}
