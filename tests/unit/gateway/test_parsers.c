/* The gateway's pure parsers: upstream URLs, request inspection, the Prometheus text reader and
 * the scrape it feeds, the SSE scanner and usage bodies. */
#include "testlib.h"

#include "loom/gateway.h"

/* ---------------------------------------------------------------- upstream URLs */

static void test_upstream_parse(void **state)
{
    (void)state;
    gateway_upstream_spec s;
    loom_err e = {0};
    assert_int_equal(gateway_upstream_parse("http://127.0.0.1:8001", &s, &e), 0);
    assert_string_equal(s.host, "127.0.0.1");
    assert_int_equal(s.port, 8001);
    assert_string_equal(s.base_path, "");
    assert_string_equal(s.url, "http://127.0.0.1:8001");
    assert_true(s.weight == 1);
    /* scheme optional, trailing slash dropped, a path prefix kept, a weight */
    assert_int_equal(gateway_upstream_parse("localhost:9000/vllm/=2.5", &s, &e), 0);
    assert_string_equal(s.host, "localhost");
    assert_int_equal(s.port, 9000);
    assert_string_equal(s.base_path, "/vllm");
    assert_string_equal(s.url, "http://localhost:9000/vllm");
    assert_true(s.weight == 2.5);
    assert_int_equal(gateway_upstream_parse("http://[::1]:8000=3", &s, &e), 0);
    assert_string_equal(s.host, "::1");
    assert_string_equal(s.url, "http://[::1]:8000");
    assert_int_equal(gateway_upstream_parse("http://example", &s, &e), 0);
    assert_int_equal(s.port, 80);
    /* refusals say why */
    const char *bad[] = {"",
                         "https://x:1",
                         "ftp://x:1",
                         "http://:80",
                         "http://x:0",
                         "http://x:70000",
                         "http://x:12ab",
                         "http://x:1=0",
                         "http://x:1=-2",
                         "http://x:1=abc",
                         "http://x:1=",
                         "http://x:1?q=1",
                         "http://x y:1",
                         "http://[::1:80"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        e.msg[0] = 0;
        assert_int_equal(gateway_upstream_parse(bad[i], &s, &e), LOOM_EINVAL);
        assert_true(e.msg[0] != 0);
    }
}

/* ---------------------------------------------------------------- request inspection */

static int inspect(gateway_endpoint ep, const char *body, gateway_request_info *info)
{
    char err[160];
    return gateway_request_inspect(ep, body, strlen(body), true, info, err, sizeof(err));
}

static void test_inspect_completions(void **state)
{
    (void)state;
    gateway_request_info in;
    assert_int_equal(inspect(GATEWAY_COMPLETIONS,
                             "{\"model\":\"m\",\"prompt\":\"hello world\",\"max_tokens\":32,"
                             "\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
                             &in),
                     0);
    assert_string_equal(in.model, "m");
    assert_true(in.stream && in.include_usage);
    assert_int_equal(in.max_tokens, 32);
    assert_true(in.prompt_chars == 11 && in.prompt_ids == 0);
    assert_int_equal(in.n_prefix, 0); /* shorter than one block */
    /* max_completion_tokens wins; a bad max_tokens is left to the instance */
    assert_int_equal(inspect(GATEWAY_COMPLETIONS,
                             "{\"prompt\":\"x\",\"max_tokens\":-3,\"max_completion_tokens\":7}",
                             &in),
                     0);
    assert_int_equal(in.max_tokens, 7);
    assert_int_equal(inspect(GATEWAY_COMPLETIONS, "{\"prompt\":\"x\",\"max_tokens\":\"9\"}", &in),
                     0);
    assert_int_equal(in.max_tokens, 0);
    assert_false(in.stream);
    /* token ids: counted, hashed by blocks of 16 ids */
    char body[2048] = "{\"prompt\":[";
    for (int i = 0; i < 40; i++)
        snprintf(body + strlen(body), sizeof(body) - strlen(body), "%s%d", i ? "," : "", i * 3);
    strcat(body, "]}");
    assert_int_equal(inspect(GATEWAY_COMPLETIONS, body, &in), 0);
    assert_true(in.prompt_ids == 40 && in.prefix_is_ids);
    assert_int_equal(in.n_prefix, 2);
    /* a batch of id arrays: all counted, the first routes */
    assert_int_equal(inspect(GATEWAY_COMPLETIONS, "{\"prompt\":[[1,2,3],[4,5]]}", &in), 0);
    assert_true(in.prompt_ids == 5);
    /* a batch of strings */
    assert_int_equal(inspect(GATEWAY_COMPLETIONS, "{\"prompt\":[\"abc\",\"de\"]}", &in), 0);
    assert_true(in.prompt_chars == 5);
}

