/* base: buffers, errors, rng, hash, overflow checks, files. */
#include "testlib.h"
#include "loom/base.h"

static void test_buf(void **state)
{
    loom_buf b;
    buf_init(&b);
    for (int i = 0; i < 1000; i++)
        buf_printf(&b, "%d,", i);
    assert_int_equal(strncmp(b.data, "0,1,2,", 6), 0);
    assert_int_equal(b.data[b.len], 0);
    size_t len = b.len;
    char *s = buf_detach(&b);
    assert_int_equal(strlen(s), len);
    assert_null(b.data);
    free(s);
    buf_append(&b, "ab", 2);
    buf_puts(&b, "cd");
    assert_string_equal(b.data, "abcd");
    buf_free(&b);
}

static void test_err(void **state)
{
    loom_err e = {0};
    int rc = loom_errf(&e, LOOM_EFORMAT, "bad %s at %d", "header", 8);
    assert_int_equal(rc, LOOM_EFORMAT);
    assert_int_equal(e.code, LOOM_EFORMAT);
    assert_string_equal(e.msg, "bad header at 8");
    assert_int_equal(loom_errf(NULL, LOOM_EIO, "x"), LOOM_EIO);
    assert_string_equal(loom_strerror(LOOM_ENOMEM), "out of memory");
}

static void test_rng(void **state)
{
    loom_rng a, b;
    rng_seed(&a, 42);
    rng_seed(&b, 42);
    for (int i = 0; i < 100; i++)
        assert_true(rng_next(&a) == rng_next(&b));
    double sum = 0, sum2 = 0;
    int n = 20000;
    for (int i = 0; i < n; i++) {
        double u = rng_uniform(&a);
        assert_true(u >= 0 && u < 1);
        float z = rng_normal(&a);
        sum += z;
        sum2 += (double)z * z;
    }
    assert_true(fabs(sum / n) < 0.05);
    assert_true(fabs(sum2 / n - 1.0) < 0.05);
}

static void test_hash_and_overflow(void **state)
{
    assert_true(loom_hash64("abc", 3, 0) == loom_hash64("abc", 3, 0));
    assert_true(loom_hash64("abc", 3, 0) != loom_hash64("abd", 3, 0));
    assert_true(loom_hash64("abc", 3, 0) != loom_hash64("abc", 3, 1));
    size_t out;
    assert_true(loom_mul_ok(1u << 20, 1u << 20, &out));
    assert_false(loom_mul_ok(SIZE_MAX / 2, 3, &out));
    assert_false(loom_add_ok(SIZE_MAX, 1, &out));
}

static void test_files(void **state)
{
    char path[] = "/tmp/loom-test-base-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "hello\n", 6), 6);
    close(fd);
    char *data;
    size_t len;
    loom_err e = {0};
    assert_int_equal(loom_read_file(path, &data, &len, &e), 0);
    assert_int_equal(len, 6);
    assert_string_equal(data, "hello\n");
    free(data);
    unlink(path);
    assert_int_equal(loom_read_file(path, &data, &len, &e), LOOM_ENOTFOUND);
    assert_non_null(strstr(e.msg, path));
    char *j = loom_path_join("a/", "b");
    assert_string_equal(j, "a/b");
    free(j);
    j = loom_path_join("a", "b");
    assert_string_equal(j, "a/b");
    free(j);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_buf),   cmocka_unit_test(test_err),
        cmocka_unit_test(test_rng),   cmocka_unit_test(test_hash_and_overflow),
        cmocka_unit_test(test_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
