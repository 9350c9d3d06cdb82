/*
 * Trainer weights in and out: Hugging Face directories (load, export) and resumable checkpoints
 * (parameters + AdamW moments + step, one safetensors file written to a temporary name and
 * renamed, so a crash never leaves a half-written checkpoint under the real name).
 */
#include "train_internal.h"

#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int train_config_from_hf(train_config *c, const char *dir, int B_max, int T_max, loom_err *e)
{
    char *path = loom_path_join(dir, "config.json");
    model_config mc;
    int rc = model_config_load(path, &mc, e);
    if (rc) {
        free(path);
        return rc;
    }
    train_config_default(c, &mc, B_max, T_max);
    if (mc.arch == ARCH_LOOM_MOE) { /* continue with the router the export was trained with */
        c->router = (moe_router_kind)mc.router_kind;
        c->top_k = mc.n_experts_per_tok;
        c->renormalize = mc.norm_topk_prob;
    }
    char *json = NULL;
    size_t len = 0;
    if (loom_read_file(path, &json, &len, NULL) == LOOM_OK) {
        cJSON *j = cJSON_ParseWithLength(json, len);
        const cJSON *a = j ? cJSON_GetObjectItemCaseSensitive(j, "router_aux_loss_coef") : NULL;
        if (cJSON_IsNumber(a) && mc.n_experts > 0)
            c->aux_coef = a->valuedouble;
        cJSON_Delete(j);
        free(json);
    }
    free(path);
    return LOOM_OK;
}

static int load_tensor(const st_set *s, const char *dir, const char *name, float *dst,
                       int64_t d0, int64_t d1, loom_err *e)
{
    const st_tensor *t = st_set_find(s, name);
    if (!t)
        return loom_errf(e, LOOM_ENOTFOUND, "%s: tensor '%s' not found in the checkpoint", dir,
                         name);
    int64_t n = t->n_dims == 1 ? t->shape[0] : t->n_dims == 2 ? t->shape[0] * t->shape[1] : -1;
    if ((t->n_dims == 2 && (t->shape[0] != d0 || t->shape[1] != d1)) ||
        (t->n_dims == 1 && t->shape[0] != d0) || n != d0 * d1)
        return loom_errf(e, LOOM_EFORMAT,
                         "%s: tensor '%s' has the wrong shape for the model (HINT: the checkpoint "
                         "does not match its config.json)",
                         dir, name);
    return st_tensor_to_f32(t, dst, e);
}

/* Fused layout (mlp.experts.gate_up_proj (E, 2I, d) gate first, down_proj (E, d, I)). */
static int load_fused(train_model *m, const st_set *s, const char *dir, int l, loom_err *e)
{
    const model_config *c = &m->cfg.model;
    int E = c->n_experts, I = c->intermediate_size, d = c->hidden_size;
    char n[128];
    snprintf(n, sizeof(n), "model.layers.%d.mlp.experts.gate_up_proj", l);
    const st_tensor *gu = st_set_find(s, n);
    snprintf(n, sizeof(n), "model.layers.%d.mlp.experts.down_proj", l);
    const st_tensor *dn = st_set_find(s, n);
    if (!gu || !dn || gu->n_dims != 3 || dn->n_dims != 3 || gu->shape[0] != E ||
        gu->shape[1] != 2 * I || gu->shape[2] != d || dn->shape[0] != E || dn->shape[1] != d ||
        dn->shape[2] != I)
        return loom_errf(e, LOOM_EFORMAT, "%s: layer %d: no per-expert or fused expert tensors "
                         "of the config's shape", dir, l);
    size_t per = (size_t)2 * I * d;
    float *tmp = malloc((size_t)E * per * sizeof(float));
    float *tmp2 = malloc((size_t)E * d * I * sizeof(float));
    int rc = LOOM_ENOMEM;
    if (tmp && tmp2 && !(rc = st_tensor_to_f32(gu, tmp, e)) &&
        !(rc = st_tensor_to_f32(dn, tmp2, e))) {
        for (int x = 0; x < E; x++) {
            float *w1 = m->w.layers[l].experts + (size_t)x * 3 * I * d;
            memcpy(w1, tmp + x * per, (size_t)I * d * sizeof(float));
            memcpy(w1 + (size_t)2 * I * d, tmp + x * per + (size_t)I * d,
                   (size_t)I * d * sizeof(float));
            memcpy(w1 + (size_t)I * d, tmp2 + (size_t)x * d * I, (size_t)d * I * sizeof(float));
        }
    } else if (rc == LOOM_ENOMEM) {
        loom_errf(e, rc, "%s: out of memory", dir);
    }
    free(tmp);
    free(tmp2);
    return rc;
}

