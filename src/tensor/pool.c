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
 */
#include "loom/tensor.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_PAUSES 4000 /* ~0.1-0.3 ms of pause instructions */
#define SPIN_YIELDS 50   /* then sched_yield, letting other processes run */

typedef struct pool {
    int n;              /* threads including the caller; 1 = no workers */
    pthread_t *workers; /* (n-1) */
    pthread_mutex_t mu;
    pthread_cond_t wake;
    atomic_uint_fast64_t gen; /* bumped once per job */
    atomic_int pending;       /* workers still running the current job */
    atomic_bool stop;
    uint64_t start_gen; /* gen when the workers were made: their first 'seen' */
    void (*fn)(void *arg, int tid, int n);
    void *arg;
} pool;

static pool g_pool = {.n = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};
static pthread_mutex_t g_caller = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static _Thread_local bool tl_in_job;

/* Waits until the job generation differs from seen; returns the new one. */
static uint64_t wait_job(uint64_t seen)
{
    uint64_t g;
    for (int i = 0; i < SPIN_PAUSES; i++) {
        if ((g = atomic_load_explicit(&g_pool.gen, memory_order_acquire)) != seen)
            return g;
        cpu_relax();
    }
    for (int i = 0; i < SPIN_YIELDS; i++) {
        if ((g = atomic_load_explicit(&g_pool.gen, memory_order_acquire)) != seen)
            return g;
        sched_yield();
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
    if (n == 1 || tensor_get_threads() <= 1) {
        for (int i = 0; i < n; i++)
            fn(arg, i, 0);
        return;
    }
    for_job j = {.fn = fn, .arg = arg, .n = n};
    atomic_init(&j.next, 0);
    tensor_parallel(for_run, &j);
}
