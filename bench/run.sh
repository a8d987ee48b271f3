#!/usr/bin/env bash
# Portcullis benchmark harness: Portcullis against nginx, HAProxy and Caddy on
# one machine, same upstream, same certificate, same pinning.  See
# bench/README.md for the cases and the fairness rules.
#
#   bench/run.sh            # full run (BENCH_DURATION=10s, 3 reps, c=64 and 256)
#   bench/run.sh --quick    # short smoke run (3s runs, 3 reps, c=64)
#
# Environment (all optional):
#   BENCH_DURATION=10s      length of one measured wrk run
#   BENCH_REPS=3            repetitions (runs are interleaved A B A B; >= 3)
#   BENCH_CONNS="64 256"    concurrencies
#   BENCH_WARMUP=2s         one warm-up run per case before the first rep
#   BENCH_QUICK=1           same as --quick
#   BENCH_ONLY=REGEX        only the cases whose name matches (nginx-tls is
#                           always kept: every ratio is taken against it);
#                           BENCH_ONLY=grafana- : the end-to-end cases only
#   BENCH_PEERS_ONLY=1      skip the Portcullis cases (no cargo build)
#   BENCH_TOKENS=2000       distinct service-account tokens for cold / L2 cases
#   BENCH_L2_L1_ENTRIES=64  L1 size of the gateway measured on L2 hits
#   BENCH_MEM_IDENTITIES=100000  identities cached by the memory case's gateway
#   BENCH_PC_TTL=1h         Portcullis cache TTL (long, so nothing expires mid-run)
#   BENCH_SERVER_CPU=0      core for every server (upstream, proxy, stand-in, redis)
#   BENCH_CLIENT_CPU=1      core for the load generator
#   BENCH_PORT_BASE=23000   loopback ports used: BASE+80 .. BASE+492 (must be free)
#   BENCH_SKIP_INSTALL=1    do not apt-get anything
#   BENCH_SKIP_BUILD=1      use the existing release binaries
#   BENCH_H2=1              also run h2load (HTTP/2) for nginx-tls and portcullis-bearer
#   BENCH_MAX_STEAL=2       a run during which the hypervisor took more than
#                           this % of the two cores (steal time) is repeated,
#   BENCH_STEAL_RETRIES=4   up to this many times; the quietest attempt counts
#   BENCH_HOLD=1            after the sanity checks, print each case's URL and
#                           credential and keep every server up until Ctrl-C
#                           (for profiling by hand); no runs, no table
#   BENCH_CALLGRIND=1       after the sanity checks, count instructions per
#                           request under valgrind's callgrind for nginx's TLS
#                           proxy and Portcullis Bearer / Basic (see
#                           bench/callgrind.sh), write callgrind.md; no wrk table
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
export PATH="/usr/local/sbin:/usr/sbin:/sbin:$PATH"

QUICK=${BENCH_QUICK:-0}
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done
if [[ "$QUICK" == 1 ]]; then
  DURATION=${BENCH_DURATION:-3s}; WARMUP=${BENCH_WARMUP:-1s}
  CONNS=${BENCH_CONNS:-64}; TOKENS=${BENCH_TOKENS:-600}
else
  DURATION=${BENCH_DURATION:-10s}; WARMUP=${BENCH_WARMUP:-2s}
  CONNS=${BENCH_CONNS:-64 256}; TOKENS=${BENCH_TOKENS:-2000}
fi
REPS=${BENCH_REPS:-3}
ONLY=${BENCH_ONLY:-}
wanted() { [[ -z "$ONLY" || "$1" =~ $ONLY ]]; }  # wanted CASE: does BENCH_ONLY keep it
PEERS_ONLY=${BENCH_PEERS_ONLY:-0}
L2_L1_ENTRIES=${BENCH_L2_L1_ENTRIES:-64}
MEM_IDENTITIES=${BENCH_MEM_IDENTITIES:-100000}
PC_TTL=${BENCH_PC_TTL:-1h}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
BASE=${BENCH_PORT_BASE:-23000}
H2=${BENCH_H2:-0}
HOLD=${BENCH_HOLD:-0}
CALLGRIND=${BENCH_CALLGRIND:-0}
MAX_STEAL=${BENCH_MAX_STEAL:-2}
STEAL_RETRIES=${BENCH_STEAL_RETRIES:-4}
H2_STREAMS=${BENCH_H2_STREAMS:-10}
WRK_TIMEOUT=${BENCH_WRK_TIMEOUT:-10s}

PORT_UPSTREAM=$((BASE + 80))
PORT_NGINX_TLS=$((BASE + 443)); PORT_NGINX_SHA=$((BASE + 444)); PORT_NGINX_BCRYPT=$((BASE + 445))
PORT_NGINX_FWD=$((BASE + 446)); PORT_NGINX_GRAFANA=$((BASE + 447))
PORT_HAPROXY_TLS=$((BASE + 453)); PORT_HAPROXY_BEARER=$((BASE + 454))
PORT_CADDY_TLS=$((BASE + 463)); PORT_CADDY_BASIC=$((BASE + 464))
PORT_PC=$((BASE + 473)); PORT_PC_ADMIN=$((BASE + 474))
PORT_PC_COLD=$((BASE + 475)); PORT_PC_COLD_ADMIN=$((BASE + 476))
PORT_PC_L2A=$((BASE + 477)); PORT_PC_L2A_ADMIN=$((BASE + 478))
PORT_PC_L2B=$((BASE + 479)); PORT_PC_L2B_ADMIN=$((BASE + 480))
PORT_PC_MEM=$((BASE + 481)); PORT_PC_MEM_ADMIN=$((BASE + 482))
PORT_PC_GFC=$((BASE + 483)); PORT_PC_GFC_ADMIN=$((BASE + 484))
PORT_PC_GFP=$((BASE + 485)); PORT_PC_GFP_ADMIN=$((BASE + 486))
PORT_STUB=$((BASE + 490)); PORT_REDIS=$((BASE + 379))
# The end-to-end cases' upstreams: a stand-in as Grafana is run today (no
# auth proxy) and one with [auth.proxy] on.
PORT_STUB_CRED=$((BASE + 491)); PORT_STUB_PROXY=$((BASE + 492))

BASIC_USER=bench; BASIC_PASS=bench-password-1
GRAFANA_USER=admin; GRAFANA_PASS=admin

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Settings the gateway would read from the environment must not leak in.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PORTCULLIS_' || true)
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

ncpu=$(nproc)
(( SERVER_CPU < ncpu && CLIENT_CPU < ncpu )) || die "need cores $SERVER_CPU and $CLIENT_CPU, have $ncpu"
[[ "$SERVER_CPU" != "$CLIENT_CPU" ]] || log "WARNING: servers and load generator share core $SERVER_CPU"
(( REPS >= 3 )) || log "WARNING: BENCH_REPS=$REPS < 3: medians of fewer than 3 runs"

# Every port must be free: a foreign server answering on one would be measured instead.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
busy=()
for p in "$PORT_UPSTREAM" "$PORT_NGINX_TLS" "$PORT_NGINX_SHA" "$PORT_NGINX_BCRYPT" "$PORT_NGINX_FWD" "$PORT_NGINX_GRAFANA" \
         "$PORT_HAPROXY_TLS" "$PORT_HAPROXY_BEARER" "$PORT_CADDY_TLS" "$PORT_CADDY_BASIC" "$PORT_PC" "$PORT_PC_ADMIN" \
         "$PORT_PC_COLD" "$PORT_PC_COLD_ADMIN" "$PORT_PC_L2A" "$PORT_PC_L2A_ADMIN" "$PORT_PC_L2B" \
         "$PORT_PC_L2B_ADMIN" "$PORT_PC_MEM" "$PORT_PC_MEM_ADMIN" "$PORT_PC_GFC" "$PORT_PC_GFC_ADMIN" \
         "$PORT_PC_GFP" "$PORT_PC_GFP_ADMIN" "$PORT_STUB" "$PORT_STUB_CRED" "$PORT_STUB_PROXY" "$PORT_REDIS"; do
  port_busy "$p" && busy+=("$p")
