#!/usr/bin/env bash
# The whole test suite, as CI runs it (`bash .ci/run` installs the prerequisites, then calls this).
#   scripts/test.sh            everything: unit, property, in-process, official-Go-client,
#                              lint, purity, dependency snapshot, router cross builds + size budget
#   TINYSCALE_SKIP_CROSS=1     skip the cross builds (a quick local run)
# The last line is the summary: "N passed, N failed" (individual tests and checks).
set -u
cd "$(dirname "$0")/.."

passed=0 failed=0 failures=()
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

export TINYSCALE_REQUIRE_GO=${TINYSCALE_REQUIRE_GO:-1}
export TINYSCALE_REQUIRE_ZBAR=${TINYSCALE_REQUIRE_ZBAR:-1}
# Network-namespace tests (WireGuard interop with wireguard-go) need root, which CI has.
if [ "$(id -u)" = 0 ]; then export TINYSCALE_NETNS=${TINYSCALE_NETNS:-1}; fi
export CARGO_TERM_COLOR=never

step "tests (all features)" cargo test --all-features
step "tests (client-only build)" cargo test --no-default-features --lib
step "clippy (all features)" cargo clippy --all-targets --all-features -- -D warnings
step "clippy (client-only)" cargo clippy --no-default-features -- -D warnings
step "rustfmt" cargo fmt --check
step "sans-io purity" scripts/check-purity.sh
step "dependency snapshot" scripts/check-deps.sh
if [ "$(id -u)" = 0 ] && [ "${TINYSCALE_SKIP_NETNS:-0}" != 1 ]; then
    cargo build --quiet
    step "netns NAT end-to-end (tinyscale x2 + official Go client)" env TINYSCALE_BIN="$PWD/target/debug/tinyscale" scripts/netns-e2e.sh
fi
if [ "${TINYSCALE_SKIP_CROSS:-0}" != 1 ]; then
    step "router builds, qemu smoke test, size budget" scripts/ci-cross.sh
fi

echo
[ ${#failures[@]} -eq 0 ] || printf 'failed step: %s\n' "${failures[@]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
