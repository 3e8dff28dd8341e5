#!/usr/bin/env bash
# package.sh — an OpenWrt .ipk (opkg, OpenWrt ≤ 24.10) from a cross-built binary.
#
#   scripts/cross-build.sh build <target> --no-default-features --features coordinator,tls
#   scripts/package.sh <target> [--bin PATH] [--arch OPENWRT_ARCH] [--out DIR] [--apk]
#
# Prints the path of the .ipk (the only stdout). The package is what OpenWrt's opkg (opkg-lede)
# reads: a gzipped tar of `./debian-binary` ("2.0\n"), `./data.tar.gz` and `./control.tar.gz`
# (control, conffiles, postinst, prerm), as OpenWrt's ipkg-build makes it. (Not an `ar`
# archive like a .deb: opkg-lede only gunzips and untars the outer file, and calls an `ar`
# one a "Malformed package file".)
#
#   /usr/sbin/tinyscale                 0755  the binary (default: cross-build.sh path <target>)
#   /etc/init.d/tinyscale               0755  openwrt/files/tinyscale.init
#   /etc/config/tinyscale               0600  openwrt/files/tinyscale.config (a conffile: it may
#                                             hold auth_key, and opkg keeps local edits)
#   /etc/uci-defaults/99-tinyscale      0644  openwrt/files/tinyscale.uci-defaults (fw4 zone)
#   /lib/upgrade/keep.d/tinyscale       0644  openwrt/files/tinyscale.keep (sysupgrade)
#
# postinst and prerm follow OpenWrt's generated scripts: /lib/functions.sh's
# default_postinst runs the uci-defaults script, enables and starts the init script;
# default_prerm stops it (and disables it unless upgrading). Ours add a firewall reload, and
# on removal (not upgrade) delete the firewall sections the uci-defaults script added.
#
# Deterministic: entries sorted, owner 0:0, mtime = SOURCE_DATE_EPOCH (default: the last
# commit's time), gzip without name/time. Same inputs, same bytes.
#
# Environment: PKG_RELEASE (default 1) → Version <crate version>-r<PKG_RELEASE>.
# scripts/package-check.sh checks the result.
#
# --apk: an APK v3 package for OpenWrt 25.x (apk-tools 3) instead, tinyscale-<version>.apk,
# laid out as OpenWrt's package-pack.mk makes one: the same files plus
# /lib/apk/packages/tinyscale.{list,conffiles,conffiles_static}, and the same scripts as
# post-install, pre-deinstall and post-upgrade (with PKG_UPGRADE=1). Built by `apk mkpkg`, so
# it needs apk-tools 3 (`$APK`, default `apk` on PATH; README says how to build it on Debian
# 12); without it the .apk is skipped with a message on stderr, nothing on stdout, exit 0.
# Unsigned: OpenWrt signs its feeds' packages with the build key; install this one with
# `apk add --allow-untrusted`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
FILES=$REPO/openwrt/files

usage() { echo "usage: $0 <rust-target> [--bin PATH] [--arch OPENWRT_ARCH] [--out DIR] [--apk]" >&2; exit 2; }
[ $# -ge 1 ] || usage
TARGET=$1; shift
BIN= ARCH= OUT=$REPO/target-cross/ipk FORMAT=ipk
while [ $# -gt 0 ]; do
  case $1 in
    --apk) FORMAT=apk; shift ;;
    --bin) BIN=$2; shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) usage ;;
  esac
done

# OpenWrt package architectures for the Rust targets cross-build.sh knows. One Rust target
# serves several OpenWrt arches (the binary is static and uses the target's baseline ISA):
# pass --arch for the others, e.g. aarch64_generic (rockchip, bcm27xx) instead of
# aarch64_cortex-a53 (mediatek filogic, mvebu).
if [ -z "$ARCH" ]; then
  case $TARGET in
    mipsel-unknown-linux-musl) ARCH=mipsel_24kc ;;
    mips-unknown-linux-musl) ARCH=mips_24kc ;;
    armv7-unknown-linux-musleabihf) ARCH=arm_cortex-a7_neon-vfpv4 ;;
    aarch64-unknown-linux-musl) ARCH=aarch64_cortex-a53 ;;
    x86_64-unknown-linux-musl) ARCH=x86_64 ;;
    *) echo "no OpenWrt arch known for $TARGET: pass --arch" >&2; exit 2 ;;
  esac
fi
case $ARCH in
  mipsel_24kc | mips_24kc | arm_cortex-a7_neon-vfpv4 | aarch64_cortex-a53 | aarch64_generic | x86_64) ;;
  *) echo "unsupported OpenWrt arch $ARCH" >&2; exit 2 ;;
esac

APK=${APK:-apk}
if [ "$FORMAT" = apk ] && ! "$APK" --version 2>/dev/null | grep -q '^apk-tools 3\.'; then
  echo "package.sh: .apk skipped: \`$APK --version\` is not apk-tools 3.x (set APK=/path/to/apk; see README, OpenWrt package)" >&2
  exit 0
fi

[ -n "$BIN" ] || BIN=$("$HERE/cross-build.sh" path "$TARGET")
[ -f "$BIN" ] || { echo "no binary at $BIN: run scripts/cross-build.sh build $TARGET first" >&2; exit 1; }

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n1)-r${PKG_RELEASE:-1}
: "${SOURCE_DATE_EPOCH:=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 0)}"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tinyscale-ipk.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
DATA=$WORK/data CTRL=$WORK/control
mkdir -p "$DATA" "$CTRL"

