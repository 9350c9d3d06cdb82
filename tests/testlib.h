/* Helpers shared by the C tests (cmocka). */
#ifndef LOOM_TESTLIB_H
#define LOOM_TESTLIB_H
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#define TEST_SKIP_CODE 77

/* Path of ../shared (LOOM_SHARED overrides); NULL if absent. */
static inline const char *test_shared_dir(void)
{
    const char *s = getenv("LOOM_SHARED");
    if (!s || !*s)
        s = "../shared";
    return access(s, R_OK) == 0 ? s : NULL;
}

/* Exit 77 (skipped) with a message when ../shared is absent. */
static inline const char *test_require_shared(void)
{
    const char *s = test_shared_dir();
    if (!s) {
        printf("SKIP: ../shared is absent (set LOOM_SHARED); fixture tests need it\n");
        exit(TEST_SKIP_CODE);
    }
    return s;
}

static inline char *test_path(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", a, b);
    return p;
}
#endif
