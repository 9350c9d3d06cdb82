/*
 * The policy registry and the books every driver keeps the same way: what a dispatched request
 * charges to its instance (outstanding prefill and decode work, KV reservations), how streamed
 * progress and completion release it, how the instance's processing rates are refined from what
 * it actually did while busy, and how its /metrics correct the KV estimate.
 */
#include "policy_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const policy_ops *const registry[] = {
    &policy_round_robin_ops,          &policy_random_ops,
    &policy_least_requests_ops,       &policy_power_of_two_ops,
    &policy_weighted_round_robin_ops, &policy_capacity_aware_ops,
};
#define N_POLICIES ((int)(sizeof(registry) / sizeof(registry[0])))

void policy_config_default(policy_config *c)
{
    memset(c, 0, sizeof(*c));
    c->seed = 0x10011;
    c->kv_headroom = 0.95;
    c->rate_ema_alpha = 0.2;
    c->rate_window_s = 0.5;
    c->metrics_max_age_s = 5.0;
    c->prefix_affinity = false;
    c->wait_for_soonest = true;
    c->prefix_index_blocks = 16384;
    c->default_prefill_rate = 4000;
    c->default_decode_rate = 400;
    c->decode_step_fixed = 0.5;
    c->hold_beyond_batch = true;
}

int policy_count(void)
{
    return N_POLICIES;
}

const policy_ops *policy_at(int i)
{
    return i >= 0 && i < N_POLICIES ? registry[i] : NULL;
}

const policy_ops *policy_find(const char *name)
{
    if (!name)
        return NULL;
    for (int i = 0; i < N_POLICIES; i++)
        if (!strcmp(registry[i]->name, name))
            return registry[i];
    return NULL;
}

int policy_create(const char *name, const policy_config *cfg, policy **out, loom_err *e)
{
    *out = NULL;
    const policy_ops *ops = policy_find(name);
    if (!ops) {
        char known[256] = "";
        for (int i = 0; i < N_POLICIES; i++) {
            strncat(known, i ? ", " : "", sizeof(known) - strlen(known) - 1);
            strncat(known, registry[i]->name, sizeof(known) - strlen(known) - 1);
        }
        return loom_errf(e, LOOM_ENOTFOUND, "unknown policy '%s' (known: %s)", name ? name : "",
                         known);
    }
    policy *p = xcalloc(1, sizeof(*p));
    p->ops = ops;
    if (cfg)
        p->cfg = *cfg;
    else
        policy_config_default(&p->cfg);
    if (!(p->cfg.kv_headroom > 0 && p->cfg.kv_headroom <= 1) ||
        !(p->cfg.rate_ema_alpha >= 0 && p->cfg.rate_ema_alpha <= 1)) {
        free(p);
        return loom_errf(e, LOOM_EINVAL,
                         "policy: kv_headroom must be in (0, 1] and rate_ema_alpha in [0, 1]");
    }
    rng_seed(&p->rng, p->cfg.seed);
    if (ops->init) {
        int rc = ops->init(p, e);
        if (rc != 0) {
            free(p);
            return rc;
        }
    }
    *out = p;
    return LOOM_OK;
}

void policy_free(policy *p)
{
    if (!p)
        return;
    if (p->ops->dispose)
        p->ops->dispose(p);
    free(p->work);
    free(p->scratch);
    free(p);
}

const char *policy_name(const policy *p)
{
    return p->ops->name;
}

const policy_config *policy_get_config(const policy *p)
{
    return &p->cfg;
}

void policy_instance_init(policy_instance *inst, const policy_config *cfg, double weight,
                          double prefill_rate, double decode_rate, double kv_capacity_tokens)
{
    policy_config def;
    if (!cfg) {
        policy_config_default(&def);
        cfg = &def;
    }
    memset(inst, 0, sizeof(*inst));
    inst->available = true;
    inst->weight = weight > 0 && isfinite(weight) ? weight : 1.0;
    inst->prefill_rate = prefill_rate > 0 ? prefill_rate : inst->weight * cfg->default_prefill_rate;
    inst->decode_rate = decode_rate > 0 ? decode_rate : inst->weight * cfg->default_decode_rate;
    inst->kv_capacity = kv_capacity_tokens > 0 ? kv_capacity_tokens : 0;
    inst->max_batch = 0;
    inst->decode_step_fixed = cfg->decode_step_fixed;
    inst->metrics_at = -1;
    inst->kv_usage = -1;
    inst->num_running = -1;
    inst->num_waiting = -1;
    inst->busy_mark = 0;
}

