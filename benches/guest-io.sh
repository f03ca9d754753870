#!/usr/bin/env bash
# Guest disk throughput, Sluice's virtio-blk (served through x-pci-proxy-dev) against QEMU's
# in-process virtio-blk-pci, in one run on the same guest, kernel, QEMU binary and workload.
#
# Usage: benches/guest-io.sh [--arch x86_64|arm64|s390x] [ROUNDS] [VARIANT]
#        (defaults: x86_64, 5 rounds, the architecture's default guest: 6.12 / arm64-6.12 /
#        s390x-6.12)
# Modes (env MODES, default "none lazy strict"): no IOMMU; the IOMMU with the default lazy
# (DMA-FQ) domains; the IOMMU with iommu.strict=1. The IOMMU is the architecture's peer pair:
#   x86_64: Sluice's virtio-iommu + virtio-blk against QEMU's virtio-iommu-pci +
#           virtio-blk-pci,iommu_platform=on (q35);
#   arm64:  Sluice's SMMUv3 (served through x-smmuv3-proxy) + virtio-blk against QEMU's own
#           SMMUv3 (-M virt,iommu=smmuv3) + virtio-blk-pci,iommu_platform=on;
#   s390x:  Sluice's zPCI model (instructions forwarded over x-zpci-proxy-fd) + virtio-blk
#           against QEMU's own zPCI translation + virtio-blk-pci,iommu_platform=on
#           (-M s390-ccw-virtio). Every s390 PCI function is translated: there is no "none"
#           mode (default MODES="lazy strict"), and the cost factor printed is strict / lazy.
# Env:   DDMB (MiB per 1M test, default 4096 without an IOMMU, 2048 with one: at least 2 s
#        each at the speeds seen here), DD4K (4 KiB blocks per 4k test, default 32768),
#        LAYOUT (physical layout of the 1M tests' buffer, made by the guest's dma-bench:
#        scattered (default: every 4 KiB page its own DMA segment, 256 mappings per request),
#        contiguous (one segment per request) or any (wherever the guest's allocator puts it,
#        as dd has it: 1 to 256 segments, varying from boot to boot; docs/benchmarks.md)),
#        CPUS (default 2), SLUICE (path to the sluice binary; built if unset), QEMU (binary),
#        FORCE=1 (measure even if the machine is busy; see the load check below),
#        DISK_DIR (where the sparse disk image goes; default /dev/shm when it has room, so no
#        test waits for the host's own disk, else the work directory),
#        VCPU_SCHED=fifo (the guest's vCPU threads at SCHED_FIFO priority 1 on both sides: Sluice's
#        through SLUICE_VCPU_SCHED=fifo, with its answering threads one priority above;
#        QEMU's in-process ones by chrt once they exist. A benchmark setting: with it no vCPU
#        waits for a core behind a polling thread; docs/benchmarks.md),
#        SCHED=1 (where the host's cores went: per test and thread, CPU time and run-queue wait,
#        read at the guest's start and end markers by benches/sched-sampler.py; printed as
#        "sched" lines per run and summed up per side, mode and test at the end),
#        VARIANTS (A/B of Sluice configurations in the same run, alternating within each round:
#        space-separated LABEL or LABEL:VAR=VALUE,VAR=VALUE; VAR is an environment variable for
#        that sluice run, or PROXY_QEMU (the QEMU binary Sluice's side uses) or SLUICE_BIN (the
#        sluice binary); default "sluice"), e.g.
#          VARIANTS="old:PROXY_QEMU=/path/to/older/qemu nomsix:SLUICE_PROXY_MSIX=off sluice"
# Prints every single value (per round, and in brackets after each median), the medians, the
# ratio Sluice / QEMU, both IOMMU cost factors and their ratio, and flags (*) a median whose
# tests lasted under 2 s (DDMB/DD4K too small for the speed: the 10 ms clock then matters).
# Figures are guest-side under QEMU TCG here: the 4k tests are busybox dd timed with /proc/uptime
# (10 ms resolution), the 1M tests the guest's dma-bench (clock_gettime).
set -euo pipefail
ARCH=x86_64
if [ "${1:-}" = --arch ]; then
    case "${2:-}" in
        x86_64|x86-64|amd64) ARCH=x86_64 ;;
        aarch64|arm64) ARCH=aarch64 ;;
        s390x|s390) ARCH=s390x ;;
        *) echo "usage: guest-io.sh [--arch x86_64|arm64|s390x] [ROUNDS] [VARIANT]" >&2; exit 2 ;;
    esac
    shift 2
