/*
 * The planner's readable output: the table `loom plan` prints, and `--explain DEVICE:TP`, which
 * walks through the memory and latency model of one configuration term by term.
 */
#include "loom/plan.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* 12345.6 -> "12,345.6" (decimals digits after the point). */
static const char *fmt_num(char *out, size_t cap, double v, int decimals)
{
    char raw[64];
    snprintf(raw, sizeof(raw), "%.*f", decimals, fabs(v));
    const char *dot = strchr(raw, '.');
    size_t int_len = dot ? (size_t)(dot - raw) : strlen(raw);
    size_t o = 0;
    if (v < 0 && o + 1 < cap)
        out[o++] = '-';
    for (size_t i = 0; i < int_len && o + 2 < cap; i++) {
        out[o++] = raw[i];
        size_t left = int_len - i - 1;
        if (left > 0 && left % 3 == 0)
            out[o++] = ',';
    }
    for (const char *p = dot; p && *p && o + 1 < cap; p++)
        out[o++] = *p;
    out[o] = 0;
    return out;
}

/* "4 x TP2 + 2 x TP1 (+2 idle)" */
static void describe_partition(const plan_kind *k, const plan_partition *p, char *out, size_t cap)
{
    size_t used = 0;
    out[0] = 0;
    for (int j = 0; j < k->n_tps && used < cap; j++) {
        if (!p->counts[j])
            continue;
        used += (size_t)snprintf(out + used, cap - used, "%s%d x TP%d", used ? " + " : "",
                                 p->counts[j], k->tps[j]->tp);
    }
    if (p->devices_used < k->count && used < cap)
        snprintf(out + used, cap - used, " (+%d idle)", k->count - p->devices_used);
}

