/*
 * tokenizer_load_dir: a Hugging Face model directory's tokenizer files.
 *
 *   tokenizer.json          required: vocab, merges, pre-tokenizer, added tokens, post-processor
 *   tokenizer_config.json   optional: bos_token / eos_token (a string or {"content": ...}) and
 *                           chat_template (a string, or a list of {name, template}: "default")
 *   chat_template.jinja     optional: preferred over any other chat template source
 *   chat_template.json      optional: {"chat_template": ...}, between the two above
 *
 * The order is transformers': chat_template.jinja, then chat_template.json, then
 * tokenizer_config.json.
 */
#define _GNU_SOURCE
#include "loom/tokenizer.h"
#include "tok_internal.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A special token in tokenizer_config.json: "…" or {"content": "…", ...}; NULL otherwise. */
static const char *config_token(const cJSON *v)
{
    if (cJSON_IsString(v))
        return v->valuestring;
    if (cJSON_IsObject(v)) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(v, "content");
        if (cJSON_IsString(c))
            return c->valuestring;
    }
    return NULL;
}

/* chat_template as a string, or the "default" entry of a list of {name, template}. */
static int config_template(const cJSON *v, const char *path, const char **out, loom_err *e)
{
    *out = NULL;
    if (!v || cJSON_IsNull(v))
        return LOOM_OK;
    if (cJSON_IsString(v)) {
        *out = v->valuestring;
        return LOOM_OK;
    }
    if (!cJSON_IsArray(v))
        return loom_errf(e, LOOM_EFORMAT, "%s: chat_template is neither a string nor a list", path);
    const cJSON *item;
    cJSON_ArrayForEach(item, v)
    {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(item, "name");
        const cJSON *tmpl = cJSON_GetObjectItemCaseSensitive(item, "template");
        if (!cJSON_IsString(name) || !cJSON_IsString(tmpl))
            return loom_errf(e, LOOM_EFORMAT,
                             "%s: chat_template list entries need \"name\" and "
                             "\"template\" strings",
                             path);
        if (strcmp(name->valuestring, "default") == 0) {
            *out = tmpl->valuestring;
            return LOOM_OK;
        }
    }
    LOG_WARN("%s: chat_template list has no \"default\" entry; no chat template", path);
    return LOOM_OK;
}

/* Reads an optional JSON file: *root stays NULL when it does not exist. */
static int read_json(const char *path, cJSON **root, loom_err *e)
{
    *root = NULL;
    if (!loom_file_exists(path))
        return LOOM_OK;
    char *text = NULL;
    size_t len = 0;
    int rc = loom_read_file(path, &text, &len, e);
    if (rc)
        return rc;
    const char *end = NULL;
    *root = cJSON_ParseWithLengthOpts(text, len, &end, false);
    size_t at = end && end >= text && end <= text + len ? (size_t)(end - text) : 0;
    free(text);
    if (!*root)
        return loom_errf(e, LOOM_EFORMAT, "%s: invalid JSON near byte %zu", path, at);
    if (!cJSON_IsObject(*root)) {
        cJSON_Delete(*root);
        *root = NULL;
        return loom_errf(e, LOOM_EFORMAT, "%s: top level is not an object", path);
    }
    return LOOM_OK;
}

int tokenizer_load_dir(const char *dir, tokenizer **out, loom_err *e)
{
    *out = NULL;
    tokenizer *t = NULL;
    cJSON *config = NULL, *tmpl_json = NULL;
    char *text = NULL, *jinja = NULL;
    char *path = loom_path_join(dir, "tokenizer.json");
    char *config_path = loom_path_join(dir, "tokenizer_config.json");
    char *jinja_path = loom_path_join(dir, "chat_template.jinja");
    char *tmpl_json_path = loom_path_join(dir, "chat_template.json");
    size_t len = 0;
    int rc;

    if (!loom_file_exists(path)) {
        rc = loom_errf(e, LOOM_ENOTFOUND,
                       "%s not found (a Hugging Face model directory needs "
                       "tokenizer.json)",
                       path);
        goto done;
    }
    rc = loom_read_file(path, &text, &len, e);
    if (rc)
        goto done;
    rc = tokenizer_parse(text, len, &t, e);
    if (rc && e) {
        /* messages start "tokenizer.json: ..."; name the full path instead */
        char detail[sizeof(e->msg)];
        strcpy(detail, strncmp(e->msg, "tokenizer.json: ", 16) == 0 ? e->msg + 16 : e->msg);
        loom_errf(e, rc, "%s: %s", path, detail);
    }
    if (rc)
        goto done;

    rc = read_json(config_path, &config, e);
    if (rc)
        goto done;
    const char *tmpl = NULL;
    if (config) {
        tok_set_special_tokens(t,
                               config_token(cJSON_GetObjectItemCaseSensitive(config, "bos_token")),
                               config_token(cJSON_GetObjectItemCaseSensitive(config, "eos_token")));
        rc = config_template(cJSON_GetObjectItemCaseSensitive(config, "chat_template"), config_path,
                             &tmpl, e);
        if (rc)
            goto done;
    }
    rc = read_json(tmpl_json_path, &tmpl_json, e);
    if (rc)
        goto done;
    if (tmpl_json) {
        const char *alt = NULL;
        rc = config_template(cJSON_GetObjectItemCaseSensitive(tmpl_json, "chat_template"),
                             tmpl_json_path, &alt, e);
        if (rc)
            goto done;
        if (alt)
            tmpl = alt;
    }
    if (loom_file_exists(jinja_path)) {
        rc = loom_read_file(jinja_path, &jinja, NULL, e);
        if (rc)
            goto done;
        tmpl = jinja;
    }
    if (tmpl)
        tok_set_chat_template(t, tmpl);
    if (tokenizer_bos_token(t) && tokenizer_bos_id(t) < 0)
        LOG_WARN("%s: bos_token '%s' is not in the vocabulary", config_path,
                 tokenizer_bos_token(t));
    if (tokenizer_eos_token(t) && tokenizer_eos_id(t) < 0)
        LOG_WARN("%s: eos_token '%s' is not in the vocabulary", config_path,
                 tokenizer_eos_token(t));
    *out = t;
    t = NULL;
done:
    tokenizer_free(t);
    cJSON_Delete(config);
    cJSON_Delete(tmpl_json);
    free(text);
    free(jinja);
    free(path);
    free(config_path);
    free(jinja_path);
    free(tmpl_json_path);
    return rc;
}
