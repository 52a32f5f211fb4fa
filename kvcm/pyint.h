/* Reading Python ints without a function call per item.
 *
 * Token ids and keys arrive as lists of Python ints; converting 4096 of them through the
 * generic API costs about as much as hashing them. On CPython < 3.12 non-negative ints of up
 * to 64 bits are read from their digits; 3.12+ has a public API for compact (one-digit)
 * values; anything else returns 0 and takes the generic path. */
#ifndef KVCM_PYINT_H
#define KVCM_PYINT_H

#include <Python.h>
#include <stdint.h>

static inline int kvcm_fast_uint(PyObject *o, uint64_t *out) {
    if (!PyLong_CheckExact(o)) return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)o)) return 0;
    Py_ssize_t v = PyUnstable_Long_CompactValue((PyLongObject *)o);
    if (v < 0) return 0;
    *out = (uint64_t)v;
    return 1;
#else
    Py_ssize_t size = Py_SIZE(o);
    if (size == 0) {
        *out = 0;
        return 1;
    }
    const digit *d = ((PyLongObject *)o)->ob_digit;
    if (size == 1) {
        *out = d[0];
        return 1;
    }
    /* block keys are 64-bit: two or three 30-bit digits, the top one holding <= 4 bits */
    if (size == 2) {
        *out = (uint64_t)d[0] | (uint64_t)d[1] << PyLong_SHIFT;
        return 1;
    }
    if (size == 3 && PyLong_SHIFT == 30 && d[2] < (1u << 4)) {
        *out = (uint64_t)d[0] | (uint64_t)d[1] << 30 | (uint64_t)d[2] << 60;
        return 1;
    }
    return 0;
#endif
}

/* Any exact int in [0, 2**64); 0 (with no error set) for everything else. */
static inline int kvcm_uint64(PyObject *o, uint64_t *out) {
    if (kvcm_fast_uint(o, out)) return 1;
    if (!PyLong_CheckExact(o)) return 0;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* Reads items[0..n) into out while each is an int kvcm_fast_uint reads; returns how many it
 * read (n when all), so the caller words the error or converts the rest the slow way. One C
 * loop without reference counting: the caller holds the list or tuple. */
static inline Py_ssize_t kvcm_fast_uints(PyObject *const *items, Py_ssize_t n, uint64_t *out) {
    Py_ssize_t i;
    for (i = 0; i < n; i++)
        if (!kvcm_fast_uint(items[i], &out[i]))
            break;
    return i;
}

#endif
