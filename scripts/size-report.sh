#!/usr/bin/env bash
# size-report.sh — build tinyscale per target x feature set with
# scripts/cross-build.sh, print the stripped size and the `xz -9e` size against
# scripts/size-budgets.txt, then the largest contributors of each build.
# Exits 1 when a budget is exceeded or a build fails.
#
#   scripts/size-report.sh [options] [target...]
#     target...        default: mipsel-unknown-linux-musl x86_64-unknown-linux-musl;
#                      `all` = the five targets of cross-build.sh
#     --sets "A B"     feature sets (default "everything client-only")
#     --top N          contributors shown per build (default 15; 0 = none)
#     --cargo-args "…" extra cargo args for every build (e.g. --locked)
#     --record         after a passing run, write this toolchain's figures into the
#                      "#@accepted" lines of scripts/size-budgets.txt (commit them)
#   scripts/size-report.sh --analyze <binary> <link.map> [--top N]
#                      only print the contributors of an existing build
#
# Every row is also compared with the last accepted figures ("#@accepted" lines
# in scripts/size-budgets.txt): against the same rustc version the difference is
# the code's growth; when only another version's record exists, the row says
# which, so growth from a toolchain move is told apart from growth of the code.
#
# Feature sets:  client-only = --no-default-features --features tls
#                everything  = --no-default-features --features coordinator,tls
#
# Contributors come from the linker map that cross-build.sh always writes
# (<binary>.map beside the binary): with LTO all Rust code is one object,
# but every function keeps its own input section (.text.<mangled name>), so
# bytes are attributed to the crate that defines the function, as cargo-bloat
# does (generic code instantiated for a type counts for the generic's crate, except
# drop_in_place<T>, which counts for T's crate). No second, unstripped build needed.
# Prerequisite: scripts/cross-build.sh setup.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CROSS=$HERE/cross-build.sh
BUDGETS=$HERE/size-budgets.txt
TARGETS=()
SETS="everything client-only"
TOP=15
CARGO_ARGS=
RECORD=
ANALYZE=()

while [ $# -gt 0 ]; do
  case "$1" in
    --sets) SETS=$2; shift 2 ;;
    --top) TOP=$2; shift 2 ;;
    --cargo-args) CARGO_ARGS=$2; shift 2 ;;
    --record) RECORD=1; shift ;;
    --analyze) ANALYZE=("$2" "$3"); shift 3 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    all) read -r -a TARGETS <<<"$("$CROSS" targets | tr '\n' ' ')"; shift ;;
    -*) echo "size-report: unknown option $1" >&2; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(mipsel-unknown-linux-musl x86_64-unknown-linux-musl)

set_args() {
  case "$1" in
    client-only) echo "--no-default-features --features tls" ;;
    everything)  echo "--no-default-features --features coordinator,tls" ;;
    *) echo "size-report: unknown feature set '$1' (client-only, everything)" >&2; return 2 ;;
  esac
}

budget() {  # target set -> "max_stripped max_xz" or empty
  awk -v t="$1" -v s="$2" '!/^[[:space:]]*(#|$)/ && $1==t && $2==s {print $3, $4; exit}' "$BUDGETS"
}

# Accepted figures: "#@accepted <rustc> <target> <set> <stripped> <xz> <date>".
# accepted <rustc> <target> <set> -> "<rustc> <stripped> <xz>": the same toolchain's
# record if there is one, else the last record of any toolchain, else nothing.
accepted() {
  awk -v r="$1" -v t="$2" -v s="$3" '
    $1 == "#@accepted" && $3 == t && $4 == s { any = $2 " " $5 " " $6; if ($2 == r) same = any }
    END { if (same != "") print same; else if (any != "") print any }' "$BUDGETS"
}

signed() { if [ "$1" -ge 0 ]; then echo "+$1"; else echo "$1"; fi; }