int train_model_load_hf(train_model *m, const char *dir, loom_err *e)
{
    st_set s;
    int rc = st_set_open_dir(dir, &s, e);
    if (rc)
        return rc;
    const model_config *c = &m->cfg.model;
    for (int i = 0; i < m->n_tensors && !rc; i++) {
        const train_param *p = &m->tensors[i];
        float *dst = m->params + p->offset;
        if (p->expert >= 0 && !st_set_find(&s, p->name)) {
            if (p->expert == 0 && strstr(p->name, ".w1.")) {
                rc = load_fused(m, &s, dir, p->layer, e);
            }
            continue;
        }
        const char *name = p->name;
        char alt[128];
        if (!st_set_find(&s, name) && strstr(name, "block_sparse_moe.gate.")) {
            /* fused-layout checkpoints keep the gate under mlp. */
            snprintf(alt, sizeof(alt), "model.layers.%d.mlp.gate.%s", p->layer,
                     strstr(name, ".gate.") + 6);
            name = alt;
        }
        if (strstr(p->name, ".gate.bias") && !st_set_find(&s, name))
            continue; /* LocMoE eps starts at 0 when a Mixtral checkpoint seeds it */
        rc = load_tensor(&s, dir, name, dst, p->shape[0], p->n_dims == 2 ? p->shape[1] : 1, e);
    }
    /* a LoomMoe export's group-limited balance bias (absent: it starts at zero) */
    for (int l = 0; !rc && m->moe && l < c->n_layers; l++) {
        moe_router *r = &m->moe[l].router;
        char n[128];
        snprintf(n, sizeof(n), "model.layers.%d.block_sparse_moe.gate.e_score_correction_bias", l);
        if (r->balance_bias && st_set_find(&s, n))
            rc = load_tensor(&s, dir, n, r->balance_bias, c->n_experts, 1, e);
        /* and the hash router's table, which a different --seed would otherwise rebuild */
        snprintf(n, sizeof(n), "model.layers.%d.block_sparse_moe.gate.hash_table", l);
        const st_tensor *t = r->hash_table ? st_set_find(&s, n) : NULL;
        if (!rc && t) {
            if (t->dtype != ST_I32 || t->n_dims != 1 || t->shape[0] != c->vocab_size)
                rc = loom_errf(e, LOOM_EFORMAT, "%s: tensor '%s' must be I32 of shape [%d]", dir,
                               n, c->vocab_size);
            else
                memcpy(r->hash_table, t->data, (size_t)c->vocab_size * sizeof(int32_t));
            for (int v = 0; !rc && v < c->vocab_size; v++)
                if (r->hash_table[v] < 0 || r->hash_table[v] >= c->n_experts)
                    rc = loom_errf(e, LOOM_EFORMAT, "%s: tensor '%s': expert out of range", dir,
                                   n);
        }
    }
    st_set_close(&s);
    return rc;
}

/* ------------------------------------------------------------------ gathering experts */

/* On R ranks each rank's copy is current only for its own experts: sum-reduce a copy in which
 * every rank keeps what it owns (dense tensors from rank 0 only). Returns a malloc'd array
 * (n_params) holding the full, current tensor set, or NULL. */
static float *gather_full(train_model *m, const float *src)
{
    float *full = malloc(m->n_params * sizeof(float));
    if (!full)
        return NULL;
    memcpy(full, src, m->n_params * sizeof(float));
    if (m->dist->n_ranks <= 1)
        return full;
    for (int i = 0; i < m->n_tensors; i++) {
        const train_param *p = &m->tensors[i];
        bool keep = p->expert >= 0 ? train_model_owns(m, i) : m->dist->rank == 0;
        if (!keep)
            memset(full + p->offset, 0, p->n * sizeof(float));
    }
    train_dist_allreduce_f32(m->dist, full, m->n_params);
    return full;
}

/* ------------------------------------------------------------------ checkpoints */

