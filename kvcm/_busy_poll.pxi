# Waiting for the event loop's next event by spinning instead of sleeping.

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<sched.h>" nogil:
    int sched_yield()


def busy_poll(int fd, double seconds):
    """Spins for up to `seconds` until fd is readable, without the GIL and yielding the CPU
    to any other thread that wants it; True when it became readable. For an event loop's
    own epoll fd, readable means the loop has an event to handle: spinning there after an
    answer lets the next request find the loop's thread awake instead of waking a sleeping
    CPU for it (tens of µs on virtual machines and on hosts whose idle cores enter deep
    sleep states)."""
    cdef pollfd p
    cdef timespec t0
    cdef int ready = 0
    p.fd, p.events, p.revents = fd, POLLIN, 0
    clock_gettime(CLOCK_MONOTONIC, &t0)
    with nogil:
        while True:
            ready = poll(&p, 1, 0)
            if ready != 0 or _seconds_since(&t0) >= seconds:
                break
            # a thread waiting for this CPU (the ingest, a client on the same host) runs
            # first: the spin only uses time nobody else wants
            sched_yield()
    return ready > 0
