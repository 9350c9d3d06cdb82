/*
 * Small accessors over a libyaml document, with errors that name the file and line. Shared by
 * the perf module (catalog, profiles) and the plan module (cluster, plan files); a YAML helper in
 * base would replace this one.
 *
 * Absent keys, plain `null`, `~` and empty values all read as "absent".
 */
#ifndef LOOM_PERF_YAML_UTIL_H
#define LOOM_PERF_YAML_UTIL_H

#include "loom/base.h"

#include <stdbool.h>
#include <stddef.h>
#include <yaml.h>

typedef struct perf_yaml {
    yaml_document_t doc;
    bool loaded;
    char what[128]; /* file name (or "cluster.yaml") for messages */
} perf_yaml;

/* Parses text (YAML or JSON). An empty document is an error. */
int perf_yaml_load(perf_yaml *y, const char *text, size_t len, const char *what, loom_err *e);
void perf_yaml_free(perf_yaml *y);
yaml_node_t *perf_yaml_root(perf_yaml *y);
int perf_yaml_line(const yaml_node_t *n); /* 1-based */

/* Node of key in map, NULL when map is not a mapping or the key is absent or null. */
yaml_node_t *perf_yaml_get(perf_yaml *y, yaml_node_t *map, const char *key);
/* Scalar text, NULL for non-scalars. */
const char *perf_yaml_scalar(const yaml_node_t *n);
bool perf_yaml_is_null(const yaml_node_t *n);

int perf_yaml_seq_len(const yaml_node_t *seq);
yaml_node_t *perf_yaml_seq_item(perf_yaml *y, yaml_node_t *seq, int i);

/* LOOM_EFORMAT unless n is a mapping (ctx names it in the message). */
int perf_yaml_expect_map(perf_yaml *y, const yaml_node_t *n, const char *ctx, loom_err *e);
int perf_yaml_expect_seq(perf_yaml *y, const yaml_node_t *n, const char *ctx, loom_err *e);
/* Every key of map is a scalar in allowed (NULL-terminated), none repeated. */
int perf_yaml_check_keys(perf_yaml *y, yaml_node_t *map, const char *const *allowed,
                         const char *ctx, loom_err *e);

/* Typed fields of map. required: absent is an error; otherwise *out = def. */
int perf_yaml_number(perf_yaml *y, yaml_node_t *map, const char *key, bool required, double def,
                     double lo, double hi, double *out, loom_err *e);
int perf_yaml_int(perf_yaml *y, yaml_node_t *map, const char *key, bool required, long long def,
                  long long lo, long long hi, long long *out, loom_err *e);
/* Copies the scalar; longer than cap-1 bytes is an error. */
int perf_yaml_string(perf_yaml *y, yaml_node_t *map, const char *key, bool required,
                     const char *def, char *out, size_t cap, loom_err *e);
int perf_yaml_bool(perf_yaml *y, yaml_node_t *map, const char *key, bool def, bool *out,
                   loom_err *e);

/* Appends s as a double-quoted YAML scalar (escapes quotes, backslashes, control bytes). */
void perf_yaml_quote(loom_buf *b, const char *s);

/* A scalar node as a number / integer (for sequence items); ctx names it. */
int perf_yaml_node_number(perf_yaml *y, const yaml_node_t *n, const char *ctx, double lo, double hi,
                          double *out, loom_err *e);

#endif
