/*
 * Memory model and steady-state throughput of one instance (heterogeneous-inference paper
 * sec. 2-3, in the reconstructed form of ../shared/papers/heterogeneous-inference.md).
 *
 * Memory, per device of a tp-way instance:
 *   usable  = utilization x memory
 *   weights = W / tp                       (everything is sharded; norms are negligible)
 *   reserve = activations at the step token budget + runtime overhead
 *   kv      = usable - weights - reserve;  KV tokens = kv tp / (2 L Hkv hd b)
 * The batch that fits is the number of requests of mean length (prompt + output, whole
 * blocks) the KV blocks hold, capped by max_num_seqs: run with that many sequences at most, no
 * request is ever preempted.
 *
 * Throughput: the steady state of continuous batching with chunked prefill (see
 * perf_estimate_instance in loom/perf.h).
 */
#include "loom/perf.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

void perf_limits_default(perf_limits *l)
{
    l->mem_utilization = 0.9;
    l->block_size = 16;
    l->max_num_seqs = 256;
    l->max_num_batched_tokens = 2048;
}

void perf_setup_init(perf_setup *s, const perf_model *pm, const perf_device *dev, int tp)
{
    memset(s, 0, sizeof(*s));
    s->model = pm;
    s->device = dev;
    s->tp = tp;
    s->coef = dev->coef;
    perf_limits_default(&s->limits);
}

/* Peak activation workspace of one step of `tokens` tokens and `seqs` sampled rows, per device:
 * the residual stream and its temporaries (about 6 d), the sharded QKV and FFN intermediates,
 * and the f32 logits of every sequence (gathered whole, plus a sampler copy). */
static double activation_bytes(const perf_model *pm, int tp, double tokens, double seqs)
{
    double d = pm->hidden, q = (double)pm->n_heads * pm->head_dim,
           kv = (double)pm->n_kv_heads * pm->head_dim;
    double per_token = pm->weight_bytes * (6 * d + (q + 2 * kv + 3 * pm->ffn_active_width) / tp);
    return tokens * per_token + seqs * (double)pm->vocab * 4 * 2;
}

void perf_memory_plan(const perf_setup *s, const perf_lengths *w, perf_memory *out)
{
    memset(out, 0, sizeof(*out));
    const perf_model *pm = s->model;
    const perf_device *dev = s->device;
    int tp = s->tp > 0 ? s->tp : 1;
    out->usable = s->limits.mem_utilization * dev->mem_bytes;
    out->weights = perf_model_weight_bytes(pm) / tp;
    out->activations =
        activation_bytes(pm, tp, s->limits.max_num_batched_tokens, s->limits.max_num_seqs);
    out->runtime = dev->runtime_overhead;
    out->reserve = out->activations + out->runtime;
    out->kv = out->usable - out->weights - out->reserve;

    char a[32], b[32], c[32];
    if (out->kv <= 0) {
        perf_format_bytes(out->weights, a, sizeof(a));
        perf_format_bytes(out->reserve, b, sizeof(b));
        perf_format_bytes(out->usable, c, sizeof(c));
        snprintf(out->why, sizeof(out->why), "weights %s + reserve %s > %s usable", a, b, c);
        return;
    }
    int bs = s->limits.block_size > 0 ? s->limits.block_size : 16;
    double tokens = floor(out->kv * tp / pm->kv_bytes_per_token);
    out->kv_blocks = (int64_t)(tokens / bs);
    out->kv_tokens = out->kv_blocks * bs;
    double req_tokens = (w ? w->mean_in + w->mean_out : 1);
    double req_blocks = ceil(req_tokens / bs);
    if (req_blocks < 1)
        req_blocks = 1;
    double batch = floor((double)out->kv_blocks / req_blocks);
    if (batch > s->limits.max_num_seqs)
        batch = s->limits.max_num_seqs;
    out->max_batch = (int)batch;
    if (out->max_batch < 1) {
        perf_format_bytes(out->kv, a, sizeof(a));
        snprintf(out->why, sizeof(out->why),
                 "%s left for KV holds %lld tokens < one request of %.0f tokens", a,
                 (long long)out->kv_tokens, req_tokens);
        return;
    }
    out->fits = true;
}

/* The model alone (no correction). */
static double model_seconds(const perf_setup *s, const perf_step *st, perf_terms *t)
{
    perf_step_terms(s->model, s->device, s->tp, st, t);
    return perf_coef_apply(&s->coef, t);
}