fi
ROUNDS=${1:-5}
case "$ARCH" in
    aarch64) VARIANT=${2:-arm64-6.12} ;;
    s390x) VARIANT=${2:-s390x-6.12} ;;
    *) VARIANT=${2:-6.12} ;;
esac
# Sizes: every test should last at least 2 s: 128 MiB of 4k requests at up to ~60 MB/s; 4 GiB
# of 1M requests without an IOMMU (up to ~2 GB/s), 2 GiB with one (up to ~1 GB/s).
DDMB_NONE=${DDMB:-4096}
DDMB_IOMMU=${DDMB:-2048}
ddmb() { [ "$1" = none ] && echo "$DDMB_NONE" || echo "$DDMB_IOMMU"; }
DD4K=${DD4K:-32768}
CPUS=${CPUS:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$ROOT/target/guest-io-$ARCH}
mkdir -p "$WORK"

# Both sides share this machine's cores with whatever else runs: refuse to measure on a busy
# machine (the 1-minute load average, less this script's own share, above half the cores).
read -r LOAD_START _ < /proc/loadavg
echo "guest-io.sh: $(date -u '+%F %T') UTC, load average $LOAD_START on $(nproc) cores"
if [ "${FORCE:-0}" != 1 ]; then
    read -r load1 _ < /proc/loadavg
    if awk -v l="$load1" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
        echo "guest-io.sh: load average $load1 on $(nproc) cores: another heavy process is running;" \
             "not measuring (FORCE=1 to measure anyway)" >&2
        exit 3
    fi
fi

if [ -z "${SLUICE:-}" ]; then
    cargo build -q --release -p sluice --manifest-path "$ROOT/Cargo.toml"
    SLUICE=$ROOT/target/release/sluice
fi
eval "$("$SLUICE" image build "$VARIANT" | grep -E '^(KERNEL|INITRD)=')"
# QEMU: the patched build (built if needed), or the binary in $QEMU (e.g. an older build's, to
# compare two QEMU patch series with the same Sluice).
QEMU=${QEMU:-$(bash "$ROOT/guest-images/qemu/build-qemu.sh" --arch "$ARCH" 2>/dev/null | sed -n 's/^QEMU=//p' | tail -1)}
[ -x "$QEMU" ] || { echo "no QEMU binary" >&2; exit 1; }

if [ "$ARCH" = aarch64 ]; then
    CONSOLE=ttyAMA0 BASE_CMDLINE="panic=-1" SLUICE_IOMMU=smmuv3
elif [ "$ARCH" = s390x ]; then
    CONSOLE=ttysclp0 BASE_CMDLINE="panic=-1 nokaslr" SLUICE_IOMMU=zpci
else
    # The pieces of MachineSpec::x86_q35; no PS/2 ports (docs/findings.md, finding 4).
    CONSOLE=ttyS0 BASE_CMDLINE="panic=-1 nokaslr i8042.nokbd i8042.noaux tsc=unstable" SLUICE_IOMMU=virtio
