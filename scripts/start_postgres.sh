#!/usr/bin/env bash
# Start a throwaway PostgreSQL for the registry tests and print its URL on stdout.
#
#   export LORAPLEX_TEST_POSTGRES_URL="$(scripts/start_postgres.sh)"   # start (idempotent)
#   scripts/start_postgres.sh stop                                     # stop and delete it
#
# Listens on 127.0.0.1:${PGPORT:-5433} only, data under /tmp, trust auth, no durability
# (fsync off): for tests, never for real data. Installs PostgreSQL with apt if missing.
# Runs the server as the 'postgres' user when invoked as root (PostgreSQL refuses root).
set -euo pipefail

PORT="${PGPORT:-5433}"
DATA="${LORAPLEX_PG_DATA:-/tmp/loraplex-pg-${PORT}}"
USER_NAME=loraplex
DB_NAME=loraplex
URL="postgresql://${USER_NAME}@127.0.0.1:${PORT}/${DB_NAME}"

log() { echo "start_postgres: $*" >&2; }

find_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
    done
    command -v pg_ctl >/dev/null 2>&1 && { dirname "$(readlink -f "$(command -v pg_ctl)")"; return 0; }
    return 1
}

BINDIR="$(find_bindir || true)"
if [ -z "$BINDIR" ]; then
    log "PostgreSQL not found; installing with apt-get"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
    BINDIR="$(find_bindir)"
fi

# As root, run PostgreSQL as the unprivileged 'postgres' user the package creates.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

is_ready() { "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U "$USER_NAME"; }

if [ "${1:-start}" = "stop" ]; then
    if [ -d "$DATA" ]; then
        as_owner "$BINDIR/pg_ctl" -D "$DATA" -m fast -w stop >&2 || true
        rm -rf "$DATA"
    fi
    log "stopped"
    exit 0
fi

if ! is_ready; then
    if [ ! -f "$DATA/PG_VERSION" ]; then
        rm -rf "$DATA"
        mkdir -p "$DATA"
        [ "$(id -u)" -eq 0 ] && chown postgres "$DATA"
        chmod 700 "$DATA"
        log "initdb in $DATA"
        as_owner "$BINDIR/initdb" -D "$DATA" -U "$USER_NAME" --auth=trust -E UTF8 >/dev/null
    fi
    log "starting on 127.0.0.1:$PORT"
    as_owner "$BINDIR/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 start -o \
        "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$DATA \
         -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
         -c shared_buffers=32MB -c max_connections=100" >&2 || {
        log "failed to start; server log:"; tail -20 "$DATA/server.log" >&2; exit 1; }
fi

if ! "$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1; then
    "$BINDIR/createdb" -h 127.0.0.1 -p "$PORT" -U "$USER_NAME" "$DB_NAME"
fi
echo "$URL"
