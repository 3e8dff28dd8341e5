#!/usr/bin/env bash
# bench-coordinator.sh: map fan-out benchmark. For each N, a fresh coordinator (release build) on
# loopback and N simulated nodes (examples/swarm.rs: real TS2021, Noise + HTTP/2, pre-auth key
# registration, one map stream each, several nodes per thread); one node then changes its
# endpoints CHANGES times and each change is timed until every other stream has it.
#
# Usage: scripts/bench-coordinator.sh [N...]        (default: 100 1000 5000 10000)
# Environment:
#   CHANGES=10     measured endpoint changes per N (after one warm-up change)
#   THREADS=2      swarm threads (each a current-thread runtime driving N/THREADS nodes)
#   KEEP=1         keep the work directory (coordinator log, database)
# Output: progress on stderr, then a Markdown table on stdout, one row per N:
#   registration rate (nodes/s, pre-auth key, no streams open yet), time until every map stream
#   had its first full map, p50/p99 over the changes of the time until the LAST stream received
#   the change, p99 of the single-stream delivery times, coordinator CPU seconds per change
#   (utime+stime from /proc/PID/stat over the measured changes), coordinator resident memory
#   after the run and its peak, database size (file + WAL).
# Every node talks from 127.0.0.1: one TCP connection per node, so up to ~28,000 nodes fit the
# default ephemeral port range; the script raises `ulimit -n` and turns the per-source rate limit off.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- 100 1000 5000 10000
CHANGES=${CHANGES:-10}
THREADS=${THREADS:-2}

cargo build --release --bin tinyscale --example swarm >&2
target=${CARGO_TARGET_DIR:-target}
T=$target/release/tinyscale
SWARM=$target/release/examples/swarm
max=0
for n in "$@"; do [ "$n" -gt "$max" ] && max=$n; done
ulimit -n $((max * 2 + 1024)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"

dir=$(mktemp -d /tmp/tinyscale-bench.XXXXXX)
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    if [ -n "${KEEP:-}" ]; then echo "kept $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT INT TERM

echo "| N | registration (nodes/s) | all streams up (s) | change to all streams p50 (ms) | p99 (ms) | per-stream p99 (ms) | coordinator CPU s/change | RSS (MiB) | peak RSS (MiB) | DB (MiB) |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for n in "$@"; do
    run=$dir/n$n
    mkdir -p "$run"
    port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
    cat > "$run/tinyscale.conf" <<CONF
config server 'main'
	option server_url 'http://127.0.0.1:$port'
	option listen_addr '127.0.0.1:$port'
	option db_path '$run/db.sqlite'
	option unix_socket '$run/admin.sock'
	option base_domain 'bench.tailnet'
	option log_level 'warn'
	option max_connections '$((n + 256))'
	option max_connections_per_ip '$((n + 256))'
	option rate_limit '0'
CONF
    S() { "$T" server --config "$run/tinyscale.conf" "$@"; }
    "$T" server serve --config "$run/tinyscale.conf" 2>"$run/server.log" &
    pid=$!
    deadline=$((SECONDS + 20))
    until S users list >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "coordinator did not start, see $run/server.log" >&2; exit 1; }
        sleep 0.1
    done
    S users create bench >/dev/null
    key=$(S preauthkeys create --user bench --reusable --expiration 24h -o json | python3 -c 'import json,sys;print(json.load(sys.stdin)["key"])')
    echo "== N=$n" >&2
    line=$("$SWARM" "http://127.0.0.1:$port" "$key" "$n" --changes "$CHANGES" --threads "$THREADS" \
        --pid "$pid" --db "$run/db.sqlite" | grep '^RESULT') || { echo "swarm failed for N=$n" >&2; exit 1; }
    echo "$line" >&2
    v() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$line"; }
    echo "| $n | $(v reg_rate) | $(v streams_s) | $(v all_p50_ms) | $(v all_p99_ms) | $(v stream_p99_ms) | $(v cpu_s_per_change) | $(v rss_mib) | $(v peak_rss_mib) | $(v db_mib) |"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
done
