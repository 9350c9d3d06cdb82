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

enum { N_COEF = 5 };

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
    default:
        return t->t_comm;
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
    default:
        return &c->comm;
    }
}

/*
 * Relative least squares: minimise sum_i ((x . terms_i - s_i) / s_i)^2, so every sample counts
 * by its relative error whatever its duration. Columns start free when some sample exercises
 * them; a column the QR finds dependent, or a coefficient that comes out negative, is fixed
 * (to the prior, or to 0 when negative) and the rest refitted: a small active-set loop.
 */
int perf_fit(const perf_sample *samples, int n, const perf_coef *prior, perf_coef *out,
             double *rel_rms, loom_err *e)
{
    enum { P = N_COEF };
    perf_coef c;
    if (prior)
        c = *prior;
    else
        perf_coef_default(&c);
    bool free_col[P];
    for (int j = 0; j < P; j++) {
        free_col[j] = false;
        for (int i = 0; i < n; i++)
            if (term_of(&samples[i].terms, j) != 0)
                free_col[j] = true;
    }
    for (int i = 0; i < n; i++)
        if (!(samples[i].seconds > 0) || !isfinite(samples[i].seconds))
            return loom_errf(e, LOOM_EINVAL, "sample %d: measured time must be > 0", i);

    double *A = xmalloc(sizeof(double) * (size_t)n * P), *y = xmalloc(sizeof(double) * (size_t)n);
    int rc = LOOM_OK;
    for (int iter = 0; iter <= P; iter++) {
        int cols[P], p = 0;
        for (int j = 0; j < P; j++)
            if (free_col[j])
                cols[p++] = j;
        if (p == 0)
            break;
        if (n < p) {
            rc = loom_errf(e, LOOM_EINVAL, "fit needs at least %d samples, got %d", p, n);
            goto done;
        }
        for (int i = 0; i < n; i++) {
            double s = samples[i].seconds, fixed = 0;
            for (int j = 0; j < P; j++)
                if (!free_col[j])
                    fixed += *coef_slot(&c, j) * term_of(&samples[i].terms, j);
            for (int k = 0; k < p; k++)
                A[(size_t)i * p + k] = term_of(&samples[i].terms, cols[k]) / s;
            y[i] = (s - fixed) / s;
        }
        double x[P];
        int bad = lstsq_solve(A, y, n, p, x, NULL);
        if (bad >= 0) {
            free_col[cols[bad]] = false; /* keep the prior for it */
            continue;
        }
        int worst = -1;
        for (int k = 0; k < p; k++)
            if (x[k] < 0 && (worst < 0 || x[k] < x[worst]))
                worst = k;
        if (worst >= 0) {
            *coef_slot(&c, cols[worst]) = 0;
            free_col[cols[worst]] = false;
            continue;
        }
        for (int k = 0; k < p; k++)
            *coef_slot(&c, cols[k]) = x[k];
        break;
    }
    *out = c;
    if (rel_rms) {
        double ss = 0;
        for (int i = 0; i < n; i++) {
            double r =
                (perf_coef_apply(&c, &samples[i].terms) - samples[i].seconds) / samples[i].seconds;
            ss += r * r;
        }
        *rel_rms = n > 0 ? sqrt(ss / n) : 0;
    }
done:
    free(A);
    free(y);
    return rc;
}
