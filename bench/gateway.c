/*
 * bench/gateway: the latency `loom gateway` adds and the requests/s it sustains, beside nginx
 * and HAProxy proxying the same trivial upstream in the same run.
 *
 *   build/bench/gateway [--requests 5000] [--concurrency 32] [--seconds 5] [--rounds 5]
 *                       [--policy capacity_aware] [--markdown FILE]
 *   build/bench/gateway --upstream-only     (serve the trivial upstream; for profiling)
 *   build/bench/gateway --load PORT         (only the client, against 127.0.0.1:PORT)
 *
 * Processes (all on loopback, started and stopped here):
 *   upstream   a trivial OpenAI-shaped server (this program, forked): POST answers a fixed
 *              300-byte completion with Content-Length, keep-alive; GET /health 200
 *   loom       gateway_create/gateway_run of libloom in a forked child (the same code as
 *              `loom gateway`), policy as given, one upstream
 *   nginx      nginx -g 'daemon off;' with 1 worker, proxy_pass to an upstream block with
 *              keepalive (Debian nginx-light); skipped if not installed
 *   haproxy    haproxy -db, 1 thread, http-reuse always (Debian haproxy); skipped if absent
 * For each target: latency at concurrency 1 (a closed loop; p50 and p99 of send-to-last-byte
 * over --requests samples), and throughput at --concurrency keep-alive connections over
 * --seconds; both cut in --rounds rounds that alternate between the targets, so that other
 * load on the machine weighs on all of them alike. "Added" latency is the target's minus the
 * direct path's (the client talking to the upstream itself), measured in the same run. Every target
 * is given the same single core's worth of work (one worker/thread/event loop); the client, the
 * proxy and the upstream share the machine, so the req/s figures are comparable with each other,
 * not absolute.
 */
#define _GNU_SOURCE /* strcasestr */
#include "loom/gateway.h"

#include <arpa/inet.h>
#include <errno.h>
#include <sched.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char REQUEST_BODY[] =
    "{\"model\":\"bench\",\"prompt\":\"Say something short about proxies.\",\"max_tokens\":16}";
static const char RESPONSE_BODY[] =
    "{\"id\":\"cmpl-bench\",\"object\":\"text_completion\",\"created\":1700000000,"
    "\"model\":\"bench\",\"choices\":[{\"index\":0,\"text\":\" A proxy forwards requests and "
    "responses between clients and servers.\",\"logprobs\":null,\"finish_reason\":\"length\"}],"
    "\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":16,\"total_tokens\":24}}";

/* ---------------------------------------------------------------- placement */

/* The client on one CPU, every server (upstream and proxy) on another, the same for every
 * target: on a 2-core machine the scheduler's own placement otherwise changes from run to run,
 * and with it the wakeup latencies that dominate a loopback round trip. -1: not pinned. */
static int g_client_cpu = -1, g_server_cpu = -1;

static void pin_to(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);
}

/* ---------------------------------------------------------------- the trivial upstream */

