/*
 * `loom up [plan.yaml]`: the whole serving system from one plan. Starts every instance of the
 * plan that lives on this machine as a `loom serve` child (this same binary, /proc/self/exe;
 * the cpu backend for `cpu` devices, the emulated backend for the others, with the plan's KV
 * blocks and batch), prints the exact `loom serve` command for each instance on another host,
 * waits until the local ones answer /health, then runs the gateway in this process in front of
 * all of them (the plan's rates as capacity_aware's starting rates). SIGINT/SIGTERM stop the
 * gateway, then the children (SIGTERM, SIGKILL after a grace period), reaped before exit 0.
 * Without a plan it plans this machine (its cores as a `cpu` device) for random:llama-tiny.
 * Argument parsing and wiring only: planning is src/plan, the gateway src/gateway.
 */
#include "cli.h"

#include "loom/gateway.h"
#include "loom/model.h"
#include "loom/perf.h"
#include "loom/plan.h"
#include "loom/policy.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define UP_MAX_ARGS 40

typedef struct up_opts {
    const char *plan;
    const char *model;
    const char *policy;
    const char *host; /* gateway */
    int port;
    const char *bind;    /* local instances listen here */
    int base_port;       /* remote instances: base + rank on their host */
    const char *catalog; /* for serve --catalog and planning */
    const char *log_dir; /* instance logs; NULL: stdout discarded, stderr shared */
    double startup_timeout;
    double stop_timeout;
    long long cores;         /* no plan: cores of the cpu device */
    long long max_kv_blocks; /* cap per instance (0 = the plan's) */
    long long max_num_seqs;  /* cap per instance (0 = the plan's) */
    long long max_restarts;  /* restarts in a row of an instance that dies, then give up */
    bool prefix_affinity;
    bool dry_run;
} up_opts;

/* One instance of the plan: where it listens and the `loom serve` arguments that start it. */
typedef struct up_instance {
    bool local;
    char host[128]; /* address the gateway uses */
    int port;
    int argc;
    char args[UP_MAX_ARGS][192];
    char *argv[UP_MAX_ARGS + 1];
    pid_t pid; /* 0: not started (remote) or reaped */
    int status;
    /* supervision (local instances, once the gateway runs) */
    double started_at;   /* when the running process was started */
    double restart_at;   /* > 0: dead, to be started again then */
    int restarts_in_row; /* restarts since it last stayed up UP_STABLE_S */
    bool given_up;       /* dead for good: --max-restarts reached */
} up_instance;

/* Restart back-off: 1 s after the first death, doubling up to 30 s; an instance that stays up
 * UP_STABLE_S counts as healthy again (its next death waits 1 s, and the limit starts over). */
#define UP_BACKOFF_FIRST_S 1.0
#define UP_BACKOFF_MAX_S 30.0
#define UP_STABLE_S 60.0

enum {
    OPT_MODEL = 256,
    OPT_POLICY,
    OPT_HOST,
    OPT_PORT,
    OPT_BIND,
    OPT_BASE_PORT,
    OPT_CATALOG,
    OPT_LOG_DIR,
    OPT_STARTUP_TIMEOUT,
    OPT_STOP_TIMEOUT,
    OPT_CORES,
    OPT_MAX_KV_BLOCKS,
    OPT_MAX_NUM_SEQS,
    OPT_MAX_RESTARTS,
    OPT_PREFIX_AFFINITY,
    OPT_DRY_RUN,
};

static const struct option long_opts[] = {
    {"model", required_argument, NULL, OPT_MODEL},
    {"policy", required_argument, NULL, OPT_POLICY},
    {"host", required_argument, NULL, OPT_HOST},
    {"port", required_argument, NULL, OPT_PORT},
    {"bind", required_argument, NULL, OPT_BIND},
    {"base-port", required_argument, NULL, OPT_BASE_PORT},
    {"catalog", required_argument, NULL, OPT_CATALOG},
    {"log-dir", required_argument, NULL, OPT_LOG_DIR},
    {"startup-timeout", required_argument, NULL, OPT_STARTUP_TIMEOUT},
    {"stop-timeout", required_argument, NULL, OPT_STOP_TIMEOUT},
    {"cores", required_argument, NULL, OPT_CORES},
    {"max-kv-blocks", required_argument, NULL, OPT_MAX_KV_BLOCKS},
    {"max-num-seqs", required_argument, NULL, OPT_MAX_NUM_SEQS},
    {"max-restarts", required_argument, NULL, OPT_MAX_RESTARTS},
    {"prefix-affinity", no_argument, NULL, OPT_PREFIX_AFFINITY},
    {"dry-run", no_argument, NULL, OPT_DRY_RUN},
    {"help", no_argument, NULL, 'h'},
    {NULL, 0, NULL, 0},
};

