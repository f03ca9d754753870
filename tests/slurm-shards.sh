#!/usr/bin/env bash
# Sharded explore on a real Slurm cluster that this test brings up and tears down itself.
#
# 1. Installs Debian's slurm-wlm and munge if absent (apt-get update first; never removes anything).
# 2. Starts a private single-node cluster on this machine: its own munge key and munged on its own
#    socket, its own slurm.conf (SlurmctldHost=localhost, one node "localhost" with CPUs=nproc and
#    RealMemory from /proc/meminfo minus a margin, partition "sluice", proctrack/linuxproc,
#    task/none, select/cons_tres), free TCP ports, state/spool/log dirs, all under one temp dir.
#    A system-wide Slurm or munge (default ports, /run/munge) is left alone.
# 3. Waits for the node to be idle (SLUICE_SLURM_IDLE_TIMEOUT, default 60 s).
# 4. Runs `sbatch --wait --array=1-4` of a job script:
#      SLUICE_SLURM_SELFTEST=1  each task writes $SLURM_ARRAY_TASK_ID into its own file; the check
#                               is that the 4 files hold 1..4 (the quick check that the cluster
#                               works: about 20 s, no guest booted).
#      otherwise                each task runs shard I/4 of `sluice harness explore` into its own
#                               dir; the test also runs the unsharded explore with the same seed
#                               and run count, merges the 4 shard dirs with `sluice harness merge`
#                               and compares the sorted signature sets of the two explore.json files
#                               (equal: PASS; different: FAIL, both lists printed).
# 5. Tears everything down on exit (trap): cancels its jobs, stops slurmd, slurmctld and munged by
#    their PIDs, removes the temp dir (kept with SLUICE_SLURM_KEEP=1, or on failure).
# 6. Prints `SKIPPED: <why>` and exits 0 when Slurm cannot run here (no apt and no Slurm, a
#    daemon that does not come up, a node that never gets idle) or when the sluice binary has no
#    `harness explore` yet.
#
# Environment (defaults in brackets):
#   SLUICE                   sluice binary [./target/release/sluice]
#   SLUICE_SLURM_SCENARIO    base scenario [scenarios/registration-window.toml]
#   SLUICE_SLURM_SEED        [1]
#   SLUICE_SLURM_RUNS        total runs, split over the shards [4]
#   SLUICE_SLURM_EXPLORE_ARGS  extra explore arguments, split on spaces [two points of the
#                            registration path at 300 and 500 ms, no minimization, one baseline:
#                            small enough for CI, and the escape every trial of bus_iommu_probe
#                            opens is there in every shard layout]
#   SLUICE_SLURM_SHARDS      array size [4]
#   SLUICE_SLURM_SELFTEST    1: trivial array job only [0]
#   SLUICE_SLURM_KEEP        1: keep the temp dir (configs, logs, outputs) [0]
#   SLUICE_SLURM_IDLE_TIMEOUT  seconds to wait for the node to be idle [60]
#   SLUICE_SLURM_JOB_TIMEOUT   seconds the whole array may take (sbatch --wait) [3600]
#   SLUICE_SLURM_DIR         parent of the temp dir [the repo's target/]
#
# Exit: 0 pass or SKIPPED, 1 fail. docs/cluster.md has the recipe for a real cluster.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1

SLUICE=${SLUICE:-./target/release/sluice}
SCENARIO=${SLUICE_SLURM_SCENARIO:-scenarios/registration-window.toml}
SEED=${SLUICE_SLURM_SEED:-1}
RUNS=${SLUICE_SLURM_RUNS:-4}
EXPLORE_ARGS=${SLUICE_SLURM_EXPLORE_ARGS:---variant 6.12 --only ^guest\.sym\.(bus_iommu_probe|__iommu_probe_device)$ --no-device-points --delays 300,500 --no-minimize --baseline-runs 1}
SHARDS=${SLUICE_SLURM_SHARDS:-4}
SELFTEST=${SLUICE_SLURM_SELFTEST:-0}
KEEP=${SLUICE_SLURM_KEEP:-0}
IDLE_TIMEOUT=${SLUICE_SLURM_IDLE_TIMEOUT:-60}
JOB_TIMEOUT=${SLUICE_SLURM_JOB_TIMEOUT:-3600}
PARENT=${SLUICE_SLURM_DIR:-$ROOT/target}

