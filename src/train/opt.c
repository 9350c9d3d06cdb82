/*
 * AdamW (Loshchilov & Hutter: weight decay decoupled from the adaptive step), global-norm
 * gradient clipping, linear warmup then cosine decay to min_lr. Only the tensors this rank owns
 * are updated: every dense tensor (whose gradient was all-reduced, so every rank makes the same
 * update) and this rank's experts.
 */
#include "train_internal.h"

#include "loom/tensor.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void train_opt_config_default(train_opt_config *c)
{
    memset(c, 0, sizeof(*c));
    c->lr = 3e-3;
    c->min_lr = 3e-4;
    c->warmup = 10;
    c->steps = 100;
    c->beta1 = 0.9;
    c->beta2 = 0.95;
    c->eps = 1e-8;
    c->weight_decay = 0.1;
    c->grad_clip = 1.0;
}

double train_lr_at(const train_opt_config *c, int step)
{
    if (c->warmup > 0 && step < c->warmup)
        return c->lr * (step + 1) / c->warmup;
    int span = c->steps - c->warmup;
    if (span <= 0)
        return c->lr;
    double p = (double)(step - c->warmup) / span;
    if (p > 1)
        p = 1;
    return c->min_lr + 0.5 * (c->lr - c->min_lr) * (1.0 + cos(M_PI * p));
}

int train_adamw_init(train_adamw *o, const train_opt_config *c, size_t n, loom_err *e)
{
    memset(o, 0, sizeof(*o));
    o->cfg = *c;
    o->n = n;
    o->m = calloc(n ? n : 1, sizeof(float));
    o->v = calloc(n ? n : 1, sizeof(float));
    if (!o->m || !o->v) {
        train_adamw_free(o);
        return loom_errf(e, LOOM_ENOMEM, "train: out of memory for the optimiser state");
    }
    return LOOM_OK;
}

void train_adamw_free(train_adamw *o)
{
    free(o->m);
    free(o->v);
    o->m = o->v = NULL;
}

static bool decays(const train_param *p)
{
    return p->n_dims == 2; /* matrices and embeddings; not norms or biases */
}

/* The update is elementwise: each thread takes the same slice of every owned tensor, so the
 * result does not depend on the thread count. */
typedef struct adamw_args {
    train_adamw *o;
    train_model *m;
    double clip, lr, c1, c2;
} adamw_args;

static void adamw_job(void *arg, int tid, int nth)
{
    const adamw_args *a = arg;
    train_adamw *o = a->o;
    train_model *m = a->m;
    const float *g = m->grads;
    float *x = m->params;
    double b1 = o->cfg.beta1, b2 = o->cfg.beta2, c1 = a->c1, c2 = a->c2;
    for (int i = 0; i < m->n_tensors; i++) {
        const train_param *p = &m->tensors[i];
        if (!train_model_owns(m, i))
            continue;
        float wd = decays(p) ? (float)o->cfg.weight_decay : 0.0f;
        size_t j0 = p->offset + p->n * (size_t)tid / (size_t)nth;
        size_t j1 = p->offset + p->n * (size_t)(tid + 1) / (size_t)nth;
        for (size_t j = j0; j < j1; j++) {
            float gj = (float)(g[j] * a->clip);
            o->m[j] = (float)b1 * o->m[j] + (float)(1.0 - b1) * gj;
            o->v[j] = (float)b2 * o->v[j] + (float)(1.0 - b2) * gj * gj;
            float mh = (float)(o->m[j] / c1), vh = (float)(o->v[j] / c2);
            x[j] -= (float)a->lr * (mh / (sqrtf(vh) + (float)o->cfg.eps) + wd * x[j]);
        }
    }
}

double train_adamw_step(train_adamw *o, train_model *m, int step)
{
    const float *g = m->grads;
    /* global norm: dense part is the same on every rank, experts are summed over ranks */
    double sq[2] = {0.0, 0.0};
    for (int i = 0; i < m->n_tensors; i++) {
        const train_param *p = &m->tensors[i];
        if (!train_model_owns(m, i))
            continue;
        double s = 0.0;
        for (size_t j = 0; j < p->n; j++)
            s += (double)g[p->offset + j] * g[p->offset + j];
        sq[p->expert >= 0] += s;
    }
    train_dist_allreduce_f64(m->dist, &sq[1], 1);
    double norm = sqrt(sq[0] + sq[1]);
    double clip = 1.0;
    if (o->cfg.grad_clip > 0 && norm > o->cfg.grad_clip)
        clip = o->cfg.grad_clip / (norm + 1e-6);
    double lr = train_lr_at(&o->cfg, step);
    o->t++;
    adamw_args a = {.o = o, .m = m, .clip = clip, .lr = lr,
                    .c1 = 1.0 - pow(o->cfg.beta1, (double)o->t),
                    .c2 = 1.0 - pow(o->cfg.beta2, (double)o->t)};
    tensor_parallel(adamw_job, &a);
    return norm;
}