/* clang-format off */
static const char up_help[] =
"usage: loom up [plan.yaml] [options]\n"
"\n"
"Starts the deployment of a plan (`loom plan`) and one OpenAI-compatible endpoint in front of\n"
"it. Every instance on this machine (its host is empty, loopback, this host's name or one of\n"
"its addresses) is started as a `loom serve` child on a free port: the cpu backend with\n"
"--threads TP for `cpu` devices, else the emulated backend (--device, --tp), with the plan's\n"
"--num-kv-blocks, --block-size and --max-num-seqs. For an instance on another host the exact\n"
"`loom serve` command to run there is printed, and the gateway expects it at HOST:PORT with\n"
"PORT = --base-port + its rank among that host's instances. When the local instances answer\n"
"/health the gateway starts in this process with the plan's predicted rates and KV sizes and\n"
"the endpoint is printed. A local instance that dies afterwards is started again on its port\n"
"(after 1 s, doubling up to 30 s; at most --max-restarts times in a row) and the gateway\n"
"re-admits it when it answers /health. Ctrl-C (SIGINT) or SIGTERM stops the gateway and every\n"
"child (SIGTERM, then SIGKILL after --stop-timeout); exit status 0.\n"
"\n"
"Without plan.yaml, plans this machine (its cores as the catalog's `cpu` device, as\n"
"data/clusters/localhost-cpu.yaml) for --model (random:llama-tiny) and a 512/128 workload.\n"
"\n"
"options:\n"
"  --model SPEC                 model the instances serve: a Hugging Face directory or\n"
"                               random:<preset> (default: the plan's model; a preset name\n"
"                               becomes random:<name>; random:llama-tiny without a plan)\n"
"  --policy NAME                the gateway's dispatch policy (capacity_aware)\n"
"  --prefix-affinity            capacity_aware credits cached prompt prefixes\n"
"  --host ADDR                  the gateway listens here (127.0.0.1)\n"
"  --port N                     the gateway's port (8000; 0 picks a free one)\n"
"  --bind ADDR                  local instances listen here (127.0.0.1; 0.0.0.0 when other\n"
"                               hosts must reach them)\n"
"  --base-port N                first port of instances on other hosts (8001)\n"
"  --catalog FILE               device catalog for planning and emulated instances\n"
"                               (default data/devices.yaml; $LOOM_CATALOG)\n"
"  --cores N                    without a plan: cores of this machine to plan (online CPUs)\n"
"  --max-kv-blocks N            start local instances with at most N KV blocks (default: the\n"
"                               plan's; a cpu instance's blocks are real memory)\n"
"  --max-num-seqs N             and at most N running sequences (default: the plan's batch)\n"
"  --max-restarts N             restart a local instance that dies at most N times in a row\n"
"                               (5; 0 never); a minute up resets the count\n"
"  --log-dir DIR                each instance's output in DIR/instance-I.log (default: their\n"
"                               stdout is discarded, their stderr is this terminal)\n"
"  --startup-timeout SECONDS    wait this long for local instances' /health (120)\n"
"  --stop-timeout SECONDS       after SIGTERM, wait this long before SIGKILL (10)\n"
"  --dry-run                    print the instances and commands, start nothing\n"
"  -h, --help                   this text\n"
"\n"
"Exit status: 0 after SIGINT/SIGTERM (or --dry-run), 1 when an instance or the gateway cannot\n"
"start, 2 for bad flags or an unusable plan.\n"
"\n"
"examples:\n"
"  loom up                                  # this machine, random:llama-tiny\n"
"  loom plan --cluster data/clusters/hetero-small.yaml --model random:llama-1b\n"
"  loom up plan.yaml --port 8000\n";
/* clang-format on */

static volatile sig_atomic_t stop_requested;

static void on_stop_signal(int sig)
{
    stop_requested = sig;
}

