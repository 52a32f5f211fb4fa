#!/usr/bin/env bash
# Runs inside the build root (packaging/build-root.sh copies it to /opt/kvcm-build/): builds
# the CPython the release binary carries, with a shared libpython (PyInstaller needs it), into
# /opt/python, and the venv /opt/venv the binary is frozen with.
#
# Source: Debian 12's python3.11 source package, upstream's 3.11 tarball with Debian's
# patches; of those only the upstream fixes are applied (CVE-*, NNNN-3.11-* backports and
# patches marked "Origin: upstream"), not Debian's own layout changes, so the interpreter
# behaves as python.org's does, with the security fixes Debian carries.
#
# Flags: the architecture's baseline (-march=x86-64 -mtune=generic: what every x86_64 CPU
# has; armv8-a on aarch64), the switches recorded in each object (-frecord-gcc-switches: tests/test_portable.py reads
# them back from the bundle), and glibc-floor.h so that nothing needs glibc > 2.28.
set -euo pipefail

here=/opt/kvcm-build
mirror=${KVCM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
jobs=$(nproc)

echo "deb-src $mirror bookworm main" >/etc/apt/sources.list.d/python-source.list
apt-get update -qq
rm -rf /opt/src /opt/python /opt/venv
mkdir -p /opt/src
cd /opt/src
apt-get source -qq --download-only -o APT::Sandbox::User=root python3.11 >/dev/null
tar -xf python3.11_*.orig.tar.*
tar -xf python3.11_*.debian.tar.*
cd Python-3.11.*
internal_users() { grep -l '#include "pycore_' Modules/*.c | sort; }
internal_before=$(internal_users)
applied=0
while read -r patch; do
    case "$patch" in ""|\#*) continue ;; esac
    file=../debian/patches/$patch
    if [[ $patch =~ ^(CVE-|[0-9]{4}-3\.11-) ]] || grep -q '^Origin: upstream' "$file"; then
        patch -p1 --forward --silent <"$file"
        applied=$((applied + 1))
    fi
done <../debian/patches/series
# A backported fix may make a module include an internal header (pycore_*.h): the later 3.11
# releases it comes from build that module with Py_BUILD_CORE_MODULE, 3.11.2 does not
# (Debian links it into the interpreter instead), so it is defined there.
for module in $(comm -13 <(echo "$internal_before") <(internal_users)); do
    sed -i '1i #ifndef Py_BUILD_CORE_BUILTIN\n#  define Py_BUILD_CORE_MODULE 1\n#endif' "$module"
    echo "$module: defines Py_BUILD_CORE_MODULE (a backported fix includes an internal header)"
done
echo "CPython $(basename "$PWD" | cut -d- -f2) with $applied upstream fixes from Debian 12's $(basename ../python3.11_*.dsc .dsc)"

case "$(uname -m)" in
    x86_64) baseline="-march=x86-64 -mtune=generic" ;;
    aarch64) baseline="-march=armv8-a" ;;
    *) echo "build-python.sh: no baseline for $(uname -m)" >&2; exit 1 ;;
esac
flags="$baseline -frecord-gcc-switches -include $here/glibc-floor.h"
start=$SECONDS
# --disable-test-modules: CPython's own test suite (118 MB, byte-compiled three times by
# `make install`) is neither frozen nor run here.
./configure -q --prefix=/opt/python --enable-shared --with-ensurepip=install --disable-test-modules \
    CFLAGS="$flags" ac_cv_func_sem_clockwait=no >/dev/null
make -s -j"$jobs" >/opt/src/make.log 2>&1 || { tail -40 /opt/src/make.log; exit 1; }
make -s install >/opt/src/install.log 2>&1 || { tail -40 /opt/src/install.log; exit 1; }
echo "CPython built in $((SECONDS - start)) s"
echo /opt/python/lib >/etc/ld.so.conf.d/python.conf
ldconfig
/opt/python/bin/python3 -c 'import ssl, ctypes, lzma, bz2, zlib, uuid'     # built, not skipped
/opt/python/bin/python3 -m venv /opt/venv
/opt/venv/bin/python -m pip install -q --upgrade pip
rm -rf /opt/src
