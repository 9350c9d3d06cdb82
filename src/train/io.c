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
    (void)c;
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
        st_tensor t[4];
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
        rc = write_renamed(path, t, n, e);
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
                       "%zu) (HINT: resume with the same --model-preset/--init and --router)",
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
            cJSON_AddStringToObject(j, "loom_router", moe_router_kind_name(m->cfg.router));
            cJSON_AddBoolToObject(j, "loom_router_renormalize", m->cfg.renormalize);
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
        st_tensor *t = xcalloc((size_t)m->n_tensors, sizeof(st_tensor));
        for (int i = 0; i < m->n_tensors; i++) {
            const train_param *p = &m->tensors[i];
            t[i].name = (char *)p->name;
            t[i].dtype = ST_F32;
            t[i].n_dims = p->n_dims;
            t[i].shape[0] = p->shape[0];
            t[i].shape[1] = p->shape[1];
            t[i].data = full + p->offset;
        }
        path = loom_path_join(dir, "model.safetensors");
        rc = write_renamed(path, t, (size_t)m->n_tensors, e);
        free(path);
        free(t);
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
