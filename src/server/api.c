/*
 * OpenAI API translation: request JSON -> api_request (validated), and engine events -> response
 * bodies and SSE chunks. Pure functions: no sockets, no threads, no globals. The parser is the
 * fuzz target's entry point (tests/fuzz/fuzz_request.c), so it treats every byte as hostile:
 * sizes come only from what cJSON already allocated, and every field is type- and range-checked.
 *
 * Field names, defaults and error shapes follow OpenAI's API, with vLLM's extensions that
 * benchmarks use (ignore_eos, min_tokens, top_k, skip_special_tokens,
 * include_stop_str_in_output).
 */
#include "loom/server.h"

#include <cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ERR_INVALID "invalid_request_error"

/* ---------------------------------------------------------------- errors */

void api_error_set(api_error *err, int status, const char *type, const char *param,
                   const char *code, const char *fmt, ...)
{
    if (!err)
        return;
    err->status = status;
    snprintf(err->type, sizeof(err->type), "%s", type ? type : "");
    snprintf(err->param, sizeof(err->param), "%s", param ? param : "");
    snprintf(err->code, sizeof(err->code), "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

static void json_str0(loom_buf *out, const char *s)
{
    api_json_string(out, s, strlen(s));
}

/* A string field, or null when empty. */
static void json_str_or_null(loom_buf *out, const char *s)
{
    if (s && *s)
        json_str0(out, s);
    else
        buf_puts(out, "null");
}

char *api_error_json(const api_error *err)
{
    loom_buf b;
    buf_init(&b);
    buf_puts(&b, "{\"error\":{\"message\":");
    json_str0(&b, err->message);
    buf_puts(&b, ",\"type\":");
    json_str_or_null(&b, err->type);
    buf_puts(&b, ",\"param\":");
    json_str_or_null(&b, err->param);
    buf_puts(&b, ",\"code\":");
    json_str_or_null(&b, err->code);
    buf_puts(&b, "}}");
    return buf_detach(&b);
}

/* 400 invalid_request_error naming the field. */
#define BAD(err, param, ...) api_error_set(err, 400, ERR_INVALID, param, NULL, __VA_ARGS__)

/* ---------------------------------------------------------------- JSON writing */

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 if invalid. Rejects overlong
 * forms, surrogates and code points above U+10FFFF. */
static size_t utf8_valid_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

static bool utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t l = utf8_valid_len(p + i, n - i);
        if (!l)
            return false;
        i += l;
    }
    return true;
}

/* Characters (code points) in s; each invalid byte counts as one (it becomes U+FFFD). */
static size_t utf8_chars(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, chars = 0;
    while (i < n) {
        size_t l = utf8_valid_len(p + i, n - i);
        i += l ? l : 1;
        chars++;
    }
    return chars;
}

void api_json_string(loom_buf *out, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    buf_append(out, "\"", 1);
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c >= 0x80) {
            size_t l = utf8_valid_len(p + i, n - i);
            if (l) {
                buf_append(out, p + i, l);
                i += l;
            } else {
                buf_puts(out, "\xEF\xBF\xBD"); /* U+FFFD */
                i++;
            }
            continue;
        }
        switch (c) {
        case '"':
            buf_puts(out, "\\\"");
            break;
        case '\\':
            buf_puts(out, "\\\\");
            break;
        case '\n':
            buf_puts(out, "\\n");
            break;
        case '\r':
            buf_puts(out, "\\r");
            break;
        case '\t':
            buf_puts(out, "\\t");
            break;
        case '\b':
            buf_puts(out, "\\b");
            break;
        case '\f':
            buf_puts(out, "\\f");
            break;
        default:
            if (c < 0x20)
                buf_printf(out, "\\u%04x", c);
            else
                buf_append(out, p + i, 1);
        }
        i++;
    }
    buf_append(out, "\"", 1);
}

/* A logprob: JSON has no -Infinity, so it becomes -9999.0 (OpenAI's convention). */
static void json_logprob(loom_buf *out, float v)
{
    if (isnan(v))
        buf_puts(out, "null");
    else if (v < -9999.0f)
        buf_puts(out, "-9999.0");
    else
        buf_printf(out, "%.9g", (double)v);
}

void api_sse_frame(loom_buf *out, const char *json, size_t len)
{
    buf_puts(out, "data: ");
    buf_append(out, json, len);
    buf_puts(out, "\n\n");
}

size_t api_token_text(const tokenizer *tok, int32_t id, char *out, size_t cap)
{
    size_t len = 0;
    const char *bytes = tok ? tokenizer_id_to_bytes(tok, id, &len) : NULL;
    size_t n = 0;
    if (cap == 0)
        return 0;
    if (!bytes) {
        n = (size_t)snprintf(out, cap, "token_id:%d", id);
        return n < cap ? n : cap - 1;
    }
    if (utf8_valid(bytes, len)) {
        n = len < cap - 1 ? len : cap - 1;
        memcpy(out, bytes, n);
    } else {
        n = (size_t)snprintf(out, cap, "bytes:");
        for (size_t i = 0; i < len && n + 5 < cap; i++)
            n += (size_t)snprintf(out + n, cap - n, "\\x%02x", (unsigned char)bytes[i]);
    }
    out[n] = 0;
    return n;
}

