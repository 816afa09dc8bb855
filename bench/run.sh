#!/usr/bin/env bash
# The load benchmark: tollgate against nginx and HAProxy doing the same job (check the key, rate-limit
# per key, proxy with keep-alive), and against the upstream alone, measured in one run on one machine.
#
#   bench/run.sh [--reps N] [--duration SECONDS] [--keys "1000 1000000"] [--no-accuracy]
#                [--only "LABEL ..."] [--profile NAME]
#
# --only runs just the targets whose label contains one of the words (e.g. "tollgate/1000
# tollgate-redis/1000 nginx-auth/1000"); --profile picks the cargo profile (bench/instructions.sh).
#
# Layout (steady numbers on 2 cores): wrk alone on CPU 0; the system under test and the upstream on
# CPU 1; one worker for nginx and HAProxy, a tokio runtime that sees one CPU for tollgate; keep-alive on
# both sides; a warm-up before counting; repetitions interleaved (A B C A B C …), medians reported.
# The TLS targets terminate TLS 1.3 with one ECDSA P-256 certificate, nginx and tollgate alike, on
# keep-alive connections (`*-tls`) and with a new connection, so a handshake, per request (`*-tls-new`,
# the client sends `Connection: close`); their ratio is against nginx doing the same. The HTTP/2 targets
# (`*-h2`) are the same TLS listeners driven by h2load (32 connections, 10 streams each); h2load reports
# no percentiles, so their p50 column holds its mean and p99 is blank. `tollgate-verify-behind-nginx` is
# nginx proxying with auth_request to tollgate's decision endpoint (forward-auth; both on CPU 1), against
# nginx doing the job alone. `tollgate-durable` stores each admitted request's count before answering
# (`store: { durability: request }`).
# Installs nothing: it says what is missing. Everything listens on 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=3
DURATION=5
KEYSETS="1000 1000000"
CONNS=32
ACCURACY=1
ONLY=
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --keys) KEYSETS=$2; shift 2 ;;
        --no-accuracy) ACCURACY=0; shift ;;
        --only) ONLY=$2; shift 2 ;;
        --profile) PROFILE=$2; shift 2 ;;
        *) echo "usage: bench/run.sh [--reps N] [--duration SECONDS] [--keys \"1000 1000000\"] [--no-accuracy] [--only \"LABEL ...\"] [--profile NAME]" >&2; exit 64 ;;
    esac
done

. bench/lib.sh
require nginx haproxy wrk h2load redis-server taskset python3 cargo openssl
setup
tls_cert "$WORK"

# start NAME COMMAND...: runs on CPU 1, remembers the pid as PID_<NAME>.
start() {
    local name=$1; shift
    taskset -c 1 "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    printf -v "PID_$name" '%s' "$!"
}

# The upstream: a static responder, identical for every target.
UP=$(free_port)
mkdir -p "$WORK/up"
upstream_config "$UP" >"$WORK/up/nginx.conf"
start upstream nginx -c "$WORK/up/nginx.conf" -p "$WORK/up"
wait_port "$UP"

# Key files for every key-set size: nginx map, HAProxy map, and a tollgate SQLite store.
make_keys() {
    local n=$1 dir="$WORK/keys-$n"
    mkdir -p "$dir"
    python3 - "$n" "$dir" <<'PY'
import sys
n, d = int(sys.argv[1]), sys.argv[2]
with open(f"{d}/nginx.map", "w") as a, open(f"{d}/haproxy.map", "w") as b:
    for i in range(n):
        v = f"benchmarkKeyValue{i:023d}"
        a.write(f'"{v}" k{i};\n')
        b.write(f"{v} k{i}\n")
PY
    sqlite_keys "$n" "$dir"
    # A Redis holding the same keys, for the cluster-mode target (started once per key set).
    local rport; rport=$(free_port)
    start "redis_$n" redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no
    wait_port "$rport"
    "$TOLLGATE" migrate --from "sqlite:$dir/tollgate.db" --to "redis://127.0.0.1:$rport" >/dev/null
    printf -v "REDIS_PORT_$n" '%s' "$rport"
}

