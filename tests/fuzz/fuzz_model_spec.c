/* Fuzz target: arbitrary bytes as a `loom train --model-spec` YAML through
 * model_config_from_yaml. An accepted spec must be a shape the trainer can build: even head
 * size, kv heads dividing heads, top-k within the experts, positive sizes. */
#include "loom/model.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    loom_err e;
    model_config c;
    bool has_vocab = false;
    if (model_config_from_yaml((const char *)data, size, "spec.yaml", &c, &has_vocab, &e) !=
        LOOM_OK)
        return 0;
    if (c.hidden_size < 2 || c.n_layers < 1 || c.n_heads < 1 || c.n_kv_heads < 1 ||
        c.n_heads % c.n_kv_heads || c.head_dim < 2 || c.head_dim % 2 || c.intermediate_size < 1 ||
        c.n_experts < 0 || c.n_experts > 256 ||
        (c.n_experts > 0 && (c.n_experts_per_tok < 1 || c.n_experts_per_tok > c.n_experts)) ||
        (c.n_experts == 0 && c.n_experts_per_tok != 0) || !(c.rope_theta > 1.0f) ||
        !(c.rms_norm_eps >= 0.0f) || (has_vocab && c.vocab_size < 2))
        abort();
    return 0;
}