void plan_print_table(const plan_result *r, FILE *f)
{
    char a[48], b[48], c[48], d[48];
    const plan_workload *w = &r->workload;
    fprintf(f, "loom plan: %s (%.2f B parameters", r->model_name, r->model_params / 1e9);
    if (r->model_active_params < r->model_params)
        fprintf(f, ", %.2f B active", r->model_active_params / 1e9);
    fprintf(f, ") for %s", w->source);
    if (w->n > 0)
        fprintf(f, ": %s requests", fmt_num(a, sizeof(a), (double)w->n, 0));
    fprintf(f, ", mean input %.1f, output %.1f tokens", w->mean_in, w->mean_out);
    if (w->rate > 0)
        fprintf(f, ", %.3g requests/s arriving", w->rate);
    fprintf(f,
            "\nobjective: %s; memory utilization %.2f, block size %d, max-num-seqs %d, "
            "token budget %d\n\n",
            plan_objective_name(r->opts.objective), r->opts.limits.mem_utilization,
            r->opts.limits.block_size, r->opts.limits.max_num_seqs,
            r->opts.limits.max_num_batched_tokens);

    fprintf(f, "configurations that fit (one instance each):\n");
    fprintf(f, "  %-14s %4s %11s %10s %6s %14s %13s %12s %8s  %s\n", "device", "TP", "weights/dev",
            "KV blocks", "batch", "prefill tok/s", "decode tok/s", "out tok/s", "prefill",
            "coefficients");
    for (int i = 0; i < r->n_configs; i++) {
        const plan_config *cf = &r->configs[i];
        if (!cf->fits)
            continue;
        char wbuf[32];
        perf_format_bytes(cf->est.mem.weights, wbuf, sizeof(wbuf));
        fprintf(f, "  %-14s %4d %11s %10s %6d %14s %13s %12s %7.1f%%  %s\n", cf->device->name,
                cf->tp, wbuf, fmt_num(a, sizeof(a), (double)cf->est.mem.kv_blocks, 0),
                cf->est.batch, fmt_num(b, sizeof(b), cf->est.prefill_tokens_per_s, 1),
                fmt_num(c, sizeof(c), cf->est.decode_tokens_per_s, 1),
                fmt_num(d, sizeof(d), cf->est.output_tokens_per_s, 1),
                100 * cf->est.prefill_fraction, cf->profiled ? "profile" : "catalog");
    }
    if (r->n_reasons) {
        fprintf(f, "\nrejected:\n");
        for (int i = 0; i < r->n_reasons; i++)
            fprintf(f, "  %s\n", r->reasons[i]);
    }

    fprintf(f, "\nmachines (one search per kind; runner-ups below each):\n");
    fprintf(f, "  %-22s %8s %5s  %-34s %16s %10s\n", "kind", "machines", "used", "best partition",
            "out tok/s each", "$/h each");
    for (int k = 0; k < r->n_kinds; k++) {
        const plan_kind *pk = &r->kinds[k];
        char kind[40], part[160];
        snprintf(kind, sizeof(kind), "%d x %s", pk->count, pk->device->name);
        if (!pk->feasible) {
            fprintf(f, "  %-22s %8d %5d  %-34s\n", kind, pk->n_machines, 0,
                    "no configuration fits (see rejected)");
            continue;
        }
        describe_partition(pk, &pk->best, part, sizeof(part));
        fprintf(f, "  %-22s %8d %5d  %-34s %16s %10.2f%s\n", kind, pk->n_machines,
                pk->machines_used, part, fmt_num(a, sizeof(a), pk->best.tokens_per_s, 1),
                pk->best.cost_per_hour, pk->truncated ? "  (search cut at the node limit)" : "");
        for (int i = 0; i < pk->n_runner_ups; i++) {
            const plan_partition *p = &pk->runner_ups[i];
            describe_partition(pk, p, part, sizeof(part));
            double rel = pk->best.score > 0 ? 100 * (p->score / pk->best.score - 1) : 0;
            fprintf(f, "  %-22s %8s %5s    %-32s %16s %+9.1f%%\n", "", "", "", part,
                    fmt_num(a, sizeof(a), p->tokens_per_s, 1), rel);
        }
    }
    fprintf(f,
            "\ntotal: %d instances on %d of %d machines: %s output tok/s (%s tok/s with "
            "prompts, %.4g requests/s)",
            r->n_instances, r->n_machines_used, r->cluster ? r->cluster->n : 0,
            fmt_num(a, sizeof(a), r->tokens_per_s, 1),
            fmt_num(b, sizeof(b), r->total_tokens_per_s, 1), r->requests_per_s);
    if (r->cost_per_hour > 0)
        fprintf(f, ", $%.2f/h, %s output tokens per dollar", r->cost_per_hour,
                fmt_num(c, sizeof(c), r->tokens_per_s * 3600 / r->cost_per_hour, 0));
    fprintf(f, "\n");
    if (r->opts.objective == PLAN_OBJ_MIN_COST) {
        fprintf(f, "min-cost: target %.4g requests/s; ", r->target_rate);
        if (r->min_cost_proven)
            fprintf(f, "the cheapest set, proven by branch and bound\n");
        else
            fprintf(f,
                    "best set found within the node limit, at most %.3f%% above the optimum "
                    "(lower bound $%.2f/h)\n",
                    r->min_cost_lower_bound > 0
                        ? 100 * (r->cost_per_hour / r->min_cost_lower_bound - 1)
                        : 0.0,
                    r->min_cost_lower_bound);
    }
}

