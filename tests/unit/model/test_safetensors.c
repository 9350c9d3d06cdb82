/* safetensors: a valid file written to /tmp, then every kind of corruption must give the right
 * error code and a message, never a crash; sharded checkpoints through an index. */
#include "testlib.h"

#include "loom/model.h"
#include "loom/tensor.h"

#include <math.h>
#include <sys/stat.h>

static char g_dir[64];

static char *tmp_path(const char *name)
{
    return loom_path_join(g_dir, name);
}

/* Writes an 8-byte length, the header, then n data bytes. */
static void write_st(const char *path, const char *header, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    uint64_t len = strlen(header);
    fwrite(&len, 8, 1, f);
    fwrite(header, 1, len, f);
    if (n)
        fwrite(data, 1, n, f);
    fclose(f);
}

static void write_raw(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(data, 1, n, f);
    fclose(f);
}

/* 2x3 F32 (24 bytes) + 4 BF16 (8) + 2 F16 (4) + 3 I32 (12) + scalar F32 (4) = 52 bytes */
static const char *valid_header =
    "{\"__metadata__\":{\"format\":\"pt\"},"
    "\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},"
    "\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[24,32]},"
    "\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[32,36]},"
    "\"ids\":{\"dtype\":\"I32\",\"shape\":[3],\"data_offsets\":[36,48]},"
    "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[48,52]}}";

static void valid_data(unsigned char *d)
{
    float w[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[4] = {0x3f80, 0x4000, 0xbf80, 0x0000};
    uint16_t h[2] = {0x3c00, 0xc000};
    int32_t ids[3] = {7, 8, 9};
    float s = 42;
    memcpy(d, w, 24);
    memcpy(d + 24, b, 8);
    memcpy(d + 32, h, 4);
    memcpy(d + 36, ids, 12);
    memcpy(d + 48, &s, 4);
}

static void test_valid(void **state)
{
    (void)state;
    unsigned char data[52];
    valid_data(data);
    char *p = tmp_path("valid.safetensors");
    write_st(p, valid_header, data, sizeof(data));
    st_file f;
    loom_err e = {0};
    assert_int_equal(st_open(p, &f, &e), 0);
    assert_int_equal(f.n_tensors, 5);
    const st_tensor *w = st_find(&f, "w");
    assert_non_null(w);
    assert_int_equal(w->dtype, ST_F32);
    assert_int_equal(w->n_dims, 2);
    assert_int_equal(w->shape[0], 2);
    assert_int_equal(w->shape[1], 3);
    assert_int_equal(w->nbytes, 24);
    float out[6];
    assert_int_equal(st_tensor_to_f32(w, out, &e), 0);
    assert_true(out[0] == 1 && out[5] == 6);
    assert_int_equal(st_tensor_to_f32(st_find(&f, "b"), out, &e), 0);
    assert_true(out[0] == 1 && out[1] == 2 && out[2] == -1 && out[3] == 0);
    assert_int_equal(st_tensor_to_f32(st_find(&f, "h"), out, &e), 0);
    assert_true(out[0] == 1 && out[1] == -2);
    const st_tensor *s = st_find(&f, "s");
    assert_int_equal(s->n_dims, 0);
    assert_int_equal(st_tensor_to_f32(s, out, &e), 0);
    assert_true(out[0] == 42);
    const st_tensor *ids = st_find(&f, "ids");
    assert_int_equal(ids->dtype, ST_I32);
    assert_int_equal(st_tensor_to_f32(ids, out, &e), LOOM_EUNSUPPORTED);
    assert_non_null(strstr(e.msg, "ids"));
    assert_null(st_find(&f, "missing"));
    assert_null(st_find(&f, "__metadata__"));
    st_close(&f);
    free(p);
}

/* st_open on header+data must fail with code, and the message must contain needle. */
static void expect_bad(const char *header, const void *data, size_t n, int code, const char *needle)
{
    char *p = tmp_path("bad.safetensors");
    write_st(p, header, data, n);
    st_file f;
    loom_err e = {0};
    int rc = st_open(p, &f, &e);
    if (rc != code || !strstr(e.msg, needle) || !strstr(e.msg, "bad.safetensors"))
        fail_msg("header %.80s: rc %d (want %d), message '%s' (want '%s')", header, rc, code, e.msg,
                 needle);
    assert_null(strchr(e.msg, '\n'));
    free(p);
}

static void test_corrupt_headers(void **state)
{
    (void)state;
    unsigned char data[64] = {0};
    expect_bad("{\"a\":{\"dtype\":\"F33\",\"shape\":[1],\"data_offsets\":[0,4]}}", data, 4,
               LOOM_EFORMAT, "unknown dtype");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", data, 8,
               LOOM_EFORMAT, "past the end");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", data, 8,
               LOOM_EFORMAT, "data_offsets");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", data, 8,
               LOOM_EFORMAT, "bytes of data");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],"
               "\"data_offsets\":[0,8]}}",
               data, 8, LOOM_EFORMAT, "overflow");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],"
               "\"data_offsets\":[0,8]}}",
               data, 8, LOOM_EFORMAT, "shape");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", data, 4,
               LOOM_EFORMAT, "shape");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", data, 4,
               LOOM_EFORMAT, "shape");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
               data, 4, LOOM_EFORMAT, "dimensions");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", data, 4,
               LOOM_EFORMAT, "data_offsets");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", data, 4, LOOM_EFORMAT, "dtype");
    expect_bad("{\"a\":[1,2]}", data, 4, LOOM_EFORMAT, "not an object");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
               data, 8, LOOM_EFORMAT, "overlap");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
               data, 8, LOOM_EFORMAT, "twice");
    expect_bad("[1,2,3]", data, 0, LOOM_EFORMAT, "JSON object");
    expect_bad("{\"a\":", data, 0, LOOM_EFORMAT, "JSON object");
    /* an empty header is a valid file with no tensors */
    char *p = tmp_path("empty.safetensors");
    write_st(p, "{}", data, 0);
    st_file f;
    loom_err e = {0};
    assert_int_equal(st_open(p, &f, &e), 0);
    assert_int_equal(f.n_tensors, 0);
    st_close(&f);
    free(p);
}

