#!/usr/bin/env bash
# bench-rss.sh: the client daemon's memory while LuCI's status page watches it (a benchmark,
# not a CI test). Root. In a private network namespace (nothing touches the host's routes):
# a coordinator with its embedded DERP relay on loopback, BENCH_PEERS control-only peers
# (--tun none), and the measured daemon with its data plane (TUN tinyscale0), all logged in
# with a pre-auth key. Then for BENCH_SECS seconds, once a second, what the LuCI status page
# asks (view/tinyscale/status.js polls status and peers):
#   with TINYSCALE_UBUSD=/path/to/ubusd   a private ubusd on a socket in the work dir; the
#                                         daemon registers `tinyscale` on it; `ubus call
#                                         tinyscale status` and `ubus call tinyscale peers`
#                                         (ubus CLI: TINYSCALE_UBUS, default beside ubusd)
#   without                               `tinyscale status --json` over the local socket
# Prints the daemon's VmRSS and VmHWM (from /proc/PID/status) when Running, the largest VmRSS
# seen while polling, VmRSS/VmHWM at the end, and the goal: VmHWM <= 8 MiB (8192 kB).
# Exit status: 0 when measured and within the goal, 1 over it, 2 when it could not measure.
#
# Usage: scripts/bench-rss.sh
#   TINYSCALE_BIN         measured daemon (default target/release/tinyscale: build it with
#                         `cargo build --release --no-default-features`, the router's build)
#   TINYSCALE_SERVER_BIN  coordinator (default target/debug/tinyscale, built with
#                         --all-features; any binary with the coordinator feature)
#   BENCH_SECS=60 BENCH_PEERS=3 KEEP=1 (keep the work dir)
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BIN=${TINYSCALE_BIN:-$TARGET/release/tinyscale}
SBIN=${TINYSCALE_SERVER_BIN:-$TARGET/debug/tinyscale}
UBUSD=${TINYSCALE_UBUSD:-}
BENCH_SECS=${BENCH_SECS:-60}
BENCH_PEERS=${BENCH_PEERS:-3}
GOAL_KB=8192

die() { echo "bench-rss: $*" >&2; exit 2; }
[[ $(id -u) == 0 ]] || die "needs root (network namespace and TUN device)"
[[ -x $BIN ]] || die "no daemon binary $BIN (cargo build --release --no-default-features, or set TINYSCALE_BIN)"
"$SBIN" server --help >/dev/null 2>&1 || die "$SBIN has no coordinator (set TINYSCALE_SERVER_BIN)"
for t in ip jq; do command -v $t >/dev/null || die "needs $t"; done
if [[ -n $UBUSD ]]; then
	[[ -x $UBUSD ]] || die "TINYSCALE_UBUSD=$UBUSD is not executable"
	UBUS=${TINYSCALE_UBUS:-$(dirname "$UBUSD")/../bin/ubus}
	[[ -x $UBUS ]] || UBUS=$(command -v ubus) || die "no ubus CLI (set TINYSCALE_UBUS)"
fi

