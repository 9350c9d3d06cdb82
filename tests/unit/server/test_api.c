/* Request parsing and validation (every error status the API promises), and the JSON / SSE
 * shapes of responses. Pure functions: no server, no model. */
#include "testlib.h"

#include "loom/server.h"

#include <cJSON.h>

static const api_limits LIM = {.model_name = "tiny", .max_model_len = 64, .vocab_size = 300};

/* Parses body as kind; returns the error status (0 when accepted). The request is freed. */
static int parse_status(api_kind kind, const char *body, api_error *err)
{
    api_request r;
    api_error e;
    memset(&e, 0, sizeof(e));
    int rc = api_request_parse(kind, body, strlen(body), &LIM, &r, &e);
    if (err)
        *err = e;
    if (rc == 0) {
        api_request_free(&r);
        return 0;
    }
    assert_true(e.status >= 400);
    assert_true(e.message[0] != 0);
    return e.status;
}

static void expect_400(api_kind kind, const char *body, const char *param)
{
    api_error e;
    int status = parse_status(kind, body, &e);
    if (status != 400)
        fail_msg("expected 400 for %s, got %d (%s)", body, status, e.message);
    if (param && strcmp(e.param, param) != 0)
        fail_msg("expected param '%s' for %s, got '%s'", param, body, e.param);
    assert_string_equal(e.type, "invalid_request_error");
}

static void test_malformed_json(void **state)
{
    (void)state;
    expect_400(API_COMPLETIONS, "{\"prompt\": \"hi\"", NULL);
    expect_400(API_COMPLETIONS, "", NULL);
    expect_400(API_COMPLETIONS, "not json", NULL);
    expect_400(API_COMPLETIONS, "[1, 2]", NULL);
    expect_400(API_COMPLETIONS, "\"a string\"", NULL);
    expect_400(API_CHAT, "{\"messages\": [}", NULL);
    expect_400(API_CHAT, "null", NULL);
    /* bytes after the JSON value */
    expect_400(API_COMPLETIONS, "{\"prompt\": \"hi\"} trailing", NULL);
}

static void test_model_name(void **state)
{
    (void)state;
    api_error e;
    assert_int_equal(parse_status(API_COMPLETIONS, "{\"model\":\"other\",\"prompt\":\"x\"}", &e),
                     404);
    assert_string_equal(e.code, "model_not_found");
    assert_string_equal(e.param, "model");
    assert_int_equal(parse_status(API_CHAT,
                                  "{\"model\":\"other\",\"messages\":"
                                  "[{\"role\":\"user\",\"content\":\"x\"}]}",
                                  &e),
                     404);
    expect_400(API_COMPLETIONS, "{\"model\":5,\"prompt\":\"x\"}", "model");
    /* absent, null or equal: fine */
    assert_int_equal(parse_status(API_COMPLETIONS, "{\"prompt\":\"x\"}", NULL), 0);
    assert_int_equal(parse_status(API_COMPLETIONS, "{\"model\":null,\"prompt\":\"x\"}", NULL), 0);
    assert_int_equal(parse_status(API_COMPLETIONS, "{\"model\":\"tiny\",\"prompt\":\"x\"}", NULL),
                     0);
}

static void test_prompt_forms(void **state)
{
    (void)state;
    api_request r;
    api_error e;
    const char *b = "{\"prompt\":\"hello\"}";
    assert_int_equal(api_request_parse(API_COMPLETIONS, b, strlen(b), &LIM, &r, &e), 0);
    assert_string_equal(r.prompt_text, "hello");
    assert_null(r.prompt_ids);
    api_request_free(&r);

    b = "{\"prompt\":[\"one\"]}";
    assert_int_equal(api_request_parse(API_COMPLETIONS, b, strlen(b), &LIM, &r, &e), 0);
    assert_string_equal(r.prompt_text, "one");
    api_request_free(&r);

    b = "{\"prompt\":[5, 6, 299]}";
    assert_int_equal(api_request_parse(API_COMPLETIONS, b, strlen(b), &LIM, &r, &e), 0);
    assert_int_equal(r.n_prompt, 3);
    assert_int_equal(r.prompt_ids[0], 5);
    assert_int_equal(r.prompt_ids[2], 299);
    api_request_free(&r);

    b = "{\"prompt\":[[7, 8]]}";
    assert_int_equal(api_request_parse(API_COMPLETIONS, b, strlen(b), &LIM, &r, &e), 0);
    assert_int_equal(r.n_prompt, 2);
    assert_int_equal(r.prompt_ids[1], 8);
    api_request_free(&r);

    expect_400(API_COMPLETIONS, "{}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":null}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":5}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":{}}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":[]}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":[\"a\",\"b\"]}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":[[1],[2]]}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":[300]}", "prompt"); /* out of vocab */
    expect_400(API_COMPLETIONS, "{\"prompt\":[-1]}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":[1.5]}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":[1,\"a\"]}", "prompt");
    expect_400(API_COMPLETIONS, "{\"prompt\":[true]}", "prompt");
}

