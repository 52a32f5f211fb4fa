/* Lending a CPU to the thread that holds the index lock (kvcm/_index.pxi).
 *
 * The lock is held for one event's change of the index, a microsecond or two, so a waiter
 * that has spun for 100 µs without getting it is almost always waiting for a
 * holder that lost its CPU mid-change: on a CPU it shares with libzmq's I/O thread and
 * whatever else the host runs there, it gets that CPU back only after the others' scheduler
 * slices, milliseconds later. Such a waiter is about to sleep and leave its own CPU idle, so it
 * first moves the holder there (sched_setaffinity to that one CPU): the holder runs at once,
 * finishes its change and releases the lock, and after that release puts itself back on the
 * CPUs it had. At most one loan is out per lock; a loan whose borrower has not come back (it no
 * longer holds the lock, it exited) is ended by the next waiter that wants to lend.
 *
 * The move is synchronous: the lender sleeps until the holder has moved, and may then have to
 * wait for its own CPU, which the holder now runs on. So the loan is recorded before the move
 * (KVL_LENDING), and a holder that releases the lock meanwhile goes home at once and marks the
 * loan ended; the lender, back from the move, puts the holder home too in case its move landed
 * after the holder's return (setting the CPUs a thread already has costs nothing).
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
#include <time.h>
#include <unistd.h>

/* no loan; one being ended; one being made (the move in flight); one out; one ended by its
 * borrower while it was being made */
enum { KVL_FREE = 0, KVL_BUSY = 1, KVL_LENDING = 2, KVL_OUT = 3, KVL_ENDED = 4 };

typedef struct {
    int holder;        /* the thread id holding the lock, 0 when free */
    int state;         /* KVL_* */
    int borrower;      /* the thread the loan went to */
    cpu_set_t home;    /* the borrower's CPUs before the loan */
    unsigned long long loans;   /* loans made, for /metrics */
} kvl_loan;

static __thread int kvl_tid_cached;
/* Set in a thread whose waits delay no request (the ingest thread): it sleeps without lending.
 * Were it to lend, the scoring thread, holding the lock for a lookup, would be moved onto the
 * ingest's busy CPU and answer from there. */
static __thread int kvl_never_lends;

static inline void kvl_sleep_without_lending(void) { kvl_never_lends = 1; }

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

static inline int kvl_cas(kvl_loan *L, int from, int to) {
    return __atomic_compare_exchange_n(&L->state, &from, to, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* After a thread released the lock: back to its own CPUs if it was lent one. */
static inline void kvl_return(kvl_loan *L) {
    int me, state = __atomic_load_n(&L->state, __ATOMIC_ACQUIRE);
    if (state != KVL_OUT && state != KVL_LENDING)
        return;
    me = kvl_tid();
    if (L->borrower != me)
        return;
    if (state == KVL_LENDING) {
        /* the lender has not come back from moving this thread: go home, and tell it so */
        sched_setaffinity(0, sizeof L->home, &L->home);
        if (kvl_cas(L, KVL_LENDING, KVL_ENDED))
            return;
    }
    if (!kvl_claim(L, KVL_OUT))
        return;
    if (L->borrower != me) {   /* another loan was made in between: not ours to end */
        __atomic_store_n(&L->state, KVL_OUT, __ATOMIC_RELEASE);
        return;
    }
    sched_setaffinity(0, sizeof L->home, &L->home);
    __atomic_store_n(&L->state, KVL_FREE, __ATOMIC_RELEASE);
}

static inline unsigned long long kvl_loans(kvl_loan *L) { return __atomic_load_n(&L->loans, __ATOMIC_RELAXED); }

/* Tests only: how long a lender waits after the move, as one that does not get its CPU back
 * at once (the holder runs there) would. */
static long kvl_lender_delay_ns;

/* A waiter whose spin ran out, just before it sleeps: its CPU to the holder. 1 when lent. */
static int kvl_lend(kvl_loan *L) {
    cpu_set_t one;
    int holder = __atomic_load_n(&L->holder, __ATOMIC_RELAXED), cpu;
    if (kvl_never_lends)
        return 0;
    cpu = sched_getcpu();
    if (holder == 0 || holder == kvl_tid() || cpu < 0)
        return 0;
    if (!kvl_claim(L, KVL_FREE)) {
        /* a loan is out: if its borrower is the holder, it already runs where it can */
        if (L->borrower == holder || !kvl_claim(L, KVL_OUT))
            return 0;
        sched_setaffinity(L->borrower, sizeof L->home, &L->home);   /* ESRCH when it exited */
    }
    if (sched_getaffinity(holder, sizeof L->home, &L->home)) {
        __atomic_store_n(&L->state, KVL_FREE, __ATOMIC_RELEASE);
        return 0;
    }
    L->borrower = holder;
    __atomic_store_n(&L->state, KVL_LENDING, __ATOMIC_RELEASE);
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    int moved = sched_setaffinity(holder, sizeof one, &one) == 0;
    if (kvl_lender_delay_ns > 0) {
        struct timespec pause = {kvl_lender_delay_ns / 1000000000L, kvl_lender_delay_ns % 1000000000L};
        nanosleep(&pause, NULL);
    }
    if (!moved) {
        __atomic_store_n(&L->state, KVL_FREE, __ATOMIC_RELEASE);
        return 0;
    }
    __atomic_store_n(&L->loans, L->loans + 1, __ATOMIC_RELAXED);
    if (!kvl_cas(L, KVL_LENDING, KVL_OUT)) {
        /* ended by the holder, which went home: this move may have landed after that */
        sched_setaffinity(holder, sizeof L->home, &L->home);
        __atomic_store_n(&L->state, KVL_FREE, __ATOMIC_RELEASE);
    }
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
static long kvl_lender_delay_ns;
static inline void kvl_sleep_without_lending(void) {}

#endif
#endif
