/*
 * glibc-floor.h - force-included (gcc -include) into every C file the build root compiles
 * (CPython and kvcm's core; packaging/build-python.sh), so that they need nothing newer
 * than glibc 2.28 although the root has 2.31.
 *
 * glibc 2.29 gave exp, exp2, log, log2 and pow new symbol versions: the new ones only drop
 * the SVID error handling (matherr, _LIB_VERSION), which nothing here uses, so the calls
 * are bound to the versions every glibc of the architecture has. Functions that appeared
 * after 2.28 (sem_clockwait, 2.30) are turned off in CPython's configure instead.
 * packaging/glibc_floor.py checks the result on every build.
 */
#ifndef KVCM_GLIBC_FLOOR_H
#define KVCM_GLIBC_FLOOR_H

#if defined(__x86_64__)
#define KVCM_GLIBC_BASE "GLIBC_2.2.5"
#elif defined(__aarch64__)
#define KVCM_GLIBC_BASE "GLIBC_2.17"
#else
#error "glibc-floor.h: add the base glibc symbol version of this architecture"
#endif

__asm__(".symver exp,exp@" KVCM_GLIBC_BASE);
__asm__(".symver exp2,exp2@" KVCM_GLIBC_BASE);
__asm__(".symver log,log@" KVCM_GLIBC_BASE);
__asm__(".symver log2,log2@" KVCM_GLIBC_BASE);
__asm__(".symver pow,pow@" KVCM_GLIBC_BASE);

#endif
