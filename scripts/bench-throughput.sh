#!/usr/bin/env bash
# bench-throughput.sh: issue 4's benchmark (not a timed test), in the netns topology of
# scripts/netns-lib.sh. One run, side by side, from ts-a to ts-b (both behind easy NAT):
#   raw           iperf3 straight through the veths and both NATs (nat-b forwards tcp/5201 and
#                 ICMP echo to b), the ceiling
#   wireguard-go  a wireguard-go tunnel (Debian wireguard-go + wireguard-tools) ts-a <-> ts-b,
#                 nat-b forwarding udp/51820; its MTU is set to tinyscale's TUN MTU (1280 unless
#                 the TUN says otherwise) so the comparison is packet for packet
#   tinyscale     the tailnet path a -> b once `tinyscale ping` reports it direct
#   tinyscale-derp the same with UDP blocked between the homes (relayed by DERP region 999)
#   forwarded      a -> a LAN host behind b (ts-lan, 192.168.50.10), b forwarding and
#                  masquerading: wireguard-go-fwd (b's kernel forwards from its wireguard-go
#                  device, nft masquerade) beside tinyscale-fwd (b advertises the subnet, the
#                  coordinator approves it, a accepts it; b's own forwarding and SNAT)
#   filter cost    tinyscale-fwd again with an ACL policy set on the coordinator
#                  (tinyscale-fwd-acl): 200 accept rules b receives (LAN addresses and ports it
#                  serves) that miss the iperf3 flow, then the one that matches it (and an ICMP
#                  rule after that, for the RTT), against tinyscale-fwd without a policy. The
#                  rules judge the flow's SYN; its later segments pass as established (filter.rs),
#                  so the two figures differ by little more than run-to-run noise
# For each: iperf3 TCP throughput (a -> b, BENCH_SECS seconds), ping RTT (20 pings), and the peak
# RSS (VmHWM from /proc/PID/status) of the processes carrying it. Then the ratios
# tinyscale/wireguard-go, direct and forwarded (goal >= 1.0), and tinyscale-fwd-acl/tinyscale-fwd
# (the filter's cost, goal >= 0.95). Root. Exit status: 0 when every path was measured.
#
# Usage: scripts/bench-throughput.sh   (BENCH_SECS=5, BENCH_ONLY=raw,wg,ts,derp,fwd,filter, KEEP=1;
#                                       filter needs fwd)
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/netns-lib.sh
source "$REPO/scripts/netns-lib.sh"

BENCH_SECS=${BENCH_SECS:-5}
BENCH_ONLY=${BENCH_ONLY:-raw,wg,ts,derp,fwd,filter}
IPERF_PORT=5201
WG_PORT=51820
WG_A=192.168.99.1
WG_B=192.168.99.2
FWD_NET=192.168.50.0/24
FWD_GW=192.168.50.1
FWD_HOST=192.168.50.10
FILTER_MISSES=200
MISSING=0
declare -A MBPS RTT RSS NOTE

want() { [[ ,$BENCH_ONLY, == *,$1,* ]]; }

finish() {
	topo_down
	rm -f /var/run/wireguard/ts-wga.sock /var/run/wireguard/ts-wgb.sock
	if [[ ${KEEP:-0} == 1 || $MISSING -gt 0 ]]; then
		echo "logs kept in $WORK" >&2
	else
		rm -rf "$WORK"
	fi
}

# nat_forward H PROTO PORT: nat-H forwards PROTO/PORT on its WAN address to its host (.2); with
# PROTO icmp, echo requests. The benchmark's only inbound holes; the e2e test never uses them.
nat_forward() {
	local h=$1 proto=$2 port=${3:-} lan=${LAN_NET[$1]}.2 rule
	if [[ $proto == icmp ]]; then
		rule="iifname \"ts-wan\" icmp type echo-request dnat to $lan"
	else
		rule="iifname \"ts-wan\" $proto dport $port dnat to $lan"
	fi
	nsx "ts-nat-$h" nft -f - <<EOF
table ip ts-dnat {
	chain pre {
		type nat hook prerouting priority dstnat; policy accept;
	}
}
add rule ip ts-dnat pre $rule
EOF
}

vmhwm() {
	local p
	p=$(pid_of "$1") || return 0
	awk '/^VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null
}