static void test_inspect_prefix_shared(void **state)
{
    (void)state;
    /* two prompts sharing their first 200 characters share their first 3 block hashes */
    char shared[201];
    memset(shared, 'a', 200);
    shared[200] = 0;
    char b1[512], b2[512], b3[512];
    snprintf(b1, sizeof(b1), "{\"model\":\"m\",\"prompt\":\"%s tail one\"}", shared);
    snprintf(b2, sizeof(b2), "{\"model\":\"m\",\"prompt\":\"%s other end\"}", shared);
    snprintf(b3, sizeof(b3), "{\"model\":\"other\",\"prompt\":\"%s tail one\"}", shared);
    gateway_request_info i1, i2, i3;
    assert_int_equal(inspect(GATEWAY_COMPLETIONS, b1, &i1), 0);
    assert_int_equal(inspect(GATEWAY_COMPLETIONS, b2, &i2), 0);
    assert_int_equal(inspect(GATEWAY_COMPLETIONS, b3, &i3), 0);
    assert_int_equal(i1.n_prefix, 3);
    assert_int_equal(i2.n_prefix, 3);
    assert_memory_equal(i1.prefix, i2.prefix, 3 * sizeof(uint64_t));
    assert_true(i1.prefix[0] != i3.prefix[0]); /* another model: another cache */
    /* the hashes are policy_prefix_hashes over the prompt, seeded by the model */
    char text[256];
    snprintf(text, sizeof(text), "%s tail one", shared);
    uint64_t want[8];
    uint64_t seed = loom_hash64("m", 1, 0x707265666978ULL);
    int n = policy_prefix_hashes(text, strlen(text), GATEWAY_PREFIX_BLOCK_BYTES, seed, want, 8);
    assert_int_equal(n, i1.n_prefix);
    assert_memory_equal(want, i1.prefix, (size_t)n * sizeof(uint64_t));
    /* without prefix routing nothing is hashed */
    char err[160];
    gateway_request_info off;
    assert_int_equal(gateway_request_inspect(GATEWAY_COMPLETIONS, b1, strlen(b1), false, &off, err,
                                             sizeof(err)),
                     0);
    assert_int_equal(off.n_prefix, 0);
    assert_true(off.prompt_chars == i1.prompt_chars);
}

static void test_inspect_chat(void **state)
{
    (void)state;
    gateway_request_info in;
    assert_int_equal(
        inspect(GATEWAY_CHAT,
                "{\"model\":\"c\",\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Hi\"},"
                "{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\"}}]}],\"max_tokens\":5}",
                &in),
        0);
    assert_true(in.prompt_chars == 9 + 2 + 2 * 8);
    assert_int_equal(in.max_tokens, 5);
    assert_false(in.prefix_is_ids);
    /* odd shapes are the instance's to refuse */
    assert_int_equal(inspect(GATEWAY_CHAT, "{\"messages\":42}", &in), 0);
    assert_true(in.prompt_chars == 0);
    assert_int_equal(inspect(GATEWAY_CHAT, "{\"messages\":[1,null,{\"content\":3}]}", &in), 0);
    /* what the gateway itself refuses: not JSON, or not an object */
    char err[160];
    const char *bad[] = {"", "{", "[1,2]", "\"s\"", "nul", "{\"a\":1} trailing", "42"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = 0;
        assert_int_equal(gateway_request_inspect(GATEWAY_CHAT, bad[i], strlen(bad[i]), true, &in,
                                                 err, sizeof(err)),
                         -1);
        assert_true(err[0] != 0);
    }
    /* the length is honoured: the bytes after it are not read */
    const char *body = "{\"prompt\":\"ab\"}garbage";
    assert_int_equal(
        gateway_request_inspect(GATEWAY_COMPLETIONS, body, 15, true, &in, err, sizeof(err)), 0);
    /* a long model name is truncated, not overflowed */
    char longm[600] = "{\"model\":\"";
    memset(longm + strlen(longm), 'm', 400);
    strcpy(longm + strlen("{\"model\":\"") + 400, "\"}");
    assert_int_equal(inspect(GATEWAY_COMPLETIONS, longm, &in), 0);
    assert_int_equal(strlen(in.model), sizeof(in.model) - 1);
}