# Each target: a function that starts the server on port $1 with keys $2 and prints its pid.
target_nginx_proxy() {
    local port=$1 dir="$WORK/nginx-proxy-$1"; mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $dir/nginx.pid; error_log $dir/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  upstream up { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 10000000; }
  server { listen 127.0.0.1:$port;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
    start "sut" nginx -c "$dir/nginx.conf" -p "$dir"
}
target_nginx_auth() {
    local port=$1 keys=$2 dir="$WORK/nginx-auth-$1"; mkdir -p "$dir"
    nginx_auth_config "$port" "$WORK/keys-$keys/nginx.map" 1000000r/s 1000000 "$dir" >"$dir/nginx.conf"
    start "sut" nginx -c "$dir/nginx.conf" -p "$dir"
}
target_haproxy_auth() {
    local port=$1 keys=$2 dir="$WORK/haproxy-$1"; mkdir -p "$dir"
    cat >"$dir/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend fe
  bind 127.0.0.1:$port
  http-request deny deny_status 403 unless { req.hdr(x-api-key),map($WORK/keys-$keys/haproxy.map) -m found }
  http-request track-sc0 req.hdr(x-api-key) table perkey
  http-request deny deny_status 429 if { sc_http_req_rate(0) gt 1000000000 }
  default_backend be
backend perkey
  stick-table type string len 64 size 2m expire 60s store http_req_rate(1s)
backend be
  http-reuse always
  server up 127.0.0.1:$UP
CONF
    start "sut" haproxy -f "$dir/haproxy.cfg"
}
target_tollgate() {
    local port=$1 keys=$2 dir="$WORK/tollgate-$1"; mkdir -p "$dir"
    sed -e "s|listen: 127.0.0.1:0|listen: 127.0.0.1:$port|" "$WORK/keys-$keys/tollgate.yaml" >"$dir/tollgate.yaml"
    start "sut" "$TOLLGATE" serve --config "$dir/tollgate.yaml"
}
# tollgate with `durability: request`: each admitted request's count is stored (group commit) before
# its response is sent.
target_tollgate_durable() {
    local port=$1 keys=$2 dir="$WORK/tollgate-durable-$1"; mkdir -p "$dir"
    sed -e "s|listen: 127.0.0.1:0|listen: 127.0.0.1:$port|" \
        -e "s|store: { sqlite: \(.*\) }|store: { sqlite: \1, durability: request }|" \
        "$WORK/keys-$keys/tollgate.yaml" >"$dir/tollgate.yaml"
    grep -q "durability: request" "$dir/tollgate.yaml"
    start "sut" "$TOLLGATE" serve --config "$dir/tollgate.yaml"
}
target_nginx_tls() {
    local port=$1 keys=$2 dir="$WORK/nginx-tls-$1"; mkdir -p "$dir"
    nginx_auth_config "$port" "$WORK/keys-$keys/nginx.map" 1000000r/s 1000000 "$dir" "" "$WORK" >"$dir/nginx.conf"
    start "sut" nginx -c "$dir/nginx.conf" -p "$dir"
}
target_tollgate_tls() {
    local port=$1 keys=$2 dir="$WORK/tollgate-tls-$1"; mkdir -p "$dir"
    sed -e "s|^listen: 127.0.0.1:0|tls: { listen: 127.0.0.1:$port, minVersion: \"1.3\", certificates: [ { cert: $WORK/cert.pem, key: $WORK/key.pem } ] }|" \
        "$WORK/keys-$keys/tollgate.yaml" >"$dir/tollgate.yaml"
    start "sut" "$TOLLGATE" serve --config "$dir/tollgate.yaml"
}
# nginx in front, tollgate deciding (auth_request to its decision endpoint): the forward-auth setup.
target_tollgate_verify() {
    local port=$1 keys=$2 dir="$WORK/tollgate-verify-$1" vport; mkdir -p "$dir"
    vport=$(free_port)
    sed -e "s|listen: 127.0.0.1:0|listen: 127.0.0.1:$(free_port)\nverify: { listen: 127.0.0.1:$vport, proxy: nginx }|" \
        "$WORK/keys-$keys/tollgate.yaml" >"$dir/tollgate.yaml"
    start "decider" "$TOLLGATE" serve --config "$dir/tollgate.yaml"
    wait_port "$vport"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $dir/nginx.pid; error_log $dir/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  upstream up { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 10000000; }
  upstream decider { server 127.0.0.1:$vport; keepalive 128; keepalive_requests 10000000; }
  server { listen 127.0.0.1:$port;
    location / { auth_request /_tollgate; error_page 403 = @refused;
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location = /_tollgate { internal; proxy_pass http://decider; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_pass_request_body off; proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI \$request_uri; proxy_set_header X-Original-Method \$request_method; }
    location @refused { return 403 '{"message":"Forbidden"}'; } } }
CONF
    start "sut" nginx -c "$dir/nginx.conf" -p "$dir"
}
target_nginx_h2() { target_nginx_tls "$@"; }
target_tollgate_h2() { target_tollgate_tls "$@"; }
target_tollgate_redis() {
    local port=$1 keys=$2 dir="$WORK/tollgate-redis-$1"; mkdir -p "$dir"
    local var="REDIS_PORT_$keys" rport
    rport=${!var}
    printf -v PID_redis '%s' "$(eval echo "\$PID_redis_$keys")"
    sed -e "s|listen: 127.0.0.1:0|listen: 127.0.0.1:$port|" \
        -e "s|store: { sqlite: .* }|store: { redis: { url: \"redis://127.0.0.1:$rport\", timeout: 200ms } }|" \
        "$WORK/keys-$keys/tollgate.yaml" >"$dir/tollgate.yaml"
    start "sut" "$TOLLGATE" serve --config "$dir/tollgate.yaml"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# CPU of the given processes and their children (nginx's and HAProxy's workers).
cpu_ticks_all() {
    local t=0 p c
    for p in "$@"; do
        t=$((t + $(cpu_ticks "$p")))
        for c in $(pgrep -P "$p" || true); do t=$((t + $(cpu_ticks "$c"))); done
    done
    echo "$t"
}
TICK=$(getconf CLK_TCK)
# rss_kb PID...: resident kilobytes of the processes and their children.
rss_kb() {
    local t=0 p c
    for p in "$@"; do
        for c in "$p" $(pgrep -P "$p" || true); do
            t=$((t + $(awk '/^VmRSS/ {print $2}' "/proc/$c/status" 2>/dev/null || echo 0)))
        done
    done
    echo "$t"
}

# measure LABEL KIND KEYS [close]: one run; appends "label rps p50 p99 cpu_us rss_kb" to
# $WORK/results. With `close`, every request asks for its connection to be closed after it.
measure() {
    local label=$1 kind=$2 keys=$3 close=${4:-} port url pids
    if [ "$kind" = upstream ]; then
        port=$UP; pids=("$PID_upstream")
    else
        port=$(free_port)
        "target_$kind" "$port" "$keys"
        wait_port "$port"
        pids=("$PID_sut")
        [ "$kind" = tollgate_redis ] && pids+=("$PID_redis")
        [ "$kind" = tollgate_verify ] && pids+=("$PID_decider")
    fi
    url="http://127.0.0.1:$port/x"
    case "$kind" in *_tls | *_h2) url="https://127.0.0.1:$port/x" ;; esac
    local fields=(-H "x-api-key: $KEY")
    [ "$close" = close ] && fields+=(-H "Connection: close")
    local check; check=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$WORK/cert.pem" -H "x-api-key: $KEY" "$url")
    [ "$check" = 200 ] || { echo "$label answered $check" >&2; cat "$WORK/sut.log" >&2 || true; exit 1; }
    local rps requests p50 p99 before after out
    case "$kind" in
    *_h2)
        local h2=(-t1 -c"$CONNS" -m10 "${fields[@]}")
        taskset -c 0 h2load "${h2[@]}" -D 1 "$url" >/dev/null   # warm-up
        before=$(cpu_ticks_all "${pids[@]}")
        out=$(taskset -c 0 h2load "${h2[@]}" -D "$DURATION" "$url")
        after=$(cpu_ticks_all "${pids[@]}")
        grep -q ' 0 failed, 0 errored' <<<"$out" || { echo "$label: h2load saw failures" >&2; echo "$out" >&2; exit 1; }
        rps=$(awk '/^finished in/ {print $4}' <<<"$out")
        requests=$(awk '/^requests:/ {print $8}' <<<"$out")
        p50=$(awk '/^time for request:/ {print $6}' <<<"$out")
        p99=-
        ;;
    *)
        taskset -c 0 wrk -t1 -c"$CONNS" -d1s "${fields[@]}" "$url" >/dev/null   # warm-up
        before=$(cpu_ticks_all "${pids[@]}")
        out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${fields[@]}" "$url")
        after=$(cpu_ticks_all "${pids[@]}")
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        requests=$(awk '/requests in/ {print $1}' <<<"$out")
        p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        ;;
    esac
    local cpu_us; cpu_us=$(python3 -c "print(f'{($after - $before) / $TICK * 1e6 / max($requests, 1):.1f}')")
    echo "$label $rps $p50 $p99 $cpu_us $(rss_kb "${pids[@]}")" >>"$WORK/results"
    if [ "$kind" != upstream ]; then
        kill "$PID_sut"; wait "$PID_sut" 2>/dev/null || true
    fi
    if [ "$kind" = tollgate_verify ]; then
        kill "$PID_decider"; wait "$PID_decider" 2>/dev/null || true
    fi
}

