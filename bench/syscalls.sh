#!/usr/bin/env bash
# Syscalls per request of a running proxy: strace -c attached after a warm-up, under
# `wrk -t1 -c10` (the counts, not strace's timings, are the figure: strace slows the proxy).
#
#   bench/syscalls.sh PYTHON APP       # APP from bench/apps.py, e.g. AsyncHook
#
# Needs strace, nginx and wrk.
set -u
py=$1; app=$2
work=$(mktemp -d)
up=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > $work/nginx.conf <<EOF2
worker_processes 1; daemon off; pid $work/nginx.pid; error_log $work/e.log warn;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $work/b; proxy_temp_path $work/p;
server { listen 127.0.0.1:$up; location / { return 200 "hello"; } } }
EOF2
nginx -c $work/nginx.conf -e stderr 2>/dev/null &
ng=$!
cd "$(dirname "$0")"
FERROXY_BENCH_UPSTREAM=127.0.0.1:$up $py -m ferroxy apps:$app --listen 127.0.0.1:$port --threads 1 --no-access-log --log-level warning >/dev/null 2>&1 &
px=$!
for i in $(seq 100); do curl -s -o /dev/null 127.0.0.1:$port/ && break; sleep 0.2; done
wrk -t1 -c10 -d3s http://127.0.0.1:$port/ >/dev/null
timeout -s INT 12 strace -c -f -p $px -o $work/st.txt &
st=$!
sleep 1
req=$(wrk -t1 -c10 -d8s http://127.0.0.1:$port/ | awk '/requests in/ {print $1}')
wait $st
calls=$(awk '/total/ {print $4}' $work/st.txt)
echo "$app $py: $req requests, $calls syscalls, $(( calls * 100 / req )) /100 per request"
head -12 $work/st.txt
kill $px $ng 2>/dev/null; sleep 1; rm -rf $work
