/* /tokenize and /detokenize bodies (vLLM's shapes) over the byte-level tokenizer. */
#include "testlib.h"
#include "loom/server.h"
#include "loom/tokenizer.h"

#include <cJSON.h>

static tokenizer *tok;
static api_limits lim = {.model_name = "m", .max_model_len = 64, .vocab_size = 512};

static int run(bool tokenize, const char *body, char **json, api_error *err)
{
    loom_buf out;
    buf_init(&out);
    int rc = tokenize ? api_tokenize(body, strlen(body), &lim, tok, &out, err)
                      : api_detokenize(body, strlen(body), &lim, tok, &out, err);
    *json = buf_detach(&out);
    return rc;
}

static void test_tokenize_prompt(void **state)
{
    char *json;
    api_error err;
    assert_int_equal(run(true, "{\"prompt\":\"abc\"}", &json, &err), 0);
    cJSON *root = cJSON_Parse(json);
    assert_non_null(root);
    assert_int_equal(cJSON_GetObjectItem(root, "count")->valueint, 3);
    assert_int_equal(cJSON_GetObjectItem(root, "max_model_len")->valueint, 64);
    cJSON *tokens = cJSON_GetObjectItem(root, "tokens");
    assert_int_equal(cJSON_GetArraySize(tokens), 3);
    /* byte tokenizer: byte b is id 3 + b */
    assert_int_equal(cJSON_GetArrayItem(tokens, 0)->valueint, 3 + 'a');
    cJSON_Delete(root);
    free(json);
}

static void test_tokenize_chat(void **state)
{
    char *json;
    api_error err;
    assert_int_equal(
        run(true, "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", &json, &err), 0);
    cJSON *root = cJSON_Parse(json);
    cJSON *tokens = cJSON_GetObjectItem(root, "tokens");
    /* ChatML: starts with <|im_start|> (id 1) */
    assert_int_equal(cJSON_GetArrayItem(tokens, 0)->valueint, 1);
    assert_true(cJSON_GetObjectItem(root, "count")->valueint > 3);
    cJSON_Delete(root);
    free(json);
}

static void test_errors(void **state)
{
    char *json;
    api_error err;
    assert_int_equal(run(true, "not json", &json, &err), -1);
    assert_int_equal(err.status, 400);
    free(json);
    assert_int_equal(run(true, "{\"model\":\"other\",\"prompt\":\"x\"}", &json, &err), -1);
    assert_int_equal(err.status, 404);
    free(json);
    assert_int_equal(run(true, "{\"prompt\":\"x\",\"add_special_tokens\":1}", &json, &err), -1);
    assert_int_equal(err.status, 400);
    free(json);
    assert_int_equal(run(false, "{\"tokens\":[3,9999]}", &json, &err), -1);
    assert_int_equal(err.status, 400);
    free(json);
    assert_int_equal(run(false, "{\"tokens\":\"x\"}", &json, &err), -1);
    assert_int_equal(err.status, 400);
    free(json);
}

static void test_detokenize_roundtrip(void **state)
{
    char *json;
    api_error err;
    char body[64];
    snprintf(body, sizeof(body), "{\"tokens\":[%d,%d]}", 3 + 'o', 3 + 'k');
    assert_int_equal(run(false, body, &json, &err), 0);
    assert_string_equal(json, "{\"prompt\":\"ok\"}");
    free(json);
}

int main(void)
{
    tok = tokenizer_create_bytes(512);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tokenize_prompt),
        cmocka_unit_test(test_tokenize_chat),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_detokenize_roundtrip),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    tokenizer_free(tok);
    return rc;
}
