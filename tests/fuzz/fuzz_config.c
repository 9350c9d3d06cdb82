/* Fuzz target: arbitrary bytes as config.json through model_config_parse; an accepted config
 * must be internally consistent (what model_alloc relies on). */
#include "loom/model.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    model_config c;
    loom_err e;
    if (model_config_parse((const char *)data, size, &c, &e) != LOOM_OK)
        return 0;
    if (c.hidden_size < 1 || c.n_layers < 1 || c.n_heads < 1 || c.n_kv_heads < 1 ||
        c.n_heads % c.n_kv_heads || c.head_dim < 2 || c.head_dim % 2 || c.vocab_size < 1 ||
        c.n_experts_per_tok > c.n_experts || c.n_eos > 8)
        abort();
    for (int l = 0; l < c.n_layers; l++)
        (void)model_config_is_moe_layer(&c, l);
    (void)model_config_n_params(&c);
    float *inv = malloc((size_t)(c.head_dim / 2) * sizeof(float));
    if (inv)
        model_config_rope_inv_freq(&c, inv);
    free(inv);
    return 0;
}
