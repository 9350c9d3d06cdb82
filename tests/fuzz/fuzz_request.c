/* Fuzz target: arbitrary bytes as an HTTP request body through api_request_parse (both
 * endpoints) and api_request_tokenize (byte-level tokenizer, ChatML template). An accepted
 * request must satisfy what the engine relies on; a refused one must carry a 4xx/5xx error that
 * renders as JSON. The input bytes are also streamed back as completion text, and every body and
 * SSE frame produced must parse as JSON. */
#define _GNU_SOURCE /* memmem */
#include "loom/server.h"

#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

static const api_limits LIM = {.model_name = "fuzz", .max_model_len = 256, .vocab_size = 512};

static void must_parse(const char *json, size_t len)
{
    cJSON *j = cJSON_ParseWithLength(json, len);
    if (!j)
        abort();
    cJSON_Delete(j);
}

/* Each "data: ...\n\n" frame of an SSE buffer must be JSON or [DONE]. */
static void check_frames(const loom_buf *b)
{
    const char *p = b->data, *end = b->data + b->len;
    while (p < end) {
        if (end - p < 8 || memcmp(p, "data: ", 6) != 0)
            abort();
        p += 6;
        const char *q = memmem(p, (size_t)(end - p), "\n\n", 2);
        if (!q)
            abort();
        if (!(q - p == 6 && !memcmp(p, "[DONE]", 6)))
            must_parse(p, (size_t)(q - p));
        p = q + 2;
    }
}

static void exercise_response(const api_request *req, const tokenizer *tok, const uint8_t *data,
                              size_t size)
{
    api_response full, streamed;
    api_response_init(&full, req, 1, LIM.model_name, tok);
    api_response_init(&streamed, req, 2, LIM.model_name, tok);
    loom_buf sse;
    buf_init(&sse);
    api_stream_begin(&streamed, &sse);
    /* the input itself as generated text, cut into pieces, one token each */
    size_t piece = size / 4 + 1;
    int n = 0;
    for (size_t off = 0; off < size || n == 0; off += piece) {
        size_t len = off < size ? (size - off < piece ? size - off : piece) : 0;
        engine_event ev;
        memset(&ev, 0, sizeof(ev));
        ev.token = (int32_t)(off % (size_t)LIM.vocab_size);
        ev.logprob = -(float)off;
        ev.n_top = (int)(off % 3);
        for (int k = 0; k < ev.n_top; k++) {
            ev.top[k].token = (int32_t)((off + (size_t)k) % (size_t)LIM.vocab_size);
            ev.top[k].logprob = -1.0f * (float)k;
        }
        ev.prompt_tokens = req->n_prompt;
        ev.completion_tokens = ++n;
        ev.finish = off + piece >= size ? FINISH_LENGTH : FINISH_NONE;
        const char *text = (const char *)data + (off < size ? off : 0);
        api_response_add(&full, &ev, text, len);
        api_stream_event(&streamed, &ev, text, len, &sse);
        if (ev.finish != FINISH_NONE)
            break;
    }
    api_stream_end(&streamed, &sse);
    check_frames(&sse);
    char *body = api_response_json(&full);
    must_parse(body, strlen(body));
    free(body);
    buf_free(&sse);
    api_response_free(&full);
    api_response_free(&streamed);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static tokenizer *tok;
    if (!tok)
        tok = tokenizer_create_bytes(LIM.vocab_size);
    for (int k = 0; k < 2; k++) {
        api_kind kind = k ? API_CHAT : API_COMPLETIONS;
        api_request r;
        api_error err;
        memset(&err, 0, sizeof(err));
        if (api_request_parse(kind, (const char *)data, size, &LIM, &r, &err) != 0 ||
            api_request_tokenize(&r, tok, &LIM, &err) != 0) {
            if (err.status < 400 || err.status > 599 || !err.message[0])
                abort();
            char *json = api_error_json(&err);
            must_parse(json, strlen(json));
            free(json);
            api_request_free(&r);
            continue;
        }
        const sampling_params *p = &r.params;
        if (r.n_prompt < 1 || !r.prompt_ids || p->max_tokens < 1 ||
            r.n_prompt + p->max_tokens > LIM.max_model_len || p->min_tokens > p->max_tokens ||
            p->n_stop < 0 || p->n_stop > ENGINE_MAX_STOP || p->logprobs > ENGINE_MAX_LOGPROBS ||
            !(p->temperature >= 0 && p->temperature <= 2) || !(p->top_p > 0 && p->top_p <= 1) ||
            (r.include_usage && !r.stream))
            abort();
        for (int i = 0; i < r.n_prompt; i++)
            if (r.prompt_ids[i] < 0 || r.prompt_ids[i] >= LIM.vocab_size)
                abort();
        for (int i = 0; i < p->n_stop; i++)
            if (!p->stop[i] || !p->stop[i][0])
                abort();
        exercise_response(&r, tok, data, size);
        api_request_free(&r);
    }
    return 0;
}
