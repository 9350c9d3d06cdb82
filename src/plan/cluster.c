/*
 * cluster.yaml: the machines of a cluster, each one device kind and a count. Replicas expand
 * into numbered machines so that the rest of the planner sees one record per machine.
 */
#include "loom/plan.h"

#include "../perf/yaml_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const machine_keys[] = {"name",  "device",        "count",    "host",
                                           "hosts", "cost_per_hour", "replicas", NULL};

/* Open-addressing set of machine names, to reject duplicates in O(n). */
typedef struct name_set {
    size_t cap;
    int *slot; /* machine index + 1, 0 = empty */
} name_set;

static bool name_set_add(name_set *s, const plan_machine *m, int idx, int *dup)
{
    uint64_t h = loom_hash64(m[idx].name, strlen(m[idx].name), 7);
    for (size_t i = h & (s->cap - 1);; i = (i + 1) & (s->cap - 1)) {
        if (!s->slot[i]) {
            s->slot[i] = idx + 1;
            return true;
        }
        if (!strcmp(m[s->slot[i] - 1].name, m[idx].name)) {
            *dup = s->slot[i] - 1;
            return false;
        }
    }
}

static int parse_entry(perf_yaml *y, yaml_node_t *n, int index, plan_cluster *out, int *cap,
                       loom_err *e)
{
    char ctx[48];
    snprintf(ctx, sizeof(ctx), "machine %d", index + 1);
    int rc;
    if ((rc = perf_yaml_expect_map(y, n, ctx, e)) ||
        (rc = perf_yaml_check_keys(y, n, machine_keys, ctx, e)))
        return rc;
    plan_machine m;
    memset(&m, 0, sizeof(m));
    m.line = perf_yaml_line(n);
    long long count, replicas;
    if ((rc = perf_yaml_string(y, n, "name", true, NULL, m.name, sizeof(m.name) - 8, e)) ||
        (rc = perf_yaml_string(y, n, "device", true, NULL, m.device, sizeof(m.device), e)) ||
        (rc = perf_yaml_int(y, n, "count", true, 1, 1, PLAN_MAX_DEVICES_PER_MACHINE, &count, e)) ||
        (rc = perf_yaml_string(y, n, "host", false, "", m.host, sizeof(m.host), e)) ||
        (rc = perf_yaml_number(y, n, "cost_per_hour", false, 0, 0, 1e9, &m.cost_per_hour, e)) ||
        (rc = perf_yaml_int(y, n, "replicas", false, 1, 1, PLAN_MAX_MACHINES, &replicas, e)))
        return rc;
    if (!m.name[0] || !m.device[0])
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: name and device must not be empty", y->what,
                         m.line, ctx);
    for (const char *p = m.name; *p; p++)
        if ((unsigned char)*p < 0x20)
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: name has control characters", y->what,
                             m.line, ctx);
    m.count = (int)count;
    yaml_node_t *hosts = perf_yaml_get(y, n, "hosts");
    int n_hosts = 0;
    if (hosts) {
        if ((rc = perf_yaml_expect_seq(y, hosts, "hosts", e)))
            return rc;
        n_hosts = perf_yaml_seq_len(hosts);
        if (m.host[0])
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: give host or hosts, not both", y->what,
                             m.line, ctx);
        if (n_hosts == 0)
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: hosts is empty", y->what,
                             perf_yaml_line(hosts), ctx);
        if (perf_yaml_get(y, n, "replicas") && replicas != n_hosts)
            return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: replicas %lld but %d hosts", y->what,
                             m.line, ctx, replicas, n_hosts);
        replicas = n_hosts;
    } else if (m.host[0] && replicas > 1) {
        return loom_errf(e, LOOM_EFORMAT,
                         "%s:%d: %s: host names one machine but replicas is %lld: list the "
                         "machines' addresses under hosts:",
                         y->what, m.line, ctx, replicas);
    }
    if ((long long)out->n + replicas > PLAN_MAX_MACHINES)
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: more than %d machines", y->what, m.line,
                         PLAN_MAX_MACHINES);
    bool numbered = perf_yaml_get(y, n, "replicas") || hosts;
    for (long long r = 0; r < replicas; r++) {
        if (out->n == *cap) {
            *cap = *cap ? *cap * 2 : 16;
            out->machines = xrealloc(out->machines, sizeof(plan_machine) * (size_t)*cap);
        }
        plan_machine *dst = &out->machines[out->n];
        *dst = m;
        if (numbered)
            snprintf(dst->name, sizeof(dst->name), "%.48s-%d", m.name, (int)r);
        if (hosts) {
            yaml_node_t *h = perf_yaml_seq_item(y, hosts, (int)r);
            const char *hs = perf_yaml_scalar(h);
            if (!hs || !*hs || strlen(hs) >= sizeof(dst->host))
                return loom_errf(e, LOOM_EFORMAT,
                                 "%s:%d: %s: hosts entries must be strings of at most %zu bytes",
                                 y->what, perf_yaml_line(h), ctx, sizeof(dst->host) - 1);
            snprintf(dst->host, sizeof(dst->host), "%s", hs);
        }
        out->n++;
    }
    return LOOM_OK;
}

