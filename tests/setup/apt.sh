# Sourced by the tests/setup scripts that install Debian packages.
#
# apt_install PREREQ TESTS PACKAGE...: installs the packages with apt-get (waiting for other
# jobs' lock, updating the package lists only if the first try fails). Without root or
# apt-get it says which tests will skip and returns 1.
apt_install() {
    local prereq=$1 tests=$2
    shift 2
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "$prereq: cannot install $* (needs root with apt-get); $tests will skip" >&2
        return 1
    fi
    echo "$prereq: installing Debian's $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null \
        || { apt-get -o DPkg::Lock::Timeout=600 update -qq \
             && apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" >/dev/null; }
}
