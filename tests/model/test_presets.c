/*
 * Random presets. For each small preset (one per architecture): random weights are saved as a
 * Hugging Face directory, loaded back (identical logits), and the logits are checked against a
 * naive double-precision forward pass written here from the Hugging Face definitions, reading
 * the saved tensors by their Hugging Face names. This covers what no fixture does: Qwen2's q/k/v
 * bias and tied embeddings, Qwen2-MoE's shared expert with its sigmoid gate, top-k without
 * renormalisation and a dense mlp_only layer.
 */
#include "model_testutil.h"

#include "loom/tensor.h"

#include <sys/stat.h>

static char g_dir[64];

/* ---------------------------------------------------------------- naive reference */

typedef struct naive {
    const model_config *c;
    st_file f;
} naive;

/* Tensor by name, widened into a fresh buffer; fails the test when absent. */
static float *W(naive *nv, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static float *W(naive *nv, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof(name), fmt, ap);
    va_end(ap);
    const st_tensor *t = st_find(&nv->f, name);
    if (!t)
        fail_msg("reference: tensor %s missing", name);
    float *p = malloc(t->nbytes);
    loom_err e;
    assert_int_equal(st_tensor_to_f32(t, p, &e), 0);
    return p;
}

static bool has_tensor(naive *nv, const char *name)
{
    return st_find(&nv->f, name) != NULL;
}

/* y (out) = W (out, in) x (in) + b */
static void linear(double *y, const float *w, const double *x, int out, int in, const float *b)
{
    for (int o = 0; o < out; o++) {
        double s = b ? b[o] : 0;
        for (int i = 0; i < in; i++)
            s += (double)w[(size_t)o * in + i] * x[i];
        y[o] = s;
    }
}

static void rmsnorm(double *y, const double *x, const float *w, int d, double eps)
{
    double ss = 0;
    for (int i = 0; i < d; i++)
        ss += x[i] * x[i];
    double inv = 1 / sqrt(ss / d + eps);
    for (int i = 0; i < d; i++)
        y[i] = w[i] * x[i] * inv;
}

static double silu(double v)
{
    return v / (1 + exp(-v));
}

/* out (d) += down(silu(gate(x)) * up(x)) * scale */
static void mlp(double *out, const double *x, const float *g, const float *u, const float *dn,
                int d, int I, double scale)
{
    double *a = malloc(I * sizeof(double)), *b = malloc(I * sizeof(double));
    double *y = malloc(d * sizeof(double));
    linear(a, g, x, I, d, NULL);
    linear(b, u, x, I, d, NULL);
    for (int i = 0; i < I; i++)
        a[i] = silu(a[i]) * b[i];
    linear(y, dn, a, d, I, NULL);
    for (int i = 0; i < d; i++)
        out[i] += scale * y[i];
    free(a);
    free(b);
    free(y);
}