TARGETS=()
for n in $KEYSETS; do
    echo "preparing $n keys…" >&2
    make_keys "$n"
done
first=${KEYSETS%% *}
TARGETS+=("upstream-alone upstream $first" "nginx-proxy nginx_proxy $first")
for n in $KEYSETS; do
    TARGETS+=("nginx-auth/$n nginx_auth $n" "haproxy-auth/$n haproxy_auth $n" "tollgate/$n tollgate $n" "tollgate-redis/$n tollgate_redis $n")
done
TARGETS+=("tollgate-durable/$first tollgate_durable $first")
TARGETS+=("nginx-tls/$first nginx_tls $first" "tollgate-tls/$first tollgate_tls $first"
    "nginx-tls-new/$first nginx_tls $first close" "tollgate-tls-new/$first tollgate_tls $first close"
    "nginx-h2/$first nginx_h2 $first" "tollgate-h2/$first tollgate_h2 $first"
    "tollgate-verify-behind-nginx/$first tollgate_verify $first")

# selected LABEL: whether --only lets LABEL run.
selected() {
    [ -z "$ONLY" ] && return 0
    local word
    for word in $ONLY; do [[ "$1" == *"$word"* ]] && return 0; done
    return 1
}

: >"$WORK/results"
for rep in $(seq 1 "$REPS"); do
    for t in "${TARGETS[@]}"; do
        # shellcheck disable=SC2086
        set -- $t
        selected "$1" || continue
        echo "rep $rep/$REPS: $1" >&2
        measure "$1" "$2" "$3" "${4:-}"
    done