int plan_cluster_parse(const char *text, size_t len, plan_cluster *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    perf_yaml y;
    int rc = perf_yaml_load(&y, text, len, "cluster.yaml", e);
    if (rc)
        return rc;
    static const char *const top_keys[] = {"machines", "name", "description", NULL};
    yaml_node_t *root = perf_yaml_root(&y), *list;
    int cap = 0;
    name_set names = {0, NULL};
    if ((rc = perf_yaml_expect_map(&y, root, "the cluster", e)) ||
        (rc = perf_yaml_check_keys(&y, root, top_keys, "the cluster", e)))
        goto done;
    list = perf_yaml_get(&y, root, "machines");
    if (!list) {
        rc = loom_errf(e, LOOM_EFORMAT, "cluster.yaml:%d: missing 'machines:' list",
                       perf_yaml_line(root));
        goto done;
    }
    if ((rc = perf_yaml_expect_seq(&y, list, "machines", e)))
        goto done;
    for (int i = 0; i < perf_yaml_seq_len(list); i++)
        if ((rc = parse_entry(&y, perf_yaml_seq_item(&y, list, i), i, out, &cap, e)))
            goto done;
    if (out->n == 0) {
        rc = loom_errf(e, LOOM_EFORMAT, "cluster.yaml:%d: the cluster has no machines",
                       perf_yaml_line(list));
        goto done;
    }
    names.cap = 16;
    while (names.cap < (size_t)out->n * 2)
        names.cap *= 2;
    names.slot = xcalloc(names.cap, sizeof(int));
    for (int i = 0; i < out->n; i++) {
        int dup = -1;
        if (!name_set_add(&names, out->machines, i, &dup)) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "cluster.yaml:%d: machine name '%s' is also used on line %d",
                           out->machines[i].line, out->machines[i].name, out->machines[dup].line);
            goto done;
        }
    }
done:
    free(names.slot);
    perf_yaml_free(&y);
    if (rc)
        plan_cluster_free(out);
    return rc;
}

int plan_cluster_load(const char *path, plan_cluster *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    char *text = NULL;
    size_t len = 0;
    int rc = loom_read_file(path, &text, &len, e);
    if (rc)
        return rc;
    rc = plan_cluster_parse(text, len, out, e);
    free(text);
    if (rc && e) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        const char *rest = strncmp(msg, "cluster.yaml", 12) == 0 ? msg + 12 : msg;
        loom_errf(e, rc, "%s%s%s", path, rest == msg ? ": " : "", rest);
    }
    return rc;
}

void plan_cluster_free(plan_cluster *c)
{
    if (!c)
        return;
    free(c->machines);
    memset(c, 0, sizeof(*c));
}