static void test_defaults(void **state)
{
    (void)state;
    api_request r;
    api_error e;
    const char *b = "{\"prompt\":\"x\",\"temperature\":null,\"stop\":null,\"stream\":null}";
    assert_int_equal(api_request_parse(API_COMPLETIONS, b, strlen(b), &LIM, &r, &e), 0);
    assert_int_equal(r.params.max_tokens, 16);
    assert_false(r.max_tokens_given);
    assert_true(r.params.temperature == 1.0f);
    assert_true(r.params.top_p == 1.0f);
    assert_true(r.params.top_k <= 0);
    assert_true(r.params.seed < 0);
    assert_int_equal(r.params.logprobs, -1);
    assert_int_equal(r.params.n_stop, 0);
    assert_true(r.params.skip_special_tokens);
    assert_false(r.params.ignore_eos);
    assert_false(r.stream);
    assert_false(r.include_usage);
    api_request_free(&r);
}

static void test_sampling_fields(void **state)
{
    (void)state;
    api_request r;
    api_error e;
    const char *b = "{\"prompt\":\"x\",\"max_tokens\":7,\"temperature\":0,\"top_p\":0.5,"
                    "\"top_k\":3,\"seed\":-5,\"stop\":[\"a\",\"\",\"bc\"],\"min_tokens\":2,"
                    "\"ignore_eos\":true,\"logprobs\":3,\"stream\":true,"
                    "\"stream_options\":{\"include_usage\":true},\"skip_special_tokens\":false,"
                    "\"n\":1,\"echo\":false,\"presence_penalty\":0,\"logit_bias\":{},"
                    "\"user\":\"ignored\"}";
    assert_int_equal(api_request_parse(API_COMPLETIONS, b, strlen(b), &LIM, &r, &e), 0);
    assert_int_equal(r.params.max_tokens, 7);
    assert_true(r.max_tokens_given);
    assert_true(r.params.temperature == 0.0f);
    assert_true(r.params.top_p == 0.5f);
    assert_int_equal(r.params.top_k, 3);
    assert_true(r.params.seed >= 0);      /* negative seeds are folded, still deterministic */
    assert_int_equal(r.params.n_stop, 2); /* the empty stop string is dropped */
    assert_string_equal(r.params.stop[0], "a");
    assert_string_equal(r.params.stop[1], "bc");
    assert_int_equal(r.params.min_tokens, 2);
    assert_true(r.params.ignore_eos);
    assert_int_equal(r.params.logprobs, 3);
    assert_true(r.stream);
    assert_true(r.include_usage);
    assert_false(r.params.skip_special_tokens);
    api_request_free(&r);

    b = "{\"prompt\":\"x\",\"stop\":\"end\"}";
    assert_int_equal(api_request_parse(API_COMPLETIONS, b, strlen(b), &LIM, &r, &e), 0);
    assert_int_equal(r.params.n_stop, 1);
    assert_string_equal(r.params.stop[0], "end");
    api_request_free(&r);
}