done

python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, rps, p50, p99, cpu, rss = line.split()
    rows.setdefault(label, []).append((float(rps), p50, p99, float(cpu), int(rss)))
def ms(v):
    if v == "-":
        return float("nan")
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)
def med(label):
    runs = rows[label]
    return (statistics.median(r[0] for r in runs), statistics.median(ms(r[1]) for r in runs),
            statistics.median(ms(r[2]) for r in runs), statistics.median(r[3] for r in runs),
            statistics.median(r[4] for r in runs))
# Each target against nginx doing the same: plain targets against nginx-auth, TLS ones against nginx
# over TLS with the same kind of connections.
def kind(label):
    for k in ("-tls-new", "-tls", "-h2"):
        if label.split("/")[0].endswith(k):
            return "nginx" + k
    return "nginx-auth"
base = {}
for label in rows:
    if label.startswith("nginx-") and "/" in label:
        base[tuple(label.split("/"))] = med(label)[0]
print(f"{'target':<24} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} {'RSS MB':>8} {'vs nginx':>14}")
for label in rows:
    rps, p50, p99, cpu, rss = med(label)
    n = label.split("/")[1] if "/" in label else min(k[1] for k in base)
    b = base.get((kind(label), n))
    ratio = f"{rps / b:.2f}x" if b else "-"
    print(f"{label:<24} {rps:>10.0f} {p50:>8.3f} {p99:>8.3f} {cpu:>11.1f} {rss / 1024:>8.1f} {ratio:>14}")
# Resident bytes per key: the growth between the smallest and the largest key set, per added key.
sets = sorted({int(l.split("/")[1]) for l in rows if "/" in l})
if len(sets) > 1:
    lo, hi = sets[0], sets[-1]
    print()
    for target in ("nginx-auth", "haproxy-auth", "tollgate", "tollgate-redis"):
        a, b = f"{target}/{lo}", f"{target}/{hi}"
        if a in rows and b in rows:
            per_key = (med(b)[4] - med(a)[4]) * 1024 / (hi - lo)
            print(f"{target:<24} resident bytes per key ({lo} to {hi} keys): {per_key:.0f}")
PY

[ "$ACCURACY" = 1 ] || exit 0

