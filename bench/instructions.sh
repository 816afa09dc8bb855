#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: nginx (key map + limit_req),
# tollgate on its embedded store and tollgate on Redis, each forwarding to the same upstream (Redis's
# own instructions are not counted: it runs outside valgrind). Instruction counts do not
# depend on what else the machine is doing, so they judge a change where timings on a shared 2-core
# box cannot. The kernel's share (the loopback TCP both sides pay alike) is not counted.
#
#   bench/instructions.sh [--requests N] [--keep DIR] [--only TEXT] [--profile NAME]
#
# --only TEXT counts only the targets whose label contains TEXT ("HTTP/2", "tollgate", …).
# --keep DIR copies each target's callgrind profile to DIR (LABEL.callgrind), for callgrind_annotate.
# --profile profiling builds tollgate with line tables (the same code as release), so
# `callgrind_annotate --auto=yes` can tell which lines the instructions go to.
#
# Each target starts under valgrind, takes 200 warm-up requests, has its counters zeroed, serves N
# keyed requests over 4 keep-alive connections (bench/keepalive.py), and has its counters dumped.
# "tollgate decision (verify)" answers the same requests as the decision endpoint for another proxy.
# "…, customer's key" serve the same key as one customer's in a plan that shares limits by customer;
# "…, credits key" the same key holding prepaid credits.
# The last four targets do the same job over TLS 1.3: HTTP/1.1, then HTTP/2 (h2load).
# Note: under valgrind, SHA-256 runs its portable code (valgrind does not emulate the SHA extensions
# the native build uses), which adds ~3.4k instructions to tollgate's count.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=4000
KEEP=
ONLY=
while [ $# -gt 0 ]; do
    case "$1" in
        --requests) REQUESTS=$2; shift 2 ;;
        --keep) KEEP=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --profile) PROFILE=$2; shift 2 ;;
        *) echo "usage: bench/instructions.sh [--requests N] [--keep DIR] [--only TEXT] [--profile NAME]" >&2; exit 64 ;;
    esac
done

. bench/lib.sh
require nginx redis-server valgrind callgrind_control callgrind_annotate python3 cargo openssl h2load
setup
tls_cert "$WORK"

UP=$(free_port)
upstream_config "$UP" >"$WORK/up.conf"
nginx -c "$WORK/up.conf" -p "$WORK" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$UP"

# drive URL N: N keyed requests over 4 keep-alive connections: HTTP/1.1 (bench/keepalive.py), or with
# CLIENT=h2load HTTP/2 (one stream at a time on each connection, so the count is per request, as above).
CLIENT=keepalive
drive() {
    if [ "$CLIENT" = h2load ]; then
        h2load -n "$2" -c4 -m1 -H "x-api-key: $KEY" "$1" >"$WORK/h2load.out"
        grep -q " $2 succeeded" "$WORK/h2load.out" || { cat "$WORK/h2load.out" >&2; exit 1; }
    else
        python3 bench/keepalive.py "$1" "$KEY" --requests "$2" --cafile "$WORK/cert.pem"
    fi
}

