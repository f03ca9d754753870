#!/usr/bin/env bash
# Guest disk throughput, Sluice's virtio-blk (served through x-pci-proxy-dev) against QEMU's
# in-process virtio-blk-pci, in one run on the same guest, kernel, QEMU binary and workload.
#
# Usage: benches/guest-io.sh [ROUNDS] [VARIANT]      (defaults: 3 rounds, guest 6.12)
# Env:   DDMB (MiB per 1M test, default 256), DD4K (4 KiB blocks per 4k test, default 8192),
#        CPUS (default 2), SLUICE (path to the sluice binary; built if unset).
# Prints per-round figures, then medians and the ratio Sluice / QEMU for each test.
# Figures are guest-side (dd timed with /proc/uptime, 10 ms resolution) under QEMU TCG here.
set -euo pipefail
ROUNDS=${1:-3}
VARIANT=${2:-6.12}
DDMB=${DDMB:-256}
DD4K=${DD4K:-8192}
CPUS=${CPUS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$ROOT/target/guest-io}
mkdir -p "$WORK"

if [ -z "${SLUICE:-}" ]; then
    cargo build -q --release -p sluice --manifest-path "$ROOT/Cargo.toml"
    SLUICE=$ROOT/target/release/sluice
fi
eval "$("$SLUICE" image build "$VARIANT" | grep -E '^(KERNEL|INITRD)=')"
QEMU=$(flock "${SLUICE_CACHE:-$HOME/.cache/sluice}/.build.lock" bash "$ROOT/guest-images/qemu/build-qemu.sh" 2>/dev/null | sed -n 's/^QEMU=//p' | tail -1)
[ -x "$QEMU" ] || { echo "no QEMU binary" >&2; exit 1; }

CMDLINE="console=ttyS0 panic=-1 nokaslr tsc=unstable quiet sluice.workload=bench sluice.ddmb=$DDMB sluice.dd4k=$DD4K"
DISK=$WORK/disk.img
rm -f "$DISK"; truncate -s 1G "$DISK"

run_sluice() { # -> console on stdout
    "$SLUICE" run --kernel "$KERNEL" --initrd "$INITRD" --qemu "$QEMU" --cpus "$CPUS" \
        --disk "$DISK" --workload bench --cmdline "quiet sluice.ddmb=$DDMB sluice.dd4k=$DD4K" \
        --run-dir "$WORK/sluice" --timeout 600 >/dev/null 2>&1 || true
    cat "$WORK/sluice/serial.log"
}

run_qemu() {
    timeout 600 "$QEMU" -L /usr/share/seabios -L /usr/share/qemu -accel tcg,thread=multi -cpu max \
        -M q35,memory-backend=mem -smp "$CPUS" -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE" \
        -drive "file=$DISK,if=none,id=d0,format=raw,cache=writeback,aio=threads" \
        -device virtio-blk-pci,drive=d0,disable-legacy=on,addr=0x3 2>&1 || true
}

RESULTS=$WORK/results.txt
: > "$RESULTS"
for r in $(seq 1 "$ROUNDS"); do
    for who in sluice qemu; do
        "run_$who" | sed -n 's/.*SLUICE: BENCH \([A-Za-z0-9]*\) .* \([0-9.]*\) MiB\/s.*/\1 \2/p' |
            while read -r test mibs; do echo "$who $test $mibs" >> "$RESULTS"; echo "round $r $who $test $mibs MiB/s"; done
    done
done

echo
echo "medians over $ROUNDS rounds (guest $VARIANT, $CPUS vCPUs, TCG; ddmb=$DDMB dd4k=$DD4K)"
printf '%-10s %12s %12s %8s\n' test "sluice MB/s" "qemu MB/s" ratio
for test in read1M write1M read4k write4k; do
    s=$(awk -v t=$test '$1=="sluice" && $2==t {print $3}' "$RESULTS" | sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "nan"}')
    q=$(awk -v t=$test '$1=="qemu" && $2==t {print $3}' "$RESULTS" | sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "nan"}')
    awk -v t=$test -v s="$s" -v q="$q" 'BEGIN { r = (q > 0) ? s / q : 0; printf "%-10s %12.1f %12.1f %8.2f\n", t, s, q, r }'
done
