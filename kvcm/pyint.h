/* Reading small Python ints without a function call per item.
 *
 * Token ids and keys arrive as lists of Python ints; converting 4096 of them through the
 * generic API costs about as much as hashing them. Ints that fit one internal digit (all
 * token ids) are read directly; anything else returns 0 and takes the generic path. */
#ifndef KVCM_PYINT_H
#define KVCM_PYINT_H

#include <Python.h>
#include <stdint.h>

static inline int kvcm_small_uint(PyObject *o, uint64_t *out) {
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
    if (size == 1) {
        *out = ((PyLongObject *)o)->ob_digit[0];
        return 1;
    }
    return 0;
#endif
}

#endif
