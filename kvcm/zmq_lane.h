/* The few libzmq calls the ingest's native lane (kvcm/_ingest_lane.pxi) makes: receiving the parts
 * of a message without the GIL. kvcm does not link libzmq itself: it uses the libzmq pyzmq
 * already loaded (its wheel bundles one), found among the loaded objects and resolved with
 * dlsym, so both drive the same sockets with the same library, frozen binary included. */
#ifndef KVCM_ZMQ_LANE_H
#define KVCM_ZMQ_LANE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <link.h>
#include <string.h>
#include <stddef.h>

/* libzmq's ABI (zmq.h, stable since 4.0): an opaque 64-byte message, pointer-aligned */
typedef struct { unsigned char _[64]; } __attribute__((aligned(sizeof(void *)))) kvz_msg;

#define KVZ_DONTWAIT 1

typedef struct {
    int (*msg_init)(kvz_msg *);
    int (*msg_recv)(kvz_msg *, void *, int);
    int (*msg_close)(kvz_msg *);
    void *(*msg_data)(kvz_msg *);
    size_t (*msg_size)(const kvz_msg *);
    int (*msg_more)(const kvz_msg *);
    int (*errno_)(void);
} kvz_api;

static int kvz_find(struct dl_phdr_info *info, size_t size, void *data) {
    const char *name = info->dlpi_name, *base;
    (void)size;
    if (name == NULL || !*name)
        return 0;
    base = strrchr(name, '/');
    base = base ? base + 1 : name;
    if (strncmp(base, "libzmq", 6) != 0)
        return 0;
    *(void **)data = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
    return *(void **)data != NULL;
}

/* Fills api from the loaded libzmq; 0 on success, -1 when none is loaded or a symbol is
 * missing (the ingest then reads its sockets through pyzmq alone). */
static int kvz_load(kvz_api *api) {
    void *lib = NULL;
    dl_iterate_phdr(kvz_find, &lib);
    if (lib == NULL)
        lib = RTLD_DEFAULT;   /* a libzmq linked statically into pyzmq's extension, exported */
    *(void **)&api->msg_init = dlsym(lib, "zmq_msg_init");
    *(void **)&api->msg_recv = dlsym(lib, "zmq_msg_recv");
    *(void **)&api->msg_close = dlsym(lib, "zmq_msg_close");
    *(void **)&api->msg_data = dlsym(lib, "zmq_msg_data");
    *(void **)&api->msg_size = dlsym(lib, "zmq_msg_size");
    *(void **)&api->msg_more = dlsym(lib, "zmq_msg_more");
    *(void **)&api->errno_ = dlsym(lib, "zmq_errno");
    if (!api->msg_init || !api->msg_recv || !api->msg_close || !api->msg_data || !api->msg_size
            || !api->msg_more || !api->errno_)
        return -1;
    return 0;
}

#endif
