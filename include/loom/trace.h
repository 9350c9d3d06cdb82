/*
 * trace: the two public LLM request-trace formats, parsed once for every consumer. `loom bench`
 * replays a trace (bench_trace is this module's loom_trace); `loom plan --workload` summarizes
 * its lengths and arrival rate (plan_workload).
 *
 *   Azure LLM inference trace CSV   TIMESTAMP,ContextTokens,GeneratedTokens (a header naming
 *                                   the columns in any order, up to TRACE_AZURE_MAX_COLUMNS, or
 *                                   no header and these three in this order); TIMESTAMP is
 *                                   "YYYY-MM-DD HH:MM:SS[.fraction]" (or 'T' between) or seconds
 *   Mooncake JSONL                  one {"timestamp" (ms), "input_length", "output_length",
 *                                   "hash_ids" (optional)} object a line
 *
 * Trace files are untrusted bytes: every line is copied into a NUL-terminated buffer before it
 * is parsed, every number is range-checked, and an error names the line. Blank lines are
 * skipped. The fuzz target tests/fuzz/fuzz_trace.c drives these parsers (through bench's names).
 *
 * Depends on base only (and cJSON), so that neither the planner nor the load generator needs
 * the other.
 */
#ifndef LOOM_TRACE_H
#define LOOM_TRACE_H

#include "loom/base.h"

#include <stddef.h>
#include <stdint.h>

/* Prompt or output tokens of one request: larger counts are certainly corrupt. */
#define TRACE_MAX_TOKENS 10000000
/* Mooncake's hash ids name blocks of this many prompt tokens. */
#define TRACE_BLOCK_TOKENS 512
/* An Azure header may name extra columns (ignored), up to this many in all. */
#define TRACE_AZURE_MAX_COLUMNS 8

typedef enum { TRACE_AZURE, TRACE_MOONCAKE } loom_trace_format;

typedef struct loom_trace_entry {
    double timestamp_s;      /* seconds after the trace's first request */
    int input_len;           /* prompt tokens, in [0, TRACE_MAX_TOKENS] */
    int output_len;          /* generated tokens, in [0, TRACE_MAX_TOKENS] */
    const int64_t *hash_ids; /* (n_hash_ids) Mooncake prefix blocks; NULL for Azure */
    int n_hash_ids;
} loom_trace_entry;

typedef struct loom_trace {
    loom_trace_format format;
    loom_trace_entry *entries; /* (n) ordered by timestamp, file order among equal times */
    size_t n;                  /* >= 1 after a successful parse */
    int64_t *hash_pool;        /* (n_hash) storage behind every entry's hash_ids */
    size_t n_hash;
} loom_trace;

/*
 * Parse a whole trace into out (zeroed first; on failure it holds nothing to free). A malformed
 * line is LOOM_EFORMAT and the message says where: "NAME:LINE: what" when name is non-NULL
 * (compiler style), "line LINE: what" when it is NULL. A trace without requests is LOOM_EFORMAT
 * too ("the trace has no requests"; "the trace is empty (...)" when not even a header is there).
 * Pure over bytes.
 */
int trace_parse_azure(const char *text, size_t len, const char *name, loom_trace *out, loom_err *e);
int trace_parse_mooncake(const char *text, size_t len, const char *name, loom_trace *out,
                         loom_err *e);
/* Format from the content: text whose first non-space byte is '{' is Mooncake, else Azure. */
int trace_parse(const char *text, size_t len, const char *name, loom_trace *out, loom_err *e);
/*
 * A trace file; the format from the extension (.csv Azure; .jsonl or .json Mooncake), else from
 * the content. Messages as trace_parse with name; with name NULL they start "PATH: line N: ".
 */
int trace_load(const char *path, const char *name, loom_trace *out, loom_err *e);
void trace_free(loom_trace *t);

#endif