# vs_accepted <rustc> <target> <set> <stripped> <xz> -> a short comparison for the table.
vs_accepted() {
  local r s x
  read -r r s x <<<"$(accepted "$1" "$2" "$3")" || true
  if [ -z "${r:-}" ]; then echo "no accepted record"; return; fi
  if [ "$r" = "$1" ]; then
    echo "vs accepted: $(signed $(( $4 - s ))) / xz $(signed $(( $5 - x )))"
  else
    echo "vs accepted with rustc $r: $(signed $(( $4 - s ))) / xz $(signed $(( $5 - x ))) (toolchain moved)"
  fi
}

# record <rustc> <rows file>: replace this toolchain's #@accepted lines for the rows.
record() {
  local rustc=$1 rows=$2 tmp
  tmp=$(mktemp)
  awk -v r="$rustc" -v day="$(date -u +%Y-%m-%d)" '
    FNR == NR { key[$1 " " $2] = $3 " " $4; order[++n] = $1 " " $2; next }
    $1 == "#@accepted" && $2 == r && (($3 " " $4) in key) { next }
    { print }
    END { for (i = 1; i <= n; i++) { split(order[i], k, " "); split(key[order[i]], v, " ")
            printf "#@accepted %s %-31s %-11s %8d %8d %s\n", r, k[1], k[2], v[1], v[2], day } }' \
    "$rows" "$BUDGETS" >"$tmp"
  cat "$tmp" >"$BUDGETS"; rm -f "$tmp"
}

# Allocated, file-backed section names of an ELF (what the stripped file holds).
alloc_sections() {
  readelf -SW "$1" | sed -n 's/^ *\[ *[0-9]*\] //p' | awk '
    $2 != "NOBITS" && $2 != "NULL" { f = (NF >= 10) ? $7 : ""; if (f ~ /A/) printf "%s ", $1 }'
}

# "bytes<TAB>owner<TAB>symbol" for every input section kept in an allocated section.
map_records() {  # map-file alloc-section-list
  awk -v ALLOC="$2" '
    function hex(s,   i, v) { v = 0; s = tolower(s); sub(/^0x/, "", s)
      for (i = 1; i <= length(s); i++) v = v * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
      return v }
    function emit(sec, size, file,   sym, p) {
      if (size <= 0) return
      if (osec ~ /^\.eh_frame/) file = "@unwind"
      sym = "-"
      if ((p = index(sec, "._ZN")) > 0 || (p = index(sec, "._R")) > 0) {
        sym = substr(sec, p + 1); sub(/\.llvm\.[0-9]+$/, "", sym)
      }
      print size "\t" file "\t" sym
    }
    BEGIN { n = split(ALLOC, a, " "); for (i = 1; i <= n; i++) keep[a[i]] = 1 }
    /^Linker script and memory map/ { mm = 1; next }
    !mm { next }
    /^[^ ]/ { osec = $1; pend = ""; next }         # output section (or LOAD/OUTPUT lines)
    !(osec in keep) { next }
    /^ \*/ { pend = ""; next }                     # input spec " *(.text ...)" or " *fill*"
    /^ [^ ]/ {                                     # input section, maybe wrapped
      if (NF >= 4 && $2 ~ /^0x/ && $3 ~ /^0x/) { f = $4; for (i = 5; i <= NF; i++) f = f " " $i; emit($1, hex($3), f); pend = "" }
      else if (NF == 1) pend = $1
      else pend = ""
      next
    }
    /^  +0x/ && pend != "" {
      if (NF >= 3 && $1 ~ /^0x/ && $2 ~ /^0x/) { f = $3; for (i = 4; i <= NF; i++) f = f " " $i; emit(pend, hex($2), f) }
      pend = ""
    }' "$1"
}

