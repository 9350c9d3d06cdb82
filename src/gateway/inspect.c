/*
 * The pure parts of the gateway that read untrusted bytes: request bodies (the few fields that
 * routing needs), upstream URLs, and usage objects. The body itself is forwarded unchanged; the
 * upstream validates it and answers with its own error, so this reads leniently and refuses only
 * what is not a JSON object at all.
 */
#define _GNU_SOURCE /* memmem */
#include "loom/gateway.h"

#include <cJSON.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---------------------------------------------------------------- upstream URLs */

int gateway_upstream_parse(const char *arg, gateway_upstream_spec *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    out->weight = 1;
    if (!arg || !*arg)
        return loom_errf(e, LOOM_EINVAL, "empty upstream");
    char buf[512];
    if (strlen(arg) >= sizeof(buf))
        return loom_errf(e, LOOM_EINVAL, "upstream too long: %.60s...", arg);
    strcpy(buf, arg);

    /* trailing =WEIGHT */
    char *eq = strrchr(buf, '=');
    if (eq) {
        char *end = NULL;
        errno = 0;
        double w = strtod(eq + 1, &end);
        if (eq[1] == 0 || errno || *end || !(w > 0) || !isfinite(w))
            return loom_errf(e, LOOM_EINVAL,
                             "upstream '%s': the weight after '=' must be a positive number", arg);
        out->weight = w;
        *eq = 0;
    }
    char *p = buf;
    if (!strncasecmp(p, "https://", 8))
        return loom_errf(e, LOOM_EINVAL,
                         "upstream '%s': https is not supported (put the gateway and its "
                         "instances on one private network, or terminate TLS in front)",
                         arg);
    if (!strncasecmp(p, "http://", 7))
        p += 7;
    if (strstr(p, "://"))
        return loom_errf(e, LOOM_EINVAL, "upstream '%s': only http:// URLs", arg);
    if (strchr(p, '?') || strchr(p, '#') || strchr(p, '='))
        return loom_errf(e, LOOM_EINVAL, "upstream '%s': no query, fragment or second '=' allowed",
                         arg);

    /* host: [v6] or up to ':' or '/' */
    char *host_end;
    if (*p == '[') {
        host_end = strchr(p, ']');
        if (!host_end)
            return loom_errf(e, LOOM_EINVAL, "upstream '%s': unterminated [ipv6]", arg);
        size_t hl = (size_t)(host_end - p - 1);
        if (hl == 0 || hl >= sizeof(out->host))
            return loom_errf(e, LOOM_EINVAL, "upstream '%s': bad host", arg);
        memcpy(out->host, p + 1, hl);
        out->host[hl] = 0;
        host_end++;
    } else {
        host_end = p + strcspn(p, ":/");
        size_t hl = (size_t)(host_end - p);
        if (hl == 0 || hl >= sizeof(out->host))
            return loom_errf(e, LOOM_EINVAL, "upstream '%s': no host (want http://HOST:PORT)", arg);
        memcpy(out->host, p, hl);
        out->host[hl] = 0;
    }
    for (const char *c = out->host; *c; c++)
        if (!(isalnum((unsigned char)*c) || *c == '.' || *c == '-' || *c == '_' || *c == ':'))
            return loom_errf(e, LOOM_EINVAL, "upstream '%s': bad character in host", arg);
    p = host_end;
    out->port = 80;
    if (*p == ':') {
        char *end = NULL;
        errno = 0;
        long port = strtol(p + 1, &end, 10);
        if (end == p + 1 || errno || port < 1 || port > 65535 || (*end && *end != '/'))
            return loom_errf(e, LOOM_EINVAL, "upstream '%s': bad port", arg);
        out->port = (int)port;
        p = end;
    }
    if (*p && *p != '/')
        return loom_errf(e, LOOM_EINVAL, "upstream '%s': unexpected '%c'", arg, *p);
    size_t pl = strlen(p);
    while (pl > 0 && p[pl - 1] == '/')
        pl--;
    if (pl >= sizeof(out->base_path))
        return loom_errf(e, LOOM_EINVAL, "upstream '%s': path prefix too long", arg);
    memcpy(out->base_path, p, pl);
    out->base_path[pl] = 0;
    int n = snprintf(out->url, sizeof(out->url), "http://%s%s%s:%d%s",
                     strchr(out->host, ':') ? "[" : "", out->host,
                     strchr(out->host, ':') ? "]" : "", out->port, out->base_path);
    if (n < 0 || (size_t)n >= sizeof(out->url))
        return loom_errf(e, LOOM_EINVAL, "upstream '%s': too long", arg);
    return LOOM_OK;
}

