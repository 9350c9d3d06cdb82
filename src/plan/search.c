/*
 * The deployment search (heterogeneous-inference paper sec. 4: "exhaustive search" over the
 * configurations the resource and throughput models score).
 *
 * 1. Every (device kind, tp) the cluster can host is evaluated once: tp must divide the heads
 *    and KV heads, the memory model must accept it, and the throughput model scores it.
 * 2. Machines with the same device kind, count and cost form one "kind" and are searched once.
 * 3. A kind's partitions are multisets of fitting degrees whose sum is at most its count
 *    (symmetric partitions, which only permute devices, are the same multiset). They are
 *    enumerated exhaustively, largest degrees first, with a branch-and-bound cut for the
 *    additive objectives: a branch whose best possible completion (remaining devices at the
 *    best per-device rate left) cannot beat the k-th best kept is skipped; that cut never
 *    drops a partition of the top k.
 * 4. throughput / throughput-per-cost: every machine takes its kind's best. min-cost: the
 *    cheapest multiset of machines (each at its kind's best) whose request rate reaches the
 *    target, by branch and bound over kinds sorted by cost per request/s with the fractional
 *    (LP) relaxation as the bound.
 */
#define _GNU_SOURCE /* qsort_r */
#include "loom/plan.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

const char *plan_objective_name(plan_objective o)
{
    switch (o) {
    case PLAN_OBJ_PER_COST:
        return "throughput-per-cost";
    case PLAN_OBJ_MIN_COST:
        return "min-cost";
    default:
        return "throughput";
    }
}

int plan_objective_parse(const char *s, plan_objective *out)
{
    if (!strcmp(s, "throughput"))
        *out = PLAN_OBJ_THROUGHPUT;
    else if (!strcmp(s, "throughput-per-cost"))
        *out = PLAN_OBJ_PER_COST;
    else if (!strcmp(s, "min-cost"))
        *out = PLAN_OBJ_MIN_COST;
    else
        return LOOM_EINVAL;
    return LOOM_OK;
}

void plan_options_default(plan_options *o)
{
    memset(o, 0, sizeof(*o));
    perf_limits_default(&o->limits);
    o->objective = PLAN_OBJ_THROUGHPUT;
    o->runner_ups = 3;
    o->max_nodes = 4000000;
}

/* ---------------------------------------------------------------- configurations */

typedef struct dev_use {
    const perf_device *device;
    int max_count;
    int first_config; /* configs[first_config + tp - 1] */
} dev_use;

static bool tp_allowed(const plan_options *o, int tp)
{
    if (o->n_tp_allowed == 0)
        return true;
    for (int i = 0; i < o->n_tp_allowed; i++)
        if (o->tp_allowed[i] == tp)
            return true;
    return false;
}

static int eval_config(plan_result *r, plan_config *c, const perf_device *dev, int tp,
                       const model_config *mc, const char *model_name, loom_err *e)
{
    c->device = dev;
    c->tp = tp;
    int wb = r->opts.weight_bytes > 0 ? r->opts.weight_bytes : dev->weight_bytes;
    int rc = perf_model_init(&c->model, mc, model_name, wb, wb, e);
    if (rc)
        return rc;
    perf_setup_init(&c->setup, &c->model, dev, tp);
    c->setup.limits = r->opts.limits;
    char why[160];
    c->tp_ok = perf_tp_valid(&c->model, dev, tp, why, sizeof(why));
    if (!c->tp_ok) {
        snprintf(c->why, sizeof(c->why), "%s", why);
        return LOOM_OK;
    }
    if (r->opts.profiles_dir) {
        perf_profile p;
        loom_err pe;
        rc = perf_profile_find(r->opts.profiles_dir, dev->name, tp, model_name, &p, &pe);
        if (rc == LOOM_OK) {
            c->setup.coef = p.coef;
            if (r->opts.profile_correction)
                perf_setup_correct(&c->setup, p.steps, p.n_steps);
            c->profiled = true;
        } else if (rc != LOOM_ENOTFOUND) {
            return loom_errf(e, rc, "%s", pe.msg);
        }
    }
    perf_estimate_instance(&c->setup, &r->lengths, &c->est);
    c->fits = c->est.mem.fits;
    if (!c->fits)
        snprintf(c->why, sizeof(c->why), "%s", c->est.mem.why);
    return LOOM_OK;
}

