/*
 * The thread pool behind every parallel kernel: tensor_parallel(fn, arg) runs fn on n threads
 * (the caller is thread 0) and returns when all are done.
 *
 * Why not OpenMP regions: libgomp's idle threads spin for about 3 ms (its default wait policy)
 * and the policy can only be changed by an environment variable read before main. On a machine
 * with other busy processes (the e2e tests' clients, other builds) the spinning threads and the
 * descheduled ones made a llama-125m decode step 10-30x slower (18 ms idle, 250-500 ms loaded;
 * with OMP_WAIT_POLICY=passive, 48 ms). Here an idle worker spins briefly (the next GEMM of a
 * forward pass follows within microseconds), then yields, then sleeps on a condition variable.
 * The yielding lasts 1 ms: a training step's serial pieces (the MoE router, a task list's tail)
 * leave workers idle for a few hundred microseconds, and a worker that slept then costs each
 * following job a futex wake-up (tens of microseconds per thread at 16 threads, more on a VM)
 * before the job can finish: every worker checks in on every job.
 */
#include "loom/tensor.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_PAUSES 4000   /* ~40 us (10 ns a pause) to ~0.3 ms (older cores) of pause */
#define SPIN_YIELD_NS 1000000 /* then sched_yield, letting other processes run, for 1 ms */

typedef struct pool {
    int n;              /* threads including the caller; 1 = no workers */
    pthread_t *workers; /* (n-1) */
    pthread_mutex_t mu;
    pthread_cond_t wake;
    _Alignas(64) atomic_uint_fast64_t gen; /* bumped once per job; the workers spin on it */
    _Alignas(64) atomic_int pending;       /* workers still running the current job */
    atomic_bool stop;
    uint64_t start_gen; /* gen when the workers were made: their first 'seen' */
    void (*fn)(void *arg, int tid, int n);
    void *arg;
} pool;

static pool g_pool = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};
static pthread_mutex_t g_caller = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static atomic_uint_fast64_t g_jobs; /* jobs handed to the workers (tensor_parallel_jobs) */
static int g_sim;                   /* tensor_parallel_simulate: threads to time on one */
static double g_sim_time, g_sim_wall; /* makespans, and time spent, summed over the calls */

static _Thread_local bool tl_in_job;

static double pool_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Waits until the job generation differs from seen; returns the new one. */
static uint64_t wait_job(uint64_t seen)
{
    uint64_t g;
    for (int i = 0; i < SPIN_PAUSES; i++) {
        if ((g = atomic_load_explicit(&g_pool.gen, memory_order_acquire)) != seen)
            return g;
        cpu_relax();
    }
    double t0 = pool_now();
    for (int i = 0;; i++) {
        if ((g = atomic_load_explicit(&g_pool.gen, memory_order_acquire)) != seen)
            return g;
        sched_yield();
        if (i % 16 == 15 && pool_now() - t0 > SPIN_YIELD_NS * 1e-9)
            break;
    }
    pthread_mutex_lock(&g_pool.mu);
    while ((g = atomic_load_explicit(&g_pool.gen, memory_order_acquire)) == seen &&
           !atomic_load(&g_pool.stop))
        pthread_cond_wait(&g_pool.wake, &g_pool.mu);
    pthread_mutex_unlock(&g_pool.mu);
    return g;
}

static void *worker_main(void *p)
{
    int tid = (int)(intptr_t)p;
    uint64_t seen = g_pool.start_gen; /* not gen now: the first job may already be posted */
    tl_in_job = true;                 /* a kernel called from inside a job runs inline */
    for (;;) {
        seen = wait_job(seen);
        if (atomic_load(&g_pool.stop))
            return NULL;
        g_pool.fn(g_pool.arg, tid, g_pool.n);
        atomic_fetch_sub_explicit(&g_pool.pending, 1, memory_order_release);
    }
}

static void pool_stop(void)
{
    if (g_pool.n <= 1)
        return;
    pthread_mutex_lock(&g_pool.mu);
    atomic_store(&g_pool.stop, true);
    pthread_cond_broadcast(&g_pool.wake);
    pthread_mutex_unlock(&g_pool.mu);
    for (int i = 0; i < g_pool.n - 1; i++)
        pthread_join(g_pool.workers[i], NULL);
    free(g_pool.workers);
    g_pool.workers = NULL;
    g_pool.n = 1;
    atomic_store(&g_pool.stop, false);
}

/* A forked child has none of the parent's workers: start it with an empty pool. */
static void pool_after_fork(void)
{
    g_pool.n = 1;
    g_pool.workers = NULL; /* the parent's array: not ours to free */
    pthread_mutex_init(&g_pool.mu, NULL);
    pthread_cond_init(&g_pool.wake, NULL);
    pthread_mutex_init(&g_caller, NULL);
    atomic_store(&g_pool.stop, false);
    tl_in_job = false;
}