static void test_field_errors(void **state)
{
    (void)state;
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"max_tokens\":\"5\"}", "max_tokens");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"max_tokens\":0}", "max_tokens");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"max_tokens\":-3}", "max_tokens");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"max_tokens\":2.5}", "max_tokens");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"max_tokens\":1e300}", "max_tokens");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"temperature\":-0.1}", "temperature");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"temperature\":2.5}", "temperature");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"temperature\":\"hot\"}", "temperature");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"top_p\":0}", "top_p");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"top_p\":1.01}", "top_p");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"top_k\":-2}", "top_k");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"top_k\":1.5}", "top_k");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"seed\":\"7\"}", "seed");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"n\":2}", "n");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"n\":0}", "n");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"best_of\":3}", "best_of");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"echo\":true}", "echo");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"echo\":1}", "echo");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"suffix\":\"tail\"}", "suffix");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"logprobs\":21}", "logprobs");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"logprobs\":true}", "logprobs");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"stream\":\"yes\"}", "stream");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"stream_options\":{\"include_usage\":true}}",
               "stream_options");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"stream\":true,\"stream_options\":5}",
               "stream_options");
    expect_400(API_COMPLETIONS,
               "{\"prompt\":\"x\",\"stream\":true,\"stream_options\":{\"include_usage\":1}}",
               "include_usage");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"stop\":5}", "stop");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"stop\":[\"a\",5]}", "stop");
    expect_400(
        API_COMPLETIONS,
        "{\"prompt\":\"x\",\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\"]}",
        "stop");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"max_tokens\":3,\"min_tokens\":4}",
               "min_tokens");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"min_tokens\":-1}", "min_tokens");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"ignore_eos\":\"true\"}", "ignore_eos");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"presence_penalty\":0.5}", "presence_penalty");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"frequency_penalty\":3}", "frequency_penalty");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"repetition_penalty\":1.2}",
               "repetition_penalty");
    expect_400(API_COMPLETIONS, "{\"prompt\":\"x\",\"logit_bias\":{\"5\":10}}", "logit_bias");
}

static void test_chat_messages(void **state)
{
    (void)state;
    api_request r;
    api_error e;
    const char *b =
        "{\"messages\":[{\"role\":\"system\",\"content\":\"be brief\"},"
        "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
        "{\"type\":\"text\",\"text\":\"b\"}]},{\"role\":\"assistant\",\"content\":null}],"
        "\"max_tokens\":9,\"max_completion_tokens\":5,\"logprobs\":true,"
        "\"top_logprobs\":2}";
    assert_int_equal(api_request_parse(API_CHAT, b, strlen(b), &LIM, &r, &e), 0);
    assert_int_equal(r.n_messages, 3);
    assert_string_equal(r.messages[0].role, "system");
    assert_string_equal(r.messages[0].content, "be brief");
    assert_string_equal(r.messages[1].content, "a\nb");
    assert_string_equal(r.messages[2].content, "");
    assert_int_equal(r.params.max_tokens, 5); /* max_completion_tokens wins */
    assert_true(r.chat_logprobs);
    assert_int_equal(r.params.logprobs, 2);
    api_request_free(&r);

    b = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    assert_int_equal(api_request_parse(API_CHAT, b, strlen(b), &LIM, &r, &e), 0);
    assert_false(r.max_tokens_given);
    assert_int_equal(r.params.logprobs, -1);
    api_request_free(&r);

    expect_400(API_CHAT, "{}", "messages");
    expect_400(API_CHAT, "{\"messages\":[]}", "messages");
    expect_400(API_CHAT, "{\"messages\":\"hi\"}", "messages");
    expect_400(API_CHAT, "{\"messages\":[5]}", "messages");
    expect_400(API_CHAT, "{\"messages\":[{\"content\":\"x\"}]}", "messages");
    expect_400(API_CHAT, "{\"messages\":[{\"role\":\"king\",\"content\":\"x\"}]}", "messages");
    expect_400(API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", "messages");
    expect_400(API_CHAT,
               "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\","
               "\"image_url\":{\"url\":\"x\"}}]}]}",
               "messages");
    expect_400(API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"text\":\"x\"}]}]}",
               "messages");
    expect_400(API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}",
               "messages");
    expect_400(API_CHAT,
               "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
               "\"top_logprobs\":2}",
               "top_logprobs");
    expect_400(API_CHAT,
               "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
               "\"logprobs\":3}",
               "logprobs");
    expect_400(API_CHAT,
               "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
               "\"max_completion_tokens\":0}",
               "max_completion_tokens");
    expect_400(API_CHAT,
               "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
               "\"tools\":[{\"type\":\"function\"}]}",
               "tools");
    expect_400(API_CHAT,
               "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],"
               "\"response_format\":{\"type\":\"json_object\"}}",
               "response_format");
    expect_400(API_CHAT, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"n\":3}", "n");
}

