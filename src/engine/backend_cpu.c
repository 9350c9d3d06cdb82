/*
 * CPU backend: a loaded model plus the KV storage it owns. forward() is model_forward; the
 * engine decides which blocks each sequence uses.
 */
#include "loom/engine.h"

#include <stdlib.h>

typedef struct cpu_backend {
    model *m;    /* not owned */
    model_kv kv; /* owned */
} cpu_backend;

static int cpu_forward(void *ctx, const model_batch *b, float *logits, loom_err *e)
{
    cpu_backend *cb = ctx;
    return model_forward(cb->m, &cb->kv, b, logits, e);
}

static void cpu_destroy(void *ctx)
{
    cpu_backend *cb = ctx;
    if (!cb)
        return;
    model_kv_free(&cb->kv);
    free(cb);
}

int engine_backend_cpu_create(model *m, int num_blocks, int block_size, engine_backend *out,
                              loom_err *e)
{
    cpu_backend *cb = xcalloc(1, sizeof(*cb));
    cb->m = m;
    int rc = model_kv_init(&cb->kv, model_get_config(m), num_blocks, block_size, e);
    if (rc) {
        free(cb);
        return rc;
    }
    out->name = "cpu";
    out->ctx = cb;
    out->forward = cpu_forward;
    out->destroy = cpu_destroy;
    return LOOM_OK;
}