static void up_read(struct bufferevent *bev, void *arg)
{
    (void)arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    for (;;) {
        struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
        if (end.pos < 0)
            return;
        size_t head_len = (size_t)end.pos + 4;
        char *head = malloc(head_len + 1);
        evbuffer_copyout(in, head, head_len);
        head[head_len] = 0;
        size_t body = 0;
        for (char *p = head; (p = strcasestr(p, "\ncontent-length:")); p++)
            body = strtoul(p + 16, NULL, 10);
        if (evbuffer_get_length(in) < head_len + body) {
            free(head);
            return;
        }
        evbuffer_drain(in, head_len + body);
        struct evbuffer *out = bufferevent_get_output(bev);
        if (!strncmp(head, "POST ", 5))
            evbuffer_add_printf(out,
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                "Content-Length: %zu\r\n\r\n%s",
                                sizeof(RESPONSE_BODY) - 1, RESPONSE_BODY);
        else if (!strncmp(head, "GET /health", 11))
            evbuffer_add_printf(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        else if (!strncmp(head, "GET /v1/models", 14))
            evbuffer_add_printf(
                out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     "Content-Length: 41\r\n\r\n{\"object\":\"list\",\"data\":[{\"id\":\"b\"}]}");
        else
            evbuffer_add_printf(out, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        free(head);
    }
}

static void up_event(struct bufferevent *bev, short what, void *arg)
{
    (void)arg;
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
        bufferevent_free(bev);
}

static void up_accept(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int sl,
                      void *arg)
{
    (void)sa;
    (void)sl;
    (void)arg;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct bufferevent *bev =
        bufferevent_socket_new(evconnlistener_get_base(l), fd, BEV_OPT_CLOSE_ON_FREE);
    bufferevent_setcb(bev, up_read, NULL, up_event, NULL);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
}

static int bound_port(evutil_socket_t fd)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    return ntohs(sa.sin_port);
}

/* Forks the upstream; returns its pid, its port in *port. */
static pid_t start_upstream(int *port)
{
    int pfd[2];
    if (pipe(pfd) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the benchmark */
        pin_to(g_server_cpu);
        close(pfd[0]);
        signal(SIGPIPE, SIG_IGN);
        struct event_base *base = event_base_new();
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        struct evconnlistener *l = evconnlistener_new_bind(
            base, up_accept, NULL, LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_FREE, 1024,
            (struct sockaddr *)&sa, sizeof(sa));
        int p = l ? bound_port(evconnlistener_get_fd(l)) : -1;
        if (write(pfd[1], &p, sizeof(p)) != sizeof(p))
            _exit(1);
        close(pfd[1]);
        event_base_dispatch(base);
        _exit(0);
    }
    close(pfd[1]);
    if (read(pfd[0], port, sizeof(*port)) != sizeof(*port))
        *port = -1;
    close(pfd[0]);
    return pid;
}

/* Forks `loom gateway` (the library, as the CLI runs it); returns its pid, its port in *port. */
static pid_t start_loom(int upstream_port, const char *policy, int *port)
{
    int pfd[2];
    if (pipe(pfd) != 0)
        return -1;
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        pin_to(g_server_cpu);
        close(pfd[0]);
        gateway_config cfg;
        gateway_config_default(&cfg);
        cfg.port = 0;
        cfg.policy = policy;
        cfg.handle_signals = true;
        gateway_upstream_spec up;
        loom_err e = {0};
        char url[64];
        snprintf(url, sizeof(url), "http://127.0.0.1:%d", upstream_port);
        int p = -1;
        gateway *g = NULL;
        if (gateway_upstream_parse(url, &up, &e) == 0) {
            cfg.upstreams = &up;
            cfg.n_upstreams = 1;
            if (gateway_create(&cfg, &g, &e) == 0)
                p = gateway_port(g);
        }
        if (p < 0)
            fprintf(stderr, "bench/gateway: loom: %s\n", e.msg);
        if (write(pfd[1], &p, sizeof(p)) != sizeof(p))
            _exit(1);
        close(pfd[1]);
        if (g)
            gateway_run(g, &e);
        gateway_free(g);
        _exit(0);
    }
    close(pfd[1]);
    if (read(pfd[0], port, sizeof(*port)) != sizeof(*port))
        *port = -1;
    close(pfd[0]);
    return pid;
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd, (struct sockaddr *)&sa, sizeof(sa));
    int p = bound_port(fd);
    close(fd);
    return p;
}

static bool have(const char *prog)
{
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "command -v %s >/dev/null 2>&1", prog);
    return system(cmd) == 0;
}

