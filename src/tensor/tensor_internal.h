/* Helpers shared by the files of src/tensor/ (not part of the public interface). */
#ifndef LOOM_TENSOR_INTERNAL_H
#define LOOM_TENSOR_INTERNAL_H

/* Once per process: OpenBLAS single-threaded (our OpenMP team splits the work; see
 * tensor_set_threads) and the CPU feature check for the small-batch GEMM. */
void tensor_blas_init(void);

#endif
