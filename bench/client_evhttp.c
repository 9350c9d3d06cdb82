/*
 * bench/client_evhttp: the same closed loop as `loom bench --concurrency N`, driven through
 * libevent's evhttp client instead of src/bench/http.c, doing the same per-event work (SSE line
 * splitting, one cJSON parse per event). bench/client_ceiling runs it beside loom bench
 * against the same upstream, which is the measurement behind the choice of client.
 *
 *   build/bench/client_evhttp --url http://127.0.0.1:PORT --concurrency N --tokens T
 *                             --requests R
 * prints one line: "requests failed seconds tokens cpu_seconds".
 */
#include <cJSON.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

typedef struct user {
    struct evhttp_connection *conn;
    char line[4096];
    size_t line_len;
} user;

static struct event_base *g_base;
static char g_host[256];
static int g_port, g_tokens;
static char g_body[1024];
static unsigned long long g_sent, g_done, g_failed, g_target, g_token_count;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void on_event(const char *data, size_t len)
{
    if (len == 6 && !memcmp(data, "[DONE]", 6))
        return;
    cJSON *root = cJSON_ParseWithLength(data, len);
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    const cJSON *c0 = cJSON_IsArray(choices) ? cJSON_GetArrayItem(choices, 0) : NULL;
    const cJSON *text = c0 ? cJSON_GetObjectItemCaseSensitive(c0, "text") : NULL;
    if (cJSON_IsString(text) && *text->valuestring)
        g_token_count++;
    cJSON_Delete(root);
}

static void chunk_cb(struct evhttp_request *req, void *arg)
{
    user *u = arg;
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    size_t n = evbuffer_get_length(in);
    char *p = (char *)evbuffer_pullup(in, (ev_ssize_t)n);
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch != '\n') {
            if (u->line_len < sizeof(u->line))
                u->line[u->line_len++] = ch;
            continue;
        }
        if (u->line_len >= 6 && !memcmp(u->line, "data: ", 6))
            on_event(u->line + 6, u->line_len - 6);
        u->line_len = 0;
    }
    evbuffer_drain(in, n);
}

static void send_next(user *u);

static void done_cb(struct evhttp_request *req, void *arg)
{
    user *u = arg;
    g_done++;
    if (!req || evhttp_request_get_response_code(req) != 200)
        g_failed++;
    if (g_done == g_target) {
        event_base_loopbreak(g_base);
        return;
    }
    send_next(u);
}

static void send_next(user *u)
{
    if (g_sent >= g_target)
        return;
    g_sent++;
    u->line_len = 0;
    struct evhttp_request *req = evhttp_request_new(done_cb, u);
    evhttp_request_set_chunked_cb(req, chunk_cb);
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    char hostport[300];
    snprintf(hostport, sizeof(hostport), "%s:%d", g_host, g_port);
    evhttp_add_header(h, "Host", hostport);
    evhttp_add_header(h, "Content-Type", "application/json");
    evbuffer_add(evhttp_request_get_output_buffer(req), g_body, strlen(g_body));
    evhttp_make_request(u->conn, req, EVHTTP_REQ_POST, "/v1/completions");
}

int main(int argc, char **argv)
{
    const char *url = NULL;
    int concurrency = 64;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--url"))
            url = argv[i + 1];
        else if (!strcmp(argv[i], "--concurrency"))
            concurrency = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--tokens"))
            g_tokens = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--requests"))
            g_target = strtoull(argv[i + 1], NULL, 10);
    }
    if (!url || sscanf(url, "http://%255[^:]:%d", g_host, &g_port) != 2 || concurrency < 1 ||
        g_tokens < 1 || g_target < 1) {
        fprintf(stderr, "usage: client_evhttp --url http://HOST:PORT --concurrency N "
                        "--tokens T --requests R\n");
        return 2;
    }
    snprintf(g_body, sizeof(g_body),
             "{\"model\":\"fake\",\"prompt\":[16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31],"
             "\"max_tokens\":%d,\"ignore_eos\":true,\"min_tokens\":%d,\"temperature\":0,"
             "\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
             g_tokens, g_tokens);
    g_base = event_base_new();
    user *users = calloc((size_t)concurrency, sizeof(user));
    double t0 = now_s();
    for (int i = 0; i < concurrency; i++) {
        users[i].conn = evhttp_connection_base_new(g_base, NULL, g_host, (unsigned short)g_port);
        send_next(&users[i]);
    }
    event_base_dispatch(g_base);
    double secs = now_s() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 +
                 (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec * 1e-6;
    printf("%llu %llu %.6f %llu %.6f\n", g_done, g_failed, secs, g_token_count, cpu);
    for (int i = 0; i < concurrency; i++)
        evhttp_connection_free(users[i].conn);
    free(users);
    event_base_free(g_base);
    return 0;
}
