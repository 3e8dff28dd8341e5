#!/usr/bin/env bash
# ci-cross.sh — the CI job for the router builds (issue 3). Run as root on
# Debian 12 x86_64, from any directory; works on a fresh machine (the toolchain
# cache of scripts/cross-build.sh only makes a rerun faster).
#
#   1. scripts/cross-build.sh setup --with-smoke-tools
#   2. build x86_64-unknown-linux-musl and mipsel-unknown-linux-musl, feature set
#      "everything" (--no-default-features --features coordinator,tls), --locked
#   3. smoke tests of the mipsel binary under qemu-user (and `version` natively on x86_64):
#        tinyscale version                      prints a version
#        tinyscale stun --listen 127.0.0.1:P    answers coturn's turnutils_stunclient
#        tinyscale server serve --config F      answers GET /key?v=130 with "publicKey"
#      and the .ipk: scripts/package.sh twice (byte-identical), scripts/package-check.sh
#   4. scripts/size-report.sh (mipsel + x86_64, both feature sets, against the budgets)
#   5. scripts/check-deps.sh (dependency tree = scripts/deps.txt)
#
# Prints PASS/FAIL per check and ends with the line "N passed, N failed[, N skipped]";
# exits 1 when anything failed. Logs: $CI_CROSS_LOGS (default <repo>/target-cross/ci-logs).
# Builds go to <toolchain cache>/ci-target/<variant> (reused between runs; see below)
# unless CARGO_TARGET_DIR is set or CI_CROSS_FRESH=1.
# No fixed sleeps: every wait polls a condition until a deadline.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CROSS=$HERE/cross-build.sh
LOGS=${CI_CROSS_LOGS:-$REPO/target-cross/ci-logs}
MIPSEL=mipsel-unknown-linux-musl
X86=x86_64-unknown-linux-musl
EVERYTHING="--no-default-features --features coordinator,tls"
mkdir -p "$LOGS"
# Reuse compiled std/dependencies across CI runs on this machine (CI clones the
# repo afresh each time): a target dir beside the toolchain cache. Only a speed-up:
# an empty or deleted one just means a full build. CI_CROSS_FRESH=1 builds in the
# clone instead.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -z "${CI_CROSS_FRESH:-}" ]; then
  export CARGO_TARGET_DIR; CARGO_TARGET_DIR="$("$CROSS" cache)/ci-target/$("$CROSS" variant)"
fi
# Runtime files (db, unix socket) go in a short temp dir: socket paths max 107 bytes.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tinyscale-ci.XXXXXX")
PIDS=()
passed=0 failed=0 skipped=0

cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT

