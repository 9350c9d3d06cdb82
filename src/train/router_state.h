/* train: router state between steps (router_state.c); train_step calls the balance update.
 * train_router_set_jitter is public (loom/train.h). */
#ifndef LOOM_TRAIN_ROUTER_STATE_H
#define LOOM_TRAIN_ROUTER_STATE_H

#include "loom/train.h"

/* DeepSeek-V3 aux-loss-free balancing after a step: every MoE layer's balance bias (the
 * group-limited router; others have none) moves by bias_rate toward the layer's global load
 * summed over the step's micro-batches (all ranks, so every rank moves alike). train_step
 * calls it after the optimizer update; calling it again moves the bias again. */
void train_router_update_balance(train_model *m);

#endif
