#!/usr/bin/env bash
# Sans-io rule (STYLE §3): the pure modules listed here must not touch sockets, files, the clock
# or the OS RNG (time and randomness come in as arguments). Prints offending lines, fails if any.
# A new pure module is added to this list.
set -u
cd "$(dirname "$0")/.."
bad=0
PURE="src/keys.rs src/noise.rs src/tailcfg.rs src/zstdframe.rs src/stun.rs src/disco.rs
      src/derp.rs src/derp/frame.rs src/uci.rs src/control/netmap.rs src/coordinator/ipam.rs
      src/coordinator/mapper.rs src/coordinator/model.rs src/coordinator/policy.rs src/wg.rs src/qr.rs
      src/magicsock/demux.rs src/magicsock/endpoint.rs src/magicsock/addr.rs src/magicsock/batch.rs src/netcheck.rs
      src/tun/gro.rs src/cli/argv.rs src/filter.rs src/ubus.rs src/ubus/blobmsg.rs src/netmon/rtnl.rs src/dns.rs
      src/uci/dnsmasq.rs src/connlimit.rs src/coordinator/api.rs"
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
