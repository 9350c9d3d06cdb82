/* Fuzz target: arbitrary bytes through the trace parsers (Azure CSV, Mooncake JSONL, and the
 * format detection in front of them). An accepted trace must be consistent: at least one
 * request, sorted non-negative finite timestamps, lengths in range, hash ids inside the pool;
 * and its first requests must make prompts of exactly their length. */
#include "loom/bench.h"

#include <math.h>
#include <stdlib.h>

static void check(const bench_trace *t)
{
    if (t->n < 1 || !t->entries)
        abort();
    size_t hashes = 0;
    for (size_t i = 0; i < t->n; i++) {
        const bench_trace_entry *en = &t->entries[i];
        if (!isfinite(en->timestamp_s) || en->timestamp_s < 0)
            abort();
        if (i > 0 && en->timestamp_s < t->entries[i - 1].timestamp_s)
            abort();
        if (en->input_len < 0 || en->input_len > 10000000 || en->output_len < 0 ||
            en->output_len > 10000000)
            abort();
        if ((en->n_hash_ids > 0) != (en->hash_ids != NULL) || en->n_hash_ids < 0)
            abort();
        if (en->n_hash_ids > 0 && (en->hash_ids < t->hash_pool ||
                                   en->hash_ids + en->n_hash_ids > t->hash_pool + t->n_hash))
            abort();
        hashes += (size_t)en->n_hash_ids;
    }
    if (hashes != t->n_hash)
        abort();
    bench_workload w = {.trace = t};
    bench_prompter *p = bench_prompter_ids(16, 256);
    for (uint64_t k = 0; k < 4; k++) {
        bench_item item;
        bench_workload_item(&w, k, &item);
        if (item.input_len < 1 || item.output_len < 1)
            abort();
        if (item.input_len > 4096)
            continue;
        bench_prompt pr;
        bench_prompt_build(p, &item, 1, k, &pr);
        if (pr.n_ids != item.input_len || pr.expected_tokens != item.input_len)
            abort();
        bench_prompt_free(&pr);
    }
    bench_prompter_free(p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int (*parsers[])(const char *, size_t, bench_trace *, loom_err *) = {
        bench_trace_parse, bench_trace_parse_azure, bench_trace_parse_mooncake};
    for (size_t i = 0; i < sizeof(parsers) / sizeof(parsers[0]); i++) {
        bench_trace t;
        loom_err e;
        if (parsers[i]((const char *)data, size, &t, &e) == LOOM_OK) {
            check(&t);
            bench_trace_free(&t);
        } else if (t.entries || t.n) {
            abort(); /* a failed parse leaves nothing behind */
        }
    }
    return 0;
}
