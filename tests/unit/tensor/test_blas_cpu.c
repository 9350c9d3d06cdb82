/* tensor_blas_better_core: which OpenBLAS kernel family a misdetected host should get. */
#include "testlib.h"

#include "loom/blas_cpu.h"

#include <string.h>

#define SKX_FLAGS                                                                          \
    "flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 avx512f "       \
    "avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16\n"
#define HSW_FLAGS "flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2\n"

static void test_generic_core_upgraded(void **state)
{
    (void)state;
    assert_string_equal(tensor_blas_better_core("Prescott", SKX_FLAGS), "SkylakeX");
    assert_string_equal(tensor_blas_better_core("PRESCOTT", SKX_FLAGS), "SkylakeX");
    assert_string_equal(tensor_blas_better_core("Core2", HSW_FLAGS), "Haswell");
    assert_string_equal(tensor_blas_better_core("Nehalem", HSW_FLAGS), "Haswell");
    /* AVX-512 without BW/VL (Knights Landing) is not SkylakeX */
    assert_string_equal(tensor_blas_better_core("Prescott", "flags: avx2 fma avx512f avx512cd\n"),
                        "Haswell");
}

static void test_right_core_kept(void **state)
{
    (void)state;
    assert_null(tensor_blas_better_core("SkylakeX", SKX_FLAGS));
    assert_null(tensor_blas_better_core("Cooperlake", SKX_FLAGS));
    assert_null(tensor_blas_better_core("Haswell", SKX_FLAGS));
    assert_null(tensor_blas_better_core("Zen", HSW_FLAGS));
}

static void test_old_cpu_kept(void **state)
{
    (void)state;
    /* a real pre-AVX2 CPU keeps the generic kernels; flags must match whole words */
    assert_null(tensor_blas_better_core("Prescott", "flags\t: fpu sse sse2 ssse3 sse4_2 avx\n"));
    assert_null(tensor_blas_better_core("Prescott", "flags\t: fpu avx2x fmax\n"));
    assert_null(tensor_blas_better_core("Prescott", "flags\t: avx2\n")); /* no fma */
    assert_null(tensor_blas_better_core("Prescott", NULL));
    assert_null(tensor_blas_better_core(NULL, SKX_FLAGS));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_generic_core_upgraded),
        cmocka_unit_test(test_right_core_kept),
        cmocka_unit_test(test_old_cpu_kept),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
