/*
 * Least-squares fitting of the latency coefficients (heterogeneous-inference paper sec. 3:
 * "parameters ... fitted using least squares over sampled batches").
 *
 * perf_lstsq is a plain Householder QR (Golub & Van Loan, Algorithm 5.3.2) on column-scaled A:
 * the columns here differ by orders of magnitude (a constant 1 beside times of 1e-4 s), and
 * scaling keeps the rank test meaningful. p is tiny (4), so no blocking or pivoting.
 */
#include "loom/perf.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LSTSQ_MAX_P 16

/* Returns -1 on success, else the index of the first column found dependent on the others. */
static int lstsq_solve(const double *A, const double *y, int n, int p, double *x, double *rss)
{
    double *R = xmalloc(sizeof(double) * (size_t)n * (size_t)p); /* (n, p) row-major */
    double *b = xmalloc(sizeof(double) * (size_t)n);
    double scale[LSTSQ_MAX_P];
    int bad = -1;
    for (int j = 0; j < p; j++) {
        double s = 0;
        for (int i = 0; i < n; i++)
            s += A[(size_t)i * p + j] * A[(size_t)i * p + j];
        scale[j] = s > 0 ? sqrt(s) : 0;
        if (scale[j] == 0) {
            bad = j;
            goto out;
        }
    }
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < p; j++)
            R[(size_t)i * p + j] = A[(size_t)i * p + j] / scale[j];
        b[i] = y[i];
    }
    for (int k = 0; k < p; k++) {
        double norm = 0;
        for (int i = k; i < n; i++)
            norm += R[(size_t)i * p + k] * R[(size_t)i * p + k];
        norm = sqrt(norm);
        /* columns have unit norm: a remaining norm this small means dependence */
        if (norm < 1e-10) {
            bad = k;
            goto out;
        }
        double alpha = R[(size_t)k * p + k] > 0 ? -norm : norm;
        /* v = x - alpha e1, stored in place of column k below the diagonal */
        double v0 = R[(size_t)k * p + k] - alpha;
        R[(size_t)k * p + k] = v0;
        double vnorm2 = v0 * v0;
        for (int i = k + 1; i < n; i++)
            vnorm2 += R[(size_t)i * p + k] * R[(size_t)i * p + k];
        for (int j = k + 1; j < p; j++) {
            double dot = 0;
            for (int i = k; i < n; i++)
                dot += R[(size_t)i * p + k] * R[(size_t)i * p + j];
            double f = 2 * dot / vnorm2;
            for (int i = k; i < n; i++)
                R[(size_t)i * p + j] -= f * R[(size_t)i * p + k];
        }
        double dot = 0;
        for (int i = k; i < n; i++)
            dot += R[(size_t)i * p + k] * b[i];
        double f = 2 * dot / vnorm2;
        for (int i = k; i < n; i++)
            b[i] -= f * R[(size_t)i * p + k];
        R[(size_t)k * p + k] = alpha; /* the diagonal of R */
    }
    for (int k = p - 1; k >= 0; k--) {
        double s = b[k];
        for (int j = k + 1; j < p; j++)
            s -= R[(size_t)k * p + j] * x[j];
        x[k] = s / R[(size_t)k * p + k];
    }
    for (int j = 0; j < p; j++)
        x[j] /= scale[j];
    if (rss) {
        double r = 0;
        for (int i = p; i < n; i++)
            r += b[i] * b[i];
        *rss = r;
    }
out:
    free(R);
    free(b);
    return bad;
}

int perf_lstsq(const double *A, const double *y, int n, int p, double *x, double *rss, loom_err *e)
{
    if (p < 1 || p > LSTSQ_MAX_P || n < p)
        return loom_errf(e, LOOM_EINVAL,
                         "least squares needs 1..%d unknowns and at least as "
                         "many samples (got %d unknowns, %d samples)",
                         LSTSQ_MAX_P, p, n);
    int bad = lstsq_solve(A, y, n, p, x, rss);
    if (bad >= 0)
        return loom_errf(e, LOOM_EINVAL,
                         "least squares: column %d depends on the others "
                         "(the samples do not separate the terms)",
                         bad);
    return LOOM_OK;
}

enum { N_COEF = 7 };

