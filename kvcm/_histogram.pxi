# A latency histogram for the HTTP server: every answer is timed into one, so observing must
# cost nanoseconds, not the microseconds of a locked Python histogram. Read at scrape time as
# a Prometheus histogram (kvcm/metrics.py).


cdef class LatencyHistogram:
    """Observations counted under fixed upper bounds (ascending; +inf is added), and their
    sum, as a Prometheus histogram counts them: a value falls in the first bucket whose bound
    it does not exceed. One thread observes (the event loop's); snapshot() may run anywhere
    and sees each count whole."""
    cdef double *_bounds
    cdef uint64_t *_counts       # per bucket, the last one +inf; not cumulative
    cdef Py_ssize_t _n           # finite bounds
    cdef double _sum

    def __cinit__(self, bounds):
        cdef Py_ssize_t i
        values = [float(b) for b in bounds]
        if not values or any(not (a < b) for a, b in zip(values, values[1:])) or max(values) == float("inf"):
            raise ValueError("histogram bounds must be finite and ascending, got %r" % (bounds,))
        self._n = len(values)
        self._bounds = <double *>malloc(self._n * sizeof(double))
        self._counts = <uint64_t *>malloc((self._n + 1) * sizeof(uint64_t))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        for i in range(self._n):
            self._bounds[i] = values[i]
        memset(self._counts, 0, (self._n + 1) * sizeof(uint64_t))
        self._sum = 0.0

    def __dealloc__(self):
        free(self._bounds)
        free(self._counts)

    cpdef void observe(self, double value):
        cdef Py_ssize_t i = 0
        while i < self._n and value > self._bounds[i]:
            i += 1
        self._counts[i] += 1
        self._sum += value

    def snapshot(self):
        """([(upper bound, cumulative count)], with +inf last; sum of the values)."""
        cdef Py_ssize_t i
        cdef uint64_t total = 0
        out = []
        for i in range(self._n + 1):
            total += self._counts[i]
            out.append((self._bounds[i] if i < self._n else float("inf"), total))
        return out, self._sum
