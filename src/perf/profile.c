/*
 * Latency coefficients: the built-in defaults, their YAML form (shared by the catalog and the
 * profile files that `loom profile` writes), and profile lookup in a directory.
 */
#include "perf_internal.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/*
 * Defaults when nothing was profiled: vLLM-class engines reach roughly 55-65% of peak FLOP/s in
 * prompt GEMMs, less in the skinny GEMMs of decode, 70-80% of peak bandwidth when streaming
 * weights and KV, and about 60% of link bandwidth in all-reduce. The overhead is a scheduler +
 * launch + sampling cost per step. These are priors, not measurements: `loom profile`
 * replaces them.
 */
void perf_coef_default(perf_coef *c)
{
    *c = (perf_coef){.overhead = 2e-3,
                     .compute_prefill = 1.0 / 0.6,
                     .compute_decode = 1.0 / 0.5,
                     .memory = 1.0 / 0.75,
                     .comm = 1.0 / 0.6,
                     .attention = 1.0 / 0.5,
                     .host_token = 0};
}

int perf_coef_from_yaml(perf_yaml *y, yaml_node_t *map, const char *ctx, perf_coef *c,
                        double *rel_rms, loom_err *e)
{
    if (!map)
        return LOOM_OK;
    static const char *const keys[] = {"overhead_s", "compute_prefill", "compute_decode",
                                       "memory",     "comm",            "attention",
                                       "host_token_s", NULL};
    static const char *const keys_err[] = {"overhead_s",   "compute_prefill", "compute_decode",
                                           "memory",       "comm",            "attention",
                                           "host_token_s", "rel_rms_error",   NULL};
    int rc;
    if ((rc = perf_yaml_expect_map(y, map, ctx, e)) ||
        (rc = perf_yaml_check_keys(y, map, rel_rms ? keys_err : keys, ctx, e)) ||
        (rc = perf_yaml_number(y, map, "overhead_s", false, c->overhead, 0, 60, &c->overhead, e)) ||
        (rc = perf_yaml_number(y, map, "compute_prefill", false, c->compute_prefill, 0, 1e6,
                               &c->compute_prefill, e)) ||
        (rc = perf_yaml_number(y, map, "compute_decode", false, c->compute_decode, 0, 1e6,
                               &c->compute_decode, e)) ||
        (rc = perf_yaml_number(y, map, "memory", false, c->memory, 0, 1e6, &c->memory, e)) ||
        (rc = perf_yaml_number(y, map, "comm", false, c->comm, 0, 1e6, &c->comm, e)) ||
        (rc = perf_yaml_number(y, map, "host_token_s", false, c->host_token, 0, 60,
                               &c->host_token, e)))
        return rc;
    /* Without an attention figure (files written before the term existed) decode attention
     * keeps the decode tokens' efficiency: the model those files were fitted with. */
    if ((rc = perf_yaml_number(y, map, "attention", false, c->compute_decode, 0, 1e6,
                               &c->attention, e)))
        return rc;
    if (rel_rms)
        rc = perf_yaml_number(y, map, "rel_rms_error", false, 0, 0, 1e6, rel_rms, e);
    return rc;
}

void perf_fmt_double(double v, char *out, size_t cap)
{
    /* common case: a value with few decimals, written fixed and trimmed ("4701.129") */
    if (fabs(v) >= 1e-3 && fabs(v) < 1e15) {
        snprintf(out, cap, "%.6f", v);
        char *end = out + strlen(out);
        while (end > out && end[-1] == '0')
            *--end = 0;
        if (end > out && end[-1] == '.')
            *--end = 0;
        if (strtod(out, NULL) == v)
            return;
    }
    for (int prec = 6; prec <= 17; prec++) {
        snprintf(out, cap, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            return;
    }
}

void perf_format_bytes(double bytes, char *out, size_t cap)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    double v = bytes;
    int u = 0;
    while (fabs(v) >= 1024 && u < 5) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(out, cap, "%.0f B", v);
    else
        snprintf(out, cap, "%.1f %s", v, units[u]);
}