static double term_of(const perf_terms *t, int j)
{
    switch (j) {
    case 0:
        return 1.0;
    case 1:
        return t->t_compute_prefill;
    case 2:
        return t->t_compute_decode;
    case 3:
        return t->t_memory;
    case 4:
        return t->t_comm;
    case 5:
        return t->t_attention;
    default:
        return t->sampled;
    }
}

static double *coef_slot(perf_coef *c, int j)
{
    switch (j) {
    case 0:
        return &c->overhead;
    case 1:
        return &c->compute_prefill;
    case 2:
        return &c->compute_decode;
    case 3:
        return &c->memory;
    case 4:
        return &c->comm;
    case 5:
        return &c->attention;
    default:
        return &c->host_token;
    }
}

/*
 * Relative least squares with non-negative coefficients: minimise
 * sum_i ((x . terms_i - s_i) / s_i)^2 over x >= 0, so every sample counts by its relative error
 * whatever its duration. Columns no sample exercises keep their prior and move to the right-hand
 * side. The rest are solved by Lawson and Hanson's active-set NNLS (Solving Least Squares
 * Problems, 1974, ch. 23): columns enter the passive set by the largest gradient, and a step
 * that would take a coefficient below zero stops at the boundary and drops it. This is the
 * global optimum of the constrained problem, which matters because the terms are nearly
 * collinear on a profiling grid (on a CPU the KV bytes and the decode attention FLOPs both grow
 * with the context; at tp > 1 the all-reduce, the activations and the sampled rows all grow
 * with the tokens): clamping the most negative coefficient and refitting can stop far from it.
 * A column the others already explain never enters (its gradient is zero) and ends at 0.
 */
static int fit_nnls(const perf_sample *samples, int n, const perf_coef *prior, perf_coef *out,
                    double *rel_rms, loom_err *e)
{
    enum { P = N_COEF };
    perf_coef c = *prior;
    int cols[P], p = 0;
    for (int j = 0; j < P; j++) {
        bool used = false;
        for (int i = 0; i < n; i++)
            if (term_of(&samples[i].terms, j) != 0)
                used = true;
        if (used)
            cols[p++] = j;
    }
    for (int i = 0; i < n; i++)
        if (!(samples[i].seconds > 0) || !isfinite(samples[i].seconds))
            return loom_errf(e, LOOM_EINVAL, "sample %d: measured time must be > 0", i);
    if (p > 0 && n < p)
        return loom_errf(e, LOOM_EINVAL, "fit needs at least %d samples, got %d", p, n);

    /* the relative system over the exercised columns: A (n, p), y (n) */
    double *A = xmalloc(sizeof(double) * (size_t)n * P), *y = xmalloc(sizeof(double) * (size_t)n);
    double *S = xmalloc(sizeof(double) * (size_t)n * P), *r = xmalloc(sizeof(double) * (size_t)n);
    for (int i = 0; i < n; i++) {
        double s = samples[i].seconds, fixed = 0;
        for (int j = 0; j < P; j++) {
            bool in = false;
            for (int k = 0; k < p; k++)
                in |= cols[k] == j;
            if (!in)
                fixed += *coef_slot(&c, j) * term_of(&samples[i].terms, j);
        }
        for (int k = 0; k < p; k++)
            A[(size_t)i * p + k] = term_of(&samples[i].terms, cols[k]) / s;
        y[i] = (s - fixed) / s;
    }
    /* column norms: the gradient test compares columns of very different scales */
    double norm[P];
    for (int k = 0; k < p; k++) {
        double q = 0;
        for (int i = 0; i < n; i++)
            q += A[(size_t)i * p + k] * A[(size_t)i * p + k];
        norm[k] = sqrt(q);
    }
    double x[P] = {0}, z[P];
    bool passive[P] = {false}, barred[P] = {false};
    for (int outer = 0; outer < 4 * P && p > 0; outer++) {
        for (int i = 0; i < n; i++) { /* r = y - A x */
            double v = y[i];
            for (int k = 0; k < p; k++)
                v -= A[(size_t)i * p + k] * x[k];
            r[i] = v;
        }
        int t = -1;
        double best = 1e-12;
        for (int k = 0; k < p; k++) {
            if (passive[k] || barred[k])
                continue;
            double g = 0;
            for (int i = 0; i < n; i++)
                g += A[(size_t)i * p + k] * r[i];
            g /= norm[k];
            if (g > best) {
                best = g;
                t = k;
            }
        }
        if (t < 0)
            break;
        passive[t] = true;
        for (int inner = 0; inner < 4 * P; inner++) {
            int idx[P], m = 0;
            for (int k = 0; k < p; k++)
                if (passive[k])
                    idx[m++] = k;
            for (int i = 0; i < n; i++)
                for (int q = 0; q < m; q++)
                    S[(size_t)i * m + q] = A[(size_t)i * p + idx[q]];
            double sol[P];
            if (lstsq_solve(S, y, n, m, sol, NULL) >= 0) {
                /* the new column depends on the passive ones: it adds nothing */
                passive[t] = false;
                barred[t] = true;
                break;
            }
            for (int k = 0; k < p; k++)
                z[k] = 0;
            bool pos = true;
            for (int q = 0; q < m; q++) {
                z[idx[q]] = sol[q];
                pos &= sol[q] > 0;
            }
            if (pos) {
                memcpy(x, z, sizeof(x));
                break;
            }
            double alpha = 1;
            for (int q = 0; q < m; q++) {
                int k = idx[q];
                if (z[k] <= 0 && x[k] - z[k] > 0) {
                    double a = x[k] / (x[k] - z[k]);
                    if (a < alpha)
                        alpha = a;
                }
            }
            for (int k = 0; k < p; k++) {
                x[k] += alpha * (z[k] - x[k]);
                if (passive[k] && x[k] <= 1e-15 * (1 + fabs(x[k]))) {
                    x[k] = 0;
                    passive[k] = false;
                }
            }
        }
        for (int k = 0; k < p; k++) /* a newly freed residual may let a barred column help */
            if (!passive[k] && k != t)
                barred[k] = false;
    }
    for (int k = 0; k < p; k++)
        *coef_slot(&c, cols[k]) = x[k];
    *out = c;
    {
        double ss = 0;
        for (int i = 0; i < n; i++) {
            double d =
                (perf_coef_apply(&c, &samples[i].terms) - samples[i].seconds) / samples[i].seconds;
            ss += d * d;
        }
        *rel_rms = n > 0 ? sqrt(ss / n) : 0;
    }
    free(A);
    free(y);
    free(S);
    free(r);
    return LOOM_OK;
}

