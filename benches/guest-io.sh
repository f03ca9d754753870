#!/usr/bin/env bash
# Guest disk throughput, Sluice's virtio-blk (served through x-pci-proxy-dev) against QEMU's
# in-process virtio-blk-pci, in one run on the same guest, kernel, QEMU binary and workload.
#
# Usage: benches/guest-io.sh [ROUNDS] [VARIANT]      (defaults: 3 rounds, guest 6.12)
# Modes (env MODES, default "none lazy strict"): no IOMMU; virtio-iommu with the default lazy
# (DMA-FQ) domains; virtio-iommu with iommu.strict=1. Sluice's virtio-iommu + virtio-blk
# against QEMU's virtio-iommu-pci + virtio-blk-pci,iommu_platform=on.
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
QEMU=$(bash "$ROOT/guest-images/qemu/build-qemu.sh" 2>/dev/null | sed -n 's/^QEMU=//p' | tail -1)
[ -x "$QEMU" ] || { echo "no QEMU binary" >&2; exit 1; }

CMDLINE="console=ttyS0 panic=-1 nokaslr tsc=unstable quiet sluice.workload=bench sluice.ddmb=$DDMB sluice.dd4k=$DD4K"
DISK=$WORK/disk.img
rm -f "$DISK"; truncate -s 1G "$DISK"

# MODE: none | lazy | strict. lazy is the 6.12 default (DMA-FQ); strict adds iommu.strict=1.
iommu_cmdline() { [ "$1" = strict ] && echo "iommu.strict=1" || true; }

run_sluice() { # MODE -> console on stdout
    local mode=$1 iommu=()
    [ "$mode" != none ] && iommu=(--iommu virtio)
    "$SLUICE" run --kernel "$KERNEL" --initrd "$INITRD" --qemu "$QEMU" --cpus "$CPUS" \
        "${iommu[@]}" --disk "$DISK" --workload bench \
        --cmdline "quiet sluice.ddmb=$DDMB sluice.dd4k=$DD4K $(iommu_cmdline "$mode")" \
        --run-dir "$WORK/sluice" --timeout 900 >/dev/null 2>&1 || true
    cat "$WORK/sluice/serial.log"
}

run_qemu() { # MODE
    local mode=$1 dev=(-device virtio-blk-pci,drive=d0,disable-legacy=on,addr=0x3)
    [ "$mode" != none ] && dev=(-device virtio-iommu-pci,addr=0x2
        -device virtio-blk-pci,drive=d0,disable-legacy=on,iommu_platform=on,addr=0x3)
    timeout 900 "$QEMU" -L /usr/share/seabios -L /usr/share/qemu -accel tcg,thread=multi -cpu max \
        -M q35,memory-backend=mem -smp "$CPUS" -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE $(iommu_cmdline "$mode")" \
        -drive "file=$DISK,if=none,id=d0,format=raw,cache=writeback,aio=threads" \
        "${dev[@]}" 2>&1 || true
}

MODES=${MODES:-none lazy strict}
RESULTS=$WORK/results.txt
: > "$RESULTS"
for r in $(seq 1 "$ROUNDS"); do
    for mode in $MODES; do
        for who in sluice qemu; do
            "run_$who" "$mode" | sed -n 's/.*SLUICE: BENCH \([A-Za-z0-9]*\) .* \([0-9.]*\) MiB\/s.*/\1 \2/p' |
                while read -r test mibs; do
                    echo "$who $mode $test $mibs" >> "$RESULTS"
                    echo "round $r $who $mode $test $mibs MiB/s"
                done
        done
    done
done

median() { # WHO MODE TEST
    awk -v w="$1" -v m="$2" -v t="$3" '$1==w && $2==m && $3==t {print $4}' "$RESULTS" | sort -n |
        awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print 0}'
}

echo
echo "medians over $ROUNDS rounds (guest $VARIANT, $CPUS vCPUs, TCG; ddmb=$DDMB dd4k=$DD4K), MB/s"
printf '%-8s %-10s %10s %10s %8s\n' mode test sluice qemu ratio
for mode in $MODES; do
    for test in read1M write1M read4k write4k; do
        awk -v m="$mode" -v t="$test" -v s="$(median sluice "$mode" "$test")" -v q="$(median qemu "$mode" "$test")" \
            'BEGIN { printf "%-8s %-10s %10.1f %10.1f %8.2f\n", m, t, s, q, (q > 0) ? s / q : 0 }'
    done
done
if [[ " $MODES " == *" none "* ]]; then
    echo
    echo "IOMMU cost factors (throughput with the IOMMU / without, same backend; 1.00 = free)"
    printf '%-8s %-10s %10s %10s %12s\n' mode test sluice qemu "sluice/qemu"
    for mode in $MODES; do
        [ "$mode" = none ] && continue
        for test in read1M write1M read4k write4k; do
            awk -v m="$mode" -v t="$test" \
                -v s="$(median sluice "$mode" "$test")" -v s0="$(median sluice none "$test")" \
                -v q="$(median qemu "$mode" "$test")" -v q0="$(median qemu none "$test")" \
                'BEGIN { fs = (s0 > 0) ? s / s0 : 0; fq = (q0 > 0) ? q / q0 : 0;
                         printf "%-8s %-10s %10.2f %10.2f %12.2f\n", m, t, fs, fq, (fq > 0) ? fs / fq : 0 }'
        done
    done
fi
