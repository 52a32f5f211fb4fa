#!/usr/bin/env bash
# Creates the build root of the release binary, once: Debian 11 (glibc 2.31) with gcc, the
# -dev packages CPython links against, and CPython built there (packaging/build-python.sh).
# Everything compiled in it needs glibc <= 2.28 (packaging/glibc-floor.h), and Debian 11's
# own libraries need no more either, so the binary frozen there runs on glibc >= 2.28.
#
#   packaging/build-root.sh DIR
#
# Kept while this script, build-python.sh, glibc-floor.h and debian-root.sh are unchanged
# (a stamp in DIR). About 5 minutes from nothing on two cores, most of it compiling CPython.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=${1:?DIR missing}
stamp=$root/.kvcm-build-root
made_from=$(cat "$here"/build-root.sh "$here"/build-python.sh "$here"/glibc-floor.h "$here"/debian-root.sh \
            | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$made_from" ]; then
    exit 0
fi
start=$SECONDS
"$here/debian-root.sh" "$root" gcc make libc6-dev binutils patch xz-utils ca-certificates \
    libssl-dev libffi-dev zlib1g-dev libbz2-dev liblzma-dev uuid-dev
rm -f "$stamp"
mkdir -p "$root/opt/kvcm-build"
cp "$here/build-python.sh" "$here/glibc-floor.h" "$root/opt/kvcm-build/"
# (without the host's pip settings that name paths of the host)
"$here/in-root.sh" "$root" --net -- /usr/bin/env -u PIP_FIND_LINKS -u PIP_CONSTRAINT \
    /bin/bash /opt/kvcm-build/build-python.sh
echo "$made_from" >"$stamp"
echo "build root $root ready in $((SECONDS - start)) s"
