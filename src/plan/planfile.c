/*
 * plan.yaml: the deployment a plan decides (what `loom up` starts and the gateway's capacities),
 * its writer, a validating parser, and checks against a cluster and the memory model. Numbers
 * are written in the shortest form that reads back exactly, so parse(write(p)) == p.
 */
#include "loom/plan.h"

#include "../perf/perf_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* v rounded to `decimals` places. n / 10^k is correctly rounded, so the result is the double
 * nearest that decimal and prints back short. */
static double round_to(double v, int decimals)
{
    static const double scale[] = {1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6};
    double s = scale[decimals];
    double n = round(v * s);
    return fabs(n) < 9e15 ? n / s : v;
}

int plan_result_to_file(const plan_result *r, plan_file *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    snprintf(out->model, sizeof(out->model), "%s", r->model_name);
    snprintf(out->objective, sizeof(out->objective), "%s", plan_objective_name(r->opts.objective));
    snprintf(out->workload, sizeof(out->workload), "%s", r->workload.source);
    out->mean_input = round_to(r->workload.mean_in, 2);
    out->mean_output = round_to(r->workload.mean_out, 2);
    out->instances =
        xcalloc((size_t)(r->n_instances > 0 ? r->n_instances : 1), sizeof(plan_file_instance));
    for (int i = 0; i < r->cluster->n; i++) {
        if (!r->machine_used[i])
            continue;
        const plan_machine *m = &r->cluster->machines[i];
        const plan_kind *k = &r->kinds[r->machine_kind[i]];
        int next_device = 0;
        for (int j = 0; j < k->n_tps; j++) {
            const plan_config *c = k->tps[j];
            for (int n = 0; n < k->best.counts[j]; n++) {
                plan_file_instance *in = &out->instances[out->n_instances++];
                snprintf(in->machine, sizeof(in->machine), "%s", m->name);
                snprintf(in->host, sizeof(in->host), "%s", m->host);
                snprintf(in->device, sizeof(in->device), "%s", c->device->name);
                in->tp = c->tp;
                in->devices = xmalloc(sizeof(int) * (size_t)c->tp);
                for (int t = 0; t < c->tp; t++)
                    in->devices[t] = next_device++;
                in->block_size = c->setup.limits.block_size;
                in->kv_blocks = c->est.mem.kv_blocks;
                in->max_batch = c->est.batch;
                in->prefill_tokens_per_s = round_to(c->est.prefill_tokens_per_s, 3);
                in->decode_tokens_per_s = round_to(c->est.decode_tokens_per_s, 3);
                in->output_tokens_per_s = round_to(c->est.output_tokens_per_s, 3);
                in->total_tokens_per_s = round_to(c->est.total_tokens_per_s, 3);
                in->requests_per_s = round_to(c->est.requests_per_s, 6);
                out->output_tokens_per_s += in->output_tokens_per_s;
                out->total_tokens_per_s += in->total_tokens_per_s;
                out->requests_per_s += in->requests_per_s;
            }
        }
    }
    if (out->n_instances != r->n_instances) {
        plan_file_free(out);
        return loom_errf(e, LOOM_EINVAL, "plan: %d instances listed, %d counted", out->n_instances,
                         r->n_instances);
    }
    out->output_tokens_per_s = round_to(out->output_tokens_per_s, 3);
    out->total_tokens_per_s = round_to(out->total_tokens_per_s, 3);
    out->requests_per_s = round_to(out->requests_per_s, 6);
    out->cost_per_hour = round_to(r->cost_per_hour, 4);
    return LOOM_OK;
}

static void put_num(loom_buf *b, const char *indent, const char *key, double v)
{
    char s[40];
    perf_fmt_double(v, s, sizeof(s));
    buf_printf(b, "%s%s: %s\n", indent, key, s);
}

static void put_str(loom_buf *b, const char *indent, const char *key, const char *v)
{
    buf_printf(b, "%s%s: ", indent, key);
    perf_yaml_quote(b, v);
    buf_puts(b, "\n");
}