done
((${#busy[@]} == 0)) || die "ports already in use on 127.0.0.1: ${busy[*]} (pick another block with BENCH_PORT_BASE)"

# ---------------------------------------------------------------- install --
install_missing() {
  local need=() pair cmd pkg
  for pair in nginx:nginx haproxy:haproxy caddy:caddy wrk:wrk h2load:nghttp2-client \
              htpasswd:apache2-utils openssl:openssl curl:curl taskset:util-linux \
              redis-server:redis-server redis-cli:redis-tools valgrind:valgrind; do
    cmd=${pair%%:*}; pkg=${pair#*:}
    if [[ "$cmd" == valgrind && "$CALLGRIND" != 1 ]]; then continue; fi
    if [[ "$cmd" == redis-* && "$PEERS_ONLY" == 1 ]]; then continue; fi
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
  done
  ((${#need[@]})) || return 0
  [[ "${BENCH_SKIP_INSTALL:-0}" != 1 ]] || die "missing: ${need[*]} (and BENCH_SKIP_INSTALL=1)"
  local sudo=()
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  log "installing Debian packages: ${need[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}
install_missing

# ------------------------------------------------------------------ build --
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PC_BIN=$TARGET_DIR/release/portcullis
STUB_BIN=$TARGET_DIR/release/examples/grafana_stub
MEM_BIN=$TARGET_DIR/release/examples/cache_memory
TIMELINE_BIN=$TARGET_DIR/release/examples/latency_timeline
if [[ "$PEERS_ONLY" != 1 ]]; then
  if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    command -v cargo >/dev/null || { [[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"; }
    command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) or run with BENCH_PEERS_ONLY=1"
    log "cargo build --release (portcullis, grafana_stub, cache_memory, latency_timeline)"
    (cd "$ROOT" && cargo build --release --quiet --bin portcullis --example cache_memory --example latency_timeline) ||
      die "cargo build of portcullis failed"
    (cd "$ROOT" && { cargo build --release --quiet --example grafana_stub 2>/dev/null ||
                     cargo build --release --quiet -p grafana-stub --example grafana_stub; }) ||
      die "cargo build of the grafana_stub example failed"
  fi
  [[ -x "$PC_BIN" ]] || die "$PC_BIN missing"
  [[ -x "$STUB_BIN" ]] || die "$STUB_BIN missing"
  [[ -x "$MEM_BIN" ]] || die "$MEM_BIN missing"
  [[ -x "$TIMELINE_BIN" ]] || die "$TIMELINE_BIN missing"
fi

# ----------------------------------------------------------- out directory --
STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$BENCH_DIR/out/$STAMP
RUN=$OUT/run; RAW=$OUT/raw
mkdir -p "$RUN" "$RAW" "$RUN/www" "$RUN/caddy-data"
mkdir -p "$RUN"/{upstream-tmp,nginx-tmp}/{body,proxy,fastcgi,uwsgi,scgi}
ln -sfn "$STAMP" "$BENCH_DIR/out/latest"
RESULTS=$OUT/results.tsv
printf 'case\tc\trep\trps\tp50_ms\tp99_ms\trequests\tnon2xx\tsock_errors\tnote\tsteal_pct\tcpu_us_per_req\tupstream_cpu_us_per_req\n' > "$RESULTS"
chmod 755 "$OUT" "$RUN"   # nginx workers may run as nobody: they read htpasswd and www/
log "results in $OUT"

# -------------------------------------------------------------- processes --
declare -A ALIVE=()   # pid -> name, every process this script started
declare -A PID_OF=()  # name -> pid

start_bg() {  # start_bg NAME CMD... : start pinned to the server core
  local name=$1; shift
  taskset -c "$SERVER_CPU" "$@" >"$RUN/$name.log" 2>&1 &
  local pid=$!
  ALIVE[$pid]=$name; PID_OF[$name]=$pid
  echo "$pid" > "$RUN/$name.pid"
}
stop_pid() {
  local pid=$1 i
  [[ -n "${ALIVE[$pid]:-}" ]] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  unset "ALIVE[$pid]"
}
stop_name() { local pid=${PID_OF[$1]:-}; [[ -z "$pid" ]] || stop_pid "$pid"; unset "PID_OF[$1]"; }
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${!ALIVE[@]}"; do stop_pid "$pid"; done
  ((rc == 0)) || log "exited with status $rc; logs in $RUN"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

alive_or_die() { kill -0 "${PID_OF[$1]}" 2>/dev/null || { tail -20 "$RUN/$1.log" >&2; die "$1 exited"; }; }
wait_http() {  # wait_http NAME URL [want_code]: until the URL answers (any code, or want_code)
  local name=$1 url=$2 want=${3:-} code i
  for ((i = 0; i < 300; i++)); do
    alive_or_die "$name"
    code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
    if [[ "$code" != 000 && ( -z "$want" || "$code" == "$want" ) ]]; then return 0; fi
    sleep 0.1
  done
  die "$name did not answer on $url (last code $code)"
}
vmhwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# nginx: the worker (child of the master) does the work
nginx_worker() { local w; w=$(cat "/proc/$1/task/$1/children" 2>/dev/null | awk '{print $1}'); echo "${w:-$1}"; }
declare -A RSS_KIB=()  # case name -> peak RSS (KiB) of the process serving it
note_rss() { local name=$1 kib=$2; (( kib > ${RSS_KIB[$name]:-0} )) && RSS_KIB[$name]=$kib || true; }

# ------------------------------------------------------------- materials --
log "self-signed certificate (ECDSA P-256), htpasswd files, static file"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -keyout "$RUN/key.pem" -out "$RUN/cert.pem" -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
cat "$RUN/cert.pem" "$RUN/key.pem" > "$RUN/certkey.pem"
chmod 644 "$RUN/cert.pem"; chmod 600 "$RUN/key.pem" "$RUN/certkey.pem"
htpasswd -nbB "$BASIC_USER" "$BASIC_PASS" > "$RUN/htpasswd.bcrypt"   # bcrypt, htpasswd's default cost (5)
htpasswd -nbs "$BASIC_USER" "$BASIC_PASS" > "$RUN/htpasswd.sha"      # {SHA}
chmod 644 "$RUN/htpasswd.bcrypt" "$RUN/htpasswd.sha"
CADDY_BCRYPT=$(caddy hash-password --plaintext "$BASIC_PASS")          # bcrypt, Caddy's default cost
{
  printf '<!DOCTYPE html>\n<html><head><title>bench</title></head><body>\n'
  for i in $(seq 1 10); do printf '<p>Portcullis benchmark upstream: a small static file, line %02d.</p>\n' "$i"; done
  printf '</body></html>\n'
} > "$RUN/www/index.html"
chmod -R a+rX "$RUN/www"
openssl rand -hex 32 > "$RUN/cache.key"   # text: the gateway trims whitespace around the key
echo "glsa_placeholder" > "$RUN/haproxy-tokens.lst"   # final list written once tokens exist
BASIC_PEER_B64=$(printf '%s:%s' "$BASIC_USER" "$BASIC_PASS" | base64 -w0)
BASIC_GRAFANA_B64=$(printf '%s:%s' "$GRAFANA_USER" "$GRAFANA_PASS" | base64 -w0)

# The service account behind the Bearer cache-hit token. nginx-tls-fwd sends
# the identity headers the gateway injects for it (Grafana: login "sa-" + name,
# the stand-in's one org, id 1).
HOT_SA_NAME=bench-hot; HOT_SA_ROLE=Viewer
render() {  # render TEMPLATE DEST [KEY=VALUE ...]
  local src=$1 dst=$2; shift 2
  local args=() kv
  for kv in RUN="$RUN" CERT="$RUN/cert.pem" KEY="$RUN/key.pem" CERTKEY="$RUN/certkey.pem" \
            PORT_UPSTREAM=$PORT_UPSTREAM PORT_NGINX_TLS=$PORT_NGINX_TLS PORT_NGINX_SHA=$PORT_NGINX_SHA \
            PORT_NGINX_BCRYPT=$PORT_NGINX_BCRYPT PORT_NGINX_FWD=$PORT_NGINX_FWD PORT_HAPROXY_TLS=$PORT_HAPROXY_TLS \
            PORT_NGINX_GRAFANA=$PORT_NGINX_GRAFANA PORT_STUB_CRED=$PORT_STUB_CRED \
            PORT_HAPROXY_BEARER=$PORT_HAPROXY_BEARER PORT_CADDY_TLS=$PORT_CADDY_TLS \
            PORT_CADDY_BASIC=$PORT_CADDY_BASIC PORT_STUB=$PORT_STUB BASIC_USER=$BASIC_USER \
            CADDY_BCRYPT="$CADDY_BCRYPT" PC_TTL="$PC_TTL" HOT_SA_NAME="$HOT_SA_NAME" HOT_SA_ROLE="$HOT_SA_ROLE" "$@"; do
    args+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
  done
  sed "${args[@]}" "$src" > "$dst"
  if grep -q '@[A-Z_]*@' "$dst"; then die "unrendered placeholder in $dst: $(grep -o '@[A-Z_]*@' "$dst" | head -1)"; fi
}
render "$BENCH_DIR/conf/upstream-nginx.conf" "$RUN/upstream-nginx.conf"
render "$BENCH_DIR/conf/nginx-proxy.conf" "$RUN/nginx-proxy.conf"
render "$BENCH_DIR/conf/haproxy.cfg" "$RUN/haproxy.cfg"
render "$BENCH_DIR/conf/Caddyfile" "$RUN/Caddyfile"

# ----------------------------------------------------------------- peers --
log "validating peer configurations"
nginx -t -q -e stderr -p "$RUN" -c "$RUN/upstream-nginx.conf" >/dev/null 2>"$RUN/nginx-t.log" || { cat "$RUN/nginx-t.log" >&2; die "upstream nginx config"; }
nginx -t -q -e stderr -p "$RUN" -c "$RUN/nginx-proxy.conf" >/dev/null 2>"$RUN/nginx-t.log" || { cat "$RUN/nginx-t.log" >&2; die "nginx proxy config"; }
haproxy -c -f "$RUN/haproxy.cfg" >"$RUN/haproxy-c.log" 2>&1 || { cat "$RUN/haproxy-c.log" >&2; die "haproxy config"; }
HOME=$RUN XDG_DATA_HOME=$RUN/caddy-data XDG_CONFIG_HOME=$RUN/caddy-data \
  caddy validate --config "$RUN/Caddyfile" --adapter caddyfile >"$RUN/caddy-validate.log" 2>&1 ||
  { cat "$RUN/caddy-validate.log" >&2; die "Caddyfile"; }

log "starting upstream and peers, pinned to core $SERVER_CPU"
start_bg upstream nginx -e stderr -p "$RUN" -c "$RUN/upstream-nginx.conf"
wait_http upstream "http://127.0.0.1:$PORT_UPSTREAM/" 200
start_bg nginx nginx -e stderr -p "$RUN" -c "$RUN/nginx-proxy.conf"
start_bg haproxy haproxy -db -f "$RUN/haproxy.cfg"
start_bg caddy env GOMAXPROCS=1 HOME="$RUN" XDG_DATA_HOME="$RUN/caddy-data" XDG_CONFIG_HOME="$RUN/caddy-data" \
  caddy run --config "$RUN/Caddyfile" --adapter caddyfile
wait_http nginx "https://127.0.0.1:$PORT_NGINX_TLS/" 200
wait_http haproxy "https://127.0.0.1:$PORT_HAPROXY_TLS/" 200
wait_http caddy "https://127.0.0.1:$PORT_CADDY_TLS/" 200

# ------------------------------------------------------------ portcullis --
HOT_TOKEN=""; SESSION=""
TOKENS_FILE=$RUN/tokens.txt
# Optional: the upstream's port (default the static nginx), the stand-in it
# verifies against (default the verifier stand-in) and identity.grafana
# (default credential).
pc_config() {  # pc_config NAME PORT ADMIN_PORT MAX_ENTRIES WITH_REDIS [UPSTREAM_PORT GRAFANA_PORT MODE]
  local f=$RUN/$1.toml
  render "$BENCH_DIR/conf/portcullis.toml" "$f" PC_PORT="$2" PC_ADMIN_PORT="$3" PC_MAX_ENTRIES="$4" \
    PC_UPSTREAM_PORT="${6:-$PORT_UPSTREAM}" PC_GRAFANA_PORT="${7:-$PORT_STUB}" PC_GRAFANA_MODE="${8:-credential}"
  if [[ "$5" == 1 ]]; then printf '\n[cache.redis]\nurl = "redis://127.0.0.1:%s/"\n' "$PORT_REDIS" >> "$f"; fi
  echo "$f"
}
pc_start() {  # pc_start NAME PORT ADMIN_PORT MAX_ENTRIES WITH_REDIS [UPSTREAM_PORT GRAFANA_PORT MODE]
  local cfg; cfg=$(pc_config "$@")
  start_bg "$1" "$PC_BIN" --config "$cfg"
  wait_http "$1" "http://127.0.0.1:$3/readyz" 200
}
stub_api() {  # stub_api METHOD PATH [JSON]
  curl -sS --fail-with-body --max-time 30 -u "$GRAFANA_USER:$GRAFANA_PASS" -X "$1" \
    -H 'Content-Type: application/json' ${3:+--data "$3"} "http://127.0.0.1:$PORT_STUB$2"
}
stub_login() {  # stub_login PORT: the grafana_session cookie of admin's POST /login at that stand-in
  curl -sS -D - -o /dev/null -H 'Content-Type: application/json' \
      --data "{\"user\":\"$GRAFANA_USER\",\"password\":\"$GRAFANA_PASS\"}" "http://127.0.0.1:$1/login" |
    tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: grafana_session=\([^;]*\).*/\1/p' | head -1
}
json_field() { sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\{0,1\}\([^\",}]*\)\"\{0,1\}.*/\1/p" | head -1; }
mint_tokens() {  # mint_tokens SA_ID COUNT PREFIX > file  (one curl process, keep-alive)
  local id=$1 n=$2 pfx=$3 cfg=$RUN/mint-$3.curl i
  : > "$cfg"
  for ((i = 1; i <= n; i++)); do
    printf 'url = "http://127.0.0.1:%s/api/serviceaccounts/%s/tokens"\nuser = "%s:%s"\nheader = "Content-Type: application/json"\ndata = "{\\"name\\":\\"%s-%d\\"}"\nwrite-out = "\\n"\n' \
      "$PORT_STUB" "$id" "$GRAFANA_USER" "$GRAFANA_PASS" "$pfx" "$i" >> "$cfg"
    ((i == n)) || echo next >> "$cfg"
  done
  curl -sS -K "$cfg" | grep -o '"key"[[:space:]]*:[[:space:]]*"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/'
}

if [[ "$PEERS_ONLY" != 1 ]]; then
  log "starting redis (own instance, :$PORT_REDIS) and the Grafana stand-in, pinned to core $SERVER_CPU"
  start_bg redis redis-server --bind 127.0.0.1 --port "$PORT_REDIS" --save "" --appendonly no \
    --daemonize no --dir "$RUN" --protected-mode yes
  start_bg stub "$STUB_BIN" --listen "127.0.0.1:$PORT_STUB" --flavor grafana11
  for ((i = 0; i < 100; i++)); do redis-cli -p "$PORT_REDIS" ping >/dev/null 2>&1 && break; sleep 0.1; done
  wait_http stub "http://127.0.0.1:$PORT_STUB/api/health"

  log "minting credentials through the stand-in's API"
  SA_ID=$(stub_api POST /api/serviceaccounts "{\"name\":\"$HOT_SA_NAME\",\"role\":\"$HOT_SA_ROLE\"}" | json_field id)
  [[ -n "$SA_ID" ]] || die "could not create a service account"
  HOT_TOKEN=$(mint_tokens "$SA_ID" 1 hot)
  [[ "$HOT_TOKEN" == glsa_* ]] || die "could not mint a token (got '$HOT_TOKEN')"
  # The many tokens (two PBKDF2 runs each at the stand-in) only for the cases that use them.
  : > "$TOKENS_FILE"
  if wanted portcullis-cold || wanted portcullis-l2; then
    SA2_ID=$(stub_api POST /api/serviceaccounts '{"name":"bench-many","role":"Viewer"}' | json_field id)
    t0=$(date +%s)
    mint_tokens "$SA2_ID" "$TOKENS" many > "$TOKENS_FILE"
    got=$(wc -l < "$TOKENS_FILE")
    ((got == TOKENS)) || die "minted $got of $TOKENS tokens"
    log "minted $got distinct tokens in $(( $(date +%s) - t0 ))s"
  fi
  SESSION=$(stub_login "$PORT_STUB")
  [[ -n "$SESSION" ]] || die "login did not set grafana_session"

  log "starting Portcullis (1 worker) for the cache-hit cases"
  pc_start pc "$PORT_PC" "$PORT_PC_ADMIN" 100000 0

fi
if [[ "$PEERS_ONLY" != 1 ]] && wanted portcullis-l2; then
  log "filling L2: gateway A (with redis) verifies each of the $TOKENS tokens once"
  pc_start pc-l2a "$PORT_PC_L2A" "$PORT_PC_L2A_ADMIN" 100000 1
  fill=$RUN/l2-fill.curl; : > "$fill"
  while read -r tok; do
    [[ -s "$fill" ]] && echo next >> "$fill"
    printf 'insecure\nurl = "https://127.0.0.1:%s/"\nheader = "Authorization: Bearer %s"\noutput = "/dev/null"\nwrite-out = "%%{http_code}\\n"\n' "$PORT_PC_L2A" "$tok" >> "$fill"
  done < "$TOKENS_FILE"
  curl -sk -K "$fill" > "$RAW/l2-fill.codes" || true
  ok=$(grep -c '^200$' "$RAW/l2-fill.codes" || true)
  ((ok == TOKENS)) || die "L2 fill: $ok of $TOKENS requests answered 200 ($RAW/l2-fill.codes)"
  L2_KEYS=$(redis-cli -p "$PORT_REDIS" dbsize)
  log "L2 filled: redis holds $L2_KEYS keys"
  note_rss portcullis-l2-fill "$(vmhwm_kib "${PID_OF[pc-l2a]}")"
  stop_name pc-l2a
fi

# The memory case: a gateway holding MEM_IDENTITIES identities in L1 (the
# default cache.max_entries is 100,000). Verifying that many tokens against the
# stand-in would cost two PBKDF2 runs each (minting and checking: hours on one
# core), so the identities are written into Redis by the gateway's own L2
# writer for freshly generated, well-formed tokens, and the gateway loads each
# on first sight, as it would one that another replica verified.
MEM_TOKENS_FILE=$RUN/mem-tokens.txt
mem_entries() { curl -s --max-time 5 "http://127.0.0.1:$PORT_PC_MEM_ADMIN/metrics" | awk '$1 == "portcullis_cache_entries" {print $2}'; }
if [[ "$PEERS_ONLY" != 1 ]] && ((MEM_IDENTITIES > 0)) && wanted portcullis-mem; then
  log "memory case: seeding $MEM_IDENTITIES identities into redis (examples/cache_memory --seed-redis)"
  t0=$(date +%s)
  taskset -c "$CLIENT_CPU" "$MEM_BIN" "$MEM_IDENTITIES" --seed-redis "redis://127.0.0.1:$PORT_REDIS/" \
    --key-file "$RUN/cache.key" --ttl "$PC_TTL" > "$MEM_TOKENS_FILE" 2> "$RUN/mem-seed.log" ||
    { cat "$RUN/mem-seed.log" >&2; die "seeding the memory case failed"; }
  log "memory case: seeded in $(( $(date +%s) - t0 ))s; loading them into a fresh gateway's L1"
  pc_start pc-mem "$PORT_PC_MEM" "$PORT_PC_MEM_ADMIN" "$MEM_IDENTITIES" 1
  MEM_START_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/${PID_OF[pc-mem]}/status")
  # wrk runs for its whole -d even after the list is used up: short passes,
  # each starting about where the last one stopped (loading goes down the
  # list), until L1 holds every identity.
  MEM_FILLED=0
  for ((pass = 1; pass <= 30; pass++)); do
    taskset -c "$CLIENT_CPU" wrk -t1 -c64 -d3s --timeout "$WRK_TIMEOUT" -s "$BENCH_DIR/lua/tokens.lua" \
      "https://127.0.0.1:$PORT_PC_MEM/" -- "$MEM_TOKENS_FILE" "Bearer " "$(( MEM_FILLED * 99 / 100 ))" once \
      > "$RAW/mem-fill.$pass.txt" 2>&1 || true
    MEM_FILLED=$(mem_entries)
    (( ${MEM_FILLED:-0} >= MEM_IDENTITIES )) && break
  done
  MEM_FILLED_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/${PID_OF[pc-mem]}/status")
  log "memory case: L1 holds ${MEM_FILLED:-?} identities; RSS $((MEM_START_KIB / 1024)) MiB at start, $((MEM_FILLED_KIB / 1024)) MiB filled"
fi

# End to end through Grafana (the grafana-* cases): the stand-in is the
# upstream, and what it does per request is measured with the rest. It
# charges Grafana's PBKDF2 (10,000 iterations) for every password it checks,
# so a Basic credential forwarded to it costs a hash on every request; a
# session cookie costs a lookup. Two stand-ins, pinned like every server:
# stub-cred as Grafana is run today (behind PMM's nginx, or the gateway in
# identity.grafana = "credential"), stub-proxy with [auth.proxy] on (it
# trusts X-WEBAUTH-USER from loopback) behind the gateway in "auth_proxy"
# mode. Each gateway verifies against its own upstream, as it would against
# the Grafana it fronts. Sessions rotate after a day here (Grafana: 10
# minutes, one rotation per browser then; without it a long run would see
# the stand-in refuse the session half way).
SESSION_CRED=""; SESSION_PROXY=""
if [[ "$PEERS_ONLY" != 1 ]] && { wanted grafana-nginx-basic || wanted grafana-nginx-session ||
     wanted grafana-credential-basic || wanted grafana-credential-session ||
     wanted grafana-auth-proxy-basic || wanted grafana-auth-proxy-session; }; then
  log "end to end: Grafana stand-ins as upstreams (:$PORT_STUB_CRED credential, :$PORT_STUB_PROXY auth proxy) and their gateways"
  start_bg stub-cred "$STUB_BIN" --listen "127.0.0.1:$PORT_STUB_CRED" --flavor grafana11 --rotation-interval 86400
  start_bg stub-proxy "$STUB_BIN" --listen "127.0.0.1:$PORT_STUB_PROXY" --flavor grafana11 --rotation-interval 86400 --auth-proxy
  wait_http stub-cred "http://127.0.0.1:$PORT_STUB_CRED/api/health"
  wait_http stub-proxy "http://127.0.0.1:$PORT_STUB_PROXY/api/health"
  SESSION_CRED=$(stub_login "$PORT_STUB_CRED"); SESSION_PROXY=$(stub_login "$PORT_STUB_PROXY")
  [[ -n "$SESSION_CRED" && -n "$SESSION_PROXY" ]] || die "login at the end-to-end stand-ins did not set grafana_session"
  pc_start pc-gfc "$PORT_PC_GFC" "$PORT_PC_GFC_ADMIN" 100000 0 "$PORT_STUB_CRED" "$PORT_STUB_CRED" credential
  pc_start pc-gfp "$PORT_PC_GFP" "$PORT_PC_GFP_ADMIN" 100000 0 "$PORT_STUB_PROXY" "$PORT_STUB_PROXY" auth_proxy
fi

# ----------------------------------------------------------------- cases --
# Table order.
ALL_CASES=(upstream-direct nginx-tls nginx-tls-fwd nginx-basic-sha nginx-basic-bcrypt haproxy-tls haproxy-bearer
           caddy-tls caddy-basic-bcrypt)
[[ "$PEERS_ONLY" == 1 ]] || ALL_CASES+=(portcullis-bearer portcullis-basic portcullis-cookie
                                          portcullis-cold portcullis-l2)
[[ "$PEERS_ONLY" == 1 ]] || ((MEM_IDENTITIES == 0)) || ALL_CASES+=(portcullis-mem)
# End to end, the Grafana stand-in as the upstream: their own table, paired
# with nginx forwarding the same credential to the same kind of stand-in.
GRAFANA_CASES=(grafana-nginx-basic grafana-credential-basic grafana-auth-proxy-basic
               grafana-nginx-session grafana-credential-session grafana-auth-proxy-session)
[[ "$PEERS_ONLY" == 1 ]] || ALL_CASES+=("${GRAFANA_CASES[@]}")
# Run order within a rep: the baseline sits next to the cases it is most
# closely compared with (the close peers, then Portcullis' cache hits), so that
# each per-rep ratio pairs runs seconds apart, not minutes.
RUN_ORDER=(upstream-direct haproxy-tls haproxy-bearer nginx-basic-sha nginx-tls-fwd nginx-tls portcullis-bearer
           portcullis-basic portcullis-cookie portcullis-l2 portcullis-mem nginx-basic-bcrypt caddy-tls caddy-basic-bcrypt
           "${GRAFANA_CASES[@]}" portcullis-cold)
if [[ "$H2" == 1 ]]; then
  ALL_CASES+=(nginx-tls-h2 haproxy-tls-h2 caddy-tls-h2)
  [[ "$PEERS_ONLY" == 1 ]] || ALL_CASES+=(portcullis-bearer-h2)
fi
CASES=()
for c in "${ALL_CASES[@]}"; do
  if [[ -z "$ONLY" || "$c" == nginx-tls || "$c" == nginx-tls-h2 || "$c" =~ $ONLY ]]; then CASES+=("$c"); fi
done

describe() {
  if [[ "$1" == *-h2 ]]; then echo "$(describe "${1%-h2}"), HTTP/2 (h2load -m $H2_STREAMS)"; return; fi
  case $1 in
    upstream-direct) echo "upstream nginx direct, plain HTTP (reference, no proxy)" ;;
    nginx-tls) echo "nginx TLS proxy, no auth (baseline)" ;;
    nginx-tls-fwd) echo "nginx TLS proxy, no auth, forwarding Portcullis' header lines" ;;
    nginx-basic-sha) echo "nginx auth_basic, {SHA} htpasswd" ;;
    nginx-basic-bcrypt) echo "nginx auth_basic, bcrypt htpasswd" ;;
    haproxy-tls) echo "HAProxy TLS proxy, no auth" ;;
    haproxy-bearer) echo "HAProxy TLS + Bearer ACL" ;;
    caddy-tls) echo "Caddy reverse_proxy, no auth" ;;
    caddy-basic-bcrypt) echo "Caddy basicauth bcrypt (cached)" ;;
    portcullis-bearer) echo "Portcullis Bearer glsa_, cache hit" ;;
    portcullis-basic) echo "Portcullis Basic user:password, cache hit" ;;
    portcullis-cookie) echo "Portcullis session cookie, cache hit" ;;
    portcullis-cold) echo "Portcullis cold: distinct tokens, each verified once" ;;
    portcullis-l2) echo "Portcullis L2 (Redis) hits" ;;
    portcullis-mem) echo "Portcullis, $MEM_IDENTITIES cached identities, L1 hits across all" ;;
    grafana-nginx-basic) echo "nginx TLS proxy → stand-in, Basic forwarded (PMM today)" ;;
    grafana-nginx-session) echo "nginx TLS proxy → stand-in, session cookie forwarded (PMM today)" ;;
    grafana-credential-basic) echo "Portcullis credential mode → stand-in, Basic" ;;
    grafana-credential-session) echo "Portcullis credential mode → stand-in, session cookie" ;;
    grafana-auth-proxy-basic) echo "Portcullis auth_proxy mode → stand-in, Basic" ;;
    grafana-auth-proxy-session) echo "Portcullis auth_proxy mode → stand-in, session cookie" ;;
  esac
}
# case_target NAME: sets URL, HDR (curl/wrk header args) and SCRIPT (wrk script args)
case_target() {
  HDR=(); SCRIPT=()
  case ${1%-h2} in
    upstream-direct) URL=http://127.0.0.1:$PORT_UPSTREAM/ ;;
    nginx-tls) URL=https://127.0.0.1:$PORT_NGINX_TLS/ ;;
    nginx-tls-fwd) URL=https://127.0.0.1:$PORT_NGINX_FWD/; HDR=(-H "Authorization: Bearer $HOT_TOKEN") ;;
    nginx-basic-sha) URL=https://127.0.0.1:$PORT_NGINX_SHA/; HDR=(-H "Authorization: Basic $BASIC_PEER_B64") ;;
    nginx-basic-bcrypt) URL=https://127.0.0.1:$PORT_NGINX_BCRYPT/; HDR=(-H "Authorization: Basic $BASIC_PEER_B64") ;;
    haproxy-tls) URL=https://127.0.0.1:$PORT_HAPROXY_TLS/ ;;
    haproxy-bearer) URL=https://127.0.0.1:$PORT_HAPROXY_BEARER/; HDR=(-H "Authorization: Bearer $HAPROXY_TOKEN") ;;
    caddy-tls) URL=https://127.0.0.1:$PORT_CADDY_TLS/ ;;
    caddy-basic-bcrypt) URL=https://127.0.0.1:$PORT_CADDY_BASIC/; HDR=(-H "Authorization: Basic $BASIC_PEER_B64") ;;
    portcullis-bearer) URL=https://127.0.0.1:$PORT_PC/; HDR=(-H "Authorization: Bearer $HOT_TOKEN") ;;
    portcullis-basic) URL=https://127.0.0.1:$PORT_PC/; HDR=(-H "Authorization: Basic $BASIC_GRAFANA_B64") ;;
    portcullis-cookie) URL=https://127.0.0.1:$PORT_PC/; HDR=(-H "Cookie: grafana_session=$SESSION") ;;
    portcullis-cold) URL=https://127.0.0.1:$PORT_PC_COLD/; SCRIPT=(-s "$BENCH_DIR/lua/tokens.lua") ;;
    portcullis-l2) URL=https://127.0.0.1:$PORT_PC_L2B/; SCRIPT=(-s "$BENCH_DIR/lua/tokens.lua") ;;
    portcullis-mem) URL=https://127.0.0.1:$PORT_PC_MEM/; SCRIPT=(-s "$BENCH_DIR/lua/tokens.lua") ;;
    # End to end: GET /api/user, the signed-in user, which Grafana (and the
    # stand-in) authenticates like every API call.
    grafana-nginx-basic) URL=https://127.0.0.1:$PORT_NGINX_GRAFANA/api/user; HDR=(-H "Authorization: Basic $BASIC_GRAFANA_B64") ;;
    grafana-nginx-session) URL=https://127.0.0.1:$PORT_NGINX_GRAFANA/api/user; HDR=(-H "Cookie: grafana_session=$SESSION_CRED") ;;
    grafana-credential-basic) URL=https://127.0.0.1:$PORT_PC_GFC/api/user; HDR=(-H "Authorization: Basic $BASIC_GRAFANA_B64") ;;
    grafana-credential-session) URL=https://127.0.0.1:$PORT_PC_GFC/api/user; HDR=(-H "Cookie: grafana_session=$SESSION_CRED") ;;
    grafana-auth-proxy-basic) URL=https://127.0.0.1:$PORT_PC_GFP/api/user; HDR=(-H "Authorization: Basic $BASIC_GRAFANA_B64") ;;
    grafana-auth-proxy-session) URL=https://127.0.0.1:$PORT_PC_GFP/api/user; HDR=(-H "Cookie: grafana_session=$SESSION_PROXY") ;;
    *) die "unknown case $1" ;;
  esac
}
case_needs_auth() { local n=${1%-h2}; [[ "$n" != upstream-direct && "$n" != *-tls && "$n" != nginx-tls-fwd ]]; }
case_process() {  # which long-lived process serves the case (for peak RSS)
  case ${1%-h2} in
    upstream-direct) echo upstream ;; nginx-*|grafana-nginx-*) echo nginx ;; haproxy-*) echo haproxy ;;
    grafana-credential-*) echo pc-gfc ;; grafana-auth-proxy-*) echo pc-gfp ;;
    caddy-*) echo caddy ;; portcullis-cold|portcullis-l2) echo "" ;; portcullis-mem) echo pc-mem ;;
    portcullis-*) echo pc ;;
  esac
}
# The process doing a case's work during a run (fresh-process cases included):
# its CPU time is read around every run.
serving_pid() {
  local p pid
  case ${1%-h2} in
    portcullis-cold) p=pc-cold ;; portcullis-l2) p=pc-l2b ;; *) p=$(case_process "$1") ;;
  esac
  [[ -n "$p" ]] || { echo ""; return; }
  pid=${PID_OF[$p]:-}
  [[ -z "$pid" ]] || [[ "$p" != nginx && "$p" != upstream ]] || pid=$(nginx_worker "$pid")
  echo "$pid"
}
upstream_pid() {  # upstream_pid CASE: the process the case's requests are forwarded to
  case $1 in
    grafana-nginx-*|grafana-credential-*) echo "${PID_OF[stub-cred]:-}" ;;
    grafana-auth-proxy-*) echo "${PID_OF[stub-proxy]:-}" ;;
    *) nginx_worker "${PID_OF[upstream]}" ;;
  esac
}
# User + system CPU time of a process (all its threads), in clock ticks. The
# kernel keeps the hypervisor's steal out of it: it is the work the process
# did, however slow the host was.
CLK_TCK=$(getconf CLK_TCK)
# "-" when there is no such process. The fields are counted after the
# command name's closing bracket: a name may hold spaces.
cpu_ticks() {
  local stat
  [[ -n "$1" ]] && stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo -; return; }
  awk '{print $12 + $13}' <<< "${stat##*) }"
}
us_per_req() {  # us_per_req TICKS_BEFORE TICKS_AFTER REQUESTS
  awk -v a="$1" -v b="$2" -v r="$3" -v hz="$CLK_TCK" 'BEGIN {
    if (a != "-" && b != "-" && r > 0 && b >= a) printf "%.1f", (b - a) * 1e6 / hz / r; else print "-" }'
}

