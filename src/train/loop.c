/*
 * One optimisation step and one validation pass, shared by `loom train`, the tests and the
 * benchmark. A step: zero the gradients; for each of n_accum micro-batches, this rank's rows of
 * the global batch forward and backward (scaled 1/n_accum); all-reduce the dense gradients;
 * AdamW. Rank r takes rows [r B/R, (r+1) B/R) of every global batch, so the global batch, and
 * with it the loss, does not depend on R.
 */
#include "router_state.h"
#include "train_internal.h"

#include "loom/tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- profile */

bool train_prof_enabled;
static const char *const prof_name[TP_N] = {
    "grad zeroing", "data batch", "embedding", "rmsnorm fwd", "QKV GEMM fwd", "RoPE fwd",
    "attention fwd (S, softmax, PV)", "o_proj fwd (+ residual)", "router fwd", "MoE plan",
    "MoE dispatch", "expert FFN fwd", "MoE combine", "MoE stats", "final norm + LM head fwd",
    "cross-entropy + losses", "LM head bwd", "rmsnorm bwd", "MoE combine bwd", "expert FFN bwd",
    "MoE dispatch bwd", "router bwd (+ aux grads)", "o_proj bwd", "attention bwd", "RoPE bwd",
    "QKV GEMM bwd", "embedding bwd", "optimizer (norm, clip, AdamW)"};
static struct {
    int steps; /* steps timed, the first one not counted */
    int sim;   /* LOOM_TRAIN_PROFILE=sim:N: threads simulated (tensor_parallel_simulate) */
    double last, last_sim, last_simwall, step_t0, sum[TP_N], sim_sum[TP_N], total, sim_total;
    uint64_t last_jobs, jobs[TP_N], cur_jobs[TP_N];
    double cur[TP_N], cur_sim[TP_N];
} g_prof;

/* The time since the last mark; with a simulation, also its time on the simulated threads:
 * the parallel calls' simulated time plus what ran outside them. */
void train_prof_mark(int phase)
{
    double now = loom_now(), wall = 0.0, sim = tensor_parallel_simulated(&wall);
    uint64_t j = tensor_parallel_jobs();
    g_prof.cur[phase] += now - g_prof.last;
    g_prof.cur_sim[phase] += (now - g_prof.last) - (wall - g_prof.last_simwall) +
                             (sim - g_prof.last_sim);
    g_prof.cur_jobs[phase] += j - g_prof.last_jobs;
    g_prof.last = now;
    g_prof.last_sim = sim;
    g_prof.last_simwall = wall;
    g_prof.last_jobs = j;
}

static void prof_print(void)
{
    int n = g_prof.steps;
    if (n < 1)
        return;
    fprintf(stderr, "train profile: %d threads, mean of %d steps (ms per step, pool jobs%s)\n",
            g_prof.sim > 1 ? 1 : tensor_get_threads(), n,
            g_prof.sim > 1 ? ", simulated ms on that many threads" : "");
    for (int p = 0; p < TP_N; p++) {
        fprintf(stderr, "  %-32s %9.3f %6.0f", prof_name[p], g_prof.sum[p] * 1e3 / n,
                (double)g_prof.jobs[p] / n);
        if (g_prof.sim > 1)
            fprintf(stderr, " %9.3f", g_prof.sim_sum[p] * 1e3 / n);
        fprintf(stderr, "\n");
    }
    fprintf(stderr, "  %-32s %9.3f", "step", g_prof.total * 1e3 / n);
    if (g_prof.sim > 1)
        fprintf(stderr, "        %9.3f (%d threads)", g_prof.sim_total * 1e3 / n, g_prof.sim);
    fprintf(stderr, "\n");
}

static void prof_step_begin(void)
{
    static bool checked;
    if (!checked) {
        const char *v = getenv("LOOM_TRAIN_PROFILE");
        train_prof_enabled = v && *v && strcmp(v, "0");
        checked = true;
        if (v && !strncmp(v, "sim:", 4) && atoi(v + 4) > 1) {
            g_prof.sim = atoi(v + 4);
            tensor_set_threads(g_prof.sim);
            tensor_parallel_simulate(g_prof.sim);
        }
        if (train_prof_enabled)
            atexit(prof_print);
        g_prof.steps = -1; /* the first step warms up */
    }
    if (!train_prof_enabled)
        return;
    memset(g_prof.cur, 0, sizeof(g_prof.cur));
    memset(g_prof.cur_jobs, 0, sizeof(g_prof.cur_jobs));
    memset(g_prof.cur_sim, 0, sizeof(g_prof.cur_sim));
    g_prof.last_sim = tensor_parallel_simulated(&g_prof.last_simwall);
    g_prof.last = g_prof.step_t0 = loom_now();
    g_prof.last_jobs = tensor_parallel_jobs();
}

static void prof_step_end(void)
{
    if (!train_prof_enabled || ++g_prof.steps < 1)
        return;
    for (int p = 0; p < TP_N; p++) {
        g_prof.sum[p] += g_prof.cur[p];
        g_prof.jobs[p] += g_prof.cur_jobs[p];
        g_prof.sim_sum[p] += g_prof.cur_sim[p];
        g_prof.sim_total += g_prof.cur_sim[p];
    }
    g_prof.total += loom_now() - g_prof.step_t0;
}

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
    prof_step_begin();
    double t0 = loom_now(), comm0 = m->dist->comm_time;
    train_zero_grad(m);
    int L = m->cfg.model.n_layers;
    for (int l = 0; m->moe && l < L; l++)
        memset(m->moe[l].step_load, 0, sizeof(m->moe[l].step_load));
    TRAIN_PROF(TP_ZERO);
    m->training = true;
    for (int a = 0; a < n_accum && !rc; a++) {
        int64_t micro = (int64_t)step * n_accum + a;
        train_loss lo;
        rc = train_data_batch(d, sc->seed, micro, sc->batch, T, row0, n_rows, false, tok, tgt, e);
        TRAIN_PROF(TP_DATA);
        if (rc || (rc = train_forward(m, tok, tgt, n_rows, T, &lo, e)) ||
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
    TRAIN_PROF(TP_OPT);
    prof_step_end();
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
