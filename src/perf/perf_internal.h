/* Internal to the perf module (and read by src/plan, which depends on perf). */
#ifndef LOOM_PERF_INTERNAL_H
#define LOOM_PERF_INTERNAL_H

#include "loom/perf.h"
#include "yaml_util.h"

/* A coefficient mapping {overhead_s, compute, memory, comm[, rel_rms_error]} into c (keys absent
 * keep c's values). rel_rms may be NULL, in which case rel_rms_error is not accepted. */
int perf_coef_from_yaml(perf_yaml *y, yaml_node_t *map, const char *ctx, perf_coef *c,
                        double *rel_rms, loom_err *e);

/* Shortest round-tripping text of v ("%.17g" trimmed to the fewest digits that read back). */
void perf_fmt_double(double v, char *out, size_t cap);

#endif
