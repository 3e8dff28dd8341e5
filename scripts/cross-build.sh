#!/usr/bin/env bash
# cross-build.sh — fully static, stripped tinyscale binaries for OpenWrt-class
# targets, built on Debian 12 (bookworm) x86_64 with only apt and crates.io.
#
#   scripts/cross-build.sh setup [--with-smoke-tools]
#         Install the toolchain (root; idempotent, fast when already done):
#         Debian's rustc-web/cargo-web + rust-web-src (for -Z build-std), musl
#         C drivers, cross binutils/gcc, qemu-user-static; build soft-float musl
#         for mips/mipsel and a libunwind.a per target into the cache dir.
#         --with-smoke-tools also installs coturn (turnutils_stunclient).
#   scripts/cross-build.sh build <target> [cargo args...]
#         e.g. `build mipsel-unknown-linux-musl --no-default-features --features tls`.
#         Cargo's output goes to stderr; the binary's path is the only stdout.
#   scripts/cross-build.sh run <target> [program args...]
#         Run the last built binary for <target> under qemu-user (native for x86_64).
#   scripts/cross-build.sh path <target>     print where `build` puts the binary
#   scripts/cross-build.sh env <target>      print the build environment (for debugging)
#   scripts/cross-build.sh targets           list the supported targets
#   scripts/cross-build.sh variant           name of the build variant (see Environment)
#   scripts/cross-build.sh cache             print the toolchain cache directory
#
# Targets: x86_64-unknown-linux-musl aarch64-unknown-linux-musl
#          armv7-unknown-linux-musleabihf mipsel-unknown-linux-musl mips-unknown-linux-musl
#
# Feature sets: client-only = `--no-default-features --features tls`;
#               everything  = `--no-default-features --features coordinator,tls`
#               (coordinator implies relay; it is also the crate's default).
#
# Environment (all optional):
#   TINYSCALE_CROSS_CACHE   toolchain cache (musl builds, unwinders, musl source).
#                           Default /var/cache/tinyscale-cross as root, else
#                           ${XDG_CACHE_HOME:-~/.cache}/tinyscale-cross. Safe to delete:
#                           `setup` rebuilds it (a couple of minutes).
#   CARGO_TARGET_DIR        default <repo>/target-cross/<variant>, so that
#                           variants with different rustflags do not rebuild each other.
#   TINYSCALE_PANIC         abort (default: panic message on stderr, then abort) |
#                           immediate-abort (no message, no formatting code; SIGILL/SIGTRAP).
#   TINYSCALE_PANIC_LOCATION  none (default: -Z location-detail=none: a panic message says
#                           what, not which file and line; the file names and line tables
#                           of every panic site cost mipsel 63 KB client-only and 74 KB
#                           everything, measured with rustc 1.96) | full (file:line kept).
#   TINYSCALE_UNWIND        stub (default: empty _Unwind_* functions; panic=abort never
#                           unwinds, RUST_BACKTRACE prints no frames; no FPU code on
#                           MIPS) | gcc (libgcc_eh + shim: RUST_BACKTRACE prints frame
#                           addresses; bigger).
#   TINYSCALE_STD_FEATURES  std's cargo features for -Z build-std (comma list).
#                           Default "default": no "backtrace" feature, so the panic
#                           message stays but std's symbolizer (gimli, addr2line,
#                           rustc-demangle, miniz_oxide: 197 KB on mipsel, measured) is
#                           left out; it could only print "<unknown>" in a stripped
#                           binary. cargo's own default is "backtrace,panic-unwind,default".
#   TINYSCALE_EXTRA_RUSTFLAGS  appended to the per-target rustflags.
#   TINYSCALE_BIN           binary for `run` (default: the path `build` prints).
#
# Why this recipe (verified; see ../shared/cross/README.md of the project workspace):
#  * Debian's rustc-web (1.85 on bookworm: the crate's rust-version, so keep it
#    compiling there) ships std only for the host; every musl target, tier 2 or
#    tier 3 (mips*), is built with -Z build-std (RUSTC_BOOTSTRAP=1) from the exactly
#    matching rust-web-src. std is then compiled with our release profile (opt z, LTO).
#  * Rust's mips(el)-unknown-linux-musl are soft-float; Debian's musl-dev:mipsel is
#    hard-float and there is no big-endian mips musl, so musl is built from Debian's
#    source package with -msoft-float -march=mips32r2 (the Rust targets' baseline).
#  * std links -lunwind on musl with crt-static, and build-std has no self-contained
#    copy: we provide libunwind.a (stub, or libgcc_eh + a shim, see write_unwind_sources).
#  * -C relocation-model=static: without it the "static" binary is static-pie with
#    an interpreter path that exists only on hosts that have musl installed.
set -euo pipefail

