#!/bin/sh
# The system programs the test suite runs for real: a PostgreSQL server (the shared-store and
# multi-node tests start their own, in a temporary directory) and nginx (the load-balancer example
# in README "Scaling out" is tested in front of two daemons). Each is looked for first; only what
# is missing is installed, and only where we may (root, with apt-get). Anywhere else the suite
# still runs and says loudly which tests it skipped and why.
set -eu
have_postgres() {
    command -v initdb >/dev/null 2>&1 && return 0
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && return 0
    done
    return 1
}
missing=""
have_postgres || missing="$missing postgresql"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing what the tests run for real:$missing (Debian packages, first run only)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # policy-rc.d: the packages must not start their own services here
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
    rm -f /usr/sbin/policy-rc.d
else
    echo "==> WARNING: not found:$missing; the tests that need it will be skipped (install it to run them)" >&2
fi