/* ---------------------------------------------------------------- request bodies */

/*
 * The leading blocks of the prompt's canonical bytes, hashed as they are appended (no copy of the
 * prompt): the same chain as policy_prefix_hashes over those bytes. Inactive when routing does
 * not use prefixes.
 */
typedef struct prefix_hasher {
    bool on;
    uint64_t h;
    unsigned char block[GATEWAY_PREFIX_BLOCK_BYTES];
    size_t fill;
    uint64_t *out;
    int n;
} prefix_hasher;

static void prefix_add(prefix_hasher *ph, const void *p, size_t n)
{
    const unsigned char *b = p;
    while (ph->on && n > 0 && ph->n < POLICY_MAX_PREFIX_BLOCKS) {
        size_t take = GATEWAY_PREFIX_BLOCK_BYTES - ph->fill;
        if (take > n)
            take = n;
        memcpy(ph->block + ph->fill, b, take);
        ph->fill += take;
        b += take;
        n -= take;
        if (ph->fill == GATEWAY_PREFIX_BLOCK_BYTES) {
            policy_prefix_hashes(ph->block, GATEWAY_PREFIX_BLOCK_BYTES, GATEWAY_PREFIX_BLOCK_BYTES,
                                 ph->h, &ph->h, 1);
            ph->out[ph->n++] = ph->h;
            ph->fill = 0;
        }
    }
}

/* Text of a chat message content: a string, or an array of parts with "text". */
static void content_text(const cJSON *content, prefix_hasher *pb, double *chars)
{
    if (cJSON_IsString(content)) {
        size_t n = strlen(content->valuestring);
        prefix_add(pb, content->valuestring, n);
        *chars += (double)n;
        return;
    }
    if (!cJSON_IsArray(content))
        return;
    const cJSON *part;
    cJSON_ArrayForEach(part, content)
    {
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (cJSON_IsString(text)) {
            size_t n = strlen(text->valuestring);
            prefix_add(pb, text->valuestring, n);
            *chars += (double)n;
        }
    }
}

static int64_t int_field(const cJSON *obj, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= 1) || v->valuedouble > 1e12)
        return 0;
    return (int64_t)v->valuedouble;
}