ALL_TARGETS="x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf mipsel-unknown-linux-musl mips-unknown-linux-musl"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${TINYSCALE_CROSS_CACHE:-}" ]; then
  CACHE=$TINYSCALE_CROSS_CACHE
elif [ "$(id -u)" = 0 ]; then
  CACHE=/var/cache/tinyscale-cross
else
  CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/tinyscale-cross
fi
# Bump when the musl/unwinder recipe below changes: forces a rebuild of the cache.
RECIPE=3
MUSL_CFLAGS="-Os -msoft-float -march=mips32r2 -fPIC"

die() { echo "cross-build: error: $*" >&2; exit 1; }
say() { echo "cross-build: $*" >&2; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

# target -> CC (musl C driver, also the linker), AR, GNUGCC (only for libgcc_eh.a), QEMU
tinfo() {
  case "$1" in
    x86_64-unknown-linux-musl)      CC=x86_64-linux-musl-gcc;  AR="ar";                   GNUGCC="gcc";                    QEMU="" ;;
    aarch64-unknown-linux-musl)     CC=aarch64-linux-musl-gcc; AR=aarch64-linux-gnu-ar;   GNUGCC=aarch64-linux-gnu-gcc;    QEMU=qemu-aarch64-static ;;
    armv7-unknown-linux-musleabihf) CC=arm-linux-musleabihf-gcc; AR=arm-linux-gnueabihf-ar; GNUGCC=arm-linux-gnueabihf-gcc; QEMU=qemu-arm-static ;;
    mipsel-unknown-linux-musl)      CC=$CACHE/bin/mipsel-linux-muslsf-gcc; AR=mipsel-linux-gnu-ar; GNUGCC=mipsel-linux-gnu-gcc; QEMU=qemu-mipsel-static ;;
    mips-unknown-linux-musl)        CC=$CACHE/bin/mips-linux-muslsf-gcc;   AR=mips-linux-gnu-ar;   GNUGCC=mips-linux-gnu-gcc;   QEMU=qemu-mips-static ;;
    *) die "unknown target '$1' (one of: $ALL_TARGETS)" ;;
  esac
}

# ---------------------------------------------------------------- setup

APT_PKGS="rustc-web cargo-web rust-web-src libstd-rust-web-dev
  gcc binutils musl-tools musl-dev musl-dev:arm64 musl-dev:armhf
  gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf gcc-mipsel-linux-gnu gcc-mips-linux-gnu
  qemu-user-static file xz-utils dpkg-dev ca-certificates"
SMOKE_PKGS="coturn"

pkg_installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q 'install ok installed'; }
# Version of an installed package (multi-arch packages: the native one).
pkg_version() { dpkg-query -W -f='${Version}\n' "$1:$(dpkg --print-architecture)" 2>/dev/null \
  || dpkg-query -W -f='${Version}\n' "$1" | head -1; }

APT_UPDATED=
apt_update_once() {
  [ -n "$APT_UPDATED" ] && return 0
  # A partial index failure (seen: bookworm-security armhf "Mirror sync in progress?")
  # makes apt-get update exit non-zero without affecting the packages used here.
  apt-get update >&2 || say "WARN: apt-get update reported errors; continuing"
  APT_UPDATED=1
}

apt_ensure() {
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} = 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages (run setup as root): ${missing[*]}"
  say "installing: ${missing[*]}"
  apt_update_once
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
}

