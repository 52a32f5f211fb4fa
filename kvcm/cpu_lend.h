/* Lending a CPU to the thread that holds the index lock (kvcm/_index.pxi).
 *
 * The lock is held for one event's change of the index, a microsecond or two, so a waiter
 * that has spun for tens of microseconds without getting it is almost always waiting for a
 * holder that lost its CPU mid-change: on a CPU it shares with libzmq's I/O thread and
 * whatever else the host runs there, it gets that CPU back only after the others' scheduler
 * slices, milliseconds later. Such a waiter is about to sleep and leave its own CPU idle, so it
 * first moves the holder there (sched_setaffinity to that one CPU): the holder runs at once,
 * finishes its change and releases the lock, and after that release puts itself back on the
 * CPUs it had. At most one loan is out per lock; a loan whose borrower has not come back (it no
 * longer holds the lock, it exited) is ended by the next waiter that wants to lend.
 *
 * Everything here is best effort: where the system refuses (a cpuset without the waiter's CPU,
 * not Linux) the waiter just sleeps, as it would without lending. */
#ifndef KVCM_CPU_LEND_H
#define KVCM_CPU_LEND_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { KVL_FREE = 0, KVL_BUSY = 1, KVL_OUT = 2 };   /* no loan, one being made or ended, one out */

typedef struct {
    int holder;        /* the thread id holding the lock, 0 when free */
    int state;         /* KVL_* */
    int borrower;      /* the thread the loan went to */
    cpu_set_t home;    /* the borrower's CPUs before the loan */
    unsigned long long loans;   /* loans made, for /metrics */
} kvl_loan;

static __thread int kvl_tid_cached;

static inline int kvl_tid(void) {
    if (!kvl_tid_cached)
        kvl_tid_cached = (int)syscall(SYS_gettid);
    return kvl_tid_cached;
}

/* A forked child's thread has a thread id of its own: not its parent thread's cached one. */
static void kvl_forget_tid(void) { kvl_tid_cached = 0; }
static inline void kvl_init(void) { pthread_atfork(NULL, NULL, kvl_forget_tid); }

static inline void kvl_held(kvl_loan *L) { __atomic_store_n(&L->holder, kvl_tid(), __ATOMIC_RELAXED); }

static inline int kvl_claim(kvl_loan *L, int from) {
    return __atomic_compare_exchange_n(&L->state, &from, KVL_BUSY, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

static inline void kvl_unheld(kvl_loan *L) { __atomic_store_n(&L->holder, 0, __ATOMIC_RELAXED); }

/* After a thread released the lock: back to its own CPUs if it was lent one. */
static inline void kvl_return(kvl_loan *L) {
    int me;
    if (__atomic_load_n(&L->state, __ATOMIC_ACQUIRE) != KVL_OUT)
        return;
    me = kvl_tid();
    if (L->borrower != me || !kvl_claim(L, KVL_OUT))
        return;
    if (L->borrower != me) {   /* another loan was made in between: not ours to end */
        __atomic_store_n(&L->state, KVL_OUT, __ATOMIC_RELEASE);
        return;
    }
    sched_setaffinity(0, sizeof L->home, &L->home);
    __atomic_store_n(&L->state, KVL_FREE, __ATOMIC_RELEASE);
}

static inline unsigned long long kvl_loans(kvl_loan *L) { return __atomic_load_n(&L->loans, __ATOMIC_RELAXED); }

/* A waiter whose spin ran out, just before it sleeps: its CPU to the holder. 1 when lent. */
static int kvl_lend(kvl_loan *L) {
    cpu_set_t one;
    int holder = __atomic_load_n(&L->holder, __ATOMIC_RELAXED), cpu = sched_getcpu();
    if (holder == 0 || holder == kvl_tid() || cpu < 0)
        return 0;
    if (!kvl_claim(L, KVL_FREE)) {
        /* a loan is out: if its borrower is the holder, it already runs where it can */
        if (L->borrower == holder || !kvl_claim(L, KVL_OUT))
            return 0;
        sched_setaffinity(L->borrower, sizeof L->home, &L->home);   /* ESRCH when it exited */
    }
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    if (sched_getaffinity(holder, sizeof L->home, &L->home) || sched_setaffinity(holder, sizeof one, &one)) {
        __atomic_store_n(&L->state, KVL_FREE, __ATOMIC_RELEASE);
        return 0;
    }
    L->borrower = holder;
    __atomic_store_n(&L->loans, L->loans + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&L->state, KVL_OUT, __ATOMIC_RELEASE);
    return 1;
}

#else

typedef struct { int unused; } kvl_loan;
static inline void kvl_init(void) {}
static inline unsigned long long kvl_loans(kvl_loan *L) { (void)L; return 0; }
static inline void kvl_held(kvl_loan *L) { (void)L; }
static inline void kvl_unheld(kvl_loan *L) { (void)L; }
static inline void kvl_return(kvl_loan *L) { (void)L; }
static inline int kvl_lend(kvl_loan *L) { (void)L; return 0; }

#endif
#endif
