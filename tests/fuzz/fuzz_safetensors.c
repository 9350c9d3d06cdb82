/* Fuzz target: arbitrary bytes as a whole safetensors file through st_parse, then every tensor
 * it accepts is read back (its bytes must lie inside the input) and widened when it is a float
 * dtype. */
#include "loom/model.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file f;
    loom_err e;
    if (st_parse(data, size, &f, &e) != LOOM_OK)
        return 0;
    for (size_t i = 0; i < f.n_tensors; i++) {
        const st_tensor *t = &f.tensors[i];
        if (st_find(&f, t->name) != t)
            abort();
        if ((const uint8_t *)t->data < data || t->nbytes > size ||
            (const uint8_t *)t->data + t->nbytes > data + size)
            abort();
        if (t->nbytes <= (1u << 20) &&
            (t->dtype == ST_F32 || t->dtype == ST_BF16 || t->dtype == ST_F16)) {
            float *dst = malloc(t->nbytes * 2 + 4);
            if (dst && st_tensor_to_f32(t, dst, &e) != LOOM_OK)
                abort();
            free(dst);
        }
    }
    st_close(&f);
    return 0;
}