# The HAProxy ACL list holds the same kind of token the gateway checks.
HAPROXY_TOKEN=${HOT_TOKEN:-glsa_$(openssl rand -hex 16)_00000000}
{ [[ -s "$TOKENS_FILE" ]] && cat "$TOKENS_FILE"; echo "$HAPROXY_TOKEN"; } > "$RUN/haproxy-tokens.lst"
chmod 644 "$RUN/haproxy-tokens.lst"
# haproxy reads the list at start: restart it now that the list is final
stop_name haproxy
start_bg haproxy haproxy -db -f "$RUN/haproxy.cfg"
wait_http haproxy "https://127.0.0.1:$PORT_HAPROXY_TLS/" 200

# Fresh-process cases: a new gateway for every run.
pre_run() {  # pre_run CASE
  case $1 in
    portcullis-cold) pc_start pc-cold "$PORT_PC_COLD" "$PORT_PC_COLD_ADMIN" 100000 0 ;;
    portcullis-l2)
      pc_start pc-l2b "$PORT_PC_L2B" "$PORT_PC_L2B_ADMIN" "$L2_L1_ENTRIES" 1
      REDIS_HITS0=$(redis_stat keyspace_hits) ;;
  esac
}
post_run() {  # post_run CASE REQUESTS WRK_OUTPUT -> sets POST_NOTE (no subshell: it stops processes)
  POST_NOTE=""
  case $1 in
    portcullis-cold)
      note_rss portcullis-cold "$(vmhwm_kib "${PID_OF[pc-cold]}")"; stop_name pc-cold
      if grep -q '^Once-Elapsed: [0-9]' "$3"; then POST_NOTE=exhausted; else POST_NOTE=partial; fi ;;
    portcullis-l2)
      local hits; hits=$(( $(redis_stat keyspace_hits) - REDIS_HITS0 ))
      note_rss portcullis-l2 "$(vmhwm_kib "${PID_OF[pc-l2b]}")"; stop_name pc-l2b
      POST_NOTE="l2hits=$hits" ;;
  esac
}
# Steal: time the hypervisor gave this VM's vCPUs to someone else. A run
# during which it took a real share of a core measures the host, not the
# proxy (throughput and p99 follow it closely), so such a run is repeated.
steal_snapshot() {  # "steal total" jiffies of the server and client cores
  awk -v s="cpu$SERVER_CPU" -v c="cpu$CLIENT_CPU" '$1 == s || $1 == c {
      t = 0; for (i = 2; i <= 9; i++) t += $i; st += $9; tot += t }  # guest time is inside user
    END { print st, tot }' /proc/stat
}
steal_pct() {  # steal_pct "BEFORE" "AFTER" -> percent of the two cores' time
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ")
    d = y[2] - x[2]; printf "%.1f", (d > 0) ? 100 * (y[1] - x[1]) / d : 0 }'
}
redis_stat() { redis-cli -p "$PORT_REDIS" info stats | tr -d '\r' | awk -F: -v k="$1" '$1 == k {print $2}'; }