/* ---------------------------------------------------------------- request parsing */

/* A field, with JSON null treated as absent (OpenAI clients send explicit nulls). */
static const cJSON *field(const cJSON *obj, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    return (v && !cJSON_IsNull(v)) ? v : NULL;
}

static bool is_integer(const cJSON *v)
{
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && v->valuedouble == floor(v->valuedouble);
}

/* Optional integer in [lo, hi]. Returns 1 if present, 0 if absent, -1 on error. */
static int get_int(const cJSON *obj, const char *name, double lo, double hi, int64_t *out,
                   api_error *err)
{
    const cJSON *v = field(obj, name);
    if (!v)
        return 0;
    if (!is_integer(v) || v->valuedouble < lo || v->valuedouble > hi) {
        BAD(err, name, "'%s' must be an integer between %.0f and %.0f", name, lo, hi);
        return -1;
    }
    *out = (int64_t)v->valuedouble;
    return 1;
}

static int get_number(const cJSON *obj, const char *name, double lo, double hi, bool lo_open,
                      double *out, api_error *err)
{
    const cJSON *v = field(obj, name);
    if (!v)
        return 0;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble > hi ||
        (lo_open ? v->valuedouble <= lo : v->valuedouble < lo)) {
        BAD(err, name, "'%s' must be a number in %s%g, %g]", name, lo_open ? "(" : "[", lo, hi);
        return -1;
    }
    *out = v->valuedouble;
    return 1;
}

static int get_bool(const cJSON *obj, const char *name, bool *out, api_error *err)
{
    const cJSON *v = field(obj, name);
    if (!v)
        return 0;
    if (!cJSON_IsBool(v)) {
        BAD(err, name, "'%s' must be true or false", name);
        return -1;
    }
    *out = cJSON_IsTrue(v);
    return 1;
}

