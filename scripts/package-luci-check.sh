#!/usr/bin/env bash
# package-luci-check.sh — checks the .ipk from scripts/package-luci.sh the way opkg reads it:
# members, the file tree with modes and owners (exactly the app's files, where luci.mk puts
# them, byte-identical to the repository's), control fields, postinst (sh -n, cache flush,
# rpcd HUP), JSON validity of menu.d/acl.d, and that two builds are byte-identical.
#
#   scripts/package-luci-check.sh [ipk]     (default: build one with package-luci.sh)
#
# Ends with "N passed, N failed"; exits 1 on any failure.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
APP=$REPO/luci/luci-app-tinyscale
W=$(mktemp -d "${TMPDIR:-/tmp}/luci-app-tinyscale-check.XXXXXX")
trap 'rm -rf "$W"' EXIT
passed=0 failed=0
pass() { passed=$((passed + 1)); echo "PASS: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }
check() {
  local what=$1; shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

if [ $# -ge 1 ]; then
  IPK=$(realpath "$1")
else
  IPK=$("$HERE/package-luci.sh" --out "$W/a") || { fail "package-luci.sh"; echo "$passed passed, $failed failed"; exit 1; }
  b=$("$HERE/package-luci.sh" --out "$W/b") || fail "package-luci.sh (second build)"
  check "two builds are byte-identical" cmp -s "$IPK" "$b"
fi
check "file name luci-app-tinyscale_<version>_all.ipk" bash -c "[[ '$(basename "$IPK")' =~ ^luci-app-tinyscale_[0-9.]+-r[0-9]+_all\.ipk$ ]]"

# opkg-lede gunzips and untars the outer file (an `ar` one is "Malformed package file").
members=$(tar -tzf "$IPK" 2>&1 | paste -sd' ')
check "outer tar.gz members in order: $members" [ "$members" = "./debian-binary ./data.tar.gz ./control.tar.gz" ]
tar -xzf "$IPK" -C "$W" || fail "untar the outer tar.gz"
check "debian-binary is \"2.0\\n\"" cmp -s "$W/debian-binary" <(printf '2.0\n')
mkdir -p "$W/root" "$W/ctrl"
tar -xzf "$W/data.tar.gz" -C "$W/root" || fail "untar data.tar.gz"
tar -xzf "$W/control.tar.gz" -C "$W/ctrl" || fail "untar control.tar.gz"

# The expected tree: every file of the app where luci.mk installs it, plus their directories.
{
  (cd "$APP/htdocs" && find . -type f | sed 's#^\./#./www/#')
  (cd "$APP/root" && find . -type f)
} | sort > "$W/files.want"
(cd "$W/root" && find . -type f | sort) > "$W/files.have"
if diff -u "$W/files.want" "$W/files.have" > "$W/files.diff"; then
  pass "data holds the app's $(wc -l < "$W/files.want") files at their luci.mk paths"
else
  fail "data files"; sed 's/^/  /' "$W/files.diff"
fi
for v in status settings coordinator; do
  check "view tinyscale/$v.js present" [ -f "$W/root/www/luci-static/resources/view/tinyscale/$v.js" ]
done
same=1
while read -r f; do
  src=$APP/root/${f#./}
  case $f in ./www/*) src=$APP/htdocs/${f#./www/} ;; esac
  cmp -s "$W/root/$f" "$src" || { same=0; echo "  differs: $f"; }
done < "$W/files.have"
check "every packaged file is the repository's" [ "$same" = 1 ]
bad=$(tar --numeric-owner -tvzf "$W/data.tar.gz" | awk '($1 !~ /^-rw-r--r--$/ && $1 !~ /^drwxr-xr-x$/) || $2 != "0/0"' | head -n3)
check "files 0644, directories 0755, owner 0:0" [ -z "$bad" ]
check "one fixed mtime for every data entry" [ "$(tar -tvzf "$W/data.tar.gz" | awk '{print $4, $5}' | sort -u | wc -l)" = 1 ]
for j in usr/share/luci/menu.d/luci-app-tinyscale.json usr/share/rpcd/acl.d/luci-app-tinyscale.json; do
  check "/$j is valid JSON" python3 -m json.tool "$W/root/$j" /dev/null
done

field() { sed -n "s/^$1: //p" "$W/ctrl/control"; }
check "Package: luci-app-tinyscale" [ "$(field Package)" = luci-app-tinyscale ]
check "Architecture: all" [ "$(field Architecture)" = all ]
crate=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n1)
check "Version: $(field Version) (crate $crate)" bash -c "[[ '$(field Version)' =~ ^${crate//./\\.}-r[0-9]+$ ]]"
for d in luci-base tinyscale; do
  check "Depends has $d" bash -c "[[ \", $(field Depends),\" == *\", $d,\"* ]]"
done
size=$(find "$W/root" -type f -printf '%s\n' | paste -sd+ | bc)
check "Installed-Size $(field Installed-Size) = data bytes $size" [ "$(field Installed-Size)" = "$size" ]
check "Section: luci" [ "$(field Section)" = luci ]
check "postinst parses (sh -n)" sh -n "$W/ctrl/postinst"
check "postinst is executable" [ -x "$W/ctrl/postinst" ]
check "postinst flushes LuCI's caches and HUPs rpcd" \
  bash -c "grep -q 'luci-indexcache' '$W/ctrl/postinst' && grep -q 'HUP rpcd' '$W/ctrl/postinst'"

# ---- the same as an APK v3 package (OpenWrt 25.x), when apk-tools 3 is at hand
APK=${APK:-apk}
if "$APK" --version 2>/dev/null | grep -q '^apk-tools 3\.'; then
  A=$(APK=$APK "$HERE/package-luci.sh" --out "$W/apk" --apk 2>"$W/apk.log")
  if [ -f "$A" ]; then
    "$APK" adbdump "$A" > "$W/apk.dump" 2>&1
    info() { sed -n "/^info:/,/^paths:/s/^  $1: //p" "$W/apk.dump"; }
    check ".apk name, version $(sed -n 's/^Version: //p' "$W/ctrl/control"), noarch" \
      [ "$(info name) $(info version) $(info arch)" = "luci-app-tinyscale $(sed -n 's/^Version: //p' "$W/ctrl/control") noarch" ]
    check ".apk depends: libc luci-base tinyscale" \
      [ "$(sed -n '/^  depends:/,/^paths:/s/^    - //p' "$W/apk.dump" | paste -sd' ')" = "libc luci-base tinyscale" ]
    mkdir -p "$W/apkroot"
    "$APK" extract --allow-untrusted --destination "$W/apkroot" "$A" >>"$W/apk.log" 2>&1
    check ".apk holds the .ipk's files, byte for byte, and its file list" \
      bash -c "diff -r -x lib '$W/root' '$W/apkroot' >/dev/null &&
        diff <(cd '$W/root' && find . -type f -printf '/%P\n' | sort) <(grep -v '^/lib/apk/' '$W/apkroot/lib/apk/packages/luci-app-tinyscale.list')"
  else
    fail ".apk: package-luci.sh --apk built nothing"; sed 's/^/  /' "$W/apk.log"
  fi
else
  echo "SKIP: .apk (no apk-tools 3: \`$APK --version\`; see openwrt/README.md)"
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