parse_wrk() {  # -> rps p50_ms p99_ms requests non2xx sock_errors
  awk '
    function ms(v,   n, u) { n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
      if (u == "us") return n / 1000; if (u == "ms") return n; if (u == "s") return n * 1000
      if (u == "m") return n * 60000; if (u == "h") return n * 3600000; return n }
    /^Requests\/sec:/ { rps = $2 }
    /^Once-Requests\/sec:/ { once = $2 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    / requests in / { req = $1 }
    /Non-2xx or 3xx responses:/ { n2 = $NF }
    /Socket errors:/ { gsub(",", ""); err = $4 + $6 + $8 + $10 }
    END { if (once != "") rps = once
          printf "%s %.3f %.3f %d %d %d\n", (rps == "" ? 0 : rps), p50, p99, req, n2, err }' "$1"
}

parse_h2load() {  # -> rps p50_ms(n/a: 0) p99_ms(n/a: 0) requests non2xx errors
  awk '
    /^finished in/ { gsub(",", ""); rps = $4 }
    /^requests:/ { done = $8; failed = $10; errored = $12; timeout = $14 }
    /^status codes:/ { gsub(",", ""); n2 = $5 + $7 + $9 }
    END { printf "%s 0 0 %d %d %d\n", (rps == "" ? 0 : rps), done, n2, failed + errored + timeout }' "$1"
}

run_wrk() {  # run_wrk CASE C DURATION OUTFILE
  local name=$1 c=$2 d=$3 out=$4
  case_target "$name"
  if [[ "$name" == *-h2 ]]; then
    local hh=() h
    for h in "${HDR[@]}"; do [[ "$h" == -H ]] || hh+=(-H "$h"); done
    taskset -c "$CLIENT_CPU" h2load -t1 -c"$c" -m"$H2_STREAMS" -D"${d%s}" --warm-up-time=1 "${hh[@]}" "$URL" > "$out" 2>&1 || true
    return
  fi
  local sargs=()
  case $name in
    portcullis-cold) sargs=(-- "$TOKENS_FILE" "Bearer " "$(( (RUN_SEQ * 997) % TOKENS ))" once) ;;
    portcullis-l2) sargs=(-- "$TOKENS_FILE" "Bearer " "$(( (RUN_SEQ * 997) % TOKENS ))") ;;
    portcullis-mem) sargs=(-- "$MEM_TOKENS_FILE" "Bearer " "$(( (RUN_SEQ * 9973) % MEM_IDENTITIES ))") ;;
  esac
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$c" -d"$d" --timeout "$WRK_TIMEOUT" --latency \
    "${HDR[@]}" "${SCRIPT[@]}" "$URL" "${sargs[@]}" > "$out" 2>&1 || true
}