/* strdup that reports failure instead of aborting (sizes come from the request). */
static char *dup_n(const char *s, size_t n, api_error *err)
{
    char *d = malloc(n + 1);
    if (!d) {
        api_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return NULL;
    }
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

/* An array of token ids, each in [0, vocab). */
static int parse_token_ids(const cJSON *arr, const char *param, int vocab, int32_t **ids, int *n,
                           api_error *err)
{
    int count = cJSON_GetArraySize(arr);
    if (count == 0) {
        BAD(err, param, "'%s' must not be empty", param);
        return -1;
    }
    int32_t *v = malloc((size_t)count * sizeof(*v));
    if (!v) {
        api_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    int i = 0;
    const cJSON *t;
    for (t = arr->child; t; t = t->next) {
        if (!is_integer(t) || t->valuedouble < 0 || t->valuedouble >= vocab) {
            BAD(err, param, "token ids in '%s' must be integers in [0, %d)", param, vocab);
            free(v);
            return -1;
        }
        v[i++] = (int32_t)t->valuedouble;
    }
    *ids = v;
    *n = count;
    return 0;
}

static bool all_integers(const cJSON *arr)
{
    const cJSON *t;
    for (t = arr->child; t; t = t->next) {
        if (!cJSON_IsNumber(t))
            return false;
    }
    return true;
}

/* Completions "prompt": a string, an array of token ids, or a list of exactly one of those. */
static int parse_prompt(const cJSON *root, const api_limits *lim, api_request *r, api_error *err)
{
    const cJSON *p = field(root, "prompt");
    if (!p) {
        BAD(err, "prompt", "'prompt' is required");
        return -1;
    }
    if (cJSON_IsArray(p) && cJSON_GetArraySize(p) > 0 && !all_integers(p)) {
        /* a list of prompts: only a list of one is served (n prompts = n requests) */
        if (cJSON_GetArraySize(p) != 1) {
            BAD(err, "prompt", "a list of %d prompts is not supported: send one request per prompt",
                cJSON_GetArraySize(p));
            return -1;
        }
        p = cJSON_GetArrayItem(p, 0);
        if (cJSON_IsArray(p) && !all_integers(p)) {
            BAD(err, "prompt",
                "'prompt' must be a string, a list of token ids, or a list "
                "holding one of those");
            return -1;
        }
    }
    if (cJSON_IsString(p)) {
        r->prompt_text = dup_n(p->valuestring, strlen(p->valuestring), err);
        return r->prompt_text ? 0 : -1;
    }
    if (cJSON_IsArray(p))
        return parse_token_ids(p, "prompt", lim->vocab_size, &r->prompt_ids, &r->n_prompt, err);
    BAD(err, "prompt",
        "'prompt' must be a string, a list of token ids, or a list holding one of those");
    return -1;
}

static bool valid_role(const char *role)
{
    static const char *const roles[] = {"system", "user", "assistant", "developer", "tool"};
    for (size_t i = 0; i < sizeof(roles) / sizeof(roles[0]); i++)
        if (!strcmp(role, roles[i]))
            return true;
    return false;
}

/* A message's content: a string, null, or a list of {"type":"text","text":...} parts (joined
 * with newlines, as vLLM does). */
static char *parse_content(const cJSON *c, int index, api_error *err)
{
    if (!c)
        return dup_n("", 0, err);
    if (cJSON_IsString(c))
        return dup_n(c->valuestring, strlen(c->valuestring), err);
    if (!cJSON_IsArray(c)) {
        BAD(err, "messages", "messages[%d].content must be a string or a list of text parts",
            index);
        return NULL;
    }
    loom_buf b;
    buf_init(&b);
    int k = 0;
    const cJSON *part;
    for (part = c->child; part; part = part->next) {
        const cJSON *type = cJSON_IsObject(part) ? field(part, "type") : NULL;
        const cJSON *text = cJSON_IsObject(part) ? field(part, "text") : NULL;
        if (!cJSON_IsString(type)) {
            BAD(err, "messages", "messages[%d].content[%d] must be an object with a 'type'", index,
                k);
            goto fail;
        }
        if (strcmp(type->valuestring, "text") != 0) {
            BAD(err, "messages",
                "messages[%d].content[%d]: content type '%.40s' is not "
                "supported (text only)",
                index, k, type->valuestring);
            goto fail;
        }
        if (!cJSON_IsString(text)) {
            BAD(err, "messages", "messages[%d].content[%d].text must be a string", index, k);
            goto fail;
        }
        if (k > 0)
            buf_puts(&b, "\n");
        buf_puts(&b, text->valuestring);
        k++;
    }
    return buf_detach(&b);
fail:
    buf_free(&b);
    return NULL;
}

static int parse_messages(const cJSON *root, api_request *r, api_error *err)
{
    const cJSON *m = field(root, "messages");
    if (!cJSON_IsArray(m) || cJSON_GetArraySize(m) == 0) {
        BAD(err, "messages", "'messages' must be a non-empty list of messages");
        return -1;
    }
    int n = cJSON_GetArraySize(m);
    r->messages = calloc((size_t)n, sizeof(*r->messages));
    if (!r->messages) {
        api_error_set(err, 500, "server_error", NULL, NULL, "out of memory");
        return -1;
    }
    const cJSON *msg;
    for (msg = m->child; msg; msg = msg->next) {
        int i = r->n_messages;
        const cJSON *role = cJSON_IsObject(msg) ? field(msg, "role") : NULL;
        if (!cJSON_IsString(role)) {
            BAD(err, "messages", "messages[%d] must be an object with a string 'role'", i);
            return -1;
        }
        if (!valid_role(role->valuestring)) {
            BAD(err, "messages",
                "messages[%d].role '%.40s' is not one of system, user, "
                "assistant, developer, tool",
                i, role->valuestring);
            return -1;
        }
        char *content = parse_content(field(msg, "content"), i, err);
        if (!content)
            return -1;
        char *role_copy = dup_n(role->valuestring, strlen(role->valuestring), err);
        if (!role_copy) {
            free(content);
            return -1;
        }
        r->messages[i].role = role_copy;
        r->messages[i].content = content;
        r->n_messages++;
    }
    return 0;
}

static int parse_stop(const cJSON *root, sampling_params *p, api_error *err)
{
    const cJSON *s = field(root, "stop");
    if (!s)
        return 0;
    if (cJSON_IsString(s)) {
        if (*s->valuestring &&
            !(p->stop[p->n_stop++] = dup_n(s->valuestring, strlen(s->valuestring), err)))
            return -1;
        return 0;
    }
    if (!cJSON_IsArray(s)) {
        BAD(err, "stop", "'stop' must be a string or a list of strings");
        return -1;
    }
    if (cJSON_GetArraySize(s) > ENGINE_MAX_STOP) {
        BAD(err, "stop", "'stop' may hold at most %d strings", ENGINE_MAX_STOP);
        return -1;
    }
    const cJSON *t;
    for (t = s->child; t; t = t->next) {
        if (!cJSON_IsString(t)) {
            BAD(err, "stop", "'stop' must be a string or a list of strings");
            return -1;
        }
        /* an empty stop string would stop before every token: skipped */
        if (*t->valuestring &&
            !(p->stop[p->n_stop++] = dup_n(t->valuestring, strlen(t->valuestring), err)))
            return -1;
    }
    return 0;
}

/* Fields we do not implement: accepted only at their neutral values, refused otherwise, so no
 * request silently gets something other than what it asked for. */
static int check_unsupported(const cJSON *root, api_kind kind, api_error *err)
{
    static const char *const penalties[] = {"presence_penalty", "frequency_penalty"};
    for (int i = 0; i < 2; i++) {
        double v = 0;
        if (get_number(root, penalties[i], -2.0, 2.0, false, &v, err) < 0)
            return -1;
        if (v != 0) {
            BAD(err, penalties[i], "'%s' is not supported (only 0)", penalties[i]);
            return -1;
        }
    }
    double rep = 1;
    if (get_number(root, "repetition_penalty", 0, 10, true, &rep, err) < 0)
        return -1;
    if (rep != 1) {
        BAD(err, "repetition_penalty", "'repetition_penalty' is not supported (only 1)");
        return -1;
    }
    const cJSON *v = field(root, "logit_bias");
    if (v && (!cJSON_IsObject(v) || cJSON_GetArraySize(v) > 0)) {
        BAD(err, "logit_bias", "'logit_bias' is not supported");
        return -1;
    }
    int64_t n = 1;
    if (get_int(root, "n", 1, 128, &n, err) < 0)
        return -1;
    if (n != 1) {
        BAD(err, "n", "only n=1 is supported: send %lld requests instead", (long long)n);
        return -1;
    }
    if (kind == API_COMPLETIONS) {
        int64_t best_of = 1;
        if (get_int(root, "best_of", 1, 128, &best_of, err) < 0)
            return -1;
        if (best_of != 1) {
            BAD(err, "best_of", "only best_of=1 is supported");
            return -1;
        }
        bool echo = false;
        if (get_bool(root, "echo", &echo, err) < 0)
            return -1;
        if (echo) {
            BAD(err, "echo", "'echo': true is not supported");
            return -1;
        }
        v = field(root, "suffix");
        if (v && (!cJSON_IsString(v) || *v->valuestring)) {
            BAD(err, "suffix", "'suffix' is not supported");
            return -1;
        }
    } else {
        v = field(root, "tools");
        if (v && (!cJSON_IsArray(v) || cJSON_GetArraySize(v) > 0)) {
            BAD(err, "tools", "tool calling is not supported");
            return -1;
        }
        v = field(root, "response_format");
        if (v) {
            const cJSON *t = cJSON_IsObject(v) ? field(v, "type") : NULL;
            if (!cJSON_IsString(t) || strcmp(t->valuestring, "text") != 0) {
                BAD(err, "response_format",
                    "only response_format {\"type\": \"text\"} is supported");
                return -1;
            }
        }
    }
    return 0;
}

static int parse_sampling(const cJSON *root, api_request *r, api_error *err)
{
    sampling_params *p = &r->params;
    double d;
    int64_t i;
    int rc;

    /* max_tokens: chat prefers max_completion_tokens (OpenAI's newer name) */
    const char *max_name = "max_tokens";
    if (r->kind == API_CHAT && field(root, "max_completion_tokens"))
        max_name = "max_completion_tokens";
    if ((rc = get_int(root, max_name, 1, 1e9, &i, err)) < 0)
        return -1;
    if (rc) {
        p->max_tokens = (int)i;
        r->max_tokens_given = true;
    }
    if ((rc = get_number(root, "temperature", 0, 2, false, &d, err)) < 0)
        return -1;
    if (rc)
        p->temperature = (float)d;
    if ((rc = get_number(root, "top_p", 0, 1, true, &d, err)) < 0)
        return -1;
    if (rc)
        p->top_p = (float)d;
    if ((rc = get_int(root, "top_k", -1, 1e9, &i, err)) < 0)
        return -1;
    if (rc)
        p->top_k = (int)i;
    /* any integer: negative seeds are folded into the non-negative range, still deterministic */
    if ((rc = get_int(root, "seed", -9007199254740992.0, 9007199254740992.0, &i, err)) < 0)
        return -1;
    if (rc)
        p->seed = i < 0 ? (int64_t)((uint64_t)i & (uint64_t)INT64_MAX) : i;
    if ((rc = get_int(root, "min_tokens", 0, 1e9, &i, err)) < 0)
        return -1;
    if (rc)
        p->min_tokens = (int)i;
    if (get_bool(root, "ignore_eos", &p->ignore_eos, err) < 0 ||
        get_bool(root, "skip_special_tokens", &p->skip_special_tokens, err) < 0 ||
        get_bool(root, "include_stop_str_in_output", &p->include_stop_str_in_output, err) < 0)
        return -1;
    if (parse_stop(root, p, err) < 0)
        return -1;

    if (r->kind == API_COMPLETIONS) {
        if ((rc = get_int(root, "logprobs", 0, ENGINE_MAX_LOGPROBS, &i, err)) < 0)
            return -1;
        if (rc)
            p->logprobs = (int)i;
    } else {
        if (get_bool(root, "logprobs", &r->chat_logprobs, err) < 0)
            return -1;
        if ((rc = get_int(root, "top_logprobs", 0, ENGINE_MAX_LOGPROBS, &i, err)) < 0)
            return -1;
        if (rc && !r->chat_logprobs) {
            BAD(err, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
            return -1;
        }
        if (r->chat_logprobs)
            p->logprobs = rc ? (int)i : 0;
    }

    if (get_bool(root, "stream", &r->stream, err) < 0)
        return -1;
    const cJSON *so = field(root, "stream_options");
    if (so) {
        if (!cJSON_IsObject(so)) {
            BAD(err, "stream_options", "'stream_options' must be an object");
            return -1;
        }
        if (!r->stream) {
            BAD(err, "stream_options", "'stream_options' needs 'stream': true");
            return -1;
        }
        if (get_bool(so, "include_usage", &r->include_usage, err) < 0)
            return -1;
    }
    if (r->max_tokens_given && p->min_tokens > p->max_tokens) {
        BAD(err, "min_tokens", "'min_tokens' (%d) must not exceed '%s' (%d)", p->min_tokens,
            max_name, p->max_tokens);
        return -1;
    }
    return 0;
}

int api_request_parse(api_kind kind, const char *body, size_t len, const api_limits *lim,
                      api_request *out, api_error *err)
{
    memset(out, 0, sizeof(*out));
    out->kind = kind;
    sampling_params_default(&out->params);
    /* OpenAI's defaults, whatever the engine's are */
    out->params.temperature = 1.0f;
    out->params.top_p = 1.0f;
    out->params.top_k = -1;
    out->params.seed = -1;
    out->params.max_tokens = 16;
    out->params.min_tokens = 0;
    out->params.ignore_eos = false;
    out->params.logprobs = -1;
    out->params.n_stop = 0;
    out->params.include_stop_str_in_output = false;
    out->params.skip_special_tokens = true;

    const char *end = NULL;
    cJSON *root = len ? cJSON_ParseWithLengthOpts(body, len, &end, false) : NULL;
    while (root && end < body + len &&
           (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r'))
        end++;
    if (!root || end != body + len) {
        BAD(err, NULL, "the request body is not valid JSON");
        goto fail;
    }
    if (!cJSON_IsObject(root)) {
        BAD(err, NULL, "the request body must be a JSON object");
        goto fail;
    }
    const cJSON *model = field(root, "model");
    if (model && !cJSON_IsString(model)) {
        BAD(err, "model", "'model' must be a string");
        goto fail;
    }
    if (model && strcmp(model->valuestring, lim->model_name) != 0) {
        api_error_set(err, 404, ERR_INVALID, "model", "model_not_found",
                      "The model '%.200s' does not exist; this server serves '%.200s'",
                      model->valuestring, lim->model_name);
        goto fail;
    }
    if (kind == API_COMPLETIONS ? parse_prompt(root, lim, out, err) < 0
                                : parse_messages(root, out, err) < 0)
        goto fail;
    if (check_unsupported(root, kind, err) < 0 || parse_sampling(root, out, err) < 0)
        goto fail;
    cJSON_Delete(root);
    return 0;
fail:
    cJSON_Delete(root);
    api_request_free(out);
    return -1;
}

int api_request_tokenize(api_request *r, const tokenizer *tok, const api_limits *lim,
                         api_error *err)
{
    loom_err le = {0};
    char *text = NULL;
    const char *param = r->kind == API_CHAT ? "messages" : "prompt";

    if (!r->prompt_ids) {
        bool add_special = true;
        const char *src = r->prompt_text;
        if (r->kind == API_CHAT) {
            int rc =
                tokenizer_apply_chat_template(tok, r->messages, r->n_messages, true, &text, &le);
            if (rc == LOOM_ENOTFOUND) {
                BAD(err, "messages", "this model has no chat template: use /v1/completions");
                return -1;
            }
            if (rc != 0) {
                BAD(err, "messages", "cannot apply the chat template: %s", le.msg);
                return -1;
            }
            src = text;
            add_special = false; /* the template writes its own special tokens */
        }
        int rc = tokenizer_encode(tok, src ? src : "", src ? strlen(src) : 0, add_special,
                                  &r->prompt_ids, &r->n_prompt, &le);
        free(text);
        if (rc != 0) {
            BAD(err, param, "cannot tokenize the prompt: %s", le.msg);
            return -1;
        }
    }
    if (r->n_prompt <= 0) {
        BAD(err, param, "the prompt is empty");
        return -1;
    }
    if (r->kind == API_CHAT && !r->max_tokens_given)
        r->params.max_tokens = lim->max_model_len - r->n_prompt;
    if (r->params.max_tokens < 1 ||
        (int64_t)r->n_prompt + r->params.max_tokens > (int64_t)lim->max_model_len) {
        int64_t asked = (int64_t)r->n_prompt + (r->max_tokens_given ? r->params.max_tokens : 1);
        api_error_set(err, 400, ERR_INVALID, param, "context_length_exceeded",
                      "This model's maximum context length is %d tokens. However, you requested "
                      "%lld tokens (%d in the %s, %d in the completion). Please reduce the "
                      "length of the %s or completion.",
                      lim->max_model_len, (long long)asked, r->n_prompt, param,
                      r->max_tokens_given ? r->params.max_tokens : 1, param);
        return -1;
    }
    if (r->params.min_tokens > r->params.max_tokens) {
        BAD(err, "min_tokens", "'min_tokens' (%d) must not exceed max_tokens (%d)",
            r->params.min_tokens, r->params.max_tokens);
        return -1;
    }
    return 0;
}

void api_request_free(api_request *r)
{
    if (!r)
        return;
    free(r->prompt_text);
    free(r->prompt_ids);
    for (int i = 0; i < r->n_messages; i++) {
        free((char *)r->messages[i].role);
        free((char *)r->messages[i].content);
    }
    free(r->messages);
    for (int i = 0; i < r->params.n_stop; i++)
        free(r->params.stop[i]);
    r->params.n_stop = 0;
    r->prompt_text = NULL;
    r->prompt_ids = NULL;
    r->messages = NULL;
    r->n_messages = 0;
    r->n_prompt = 0;
}

/* ---------------------------------------------------------------- responses */

void api_response_init(api_response *r, const api_request *req, uint64_t id_seq, const char *model,
                       const tokenizer *tok)
{
    memset(r, 0, sizeof(*r));
    r->kind = req->kind;
    /* 32 hex digits: unique in the process (id_seq), unlikely to repeat across restarts */
    static const uint64_t salt = 0x9e3779b97f4a7c15ull;
    double now = loom_wall();
    uint64_t a = loom_hash64(&id_seq, sizeof(id_seq), salt);
    uint64_t b = loom_hash64(&now, sizeof(now), a);
    snprintf(r->id, sizeof(r->id), "%s%016llx%016llx",
             req->kind == API_CHAT ? "chatcmpl-" : "cmpl-", (unsigned long long)a,
             (unsigned long long)b);
    r->created = (int64_t)now;
    r->model = xstrdup(model);
    r->tok = tok;
    r->logprobs = req->params.logprobs;
    r->chat_logprobs = req->chat_logprobs;
    r->include_usage = req->include_usage;
    r->prompt_tokens = req->n_prompt;
    buf_init(&r->text);
}

void api_response_free(api_response *r)
{
    free(r->model);
    buf_free(&r->text);
    free(r->tokens);
    r->model = NULL;
    r->tokens = NULL;
}

/* The token record of an event, with text_offset = characters emitted before it. */
static void token_from_event(api_token *t, const engine_event *ev, size_t text_offset)
{
    t->id = ev->token;
    t->logprob = ev->logprob;
    t->n_top = ev->n_top < 0                     ? 0
               : ev->n_top > ENGINE_MAX_LOGPROBS ? ENGINE_MAX_LOGPROBS
                                                 : ev->n_top;
    memcpy(t->top, ev->top, (size_t)t->n_top * sizeof(t->top[0]));
    t->text_offset = text_offset;
}

static void note_counts(api_response *r, const engine_event *ev)
{
    if (ev->prompt_tokens > 0)
        r->prompt_tokens = ev->prompt_tokens;
    if (ev->completion_tokens > r->completion_tokens)
        r->completion_tokens = ev->completion_tokens;
    if (ev->cached_tokens > r->cached_tokens)
        r->cached_tokens = ev->cached_tokens;
    if (ev->finish != FINISH_NONE)
        r->finish = ev->finish;
}

void api_response_add(api_response *r, const engine_event *ev, const char *text, size_t text_len)
{
    if (ev->token >= 0 && r->logprobs >= 0) {
        if (r->n_tokens == r->cap_tokens) {
            r->cap_tokens = r->cap_tokens ? 2 * r->cap_tokens : 16;
            r->tokens = xrealloc(r->tokens, (size_t)r->cap_tokens * sizeof(*r->tokens));
        }
        token_from_event(&r->tokens[r->n_tokens++], ev, r->text_chars);
    }
    buf_append(&r->text, text, text_len);
    r->text_chars += utf8_chars(text, text_len);
    note_counts(r, ev);
}

static void json_token_str(loom_buf *out, const tokenizer *tok, int32_t id)
{
    char s[512];
    size_t n = api_token_text(tok, id, s, sizeof(s));
    api_json_string(out, s, n);
}

/* "bytes": the raw UTF-8 bytes of a token as integers (chat logprobs). */
static void json_token_bytes(loom_buf *out, const tokenizer *tok, int32_t id)
{
    size_t len = 0;
    const char *bytes = tok ? tokenizer_id_to_bytes(tok, id, &len) : NULL;
    buf_puts(out, "[");
    for (size_t i = 0; bytes && i < len; i++)
        buf_printf(out, "%s%u", i ? "," : "", (unsigned char)bytes[i]);
    buf_puts(out, "]");
}

/* Completions logprobs: {"text_offset":[],"token_logprobs":[],"tokens":[],"top_logprobs":[]} */
static void json_completion_logprobs(loom_buf *out, const tokenizer *tok, const api_token *t, int n)
{
    buf_puts(out, "{\"text_offset\":[");
    for (int i = 0; i < n; i++)
        buf_printf(out, "%s%zu", i ? "," : "", t[i].text_offset);
    buf_puts(out, "],\"token_logprobs\":[");
    for (int i = 0; i < n; i++) {
        if (i)
            buf_puts(out, ",");
        json_logprob(out, t[i].logprob);
    }
    buf_puts(out, "],\"tokens\":[");
    for (int i = 0; i < n; i++) {
        if (i)
            buf_puts(out, ",");
        json_token_str(out, tok, t[i].id);
    }
    buf_puts(out, "],\"top_logprobs\":[");
    for (int i = 0; i < n; i++) {
        buf_puts(out, i ? ",{" : "{");
        /* a dict keyed by token text: two ids with the same text keep the first (higher) */
        char seen[ENGINE_MAX_LOGPROBS][128];
        int n_seen = 0;
        for (int k = 0; k < t[i].n_top; k++) {
            char s[128];
            api_token_text(tok, t[i].top[k].token, s, sizeof(s));
            bool dup = false;
            for (int j = 0; j < n_seen && !dup; j++)
                dup = !strcmp(seen[j], s);
            if (dup)
                continue;
            memcpy(seen[n_seen++], s, sizeof(s));
            if (n_seen > 1)
                buf_puts(out, ",");
            json_str0(out, s);
            buf_puts(out, ":");
            json_logprob(out, t[i].top[k].logprob);
        }
        buf_puts(out, "}");
    }
    buf_puts(out, "]}");
}

/* Chat logprobs: {"content":[{"token","logprob","bytes","top_logprobs":[...]}]} */
static void json_chat_logprobs(loom_buf *out, const tokenizer *tok, const api_token *t, int n)
{
    buf_puts(out, "{\"content\":[");
    for (int i = 0; i < n; i++) {
        buf_puts(out, i ? ",{\"token\":" : "{\"token\":");
        json_token_str(out, tok, t[i].id);
        buf_puts(out, ",\"logprob\":");
        json_logprob(out, t[i].logprob);
        buf_puts(out, ",\"bytes\":");
        json_token_bytes(out, tok, t[i].id);
        buf_puts(out, ",\"top_logprobs\":[");
        for (int k = 0; k < t[i].n_top; k++) {
            buf_puts(out, k ? ",{\"token\":" : "{\"token\":");
            json_token_str(out, tok, t[i].top[k].token);
            buf_puts(out, ",\"logprob\":");
            json_logprob(out, t[i].top[k].logprob);
            buf_puts(out, ",\"bytes\":");
            json_token_bytes(out, tok, t[i].top[k].token);
            buf_puts(out, "}");
        }
        buf_puts(out, "]}");
    }
    buf_puts(out, "]}");
}

static void json_logprobs(loom_buf *out, const api_response *r, const api_token *t, int n)
{
    if (r->logprobs < 0)
        buf_puts(out, "null");
    else if (r->kind == API_CHAT)
        json_chat_logprobs(out, r->tok, t, n);
    else
        json_completion_logprobs(out, r->tok, t, n);
}

static void json_finish(loom_buf *out, finish_reason f)
{
    if (f == FINISH_NONE)
        buf_puts(out, "null");
    else
        json_str0(out, finish_reason_str(f));
}

static void json_usage(loom_buf *out, const api_response *r)
{
    buf_printf(out, "{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}",
               r->prompt_tokens, r->completion_tokens, r->prompt_tokens + r->completion_tokens);
}

/* {"id":..,"object":..,"created":..,"model":.., */
static void json_head(loom_buf *out, const api_response *r, const char *object)
{
    buf_puts(out, "{\"id\":");
    json_str0(out, r->id);
    buf_puts(out, ",\"object\":");
    json_str0(out, object);
    buf_printf(out, ",\"created\":%lld,\"model\":", (long long)r->created);
    json_str0(out, r->model);
}

char *api_response_json(const api_response *r)
{
    loom_buf b;
    buf_init(&b);
    if (r->kind == API_CHAT) {
        json_head(&b, r, "chat.completion");
        buf_puts(&b, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                     "\"content\":");
        api_json_string(&b, r->text.data ? r->text.data : "", r->text.len);
        buf_puts(&b, "},\"logprobs\":");
    } else {
        json_head(&b, r, "text_completion");
        buf_puts(&b, ",\"choices\":[{\"index\":0,\"text\":");
        api_json_string(&b, r->text.data ? r->text.data : "", r->text.len);
        buf_puts(&b, ",\"logprobs\":");
    }
    json_logprobs(&b, r, r->tokens, r->n_tokens);
    buf_puts(&b, ",\"finish_reason\":");
    json_finish(&b, r->finish);
    buf_puts(&b, "}],\"usage\":");
    json_usage(&b, r);
    buf_puts(&b, "}");
    return buf_detach(&b);
}

/* Appends the JSON of b as one SSE frame, then resets b. */
static void frame_from(loom_buf *out, loom_buf *b)
{
    api_sse_frame(out, b->data, b->len);
    b->len = 0;
}

void api_stream_begin(api_response *r, loom_buf *out)
{
    if (r->kind != API_CHAT)
        return;
    loom_buf b;
    buf_init(&b);
    json_head(&b, r, "chat.completion.chunk");
    buf_puts(&b, ",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
                 "\"logprobs\":null,\"finish_reason\":null}]}");
    frame_from(out, &b);
    buf_free(&b);
}

void api_stream_event(api_response *r, const engine_event *ev, const char *text, size_t text_len,
                      loom_buf *out)
{
    bool has_token = ev->token >= 0 && r->logprobs >= 0;
    note_counts(r, ev);
    /* nothing to say: a token whose characters are not complete yet */
    if (text_len == 0 && !has_token && ev->finish == FINISH_NONE)
        return;
    api_token t = {0};
    if (has_token)
        token_from_event(&t, ev, r->text_chars);
    r->text_chars += utf8_chars(text, text_len);

    loom_buf b;
    buf_init(&b);
    if (r->kind == API_CHAT) {
        json_head(&b, r, "chat.completion.chunk");
        buf_puts(&b, ",\"choices\":[{\"index\":0,\"delta\":{");
        if (text_len > 0 || ev->finish == FINISH_NONE) {
            buf_puts(&b, "\"content\":");
            api_json_string(&b, text, text_len);
        }
        buf_puts(&b, "},\"logprobs\":");
    } else {
        json_head(&b, r, "text_completion");
        buf_puts(&b, ",\"choices\":[{\"index\":0,\"text\":");
        api_json_string(&b, text, text_len);
        buf_puts(&b, ",\"logprobs\":");
    }
    json_logprobs(&b, r, &t, has_token ? 1 : 0);
    buf_puts(&b, ",\"finish_reason\":");
    json_finish(&b, ev->finish);
    buf_puts(&b, "}]}");
    frame_from(out, &b);
    buf_free(&b);
}

void api_stream_end(api_response *r, loom_buf *out)
{
    if (r->include_usage) {
        loom_buf b;
        buf_init(&b);
        json_head(&b, r, r->kind == API_CHAT ? "chat.completion.chunk" : "text_completion");
        buf_puts(&b, ",\"choices\":[],\"usage\":");
        json_usage(&b, r);
        buf_puts(&b, "}");
        frame_from(out, &b);
        buf_free(&b);
    }
    buf_puts(out, "data: [DONE]\n\n");
}

void api_stream_error(const api_error *err, loom_buf *out)
{
    char *json = api_error_json(err);
    api_sse_frame(out, json, strlen(json));
    free(json);
    buf_puts(out, "data: [DONE]\n\n");
}

/* ---------------------------------------------------------------- /tokenize, /detokenize */

/*
 * vLLM's POST /tokenize: {"prompt": "..."} (add_special_tokens, default true) or
 * {"messages": [...]} (chat template with the generation prompt; add_special_tokens default
 * false) -> {"count": N, "max_model_len": M, "tokens": [...]}. Benchmarks use it to build prompts
 * of exact token counts for this server's tokenizer.
 */
int api_tokenize(const char *body, size_t len, const api_limits *lim, const tokenizer *tok,
                 loom_buf *out, api_error *err)
{
    bool chat = false;
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!root || !cJSON_IsObject(root)) {
        BAD(err, NULL, "the request body must be a JSON object");
        cJSON_Delete(root);
        return -1;
    }
    chat = field(root, "messages") != NULL;
    const cJSON *special = field(root, "add_special_tokens");
    if (special && !cJSON_IsBool(special)) {
        BAD(err, "add_special_tokens", "'add_special_tokens' must be a boolean");
        cJSON_Delete(root);
        return -1;
    }
    bool add_special = special ? cJSON_IsTrue(special) : !chat;
    cJSON_Delete(root);

    /* The generation parser validates model, prompt and messages the same way as generation. */
    api_request r;
    if (api_request_parse(chat ? API_CHAT : API_COMPLETIONS, body, len, lim, &r, err) != 0)
        return -1;
    int rc = 0;
    if (!r.prompt_ids) {
        loom_err le = {0};
        char *text = NULL;
        const char *src = r.prompt_text ? r.prompt_text : "";
        if (chat) {
            if (tokenizer_apply_chat_template(tok, r.messages, r.n_messages, true, &text, &le)) {
                BAD(err, "messages", "cannot apply the chat template: %s", le.msg);
                api_request_free(&r);
                return -1;
            }
            src = text;
        }
        rc = tokenizer_encode(tok, src, strlen(src), add_special, &r.prompt_ids, &r.n_prompt, &le);
        free(text);
        if (rc) {
            BAD(err, chat ? "messages" : "prompt", "cannot tokenize the prompt: %s", le.msg);
            api_request_free(&r);
            return -1;
        }
    }
    buf_printf(out, "{\"count\":%d,\"max_model_len\":%d,\"tokens\":[", r.n_prompt,
               lim->max_model_len);
    for (int i = 0; i < r.n_prompt; i++)
        buf_printf(out, i ? ",%d" : "%d", r.prompt_ids[i]);
    buf_puts(out, "]}");
    api_request_free(&r);
    return 0;
}

/* vLLM's POST /detokenize: {"tokens": [ids]} -> {"prompt": "text"}. */
int api_detokenize(const char *body, size_t len, const api_limits *lim, const tokenizer *tok,
                   loom_buf *out, api_error *err)
{
    int rc = -1;
    int32_t *ids = NULL;
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!root || !cJSON_IsObject(root)) {
        BAD(err, NULL, "the request body must be a JSON object");
        goto done;
    }
    const cJSON *model = field(root, "model");
    if (model && (!cJSON_IsString(model) || strcmp(model->valuestring, lim->model_name) != 0)) {
        api_error_set(err, 404, ERR_INVALID, "model", "model_not_found",
                      "The model does not exist; this server serves '%.200s'", lim->model_name);
        goto done;
    }
    const cJSON *tokens = field(root, "tokens");
    if (!cJSON_IsArray(tokens)) {
        BAD(err, "tokens", "'tokens' must be an array of token ids");
        goto done;
    }
    int n = cJSON_GetArraySize(tokens), i = 0;
    ids = xmalloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    const cJSON *t;
    cJSON_ArrayForEach(t, tokens)
    {
        if (!cJSON_IsNumber(t) || t->valuedouble != (double)(int64_t)t->valuedouble ||
            t->valuedouble < 0 || t->valuedouble >= lim->vocab_size) {
            BAD(err, "tokens", "'tokens' must hold token ids in [0, %d)", lim->vocab_size);
            goto done;
        }
        ids[i++] = (int32_t)t->valuedouble;
    }
    char *text = tokenizer_decode(tok, ids, n, false);
    buf_puts(out, "{\"prompt\":");
    api_json_string(out, text, strlen(text));
    buf_puts(out, "}");
    free(text);
    rc = 0;
done:
    free(ids);
    cJSON_Delete(root);
    return rc;
}
