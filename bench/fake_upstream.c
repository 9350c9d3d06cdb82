/*
 * bench/fake_upstream: a trivial OpenAI-compatible upstream that streams N tokens per request
 * as SSE chunks as fast as it can (or paced), for measuring the load generator's own ceiling
 * and for testing it without a model.
 *
 *   build/bench/fake_upstream [--port 0] [--tokens 16] [--ttft-ms 0] [--itl-us 0]
 *                             [--instances a,b,...] [--no-tokenize] [--exit-after N]
 *                             [--bos N] [--split-over N]
 *
 * POST /v1/completions and /v1/chat/completions: max_tokens tokens (else --tokens), each one
 * chunk " tok"; a usage chunk when stream_options.include_usage; [DONE]. A prompt counts one
 * token per id (token-id prompts) or per space-separated word (text), which is also what
 * POST /tokenize answers (vLLM's shape), so text prompts calibrate exactly; --bos N adds N
 * tokens to every text prompt and --split-over N counts longer words as two tokens, to make
 * the client's calibration work for it. --instances sets
 * x-loom-instance round-robin, as a gateway would. --exit-after N exits (status 0) when the
 * N-th request arrives, mid-run, to test clients against a server that goes away.
 * Prints "listening on http://127.0.0.1:PORT" once bound.
 */
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#define MAX_INSTANCES 16

typedef struct opts {
    int port;
    int tokens;
    double ttft_ms, itl_us;
    char *instances[MAX_INSTANCES];
    int n_instances;
    bool tokenize;
    long exit_after;
    int bos;        /* tokens added to every text prompt (a BOS) */
    int split_over; /* words longer than this many bytes count two tokens; 0 = never */
} opts;

static opts g_opts = {.port = 0, .tokens = 16, .tokenize = true};
static long g_requests;
static struct event_base *g_base;

/* A stream being paced by a timer (only with --ttft-ms / --itl-us). */
typedef struct conn {
    struct bufferevent *bev;
    struct event *timer;
    int left; /* tokens still to send */
    int prompt, completion;
    bool usage, stream, chat;
    bool busy; /* a response is in progress: later requests wait */
} conn;

static const char TOKEN_CMPL[] =
    "data: {\"id\":\"cmpl-fake\",\"object\":\"text_completion\",\"created\":0,\"model\":\"fake\","
    "\"choices\":[{\"index\":0,\"text\":\" tok\",\"logprobs\":null,\"finish_reason\":null}]}\n\n";
static const char TOKEN_CHAT[] =
    "data: {\"id\":\"chatcmpl-fake\",\"object\":\"chat.completion.chunk\",\"created\":0,"
    "\"model\":\"fake\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" tok\"},"
    "\"logprobs\":null,\"finish_reason\":null}]}\n\n";

static void add_chunk(struct evbuffer *out, const char *data, size_t len)
{
    evbuffer_add_printf(out, "%zx\r\n", len);
    evbuffer_add(out, data, len);
    evbuffer_add(out, "\r\n", 2);
}

static void add_token(struct evbuffer *out, bool chat)
{
    if (chat)
        add_chunk(out, TOKEN_CHAT, sizeof(TOKEN_CHAT) - 1);
    else
        add_chunk(out, TOKEN_CMPL, sizeof(TOKEN_CMPL) - 1);
}

static void add_tail(struct evbuffer *out, conn *c)
{
    char buf[256];
    if (c->usage) {
        int n = snprintf(buf, sizeof(buf),
                         "data: {\"id\":\"cmpl-fake\",\"object\":\"text_completion\",\"created\":0,"
                         "\"model\":\"fake\",\"choices\":[],\"usage\":{\"prompt_tokens\":%d,"
                         "\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n",
                         c->prompt, c->completion, c->prompt + c->completion);
        add_chunk(out, buf, (size_t)n);
    }
    add_chunk(out, "data: [DONE]\n\n", 14);
    evbuffer_add(out, "0\r\n\r\n", 5);
}

static void send_simple(struct bufferevent *bev, int status, const char *reason, const char *body)
{
    evbuffer_add_printf(bufferevent_get_output(bev),
                        "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                        "Content-Length: %zu\r\n\r\n%s",
                        status, reason, strlen(body), body);
}