# put <src> <dest-path> <mode>
put() {
  install -D -m "$3" "$1" "$DATA$2"
}
put "$BIN" /usr/sbin/tinyscale 0755
put "$FILES/tinyscale.init" /etc/init.d/tinyscale 0755
put "$FILES/tinyscale.config" /etc/config/tinyscale 0600
put "$FILES/tinyscale.uci-defaults" /etc/uci-defaults/99-tinyscale 0644
put "$FILES/tinyscale.keep" /lib/upgrade/keep.d/tinyscale 0644
find "$DATA" -type d -exec chmod 0755 {} +

INSTALLED_SIZE=$(find "$DATA" -type f -printf '%s\n' | paste -sd+ | bc)

# Dependencies: kmod-tun for the TUN device; ca-bundle for TLS to control and DERP
# (rustls reads /etc/ssl/certs); `ip` for addresses, routes and rules (OpenWrt's busybox has
# no ip applet); nftables (`nft`) and kmod-nft-nat for the private `inet tinyscale` table
# with its masquerade. fw4 already pulls nftables-json (which provides nftables) and
# kmod-nft-nat into default images, so on those only kmod-tun, ca-bundle and ip-tiny are new.
cat > "$CTRL/control" <<EOF
Package: tinyscale
Version: $VERSION
Depends: kmod-tun, ca-bundle, ip-tiny | ip-full, nftables, kmod-nft-nat
License: BSD-3-Clause
Section: net
Maintainer: tinyscale maintainers
Architecture: $ARCH
Installed-Size: $INSTALLED_SIZE
Description: Tailscale-compatible mesh VPN client, subnet router and mini-coordinator
 for OpenWrt routers, in one static binary. Configure it in /etc/config/tinyscale.
EOF
echo /etc/config/tinyscale > "$CTRL/conffiles"

cat > "$CTRL/postinst" <<'EOF'
#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
# Named, not taken from $0: apk runs the script under another name.
export pkgname=tinyscale
default_postinst $0 $@
ret=$?
# default_postinst ran /etc/uci-defaults/99-tinyscale; fw4 picks the zone up on reload.
[ -n "${IPKG_INSTROOT}" ] || /etc/init.d/firewall reload >/dev/null 2>&1
exit $ret
EOF

{
  cat <<'EOF'
#!/bin/sh
[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0
. ${IPKG_INSTROOT}/lib/functions.sh
export pkgname=tinyscale
default_prerm $0 $@
# On removal (not upgrade), take back the firewall sections 99-tinyscale added.
if [ -z "${IPKG_INSTROOT}" ] && [ "${PKG_UPGRADE}" != "1" ]; then
	uci -q batch >/dev/null <<'BATCH'
EOF
  TINYSCALE_FW_PRINT=remove sh "$FILES/tinyscale.uci-defaults"
  cat <<'EOF'
BATCH
	/etc/init.d/firewall reload >/dev/null 2>&1
fi
exit 0
EOF
} > "$CTRL/prerm"
chmod 0755 "$CTRL/postinst" "$CTRL/prerm"
chmod 0644 "$CTRL/control" "$CTRL/conffiles"

if [ "$FORMAT" = apk ]; then
  # OpenWrt's package-pack.mk: the file list, conffiles and their sha256 go into the package.
  meta=$DATA/lib/apk/packages
  mkdir -p "$meta"
  cp "$CTRL/conffiles" "$meta/tinyscale.conffiles"
  while read -r f; do
    echo "$f $(sha256sum "$DATA$f" | cut -d' ' -f1)"
  done < "$CTRL/conffiles" > "$meta/tinyscale.conffiles_static"
  # Listing itself, as OpenWrt's (the shell creates it before find runs).
  : > "$meta/tinyscale.list"
  (cd "$DATA" && find . -type f,l -printf '/%P\n' | sort) > "$WORK/list"
  mv "$WORK/list" "$meta/tinyscale.list"
  chmod 0644 "$meta"/*
  chmod 0755 "$DATA/lib/apk" "$meta"
  { echo '#!/bin/sh'; echo 'export PKG_UPGRADE=1'; tail -n +2 "$CTRL/postinst"; } > "$CTRL/post-upgrade"
  chmod 0755 "$CTRL/post-upgrade"
  find "$DATA" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  mkdir -p "$OUT"
  PKG=$OUT/tinyscale-$VERSION.apk
  rm -f "$PKG"
  # ipk's "ip-tiny | ip-full": both provide `ip` in OpenWrt.
  SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH "$APK" mkpkg \
    --info "name:tinyscale" --info "version:$VERSION" \
    --info "description:Tailscale-compatible mesh VPN client, subnet router and mini-coordinator for OpenWrt routers" \
    --info "arch:$ARCH" --info "license:BSD-3-Clause" --info "origin:tinyscale" \
    --info "maintainer:tinyscale maintainers" \
    --info "depends:kmod-tun ca-bundle ip nftables kmod-nft-nat" \
    --script "post-install:$CTRL/postinst" --script "post-upgrade:$CTRL/post-upgrade" \
    --script "pre-deinstall:$CTRL/prerm" \
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
IPK=$OUT/tinyscale_${VERSION}_${ARCH}.ipk
rm -f "$IPK"
# Member order as ipkg-build writes it; owner 0:0 and a fixed mtime like the inner ones.
(cd "$WORK" && tar --format=gnu --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
  -cf - ./debian-binary ./data.tar.gz ./control.tar.gz) | gzip -n -9 > "$IPK"
echo "$IPK"