/* ---------------------------------------------------------------- Prometheus text */

typedef struct collected {
    int n;
    char names[16][64];
    double values[16];
    int n_labels[16];
} collected;

static void collect(void *ctx, const gateway_prom_sample *s)
{
    collected *c = ctx;
    if (c->n >= 16)
        return;
    snprintf(c->names[c->n], sizeof(c->names[0]), "%s", s->name);
    c->values[c->n] = s->value;
    c->n_labels[c->n] = s->n_labels;
    c->n++;
}

static void test_prom_parse(void **state)
{
    (void)state;
    const char *text = "# HELP a_total things\n"
                       "# TYPE a_total counter\n"
                       "a_total 3\n"
                       "b{x=\"1\",y=\"q\\\"uo\\\\te\\n\"} 2.5 1700000000000\n"
                       "c{} +Inf\n"
                       "  d   -1e3  \r\n"
                       "broken{x=\"1\" 4\n"
                       "no_value\n"
                       "e{x=1} 5\n"
                       "f 1 2 3\n"
                       "g NaN\n"
                       "h{a=\"x\",} 7";
    collected c = {0};
    int n = gateway_prom_parse(text, strlen(text), collect, &c);
    assert_int_equal(n, 6);
    assert_string_equal(c.names[0], "a_total");
    assert_true(c.values[0] == 3);
    assert_string_equal(c.names[1], "b");
    assert_int_equal(c.n_labels[1], 2);
    assert_true(c.values[1] == 2.5);
    assert_true(isinf(c.values[2]));
    assert_string_equal(c.names[3], "d");
    assert_true(c.values[3] == -1000);
    assert_true(isnan(c.values[4]));
    assert_string_equal(c.names[5], "h");
    assert_int_equal(gateway_prom_parse(NULL, 0, NULL, NULL), 0);
    assert_int_equal(gateway_prom_parse("x 1\0y 2\n", 8, NULL, NULL), 0); /* embedded NUL */
}

static void test_scrape_loom_and_vllm(void **state)
{
    (void)state;
    /* loom serve's page (vLLM names plus loom:num_kv_blocks) */
    const char *loom = "vllm:num_requests_running{model_name=\"m\",engine=\"0\"} 3.0\n"
                       "vllm:num_requests_waiting{model_name=\"m\",engine=\"0\"} 1.0\n"
                       "vllm:kv_cache_usage_perc{model_name=\"m\",engine=\"0\"} 0.25\n"
                       "vllm:time_to_first_token_seconds_bucket{le=\"0.1\",model_name=\"m\"} 4.0\n"
                       "loom:num_kv_blocks{model_name=\"m\",engine=\"0\"} 1024.0\n";
    gateway_scrape s;
    gateway_scrape_parse(loom, strlen(loom), &s);
    assert_true(s.num_running == 3 && s.num_waiting == 1 && s.kv_usage == 0.25);
    assert_true(s.num_kv_blocks == 1024 && s.block_size < 0);
    assert_true(gateway_scrape_kv_tokens(&s, 16) == 16384);
    /* vLLM with two engines (data parallel): counts add, usage averages; cache_config_info */
    const char *vllm =
        "vllm:num_requests_running{engine=\"0\"} 2\nvllm:num_requests_running{engine=\"1\"} 5\n"
        "vllm:gpu_cache_usage_perc{engine=\"0\"} 0.2\nvllm:gpu_cache_usage_perc{engine=\"1\"} 0.4\n"
        "vllm:cache_config_info{block_size=\"32\",num_gpu_blocks=\"2000\",cache_dtype=\"auto\"} "
        "1\n";
    gateway_scrape_parse(vllm, strlen(vllm), &s);
    assert_true(s.num_running == 7 && s.num_waiting < 0);
    assert_true(fabs(s.kv_usage - 0.3) < 1e-12);
    assert_true(s.num_kv_blocks == 2000 && s.block_size == 32);
    assert_true(gateway_scrape_kv_tokens(&s, 16) == 64000);
    /* SGLang and llama.cpp names */
    const char *sg = "sglang:num_running_reqs 4\nsglang:num_queue_reqs 2\nsglang:token_usage 0.5\n";
    gateway_scrape_parse(sg, strlen(sg), &s);
    assert_true(s.num_running == 4 && s.num_waiting == 2 && s.kv_usage == 0.5);
    assert_true(gateway_scrape_kv_tokens(&s, 16) < 0);
    const char *lc = "llamacpp:requests_processing 1\nllamacpp:kv_cache_usage_ratio 1.7\n";
    gateway_scrape_parse(lc, strlen(lc), &s);
    assert_true(s.num_running == 1 && s.kv_usage == 1); /* clamped */
    /* nothing we know; negative and non-finite values are ignored */
    const char *junk = "foo 1\nvllm:num_requests_running -4\nvllm:kv_cache_usage_perc NaN\n";
    gateway_scrape_parse(junk, strlen(junk), &s);
    assert_true(s.num_running < 0 && s.kv_usage < 0 && s.num_kv_blocks < 0);
    assert_int_equal(s.samples, 3);
}