/* Token count of a prompt: ids in an array, else words of the string. */
static int count_prompt(const char *body)
{
    const char *p = strstr(body, "\"prompt\":");
    if (p)
        p += 9;
    else if ((p = strstr(body, "\"content\":")) != NULL)
        p += 10;
    else
        return 1;
    while (*p == ' ')
        p++;
    int n = 0;
    if (*p == '[') {
        for (p++; *p && *p != ']'; p++)
            if (isdigit((unsigned char)*p) && !isdigit((unsigned char)p[1]))
                n++;
        return n ? n : 1;
    }
    if (*p != '"')
        return 1;
    int word_len = 0;
    for (p++;; p++) {
        bool end = !*p || *p == '"';
        if (end || *p == ' ') {
            if (word_len > 0)
                n += g_opts.split_over > 0 && word_len > g_opts.split_over ? 2 : 1;
            word_len = 0;
            if (end)
                break;
            continue;
        }
        if (*p == '\\' && p[1])
            p++;
        word_len++;
    }
    n += g_opts.bos;
    return n ? n : 1;
}

static int json_int(const char *body, const char *key, int dflt)
{
    const char *p = strstr(body, key);
    if (!p)
        return dflt;
    p += strlen(key);
    while (*p == ' ' || *p == ':')
        p++;
    return isdigit((unsigned char)*p) ? atoi(p) : dflt;
}

static void pace_cb(evutil_socket_t fd, short what, void *arg);

static void start_response(conn *c, const char *path, const char *body)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    if (!strcmp(path, "/tokenize")) {
        if (!g_opts.tokenize) {
            send_simple(c->bev, 404, "Not Found", "{\"error\":{\"message\":\"no such route\"}}");
            return;
        }
        int n = count_prompt(body);
        evbuffer_add_printf(out, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 "Transfer-Encoding: chunked\r\n\r\n");
        struct evbuffer *b = evbuffer_new();
        evbuffer_add_printf(b, "{\"tokens\":[");
        for (int i = 0; i < n; i++)
            evbuffer_add_printf(b, i ? ",%d" : "%d", 100 + i % 1000);
        evbuffer_add_printf(b, "],\"count\":%d,\"max_model_len\":1000000}", n);
        evbuffer_add_printf(out, "%zx\r\n", evbuffer_get_length(b));
        evbuffer_add_buffer(out, b);
        evbuffer_add(out, "\r\n0\r\n\r\n", 7);
        evbuffer_free(b);
        return;
    }
    if (!strcmp(path, "/v1/models")) {
        send_simple(c->bev, 200, "OK",
                    "{\"object\":\"list\",\"data\":[{\"id\":\"fake\","
                    "\"object\":\"model\",\"max_model_len\":1000000}]}");
        return;
    }
    if (!strcmp(path, "/health")) {
        send_simple(c->bev, 200, "OK", "{}");
        return;
    }
    bool chat = !strcmp(path, "/v1/chat/completions");
    if (!chat && strcmp(path, "/v1/completions") != 0) {
        send_simple(c->bev, 404, "Not Found", "{\"error\":{\"message\":\"no such route\"}}");
        return;
    }
    g_requests++;
    if (g_opts.exit_after > 0 && g_requests >= g_opts.exit_after) {
        fprintf(stderr, "fake_upstream: exiting after %ld requests\n", g_requests);
        exit(0);
    }
    c->chat = chat;
    c->prompt = count_prompt(body);
    c->completion = json_int(body, "\"max_tokens\"", g_opts.tokens);
    if (c->completion < 1)
        c->completion = 1;
    c->left = c->completion;
    c->usage = strstr(body, "\"include_usage\":true") != NULL;
    c->stream = strstr(body, "\"stream\":true") != NULL;
    if (!c->stream) {
        char buf[512];
        snprintf(buf, sizeof(buf),
                 "{\"id\":\"cmpl-fake\",\"object\":\"text_completion\","
                 "\"model\":\"fake\",\"choices\":[{\"index\":0,\"text\":\" tok\","
                 "\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":%d,"
                 "\"completion_tokens\":%d,\"total_tokens\":%d}}",
                 c->prompt, c->completion, c->prompt + c->completion);
        send_simple(c->bev, 200, "OK", buf);
        return;
    }
    evbuffer_add_printf(out, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n");
    if (g_opts.n_instances > 0)
        evbuffer_add_printf(out, "x-loom-instance: %s\r\n",
                            g_opts.instances[g_requests % g_opts.n_instances]);
    evbuffer_add(out, "\r\n", 2);
    if (g_opts.ttft_ms <= 0 && g_opts.itl_us <= 0) {
        for (int i = 0; i < c->left; i++)
            add_token(out, chat);
        add_tail(out, c);
        return;
    }
    c->busy = true;
    double first = g_opts.ttft_ms / 1e3;
    struct timeval tv = {(time_t)first, (suseconds_t)((first - (double)(time_t)first) * 1e6)};
    evtimer_add(c->timer, &tv);
}