# measure NAME H DST: iperf3 a -> DST and ping RTT; fills MBPS/RTT[NAME].
measure() {
	local name=$1 h=$2 dst=$3 j bps rtt
	j=$(nsx "ts-$h" timeout $((BENCH_SECS + 20)) iperf3 -c "$dst" -p "$IPERF_PORT" -t "$BENCH_SECS" -J 2>&1)
	bps=$(jq -r '.end.sum_received.bits_per_second // empty' <<<"$j" 2>/dev/null)
	if [[ -n $bps ]]; then
		MBPS[$name]=$(awk -v b="$bps" 'BEGIN {printf "%.0f", b / 1e6}')
	else
		MBPS[$name]=n/a
		NOTE[$name]+="iperf3: $(jq -r '.error // empty' <<<"$j" 2>/dev/null || head -c 200 <<<"$j") "
		MISSING=$((MISSING + 1))
	fi
	rtt=$(nsx "ts-$h" ping -n -q -c 20 -i 0.2 -w 10 "$dst" 2>/dev/null | awk -F/ '/^rtt/ {print $5}')
	RTT[$name]=${rtt:-n/a}
	log "$name: ${MBPS[$name]} Mbit/s, rtt ${RTT[$name]} ms"
}

wg_start() {
	local h=$1 me=$2 peer_pub=$3 key=$4 endpoint=${5:-} dev=ts-wg$1 mtu=$6
	spawn "wg-$h" "ts-$h" env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f "$dev"
	eventually 10 ip -n "ts-$h" link show "$dev" || return 1
	eventually 10 test -S "/var/run/wireguard/$dev.sock" || return 1
	# $8: more allowed IPs (the forwarded LAN behind b).
	local args=(set "$dev" private-key "$key" listen-port "$WG_PORT" peer "$peer_pub" allowed-ips "$7/32${8:+,$8}")
	[[ -n $endpoint ]] && args+=(endpoint "$endpoint" persistent-keepalive 25)
	nsx "ts-$h" wg "${args[@]}" || return 1
	ip -n "ts-$h" addr replace "$me/24" dev "$dev"
	ip -n "ts-$h" link set "$dev" mtu "$mtu" up
}

# fwd_lan_up: the LAN behind b for the forwarded paths: ts-lan on b's ts-sub, an iperf3 server.
fwd_lan_up() {
	ensure_ns ts-lan
	ensure_veth ts-b ts-sub ts-lan ts-eth
	ip -n ts-b addr replace "$FWD_GW/24" dev ts-sub
	ip -n ts-b link set ts-sub up
	ip -n ts-lan addr replace "$FWD_HOST/24" dev ts-eth
	ip -n ts-lan link set ts-eth up
	ip -n ts-lan link set lo up
	ip -n ts-lan route replace default via "$FWD_GW"
	spawn iperf-lan ts-lan iperf3 -s -p "$IPERF_PORT"
	eventually 10 nsx ts-lan bash -c "exec 3<>/dev/tcp/127.0.0.1/$IPERF_PORT"
}

# wg_fwd_on / wg_fwd_off: b forwards from its wireguard-go device to the LAN and masquerades,
# as tinyscale does for an approved subnet route (kernel forwarding, nft masquerade).
wg_fwd_on() {
	nsx ts-b sysctl -qw net.ipv4.ip_forward=1
	nsx ts-b nft -f - <<EOF
table ip ts-bench-masq {
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "ts-sub" ip saddr 192.168.99.0/24 masquerade
	}
}
EOF
	ip -n ts-a route replace "$FWD_NET" dev ts-wga
}
wg_fwd_off() {
	nsx ts-b nft delete table ip ts-bench-masq 2>/dev/null
	nsx ts-b sysctl -qw net.ipv4.ip_forward="$B_FWD_ORIG"
}

# ts_fwd_routed: a routes the LAN host into tinyscale0 (the approved route reached it).
ts_fwd_routed() { [[ $(nsx ts-a ip route get "$FWD_HOST" 2>&1) == *"dev tinyscale0"* ]]; }