static void add_reason(plan_result *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add_reason(plan_result *r, const char *fmt, ...)
{
    r->reasons = xrealloc(r->reasons, sizeof(*r->reasons) * (size_t)(r->n_reasons + 1));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->reasons[r->n_reasons], sizeof(*r->reasons), fmt, ap);
    va_end(ap);
    r->n_reasons++;
}

/* One line per rejected class: the degrees that divide nothing together, then each degree the
 * memory model refuses. */
static void collect_reasons(plan_result *r, const dev_use *du, int n_du)
{
    for (int k = 0; k < n_du; k++) {
        char list[160] = "";
        size_t used = 0;
        const plan_config *first_bad = NULL;
        for (int tp = 1; tp <= du[k].max_count; tp++) {
            const plan_config *c = &r->configs[du[k].first_config + tp - 1];
            if (c->tp_ok || !tp_allowed(&r->opts, tp))
                continue;
            if (!first_bad)
                first_bad = c;
            if (used < sizeof(list) - 8)
                used +=
                    (size_t)snprintf(list + used, sizeof(list) - used, "%s%d", used ? "," : "", tp);
        }
        if (first_bad)
            add_reason(r, "TP=%s on %s: do not divide %d heads and %d KV heads", list,
                       du[k].device->name, first_bad->model.n_heads, first_bad->model.n_kv_heads);
        for (int tp = 1; tp <= du[k].max_count; tp++) {
            const plan_config *c = &r->configs[du[k].first_config + tp - 1];
            if (c->tp_ok && !c->fits && tp_allowed(&r->opts, tp))
                add_reason(r, "TP=%d on %s: %s", tp, du[k].device->name, c->why);
        }
    }
}

/* ---------------------------------------------------------------- partitions of one kind */

typedef struct search_ctx {
    const plan_result *r;
    plan_kind *kind;
    int m;    /* candidate degrees */
    int keep; /* best + runner-ups */
    int n_kept;
    plan_partition *kept;   /* (keep), sorted best first */
    int *counts;            /* (m) current, by candidate */
    int *order;             /* (m) candidates in search order: best tokens/s per device first */
    double *best_rate_from; /* (m+1) best per-device tokens/s among order[j..] */
    double device_cost;     /* per device per hour */
    int64_t nodes;
    bool truncated;
} search_ctx;

/* > 0 when a ranks before b: higher score, then more tokens/s, then fewer instances. */
static int partition_cmp(const plan_partition *a, const plan_partition *b)
{
    if (a->score != b->score)
        return a->score > b->score ? 1 : -1;
    if (a->tokens_per_s != b->tokens_per_s)
        return a->tokens_per_s > b->tokens_per_s ? 1 : -1;
    if (a->n_instances != b->n_instances)
        return a->n_instances < b->n_instances ? 1 : -1;
    return 0;
}

static void score_partition(const search_ctx *s, plan_partition *p)
{
    plan_kind *k = s->kind;
    p->n_instances = 0;
    p->devices_used = 0;
    p->tokens_per_s = 0;
    p->requests_per_s = 0;
    for (int j = 0; j < s->m; j++) {
        const plan_config *c = k->tps[j];
        p->n_instances += p->counts[j];
        p->devices_used += p->counts[j] * c->tp;
        p->tokens_per_s += p->counts[j] * c->est.output_tokens_per_s;
        p->requests_per_s += p->counts[j] * c->est.requests_per_s;
    }
    if (s->r->opts.objective == PLAN_OBJ_PER_COST) {
        p->cost_per_hour = s->device_cost * p->devices_used;
        p->score = p->cost_per_hour > 0 ? p->tokens_per_s / p->cost_per_hour : 0;
    } else {
        p->cost_per_hour = k->cost_per_hour;
        p->score = p->tokens_per_s;
    }
}