# The same closed loop from latency_timeline (tokio + rustls), which keeps each
# request's start: "after 1 s" leaves out the connection storm every run
# starts with (all c handshakes at once), which wrk's summary cannot.
run_timeline() {  # run_timeline CASE C DURATION OUTFILE
  local name=$1 c=$2 d=$3 out=$4
  case_target "$name"
  taskset -c "$CLIENT_CPU" "$TIMELINE_BIN" "$URL" -c "$c" -d "$d" -b 1s "${HDR[@]}" > "$out" 2>&1 || true
}
parse_timeline() {  # -> rps p50_ms p99_ms requests non2xx(0: any other answer fails the connection) errors
  awk '$1 == "after" { req = $4; rps = $5; p50 = $6; p99 = $7 } /failed/ { err++ }
    END { printf "%s %.3f %.3f %d 0 %d\n", (rps == "" ? 0 : rps), p50, p99, req, err }' "$1"
}

# Sanity: every case answers 200 with its credential, and 401 without it.
log "sanity checks (200 with the credential, 401 without)"
SANITY_FAILED=()
for name in "${CASES[@]}"; do
  case_target "$name"
  [[ "$name" == portcullis-cold || "$name" == portcullis-l2 || "$name" == portcullis-mem ]] && continue
  if [[ "$name" == *-h2 ]]; then
    code=$(curl -sk --http2 -o /dev/null -w '%{http_code}/%{http_version}' --max-time 10 "${HDR[@]}" "$URL" || true)
    [[ "$code" == 200/2 ]] || { log "  $name: expected 200 over HTTP/2, got $code"; SANITY_FAILED+=("$name"); }
    continue
  fi
  code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 10 "${HDR[@]}" "$URL" || true)
  [[ "$code" == 200 ]] || { log "  $name: expected 200 with credential, got $code"; SANITY_FAILED+=("$name"); }
  if case_needs_auth "$name"; then
    code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 10 "$URL" || true)
    [[ "$code" == 401 ]] || { log "  $name: expected 401 without credential, got $code"; SANITY_FAILED+=("$name"); }
  fi
