/* Metrics: histogram bucketing, and the /metrics page checked line by line against the
 * Prometheus text format (0.0.4) with a strict little parser. */
#include "testlib.h"

#include "loom/server.h"

#include <ctype.h>

static void test_histogram_buckets(void **state)
{
    (void)state;
    static const double bounds[] = {0.5, 1.0, 10.0};
    metrics_histogram h;
    metrics_histogram_init(&h, bounds, 3);
    metrics_histogram_observe(&h, 0.25);
    metrics_histogram_observe(&h, 0.5); /* on a bound: inside it (le) */
    metrics_histogram_observe(&h, 5.0);
    metrics_histogram_observe(&h, 100.0);
    metrics_histogram_observe(&h, NAN); /* ignored */
    assert_int_equal(h.counts[0], 2);
    assert_int_equal(h.counts[1], 0);
    assert_int_equal(h.counts[2], 1);
    assert_int_equal(h.counts[3], 1);
    assert_int_equal(h.count, 4);
    assert_true(h.sum == 105.75);

    loom_buf b;
    buf_init(&b);
    metrics_write_histogram(&b, "x_seconds", "help text", "a=\"1\"", &h);
    const char *want = "# HELP x_seconds help text\n"
                       "# TYPE x_seconds histogram\n"
                       "x_seconds_bucket{a=\"1\",le=\"0.5\"} 2.0\n"
                       "x_seconds_bucket{a=\"1\",le=\"1.0\"} 2.0\n"
                       "x_seconds_bucket{a=\"1\",le=\"10.0\"} 3.0\n"
                       "x_seconds_bucket{a=\"1\",le=\"+Inf\"} 4.0\n"
                       "x_seconds_sum{a=\"1\"} 105.75\n"
                       "x_seconds_count{a=\"1\"} 4.0\n";
    assert_string_equal(b.data, want);
    buf_free(&b);
}

static void test_vllm_buckets(void **state)
{
    (void)state;
    const double *all[] = {metrics_ttft_buckets, metrics_tpot_buckets, metrics_e2e_buckets};
    const int n[] = {metrics_ttft_n_buckets, metrics_tpot_n_buckets, metrics_e2e_n_buckets};
    for (int k = 0; k < 3; k++) {
        assert_true(n[k] > 5 && n[k] <= METRICS_MAX_BUCKETS);
        for (int i = 1; i < n[k]; i++)
            assert_true(all[k][i] > all[k][i - 1]);
    }
}

static void test_escape_label(void **state)
{
    (void)state;
    loom_buf b;
    buf_init(&b);
    metrics_escape_label(&b, "a\"b\\c\nd");
    assert_string_equal(b.data, "a\\\"b\\\\c\\nd");
    buf_free(&b);
}

/* ------------------------------------------------------------ a strict exposition parser */

typedef struct sample {
    char name[128];
    char labels[512]; /* as written, unescaped form not needed */
    char le[32];
    double value;
} sample;

typedef struct family {
    char name[128];
    char type[16];
    bool has_help;
} family;

static bool metric_name_ok(const char *s, size_t n)
{
    if (n == 0 || !(isalpha((unsigned char)s[0]) || s[0] == '_' || s[0] == ':'))
        return false;
    for (size_t i = 1; i < n; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '_' || s[i] == ':'))
            return false;
    return true;
}

/* Parses one sample line; fails the test on anything malformed. */
static void parse_sample(const char *line, sample *s)
{
    memset(s, 0, sizeof(*s));
    const char *p = line;
    size_t n = strcspn(p, "{ ");
    if (!metric_name_ok(p, n))
        fail_msg("bad metric name in: %s", line);
    memcpy(s->name, p, n);
    p += n;
    if (*p == '{') {
        const char *start = ++p;
        while (*p != '}') {
            size_t ln = strcspn(p, "=");
            if (!metric_name_ok(p, ln) || p[ln] != '=' || p[ln + 1] != '"')
                fail_msg("bad label in: %s", line);
            bool is_le = ln == 2 && !strncmp(p, "le", 2);
            p += ln + 2;
            const char *v = p;
            while (*p && *p != '"') {
                if (*p == '\\') {
                    if (p[1] != '\\' && p[1] != '"' && p[1] != 'n')
                        fail_msg("bad escape in: %s", line);
                    p++;
                }
                p++;
            }
            if (*p != '"')
                fail_msg("unterminated label value in: %s", line);
            if (is_le)
                snprintf(s->le, sizeof(s->le), "%.*s", (int)(p - v), v);
            p++;
            if (*p == ',')
                p++;
            else if (*p != '}')
                fail_msg("expected , or } in: %s", line);
        }
        snprintf(s->labels, sizeof(s->labels), "%.*s", (int)(p - start), start);
        p++;
    }
    if (*p != ' ')
        fail_msg("expected a space before the value in: %s", line);
    p++;
    char *end;
    if (!strcmp(p, "+Inf") || !strcmp(p, "-Inf") || !strcmp(p, "NaN")) {
        s->value = p[0] == 'N' ? NAN : p[0] == '+' ? INFINITY : -INFINITY;
        return;
    }
    s->value = strtod(p, &end);
    if (end == p || *end)
        fail_msg("bad value in: %s", line);
}

