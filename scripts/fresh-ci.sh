#!/usr/bin/env bash
# fresh-ci.sh — rehearse CI as a new machine sees it, before submitting:
#   1. clone this repository's HEAD (committed work only) into a temporary folder, with
#      the workspace's shared/ folder beside the clone as CI has it;
#   2. a clean cargo target dir (the clone's own), a fresh router toolchain cache
#      (TINYSCALE_CROSS_CACHE inside the temporary folder) and fresh cross builds
#      (CI_CROSS_FRESH=1), so nothing cached on this machine hides a failure;
#   3. `bash .ci/run` in the clone, as root; its output goes to the terminal and to
#      <tmp>/ci.log; the exit status is .ci/run's.
#
#   scripts/fresh-ci.sh [--upgrade-toolchain] [--keep]
#     --upgrade-toolchain  first upgrade rustc-web, cargo-web, rust-web-src to what apt
#                          offers now (a fresh machine installs the newest: this is how
#                          a Debian toolchain move shows up here before it shows up in CI)
#     --keep               leave the temporary folder (default: removed after a pass)
#
# Environment: TINYSCALE_SHARED (default <repo>/../shared), TMPDIR.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${TINYSCALE_SHARED:-$REPO/../shared}
upgrade= keep=
for a in "$@"; do
  case "$a" in
    --upgrade-toolchain) upgrade=1 ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fresh-ci: unknown option $a" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "fresh-ci: run as root, as CI does" >&2; exit 2; }
[ -d "$SHARED" ] || { echo "fresh-ci: $SHARED missing (set TINYSCALE_SHARED)" >&2; exit 2; }

if [ -n "$(git -C "$REPO" status --porcelain)" ]; then
  echo "fresh-ci: WARNING: uncommitted changes are not part of the rehearsal:"
  git -C "$REPO" status --short | sed 's/^/  /'
fi

# What a fresh machine would install, next to what this one has.
for p in rustc-web rust-web-src; do
  inst=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo none)
  cand=$(apt-cache policy "$p" 2>/dev/null | sed -n 's/^ *Candidate: //p')
  echo "fresh-ci: $p installed ${inst:-none}, apt candidate ${cand:-unknown}"
  if [ "$inst" != "$cand" ] && [ -z "$upgrade" ]; then
    echo "fresh-ci: NOTE: a fresh machine gets $p $cand; --upgrade-toolchain rehearses with it"
  fi
done
if [ -n "$upgrade" ]; then
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --only-upgrade \
    rustc-web cargo-web rust-web-src libstd-rust-web-dev >/dev/null
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tinyscale-fresh-ci.XXXXXX")
git clone -q "$REPO" "$tmp/main"
ln -s "$(cd "$SHARED" && pwd)" "$tmp/shared"
echo "fresh-ci: clone of $(git -C "$REPO" rev-parse --short HEAD) in $tmp/main"

start=$(date +%s)
set +e
( cd "$tmp/main" && env -u CARGO_TARGET_DIR TINYSCALE_CROSS_CACHE="$tmp/cross-cache" \
    CI_CROSS_FRESH=1 bash .ci/run ) 2>&1 | tee "$tmp/ci.log"
rc=${PIPESTATUS[0]}
set -e
echo "fresh-ci: .ci/run exited $rc after $(( $(date +%s) - start )) s; log $tmp/ci.log"
if [ "$rc" -eq 0 ] && [ -z "$keep" ]; then rm -rf "$tmp"; else echo "fresh-ci: kept $tmp"; fi
exit "$rc"