done
if [[ " ${CASES[*]} " == *" portcullis-cold "* ]]; then
  pc_start pc-cold "$PORT_PC_COLD" "$PORT_PC_COLD_ADMIN" 100000 0
  code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 10 -H "Authorization: Bearer glsa_$(openssl rand -hex 16)_deadbeef" "https://127.0.0.1:$PORT_PC_COLD/" || true)
  [[ "$code" == 401 ]] || { log "  portcullis-cold: unknown token gave $code, expected 401"; SANITY_FAILED+=(portcullis-cold); }
  code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 10 -H "Authorization: Bearer $HOT_TOKEN" "https://127.0.0.1:$PORT_PC_COLD/" || true)
  [[ "$code" == 200 ]] || { log "  portcullis-cold: valid token gave $code, expected 200"; SANITY_FAILED+=(portcullis-cold); }
  # Merging: 256 connections at once with one token this gateway has not seen.
  verifications() { curl -s --max-time 5 "http://127.0.0.1:$PORT_PC_COLD_ADMIN/metrics" |
    awk '$1 == "portcullis_identity_lookups_total{source=\"verifier\"}" {print $2}'; }
  v0=$(verifications)
  taskset -c "$CLIENT_CPU" wrk -t1 -c256 -d2s --timeout "$WRK_TIMEOUT" -H "Authorization: Bearer $(head -1 "$TOKENS_FILE")" \
    "https://127.0.0.1:$PORT_PC_COLD/" > "$RAW/cold-merge.txt" 2>&1 || true
  read -r _ _ _ MERGE_REQUESTS MERGE_BAD _ < <(parse_wrk "$RAW/cold-merge.txt")
  MERGE_VERIFICATIONS=$(( $(verifications) - v0 ))
  log "  portcullis-cold: $MERGE_REQUESTS requests at c=256 with one new token: $MERGE_VERIFICATIONS verification(s), $MERGE_BAD non-2xx"
  ((MERGE_VERIFICATIONS == 1 && MERGE_BAD == 0)) || SANITY_FAILED+=(portcullis-cold)
  stop_name pc-cold
fi
if [[ " ${CASES[*]} " == *" portcullis-mem "* ]]; then
  code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 10 -H "Authorization: Bearer $(head -1 "$MEM_TOKENS_FILE")" "https://127.0.0.1:$PORT_PC_MEM/" || true)
  [[ "$code" == 200 ]] || { log "  portcullis-mem: a seeded token gave $code, expected 200"; SANITY_FAILED+=(portcullis-mem); }
  code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 10 "https://127.0.0.1:$PORT_PC_MEM/" || true)
  [[ "$code" == 401 ]] || { log "  portcullis-mem: no credential gave $code, expected 401"; SANITY_FAILED+=(portcullis-mem); }
fi
# End to end: what reaches the stand-in (it echoes any path it does not
# serve): in credential mode the credential and no identity header, in
# auth_proxy mode the identity and neither Authorization nor the session cookie.
for name in grafana-credential-basic grafana-credential-session grafana-auth-proxy-basic grafana-auth-proxy-session; do
  [[ " ${CASES[*]} " == *" $name "* ]] || continue
  case_target "$name"
  seen=$(curl -sk --max-time 10 "${HDR[@]}" "${URL%/api/user}/__stub/echo/bench" || true)
  has_user=0; has_cred=0
  grep -qi '"x-webauth-user"' <<< "$seen" && has_user=1
  grep -qi '"authorization"\|grafana_session=' <<< "$seen" && has_cred=1
  case $name in
    grafana-credential-*) want="credential, no identity"; ((has_cred == 1 && has_user == 0)) && ok=1 || ok=0 ;;
    grafana-auth-proxy-*) want="identity, no credential"; ((has_cred == 0 && has_user == 1)) && ok=1 || ok=0 ;;
  esac
  if ((ok)); then log "  $name: the stand-in received the $want"
  else log "  $name: expected the stand-in to receive the $want; it saw: ${seen:0:400}"; SANITY_FAILED+=("$name"); fi