fi
LAYOUT=${LAYOUT:-scattered}
CMDLINE="console=$CONSOLE $BASE_CMDLINE quiet sluice.workload=bench sluice.dd4k=$DD4K sluice.layout=$LAYOUT"
# Room for the read and the write region of the 1M tests, and for the writes, which start at
# 512 MiB (the /init bench workload).
BIGGEST=$((DDMB_NONE > DDMB_IOMMU ? DDMB_NONE : DDMB_IOMMU))
WRITTEN=$((BIGGEST > DD4K * 4 / 1024 ? BIGGEST : DD4K * 4 / 1024))
DISK_MIB=$((2 * BIGGEST + 256 > 512 + WRITTEN + 64 ? 2 * BIGGEST + 256 : 512 + WRITTEN + 64))
# The disk lives in memory (tmpfs) when there is room for all of it: the 1M writes then never
# wait for the host's own disk to take dirty pages, which measured the host's storage rather
# than either data path (docs/benchmarks.md). DISK_DIR overrides the place.
if [ -z "${DISK_DIR:-}" ]; then
    DISK_DIR=$WORK
    shm_free=$(df -Pm /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')
    if [ -n "$shm_free" ] && [ "$shm_free" -gt $((DISK_MIB + 1024)) ]; then
        DISK_DIR=/dev/shm/sluice-guest-io-$ARCH
    fi
fi
mkdir -p "$DISK_DIR"
DISK=$DISK_DIR/disk.img
# a disk in memory holds RAM until it is removed
case "$DISK_DIR" in /dev/shm/*) trap 'rm -f "$DISK"' EXIT ;; esac
rm -f "$DISK"; truncate -s "${DISK_MIB}M" "$DISK"
# The region the guest writes is written once up front: in a sparse image the first side to
# write paid for every page the host allocated (the first write1M of a run measured 244-420
# MiB/s, the same test 900-1850 later; fallocate alone did not help on tmpfs).
dd if=/dev/zero of="$DISK" bs=1M seek=512 count="$WRITTEN" conv=notrunc status=none
echo "guest-io.sh: disk image $DISK ($(df -PT "$DISK_DIR" | awk 'NR == 2 { print $2 }'), $DISK_MIB MiB, the $WRITTEN MiB written region prefilled)"

# MODE: none | lazy | strict. lazy is the 6.12 default (DMA-FQ); strict adds iommu.strict=1.
iommu_cmdline() { [ "$1" = strict ] && echo "iommu.strict=1" || true; }

SCHED_LOG=$WORK/sched.txt
: > "$SCHED_LOG"
sample_sched() { # PID CONSOLE "ROUND WHO MODE": with SCHED=1, sample PID's threads in the background
    [ "${SCHED:-0}" = 1 ] || return 0
    python3 "$ROOT/benches/sched-sampler.py" "$1" "$2" "$3" | tee -a "$SCHED_LOG" >&3 &
}

# VCPU_SCHED=fifo: Sluice raises its QEMU's vCPU threads itself; QEMU's own run gets the same
# from raise_vcpus.
[ "${VCPU_SCHED:-}" = fifo ] && export SLUICE_VCPU_SCHED=fifo
raise_vcpus() { # PID "ROUND MODE": QEMU's vCPU threads (below PID) to SCHED_FIFO 1, once they exist
    local tries=0 raised=0 t
    while [ $tries -lt 100 ] && [ "$raised" -lt "$CPUS" ]; do
        sleep 0.1; tries=$((tries + 1)); raised=0
        for t in /proc/$(pgrep -P "$1" | head -1)/task/*; do
            case "$(cat "$t/comm" 2>/dev/null)" in
                "CPU "*/*) chrt -f -p 1 "${t##*/}" && raised=$((raised + 1)) ;;
            esac
        done
    done
    echo "round ${2%% *} qemu ${2#* } vcpu threads $raised SCHED_FIFO" >&3
}

await_run() { # PID CONSOLE "ROUND WHO MODE": waits for a backgrounded run, sampled with SCHED=1
    sample_sched "$1" "$2" "$3"
    wait "$1" || true
    wait   # the sampler and raise_vcpus, which end with the run
}

VARIANTS=${VARIANTS:-sluice}
variant_label() { echo "${1%%:*}"; }
exec 3>&1   # the script's own stdout, for lines printed from inside pipelines
run_sluice() { # MODE VARIANT ROUND -> console on stdout
    local mode=$1 spec=$2 round=$3 iommu=() envs=() bin=$SLUICE qemu=$QEMU kv
    if [ "$mode" != none ]; then iommu=(--iommu "$SLUICE_IOMMU"); fi
    if [[ "$spec" == *:* ]]; then
        IFS=, read -r -a kvs <<< "${spec#*:}"
        for kv in "${kvs[@]}"; do
            case "$kv" in
                PROXY_QEMU=*) qemu=${kv#PROXY_QEMU=} ;;
                SLUICE_BIN=*) bin=${kv#SLUICE_BIN=} ;;
                ?*=*) envs+=("$kv") ;;
            esac
        done
    fi
    rm -f "$WORK/sluice/serial.log"
    env "${envs[@]}" "$bin" run --arch "$ARCH" --kernel "$KERNEL" --initrd "$INITRD" --qemu "$qemu" \
        --cpus "$CPUS" "${iommu[@]}" --disk "$DISK" --workload bench \
        --cmdline "quiet sluice.ddmb=$(ddmb "$mode") sluice.dd4k=$DD4K sluice.layout=$LAYOUT $(iommu_cmdline "$mode")" \
        --run-dir "$WORK/sluice" --timeout 900 > "$WORK/sluice.out" 2>&1 &
    await_run $! "$WORK/sluice/serial.log" "$round $(variant_label "$spec") $mode"
    # the proxy's traffic (round trips, ioeventfd doorbells, MSI-X, SCHED_FIFO threads) of
    # this run: every proxied device's, and the platform IOMMU's or zPCI channel's
    sed -n "s/^\(device proxy\|iommu proxy\|zpci proxy\|vcpu threads\): *\(.*\)/round $round $(variant_label "$spec") $mode \1 \2/p" \
        "$WORK/sluice.out" >&3
    cat "$WORK/sluice/serial.log"
}