void plan_file_write(const plan_file *p, loom_buf *b)
{
    buf_puts(b, "# loom plan: the deployment `loom up` starts; rates are the planner's\n"
                "# predictions (what the gateway uses as instance capacities).\n");
    put_str(b, "", "model", p->model);
    buf_printf(b, "objective: %s\n", p->objective);
    put_str(b, "", "workload", p->workload);
    put_num(b, "", "mean_input", p->mean_input);
    put_num(b, "", "mean_output", p->mean_output);
    buf_puts(b, "predicted:\n");
    put_num(b, "  ", "output_tokens_per_s", p->output_tokens_per_s);
    put_num(b, "  ", "total_tokens_per_s", p->total_tokens_per_s);
    put_num(b, "  ", "requests_per_s", p->requests_per_s);
    put_num(b, "  ", "cost_per_hour", p->cost_per_hour);
    buf_puts(b, "instances:\n");
    for (int i = 0; i < p->n_instances; i++) {
        const plan_file_instance *in = &p->instances[i];
        put_str(b, "  - ", "machine", in->machine);
        if (in->host[0])
            put_str(b, "    ", "host", in->host);
        put_str(b, "    ", "device", in->device);
        buf_printf(b, "    tp: %d\n    devices: [", in->tp);
        for (int t = 0; t < in->tp; t++)
            buf_printf(b, "%s%d", t ? ", " : "", in->devices[t]);
        buf_printf(b, "]\n    block_size: %d\n    kv_blocks: %lld\n    max_batch: %d\n",
                   in->block_size, (long long)in->kv_blocks, in->max_batch);
        put_num(b, "    ", "prefill_tokens_per_s", in->prefill_tokens_per_s);
        put_num(b, "    ", "decode_tokens_per_s", in->decode_tokens_per_s);
        put_num(b, "    ", "output_tokens_per_s", in->output_tokens_per_s);
        put_num(b, "    ", "total_tokens_per_s", in->total_tokens_per_s);
        put_num(b, "    ", "requests_per_s", in->requests_per_s);
    }
}

static int parse_instance(perf_yaml *y, yaml_node_t *n, int index, plan_file_instance *in,
                          loom_err *e)
{
    static const char *const keys[] = {"machine",
                                       "host",
                                       "device",
                                       "tp",
                                       "devices",
                                       "block_size",
                                       "kv_blocks",
                                       "max_batch",
                                       "prefill_tokens_per_s",
                                       "decode_tokens_per_s",
                                       "output_tokens_per_s",
                                       "total_tokens_per_s",
                                       "requests_per_s",
                                       NULL};
    char ctx[48];
    snprintf(ctx, sizeof(ctx), "instance %d", index + 1);
    long long tp, bs, kvb, mb;
    int rc;
    if ((rc = perf_yaml_expect_map(y, n, ctx, e)) ||
        (rc = perf_yaml_check_keys(y, n, keys, ctx, e)) ||
        (rc = perf_yaml_string(y, n, "machine", true, NULL, in->machine, sizeof(in->machine), e)) ||
        (rc = perf_yaml_string(y, n, "host", false, "", in->host, sizeof(in->host), e)) ||
        (rc = perf_yaml_string(y, n, "device", true, NULL, in->device, sizeof(in->device), e)) ||
        (rc = perf_yaml_int(y, n, "tp", true, 1, 1, PLAN_MAX_DEVICES_PER_MACHINE, &tp, e)) ||
        (rc = perf_yaml_int(y, n, "block_size", true, 16, 1, 1 << 20, &bs, e)) ||
        (rc = perf_yaml_int(y, n, "kv_blocks", true, 0, 1, (long long)1 << 50, &kvb, e)) ||
        (rc = perf_yaml_int(y, n, "max_batch", true, 0, 1, 1 << 24, &mb, e)) ||
        (rc = perf_yaml_number(y, n, "prefill_tokens_per_s", true, 0, 0, 1e15,
                               &in->prefill_tokens_per_s, e)) ||
        (rc = perf_yaml_number(y, n, "decode_tokens_per_s", true, 0, 0, 1e15,
                               &in->decode_tokens_per_s, e)) ||
        (rc = perf_yaml_number(y, n, "output_tokens_per_s", true, 0, 0, 1e15,
                               &in->output_tokens_per_s, e)) ||
        (rc = perf_yaml_number(y, n, "total_tokens_per_s", true, 0, 0, 1e15,
                               &in->total_tokens_per_s, e)) ||
        (rc = perf_yaml_number(y, n, "requests_per_s", true, 0, 0, 1e15, &in->requests_per_s, e)))
        return rc;
    in->tp = (int)tp;
    in->block_size = (int)bs;
    in->kv_blocks = kvb;
    in->max_batch = (int)mb;
    yaml_node_t *devs = perf_yaml_get(y, n, "devices");
    if (!devs)
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: missing 'devices'", y->what,
                         perf_yaml_line(n), ctx);
    if ((rc = perf_yaml_expect_seq(y, devs, "devices", e)))
        return rc;
    if (perf_yaml_seq_len(devs) != in->tp)
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: tp %d but %d devices", y->what,
                         perf_yaml_line(devs), ctx, in->tp, perf_yaml_seq_len(devs));
    in->devices = xmalloc(sizeof(int) * (size_t)in->tp);
    for (int t = 0; t < in->tp; t++) {
        double v;
        yaml_node_t *item = perf_yaml_seq_item(y, devs, t);
        if ((rc = perf_yaml_node_number(y, item, "a device index", 0,
                                        PLAN_MAX_DEVICES_PER_MACHINE - 1, &v, e)))
            return rc;
        if (floor(v) != v)
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: device index must be an integer", y->what,
                             perf_yaml_line(item));
        in->devices[t] = (int)v;
    }
    return LOOM_OK;
}