done
((${#SANITY_FAILED[@]} == 0)) || die "sanity checks failed: ${SANITY_FAILED[*]}"

if [[ "$CALLGRIND" == 1 ]]; then
  # shellcheck source=bench/callgrind.sh
  source "$BENCH_DIR/callgrind.sh"
  run_callgrind
  exit 0
fi

if [[ "$HOLD" == 1 ]]; then
  # For profiling by hand (perf, wrk with other options): everything stays up.
  for name in "${CASES[@]}"; do
    case_target "$name"
    log "  $name: ${URL} ${HDR[*]}"
  done
  log "holding: every server is up (pids in $RUN/*.pid); Ctrl-C or kill -TERM $$ stops them all"
  # `wait` (unlike a foreground sleep) returns as soon as a signal arrives.
  while :; do sleep 3600 & wait $! || true; done
fi

# TLS actually negotiated by each endpoint (same cert; recorded, not enforced)
{
  for name in "${CASES[@]}"; do
    case_target "$name"; [[ "$URL" == https://* ]] || continue
    port=${URL##*:}; port=${port%%/*}
    [[ "$name" == portcullis-cold || "$name" == portcullis-l2 || "$name" == portcullis-mem ]] && continue
    printf '%-20s %s\n' "$name" "$(openssl s_client -connect "127.0.0.1:$port" -servername localhost </dev/null 2>/dev/null |
      grep -m1 '^New,')"
  done
} > "$OUT/tls.txt"

{
  echo "date: $(date -Is)"; echo "kernel: $(uname -r)"; echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
  echo "cores: $ncpu (servers on $SERVER_CPU, load generator on $CLIENT_CPU)"
  echo "duration: $DURATION  reps: $REPS  conns: $CONNS  warmup: $WARMUP  tokens: $TOKENS"
  echo "nginx: $(nginx -v 2>&1)"; echo "haproxy: $(haproxy -v | head -1)"; echo "caddy: $(caddy version)"
  echo "wrk: $(wrk -v 2>&1 | head -1)"
  [[ "$PEERS_ONLY" == 1 ]] || echo "portcullis: $PC_BIN ($(stat -c %y "$PC_BIN"))"
} > "$OUT/meta.txt"

# measure CASE C OUT RUNNER PARSER: one measured run, repeated while the
# hypervisor steals more than MAX_STEAL; the quietest attempt's figures are
# left in steal rps p50 p99 req n2 err note, and its output in OUT.
measure() {
  local name=$1 c=$2 out=$3 runner=$4 parser=$5 attempt best="" s0
  for ((attempt = 1; attempt <= 1 + STEAL_RETRIES; attempt++)); do
    pre_run "$name"
    local pid upid t0 u0
    pid=$(serving_pid "$name"); upid=$(upstream_pid "$name")
    t0=$(cpu_ticks "$pid"); u0=$(cpu_ticks "$upid")
    s0=$(steal_snapshot)
    "$runner" "$name" "$c" "$DURATION" "$out.try$attempt"
    steal=$(steal_pct "$s0" "$(steal_snapshot)")
    if [[ "$name" == *-h2 ]]; then read -r rps p50 p99 req n2 err < <(parse_h2load "$out.try$attempt")
    else read -r rps p50 p99 req n2 err < <("$parser" "$out.try$attempt"); fi
    # Per request of the whole run. None where the count and the CPU window
    # differ: the timeline counts from its second second, h2load leaves out
    # its warm-up, and the cold case's wrk stops with up to c verifications
    # still in flight (whose work is the stand-in's, mostly).
    cpu=-; ucpu=-
    if [[ "$runner" != run_timeline && "$name" != *-h2 && "$name" != portcullis-cold ]]; then
      cpu=$(us_per_req "$t0" "$(cpu_ticks "$pid")" "$req")
      # The upstream direct case is the upstream's own figure.
      [[ "$name" == upstream-direct ]] || ucpu=$(us_per_req "$u0" "$(cpu_ticks "$upid")" "$req")
    fi
    post_run "$name" "$req" "$out.try$attempt"
    if [[ -z "$best" ]] || awk -v a="$steal" -v b="${best%% *}" 'BEGIN { exit !(a < b) }'; then
      best="$steal $rps $p50 $p99 $req $n2 $err $cpu $ucpu $POST_NOTE"; cp "$out.try$attempt" "$out"
    fi
    awk -v a="$steal" -v m="$MAX_STEAL" 'BEGIN { exit !(a <= m) }' && break
    ((attempt > STEAL_RETRIES)) || { log "  $name c=$c: the hypervisor took ${steal}% of the two cores during the run (over ${MAX_STEAL}%): again"; sleep 3; }
  done
  read -r steal rps p50 p99 req n2 err cpu ucpu note <<< "$best"
}

RUN_SEQ=0
# Warm-up: once per long-lived case (Caddy's bcrypt cache, the gateway's L1, TLS session caches).
log "warm-up ($WARMUP per case)"
for name in "${CASES[@]}"; do
  [[ "$name" == portcullis-cold || "$name" == portcullis-l2 ]] && continue
  run_wrk "$name" 64 "$WARMUP" "$RAW/warmup-$name.txt"
done

# ------------------------------------------------------------ measurement --
RUN_CASES=()
for name in "${RUN_ORDER[@]}" "${CASES[@]}"; do
  [[ " ${CASES[*]} " == *" $name "* && " ${RUN_CASES[*]} " != *" $name "* ]] && RUN_CASES+=("$name")
done
total=$(( REPS * $(wc -w <<< "$CONNS") * ${#CASES[@]} ))
log "measuring: ${#CASES[@]} cases x c=[$CONNS] x $REPS reps, $DURATION each ($total runs, interleaved)"
LONG_LIVED=(upstream nginx haproxy caddy); [[ "$PEERS_ONLY" == 1 ]] || LONG_LIVED+=(redis stub pc)
[[ -z "${PID_OF[pc-mem]:-}" ]] || LONG_LIVED+=(pc-mem)
[[ -z "${PID_OF[pc-gfc]:-}" ]] || LONG_LIVED+=(stub-cred stub-proxy pc-gfc pc-gfp)
for ((rep = 1; rep <= REPS; rep++)); do
  for p in "${LONG_LIVED[@]}"; do alive_or_die "$p"; done
  for c in $CONNS; do
    for name in "${RUN_CASES[@]}"; do
      RUN_SEQ=$((RUN_SEQ + 1))
      measure "$name" "$c" "$RAW/$name.c$c.r$rep.txt" run_wrk parse_wrk
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$c" "$rep" "$rps" "$p50" "$p99" "$req" "$n2" "$err" "$note" "$steal" "$cpu" "$ucpu" >> "$RESULTS"
      log "[$RUN_SEQ/$total] rep $rep c=$c $name: $rps req/s, p50 ${p50}ms, p99 ${p99}ms, CPU ${cpu}us/req (upstream ${ucpu}), steal ${steal}%$( ((n2 == 0)) || echo " NON-2XX=$n2")$( ((err == 0)) || echo " sockerr=$err")${note:+ $note}"
      sleep 0.5
    done
  done
done

# Steady state: the baseline and the bar's cases again, with latency_timeline.
STEADY=$OUT/steady.tsv
head -1 "$RESULTS" > "$STEADY"
STEADY_CASES=()
for name in nginx-tls portcullis-bearer portcullis-basic; do
  [[ " ${CASES[*]} " == *" $name "* ]] && STEADY_CASES+=("$name")
done
if ((${#STEADY_CASES[@]} > 1)); then
  log "steady state: ${STEADY_CASES[*]} with latency_timeline, $REPS reps interleaved"
  for ((rep = 1; rep <= REPS; rep++)); do
    for c in $CONNS; do
      for name in "${STEADY_CASES[@]}"; do
        measure "$name" "$c" "$RAW/steady-$name.c$c.r$rep.txt" run_timeline parse_timeline
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$c" "$rep" "$rps" "$p50" "$p99" "$req" "$n2" "$err" "" "$steal" - - >> "$STEADY"
        log "  steady rep $rep c=$c $name: $rps req/s, p50 ${p50}ms, p99 ${p99}ms after the first second, steal ${steal}%$( ((err == 0)) || echo " failed connections=$err")"
        sleep 0.5
      done
    done
  done
fi

[[ -z "${PID_OF[pc-mem]:-}" ]] || MEM_HELD=$(mem_entries)
# Peak RSS of the long-lived processes, read before they stop.
for name in "${CASES[@]}"; do
  p=$(case_process "$name"); [[ -n "$p" && -n "${PID_OF[$p]:-}" ]] || continue
  pid=${PID_OF[$p]}; [[ "$p" == nginx || "$p" == upstream ]] && pid=$(nginx_worker "$pid")
  note_rss "$name" "$(vmhwm_kib "$pid")"
done

# ---------------------------------------------------------------- summary --
median() { sort -g | awk '{a[NR] = $1} END { if (NR == 0) { print 0; exit } if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
col() { awk -F'\t' -v n="$1" -v c="$2" -v k="$3" 'NR > 1 && $1 == n && $2 == c {print $k}' "${TSV:-$RESULTS}"; }
# Median over reps of NAME's figure (req/s unless another column is named)
# divided by BASE's in the same rep: the runs of one rep are minutes apart at
# most, so drift on a shared host cancels.
paired_ratio() {  # paired_ratio NAME C BASE [COLUMN: 4, req/s]
  awk -F'\t' -v n="$1" -v c="$2" -v b="$3" -v k="${4:-4}" 'NR > 1 && $2 == c && $1 == n && $k != "-" {x[$3] = $k}
    NR > 1 && $2 == c && $1 == b && $k != "-" {y[$3] = $k}
    END {for (r in x) if (y[r] > 0) print x[r] / y[r]}' "${TSV:-$RESULTS}" | median
}
# cpu_cell NAME C BASE COLUMN: "median µs (paired ratio to BASE)", or "-" where no run has a figure.
cpu_cell() {
  local us r
  us=$(col "$1" "$2" "$4" | awk '$1 != "-"' | median)
  r=$(paired_ratio "$1" "$2" "$3" "$4" | awk '{ if ($1 > 0) printf "%.2f", $1; else print "-" }')
  awk -v u="$us" -v r="$r" 'BEGIN { if (u > 0) printf "%.1f (%s)", u, r; else print "-" }'
}
fmt_rps() { awk -v r="$1" 'BEGIN { if (r >= 1000) printf "%.1fk", r / 1000; else printf "%.0f", r }'; }
fmt_ms() { awk -v m="$1" 'BEGIN { if (m >= 100) printf "%.0f", m; else if (m >= 10) printf "%.1f", m; else printf "%.2f", m }'; }

run_notes() {  # run_notes NAME C: sets notes=() to what went wrong in the case's runs
  notes=()
  local bad errs stolen
  bad=$(col "$1" "$2" 8 | awk '{s += $1} END {print s + 0}'); ((bad == 0)) || notes+=("$bad non-2xx!")
  errs=$(col "$1" "$2" 9 | awk '{s += $1} END {print s + 0}'); ((errs == 0)) || notes+=("$errs socket errors")
  stolen=$(col "$1" "$2" 11 | awk -v m="$MAX_STEAL" '$1 > m {n++} END {print n + 0}')
  ((stolen == 0)) || notes+=("$stolen of $REPS runs kept with steal over ${MAX_STEAL}% (no quieter attempt)")
}
MAIN_CASES=(); E2E_CASES=()
for name in "${CASES[@]}"; do
  if [[ "$name" == grafana-* ]]; then E2E_CASES+=("$name"); else MAIN_CASES+=("$name"); fi
done
TABLE=$OUT/table.md
{
  echo "Portcullis benchmark — $(date '+%Y-%m-%d %H:%M'), $DURATION runs, $REPS reps interleaved, servers on core $SERVER_CPU, wrk -t1 on core $CLIENT_CPU, HTTP/1.1 keep-alive"
  echo
  echo "| case | c | req/s median (min..max) | p50 ms | p99 ms | vs nginx TLS | CPU µs/req (vs nginx) | upstream CPU µs/req (vs nginx) | peak RSS | notes |"
  echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"
  for c in $CONNS; do
    for name in "${MAIN_CASES[@]}"; do
      rps=$(col "$name" "$c" 4 | median); mn=$(col "$name" "$c" 4 | sort -g | head -1); mx=$(col "$name" "$c" 4 | sort -g | tail -1)
      p50=$(col "$name" "$c" 5 | median); p99=$(col "$name" "$c" 6 | median)
      base_name=nginx-tls; [[ "$name" != *-h2 ]] || base_name=nginx-tls-h2
      ratio=$(paired_ratio "$name" "$c" "$base_name" | awk '{ if ($1 > 0) printf "%.2f", $1; else print "-" }')
      rss=${RSS_KIB[$name]:-0}; rss=$(awk -v k="$rss" 'BEGIN { if (k > 0) printf "%.1f MiB", k / 1024; else print "-" }')
      run_notes "$name" "$c"
      case $name in
        portcullis-cold)
          notes+=("$(col "$name" "$c" 7 | median | cut -d. -f1) distinct tokens/run (of $TOKENS), each sent once, fresh gateway; merged: $MERGE_REQUESTS requests at c=256 with one new token made $MERGE_VERIFICATIONS verification") ;;
        portcullis-l2)
          hits=$(col "$name" "$c" 10 | sed 's/l2hits=//' | awk '{s += $1} END {print s + 0}')
          reqs=$(col "$name" "$c" 7 | awk '{s += $1} END {print s + 0}')
          notes+=("$(awk -v h="$hits" -v r="$reqs" 'BEGIN { if (r > 0) printf "%.0f%%", 100 * h / r; else print "?" }') of requests were Redis hits, L1=$L2_L1_ENTRIES, fresh gateway") ;;
        portcullis-bearer|portcullis-basic|portcullis-cookie) notes+=("one gateway process") ;;
        portcullis-mem)
          notes+=("L1 held ${MEM_HELD:-?} identities at the end; RSS $(awk -v k="${MEM_FILLED_KIB:-0}" 'BEGIN { printf "%.1f", k / 1024 }') MiB idle once filled, $(awk -v k="${MEM_START_KIB:-0}" 'BEGIN { printf "%.1f", k / 1024 }') MiB empty") ;;
      esac
      n=""; for x in "${notes[@]}"; do n+="${n:+; }$x"; done
      if [[ "$name" == *-h2 ]]; then p50=-; p99=-; else p50=$(fmt_ms "$p50"); p99=$(fmt_ms "$p99"); fi
      echo "| $(describe "$name") | $c | $(fmt_rps "$rps") ($(fmt_rps "$mn")..$(fmt_rps "$mx")) | $p50 | $p99 | $ratio | $(cpu_cell "$name" "$c" "$base_name" 12) | $(cpu_cell "$name" "$c" "$base_name" 13) | $rss | $n |"
    done
  done
  echo
  if ((${#E2E_CASES[@]})); then
    echo "End to end through Grafana: the Grafana stand-in (PBKDF2, 10,000 iterations, for every password it checks, as Grafana) is the upstream, on the same core; wrk asks GET /api/user as admin. \"vs nginx\" and the brackets are paired per rep with nginx's TLS proxy forwarding the same credential to the stand-in (what PMM does today). Stand-in CPU is its own user + system time per request (all its threads: the hashing runs on its blocking pool); proxy CPU is the proxy's (nginx's worker, or the gateway)."
    echo
    echo "| case | c | req/s median (min..max) | p50 ms | p99 ms | vs nginx | stand-in CPU µs/req (vs nginx) | proxy CPU µs/req (vs nginx) | notes |"
    echo "|---|---:|---|---:|---:|---:|---:|---:|---|"
    for c in $CONNS; do
      for name in "${E2E_CASES[@]}"; do
        base_name=grafana-nginx-${name##*-}
        rps=$(col "$name" "$c" 4 | median); mn=$(col "$name" "$c" 4 | sort -g | head -1); mx=$(col "$name" "$c" 4 | sort -g | tail -1)
        ratio=$(paired_ratio "$name" "$c" "$base_name" | awk '{ if ($1 > 0) printf "%.2f", $1; else print "-" }')
        run_notes "$name" "$c"
        n=""; for x in "${notes[@]}"; do n+="${n:+; }$x"; done
        echo "| $(describe "$name") | $c | $(fmt_rps "$rps") ($(fmt_rps "$mn")..$(fmt_rps "$mx")) | $(fmt_ms "$(col "$name" "$c" 5 | median)") | $(fmt_ms "$(col "$name" "$c" 6 | median)") | $ratio | $(cpu_cell "$name" "$c" "$base_name" 13) | $(cpu_cell "$name" "$c" "$base_name" 12) | $n |"
      done
    done
    echo
    if [[ " ${E2E_CASES[*]} " == *" grafana-credential-basic "* && " ${E2E_CASES[*]} " == *" grafana-auth-proxy-basic "* ]]; then
      e2e=()
      for c in $CONNS; do
        e2e+=("c=$c: $(printf '%.2f' "$(paired_ratio grafana-auth-proxy-basic "$c" grafana-credential-basic)")x req/s, stand-in CPU per request $(printf '%.3f' "$(paired_ratio grafana-auth-proxy-basic "$c" grafana-credential-basic 13)")x")
      done
      echo "Basic, auth_proxy mode against credential mode, paired per rep: $(IFS=';'; echo "${e2e[*]}" | sed 's/;/; /g')"
      echo
    fi
  fi
  if ((${#STEADY_CASES[@]} > 1)); then
    echo "Steady state: the same cases with latency_timeline (the repo's tokio + rustls closed loop, c connections, same pinning and steal rule), counting only requests started after each run's first second, when every connection's handshake is done:"
    echo
    echo "| case | c | req/s median (min..max) | p50 ms | p99 ms | vs nginx TLS |"
    echo "|---|---:|---|---:|---:|---:|"
    for c in $CONNS; do
      for name in "${STEADY_CASES[@]}"; do
        rps=$(TSV=$STEADY col "$name" "$c" 4 | median); mn=$(TSV=$STEADY col "$name" "$c" 4 | sort -g | head -1); mx=$(TSV=$STEADY col "$name" "$c" 4 | sort -g | tail -1)
        ratio=$(TSV=$STEADY paired_ratio "$name" "$c" nginx-tls | awk '{ if ($1 > 0) printf "%.2f", $1; else print "-" }')
        echo "| $(describe "$name") | $c | $(fmt_rps "$rps") ($(fmt_rps "$mn")..$(fmt_rps "$mx")) | $(fmt_ms "$(TSV=$STEADY col "$name" "$c" 5 | median)") | $(fmt_ms "$(TSV=$STEADY col "$name" "$c" 6 | median)") | $ratio |"
      done
    done
    echo
  fi
  # The issue's bar, read off the rows above.
  bar_items() {  # bar_items LABEL: the bar's cache-hit items from ${TSV:-$RESULTS}
    local c name r p pb verdict
    for c in $CONNS; do
      for name in portcullis-bearer portcullis-basic; do
        [[ " ${CASES[*]} " == *" $name "* ]] || continue
        r=$(paired_ratio "$name" "$c" nginx-tls); p=$(col "$name" "$c" 6 | median); pb=$(col nginx-tls "$c" 6 | median)
        verdict=$(awk -v r="$r" -v p="$p" -v pb="$pb" 'BEGIN { print (r >= 1 && p <= pb) ? "met" : "NOT met" }')
        bar+=("$1${name#portcullis-} c=$c: $(printf '%.2f' "$r")x, p99 $(fmt_ms "$p") vs $(fmt_ms "$pb") ms: $verdict")
      done
    done
  }
  bar=()
  bar_items "wrk "
  ((${#STEADY_CASES[@]} < 2)) || TSV=$STEADY bar_items "steady "
  if [[ -n "${RSS_KIB[portcullis-mem]:-}" ]]; then
    bar+=("memory: $(awk -v k="${RSS_KIB[portcullis-mem]}" 'BEGIN { printf "%.1f", k / 1024 }') MiB peak with ${MEM_HELD:-?} identities: $(awk -v k="${RSS_KIB[portcullis-mem]}" 'BEGIN { print (k < 65536) ? "met" : "NOT met" }')")
  fi
  if ((${#bar[@]})); then
    echo "Bar (cache hit >= 1.00x nginx TLS req/s with p99 no worse; under 64 MiB with 100,000 identities): $(IFS=';'; echo "${bar[*]}" | sed 's/;/; /g')"
    echo
  fi
  if [[ " ${CASES[*]} " == *" nginx-tls-fwd "* && " ${CASES[*]} " == *" portcullis-bearer "* ]]; then
    like=()
    for c in $CONNS; do
      like+=("c=$c: $(printf '%.2f' "$(paired_ratio portcullis-bearer "$c" nginx-tls-fwd)")x, p99 $(fmt_ms "$(col portcullis-bearer "$c" 6 | median)") vs $(fmt_ms "$(col nginx-tls-fwd "$c" 6 | median)") ms")
    done
    echo "Like for like (the upstream receives the same header lines from both): Portcullis Bearer cache hit against nginx's plain TLS proxy forwarding those lines, paired per rep: $(IFS=';'; echo "${like[*]}" | sed 's/;/; /g')"
    echo
  fi
  echo "Steal (CPU time the hypervisor gave to other guests) was read from /proc/stat around every run; a run over ${MAX_STEAL}% was repeated up to $STEAL_RETRIES times and the quietest attempt kept (median over kept runs: $(awk -F'\t' 'NR > 1 {print $11}' "$RESULTS" | median)%; results.tsv has each run's)."
  echo
  echo "Ratios are taken in this run only: for each rep, the case's req/s over nginx's plain TLS proxy's in the same rep at the same c, and the median of those per-rep ratios (HTTP/2 rows: against nginx's HTTP/2 row; h2load gives no percentiles). CPU µs/req is the serving process's user + system time (/proc/PID/stat, which leaves out the hypervisor's steal) over the run's requests, median over reps, and in brackets the median per-rep ratio to nginx's TLS proxy: the work the proxy itself does per request, whatever the upstream costs and however much the hypervisor steals (the host's shared caches still move it from run to run). Upstream CPU µs/req is the same measure for the upstream's worker during the run: what each proxy's forwarded requests cost the server behind it, on the same core (Portcullis adds X-Forwarded-For/-Proto/-Host and its identity headers and passes the credential on, which the upstream parses; nginx's plain proxy sends Host alone). None for the cold case, HTTP/2 rows and the steady-state pass, whose counts do not cover the whole run. Peak RSS is VmHWM of the serving process (nginx: its worker; one process serves all listeners of a peer)."
} > "$TABLE"
echo
cat "$TABLE"
echo
log "raw wrk output: $RAW; per-run results: $RESULTS; TLS parameters: $OUT/tls.txt"