int perf_profile_grid(int max_prompt, int max_tokens, int max_batch, int max_context,
                      perf_step *out, int cap)
{
    int n = 0;
    if (max_prompt < 1)
        max_prompt = 1;
    if (max_tokens < 1)
        max_tokens = 1;
    /* prompts: 64, 4x, 16x ... up to max_prompt; 1, 2, 4 of them per step */
    for (int len = max_prompt < 64 ? max_prompt : 64;;
         len = len * 4 < max_prompt && len * 4 > len ? len * 4 : max_prompt) {
        for (int seqs = 1; seqs <= 4; seqs *= 2) {
            double tokens = (double)len * seqs;
            if (tokens > max_tokens && seqs > 1)
                break;
            if (n < cap)
                perf_step_prefill(&out[n], tokens > max_tokens ? max_tokens : tokens, len,
                                  (double)len * len);
            n++;
        }
        if (len >= max_prompt)
            break;
    }
    /* decodes: batch 1, 4, 16, ... max_batch at up to four contexts per sequence: max_context
     * and its quarters down to 8 tokens (4096: 64, 256, 1024, 4096). The contexts are the
     * workload's, not fixed ones, so that the decode attention term is fitted where it is used
     * and its slope is seen over a 4x-64x range. */
    int ctxs[4], n_ctx = 0;
    for (int c = max_context; c >= 8 && n_ctx < 4; c /= 4)
        ctxs[n_ctx++] = c;
    if (n_ctx == 0 && max_context >= 1)
        ctxs[n_ctx++] = max_context;
    for (int i = 0; i < n_ctx / 2; i++) { /* ascending */
        int t = ctxs[i];
        ctxs[i] = ctxs[n_ctx - 1 - i];
        ctxs[n_ctx - 1 - i] = t;
    }
    for (int batch = 1; max_batch >= 1;
         batch = batch * 4 < max_batch && batch * 4 > batch ? batch * 4 : max_batch) {
        for (int c = 0; c < n_ctx; c++) {
            if (n < cap)
                perf_step_decode(&out[n], batch, (double)batch * ctxs[c]);
            n++;
        }
        if (batch >= max_batch)
            break;
    }
    return n;
}

static const char *const step_keys[] = {
    "kind",        "prefill_tokens", "prefill_seqs", "prefill_logits", "prefill_pairs",
    "prefill_kv_read", "decode_seqs",  "decode_ctx",   "seconds",        NULL};

/* The steps: list (absent: none). */
static int parse_steps(perf_yaml *y, yaml_node_t *seq, perf_profile *out, loom_err *e)
{
    out->n_steps = 0;
    if (!seq)
        return LOOM_OK;
    int rc = perf_yaml_expect_seq(y, seq, "steps", e);
    if (rc)
        return rc;
    int m = perf_yaml_seq_len(seq);
    if (m > PERF_PROFILE_MAX_STEPS)
        return loom_errf(e, LOOM_EFORMAT, "profile:%d: %d steps, at most %d", perf_yaml_line(seq),
                         m, PERF_PROFILE_MAX_STEPS);
    for (int i = 0; i < m; i++) {
        yaml_node_t *it = perf_yaml_seq_item(y, seq, i);
        char kind[16];
        double v[8];
        if ((rc = perf_yaml_expect_map(y, it, "a step", e)) ||
            (rc = perf_yaml_check_keys(y, it, step_keys, "a step", e)) ||
            (rc = perf_yaml_string(y, it, "kind", true, NULL, kind, sizeof(kind), e)))
            return rc;
        for (int k = 0; k < 8; k++)
            if ((rc = perf_yaml_number(y, it, step_keys[k + 1], k == 7, 0, 0, 1e18, &v[k], e)))
                return rc;
        if (strcmp(kind, "prefill") && strcmp(kind, "decode"))
            return loom_errf(e, LOOM_EFORMAT, "profile:%d: step kind '%s' (prefill or decode)",
                             perf_yaml_line(it), kind);
        if (!(v[7] > 0))
            return loom_errf(e, LOOM_EFORMAT, "profile:%d: a step's seconds must be > 0",
                             perf_yaml_line(it));
        perf_timed_step *t = &out->steps[i];
        memset(t, 0, sizeof(*t));
        t->kind = strcmp(kind, "prefill") ? PERF_STEP_DECODE : PERF_STEP_PREFILL;
        t->step = (perf_step){.prefill_tokens = v[0], .prefill_seqs = v[1],
                              .prefill_logits = v[2], .prefill_pairs = v[3],
                              .prefill_kv_read = v[4], .decode_seqs = v[5], .decode_ctx = v[6]};
        t->seconds = v[7];
        out->n_steps = i + 1;
    }
    return LOOM_OK;
}