pass() { passed=$((passed + 1)); echo "PASS: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }
skip() { skipped=$((skipped + 1)); echo "SKIP: $*"; }
tail_log() { echo "  --- last lines of $1:"; tail -n "${2:-25}" "$1" | sed 's/^/  | /'; }

# wait_until <seconds> <command...>: poll the command until it succeeds or the deadline passes.
wait_until() {
  local deadline=$(( $(date +%s) + $1 )); shift
  while :; do
    "$@" && return 0
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

alive() { kill -0 "$1" 2>/dev/null; }

free_port() {  # tcp|udp -> an unused port on 127.0.0.1
  local proto=$1 p flag=t
  [ "$proto" = udp ] && flag=u
  for _ in $(seq 50); do
    p=$(( 20000 + RANDOM % 30000 ))
    [ -z "$(ss -Hln$flag "sport = :$p" 2>/dev/null)" ] && { echo "$p"; return 0; }
  done
  return 1
}

# http_get <port> <path>: plain HTTP/1.1 over bash's /dev/tcp (no curl needed).
http_get() {
  ( exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$2" "$1" >&3
    timeout 10 cat <&3 ) 2>/dev/null
}

timed() {  # timed <log> <command...>: stdout to <log>.out, stderr to <log>; sets SECS
  local log=$1 start rc; shift
  start=$(date +%s)
  "$@" >"$log.out" 2>"$log"; rc=$?
  SECS=$(( $(date +%s) - start ))
  return $rc
}

# ------------------------------------------------------------------ 1. setup
setup_ok=1
if timed "$LOGS/setup.log" "$CROSS" setup --with-smoke-tools; then
  pass "setup (${SECS}s)"
else
  fail "setup (${SECS}s)"; tail_log "$LOGS/setup.log"; setup_ok=
fi

# ------------------------------------------------------------------ 2. builds
declare -A BIN=()
for t in $X86 $MIPSEL; do
  if [ -z "$setup_ok" ]; then skip "build $t [everything] (no toolchain)"; continue; fi
  # shellcheck disable=SC2086
  if timed "$LOGS/build-$t.log" "$CROSS" build "$t" $EVERYTHING --locked; then
    out=$(tail -n1 "$LOGS/build-$t.log.out")
    # size-report rebuilds other feature sets into the same path: keep this one.
    cp "$out" "$WORK/tinyscale-$t"; BIN[$t]=$WORK/tinyscale-$t
    pass "build $t [everything] (${SECS}s, $(stat -c %s "$out") bytes, static+stripped)"
  else
    fail "build $t [everything] (${SECS}s)"; tail_log "$LOGS/build-$t.log" 40
  fi
done

# ------------------------------------------------------------------ 3. smoke tests
# start_bg <target> <args...>: the kept binary in the background, under qemu-user for
# foreign targets. A simple command (cross-build.sh run execs the emulator), so $!
# is the emulator's own PID and cleanup kills exactly it.
start_bg() { local t=$1; shift; TINYSCALE_BIN=${BIN[$t]} "$CROSS" run "$t" "$@" & }

smoke_version() {  # <target>
  local t=$1 log=$LOGS/smoke-version-$1.log
  if timeout 60 env TINYSCALE_BIN="${BIN[$t]}" "$CROSS" run "$t" version >"$log" 2>&1 \
     && grep -qE '[0-9]+\.[0-9]+\.[0-9]+' "$log"; then
    pass "$t: tinyscale version -> $(head -n1 "$log")"
  else
    fail "$t: tinyscale version printed no version"; tail_log "$log"
  fi
}

stun_answers() {  # <port> <log>
  timeout 5 turnutils_stunclient -p "$1" 127.0.0.1 >"$2" 2>&1 || true
  grep -qiE 'reflexive addr.*127\.0\.0\.1:[0-9]+' "$2"
}

smoke_stun() {
  local t=$MIPSEL log=$LOGS/smoke-stun-server.log port pid
  command -v turnutils_stunclient >/dev/null || { fail "$t: stun: turnutils_stunclient missing (apt package coturn)"; return; }
  port=$(free_port udp) || { fail "$t: stun: no free UDP port"; return; }
  start_bg "$t" stun --listen "127.0.0.1:$port" >"$log" 2>&1
  pid=$!; PIDS+=("$pid")
  # UDP has no "connect succeeded": poll real binding requests until one is answered.
  if wait_until 60 stun_answers "$port" "$LOGS/smoke-stun-client.log"; then
    pass "$t: tinyscale stun answered a STUN binding request from turnutils_stunclient ($(grep -iE -m1 'reflexive addr' "$LOGS/smoke-stun-client.log" | sed 's/^ *//'))"
  else
    fail "$t: tinyscale stun --listen 127.0.0.1:$port did not answer turnutils_stunclient within 60s$(alive "$pid" || echo ' (process exited)')"
    tail_log "$log"; tail_log "$LOGS/smoke-stun-client.log" 10
  fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
}

key_served() {  # <port> <pid> <out>; stops polling early (status 0) when the process died
  alive "$2" || return 0
  http_get "$1" '/key?v=130' >"$3"
  grep -q '"publicKey"' "$3"
}

smoke_server() {
  local t=$MIPSEL log=$LOGS/smoke-server.log port pid conf=$WORK/tinyscale.conf
  port=$(free_port tcp) || { fail "$t: server serve: no free TCP port"; return; }
  cat >"$conf" <<EOF
config server 'main'
	option listen_addr '127.0.0.1:$port'
	option server_url 'http://127.0.0.1:$port'
	option db_path '$WORK/db.sqlite'
	option unix_socket '$WORK/server.sock'
EOF
  start_bg "$t" server serve --config "$conf" >"$log" 2>&1
  pid=$!; PIDS+=("$pid")
  if wait_until 90 key_served "$port" "$pid" "$LOGS/smoke-server-key.out" && alive "$pid" \
     && grep -q '"publicKey"' "$LOGS/smoke-server-key.out"; then
    pass "$t: tinyscale server serve answered GET /key?v=130 with $(grep -o '"publicKey" *: *"[^"]\{0,20\}' "$LOGS/smoke-server-key.out" | head -n1)…"
  else
    fail "$t: tinyscale server serve did not answer GET /key?v=130 with \"publicKey\" within 90s$(alive "$pid" || echo ' (process exited)')"
    tail_log "$log"; tail_log "$LOGS/smoke-server-key.out" 10
  fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
}

if [ -n "${BIN[$X86]:-}" ]; then smoke_version $X86; else skip "$X86: version (not built)"; fi
# The .ipk around the mipsel binary: built twice (must be byte-identical), then unpacked as
# opkg does and checked, including `tinyscale version` from the unpacked tree under qemu.
package_ipk() {
  local a b log=$LOGS/package.log
  if a=$("$HERE/package.sh" $MIPSEL --bin "${BIN[$MIPSEL]}" --out "$WORK/ipk-a" 2>"$log") \
     && b=$("$HERE/package.sh" $MIPSEL --bin "${BIN[$MIPSEL]}" --out "$WORK/ipk-b" 2>>"$log"); then
    if cmp -s "$a" "$b"; then pass "package.sh $MIPSEL: $(basename "$a"), $(stat -c %s "$a") bytes, reproducible"
    else fail "package.sh $MIPSEL: two builds differ"; fi
    if "$HERE/package-check.sh" "$a" $MIPSEL >"$LOGS/package-check.log" 2>&1; then
      pass "package-check.sh: $(tail -n1 "$LOGS/package-check.log")"
    else
      fail "package-check.sh: $(tail -n1 "$LOGS/package-check.log")"; grep FAIL "$LOGS/package-check.log" | sed 's/^/  /'
    fi
  else
    fail "package.sh $MIPSEL"; tail_log "$log"
  fi
}

if [ -n "${BIN[$MIPSEL]:-}" ]; then
  smoke_version $MIPSEL
  smoke_stun
  smoke_server
  package_ipk
else
  for c in version stun "server serve" "ipk package"; do skip "$MIPSEL: $c (not built)"; done
fi

# ------------------------------------------------------------------ 4. size budgets
if [ -n "$setup_ok" ]; then
  if timed "$LOGS/size-report.log" "$HERE/size-report.sh" --cargo-args --locked $MIPSEL $X86; then
    pass "size budgets (${SECS}s): $(tail -n1 "$LOGS/size-report.log.out")"
  else
    fail "size budgets (${SECS}s)"
  fi
  # The table (and the contributors) belong in the CI log either way.
  sed 's/^/  /' "$LOGS/size-report.log.out"
  grep -E '^error|FAIL' "$LOGS/size-report.log" | head -n 20 | sed 's/^/  /'
else
  skip "size budgets (no toolchain)"
fi

# ------------------------------------------------------------------ 5. dependency snapshot
if timed "$LOGS/check-deps.log" "$HERE/check-deps.sh"; then
  pass "dependency tree matches scripts/deps.txt (${SECS}s)"
else
  fail "dependency tree differs from scripts/deps.txt (${SECS}s)"
  sed 's/^/  /' "$LOGS/check-deps.log.out" | head -n 80; tail_log "$LOGS/check-deps.log" 10
fi

echo
echo "$passed passed, $failed failed$([ "$skipped" -gt 0 ] && echo ", $skipped skipped")"
[ "$failed" -eq 0 ]
