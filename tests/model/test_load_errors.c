/*
 * Bad checkpoints: a copy of tiny-llama in /tmp, then truncated, with a broken header, with a
 * config that disagrees with the tensors, or an unsupported architecture. model_load must fail
 * with the right code and one line naming the file or tensor; never crash.
 */
#include "testlib.h"

#include "loom/model.h"

#include <sys/stat.h>

static char g_dir[64];
static char *g_config;  /* original config.json text */
static char *g_weights; /* original model.safetensors bytes */
static size_t g_config_len, g_weights_len;

static void put(const char *name, const void *data, size_t n)
{
    char *p = loom_path_join(g_dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fwrite(data, 1, n, f);
    fclose(f);
    free(p);
}

static void restore(void)
{
    put("config.json", g_config, g_config_len);
    put("model.safetensors", g_weights, g_weights_len);
}

/* config.json with the first occurrence of from replaced by to */
static void put_config_sub(const char *from, const char *to)
{
    const char *at = strstr(g_config, from);
    assert_non_null(at);
    size_t pre = (size_t)(at - g_config);
    size_t n = g_config_len - strlen(from) + strlen(to);
    char *s = malloc(n + 1);
    memcpy(s, g_config, pre);
    memcpy(s + pre, to, strlen(to));
    strcpy(s + pre + strlen(to), at + strlen(from));
    put("config.json", s, strlen(s));
    free(s);
}

static void expect_fail(int code, const char *needle1, const char *needle2)
{
    model *m = NULL;
    loom_err e = {0};
    int rc = model_load(g_dir, &m, &e);
    printf("  -> rc %d: %s\n", rc, e.msg);
    if (rc != code)
        fail_msg("want rc %d, got %d (%s)", code, rc, e.msg);
    assert_null(m);
    assert_null(strchr(e.msg, '\n'));
    if (needle1 && !strstr(e.msg, needle1))
        fail_msg("message '%s' lacks '%s'", e.msg, needle1);
    if (needle2 && !strstr(e.msg, needle2))
        fail_msg("message '%s' lacks '%s'", e.msg, needle2);
}

static void test_intact_copy_loads(void **state)
{
    (void)state;
    restore();
    model *m = NULL;
    loom_err e = {0};
    assert_int_equal(model_load(g_dir, &m, &e), 0);
    model_free(m);
}

static void test_truncated(void **state)
{
    (void)state;
    restore();
    put("model.safetensors", g_weights, g_weights_len / 2);
    expect_fail(LOOM_EFORMAT, "model.safetensors", "truncated");
    put("model.safetensors", g_weights, g_weights_len - 1);
    expect_fail(LOOM_EFORMAT, "model.safetensors", "past the end");
    put("model.safetensors", g_weights, 100); /* inside the header */
    expect_fail(LOOM_EFORMAT, "model.safetensors", NULL);
    put("model.safetensors", g_weights, 4);
    expect_fail(LOOM_EFORMAT, "model.safetensors", "too small");
    put("model.safetensors", "", 0);
    expect_fail(LOOM_EFORMAT, "model.safetensors", NULL);
}

static void test_corrupt_header(void **state)
{
    (void)state;
    restore();
    char *w = malloc(g_weights_len);
    memcpy(w, g_weights, g_weights_len);
    w[7] = 0x40; /* header length now enormous */
    put("model.safetensors", w, g_weights_len);
    expect_fail(LOOM_EFORMAT, "model.safetensors", "header length");
    memcpy(w, g_weights, g_weights_len);
    w[8] = '['; /* JSON broken */
    put("model.safetensors", w, g_weights_len);
    expect_fail(LOOM_EFORMAT, "model.safetensors", "JSON");
    memcpy(w, g_weights, g_weights_len);
    char *dt = strstr(w + 8, "\"F32\""); /* first tensor's dtype */
    assert_non_null(dt);
    memcpy(dt, "\"F3X\"", 5);
    put("model.safetensors", w, g_weights_len);
    expect_fail(LOOM_EFORMAT, "model.safetensors", "unknown dtype");
    memcpy(w, g_weights, g_weights_len);
    dt = strstr(w + 8, "\"F32\"");
    memcpy(dt, "\"I32\"", 5); /* a valid dtype, but not for weights */
    put("model.safetensors", w, g_weights_len);
    expect_fail(LOOM_EUNSUPPORTED, "dtype I32", NULL);
    free(w);
}

static void test_config_mismatch(void **state)
{
    (void)state;
    restore();
    put_config_sub("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    expect_fail(LOOM_ENOTFOUND, "model.layers.2.input_layernorm.weight", "not found");
    put_config_sub("\"intermediate_size\": 256", "\"intermediate_size\": 255");
    expect_fail(LOOM_EFORMAT, "model.layers.0.mlp.gate_proj.weight",
                "[256, 128], expected [255, 128]");
    put_config_sub("\"vocab_size\": 2048", "\"vocab_size\": 2000");
    expect_fail(LOOM_EFORMAT, "embed_tokens", "shape");
    put_config_sub("\"attention_bias\": false", "\"attention_bias\": true");
    expect_fail(LOOM_ENOTFOUND, "q_proj.bias", NULL);
    put_config_sub("LlamaForCausalLM", "GPTNeoXForCausalLM");
    expect_fail(LOOM_EUNSUPPORTED, "GPTNeoXForCausalLM", "config.json");
    put_config_sub("{", "[");
    expect_fail(LOOM_EFORMAT, "config.json", NULL);
    restore();
    char *p = loom_path_join(g_dir, "model.safetensors");
    remove(p);
    free(p);
    expect_fail(LOOM_ENOTFOUND, "model.safetensors", NULL);
    p = loom_path_join(g_dir, "config.json");
    remove(p);
    free(p);
    expect_fail(LOOM_ENOTFOUND, "config.json", NULL);
}

static int setup(void **state)
{
    (void)state;
    const char *shared = test_require_shared();
    if (!shared)
        return -1;
    char *src = loom_path_join(shared, "fixtures/tiny-llama");
    char *cp = loom_path_join(src, "config.json"), *wp = loom_path_join(src, "model.safetensors");
    loom_err e = {0};
    if (loom_read_file(cp, &g_config, &g_config_len, &e) ||
        loom_read_file(wp, &g_weights, &g_weights_len, &e))
        return -1;
    free(cp);
    free(wp);
    free(src);
    snprintf(g_dir, sizeof(g_dir), "/tmp/loom-ckpt-XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", g_dir);
    free(g_config);
    free(g_weights);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    test_require_shared();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_intact_copy_loads),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_corrupt_header),
        cmocka_unit_test(test_config_mismatch),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
