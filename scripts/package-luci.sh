#!/usr/bin/env bash
# package-luci.sh — luci-app-tinyscale as an OpenWrt .ipk (architecture `all`), laid out as
# luci.mk installs a LuCI app, without the SDK:
#
#   scripts/package-luci.sh [--out DIR] [--apk]
#
# Prints the path of the .ipk (the only stdout). The package is a gzipped tar of
# `./debian-binary` ("2.0\n"), `./data.tar.gz` and `./control.tar.gz` (control, postinst),
# the container OpenWrt's opkg reads (see package.sh):
#
#   /www/luci-static/resources/view/tinyscale/*.js    0644  luci/luci-app-tinyscale/htdocs/...
#   /usr/share/luci/menu.d/luci-app-tinyscale.json     0644  luci/luci-app-tinyscale/root/...
#   /usr/share/rpcd/acl.d/luci-app-tinyscale.json      0644
#
# postinst does what luci.mk's does: on a live system it drops LuCI's index and module
# caches and makes rpcd re-read its ACLs (SIGHUP), so the pages show without a reboot.
#
# Deterministic like package.sh: entries sorted, owner 0:0, mtime = SOURCE_DATE_EPOCH
# (default: the last commit's time), gzip -n.
# Environment: PKG_RELEASE (default 1) → Version <crate version>-r<PKG_RELEASE>.
# scripts/package-luci-check.sh checks the result.
#
# --apk: the same as an APK v3 package (OpenWrt 25.x), luci-app-tinyscale-<version>.apk, arch
# noarch, with /lib/apk/packages/luci-app-tinyscale.list and the postinst as post-install and
# post-upgrade, through `apk mkpkg` (apk-tools 3, `$APK`, see package.sh); skipped with a
# message on stderr and nothing on stdout without it.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
APP=$REPO/luci/luci-app-tinyscale

OUT=$REPO/target-cross/ipk FORMAT=ipk
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --apk) FORMAT=apk; shift ;;
    *) echo "usage: $0 [--out DIR] [--apk]" >&2; exit 2 ;;
  esac
done

APK=${APK:-apk}
if [ "$FORMAT" = apk ] && ! "$APK" --version 2>/dev/null | grep -q '^apk-tools 3\.'; then
  echo "package-luci.sh: .apk skipped: \`$APK --version\` is not apk-tools 3.x (set APK=/path/to/apk; see openwrt/README.md)" >&2
  exit 0
fi

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n1)-r${PKG_RELEASE:-1}
: "${SOURCE_DATE_EPOCH:=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 0)}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/luci-app-tinyscale-ipk.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DATA=$WORK/data CTRL=$WORK/control
mkdir -p "$DATA/www" "$CTRL"
# luci.mk: htdocs/ goes to /www, root/ to /.
cp -R "$APP/htdocs/." "$DATA/www/"
cp -R "$APP/root/." "$DATA/"
find "$DATA" -type d -exec chmod 0755 {} +
find "$DATA" -type f -exec chmod 0644 {} +

INSTALLED_SIZE=$(find "$DATA" -type f -printf '%s\n' | paste -sd+ | bc)
cat > "$CTRL/control" <<CONTROL
Package: luci-app-tinyscale
Version: $VERSION
Depends: libc, luci-base, tinyscale
License: BSD-3-Clause
Section: luci
Maintainer: tinyscale maintainers
Architecture: all
Installed-Size: $INSTALLED_SIZE
Description: LuCI support for tinyscale (Tailscale-compatible mesh VPN): status, settings
 and the coordinator's users, nodes, routes and pre-auth keys, under VPN.
CONTROL

cat > "$CTRL/postinst" <<'POSTINST'
#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -n "${IPKG_INSTROOT}" ] && exit 0
rm -f /tmp/luci-indexcache.*
rm -rf /tmp/luci-modulecache/
killall -HUP rpcd 2>/dev/null
exit 0
POSTINST
chmod 0755 "$CTRL/postinst"
chmod 0644 "$CTRL/control"

if [ "$FORMAT" = apk ]; then
  meta=$DATA/lib/apk/packages
  mkdir -p "$meta"
  : > "$meta/luci-app-tinyscale.list"
  (cd "$DATA" && find . -type f,l -printf '/%P\n' | sort) > "$WORK/list"
  mv "$WORK/list" "$meta/luci-app-tinyscale.list"
  chmod 0644 "$meta/luci-app-tinyscale.list"
  chmod 0755 "$DATA/lib" "$DATA/lib/apk" "$meta"
  { echo '#!/bin/sh'; echo 'export PKG_UPGRADE=1'; tail -n +2 "$CTRL/postinst"; } > "$CTRL/post-upgrade"
  chmod 0755 "$CTRL/post-upgrade"
  find "$DATA" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  mkdir -p "$OUT"
  PKG=$OUT/luci-app-tinyscale-$VERSION.apk
  rm -f "$PKG"
  SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH "$APK" mkpkg \
    --info "name:luci-app-tinyscale" --info "version:$VERSION" \
    --info "description:LuCI support for tinyscale (Tailscale-compatible mesh VPN)" \
    --info "arch:noarch" --info "license:BSD-3-Clause" --info "origin:luci-app-tinyscale" \
    --info "maintainer:tinyscale maintainers" --info "depends:libc luci-base tinyscale" \
    --script "post-install:$CTRL/postinst" --script "post-upgrade:$CTRL/post-upgrade" \
    --files "$DATA" --output "$PKG" >&2
  echo "$PKG"
  exit 0
fi

# det_tgz <dir> <out>: ./-relative entries, sorted, 0:0, fixed mtime, gzip -n.
det_tgz() {
  (cd "$1" && tar --format=gnu --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime="@$SOURCE_DATE_EPOCH" -cf - .) | gzip -n -9 > "$2"
}
det_tgz "$DATA" "$WORK/data.tar.gz"
det_tgz "$CTRL" "$WORK/control.tar.gz"
printf '2.0\n' > "$WORK/debian-binary"

mkdir -p "$OUT"
IPK=$OUT/luci-app-tinyscale_${VERSION}_all.ipk
rm -f "$IPK"
(cd "$WORK" && tar --format=gnu --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
  -cf - ./debian-binary ./data.tar.gz ./control.tar.gz) | gzip -n -9 > "$IPK"
echo "$IPK"