/* Token-id prompts need no tokenizer: the context check alone. */
static void test_context_length(void **state)
{
    (void)state;
    api_request r;
    api_error e;
    /* 60 prompt tokens + 4 = 64 = max_model_len: fits */
    loom_buf b;
    buf_init(&b);
    buf_puts(&b, "{\"prompt\":[");
    for (int i = 0; i < 60; i++)
        buf_printf(&b, "%s%d", i ? "," : "", i + 3);
    buf_puts(&b, "],\"max_tokens\":4}");
    assert_int_equal(api_request_parse(API_COMPLETIONS, b.data, b.len, &LIM, &r, &e), 0);
    assert_int_equal(api_request_tokenize(&r, NULL, &LIM, &e), 0);
    api_request_free(&r);

    /* one more is over */
    b.len -= strlen("4}");
    buf_puts(&b, "5}");
    assert_int_equal(api_request_parse(API_COMPLETIONS, b.data, b.len, &LIM, &r, &e), 0);
    assert_int_equal(api_request_tokenize(&r, NULL, &LIM, &e), -1);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.code, "context_length_exceeded");
    assert_non_null(strstr(e.message, "64"));
    api_request_free(&r);

    /* the default max_tokens (16) counts too */
    b.len -= strlen(",\"max_tokens\":5}");
    buf_puts(&b, "}");
    assert_int_equal(api_request_parse(API_COMPLETIONS, b.data, b.len, &LIM, &r, &e), 0);
    assert_int_equal(api_request_tokenize(&r, NULL, &LIM, &e), -1);
    assert_int_equal(e.status, 400);
    api_request_free(&r);
    buf_free(&b);
}

/* With the byte-level tokenizer of the random presets: prompts are encoded, chat templates
 * rendered, the chat default max_tokens fills the context. */
static void test_tokenize(void **state)
{
    (void)state;
    tokenizer *tok = tokenizer_create_bytes(LIM.vocab_size);
    api_request r;
    api_error e;
    const char *b = "{\"prompt\":\"hello\",\"max_tokens\":3}";
    assert_int_equal(api_request_parse(API_COMPLETIONS, b, strlen(b), &LIM, &r, &e), 0);
    assert_int_equal(api_request_tokenize(&r, tok, &LIM, &e), 0);
    assert_true(r.n_prompt >= 1 && r.n_prompt <= 6);
    api_request_free(&r);

    b = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    assert_int_equal(api_request_parse(API_CHAT, b, strlen(b), &LIM, &r, &e), 0);
    if (api_request_tokenize(&r, tok, &LIM, &e) != 0)
        fail_msg("chat tokenize: %s", e.message);
    assert_true(r.n_prompt > 2);
    assert_int_equal(r.n_prompt + r.params.max_tokens, LIM.max_model_len);
    api_request_free(&r);

    /* a chat prompt longer than the context */
    loom_buf big;
    buf_init(&big);
    buf_puts(&big, "{\"messages\":[{\"role\":\"user\",\"content\":\"");
    for (int i = 0; i < 100; i++)
        buf_puts(&big, "ab");
    buf_puts(&big, "\"}]}");
    assert_int_equal(api_request_parse(API_CHAT, big.data, big.len, &LIM, &r, &e), 0);
    assert_int_equal(api_request_tokenize(&r, tok, &LIM, &e), -1);
    assert_int_equal(e.status, 400);
    assert_string_equal(e.code, "context_length_exceeded");
    api_request_free(&r);
    buf_free(&big);

    b = "{\"prompt\":\"\"}";
    assert_int_equal(api_request_parse(API_COMPLETIONS, b, strlen(b), &LIM, &r, &e), 0);
    assert_int_equal(api_request_tokenize(&r, tok, &LIM, &e), -1);
    assert_int_equal(e.status, 400);
    api_request_free(&r);
    tokenizer_free(tok);
}

static void test_error_json(void **state)
{
    (void)state;
    api_error e;
    api_error_set(&e, 404, "invalid_request_error", "model", "model_not_found", "no \"%s\"", "m");
    char *json = api_error_json(&e);
    cJSON *root = cJSON_Parse(json);
    assert_non_null(root);
    cJSON *err = cJSON_GetObjectItem(root, "error");
    assert_true(cJSON_IsObject(err));
    assert_string_equal(cJSON_GetObjectItem(err, "message")->valuestring, "no \"m\"");
    assert_string_equal(cJSON_GetObjectItem(err, "type")->valuestring, "invalid_request_error");
    assert_string_equal(cJSON_GetObjectItem(err, "param")->valuestring, "model");
    assert_string_equal(cJSON_GetObjectItem(err, "code")->valuestring, "model_not_found");
    cJSON_Delete(root);
    free(json);

    api_error_set(&e, 400, "invalid_request_error", NULL, NULL, "bad");
    json = api_error_json(&e);
    root = cJSON_Parse(json);
    err = cJSON_GetObjectItem(root, "error");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(err, "param")));
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(err, "code")));
    cJSON_Delete(root);
    free(json);
}

