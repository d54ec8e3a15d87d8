/* The kernels' own worker threads: one pool per process, the same speed from whichever thread calls.

   Why not OpenMP: libgomp keeps one thread pool per calling thread, and once the threads it manages
   outnumber the CPUs (the main thread's pool plus a server worker's pool on 2 cores) it drops its spin
   wait from ~3 ms to ~100 iterations, so every parallel region after that waits for a futex wake-up:
   SmolLM2 decoded at 190 tok/s from the main thread and 76 from a threading.Thread. On a loaded machine
   its long spins go the other way: a team member that lost its core is waited for by one that spins.

   Here: a job is `nchunks` independent chunks of work. The caller publishes it, runs chunks itself, and
   returns when every chunk is done; workers that are awake take chunks too. A worker that was slow to
   wake finds the chunks taken and goes back to waiting, so the caller never waits for a thread that did
   not start. Workers spin for CORRAL_SPIN_US microseconds (default 200) after their last job, then sleep
   on a futex; the caller spins a quarter of that for the chunks still running, then sleeps too (spinning
   long is fast on an idle machine and ruinous on a loaded one: a spinner keeps the thread it waits for
   off the core). One job runs at a time; a second calling thread that finds the pool busy runs its
   chunks alone instead of waiting.

   next = generation << 32 | next chunk index: a worker claims chunk k of generation g with one CAS, which
   fails if the caller has moved on, so a late worker can never run a chunk of the wrong job. */

#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define POOL_MAX 256

typedef void (*corral_job_fn)(void *arg, int64_t chunk, int slot);

static struct {
    pthread_mutex_t busy, grow;
    int nworkers;
    _Atomic uint64_t next;
    _Atomic int64_t done;
    _Atomic uint32_t finished; /* futex word the caller sleeps on: bumped by whoever finishes the last chunk */
    _Atomic int caller_sleeps;
    _Atomic uint32_t wake; /* the futex word: bumped when a job is published */
    _Atomic int sleepers;
    _Atomic(corral_job_fn) fn;
    _Atomic(void *) arg;
    _Atomic int64_t nchunks;
    _Atomic int active; /* slots below this take part in the current job */
    uint32_t gen;
    int64_t spin_ns;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run chunks of the current job until none are left. */
static void run_chunks(int slot) {
    for (;;) {
        uint64_t c = atomic_load_explicit(&P.next, memory_order_acquire);
        int64_t k = (int64_t)(c & 0xFFFFFFFFu);
        corral_job_fn fn = atomic_load_explicit(&P.fn, memory_order_acquire);
        void *arg = atomic_load_explicit(&P.arg, memory_order_acquire);
        if (k >= atomic_load_explicit(&P.nchunks, memory_order_acquire) ||
            slot >= atomic_load_explicit(&P.active, memory_order_relaxed))
            return;
        /* succeeds only while the counter still reads (this generation, k): the fields read above are this job's */
        if (atomic_compare_exchange_weak_explicit(&P.next, &c, c + 1, memory_order_acq_rel, memory_order_relaxed)) {
            fn(arg, k, slot);
            if (atomic_fetch_add(&P.done, 1) + 1 == atomic_load_explicit(&P.nchunks, memory_order_relaxed)) {
                atomic_fetch_add(&P.finished, 1);
                if (atomic_load(&P.caller_sleeps))
                    syscall(SYS_futex, &P.finished, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
            }
        }
    }
}

static void *worker(void *p) {
    const int slot = (int)(intptr_t)p;
    uint32_t seen = atomic_load(&P.wake);
    for (;;) {
        int64_t since = now_ns();
        uint32_t w;
        for (int spins = 1; (w = atomic_load_explicit(&P.wake, memory_order_acquire)) == seen; spins++) {
            CPU_RELAX();
            if (spins % 128 == 0 && now_ns() - since > P.spin_ns) { /* idle a while: sleep until the next job */
                atomic_fetch_add(&P.sleepers, 1);
                syscall(SYS_futex, &P.wake, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_fetch_sub(&P.sleepers, 1);
                since = now_ns();
            }
        }
        seen = w;
        run_chunks(slot);
    }
    return NULL;
}

/* Start workers up to `want` (slots 1..want); returns how many exist. */
static int grow(int want) {
    if (want > POOL_MAX - 1) want = POOL_MAX - 1;
    pthread_mutex_lock(&P.grow);
    if (P.nworkers == 0) {
        const char *s = getenv("CORRAL_SPIN_US");
        P.spin_ns = (s && *s ? atoll(s) : 200) * 1000;
    }
    while (P.nworkers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, worker, (void *)(intptr_t)(P.nworkers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        P.nworkers++;
    }
    int n = P.nworkers;
    pthread_mutex_unlock(&P.grow);
    return n;
}

/* Run fn(arg, k, slot) for k in [0, nchunks) on up to nthreads threads (slot < nthreads, the caller is 0). */
void corral_parallel(corral_job_fn fn, void *arg, int64_t nchunks, int nthreads) {
    if (nthreads > 1 && nchunks > 1 && pthread_mutex_trylock(&P.busy) == 0) {
        int workers = grow(nthreads - 1);
        /* Close the last job's counter before touching its fields. A worker may have read (gen, k) with k past
           the old job's last chunk, then read this job's fn/arg/nchunks; its CAS must fail, so the counter moves
           to the new generation (with an index no job reaches) first. The fields' release stores pair with the
           workers' acquire loads: a worker that sees a new field also sees this closed counter. */
        P.gen++;
        atomic_store(&P.next, (uint64_t)P.gen << 32 | 0xFFFFFFFFu);
        atomic_store_explicit(&P.fn, fn, memory_order_release);
        atomic_store_explicit(&P.arg, arg, memory_order_release);
        atomic_store_explicit(&P.nchunks, nchunks, memory_order_release);
        atomic_store_explicit(&P.active, workers + 1 < nthreads ? workers + 1 : nthreads, memory_order_release);
        atomic_store_explicit(&P.done, 0, memory_order_relaxed);
        atomic_store_explicit(&P.next, (uint64_t)P.gen << 32, memory_order_release);
        atomic_fetch_add(&P.wake, 1);
        if (atomic_load(&P.sleepers) > 0) syscall(SYS_futex, &P.wake, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
        uint32_t finished = atomic_load(&P.finished);
        run_chunks(0);
        /* the rest are running on workers that took them: spin a little, then sleep until the last one is done
           (on a loaded machine a worker can lose its core mid-chunk, and a spinning caller would only keep it off) */
        int64_t since = now_ns();
        for (int spins = 1; atomic_load(&P.done) < nchunks; spins++) {
            CPU_RELAX();
            if (spins % 128 == 0 && now_ns() - since > P.spin_ns / 4) {
                atomic_store(&P.caller_sleeps, 1);
                if (atomic_load(&P.done) < nchunks)
                    syscall(SYS_futex, &P.finished, FUTEX_WAIT_PRIVATE, finished, NULL, NULL, 0);
                atomic_store(&P.caller_sleeps, 0);
            }
        }
        pthread_mutex_unlock(&P.busy);
        return;
    }
    for (int64_t k = 0; k < nchunks; k++) fn(arg, k, 0);
}

/* How many worker threads exist (tests and diagnostics). */
int corral_pool_workers(void) { return P.nworkers; }