ensure_foreign_arch() {
  local a
  for a in "$@"; do
    dpkg --print-foreign-architectures | grep -qx "$a" && continue
    [ "$(id -u)" = 0 ] || die "dpkg architecture $a missing (run setup as root)"
    dpkg --add-architecture "$a"; APT_UPDATED=   # new arch: the index must be refreshed
  done
}

# `apt-get source` needs a deb-src entry; add one only if none covers this release.
ensure_deb_src() {
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  if grep -rhsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/ >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "no deb-src entry for apt (run setup as root)"
  cat > /etc/apt/sources.list.d/tinyscale-cross-src.sources <<EOF
# Added by tinyscale scripts/cross-build.sh setup: Debian's musl source package is
# built soft-float for mips/mipsel. Safe to remove after setup.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $codename
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  APT_UPDATED=
}

# Debian's musl source (same version as the installed musl-dev), unpacked with
# Debian's patches by dpkg-source (which also checks the .dsc checksums).
fetch_musl_source() {
  local ver dir
  ver=$(pkg_version musl-dev)
  dir="$CACHE/src/musl-$ver"
  MUSL_SRC=$dir
  [ -f "$dir/.complete" ] && return 0
  mkdir -p "$CACHE/src/dl"
  if [ ! -f "$CACHE/src/dl/musl_${ver#*:}.dsc" ]; then
    ensure_deb_src
    ( cd "$CACHE/src/dl" && { apt-get source --download-only "musl=$ver" >&2 \
        || { apt_update_once; apt-get source --download-only "musl=$ver" >&2; }; } ) \
      || die "could not download Debian's musl $ver source package"
  fi
  rm -rf "$dir" "$dir.tmp"
  ( cd "$CACHE/src/dl" && dpkg-source -x "musl_${ver#*:}.dsc" "$dir.tmp" >&2 )
  touch "$dir.tmp/.complete"; mv "$dir.tmp" "$dir"
}

build_musl_sf() {  # $1 = mipsel | mips
  local a=$1 prefix="$CACHE/musl/$1-sf" stamp b
  stamp="recipe=$RECIPE src=$(basename "$MUSL_SRC") cflags=$MUSL_CFLAGS"
  if [ -f "$prefix/lib/libc.a" ] && [ "$(cat "$prefix/.stamp" 2>/dev/null)" = "$stamp" ]; then
    say "musl $a soft-float: cached ($prefix)"
  else
    say "building musl $a soft-float (about a minute)..."
    b="$CACHE/build/musl-$a-sf"; rm -rf "$b" "$prefix.tmp"; mkdir -p "$b"
    cp -a "$MUSL_SRC/." "$b/"
    ( cd "$b" && ./configure --target="$a-linux-gnu" --prefix="$prefix" --syslibdir="$prefix/lib" \
          --disable-shared --enable-wrapper=gcc CC="$a-linux-gnu-gcc" CROSS_COMPILE="$a-linux-gnu-" \
          CFLAGS="$MUSL_CFLAGS" >configure.log 2>&1 \
      && make -j"$(nproc)" >make.log 2>&1 \
      && make install DESTDIR="$prefix.tmp" >install.log 2>&1 ) \
      || die "musl $a build failed; logs in $b/*.log"
    # DESTDIR install, then move into place: an interrupted build never looks complete.
    rm -rf "$prefix"; mkdir -p "$(dirname "$prefix")"
    mv "$prefix.tmp$prefix" "$prefix"; rm -rf "$prefix.tmp" "$b"
    rmdir "$CACHE/build" 2>/dev/null || true
    echo "$stamp" > "$prefix/.stamp"
  fi
  mkdir -p "$CACHE/bin"
  cat > "$CACHE/bin/$a-linux-muslsf-gcc.tmp" <<EOF
#!/bin/sh
# gcc driver for $a soft-float musl (built by tinyscale scripts/cross-build.sh setup)
exec $a-linux-gnu-gcc -msoft-float -march=mips32r2 "\$@" -specs "$prefix/lib/musl-gcc.specs"
EOF
  chmod +x "$CACHE/bin/$a-linux-muslsf-gcc.tmp"
  mv "$CACHE/bin/$a-linux-muslsf-gcc.tmp" "$CACHE/bin/$a-linux-muslsf-gcc"
}