/* ---------------------------------------------------------------- SSE */

static const char *STREAM =
    "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n"
    "data: {\"choices\":[{\"delta\":{\"content\":\" Hel\"}}]}\n\n"
    ": a comment\n\n"
    "data: {\"choices\":[{\"text\":\"lo\"}]}\r\n\r\n"
    "data: {\"choices\":[{\"delta\":{\"content\":\"\\\"q\\\"\"}}]}\n\n"
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":3,"
    "\"total_tokens\":14}}\n\n"
    "data: [DONE]\n\n";

static void test_sse_whole_and_split(void **state)
{
    (void)state;
    size_t len = strlen(STREAM);
    /* every split point, byte by byte included, gives the same counts */
    for (size_t step = 1; step <= len; step = step < 8 ? step + 1 : step * 2) {
        gateway_sse s;
        gateway_sse_init(&s);
        for (size_t off = 0; off < len; off += step)
            gateway_sse_feed(&s, STREAM + off, off + step <= len ? step : len - off);
        assert_int_equal(s.frames, 5);
        assert_int_equal(s.content_frames, 3);
        assert_true(s.prompt_tokens == 11 && s.completion_tokens == 3);
        assert_true(s.done);
        assert_false(s.error);
        gateway_sse_free(&s);
    }
}

static void test_sse_errors_and_long_lines(void **state)
{
    (void)state;
    gateway_sse s;
    gateway_sse_init(&s);
    const char *err = "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n"
                      "data: [DONE]\n\n";
    gateway_sse_feed(&s, err, strlen(err));
    assert_true(s.error && s.done);
    assert_true(s.prompt_tokens < 0);
    /* a line longer than the scanner keeps is skipped whole; counting resumes after it */
    size_t big = 200 * 1024;
    char *line = malloc(big);
    memset(line, 'x', big);
    memcpy(line, "data: {\"usage\":{", 16);
    gateway_sse_feed(&s, line, big);
    gateway_sse_feed(&s, line, big);
    const char *after = "\ndata: {\"choices\":[{\"text\":\"a\"}]}\n";
    gateway_sse_feed(&s, after, strlen(after));
    assert_int_equal(s.content_frames, 1);
    assert_true(s.cap <= 128 * 1024);
    free(line);
    gateway_sse_free(&s);
    /* usage of a non-streaming body */
    double p, c;
    const char *body = "{\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}";
    gateway_usage_parse(body, strlen(body), &p, &c);
    assert_true(p == 5 && c == 9);
    gateway_usage_parse("{\"usage\":{\"prompt_tokens\":-1}}", 30, &p, &c);
    assert_true(p < 0 && c < 0);
    gateway_usage_parse("not json", 8, &p, &c);
    assert_true(p < 0 && c < 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_upstream_parse),
        cmocka_unit_test(test_inspect_completions),
        cmocka_unit_test(test_inspect_prefix_shared),
        cmocka_unit_test(test_inspect_chat),
        cmocka_unit_test(test_prom_parse),
        cmocka_unit_test(test_scrape_loom_and_vllm),
        cmocka_unit_test(test_sse_whole_and_split),
        cmocka_unit_test(test_sse_errors_and_long_lines),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