NS=tsrss-$$
W=$(mktemp -d /tmp/tinyscale-rss.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	ip netns del "$NS" 2>/dev/null
	if [[ ${KEEP:-0} == 1 ]]; then echo "work dir kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 2' INT TERM
ip netns add "$NS" || die "cannot create network namespace $NS"
ip -n "$NS" link set lo up
# Background processes start with `ip netns exec` itself (it execs, so $! is their pid).
nsx() { ip netns exec "$NS" "$@"; }
# eventually SECS CMD...: poll CMD until it succeeds or SECS pass.
eventually() {
	local end=$((SECONDS + $1))
	shift
	until "$@" >/dev/null 2>&1; do
		((SECONDS < end)) || return 1
		sleep 0.2
	done
}

url=http://127.0.0.1:8080
cat >"$W/server.conf" <<CONF
config server 'main'
	option server_url '$url'
	option listen_addr '127.0.0.1:8080'
	option db_path '$W/db.sqlite'
	option unix_socket '$W/admin.sock'
	option base_domain 'rss.test'
	option derp_server_enabled '1'
	option derp_server_stun_listen_addr '127.0.0.1:3478'
CONF
S() { nsx "$SBIN" server --config "$W/server.conf" "$@"; }
ip netns exec "$NS" "$SBIN" server serve --config "$W/server.conf" 2>"$W/server.log" &
pids+=($!)
eventually 15 S users list || die "coordinator did not start (see $W/server.log with KEEP=1)"
S users create bench >/dev/null || die "users create failed"
key=$(S preauthkeys create --user bench --reusable --expiration 1h -o json | jq -r .key)
[[ -n $key && $key != null ]] || die "no pre-auth key"

# join NAME BIN TUN UBUS: a daemon in the namespace, logged in; its pid in $W/NAME.pid.
join() {
	local n=$1 bin=$2 tun=$3 ubus=$4
	ip netns exec "$NS" env TS_DEBUG_USE_DERP_HTTP=1 "$bin" daemon --state-dir "$W/$n" --socket "$W/$n.sock" --tun "$tun" \
		--port 0 --ubus-socket "$ubus" 2>"$W/$n.log" &
	pids+=($!)
	echo $! >"$W/$n.pid"
	eventually 10 "$bin" status --socket "$W/$n.sock" || die "daemon $n did not start"
	nsx "$bin" up --login-server "$url" --authkey "$key" --hostname "$n" --socket "$W/$n.sock" \
		>/dev/null || die "up failed for $n"
	eventually 30 sh -c "'$bin' status --json --socket '$W/$n.sock' | jq -e '.BackendState == \"Running\"'" ||
		die "daemon $n is not Running"
}
for i in $(seq 1 "$BENCH_PEERS"); do join "peer$i" "$SBIN" none none; done

ubus_sock=none
if [[ -n $UBUSD ]]; then
	ubus_sock=$W/ubus.sock
	"$UBUSD" -s "$ubus_sock" 2>"$W/ubusd.log" &
	pids+=($!)
	eventually 5 test -S "$ubus_sock" || die "ubusd did not start"
fi
join router "$BIN" tinyscale0 "$ubus_sock"
pid=$(cat "$W/router.pid")
[[ $(stat -L -c %d:%i "/proc/$pid/exe") == "$(stat -L -c %d:%i "$BIN")" ]] || die "pid $pid is not $BIN"
if [[ -n $UBUSD ]]; then
	eventually 15 "$UBUS" -s "$ubus_sock" call tinyscale status || die "tinyscale is not registered on ubusd"
	poll() {
		"$UBUS" -s "$ubus_sock" call tinyscale status >/dev/null &&
			"$UBUS" -s "$ubus_sock" call tinyscale peers >"$W/peers.json"
	}
	how="ubus call tinyscale status + peers through $UBUSD"
else
	poll() { "$BIN" status --json --socket "$W/router.sock" >"$W/peers.json"; }
	how="tinyscale status --json"
fi
eventually 30 sh -c "'$BIN' status --json --socket '$W/router.sock' | jq -e '(.Peer | length) == $BENCH_PEERS'" ||
	die "the router does not see its $BENCH_PEERS peers"

kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$pid/status"; }
start_rss=$(kb VmRSS) start_hwm=$(kb VmHWM)
peak=$start_rss fails=0
for _ in $(seq 1 "$BENCH_SECS"); do
	poll || fails=$((fails + 1))
	r=$(kb VmRSS)
	[[ -n $r ]] || die "the daemon exited (see $W/router.log with KEEP=1)"
	((r > peak)) && peak=$r
	sleep 1
done
end_rss=$(kb VmRSS) end_hwm=$(kb VmHWM)
peers=$(jq '.Peer | length' "$W/peers.json" 2>/dev/null)

mb() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
echo "daemon:  $BIN ($(stat -c %s "$BIN") bytes), $BENCH_PEERS peers (last poll saw ${peers:-?})"
echo "polling: $how, once a second for $BENCH_SECS s ($fails failed)"
echo "start:   VmRSS $start_rss kB ($(mb "$start_rss")), VmHWM $start_hwm kB"
echo "peak:    VmRSS $peak kB ($(mb "$peak"))"
echo "end:     VmRSS $end_rss kB ($(mb "$end_rss")), VmHWM $end_hwm kB ($(mb "$end_hwm"))"
if ((end_hwm <= GOAL_KB && fails == 0)); then
	echo "goal:    VmHWM <= $GOAL_KB kB (8 MiB): met"
else
	echo "goal:    VmHWM <= $GOAL_KB kB (8 MiB): NOT met (or $fails polls failed)"
	exit 1
fi