static void keep_partition(search_ctx *s)
{
    plan_partition cand = {.counts = s->counts};
    score_partition(s, &cand);
    if (cand.n_instances == 0)
        return;
    if (s->n_kept == s->keep && partition_cmp(&cand, &s->kept[s->keep - 1]) <= 0)
        return;
    int pos = s->n_kept < s->keep ? s->n_kept++ : s->keep - 1;
    int *slot_counts = s->kept[pos].counts; /* recycle the dropped entry's array */
    while (pos > 0 && partition_cmp(&cand, &s->kept[pos - 1]) > 0) {
        s->kept[pos] = s->kept[pos - 1];
        pos--;
    }
    memcpy(slot_counts, s->counts, sizeof(int) * (size_t)s->m);
    s->kept[pos] = cand;
    s->kept[pos].counts = slot_counts;
}

/*
 * Depth-first over the candidates in order (most tokens/s per device first, so the first leaves
 * are already good and the bound bites early). Bounds: with `remaining` devices left and at best
 * best_rate_from[j] tokens/s per device, throughput cannot exceed tokens + remaining x that; a
 * per-cost ratio cannot exceed the larger of the current tokens per device and that rate.
 * A branch that cannot beat the last kept partition is cut (a tie cannot displace it either).
 */
static void enumerate(search_ctx *s, int j, int remaining, double tokens_so_far, int used)
{
    if (++s->nodes > s->r->opts.max_nodes) {
        s->truncated = true;
        return;
    }
    if (s->n_kept == s->keep) {
        const plan_partition *last = &s->kept[s->keep - 1];
        if (s->r->opts.objective == PLAN_OBJ_PER_COST) {
            double rate = fmax(used > 0 ? tokens_so_far / used : 0, s->best_rate_from[j]);
            if (s->device_cost > 0 && rate / s->device_cost < last->score)
                return;
        } else if (tokens_so_far + remaining * s->best_rate_from[j] <= last->tokens_per_s) {
            return;
        }
    }
    if (j == s->m) {
        keep_partition(s);
        return;
    }
    int ci = s->order[j];
    const plan_config *c = s->kind->tps[ci];
    for (int n = remaining / c->tp; n >= 0 && !s->truncated; n--) {
        s->counts[ci] = n;
        enumerate(s, j + 1, remaining - n * c->tp, tokens_so_far + n * c->est.output_tokens_per_s,
                  used + n * c->tp);
    }
    s->counts[ci] = 0;
}

static double per_device_rate(const plan_config *c)
{
    return c->est.output_tokens_per_s / c->tp;
}

static void search_kind(plan_result *r, plan_kind *k)
{
    int m = k->n_tps;
    if (m == 0)
        return;
    search_ctx s;
    memset(&s, 0, sizeof(s));
    s.r = r;
    s.kind = k;
    s.m = m;
    s.keep = 1 + (r->opts.runner_ups > 0 ? r->opts.runner_ups : 0);
    s.kept = xcalloc((size_t)s.keep, sizeof(plan_partition));
    for (int i = 0; i < s.keep; i++)
        s.kept[i].counts = xcalloc((size_t)m, sizeof(int));
    s.counts = xcalloc((size_t)m, sizeof(int));
    s.order = xmalloc(sizeof(int) * (size_t)m);
    s.best_rate_from = xcalloc((size_t)m + 1, sizeof(double));
    for (int j = 0; j < m; j++) /* insertion sort: per-device rate descending, then tp */
        for (int i = j; i >= 0; i--) {
            if (i == 0 || per_device_rate(k->tps[s.order[i - 1]]) >= per_device_rate(k->tps[j])) {
                s.order[i] = j;
                break;
            }
            s.order[i] = s.order[i - 1];
        }
    for (int j = m - 1; j >= 0; j--)
        s.best_rate_from[j] = fmax(per_device_rate(k->tps[s.order[j]]), s.best_rate_from[j + 1]);
    s.device_cost = k->count > 0 ? k->cost_per_hour / k->count : 0;
    enumerate(&s, 0, k->count, 0, 0);
    k->nodes = s.nodes;
    k->truncated = s.truncated;
    k->feasible = s.n_kept > 0;
    if (s.n_kept > 0) {
        k->best = s.kept[0];
        k->n_runner_ups = s.n_kept - 1;
        k->runner_ups =
            xcalloc((size_t)(k->n_runner_ups > 0 ? k->n_runner_ups : 1), sizeof(plan_partition));
        for (int i = 1; i < s.n_kept; i++)
            k->runner_ups[i - 1] = s.kept[i];
        for (int i = s.n_kept; i < s.keep; i++)
            free(s.kept[i].counts);
    } else {
        for (int i = 0; i < s.keep; i++)
            free(s.kept[i].counts);
    }
    free(s.kept);
    free(s.counts);
    free(s.order);
    free(s.best_rate_from);
}

