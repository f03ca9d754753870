#!/usr/bin/env bash
# Build the patched guest-side QEMU that Sluice uses to attach its
# out-of-process devices through x-pci-proxy-dev under TCG, for one target
# architecture (default x86_64: x86_64-softmmu).
#
#   guest-images/qemu/build-qemu.sh [--arch ARCH]     (or SLUICE_ARCH=ARCH)
#
# Source: Debian bookworm's own qemu source package (apt-get source, deb-src
# entry added if missing), plus proxy-intx-tcg.patch from this directory.
# Result: ${SLUICE_CACHE:-$HOME/.cache/sluice}/qemu/<key>/qemu-system-<arch>,
# key = sha256(source version, patch, configure flags), first 16 hex digits.
# Also builds the Sluice TCG plugin (plugin/sluice-stall.c, see
# plugin/build-plugin.sh) against this QEMU's qemu-plugin.h and prints
# QEMU_PLUGIN=<abs path>. A plugin build failure fails this script: the
# guest.sym.* points and their tests need the plugin.
# Progress goes to stderr; the last line of stdout is QEMU=<abs path>.
#
# Another architecture also applies the patches in qemu/<arch>/*.patch (it
# has none yet, so the script stops) and leaves out --enable-kvm.
#
# Environment:
#   QEMU_SRC_VERSION   build this source version (default: newest in Sources)
#   SLUICE_APT_UPDATE  1 = always run apt-get update (default: only when the
#                      deb-src entry was just written or no qemu source is known)
set -euo pipefail
export LC_ALL=C
# configure/meson must find Debian's python3, not a pyenv shim
export PATH=/usr/bin:/bin:/usr/sbin:/sbin:$PATH

# shellcheck disable=SC2034  # used by die() in lib/common.sh
SCRIPT_NAME=build-qemu.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$HERE/../lib/common.sh"

WANT_ARCH=${SLUICE_ARCH:-x86_64}
case "${1:-}" in
    -h|--help) sed -n '2,24p' "$HERE/build-qemu.sh" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --arch) [ $# -eq 2 ] || die "usage: build-qemu.sh [--arch ARCH]"; WANT_ARCH=$2 ;;
    '') ;;
    *) die "usage: build-qemu.sh [--arch ARCH]" ;;
esac
arch_setup "$WANT_ARCH"

