#!/usr/bin/env bash
# The control plane at scale: with N keys (default a million) in one plan, on the embedded store and
# on Redis, how long a start takes, what a key write costs (CreateApiKey + CreateUsagePlanKey through
# the admin API, one after another, while wrk drives the data plane), what the data plane's p99 does
# meanwhile against an idle run, and the resident memory of tollgate (and Redis) over the writes.
#
#   bench/scale.sh [--keys N] [--writes N] [--clients N] [--duration SECONDS] [--stores embedded|redis|both]
#                  [--jwt-names]
#
# A write is a signup: CreateApiKey, then CreateUsagePlanKey, from --clients writers at once (default 1;
# the issue's "10,000 concurrent signups" is --writes 10000 --clients 8). wrk's refused requests
# (non-2xx, socket errors) while writing are counted. --jwt-names adds an API whose JWT authorizer names
# keys by name (AWS's default), so the gateway also keeps a name index that each write changes.
#
# Prints a table per store; asserts nothing (BENCHMARKS.md records the runs). Installs nothing: it
# says what is missing. Everything listens on 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS=1000000
WRITES=100
DURATION=10
STORES=both
CLIENTS=1
JWT_NAMES=
while [ $# -gt 0 ]; do
    case "$1" in
        --keys) KEYS=$2; shift 2 ;;
        --writes) WRITES=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --stores) STORES=$2; shift 2 ;;
        --clients) CLIENTS=$2; shift 2 ;;
        --jwt-names) JWT_NAMES=1; shift ;;
        *) echo "usage: bench/scale.sh [--keys N] [--writes N] [--clients N] [--duration SECONDS] [--stores embedded|redis|both] [--jwt-names]" >&2; exit 64 ;;
    esac
done

. bench/lib.sh
require nginx wrk redis-server redis-cli taskset python3 cargo
python3 -c 'import botocore' 2>/dev/null || { echo "bench/scale.sh needs botocore (pip install botocore) to sign admin calls" >&2; exit 69; }
[ -z "$JWT_NAMES" ] || python3 -c 'import cryptography' 2>/dev/null || { echo "bench/scale.sh --jwt-names needs cryptography (pip install cryptography) to make a JWKS" >&2; exit 69; }
setup

AK=AKIDSCALEBENCH
SK=scale/bench/secret
export TOLLGATE_ADMIN_ACCESS_KEY_ID=$AK TOLLGATE_ADMIN_SECRET_ACCESS_KEY=$SK

UP=$(free_port)
mkdir -p "$WORK/up"
upstream_config "$UP" >"$WORK/up/nginx.conf"
taskset -c 1 nginx -c "$WORK/up/nginx.conf" -p "$WORK/up" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$UP"

echo "making $KEYS keys…" >&2
mkdir -p "$WORK/keys"
sqlite_keys "$KEYS" "$WORK/keys"
PLAN=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"SELECT id FROM usage_plans WHERE name='bench'\").fetchone()[0])" "$WORK/keys/tollgate.db")

if [ -n "$JWT_NAMES" ]; then
    # A JWKS of one P-256 key: the authorizer needs one to start; no token is sent.
    python3 - "$WORK/jwks.json" <<'PY'
import base64, json, sys
from cryptography.hazmat.primitives.asymmetric import ec
n = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
b64 = lambda v: base64.urlsafe_b64encode(v.to_bytes(32, "big")).rstrip(b"=").decode()
json.dump({"keys": [{"kty": "EC", "crv": "P-256", "kid": "bench", "x": b64(n.x), "y": b64(n.y)}]}, open(sys.argv[1], "w"))
PY
fi

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# refused WRK_OUTPUT: the requests wrk did not get a 2xx for (non-2xx answers, socket errors).
refused() { awk '/Non-2xx/ { n += $NF } /Socket errors/ { for (i = 4; i <= NF; i += 2) { v = $i; sub(/,/, "", v); n += v } } END { print n + 0 }' "$1"; }

# p99 of wrk's --latency output, in ms.
wrk_p99() { awk '$1 == "99%" { v = $2; if (v ~ /us$/) { sub(/us/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms/, "", v) } else if (v ~ /s$/) { sub(/s/, "", v); v *= 1000 } print v }' "$1"; }