/*
 * Router state that is not a parameter but changes what the next step computes: per MoE layer
 * the group-limited balance bias (E, moved by train_router_update_balance), the jitter noise
 * generator (4 words of xoshiro state, advanced by every jittered forward) and the hash table
 * (V, fixed, but derived from the --seed of the run that built it). Written by rank 0; on R
 * ranks every rank holds the same state (global loads, the same seeds and draw counts).
 */
typedef struct router_state {
    float *bias;     /* (L, E) or NULL */
    int64_t *rng;    /* (L, 4) */
    int32_t *hash;   /* (L, V) or NULL */
} router_state;

static void router_state_gather(const train_model *m, router_state *rs)
{
    const model_config *c = &m->cfg.model;
    int L = c->n_layers, E = c->n_experts, V = c->vocab_size;
    memset(rs, 0, sizeof(*rs));
    if (!m->moe)
        return;
    rs->rng = xmalloc((size_t)L * 4 * sizeof(int64_t));
    if (m->moe[0].router.balance_bias)
        rs->bias = xmalloc((size_t)L * E * sizeof(float));
    if (m->moe[0].router.hash_table)
        rs->hash = xmalloc((size_t)L * V * sizeof(int32_t));
    for (int l = 0; l < L; l++) {
        const moe_router *r = &m->moe[l].router;
        for (int i = 0; i < 4; i++)
            rs->rng[l * 4 + i] = (int64_t)r->rng.s[i];
        if (rs->bias)
            memcpy(rs->bias + (size_t)l * E, r->balance_bias, (size_t)E * sizeof(float));
        if (rs->hash)
            memcpy(rs->hash + (size_t)l * V, r->hash_table, (size_t)V * sizeof(int32_t));
    }
}

static void router_state_free(router_state *rs)
{
    free(rs->bias);
    free(rs->rng);
    free(rs->hash);
}

/* Restores what the checkpoint has (a checkpoint from before router state keeps the fresh
 * model's: zero bias, the seeded generator, the seeded table). */
static int router_state_load(train_model *m, const st_file *f, const char *path, loom_err *e)
{
    const model_config *c = &m->cfg.model;
    int L = c->n_layers, E = c->n_experts, V = c->vocab_size;
    if (!m->moe)
        return LOOM_OK;
    const st_tensor *tb = st_find(f, "router_balance_bias"), *tr = st_find(f, "router_rng"),
                    *th = st_find(f, "router_hash_table");
    if ((tb && (tb->dtype != ST_F32 || tb->n_dims != 1 || tb->shape[0] != (int64_t)L * E ||
                !m->moe[0].router.balance_bias)) ||
        (tr && (tr->dtype != ST_I64 || tr->n_dims != 1 || tr->shape[0] != (int64_t)L * 4)) ||
        (th && (th->dtype != ST_I32 || th->n_dims != 1 || th->shape[0] != (int64_t)L * V ||
                !m->moe[0].router.hash_table)))
        return loom_errf(e, LOOM_EFORMAT,
                         "%s: router state of another router or shape (HINT: resume with the "
                         "same --router)",
                         path);
    for (int l = 0; l < L; l++) {
        moe_router *r = &m->moe[l].router;
        if (tb)
            memcpy(r->balance_bias, (const float *)tb->data + (size_t)l * E,
                   (size_t)E * sizeof(float));
        if (tr) {
            int64_t s4[4];
            memcpy(s4, (const int64_t *)tr->data + (size_t)l * 4, sizeof(s4));
            for (int i = 0; i < 4; i++)
                r->rng.s[i] = (uint64_t)s4[i];
        }
        if (th) {
            int32_t *dst = r->hash_table;
            memcpy(dst, (const int32_t *)th->data + (size_t)l * V, (size_t)V * sizeof(int32_t));
            for (int v = 0; v < V; v++)
                if (dst[v] < 0 || dst[v] >= E)
                    return loom_errf(e, LOOM_EFORMAT, "%s: hash table entry out of range", path);
        }
    }
    return LOOM_OK;
}

static int write_renamed(const char *path, const st_tensor *t, size_t n, loom_err *e)
{
    size_t len = strlen(path) + 8;
    char *tmp = xmalloc(len);
    snprintf(tmp, len, "%s.tmp", path);
    int rc = st_save(tmp, t, n, e);
    if (!rc && rename(tmp, path) != 0)
        rc = loom_errf(e, LOOM_EIO, "%s: rename failed: %s", path, strerror(errno));
    if (rc)
        unlink(tmp);
    free(tmp);
    return rc;
}