/*
 * The decode attention coefficient is fitted only where the samples call for it. Its FLOPs grow
 * with the context exactly as the KV bytes do, so on a GPU, where they are a percent or two of
 * the KV read, a free attention coefficient only trades off against memory and the split comes
 * out arbitrary. The fit is therefore made twice: with decode attention tied to the decode
 * tokens' efficiency (the roofline form) and with it free; the free one is kept when it cuts
 * the squared error by more than a fifth (one extra parameter on a few dozen samples explains a
 * few percent by chance).
 */
int perf_fit(const perf_sample *samples, int n, const perf_coef *prior, perf_coef *out,
             double *rel_rms, loom_err *e)
{
    perf_coef c0;
    if (prior)
        c0 = *prior;
    else
        perf_coef_default(&c0);
    bool has_attn = false;
    for (int i = 0; i < n; i++)
        has_attn |= samples[i].terms.t_attention != 0;
    double err_free;
    int rc = fit_nnls(samples, n, &c0, out, &err_free, e);
    if (rc || !has_attn) {
        if (rel_rms)
            *rel_rms = err_free;
        return rc;
    }
    perf_sample *tied = xmalloc(sizeof(*tied) * (size_t)(n > 0 ? n : 1));
    for (int i = 0; i < n; i++) {
        tied[i] = samples[i];
        tied[i].terms.t_compute_decode += tied[i].terms.t_attention;
        tied[i].terms.t_attention = 0;
    }
    perf_coef ct;
    double err_tied;
    rc = fit_nnls(tied, n, &c0, &ct, &err_tied, e);
    free(tied);
    if (rc)
        return rc;
    ct.attention = ct.compute_decode;
    if (err_free * err_free < 0.8 * err_tied * err_tied) {
        if (rel_rms)
            *rel_rms = err_free;
    } else {
        *out = ct;
        if (rel_rms)
            *rel_rms = err_tied;
    }
    return LOOM_OK;
}
