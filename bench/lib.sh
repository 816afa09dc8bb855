# Shared by bench/run.sh and bench/instructions.sh (sourced, from the project root): the tool check,
# the release build, a work directory whose servers are stopped on exit, free ports, the upstream and
# the tollgate config both scripts drive.

# The key every benchmark request carries.
KEY=benchmarkKeyValue00000000000000000000042

# require TOOL...: exits naming whatever is missing (installs nothing).
require() {
    local missing=() tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "missing: ${missing[*]}" >&2
        echo "on Debian: apt-get install nginx-light haproxy wrk nghttp2-client redis-server valgrind util-linux python3" >&2
        exit 1
    fi
}

# Builds tollgate, makes $WORK, and stops every pid added to PIDS when the script exits.
# PROFILE (default release) picks the cargo profile: `profiling` is release with line tables.
setup() {
    local profile=${PROFILE:-release}
    cargo build --profile "$profile" -q -p tollgate
    TOLLGATE=${CARGO_TARGET_DIR:-$PWD/target}/$profile/tollgate
    WORK=$(mktemp -d)
    PIDS=()
    trap cleanup EXIT
}
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    # Up to two minutes: a gateway loading a million keys takes a while.
    for _ in $(seq 1 2400); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    return 1
}

# upstream_config PORT: the static responder every target forwards to (nginx `return 200`).
upstream_config() {
    cat <<CONF
worker_processes 1; daemon off; pid $WORK/up.pid; error_log $WORK/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:$1; location / { return 200 "ok"; } } }
CONF
}

# tls_cert DIR: an ECDSA P-256 certificate for 127.0.0.1 and bench.test, self-signed (its own CA), as
# DIR/cert.pem and DIR/key.pem: the one certificate every TLS target serves.
tls_cert() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench.test -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" \
        -keyout "$1/key.pem" -out "$1/cert.pem" >/dev/null 2>&1
}

# tollgate_config PORT STORE PLAN RATE BURST [KEY [CERT_DIR]]: one API proxying everything to the
# upstream on $UP under one keyed route, one plan with that throttle, (given KEY) one key in it, and
# (given CERT_DIR, see tls_cert) HTTPS only, TLS 1.3, on PORT.
tollgate_config() {
    if [ -n "${7:-}" ]; then
        printf 'tls: { listen: 127.0.0.1:%s, minVersion: "1.3", certificates: [ { cert: %s/cert.pem, key: %s/key.pem } ] }\n' "$1" "$7" "$7"
    else
        printf 'listen: 127.0.0.1:%s\n' "$1"
    fi
    cat <<CONF
store: $2
apis:
  - id: bench
    stages: [ { name: prod, basePath: / } ]
    routes:
      - { path: "/{proxy+}", method: ANY, apiKeyRequired: true, upstream: "http://127.0.0.1:$UP" }
usagePlans:
  - name: $3
    apiStages: [ { apiId: bench, stage: prod } ]
    throttle: { rateLimit: $4, burstLimit: $5 }
CONF
    if [ -n "${6:-}" ]; then
        printf 'apiKeys:\n  - { name: %s, value: %s, usagePlans: [%s] }\n' "$3" "$6" "$3"
    fi
}

# nginx_auth_config PORT MAP RATE BURST DIR [MAIN [CERT_DIR]]: nginx doing the job tollgate does:
# x-api-key looked up in MAP (a file of `"value" name;` lines), each key limited by limit_req (RATE such
# as 100r/s, a burst of BURST, 429 beyond), forwarded to the upstream on $UP with keep-alive. MAIN goes
# into the main context (e.g. `master_process off;`). Given CERT_DIR (see tls_cert): HTTPS only, TLS 1.3,
# ALPN offering HTTP/2 and HTTP/1.1 (as tollgate's listener does).
nginx_auth_config() {
    local listen="listen 127.0.0.1:$1;"
    if [ -n "${7:-}" ]; then
        listen="listen 127.0.0.1:$1 ssl http2; ssl_certificate $7/cert.pem; ssl_certificate_key $7/key.pem; ssl_protocols TLSv1.3;"
    fi
    cat <<CONF
worker_processes 1; daemon off; ${6:-} pid $5/nginx.pid; error_log $5/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  map_hash_max_size 4194304; map_hash_bucket_size 128;
  map \$http_x_api_key \$api_client { default ""; include $2; }
  limit_req_zone \$api_client zone=perkey:64m rate=$3;
  upstream up { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 10000000; }
  server { $listen
    location / {
      if (\$api_client = "") { return 403; }
      limit_req zone=perkey burst=$4 nodelay; limit_req_status 429;
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
}

# sqlite_keys N DIR: a tollgate store DIR/tollgate.db (and its config DIR/tollgate.yaml, plan `bench`,
# no throttle to speak of) holding N keys in the plan, the i-th valued benchmarkKeyValue<i, 23 digits>
# (KEY is the 42nd): tollgate creates its schema and the plan, then the keys go in by SQL.
sqlite_keys() {
    local n=$1 dir=$2
    tollgate_config 0 "{ sqlite: $dir/tollgate.db }" bench 1000000000 100000000 >"$dir/tollgate.yaml"
    timeout 10 "$TOLLGATE" serve --config "$dir/tollgate.yaml" >/dev/null 2>&1 &
    local pid=$!
    sleep 1; kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
    python3 - "$n" "$dir/tollgate.db" <<'PY'
import hashlib, sqlite3, sys
n, db = int(sys.argv[1]), sys.argv[2]
c = sqlite3.connect(db)
plan = c.execute("SELECT id FROM usage_plans WHERE name = 'bench'").fetchone()[0]
def rows():
    for i in range(n):
        v = f"benchmarkKeyValue{i:023d}".encode()
        yield (f"k{i:09d}", f"k{i}", hashlib.sha256(v).digest())
c.executemany("INSERT INTO api_keys (id, name, enabled, value_sha256, created_date, last_updated_date) VALUES (?, ?, 1, ?, 0, 0)", rows())
c.executemany("INSERT INTO usage_plan_keys (plan_id, key_id) VALUES (?, ?)", ((plan, f"k{i:09d}") for i in range(n)))
c.commit()
PY
}
