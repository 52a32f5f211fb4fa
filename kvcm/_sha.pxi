# SHA-256: a portable C kernel and a SHA-NI kernel (sha256.h), chosen once by CPUID.
# KVCM_SHA256=portable forces the portable kernel, so tests cover both on one machine. Its
# C declarations are in _core.pxd.


def _select_sha256_kernel():
    """Chooses the kernel from the environment (KVCM_SHA256=portable forces the portable
    one); returns the kernel's name."""
    kvcm_sha256_select(os.environ.get("KVCM_SHA256", "").lower() == "portable")
    return sha256_backend()


def sha256_backend():
    """The active SHA-256 kernel: "sha-ni" or "portable"."""
    return "sha-ni" if kvcm_sha256_backend() == KVCM_SHA256_SHANI else "portable"


def sha256(data):
    """SHA-256 of a bytes-like object (for tests and tools; the hasher calls C directly)."""
    cdef const unsigned char[::1] view = memoryview(data).cast("B")
    cdef unsigned char out[32]
    cdef size_t n = view.shape[0]
    cdef const unsigned char *p = &view[0] if n else <const unsigned char *>b""
    with nogil:
        kvcm_sha256(p, n, out)
    return PyBytes_FromStringAndSize(<char *>out, 32)


_select_sha256_kernel()