/* Shape coordinates of a step's part of the given kind (perf_correction_point). */
static void part_xy(const perf_step *st, int kind, double *x, double *y)
{
    if (kind == PERF_STEP_PREFILL) {
        double seqs = st->prefill_seqs > 0 ? st->prefill_seqs : 1;
        double len = st->prefill_tokens / seqs;
        *x = log(len > 1 ? len : 1);
        *y = log(st->prefill_tokens > 1 ? st->prefill_tokens : 1);
    } else {
        double b = st->decode_seqs > 1 ? st->decode_seqs : 1;
        double ctx = st->decode_seqs > 0 ? st->decode_ctx / st->decode_seqs : 1;
        *x = log(b);
        *y = log(ctx > 1 ? ctx : 1);
    }
}

void perf_setup_correct(perf_setup *s, const perf_timed_step *steps, int n)
{
    s->corr.n = 0;
    for (int i = 0; i < n && s->corr.n < PERF_PROFILE_MAX_STEPS; i++) {
        const perf_timed_step *ts = &steps[i];
        bool pre = ts->kind == PERF_STEP_PREFILL;
        /* only pure steps of their kind say what that kind of part costs */
        if (pre ? (ts->step.prefill_tokens <= 0 || ts->step.decode_seqs > 0)
                : (ts->step.decode_seqs <= 0 || ts->step.prefill_tokens > 0))
            continue;
        perf_terms t;
        double m = model_seconds(s, &ts->step, &t);
        if (!(m > 0) || !(ts->seconds > 0))
            continue;
        perf_correction_point *p = &s->corr.pt[s->corr.n++];
        p->kind = ts->kind;
        part_xy(&ts->step, ts->kind, &p->x, &p->y);
        p->rho = (ts->seconds - m) / m;
    }
}

/* The residual of the level x = xl of the given kind at y: linear between the two points of
 * the level around y, the nearer end's beyond them. */
static double level_rho(const perf_correction *c, int kind, double xl, double y)
{
    int lo = -1, hi = -1;
    for (int i = 0; i < c->n; i++) {
        const perf_correction_point *p = &c->pt[i];
        if (p->kind != kind || fabs(p->x - xl) > 1e-9)
            continue;
        if (p->y <= y && (lo < 0 || p->y > c->pt[lo].y))
            lo = i;
        if (p->y >= y && (hi < 0 || p->y < c->pt[hi].y))
            hi = i;
    }
    if (lo < 0)
        return c->pt[hi].rho;
    if (hi < 0 || c->pt[hi].y - c->pt[lo].y < 1e-12)
        return c->pt[lo].rho;
    double f = (y - c->pt[lo].y) / (c->pt[hi].y - c->pt[lo].y);
    return c->pt[lo].rho + f * (c->pt[hi].rho - c->pt[lo].rho);
}

/* The residual at (x, y): between the levels of x around it (linear in x), each at y. */
static double correction_rho(const perf_correction *c, int kind, double x, double y)
{
    double xlo = -INFINITY, xhi = INFINITY, xmin = INFINITY, xmax = -INFINITY;
    bool any = false;
    for (int i = 0; i < c->n; i++) {
        const perf_correction_point *p = &c->pt[i];
        if (p->kind != kind)
            continue;
        any = true;
        xmin = p->x < xmin ? p->x : xmin;
        xmax = p->x > xmax ? p->x : xmax;
        if (p->x <= x && p->x > xlo)
            xlo = p->x;
        if (p->x >= x && p->x < xhi)
            xhi = p->x;
    }
    if (!any)
        return 0;
    if (xlo == -INFINITY)
        xlo = xhi = xmin;
    if (xhi == INFINITY)
        xlo = xhi = xmax;
    double rl = level_rho(c, kind, xlo, y);
    if (xhi - xlo < 1e-12)
        return rl;
    double rh = level_rho(c, kind, xhi, y);
    return rl + (x - xlo) / (xhi - xlo) * (rh - rl);
}