# Turn records into "bytes<TAB>crate<TAB>symbol" (demangled, hash dropped).
attribute() {
  c++filt | awk -F'\t' '
    function owner_of_file(f,   a) {
      if (f == "@unwind") return "[unwind tables] .eh_frame(_hdr)"
      if (f ~ /\)$/) { a = f; sub(/\(.*$/, "", a) } else a = f
      sub(/^.*\//, "", a)
      if (a ~ /^libc\.a$/) return "[C] musl libc"
      if (a ~ /^libunwind\.a$/) return "[C] unwinder"
      if (a ~ /^libgcc/) return "[C] libgcc"
      if (a ~ /^crt|^Scrt|^rcrt/) return "[C] crt startup"
      if (a ~ /rcgu\.o$/ || a == "symbols.o") return "[rust] unnamed constants/data"
      if (a == "linker") return "[linker stubs]"
      sub(/^lib/, "", a); sub(/-[0-9a-f]+\.rlib$/, "", a); sub(/\.(a|rlib|o)$/, "", a)
      return "[C] " a
    }
    function strip_refs(s) {
      while (s ~ /^(<|&|\[|\(|mut |dyn |\*const |\*mut |_<)/) sub(/^(<|&|\[|\(|mut |dyn |\*const |\*mut |_<)/, "", s)
      return s
    }
    function first_seg(s,   p) {
      p = index(s, "::"); if (p > 0) s = substr(s, 1, p - 1)
      sub(/[<> ,;\]\)].*$/, "", s)
      return s
    }
    function crate_of(s,   inner, p, self) {
      if (s ~ /^core::ptr::drop_in_place</) s = substr(s, length("core::ptr::drop_in_place<") + 1)
      if (s ~ /^_?</) {
        # <Self as Trait>::f: the crate of Self, or of Trait when Self is a bare
        # generic/primitive ([u8], &T, T), which belongs to no crate.
        inner = s; sub(/^_?</, "", inner)
        p = index(inner, " as ")
        self = strip_refs(p > 0 ? substr(inner, 1, p - 1) : inner)
        if (index(self, "::") > 0 || p == 0) s = self
        else s = strip_refs(substr(inner, p + 4))
      }
      s = first_seg(strip_refs(s))
      return s == "" ? "[rust] ?" : s
    }
    { sym = $3; sub(/::h[0-9a-f]+$/, "", sym)
      if ($3 == "-") print $1 "\t" owner_of_file($2) "\t" "(" owner_of_file($2) ")"
      else print $1 "\t" crate_of(sym) "\t" sym }'
}

contributors() {  # bin map label
  local bin=$1 map=$2 label=$3 total recs
  total=$(stat -c %s "$bin")
  if [ ! -s "$map" ]; then echo "  (no link map at $map)"; return; fi
  recs=$(map_records "$map" "$(alloc_sections "$bin")" | attribute)
  echo "largest contributors: $label, $total bytes (from the link map; LTO code attributed by symbol path)"
  awk -F'\t' -v total="$total" -v top="$TOP" '
    { by[$2] += $1; sum += $1 }
    END { for (c in by) printf "%d\t%s\n", by[c], c
          printf "%d\t%s\n", total - sum, "[ELF headers, alignment, unattributed]" }' <<<"$recs" \
    | sort -t$'\t' -k1,1nr | awk -v n="$TOP" 'NR <= n' \
    | awk -F'\t' -v total="$total" '{ printf "  %9d %5.1f%%  %s\n", $1, 100 * $1 / total, $2 }'
  echo "  largest symbols:"
  sort -t$'\t' -k1,1nr <<<"$recs" | awk -v n="$(( TOP < 10 ? TOP : 10 ))" 'NR <= n' \
    | awk -F'\t' '{ s = $3; if (length(s) > 110) s = substr(s, 1, 107) "..."; printf "  %9d  %s\n", $1, s }'
}

# ------------------------------------------------------------------ main
if [ ${#ANALYZE[@]} -gt 0 ]; then
  contributors "${ANALYZE[0]}" "${ANALYZE[1]}" "$(basename "${ANALYZE[0]}")"
  exit 0
fi
command -v xz >/dev/null || { echo "size-report: xz missing (apt-get install xz-utils)" >&2; exit 2; }
for s in $SETS; do set_args "$s" >/dev/null || exit 2; done
variant=$("$CROSS" variant)
rustc_v=$(/usr/bin/rustc --version 2>/dev/null | cut -d' ' -f2)
rows=() details=() fails=0 measured=$(mktemp)
# The budgets are set for one toolchain ("#@budget-rustc"). Another rustc (Debian
# moves rustc-web within a release: 1.85 -> 1.96 grew every build 3-7%) gets the
# "#@toolchain-allowance" percentage on top, said loudly, so CI stays green across
# the move while the same toolchain keeps the exact budgets.
budget_rustc=$(awk '$1 == "#@budget-rustc" { print $2 }' "$BUDGETS" | tail -n1)
allow=0
if [ -n "$budget_rustc" ] && [ "$budget_rustc" != "$rustc_v" ]; then
  allow=$(awk '$1 == "#@toolchain-allowance" { print $2 + 0 }' "$BUDGETS" | tail -n1)
  allow=${allow:-0}
fi
for t in "${TARGETS[@]}"; do
  for s in $SETS; do
    start=$(date +%s)
    echo "size-report: building $t [$s] ..." >&2
    # shellcheck disable=SC2046,SC2086  # word splitting wanted: argument lists
    if ! bin=$("$CROSS" build "$t" $(set_args "$s") $CARGO_ARGS); then
      rows+=("$(printf '%-31s %-11s %10s %10s %9s %9s %5s  %s' "$t" "$s" - - - - - "FAIL (build failed)")")
      fails=$((fails + 1)); continue
    fi
    secs=$(( $(date +%s) - start ))
    # Keep a copy per feature set: the next build overwrites the cargo output.
    keep="$(dirname "$bin")/size-report/$s"; mkdir -p "$keep"
    cp "$bin" "$keep/"; rm -f "$keep/link.map"; cp "$bin.map" "$keep/link.map" 2>/dev/null || true
    stripped=$(stat -c %s "$bin")
    xzb=$(xz -9e -c "$bin" | wc -c)
    read -r maxs maxx <<<"$(budget "$t" "$s")" || true
    if [ -n "${maxs:-}" ] && [ "$allow" -gt 0 ]; then
      maxs=$(( maxs * (100 + allow) / 100 )) maxx=$(( maxx * (100 + allow) / 100 ))
    fi
    verdict=ok
    if [ -z "${maxs:-}" ]; then verdict="no budget in $(basename "$BUDGETS")"
    else
      [ "$stripped" -le "$maxs" ] || { verdict="FAIL stripped +$((stripped - maxs))"; }
      [ "$xzb" -le "$maxx" ] || { verdict="${verdict/ok/FAIL} xz +$((xzb - maxx))"; }
      [ "${verdict#FAIL}" = "$verdict" ] || fails=$((fails + 1))
    fi
    echo "$t $s $stripped $xzb" >>"$measured"
    rows+=("$(printf '%-31s %-11s %10d %10s %9d %9s %5s  %-24s %s' "$t" "$s" "$stripped" "${maxs:--}" "$xzb" "${maxx:--}" "${secs}s" "$verdict" \
      "$(vs_accepted "$rustc_v" "$t" "$s" "$stripped" "$xzb")")")
    [ "$TOP" -gt 0 ] && details+=("$(contributors "$keep/$(basename "$bin")" "$keep/link.map" "$t [$s]")")
    maxs="" maxx=""
  done
done

echo
echo "tinyscale size report ($variant; $(/usr/bin/rustc --version 2>/dev/null | cut -d' ' -f1-2); budgets: scripts/size-budgets.txt, set for rustc ${budget_rustc:-?})"
if [ "$allow" -gt 0 ]; then
  echo "NOTE: rustc $rustc_v is not the budgets' rustc $budget_rustc: budgets below include the ${allow}% toolchain allowance."
  echo "      Re-measure on this toolchain and move the budgets and #@budget-rustc in one commit (--record keeps the figures)."
fi
printf '%-31s %-11s %10s %10s %9s %9s %5s  %-24s %s\n' target set stripped budget "xz -9e" budget build result "last accepted"
for r in "${rows[@]}"; do echo "$r"; done
for d in "${details[@]}"; do echo; echo "$d"; done
echo
if [ "$fails" -gt 0 ]; then
  echo "size-report: FAIL ($fails of ${#rows[@]} builds over budget or failed)"
  exit 1
fi
echo "size-report: PASS (${#rows[@]} builds within budget)"
if [ -n "$RECORD" ]; then
  record "$rustc_v" "$measured"
  echo "size-report: recorded as accepted for rustc $rustc_v in $(basename "$BUDGETS")"
fi
rm -f "$measured"
