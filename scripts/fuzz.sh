#!/usr/bin/env bash
# fuzz.sh — build the fuzz targets in fuzz/ (one per wire and file parser) and run each in turn.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]    run each TARGET (default: all) for SECONDS (default 60)
#   scripts/fuzz.sh --build                  only build them
#   scripts/fuzz.sh --list                   print the target names
#
# How they are built: a plain `cargo build --release` of fuzz/ with LLVM's SanitizerCoverage pass
# (-Cpasses=sancov-module + -Cllvm-args, the instrumentation `cargo fuzz --sanitizer none` adds)
# linked against the libFuzzer that libfuzzer-sys bundles. That works on a stable rustc: no
# nightly, no -Z flags, no cargo-fuzz. There is no AddressSanitizer (the parsers are safe Rust);
# debug assertions and overflow checks are on, so a panic or an arithmetic overflow is a crash.
# `cargo fuzz run TARGET` also works where cargo-fuzz and a nightly toolchain are installed.
#
# Corpus: fuzz/corpus/TARGET (kept between runs), first seeded from fuzz/seeds/TARGET.
# A crash leaves fuzz/artifacts/TARGET/crash-*; rerun it with
#   $FUZZ_TARGET_DIR/x86_64-unknown-linux-gnu/release/TARGET fuzz/artifacts/TARGET/crash-...
# and turn it into a regression test in the crate.
# FUZZ_TARGET_DIR defaults to $CARGO_TARGET_DIR/fuzz (else fuzz/target). FUZZ_PROFILE=quick
# builds faster, slower targets (opt-level 1, no debug info; what scripts/test.sh uses).
# Exit: 0 all ran clean, 1 a target crashed or the build failed, 77 no rustc or C++ compiler (skip).
set -u
cd "$(dirname "$0")/.." || exit 1

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^tinyscale-fuzz$'; }

secs=60 build_only=
case "${1:-}" in
    --list) targets; exit 0 ;;
    --build) build_only=1; shift ;;
    '') ;;
    *[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...] | --build | --list" >&2; exit 2 ;;
    *) secs=$1; shift ;;
esac
want=("$@")
[ ${#want[@]} -gt 0 ] || mapfile -t want < <(targets)

host=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')
if [ -z "$host" ] || ! command -v c++ >/dev/null; then
    echo "fuzz: skipped: needs rustc and a C++ compiler (libFuzzer is C++)"
    exit 77
fi
tdir=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}}
tdir=${tdir:-$PWD/fuzz/target}
profile=${FUZZ_PROFILE:-release}
bindir=$tdir/$host/$profile
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
echo "fuzz: building ${#want[@]} target(s) with $(rustc --version) + SanitizerCoverage + bundled libFuzzer"
# --target keeps the flags off build scripts and proc macros (they would not link).
bins=()
for t in "${want[@]}"; do bins+=(--bin "$t"); done
if ! (cd fuzz && RUSTFLAGS="$flags" cargo build --profile "$profile" --quiet --target "$host" --target-dir "$tdir" "${bins[@]}"); then
    echo "fuzz: build failed"
    exit 1
fi
[ -z "$build_only" ] || { echo "fuzz: built in $bindir"; exit 0; }

crashed=()
for t in "${want[@]}"; do
    corpus=fuzz/corpus/$t art=fuzz/artifacts/$t
    mkdir -p "$corpus" "$art"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    log=$(mktemp)
    "$bindir/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 \
        -artifact_prefix="$art/" -print_final_stats=1 "$corpus" "${seeds[@]}" >"$log" 2>&1
    rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n1)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz: $t: ok, ${runs:-?} runs in ${secs}s, ${cov:-cov: ?}, corpus $(find "$corpus" -type f | wc -l)"
    else
        echo "fuzz: $t: CRASH (exit $rc)"
        grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -n 8 | sed 's/^/    /'
        crashed+=("$t")
    fi
    rm -f "$log"
done
[ ${#crashed[@]} -eq 0 ] || echo "fuzz: crashed: ${crashed[*]}"
echo "$((${#want[@]} - ${#crashed[@]})) passed, ${#crashed[@]} failed"
[ ${#crashed[@]} -eq 0 ]