# The accuracy case: one key limited to 100 req/s with a burst of 50, driven at 2000 req/s for 5 s
# (paced, by bench/accuracy.py on CPU 0). A token bucket admits 50 + 100 x 5 = 550.
echo >&2
echo "accuracy: 100 req/s, burst 50, driven at 2000 req/s for 5 s" >&2
ACC_KEY=accuracyKeyValue0123456789
accuracy_run() { taskset -c 0 python3 bench/accuracy.py "$1" "$ACC_KEY" --rate "${2:-2000}" --seconds 5 | awk '{print $1}'; }
acc_results=()

dir="$WORK/acc-nginx"; mkdir -p "$dir"; port=$(free_port)
printf '"%s" acc;\n' "$ACC_KEY" >"$dir/keys.map"
nginx_auth_config "$port" "$dir/keys.map" 100r/s 50 "$dir" >"$dir/nginx.conf"
start sut nginx -c "$dir/nginx.conf" -p "$dir"; wait_port "$port"
acc_results+=("nginx limit_req (rate 100r/s, burst 50 nodelay): $(accuracy_run "http://127.0.0.1:$port/x")")
kill "$PID_sut"; wait "$PID_sut" 2>/dev/null || true

dir="$WORK/acc-haproxy"; mkdir -p "$dir"; port=$(free_port)
printf '%s acc\n' "$ACC_KEY" >"$dir/keys.map"
cat >"$dir/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:$port
  http-request deny deny_status 403 unless { req.hdr(x-api-key),map($dir/keys.map) -m found }
  http-request track-sc0 req.hdr(x-api-key) table perkey
  # gpc0 counts accepted requests only (http_req_rate would count refused ones and starve the client).
  http-request deny deny_status 429 if { sc0_gpc0_rate gt 99 }
  http-request sc-inc-gpc0(0)
  default_backend be
backend perkey
  stick-table type string len 64 size 1k expire 10s store gpc0,gpc0_rate(1s)
backend be
  server up 127.0.0.1:$UP
CONF
start sut haproxy -f "$dir/haproxy.cfg"; wait_port "$port"
acc_results+=("HAProxy gpc0_rate (100 per second): $(accuracy_run "http://127.0.0.1:$port/x")")
kill "$PID_sut"; wait "$PID_sut" 2>/dev/null || true

dir="$WORK/acc-tollgate"; mkdir -p "$dir"; port=$(free_port)
tollgate_config "$port" "{ sqlite: $dir/t.db }" acc 100 50 "$ACC_KEY" >"$dir/tollgate.yaml"
start sut "$TOLLGATE" serve --config "$dir/tollgate.yaml"; wait_port "$port"
acc_results+=("tollgate embedded: $(accuracy_run "http://127.0.0.1:$port/x")")
kill "$PID_sut"; wait "$PID_sut" 2>/dev/null || true

dir="$WORK/acc-cluster"; mkdir -p "$dir"; rport=$(free_port)
start accredis redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no; wait_port "$rport"
p1=$(free_port); p2=$(free_port)
tollgate_config "$p1" "{ redis: { url: \"redis://127.0.0.1:$rport\", timeout: 200ms } }" acc 100 50 "$ACC_KEY" >"$dir/a.yaml"
tollgate_config "$p2" "{ redis: { url: \"redis://127.0.0.1:$rport\", timeout: 200ms } }" acc 100 50 "$ACC_KEY" >"$dir/b.yaml"
start sut "$TOLLGATE" serve --config "$dir/a.yaml"; wait_port "$p1"; a_pid=$PID_sut
start sut "$TOLLGATE" serve --config "$dir/b.yaml"; wait_port "$p2"; b_pid=$PID_sut
accuracy_run "http://127.0.0.1:$p1/x" 1000 >"$dir/a.out" &
client_a=$!
accuracy_run "http://127.0.0.1:$p2/x" 1000 >"$dir/b.out" &
client_b=$!
# Only the two clients: a bare `wait` would also wait for the servers.
wait "$client_a" "$client_b"
acc_results+=("two tollgate instances on one Redis (1000 req/s each): $(( $(cat "$dir/a.out") + $(cat "$dir/b.out") ))")
kill "$a_pid" "$b_pid" "$PID_accredis" 2>/dev/null || true

echo
echo "accuracy (admitted of ~10000 requests; a token bucket admits 550):"
for r in "${acc_results[@]}"; do echo "  $r"; done