write_unwind_sources() {
  mkdir -p "$CACHE/unwind"
  cat > "$CACHE/unwind/dl_find_object_shim.c" <<'EOF'
/* TINYSCALE_UNWIND=gcc: lets GCC 12's libgcc_eh.a (built against glibc >= 2.35,
 * it references the glibc-only _dl_find_object) link into static musl binaries,
 * using musl's dl_iterate_phdr. Struct layout = glibc's for targets without
 * DLFO_STRUCT_HAS_EH_DBASE (x86_64, aarch64, mips); ARM's EHABI libgcc_eh never
 * calls it. */
#define _GNU_SOURCE
#include <link.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>

/* libgcc_eh's gthr layer calls pthread_* through weak references and treats the
 * program as threaded once __pthread_key_create is linked (Rust std links it).
 * Unless something pulls the others out of libc.a they stay NULL and the unwinder
 * calls address 0 (seen: SIGSEGV in uw_init_context_1). The build links with
 * -Wl,-u,__tinyscale_keep_pthread so this array (and so these functions) stay. */
__attribute__((used)) void *const __tinyscale_keep_pthread[] = {
    (void *)pthread_once, (void *)pthread_mutex_lock, (void *)pthread_mutex_unlock,
    (void *)pthread_key_create, (void *)pthread_getspecific, (void *)pthread_setspecific,
};

struct dl_find_object {
    unsigned long long dlfo_flags;
    void *dlfo_map_start;
    void *dlfo_map_end;
    void *dlfo_link_map;
    void *dlfo_eh_frame;
    unsigned long long __dlfo_reserved[7];
};

struct dlfo_search { uintptr_t pc; struct dl_find_object *out; int found; };

static int dlfo_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    struct dlfo_search *s = data;
    const ElfW(Phdr) *eh = NULL;
    int hit = 0;
    (void)size;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *p = &info->dlpi_phdr[i];
        if (p->p_type == PT_LOAD) {
            uintptr_t start = info->dlpi_addr + p->p_vaddr;
            if (s->pc >= start && s->pc < start + p->p_memsz) {
                hit = 1;
                s->out->dlfo_map_start = (void *)start;
                s->out->dlfo_map_end = (void *)(start + p->p_memsz);
            }
        } else if (p->p_type == PT_GNU_EH_FRAME) {
            eh = p;
        }
    }
    if (!hit)
        return 0;
    s->out->dlfo_flags = 0;
    s->out->dlfo_link_map = NULL;
    s->out->dlfo_eh_frame = eh ? (void *)(info->dlpi_addr + eh->p_vaddr) : NULL;
    s->found = 1;
    return 1;
}

int _dl_find_object(void *pc, struct dl_find_object *result)
{
    struct dlfo_search s = { (uintptr_t)pc, result, 0 };
    dl_iterate_phdr(dlfo_cb, &s);
    return s.found ? 0 : -1;
}
EOF
  cat > "$CACHE/unwind/unwind_stub.c" <<'EOF'
/* TINYSCALE_UNWIND=stub: do-nothing unwinder for panic=abort builds. std only
 * calls these to print a backtrace (RUST_BACKTRACE), which comes out empty.
 * No FPU code, so MIPS soft-float binaries stay FPU-free. Never use with
 * panic=unwind. */