static void try_requests(conn *c);

static void pace_cb(evutil_socket_t fd, short what, void *arg)
{
    conn *c = arg;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    add_token(out, c->chat);
    if (--c->left > 0) {
        double gap = g_opts.itl_us / 1e6;
        struct timeval tv = {(time_t)gap, (suseconds_t)((gap - (double)(time_t)gap) * 1e6)};
        evtimer_add(c->timer, &tv);
        return;
    }
    add_tail(out, c);
    c->busy = false;
    try_requests(c);
}

static void conn_free(conn *c)
{
    event_free(c->timer);
    bufferevent_free(c->bev);
    free(c);
}

/* Handles every complete request buffered on c (pipelining included). */
static void try_requests(conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    while (!c->busy) {
        struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
        if (end.pos < 0)
            return;
        size_t head_len = (size_t)end.pos + 4;
        char *head = (char *)evbuffer_pullup(in, (ev_ssize_t)head_len);
        char method[16], path[256];
        if (sscanf(head, "%15s %255s", method, path) != 2) {
            conn_free(c);
            return;
        }
        size_t body_len = 0;
        for (char *h = head; h < head + head_len; h++) {
            if ((h == head || h[-1] == '\n') && !strncasecmp(h, "content-length:", 15)) {
                body_len = strtoul(h + 15, NULL, 10);
                break;
            }
        }
        if (evbuffer_get_length(in) < head_len + body_len)
            return;
        char *all = (char *)evbuffer_pullup(in, (ev_ssize_t)(head_len + body_len));
        char *body = malloc(body_len + 1);
        memcpy(body, all + head_len, body_len);
        body[body_len] = '\0';
        evbuffer_drain(in, head_len + body_len);
        start_response(c, path, body);
        free(body);
    }
}

static void read_cb(struct bufferevent *bev, void *arg)
{
    try_requests(arg);
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
        conn_free(arg);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                      int socklen, void *arg)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    conn *c = calloc(1, sizeof(*c));
    c->bev = bufferevent_socket_new(g_base, fd, BEV_OPT_CLOSE_ON_FREE);
    c->timer = evtimer_new(g_base, pace_cb, c);
    bufferevent_setcb(c->bev, read_cb, NULL, event_cb, c);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
}

static void usage(void)
{
    fprintf(stderr, "usage: fake_upstream [--port N] [--tokens N] [--ttft-ms X] [--itl-us X] "
                    "[--instances a,b,...] [--no-tokenize] [--exit-after N] [--bos N] "
                    "[--split-over N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--port") && v)
            g_opts.port = atoi(argv[++i]);
        else if (!strcmp(a, "--tokens") && v)
            g_opts.tokens = atoi(argv[++i]);
        else if (!strcmp(a, "--ttft-ms") && v)
            g_opts.ttft_ms = atof(argv[++i]);
        else if (!strcmp(a, "--itl-us") && v)
            g_opts.itl_us = atof(argv[++i]);
        else if (!strcmp(a, "--exit-after") && v)
            g_opts.exit_after = atol(argv[++i]);
        else if (!strcmp(a, "--bos") && v)
            g_opts.bos = atoi(argv[++i]);
        else if (!strcmp(a, "--split-over") && v)
            g_opts.split_over = atoi(argv[++i]);
        else if (!strcmp(a, "--no-tokenize"))
            g_opts.tokenize = false;
        else if (!strcmp(a, "--instances") && v) {
            char *list = strdup(argv[++i]), *save = NULL;
            for (char *t = strtok_r(list, ",", &save); t && g_opts.n_instances < MAX_INSTANCES;
                 t = strtok_r(NULL, ",", &save))
                g_opts.instances[g_opts.n_instances++] = t;
        } else
            usage();
    }
    signal(SIGPIPE, SIG_IGN);
    g_base = event_base_new();
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)g_opts.port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct evconnlistener *l =
        evconnlistener_new_bind(g_base, accept_cb, NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE,
                                4096, (struct sockaddr *)&sin, sizeof(sin));
    if (!l) {
        perror("fake_upstream: bind");
        return 1;
    }
    struct sockaddr_in bound;
    socklen_t len = sizeof(bound);
    getsockname(evconnlistener_get_fd(l), (struct sockaddr *)&bound, &len);
    printf("fake_upstream: listening on http://127.0.0.1:%d\n", ntohs(bound.sin_port));
    fflush(stdout);
    event_base_dispatch(g_base);
    evconnlistener_free(l);
    event_base_free(g_base);
    return 0;
}