static pid_t spawn(char *const argv[], const char *log)
{
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* kept across exec */
        pin_to(g_server_cpu);                /* so is the affinity */
        FILE *f = fopen(log, "w");
        if (f) {
            dup2(fileno(f), 1);
            dup2(fileno(f), 2);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static pid_t start_nginx(const char *dir, int upstream_port, int *port)
{
    *port = free_port();
    char conf[512];
    snprintf(conf, sizeof(conf), "%s/nginx.conf", dir);
    FILE *f = fopen(conf, "w");
    if (!f)
        return -1;
    fprintf(f,
            "worker_processes 1;\npid %s/nginx.pid;\nerror_log %s/nginx-error.log warn;\n"
            "events { worker_connections 4096; }\n"
            "http {\n  access_log off;\n  keepalive_requests 100000000;\n"
            "  keepalive_timeout 300s;\n  client_body_temp_path %s/ngx-body;\n"
            "  proxy_temp_path %s/ngx-proxy;\n  fastcgi_temp_path %s/ngx-fcgi;\n"
            "  uwsgi_temp_path %s/ngx-uwsgi;\n  scgi_temp_path %s/ngx-scgi;\n"
            "  upstream up { server 127.0.0.1:%d; keepalive 128; keepalive_requests 100000000; }\n"
            "  server {\n    listen 127.0.0.1:%d;\n    location / {\n"
            "      proxy_pass http://up;\n      proxy_http_version 1.1;\n"
            "      proxy_set_header Connection \"\";\n      proxy_buffering off;\n"
            "    }\n  }\n}\n",
            dir, dir, dir, dir, dir, dir, dir, upstream_port, *port);
    fclose(f);
    char log[512];
    snprintf(log, sizeof(log), "%s/nginx.out", dir);
    char *argv[] = {"nginx", "-c", conf, "-p", (char *)dir, "-g", "daemon off;", NULL};
    return spawn(argv, log);
}

static pid_t start_haproxy(const char *dir, int upstream_port, int *port)
{
    *port = free_port();
    char conf[512];
    snprintf(conf, sizeof(conf), "%s/haproxy.cfg", dir);
    FILE *f = fopen(conf, "w");
    if (!f)
        return -1;
    fprintf(f,
            "global\n  maxconn 4096\n  nbthread 1\n"
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n"
            "  timeout server 60s\n  option http-keep-alive\n  http-reuse always\n"
            "frontend fe\n  bind 127.0.0.1:%d\n  default_backend be\n"
            "backend be\n  server s1 127.0.0.1:%d\n",
            *port, upstream_port);
    fclose(f);
    char log[512];
    snprintf(log, sizeof(log), "%s/haproxy.out", dir);
    char *argv[] = {"haproxy", "-f", conf, "-db", NULL};
    return spawn(argv, log);
}

static bool wait_listening(int port, double seconds)
{
    for (double t = 0; t < seconds; t += 0.05) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
        close(fd);
        if (rc == 0)
            return true;
        usleep(50000);
    }
    return false;
}

/* ---------------------------------------------------------------- the load generator */

typedef struct client client;

typedef struct load {
    struct event_base *base;
    char request[512];
    size_t request_len;
    int concurrency;
    int64_t want;    /* requests to complete (latency runs); 0 = until deadline */
    int64_t warmup;  /* not recorded */
    double deadline; /* throughput runs */
    int64_t done, errors;
    double *lat; /* (want) seconds */
    int64_t n_lat;
    double t_start, t_end;
    client *clients;
} load;

struct client {
    load *ld;
    struct bufferevent *bev;
    double sent_at;
};

static void client_send(client *c)
{
    c->sent_at = loom_now();
    bufferevent_write(c->bev, c->ld->request, c->ld->request_len);
}

/* A whole response at the head of in: its length, or 0 if incomplete (-1 on garbage). */
static long response_length(struct evbuffer *in, int *status)
{
    struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
    if (end.pos < 0)
        return evbuffer_get_length(in) > 65536 ? -1 : 0;
    size_t head_len = (size_t)end.pos + 4;
    char head[4096];
    size_t n = head_len < sizeof(head) - 1 ? head_len : sizeof(head) - 1;
    evbuffer_copyout(in, head, n);
    head[n] = 0;
    *status = atoi(head + 9);
    const char *cl = strcasestr(head, "\ncontent-length:");
    if (cl)
        return (long)head_len + strtol(cl + 16, NULL, 10) <= (long)evbuffer_get_length(in)
                   ? (long)head_len + strtol(cl + 16, NULL, 10)
                   : 0;
    if (strcasestr(head, "\ntransfer-encoding: chunked")) {
        /* the last chunk "0\r\n\r\n" follows a CRLF: the head's own, or a chunk's */
        struct evbuffer_ptr start;
        evbuffer_ptr_set(in, &start, head_len - 2, EVBUFFER_PTR_SET);
        struct evbuffer_ptr last = evbuffer_search(in, "\r\n0\r\n\r\n", 7, &start);
        return last.pos < 0 ? 0 : (long)last.pos + 7;
    }
    return -1;
}

static void client_read(struct bufferevent *bev, void *arg)
{
    client *c = arg;
    load *ld = c->ld;
    struct evbuffer *in = bufferevent_get_input(bev);
    for (;;) {
        int status = 0;
        long n = response_length(in, &status);
        if (n == 0)
            return;
        if (n < 0) {
            ld->errors++;
            evbuffer_drain(in, evbuffer_get_length(in));
            return;
        }
        evbuffer_drain(in, (size_t)n);
        double now = loom_now();
        if (status != 200)
            ld->errors++;
        ld->done++;
        if (ld->want && ld->done > ld->warmup && ld->n_lat < ld->want)
            ld->lat[ld->n_lat++] = now - c->sent_at;
        bool more = ld->want ? ld->done < ld->warmup + ld->want : now < ld->deadline;
        if (!more) {
            ld->t_end = now;
            event_base_loopbreak(ld->base);
            return;
        }
        client_send(c);
    }
}

static void client_event(struct bufferevent *bev, short what, void *arg)
{
    client *c = arg;
    if (what & BEV_EVENT_CONNECTED) {
        int one = 1;
        setsockopt(bufferevent_getfd(bev), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        client_send(c);
        return;
    }
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        c->ld->errors++;
        event_base_loopbreak(c->ld->base);
    }
}

static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    load *ld = arg;
    ld->t_end = loom_now();
    event_base_loopbreak(ld->base);
}