/* Logits (T, V) for tokens at positions 0..T-1 of one sequence. */
static void naive_forward(naive *nv, const int32_t *toks, int T, float *logits)
{
    const model_config *c = nv->c;
    int d = c->hidden_size, H = c->n_heads, Hkv = c->n_kv_heads, hd = c->head_dim,
        V = c->vocab_size;
    int q = H * hd, kv = Hkv * hd;
    double *h = malloc((size_t)T * d * sizeof(double)), *xn = malloc(d * sizeof(double));
    double *Q = malloc((size_t)T * q * sizeof(double)),
           *K = malloc((size_t)T * kv * sizeof(double));
    double *Vv = malloc((size_t)T * kv * sizeof(double)), *att = malloc(q * sizeof(double));
    double *o = malloc(d * sizeof(double)), *sc = malloc(T * sizeof(double));
    float *emb = W(nv, "model.embed_tokens.weight");
    for (int t = 0; t < T; t++)
        for (int i = 0; i < d; i++)
            h[(size_t)t * d + i] = emb[(size_t)toks[t] * d + i];
    float inv_freq[512];
    model_config_rope_inv_freq(c, inv_freq);
    for (int l = 0; l < c->n_layers; l++) {
        float *n1 = W(nv, "model.layers.%d.input_layernorm.weight", l);
        float *n2 = W(nv, "model.layers.%d.post_attention_layernorm.weight", l);
        float *wq = W(nv, "model.layers.%d.self_attn.q_proj.weight", l);
        float *wk = W(nv, "model.layers.%d.self_attn.k_proj.weight", l);
        float *wv = W(nv, "model.layers.%d.self_attn.v_proj.weight", l);
        float *wo = W(nv, "model.layers.%d.self_attn.o_proj.weight", l);
        float *bq = NULL, *bk = NULL, *bv = NULL;
        if (c->attention_bias) {
            bq = W(nv, "model.layers.%d.self_attn.q_proj.bias", l);
            bk = W(nv, "model.layers.%d.self_attn.k_proj.bias", l);
            bv = W(nv, "model.layers.%d.self_attn.v_proj.bias", l);
        }
        for (int t = 0; t < T; t++) {
            rmsnorm(xn, h + (size_t)t * d, n1, d, c->rms_norm_eps);
            linear(Q + (size_t)t * q, wq, xn, q, d, bq);
            linear(K + (size_t)t * kv, wk, xn, kv, d, bk);
            linear(Vv + (size_t)t * kv, wv, xn, kv, d, bv);
            /* rotate-half RoPE */
            for (int hh = 0; hh < H + Hkv; hh++) {
                double *v =
                    hh < H ? Q + (size_t)t * q + hh * hd : K + (size_t)t * kv + (hh - H) * hd;
                for (int i = 0; i < hd / 2; i++) {
                    double a = (double)((float)t * inv_freq[i]);
                    double x1 = v[i], x2 = v[i + hd / 2];
                    v[i] = x1 * cos(a) - x2 * sin(a);
                    v[i + hd / 2] = x2 * cos(a) + x1 * sin(a);
                }
            }
        }
        for (int t = 0; t < T; t++) {
            for (int hh = 0; hh < H; hh++) {
                int g = hh / (H / Hkv);
                double m = -INFINITY, z = 0;
                for (int j = 0; j <= t; j++) {
                    double s = 0;
                    for (int i = 0; i < hd; i++)
                        s += Q[(size_t)t * q + hh * hd + i] * K[(size_t)j * kv + g * hd + i];
                    sc[j] = s / sqrt((double)hd);
                    m = sc[j] > m ? sc[j] : m;
                }
                for (int j = 0; j <= t; j++)
                    z += (sc[j] = exp(sc[j] - m));
                for (int i = 0; i < hd; i++) {
                    double acc = 0;
                    for (int j = 0; j <= t; j++)
                        acc += sc[j] / z * Vv[(size_t)j * kv + g * hd + i];
                    att[hh * hd + i] = acc;
                }
            }
            linear(o, wo, att, d, q, NULL);
            double *ht = h + (size_t)t * d;
            for (int i = 0; i < d; i++)
                ht[i] += o[i];
            rmsnorm(xn, ht, n2, d, c->rms_norm_eps);
            if (!model_config_is_moe_layer(c, l)) {
                float *g = W(nv, "model.layers.%d.mlp.gate_proj.weight", l);
                float *u = W(nv, "model.layers.%d.mlp.up_proj.weight", l);
                float *dn = W(nv, "model.layers.%d.mlp.down_proj.weight", l);
                mlp(ht, xn, g, u, dn, d, c->intermediate_size, 1.0);
                free(g);
                free(u);
                free(dn);
                continue;
            }
            /* MoE: softmax over all experts, top-k, optional renormalisation */
            bool mixtral = c->arch == ARCH_MIXTRAL;
            const char *p = mixtral ? "block_sparse_moe" : "mlp";
            int E = c->n_experts, k = c->n_experts_per_tok, Ie = c->moe_intermediate_size;
            float *gate = W(nv, "model.layers.%d.%s.gate.weight", l, p);
            double rl[64], pr[64], zz = 0, mm = -INFINITY;
            linear(rl, gate, xn, E, d, NULL);
            for (int x = 0; x < E; x++)
                mm = rl[x] > mm ? rl[x] : mm;
            for (int x = 0; x < E; x++)
                zz += (pr[x] = exp(rl[x] - mm));
            bool used[64] = {false};
            int sel[8];
            double wsum = 0;
            for (int j = 0; j < k; j++) {
                int best = -1;
                for (int x = 0; x < E; x++)
                    if (!used[x] && (best < 0 || pr[x] > pr[best]))
                        best = x;
                used[best] = true;
                sel[j] = best;
                wsum += pr[best] / zz;
            }
            for (int j = 0; j < k; j++) {
                double wgt = pr[sel[j]] / zz;
                if (c->norm_topk_prob)
                    wgt /= wsum;
                float *g = W(nv, "model.layers.%d.%s.experts.%d.%s.weight", l, p, sel[j],
                             mixtral ? "w1" : "gate_proj");
                float *u = W(nv, "model.layers.%d.%s.experts.%d.%s.weight", l, p, sel[j],
                             mixtral ? "w3" : "up_proj");
                float *dn = W(nv, "model.layers.%d.%s.experts.%d.%s.weight", l, p, sel[j],
                              mixtral ? "w2" : "down_proj");
                mlp(ht, xn, g, u, dn, d, Ie, wgt);
                free(g);
                free(u);
                free(dn);
            }
            char sname[128];
            snprintf(sname, sizeof(sname), "model.layers.%d.mlp.shared_expert_gate.weight", l);
            if (has_tensor(nv, sname)) {
                float *sg = W(nv, "%s", sname);
                double s = 0;
                for (int i = 0; i < d; i++)
                    s += sg[i] * xn[i];
                float *g = W(nv, "model.layers.%d.mlp.shared_expert.gate_proj.weight", l);
                float *u = W(nv, "model.layers.%d.mlp.shared_expert.up_proj.weight", l);
                float *dn = W(nv, "model.layers.%d.mlp.shared_expert.down_proj.weight", l);
                mlp(ht, xn, g, u, dn, d, c->shared_expert_intermediate_size, 1 / (1 + exp(-s)));
                free(sg);
                free(g);
                free(u);
                free(dn);
            }
            free(gate);
        }
        free(n1);
        free(n2);
        free(wq);
        free(wk);
        free(wv);
        free(wo);
        free(bq);
        free(bk);
        free(bv);
    }
    float *fn = W(nv, "model.norm.weight");
    float *head = has_tensor(nv, "lm_head.weight") ? W(nv, "lm_head.weight") : emb;
    double *lg = malloc((size_t)V * sizeof(double));
    for (int t = 0; t < T; t++) {
        rmsnorm(xn, h + (size_t)t * d, fn, d, c->rms_norm_eps);
        linear(lg, head, xn, V, d, NULL);
        for (int v = 0; v < V; v++)
            logits[(size_t)t * V + v] = (float)lg[v];
    }
    if (head != emb)
        free(head);
    free(emb);
    free(fn);
    free(lg);
    free(h);
    free(xn);
    free(Q);
    free(K);
    free(Vv);
    free(att);
    free(o);
    free(sc);
}