# count LABEL PORT COMMAND...: runs COMMAND under callgrind and prints LABEL and instructions/request.
# With SCHEME=https the requests go over TLS 1.3, trusting $WORK/cert.pem.
SCHEME=http
count() {
    local label=$1 port=$2; shift 2
    [[ "$label" == *"$ONLY"* ]] || return 0
    local file=${label//[ \/]/-}
    local url="$SCHEME://127.0.0.1:$port/x"
    valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" "$@" >"$WORK/$file.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    drive "$url" 200
    callgrind_control -z "$pid" >/dev/null 2>&1
    drive "$url" "$REQUESTS"
    callgrind_control -d "$pid" >/dev/null 2>&1
    local total
    total=$(callgrind_annotate "$WORK/cg.$pid.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    kill "$pid"; wait "$pid" 2>/dev/null || true
    if [ -n "$KEEP" ]; then
        mkdir -p "$KEEP"
        cp "$WORK/cg.$pid.1" "$KEEP/$file.callgrind"
    fi
    printf '%-34s %12d\n' "$label" $((total / REQUESTS))
}

PORT=$(free_port)
printf '"%s" k42;\n' "$KEY" >"$WORK/keys.map"
nginx_auth_config "$PORT" "$WORK/keys.map" 1000000r/s 1000000 "$WORK" "master_process off;" >"$WORK/nginx.conf"
printf '%-34s %12s\n' target "instr/request"
count "nginx key map + limit_req" "$PORT" nginx -c "$WORK/nginx.conf" -p "$WORK"

PORT=$(free_port)
tollgate_config "$PORT" "{ sqlite: $WORK/tollgate.db }" bench 1000000000 100000000 "$KEY" >"$WORK/tollgate.yaml"
count "tollgate embedded" "$PORT" "$TOLLGATE" serve --config "$WORK/tollgate.yaml"

RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$RPORT"
PORT=$(free_port)
tollgate_config "$PORT" "{ redis: { url: \"redis://127.0.0.1:$RPORT\" } }" bench 1000000000 100000000 "$KEY" >"$WORK/tollgate-redis.yaml"
count "tollgate on Redis" "$PORT" "$TOLLGATE" serve --config "$WORK/tollgate-redis.yaml"

# The same key as one customer's, in a plan that shares limits by customer (limitsShareBy): what the
# feature costs the keys that use it, on each store.
by_customer() {
    sed -e 's/^  - name: bench$/&\n    limitsShareBy: customerId/' \
        -e 's/usagePlans: \[bench\] }/customerId: acme, usagePlans: [bench] }/'
}
PORT=$(free_port)
tollgate_config "$PORT" "{ sqlite: $WORK/tollgate-customer.db }" bench 1000000000 100000000 "$KEY" | by_customer >"$WORK/tollgate-customer.yaml"
grep -q "customerId: acme" "$WORK/tollgate-customer.yaml"
count "tollgate embedded, customer's key" "$PORT" "$TOLLGATE" serve --config "$WORK/tollgate-customer.yaml"
PORT=$(free_port)
tollgate_config "$PORT" "{ redis: { url: \"redis://127.0.0.1:$RPORT\" } }" bench 1000000000 100000000 "$KEY" | by_customer >"$WORK/tollgate-redis-customer.yaml"
count "tollgate on Redis, customer's key" "$PORT" "$TOLLGATE" serve --config "$WORK/tollgate-redis-customer.yaml"

# The same key holding prepaid credits (more than the run spends): what spending them costs.
with_credits() {
    sed -e 's/usagePlans: \[bench\] }/usagePlans: [bench], credits: { balance: 1000000000 } }/'
}
PORT=$(free_port)
tollgate_config "$PORT" "{ sqlite: $WORK/tollgate-credits.db }" bench 1000000000 100000000 "$KEY" | with_credits >"$WORK/tollgate-credits.yaml"
grep -q "credits:" "$WORK/tollgate-credits.yaml"
count "tollgate embedded, credits key" "$PORT" "$TOLLGATE" serve --config "$WORK/tollgate-credits.yaml"

# The decision endpoint (forward-auth): the same keyed requests asked about, in Envoy's convention
# (the request's own method and path), answered 200 without being forwarded.
PORT=$(free_port)
VPORT=$(free_port)
{
    tollgate_config "$PORT" "{ sqlite: $WORK/tollgate-verify.db }" bench 1000000000 100000000 "$KEY"
    printf 'verify: { listen: 127.0.0.1:%s, proxy: envoy }\n' "$VPORT"
} >"$WORK/tollgate-verify.yaml"
count "tollgate decision (verify)" "$VPORT" "$TOLLGATE" serve --config "$WORK/tollgate-verify.yaml"

# The same job over TLS 1.3 (one ECDSA P-256 certificate, keep-alive: record encryption, not handshakes),
# over HTTP/1.1 and then over HTTP/2 on the same listeners (ALPN h2; h2load, one stream at a time).
SCHEME=https
for CLIENT in keepalive h2load; do
    proto="TLS 1.3"
    [ "$CLIENT" = h2load ] && proto="HTTP/2"
    PORT=$(free_port)
    nginx_auth_config "$PORT" "$WORK/keys.map" 1000000r/s 1000000 "$WORK" "master_process off;" "$WORK" >"$WORK/nginx-$CLIENT.conf"
    count "nginx key map + limit_req, $proto" "$PORT" nginx -c "$WORK/nginx-$CLIENT.conf" -p "$WORK"

    PORT=$(free_port)
    tollgate_config "$PORT" "{ sqlite: $WORK/tollgate-$CLIENT.db }" bench 1000000000 100000000 "$KEY" "$WORK" >"$WORK/tollgate-$CLIENT.yaml"
    count "tollgate embedded, $proto" "$PORT" "$TOLLGATE" serve --config "$WORK/tollgate-$CLIENT.yaml"
done
