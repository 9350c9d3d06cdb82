/*
 * The emulated backend: an engine backend that stands in for an accelerator this machine does
 * not have. forward() computes the step time the perf model predicts for the batch on `tp`
 * devices of kind `device` (data/devices.yaml), sleeps until then, and writes logits that make
 * sampling pick uniformly random tokens (never EOS; requests end at max_tokens or a stop
 * string). The engine core runs for real: scheduling, KV block accounting, sampling. No KV is
 * stored and no model weights are loaded, so many emulated instances fit on one host.
 *
 *   loom serve --backend emulated --device H100-80G --tp 2 --model random:llama-1b
 */
#ifndef LOOM_EMULATED_H
#define LOOM_EMULATED_H

#include "loom/base.h"
#include "loom/engine.h"
#include "loom/model.h"

#include <stdint.h>

/* catalog_path NULL: data/devices.yaml (perf_catalog_default_path). Fails when the device is
 * unknown, tp does not divide the heads and KV heads, the model does not fit, or num_blocks
 * exceeds what the device's memory holds (engine_backend_emulated_capacity). */
int engine_backend_emulated_create(const model_config *mc, const char *device, int tp,
                                   const char *catalog_path, int num_blocks, int block_size,
                                   int max_num_seqs, int max_num_batched_tokens,
                                   engine_backend *out, loom_err *e);

/* The KV blocks of block_size tokens the modelled device memory holds for mc at tp, with
 * memory utilization mem_utilization (0.9 like vLLM's default) and the engine's default limits
 * (max_num_seqs, max_num_batched_tokens; 0 = 256 and 2048), which size the activation reserve:
 * what `--num-kv-blocks` should default to. */
int engine_backend_emulated_capacity(const model_config *mc, const char *device, int tp,
                                     const char *catalog_path, int block_size, int max_num_seqs,
                                     int max_num_batched_tokens, double mem_utilization,
                                     int64_t *num_blocks, loom_err *e);

/* Seconds the last forward was modelled to take, and the total slept (for metrics/tests). */
typedef struct emulated_stats {
    uint64_t steps;
    double modelled_seconds; /* sum of modelled step times */
    double last_step_seconds;
} emulated_stats;
/* ctx must be an emulated backend's (out->ctx of engine_backend_emulated_create). */
void engine_backend_emulated_stats(const void *ctx, emulated_stats *out);

#endif
