/*
 * OpenBLAS picks its kernels at load time from CPUID's family and model. In virtual machines that
 * report a model it does not know, or hide the OS-support bits it checks, it falls back to its
 * generic "Prescott" (SSE3) kernels even where the CPU runs AVX-512: seen on this project's
 * 16-core GPU hosts (OPENBLAS_VERBOSE=2 prints "Core: Prescott"), where every F32 GEMM then ran
 * 3-8x slower. The kernel family can only be forced through OPENBLAS_CORETYPE before the
 * library loads, so loom re-executes itself once with the variable set.
 */
#include "loom/blas_cpu.h"

#include "loom/base.h"

#include <cblas.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static bool has_flag(const char *flags, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = flags; (p = strstr(p, name)); p += n) {
        bool start = p == flags || p[-1] == ' ' || p[-1] == '\t' || p[-1] == ':';
        bool end = p[n] == '\0' || p[n] == ' ' || p[n] == '\t' || p[n] == '\n';
        if (start && end)
            return true;
    }
    return false;
}

/* A kernel family from before AVX: what OpenBLAS falls back to when it does not know the CPU. */
static bool pre_avx_core(const char *corename)
{
    static const char *const generic[] = {"prescott", "core2", "penryn", "dunnington",
                                          "nehalem", "atom", "katmai", "coppermine",
                                          "northwood", "banias", "unknown"};
    for (size_t i = 0; corename && i < sizeof(generic) / sizeof(generic[0]); i++)
        if (!strcasecmp(corename, generic[i]))
            return true;
    return false;
}

const char *tensor_blas_better_core(const char *corename, const char *flags)
{
    if (!flags || !pre_avx_core(corename) || !has_flag(flags, "avx2") || !has_flag(flags, "fma"))
        return NULL;
    static const char *const avx512[] = {"avx512f", "avx512bw", "avx512dq", "avx512vl",
                                         "avx512cd"};
    for (size_t i = 0; i < sizeof(avx512) / sizeof(avx512[0]); i++)
        if (!has_flag(flags, avx512[i]))
            return "Haswell";
    return "SkylakeX";
}

static char *cpuinfo_flags(void)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return NULL;
    char *line = NULL, *out = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0)
        if (!strncmp(line, "flags", 5)) {
            out = line;
            line = NULL;
            break;
        }
    free(line);
    fclose(f);
    return out;
}

void tensor_blas_check_cpu(char **argv)
{
    if (getenv("OPENBLAS_CORETYPE"))
        return; /* the user's choice, or our own re-exec */
    /* /proc/cpuinfo only when OpenBLAS's choice is a generic one (most starts never read it) */
    const char *name = openblas_get_corename();
    if (!pre_avx_core(name))
        return;
    char *flags = cpuinfo_flags();
    const char *core = tensor_blas_better_core(name, flags);
    free(flags);
    if (!core)
        return;
    LOG_INFO("OpenBLAS chose its %s kernels on a CPU with %s; restarting with "
             "OPENBLAS_CORETYPE=%s",
             openblas_get_corename(), strcmp(core, "SkylakeX") ? "AVX2" : "AVX-512", core);
    if (setenv("OPENBLAS_CORETYPE", core, 1))
        return;
    execv("/proc/self/exe", argv);
    LOG_WARN("could not restart with OPENBLAS_CORETYPE=%s; OpenBLAS keeps its generic kernels",
             core); /* exec failed: go on as we are */
    unsetenv("OPENBLAS_CORETYPE");
}