static void explain_step(loom_buf *b, const perf_setup *s, const perf_step *st, const char *what)
{
    perf_terms t;
    double secs = perf_step_seconds(s, st, &t);
    const perf_coef *c = &s->coef;
    char w[32], kv[32], act[32], cm[32];
    perf_format_bytes(t.weight_bytes, w, sizeof(w));
    perf_format_bytes(t.kv_bytes, kv, sizeof(kv));
    perf_format_bytes(t.act_bytes, act, sizeof(act));
    perf_format_bytes(t.comm_bytes, cm, sizeof(cm));
    buf_printf(b, "%s\n", what);
    buf_printf(
        b,
        "  compute  %.4g FLOP/device / %.4g FLOP/s: prompt %.4f ms x %.3f + decode %.4f "
        "ms x %.3f + decode attention %.4f ms x %.3f = %.4f ms\n",
        t.flops, s->device->flops, 1e3 * t.t_compute_prefill, c->compute_prefill,
        1e3 * t.t_compute_decode, c->compute_decode, 1e3 * t.t_attention, c->attention,
        1e3 * (c->compute_prefill * t.t_compute_prefill + c->compute_decode * t.t_compute_decode +
               c->attention * t.t_attention));
    buf_printf(b,
               "  memory   weights %s + KV %s + activations %s per device / %.4g B/s "
               "= %.4f ms x %.3f = %.4f ms\n",
               w, kv, act, s->device->mem_bw, 1e3 * t.t_memory, c->memory,
               1e3 * c->memory * t.t_memory);
    if (s->tp > 1 && !s->device->pooled)
        buf_printf(b,
                   "  comm     %s in %d ring steps over %s (%.4g B/s, alpha %.3g us) "
                   "= %.4f ms x %.3f = %.4f ms\n",
                   cm, t.comm_steps, s->device->link, s->device->link_bw,
                   1e6 * s->device->link_latency, 1e3 * t.t_comm, c->comm,
                   1e3 * c->comm * t.t_comm);
    else
        buf_printf(b, "  comm     none (%s)\n", s->tp > 1 ? "shared memory" : "tp 1");
    if (c->host_token > 0)
        buf_printf(b, "  host     %.4g sampled tokens x %.4f ms = %.4f ms\n", t.sampled,
                   1e3 * c->host_token, 1e3 * c->host_token * t.sampled);
    buf_printf(b, "  overhead %.4f ms\n  step     %.4f ms\n", 1e3 * c->overhead, 1e3 * secs);
}