/* ---------------------------------------------------------------- tests */

static void check_preset(const char *name)
{
    loom_err e = {0};
    model *m = NULL;
    double t0 = loom_now();
    if (model_create_random(name, 42, &m, &e))
        fail_msg("%s", e.msg);
    double t_create = loom_now() - t0;
    const model_config *c = model_get_config(m);
    int V = c->vocab_size, T = 21;
    int32_t toks[21];
    for (int i = 0; i < T; i++)
        toks[i] = (int32_t)((i * 977 + 5) % V);

    /* our forward, prefill in two chunks through the cache */
    test_blocks tb;
    test_blocks_init(&tb, 1, 4, 1);
    model_kv kv;
    assert_int_equal(model_kv_init(&kv, c, 4, 8, &e), 0);
    float *ours = malloc((size_t)T * V * sizeof(float));
    const int32_t *p0[1] = {toks}, *p1[1] = {toks + 13};
    int n0 = 13, n1 = T - 13, c0 = 0, c1 = 13;
    assert_int_equal(run_batch(m, &kv, 1, p0, &n0, &c0, tb.tables, ours, NULL, &e), 0);
    assert_int_equal(run_batch(m, &kv, 1, p1, &n1, &c1, tb.tables, ours + (size_t)13 * V, NULL, &e),
                     0);
    for (size_t i = 0; i < (size_t)T * V; i++)
        assert_true(isfinite(ours[i]));

    /* save, reload: the same logits */
    char *dir = loom_path_join(g_dir, name);
    mkdir(dir, 0700);
    if (model_save(m, dir, &e))
        fail_msg("%s", e.msg);
    model *m2 = NULL;
    if (model_load(dir, &m2, &e))
        fail_msg("%s", e.msg);
    float *again = malloc((size_t)T * V * sizeof(float));
    int whole = T;
    assert_int_equal(run_batch(m2, &kv, 1, p0, &whole, &c0, tb.tables, again, NULL, &e), 0);
    double reload = rel_err(again, ours, (size_t)T * V);

    /* independent naive forward from the saved Hugging Face tensors */
    naive nv = {.c = c};
    char *wpath = loom_path_join(dir, "model.safetensors");
    assert_int_equal(st_open(wpath, &nv.f, &e), 0);
    float *want = malloc((size_t)T * V * sizeof(float));
    naive_forward(&nv, toks, T, want);
    double err = rel_err(ours, want, (size_t)T * V);
    printf("RESULT %-14s create %.3f s, %.1f MB; reload diff %.1e; vs naive f64 forward %.2e\n",
           name, t_create, model_weight_bytes(m) / 1e6, reload, err);
    assert_true(reload < 1e-5);
    assert_true(err < 1e-4);
    st_close(&nv.f);
    free(wpath);
    free(want);
    free(again);
    free(ours);
    model_free(m2);
    model_kv_free(&kv);
    test_blocks_free(&tb);
    model_free(m);
    free(dir);
}

