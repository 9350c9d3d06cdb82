/*
 * The load generator's HTTP client against a canned server on 127.0.0.1: responses split at
 * awkward places, every body framing (chunked, Content-Length, until close), keep-alive reuse
 * with a server that closes connections, and each failure kind (connect, HTTP status, timeout,
 * truncated or malformed stream, an error inside the stream).
 */
#define _GNU_SOURCE /* strcasestr */
#include "testlib.h"

#include "loom/bench.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>

typedef enum {
    S_SSE_SPLIT,
    S_UNTIL_CLOSE,
    S_CONTENT_LENGTH,
    S_STATUS_503,
    S_CUT,
    S_STREAM_ERROR,
    S_SILENT,
    S_JSON,
    S_KEEPALIVE_CLOSE,
    S_GARBAGE,
    S_NO_TOKENS,
} scenario;

static int g_listen_fd = -1, g_port;
static volatile int g_stop;
static volatile scenario g_scenario;
static volatile int g_accepts, g_requests;
static pthread_t g_thread;

static const char *SSE_BODY =
    "data: {\"choices\":[{\"index\":0,\"text\":\" a\",\"finish_reason\":null}]}\n\n"
    "data:{\"choices\":[{\"index\":0,\"text\":\" b\",\"finish_reason\":null}]}\r\n\r\n"
    ": a comment line\n"
    "event: message\n"
    "data: {\"choices\":[{\"index\":0,\"text\":\" c\",\"finish_reason\":\"length\"}]}\n\n"
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":3,"
    "\"total_tokens\":11}}\n\n"
    "data: [DONE]\n\n";

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

/* Writes in pieces of `piece` bytes with a pause, so the client sees every split. */
static void write_slowly(int fd, const char *p, size_t n, size_t piece)
{
    for (size_t off = 0; off < n; off += piece) {
        size_t len = n - off < piece ? n - off : piece;
        write_all(fd, p + off, len);
        usleep(300);
    }
}

/* One chunked body of s, each SSE event its own chunk, chunk sizes in mixed case hex. */
static void chunked(char *out, size_t cap, const char *s, bool terminate)
{
    size_t used = 0;
    while (*s) {
        const char *end = strstr(s, "\n\n");
        size_t len = end ? (size_t)(end - s) + 2 : strlen(s);
        used += (size_t)snprintf(out + used, cap - used, "%zX\r\n%.*s\r\n", len, (int)len, s);
        s += len;
    }
    if (terminate)
        snprintf(out + used, cap - used, "0\r\n\r\n");
}

/* Reads one request (headers and Content-Length body); false on EOF. */
static bool read_request(int fd)
{
    char buf[65536];
    size_t got = 0;
    for (;;) {
        struct pollfd pf = {fd, POLLIN, 0};
        if (poll(&pf, 1, 2000) <= 0)
            return false;
        ssize_t n = recv(fd, buf + got, sizeof(buf) - 1 - got, 0);
        if (n <= 0)
            return false;
        got += (size_t)n;
        buf[got] = '\0';
        char *end = strstr(buf, "\r\n\r\n");
        if (!end)
            continue;
        char *cl = strcasestr(buf, "content-length:");
        size_t body = cl ? strtoul(cl + 15, NULL, 10) : 0;
        if (got >= (size_t)(end + 4 - buf) + body)
            return true;
    }
}