int perf_profile_parse(const char *text, size_t len, perf_profile *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    perf_coef_default(&out->coef);
    perf_yaml y;
    int rc = perf_yaml_load(&y, text, len, "profile", e);
    if (rc)
        return rc;
    static const char *const keys[] = {"device", "tp",    "model", "samples",
                                       "coefficients", "steps", NULL};
    yaml_node_t *root = perf_yaml_root(&y), *coef;
    long long tp = 0, samples = 0;
    if ((rc = perf_yaml_expect_map(&y, root, "the profile", e)) ||
        (rc = perf_yaml_check_keys(&y, root, keys, "the profile", e)) ||
        (rc = perf_yaml_string(&y, root, "device", true, NULL, out->device, sizeof(out->device),
                               e)) ||
        (rc = perf_yaml_int(&y, root, "tp", true, 1, 1, 1024, &tp, e)) ||
        (rc = perf_yaml_string(&y, root, "model", false, "", out->model, sizeof(out->model), e)) ||
        (rc = perf_yaml_int(&y, root, "samples", false, 0, 0, 1 << 30, &samples, e)))
        goto done;
    out->tp = (int)tp;
    out->n_samples = (int)samples;
    coef = perf_yaml_get(&y, root, "coefficients");
    if (!coef) {
        rc =
            loom_errf(e, LOOM_EFORMAT, "profile:%d: missing 'coefficients:'", perf_yaml_line(root));
        goto done;
    }
    rc = perf_coef_from_yaml(&y, coef, "coefficients", &out->coef, &out->rel_rms, e);
    if (!rc)
        rc = parse_steps(&y, perf_yaml_get(&y, root, "steps"), out, e);
done:
    perf_yaml_free(&y);
    return rc;
}

void perf_profile_write_steps(const perf_timed_step *steps, int n, loom_buf *b)
{
    buf_puts(b, "# the timed steps of the fit (loom profile --refit FILE fits them again)\n"
                "steps:\n");
    for (int i = 0; i < n; i++) {
        const perf_step *s = &steps[i].step;
        double v[] = {s->prefill_tokens, s->prefill_seqs, s->prefill_logits, s->prefill_pairs,
                      s->prefill_kv_read, s->decode_seqs,  s->decode_ctx,     steps[i].seconds};
        buf_printf(b, "  - {kind: %s", steps[i].kind == PERF_STEP_PREFILL ? "prefill" : "decode");
        for (int k = 0; k < 8; k++) {
            char num[32];
            perf_fmt_double(v[k], num, sizeof(num));
            buf_printf(b, ", %s: %s", step_keys[k + 1], num);
        }
        buf_puts(b, "}\n");
    }
}