static bool parse_double(const char *s, double lo, double hi, double *out)
{
    char *end = NULL;
    errno = 0;
    double v = s ? strtod(s, &end) : NAN;
    if (!s || !*s || errno || *end || !isfinite(v) || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static int parse_opts(int argc, char **argv, up_opts *o, bool *help)
{
    *help = false;
    optind = 1;
    opterr = 0;
    int ch;
    while ((ch = getopt_long(argc, argv, ":h", long_opts, NULL)) != -1) {
        const char *a = optarg;
        bool ok = true;
        long long n = 0;
        switch (ch) {
        case OPT_MODEL:
            o->model = a;
            break;
        case OPT_POLICY:
            o->policy = a;
            if (!cli_policy_known("up", a))
                return CLI_EXIT_USAGE;
            break;
        case OPT_HOST:
            o->host = a;
            break;
        case OPT_PORT:
            ok = cli_parse_int(a, 0, 65535, &n);
            o->port = (int)n;
            break;
        case OPT_BIND:
            o->bind = a;
            break;
        case OPT_BASE_PORT:
            ok = cli_parse_int(a, 1, 65535, &n);
            o->base_port = (int)n;
            break;
        case OPT_CATALOG:
            o->catalog = a;
            break;
        case OPT_LOG_DIR:
            o->log_dir = a;
            break;
        case OPT_STARTUP_TIMEOUT:
            ok = parse_double(a, 0.1, 86400, &o->startup_timeout);
            break;
        case OPT_STOP_TIMEOUT:
            ok = parse_double(a, 0, 3600, &o->stop_timeout);
            break;
        case OPT_CORES:
            ok = cli_parse_int(a, 1, PLAN_MAX_DEVICES_PER_MACHINE, &o->cores);
            break;
        case OPT_MAX_KV_BLOCKS:
            ok = cli_parse_int(a, 1, (long long)1 << 40, &o->max_kv_blocks);
            break;
        case OPT_MAX_NUM_SEQS:
            ok = cli_parse_int(a, 1, 1 << 24, &o->max_num_seqs);
            break;
        case OPT_MAX_RESTARTS:
            ok = cli_parse_int(a, 0, 1 << 20, &o->max_restarts);
            break;
        case OPT_PREFIX_AFFINITY:
            o->prefix_affinity = true;
            break;
        case OPT_DRY_RUN:
            o->dry_run = true;
            break;
        case 'h':
            *help = true;
            return 0;
        case ':':
            return cli_usage_error("up", "option '%s' needs a value", argv[optind - 1]);
        default:
            return cli_usage_error("up", "unknown option '%s'", argv[optind - 1]);
        }
        if (!ok) {
            return cli_usage_error("up", "invalid value '%s' for --%s", a,
                                   long_opts[ch - OPT_MODEL].name);
        }
    }
    if (optind < argc)
        o->plan = argv[optind++];
    if (optind < argc)
        return cli_usage_error("up", "unexpected argument '%s' (one plan file at most)",
                               argv[optind]);
    return 0;
}

/* ---------------------------------------------------------------- the plan */

/* No plan: this machine's cores as one `cpu` machine, a 512/128 workload (loom plan's
 * defaults). */
static int plan_this_machine(const up_opts *o, const char *model, plan_file *out, loom_err *e)
{
    long long cores = o->cores;
    if (!cores) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        cores = nc > 0 ? nc : 1;
    }
    char cluster_text[256];
    snprintf(cluster_text, sizeof(cluster_text),
             "machines:\n  - {name: localhost, device: cpu, count: %lld, host: 127.0.0.1}\n",
             cores);
    const char *preset = !strncmp(model, "random:", 7) ? model + 7 : NULL;
    if (!preset)
        return loom_errf(e, LOOM_EINVAL,
                         "without a plan, --model must be random:<preset> (got %s); for a "
                         "checkpoint, run `loom plan --model DIR` and pass its plan.yaml",
                         model);
    plan_cluster cluster = {0};
    perf_catalog catalog = {0};
    plan_workload w;
    memset(&w, 0, sizeof(w));
    plan_result r;
    memset(&r, 0, sizeof(r));
    model_config mc;
    plan_options po;
    plan_options_default(&po);
    int rc;
    if ((rc = plan_cluster_parse(cluster_text, strlen(cluster_text), &cluster, e)) ||
        (rc = perf_catalog_load(o->catalog, &catalog, e)) ||
        (rc = model_config_preset(preset, &mc, e)) ||
        (rc = plan_workload_synthetic("512", "128", &w, e)) ||
        (rc = plan_run(&cluster, &mc, preset, &w, &catalog, &po, &r, e)))
        goto out;
    rc = plan_result_to_file(&r, out, e);
out:
    plan_result_free(&r);
    plan_workload_free(&w);
    perf_catalog_free(&catalog);
    plan_cluster_free(&cluster);
    return rc;
}

/* The model the instances serve: --model, else the plan's (a preset name -> random:NAME). */
static void model_spec(const up_opts *o, const plan_file *p, char *out, size_t cap)
{
    if (o->model) {
        snprintf(out, cap, "%s", o->model);
        return;
    }
    struct stat st;
    bool preset = false;
    for (const char *const *n = model_preset_names(); *n; n++)
        preset |= !strcmp(*n, p->model);
    if (preset && stat(p->model, &st) != 0)
        snprintf(out, cap, "random:%s", p->model);
    else
        snprintf(out, cap, "%s", p->model);
}

static void add_arg(up_instance *u, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_arg(up_instance *u, const char *fmt, ...)
{
    if (u->argc >= UP_MAX_ARGS)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(u->args[u->argc], sizeof(u->args[0]), fmt, ap);
    va_end(ap);
    u->argv[u->argc] = u->args[u->argc];
    u->argc++;
    u->argv[u->argc] = NULL;
}

/* The `loom serve` arguments of plan instance in, listening on bind:port. */
static void build_serve_args(const up_opts *o, const plan_file_instance *in, const char *model,
                             const char *bind, int port, up_instance *u)
{
    u->argc = 0;
    add_arg(u, "loom");
    add_arg(u, "serve");
    add_arg(u, "--model");
    add_arg(u, "%s", model);
    bool cpu = !strcmp(in->device, "cpu");
    if (cpu) {
        add_arg(u, "--backend");
        add_arg(u, "cpu");
        add_arg(u, "--threads");
        add_arg(u, "%d", in->tp);
    } else {
        add_arg(u, "--backend");
        add_arg(u, "emulated");
        add_arg(u, "--device");
        add_arg(u, "%s", in->device);
        add_arg(u, "--tp");
        add_arg(u, "%d", in->tp);
        if (o->catalog) {
            add_arg(u, "--catalog");
            add_arg(u, "%s", o->catalog);
        }
    }
    int64_t blocks = in->kv_blocks;
    if (o->max_kv_blocks && blocks > o->max_kv_blocks)
        blocks = o->max_kv_blocks;
    int seqs = in->max_batch;
    if (o->max_num_seqs && seqs > o->max_num_seqs)
        seqs = (int)o->max_num_seqs;
    add_arg(u, "--block-size");
    add_arg(u, "%d", in->block_size);
    add_arg(u, "--num-kv-blocks");
    add_arg(u, "%lld", (long long)blocks);
    add_arg(u, "--max-num-seqs");
    add_arg(u, "%d", seqs);
    add_arg(u, "--host");
    add_arg(u, "%s", bind);
    add_arg(u, "--port");
    add_arg(u, "%d", port);
}

/* The command as one shell line (arguments with odd characters single-quoted). */
static void format_command(const up_instance *u, char *out, size_t cap)
{
    size_t len = 0;
    out[0] = 0;
    for (int i = 0; i < u->argc && len < cap; i++) {
        const char *a = u->argv[i];
        bool plain = *a && strspn(a, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                     "0123456789-_./:=,+@") == strlen(a);
        len += (size_t)snprintf(out + len, cap - len,
                                i ? (plain ? " %s" : " '%s'") : (plain ? "%s" : "'%s'"), a);
    }
}

/* ---------------------------------------------------------------- children */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static pid_t spawn(const char *exe, up_instance *u, const char *log_path, bool append)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    /* child: die with loom up even if it is killed without a chance to stop us */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent)
        _exit(127);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    int fd = log_path ? open(log_path, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC),
                             0644)
                      : open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        dup2(fd, STDOUT_FILENO);
        if (log_path)
            dup2(fd, STDERR_FILENO);
    }
    int nul = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (nul >= 0)
        dup2(nul, STDIN_FILENO);
    execv(exe, u->argv);
    fprintf(stderr, "loom up: cannot run %s: %s\n", exe, strerror(errno));
    _exit(127);
}

