#!/usr/bin/env bash
# Sans-io rule (STYLE §3): the pure modules listed here must not touch sockets, files, the clock
# or the OS RNG (time and randomness come in as arguments). Prints offending lines, fails if any.
# A new pure module is added to this list.
set -u
cd "$(dirname "$0")/.."
bad=0
PURE="src/wire/keys.rs src/wire/noise.rs src/wire/tailcfg.rs src/wire/zstdframe.rs src/wire/stun.rs src/wire/disco.rs
      src/derp.rs src/derp/frame.rs src/platform/uci.rs src/platform/uci/syntax.rs src/control/netmap.rs src/coordinator/ipam.rs
      src/coordinator/mapper.rs src/coordinator/model.rs src/coordinator/policy.rs src/dataplane/wg.rs src/platform/qr.rs
      src/dataplane/magicsock/demux.rs src/dataplane/magicsock/endpoint.rs src/dataplane/magicsock/addr.rs src/dataplane/magicsock/batch.rs src/dataplane/netcheck.rs
      src/dataplane/tun/gro.rs src/cli/argv.rs src/dataplane/filter.rs src/wire/ubus.rs src/wire/ubus/blobmsg.rs src/dataplane/netmon/rtnl.rs src/dataplane/dns.rs
      src/platform/uci/dnsmasq.rs src/platform/connlimit.rs src/coordinator/api.rs
      src/platform/uci/server.rs src/platform/uci/derp.rs src/wire/prefix.rs src/coordinator/ratelimit.rs
      src/dataplane/engine/derp_home.rs src/dataplane/engine/schedule.rs src/dataplane/routes.rs"
for f in $PURE; do
    grep -q '^#!\[forbid(unsafe_code)\]' "$f" || { echo "$f: missing #![forbid(unsafe_code)]"; bad=1; }
    # Only the non-test part of the file; shells at the bottom behind cfg(feature) are exempt.
    body=$(awk '/^#\[cfg\(test\)\]/{exit} /^#\[cfg\(feature = "relay"\)\]/{exit} /^\/\/ ---- shell ----/{exit} {print}' "$f")
    hits=$(echo "$body" | grep -nE 'tokio::|std::net::(Udp|Tcp)|UdpSocket|TcpStream|std::fs|Instant::now|SystemTime::now|OsRng|thread_rng|rand::rng' | grep -vE '^[0-9]+:[[:space:]]*//' || true)
    if [ -n "$hits" ]; then
        echo "$f: I/O in a pure module:"
        echo "$hits"
        bad=1
    fi
done
[ $bad -eq 0 ] && echo "pure modules are free of I/O"
exit $bad