/* One run against port: returns requests/s; fills lat for latency runs. */
static double run_load(int port, int concurrency, int64_t want, int64_t warmup, double seconds,
                       double *lat, int64_t *n_lat, int64_t *errors)
{
    load ld;
    memset(&ld, 0, sizeof(ld));
    ld.base = event_base_new();
    ld.request_len = (size_t)snprintf(ld.request, sizeof(ld.request),
                                      "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                      "Content-Type: application/json\r\nContent-Length: %zu\r\n"
                                      "\r\n%s",
                                      port, sizeof(REQUEST_BODY) - 1, REQUEST_BODY);
    ld.concurrency = concurrency;
    ld.want = want;
    ld.warmup = warmup;
    ld.lat = lat;
    ld.t_start = loom_now();
    ld.deadline = ld.t_start + seconds;
    struct event *timer = NULL;
    if (!want) {
        timer = evtimer_new(ld.base, on_deadline, &ld);
        struct timeval tv = {(time_t)seconds, (suseconds_t)((seconds - (int)seconds) * 1e6)};
        evtimer_add(timer, &tv);
    } else {
        /* a latency run that stalls must still end */
        timer = evtimer_new(ld.base, on_deadline, &ld);
        struct timeval tv = {120, 0};
        evtimer_add(timer, &tv);
    }
    ld.clients = calloc((size_t)concurrency, sizeof(client));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 0; i < concurrency; i++) {
        client *c = &ld.clients[i];
        c->ld = &ld;
        c->bev = bufferevent_socket_new(ld.base, -1, BEV_OPT_CLOSE_ON_FREE);
        bufferevent_setcb(c->bev, client_read, NULL, client_event, c);
        bufferevent_enable(c->bev, EV_READ | EV_WRITE);
        bufferevent_socket_connect(c->bev, (struct sockaddr *)&sa, sizeof(sa));
    }
    event_base_dispatch(ld.base);
    if (ld.t_end == 0)
        ld.t_end = loom_now();
    for (int i = 0; i < concurrency; i++)
        bufferevent_free(ld.clients[i].bev);
    free(ld.clients);
    event_free(timer);
    event_base_free(ld.base);
    *errors = ld.errors;
    if (n_lat)
        *n_lat = ld.n_lat;
    int64_t counted = want ? ld.n_lat : ld.done;
    double dt = ld.t_end - ld.t_start;
    return dt > 0 ? counted / dt : 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double percentile(double *v, int64_t n, double q)
{
    if (n <= 0)
        return 0;
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    int64_t i = (int64_t)(q * (double)(n - 1) + 0.5);
    return v[i];
}

/* ---------------------------------------------------------------- main */

typedef struct target {
    const char *name;
    int port;
    pid_t pid;
    bool ok;
    double p50, p99, rps;
    int64_t errors;
} target;

static void usage(FILE *f)
{
    fprintf(f, "usage: bench/gateway [--requests N] [--concurrency N] [--seconds S] [--rounds R]\n"
               "                     [--policy NAME] [--markdown FILE]\n"
               "  --requests N      latency samples per target at concurrency 1 (5000)\n"
               "  --concurrency N   connections of the throughput runs (32)\n"
               "  --seconds S       throughput run time per target (5)\n"
               "  --rounds R        the runs are cut in R rounds interleaved across targets (5)\n"
               "  --policy NAME     the loom gateway's policy (capacity_aware)\n"
               "  --markdown FILE   also write the table to FILE\n"
               "  --no-pin          leave placement to the scheduler (default: the client on\n"
               "                    the first CPU allowed, the servers on the second)\n"
               "  --upstream-only   only serve the trivial upstream (prints its port)\n"
               "  --load PORT       only run the client against 127.0.0.1:PORT\n");
}