#include <stdint.h>
struct _Unwind_Context;
typedef int (*_Unwind_Trace_Fn)(struct _Unwind_Context *, void *);
int _Unwind_Backtrace(_Unwind_Trace_Fn fn, void *arg) { (void)fn; (void)arg; return 5; /* _URC_END_OF_STACK */ }
uintptr_t _Unwind_GetIP(struct _Unwind_Context *c) { (void)c; return 0; }
uintptr_t _Unwind_GetIPInfo(struct _Unwind_Context *c, int *before) { (void)c; if (before) *before = 0; return 0; }
uintptr_t _Unwind_GetCFA(struct _Unwind_Context *c) { (void)c; return 0; }
void *_Unwind_FindEnclosingFunction(void *pc) { (void)pc; return 0; }
#if defined(__arm__)
/* ARM EHABI: Rust's _Unwind_GetIP etc. are built on _Unwind_VRS_Get. */
int _Unwind_VRS_Get(struct _Unwind_Context *c, int regclass, uint32_t regno, int repr, void *valuep)
{ (void)c; (void)regclass; (void)regno; (void)repr; if (valuep) *(uint32_t *)valuep = 0; return 1; /* _UVRSR_NOT_IMPLEMENTED */ }
int _Unwind_VRS_Set(struct _Unwind_Context *c, int regclass, uint32_t regno, int repr, void *valuep)
{ (void)c; (void)regclass; (void)regno; (void)repr; (void)valuep; return 1; }
#endif
EOF
}

build_unwinders() {
  local t d stamp
  write_unwind_sources
  stamp="recipe=$RECIPE $(cat "$CACHE/unwind/"*.c | cksum)"
  for t in $ALL_TARGETS; do
    tinfo "$t"
    d="$CACHE/unwind/gcc/$t"
    if [ "$(cat "$d/.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -f "$d/libunwind.a" ]; then
      rm -rf "$d"; mkdir -p "$d"
      cp "$($GNUGCC -print-file-name=libgcc_eh.a)" "$d/libunwind.a.tmp"
      $CC -Os -fPIC -c "$CACHE/unwind/dl_find_object_shim.c" -o "$d/shim.o"
      $AR rcs "$d/libunwind.a.tmp" "$d/shim.o"
      mv "$d/libunwind.a.tmp" "$d/libunwind.a"; echo "$stamp" > "$d/.stamp"
    fi
    d="$CACHE/unwind/stub/$t"
    if [ "$(cat "$d/.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -f "$d/libunwind.a" ]; then
      rm -rf "$d"; mkdir -p "$d"
      $CC -Os -c "$CACHE/unwind/unwind_stub.c" -o "$d/stub.o"
      $AR rcs "$d/libunwind.a.tmp" "$d/stub.o"
      mv "$d/libunwind.a.tmp" "$d/libunwind.a"; echo "$stamp" > "$d/.stamp"
    fi
  done
  say "unwinders ready ($CACHE/unwind/{gcc,stub}/<target>/libunwind.a)"
}

check_rust_toolchain() {
  local rv sv
  rv=$(pkg_version rustc-web); sv=$(pkg_version rust-web-src)
  [ "$rv" = "$sv" ] || die "rustc-web $rv and rust-web-src $sv differ: -Z build-std needs the exact matching source"
  [ -d "$(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust/library" ] \
    || die "rust-web-src installed but $(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust/library is missing"
}

setup() {
  local smoke=
  for a in "$@"; do
    case "$a" in --with-smoke-tools) smoke=1 ;; *) die "setup: unknown option $a" ;; esac
  done
  mkdir -p "$CACHE"
  # One setup at a time per cache (CI and a developer may share the machine).
  exec 9>"$CACHE/.lock"; flock 9
  ensure_foreign_arch arm64 armhf
  # shellcheck disable=SC2086
  apt_ensure $APT_PKGS
  [ -n "$smoke" ] && apt_ensure $SMOKE_PKGS
  check_rust_toolchain
  fetch_musl_source
  build_musl_sf mipsel
  build_musl_sf mips
  build_unwinders
  say "setup done: $(/usr/bin/rustc --version), cache $CACHE"
}

# ---------------------------------------------------------------- build / run

std_features() { echo "${TINYSCALE_STD_FEATURES:-default}"; }
variant() { local f; f=$(std_features); echo "${TINYSCALE_PANIC:-abort}-${TINYSCALE_UNWIND:-stub}-${f//,/+}"; }
target_dir() { echo "${CARGO_TARGET_DIR:-$REPO/target-cross/$(variant)}"; }
bin_name() { echo "${TINYSCALE_BIN_NAME:-$(sed -n '/^\[package\]/,/^\[/s/^name *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -1)}"; }
bin_path() { echo "$(target_dir)/$1/release/$(bin_name)"; }

