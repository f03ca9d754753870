#!/usr/bin/env bash
# Checks that every checker of a debug guest reports on the serial console with its first line:
# builds sluice_report_selftest.ko against the variant's kernel build tree (in the cache), adds it
# to a copy of the variant's initramfs, boots it with `sluice run` (no IOMMU, one disk, the disk
# workload) and greps the console for the five reports. Exit 0: all five found. Sluice's own
# verdict stays PASS: it judges DMA and the disk, not the kernel log.
#
#   guest-images/variants/6.12-debug/report-selftest/run.sh [VARIANT]     (default 6.12-debug)
#
# SLUICE (default ./target/release/sluice), SLUICE_CACHE as everywhere. Needs the variant built
# (the first call builds it) and its build tree (build/<variant>-<key>) still in the cache.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../../.." && pwd)
cd "$ROOT"
V=${1:-6.12-debug}
SLUICE=${SLUICE:-./target/release/sluice}
CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}

eval "$("$SLUICE" image build "$V" 2>/dev/null | grep -E '^(KERNEL|INITRD)=')"
IMAGE_DIR=$(dirname "$KERNEL")
key=${IMAGE_DIR##*-}
B=$CACHE/build/$V-$key
[ -f "$B/Module.symvers" ] || { echo "no build tree $B (rebuild the variant: rm -rf $IMAGE_DIR)" >&2; exit 1; }
SRC=$(sed -n 's/^include \(.*\)\/Makefile$/\1/p' "$B/Makefile" | head -n1)
[ -d "$SRC" ] || { echo "cannot find the kernel source from $B/Makefile" >&2; exit 1; }

W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cp "$HERE/sluice_report_selftest.c" "$HERE/Kbuild" "$W/"
make -s -C "$SRC" O="$B" ARCH=x86_64 M="$W" modules >"$W/build.log" 2>&1 ||
    { tail -n 30 "$W/build.log" >&2; exit 1; }
mkdir "$W/root"
(cd "$W/root" && gzip -dc "$INITRD" | cpio -id --quiet)
cp "$W/sluice_report_selftest.ko" "$W/root/lib/modules/"
(cd "$W/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -n >"$W/initrd.gz")

LOG=${SELFTEST_LOG:-$ROOT/target/report-selftest-$V.serial}
"$SLUICE" run --kernel "$KERNEL" --initrd "$W/initrd.gz" --iommu none --timeout 300 \
    --cmdline 'sluice.load=virtio_blk,sluice_report_selftest' \
    --serial-log "$LOG" >"$W/run.out" 2>&1 || true
tail -n 3 "$W/run.out"

missing=0
for want in '------------[ cut here ]------------' \
    'BUG: sleeping function called from invalid context' \
    'WARNING: possible circular locking dependency detected' \
    'BUG: KASAN: ' \
    'ODEBUG: free active'; do
    if line=$(grep -F -m1 -- "$want" "$LOG"); then
        printf 'found    %s\n' "$line"
    else
        printf 'MISSING  %s\n' "$want"
        missing=1
    fi
done
echo "console: $LOG"
exit "$missing"