int main(int argc, char **argv)
{
    int64_t requests = 5000;
    int concurrency = 32;
    double seconds = 5;
    int rounds = 5;
    const char *policy = "capacity_aware", *markdown = NULL;
    bool upstream_only = false, pin = true;
    int load_port = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--requests") && i + 1 < argc)
            requests = atol(argv[++i]);
        else if (!strcmp(argv[i], "--concurrency") && i + 1 < argc)
            concurrency = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--rounds") && i + 1 < argc)
            rounds = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--policy") && i + 1 < argc)
            policy = argv[++i];
        else if (!strcmp(argv[i], "--markdown") && i + 1 < argc)
            markdown = argv[++i];
        else if (!strcmp(argv[i], "--no-pin"))
            pin = false;
        else if (!strcmp(argv[i], "--upstream-only"))
            upstream_only = true;
        else if (!strcmp(argv[i], "--load") && i + 1 < argc)
            load_port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (requests < 10 || concurrency < 1 || !(seconds > 0) || rounds < 1 ||
        requests / rounds < 10) {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    cpu_set_t mine;
    if (pin && sched_getaffinity(0, sizeof(mine), &mine) == 0 && CPU_COUNT(&mine) >= 2) {
        for (int c = 0, k = 0; c < CPU_SETSIZE && k < 2; c++) {
            if (!CPU_ISSET(c, &mine))
                continue;
            if (k++ == 0)
                g_client_cpu = c;
            else
                g_server_cpu = c;
        }
    }
    if (upstream_only || load_port > 0) {
        if (load_port > 0) {
            double *l = malloc((size_t)requests * sizeof(double));
            int64_t n_lat = 0, err = 0;
            run_load(load_port, 1, requests, 300, 0, l, &n_lat, &err);
            double p50 = percentile(l, n_lat, 0.5) * 1e6, p99 = percentile(l, n_lat, 0.99) * 1e6;
            double rps = run_load(load_port, concurrency, 0, 0, seconds, NULL, NULL, &err);
            printf("p50 %.1f us  p99 %.1f us  %.0f req/s  (%lld errors)\n", p50, p99, rps,
                   (long long)err);
            free(l);
            return 0;
        }
        int port = -1;
        pid_t pid = start_upstream(&port);
        printf("listening on http://127.0.0.1:%d\n", port);
        fflush(stdout);
        waitpid(pid, NULL, 0);
        return 0;
    }
    char dir[] = "/tmp/loom-bench-gateway.XXXXXX";
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }

    int up_port = -1;
    pid_t up_pid = start_upstream(&up_port);
    pin_to(g_client_cpu); /* after the forks: the children take the server CPU themselves */
    if (up_pid < 0 || up_port <= 0) {
        fprintf(stderr, "bench/gateway: the upstream did not start\n");
        return 1;
    }
    target t[4] = {{.name = "direct (no proxy)", .port = up_port, .pid = -1}};
    int nt = 1;
    int lp = -1;
    pid_t lpid = start_loom(up_port, policy, &lp);
    char loom_name[96];
    snprintf(loom_name, sizeof(loom_name), "loom gateway (%s)", policy);
    t[nt++] = (target){.name = loom_name, .port = lp, .pid = lpid};
    if (have("nginx")) {
        int p;
        pid_t pid = start_nginx(dir, up_port, &p);
        t[nt++] = (target){.name = "nginx 1 worker", .port = p, .pid = pid};
    } else {
        fprintf(stderr, "bench/gateway: nginx not installed (apt-get install nginx-light): "
                        "skipped\n");
    }
    if (have("haproxy")) {
        int p;
        pid_t pid = start_haproxy(dir, up_port, &p);
        t[nt++] = (target){.name = "HAProxy 1 thread", .port = p, .pid = pid};
    } else {
        fprintf(stderr, "bench/gateway: haproxy not installed (apt-get install haproxy): "
                        "skipped\n");
    }
    /* Rounds, interleaved across targets, so that whatever else runs on the machine weighs on
     * every target alike; latency samples are pooled, throughput summed over the rounds. */
    int64_t per_round = requests / rounds;
    double **lat = calloc((size_t)nt, sizeof(double *));
    int64_t *n_lat = calloc((size_t)nt, sizeof(int64_t));
    double *reqs = calloc((size_t)nt, sizeof(double)), *secs = calloc((size_t)nt, sizeof(double));
    for (int i = 0; i < nt; i++) {
        t[i].ok = t[i].port > 0 && wait_listening(t[i].port, 10);
        if (!t[i].ok) {
            fprintf(stderr, "bench/gateway: %s did not start (logs in %s)\n", t[i].name, dir);
            continue;
        }
        lat[i] = malloc((size_t)(per_round * rounds) * sizeof(double));
        int64_t w = 0, err = 0;
        double *tmp = malloc(300 * sizeof(double));
        run_load(t[i].port, 1, 300, 0, 0, tmp, &w, &err); /* warm up (and the first checks) */
        free(tmp);
        t[i].errors += err;
    }
    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < nt; i++) {
            if (!t[i].ok)
                continue;
            int64_t got = 0, err1 = 0, err2 = 0;
            run_load(t[i].port, 1, per_round, 50, 0, lat[i] + n_lat[i], &got, &err1);
            n_lat[i] += got;
            double s = seconds / rounds;
            double rps = run_load(t[i].port, concurrency, 0, 0, s, NULL, NULL, &err2);
            reqs[i] += rps * s;
            secs[i] += s;
            t[i].errors += err1 + err2;
        }
    }
    for (int i = 0; i < nt; i++) {
        if (!t[i].ok)
            continue;
        t[i].p50 = percentile(lat[i], n_lat[i], 0.50) * 1e6;
        t[i].p99 = percentile(lat[i], n_lat[i], 0.99) * 1e6;
        t[i].rps = secs[i] > 0 ? reqs[i] / secs[i] : 0;
        t[i].ok = n_lat[i] == per_round * rounds;
        printf("%-30s p50 %7.1f us  p99 %7.1f us  %9.0f req/s  (%lld errors)\n", t[i].name,
               t[i].p50, t[i].p99, t[i].rps, (long long)t[i].errors);
        free(lat[i]);
    }
    free(lat);
    free(n_lat);
    free(reqs);
    free(secs);
    for (int i = 0; i < nt; i++)
        if (t[i].pid > 0)
            kill(t[i].pid, SIGTERM);
    kill(up_pid, SIGTERM);
    for (int i = 0; i < nt; i++)
        if (t[i].pid > 0)
            waitpid(t[i].pid, NULL, 0);
    waitpid(up_pid, NULL, 0);

    /* the table */
    loom_buf md;
    buf_init(&md);
    buf_printf(&md,
               "| target | p50 (us) | p99 (us) | added p50 (us) | added p99 (us) | "
               "max req/s (%d conns) | errors |\n|---|---:|---:|---:|---:|---:|---:|\n",
               concurrency);
    double nginx_added = -1, loom_added = -1;
    for (int i = 0; i < nt; i++) {
        if (!t[i].ok) {
            buf_printf(&md, "| %s | - | - | - | - | - | did not run |\n", t[i].name);
            continue;
        }
        double a50 = t[i].p50 - t[0].p50, a99 = t[i].p99 - t[0].p99;
        if (i == 0)
            buf_printf(&md, "| %s | %.1f | %.1f | - | - | %.0f | %lld |\n", t[i].name, t[i].p50,
                       t[i].p99, t[i].rps, (long long)t[i].errors);
        else
            buf_printf(&md, "| %s | %.1f | %.1f | %.1f | %.1f | %.0f | %lld |\n", t[i].name,
                       t[i].p50, t[i].p99, a50, a99, t[i].rps, (long long)t[i].errors);
        if (!strncmp(t[i].name, "nginx", 5))
            nginx_added = a50;
        if (i == 1)
            loom_added = a50;
    }
    if (nginx_added > 0 && loom_added >= 0)
        buf_printf(&md, "\nloom's added p50 latency is %.2fx nginx's (target: within 1.5x).\n",
                   loom_added / nginx_added);
    printf("\n%s", md.data);
    if (markdown) {
        FILE *f = fopen(markdown, "w");
        if (!f) {
            perror(markdown);
            return 1;
        }
        fputs(md.data, f);
        fclose(f);
    }
    buf_free(&md);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "bench/gateway: could not remove %s\n", dir);
    return 0;
}
