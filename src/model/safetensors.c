/*
 * safetensors: an 8-byte little-endian header length N, N bytes of JSON
 *   {"name": {"dtype": "F32", "shape": [a, b], "data_offsets": [begin, end]}, ...,
 *    "__metadata__": {...}}
 * then the data section; offsets are relative to its start. Files are mmap'd; st_parse trusts
 * nothing in the header (it is the fuzz target's entry point).
 */
#define _GNU_SOURCE
#include "loom/model.h"
#include "loom/tensor.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (256u << 20) /* 256 MiB of JSON is far beyond any real checkpoint */

static const struct {
    const char *name;
    st_dtype dtype;
    int size;
} dtype_table[] = {
    {"F32", ST_F32, 4},       {"F16", ST_F16, 2},       {"BF16", ST_BF16, 2},
    {"I32", ST_I32, 4},       {"I64", ST_I64, 8},       {"F64", ST_OTHER, 8},
    {"I8", ST_OTHER, 1},      {"U8", ST_OTHER, 1},      {"I16", ST_OTHER, 2},
    {"U16", ST_OTHER, 2},     {"U32", ST_OTHER, 4},     {"U64", ST_OTHER, 8},
    {"BOOL", ST_OTHER, 1},    {"F8_E4M3", ST_OTHER, 1}, {"F8_E5M2", ST_OTHER, 1},
    {"F8_E8M0", ST_OTHER, 1},
};

static int dtype_lookup(const char *name, st_dtype *dt)
{
    for (size_t i = 0; i < sizeof(dtype_table) / sizeof(dtype_table[0]); i++) {
        if (strcmp(dtype_table[i].name, name) == 0) {
            *dt = dtype_table[i].dtype;
            return dtype_table[i].size;
        }
    }
    return 0;
}

