#!/usr/bin/env bash
# package-check.sh — checks an .ipk from scripts/package.sh the way opkg reads it: untar,
# then `tar` on the members. Asserts the members, the file tree with modes and owners, the
# control fields, conffiles, the maintainer scripts (sh -n), that the files are the
# repository's, and runs the unpacked binary's `tinyscale version` (under qemu-user for
# foreign targets, through scripts/cross-build.sh run). With apk-tools 3 (`$APK`, default
# `apk` on PATH) it also builds the .apk from the same binary (package.sh --apk) and checks it
# with `apk adbdump` and an install, upgrade and removal in a scratch root; without, one SKIP line.
#
#   scripts/package-check.sh <ipk> <rust-target>
#
# Ends with "N passed, N failed"; exits 1 on any failure.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
[ $# -eq 2 ] || { echo "usage: $0 <ipk> <rust-target>" >&2; exit 2; }
IPK=$(realpath "$1") TARGET=$2
W=$(mktemp -d "${TMPDIR:-/tmp}/tinyscale-ipkcheck.XXXXXX")
trap 'rm -rf "$W"' EXIT
passed=0 failed=0
pass() { passed=$((passed + 1)); echo "PASS: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }
check() {  # check <description> <command...>
  local what=$1; shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

# ---- the ar container
# opkg-lede gunzips and untars the outer file (an `ar` one is "Malformed package file").
members=$(tar -tzf "$IPK" 2>&1 | paste -sd' ')
check "outer tar.gz members in order: $members" [ "$members" = "./debian-binary ./data.tar.gz ./control.tar.gz" ]
tar -xzf "$IPK" -C "$W" || fail "untar the outer tar.gz"
check "debian-binary is \"2.0\\n\"" cmp -s "$W/debian-binary" <(printf '2.0\n')

# ---- data.tar.gz: tree, modes, owners
mkdir -p "$W/root" "$W/ctrl"
tar -xzf "$W/data.tar.gz" -C "$W/root" || fail "untar data.tar.gz"
tar -xzf "$W/control.tar.gz" -C "$W/ctrl" || fail "untar control.tar.gz"
# "mode owner path" for every entry, as tar lists them.
tar --numeric-owner -tvzf "$W/data.tar.gz" | awk '{print $1, $2, $6}' > "$W/data.list"
cat > "$W/data.want" <<'WANT'
drwxr-xr-x 0/0 ./
drwxr-xr-x 0/0 ./etc/
drwxr-xr-x 0/0 ./etc/config/
-rw------- 0/0 ./etc/config/tinyscale
drwxr-xr-x 0/0 ./etc/init.d/
-rwxr-xr-x 0/0 ./etc/init.d/tinyscale
drwxr-xr-x 0/0 ./etc/uci-defaults/
-rw-r--r-- 0/0 ./etc/uci-defaults/99-tinyscale
drwxr-xr-x 0/0 ./lib/
drwxr-xr-x 0/0 ./lib/upgrade/
drwxr-xr-x 0/0 ./lib/upgrade/keep.d/
-rw-r--r-- 0/0 ./lib/upgrade/keep.d/tinyscale
drwxr-xr-x 0/0 ./usr/
drwxr-xr-x 0/0 ./usr/sbin/
-rwxr-xr-x 0/0 ./usr/sbin/tinyscale
WANT
if diff -u "$W/data.want" "$W/data.list" > "$W/data.diff"; then
  pass "data tree, modes and owners (15 entries, sorted)"
else
  fail "data tree, modes and owners"; sed 's/^/  /' "$W/data.diff"
fi
check "one fixed mtime for every data entry" [ "$(tar -tvzf "$W/data.tar.gz" | awk '{print $4, $5}' | sort -u | wc -l)" = 1 ]
for f in init.d/tinyscale:tinyscale.init config/tinyscale:tinyscale.config uci-defaults/99-tinyscale:tinyscale.uci-defaults; do
  check "/etc/${f%%:*} is openwrt/files/${f#*:}" cmp -s "$W/root/etc/${f%%:*}" "$REPO/openwrt/files/${f#*:}"
done
check "keep.d is openwrt/files/tinyscale.keep" cmp -s "$W/root/lib/upgrade/keep.d/tinyscale" "$REPO/openwrt/files/tinyscale.keep"
check "keep.d keeps /etc/tinyscale/ and the config" \
  bash -c "grep -qx /etc/tinyscale/ '$W/root/lib/upgrade/keep.d/tinyscale' && grep -qx /etc/config/tinyscale '$W/root/lib/upgrade/keep.d/tinyscale'"

# ---- control.tar.gz
ctl=$(tar --numeric-owner -tvzf "$W/control.tar.gz" | awk '{print $1, $2, $6}' | paste -sd';')
check "control members: $ctl" [ "$ctl" = "drwxr-xr-x 0/0 ./;-rw-r--r-- 0/0 ./conffiles;-rw-r--r-- 0/0 ./control;-rwxr-xr-x 0/0 ./postinst;-rwxr-xr-x 0/0 ./prerm" ]
field() { sed -n "s/^$1: //p" "$W/ctrl/control"; }
check "Package: tinyscale" [ "$(field Package)" = tinyscale ]
crate=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n1)
check "Version: $(field Version) (crate $crate, -rN release)" bash -c "[[ '$(field Version)' =~ ^${crate//./\\.}-r[0-9]+$ ]]"
case $(field Architecture) in
  mipsel_24kc | mips_24kc | arm_cortex-a7_neon-vfpv4 | aarch64_cortex-a53 | aarch64_generic | x86_64)
    pass "Architecture: $(field Architecture)" ;;
  *) fail "Architecture: $(field Architecture) is no OpenWrt arch we build" ;;