double perf_step_seconds(const perf_setup *s, const perf_step *st, perf_terms *terms)
{
    perf_terms local;
    perf_terms *t = terms ? terms : &local;
    double model = model_seconds(s, st, t), secs = model;
    if (s->corr.n == 0)
        return secs;
    /* each part's model time, corrected by its kind's residual at its shape */
    perf_step part;
    perf_terms pt;
    double x, y;
    if (st->prefill_tokens > 0) {
        part = *st;
        part.decode_seqs = part.decode_ctx = 0;
        part_xy(&part, PERF_STEP_PREFILL, &x, &y);
        secs += correction_rho(&s->corr, PERF_STEP_PREFILL, x, y) * model_seconds(s, &part, &pt);
    }
    if (st->decode_seqs > 0) {
        perf_step_decode(&part, st->decode_seqs, st->decode_ctx);
        part_xy(&part, PERF_STEP_DECODE, &x, &y);
        secs += correction_rho(&s->corr, PERF_STEP_DECODE, x, y) * model_seconds(s, &part, &pt);
    }
    double floor = 0.1 * model; /* residuals never cut a step below this */
    return secs > floor ? secs : floor;
}

/* Steps a prompt of `in` tokens spends in prefill when `decodes` tokens of each step's budget
 * go to running decodes (continuous: a prompt that fits the room takes one step). */
static double prefill_steps(double in, double budget, double decodes)
{
    double room = budget - decodes;
    if (room < 1)
        room = 1;
    return in > room ? in / room : 1;
}

void perf_estimate_instance(const perf_setup *s, const perf_lengths *w, perf_estimate *out)
{
    memset(out, 0, sizeof(*out));
    perf_memory_plan(s, w, &out->mem);
    if (!out->mem.fits)
        return;
    double B = out->mem.max_batch, T = s->limits.max_num_batched_tokens;
    double in = w->mean_in > 1 ? w->mean_in : 1, outl = w->mean_out > 1 ? w->mean_out : 1;
    double in_sq = w->mean_in_sq > in * in ? w->mean_in_sq : in * in;
    out->batch = out->mem.max_batch;

    /* x: the token budget bounds it, and so does the batch (Little's law: x requests per step
     * each staying out - 1 + s_p steps). s_p grows with x (more decodes, less room), so the
     * batch bound is found by bisection on the monotone x (out - 1 + s_p(x)). */
    double x_tok = T / (in + outl - 1);
    double lo = 0, hi = x_tok;
    if (hi * (outl - 1 + prefill_steps(in, T, hi * (outl - 1))) <= B) {
        lo = hi;
        out->token_bound = true;
    } else {
        for (int it = 0; it < 100; it++) {
            double mid = (lo + hi) / 2;
            if (mid * (outl - 1 + prefill_steps(in, T, mid * (outl - 1))) <= B)
                lo = mid;
            else
                hi = mid;
        }
    }
    double x = lo;
    out->requests_per_step = x;

    /* the steady-state step: x prompts (a prompt split over s_p steps re-reads, on average,
     * half of itself in each later chunk) and x (out - 1) decoding sequences at mean context
     * in + out/2 */
    double decodes = x * (outl - 1), ctx = in + outl / 2;
    double sp = prefill_steps(in, T, decodes);
    perf_step *st = &out->step, part;
    perf_step_prefill(st, x * in, in, in_sq);
    st->prefill_seqs = x * sp;
    st->prefill_logits = x;
    st->prefill_kv_read = x * in * (sp > 1 ? (sp + 1) / 2 : 1);
    perf_step_decode(&part, decodes, decodes * (ctx - 1));
    perf_step_add(st, &part);
    out->t_step = perf_step_seconds(s, st, NULL);

    /* what the prompts cost: the step minus the same step without them */
    double t_dec_part = decodes > 0 ? perf_step_seconds(s, &part, NULL) : 0;
    out->prefill_fraction = t_dec_part < out->t_step ? 1 - t_dec_part / out->t_step : 0;

    out->output_tokens_per_s = x * outl / out->t_step;
    out->total_tokens_per_s = x * (in + outl) / out->t_step;
    out->requests_per_s = x / out->t_step;

    /* pure-phase rates, the instance's capacities for the gateway */
    perf_step chunk;
    double c = T < B * in ? T : B * in;
    perf_step_prefill(&chunk, c, in, in_sq);
    out->t_prefill_chunk = perf_step_seconds(s, &chunk, NULL);
    out->prefill_tokens_per_s = c / out->t_prefill_chunk;
    perf_step_decode(&chunk, B, B * ctx);
    out->t_decode_step = perf_step_seconds(s, &chunk, NULL);
    out->decode_tokens_per_s = B / out->t_decode_step;
}
