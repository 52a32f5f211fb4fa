#!/usr/bin/env bash
# Runs a command inside a Debian root made by packaging/debian-root.sh, as a program runs
# on a host with that userland: in a private mount namespace (what is mounted here goes away
# with the command), with /proc mounted, the host's network and the caller's environment.
#
#   packaging/in-root.sh ROOT [--net] [--bind HOST_DIR DIR_IN_ROOT]... [--user UID] -- COMMAND [ARG...]
#
# --net copies the host's DNS settings and CA bundle into the root first, so that apt and
# pip there download as they do on the host.
# The command replaces this script's process (same pid, signals reach it directly), so a
# test can start `kvcm serve` in the root and stop it as it would on the host. COMMAND is a
# path inside ROOT. Needs root.
set -euo pipefail

root=$(cd "${1:?ROOT missing}" && pwd)
shift
binds=()
user=
while [ $# -gt 0 ]; do
    case "$1" in
        --bind) binds+=("$2" "$3"); shift 3 ;;
        --user) user=$2; shift 2 ;;
        --net)
            cp /etc/resolv.conf "$root/etc/resolv.conf"
            if [ -f /etc/ssl/certs/ca-certificates.crt ] && [ -d "$root/etc/ssl/certs" ]; then
                cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
            fi
            shift ;;
        --) shift; break ;;
        *) echo "packaging/in-root.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "packaging/in-root.sh: no command" >&2; exit 2; }

tool() { PATH=$PATH:/usr/sbin:/sbin command -v "$1"; }
mounts="mount -t proc proc \"\$0/proc\""
for ((i = 0; i < ${#binds[@]}; i += 2)); do
    mkdir -p "${binds[i]}" "$root/${binds[i+1]}"
    mounts+=" && mount --bind '${binds[i]}' \"\$0/${binds[i+1]}\""
done
userspec=()
[ -n "$user" ] && userspec=(--userspec="$user:$user")
# unshare without --fork: the new mount namespace needs no new process, so the pid stays.
exec "$(tool unshare)" --mount --propagation private -- /bin/sh -c \
    "$mounts && exec \"\$@\"" "$root" "$(tool chroot)" "${userspec[@]}" "$root" "$@"
