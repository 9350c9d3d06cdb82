/*
 * AdamW (Loshchilov & Hutter: weight decay decoupled from the adaptive step), global-norm
 * gradient clipping, linear warmup then cosine decay to min_lr. Only the tensors this rank owns
 * are updated: every dense tensor (whose gradient was all-reduced, so every rank makes the same
 * update) and this rank's experts.
 */
#include "train_internal.h"

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
    double b1 = o->cfg.beta1, b2 = o->cfg.beta2;
    double c1 = 1.0 - pow(b1, (double)o->t), c2 = 1.0 - pow(b2, (double)o->t);
    float *x = m->params;
    for (int i = 0; i < m->n_tensors; i++) {
        const train_param *p = &m->tensors[i];
        if (!train_model_owns(m, i))
            continue;
        float wd = decays(p) ? (float)o->cfg.weight_decay : 0.0f;
        for (size_t j = p->offset; j < p->offset + p->n; j++) {
            float gj = (float)(g[j] * clip);
            o->m[j] = (float)b1 * o->m[j] + (float)(1.0 - b1) * gj;
            o->v[j] = (float)b2 * o->v[j] + (float)(1.0 - b2) * gj * gj;
            float mh = (float)(o->m[j] / c1), vh = (float)(o->v[j] / c2);
            x[j] -= (float)lr * (mh / (sqrtf(vh) + (float)o->cfg.eps) + wd * x[j]);
        }
    }
    return norm;
}