int policy_select(policy *p, const policy_instance *inst, int n, const policy_request *req,
                  double now)
{
    if (n <= 0)
        return POLICY_UNAVAILABLE;
    int i = p->ops->select(p, inst, n, req, now);
    return i >= 0 && i < n ? i : (i == POLICY_QUEUE ? POLICY_QUEUE : POLICY_UNAVAILABLE);
}

/*
 * The service clock: while n requests are outstanding, each receives 1/n of the instance per
 * second (continuous batching shares an instance about evenly). Advanced at every change of n.
 * With a known max batch B, a second with m = n < B sequences running counts as the fraction of
 * a full-batch second that m sequences achieve under the step model of policy_finish_time,
 * (m / B) / (f + (1 - f) m / B), so that the rates learnt stay those at the full batch (which
 * the finish-time estimate expects) rather than sinking while a batch drains.
 */
/* A decode step with m of the instance's max_batch B sequences, over one at B:
 * f + (1 - f) m / B, f = decode_step_fixed clamped to [0, 1]. */
static double step_fraction(const policy_instance *inst, double m)
{
    double f = inst->decode_step_fixed;
    f = f > 0 ? (f < 1 ? f : 1) : 0;
    return f + (1 - f) * m / (double)inst->max_batch;
}

static void account_service(policy_instance *inst, double now)
{
    if (inst->outstanding > 0 && now > inst->busy_mark) {
        double share = 1.0;
        if (inst->max_batch > 0 && inst->outstanding < inst->max_batch) {
            double m = (double)inst->outstanding;
            share = m / (double)inst->max_batch / step_fraction(inst, m);
        }
        inst->service_clock += (now - inst->busy_mark) * share / (double)inst->outstanding;
    }
    if (now > inst->busy_mark || inst->outstanding == 0)
        inst->busy_mark = now;
}

/* A free entry of the work table (grown as needed) holding the given remaining work. A ticket
 * dropped without policy_complete keeps its entry: a stale estimate, never a dangling pointer. */
static int work_add(policy *p, int instance, double prefill_left, double decode_left)
{
    int k = 0;
    while (k < p->n_work && p->work[k].instance >= 0)
        k++;
    if (k == p->n_work) {
        if (p->n_work == p->cap_work) {
            p->cap_work = p->cap_work ? 2 * p->cap_work : 64;
            p->work = xrealloc(p->work, (size_t)p->cap_work * sizeof(*p->work));
            p->scratch = xrealloc(p->scratch, (size_t)p->cap_work * sizeof(*p->scratch));
        }
        p->n_work++;
    }
    p->work[k] = (policy_work){.instance = instance, .prefill_left = prefill_left,
                               .decode_left = decode_left};
    return k;
}

