# Waiting for the event loop's next event by spinning instead of sleeping.

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

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
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    enum: MSG_DONTWAIT
    enum: MSG_NOSIGNAL

cdef enum:
    # bytes a spin takes from its connection: a whole scoring request of ~10 k token ids;
    # the rest of a longer one comes through the loop's own reads
    SPIN_READ_MAX = 65536


cdef inline double _seconds_since(const timespec *t0) noexcept nogil:
    cdef timespec t1
    clock_gettime(CLOCK_MONOTONIC, &t1)
    return <double>(t1.tv_sec - t0.tv_sec) + <double>(t1.tv_nsec - t0.tv_nsec) * 1e-9


cdef int _spin(pollfd *fds, int nfds, double seconds) noexcept nogil:
    """poll(fds) without sleeping until one is ready or `seconds` have passed: > 0 when one
    is, 0 when the budget ran out, < 0 on a poll error."""
    cdef timespec t0
    cdef int ready
    clock_gettime(CLOCK_MONOTONIC, &t0)
    while True:
        ready = poll(fds, nfds, 0)
        if ready != 0 or _seconds_since(&t0) >= seconds:
            return ready
        # a thread waiting for this CPU (the ingest, a client on the same host) runs
        # first: the spin only uses time nobody else wants
        sched_yield()


cdef inline int _spin_fds(pollfd *fds, int loop_fd, int conn_fd) noexcept nogil:
    """Fills fds for a spin on loop_fd, with conn_fd (when >= 0) first: its readiness shows on
    loop_fd too. Returns their number."""
    fds[0].fd, fds[0].events, fds[0].revents = loop_fd, POLLIN, 0
    if conn_fd < 0:
        return 1
    fds[1] = fds[0]
    fds[0].fd = conn_fd
    return 2


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
    cdef int nfds = _spin_fds(fds, loop_fd, conn_fd)
    cdef int ready
    cdef ssize_t got = -1
    cdef char buf[SPIN_READ_MAX]
    with nogil:
        ready = _spin(fds, nfds, seconds)
        if ready > 0 and nfds == 2 and fds[0].revents & POLLIN:
            got = recv(conn_fd, buf, SPIN_READ_MAX, MSG_DONTWAIT)
    if got > 0:
        return PyBytes_FromStringAndSize(buf, got)
    return ready > 0