/* A JSON number that is a non-negative integer exactly representable in a double. */
static bool json_size(const cJSON *j, size_t *out)
{
    if (!cJSON_IsNumber(j))
        return false;
    double v = j->valuedouble;
    if (!(v >= 0.0 && v <= 9007199254740992.0) || floor(v) != v)
        return false;
    *out = (size_t)v;
    return true;
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static int cmp_offset(const void *a, const void *b)
{
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

static void free_tensors(st_file *f)
{
    for (size_t i = 0; i < f->n_tensors; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    f->tensors = NULL;
    f->n_tensors = 0;
}

/* One header entry into t; returns 0 or LOOM_EFORMAT/LOOM_EUNSUPPORTED with a message. */
static int parse_entry(const cJSON *item, const uint8_t *data, size_t data_len, st_tensor *t,
                       loom_err *e)
{
    const char *name = item->string;
    if (!cJSON_IsObject(item))
        return loom_errf(e, LOOM_EFORMAT, "tensor '%.200s': entry is not an object", name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(item, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
    if (!cJSON_IsString(dt) || !cJSON_IsArray(shape) || !cJSON_IsArray(offs))
        return loom_errf(e, LOOM_EFORMAT,
                         "tensor '%.200s': needs string dtype, array shape and data_offsets", name);
    int elsize = dtype_lookup(dt->valuestring, &t->dtype);
    if (!elsize)
        return loom_errf(e, LOOM_EFORMAT, "tensor '%.200s': unknown dtype '%.32s'", name,
                         dt->valuestring);
    snprintf(t->dtype_name, sizeof(t->dtype_name), "%s", dt->valuestring);

    int nd = cJSON_GetArraySize(shape);
    if (nd > 8)
        return loom_errf(e, LOOM_EFORMAT, "tensor '%.200s': %d dimensions (at most 8)", name, nd);
    size_t numel = 1;
    t->n_dims = 0;
    const cJSON *dim;
    cJSON_ArrayForEach(dim, shape)
    {
        size_t v;
        if (!json_size(dim, &v) || v > INT64_MAX)
            return loom_errf(e, LOOM_EFORMAT, "tensor '%.200s': bad shape entry", name);
        if (!loom_mul_ok(numel, v, &numel))
            return loom_errf(e, LOOM_EFORMAT, "tensor '%.200s': shape overflows", name);
        t->shape[t->n_dims++] = (int64_t)v;
    }
    size_t nbytes;
    if (!loom_mul_ok(numel, (size_t)elsize, &nbytes))
        return loom_errf(e, LOOM_EFORMAT, "tensor '%.200s': shape overflows", name);

    size_t begin, end;
    if (cJSON_GetArraySize(offs) != 2 || !json_size(cJSON_GetArrayItem(offs, 0), &begin) ||
        !json_size(cJSON_GetArrayItem(offs, 1), &end) || begin > end)
        return loom_errf(e, LOOM_EFORMAT, "tensor '%.200s': bad data_offsets", name);
    if (end > data_len)
        return loom_errf(e, LOOM_EFORMAT,
                         "tensor '%.200s': data_offsets [%zu, %zu] past the end of the data "
                         "(%zu bytes; file truncated?)",
                         name, begin, end, data_len);
    if (end - begin != nbytes)
        return loom_errf(e, LOOM_EFORMAT,
                         "tensor '%.200s': %zu bytes of data for %zu elements of %s", name,
                         end - begin, numel, t->dtype_name);
    t->offset = begin;
    t->nbytes = nbytes;
    t->data = data + begin;
    return LOOM_OK;
}

int st_parse(const uint8_t *bytes, size_t file_len, st_file *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    if (file_len < 8)
        return loom_errf(e, LOOM_EFORMAT, "%zu bytes is too small for a safetensors file",
                         file_len);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | bytes[i];
    if (n > file_len - 8)
        return loom_errf(e, LOOM_EFORMAT,
                         "header length %llu is larger than the file (%zu bytes; truncated?)",
                         (unsigned long long)n, file_len);
    if (n < 2 || n > ST_MAX_HEADER)
        return loom_errf(e, LOOM_EFORMAT, "implausible header length %llu", (unsigned long long)n);
    const uint8_t *data = bytes + 8 + n;
    size_t data_len = file_len - 8 - (size_t)n;

    cJSON *root = cJSON_ParseWithLength((const char *)bytes + 8, (size_t)n);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return loom_errf(e, LOOM_EFORMAT, "header is not a JSON object");
    }
    int rc = LOOM_OK;
    st_tensor **by_offset = NULL;
    size_t count = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, root) count++;
    out->tensors = calloc(count ? count : 1, sizeof(st_tensor));
    if (!out->tensors) {
        rc = loom_errf(e, LOOM_ENOMEM, "out of memory for %zu tensor entries", count);
        goto fail;
    }
    cJSON_ArrayForEach(item, root)
    {
        if (!item->string) {
            rc = loom_errf(e, LOOM_EFORMAT, "header entry without a name");
            goto fail;
        }
        if (strcmp(item->string, "__metadata__") == 0)
            continue;
        st_tensor *t = &out->tensors[out->n_tensors];
        rc = parse_entry(item, data, data_len, t, e);
        if (rc)
            goto fail;
        t->name = strdup(item->string);
        if (!t->name) {
            rc = loom_errf(e, LOOM_ENOMEM, "out of memory");
            goto fail;
        }
        out->n_tensors++;
    }
    /* Sorted by name for st_find's binary search; equal neighbours are duplicates. */
    qsort(out->tensors, out->n_tensors, sizeof(st_tensor), cmp_name);
    for (size_t i = 1; i < out->n_tensors; i++) {
        if (strcmp(out->tensors[i - 1].name, out->tensors[i].name) == 0) {
            rc = loom_errf(e, LOOM_EFORMAT, "tensor '%.200s' appears twice", out->tensors[i].name);
            goto fail;
        }
    }
    by_offset = malloc((out->n_tensors ? out->n_tensors : 1) * sizeof(*by_offset));
    if (!by_offset) {
        rc = loom_errf(e, LOOM_ENOMEM, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < out->n_tensors; i++)
        by_offset[i] = &out->tensors[i];
    qsort(by_offset, out->n_tensors, sizeof(*by_offset), cmp_offset);
    for (size_t i = 1; i < out->n_tensors; i++) {
        const st_tensor *a = by_offset[i - 1], *b = by_offset[i];
        if (b->offset < a->offset + a->nbytes) {
            rc = loom_errf(e, LOOM_EFORMAT, "tensors '%.150s' and '%.150s' overlap", a->name,
                           b->name);
            goto fail;
        }
    }
    free(by_offset);
    cJSON_Delete(root);
    return LOOM_OK;
fail:
    free(by_offset);
    free_tensors(out);
    cJSON_Delete(root);
    return rc;
}

/* Prefixes e's message with the file name, so that a corrupt shard names itself. */
static int prefix_path(loom_err *e, int rc, const char *path)
{
    if (e) {
        char msg[sizeof(e->msg)];
        memcpy(msg, e->msg, sizeof(msg));
        msg[sizeof(msg) - 1] = 0;
        loom_errf(e, rc, "%s: %s", path, msg);
    }
    return rc;
}

int st_open(const char *path, st_file *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return loom_errf(e, errno == ENOENT ? LOOM_ENOTFOUND : LOOM_EIO, "cannot open %s: %s", path,
                         strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return loom_errf(e, LOOM_EIO, "%s: not a regular file", path);
    }
    size_t len = (size_t)st.st_size;
    if (len < 8) {
        close(fd);
        return loom_errf(e, LOOM_EFORMAT, "%s: %zu bytes is too small for a safetensors file", path,
                         len);
    }
    void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    close(fd);
    if (map == MAP_FAILED)
        return loom_errf(e, LOOM_EIO, "cannot mmap %s: %s", path, strerror(err));
    int rc = st_parse(map, len, out, e);
    if (rc) {
        munmap(map, len);
        return prefix_path(e, rc, path);
    }
    out->map = map;
    out->map_len = len;
    out->path = xstrdup(path);
    return LOOM_OK;
}

void st_close(st_file *f)
{
    if (!f)
        return;
    free_tensors(f);
    if (f->map)
        munmap(f->map, f->map_len);
    free(f->path);
    memset(f, 0, sizeof(*f));
}

const st_tensor *st_find(const st_file *f, const char *name)
{
    size_t lo = 0, hi = f->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->tensors[mid].name, name);
        if (c == 0)
            return &f->tensors[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* ---------------------------------------------------------------- checkpoints */

static int set_add_file(st_set *s, const char *dir, const char *name, loom_err *e)
{
    for (int i = 0; i < s->n_files; i++) {
        const char *p = strrchr(s->files[i].path, '/');
        if (strcmp(p ? p + 1 : s->files[i].path, name) == 0)
            return LOOM_OK;
    }
    char *path = loom_path_join(dir, name);
    s->files = xrealloc(s->files, (size_t)(s->n_files + 1) * sizeof(st_file));
    int rc = st_open(path, &s->files[s->n_files], e);
    free(path);
    if (rc == LOOM_OK)
        s->n_files++;
    return rc;
}

static int set_open_index(const char *dir, const char *index_path, st_set *s, loom_err *e)
{
    char *text = NULL;
    size_t len = 0;
    int rc = loom_read_file(index_path, &text, &len, e);
    if (rc)
        return rc;
    cJSON *root = cJSON_ParseWithLength(text, len);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(map)) {
        rc = loom_errf(e, LOOM_EFORMAT, "%s: not JSON with a weight_map object", index_path);
        goto done;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, map)
    {
        const char *f = cJSON_IsString(it) ? it->valuestring : NULL;
        if (!f || !*f || strchr(f, '/') || strcmp(f, "..") == 0 || strcmp(f, ".") == 0) {
            rc = loom_errf(e, LOOM_EFORMAT, "%s: bad file name for tensor '%.200s'", index_path,
                           it->string ? it->string : "?");
            goto done;
        }
        rc = set_add_file(s, dir, f, e);
        if (rc)
            goto done;
    }
    /* Every tensor the index names must be in the shard it names (catches a wrong shard). */
    cJSON_ArrayForEach(it, map)
    {
        const st_file *file = NULL;
        for (int i = 0; i < s->n_files && !file; i++) {
            const char *p = strrchr(s->files[i].path, '/');
            if (strcmp(p ? p + 1 : s->files[i].path, it->valuestring) == 0)
                file = &s->files[i];
        }
        if (!file || !st_find(file, it->string)) {
            rc = loom_errf(e, LOOM_EFORMAT, "%s lists tensor '%.200s' in %s, which lacks it",
                           index_path, it->string, it->valuestring);
            goto done;
        }
    }
    if (s->n_files == 0)
        rc = loom_errf(e, LOOM_EFORMAT, "%s: empty weight_map", index_path);
done:
    cJSON_Delete(root);
    free(text);
    return rc;
}

int st_set_open_dir(const char *dir, st_set *out, loom_err *e)
{
    memset(out, 0, sizeof(*out));
    char *index = loom_path_join(dir, "model.safetensors.index.json");
    char *single = loom_path_join(dir, "model.safetensors");
    int rc;
    if (loom_file_exists(index))
        rc = set_open_index(dir, index, out, e);
    else if (loom_file_exists(single))
        rc = set_add_file(out, dir, "model.safetensors", e);
    else
        rc = loom_errf(e, LOOM_ENOTFOUND,
                       "%s: no model.safetensors or model.safetensors.index.json", dir);
    free(index);
    free(single);
    if (rc)
        st_set_close(out);
    return rc;
}

void st_set_close(st_set *s)
{
    if (!s)
        return;
    for (int i = 0; i < s->n_files; i++)
        st_close(&s->files[i]);
    free(s->files);
    s->files = NULL;
    s->n_files = 0;
}

const st_tensor *st_set_find(const st_set *s, const char *name)
{
    for (int i = 0; i < s->n_files; i++) {
        const st_tensor *t = st_find(&s->files[i], name);
        if (t)
            return t;
    }
    return NULL;
}

/* Widening is memory bound; it is split across the kernel threads. */
typedef struct widen_job {
    const void *src;
    float *dst;
    size_t n;
    bool bf16;
} widen_job;

static void widen_run(void *arg, int tid, int n_threads)
{
    const widen_job *j = arg;
    size_t per = (j->n + (size_t)n_threads - 1) / (size_t)n_threads;
    size_t a = per * (size_t)tid, b = a + per < j->n ? a + per : j->n;
    if (a >= b)
        return;
    const uint16_t *src = (const uint16_t *)((const char *)j->src + 2 * a);
    if (j->bf16)
        tensor_bf16_to_f32(j->dst + a, src, b - a);
    else
        tensor_f16_to_f32(j->dst + a, src, b - a);
}

int st_tensor_to_f32(const st_tensor *t, float *dst, loom_err *e)
{
    size_t n;
    switch (t->dtype) {
    case ST_F32:
        memcpy(dst, t->data, t->nbytes);
        return LOOM_OK;
    case ST_BF16:
    case ST_F16:
        n = t->nbytes / 2;
        break;
    default:
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "tensor '%.200s' has dtype %s; weights must be F32, BF16 or F16", t->name,
                         t->dtype_name);
    }
    widen_job j = {t->data, dst, n, t->dtype == ST_BF16};
    if (n >= ((size_t)1 << 20))
        tensor_parallel(widen_run, &j);
    else
        widen_run(&j, 0, 1);
    return LOOM_OK;
}

/* ---------------------------------------------------------------- writing */

static int dtype_size(st_dtype dt, const char **name)
{
    switch (dt) {
    case ST_F32:
        *name = "F32";
        return 4;
    case ST_F16:
        *name = "F16";
        return 2;
    case ST_BF16:
        *name = "BF16";
        return 2;
    case ST_I32:
        *name = "I32";
        return 4;
    case ST_I64:
        *name = "I64";
        return 8;
    default:
        return 0;
    }
}

int st_save(const char *path, const st_tensor *tensors, size_t n, loom_err *e)
{
    int rc = LOOM_OK;
    size_t *sizes = xcalloc(n ? n : 1, sizeof(size_t));
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
    cJSON_AddStringToObject(meta, "format", "pt");
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const st_tensor *t = &tensors[i];
        const char *dt;
        int es = dtype_size(t->dtype, &dt);
        size_t numel = 1;
        bool ok = es > 0 && t->n_dims >= 0 && t->n_dims <= 8;
        for (int d = 0; ok && d < t->n_dims; d++)
            ok = t->shape[d] >= 0 && loom_mul_ok(numel, (size_t)t->shape[d], &numel);
        if (!ok || !loom_mul_ok(numel, (size_t)es, &sizes[i])) {
            rc = loom_errf(e, LOOM_EINVAL, "%s: cannot save tensor '%.200s' (dtype or shape)", path,
                           t->name);
            goto done;
        }
        cJSON *item = cJSON_AddObjectToObject(root, t->name);
        cJSON_AddStringToObject(item, "dtype", dt);
        cJSON *shape = cJSON_AddArrayToObject(item, "shape");
        for (int d = 0; d < t->n_dims; d++)
            cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
        cJSON *offs = cJSON_AddArrayToObject(item, "data_offsets");
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + sizes[i])));
        off += sizes[i];
    }
    char *json = cJSON_PrintUnformatted(root);
    size_t len = strlen(json), padded = (len + 7) & ~(size_t)7;
    FILE *f = fopen(path, "wb");
    if (!f) {
        rc = loom_errf(e, LOOM_EIO, "cannot write %s: %s", path, strerror(errno));
        free(json);
        goto done;
    }
    unsigned char hdr[8];
    for (int i = 0; i < 8; i++)
        hdr[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    bool ok = fwrite(hdr, 1, 8, f) == 8 && fwrite(json, 1, len, f) == len;
    for (size_t i = len; ok && i < padded; i++)
        ok = fputc(' ', f) != EOF;
    for (size_t i = 0; ok && i < n; i++)
        ok = sizes[i] == 0 || fwrite(tensors[i].data, 1, sizes[i], f) == sizes[i];
    free(json);
    if (fclose(f) != 0)
        ok = false;
    if (!ok)
        rc = loom_errf(e, LOOM_EIO, "error writing %s", path);
done:
    cJSON_Delete(root);
    free(sizes);
    return rc;
}
