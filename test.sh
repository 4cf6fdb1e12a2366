#!/usr/bin/env bash
# Install everything the tests need, then run them all (README, .ci/run).
# Needs Node.js 20.10+ on the machine (see docs/testing.md); installs Debian's
# redis-server and postgresql (the servers: where none answers on 127.0.0.1:6379
# or :5432 the tests start private ones, tests/conftest.py), docker-compose
# (compose-file validation), chromium and chromium-driver (the page's browser
# tests) and prometheus (only its promtool is used: it checks deploy/prometheus)
# when missing and root.
set -euo pipefail
cd "$(dirname "$0")"
servers=()  # the packages of the server binaries that are missing
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    servers+=(redis-server)
fi
if [ -n "${TANDEM_TEST_PG_BIN:-}" ]; then  # where tests/pg_servers.py looks, in its order
    [ -x "$TANDEM_TEST_PG_BIN/initdb" ] || servers+=(postgresql)
elif ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null; then
    servers+=(postgresql)
fi
if [ ${#servers[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${servers[@]}" >/dev/null
    else
        echo "test.sh: the server binaries of ${servers[*]} are missing; install them (Debian: apt-get install ${servers[*]}) or run test.sh as root" >&2
        exit 1
    fi
fi
if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
    else
        echo "test.sh: docker-compose is missing; install it (Debian: apt-get install docker-compose)" >&2
    fi
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "test.sh: chromium is missing; install it (Debian: apt-get install chromium chromium-driver)" >&2
    fi
fi
if ! command -v promtool >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    else
        echo "test.sh: promtool is missing; install it (Debian: apt-get install prometheus)" >&2
    fi
fi
python3 -m venv .venv
.venv/bin/pip install -q -r requirements-dev.txt
# The tests mostly wait on the servers they start: 3 workers on 2 cores halve
# the wall time. TEST_WORKERS=0 runs them in this one process.
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-3}" "$@"