static int cmp_instance_machine(const void *a, const void *b)
{
    const plan_file_instance *const *x = a, *const *y = b;
    return strcmp((*x)->machine, (*y)->machine);
}

/* Devices of one machine are used once; one machine has one device kind and one host. */
static int check_disjoint(const plan_file *p, loom_err *e)
{
    const plan_file_instance **by = xmalloc(sizeof(*by) * (size_t)(p->n_instances + 1));
    for (int i = 0; i < p->n_instances; i++)
        by[i] = &p->instances[i];
    qsort(by, (size_t)p->n_instances, sizeof(*by), cmp_instance_machine);
    unsigned char *seen = xcalloc(PLAN_MAX_DEVICES_PER_MACHINE, 1);
    int rc = LOOM_OK;
    for (int i = 0; i < p->n_instances && !rc; i++) {
        if (i == 0 || strcmp(by[i]->machine, by[i - 1]->machine))
            memset(seen, 0, PLAN_MAX_DEVICES_PER_MACHINE);
        else if (strcasecmp(by[i]->device, by[i - 1]->device) ||
                 strcmp(by[i]->host, by[i - 1]->host))
            rc = loom_errf(e, LOOM_EFORMAT,
                           "plan: machine '%s' has instances with different "
                           "devices or hosts",
                           by[i]->machine);
        for (int t = 0; t < by[i]->tp && !rc; t++) {
            int dv = by[i]->devices[t];
            if (seen[dv])
                rc = loom_errf(e, LOOM_EFORMAT,
                               "plan: device %d of machine '%s' is in two "
                               "instances",
                               dv, by[i]->machine);
            seen[dv] = 1;
        }
    }
    free(seen);
    free(by);
    return rc;
}

static bool close_to(double a, double b)
{
    return fabs(a - b) <= 1e-6 * fmax(fabs(a), fabs(b)) + 1e-3;
}