static st_tensor tensor_f32(const char *name, const float *data, size_t n)
{
    st_tensor t = {0};
    t.name = (char *)name;
    t.dtype = ST_F32;
    t.n_dims = 1;
    t.shape[0] = (int64_t)n;
    t.data = data;
    return t;
}

int train_checkpoint_save(train_model *m, const train_adamw *o, int64_t step, uint64_t seed,
                          const char *path, loom_err *e)
{
    float *p = gather_full(m, m->params);
    float *mo = o ? gather_full(m, o->m) : NULL;
    float *vo = o ? gather_full(m, o->v) : NULL;
    int rc = LOOM_OK;
    if (!p || (o && (!mo || !vo))) {
        rc = loom_errf(e, LOOM_ENOMEM, "train: out of memory saving a checkpoint");
        goto out;
    }
    if (m->dist->rank == 0) {
        /* meta: step, seed, AdamW t, n_params, a hash of the tensor table (shape check) */
        uint64_t h = 0;
        for (int i = 0; i < m->n_tensors; i++) {
            h = loom_hash64(m->tensors[i].name, strlen(m->tensors[i].name), h);
            h = loom_hash64(m->tensors[i].shape, sizeof(m->tensors[i].shape), h);
        }
        int64_t meta[5] = {step, (int64_t)seed, o ? o->t : 0, (int64_t)m->n_params,
                           (int64_t)(h >> 1)};
        st_tensor t[7];
        t[0] = tensor_f32("params", p, m->n_params);
        size_t n = 1;
        if (o) {
            t[n++] = tensor_f32("adam_m", mo, m->n_params);
            t[n++] = tensor_f32("adam_v", vo, m->n_params);
        }
        st_tensor tm = {0};
        tm.name = "meta";
        tm.dtype = ST_I64;
        tm.n_dims = 1;
        tm.shape[0] = 5;
        tm.data = meta;
        t[n++] = tm;
        router_state rs;
        router_state_gather(m, &rs);
        int L = m->cfg.model.n_layers;
        if (rs.bias)
            t[n++] = tensor_f32("router_balance_bias", rs.bias,
                                (size_t)L * m->cfg.model.n_experts);
        if (rs.rng) {
            st_tensor tr = {0};
            tr.name = "router_rng";
            tr.dtype = ST_I64;
            tr.n_dims = 1;
            tr.shape[0] = (int64_t)L * 4;
            tr.data = rs.rng;
            t[n++] = tr;
        }
        if (rs.hash) {
            st_tensor th = {0};
            th.name = "router_hash_table";
            th.dtype = ST_I32;
            th.n_dims = 1;
            th.shape[0] = (int64_t)L * m->cfg.model.vocab_size;
            th.data = rs.hash;
            t[n++] = th;
        }
        rc = write_renamed(path, t, n, e);
        router_state_free(&rs);
    }
    train_dist_bcast(m->dist, &rc, sizeof(rc), 0);
    if (rc && m->dist->rank != 0)
        loom_errf(e, rc, "train: rank 0 failed to write %s", path);
out:
    free(p);
    free(mo);
    free(vo);
    return rc;
}

int train_checkpoint_load(train_model *m, train_adamw *o, int64_t *step, uint64_t *seed,
                          const char *path, loom_err *e)
{
    st_file f;
    int rc = st_open(path, &f, e);
    if (rc)
        return rc;
    const st_tensor *tm = st_find(&f, "meta"), *tp = st_find(&f, "params");
    const st_tensor *tmo = st_find(&f, "adam_m"), *tvo = st_find(&f, "adam_v");
    uint64_t h = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        h = loom_hash64(m->tensors[i].name, strlen(m->tensors[i].name), h);
        h = loom_hash64(m->tensors[i].shape, sizeof(m->tensors[i].shape), h);
    }
    int64_t meta[5] = {0};
    if (!tm || tm->dtype != ST_I64 || tm->n_dims != 1 || tm->shape[0] != 5 || !tp ||
        tp->dtype != ST_F32 || tp->n_dims != 1) {
        rc = loom_errf(e, LOOM_EFORMAT, "%s: not a loom training checkpoint", path);
        goto out;
    }
    memcpy(meta, tm->data, sizeof(meta));
    if (meta[3] != (int64_t)m->n_params || meta[4] != (int64_t)(h >> 1) ||
        tp->shape[0] != (int64_t)m->n_params) {
        rc = loom_errf(e, LOOM_EFORMAT,
                       "%s: checkpoint of another model shape (%lld parameters, this model has "
                       "%zu) (HINT: resume with the same --model-preset/--model-spec/--init and --router)",
                       path, (long long)meta[3], m->n_params);
        goto out;
    }
    memcpy(m->params, tp->data, m->n_params * sizeof(float));
    if (o) {
        if (!tmo || !tvo || tmo->shape[0] != (int64_t)m->n_params ||
            tvo->shape[0] != (int64_t)m->n_params) {
            rc = loom_errf(e, LOOM_EFORMAT, "%s: checkpoint lacks the optimiser state", path);
            goto out;
        }
        memcpy(o->m, tmo->data, m->n_params * sizeof(float));
        memcpy(o->v, tvo->data, m->n_params * sizeof(float));
        o->t = meta[2];
    }
    if ((rc = router_state_load(m, &f, path, e)))
        goto out;
    if (step)
        *step = meta[0];
    if (seed)
        *seed = (uint64_t)meta[1];