static void serve_connection(int fd)
{
    char out[8192];
    int served = 0;
    while (!g_stop && read_request(fd)) {
        g_requests++;
        served++;
        switch (g_scenario) {
        case S_SSE_SPLIT:
        case S_KEEPALIVE_CLOSE: {
            char head[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                          "X-Loom-Instance: inst-7\r\nTransfer-Encoding: chunked\r\n\r\n";
            chunked(out, sizeof(out), SSE_BODY, true);
            if (g_scenario == S_SSE_SPLIT) {
                write_slowly(fd, head, strlen(head), 5);
                write_slowly(fd, out, strlen(out), 7);
            } else {
                write_all(fd, head, strlen(head));
                write_all(fd, out, strlen(out));
                if (served == 2)
                    return; /* close without saying so: the client must retry */
            }
            break;
        }
        case S_UNTIL_CLOSE:
            snprintf(out, sizeof(out),
                     "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     "Connection: close\r\n\r\n%s",
                     SSE_BODY);
            write_slowly(fd, out, strlen(out), 64);
            return;
        case S_CONTENT_LENGTH:
            snprintf(out, sizeof(out),
                     "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     strlen(SSE_BODY), SSE_BODY);
            write_slowly(fd, out, strlen(out), 100);
            break;
        case S_STATUS_503: {
            const char *body = "{\"error\":{\"message\":\"too busy, try later\",\"type\":"
                               "\"server_error\",\"param\":null,\"code\":null}}";
            snprintf(out, sizeof(out),
                     "HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                     "application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     strlen(body), body);
            write_all(fd, out, strlen(out));
            break;
        }
        case S_CUT: {
            const char *head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               "Transfer-Encoding: chunked\r\n\r\n";
            write_all(fd, head, strlen(head));
            chunked(out, sizeof(out),
                    "data: {\"choices\":[{\"text\":\" a\"}]}\n\ndata: {\"choices\":[{\"text\":"
                    "\" b\"}]}\n\n",
                    false);
            write_all(fd, out, strlen(out));
            return; /* no last chunk */
        }
        case S_STREAM_ERROR: {
            const char *head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               "Transfer-Encoding: chunked\r\n\r\n";
            write_all(fd, head, strlen(head));
            chunked(out, sizeof(out),
                    "data: {\"choices\":[{\"text\":\" a\"}]}\n\ndata: {\"error\":{\"message\":"
                    "\"the engine failed\",\"type\":\"server_error\"}}\n\ndata: [DONE]\n\n",
                    true);
            write_all(fd, out, strlen(out));
            break;
        }
        case S_SILENT:
            for (int i = 0; i < 50 && !g_stop; i++)
                usleep(10000);
            return;
        case S_JSON: {
            const char *body = "{\"choices\":[{\"index\":0,\"text\":\" a b c d\"}],\"usage\":"
                               "{\"prompt_tokens\":8,\"completion_tokens\":4}}";
            snprintf(out, sizeof(out),
                     "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n%s",
                     strlen(body), body);
            write_all(fd, out, strlen(out));
            break;
        }
        case S_GARBAGE:
            write_all(fd, "HELLO THERE\r\n\r\n", 15);
            return;
        case S_NO_TOKENS: {
            const char *head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               "Transfer-Encoding: chunked\r\n\r\n";
            write_all(fd, head, strlen(head));
            chunked(out, sizeof(out),
                    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":"
                    "0}}\n\ndata: [DONE]\n\n",
                    true);
            write_all(fd, out, strlen(out));
            break;
        }
        }
    }
}

static void *server_main(void *arg)
{
    while (!g_stop) {
        struct pollfd pf = {g_listen_fd, POLLIN, 0};
        if (poll(&pf, 1, 50) <= 0)
            continue;
        int fd = accept(g_listen_fd, NULL, NULL);
        if (fd < 0)
            continue;
        g_accepts++;
        serve_connection(fd);
        close(fd);
    }
    return NULL;
}

static int listen_any(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(fd, 64) != 0)
        return -1;
    socklen_t len = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

static int setup(void **state)
{
    g_listen_fd = listen_any(&g_port);
    if (g_listen_fd < 0)
        return -1;
    return pthread_create(&g_thread, NULL, server_main, NULL);
}

static int teardown(void **state)
{
    g_stop = 1;
    pthread_join(g_thread, NULL);
    close(g_listen_fd);
    return 0;
}

/* n requests, one at a time, to url. */
static bench_result *run(const char *url, int n, double timeout)
{
    bench_config cfg;
    bench_config_default(&cfg);
    char buf[64];
    if (!url) {
        snprintf(buf, sizeof(buf), "http://127.0.0.1:%d", g_port);
        url = buf;
    }
    cfg.urls[0] = url;
    cfg.n_targets = 1;
    cfg.model = "m";
    cfg.prompt_mode = BENCH_PROMPTS_IDS;
    cfg.workload.input = (bench_dist){.kind = BENCH_DIST_FIXED, .a = 8};
    cfg.workload.output = (bench_dist){.kind = BENCH_DIST_FIXED, .a = 3};
    cfg.concurrency = 1;
    cfg.max_requests = (uint64_t)n;
    cfg.timeout_s = timeout;
    bench_result *res = NULL;
    loom_err e;
    if (bench_run(&cfg, &res, &e) != 0)
        fail_msg("bench_run: %s", e.msg);
    assert_int_equal(res->n_records, n);
    return res;
}

static void expect_ok_stream(const bench_record *r)
{
    if (r->error != BENCH_OK)
        fail_msg("error %s: %s", bench_error_name(r->error), r->error_msg);
    assert_int_equal(r->http_status, 200);
    assert_true(r->usage_seen);
    assert_int_equal(r->prompt_tokens, 8);
    assert_int_equal(r->output_tokens, 3);
    assert_int_equal(r->n_chunks, 3);
    assert_int_equal(r->n_itl, 2);
    assert_true(r->first_token_s >= r->start_s);
    assert_true(r->end_s >= r->first_token_s);
}

static void test_split_chunked_sse(void **state)
{
    g_scenario = S_SSE_SPLIT;
    bench_result *res = run(NULL, 2, 10);
    for (int i = 0; i < 2; i++) {
        expect_ok_stream(&res->records[i]);
        assert_int_equal(res->records[i].instance, 0);
    }
    assert_int_equal(res->n_instances, 1);
    assert_string_equal(res->instances[0], "inst-7");
    /* the written pieces arrive over time: TTFT < E2E */
    assert_true(bench_record_ttft(&res->records[0]) < bench_record_e2el(&res->records[0]));
    assert_true(bench_result_ok(res));
    bench_result_free(res);
}

static void test_other_framings(void **state)
{
    scenario s[] = {S_UNTIL_CLOSE, S_CONTENT_LENGTH};
    for (int i = 0; i < 2; i++) {
        g_scenario = s[i];
        bench_result *res = run(NULL, 3, 10);
        for (int j = 0; j < 3; j++)
            expect_ok_stream(&res->records[j]);
        bench_result_free(res);
    }
}

static void test_keepalive_reuse_and_retry(void **state)
{
    g_scenario = S_KEEPALIVE_CLOSE;
    int accepts0 = g_accepts;
    bench_result *res = run(NULL, 6, 10);
    for (int j = 0; j < 6; j++)
        expect_ok_stream(&res->records[j]);
    /* two requests per connection: three connections, not six */
    assert_int_equal(g_accepts - accepts0, 3);
    bench_result_free(res);
}

static void expect_failure(scenario s, bench_error want, const char *msg_part, double timeout)
{
    g_scenario = s;
    bench_result *res = run(NULL, 2, timeout);
    for (int j = 0; j < 2; j++) {
        const bench_record *r = &res->records[j];
        if (r->error != want || !r->error_msg || !strstr(r->error_msg, msg_part))
            fail_msg("scenario %d: got %s '%s', want %s '%s'", s, bench_error_name(r->error),
                     r->error_msg ? r->error_msg : "", bench_error_name(want), msg_part);
    }
    assert_false(bench_result_ok(res));
    bench_summary sum;
    bench_summarize(res, 0, NULL, &sum);
    assert_int_equal(sum.failed, 2);
    assert_int_equal(sum.errors[want], 2);
    bench_summary_free(&sum);
    bench_result_free(res);
}

static void test_failures(void **state)
{
    expect_failure(S_STATUS_503, BENCH_ERR_HTTP, "HTTP 503: too busy, try later", 10);
    expect_failure(S_CUT, BENCH_ERR_MALFORMED, "closed in the middle", 10);
    expect_failure(S_STREAM_ERROR, BENCH_ERR_STREAM, "the engine failed", 10);
    expect_failure(S_GARBAGE, BENCH_ERR_MALFORMED, "not an HTTP response", 10);
    expect_failure(S_NO_TOKENS, BENCH_ERR_MALFORMED, "without any token", 10);
    double t0 = loom_now();
    expect_failure(S_SILENT, BENCH_ERR_TIMEOUT, "time limit", 0.2);
    assert_true(loom_now() - t0 < 5); /* bounded by the per-request timeout */
}

static void test_plain_json_response(void **state)
{
    g_scenario = S_JSON;
    bench_result *res = run(NULL, 2, 10);
    const bench_record *r = &res->records[0];
    assert_int_equal(r->error, BENCH_OK);
    assert_int_equal(r->output_tokens, 4);
    assert_true(r->first_token_s == r->end_s); /* everything arrived at once */
    bench_result_free(res);
}

static void test_connection_refused(void **state)
{
    int port;
    int fd = listen_any(&port);
    close(fd); /* nothing listens there now */
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%d", port);
    bench_result *res = run(url, 3, 10);
    for (int j = 0; j < 3; j++)
        assert_int_equal(res->records[j].error, BENCH_ERR_CONNECT);
    bench_result_free(res);
}

static void test_bad_urls(void **state)
{
    const char *bad[] = {"https://127.0.0.1:1", "http://127.0.0.1:99999", "http://:80",
                         "ftp://127.0.0.1:21", "http://127.0.0.1:0"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        bench_config cfg;
        bench_config_default(&cfg);
        cfg.urls[0] = bad[i];
        cfg.n_targets = 1;
        cfg.model = "m";
        cfg.prompt_mode = BENCH_PROMPTS_IDS;
        bench_result *res = NULL;
        loom_err e;
        if (bench_run(&cfg, &res, &e) == 0)
            fail_msg("%s accepted", bad[i]);
        assert_null(res);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split_chunked_sse),
        cmocka_unit_test(test_other_framings),
        cmocka_unit_test(test_keepalive_reuse_and_retry),
        cmocka_unit_test(test_failures),
        cmocka_unit_test(test_plain_json_response),
        cmocka_unit_test(test_connection_refused),
        cmocka_unit_test(test_bad_urls),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
