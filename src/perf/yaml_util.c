/* libyaml document accessors with line-numbered errors (see yaml_util.h). */
#include "yaml_util.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int perf_yaml_load(perf_yaml *y, const char *text, size_t len, const char *what, loom_err *e)
{
    memset(y, 0, sizeof(*y));
    snprintf(y->what, sizeof(y->what), "%s", what ? what : "yaml");
    yaml_parser_t parser;
    if (!yaml_parser_initialize(&parser))
        return loom_errf(e, LOOM_ENOMEM, "%s: out of memory", y->what);
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    int rc = LOOM_OK;
    if (!yaml_parser_load(&parser, &y->doc)) {
        rc = loom_errf(e, LOOM_EFORMAT, "%s:%zu: %s%s%s", y->what, parser.problem_mark.line + 1,
                       parser.problem ? parser.problem : "malformed YAML",
                       parser.context ? " " : "", parser.context ? parser.context : "");
        yaml_parser_delete(&parser);
        return rc;
    }
    yaml_parser_delete(&parser);
    y->loaded = true;
    if (!yaml_document_get_root_node(&y->doc)) {
        perf_yaml_free(y);
        return loom_errf(e, LOOM_EFORMAT, "%s: empty document", y->what);
    }
    return LOOM_OK;
}

void perf_yaml_free(perf_yaml *y)
{
    if (y && y->loaded) {
        yaml_document_delete(&y->doc);
        y->loaded = false;
    }
}

yaml_node_t *perf_yaml_root(perf_yaml *y)
{
    return y->loaded ? yaml_document_get_root_node(&y->doc) : NULL;
}

int perf_yaml_line(const yaml_node_t *n)
{
    return n ? (int)n->start_mark.line + 1 : 0;
}

const char *perf_yaml_scalar(const yaml_node_t *n)
{
    return n && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

bool perf_yaml_is_null(const yaml_node_t *n)
{
    if (!n)
        return true;
    if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    const char *s = (const char *)n->data.scalar.value;
    return !*s || !strcmp(s, "~") || !strcasecmp(s, "null");
}

yaml_node_t *perf_yaml_get(perf_yaml *y, yaml_node_t *map, const char *key)
{
    if (!map || map->type != YAML_MAPPING_NODE)
        return NULL;
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = yaml_document_get_node(&y->doc, p->key);
        const char *ks = perf_yaml_scalar(k);
        if (ks && !strcmp(ks, key)) {
            yaml_node_t *v = yaml_document_get_node(&y->doc, p->value);
            return perf_yaml_is_null(v) ? NULL : v;
        }
    }
    return NULL;
}

int perf_yaml_seq_len(const yaml_node_t *seq)
{
    if (!seq || seq->type != YAML_SEQUENCE_NODE)
        return 0;
    return (int)(seq->data.sequence.items.top - seq->data.sequence.items.start);
}

yaml_node_t *perf_yaml_seq_item(perf_yaml *y, yaml_node_t *seq, int i)
{
    if (i < 0 || i >= perf_yaml_seq_len(seq))
        return NULL;
    return yaml_document_get_node(&y->doc, seq->data.sequence.items.start[i]);
}

int perf_yaml_expect_map(perf_yaml *y, const yaml_node_t *n, const char *ctx, loom_err *e)
{
    if (n && n->type == YAML_MAPPING_NODE)
        return LOOM_OK;
    return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s must be a mapping (key: value lines)", y->what,
                     perf_yaml_line(n), ctx);
}

int perf_yaml_expect_seq(perf_yaml *y, const yaml_node_t *n, const char *ctx, loom_err *e)
{
    if (n && n->type == YAML_SEQUENCE_NODE)
        return LOOM_OK;
    return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s must be a list (- item lines)", y->what,
                     perf_yaml_line(n), ctx);
}

int perf_yaml_check_keys(perf_yaml *y, yaml_node_t *map, const char *const *allowed,
                         const char *ctx, loom_err *e)
{
    if (!map || map->type != YAML_MAPPING_NODE)
        return LOOM_OK;
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = yaml_document_get_node(&y->doc, p->key);
        const char *ks = perf_yaml_scalar(k);
        if (!ks)
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: keys must be plain strings", y->what,
                             perf_yaml_line(k), ctx);
        bool known = false;
        for (int i = 0; allowed[i]; i++)
            known = known || !strcmp(ks, allowed[i]);
        if (!known) {
            char list[384] = "";
            size_t used = 0;
            for (int i = 0; allowed[i] && used < sizeof(list) - 1; i++)
                used += (size_t)snprintf(list + used, sizeof(list) - used, "%s%s", i ? ", " : "",
                                         allowed[i]);
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: unknown key '%.60s' (known: %s)", y->what,
                             perf_yaml_line(k), ctx, ks, list);
        }
        for (yaml_node_pair_t *q = map->data.mapping.pairs.start; q < p; q++) {
            const char *qs = perf_yaml_scalar(yaml_document_get_node(&y->doc, q->key));
            if (qs && !strcmp(qs, ks))
                return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: key '%.60s' given twice", y->what,
                                 perf_yaml_line(k), ctx, ks);
        }
    }
    return LOOM_OK;
}

