#!/usr/bin/env bash
# Creates a minimal Debian 11 (bullseye, glibc 2.31) root with debootstrap, once: the build
# root the release binary is frozen in (packaging/build-root.sh) and the root the tests run
# the binary in (tests/setup/bullseye.sh).
#
#   packaging/debian-root.sh DIR [PACKAGE...]
#
# A root that exists with the same package list is kept as it is. The .deb files go through
# apt's own cache (/var/cache/apt/archives, or $KVCM_DEB_CACHE), so a second root, or the
# same one in a fresh clone, downloads nothing. Needs root and debootstrap (installed with
# apt-get when missing). $KVCM_DEBIAN_MIRROR overrides the mirror.
set -euo pipefail

if [ $# -lt 1 ]; then
    sed -n '2,12p' "$0" >&2
    exit 2
fi
root=$1
shift
packages=$(printf '%s\n' "$@" | sort -u | paste -sd, -)
mirror=${KVCM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
debs=${KVCM_DEB_CACHE:-/var/cache/apt/archives}
stamp=$root/.kvcm-debian-root
# What the root was made from: this script and the package list.
made_from="bullseye minbase $packages $(sha256sum "$0" | cut -c1-16)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$made_from" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "packaging/debian-root.sh: creating a Debian root needs root (debootstrap, chroot)" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || { echo "packaging/debian-root.sh: debootstrap is missing" >&2; exit 1; }
    echo "installing debootstrap"
    apt-get update -qq -o DPkg::Lock::Timeout=300
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends debootstrap >/dev/null
fi

# Built beside its final place and moved there only when complete: an interrupted run leaves
# nothing that looks finished.
start=$SECONDS
partial=$root.partial
# A killed debootstrap can leave /proc mounted in the partial root.
awk -v dir="$(realpath -m "$partial")/" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts \
    | sort -r | xargs -r -n1 umount -l
rm -rf "$partial" "$root"
mkdir -p "$debs" "$(dirname "$root")"
echo "debootstrap: Debian 11 (bullseye) minbase${packages:+ + $packages} into $root"
log=$(mktemp)
if ! debootstrap --variant=minbase --cache-dir="$debs" ${packages:+--include="$packages"} \
        bullseye "$partial" "$mirror" >"$log" 2>&1; then
    tail -20 "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
# The security updates (OpenSSL, zlib, expat, ...) on top of the release.
echo "deb http://deb.debian.org/debian-security bullseye-security main" \
    >"$partial/etc/apt/sources.list.d/security.list"
# apt in the root shares the .deb cache too, without its lock: the host's apt-get, which may
# run meanwhile, holds that, and the two never want the same file.
"$(dirname "$0")/in-root.sh" "$partial" --net --bind "$debs" /var/cache/apt/archives -- /bin/sh -ec '
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq -o Debug::NoLocking=1 -o Dpkg::Use-Pty=0 \
        >/var/log/kvcm-upgrade.log 2>&1 || { tail -20 /var/log/kvcm-upgrade.log; exit 1; }'
echo "$made_from" >"$partial/.kvcm-debian-root"
mv "$partial" "$root"
echo "debootstrap: $root ready in $((SECONDS - start)) s ($(du -sh "$root" | cut -f1))"