# start NAME STORE: starts tollgate on STORE with an admin listener (its ports in $port and $aport,
# its pid in $pid), and says how long it took to listen in $start_s.
start() {
    local dir="$WORK/$1" t0 t1
    mkdir -p "$dir"
    port=$(free_port); aport=$(free_port)
    sed -e "s|listen: 127.0.0.1:0|listen: 127.0.0.1:$port|" -e "s|^store: .*|store: $2|" \
        "$WORK/keys/tollgate.yaml" >"$dir/tollgate.yaml"
    printf 'admin: { listen: 127.0.0.1:%s }\n' "$aport" >>"$dir/tollgate.yaml"
    if [ -n "$JWT_NAMES" ]; then
        sed -i "/^usagePlans:/i\\
  - id: jwt\\
    apiKeySource: AUTHORIZER\\
    authorizers: [ { name: partners, jwks: $WORK/jwks.json, usageIdentifierClaim: sub } ]\\
    stages: [ { name: jwt } ]\\
    routes: [ { path: /x, method: GET, apiKeyRequired: true, authorizer: partners, upstream: \"http://127.0.0.1:$UP\" } ]" "$dir/tollgate.yaml"
    fi
    t0=$(date +%s.%N)
    taskset -c 1 "$TOLLGATE" serve --config "$dir/tollgate.yaml" >"$dir/log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    wait_port "$port"
    t1=$(date +%s.%N)
    start_s=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
}

# run NAME STORE: one store's measures.
run() {
    local name=$1 store=$2 dir="$WORK/$1" port aport pid start_s
    start "$name" "$store"
    sleep 2
    local rss0; rss0=$(rss_kb "$pid")

    taskset -c 0 wrk -t1 -c32 -d"${DURATION}s" --latency -H "x-api-key: $KEY" "http://127.0.0.1:$port/x" >"$dir/idle.wrk"
    # Until the writes are done (SIGINT makes wrk report).
    taskset -c 0 wrk -t1 -c32 -d3600s --latency -H "x-api-key: $KEY" "http://127.0.0.1:$port/x" >"$dir/busy.wrk" &
    local wrk=$!
    # Signups (CreateApiKey, then CreateUsagePlanKey), CLIENTS at once, each signed with botocore's SigV4
    # on a kept-alive connection: a signup's time into writes, the RSS every 100 into rss.
    python3 - "$aport" "$PLAN" "$WRITES" "$CLIENTS" "$pid" "$dir" "$AK" "$SK" <<'PY'
import http.client, json, sys, threading, time
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
port, plan, writes, clients, pid, out, ak, sk = sys.argv[1:]
writes, clients, creds = int(writes), int(clients), Credentials(ak, sk)
times, lock, done = [], threading.Lock(), [0]
def rss():
    return next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
def post(conn, path, body):
    req = AWSRequest(method="POST", url=f"http://127.0.0.1:{port}{path}", data=body,
                     headers={"content-type": "application/json"})
    SigV4Auth(creds, "apigateway", "us-east-1").add_auth(req)
    conn.request("POST", path, body=body, headers=dict(req.headers))
    r = conn.getresponse()
    data = r.read()
    if r.status not in (200, 201):
        raise SystemExit(f"{path}: {r.status} {data[:200]!r}")
    return json.loads(data)
def client(c):
    conn = http.client.HTTPConnection("127.0.0.1", int(port))
    for i in range(c, writes, clients):
        t = time.monotonic()
        key = post(conn, "/apikeys", json.dumps({"name": f"signup-{i}", "enabled": True}))
        post(conn, f"/usageplans/{plan}/keys", json.dumps({"keyId": key["id"], "keyType": "API_KEY"}))
        with lock:
            times.append(time.monotonic() - t)
            done[0] += 1
            if done[0] % 100 == 0:
                open(f"{out}/rss", "a").write(rss() + "\n")
started = time.monotonic()
threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(f"{out.rsplit('/', 1)[-1]}: {len(times) / (time.monotonic() - started):.0f} signups a second", file=sys.stderr)
open(f"{out}/writes", "w").write("".join(f"{t}\n" for t in times))
if len(times) != writes:
    raise SystemExit(f"{writes - len(times)} signups failed")
PY
    kill -INT "$wrk" 2>/dev/null || true; wait "$wrk" 2>/dev/null || true
    local rss1; rss1=$(rss_kb "$pid")
    local redis_bytes=0
    if [ -n "${3:-}" ]; then
        redis_bytes=$(redis-cli -p "$3" info memory | awk -F: '/^used_memory:/ {print $2+0}')
    fi
    local rss_1k; rss_1k=$(sed -n 10p "$dir/rss")
    python3 - "$name" "$KEYS" "$start_s" "$rss0" "$rss1" "$dir/writes" "$(wrk_p99 "$dir/idle.wrk")" "$(wrk_p99 "$dir/busy.wrk")" "$redis_bytes" "$(refused "$dir/busy.wrk")" "${rss_1k:-$rss1}" <<'PY'
import statistics, sys
name, keys, start, rss0, rss1, writes, idle, busy, redis, refused, rss_1k = sys.argv[1:]
w = sorted(float(x) * 1000 for x in open(writes))
p = lambda q: w[min(len(w) - 1, int(q * len(w)))]
keys, rss0, rss1, redis, rss_1k = int(keys), int(rss0), int(rss1), int(redis), int(rss_1k)
print(f"| {name} | {keys:,} | {start} s | {p(0.5):.1f} / {p(0.99):.1f} ms | {rss0 / 1024:.0f} → {rss_1k / 1024:.0f} → {rss1 / 1024:.0f} MB ({rss_1k / rss0:.2f}x, {rss1 / rss0:.2f}x) | {idle} → {busy} ms | {refused} | {(rss0 * 1024 + redis) / keys:.0f} |")
PY
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
}

echo "| store | keys | start | signup p50 / p99 ($CLIENTS at once) | tollgate RSS, start → 1,000 writes → end | data-plane p99, idle → writing | refused while writing | bytes per key (tollgate at start + Redis) |"
echo "|---|---|---|---|---|---|---|---|"
[ "$STORES" = redis ] || run embedded "{ sqlite: $WORK/keys/tollgate.db }"
[ "$STORES" = embedded ] && exit 0

RPORT=$(free_port)
taskset -c 1 redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$RPORT"
echo "migrating $KEYS keys to Redis…" >&2
"$TOLLGATE" migrate --from "sqlite:$WORK/keys/tollgate.db" --to "redis://127.0.0.1:$RPORT" >/dev/null
# The first start after a migration reads every record and writes the key pages; the measured one
# starts from them.
start redis-first "{ redis: { url: \"redis://127.0.0.1:$RPORT\" } }"
echo "redis, first start after the migration (no key pages yet): $start_s s" >&2
kill "$pid"; wait "$pid" 2>/dev/null || true
run redis "{ redis: { url: \"redis://127.0.0.1:$RPORT\" } }" "$RPORT"