PATCH=$HERE/proxy-intx-tcg.patch
[ -f "$PATCH" ] || die "$PATCH is missing"
# Patches another target needs on top (x86_64 needs none): stock QEMU builds
# x-pci-proxy-dev only for KVM targets, and a foreign target has no KVM here.
ARCH_PATCHES=()
if [ "$ARCH" != x86_64 ]; then
    shopt -s nullglob
    ARCH_PATCHES=("$HERE/$ARCH"/*.patch)
    shopt -u nullglob
    [ ${#ARCH_PATCHES[@]} -gt 0 ] \
        || die "no QEMU patches for $ARCH (qemu/$ARCH/*.patch): its x-pci-proxy-dev build is not set up yet"
fi
STAGES=6
JOBS=$(nproc)
HB_PID=
trap 'if [ -n "${HB_PID:-}" ]; then kill "$HB_PID" 2>/dev/null || true; fi' EXIT
T_START=$(now)

CONFIGURE_ARGS=(
    --target-list="$ARCH_QEMU_TARGET"
    --without-default-features
    --enable-kvm              # hw/remote (MULTIPROCESS) depends on KVM in Kconfig
    --enable-tcg
    --enable-multiprocess     # x-pci-proxy-dev
    --enable-plugins          # TCG plugins: guest.sym.* stall points (plugin/)
    --enable-fdt=system       # the dfsg tarball ships no dtc
    --disable-docs
    --disable-werror
    --disable-debug-info
    --disable-tools
    --disable-guest-agent
    --disable-install-blobs
    --firmwarepath=/usr/share/qemu:/usr/share/seabios
)
NINJA_TARGET=$ARCH_QEMU_BIN
if [ "$ARCH" != x86_64 ]; then
    # KVM is only for the host's own architecture; the patches lift MULTIPROCESS's
    # dependency on it.
    args=()
    for a in "${CONFIGURE_ARGS[@]}"; do [ "$a" = --enable-kvm ] || args+=("$a"); done
    CONFIGURE_ARGS=("${args[@]}")
fi

# build_plugin: the TCG plugin, next to the binary (keyed by its own sources).
build_plugin() {
    local out
    out=$(bash "$HERE/plugin/build-plugin.sh" "$DEST") \
        || die "the Sluice TCG plugin did not build (guest.sym points need it)"
    printf '%s\n' "$out" | grep '^QEMU_PLUGIN=' \
        || die "plugin/build-plugin.sh printed no QEMU_PLUGIN= line"
}

# ---------------------------------------------------------------------------
stage 1 $STAGES "host packages"
# seabios and qemu-system-data bring the firmware and option ROMs the patched
# binary loads at run time. Debian's stock qemu-system-x86 is not needed (the
# patched binary also runs under KVM and as the x-remote side) and is not
# installed: its qemu-system-common conflicts with newer qemu-utils.
need_packages dpkg-dev build-essential pkg-config python3 meson ninja-build \
    libglib2.0-dev libpixman-1-dev libfdt-dev zlib1g-dev flex bison xz-utils \
    seabios qemu-system-data

# ---------------------------------------------------------------------------
stage 2 $STAGES "deb-src entry + qemu source version"
SRC_LIST=/etc/apt/sources.list.d/sluice-deb-src.sources
want_list=$(cat <<'EOF'
# Written by Sluice guest-images/qemu/build-qemu.sh: source packages, needed
# for `apt-get source qemu` (the patched x-pci-proxy-dev QEMU build).
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
)
need_update=${SLUICE_APT_UPDATE:-0}
if [ "$(cat "$SRC_LIST" 2>/dev/null)" != "$want_list" ]; then
    [ "$(id -u)" = 0 ] || die "need root to write $SRC_LIST"
    printf '%s\n' "$want_list" > "$SRC_LIST"
    log "      wrote $SRC_LIST"
    need_update=1
fi
newest_qemu_source() {
    local v best=''
    while read -r v; do
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done < <(apt-cache showsrc --only-source qemu 2>/dev/null | sed -n 's/^Version: //p')
    echo "$best"
}
VER=${QEMU_SRC_VERSION:-}
if [ -z "$VER" ] && [ "$need_update" != 1 ]; then
    VER=$(newest_qemu_source)
    [ -n "$VER" ] || need_update=1
fi
if [ "$need_update" = 1 ]; then
    log "      apt-get update"
    apt-get update -q >&2 || die "apt-get update failed"
    [ -n "${QEMU_SRC_VERSION:-}" ] || VER=$(newest_qemu_source)
fi
[ -n "$VER" ] || die "no qemu source package found in the apt indexes (is $SRC_LIST active?)"
UPVER=${VER#*:}                     # without epoch, as in file names
KEY=$( {
    echo "qemu source $VER"
    echo "patch"; cat "$PATCH"
    echo "configure ${CONFIGURE_ARGS[*]}"
    echo "target $NINJA_TARGET"
    # Only other targets have these, so x86_64 keys stay what they were.
    for p in "${ARCH_PATCHES[@]}"; do echo "patch ${p#"$HERE"/}"; cat "$p"; done
} | short_hash )
DEST=$SLUICE_CACHE/qemu/$KEY
BIN=$DEST/$ARCH_QEMU_BIN
log "      qemu source $VER, key $KEY"

# serialise concurrent builds of the same key (the second one then finds it cached)
mkdir -p "$SLUICE_CACHE/qemu"
exec 9>"$SLUICE_CACHE/qemu/$KEY.lock"
if ! flock -n 9; then
    log "      another build of qemu $KEY is running; waiting for its lock"
    flock 9
fi

if [ -f "$DEST/.complete" ] && [ -x "$BIN" ]; then
    stage 3 $STAGES "download: skipped"
    stage 4 $STAGES "unpack + patch: skipped"
    stage 5 $STAGES "configure: skipped"
    stage 6 $STAGES "build: cached ($BIN)"
    log "cached"
    build_plugin
    echo "QEMU=$BIN"
    exit 0
fi

# ---------------------------------------------------------------------------
DL=$SLUICE_CACHE/qemu/dl
DSC=$DL/qemu_$UPVER.dsc
stage 3 $STAGES "download source qemu=$VER -> $DL"
mkdir -p "$DL"
if [ -f "$DSC" ]; then
    log "      already downloaded"
else
    if ! ( cd "$DL" && apt-get source --download-only -q "qemu=$VER" ) > "$DL/download.log" 2>&1; then
        tail -n 20 "$DL/download.log" >&2
        die "apt-get source qemu=$VER failed"
    fi
    grep -E '^(Fetched|Need to get)' "$DL/download.log" | sed 's/^/      /' >&2 || true
fi
[ -f "$DSC" ] || die "$DSC not found after download"

# ---------------------------------------------------------------------------
WORK=$SLUICE_CACHE/qemu/work/$KEY
SRC=$WORK/qemu-$UPVER
stage 4 $STAGES "unpack (dpkg-source -x) + patch -> $SRC"
rm -rf "$WORK"
mkdir -p "$WORK"
dpkg-source -x "$DSC" "$SRC" > "$WORK/unpack.log" 2>&1 \
    || { tail -n 20 "$WORK/unpack.log" >&2; die "dpkg-source -x $DSC failed"; }
patch -d "$SRC" -p1 --batch --forward < "$PATCH" > "$WORK/patch.log" 2>&1 \
    || { cat "$WORK/patch.log" >&2; die "$(basename "$PATCH") does not apply to qemu $VER"; }
for p in "${ARCH_PATCHES[@]}"; do
    patch -d "$SRC" -p1 --batch --forward < "$p" >> "$WORK/patch.log" 2>&1 \
        || { cat "$WORK/patch.log" >&2; die "$ARCH/$(basename "$p") does not apply to qemu $VER"; }
done
sed 's/^/      /' "$WORK/patch.log" >&2

# ---------------------------------------------------------------------------
stage 5 $STAGES "configure ($ARCH_QEMU_TARGET, TCG$([ "$ARCH" = x86_64 ] && echo ' + KVM') + multiprocess)"
mkdir -p "$SRC/build"
configure_progress() { echo "configuring, $(wc -l < "$SRC/build/configure.log") log lines"; }
run_with_heartbeat "$SRC/build/configure.log" configure_progress -- \
    env -C "$SRC/build" ../configure --meson=/usr/bin/meson "${CONFIGURE_ARGS[@]}" \
    || die "configure failed (log: $SRC/build/configure.log)"

# ---------------------------------------------------------------------------
stage 6 $STAGES "ninja -j$JOBS $NINJA_TARGET (log: $SRC/build/ninja.log)"
export NINJA_STATUS='[%f/%t] '
ninja_progress() {
    local st
    st=$(grep -o '^\[[0-9]*/[0-9]*\]' "$SRC/build/ninja.log" 2>/dev/null | tail -n1 | tr -d '[]')
    if [ -n "$st" ]; then
        echo "step ${st%/*}/${st#*/} (~$(( ${st%/*} * 100 / ${st#*/} ))%)"
    else
        echo "starting"
    fi
}
t0=$(now)
run_with_heartbeat "$SRC/build/ninja.log" ninja_progress -- \
    ninja -C "$SRC/build" -j"$JOBS" "$NINJA_TARGET" || die "ninja failed (log: $SRC/build/ninja.log)"