/* Reaps u if it has exited; true when it has (status kept). */
static bool reap(up_instance *u)
{
    if (u->pid <= 0)
        return true;
    int st = 0;
    pid_t r = waitpid(u->pid, &st, WNOHANG);
    if (r == u->pid || (r < 0 && errno == ECHILD)) {
        u->status = st;
        u->pid = 0;
        return true;
    }
    return false;
}

/* SIGTERM every child still running, wait up to timeout, then SIGKILL and reap. */
static void stop_all(up_instance *ins, int n, double timeout)
{
    for (int i = 0; i < n; i++)
        if (ins[i].pid > 0 && !reap(&ins[i]))
            kill(ins[i].pid, SIGTERM);
    double deadline = now_s() + timeout;
    for (;;) {
        bool left = false;
        for (int i = 0; i < n; i++)
            left |= !reap(&ins[i]);
        if (!left)
            return;
        if (now_s() >= deadline)
            break;
        usleep(20000);
    }
    for (int i = 0; i < n; i++)
        if (ins[i].pid > 0) {
            fprintf(stderr, "loom up: instance %d (pid %d) did not stop in %.0f s: SIGKILL\n", i,
                    (int)ins[i].pid, timeout);
            kill(ins[i].pid, SIGKILL);
            waitpid(ins[i].pid, &ins[i].status, 0);
            ins[i].pid = 0;
        }
}