int gateway_request_inspect(gateway_endpoint ep, const char *body, size_t len, bool hash_prefix,
                            gateway_request_info *out, char *err, size_t err_cap)
{
    memset(out, 0, sizeof(*out));
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(body, len, &end, false);
    if (root && end) { /* only whitespace may follow the object */
        for (const char *p = end; p < body + len; p++) {
            if (*p != ' ' && *p != '\t' && *p != '\r' && *p != '\n') {
                cJSON_Delete(root);
                snprintf(err, err_cap, "the request body has bytes after its JSON value");
                return -1;
            }
        }
    }
    if (!root || !cJSON_IsObject(root)) {
        snprintf(err, err_cap, "%s",
                 root ? "the request body must be a JSON object"
                      : "the request body is not valid JSON");
        cJSON_Delete(root);
        return -1;
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (cJSON_IsString(model))
        snprintf(out->model, sizeof(out->model), "%s", model->valuestring);
    out->stream = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "stream"));
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    out->include_usage =
        cJSON_IsObject(so) && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage"));
    out->max_tokens = int_field(root, "max_completion_tokens");
    if (!out->max_tokens)
        out->max_tokens = int_field(root, "max_tokens");

    prefix_hasher hasher = {.on = hash_prefix, .out = out->prefix};
    hasher.h = loom_hash64(out->model, strlen(out->model), 0x707265666978ULL);
    prefix_hasher *pb = &hasher;
    if (ep == GATEWAY_CHAT) {
        const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
        const cJSON *m;
        if (cJSON_IsArray(msgs)) {
            cJSON_ArrayForEach(m, msgs)
            {
                const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
                if (cJSON_IsString(role))
                    prefix_add(pb, role->valuestring, strlen(role->valuestring));
                prefix_add(pb, "\x1f", 1);
                content_text(cJSON_GetObjectItemCaseSensitive(m, "content"), pb,
                             &out->prompt_chars);
                prefix_add(pb, "\x1e", 1);
                out->prompt_chars += 8; /* the template's role markers, about two tokens */
            }
        }
    } else {
        const cJSON *prompt = cJSON_GetObjectItemCaseSensitive(root, "prompt");
        /* batched prompts: the first one routes, all of them count */
        const cJSON *first = cJSON_IsArray(prompt) ? cJSON_GetArrayItem(prompt, 0) : prompt;
        if (cJSON_IsString(prompt)) {
            size_t n = strlen(prompt->valuestring);
            prefix_add(pb, prompt->valuestring, n);
            out->prompt_chars = (double)n;
        } else if (cJSON_IsArray(prompt) && cJSON_IsString(first)) {
            const cJSON *s;
            cJSON_ArrayForEach(s, prompt) if (cJSON_IsString(s)) out->prompt_chars +=
                (double)strlen(s->valuestring);
            prefix_add(pb, first->valuestring, strlen(first->valuestring));
        } else if (cJSON_IsArray(prompt)) {
            /* token ids, or a batch of id arrays */
            const cJSON *ids = cJSON_IsArray(first) ? first : prompt;
            const cJSON *v;
            cJSON_ArrayForEach(v, ids)
            {
                if (!cJSON_IsNumber(v))
                    continue;
                double d = v->valuedouble;
                uint32_t id = d >= 0 && d < 4294967296.0 ? (uint32_t)d : 0xffffffffu;
                unsigned char le[4] = {(unsigned char)id, (unsigned char)(id >> 8),
                                       (unsigned char)(id >> 16), (unsigned char)(id >> 24)};
                prefix_add(pb, le, 4);
            }
            if (cJSON_IsArray(first)) {
                cJSON_ArrayForEach(ids, prompt) if (cJSON_IsArray(ids)) out->prompt_ids +=
                    cJSON_GetArraySize(ids);
            } else {
                out->prompt_ids = cJSON_GetArraySize(prompt);
            }
            out->prefix_is_ids = true;
        }
    }
    out->n_prefix = hasher.n;
    cJSON_Delete(root);
    return 0;
}

/* ---------------------------------------------------------------- usage */

static void usage_from(const cJSON *root, double *prompt_tokens, double *completion_tokens)
{
    const cJSON *usage = cJSON_GetObjectItemCaseSensitive(root, "usage");
    if (!cJSON_IsObject(usage))
        return;
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(usage, "prompt_tokens");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(usage, "completion_tokens");
    if (cJSON_IsNumber(p) && p->valuedouble >= 0 && p->valuedouble < 1e12)
        *prompt_tokens = p->valuedouble;
    if (cJSON_IsNumber(c) && c->valuedouble >= 0 && c->valuedouble < 1e12)
        *completion_tokens = c->valuedouble;
}

/* The last "usage": object of a body, parsed alone (it comes last in OpenAI responses; a
 * generated text cannot contain the pattern unescaped). */