static bool parse_double(const char *s, double *out)
{
    if (!s || !*s)
        return false;
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v))
        return false;
    *out = v;
    return true;
}

int perf_yaml_node_number(perf_yaml *y, const yaml_node_t *n, const char *ctx, double lo, double hi,
                          double *out, loom_err *e)
{
    double v;
    if (!parse_double(perf_yaml_scalar(n), &v) || v < lo || v > hi)
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s must be a number in [%g, %g]", y->what,
                         perf_yaml_line(n), ctx, lo, hi);
    *out = v;
    return LOOM_OK;
}

int perf_yaml_number(perf_yaml *y, yaml_node_t *map, const char *key, bool required, double def,
                     double lo, double hi, double *out, loom_err *e)
{
    yaml_node_t *n = perf_yaml_get(y, map, key);
    if (!n) {
        if (required)
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: missing '%s'", y->what, perf_yaml_line(map),
                             key);
        *out = def;
        return LOOM_OK;
    }
    return perf_yaml_node_number(y, n, key, lo, hi, out, e);
}

int perf_yaml_int(perf_yaml *y, yaml_node_t *map, const char *key, bool required, long long def,
                  long long lo, long long hi, long long *out, loom_err *e)
{
    yaml_node_t *n = perf_yaml_get(y, map, key);
    if (!n) {
        if (required)
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: missing '%s'", y->what, perf_yaml_line(map),
                             key);
        *out = def;
        return LOOM_OK;
    }
    const char *s = perf_yaml_scalar(n);
    char *end = NULL;
    errno = 0;
    long long v = s && *s ? strtoll(s, &end, 10) : 0;
    if (!s || !*s || errno || *end || v < lo || v > hi)
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s must be an integer in [%lld, %lld]", y->what,
                         perf_yaml_line(n), key, lo, hi);
    *out = v;
    return LOOM_OK;
}

int perf_yaml_string(perf_yaml *y, yaml_node_t *map, const char *key, bool required,
                     const char *def, char *out, size_t cap, loom_err *e)
{
    yaml_node_t *n = perf_yaml_get(y, map, key);
    if (!n) {
        if (required)
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: missing '%s'", y->what, perf_yaml_line(map),
                             key);
        snprintf(out, cap, "%s", def ? def : "");
        return LOOM_OK;
    }
    const char *s = perf_yaml_scalar(n);
    if (!s)
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s must be a string", y->what, perf_yaml_line(n),
                         key);
    size_t len = n->data.scalar.length;
    if (len >= cap || strlen(s) != len)
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s must be a string of at most %zu bytes",
                         y->what, perf_yaml_line(n), key, cap - 1);
    memcpy(out, s, len + 1);
    return LOOM_OK;
}

int perf_yaml_bool(perf_yaml *y, yaml_node_t *map, const char *key, bool def, bool *out,
                   loom_err *e)
{
    yaml_node_t *n = perf_yaml_get(y, map, key);
    if (!n) {
        *out = def;
        return LOOM_OK;
    }
    const char *s = perf_yaml_scalar(n);
    if (s && (!strcasecmp(s, "true") || !strcasecmp(s, "yes") || !strcasecmp(s, "on"))) {
        *out = true;
        return LOOM_OK;
    }
    if (s && (!strcasecmp(s, "false") || !strcasecmp(s, "no") || !strcasecmp(s, "off"))) {
        *out = false;
        return LOOM_OK;
    }
    return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s must be true or false", y->what, perf_yaml_line(n),
                     key);
}

void perf_yaml_quote(loom_buf *b, const char *s)
{
    buf_puts(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            buf_printf(b, "\\%c", *p);
        } else if (*p < 0x20 || *p == 0x7f) {
            buf_printf(b, "\\x%02x", *p);
        } else if (p[0] == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f) {
            /* C1 controls, NEL (a YAML line break) among them: escaped by code point */
            buf_printf(b, "\\x%02x", p[1]);
            p++;
        } else if (p[0] == 0xe2 && p[1] == 0x80 && (p[2] == 0xa8 || p[2] == 0xa9)) {
            /* U+2028, U+2029: line and paragraph separators, which YAML folds */
            buf_puts(b, p[2] == 0xa8 ? "\\L" : "\\P");
            p += 2;
        } else if (p[0] == 0xef && p[1] == 0xbb && p[2] == 0xbf) {
            buf_puts(b, "\\uFEFF");
            p += 2;
        } else {
            buf_append(b, p, 1);
        }
    }
    buf_puts(b, "\"");
}