static void test_json_string(void **state)
{
    (void)state;
    loom_buf b;
    buf_init(&b);
    api_json_string(&b, "a\"b\\c\n\x01", 7);
    assert_string_equal(b.data, "\"a\\\"b\\\\c\\n\\u0001\"");
    b.len = 0;
    api_json_string(&b, "x\0y", 3); /* embedded NUL survives */
    assert_string_equal(b.data, "\"x\\u0000y\"");
    b.len = 0;
    api_json_string(&b, "\xc3\xa9\xff\xe2\x82", 5); /* é, a stray byte, a cut sequence */
    assert_string_equal(b.data, "\"\xc3\xa9\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"");
    buf_free(&b);

    char s[64];
    api_token_text(NULL, 42, s, sizeof(s));
    assert_string_equal(s, "token_id:42");
}

static engine_event make_event(int32_t token, const char *text, finish_reason f, int completion)
{
    engine_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.req_id = 1;
    ev.token = token;
    ev.text = text;
    ev.text_len = text ? strlen(text) : 0;
    ev.finish = f;
    ev.prompt_tokens = 4;
    ev.completion_tokens = completion;
    ev.logprob = -0.5f;
    ev.n_top = 2;
    ev.top[0].token = token >= 0 ? token : 0;
    ev.top[0].logprob = -0.5f;
    ev.top[1].token = 3;
    ev.top[1].logprob = -1.5f;
    ev.first_token = completion == 1;
    return ev;
}

static cJSON *parse_obj(const char *json)
{
    cJSON *root = cJSON_Parse(json);
    if (!root)
        fail_msg("not JSON: %s", json);
    return root;
}

static void test_completion_body(void **state)
{
    (void)state;
    api_request req;
    memset(&req, 0, sizeof(req));
    req.kind = API_COMPLETIONS;
    req.params.logprobs = 2;
    req.n_prompt = 4;
    api_response r;
    api_response_init(&r, &req, 7, "tiny", NULL);
    assert_memory_equal(r.id, "cmpl-", 5);
    const char *pieces[] = {"He", "llo", " w\xc3\xa9"};
    for (int i = 0; i < 3; i++) {
        engine_event ev =
            make_event(10 + i, pieces[i], i == 2 ? FINISH_LENGTH : FINISH_NONE, i + 1);
        api_response_add(&r, &ev, ev.text, ev.text_len);
    }
    char *json = api_response_json(&r);
    cJSON *root = parse_obj(json);
    assert_string_equal(cJSON_GetObjectItem(root, "object")->valuestring, "text_completion");
    assert_string_equal(cJSON_GetObjectItem(root, "model")->valuestring, "tiny");
    assert_true(cJSON_IsNumber(cJSON_GetObjectItem(root, "created")));
    cJSON *choices = cJSON_GetObjectItem(root, "choices");
    assert_int_equal(cJSON_GetArraySize(choices), 1);
    cJSON *c0 = cJSON_GetArrayItem(choices, 0);
    assert_int_equal(cJSON_GetObjectItem(c0, "index")->valueint, 0);
    assert_string_equal(cJSON_GetObjectItem(c0, "text")->valuestring, "Hello w\xc3\xa9");
    assert_string_equal(cJSON_GetObjectItem(c0, "finish_reason")->valuestring, "length");
    cJSON *lp = cJSON_GetObjectItem(c0, "logprobs");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(lp, "tokens")), 3);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(lp, "token_logprobs")), 3);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(lp, "top_logprobs")), 3);
    cJSON *offs = cJSON_GetObjectItem(lp, "text_offset");
    assert_int_equal(cJSON_GetArrayItem(offs, 0)->valueint, 0);
    assert_int_equal(cJSON_GetArrayItem(offs, 1)->valueint, 2);
    assert_int_equal(cJSON_GetArrayItem(offs, 2)->valueint, 5);
    cJSON *top0 = cJSON_GetArrayItem(cJSON_GetObjectItem(lp, "top_logprobs"), 0);
    assert_int_equal(cJSON_GetArraySize(top0), 2);
    assert_string_equal(cJSON_GetArrayItem(cJSON_GetObjectItem(lp, "tokens"), 0)->valuestring,
                        "token_id:10");
    cJSON *usage = cJSON_GetObjectItem(root, "usage");
    assert_int_equal(cJSON_GetObjectItem(usage, "prompt_tokens")->valueint, 4);
    assert_int_equal(cJSON_GetObjectItem(usage, "completion_tokens")->valueint, 3);
    assert_int_equal(cJSON_GetObjectItem(usage, "total_tokens")->valueint, 7);
    cJSON_Delete(root);
    free(json);
    api_response_free(&r);
}