# filter_policy SRC: the filter-cost policy (HuJSON) in $WORK/filter.hujson: FILTER_MISSES
# accept rules from SRC to LAN addresses and ports b serves but the flow never uses (so b
# receives them all and the flow's packets pass each one), then the flow's own rule, then ICMP.
filter_policy() {
	local src=$1 i f=$WORK/filter.hujson
	{
		echo "// bench-throughput.sh filter cost: $FILTER_MISSES rules that miss the iperf3 flow, then its own"
		echo '{'
		echo '  "acls": ['
		for ((i = 0; i < FILTER_MISSES; i++)); do
			printf '    {"action": "accept", "src": ["%s"], "dst": ["192.168.50.%d:%d"]},\n' \
				"$src" $((100 + i % 100)) $((10000 + i))
		done
		printf '    {"action": "accept", "proto": "tcp", "src": ["%s"], "dst": ["%s:%s"]},\n' "$src" "$FWD_HOST" "$IPERF_PORT"
		printf '    {"action": "accept", "proto": "icmp", "src": ["%s"], "dst": ["%s:*"]},\n' "$src" "$FWD_HOST"
		echo '  ],'
		echo '}'
	} >"$f"
	echo "$f"
}

# b_filter_rules: how many rules b's packet filter holds (`tinyscale debug filter`).
b_filter_rules() {
	timeout 15 ip netns exec ts-b "$BIN" debug filter --socket "$(daemon_sock b)" 2>/dev/null | jq -r '.Rules | length'
}
b_filter_full() { (($(b_filter_rules) >= FILTER_MISSES + 2)); }

ping_and_check_direct() {
	nsx ts-a ping -c 1 -W 1 "$B_IP" >/dev/null 2>&1
	ping_is a b direct
}