int perf_profile_load(const char *path, perf_profile *out, loom_err *e)
{
    char *text = NULL;
    size_t len = 0;
    int rc = loom_read_file(path, &text, &len, e);
    if (rc)
        return rc;
    rc = perf_profile_parse(text, len, out, e);
    free(text);
    if (rc && e) {
        char msg[sizeof(e->msg)];
        snprintf(msg, sizeof(msg), "%s", e->msg);
        const char *rest = strncmp(msg, "profile", 7) == 0 ? msg + 7 : msg;
        loom_errf(e, rc, "%s%s%s", path, rest == msg ? ": " : "", rest);
    }
    return rc;
}

void perf_profile_write(const perf_profile *p, loom_buf *b)
{
    buf_puts(b, "# loom latency profile: step seconds = overhead_s\n"
                "#   + compute_prefill * FLOPs(prompt tokens)/peak + compute_decode * "
                "FLOPs(decode tokens)/peak\n"
                "#   + attention * FLOPs(decode attention over the cache)/peak\n"
                "#   + memory * bytes/bandwidth + comm * all-reduce time\n"
                "#   + host_token_s * sampled tokens (docs/planner.md)\n");
    buf_puts(b, "device: ");
    perf_yaml_quote(b, p->device);
    buf_printf(b, "\ntp: %d\n", p->tp);
    if (p->model[0]) {
        buf_puts(b, "model: ");
        perf_yaml_quote(b, p->model);
        buf_puts(b, "\n");
    }
    buf_printf(b, "samples: %d\n", p->n_samples);
    const perf_coef *c = &p->coef;
    char o[32], cp[32], cd[32], m[32], cm[32], at[32], ht[32], r[32];
    perf_fmt_double(c->overhead, o, sizeof(o));
    perf_fmt_double(c->compute_prefill, cp, sizeof(cp));
    perf_fmt_double(c->compute_decode, cd, sizeof(cd));
    perf_fmt_double(c->memory, m, sizeof(m));
    perf_fmt_double(c->comm, cm, sizeof(cm));
    perf_fmt_double(c->attention, at, sizeof(at));
    perf_fmt_double(c->host_token, ht, sizeof(ht));
    perf_fmt_double(p->rel_rms, r, sizeof(r));
    buf_printf(b,
               "coefficients: {overhead_s: %s, compute_prefill: %s, compute_decode: %s, "
               "memory: %s, comm: %s, attention: %s, host_token_s: %s, rel_rms_error: %s}\n",
               o, cp, cd, m, cm, at, ht, r);
}

static bool has_ext(const char *name, const char *ext)
{
    size_t n = strlen(name), m = strlen(ext);
    return n > m && !strcasecmp(name + n - m, ext);
}

int perf_profile_find(const char *dir, const char *device, int tp, const char *model,
                      perf_profile *out, loom_err *e)
{
    DIR *d = opendir(dir);
    if (!d)
        return loom_errf(e, LOOM_ENOTFOUND, "profiles directory %s cannot be read", dir);
    int rc = LOOM_OK, best = 0; /* 0 none, 1 any-model match, 2 same-model match */
    struct dirent *ent;
    while ((ent = readdir(d))) {
        if (ent->d_name[0] == '.' ||
            !(has_ext(ent->d_name, ".yaml") || has_ext(ent->d_name, ".yml") ||
              has_ext(ent->d_name, ".json")))
            continue;
        char *path = loom_path_join(dir, ent->d_name);
        perf_profile p;
        rc = perf_profile_load(path, &p, e);
        free(path);
        if (rc)
            break;
        if (strcasecmp(p.device, device) || p.tp != tp)
            continue;
        int score = !p.model[0] ? 1 : (model && !strcmp(p.model, model)) ? 2 : 0;
        if (score > best) {
            best = score;
            *out = p;
        }
    }
    closedir(d);
    if (rc)
        return rc;
    if (!best)
        return loom_errf(e, LOOM_ENOTFOUND, "no profile for %s tp=%d in %s", device, tp, dir);
    return LOOM_OK;
}