static void test_chat_body(void **state)
{
    (void)state;
    api_request req;
    memset(&req, 0, sizeof(req));
    req.kind = API_CHAT;
    req.params.logprobs = -1;
    req.n_prompt = 4;
    api_response r;
    api_response_init(&r, &req, 8, "tiny", NULL);
    assert_memory_equal(r.id, "chatcmpl-", 9);
    engine_event ev = make_event(5, "Hi", FINISH_NONE, 1);
    api_response_add(&r, &ev, ev.text, ev.text_len);
    ev = make_event(-1, NULL, FINISH_STOP, 1); /* finish-only event */
    api_response_add(&r, &ev, "", 0);
    char *json = api_response_json(&r);
    cJSON *root = parse_obj(json);
    assert_string_equal(cJSON_GetObjectItem(root, "object")->valuestring, "chat.completion");
    cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(root, "choices"), 0);
    cJSON *msg = cJSON_GetObjectItem(c0, "message");
    assert_string_equal(cJSON_GetObjectItem(msg, "role")->valuestring, "assistant");
    assert_string_equal(cJSON_GetObjectItem(msg, "content")->valuestring, "Hi");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(c0, "logprobs")));
    assert_string_equal(cJSON_GetObjectItem(c0, "finish_reason")->valuestring, "stop");
    cJSON *usage = cJSON_GetObjectItem(root, "usage");
    assert_int_equal(cJSON_GetObjectItem(usage, "completion_tokens")->valueint, 1);
    cJSON_Delete(root);
    free(json);
    api_response_free(&r);
}

/* Splits "data: ...\n\n" frames; returns how many, the JSON ones parsed into frames[]. */
static int split_sse(const char *s, cJSON **frames, int cap, bool *done_last)
{
    int n = 0;
    *done_last = false;
    while (*s) {
        if (strncmp(s, "data: ", 6) != 0)
            fail_msg("frame does not start with 'data: ': %s", s);
        s += 6;
        const char *end = strstr(s, "\n\n");
        assert_non_null(end);
        assert_false(*done_last); /* nothing after [DONE] */
        if (end - s == 6 && !strncmp(s, "[DONE]", 6)) {
            *done_last = true;
        } else {
            assert_true(n < cap);
            char *j = strndup(s, (size_t)(end - s));
            assert_null(strchr(j, '\n'));
            frames[n++] = parse_obj(j);
            free(j);
        }
        s = end + 2;
    }
    return n;
}

