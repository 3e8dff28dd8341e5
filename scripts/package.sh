#!/usr/bin/env bash
# package.sh — an OpenWrt .ipk (opkg, OpenWrt ≤ 24.10) from a cross-built binary.
#
#   scripts/cross-build.sh build <target> --no-default-features --features coordinator,tls
#   scripts/package.sh <target> [--bin PATH] [--arch OPENWRT_ARCH] [--out DIR]
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
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
FILES=$REPO/openwrt/files

usage() { echo "usage: $0 <rust-target> [--bin PATH] [--arch OPENWRT_ARCH] [--out DIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
TARGET=$1; shift
BIN= ARCH= OUT=$REPO/target-cross/ipk
while [ $# -gt 0 ]; do
  case $1 in
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