/* ---------------------------------------------------------------- min-cost selection */

typedef struct mc_item {
    int kind;
    double rate, cost; /* per machine */
    int avail;
} mc_item;

typedef struct mc_ctx {
    mc_item *items;
    int n;
    double target;
    int *x, *best_x;
    double best_cost;
    int64_t nodes, max_nodes;
    bool truncated;
} mc_ctx;

static int mc_cmp(const void *a, const void *b)
{
    const mc_item *x = a, *y = b;
    double rx = x->cost / x->rate, ry = y->cost / y->rate;
    return rx < ry ? -1 : rx > ry ? 1 : x->kind - y->kind;
}

/* Cheapest fractional completion from item i on (items sorted by cost per rate). */
static double mc_bound(const mc_ctx *c, int i, double need)
{
    double cost = 0;
    for (; i < c->n && need > 0; i++) {
        double take = fmin(need, c->items[i].rate * c->items[i].avail);
        cost += take / c->items[i].rate * c->items[i].cost;
        need -= take;
    }
    return need > 1e-12 ? INFINITY : cost;
}

static void mc_search(mc_ctx *c, int i, double need, double cost)
{
    if (++c->nodes > c->max_nodes) {
        c->truncated = true;
        return;
    }
    if (need <= 1e-12) {
        if (cost < c->best_cost) {
            c->best_cost = cost;
            memcpy(c->best_x, c->x, sizeof(int) * (size_t)c->n);
        }
        return;
    }
    if (i == c->n || cost + mc_bound(c, i, need) >= c->best_cost)
        return;
    const mc_item *it = &c->items[i];
    int most = (int)fmin(it->avail, ceil(need / it->rate - 1e-12));
    for (int x = most; x >= 0 && !c->truncated; x--) {
        c->x[i] = x;
        mc_search(c, i + 1, need - x * it->rate, cost + x * it->cost);
    }
    c->x[i] = 0;
}

