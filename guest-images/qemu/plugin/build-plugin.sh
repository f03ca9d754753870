#!/usr/bin/env bash
# Build the Sluice TCG plugin (sluice-stall.c) for the QEMU in DEST.
#
#   guest-images/qemu/plugin/build-plugin.sh DEST
#
# DEST is a build-qemu.sh result directory holding include/qemu-plugin.h (the
# header of exactly that QEMU). Output: DEST/plugin-<hash>/libsluice-stall.so,
# hash = sha256(plugin source, this script, the header), cached.
# Progress goes to stderr; stdout is QEMU_PLUGIN=<abs path>.
set -euo pipefail
export LC_ALL=C
SCRIPT_NAME=build-plugin.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../../lib/common.sh
. "$HERE/../../lib/common.sh"

DEST=${1:?usage: build-plugin.sh DEST}
HDR=$DEST/include/qemu-plugin.h
SRC=$HERE/sluice-stall.c
[ -f "$HDR" ] || die "$HDR missing (rebuild QEMU with guest-images/qemu/build-qemu.sh)"
[ -f "$SRC" ] || die "$SRC missing"
need_packages gcc pkg-config libglib2.0-dev
KEY=$(cat "$SRC" "$HERE/build-plugin.sh" "$HDR" | short_hash)
OUT=$DEST/plugin-$KEY
SO=$OUT/libsluice-stall.so
if [ ! -f "$SO" ]; then
    mkdir -p "$OUT"
    # shellcheck disable=SC2046
    gcc -O2 -g -Wall -Wextra -Werror -std=gnu11 -shared -fPIC \
        -I"$DEST/include" $(pkg-config --cflags glib-2.0) \
        -o "$SO.tmp" "$SRC" >"$OUT/build.log" 2>&1 \
        || { cat "$OUT/build.log" >&2; die "plugin build failed"; }
    mv "$SO.tmp" "$SO"
    log "      plugin built: $SO"
fi
echo "QEMU_PLUGIN=$SO"