log() { printf 'slurm-shards: %s\n' "$*" >&2; }
skip() {
    printf 'SKIPPED: %s\n' "$*"
    exit 0
}
fail() {
    printf 'slurm-shards: FAIL: %s\n' "$*" >&2
    FAILED=1
    exit 1
}

FAILED=0
T=
PIDS=()          # munged slurmctld slurmd, in start order
SBATCH_PID=      # the waiting sbatch

# --- teardown ---------------------------------------------------------------------------------
# shellcheck disable=SC2317  # invoked by the trap
teardown() {
    local rc=$?
    set +e
    # Cancel what this cluster still runs (only this cluster: SLURM_CONF is ours) and give the
    # tasks' slurmstepd time to end them before slurmd goes.
    if [ -n "$T" ] && [ -f "$T/slurm.conf" ] && [ ${#PIDS[@]} -ge 2 ] && kill -0 "${PIDS[1]}" 2>/dev/null; then
        export SLURM_CONF=$T/slurm.conf
        if [ -n "$(timeout 10 squeue -h -o %i 2>/dev/null)" ]; then
            log "cancelling the cluster's jobs"
            timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1
            for _ in $(seq 60); do
                [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    if [ -n "$SBATCH_PID" ]; then
        kill -TERM "$SBATCH_PID" 2>/dev/null
        wait "$SBATCH_PID" 2>/dev/null
    fi
    # Stop in reverse start order: slurmd, slurmctld, munged.
    local i pid
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [ -n "$T" ] && [ -d "$T" ]; then
        if [ "$KEEP" = 1 ] || [ "$FAILED" = 1 ] || [ "$rc" -ne 0 ]; then
            log "kept $T (configs, daemon logs, job outputs)"
        else
            rm -rf "$T"
        fi
    fi
    exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

case "$SHARDS" in '' | *[!0-9]* | 0) fail "SLUICE_SLURM_SHARDS must be a positive integer, got '$SHARDS'" ;; esac

# --- 1. packages ------------------------------------------------------------------------------
need_pkgs=()
for cmd in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge mungekey:munge; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || need_pkgs+=("${cmd##*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || skip "Slurm is not installed (${need_pkgs[*]} missing) and there is no apt-get to install slurm-wlm and munge"
    [ "$(id -u)" = 0 ] || skip "Slurm is not installed (${need_pkgs[*]} missing) and installing slurm-wlm and munge needs root"
    log "installing slurm-wlm and munge (missing: ${need_pkgs[*]})"
    # The packages' maintainer scripts would start system-wide slurmd/slurmctld/munged through
    # invoke-rc.d; a policy-rc.d that says "no" (101) keeps them from it, and is removed again.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# temporary, tests/slurm-shards.sh: no service starts during its install\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt_ok=1
    apt-get update -q >&2 || apt_ok=0
    if [ "$apt_ok" = 1 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >&2 || apt_ok=0
    fi
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$apt_ok" = 1 ] || skip "could not install slurm-wlm and munge with apt-get (see the apt output above)"
fi
for cmd in slurmctld slurmd sbatch sinfo squeue scontrol scancel munged setsid mungekey munge unmunge python3; do
    command -v "$cmd" >/dev/null 2>&1 || skip "$cmd not found after installing slurm-wlm and munge"
done
log "$(slurmctld -V 2>&1 | head -n1), munge $(munged --version 2>&1 | head -n1)"

# --- what the array runs ----------------------------------------------------------------------
if [ "$SELFTEST" != 1 ]; then
    [ -x "$SLUICE" ] || fail "sluice binary $SLUICE not found (cargo build --release -p sluice, or set SLUICE=)"
    SLUICE=$(cd "$(dirname "$SLUICE")" && pwd)/$(basename "$SLUICE")
    [ -f "$SCENARIO" ] || fail "scenario $SCENARIO not found (SLUICE_SLURM_SCENARIO=)"
    SCENARIO=$(cd "$(dirname "$SCENARIO")" && pwd)/$(basename "$SCENARIO")
    "$SLUICE" harness explore --help >/dev/null 2>&1 ||
        skip "$SLUICE has no 'harness explore' yet (run SLUICE_SLURM_SELFTEST=1 $0 to check the cluster alone)"
    "$SLUICE" harness merge --help >/dev/null 2>&1 ||
        skip "$SLUICE has no 'harness merge' yet (run SLUICE_SLURM_SELFTEST=1 $0 to check the cluster alone)"
fi

# --- 2. the private cluster -------------------------------------------------------------------
# start_daemon LOG CMD ARGS...: CMD in the foreground of its own session (setsid: a Ctrl-C on the
# terminal reaches this script, whose trap stops the daemons in order, not the daemons), in the
# background of this script; its PID appended to PIDS.
start_daemon() {
    local out=$1
    shift
    # Without job control a background child is no process-group leader, so setsid execs the
    # daemon in place and $! is the daemon's PID.
    setsid "$@" >>"$out" 2>&1 &
    local pid=$!
    PIDS+=("$pid")          # at once: a signal during the start-up must stop it too
    local comm want
    want=$(basename "$1" | cut -c1-15)
    # The exec can take a moment on a loaded host; until then the PID is still "setsid".
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 1
        comm=$(cat "/proc/$pid/comm" 2>/dev/null)
        [ "$comm" = "$want" ] && return 0
        sleep 0.1
    done
    log "warning: PID $pid is '$comm', not $1: teardown may miss $1"
}
mkdir -p "$PARENT" || fail "cannot create $PARENT"
T=$(mktemp -d "$PARENT/slurm-shards.XXXXXX") || fail "mktemp in $PARENT"
chmod 700 "$T"
mkdir -p "$T/munge" "$T/state" "$T/spool" "$T/log" "$T/run" "$T/out"
chmod 700 "$T/munge"
log "cluster dir $T"

# munge: a fresh key, a daemon on its own socket (not /run/munge/munge.socket.2).
MUNGE_SOCKET=$T/munge/munge.socket
mungekey --create --keyfile="$T/munge/munge.key" >/dev/null 2>&1 ||
    { dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none && chmod 600 "$T/munge/munge.key"; } ||
    fail "cannot create a munge key"
munge_args=(--foreground --socket="$MUNGE_SOCKET" --key-file="$T/munge/munge.key"
    --pid-file="$T/munge/munged.pid" --log-file="$T/log/munged.log" --seed-file="$T/munge/munged.seed")
# munged refuses to run as root unless forced (Debian runs it as user munge).
if [ "$(id -u)" = 0 ]; then munge_args+=(--force); fi
start_daemon "$T/log/munged.out" munged "${munge_args[@]}" || skip "cannot start munged"

for _ in $(seq 50); do [ -S "$MUNGE_SOCKET" ] && break; kill -0 "${PIDS[0]}" 2>/dev/null || break; sleep 0.1; done
if ! munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
    tail -n 20 "$T/log/munged.out" "$T/log/munged.log" 2>/dev/null >&2
    skip "munged did not come up on its own socket $MUNGE_SOCKET (log above)"
fi
log "munged up (pid ${PIDS[0]}, socket $MUNGE_SOCKET)"

# Free TCP ports for slurmctld and slurmd (not 6817/6818: a system Slurm may hold them).
read -r CTLD_PORT SLURMD_PORT < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# Leave 10 % (at least 512 MiB) to the system: slurmd drains a node whose RealMemory exceeds
# what it finds.
MARGIN=$((MEM_MB / 10 > 512 ? MEM_MB / 10 : 512))
REALMEM=$((MEM_MB - MARGIN))
[ "$REALMEM" -gt 0 ] || REALMEM=1
SLURMCTLD_USER=$(id -un)

cat >"$T/slurm.conf" <<EOF
# written by tests/slurm-shards.sh; everything lives under $T
ClusterName=sluicetest
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$SLURMCTLD_USER
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool/%n
SlurmctldPidFile=$T/run/slurmctld.pid
SlurmdPidFile=$T/run/slurmd-%n.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REALMEM State=UNKNOWN
PartitionName=sluice Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$T/slurm.conf
# Keep a surrounding allocation's variables (if this runs inside a Slurm job) from leaking in.
unset SLURM_JOB_ID SLURM_JOBID SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_ID

start_daemon "$T/log/slurmctld.out" slurmctld -D -i -f "$SLURM_CONF" ||
    { tail -n 20 "$T/log/slurmctld.out" >&2; skip "slurmctld exited at once (log above)"; }
ok=0
for _ in $(seq 100); do
    if scontrol ping 2>/dev/null | grep -q 'is UP'; then ok=1; break; fi
    kill -0 "${PIDS[1]}" 2>/dev/null || break
    sleep 0.2
done
if [ "$ok" != 1 ]; then
    tail -n 20 "$T/log/slurmctld.out" "$T/log/slurmctld.log" 2>/dev/null >&2
    skip "slurmctld did not come up (log above)"
fi
log "slurmctld up (pid ${PIDS[1]}, port $CTLD_PORT)"

mkdir -p "$T/spool/localhost"
start_daemon "$T/log/slurmd.out" slurmd -D -N localhost -f "$SLURM_CONF" ||
    { tail -n 20 "$T/log/slurmd.out" >&2; skip "slurmd exited at once (log above)"; }

# --- 3. wait for the node ---------------------------------------------------------------------
state=
deadline=$((SECONDS + IDLE_TIMEOUT))
while [ $SECONDS -lt "$deadline" ]; do
    state=$(sinfo -h -n localhost -o '%T' 2>/dev/null | head -n1)
    [ "$state" = idle ] && break
    kill -0 "${PIDS[2]}" 2>/dev/null || break
    sleep 0.5
done
if [ "$state" != idle ]; then
    tail -n 20 "$T/log/slurmd.out" "$T/log/slurmd.log" 2>/dev/null >&2
    scontrol show node localhost 2>/dev/null | grep -E 'State=|Reason=' >&2
    skip "the node did not become idle within ${IDLE_TIMEOUT}s (state '${state:-none}'; slurmd log above)"
fi
log "node localhost idle: CPUs=$CPUS RealMemory=$REALMEM MB (slurmd pid ${PIDS[2]}, port $SLURMD_PORT)"

# --- 4. the array job -------------------------------------------------------------------------
JOB=$T/job.sh
if [ "$SELFTEST" = 1 ]; then
    cat >"$JOB" <<'EOF'
#!/bin/sh
# self-test: every array task leaves its index in its own file
set -eu
echo "$SLURM_ARRAY_TASK_ID" >"$OUT/task-$SLURM_ARRAY_TASK_ID"
echo "task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on $(hostname) cpus=$SLURM_CPUS_ON_NODE"
EOF
else
    cat >"$JOB" <<'EOF'
#!/bin/sh
# one shard of the explore: shard $SLURM_ARRAY_TASK_ID of $SHARDS into its own dir
set -euf
cd "$ROOT"
# shellcheck disable=SC2086 # EXPLORE_ARGS is a list of arguments
exec "$SLUICE" harness explore "$SCENARIO" --seed "$SEED" --runs "$RUNS" $EXPLORE_ARGS \
    --shard "$SLURM_ARRAY_TASK_ID/$SHARDS" --out "$OUT/shard-$SLURM_ARRAY_TASK_ID"
EOF
fi
chmod 755 "$JOB"
export OUT=$T/out ROOT SLUICE SCENARIO SEED RUNS SHARDS EXPLORE_ARGS

if [ "$SELFTEST" != 1 ]; then
    # The reference: the same explore, unsharded, outside Slurm.
    log "unsharded: $SLUICE harness explore $SCENARIO --seed $SEED --runs $RUNS --out $T/out/unsharded"
    t0=$SECONDS
    set -f
    # shellcheck disable=SC2086 # EXPLORE_ARGS is a list of arguments
    "$SLUICE" harness explore "$SCENARIO" --seed "$SEED" --runs "$RUNS" $EXPLORE_ARGS \
        --out "$T/out/unsharded" >"$T/log/unsharded.out" 2>&1 ||
        log "unsharded explore exited $? (findings are compared all the same; log $T/log/unsharded.out)"
    set +f
    log "unsharded explore took $((SECONDS - t0)) s"
fi

log "sbatch --wait --array=1-$SHARDS $JOB"
t0=$SECONDS
# sbatch --wait in the background and a polling wait: a signal to this script runs the trap
# within a second (bash defers traps until a foreground command returns).
sbatch --parsable --wait --array="1-$SHARDS" --job-name=sluice-shards \
    --partition=sluice --ntasks=1 --cpus-per-task=1 --chdir="$ROOT" \
    --output="$T/out/slurm-%A_%a.out" --export=ALL "$JOB" >"$T/log/sbatch.out" 2>"$T/log/sbatch.err" &
SBATCH_PID=$!
deadline=$((SECONDS + JOB_TIMEOUT))
while kill -0 "$SBATCH_PID" 2>/dev/null && [ $SECONDS -lt "$deadline" ]; do sleep 1; done
if kill -0 "$SBATCH_PID" 2>/dev/null; then
    fail "the array job did not finish within ${JOB_TIMEOUT}s (SLUICE_SLURM_JOB_TIMEOUT); squeue: $(squeue -h 2>&1 | head -n 5)"
fi
wait "$SBATCH_PID"
sbatch_rc=$?
SBATCH_PID=
jobid=$(head -n1 "$T/log/sbatch.out" | cut -d';' -f1)
log "array job ${jobid:-?} finished in $((SECONDS - t0)) s, sbatch rc=$sbatch_rc"
for f in "$T"/out/slurm-*.out; do
    [ -f "$f" ] || continue
    printf -- '--- %s\n' "$(basename "$f")"
    tail -n 5 "$f"
done
if [ "$sbatch_rc" -ne 0 ]; then
    cat "$T/log/sbatch.err" >&2
    scontrol show job "${jobid:-0}" 2>/dev/null | grep -E 'JobId=|JobState=|ExitCode=|Reason=' >&2
    fail "sbatch --wait --array=1-$SHARDS exited $sbatch_rc"
fi

# --- 5. the check -----------------------------------------------------------------------------
if [ "$SELFTEST" = 1 ]; then
    got=$(for i in $(seq "$SHARDS"); do cat "$T/out/task-$i" 2>/dev/null || echo "missing-$i"; done | tr '\n' ' ')
    want=$(seq "$SHARDS" | tr '\n' ' ')
    [ "$got" = "$want" ] || fail "array tasks wrote '$got', expected '$want'"
    echo "PASS: slurm self-test: $SHARDS array tasks of job $jobid ran on the private cluster and wrote: $got"
    exit 0
fi

merge_dirs=()
for i in $(seq "$SHARDS"); do
    [ -f "$T/out/shard-$i/explore.json" ] || fail "shard $i wrote no $T/out/shard-$i/explore.json"
    merge_dirs+=("$T/out/shard-$i")
done
[ -f "$T/out/unsharded/explore.json" ] || fail "the unsharded explore wrote no explore.json (log $T/log/unsharded.out)"
"$SLUICE" harness merge "${merge_dirs[@]}" --out "$T/out/merged" >"$T/log/merge.out" 2>&1 ||
    { tail -n 20 "$T/log/merge.out" >&2; fail "sluice harness merge exited non-zero"; }
[ -f "$T/out/merged/explore.json" ] || fail "merge wrote no $T/out/merged/explore.json"

python3 - "$T/out/unsharded/explore.json" "$T/out/merged/explore.json" <<'EOF' || fail "signature sets differ (above)"
import json, sys

def signatures(path):
    with open(path) as f:
        doc = json.load(f)
    findings = doc.get("findings")
    if not isinstance(findings, list):
        sys.exit(f"{path}: no top-level 'findings' array")
    sigs = []
    for i, finding in enumerate(findings):
        sig = finding.get("signature") if isinstance(finding, dict) else None
        if not isinstance(sig, str):
            sys.exit(f"{path}: finding {i} has no 'signature' string")
        sigs.append(sig)
    return sorted(set(sigs)), len(findings)

(unsharded, n_u), (merged, n_m) = signatures(sys.argv[1]), signatures(sys.argv[2])
print(f"unsharded: {len(unsharded)} signatures ({n_u} findings); merged shards: {len(merged)} signatures ({n_m} findings)")
if unsharded == merged:
    for s in unsharded:
        print(f"  {s}")
    print("PASS: the merged shards found the same signatures as the unsharded explore")
    sys.exit(0)
print("unsharded explore:")
for s in unsharded:
    print(f"  {'  ' if s in merged else '- '}{s}")
print("merged shards:")
for s in merged:
    print(f"  {'  ' if s in unsharded else '+ '}{s}")
sys.exit(1)
EOF
exit 0
