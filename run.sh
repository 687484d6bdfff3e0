#!/usr/bin/env bash
# codex-relay entry point.
#   ./run.sh [mitmdump args…]   set up .venv, upgrade the DB, start the relay on 127.0.0.1:8000 (SQLite by default)
#   ./run.sh test [pytest args…] set up .venv and run the whole test suite (+ ruff)
#   ./run.sh web [mitmweb args…] same as the default, in mitmweb
#   ./run.sh stats|poll-stats|reconcile|prune|keys|bench …   see README.md and docs/
set -euo pipefail
# Paths the user gives (nodes files, keys files, SQLite URLs) are read from where the command runs: no cd.
ROOT=$(cd "$(dirname "$0")" && pwd)
VENV=$ROOT/.venv
# The stats database the relay and the stats commands share unless told otherwise: in the checkout.
DB=${CODEX_DB:-sqlite:///$ROOT/data/codex.db}

find_python() {
    # mitmproxy 12 needs Python >= 3.12; the machine's default python3 may be older.
    local c
    for c in "${CODEX_PYTHON:-}" python3.13 python3.12 python3; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$c"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        local v
        for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])' | sort -rV); do
            c="$(pyenv prefix "$v")/bin/python"
            if [ -x "$c" ]; then echo "$c"; return 0; fi
        done
    fi
    return 1
}

setup_venv() {  # setup_venv [dev]: the relay's dependencies; with dev, the test tools too
    local stamp=$VENV/.codex-stamp want have spec=$ROOT
    want=$(sha256sum < "$ROOT/pyproject.toml" | cut -d' ' -f1)
    have=$(cat "$stamp" 2>/dev/null || true)
    # A venv set up for the tests has everything the relay needs as well.
    if [ -x "$VENV/bin/python" ] && { [ "$have" = "$want:${1:-}" ] || [ "$have" = "$want:dev" ]; }; then
        return 0
    fi
    local compile=--no-compile
    [ "${1:-}" = dev ] && spec="$ROOT[dev]" && compile=--compile
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py=$(find_python) || { echo "run.sh: no Python >= 3.12 found (set CODEX_PYTHON=/path/to/python3.12)" >&2; exit 1; }
        echo "run.sh: creating .venv with $py" >&2
        "$py" -m venv "$VENV"
    fi
    echo "run.sh: installing dependencies into .venv" >&2
    # A user's relay: Python writes the bytecode of the modules it imports when it first runs, not of every module
    # of every dependency (.venv ~130 MB instead of ~170). The test suite's many processes would each compile
    # what they import on their first run: there it is done once, at install.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$compile" -e "$spec" >&2
    echo "$want:${1:-}" > "$stamp"
}

ensure_debian() {  # ensure_debian PROGRAM PACKAGE TEST: install Debian's PACKAGE for TEST when we may
    # Tests drive real Debian programs (chromium for the admin page, haproxy in front of two relays, prometheus
    # scraping two relays).
    [ -x "$1" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: installing $2 for $3" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"; } >&2 \
            || echo "run.sh: $2 could not be installed: $3 skips (fails under CI=true)" >&2
    fi
}

has_arg() {  # has_arg NAME… -- ARGS…: is any NAME among ARGS (also as NAME=…)?
    local names=() a n
    while [ "$1" != "--" ]; do names+=("$1"); shift; done; shift
    for a in "$@"; do for n in "${names[@]}"; do
        case "$a" in "$n"|"$n"=*) return 0;; esac
    done; done
    return 1
}

relay() {  # relay mitmdump|mitmweb ARGS…
    local tool=$1; shift
    local defaults=()
    # Reverse mode (the script makes connections lazy: it picks the node before mitmproxy connects anywhere).
    has_arg --mode -m -- "$@" || defaults+=(--mode "reverse:${CODEX_REVERSE_TARGET:-https://api.openai.com}")
    has_arg --listen-port -p -- "$@" || defaults+=(--listen-port "${CODEX_PORT:-8000}")
    # Loopback unless told otherwise: the relay lends its node keys to whoever reaches it.
    has_arg --listen-host -- "$@" || defaults+=(--listen-host "${CODEX_HOST:-127.0.0.1}")
    has_arg codex_db -- "$@" || defaults+=(--set "codex_db=$DB")
    exec "$VENV/bin/$tool" -s "$ROOT/addon/codex.py" "${defaults[@]}" "$@"
}

cmd=${1:-}
case "$cmd" in
    test)
        shift; setup_venv dev
        cd "$ROOT"
        ensure_debian /usr/bin/chromium chromium "the browser test"
        ensure_debian /usr/sbin/haproxy haproxy "the HAProxy test"
        ensure_debian /usr/bin/prometheus prometheus "the Grafana dashboard's Prometheus test"
        # The suite starts hundreds of interpreters (workers, relays, CLIs): unless their bytecode is cached, each
        # compiles the project's modules again (~0.3 CPU-s a relay's start) and each worker rewrites the test
        # modules (~3 CPU-s a worker). An environment that forbids writing it (PYTHONDONTWRITEBYTECODE) pays that
        # on every start; the caches are git-ignored.
        unset PYTHONDONTWRITEBYTECODE
        "$VENV/bin/ruff" check .
        # mypy (what it checks: [tool.mypy] in pyproject.toml) beside the suite: without its cache, as in a fresh
        # clone, it takes ~15 s of one core, while the suite's workers spend much of their time waiting on
        # processes. Its failure fails the command all the same.
        rc=0 mypy_rc=0 mypy_out=$(mktemp)
        "$VENV/bin/mypy" > "$mypy_out" 2>&1 &
        mypy_pid=$!
        trap 'kill "$mypy_pid" 2>/dev/null || true; rm -f "$mypy_out"' EXIT  # an interrupted suite leaves no mypy behind
        # Two workers per core: the end-to-end tests spend much of their time waiting on real processes,
        # sockets and timeouts (-n 0 runs in one process); loadgroup keeps a module's shared relays on one worker.
        "$VENV/bin/python" -m pytest -n "$(( $(nproc) * 2 ))" --dist loadgroup "$@" || rc=$?
        wait "$mypy_pid" || mypy_rc=$?
        cat "$mypy_out"
        [ "$mypy_rc" = 0 ] || { echo "run.sh: mypy failed" >&2; exit "$mypy_rc"; }
        exit "$rc"
        ;;
    web) shift; setup_venv; relay mitmweb "$@" ;;
    stats) shift; setup_venv; CODEX_DB=$DB exec "$VENV/bin/python" -m store.cli.stats "$@" ;;
    poll-stats) shift; setup_venv; CODEX_DB=$DB exec "$VENV/bin/python" -m store.cli.poll "$@" ;;
    reconcile) shift; setup_venv; CODEX_DB=$DB exec "$VENV/bin/python" -m store.cli.reconcile "$@" ;;
    prune) shift; setup_venv; CODEX_DB=$DB exec "$VENV/bin/python" -m store.cli.prune "$@" ;;
    keys) shift; setup_venv; CODEX_DB=$DB exec "$VENV/bin/python" -m store.cli.keys "$@" ;;
    bench) shift; setup_venv dev; cd "$ROOT"; exec "$VENV/bin/python" -m bench "$@" ;;
    setup) setup_venv ;;
    *) setup_venv; relay mitmdump "$@" ;;
esac
