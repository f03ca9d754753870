# shellcheck shell=bash disable=SC2034
# Shared helpers for the guest-images scripts. Sourced, not executed.
# Everything here writes progress to stderr so that stdout stays reserved for
# the machine-readable KEY=value lines each script prints at the end.

SLUICE_CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}

log()  { printf '%s\n' "$*" >&2; }
die()  { printf '%s: ERROR: %s\n' "${SCRIPT_NAME:-guest-images}" "$*" >&2; exit 1; }
now()  { date +%s; }

# stage N TOTAL TEXT
stage() { log "[$1/$2] $3${T_START:+  (t+$(( $(now) - T_START ))s)}"; }

# sha256 of stdin, first 16 hex digits
short_hash() { sha256sum | cut -c1-16; }

# need_packages PKG...  -- install whatever is not installed yet (fresh CI box).
need_packages() {
    local missing=() p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}) and not root; install them first"
    log "installing missing packages: ${missing[*]}"
    apt-get update -q >&2 || die "apt-get update failed"
    # Never remove a user's packages to make room for ours: ask apt first, refuse if it would.
    local removals
    removals=$(apt-get install -s -q --no-install-recommends "${missing[@]}" 2>/dev/null \
        | awk '/^Remv /{print $2}' | tr '\n' ' ')
    [ -z "$removals" ] || die "installing ${missing[*]} would remove installed packages (${removals% }); refusing. Install them by hand if that is acceptable."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# run_with_heartbeat LOGFILE PROGRESS_FN -- CMD...
# Runs CMD with stdout+stderr to LOGFILE and prints a heartbeat line every
# HEARTBEAT seconds (default 15). PROGRESS_FN is called with the elapsed
# seconds and must print a short progress text. On failure the tail of the
# log is shown and the command's exit status is returned.
run_with_heartbeat() {
    local logfile=$1 progress=$2; shift 3
    local t0 pid rc=0 next el
    t0=$(now)
    "$@" >"$logfile" 2>&1 &
    pid=$!
    HB_PID=$pid     # scripts kill this from their EXIT trap if interrupted
    next=$(( t0 + ${HEARTBEAT:-15} ))
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if [ "$(now)" -ge "$next" ] && kill -0 "$pid" 2>/dev/null; then
            el=$(( $(now) - t0 ))
            log "      ... ${el}s $($progress "$el")"
            next=$(( next + ${HEARTBEAT:-15} ))
        fi
    done
    wait "$pid" || rc=$?
    HB_PID=
    if [ "$rc" -ne 0 ]; then
        log "---- last 40 lines of $logfile ----"
        tail -n 40 "$logfile" >&2 || true
        log "---- end of log (exit status $rc) ----"
    fi
    return "$rc"
}

# ---------------------------------------------------------------------------
# Target architectures. One table for every script: the guest's architecture
# is a parameter (--arch / SLUICE_ARCH, default x86_64), and another
# architecture is another row here, not a copy of a script.
#
# arch_setup ARCH  sets ARCH (canonical name) and
#   ARCH_KERNEL      the kernel's ARCH=            x86_64  arm64                 s390
#   ARCH_CROSS       CROSS_COMPILE prefix          ''      aarch64-linux-gnu-    s390x-linux-gnu-
#   ARCH_CC_PKG      Debian packages of that gcc   ''      gcc-aarch64-linux-gnu gcc-s390x-linux-gnu
#                    and of its C library (static guest tools): libc6-dev-arm64-cross, -s390x-
#   ARCH_IMAGE       the boot image's file name    bzImage Image                 bzImage
#   ARCH_IMAGE_PATH  where make leaves it (in O=)  arch/x86/boot/bzImage ...
#   ARCH_DEB         Debian architecture           amd64   arm64                 s390x
#   ARCH_QEMU_TARGET QEMU --target-list            x86_64-softmmu aarch64-softmmu s390x-softmmu
#   ARCH_QEMU_BIN    the QEMU binary               qemu-system-x86_64 / -aarch64 / -s390x
# Names as in Sluice's `Arch` (x86_64, aarch64, s390x); arm64/s390/amd64 are
# accepted too.
arch_setup() {
    case "$1" in
        x86_64|x86-64|amd64)
            ARCH=x86_64 ARCH_KERNEL=x86_64 ARCH_CROSS='' ARCH_CC_PKG='' \
            ARCH_IMAGE=bzImage ARCH_IMAGE_PATH=arch/x86/boot/bzImage ARCH_DEB=amd64 ;;
        aarch64|arm64)
            ARCH=aarch64 ARCH_KERNEL=arm64 ARCH_CROSS=aarch64-linux-gnu- ARCH_CC_PKG='gcc-aarch64-linux-gnu libc6-dev-arm64-cross' \
            ARCH_IMAGE=Image ARCH_IMAGE_PATH=arch/arm64/boot/Image ARCH_DEB=arm64 ;;
        s390x|s390)
            ARCH=s390x ARCH_KERNEL=s390 ARCH_CROSS=s390x-linux-gnu- ARCH_CC_PKG='gcc-s390x-linux-gnu libc6-dev-s390x-cross' \
            ARCH_IMAGE=bzImage ARCH_IMAGE_PATH=arch/s390/boot/bzImage ARCH_DEB=s390x ;;
        *) die "unknown architecture '$1' (known: x86_64, aarch64 or arm64, s390x)" ;;
    esac
    ARCH_QEMU_TARGET=$ARCH-softmmu
    ARCH_QEMU_BIN=qemu-system-$ARCH
}