static void describe_exit(int status, char *out, size_t cap)
{
    if (WIFEXITED(status))
        snprintf(out, cap, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(out, cap, "killed by signal %d", WTERMSIG(status));
    else
        snprintf(out, cap, "ended (status %d)", status);
}

/* Waits until every local instance answers /health 200; CLI_EXIT_* */
static int wait_healthy(up_instance *ins, int n, double timeout)
{
    double deadline = now_s() + timeout;
    bool *ok = calloc((size_t)n, sizeof(*ok));
    if (!ok)
        return CLI_EXIT_FAIL;
    int rc = CLI_EXIT_OK;
    for (;;) {
        int pending = 0;
        for (int i = 0; i < n; i++) {
            if (!ins[i].local || ok[i])
                continue;
            if (reap(&ins[i])) {
                char why[64];
                describe_exit(ins[i].status, why, sizeof(why));
                fprintf(stderr,
                        "loom up: instance %d (%s) %s before it was healthy\nHINT: run its "
                        "command by hand to see why, or pass --log-dir DIR\n",
                        i, ins[i].argv[3], why);
                rc = CLI_EXIT_FAIL;
                goto out;
            }
            if (gateway_probe_health(ins[i].host, ins[i].port, 1.0) == 200)
                ok[i] = true;
            else
                pending++;
        }
        if (!pending)
            break;
        if (stop_requested) {
            rc = CLI_EXIT_OK;
            goto out;
        }
        if (now_s() >= deadline) {
            fprintf(stderr,
                    "loom up: %d instance%s not healthy after %.0f s\nHINT: a larger "
                    "--startup-timeout, or --log-dir DIR to see what they do\n",
                    pending, pending == 1 ? "" : "s", timeout);
            rc = CLI_EXIT_FAIL;
            goto out;
        }
        usleep(100000);
    }
out:
    free(ok);
    return rc;
}

/* ---------------------------------------------------------------- supervision */

/* What the gateway's tick needs to keep the local instances running. */
typedef struct up_supervisor {
    gateway *g;
    up_instance *ins;
    int n;
    const char *exe;
    const char *log_dir;
    long long max_restarts;
} up_supervisor;

static void instance_log_path(const char *log_dir, int i, char *out, size_t cap)
{
    snprintf(out, cap, "%s/instance-%d.log", log_dir, i);
}

/*
 * Runs on the gateway's thread every tick: reaps local instances that have died and starts them
 * again, on the same port with the same arguments, after a back-off. Bounded: one waitpid per
 * instance and at most one fork each. The gateway sees a dead instance through its own health
 * checks (a refused connection ejects it at once) and re-admits the restarted one when it
 * answers /health; nothing here talks to the gateway but to stop it.
 *
 * SIGINT/SIGTERM are ours, not the gateway's: the flag is looked at here first, so that an
 * instance that a Ctrl-C at the terminal stopped (the whole process group gets it) is never
 * taken for one that died.
 */
static void supervise_tick(void *arg, double now)
{
    up_supervisor *s = arg;
    if (stop_requested) {
        gateway_stop(s->g);
        return;
    }
    (void)now; /* the gateway's clock is loom_now(); ours is now_s(), both monotonic */
    double t = now_s();
    for (int i = 0; i < s->n; i++) {
        up_instance *u = &s->ins[i];
        if (!u->local || u->given_up)
            continue;
        if (u->pid > 0) {
            if (t - u->started_at >= UP_STABLE_S)
                u->restarts_in_row = 0;
            if (!reap(u))
                continue;
            char why[64];
            describe_exit(u->status, why, sizeof(why));
            if (u->restarts_in_row >= s->max_restarts) {
                u->given_up = true;
                fprintf(stderr,
                        "loom up: instance %d (port %d) %s; not restarted (%lld restart%s in a "
                        "row, --max-restarts); the gateway routes around it\n",
                        i, u->port, why, (long long)u->restarts_in_row,
                        u->restarts_in_row == 1 ? "" : "s");
                continue;
            }
            double backoff = UP_BACKOFF_FIRST_S;
            for (int k = 0; k < u->restarts_in_row && backoff < UP_BACKOFF_MAX_S; k++)
                backoff *= 2;
            if (backoff > UP_BACKOFF_MAX_S)
                backoff = UP_BACKOFF_MAX_S;
            u->restart_at = t + backoff;
            fprintf(stderr, "loom up: instance %d (port %d) %s; restarting it in %.0f s\n", i,
                    u->port, why, backoff);
        } else if (u->restart_at > 0 && t >= u->restart_at) {
            char log_path[PATH_MAX];
            if (s->log_dir)
                instance_log_path(s->log_dir, i, log_path, sizeof(log_path));
            fflush(NULL);
            pid_t pid = spawn(s->exe, u, s->log_dir ? log_path : NULL, true);
            u->restarts_in_row++;
            if (pid < 0) {
                u->restart_at = t + UP_BACKOFF_MAX_S;
                fprintf(stderr, "loom up: instance %d: fork: %s; trying again in %.0f s\n", i,
                        strerror(errno), UP_BACKOFF_MAX_S);
                continue;
            }
            u->pid = pid;
            u->started_at = t;
            u->restart_at = 0;
            fprintf(stderr, "loom up: instance %d restarted (pid %d, restart %d of at most %lld in "
                            "a row); the gateway re-admits it when it answers /health\n",
                    i, (int)pid, u->restarts_in_row, (long long)s->max_restarts);
        }
    }
}

/* ---------------------------------------------------------------- main */

int cli_up(int argc, char **argv)
{
    up_opts o = {.policy = "capacity_aware",
                 .host = "127.0.0.1",
                 .port = 8000,
                 .bind = "127.0.0.1",
                 .base_port = GATEWAY_PLAN_BASE_PORT,
                 .startup_timeout = 120,
                 .stop_timeout = 10,
                 .max_restarts = 5};
    bool help;
    int rc = parse_opts(argc, argv, &o, &help);
    if (rc || help) {
        if (help)
            fputs(up_help, stdout);
        return rc;
    }

    loom_err e = {0};
    plan_file pf;
    memset(&pf, 0, sizeof(pf));
    up_instance *ins = NULL;
    gateway_upstream_spec *ups = NULL;
    int *ports = NULL;
    gateway *g = NULL;
    int n = 0, n_local = 0;
    char model[PATH_MAX];

    if (o.plan) {
        if (plan_file_load(o.plan, &pf, &e)) {
            fprintf(stderr,
                    "loom up: %s: %s\nHINT: write a plan with `loom plan`, check it "
                    "with `loom plan --check FILE`\n",
                    o.plan, e.msg);
            return CLI_EXIT_USAGE;
        }
    } else {
        const char *m = o.model ? o.model : "random:llama-tiny";
        if (plan_this_machine(&o, m, &pf, &e)) {
            fprintf(stderr, "loom up: planning this machine: %s\n", e.msg);
            return CLI_EXIT_USAGE;
        }
        if (!o.model)
            o.model = m;
    }
    model_spec(&o, &pf, model, sizeof(model));
    n = pf.n_instances;
    ins = calloc((size_t)n, sizeof(*ins));
    ports = calloc((size_t)n, sizeof(*ports));
    ups = calloc((size_t)n, sizeof(*ups));
    if (!ins || !ports || !ups) {
        fprintf(stderr, "loom up: out of memory\n");
        rc = CLI_EXIT_FAIL;
        goto out;
    }

    /* addresses: local instances on free ports, remote ones at base + rank on their host */
    for (int i = 0; i < n; i++) {
        const plan_file_instance *in = &pf.instances[i];
        up_instance *u = &ins[i];
        u->local = gateway_host_is_local(in->host);
        if (u->local) {
            const char *reach = !strcmp(o.bind, "0.0.0.0") || !strcmp(o.bind, "::")
                                    ? (strchr(o.bind, ':') ? "::1" : "127.0.0.1")
                                    : o.bind;
            snprintf(u->host, sizeof(u->host), "%s", reach);
            int port = -1;
            for (int tries = 0; tries < 20 && port < 0; tries++) {
                port = gateway_free_port(o.bind, &e);
                for (int j = 0; port > 0 && j < i; j++)
                    if (ins[j].local && ins[j].port == port)
                        port = -1; /* the kernel may hand out a port twice: not ours twice */
                if (port == o.port)
                    port = -1;
            }
            if (port < 0) {
                fprintf(stderr, "loom up: no free port for instance %d: %s\n", i, e.msg);
                rc = CLI_EXIT_FAIL;
                goto out;
            }
            u->port = port;
            build_serve_args(&o, in, model, o.bind, port, u);
        } else {
            snprintf(u->host, sizeof(u->host), "%s", in->host);
            int rank = 0;
            for (int j = 0; j < i; j++)
                rank += !strcmp(pf.instances[j].host, in->host);
            u->port = o.base_port + rank;
            if (u->port > 65535) {
                fprintf(stderr,
                        "loom up: instance %d on %s would need port %d: lower "
                        "--base-port\n",
                        i, in->host, u->port);
                rc = CLI_EXIT_USAGE;
                goto out;
            }
            build_serve_args(&o, in, model, "0.0.0.0", u->port, u);
        }
        ports[i] = u->port;
    }
    if (gateway_upstreams_from_plan(&pf, ports, o.base_port, ups, &e)) {
        fprintf(stderr, "loom up: %s\n", e.msg);
        rc = CLI_EXIT_USAGE;
        goto out;
    }
    for (int i = 0; i < n; i++) {
        if (!ins[i].local)
            continue;
        /* the gateway reaches a local instance where it listens, whatever host the plan says */
        char url[300];
        bool v6 = strchr(ins[i].host, ':') != NULL;
        snprintf(url, sizeof(url), "http://%s%s%s:%d", v6 ? "[" : "", ins[i].host, v6 ? "]" : "",
                 ins[i].port);
        gateway_upstream_spec s = ups[i];
        if (gateway_upstream_parse(url, &ups[i], &e)) {
            fprintf(stderr, "loom up: %s\n", e.msg);
            rc = CLI_EXIT_FAIL;
            goto out;
        }
        ups[i].weight = s.weight;
        ups[i].prefill_rate = s.prefill_rate;
        ups[i].decode_rate = s.decode_rate;
        ups[i].kv_tokens = s.kv_tokens;
        ups[i].max_batch = s.max_batch;
    }

    printf("loom up: %s, model %s, %d instance%s (predicted %.0f output tokens/s)\n",
           o.plan ? o.plan : "this machine", model, n, n == 1 ? "" : "s", pf.output_tokens_per_s);
    for (int i = 0; i < n; i++) {
        char cmd[2048];
        format_command(&ins[i], cmd, sizeof(cmd));
        const plan_file_instance *in = &pf.instances[i];
        printf("  [%d] %s %s x%d at %s:%d  %s: %s\n", i, in->machine, in->device, in->tp,
               ins[i].host, ins[i].port, ins[i].local ? "local" : "remote, run there", cmd);
        n_local += ins[i].local;
    }
    fflush(stdout);
    if (o.dry_run) {
        rc = CLI_EXIT_OK;
        goto out;
    }

    /* from here on, SIGINT/SIGTERM mean: stop everything cleanly */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    char exe[PATH_MAX];
    ssize_t el = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (el <= 0) {
        fprintf(stderr, "loom up: cannot find this executable (/proc/self/exe): %s\n",
                strerror(errno));
        rc = CLI_EXIT_FAIL;
        goto out;
    }
    exe[el] = 0;
    if (o.log_dir && mkdir(o.log_dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "loom up: --log-dir %s: %s\n", o.log_dir, strerror(errno));
        rc = CLI_EXIT_USAGE;
        goto out;
    }
    for (int i = 0; i < n; i++) {
        if (!ins[i].local)
            continue;
        char log_path[PATH_MAX];
        if (o.log_dir)
            instance_log_path(o.log_dir, i, log_path, sizeof(log_path));
        fflush(NULL);
        ins[i].pid = spawn(exe, &ins[i], o.log_dir ? log_path : NULL, false);
        ins[i].started_at = now_s();
        if (ins[i].pid < 0) {
            fprintf(stderr, "loom up: fork: %s\n", strerror(errno));
            ins[i].pid = 0;
            rc = CLI_EXIT_FAIL;
            goto stop;
        }
    }
    if (n_local) {
        printf("loom up: waiting for %d local instance%s\n", n_local, n_local == 1 ? "" : "s");
        fflush(stdout);
    }
    if ((rc = wait_healthy(ins, n, o.startup_timeout)) || stop_requested)
        goto stop;

    gateway_config cfg;
    gateway_config_default(&cfg);
    cfg.host = o.host;
    cfg.port = o.port;
    cfg.policy = o.policy;
    cfg.policy_cfg.prefix_affinity = o.prefix_affinity;
    cfg.upstreams = ups;
    cfg.n_upstreams = n;
    cfg.handle_signals = false; /* supervise_tick stops it on our SIGINT/SIGTERM */
    up_supervisor sup = {.ins = ins,
                         .n = n,
                         .exe = exe,
                         .log_dir = o.log_dir,
                         .max_restarts = o.max_restarts};
    cfg.tick_fn = supervise_tick;
    cfg.tick_arg = &sup;
    if ((rc = gateway_create(&cfg, &g, &e))) {
        fprintf(stderr, "loom up: gateway: %s\n", e.msg);
        if (rc == LOOM_EIO)
            fprintf(stderr, "HINT: another --port, or --port 0 for any free one\n");
        rc = CLI_EXIT_FAIL;
        goto stop;
    }
    const char *shown = !strcmp(o.host, "0.0.0.0") ? "127.0.0.1"
                        : !strcmp(o.host, "::")    ? "::1"
                                                   : o.host;
    bool v6 = strchr(shown, ':') != NULL;
    printf("loom up: %d local instance%s healthy%s; endpoint http://%s%s%s:%d/v1 (policy %s; "
           "Ctrl-C to stop)\n",
           n_local, n_local == 1 ? "" : "s",
           n_local < n ? ", remote ones are admitted when they answer /health" : "", v6 ? "[" : "",
           shown, v6 ? "]" : "", gateway_port(g), o.policy);
    fflush(stdout);
    sup.g = g;
    if (!stop_requested && gateway_run(g, &e)) {
        fprintf(stderr, "loom up: gateway: %s\n", e.msg);
        rc = CLI_EXIT_FAIL;
    }
    if (stop_requested) {
        printf("loom up: %s received, stopping the gateway and the instances\n",
               stop_requested == SIGINT ? "SIGINT" : "SIGTERM");
        fflush(stdout);
    }

stop:
    stop_all(ins, n, o.stop_timeout);
    for (int i = 0; i < n; i++)
        if (ins[i].local && ins[i].status &&
            !(WIFSIGNALED(ins[i].status) &&
              (WTERMSIG(ins[i].status) == SIGTERM || WTERMSIG(ins[i].status) == SIGINT))) {
            char why[64];
            describe_exit(ins[i].status, why, sizeof(why));
            fprintf(stderr, "loom up: instance %d %s\n", i, why);
        }
    if (!rc)
        printf("loom up: stopped\n");
out:
    gateway_free(g);
    free(ups);
    free(ports);
    free(ins);
    plan_file_free(&pf);
    return rc;
}