esac
for d in kmod-tun ca-bundle nftables; do
  check "Depends has $d" bash -c "field=\$(sed -n 's/^Depends: //p' '$W/ctrl/control'); [[ \", \$field,\" == *\", $d,\"* ]]"
done
size=$(find "$W/root" -type f -printf '%s\n' | paste -sd+ | bc)
check "Installed-Size $(field Installed-Size) = data bytes $size" [ "$(field Installed-Size)" = "$size" ]
for f in Maintainer License Description; do
  check "$f is set" [ -n "$(field "$f")" ]
done
check "control ends with a newline" [ "$(tail -c1 "$W/ctrl/control" | od -An -c | tr -d ' ')" = '\n' ]
check "conffiles lists /etc/config/tinyscale" [ "$(cat "$W/ctrl/conffiles")" = /etc/config/tinyscale ]
for s in postinst prerm; do
  check "$s parses (sh -n)" sh -n "$W/ctrl/$s"
done
check "postinst runs default_postinst (uci-defaults, enable, start)" grep -q '^default_postinst \$0 \$@' "$W/ctrl/postinst"
check "prerm runs default_prerm and deletes firewall.tinyscale" \
  bash -c "grep -q '^default_prerm \$0 \$@' '$W/ctrl/prerm' && grep -qx 'delete firewall.tinyscale' '$W/ctrl/prerm'"
# apk runs scripts as /lib/apk/exec/<name>-<version>.<kind>: default_* must not guess the name from $0.
check "postinst and prerm name the package (pkgname=tinyscale)" \
  bash -c "grep -qx 'export pkgname=tinyscale' '$W/ctrl/postinst' && grep -qx 'export pkgname=tinyscale' '$W/ctrl/prerm'"

