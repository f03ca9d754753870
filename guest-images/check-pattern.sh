#!/usr/bin/env bash
# Host-side check of what the guest's `sluice.workload=disk` wrote:
#   guest-images/check-pattern.sh DISK_IMAGE SEED VDNAME
# e.g. check-pattern.sh /tmp/d.img 7 vda
# Compares the 4 MiB at byte offset 1 MiB of DISK_IMAGE (a raw image) with
# the line "sluice pattern seed=SEED disk=VDNAME\n" repeated to 4194304 bytes.
# Prints "PATTERN OK" / "PATTERN MISMATCH" and exits 0 / 1.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 DISK_IMAGE SEED VDNAME" >&2; exit 2; }
img=$1 seed=$2 vd=$3
[ -r "$img" ] || { echo "cannot read $img" >&2; exit 2; }
if cmp -s <(yes "sluice pattern seed=$seed disk=$vd" | head -c 4194304) \
          <(dd if="$img" bs=64k skip=16 count=64 status=none); then
    echo "PATTERN OK $img seed=$seed disk=$vd"
else
    echo "PATTERN MISMATCH $img seed=$seed disk=$vd"
    exit 1
fi