int plan_file_parse(const char *text, size_t len, plan_file *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    perf_yaml y;
    int rc = perf_yaml_load(&y, text, len, "plan.yaml", e);
    if (rc)
        return rc;
    static const char *const keys[] = {"model",       "objective", "workload",  "mean_input",
                                       "mean_output", "predicted", "instances", NULL};
    static const char *const pkeys[] = {"output_tokens_per_s", "total_tokens_per_s",
                                        "requests_per_s", "cost_per_hour", NULL};
    yaml_node_t *root = perf_yaml_root(&y), *pred, *list;
    plan_objective obj;
    if ((rc = perf_yaml_expect_map(&y, root, "the plan", e)) ||
        (rc = perf_yaml_check_keys(&y, root, keys, "the plan", e)) ||
        (rc = perf_yaml_string(&y, root, "model", true, NULL, out->model, sizeof(out->model), e)) ||
        (rc = perf_yaml_string(&y, root, "objective", true, NULL, out->objective,
                               sizeof(out->objective), e)) ||
        (rc = perf_yaml_string(&y, root, "workload", false, "", out->workload,
                               sizeof(out->workload), e)) ||
        (rc = perf_yaml_number(&y, root, "mean_input", true, 0, 0, 1e9, &out->mean_input, e)) ||
        (rc = perf_yaml_number(&y, root, "mean_output", true, 0, 0, 1e9, &out->mean_output, e)))
        goto done;
    if (plan_objective_parse(out->objective, &obj)) {
        rc = loom_errf(e, LOOM_EFORMAT,
                       "plan.yaml:%d: objective must be throughput, "
                       "throughput-per-cost or min-cost",
                       perf_yaml_line(perf_yaml_get(&y, root, "objective")));
        goto done;
    }
    pred = perf_yaml_get(&y, root, "predicted");
    if (!pred) {
        rc = loom_errf(e, LOOM_EFORMAT, "plan.yaml: missing 'predicted:'");
        goto done;
    }
    if ((rc = perf_yaml_expect_map(&y, pred, "predicted", e)) ||
        (rc = perf_yaml_check_keys(&y, pred, pkeys, "predicted", e)) ||
        (rc = perf_yaml_number(&y, pred, "output_tokens_per_s", true, 0, 0, 1e18,
                               &out->output_tokens_per_s, e)) ||
        (rc = perf_yaml_number(&y, pred, "total_tokens_per_s", true, 0, 0, 1e18,
                               &out->total_tokens_per_s, e)) ||
        (rc = perf_yaml_number(&y, pred, "requests_per_s", true, 0, 0, 1e18, &out->requests_per_s,
                               e)) ||
        (rc = perf_yaml_number(&y, pred, "cost_per_hour", false, 0, 0, 1e15, &out->cost_per_hour,
                               e)))
        goto done;
    list = perf_yaml_get(&y, root, "instances");
    if (!list) {
        rc = loom_errf(e, LOOM_EFORMAT, "plan.yaml: missing 'instances:'");
        goto done;
    }
    if ((rc = perf_yaml_expect_seq(&y, list, "instances", e)))
        goto done;
    int n = perf_yaml_seq_len(list);
    if (n == 0) {
        rc = loom_errf(e, LOOM_EFORMAT, "plan.yaml:%d: the plan has no instances",
                       perf_yaml_line(list));
        goto done;
    }
    out->instances = xcalloc((size_t)n, sizeof(plan_file_instance));
    double sum_out = 0, sum_total = 0, sum_req = 0;
    for (int i = 0; i < n; i++) {
        out->n_instances = i + 1;
        plan_file_instance *in = &out->instances[i];
        if ((rc = parse_instance(&y, perf_yaml_seq_item(&y, list, i), i, in, e)))
            goto done;
        sum_out += in->output_tokens_per_s;
        sum_total += in->total_tokens_per_s;
        sum_req += in->requests_per_s;
    }
    if ((rc = check_disjoint(out, e)))
        goto done;
    if (!close_to(sum_out, out->output_tokens_per_s) ||
        !close_to(sum_total, out->total_tokens_per_s) || !close_to(sum_req, out->requests_per_s)) {
        rc = loom_errf(e, LOOM_EFORMAT,
                       "plan.yaml:%d: predicted totals (%.3f output tok/s) "
                       "are not the sums over the instances (%.3f)",
                       perf_yaml_line(pred), out->output_tokens_per_s, sum_out);
        goto done;
    }
done:
    perf_yaml_free(&y);
    if (rc)
        plan_file_free(out);
    return rc;
}

int plan_file_load(const char *path, plan_file *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    char *text = NULL;
    size_t len = 0;
    int rc = loom_read_file(path, &text, &len, e);
    if (rc)
        return rc;
    rc = plan_file_parse(text, len, out, e);
    free(text);
    if (rc && e) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        const char *rest = strncmp(msg, "plan.yaml", 9) == 0 ? msg + 9
                           : strncmp(msg, "plan: ", 6) == 0  ? msg + 4
                                                             : msg;
        loom_errf(e, rc, "%s%s%s", path, rest == msg ? ": " : "", rest);
    }
    return rc;
}

void plan_file_free(plan_file *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->n_instances; i++)
        free(p->instances[i].devices);
    free(p->instances);
    memset(p, 0, sizeof(*p));
}

