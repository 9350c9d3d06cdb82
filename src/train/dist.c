/*
 * Distributed context of the trainer: OpenMPI when the process was started by mpirun, otherwise
 * one rank and every collective is a copy or a no-op. Each call's time goes to comm_time so a
 * step's time splits into compute and communication.
 */
#include "loom/train.h"

#include <stdlib.h>
#include <string.h>

#if defined(__has_include)
#if __has_include(<mpi.h>)
#include <mpi.h>
#define TRAIN_HAVE_MPI 1
#endif
#endif

static bool launched_by_mpirun(void)
{
    const char *v = getenv("OMPI_COMM_WORLD_SIZE");
    if (!v)
        v = getenv("PMI_SIZE");
    if (!v)
        v = getenv("PMIX_RANK");
    return v != NULL;
}

int train_dist_init(train_dist *d, int *argc, char ***argv, int ranks_per_node, loom_err *e)
{
    memset(d, 0, sizeof(*d));
    d->n_ranks = 1;
    d->ranks_per_node = ranks_per_node > 0 ? ranks_per_node : 1;
    if (!launched_by_mpirun())
        return LOOM_OK;
#ifdef TRAIN_HAVE_MPI
    int init = 0;
    MPI_Initialized(&init);
    if (!init && MPI_Init(argc, argv) != MPI_SUCCESS)
        return loom_errf(e, LOOM_EIO, "train: MPI_Init failed");
    d->mpi = !init;
    MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &d->n_ranks);
    if (ranks_per_node <= 0)
        d->ranks_per_node = d->n_ranks;
    if (d->n_ranks % d->ranks_per_node)
        return loom_errf(e, LOOM_EINVAL, "train: %d ranks do not split into nodes of %d ranks",
                         d->n_ranks, d->ranks_per_node);
    return LOOM_OK;
#else
    (void)argc;
    (void)argv;
    return loom_errf(e, LOOM_EUNSUPPORTED,
                     "train: started by mpirun but loom was built without MPI (HINT: install "
                     "libopenmpi-dev and rebuild)");
#endif
}

void train_dist_finalize(train_dist *d)
{
#ifdef TRAIN_HAVE_MPI
    if (d->mpi)
        MPI_Finalize();
#endif
    d->mpi = false;
}

#ifdef TRAIN_HAVE_MPI
#define TIMED(d, call)                                                                             \
    do {                                                                                           \
        double t0_ = loom_now();                                                                   \
        call;                                                                                      \
        (d)->comm_time += loom_now() - t0_;                                                        \
    } while (0)
#endif

void train_dist_allreduce_f32(train_dist *d, float *x, size_t n)
{
    if (d->n_ranks <= 1 || n == 0)
        return;
#ifdef TRAIN_HAVE_MPI
    /* in chunks: MPI counts are int */
    for (size_t o = 0; o < n; o += 1u << 30) {
        int c = (int)(n - o < (1u << 30) ? n - o : (1u << 30));
        TIMED(d, MPI_Allreduce(MPI_IN_PLACE, x + o, c, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
    }
#endif
}

void train_dist_allreduce_f64(train_dist *d, double *x, size_t n)
{
    if (d->n_ranks <= 1 || n == 0)
        return;
#ifdef TRAIN_HAVE_MPI
    TIMED(d, MPI_Allreduce(MPI_IN_PLACE, x, (int)n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
#endif
}

void train_dist_allreduce_i64(train_dist *d, int64_t *x, size_t n)
{
    if (d->n_ranks <= 1 || n == 0)
        return;
#ifdef TRAIN_HAVE_MPI
    TIMED(d, MPI_Allreduce(MPI_IN_PLACE, x, (int)n, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD));
#endif
}

void train_dist_bcast(train_dist *d, void *buf, size_t bytes, int root)
{
    if (d->n_ranks <= 1 || bytes == 0)
        return;
#ifdef TRAIN_HAVE_MPI
    char *p = buf;
    for (size_t o = 0; o < bytes; o += 1u << 30) {
        int c = (int)(bytes - o < (1u << 30) ? bytes - o : (1u << 30));
        TIMED(d, MPI_Bcast(p + o, c, MPI_BYTE, root, MPI_COMM_WORLD));
    }
#else
    (void)buf;
    (void)root;
#endif
}

void train_dist_barrier(train_dist *d)
{
    if (d->n_ranks <= 1)
        return;
#ifdef TRAIN_HAVE_MPI
    TIMED(d, MPI_Barrier(MPI_COMM_WORLD));
#endif
}

void train_dist_alltoallv_f32(train_dist *d, const float *send, const int *send_counts,
                              const int *send_displs, float *recv, const int *recv_counts,
                              const int *recv_displs)
{
    if (d->n_ranks <= 1) {
        if (send_counts[0] > 0)
            memcpy(recv + recv_displs[0], send + send_displs[0],
                   (size_t)send_counts[0] * sizeof(float));
        return;
    }
#ifdef TRAIN_HAVE_MPI
    TIMED(d, MPI_Alltoallv(send, send_counts, send_displs, MPI_FLOAT, recv, recv_counts,
                           recv_displs, MPI_FLOAT, MPI_COMM_WORLD));
#endif
}

void train_dist_alltoall_i32(train_dist *d, const int32_t *send, int32_t *recv, int per_rank)
{
    if (d->n_ranks <= 1) {
        memcpy(recv, send, (size_t)per_rank * sizeof(int32_t));
        return;
    }
#ifdef TRAIN_HAVE_MPI
    TIMED(d, MPI_Alltoall(send, per_rank, MPI_INT32_T, recv, per_rank, MPI_INT32_T,
                          MPI_COMM_WORLD));
#endif
}