static void test_bad_lengths(void **state)
{
    (void)state;
    loom_err e = {0};
    st_file f;
    char *p = tmp_path("short.safetensors");
    write_raw(p, "abc", 3);
    assert_int_equal(st_open(p, &f, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "too small"));
    /* header length beyond the file */
    unsigned char buf[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0, '{', '}'};
    write_raw(p, buf, 10);
    assert_int_equal(st_open(p, &f, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "larger than the file"));
    /* 2^64-1: must not overflow in the check */
    memset(buf, 0xff, 8);
    write_raw(p, buf, 10);
    assert_int_equal(st_open(p, &f, &e), LOOM_EFORMAT);
    /* zero-length header */
    memset(buf, 0, 8);
    write_raw(p, buf, 10);
    assert_int_equal(st_open(p, &f, &e), LOOM_EFORMAT);
    free(p);
    /* missing file */
    p = tmp_path("nope.safetensors");
    assert_int_equal(st_open(p, &f, &e), LOOM_ENOTFOUND);
    free(p);
    /* a truncated copy of a valid file: every prefix fails cleanly, the whole one works */
    unsigned char data[52];
    valid_data(data);
    p = tmp_path("valid.safetensors");
    write_st(p, valid_header, data, sizeof(data));
    char *full = NULL;
    size_t len = 0;
    assert_int_equal(loom_read_file(p, &full, &len, &e), 0);
    for (size_t cut = 0; cut < len; cut++) {
        int rc = st_parse((const uint8_t *)full, cut, &f, &e);
        assert_int_equal(rc, LOOM_EFORMAT);
    }
    assert_int_equal(st_parse((const uint8_t *)full, len, &f, &e), 0);
    st_close(&f); /* parse-only: no mapping, names freed */
    free(full);
    free(p);
}

static void test_sharded(void **state)
{
    (void)state;
    char *d = loom_path_join(g_dir, "ckpt");
    mkdir(d, 0700);
    float a[2] = {1, 2}, b[3] = {3, 4, 5};
    char *p1 = loom_path_join(d, "model-00001-of-00002.safetensors");
    char *p2 = loom_path_join(d, "model-00002-of-00002.safetensors");
    char *ix = loom_path_join(d, "model.safetensors.index.json");
    write_st(p1, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", a, 8);
    write_st(p2, "{\"b\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}", b, 12);
    const char *index =
        "{\"metadata\":{},\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
        "\"b\":\"model-00002-of-00002.safetensors\"}}";
    write_raw(ix, index, strlen(index));
    st_set s;
    loom_err e = {0};
    assert_int_equal(st_set_open_dir(d, &s, &e), 0);
    assert_int_equal(s.n_files, 2);
    const st_tensor *tb = st_set_find(&s, "b");
    assert_non_null(tb);
    float out[3];
    assert_int_equal(st_tensor_to_f32(tb, out, &e), 0);
    assert_true(out[2] == 5);
    assert_non_null(st_set_find(&s, "a"));
    assert_null(st_set_find(&s, "c"));
    st_set_close(&s);

    /* index naming a tensor its shard lacks */
    const char *bad1 = "{\"weight_map\":{\"a\":\"model-00002-of-00002.safetensors\"}}";
    write_raw(ix, bad1, strlen(bad1));
    assert_int_equal(st_set_open_dir(d, &s, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "'a'"));
    /* path traversal */
    const char *bad2 = "{\"weight_map\":{\"a\":\"../model-00001-of-00002.safetensors\"}}";
    write_raw(ix, bad2, strlen(bad2));
    assert_int_equal(st_set_open_dir(d, &s, &e), LOOM_EFORMAT);
    /* a missing shard */
    const char *bad3 = "{\"weight_map\":{\"a\":\"model-00003-of-00003.safetensors\"}}";
    write_raw(ix, bad3, strlen(bad3));
    assert_int_equal(st_set_open_dir(d, &s, &e), LOOM_ENOTFOUND);
    assert_non_null(strstr(e.msg, "model-00003-of-00003.safetensors"));
    /* not JSON */
    write_raw(ix, "nope", 4);
    assert_int_equal(st_set_open_dir(d, &s, &e), LOOM_EFORMAT);
    remove(ix);
    remove(p1);
    remove(p2);
    /* nothing there */
    assert_int_equal(st_set_open_dir(d, &s, &e), LOOM_ENOTFOUND);
    rmdir(d);
    free(p1);
    free(p2);
    free(ix);
    free(d);
}

static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof(g_dir), "/tmp/loom-st-XXXXXX");
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
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid),
        cmocka_unit_test(test_corrupt_headers),
        cmocka_unit_test(test_bad_lengths),
        cmocka_unit_test(test_sharded),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