static void work_update(policy *p, const policy_ticket *t)
{
    if (t->slot >= 0 && t->slot < p->n_work && p->work[t->slot].instance == t->instance) {
        p->work[t->slot].prefill_left = t->prefill_left;
        p->work[t->slot].decode_left = t->decode_left;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double policy_slot_wait(policy *p, int instance, int j, double B, double pr, double dr)
{
    int m = 0;
    for (int k = 0; k < p->n_work; k++)
        if (p->work[k].instance == instance)
            p->scratch[m++] = p->work[k].prefill_left / pr + p->work[k].decode_left * B / dr;
    if (j <= 0 || m < j)
        return 0;
    qsort(p->scratch, (size_t)m, sizeof(double), cmp_double);
    return p->scratch[j - 1];
}

void policy_set_backlog(policy *p, double prefill_tokens, double decode_tokens)
{
    p->backlog_prefill = prefill_tokens > 0 ? prefill_tokens : 0;
    p->backlog_decode = decode_tokens > 0 ? decode_tokens : 0;
}

void policy_dispatch(policy *p, policy_instance *inst, int n, int chosen, const policy_request *req,
                     double now, policy_ticket *t)
{
    memset(t, 0, sizeof(*t));
    t->slot = -1;
    if (chosen < 0 || chosen >= n)
        return;
    policy_instance *s = &inst[chosen];
    account_service(s, now);
    double prompt = req->prompt_tokens > 0 ? req->prompt_tokens : 0;
    double output = req->expected_output > 0 ? req->expected_output : 0;
    double credit = policy_prefix_credit(p, chosen, req);
    if (credit > prompt)
        credit = prompt;
    t->instance = chosen;
    t->prompt = prompt;
    t->credit = credit;
    t->output = output;
    t->prefill_left = prompt - credit;
    t->decode_left = output;
    t->kv = prompt + output;
    t->dispatched_at = now;
    t->service_start = s->service_clock;
    t->slot = work_add(p, chosen, t->prefill_left, t->decode_left);
    t->active = true;
    s->outstanding++;
    s->dispatched++;
    s->pending_prefill += t->prefill_left;
    s->pending_decode += t->decode_left;
    s->kv_reserved += t->kv;
    s->kv_held += prompt;
    if (p->ops->on_dispatch)
        p->ops->on_dispatch(p, inst, n, chosen, req, now);
}

void policy_progress(policy *p, policy_instance *inst, policy_ticket *t, double produced,
                     double now)
{
    (void)now;
    if (!t->active || !(produced > t->produced))
        return;
    policy_instance *s = &inst[t->instance];
    if (t->prefill_left > 0) { /* the first token ends the prefill */
        s->pending_prefill -= t->prefill_left;
        t->prefill_left = 0;
        if (s->pending_prefill < 0)
            s->pending_prefill = 0;
    }
    double d = produced - t->produced;
    t->produced = produced;
    double dec = d < t->decode_left ? d : t->decode_left;
    s->pending_decode -= dec;
    t->decode_left -= dec;
    if (s->pending_decode < 0)
        s->pending_decode = 0;
    s->kv_held += d;
    work_update(p, t);
}

/*
 * Rate refinement from what the instance did while busy. Each finished request received S
 * seconds of service (its share of the instance over its lifetime, from the service clock) and
 * processed p prompt and d output tokens; the model says that takes p/prefill + d/decode.
 * Summed over a window of at least rate_window_s service seconds, the ratio r = predicted /
 * observed says how much faster (r > 1) or slower the instance is than believed. Summed over
 * all requests the shares add up to the busy time whatever the engine's order, so the estimate
 * is the aggregate rate at the load it ran under, without the bias of crediting a long request's
 * tokens to the moment it ends. Each rate moves toward r geometrically, by the EMA weight times
 * its phase's share of the predicted time (a window of pure decode leaves the prefill rate
 * alone).
 */
static void maybe_update_rates(const policy_config *cfg, policy_instance *s)
{
    if (s->window_service < cfg->rate_window_s || s->window_prefill + s->window_decode <= 0)
        return;
    double tp = s->window_prefill / s->prefill_rate;
    double td = s->window_decode / s->decode_rate;
    double pred = tp + td;
    if (pred > 0 && s->window_service > 0) {
        double ratio = pred / s->window_service;
        if (ratio < 0.05)
            ratio = 0.05;
        if (ratio > 20)
            ratio = 20;
        double a = cfg->rate_ema_alpha;
        s->prefill_rate *= pow(ratio, a * tp / pred);
        s->decode_rate *= pow(ratio, a * td / pred);
        if (s->prefill_rate < 1e-6)
            s->prefill_rate = 1e-6;
        if (s->decode_rate < 1e-6)
            s->decode_rate = 1e-6;
        s->rate_updates++;
    }
    s->window_service = 0;
    s->window_prefill = 0;
    s->window_decode = 0;
}

void policy_complete(policy *p, policy_instance *inst, policy_ticket *t, const policy_outcome *o,
                     double now)
{
    if (!t->active)
        return;
    policy_instance *s = &inst[t->instance];
    account_service(s, now);
    s->pending_prefill -= t->prefill_left;
    s->pending_decode -= t->decode_left;
    s->kv_reserved -= t->kv;
    s->kv_held -= t->prompt + t->produced;
    s->outstanding--;
    s->completed++;
    if (s->outstanding <= 0) { /* exact zero: no drift from floating-point sums */
        s->outstanding = 0;
        s->pending_prefill = s->pending_decode = 0;
        s->kv_reserved = s->kv_held = 0;
    }
    if (s->pending_prefill < 0)
        s->pending_prefill = 0;
    if (s->pending_decode < 0)
        s->pending_decode = 0;
    if (s->kv_reserved < 0)
        s->kv_reserved = 0;
    if (s->kv_held < 0)
        s->kv_held = 0;
    bool ok = o && o->ok;
    if (!ok) {
        s->failed++;
    } else {
        double prompt = o->prompt_tokens >= 0 ? o->prompt_tokens : t->prompt;
        double out = o->completion_tokens >= 0 ? o->completion_tokens : t->output;
        double prefilled = prompt - t->credit;
        s->window_prefill += prefilled > 0 ? prefilled : 0;
        s->window_decode += out > 0 ? out : 0;
        s->window_service += s->service_clock - t->service_start;
        maybe_update_rates(&p->cfg, s);
    }
    t->active = false;
    t->prefill_left = t->decode_left = 0;
    if (t->slot >= 0 && t->slot < p->n_work && p->work[t->slot].instance == t->instance)
        p->work[t->slot].instance = -1;
    t->slot = -1;
    if (p->ops->on_complete)
        p->ops->on_complete(p, t->instance, t, ok, now);
}

void policy_observe_metrics(const policy *p, policy_instance *inst, const policy_metrics *m,
                            double now)
{
    (void)p;
    if (m->kv_capacity_tokens > 0 && isfinite(m->kv_capacity_tokens))
        inst->kv_capacity = m->kv_capacity_tokens;
    inst->num_running = m->num_running >= 0 ? (int64_t)m->num_running : -1;
    inst->num_waiting = m->num_waiting >= 0 ? (int64_t)m->num_waiting : -1;
    inst->kv_usage = m->kv_usage >= 0 && isfinite(m->kv_usage) ? m->kv_usage : -1;
    if (inst->kv_usage > 1)
        inst->kv_usage = 1;
    inst->kv_external = 0;
    if (inst->kv_usage >= 0 && inst->kv_capacity > 0) {
        /* what the instance holds beyond what our own requests explain: other clients, or
         * our estimate running low. Never negative: reservations stay (they are promises). */
        double measured = inst->kv_usage * inst->kv_capacity;
        if (measured > inst->kv_held)
            inst->kv_external = measured - inst->kv_held;
    }
    inst->metrics_at = now;
}

void policy_reset_instance(policy *p, int instance)
{
    if (p->ops->on_reset)
        p->ops->on_reset(p, instance);
}

static bool metrics_fresh(const policy *p, const policy_instance *inst, double now)
{
    return inst->metrics_at >= 0 && now - inst->metrics_at <= p->cfg.metrics_max_age_s;
}

double policy_kv_used(const policy *p, const policy_instance *inst, double now)
{
    return inst->kv_reserved + (metrics_fresh(p, inst, now) ? inst->kv_external : 0);
}

bool policy_admits(const policy *p, const policy_instance *inst, const policy_request *req,
                   double now)
{
    if (inst->outstanding == 0)
        return true; /* an idle instance takes anything: the engine itself decides */
    double need = (req->prompt_tokens > 0 ? req->prompt_tokens : 0) +
                  (req->expected_output > 0 ? req->expected_output : 0);
    double theta = p->cfg.kv_headroom;
    if (inst->kv_capacity > 0)
        return policy_kv_used(p, inst, now) + need <= theta * inst->kv_capacity;
    if (inst->kv_usage >= 0 && metrics_fresh(p, inst, now))
        return inst->kv_usage < theta;
    return true;
}

/*
 * The aggregate estimate (P + p) / prefill_rate + (D + o) / decode_rate, and with a known max
 * batch B the wave estimate: the instance as B slots filled in order, so that the request,
 * behind n outstanding ones, waits for floor(n / B) full waves of the mean outstanding request
 * and then runs with m = n mod B + 1 sequences, one decode step lasting
 * (f + (1 - f) m / B) of a full-batch step (f = decode_step_fixed). The larger of the two: the
 * aggregate bound holds whatever the order, the wave bound says the request cannot finish before
 * its own tokens have been produced one step at a time. See capacity_aware.c.
 */
double policy_finish_time(const policy_instance *inst, const policy_request *req, double credit)
{
    double prompt = req->prompt_tokens > 0 ? req->prompt_tokens : 0;
    double prefill = prompt - (credit > 0 ? credit : 0);
    if (prefill < 0)
        prefill = 0;
    double out = req->expected_output > 0 ? req->expected_output : 0;
    double pr = inst->prefill_rate > 1e-9 ? inst->prefill_rate : 1e-9;
    double dr = inst->decode_rate > 1e-9 ? inst->decode_rate : 1e-9;
    double aggregate = (inst->pending_prefill + prefill) / pr + (inst->pending_decode + out) / dr;
    if (inst->max_batch <= 0)
        return aggregate;
    double B = (double)inst->max_batch;
    int64_t n = inst->outstanding > 0 ? inst->outstanding : 0;
    int64_t waves = n / inst->max_batch;                  /* full waves ahead of the request */
    double m = (double)(n - waves * inst->max_batch) + 1; /* sequences in its wave, it included */
    double mean_prefill = n > 0 ? inst->pending_prefill / (double)n : 0;
    double mean_decode = n > 0 ? inst->pending_decode / (double)n : 0;
    double wait = (double)waves * B * (mean_prefill / pr + mean_decode / dr);
    double own = ((m - 1) * mean_prefill + prefill) / pr + out * B * step_fraction(inst, m) / dr;
    double wave = wait + own;
    return wave > aggregate ? wave : aggregate;
}

double policy_prefix_credit(const policy *p, int instance, const policy_request *req)
{
    if (p->ops != &policy_capacity_aware_ops || !p->cfg.prefix_affinity)
        return 0;
    return policy_capacity_prefix_credit(p, instance, req);
}

/* ---------------------------------------------------------------- expected lengths */

#define LENGTH_EXACT_MEAN 20 /* observations averaged exactly before the EMA takes over */
#define LENGTH_EMA 0.05

void policy_lengths_init(policy_length_model *m, double default_output, double chars_per_token)
{
    memset(m, 0, sizeof(*m));
    m->default_output = default_output > 0 ? default_output : 256;
    m->chars_per_token = chars_per_token > 0 ? chars_per_token : 4;
}

static uint64_t model_key(const char *model)
{
    const char *s = model ? model : "";
    uint64_t k = loom_hash64(s, strlen(s), 0x6d6f64656cULL);
    return k ? k : 1;
}

/* The slot of model, or NULL (create: claim an empty one; the table is small and fixed). */
static int length_slot(const policy_length_model *m, const char *model, bool create)
{
    uint64_t k = model_key(model);
    for (int probe = 0; probe < POLICY_LENGTH_MODELS; probe++) {
        int i = (int)((k + (uint64_t)probe) % POLICY_LENGTH_MODELS);
        if (m->slot[i].key == k)
            return i;
        if (m->slot[i].key == 0)
            return create ? i : -1;
    }
    return -1;
}

double policy_lengths_expected(const policy_length_model *m, const char *model, int64_t max_tokens)
{
    if (max_tokens > 0)
        return (double)max_tokens;
    int i = length_slot(m, model, false);
    if (i >= 0 && m->slot[i].n_out > 0)
        return m->slot[i].mean_out;
    return m->default_output;
}

double policy_lengths_chars_per_token(const policy_length_model *m, const char *model)
{
    int i = length_slot(m, model, false);
    if (i >= 0 && m->slot[i].n_prompt > 0)
        return m->slot[i].chars_per_token;
    return m->chars_per_token;
}

double policy_lengths_prompt_tokens(const policy_length_model *m, const char *model, double chars)
{
    double t = chars / policy_lengths_chars_per_token(m, model);
    return t > 1 ? t : 1;
}

static void running_mean(double *mean, int64_t *n, double x)
{
    (*n)++;
    double w = *n <= LENGTH_EXACT_MEAN ? 1.0 / (double)*n : LENGTH_EMA;
    *mean += w * (x - *mean);
}

void policy_lengths_observe(policy_length_model *m, const char *model, double prompt_chars,
                            double prompt_tokens, double completion_tokens)
{
    int i = length_slot(m, model, true);
    if (i < 0)
        return;
    m->slot[i].key = model_key(model);
    if (completion_tokens >= 0 && isfinite(completion_tokens))
        running_mean(&m->slot[i].mean_out, &m->slot[i].n_out, completion_tokens);
    if (prompt_chars > 0 && prompt_tokens > 0 && isfinite(prompt_chars / prompt_tokens)) {
        double r = prompt_chars / prompt_tokens;
        if (r < 0.5)
            r = 0.5;
        if (r > 20)
            r = 20;
        running_mean(&m->slot[i].chars_per_token, &m->slot[i].n_prompt, r);
    }
}

/* ---------------------------------------------------------------- prompt prefixes */

int policy_prefix_hashes(const void *data, size_t len, size_t block_bytes, uint64_t seed,
                         uint64_t *out, int max)
{
    if (!data || block_bytes == 0 || max <= 0)
        return 0;
    const unsigned char *p = data;
    uint64_t h = seed;
    int n = 0;
    for (size_t off = 0; off + block_bytes <= len && n < max; off += block_bytes) {
        h = loom_hash64(p + off, block_bytes, h * 0x9e3779b97f4a7c15ULL + 1);
        if (h == 0)
            h = 1; /* 0 marks an empty slot in the prefix index */
        out[n++] = h;
    }
    return n;
}
