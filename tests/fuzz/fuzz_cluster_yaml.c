/* Fuzz target: arbitrary bytes as cluster.yaml through plan_cluster_parse. An accepted cluster
 * must be consistent (what plan_run relies on); small ones are planned for a tiny model. The
 * same bytes also go through the other YAML parsers of the planner (plan.yaml, the device
 * catalog), which share the accessors. */
#include "loom/model.h"
#include "loom/perf.h"
#include "loom/plan.h"

#include <stdlib.h>
#include <string.h>

static const char *catalog_text =
    "devices:\n"
    "  - {name: T4, memory_gib: 16, bf16_tflops: 65, mem_bw_gbs: 320, link: PCIe3, "
    "link_bw_gbs: 16, link_latency_us: 8, cost_per_hour: 0.5}\n"
    "  - {name: cpu, memory_gib: 1, bf16_tflops: 0.05, mem_bw_gbs: 8, weight_bytes: 4, "
    "pooled: true}\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    loom_err e;
    plan_cluster c;
    if (plan_cluster_parse((const char *)data, size, &c, &e) == LOOM_OK) {
        if (c.n < 1 || c.n > PLAN_MAX_MACHINES)
            abort();
        for (int i = 0; i < c.n; i++) {
            const plan_machine *m = &c.machines[i];
            if (m->count < 1 || m->count > PLAN_MAX_DEVICES_PER_MACHINE || !m->name[0] ||
                !m->device[0] || m->cost_per_hour < 0 || m->line < 1 ||
                strlen(m->name) >= sizeof(m->name))
                abort();
            for (int j = 0; j < i && c.n <= 200; j++)
                if (!strcmp(c.machines[j].name, m->name))
                    abort();
        }
        if (c.n <= 16) {
            perf_catalog cat;
            model_config mc;
            plan_workload w;
            plan_options o;
            plan_result r;
            if (perf_catalog_parse(catalog_text, strlen(catalog_text), &cat, &e) ||
                model_config_preset("qwen2-tiny", &mc, &e) ||
                plan_workload_synthetic("64", "16", &w, &e))
                abort();
            plan_options_default(&o);
            o.max_nodes = 100000;
            if (plan_run(&c, &mc, "qwen2-tiny", &w, &cat, &o, &r, &e) == LOOM_OK) {
                if (r.n_instances < 1 || !(r.tokens_per_s > 0))
                    abort();
                plan_file pf;
                if (plan_result_to_file(&r, &pf, &e) == LOOM_OK) {
                    if (plan_file_check(&pf, &c, &mc, &cat, &o, &e) != LOOM_OK)
                        abort();
                    plan_file_free(&pf);
                }
                plan_result_free(&r);
            }
            perf_catalog_free(&cat);
        }
        plan_cluster_free(&c);
    }
    plan_file p;
    if (plan_file_parse((const char *)data, size, &p, &e) == LOOM_OK) {
        loom_buf b;
        buf_init(&b);
        plan_file_write(&p, &b);
        plan_file q;
        if (plan_file_parse(b.data, b.len, &q, &e) != LOOM_OK || !plan_file_equal(&p, &q))
            abort();
        plan_file_free(&q);
        buf_free(&b);
        plan_file_free(&p);
    }
    perf_catalog cat;
    if (perf_catalog_parse((const char *)data, size, &cat, &e) == LOOM_OK) {
        for (int i = 0; i < cat.n; i++)
            if (!(cat.devices[i].flops > 0) || !(cat.devices[i].mem_bw > 0))
                abort();
        perf_catalog_free(&cat);
    }
    return 0;
}