static int select_min_cost(plan_result *r, loom_err *e)
{
    double target = r->opts.target_rate > 0 ? r->opts.target_rate : r->workload.rate;
    if (!(target > 0))
        return loom_errf(e, LOOM_EINVAL,
                         "min-cost needs a target rate (requests/s): pass "
                         "--target-rate, or a trace whose arrival times give one");
    r->target_rate = target;
    mc_ctx c;
    memset(&c, 0, sizeof(c));
    c.items = xcalloc((size_t)r->n_kinds, sizeof(mc_item));
    double capacity = 0;
    for (int k = 0; k < r->n_kinds; k++) {
        const plan_kind *pk = &r->kinds[k];
        if (!pk->feasible || pk->best.requests_per_s <= 0)
            continue;
        c.items[c.n++] = (mc_item){k, pk->best.requests_per_s, pk->cost_per_hour, pk->n_machines};
        capacity += pk->best.requests_per_s * pk->n_machines;
    }
    int rc = LOOM_OK;
    if (capacity < target) {
        rc = loom_errf(e, LOOM_EINVAL,
                       "target rate %.3g requests/s exceeds the cluster's "
                       "capacity of %.3g requests/s for this workload",
                       target, capacity);
        goto done;
    }
    qsort(c.items, (size_t)c.n, sizeof(mc_item), mc_cmp);
    c.x = xcalloc((size_t)c.n, sizeof(int));
    c.best_x = xcalloc((size_t)c.n, sizeof(int));
    c.target = target;
    c.max_nodes = r->opts.max_nodes;
    /* incumbent: greedy in cost-per-rate order */
    double need = target, cost = 0;
    for (int i = 0; i < c.n && need > 1e-12; i++) {
        int x = (int)fmin(c.items[i].avail, ceil(need / c.items[i].rate - 1e-12));
        c.best_x[i] = x;
        need -= x * c.items[i].rate;
        cost += x * c.items[i].cost;
    }
    c.best_cost = cost * (1 + 1e-12) + 1e-12;
    r->min_cost_lower_bound = mc_bound(&c, 0, target);
    mc_search(&c, 0, target, 0);
    r->min_cost_proven = !c.truncated;
    for (int i = 0; i < c.n; i++)
        r->kinds[c.items[i].kind].machines_used = c.best_x[i];
done:
    free(c.items);
    free(c.x);
    free(c.best_x);
    return rc;
}

/* ---------------------------------------------------------------- kinds of machines */

typedef struct sort_arg {
    const plan_cluster *cluster;
    const int *kind_of; /* per machine: index of its device kind, in order of appearance */
} sort_arg;

static int machine_cmp(const void *a, const void *b, void *arg)
{
    const plan_cluster *sort_cluster = ((const sort_arg *)arg)->cluster;
    const int *kind_of = ((const sort_arg *)arg)->kind_of;
    int i = *(const int *)a, j = *(const int *)b;
    const plan_machine *x = &sort_cluster->machines[i], *y = &sort_cluster->machines[j];
    if (kind_of[i] != kind_of[j])
        return kind_of[i] - kind_of[j];
    if (x->count != y->count)
        return x->count - y->count;
    if (x->cost_per_hour != y->cost_per_hour)
        return x->cost_per_hour < y->cost_per_hour ? -1 : 1;
    return i - j;
}

static double machine_cost(const plan_machine *m, const perf_device *d)
{
    return m->cost_per_hour > 0 ? m->cost_per_hour : m->count * d->cost_per_hour;
}

