/*
 * train: router state between steps (router_state.c). Not in train.h while src/train/model.c,
 * moe.c and loop.c are being reworked; train_step may call train_router_update_balance itself
 * once the loop owns it (then the CLI's call goes).
 */
#ifndef LOOM_TRAIN_ROUTER_STATE_H
#define LOOM_TRAIN_ROUTER_STATE_H

#include "loom/train.h"

/* DeepSeek-V3 aux-loss-free balancing after a step: every MoE layer's balance bias (the
 * group-limited router; others have none) moves by bias_rate toward the global load of the
 * layer's last forward (train_model_layer_stats: all ranks, so every rank moves alike).
 * Call after train_step and before any validation forward. */
void train_router_update_balance(train_model *m);

/* Switch-style gate-input jitter in training forwards: x * U(1 - jitter, 1 + jitter), drawn
 * from each layer's own generator (saved in checkpoints). 0 turns it off. */
int train_router_set_jitter(train_model *m, float jitter, loom_err *e);

#endif