void gateway_usage_parse(const char *body, size_t len, double *prompt_tokens,
                         double *completion_tokens)
{
    *prompt_tokens = -1;
    *completion_tokens = -1;
    static const char key[] = "\"usage\":";
    const size_t kl = sizeof(key) - 1;
    const char *hit = NULL;
    for (const char *p = body; p && (size_t)(body + len - p) >= kl;) {
        const char *q = memmem(p, (size_t)(body + len - p), key, kl);
        if (!q)
            break;
        hit = q;
        p = q + kl;
    }
    if (!hit)
        return;
    const char *v = hit + kl;
    while (v < body + len && (*v == ' ' || *v == '\t' || *v == '\r' || *v == '\n'))
        v++;
    if (v >= body + len || *v != '{')
        return;
    cJSON *usage = cJSON_ParseWithLengthOpts(v, (size_t)(body + len - v), NULL, false);
    if (cJSON_IsObject(usage)) {
        cJSON *wrap = cJSON_CreateObject();
        cJSON_AddItemToObject(wrap, "usage", usage);
        usage_from(wrap, prompt_tokens, completion_tokens);
        cJSON_Delete(wrap);
    } else {
        cJSON_Delete(usage);
    }
}

/* ---------------------------------------------------------------- SSE */

#define SSE_MAX_LINE (64 * 1024)

void gateway_sse_init(gateway_sse *s)
{
    memset(s, 0, sizeof(*s));
    s->prompt_tokens = -1;
    s->completion_tokens = -1;
}

void gateway_sse_free(gateway_sse *s)
{
    free(s->line);
    s->line = NULL;
    s->len = s->cap = 0;
}

/* "key":"x where x is not the closing quote: a frame that carries text */
static bool has_nonempty_string(const char *p, size_t n, const char *key)
{
    size_t kl = strlen(key);
    for (const char *q = p; q + kl < p + n;) {
        const char *hit = memmem(q, (size_t)(p + n - q), key, kl);
        if (!hit || hit + kl >= p + n)
            return false;
        if (hit[kl] != '"')
            return true;
        q = hit + kl;
    }
    return false;
}

static void sse_line(gateway_sse *s, const char *line, size_t n)
{
    if (n > 0 && line[n - 1] == '\r')
        n--;
    if (n < 5 || memcmp(line, "data:", 5) != 0)
        return; /* comments, event:, id:, blank separators */
    const char *p = line + 5;
    n -= 5;
    if (n > 0 && *p == ' ') {
        p++;
        n--;
    }
    if (n == 6 && !memcmp(p, "[DONE]", 6)) {
        s->done = true;
        return;
    }
    s->frames++;
    if (n >= 8 && !memcmp(p, "{\"error\"", 8))
        s->error = true;
    if (has_nonempty_string(p, n, "\"text\":\"") || has_nonempty_string(p, n, "\"content\":\""))
        s->content_frames++;
    if (memmem(p, n, "\"usage\":{", 9) || memmem(p, n, "\"usage\": {", 10)) {
        cJSON *root = cJSON_ParseWithLength(p, n);
        if (root)
            usage_from(root, &s->prompt_tokens, &s->completion_tokens);
        cJSON_Delete(root);
    }
}

void gateway_sse_feed(gateway_sse *s, const char *data, size_t len)
{
    while (len > 0) {
        const char *nl = memchr(data, '\n', len);
        size_t take = nl ? (size_t)(nl - data) : len;
        if (s->skipping) {
            if (nl)
                s->skipping = false;
        } else if (s->len + take > SSE_MAX_LINE) {
            s->len = 0; /* too long to be a frame we care about: skip to its end */
            s->skipping = !nl;
        } else if (nl && s->len == 0) {
            sse_line(s, data, take); /* the common case: a whole line inside one chunk */
        } else {
            if (s->len + take > s->cap) {
                size_t cap = s->cap ? s->cap : 256;
                while (cap < s->len + take)
                    cap *= 2;
                s->line = xrealloc(s->line, cap);
                s->cap = cap;
            }
            memcpy(s->line + s->len, data, take);
            s->len += take;
            if (nl) {
                sse_line(s, s->line, s->len);
                s->len = 0;
            }
        }
        if (!nl)
            break;
        data = nl + 1;
        len -= take + 1;
    }
}