/* The family a sample belongs to: its name, or the name less a histogram suffix. */
static family *find_family(family *fams, int n, const char *name)
{
    for (int i = 0; i < n; i++) {
        size_t fl = strlen(fams[i].name);
        if (!strcmp(fams[i].name, name))
            return &fams[i];
        if (!strcmp(fams[i].type, "histogram") && !strncmp(name, fams[i].name, fl) &&
            (!strcmp(name + fl, "_bucket") || !strcmp(name + fl, "_sum") ||
             !strcmp(name + fl, "_count")))
            return &fams[i];
    }
    return NULL;
}

static void test_render(void **state)
{
    (void)state;
    server_metrics m;
    server_metrics_init(&m);
    m.engine.num_running = 3;
    m.engine.num_waiting = 2;
    m.engine.kv_usage = 0.25;
    m.engine.prompt_tokens_total = 100;
    m.engine.generation_tokens_total = 50;
    m.engine.prefix_cache_queries = 80;
    m.engine.prefix_cache_hits = 16;
    m.engine.num_preempted_total = 1;
    m.finished[FINISH_LENGTH] = 4;
    m.finished[FINISH_ABORT] = 1;
    metrics_histogram_observe(&m.ttft, 0.03);
    metrics_histogram_observe(&m.tpot, 0.02);
    metrics_histogram_observe(&m.tpot, 0.07);
    metrics_histogram_observe(&m.e2e, 1.2);

    loom_buf b;
    buf_init(&b);
    server_metrics_render(&m, "my \"model\"", "cpu", &b);
    assert_true(b.len > 0 && b.data[b.len - 1] == '\n');

    family fams[64];
    int n_fams = 0;
    char *text = strdup(b.data);
    double last_bucket = -1;
    bool saw_inf = false;
    int n_success = 0;
    const char *want_labels = "model_name=\"my \\\"model\\\"\",engine=\"0\"";
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        if (line[0] == '#') {
            char kind[8], name[128], rest[256];
            if (sscanf(line, "# %7s %127s %255[^\n]", kind, name, rest) != 3)
                fail_msg("bad comment line: %s", line);
            family *f = NULL;
            for (int i = 0; i < n_fams; i++)
                if (!strcmp(fams[i].name, name))
                    f = &fams[i];
            if (!strcmp(kind, "HELP")) {
                assert_null(f); /* HELP first, once per family */
                assert_true(n_fams < 64);
                f = &fams[n_fams++];
                memset(f, 0, sizeof(*f));
                snprintf(f->name, sizeof(f->name), "%s", name);
                f->has_help = true;
            } else if (!strcmp(kind, "TYPE")) {
                assert_non_null(f);
                assert_int_equal(f->type[0], 0);
                if (strcmp(rest, "counter") && strcmp(rest, "gauge") && strcmp(rest, "histogram"))
                    fail_msg("bad type: %s", line);
                snprintf(f->type, sizeof(f->type), "%.15s", rest);
            } else {
                fail_msg("unknown comment: %s", line);
            }
            continue;
        }
        sample s;
        parse_sample(line, &s);
        family *f = find_family(fams, n_fams, s.name);
        if (!f || !f->type[0])
            fail_msg("sample before its # TYPE: %s", line);
        if (strncmp(s.labels, want_labels, strlen(want_labels)) != 0)
            fail_msg("labels lack model_name/engine: %s", line);
        if (!strcmp(f->type, "counter"))
            assert_true(strlen(s.name) > 6 && !strcmp(s.name + strlen(s.name) - 6, "_total"));
        if (strstr(s.name, "_bucket")) {
            assert_true(s.le[0]);
            if (!strcmp(s.le, "+Inf")) {
                saw_inf = true;
                last_bucket = -1;
            } else {
                assert_true(s.value >= last_bucket); /* cumulative */
                last_bucket = s.value;
            }
        }
        if (!strcmp(s.name, "vllm:request_success_total"))
            n_success++;
        if (!strcmp(s.name, "vllm:kv_cache_usage_perc"))
            assert_true(s.value == 0.25);
        if (!strcmp(s.name, "vllm:prefix_cache_hits_total"))
            assert_true(s.value == 16);
        if (!strcmp(s.name, "vllm:time_per_output_token_seconds_count"))
            assert_true(s.value == 2);
        if (!strcmp(s.name, "vllm:request_success_total") && strstr(s.labels, "\"length\""))
            assert_true(s.value == 4);
    }
    assert_true(saw_inf);
    assert_true(n_success >= 3);
    const char *required[][2] = {
        {"vllm:num_requests_running", "gauge"},
        {"vllm:num_requests_waiting", "gauge"},
        {"vllm:kv_cache_usage_perc", "gauge"},
        {"vllm:prompt_tokens_total", "counter"},
        {"vllm:generation_tokens_total", "counter"},
        {"vllm:prefix_cache_hits_total", "counter"},
        {"vllm:prefix_cache_queries_total", "counter"},
        {"vllm:num_preemptions_total", "counter"},
        {"vllm:request_success_total", "counter"},
        {"vllm:time_to_first_token_seconds", "histogram"},
        {"vllm:time_per_output_token_seconds", "histogram"},
        {"vllm:e2e_request_latency_seconds", "histogram"},
    };
    for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++) {
        family *f = find_family(fams, n_fams, required[i][0]);
        if (!f)
            fail_msg("missing %s", required[i][0]);
        assert_string_equal(f->type, required[i][1]);
        assert_true(f->has_help);
    }
    free(text);
    buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_histogram_buckets),
        cmocka_unit_test(test_vllm_buckets),
        cmocka_unit_test(test_escape_label),
        cmocka_unit_test(test_render),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