BUILD_SECS=$(( $(now) - t0 ))

"$SRC/build/$NINJA_TARGET" -device help 2>/dev/null | grep -q '"x-pci-proxy-dev"' \
    || die "built binary has no x-pci-proxy-dev device"
mkdir -p "$DEST"
rm -f "$DEST/.complete"
cp "$SRC/build/$NINJA_TARGET" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
{
    echo "qemu_source: $VER"
    echo "version: $("$BIN" --version | head -n1)"
    echo "patch: $(basename "$PATCH") sha256 $(sha256sum < "$PATCH" | cut -c1-64)"
    echo "configure: ${CONFIGURE_ARGS[*]}"
    echo "build_seconds: $BUILD_SECS (ninja -j$JOBS)"
    echo "build_tree: $SRC/build"
    echo "binary_sha256: $(sha256sum < "$BIN" | cut -c1-64)"
} > "$DEST/manifest.txt"
cp "$PATCH" "$DEST/$(basename "$PATCH")"
# the plugin API header of exactly this QEMU (plugins are built against it)
mkdir -p "$DEST/include"
cp "$SRC/include/qemu/qemu-plugin.h" "$DEST/include/qemu-plugin.h"
touch "$DEST/.complete"
log "build-qemu.sh: done in $(( $(now) - T_START ))s (ninja ${BUILD_SECS}s)"
build_plugin
echo "QEMU=$BIN"
