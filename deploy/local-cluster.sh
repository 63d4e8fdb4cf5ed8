#!/usr/bin/env bash
# `make cluster`: a whole cluster on this machine, in the foreground until Ctrl-C:
# PostgreSQL and Redis (Debian's, installed when missing and running as root), three Parley
# nodes in development mode, and HAProxy in front on one port (round-robin, WebSocket-aware).
# State lives in $CLUSTER_DIR (default ./data/cluster); `kill -9` a node to watch a takeover.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8080}
DIR=${CLUSTER_DIR:-$PWD/data/cluster}
PG_PORT=${PG_PORT:-54329}
REDIS_PORT=${REDIS_PORT:-63799}
NODES=${NODES:-3}

need() {  # need COMMAND DEBIAN-PACKAGE
    if ! command -v "$1" >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/"$1" >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
        else
            echo "make cluster needs $2 (apt-get install $2)" >&2; exit 1
        fi
    fi
}
need redis-server redis-server
need pg_ctl postgresql
need haproxy haproxy
PG_BIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort | tail -1)")

mkdir -p "$DIR"
RUNAS=()
if [ "$(id -u)" = 0 ]; then  # PostgreSQL refuses to run as root
    id parleytest >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin parleytest
    mkdir -p "$DIR/pg" && chown parleytest "$DIR/pg"
    RUNAS=(runuser -u parleytest --)
fi
if [ ! -f "$DIR/pg/data/PG_VERSION" ]; then
    "${RUNAS[@]}" "$PG_BIN/initdb" -D "$DIR/pg/data" -U parley --auth=trust -E UTF8 --no-instructions >/dev/null
fi
"${RUNAS[@]}" "$PG_BIN/pg_ctl" -D "$DIR/pg/data" -l "$DIR/pg/server.log" -w \
    -o "-p $PG_PORT -k $DIR/pg -c listen_addresses=127.0.0.1" start >/dev/null
"$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U parley -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'parley'" | grep -q 1 \
    || "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U parley parley
redis-server --save '' --appendonly no --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes \
    --pidfile "$DIR/redis.pid" --logfile "$DIR/redis.log" --dir "$DIR"

[ -f "$DIR/secret" ] || "$PY" -c "import secrets; print(secrets.token_urlsafe(32))" > "$DIR/secret"
export PARLEY_SECRET; PARLEY_SECRET=$(cat "$DIR/secret")
export PARLEY_DATABASE_URL="postgresql://parley@127.0.0.1:$PG_PORT/parley"
export PARLEY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export PARLEY_ALLOWED_ORIGINS="http://127.0.0.1:$PORT,http://localhost:$PORT"

pids=()
cleanup() {
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait "${pids[@]}" 2>/dev/null || true
    [ -f "$DIR/redis.pid" ] && kill "$(cat "$DIR/redis.pid")" 2>/dev/null || true
    "${RUNAS[@]}" "$PG_BIN/pg_ctl" -D "$DIR/pg/data" -m fast -w stop >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

servers=""
for i in $(seq 1 "$NODES"); do
    node_port=$((PORT + 100 + i))
    # behind HAProxy every client arrives from 127.0.0.1: no per-address cap
    "$PY" run.py serve --dev --port "$node_port" --node-id "node$i" --data-dir "$DIR/node$i" \
        --max-connections-per-address 0 > >(sed -u "s/^/node$i: /") 2>&1 &
    pids+=($!)  # the node itself (its log goes through sed): `kill -9` it to watch a takeover
    servers="$servers    server node$i 127.0.0.1:$node_port check inter 1s fall 2 rise 1
"
done
cat > "$DIR/haproxy.cfg" <<CFG
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    option http-server-close
frontend parley
    bind 127.0.0.1:$PORT
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk GET /readyz
$servers
CFG
haproxy -f "$DIR/haproxy.cfg" -db > >(sed -u "s/^/haproxy: /") 2>&1 &
pids+=($!)
echo "node pids: ${pids[*]:0:$NODES}"
echo "cluster: $NODES nodes behind http://127.0.0.1:$PORT/  (node ports $((PORT + 101))-$((PORT + 100 + NODES)); Ctrl-C stops all)"
wait