target_env() {
  local t=$1 u=${TINYSCALE_UNWIND:-stub} p=${TINYSCALE_PANIC:-abort} flags T TU
  BUILD_STD_FEATURES=$(std_features)
  tinfo "$t"
  case "$u" in gcc|stub) ;; *) die "TINYSCALE_UNWIND must be gcc or stub" ;; esac
  [ -f "$CACHE/unwind/$u/$t/libunwind.a" ] && command -v "$CC" >/dev/null && [ -x /usr/bin/cargo ] \
    || die "toolchain for $t not set up: run scripts/cross-build.sh setup (cache: $CACHE)"
  T=${t//-/_}; TU=${T^^}
  # Debian's rustc-web + cargo (1.85 on bookworm), not rustup's proxies earlier on PATH.
  export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc CARGO=/usr/bin/cargo
  unset RUSTUP_TOOLCHAIN RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER
  export RUSTC_BOOTSTRAP=1                # -Z build-std on a stable compiler
  export "CC_$T=$CC" "AR_$T=$AR" "CARGO_TARGET_${TU}_LINKER=$CC"
  flags="-C target-feature=+crt-static -C link-self-contained=no -C relocation-model=static"
  flags="$flags -L native=$CACHE/unwind/$u/$t"
  # musl applies PT_GNU_RELRO only in its dynamic loader, never in a static binary,
  # so rustc's default -z relro buys nothing here and costs file padding up to the
  # max page size (64 KiB on MIPS/ARM; measured: -53 KB on mipsel client-only).
  flags="$flags -C link-arg=-Wl,-z,norelro"
  [ "$u" = gcc ] && flags="$flags -C link-arg=-Wl,-u,__tinyscale_keep_pthread"
  # With panic=abort and the stub unwinder nothing ever reads .eh_frame: no unwind
  # tables for Rust (std included) nor for the C crates (sqlite, ring). Measured with
  # rustc 1.96 on mipsel client-only: .eh_frame + .eh_frame_hdr were 180 KB (8% of
  # the file). The gcc unwinder keeps them: its backtraces walk them.
  if [ "$u" = stub ]; then
    flags="$flags -C force-unwind-tables=no"
    local cf="CFLAGS_$T"
    export "CFLAGS_$T=-fno-asynchronous-unwind-tables -fno-unwind-tables${!cf:+ ${!cf}}"
  fi
  case "$p" in
    abort)
      case "${TINYSCALE_PANIC_LOCATION:-none}" in
        none) flags="$flags -Z location-detail=none" ;;
        full) ;;
        *) die "TINYSCALE_PANIC_LOCATION must be none or full" ;;
      esac ;;
    immediate-abort)
      # Rust >= 1.92 spells it -C panic=immediate-abort; older (Debian's 1.85) as a std feature.
      if RUSTC_BOOTSTRAP=1 /usr/bin/rustc -Z unstable-options -C panic=immediate-abort --print cfg >/dev/null 2>&1; then
        flags="$flags -Z unstable-options -C panic=immediate-abort"
      else
        BUILD_STD_FEATURES="$BUILD_STD_FEATURES,panic_immediate_abort"
      fi
      flags="$flags -Z location-detail=none" ;;
    *) die "TINYSCALE_PANIC must be abort or immediate-abort" ;;
  esac
  # The link map lists every kept input section with its size (function sections),
  # so scripts/size-report.sh can attribute bytes to crates without a second build.
  # A directory: ld names the map after the output (deps/tinyscale-<hash>), so a
  # binary that cargo re-uplifts from cache (feature set switched back) without
  # relinking still finds its own map; `build` copies it to <binary>.map.
  flags="$flags -C link-arg=-Wl,-Map=$(target_dir)/$t/release/maps"
  export "CARGO_TARGET_${TU}_RUSTFLAGS=$flags${TINYSCALE_EXTRA_RUSTFLAGS:+ $TINYSCALE_EXTRA_RUSTFLAGS}"
  unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS   # would override per-target flags
  export CARGO_TARGET_DIR; CARGO_TARGET_DIR=$(target_dir)
  mkdir -p "$CARGO_TARGET_DIR/$t/release/maps"
  # The SQLite compile options of .cargo/config.toml, as a real environment variable: cargo
  # re-runs libsqlite3-sys's build script when it changes (a change in [env] alone can leave
  # a cached, larger SQLite in a reused target dir).
  local sq
  sq=$(sed -n 's/^LIBSQLITE3_FLAGS *= *"\(.*\)"$/\1/p' "$REPO/.cargo/config.toml" 2>/dev/null)
  if [ -n "$sq" ]; then export LIBSQLITE3_FLAGS="$sq"; fi
}