int plan_run(const plan_cluster *cluster, const model_config *mc, const char *model_name,
             const plan_workload *w, const perf_catalog *catalog, const plan_options *opts,
             plan_result *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    int rc = LOOM_OK;
    const perf_device **dev = NULL;
    int *order = NULL, *du_of = NULL;
    dev_use *du = NULL;
    int n_du = 0;
    out->opts = *opts;
    out->cluster = cluster;
    snprintf(out->model_name, sizeof(out->model_name), "%s", model_name ? model_name : "model");
    out->workload = *w;
    out->workload.requests = NULL;
    plan_workload_lengths(w, &out->lengths);
    if (!(w->mean_out >= 1) || !(w->mean_in >= 0) || (w->n == 0 && w->max_out == 0))
        return loom_errf(e, LOOM_EINVAL,
                         "the workload is empty: give a trace with requests "
                         "or --input-len/--output-len");
    if (cluster->n < 1)
        return loom_errf(e, LOOM_EINVAL, "the cluster has no machines");
    if (opts->limits.mem_utilization <= 0 || opts->limits.mem_utilization > 1 ||
        opts->limits.block_size < 1 || opts->limits.max_num_seqs < 1 ||
        opts->limits.max_num_batched_tokens < 1)
        return loom_errf(e, LOOM_EINVAL,
                         "memory utilization must be in (0, 1] and block size, "
                         "max-num-seqs and the token budget >= 1");
    perf_model pm;
    if ((rc = perf_model_init(&pm, mc, model_name, 2, 2, e)))
        return rc;
    out->model_params = pm.params_total;
    out->model_active_params = pm.params_total - (double)pm.n_moe_layers *
                                                     (pm.n_experts - pm.n_experts_per_tok) *
                                                     pm.params_expert;

    /* resolve devices; the kinds in use and their largest machine */
    dev = xcalloc((size_t)cluster->n, sizeof(*dev));
    du_of = xcalloc((size_t)cluster->n, sizeof(int));
    du = xcalloc((size_t)(catalog->n > 0 ? catalog->n : 1), sizeof(dev_use));
    for (int i = 0; i < cluster->n; i++) {
        const plan_machine *m = &cluster->machines[i];
        dev[i] = perf_catalog_find(catalog, m->device);
        if (!dev[i]) {
            char known[300] = "";
            size_t used = 0;
            for (int k = 0; k < catalog->n && used < sizeof(known) - 40; k++)
                used += (size_t)snprintf(known + used, sizeof(known) - used, "%s%s", k ? ", " : "",
                                         catalog->devices[k].name);
            rc = loom_errf(e, LOOM_ENOTFOUND,
                           "machine '%s' (line %d): unknown device '%s'; the catalog has: %s",
                           m->name, m->line, m->device, known);
            goto fail;
        }
        int k = 0;
        while (k < n_du && du[k].device != dev[i])
            k++;
        if (k == n_du)
            du[n_du++] = (dev_use){dev[i], 0, 0};
        du_of[i] = k;
        if (m->count > du[k].max_count)
            du[k].max_count = m->count;
    }

    /* --tp: each degree must suit some device kind of the cluster (any degree suits a pooled
     * device such as the host's cores; accelerators need one that divides the heads) */
    for (int i = 0; i < opts->n_tp_allowed; i++) {
        char why[160] = "";
        bool ok = false;
        for (int k = 0; k < n_du && !ok; k++)
            ok = perf_tp_valid(&pm, du[k].device, opts->tp_allowed[i], why, sizeof(why));
        if (!ok) {
            rc = loom_errf(e, LOOM_EINVAL, "TP=%d: %s of %s", opts->tp_allowed[i], why,
                           out->model_name);
            goto fail;
        }
    }

    /* 1. every (device kind, tp) */
    for (int k = 0; k < n_du; k++) {
        du[k].first_config = out->n_configs;
        out->n_configs += du[k].max_count;
    }
    out->configs = xcalloc((size_t)out->n_configs, sizeof(plan_config));
    for (int k = 0; k < n_du; k++)
        for (int tp = 1; tp <= du[k].max_count; tp++)
            if ((rc = eval_config(out, &out->configs[du[k].first_config + tp - 1], du[k].device, tp,
                                  mc, out->model_name, e)))
                goto fail;
    collect_reasons(out, du, n_du);

    /* 2. kinds of machines */
    order = xmalloc(sizeof(int) * (size_t)cluster->n);
    for (int i = 0; i < cluster->n; i++)
        order[i] = i;
    sort_arg sa = {cluster, du_of};
    qsort_r(order, (size_t)cluster->n, sizeof(int), machine_cmp, &sa);
    out->machine_kind = xmalloc(sizeof(int) * (size_t)cluster->n);
    out->machine_used = xcalloc((size_t)cluster->n, sizeof(bool));
    out->kinds = xcalloc((size_t)cluster->n, sizeof(plan_kind));
    for (int oi = 0; oi < cluster->n; oi++) {
        int i = order[oi];
        const plan_machine *m = &cluster->machines[i];
        plan_kind *last = out->n_kinds ? &out->kinds[out->n_kinds - 1] : NULL;
        double cost = machine_cost(m, dev[i]);
        if (!last || last->device != dev[i] || last->count != m->count ||
            last->cost_per_hour != cost) {
            last = &out->kinds[out->n_kinds++];
            last->device = dev[i];
            last->count = m->count;
            last->cost_per_hour = cost;
        }
        last->n_machines++;
        out->machine_kind[i] = (int)(last - out->kinds);
    }

    /* 3. search each kind */
    bool need_cost = opts->objective != PLAN_OBJ_THROUGHPUT;
    for (int k = 0; k < out->n_kinds; k++) {
        plan_kind *pk = &out->kinds[k];
        const dev_use *u = du;
        while (u->device != pk->device)
            u++;
        pk->tps = xcalloc((size_t)pk->count, sizeof(plan_config *));
        for (int tp = pk->count; tp >= 1; tp--) {
            plan_config *c = &out->configs[u->first_config + tp - 1];
            if (c->fits && tp_allowed(opts, tp))
                pk->tps[pk->n_tps++] = c;
        }
        search_kind(out, pk);
        if (need_cost && pk->feasible && pk->cost_per_hour <= 0) {
            for (int i = 0; i < cluster->n; i++) {
                if (out->machine_kind[i] == k) {
                    rc = loom_errf(e, LOOM_EINVAL,
                                   "objective %s needs costs: machine '%s' "
                                   "(line %d, %s) has none; set cost_per_hour in the cluster "
                                   "file or in the device catalog",
                                   plan_objective_name(opts->objective), cluster->machines[i].name,
                                   cluster->machines[i].line, pk->device->name);
                    goto fail;
                }
            }
        }
    }
    bool any = false;
    for (int k = 0; k < out->n_kinds; k++)
        any = any || out->kinds[k].feasible;
    if (!any) {
        char first[3][240];
        int nf = out->n_reasons < 3 ? out->n_reasons : 3;
        for (int i = 0; i < nf; i++)
            snprintf(first[i], sizeof(first[i]), "%s", out->reasons[i]);
        rc = loom_errf(e, LOOM_EINVAL, "%s fits on no machine of this cluster%s%s%s%s%s%s%s",
                       out->model_name, nf > 0 ? ": " : "", nf > 0 ? first[0] : "",
                       nf > 1 ? "; " : "", nf > 1 ? first[1] : "", nf > 2 ? "; " : "",
                       nf > 2 ? first[2] : "", out->n_reasons > 3 ? "; ..." : "");
        goto fail;
    }

    /* 4. the cluster */
    if (opts->objective == PLAN_OBJ_MIN_COST) {
        if ((rc = select_min_cost(out, e)))
            goto fail;
    } else {
        for (int k = 0; k < out->n_kinds; k++)
            out->kinds[k].machines_used = out->kinds[k].feasible ? out->kinds[k].n_machines : 0;
    }
    {
        int *left = xcalloc((size_t)out->n_kinds, sizeof(int));
        for (int k = 0; k < out->n_kinds; k++)
            left[k] = out->kinds[k].machines_used;
        for (int i = 0; i < cluster->n; i++) {
            int k = out->machine_kind[i];
            if (left[k] <= 0)
                continue;
            left[k]--;
            const plan_kind *pk = &out->kinds[k];
            out->machine_used[i] = true;
            out->n_machines_used++;
            out->n_instances += pk->best.n_instances;
            out->tokens_per_s += pk->best.tokens_per_s;
            out->requests_per_s += pk->best.requests_per_s;
            out->cost_per_hour += pk->best.cost_per_hour;
            for (int j = 0; j < pk->n_tps; j++)
                out->total_tokens_per_s += pk->best.counts[j] * pk->tps[j]->est.total_tokens_per_s;
        }
        free(left);
    }
    free(dev);
    free(du_of);
    free(order);
    free(du);
    return LOOM_OK;
fail:
    free(dev);
    free(du_of);
    free(order);
    free(du);
    plan_result_free(out);
    return rc;
}

void plan_result_free(plan_result *r)
{
    if (!r)
        return;
    for (int k = 0; k < r->n_kinds; k++) {
        plan_kind *pk = &r->kinds[k];
        free(pk->tps);
        free(pk->best.counts);
        for (int i = 0; i < pk->n_runner_ups; i++)
            free(pk->runner_ups[i].counts);
        free(pk->runner_ups);
    }
    free(r->kinds);
    free(r->configs);
    free(r->machine_kind);
    free(r->machine_used);
    free(r->reasons);
    memset(r, 0, sizeof(*r));
}