# ---- the same as an APK v3 package (OpenWrt 25.x)
APK=${APK:-apk}
if "$APK" --version 2>/dev/null | grep -q '^apk-tools 3\.'; then
  arch=$(field Architecture) ver=$(field Version)
  A=$(APK=$APK "$HERE/package.sh" "$TARGET" --bin "$W/root/usr/sbin/tinyscale" --arch "$arch" --out "$W/apk" --apk 2>"$W/apk.log")
  if [ -f "$A" ]; then
    "$APK" adbdump "$A" > "$W/apk.dump" 2>&1
    info() { sed -n "/^info:/,/^paths:/s/^  $1: //p" "$W/apk.dump"; }
    check ".apk name, version $ver, arch $arch" \
      [ "$(info name) $(info version) $(info arch)" = "tinyscale $ver $arch" ]
    check ".apk depends: ca-bundle ip kmod-nft-nat kmod-tun nftables" \
      [ "$(sed -n '/^  depends:/,/^paths:/s/^    - //p' "$W/apk.dump" | paste -sd' ')" = "ca-bundle ip kmod-nft-nat kmod-tun nftables" ]
    check ".apk scripts: post-install, post-upgrade (PKG_UPGRADE=1), pre-deinstall" \
      bash -c "grep -qx '  post-install: |' '$W/apk.dump' && grep -qx '  pre-deinstall: |' '$W/apk.dump' &&
        sed -n '/^  post-upgrade: |/,/^  [a-z-]*: |/p' '$W/apk.dump' | grep -qx '    export PKG_UPGRADE=1'"
    # A scratch root with a /bin/sh (apk runs the scripts chrooted), stand-ins for the dependencies.
    R=$W/apkroot
    mkdir -p "$R/bin" "$W/stub/usr/share/stub"
    cp /bin/sh "$R/bin/sh"
    for l in $(ldd /bin/sh | grep -o '/[^ ]*'); do mkdir -p "$R$(dirname "$l")"; cp "$l" "$R$l"; done
    for d in kmod-tun ca-bundle ip nftables kmod-nft-nat; do
      echo "$d" > "$W/stub/usr/share/stub/$d"
      "$APK" mkpkg --info "name:$d" --info version:1-r1 --info arch:noarch --info description:stand-in \
        --files "$W/stub" --output "$W/stub-$d.apk" >/dev/null 2>&1
      rm "$W/stub/usr/share/stub/$d"
    done
    apkr() { "$APK" --root "$R" --allow-untrusted --no-network --no-cache "$@" >>"$W/apk.log" 2>&1; }
    check ".apk installs beside its dependencies (scripts run)" apkr --initdb add "$W"/stub-*.apk "$A"
    check ".apk installed the ipk's files, 0600 config" \
      bash -c "cmp -s '$R/usr/sbin/tinyscale' '$W/root/usr/sbin/tinyscale' && cmp -s '$R/etc/init.d/tinyscale' '$W/root/etc/init.d/tinyscale' &&
        [ \"\$(stat -c %a '$R/etc/config/tinyscale')\" = 600 ]"
    check ".apk conffiles_static: /etc/config/tinyscale and its sha256" \
      [ "$(cat "$R/lib/apk/packages/tinyscale.conffiles_static")" = "/etc/config/tinyscale $(sha256sum < "$W/root/etc/config/tinyscale" | cut -d' ' -f1)" ]
    check ".apk list is every file it installs" \
      bash -c "diff <(sort '$R/lib/apk/packages/tinyscale.list') <(cd '$R' && '$APK' --root '$R' --no-network info -L tinyscale 2>/dev/null | grep -v ' contains:\$' | grep . | sed 's|^|/|' | sort)"
    printf "\toption hostname 'edited'\n" >> "$R/etc/config/tinyscale"
    check ".apk removal keeps the edited config" \
      bash -c "'$APK' --root '$R' --no-network del tinyscale >>'$W/apk.log' 2>&1 && grep -q edited '$R/etc/config/tinyscale' && [ ! -e '$R/usr/sbin/tinyscale' ]"
  else
    fail ".apk: package.sh --apk built nothing"; sed 's/^/  /' "$W/apk.log"
  fi
else
  echo "SKIP: .apk (no apk-tools 3: \`$APK --version\`; see README)"
fi

# ---- the binary
out=$(timeout 120 env TINYSCALE_BIN="$W/root/usr/sbin/tinyscale" "$HERE/cross-build.sh" run "$TARGET" version 2>&1)
if [ "$(printf '%s\n' "$out" | head -n1)" = "tinyscale $crate" ]; then
  pass "$TARGET: unpacked /usr/sbin/tinyscale version -> $(printf '%s\n' "$out" | head -n1)"
else
  fail "$TARGET: unpacked /usr/sbin/tinyscale version printed: $out"
fi

# OpenWrt's package CI runs `<binary> --version` and looks for PKG_VERSION.
out=$(timeout 120 env TINYSCALE_BIN="$W/root/usr/sbin/tinyscale" "$HERE/cross-build.sh" run "$TARGET" --version 2>&1)
check "$TARGET: tinyscale --version prints the package's upstream version" \
  [ "$(printf '%s\n' "$out" | head -n1)" = "tinyscale ${crate}" ]

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