static void test_chat_stream(void **state)
{
    (void)state;
    api_request req;
    memset(&req, 0, sizeof(req));
    req.kind = API_CHAT;
    req.params.logprobs = -1;
    req.include_usage = true;
    req.n_prompt = 4;
    api_response r;
    api_response_init(&r, &req, 9, "tiny", NULL);
    loom_buf out;
    buf_init(&out);
    api_stream_begin(&r, &out);
    engine_event ev = make_event(5, "A", FINISH_NONE, 1);
    api_stream_event(&r, &ev, ev.text, ev.text_len, &out);
    ev = make_event(6, "", FINISH_NONE, 2); /* an incomplete character: no frame */
    api_stream_event(&r, &ev, "", 0, &out);
    ev = make_event(7, "B\n", FINISH_LENGTH, 3);
    api_stream_event(&r, &ev, ev.text, ev.text_len, &out);
    api_stream_end(&r, &out);

    cJSON *frames[8];
    bool done;
    int n = split_sse(out.data, frames, 8, &done);
    assert_true(done);
    assert_int_equal(n, 4); /* role, A, B + finish, usage */
    for (int i = 0; i < n; i++) {
        assert_string_equal(cJSON_GetObjectItem(frames[i], "object")->valuestring,
                            "chat.completion.chunk");
        assert_string_equal(cJSON_GetObjectItem(frames[i], "id")->valuestring, r.id);
    }
    cJSON *d0 = cJSON_GetObjectItem(
        cJSON_GetArrayItem(cJSON_GetObjectItem(frames[0], "choices"), 0), "delta");
    assert_string_equal(cJSON_GetObjectItem(d0, "role")->valuestring, "assistant");
    cJSON *c1 = cJSON_GetArrayItem(cJSON_GetObjectItem(frames[1], "choices"), 0);
    assert_string_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(c1, "delta"), "content")->valuestring, "A");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(c1, "finish_reason")));
    cJSON *c2 = cJSON_GetArrayItem(cJSON_GetObjectItem(frames[2], "choices"), 0);
    assert_string_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(c2, "delta"), "content")->valuestring, "B\n");
    assert_string_equal(cJSON_GetObjectItem(c2, "finish_reason")->valuestring, "length");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(frames[3], "choices")), 0);
    cJSON *usage = cJSON_GetObjectItem(frames[3], "usage");
    assert_int_equal(cJSON_GetObjectItem(usage, "prompt_tokens")->valueint, 4);
    assert_int_equal(cJSON_GetObjectItem(usage, "completion_tokens")->valueint, 3);
    assert_int_equal(cJSON_GetObjectItem(usage, "total_tokens")->valueint, 7);
    for (int i = 0; i < n; i++)
        cJSON_Delete(frames[i]);
    buf_free(&out);
    api_response_free(&r);
}

static void test_completion_stream(void **state)
{
    (void)state;
    api_request req;
    memset(&req, 0, sizeof(req));
    req.kind = API_COMPLETIONS;
    req.params.logprobs = 1;
    req.n_prompt = 2;
    api_response r;
    api_response_init(&r, &req, 10, "tiny", NULL);
    loom_buf out;
    buf_init(&out);
    api_stream_begin(&r, &out); /* completions have no role chunk */
    assert_int_equal(out.len, 0);
    engine_event ev = make_event(5, "ab", FINISH_NONE, 1);
    api_stream_event(&r, &ev, ev.text, ev.text_len, &out);
    ev = make_event(6, "c", FINISH_STOP, 2);
    api_stream_event(&r, &ev, ev.text, ev.text_len, &out);
    api_stream_end(&r, &out); /* no usage chunk: not asked for */

    cJSON *frames[4];
    bool done;
    int n = split_sse(out.data, frames, 4, &done);
    assert_true(done);
    assert_int_equal(n, 2);
    cJSON *c1 = cJSON_GetArrayItem(cJSON_GetObjectItem(frames[1], "choices"), 0);
    assert_string_equal(cJSON_GetObjectItem(frames[1], "object")->valuestring, "text_completion");
    assert_string_equal(cJSON_GetObjectItem(c1, "text")->valuestring, "c");
    assert_string_equal(cJSON_GetObjectItem(c1, "finish_reason")->valuestring, "stop");
    cJSON *offs = cJSON_GetObjectItem(cJSON_GetObjectItem(c1, "logprobs"), "text_offset");
    assert_int_equal(cJSON_GetArraySize(offs), 1);
    assert_int_equal(cJSON_GetArrayItem(offs, 0)->valueint, 2);
    for (int i = 0; i < n; i++)
        cJSON_Delete(frames[i]);
    buf_free(&out);

    api_error e;
    api_error_set(&e, 500, "server_error", NULL, NULL, "boom");
    buf_init(&out);
    api_stream_error(&e, &out);
    n = split_sse(out.data, frames, 4, &done);
    assert_true(done);
    assert_int_equal(n, 1);
    assert_non_null(cJSON_GetObjectItem(frames[0], "error"));
    cJSON_Delete(frames[0]);
    buf_free(&out);
    api_response_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_malformed_json),    cmocka_unit_test(test_model_name),
        cmocka_unit_test(test_prompt_forms),      cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_sampling_fields),   cmocka_unit_test(test_field_errors),
        cmocka_unit_test(test_chat_messages),     cmocka_unit_test(test_context_length),
        cmocka_unit_test(test_tokenize),          cmocka_unit_test(test_error_json),
        cmocka_unit_test(test_json_string),       cmocka_unit_test(test_completion_body),
        cmocka_unit_test(test_chat_body),         cmocka_unit_test(test_chat_stream),
        cmocka_unit_test(test_completion_stream),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
