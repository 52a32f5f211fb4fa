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

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    enum: MSG_DONTWAIT

cdef enum:
    # bytes a spin takes from its connection: a whole scoring request of ~10 k token ids;
    # the rest of a longer one comes through the loop's own reads
    SPIN_READ_MAX = 65536


def busy_poll(int loop_fd, double seconds, int conn_fd=-1):
    """Spins for up to `seconds` until the event loop's epoll fd `loop_fd` is readable,
    without the GIL and yielding the CPU to any other thread that wants it.

    Readable means the loop has an event to handle: spinning there after an answer lets the
    next request find the loop's thread awake instead of waking a sleeping CPU for it (tens
    of µs on virtual machines and on hosts whose idle cores enter deep sleep states). With
    `conn_fd`, a socket the loop watches, the spin reads that socket's next bytes itself
    when they come first, saving the loop's round through epoll and its read callback.

    Returns the bytes read from conn_fd, True for an event left to the loop (including
    conn_fd's end of stream or error: nothing is consumed then), or False when the budget
    ran out."""
    cdef pollfd fds[2]
    cdef timespec t0
    cdef int nfds = 1
    cdef int ready = 0
    cdef ssize_t got = -1
    cdef char buf[SPIN_READ_MAX]
    fds[0].fd, fds[0].events, fds[0].revents = loop_fd, POLLIN, 0
    if conn_fd >= 0:
        # the connection first: its readiness shows on loop_fd too
        fds[1] = fds[0]
        fds[0].fd = conn_fd
        nfds = 2
    clock_gettime(CLOCK_MONOTONIC, &t0)
    with nogil:
        while True:
            ready = poll(fds, nfds, 0)
            if ready != 0 or _seconds_since(&t0) >= seconds:
                break
            # a thread waiting for this CPU (the ingest, a client on the same host) runs
            # first: the spin only uses time nobody else wants
            sched_yield()
        if ready > 0 and nfds == 2 and fds[0].revents & POLLIN:
            got = recv(conn_fd, buf, SPIN_READ_MAX, MSG_DONTWAIT)
    if got > 0:
        return PyBytes_FromStringAndSize(buf, got)
    return ready > 0