# A router has no musl loader: refuse anything with an interpreter or dynamic section.
check_static() {
  local f=$1 ph
  ph=$(readelf -lW "$f")
  if grep -qE '^\s*(INTERP|DYNAMIC)\s' <<<"$ph"; then
    die "$f is not fully static:"$'\n'"$(grep -E 'INTERP|DYNAMIC|Requesting' <<<"$ph")"
  fi
  if readelf -SW "$f" | grep -qE '\.symtab\s'; then
    die "$f is not stripped (profile strip=true expected)"
  fi
}

# <binary>.map := the link map of the deps/ artifact that cargo uplifted to <binary>.
copy_map() {
  local t=$1 out=$2 dep="" f
  dep=$(find "$(dirname "$out")/deps" -maxdepth 1 -samefile "$out" -print -quit 2>/dev/null || true)
  if [ -z "$dep" ]; then   # cargo copies instead of hard-linking on some filesystems
    for f in "$(dirname "$out")/deps/$(bin_name)"-*; do cmp -s "$f" "$out" && { dep=$f; break; }; done
  fi
  rm -f "$out.map"
  if [ -n "$dep" ] && [ -f "$(target_dir)/$t/release/maps/$(basename "$dep").map" ]; then
    cp "$(target_dir)/$t/release/maps/$(basename "$dep").map" "$out.map"
  else
    say "note: no link map found for $out"
  fi
}

build() {
  local t=${1:-}; [ -n "$t" ] || usage; shift
  target_env "$t"
  say "building $t ($(variant)) in $CARGO_TARGET_DIR: cargo build --release $*"
  ( cd "$REPO" && /usr/bin/cargo build --release --target "$t" -Z build-std=std,panic_abort \
      -Z build-std-features="$BUILD_STD_FEATURES" "$@" >&2 )
  local out; out=$(bin_path "$t")
  [ -f "$out" ] || die "cargo succeeded but $out is missing"
  check_static "$out"
  copy_map "$t" "$out"
  say "$(file -b "$out" | cut -d, -f1-2), $(stat -c %s "$out") bytes"
  echo "$out"
}

run() {
  local t=${1:-}; [ -n "$t" ] || usage; shift
  tinfo "$t"
  local bin=${TINYSCALE_BIN:-$(bin_path "$t")}
  [ -x "$bin" ] || die "$bin not built: scripts/cross-build.sh build $t"
  if [ -z "$QEMU" ]; then exec "$bin" "$@"; fi
  command -v "$QEMU" >/dev/null || die "$QEMU missing: run scripts/cross-build.sh setup"
  exec "$QEMU" "$bin" "$@"
}

case "${1:-}" in
  setup)   shift; setup "$@" ;;
  build)   shift; build "$@" ;;
  run)     shift; run "$@" ;;
  path)    tinfo "${2:?target}"; bin_path "$2" ;;
  env)     target_env "${2:?target}"; env | grep -E '^(RUSTC|RUSTDOC|CARGO|CC_|AR_|RUSTC_BOOTSTRAP)' | sort ;;
  targets) tr ' ' '\n' <<<"$ALL_TARGETS" ;;
  variant) variant ;;
  cache)   echo "$CACHE" ;;
  -h|--help|help|"") usage ;;
  *) say "unknown command '$1'"; usage ;;
esac