int plan_explain(const plan_result *r, const char *device, int tp, loom_buf *b, loom_err *e)
{
    const plan_config *cf = NULL;
    for (int i = 0; i < r->n_configs; i++)
        if (!strcasecmp(r->configs[i].device->name, device) && r->configs[i].tp == tp)
            cf = &r->configs[i];
    if (!cf)
        return loom_errf(e, LOOM_ENOTFOUND,
                         "no configuration %s:%d in this plan (the device "
                         "must be in the cluster and tp at most its machines' device count)",
                         device, tp);
    const perf_model *pm = &cf->model;
    const perf_device *dv = cf->device;
    const perf_memory *m = &cf->est.mem;
    char s1[32], s2[32], s3[32], s4[32], s5[32];
    buf_printf(b, "explain: %s on %d x %s, coefficients from the %s\n\n", r->model_name, tp,
               dv->name, cf->profiled ? "profile" : "catalog");
    perf_format_bytes(perf_model_weight_bytes(pm), s1, sizeof(s1));
    perf_format_bytes(pm->kv_bytes_per_token, s2, sizeof(s2));
    buf_printf(b,
               "model    %.4g parameters (%d layers, d %d, %d heads, %d KV heads, hd %d, "
               "vocab %d",
               pm->params_total, pm->n_layers, pm->hidden, pm->n_heads, pm->n_kv_heads,
               pm->head_dim, pm->vocab);
    if (pm->n_experts)
        buf_printf(b, ", %d experts top-%d in %d layers", pm->n_experts, pm->n_experts_per_tok,
                   pm->n_moe_layers);
    buf_printf(b,
               ")\n         weights %s at %d bytes; KV %s per token "
               "(2 x %d layers x %d KV heads x %d x %d bytes)\n",
               s1, pm->weight_bytes, s2, pm->n_layers, pm->n_kv_heads, pm->head_dim, pm->kv_bytes);
    perf_format_bytes(dv->mem_bytes, s1, sizeof(s1));
    buf_printf(b, "device   %s: %s, %.4g TFLOP/s, %.4g GB/s, link %s %.4g GB/s alpha %.3g us%s\n",
               dv->name, s1, dv->flops / 1e12, dv->mem_bw / 1e9, dv->link, dv->link_bw / 1e9,
               dv->link_latency * 1e6, dv->pooled ? " (pooled memory)" : "");
    if (!cf->tp_ok) {
        buf_printf(b, "\nrejected: TP=%d %s\n", tp, cf->why);
        return LOOM_OK;
    }
    perf_format_bytes(m->usable, s1, sizeof(s1));
    perf_format_bytes(m->weights, s2, sizeof(s2));
    perf_format_bytes(m->activations, s3, sizeof(s3));
    perf_format_bytes(m->runtime, s4, sizeof(s4));
    perf_format_bytes(m->kv, s5, sizeof(s5));
    buf_printf(b,
               "\nmemory per device: usable %s (%.2f x memory) - weights %s (W/%d) - "
               "activations %s - runtime %s = KV %s\n",
               s1, cf->setup.limits.mem_utilization, s2, tp, s3, s4, s5);
    if (!m->fits) {
        buf_printf(b, "rejected: %s\n", m->why);
        return LOOM_OK;
    }
    int bs = cf->setup.limits.block_size;
    double req = r->lengths.mean_in + r->lengths.mean_out;
    buf_printf(b,
               "  -> %lld KV tokens = %lld blocks of %d; a request of %.1f tokens takes %.0f "
               "blocks -> batch %d (max-num-seqs %d)\n",
               (long long)m->kv_tokens, (long long)m->kv_blocks, bs, req, ceil(req / bs),
               m->max_batch, cf->setup.limits.max_num_seqs);
    const perf_coef *p = &cf->setup.coef;
    buf_printf(b,
               "\ncoefficients: overhead %.3f ms, compute %.3f (prompt tokens) / %.3f (decode "
               "tokens) / %.3f (decode attention), memory %.3f, comm %.3f, host %.4f ms per "
               "sampled token\n\n",
               1e3 * p->overhead, p->compute_prefill, p->compute_decode, p->attention, p->memory,
               p->comm, 1e3 * p->host_token);

    const perf_estimate *est = &cf->est;
    double in = r->lengths.mean_in > 1 ? r->lengths.mean_in : 1;
    double out = r->lengths.mean_out > 1 ? r->lengths.mean_out : 1;
    double B = est->batch, T = cf->setup.limits.max_num_batched_tokens;
    perf_step st;
    char what[200];
    double chunk = fmin(T, B * in);
    perf_step_prefill(&st, chunk, in, r->lengths.mean_in_sq > 0 ? r->lengths.mean_in_sq : in * in);
    snprintf(what, sizeof(what),
             "pure prefill step: %.0f prompt tokens (%.2f prompts of mean "
             "%.1f) -> %.1f prompt tok/s",
             chunk, st.prefill_seqs, in, est->prefill_tokens_per_s);
    explain_step(b, &cf->setup, &st, what);
    perf_step_decode(&st, B, B * (in + out / 2));
    snprintf(what, sizeof(what),
             "pure decode step: batch %.0f, %.0f context tokens -> %.1f "
             "tok/s",
             B, B * (in + out / 2), est->decode_tokens_per_s);
    explain_step(b, &cf->setup, &st, what);

    double x = est->requests_per_step;
    buf_printf(b,
               "\nsteady state (continuous batching, at most %d running, %d tokens a step):\n"
               "  x = min(budget / (in + out - 1) = %.3f, the x with x (out - 1 + prefill "
               "steps) = batch) = %.3f requests a step (%s-bound)\n",
               est->batch, cf->setup.limits.max_num_batched_tokens, T / (in + out - 1), x,
               est->token_bound ? "token-budget" : "batch");
    snprintf(what, sizeof(what),
             "  the step: %.1f prompt tokens + %.1f decodes (mean context "
             "%.1f)",
             est->step.prefill_tokens, est->step.decode_seqs, in + out / 2);
    explain_step(b, &cf->setup, &est->step, what);
    buf_printf(b,
               "  => %.4g requests/s = x / step; %.1f output tok/s, %.1f tok/s with prompts; "
               "prompts cost %.1f%% of the step\n",
               est->requests_per_s, est->output_tokens_per_s, est->total_tokens_per_s,
               100 * est->prefill_fraction);
    return LOOM_OK;
}
