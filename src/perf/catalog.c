/*
 * Device catalog: data/devices.yaml into perf_device records (per-device figures in SI units).
 */
#include "perf_internal.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define GIB 1073741824.0

static const char *const device_keys[] = {
    "name",         "vendor",      "memory_gib",      "bf16_tflops",   "mem_bw_gbs",
    "link",         "link_bw_gbs", "link_latency_us", "cost_per_hour", "runtime_overhead_gib",
    "weight_bytes", "pooled",      "efficiency",      "notes",         NULL,
};

static int parse_device(perf_yaml *y, yaml_node_t *n, int index, perf_device *d, loom_err *e)
{
    char ctx[64];
    snprintf(ctx, sizeof(ctx), "device %d", index + 1);
    int rc;
    if ((rc = perf_yaml_expect_map(y, n, ctx, e)) ||
        (rc = perf_yaml_check_keys(y, n, device_keys, ctx, e)))
        return rc;
    double mem, tflops, bw, link_bw, lat, cost, overhead;
    long long wb;
    if ((rc = perf_yaml_string(y, n, "name", true, NULL, d->name, sizeof(d->name), e)) ||
        (rc = perf_yaml_string(y, n, "vendor", false, "", d->vendor, sizeof(d->vendor), e)) ||
        (rc = perf_yaml_string(y, n, "link", false, "none", d->link, sizeof(d->link), e)) ||
        (rc = perf_yaml_number(y, n, "memory_gib", true, 0, 1e-3, 1e6, &mem, e)) ||
        (rc = perf_yaml_number(y, n, "bf16_tflops", true, 0, 1e-6, 1e6, &tflops, e)) ||
        (rc = perf_yaml_number(y, n, "mem_bw_gbs", true, 0, 1e-3, 1e7, &bw, e)) ||
        (rc = perf_yaml_number(y, n, "link_bw_gbs", false, 0, 0, 1e7, &link_bw, e)) ||
        (rc = perf_yaml_number(y, n, "link_latency_us", false, 0, 0, 1e6, &lat, e)) ||
        (rc = perf_yaml_number(y, n, "cost_per_hour", false, 0, 0, 1e6, &cost, e)) ||
        (rc = perf_yaml_number(y, n, "runtime_overhead_gib", false, 1.0, 0, 1e6, &overhead, e)) ||
        (rc = perf_yaml_int(y, n, "weight_bytes", false, 2, 1, 8, &wb, e)) ||
        (rc = perf_yaml_bool(y, n, "pooled", false, &d->pooled, e)))
        return rc;
    if (!d->name[0])
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s: name is empty", y->what, perf_yaml_line(n),
                         ctx);
    d->mem_bytes = mem * GIB;
    d->flops = tflops * 1e12;
    d->mem_bw = bw * 1e9;
    d->link_bw = link_bw * 1e9;
    d->link_latency = lat * 1e-6;
    d->cost_per_hour = cost;
    d->runtime_overhead = overhead * GIB;
    d->weight_bytes = (int)wb;
    perf_coef_default(&d->coef);
    if ((rc = perf_coef_from_yaml(y, perf_yaml_get(y, n, "efficiency"), "efficiency", &d->coef,
                                  NULL, e)))
        return rc;
    if (!d->pooled && d->link_bw <= 0 && strcasecmp(d->link, "none") != 0)
        return loom_errf(e, LOOM_EFORMAT, "%s:%d: %s (%s): link_bw_gbs must be > 0 for link %s",
                         y->what, perf_yaml_line(n), ctx, d->name, d->link);
    return LOOM_OK;
}

int perf_catalog_parse(const char *text, size_t len, perf_catalog *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    perf_yaml y;
    int rc = perf_yaml_load(&y, text, len, "devices.yaml", e);
    if (rc)
        return rc;
    yaml_node_t *root = perf_yaml_root(&y);
    static const char *const top_keys[] = {"devices", NULL};
    yaml_node_t *list = NULL;
    if ((rc = perf_yaml_expect_map(&y, root, "the catalog", e)) ||
        (rc = perf_yaml_check_keys(&y, root, top_keys, "the catalog", e)))
        goto done;
    list = perf_yaml_get(&y, root, "devices");
    if (!list) {
        rc = loom_errf(e, LOOM_EFORMAT, "devices.yaml: missing 'devices:' list");
        goto done;
    }
    if ((rc = perf_yaml_expect_seq(&y, list, "devices", e)))
        goto done;
    int n = perf_yaml_seq_len(list);
    if (n == 0) {
        rc = loom_errf(e, LOOM_EFORMAT, "devices.yaml:%d: the device list is empty",
                       perf_yaml_line(list));
        goto done;
    }
    out->devices = xcalloc((size_t)n, sizeof(perf_device));
    for (int i = 0; i < n; i++) {
        yaml_node_t *item = perf_yaml_seq_item(&y, list, i);
        if ((rc = parse_device(&y, item, i, &out->devices[i], e)))
            goto done;
        for (int j = 0; j < i; j++) {
            if (!strcasecmp(out->devices[j].name, out->devices[i].name)) {
                rc = loom_errf(e, LOOM_EFORMAT, "devices.yaml:%d: device '%s' listed twice",
                               perf_yaml_line(item), out->devices[i].name);
                goto done;
            }
        }
        out->n = i + 1;
    }
done:
    perf_yaml_free(&y);
    if (rc)
        perf_catalog_free(out);
    return rc;
}

int perf_catalog_load(const char *path, perf_catalog *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    if (!path)
        path = perf_catalog_default_path();
    if (!path)
        return loom_errf(e, LOOM_ENOTFOUND,
                         "device catalog not found: run from the repository root (it reads "
                         "data/devices.yaml), or pass --catalog FILE, or set LOOM_CATALOG");
    char *text = NULL;
    size_t len = 0;
    int rc = loom_read_file(path, &text, &len, e);
    if (rc)
        return rc;
    rc = perf_catalog_parse(text, len, out, e);
    free(text);
    if (rc && e) {
        /* "devices.yaml:12: x" -> "<path>:12: x" */
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        const char *rest = strncmp(msg, "devices.yaml", 12) == 0 ? msg + 12 : msg;
        loom_errf(e, rc, "%s%s%s", path, rest == msg ? ": " : "", rest);
        return rc;
    }
    if (!rc)
        out->path = xstrdup(path);
    return rc;
}

void perf_catalog_free(perf_catalog *c)
{
    if (!c)
        return;
    free(c->devices);
    free(c->path);
    memset(c, 0, sizeof(*c));
}

const perf_device *perf_catalog_find(const perf_catalog *c, const char *name)
{
    if (!c || !name)
        return NULL;
    for (int i = 0; i < c->n; i++)
        if (!strcasecmp(c->devices[i].name, name))
            return &c->devices[i];
    return NULL;
}

const char *perf_catalog_default_path(void)
{
    static char found[PATH_MAX];
    const char *env = getenv("LOOM_CATALOG");
    if (env && *env)
        return access(env, R_OK) == 0 ? env : NULL;
    if (access("data/devices.yaml", R_OK) == 0)
        return "data/devices.yaml";
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0)
        return NULL;
    exe[n] = 0;
    /* build/loom -> ../data; build-x/tests/unit/perf/test_y -> ../../../../data */
    for (int up = 1; up <= 5; up++) {
        char *slash = strrchr(exe, '/');
        if (!slash)
            break;
        *slash = 0;
        snprintf(found, sizeof(found), "%.*s/data/devices.yaml", (int)(sizeof(found) - 20), exe);
        if (access(found, R_OK) == 0)
            return found;
    }
    return NULL;
}
