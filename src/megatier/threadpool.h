/* The persistent thread pool megatier's C kernels share (cpu_attention.c, quant_matmul.c): each library
 * that includes this header gets its own pool. Workers are created once (on first need, or ahead by
 * pool_start from a thread whose attributes they should inherit), each pinned to a CPU of the process's
 * affinity mask (the main thread's: a caller such as CUDA's host-callback thread may be pinned itself),
 * and woken per job (a spin, then a futex; pool.spin_ns says how long they spin once idle). Hold
 * pool.lock around a job (run_pool, run_pool_with_caller): jobs run one at a time.
 *
 * Before including: _GNU_SOURCE defined, X86 set to 1 on x86-64 with <immintrin.h> included.
 * MAX_THREADS and SPIN_NS (the default spin) may be overridden.
 */
#ifndef MEGATIER_THREADPOOL_H
#define MEGATIER_THREADPOOL_H
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MAX_THREADS
#define MAX_THREADS 256
#endif
#ifndef SPIN_NS
#define SPIN_NS 50000 /* how long an idle thread spins before it sleeps, unless pool.spin_ns says */
#endif

typedef void (*work_fn)(void *ctx, int worker, int workers);

static struct {
    pthread_mutex_t lock; /* held for a whole job: jobs run one at a time */
    int started, ncpu, cpus[CPU_SETSIZE];
    unsigned start_gen[MAX_THREADS];
    /* gen: a job counter above the low 9 bits, which hold the job's worker count, so a worker learns
     * from one load whether it takes part (the fields below are stable until every such worker is done) */
    atomic_uint gen, pending;
    work_fn fn;
    void *ctx;
    int first; /* 1 when the caller is worker 0 (run_pool_with_caller): pool worker i is worker i + 1 */
    int64_t spin_ns; /* how long a thread that waits for the next job (or the caller, for the workers)
                      * spins before it sleeps: set per job, read when the job's workers finish */
    int64_t posted_ns;    /* when the running job was posted */
    atomic_llong wake_ns; /* the latest start of one of its workers after posted_ns */
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .spin_ns = SPIN_NS};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Wait until *word != old: spin for spin_ns (the next job often comes soon), then sleep on a futex. */
static void wait_while(atomic_uint *word, unsigned old, int64_t spin_ns) {
    const int64_t deadline = now_ns() + spin_ns;
    for (int i = 0; atomic_load(word) == old; i++) {
#if X86
        _mm_pause();
#endif
        if ((i & 255) == 255 && now_ns() > deadline) {
            while (atomic_load(word) == old) syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, old, NULL, NULL, 0);
            return;
        }
    }
}

static void wake_all(atomic_uint *word) { syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0); }

static void *worker_main(void *arg) {
    const int me = (int)(intptr_t)arg;
    /* Worker i on the i-th CPU from the end: with one thread fewer than CPUs (default_threads() on a GPU
     * machine) the first CPU stays free for the thread that drives the GPU. */
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(pool.cpus[pool.ncpu - 1 - me % pool.ncpu], &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set); /* best effort: a sandbox may refuse */
    unsigned seen = pool.start_gen[me];
    int64_t spin = SPIN_NS;
    for (;;) {
        wait_while(&pool.gen, seen, spin);
        seen = atomic_load(&pool.gen);
        int workers = (int)(seen & 511);
        if (me >= workers) continue;
        const int64_t late = now_ns() - pool.posted_ns;
        for (int64_t was = atomic_load(&pool.wake_ns); late > was;)
            if (atomic_compare_exchange_weak(&pool.wake_ns, &was, late)) break;
        spin = pool.spin_ns;
        pool.fn(pool.ctx, me + pool.first, workers + pool.first);
        if (atomic_fetch_sub(&pool.pending, 1) == 1) wake_all(&pool.pending);
    }
    return NULL;
}

static void after_fork_in_child(void) { /* the child has none of the workers */
    pthread_mutex_init(&pool.lock, NULL);
    pool.started = 0;
    atomic_store(&pool.pending, 0);
}

/* With pool.lock held: the CPUs to pin to, read once from the main thread (pid = its tid), not the
 * caller, which may be a thread pinned to one CPU (a driver's callback thread). */
static void pool_init(void) {
    if (pool.ncpu) return;
    cpu_set_t set;
    if (sched_getaffinity(getpid(), sizeof set, &set) == 0)
        for (int c = 0; c < CPU_SETSIZE; c++)
            if (CPU_ISSET(c, &set)) pool.cpus[pool.ncpu++] = c;
    if (!pool.ncpu) pool.cpus[pool.ncpu++] = 0;
    pthread_atfork(NULL, NULL, after_fork_in_child);
}

/* With pool.lock held: make sure `threads` pool threads exist (they inherit the calling thread's
 * scheduling attributes, then pin themselves); how many do. */
static int pool_start(int threads) {
    pool_init();
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    while (pool.started < threads) {
        pthread_t tid;
        pool.start_gen[pool.started] = atomic_load(&pool.gen);
        if (pthread_create(&tid, NULL, worker_main, (void *)(intptr_t)pool.started) != 0) break;
        pthread_detach(tid);
        pool.started++;
    }
    return pool.started;
}

/* With pool.lock held: post fn to pool workers 0..n-1 (worker numbers from `first`). */
static void post(work_fn fn, void *ctx, int n, int first) {
    pool.fn = fn;
    pool.ctx = ctx;
    pool.first = first;
    atomic_store(&pool.pending, (unsigned)n);
    atomic_store(&pool.wake_ns, 0);
    pool.posted_ns = now_ns();
    atomic_store(&pool.gen, (((atomic_load(&pool.gen) >> 9) + 1) << 9) | (unsigned)n);
    wake_all(&pool.gen);
}

static void wait_done(void) {
    for (unsigned left; (left = atomic_load(&pool.pending)) != 0;) wait_while(&pool.pending, left, pool.spin_ns);
}

/* With pool.lock held: run fn on `threads` workers (started on first need) and wait for all of them. */
__attribute__((unused)) static void run_pool(work_fn fn, void *ctx, int threads) {
    const int started = pool_start(threads), n = threads < started ? threads : started;
    if (n == 0) { /* no thread could be made: do it here */
        fn(ctx, 0, 1);
        return;
    }
    post(fn, ctx, n, 0);
    wait_done();
}

/* With pool.lock held: run fn on `threads` workers, the calling thread being worker 0 and pool threads
 * the others, and wait for all of them. For callers that have nothing else to do meanwhile: no core is
 * left to a sleeping caller, and one worker fewer needs waking. */
__attribute__((unused)) static void run_pool_with_caller(work_fn fn, void *ctx, int threads) {
    const int started = pool_start(threads - 1), n = threads - 1 < started ? threads - 1 : started;
    if (n <= 0) {
        fn(ctx, 0, 1);
        return;
    }
    post(fn, ctx, n, 1);
    fn(ctx, 0, n + 1);
    wait_done();
}

static int thread_count(int threads) {
    pool_init();
    if (threads <= 0) threads = pool.ncpu;
    return threads < MAX_THREADS ? threads : MAX_THREADS;
}
#endif
