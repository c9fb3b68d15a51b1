#!/usr/bin/env bash
# Instructions per request, counted by callgrind: a figure that does not move with the
# machine's load, for A/Bs too small to see through wall-clock noise.
#
#   bench/instructions.sh [PYTHON] [APP]      # defaults: python, RustPath (see bench/apps.py)
#   bench/instructions.sh /tmp/ferroxy-base/.venv/bin/python SyncHook   # a baseline build
#   bench/instructions.sh python Pool100    # a load-balanced app (bench/lb_apps.py)
#   bench/instructions.sh python FiltersRoutes   # 20 filters, 100 routes (bench/rules_apps.py)
#
# Runs the proxy (one worker, access log off) under `valgrind --tool=callgrind` in front of an
# nginx upstream, warms it up, zeroes the counters, loads it with `wrk -t1 -c10 -d15s`, and
# prints the instructions of the whole process (Python included) divided by the requests.
# User space only: the kernel's share (most of the CPU on the Rust path) is not counted.
# Needs valgrind, nginx and wrk (apt-get install -y valgrind nginx-light wrk). With
# KEEP_CALLGRIND=FILE, the callgrind output is kept there.
set -euo pipefail

python=${1:-python}
app=${2:-RustPath}
# valgrind must run the interpreter itself, not a shim script (pyenv's) that execs it.
python=$("$python" -c 'import sys; print(sys.executable)')
bench=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 600); do curl -s -o /dev/null "127.0.0.1:$1/" && return 0; sleep 0.2; done
    echo "nothing answers on port $1" >&2
    return 1
}

# The upstream listens on 100 ports: the first is the static peer, all are the backends of the
# load-balanced apps (bench/lb_apps.py).
ports=$("$python" -c '
import socket
socks = [socket.socket() for _ in range(100)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
upstream=${ports%% *}
listens=$(for p in $ports; do printf 'listen 127.0.0.1:%s; ' "$p"; done)
pool=$(for p in $ports; do printf '127.0.0.1:%s,' "$p"; done)
module=apps
case $app in Pool*|Consistent*) module=lb_apps ;; FiltersRoutes) module=rules_apps ;; esac
cat > "$work/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $work/body;
    proxy_temp_path $work/proxy;
    server { $listens location / { return 200 "hello"; } }
}
EOF
nginx -c "$work/nginx.conf" -e stderr 2>"$work/nginx.log" &
wait_port "$upstream"

port=$(free_port)
(cd "$bench" && FERROXY_BENCH_UPSTREAM=127.0.0.1:$upstream FERROXY_BENCH_POOL=${pool%,} \
    exec valgrind --tool=callgrind \
    --callgrind-out-file="$work/callgrind.out" "$python" -m ferroxy "$module:$app" \
    --listen "127.0.0.1:$port" --threads 1 --no-access-log --log-level warning \
    >"$work/proxy.log" 2>&1) &
proxy=$!
wait_port "$port"
wrk -t1 -c10 -d5s "http://127.0.0.1:$port/" >/dev/null
# The valgrind process is the proxy: its pid is the one callgrind_control addresses.
callgrind_control -z "$proxy" >/dev/null 2>&1
requests=$(wrk -t1 -c10 -d15s "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
callgrind_control -d "$proxy" >/dev/null 2>&1
total=$(awk '/^summary:/ {print $2}' "$work"/callgrind.out.*)
echo "$app ($python): $((total / requests)) instructions per request ($requests requests)"
if [ -n "${KEEP_CALLGRIND:-}" ]; then
    # For callgrind_annotate (function by function; divide by the requests above).
    cp "$work"/callgrind.out.* "$KEEP_CALLGRIND"
    echo "callgrind output: $KEEP_CALLGRIND"
fi