out:
    st_close(&f);
    return rc;
}

/* ------------------------------------------------------------------ Hugging Face export */

static int copy_file(const char *src, const char *dst, loom_err *e)
{
    char *data = NULL;
    size_t len = 0;
    int rc = loom_read_file(src, &data, &len, e);
    if (rc)
        return rc;
    FILE *f = fopen(dst, "wb");
    if (!f || fwrite(data, 1, len, f) != len) {
        if (f)
            fclose(f);
        free(data);
        return loom_errf(e, LOOM_EIO, "%s: cannot write: %s", dst, strerror(errno));
    }
    free(data);
    return fclose(f) == 0 ? LOOM_OK : loom_errf(e, LOOM_EIO, "%s: write failed", dst);
}

static char *config_json(const train_model *m)
{
    const model_config *c = &m->cfg.model;
    bool moe = c->n_experts > 0;
    bool mixtral = moe && m->cfg.router == MOE_ROUTER_TOPK && m->cfg.renormalize;
    cJSON *j = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(j, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString(!moe ? "LlamaForCausalLM"
                                                  : mixtral ? "MixtralForCausalLM"
                                                            : "LoomMoeForCausalLM"));
    cJSON_AddStringToObject(j, "model_type", !moe ? "llama" : mixtral ? "mixtral" : "loom_moe");
    cJSON_AddStringToObject(j, "dtype", "float32");
    cJSON_AddStringToObject(j, "torch_dtype", "float32");
    cJSON_AddStringToObject(j, "hidden_act", "silu");
    cJSON_AddNumberToObject(j, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(j, "hidden_size", c->hidden_size);
    cJSON_AddNumberToObject(j, "intermediate_size", c->intermediate_size);
    cJSON_AddNumberToObject(j, "num_hidden_layers", c->n_layers);
    cJSON_AddNumberToObject(j, "num_attention_heads", c->n_heads);
    cJSON_AddNumberToObject(j, "num_key_value_heads", c->n_kv_heads);
    cJSON_AddNumberToObject(j, "head_dim", c->head_dim);
    cJSON_AddNumberToObject(j, "max_position_embeddings",
                            c->max_position_embeddings > 0 ? c->max_position_embeddings : 2048);
    cJSON_AddNumberToObject(j, "rms_norm_eps", c->rms_norm_eps);
    cJSON_AddNumberToObject(j, "rope_theta", c->rope_theta);
    cJSON_AddBoolToObject(j, "tie_word_embeddings", c->tie_word_embeddings);
    cJSON_AddBoolToObject(j, "attention_bias", false);
    if (c->bos_token_id >= 0)
        cJSON_AddNumberToObject(j, "bos_token_id", c->bos_token_id);
    if (c->n_eos > 0)
        cJSON_AddNumberToObject(j, "eos_token_id", c->eos_token_ids[0]);
    if (moe) {
        cJSON_AddNumberToObject(j, "num_local_experts", c->n_experts);
        cJSON_AddNumberToObject(j, "num_experts_per_tok", moe_router_slots(&m->router_cfg));
        cJSON_AddNumberToObject(j, "router_aux_loss_coef", m->cfg.aux_coef);
        cJSON_AddNullToObject(j, "sliding_window");
        if (!mixtral) {
            /* what src/model needs to route as training did (config.c parse_loom_router) */
            const moe_router_config *rc = &m->moe[0].router.cfg;
            cJSON_AddStringToObject(j, "loom_router", moe_router_kind_name(m->cfg.router));
            cJSON_AddBoolToObject(j, "loom_router_renormalize", rc->renormalize);
            cJSON_AddStringToObject(j, "loom_router_score",
                                    rc->score == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax");
            cJSON_AddNumberToObject(j, "loom_router_route_scale", rc->route_scale);
            if (m->cfg.router == MOE_ROUTER_GROUP_LIMITED) {
                cJSON_AddNumberToObject(j, "loom_router_n_groups", rc->n_groups);
                cJSON_AddNumberToObject(j, "loom_router_topk_groups", rc->topk_groups);
            }
        }
    }
    char *s = cJSON_Print(j);
    cJSON_Delete(j);
    return s;
}

int train_export_hf(train_model *m, const char *dir, const char *tokenizer_dir, loom_err *e)
{
    float *full = gather_full(m, m->params);
    if (!full)
        return loom_errf(e, LOOM_ENOMEM, "train: out of memory exporting");
    int rc = LOOM_OK;
    if (m->dist->rank == 0) {
        if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
            rc = loom_errf(e, LOOM_EIO, "%s: cannot create: %s", dir, strerror(errno));
            goto done;
        }
        char *cfg = config_json(m);
        char *path = loom_path_join(dir, "config.json");
        FILE *f = fopen(path, "w");
        if (!f || fputs(cfg, f) < 0 || fclose(f) != 0)
            rc = loom_errf(e, LOOM_EIO, "%s: cannot write", path);
        free(path);
        free(cfg);
        if (rc)
            goto done;
        int L = m->cfg.model.n_layers;
        st_tensor *t = xcalloc((size_t)m->n_tensors + (size_t)L, sizeof(st_tensor));
        for (int i = 0; i < m->n_tensors; i++) {
            const train_param *p = &m->tensors[i];
            t[i].name = (char *)p->name;
            t[i].dtype = ST_F32;
            t[i].n_dims = p->n_dims;
            t[i].shape[0] = p->shape[0];
            t[i].shape[1] = p->shape[1];
            t[i].data = full + p->offset;
        }
        /* router state the forward reads: the group-limited balance bias (DeepSeek-V3's
         * e_score_correction_bias), the hash router's token -> expert table */
        size_t n = (size_t)m->n_tensors;
        char (*names)[96] = xcalloc((size_t)L + 1, sizeof(*names));
        for (int l = 0; m->moe && l < L; l++) {
            const moe_router *r = &m->moe[l].router;
            st_tensor *x = &t[n];
            x->n_dims = 1;
            if (r->balance_bias) {
                snprintf(names[l], sizeof(names[l]),
                         "model.layers.%d.block_sparse_moe.gate.e_score_correction_bias", l);
                x->dtype = ST_F32;
                x->shape[0] = m->cfg.model.n_experts;
                x->data = r->balance_bias;
            } else if (r->hash_table) {
                snprintf(names[l], sizeof(names[l]), "model.layers.%d.block_sparse_moe.gate."
                         "hash_table", l);
                x->dtype = ST_I32;
                x->shape[0] = m->cfg.model.vocab_size;
                x->data = r->hash_table;
            } else {
                continue;
            }
            x->name = names[l];
            n++;
        }
        path = loom_path_join(dir, "model.safetensors");
        rc = write_renamed(path, t, n, e);
        free(path);
        free(t);
        free(names);
        static const char *const tok_files[] = {"tokenizer.json", "tokenizer_config.json",
                                                "chat_template.jinja", "generation_config.json"};
        for (size_t i = 0; !rc && tokenizer_dir && i < sizeof(tok_files) / sizeof(*tok_files);
             i++) {
            char *src = loom_path_join(tokenizer_dir, tok_files[i]);
            char *dst = loom_path_join(dir, tok_files[i]);
            if (loom_file_exists(src))
                rc = copy_file(src, dst, e);
            free(src);
            free(dst);
        }
    }
done:
    train_dist_bcast(m->dist, &rc, sizeof(rc), 0);
    if (rc && m->dist->rank != 0)
        loom_errf(e, rc, "train: rank 0 failed to export %s", dir);
    free(full);
    return rc;
}
