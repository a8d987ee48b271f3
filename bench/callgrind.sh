# Instructions per request under valgrind's callgrind: the one figure here
# that the host's steal does not move.  Sourced by bench/run.sh when
# BENCH_CALLGRIND=1, after the sanity checks, with every server up; uses its
# variables (RUN, OUT, PORT_*, HOT_TOKEN, PC_BIN, ...) and helpers.
#
# For each case a second copy of the server runs under callgrind, pinned to
# the server core, on its own port (BASE+543 nginx, BASE+573/574 Portcullis).
# wrk drives it with CALLGRIND_CONNS connections for 8 + CALLGRIND_SECONDS
# + 12 s; callgrind's counters are zeroed after the first 8 s (the handshakes
# are over) and dumped CALLGRIND_SECONDS later.  The requests in that window
# are counted at the upstream (nginx stub_status), the same way for every
# proxy.  Under valgrind the CPU reports no SHA extensions, so the sha2
# crate falls back to its software SHA-256 for the cache key's HMAC; on the
# hardware it uses SHA-NI.  That part is reported on its own line.

CALLGRIND_CONNS=${BENCH_CALLGRIND_CONNS:-16}
CALLGRIND_SECONDS=${BENCH_CALLGRIND_SECONDS:-20}
PORT_CG_NGINX=$((BASE + 543))
PORT_CG_PC=$((BASE + 573)); PORT_CG_PC_ADMIN=$((BASE + 574))

upstream_requests() {  # requests the upstream has answered so far
  curl -s --max-time 5 "http://127.0.0.1:$PORT_UPSTREAM/.bench/status" | awk '/^ *[0-9]+ +[0-9]+ +[0-9]+/ {print $3; exit}'
}

# callgrind_case NAME URL HEADER -- CMD...: appends "NAME instructions/request
# sha/request requests" to $RUN/callgrind.results (not printed: a command
# substitution would run it in a subshell, out of reach of the cleanup trap)
callgrind_case() {
  local name=$1 url=$2 header=$3; shift 4
  local out=$RUN/callgrind.$name pid before after total sha requests
  rm -f "$out".*
  start_bg "cg-$name" valgrind --tool=callgrind --callgrind-out-file="$out.%p" "$@"
  pid=${PID_OF[cg-$name]}
  wait_http "cg-$name" "$url"
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CALLGRIND_CONNS" -d"$((CALLGRIND_SECONDS + 20))s" \
    -H "$header" "$url" > "$RAW/callgrind.$name.txt" 2>&1 &
  local wrk=$!
  sleep 8
  callgrind_control -z "$pid" >/dev/null 2>&1
  before=$(upstream_requests)
  sleep "$CALLGRIND_SECONDS"
  callgrind_control -d window "$pid" >/dev/null 2>&1
  after=$(upstream_requests)
  wait "$wrk" || true
  stop_name "cg-$name"
  requests=$((after - before))
  local dump; dump=$(ls -t "$out".*.1 2>/dev/null | head -1)
  [[ -n "$dump" && "$requests" -gt 0 ]] || { log "  $name: no callgrind window ($requests requests)"; return 0; }
  callgrind_annotate --inclusive=yes "$dump" > "$out.annotate.txt" 2>/dev/null || true
  total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$out.annotate.txt")
  # The largest inclusive figure of the SHA-256 block function (0 for nginx).
  sha=$(awk '/sha2::sha256::compress256 \[/ {gsub(",", "", $1); if ($1 > m) m = $1} END {print m + 0}' "$out.annotate.txt")
  printf '%s %d %d %d\n' "$name" $((total / requests)) $((sha / requests)) "$requests" >> "$RUN/callgrind.results"
}

run_callgrind() {
  command -v valgrind >/dev/null && command -v callgrind_control >/dev/null \
    || die "BENCH_CALLGRIND=1 needs valgrind (apt-get install valgrind)"
  log "callgrind: instructions per request, $CALLGRIND_CONNS connections, ${CALLGRIND_SECONDS}s window"
  sed -e "s/127.0.0.1:$PORT_NGINX_TLS /127.0.0.1:$PORT_CG_NGINX /" \
      -e "/^ *listen 127.0.0.1:$PORT_CG_NGINX /!s/^\( *\)listen [^;]*;/\1listen 127.0.0.1:$((PORT_CG_NGINX + 1)) ssl;/" \
      -e "s|^pid .*;|pid $RUN/cg-nginx.pid.nginx;|" \
      -e "s|^error_log .*;|error_log $RUN/cg-nginx.error.log warn;|" \
      "$RUN/nginx-proxy.conf" > "$RUN/cg-nginx.conf"
  sed -e "s/127.0.0.1:$PORT_PC\"/127.0.0.1:$PORT_CG_PC\"/" -e "s/127.0.0.1:$PORT_PC_ADMIN\"/127.0.0.1:$PORT_CG_PC_ADMIN\"/" \
    "$RUN/pc.toml" > "$RUN/cg-pc.toml"
  : > "$RUN/callgrind.results"
  callgrind_case nginx-tls "https://127.0.0.1:$PORT_CG_NGINX/" "X-Bench: callgrind" -- \
    nginx -e stderr -p "$RUN" -c "$RUN/cg-nginx.conf" -g 'master_process off;'
  callgrind_case portcullis-bearer "https://127.0.0.1:$PORT_CG_PC/" "Authorization: Bearer $HOT_TOKEN" -- \
    "$PC_BIN" --config "$RUN/cg-pc.toml"
  callgrind_case portcullis-basic "https://127.0.0.1:$PORT_CG_PC/" "Authorization: Basic $BASIC_GRAFANA_B64" -- \
    "$PC_BIN" --config "$RUN/cg-pc.toml"
  {
    echo "Instructions per request under callgrind ($CALLGRIND_CONNS connections, ${CALLGRIND_SECONDS} s window after 8 s, requests counted at the upstream):"
    echo
    echo "| case | instructions / request | of which software SHA-256 (valgrind only) | without it (on the hardware the HMAC runs on SHA-NI) | requests in the window |"
    echo "|---|---:|---:|---:|---:|"
    local n i s r
    while read -r n i s r; do
      printf '| %s | %d | %d | %d | %d |\n' "$n" "$i" "$s" $((i - s)) "$r"
    done < "$RUN/callgrind.results"
  } | tee "$OUT/callgrind.md"
}