# QEMU's own devices on the same machine shape as Sluice's launcher gives it (memfd RAM, the
# disk at slot 3).
run_qemu() { # MODE
    local mode=$1 machine dev=(-device virtio-blk-pci,drive=d0,disable-legacy=on,addr=0x3)
    if [ "$ARCH" = s390x ]; then
        # QEMU wraps the device in a zPCI function and translates its DMA itself.
        machine=(-L /usr/share/qemu -M s390-ccw-virtio,memory-backend=mem)
        dev=(-device virtio-blk-pci,drive=d0,disable-legacy=on,iommu_platform=on)
    elif [ "$ARCH" = aarch64 ]; then
        machine=(-L /usr/share/qemu -M virt,gic-version=3,highmem=off,memory-backend=mem)
        if [ "$mode" != none ]; then
            machine[3]+=,iommu=smmuv3
            dev=(-device virtio-blk-pci,drive=d0,disable-legacy=on,iommu_platform=on,addr=0x3)
        fi
    else
        machine=(-L /usr/share/seabios -L /usr/share/qemu -M q35,memory-backend=mem)
        if [ "$mode" != none ]; then
            dev=(-device virtio-iommu-pci,addr=0x2
                -device virtio-blk-pci,drive=d0,disable-legacy=on,iommu_platform=on,addr=0x3)
        fi
    fi
    local round=$2
    rm -f "$WORK/qemu.out"
    timeout 900 "$QEMU" -accel tcg,thread=multi -cpu max \
        "${machine[@]}" -smp "$CPUS" -m 512M \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot -name qemu,debug-threads=on \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE sluice.ddmb=$(ddmb "$mode") $(iommu_cmdline "$mode")" \
        -drive "file=$DISK,if=none,id=d0,format=raw,cache=writeback,aio=threads" \
        "${dev[@]}" > "$WORK/qemu.out" 2>&1 &
    local pid=$!
    [ "${VCPU_SCHED:-}" = fifo ] && raise_vcpus "$pid" "$round $mode" &
    await_run "$pid" "$WORK/qemu.out" "$round qemu $mode"
    cat "$WORK/qemu.out"
}

if [ "$ARCH" = s390x ]; then MODES=${MODES:-lazy strict}; else MODES=${MODES:-none lazy strict}; fi
RESULTS=$WORK/results.txt
: > "$RESULTS"
record() { # WHO MODE ROUND: bench lines on stdin -> RESULTS
    sed -n 's/.*SLUICE: BENCH \([A-Za-z0-9]*\) .* \([0-9.]*\) MiB\/s.*/\1 \2/p' |
        while read -r test mibs; do
            echo "$1 $2 $test $mibs" >> "$RESULTS"
            echo "round $3 $1 $2 $test $mibs MiB/s"
        done
}
WHO=()
for v in $VARIANTS; do WHO+=("$(variant_label "$v")"); done
WHO+=(qemu)
for r in $(seq 1 "$ROUNDS"); do
    for mode in $MODES; do
        # alternate the order of the sides from round to round, so a drift within a round
        # does not always favour the same side
        sides=($VARIANTS qemu)
        if [ $((r % 2)) = 0 ]; then
            rev=(); for ((i = ${#sides[@]} - 1; i >= 0; i--)); do rev+=("${sides[i]}"); done
            sides=("${rev[@]}")
        fi
        for side in "${sides[@]}"; do
            if [ "$side" = qemu ]; then
                run_qemu "$mode" "$r" | record qemu "$mode" "$r"
            else
                run_sluice "$mode" "$side" "$r" | record "$(variant_label "$side")" "$mode" "$r"
            fi
        done
    done
done
read -r LOAD_END _ < /proc/loadavg

values() { # WHO MODE TEST -> the single values, in run order
    awk -v w="$1" -v m="$2" -v t="$3" '$1==w && $2==m && $3==t {printf "%s%s", sep, $4; sep=","}' "$RESULTS"
}
median() { # WHO MODE TEST
    awk -v w="$1" -v m="$2" -v t="$3" '$1==w && $2==m && $3==t {print $4}' "$RESULTS" | sort -n |
        awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print 0}'
}
bytes_of() { # MODE TEST -> MiB moved by one run of it
    case "$2" in *1M) ddmb "$1" ;; *) echo "$((DD4K * 4 / 1024))" ;; esac
}
cell() { # WHO MODE TEST -> "median [values]", * when the median run lasted under 2 s
    awk -v m="$(median "$1" "$2" "$3")" -v v="$(values "$1" "$2" "$3")" -v b="$(bytes_of "$2" "$3")" \
        'BEGIN { printf "%.1f%s [%s]", m, (m > 0 && b / m < 2) ? "*" : "", v }'
}