bool plan_file_equal(const plan_file *a, const plan_file *b)
{
    if (strcmp(a->model, b->model) || strcmp(a->objective, b->objective) ||
        strcmp(a->workload, b->workload) || a->mean_input != b->mean_input ||
        a->mean_output != b->mean_output || a->output_tokens_per_s != b->output_tokens_per_s ||
        a->total_tokens_per_s != b->total_tokens_per_s || a->requests_per_s != b->requests_per_s ||
        a->cost_per_hour != b->cost_per_hour || a->n_instances != b->n_instances)
        return false;
    for (int i = 0; i < a->n_instances; i++) {
        const plan_file_instance *x = &a->instances[i], *y = &b->instances[i];
        if (strcmp(x->machine, y->machine) || strcmp(x->host, y->host) ||
            strcmp(x->device, y->device) || x->tp != y->tp || x->block_size != y->block_size ||
            x->kv_blocks != y->kv_blocks || x->max_batch != y->max_batch ||
            x->prefill_tokens_per_s != y->prefill_tokens_per_s ||
            x->decode_tokens_per_s != y->decode_tokens_per_s ||
            x->output_tokens_per_s != y->output_tokens_per_s ||
            x->total_tokens_per_s != y->total_tokens_per_s ||
            x->requests_per_s != y->requests_per_s ||
            memcmp(x->devices, y->devices, sizeof(int) * (size_t)x->tp))
            return false;
    }
    return true;
}

static int cmp_machine_name(const void *a, const void *b)
{
    const plan_machine *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

int plan_file_check(const plan_file *p, const plan_cluster *cluster, const model_config *mc,
                    const perf_catalog *catalog, const plan_options *opts, loom_err *e)
{
    int n_machines = cluster ? cluster->n : 0;
    const plan_machine **sorted = xmalloc(sizeof(*sorted) * (size_t)(n_machines + 1));
    for (int i = 0; i < n_machines; i++)
        sorted[i] = &cluster->machines[i];
    qsort(sorted, (size_t)n_machines, sizeof(*sorted), cmp_machine_name);
    int rc = LOOM_OK;
    for (int i = 0; i < p->n_instances && !rc; i++) {
        const plan_file_instance *in = &p->instances[i];
        if (cluster) {
            plan_machine key;
            snprintf(key.name, sizeof(key.name), "%s", in->machine);
            const plan_machine *kp = &key, *const *hit = bsearch(&kp, sorted, (size_t)n_machines,
                                                                 sizeof(*sorted), cmp_machine_name);
            if (!hit) {
                rc = loom_errf(e, LOOM_EINVAL, "instance %d: machine '%s' is not in the cluster",
                               i + 1, in->machine);
                break;
            }
            const plan_machine *m = *hit;
            if (strcasecmp(m->device, in->device)) {
                rc = loom_errf(e, LOOM_EINVAL, "instance %d: machine '%s' has %s, the plan says %s",
                               i + 1, m->name, m->device, in->device);
                break;
            }
            for (int t = 0; t < in->tp; t++)
                if (in->devices[t] >= m->count) {
                    rc = loom_errf(e, LOOM_EINVAL, "instance %d: device %d but machine '%s' has %d",
                                   i + 1, in->devices[t], m->name, m->count);
                    break;
                }
        }
        if (rc || !mc || !catalog)
            continue;
        const perf_device *dev = perf_catalog_find(catalog, in->device);
        if (!dev) {
            rc = loom_errf(e, LOOM_ENOTFOUND, "instance %d: device '%s' is not in the catalog",
                           i + 1, in->device);
            break;
        }
        perf_model pm;
        int wb = opts && opts->weight_bytes > 0 ? opts->weight_bytes : dev->weight_bytes;
        if ((rc = perf_model_init(&pm, mc, NULL, wb, wb, e)))
            break;
        char why[160];
        if (!perf_tp_valid(&pm, dev, in->tp, why, sizeof(why))) {
            rc = loom_errf(e, LOOM_EINVAL, "instance %d: tp %s", i + 1, why);
            break;
        }
        perf_setup s;
        perf_setup_init(&s, &pm, dev, in->tp);
        if (opts)
            s.limits = opts->limits;
        s.limits.block_size = in->block_size;
        perf_lengths w = {p->mean_input, p->mean_output, p->mean_input * p->mean_input};
        perf_memory mem;
        perf_memory_plan(&s, &w, &mem);
        if (mem.kv <= 0 || in->kv_blocks > mem.kv_blocks) {
            rc = loom_errf(e, LOOM_EINVAL,
                           "instance %d (%s, %d x %s): %lld KV blocks but the "
                           "memory model allows %lld%s%s",
                           i + 1, in->machine, in->tp, in->device, (long long)in->kv_blocks,
                           (long long)(mem.kv > 0 ? mem.kv_blocks : 0), mem.why[0] ? ": " : "",
                           mem.why);
            break;
        }
    }
    free(sorted);
    return rc;
}