static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, pool_after_fork);
}

/* Workers for n threads; on failure fewer (down to none). Called with g_caller held. */
static void pool_resize(int n)
{
    pthread_once(&g_atfork_once, register_atfork);
    pool_stop();
    if (n <= 1)
        return;
    g_pool.workers = malloc((size_t)(n - 1) * sizeof(pthread_t));
    if (!g_pool.workers)
        return;
    g_pool.start_gen = atomic_load(&g_pool.gen);
    int made = 0;
    for (; made < n - 1; made++)
        if (pthread_create(&g_pool.workers[made], NULL, worker_main, (void *)(intptr_t)(made + 1)))
            break;
    g_pool.n = made + 1;
}

void tensor_parallel(void (*fn)(void *arg, int tid, int n), void *arg)
{
    int n = tensor_get_threads();
    if (g_sim > 1 && !tl_in_job) {
        /* each thread's share in turn; the slowest is the call's time on g_sim threads */
        double worst = 0.0, w0 = pool_now();
        tl_in_job = true;
        for (int tid = 0; tid < g_sim; tid++) {
            double t0 = pool_now();
            fn(arg, tid, g_sim);
            double dt = pool_now() - t0;
            worst = dt > worst ? dt : worst;
        }
        tl_in_job = false;
        g_sim_time += worst;
        g_sim_wall += pool_now() - w0;
        return;
    }
    if (n <= 1 || tl_in_job || pthread_mutex_trylock(&g_caller) != 0) {
        fn(arg, 0, 1); /* nested, or another thread's job is running: inline */
        return;
    }
    if (g_pool.n != n)
        pool_resize(n);
    if (g_pool.n <= 1) {
        pthread_mutex_unlock(&g_caller);
        fn(arg, 0, 1);
        return;
    }
    atomic_fetch_add_explicit(&g_jobs, 1, memory_order_relaxed);
    g_pool.fn = fn;
    g_pool.arg = arg;
    atomic_store_explicit(&g_pool.pending, g_pool.n - 1, memory_order_relaxed);
    /* The bump under the mutex pairs with the sleepers' re-check under it. */
    pthread_mutex_lock(&g_pool.mu);
    atomic_fetch_add_explicit(&g_pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&g_pool.wake);
    pthread_mutex_unlock(&g_pool.mu);
    tl_in_job = true;
    fn(arg, 0, g_pool.n);
    tl_in_job = false;
    for (int i = 0; atomic_load_explicit(&g_pool.pending, memory_order_acquire) > 0; i++) {
        if (i < SPIN_PAUSES)
            cpu_relax();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&g_caller);
}

uint64_t tensor_parallel_jobs(void)
{
    return atomic_load_explicit(&g_jobs, memory_order_relaxed);
}

void tensor_parallel_simulate(int n)
{
    g_sim = n;
}

double tensor_parallel_simulated(double *wall)
{
    *wall = g_sim_wall;
    return g_sim_time;
}

/* A task list on g_sim simulated threads: each task timed, given to the thread free first (the
 * order the shared counter hands them out); the last to finish is the call's time. */
static void sim_for(int n, void (*fn)(void *arg, int i, int tid), void *arg)
{
    double free_at[256] = {0}, end = 0.0;
    int P = g_sim < 256 ? g_sim : 256;
    double w0 = pool_now();
    tl_in_job = true;
    for (int i = 0; i < n; i++) {
        int t = 0;
        for (int j = 1; j < P; j++)
            t = free_at[j] < free_at[t] ? j : t;
        double t0 = pool_now();
        fn(arg, i, 0);
        free_at[t] += pool_now() - t0;
        end = free_at[t] > end ? free_at[t] : end;
    }
    tl_in_job = false;
    g_sim_time += end;
    g_sim_wall += pool_now() - w0;
}

/* ---------------------------------------------------------------- task lists */

typedef struct for_job {
    void (*fn)(void *arg, int i, int tid);
    void *arg;
    int n;
    atomic_int next;
} for_job;

static void for_run(void *p, int tid, int nth)
{
    for_job *j = p;
    (void)nth;
    for (int i; (i = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed)) < j->n;)
        j->fn(j->arg, i, tid);
}

void tensor_parallel_for(int n, void (*fn)(void *arg, int i, int tid), void *arg)
{
    if (n <= 0)
        return;
    if (g_sim > 1 && !tl_in_job) {
        sim_for(n, fn, arg);
        return;
    }
    if (n == 1 || tensor_get_threads() <= 1) {
        for (int i = 0; i < n; i++)
            fn(arg, i, 0);
        return;
    }
    for_job j = {.fn = fn, .arg = arg, .n = n};
    atomic_init(&j.next, 0);
    tensor_parallel(for_run, &j);
}
