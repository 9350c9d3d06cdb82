/* OpenBLAS kernel choice on hosts whose CPUID it misreads (src/tensor/blas_cpu.c). */
#ifndef LOOM_BLAS_CPU_H
#define LOOM_BLAS_CPU_H

/* The kernel family /proc/cpuinfo's flags support when OpenBLAS chose a pre-AVX one ("Prescott",
 * "Core2", ...) on a CPU that has AVX2 and FMA: "SkylakeX" with the AVX-512 F/BW/DQ/VL/CD
 * flags, else "Haswell". NULL when OpenBLAS's choice stands. corename is OpenBLAS's own
 * (openblas_get_corename), flags the flags line of /proc/cpuinfo (space-separated). */
const char *tensor_blas_better_core(const char *corename, const char *flags);

/* At the top of main(): when OPENBLAS_CORETYPE is unset and tensor_blas_better_core names a
 * better family for this host, set OPENBLAS_CORETYPE to it and exec /proc/self/exe with argv
 * again (OpenBLAS reads the variable only when it loads). Virtual machines that hide the CPU's
 * model (the H200 hosts' gVisor, for one) otherwise get OpenBLAS's generic SSE kernels, 3-8x
 * slower. Returns when nothing is to be done or the exec failed. */
void tensor_blas_check_cpu(char **argv);

#endif