static void test_llama_tiny(void **state)
{
    (void)state;
    check_preset("llama-tiny");
}

static void test_mixtral_tiny(void **state)
{
    (void)state;
    check_preset("mixtral-tiny");
}

static void test_qwen2_tiny(void **state)
{
    (void)state;
    check_preset("qwen2-tiny");
}

static void test_qwen2moe_tiny(void **state)
{
    (void)state;
    check_preset("qwen2moe-tiny");
}

/* Seeds: same seed same weights, another seed other weights; model_open("random:...") works. */
static void test_seeds_and_open(void **state)
{
    (void)state;
    loom_err e = {0};
    model *a, *b, *c;
    assert_int_equal(model_create_random("llama-tiny", 1, &a, &e), 0);
    assert_int_equal(model_create_random("llama-tiny", 1, &b, &e), 0);
    assert_int_equal(model_create_random("llama-tiny", 2, &c, &e), 0);
    const model_config *cfg = model_get_config(a);
    model_kv kv;
    assert_int_equal(model_kv_init(&kv, cfg, 1, 16, &e), 0);
    int32_t table[1] = {0}, *tables[1] = {table}, tok[3] = {5, 6, 7};
    const int32_t *tp[1] = {tok};
    int n = 3, ctx = 0, V = cfg->vocab_size;
    float *la = malloc(3 * V * 4), *lb = malloc(3 * V * 4), *lc = malloc(3 * V * 4);
    assert_int_equal(run_batch(a, &kv, 1, tp, &n, &ctx, tables, la, NULL, &e), 0);
    assert_int_equal(run_batch(b, &kv, 1, tp, &n, &ctx, tables, lb, NULL, &e), 0);
    assert_int_equal(run_batch(c, &kv, 1, tp, &n, &ctx, tables, lc, NULL, &e), 0);
    assert_true(memcmp(la, lb, 3 * V * 4) == 0);
    assert_true(memcmp(la, lc, 3 * V * 4) != 0);
    model *o = NULL;
    assert_int_equal(model_open("random:qwen2-tiny", &o, &e), 0);
    assert_int_equal(model_get_config(o)->arch, ARCH_QWEN2);
    model_free(o);
    assert_int_equal(model_open("random:nope", &o, &e), LOOM_ENOTFOUND);
    assert_int_equal(model_open("/nonexistent/dir", &o, &e), LOOM_ENOTFOUND);
    /* bad batches are refused, not crashed on */
    int32_t bad_tok[1] = {V};
    const int32_t *bp[1] = {bad_tok};
    int one = 1;
    assert_int_equal(run_batch(a, &kv, 1, bp, &one, &ctx, tables, la, NULL, &e), LOOM_EINVAL);
    int32_t bad_table[1] = {5}, *bt[1] = {bad_table};
    assert_int_equal(run_batch(a, &kv, 1, tp, &n, &ctx, bt, la, NULL, &e), LOOM_EINVAL);
    int far = 20; /* positions 20..22 need a second block the table lacks: block id garbage */
    int32_t two[2] = {0, -1}, *tt[1] = {two};
    assert_int_equal(run_batch(a, &kv, 1, tp, &n, &far, tt, la, NULL, &e), LOOM_EINVAL);
    model_kv_free(&kv);
    free(la);
    free(lb);
    free(lc);
    model_free(a);
    model_free(b);
    model_free(c);
}

static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof(g_dir), "/tmp/loom-presets-XXXXXX");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void)
{
    tensor_set_threads(2);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama_tiny),     cmocka_unit_test(test_mixtral_tiny),
        cmocka_unit_test(test_qwen2_tiny),     cmocka_unit_test(test_qwen2moe_tiny),
        cmocka_unit_test(test_seeds_and_open),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
