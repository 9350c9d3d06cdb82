/*
 * What `loom gateway --plan` and `loom up` need beyond the gateway itself: upstreams from a
 * plan.yaml (addresses, predicted rates, KV sizes, weights), whether a plan's host is this
 * machine, a free port, and a blocking health probe for instances that are starting.
 *
 * The plan module is read through its public header only (gateway <- plan <- perf <- base).
 */
#include "loom/gateway.h"
#include "loom/plan.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- upstreams from a plan */

int gateway_upstreams_from_plan(const struct plan_file *p, const int *ports, int base_port,
                                gateway_upstream_spec *out, loom_err *e)
{
    if (!p || p->n_instances <= 0)
        return loom_errf(e, LOOM_EINVAL, "plan: no instances");
    if (p->n_instances > GATEWAY_MAX_UPSTREAMS)
        return loom_errf(e, LOOM_EINVAL, "plan: %d instances, the gateway takes at most %d",
                         p->n_instances, GATEWAY_MAX_UPSTREAMS);
    double slowest = 0;
    for (int i = 0; i < p->n_instances; i++) {
        double r = p->instances[i].output_tokens_per_s;
        if (r > 0 && (slowest == 0 || r < slowest))
            slowest = r;
    }
    for (int i = 0; i < p->n_instances; i++) {
        const plan_file_instance *in = &p->instances[i];
        const char *host = in->host[0] ? in->host : "127.0.0.1";
        int port;
        if (ports) {
            port = ports[i];
        } else {
            int rank = 0;
            for (int j = 0; j < i; j++)
                rank += !strcmp(p->instances[j].host[0] ? p->instances[j].host : "127.0.0.1",
                                host);
            port = base_port + rank;
        }
        if (port <= 0 || port > 65535)
            return loom_errf(e, LOOM_EINVAL,
                             "plan: instance %d (machine %s) would listen on port %d; give "
                             "another base port",
                             i, in->machine, port);
        char url[sizeof(out[i].url) + 8];
        bool v6 = strchr(host, ':') != NULL;
        snprintf(url, sizeof(url), "http://%s%s%s:%d", v6 ? "[" : "", host, v6 ? "]" : "", port);
        if (gateway_upstream_parse(url, &out[i], e) != 0)
            return LOOM_EINVAL;
        double r = in->output_tokens_per_s;
        out[i].weight = slowest > 0 && r > 0 ? r / slowest : 1;
        out[i].prefill_rate = in->prefill_tokens_per_s;
        out[i].decode_rate = in->decode_tokens_per_s;
        out[i].kv_tokens = (double)in->kv_blocks * (double)in->block_size;
        out[i].max_batch = in->max_batch;
    }
    return LOOM_OK;
}

/* ---------------------------------------------------------------- this machine */

static bool is_loopback(const char *host)
{
    return !host[0] || !strcmp(host, "localhost") || !strcmp(host, "::1") ||
           !strncmp(host, "127.", 4) || !strcmp(host, "0.0.0.0") || !strcmp(host, "::");
}

bool gateway_host_is_local(const char *host)
{
    if (!host || is_loopback(host))
        return true;
    char name[256];
    if (gethostname(name, sizeof(name)) == 0) {
        name[sizeof(name) - 1] = 0;
        if (!strcasecmp(name, host))
            return true;
    }
    /* an address literal, or a name resolved to addresses: local when one is an interface's */
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    if (getaddrinfo(host, NULL, &hints, &res) != 0)
        return false;
    struct ifaddrs *ifs = NULL;
    bool local = false;
    if (getifaddrs(&ifs) == 0) {
        for (struct addrinfo *a = res; a && !local; a = a->ai_next) {
            if (a->ai_family == AF_INET &&
                ntohl(((struct sockaddr_in *)a->ai_addr)->sin_addr.s_addr) >> 24 == 127) {
                local = true;
                break;
            }
            for (struct ifaddrs *f = ifs; f && !local; f = f->ifa_next) {
                if (!f->ifa_addr || f->ifa_addr->sa_family != a->ai_family)
                    continue;
                if (a->ai_family == AF_INET)
                    local = ((struct sockaddr_in *)f->ifa_addr)->sin_addr.s_addr ==
                            ((struct sockaddr_in *)a->ai_addr)->sin_addr.s_addr;
                else if (a->ai_family == AF_INET6)
                    local = !memcmp(&((struct sockaddr_in6 *)f->ifa_addr)->sin6_addr,
                                    &((struct sockaddr_in6 *)a->ai_addr)->sin6_addr,
                                    sizeof(struct in6_addr));
            }
        }
        freeifaddrs(ifs);
    }
    freeaddrinfo(res);
    return local;
}

