/*
 * AdamW (Loshchilov & Hutter: weight decay decoupled from the adaptive step), global-norm
 * gradient clipping, linear warmup then cosine decay to min_lr. Only the tensors this rank owns
 * are updated: every dense tensor (whose gradient was all-reduced, so every rank makes the same
 * update) and this rank's experts.
 */
#include "train_internal.h"

#include "loom/tensor.h"

#include <math.h>
#include <pthread.h>
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

/*
 * The update runs over the pool in spans: each owned tensor cut into pieces of SPAN elements,
 * the same pieces for every thread count. The gradient norm sums each span in double, then the
 * spans in order, so it too is the same for every thread count.
 */
#define SPAN 32768

typedef struct adamw_span {
    size_t off, n;
    float wd;
    bool expert;
} adamw_span;

typedef struct adamw_args {
    train_adamw *o;
    train_model *m;
    const adamw_span *span;
    double *sq; /* (n_span) */
    float clip, lr, b1, b2, ic1, ic2, eps;
} adamw_args;

/* The owned tensors' spans; the caller frees. */
static adamw_span *make_spans(train_model *m, const train_adamw *o, int *n_span)
{
    int n = 0;
    for (int i = 0; i < m->n_tensors; i++)
        if (train_model_owns(m, i))
            n += (int)((m->tensors[i].n + SPAN - 1) / SPAN);
    adamw_span *s = xmalloc((size_t)(n > 0 ? n : 1) * sizeof(adamw_span));
    n = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const train_param *p = &m->tensors[i];
        if (!train_model_owns(m, i))
            continue;
        for (size_t j = 0; j < p->n; j += SPAN)
            s[n++] = (adamw_span){.off = p->offset + j, .n = p->n - j < SPAN ? p->n - j : SPAN,
                                  .wd = decays(p) ? (float)o->cfg.weight_decay : 0.0f,
                                  .expert = p->expert >= 0};
    }
    *n_span = n;
    return s;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIMD_CLONES
#endif

SIMD_CLONES static void norm_task(void *arg, int i, int tid)
{
    const adamw_args *a = arg;
    const float *g = a->m->grads + a->span[i].off;
    size_t n = a->span[i].n;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (size_t j = 0; j < n; j++)
        s += (double)g[j] * g[j];
    a->sq[i] = s;
}

/* x -= lr (m^ / (sqrt(v^) + eps) + wd x) over one span, from the element j on. */
static void adamw_tail(const adamw_args *a, const adamw_span *sp, size_t j)
{
    float *x = a->m->params + sp->off, *mo = a->o->m + sp->off, *vo = a->o->v + sp->off;
    const float *g = a->m->grads + sp->off;
    for (; j < sp->n; j++) {
        float gj = g[j] * a->clip;
        mo[j] = a->b1 * mo[j] + (1.0f - a->b1) * gj;
        vo[j] = a->b2 * vo[j] + (1.0f - a->b2) * gj * gj;
        float mh = mo[j] * a->ic1, vh = vo[j] * a->ic2;
        x[j] -= a->lr * (mh / (sqrtf(vh) + a->eps) + sp->wd * x[j]);
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_ADAMW_AVX2 1
/* The same, 8 lanes at a time (the vectoriser leaves sqrtf alone: errno). */
__attribute__((target("avx2,fma"))) static void adamw_avx2(const adamw_args *a,
                                                           const adamw_span *sp)
{
    float *x = a->m->params + sp->off, *mo = a->o->m + sp->off, *vo = a->o->v + sp->off;
    const float *g = a->m->grads + sp->off;
    __m256 clip = _mm256_set1_ps(a->clip), b1 = _mm256_set1_ps(a->b1),
           b2 = _mm256_set1_ps(a->b2), ob1 = _mm256_set1_ps(1.0f - a->b1),
           ob2 = _mm256_set1_ps(1.0f - a->b2), ic1 = _mm256_set1_ps(a->ic1),
           ic2 = _mm256_set1_ps(a->ic2), eps = _mm256_set1_ps(a->eps),
           lr = _mm256_set1_ps(a->lr), wd = _mm256_set1_ps(sp->wd);
    size_t j = 0;
    for (; j + 8 <= sp->n; j += 8) {
        __m256 gj = _mm256_mul_ps(_mm256_loadu_ps(g + j), clip);
        __m256 m = _mm256_add_ps(_mm256_mul_ps(b1, _mm256_loadu_ps(mo + j)),
                                 _mm256_mul_ps(ob1, gj));
        __m256 v = _mm256_add_ps(_mm256_mul_ps(b2, _mm256_loadu_ps(vo + j)),
                                 _mm256_mul_ps(_mm256_mul_ps(ob2, gj), gj));
        _mm256_storeu_ps(mo + j, m);
        _mm256_storeu_ps(vo + j, v);
        __m256 den = _mm256_add_ps(_mm256_sqrt_ps(_mm256_mul_ps(v, ic2)), eps);
        __m256 xj = _mm256_loadu_ps(x + j);
        __m256 upd = _mm256_add_ps(_mm256_div_ps(_mm256_mul_ps(m, ic1), den),
                                   _mm256_mul_ps(wd, xj));
        _mm256_storeu_ps(x + j, _mm256_sub_ps(xj, _mm256_mul_ps(lr, upd)));
    }
    adamw_tail(a, sp, j);
}
static bool g_avx2;
static void cpu_check(void)
{
    __builtin_cpu_init();
    g_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
#define HAVE_ADAMW_AVX2 0
#endif

static void adamw_task(void *arg, int i, int tid)
{
    const adamw_args *a = arg;
#if HAVE_ADAMW_AVX2
    if (g_avx2) {
        adamw_avx2(a, &a->span[i]);
        return;
    }
#endif
    adamw_tail(a, &a->span[i], 0);
}

double train_adamw_step(train_adamw *o, train_model *m, int step)
{
#if HAVE_ADAMW_AVX2
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, cpu_check);
#endif
    int n_span;
    adamw_span *span = make_spans(m, o, &n_span);
    adamw_args a = {.o = o, .m = m, .span = span,
                    .sq = xmalloc((size_t)(n_span > 0 ? n_span : 1) * sizeof(double))};
    /* global norm: dense part is the same on every rank, experts are summed over ranks */
    tensor_parallel_for(n_span, norm_task, &a);
    double sq[2] = {0.0, 0.0};
    for (int i = 0; i < n_span; i++)
        sq[span[i].expert] += a.sq[i];
    train_dist_allreduce_f64(m->dist, &sq[1], 1);
    double norm = sqrt(sq[0] + sq[1]);
    double clip = 1.0;
    if (o->cfg.grad_clip > 0 && norm > o->cfg.grad_clip)
        clip = o->cfg.grad_clip / (norm + 1e-6);
    o->t++;
    a.clip = (float)clip;
    a.lr = (float)train_lr_at(&o->cfg, step);
    a.b1 = (float)o->cfg.beta1;
    a.b2 = (float)o->cfg.beta2;
    a.ic1 = (float)(1.0 / (1.0 - pow(o->cfg.beta1, (double)o->t)));
    a.ic2 = (float)(1.0 / (1.0 - pow(o->cfg.beta2, (double)o->t)));
    a.eps = (float)o->cfg.eps;
    tensor_parallel_for(n_span, adamw_task, &a);
    free(a.sq);
    free(span);
    return norm;
}