ts_need_tools iperf3 wireguard-go wg
ts_workdir
trap finish EXIT
trap 'exit 130' INT TERM
ts_pick_bin
log "work dir $WORK; BENCH_SECS=$BENCH_SECS BENCH_ONLY=$BENCH_ONLY"
if [[ $BIN_SRC == */debug/* ]]; then
	log "WARNING: a debug build; numbers for the record need TINYSCALE_BIN=<a release build>"
fi

topo_down
topo_up
spawn iperf-b ts-b iperf3 -s -p "$IPERF_PORT"
nat_forward b tcp "$IPERF_PORT"
nat_forward b udp "$WG_PORT"
nat_forward b icmp
eventually 10 nsx ts-b bash -c "exec 3<>/dev/tcp/127.0.0.1/$IPERF_PORT" || die "iperf3 server did not start"
B_FWD_ORIG=$(nsx ts-b sysctl -n net.ipv4.ip_forward)
if want fwd; then
	fwd_lan_up || die "the LAN behind ts-b did not come up"
fi

# Tinyscale first: its TUN MTU decides wireguard-go's.
TS_MTU=1280
if want ts || want derp; then
	if coord_start && derp_start; then
		KEY=$(preauth_key bench)
		# The subnet is advertised from the start but approved only for tinyscale-fwd: until then
		# a has no table-53 route that would take the wireguard-go path's packets.
		FWD_FLAGS_A=() FWD_FLAGS_B=()
		if want fwd; then FWD_FLAGS_A=(--accept-routes) FWD_FLAGS_B=(--advertise-routes="$FWD_NET"); fi
		daemon_start a && daemon_start b && daemon_up a "$KEY" "${FWD_FLAGS_A[@]}" && daemon_up b "$KEY" "${FWD_FLAGS_B[@]}"
		eventually 20 is_running a && eventually 20 is_running b
		B_IP=$(node_ip4 b)
		m=$(ip -n ts-a link show tinyscale0 2>/dev/null | grep -o 'mtu [0-9]*' | awk '{print $2}')
		[[ -n $m ]] && TS_MTU=$m
	fi
fi

if want raw; then
	measure raw a "${NAT_WAN[b]}"
	NOTE[raw]+="via nat-b's port forward; "
fi

if want wg; then
	ka=$(wg genkey)
	kb=$(wg genkey)
	printf '%s\n' "$ka" >"$WORK/wga.key"
	printf '%s\n' "$kb" >"$WORK/wgb.key"
	chmod 600 "$WORK"/wg?.key
	fwd_allowed=""
	want fwd && fwd_allowed=$FWD_NET
	if wg_start b "$WG_B" "$(wg pubkey <<<"$ka")" "$WORK/wgb.key" "" "$TS_MTU" "$WG_A" &&
		wg_start a "$WG_A" "$(wg pubkey <<<"$kb")" "$WORK/wga.key" "${NAT_WAN[b]}:$WG_PORT" "$TS_MTU" "$WG_B" "$fwd_allowed" &&
		eventually 10 nsx ts-a ping -c 1 -W 1 "$WG_B"; then
		measure wireguard-go a "$WG_B"
		RSS[wireguard-go]="a=$(vmhwm wg-a) b=$(vmhwm wg-b)"
		NOTE[wireguard-go]+="mtu $TS_MTU; "
		if want fwd; then
			wg_fwd_on
			if eventually 10 nsx ts-a ping -c 1 -W 1 "$FWD_HOST"; then
				measure wireguard-go-fwd a "$FWD_HOST"
				RSS[wireguard-go-fwd]="a=$(vmhwm wg-a) b=$(vmhwm wg-b)"
				NOTE[wireguard-go-fwd]+="$(nsx ts-a ip route get "$FWD_HOST" | head -n1 | awk '{print $2, $3}'); b: kernel forwarding + nft masquerade; "
			else
				MBPS[wireguard-go-fwd]=n/a
				NOTE[wireguard-go-fwd]+="LAN host not reachable through the tunnel; "
				MISSING=$((MISSING + 1))
			fi
			wg_fwd_off
			ip -n ts-a route del "$FWD_NET" dev ts-wga 2>/dev/null
		fi
	else
		MBPS[wireguard-go]=n/a
		NOTE[wireguard-go]+="tunnel did not come up (see $WORK/wg-a.log); "
		MISSING=$((MISSING + 1))
	fi
	stop wg-a
	stop wg-b
fi

if want ts; then
	if [[ -z ${B_IP:-} ]]; then
		MBPS[tinyscale]=n/a
		NOTE[tinyscale]+="no tailnet (coordinator or login failed); "
		MISSING=$((MISSING + 1))
	else
		# Traffic both ways (the echo replies) as well as disco pings: the benchmark wants the direct
		# path however it comes about; netns-e2e.sh step 1 checks that `ping` alone gets there.
		if out=$(eventually_out 30 ping_and_check_direct); then
			NOTE[tinyscale]+="$(ping_ev "$out" | cut -d'|' -f1); "
		else
			NOTE[tinyscale]+="NOT direct: $(ping_ev "$out"); "
			TS_NOT_DIRECT=1
		fi
		measure tinyscale a "$B_IP"
		RSS[tinyscale]="a=$(vmhwm daemon-a) b=$(vmhwm daemon-b)"
		NOTE[tinyscale]+="mtu $TS_MTU; "
	fi
fi

if want fwd; then
	if [[ -z ${B_IP:-} ]]; then
		MBPS[tinyscale-fwd]=n/a
		NOTE[tinyscale-fwd]+="no tailnet; "
		MISSING=$((MISSING + 1))
	elif coord_admin nodes approve-routes -i "$(node_id b)" -r "$FWD_NET" >/dev/null &&
		eventually 20 ts_fwd_routed && eventually 20 nsx ts-a ping -c 1 -W 1 "$FWD_HOST"; then
		measure tinyscale-fwd a "$FWD_HOST"
		RSS[tinyscale-fwd]="a=$(vmhwm daemon-a) b=$(vmhwm daemon-b)"
		NOTE[tinyscale-fwd]+="$(nsx ts-a ip route get "$FWD_HOST" | head -n1 | awk '{print $2, $3, $4, $5}'); b: subnet router, SNAT; "
	else
		MBPS[tinyscale-fwd]=n/a
		NOTE[tinyscale-fwd]+="route not approved or LAN host not reachable; "
		MISSING=$((MISSING + 1))
	fi
fi

if want fwd && want filter; then
	if [[ ${MBPS[tinyscale-fwd]:-n/a} =~ ^[0-9]+$ ]] &&
		coord_admin policy set "$(filter_policy "$(node_ip4 a)")" >/dev/null &&
		eventually 20 b_filter_full && eventually 20 nsx ts-a ping -c 1 -W 1 "$FWD_HOST"; then
		measure tinyscale-fwd-acl a "$FWD_HOST"
		RSS[tinyscale-fwd-acl]="a=$(vmhwm daemon-a) b=$(vmhwm daemon-b)"
		NOTE[tinyscale-fwd-acl]+="policy of $((FILTER_MISSES + 2)) rules, b's filter holds $(b_filter_rules); "
	else
		MBPS[tinyscale-fwd-acl]=n/a
		NOTE[tinyscale-fwd-acl]+="no tinyscale-fwd figure, or the policy did not reach b (filter: $(b_filter_rules) rules); "
		MISSING=$((MISSING + 1))
	fi
	coord_admin policy clear >/dev/null
fi

if want derp; then
	if [[ -z ${B_IP:-} ]]; then
		MBPS[tinyscale-derp]=n/a
		NOTE[tinyscale-derp]+="no tailnet; "
		MISSING=$((MISSING + 1))
	else
		udp_block a b
		if out=$(eventually_out 30 ping_is a b derp); then
			NOTE[tinyscale-derp]+="$(ping_ev "$out" | cut -d'|' -f1); "
		else
			NOTE[tinyscale-derp]+="NOT via DERP: $(ping_ev "$out"); "
		fi
		measure tinyscale-derp a "$B_IP"
		RSS[tinyscale-derp]="a=$(vmhwm daemon-a) b=$(vmhwm daemon-b) derp=$(vmhwm derp)"
		udp_unblock a b
	fi
fi
RSS[raw]=-

echo
printf '%-17s %10s %12s  %-32s %s\n' path Mbit/s "rtt avg ms" "peak RSS kB (VmHWM)" notes
for p in raw wireguard-go tinyscale tinyscale-derp wireguard-go-fwd tinyscale-fwd tinyscale-fwd-acl; do
	[[ -n ${MBPS[$p]+x} ]] || continue
	printf '%-17s %10s %12s  %-32s %s\n' "$p" "${MBPS[$p]}" "${RTT[$p]:-n/a}" "${RSS[$p]:-n/a}" "${NOTE[$p]:-}"
done
ratio=n/a
if [[ ${MBPS[tinyscale]:-n/a} =~ ^[0-9]+$ && ${MBPS[wireguard-go]:-n/a} =~ ^[0-9]+$ && ${MBPS[wireguard-go]} -gt 0 ]]; then
	ratio=$(awk -v t="${MBPS[tinyscale]}" -v w="${MBPS[wireguard-go]}" 'BEGIN {printf "%.2f", t / w}')
fi
[[ ${TS_NOT_DIRECT:-0} == 1 && $ratio != n/a ]] && ratio+=" (tinyscale path was NOT direct)"
echo "ratio tinyscale/wireguard-go: $ratio (goal >= 1.0)"
if want fwd; then
	ratio=n/a
	if [[ ${MBPS[tinyscale-fwd]:-n/a} =~ ^[0-9]+$ && ${MBPS[wireguard-go-fwd]:-n/a} =~ ^[0-9]+$ && ${MBPS[wireguard-go-fwd]} -gt 0 ]]; then
		ratio=$(awk -v t="${MBPS[tinyscale-fwd]}" -v w="${MBPS[wireguard-go-fwd]}" 'BEGIN {printf "%.2f", t / w}')
	fi
	echo "ratio forwarded tinyscale-fwd/wireguard-go-fwd: $ratio (goal >= 1.0)"
fi
if want fwd && want filter; then
	ratio=n/a
	if [[ ${MBPS[tinyscale-fwd-acl]:-n/a} =~ ^[0-9]+$ && ${MBPS[tinyscale-fwd]:-n/a} =~ ^[0-9]+$ && ${MBPS[tinyscale-fwd]} -gt 0 ]]; then
		ratio=$(awk -v t="${MBPS[tinyscale-fwd-acl]}" -v w="${MBPS[tinyscale-fwd]}" 'BEGIN {printf "%.3f", t / w}')
	fi
	echo "filter cost: tinyscale-fwd ${MBPS[tinyscale-fwd]:-n/a} Mbit/s without a policy, tinyscale-fwd-acl ${MBPS[tinyscale-fwd-acl]:-n/a} Mbit/s with $((FILTER_MISSES + 2)) rules; ratio $ratio (goal >= 0.95)"
fi
((MISSING == 0))