/* A socket bound to host:port (bind_only), else connecting to it without blocking; or -1. */
static int open_socket(const char *host, int port, bool bind_only)
{
    char service[16];
    snprintf(service, sizeof(service), "%d", port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = bind_only ? AI_PASSIVE : 0};
    struct addrinfo *res = NULL;
    if (getaddrinfo(host && host[0] ? host : "127.0.0.1", service, &hints, &res) != 0)
        return -1;
    int fd = -1;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        if (bind_only) {
            if (bind(fd, a->ai_addr, a->ai_addrlen) == 0)
                break;
        } else {
            int fl = fcntl(fd, F_GETFL, 0);
            fcntl(fd, F_SETFL, fl | O_NONBLOCK);
            if (connect(fd, a->ai_addr, a->ai_addrlen) == 0 || errno == EINPROGRESS)
                break;
        }
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

int gateway_free_port(const char *host, loom_err *e)
{
    int fd = open_socket(host, 0, true);
    if (fd < 0)
        return loom_errf(e, LOOM_EIO, "no free port on %s: %s", host ? host : "127.0.0.1",
                         strerror(errno));
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    int port = -1;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0)
        port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                        : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    close(fd);
    if (port <= 0)
        return loom_errf(e, LOOM_EIO, "no free port on %s", host ? host : "127.0.0.1");
    return port;
}

/* ---------------------------------------------------------------- health probe */

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Waits for fd to be ready for `events` until the deadline; true when it is. */
static bool wait_fd(int fd, short events, double deadline)
{
    for (;;) {
        double left = deadline - mono_now();
        if (left <= 0)
            return false;
        struct pollfd pfd = {.fd = fd, .events = events};
        int r = poll(&pfd, 1, (int)(left * 1000) + 1);
        if (r > 0)
            return true;
        if (r < 0 && errno != EINTR)
            return false;
    }
}

int gateway_probe_health(const char *host, int port, double timeout_s)
{
    double deadline = mono_now() + timeout_s;
    int fd = open_socket(host, port, false);
    if (fd < 0)
        return -1;
    int status = -1, soerr = 0;
    socklen_t sl = sizeof(soerr);
    if (!wait_fd(fd, POLLOUT, deadline) || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) ||
        soerr)
        goto out;
    char req[256];
    int n = snprintf(req, sizeof(req),
                     "GET /health HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n",
                     host && host[0] ? host : "127.0.0.1", port);
    if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n)
        goto out;
    char buf[64];
    size_t got = 0;
    while (got < sizeof(buf) - 1 && !memchr(buf, '\n', got)) {
        if (!wait_fd(fd, POLLIN, deadline))
            goto out;
        ssize_t r = recv(fd, buf + got, sizeof(buf) - 1 - got, 0);
        if (r <= 0) {
            if (r < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            break;
        }
        got += (size_t)r;
    }
    buf[got] = 0;
    int code = 0;
    if (sscanf(buf, "HTTP/1.%*d %d", &code) == 1 && code >= 100 && code < 600)
        status = code;
out:
    close(fd);
    return status;
}
