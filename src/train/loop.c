/*
 * One optimisation step and one validation pass, shared by `loom train`, the tests and the
 * benchmark. A step: zero the gradients; for each of n_accum micro-batches, this rank's rows of
 * the global batch forward and backward (scaled 1/n_accum); all-reduce the dense gradients;
 * AdamW. Rank r takes rows [r B/R, (r+1) B/R) of every global batch, so the global batch, and
 * with it the loss, does not depend on R.
 */
#include "router_state.h"
#include "train_internal.h"

#include <stdlib.h>
#include <string.h>

static int rows_of_rank(const train_model *m, int B, int *row0, int *n_rows, loom_err *e)
{
    int R = m->dist->n_ranks;
    if (B % R)
        return loom_errf(e, LOOM_EINVAL,
                         "train: global batch %d does not split over %d ranks (HINT: a --batch "
                         "that the rank count divides)",
                         B, R);
    *n_rows = B / R;
    *row0 = m->dist->rank * *n_rows;
    if (*n_rows > m->cfg.B_max)
        return loom_errf(e, LOOM_EINVAL, "train: %d rows per rank exceed B_max %d", *n_rows,
                         m->cfg.B_max);
    return LOOM_OK;
}

int train_step(train_model *m, train_adamw *o, const train_data *d, const train_step_config *sc,
               int step, train_step_result *out, loom_err *e)
{
    int row0, n_rows, rc;
    if ((rc = rows_of_rank(m, sc->batch, &row0, &n_rows, e)))
        return rc;
    int T = sc->seq_len, n_accum = sc->accum > 0 ? sc->accum : 1;
    size_t n = (size_t)n_rows * T;
    int32_t *tok = xmalloc(n * sizeof(int32_t)), *tgt = xmalloc(n * sizeof(int32_t));
    memset(out, 0, sizeof(*out));
    double t0 = loom_now(), comm0 = m->dist->comm_time;
    train_zero_grad(m);
    int L = m->cfg.model.n_layers;
    for (int l = 0; m->moe && l < L; l++)
        memset(m->moe[l].step_load, 0, sizeof(m->moe[l].step_load));
    m->training = true;
    for (int a = 0; a < n_accum && !rc; a++) {
        int64_t micro = (int64_t)step * n_accum + a;
        train_loss lo;
        if ((rc = train_data_batch(d, sc->seed, micro, sc->batch, T, row0, n_rows, false, tok,
                                   tgt, e)) ||
            (rc = train_forward(m, tok, tgt, n_rows, T, &lo, e)) ||
            (rc = train_backward(m, 1.0f / n_accum, e)))
            break;
        for (int l = 0; m->moe && l < L; l++)
            for (int x = 0; x < m->cfg.model.n_experts && x < 256; x++)
                m->moe[l].step_load[x] += m->moe[l].stat.load[x];
        out->loss += lo.total / n_accum;
        out->ce += lo.ce / n_accum;
        out->aux += lo.aux / n_accum;
        out->tokens += (int64_t)sc->batch * T;
    }
    m->training = false;
    free(tok);
    free(tgt);
    if (rc)
        return rc;
    train_allreduce_grads(m);
    out->lr = train_lr_at(&o->cfg, step);
    out->grad_norm = train_adamw_step(o, m, step);
    train_router_update_balance(m);
    out->time = loom_now() - t0;
    out->comm_time = m->dist->comm_time - comm0;
    return LOOM_OK;
}

int train_evaluate(train_model *m, const train_data *d, const train_step_config *sc,
                   int n_batches, double *val_loss, loom_err *e)
{
    int row0, n_rows, rc;
    if ((rc = rows_of_rank(m, sc->batch, &row0, &n_rows, e)))
        return rc;
    int T = sc->seq_len;
    size_t n = (size_t)n_rows * T;
    int32_t *tok = xmalloc(n * sizeof(int32_t)), *tgt = xmalloc(n * sizeof(int32_t));
    double sum = 0.0;
    for (int b = 0; b < n_batches && !rc; b++) {
        train_loss lo;
        if (!(rc = train_data_batch(d, sc->seed, b, sc->batch, T, row0, n_rows, true, tok, tgt,
                                    e)) &&
            !(rc = train_forward(m, tok, tgt, n_rows, T, &lo, e)))
            sum += lo.ce;
    }
    free(tok);
    free(tgt);
    *val_loss = n_batches > 0 ? sum / n_batches : 0.0;
    return rc;
}

/*
 * Greedy decode with the training forward: the context (at most T_max tokens, the last ones) is
 * recomputed from scratch for every new token, the argmax of the last position's logits
 * appended (first index on ties, as the engine's sampler). No KV cache, no EOS stop: an oracle
 * for what `loom serve` must produce from the exported checkpoint, not a fast path. Collective:
 * under mpirun every rank calls it with the same prompt.
 */
int train_greedy(train_model *m, const int32_t *prompt, int n_prompt, int n_new, int32_t *out,
                 loom_err *e)
{
    int T_max = m->cfg.T_max, V = m->cfg.model.vocab_size;
    if (n_prompt < 1)
        return loom_errf(e, LOOM_EINVAL, "train: greedy decode needs a non-empty prompt");
    int n = n_prompt + n_new;
    int32_t *seq = xmalloc((size_t)n * sizeof(int32_t));
    memcpy(seq, prompt, (size_t)n_prompt * sizeof(int32_t));
    int rc = LOOM_OK;
    for (int len = n_prompt; len < n && !rc; len++) {
        int T = len < T_max ? len : T_max;
        train_loss lo;
        if ((rc = train_forward(m, seq + len - T, NULL, 1, T, &lo, e)))
            break;
        const float *row = train_logits(m) + (size_t)(T - 1) * V;
        int best = 0;
        for (int v = 1; v < V; v++)
            if (row[v] > row[best])
                best = v;
        seq[len] = best;
        out[len - n_prompt] = best;
    }
    free(seq);
    return rc;
}