echo
echo "guest-io.sh: load average $LOAD_START at the start, $LOAD_END at the end ($(nproc) cores)"
echo "medians over $ROUNDS alternating rounds ($ARCH guest $VARIANT, $CPUS vCPUs, TCG;" \
     "ddmb=$DDMB_NONE/$DDMB_IOMMU (none/IOMMU) dd4k=$DD4K, 1M buffer layout $LAYOUT), MiB/s, single values in brackets" \
     "(run order)"
if [ "$ARCH" = x86_64 ] && [ "$(nproc)" -gt 1 ] && [ "$CPUS" -ge "$(nproc)" ] && [ "$MODES" != none ]; then
    # Measured on x86 (virtio-iommu): with a core per vCPU and none left, the IOMMU rows
    # measure this host's cores more than translation (docs/benchmarks.md, "what bounds the
    # IOMMU rows"; on arm64 the cores were not the whole gap).
    echo "note: $CPUS vCPUs on $(nproc) cores: the IOMMU's answering thread has no core of its own," \
         "so Sluice's IOMMU rows wait for cores that QEMU's in-process IOMMU does not need" \
         "(CPUS=$(( $(nproc) - 1 )) leaves it one; docs/benchmarks.md, \"what bounds the IOMMU rows\")"
fi
for who in "${WHO[@]}"; do
    [ "$who" = qemu ] && continue
    echo
    echo "== $who vs QEMU in-process"
    printf '%-7s %-8s %-44s %-44s %6s\n' mode test "$who" qemu ratio
    for mode in $MODES; do
        for test in read1M write1M read4k write4k; do
            awk -v m="$mode" -v t="$test" -v sc="$(cell "$who" "$mode" "$test")" \
                -v qc="$(cell qemu "$mode" "$test")" \
                -v s="$(median "$who" "$mode" "$test")" -v q="$(median qemu "$mode" "$test")" \
                'BEGIN { printf "%-7s %-8s %-44s %-44s %6.2f\n", m, t, sc, qc, (q > 0) ? s / q : 0 }'
        done
    done
    if [ "$ARCH" = s390x ] && [[ " $MODES " == *" lazy "* && " $MODES " == *" strict "* ]]; then
        # No untranslated baseline on s390: the price of strict invalidation instead.
        echo "strict cost factors (throughput strict / lazy, same backend; 1.00 = free)"
        printf '%-7s %-8s %10s %10s %12s\n' mode test "$who" qemu "$who/qemu"
        for test in read1M write1M read4k write4k; do
            awk -v t="$test" \
                -v s="$(median "$who" strict "$test")" -v s0="$(median "$who" lazy "$test")" \
                -v q="$(median qemu strict "$test")" -v q0="$(median qemu lazy "$test")" \
                'BEGIN { fs = (s0 > 0) ? s / s0 : 0; fq = (q0 > 0) ? q / q0 : 0;
                         printf "%-7s %-8s %10.2f %10.2f %12.2f\n", "strict", t, fs, fq, (fq > 0) ? fs / fq : 0 }'
        done
    fi
    if [[ " $MODES " == *" none "* ]]; then
        echo "IOMMU cost factors (throughput with the IOMMU / without, same backend; 1.00 = free)"
        printf '%-7s %-8s %10s %10s %12s\n' mode test "$who" qemu "$who/qemu"
        for mode in $MODES; do
            [ "$mode" = none ] && continue
            for test in read1M write1M read4k write4k; do
                awk -v m="$mode" -v t="$test" \
                    -v s="$(median "$who" "$mode" "$test")" -v s0="$(median "$who" none "$test")" \
                    -v q="$(median qemu "$mode" "$test")" -v q0="$(median qemu none "$test")" \
                    'BEGIN { fs = (s0 > 0) ? s / s0 : 0; fq = (q0 > 0) ? q / q0 : 0;
                             printf "%-7s %-8s %10.2f %10.2f %12.2f\n", m, t, fs, fq, (fq > 0) ? fs / fq : 0 }'
            done
        done
    fi
done
if [ "${SCHED:-0}" = 1 ]; then
    echo
    python3 "$ROOT/benches/sched-sampler.py" --summary "$SCHED_LOG"
fi
