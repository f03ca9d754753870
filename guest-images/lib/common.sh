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
