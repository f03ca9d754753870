#!/usr/bin/env python3
"""Where the host's cores went during each guest benchmark test (benches/guest-io.sh SCHED=1).

Watches a guest console file for the /init bench workload's markers
("SLUICE: bench-start NAME" and the result line "SLUICE: BENCH NAME ...") and, at each marker,
reads every thread of a process tree from /proc: its CPU time and its run-queue wait (time it was
runnable but had no core; /proc/TID/schedstat) and its involuntary context switches. It prints one
line per test and thread with the differences between the two markers, so a test's cost can be
split into the threads that ran and the threads that waited for a core.

Reads only at markers (the console is polled every 20 ms), so it costs the measured run almost
nothing. Stops when the root process exits.

usage: sched-sampler.py ROOT_PID CONSOLE_FILE LABEL
       sched-sampler.py --summary SCHED_LOG   (medians over the rounds of such lines)
output (stdout), one line per test and thread group:
  sched LABEL TEST wall=S cores=C GROUP run=S wait=S preempt=N
GROUP is "vcpu" for QEMU's vCPU threads (summed; their name is "CPU n/TCG" or "CPU n/KVM") and
the thread's own name otherwise (threads with the same name summed).
"""
import os
import re
import sys
import time

VCPU = re.compile(r"^CPU \d+/(TCG|KVM)$")
START = re.compile(r"SLUICE: bench-start (\S+)")
END = re.compile(r"SLUICE: BENCH (\S+) .* MiB/s")


def descendants(root):
    """The root and every process below it (by parent PID)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def snapshot(root):
    """{tid: (group, run_ns, wait_ns, involuntary switches)} of the whole tree."""
    threads = {}
    for pid in descendants(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            comm, sched, status = read(base + "/comm"), read(base + "/schedstat"), read(base + "/status")
            if comm is None or sched is None or status is None:
                continue
            comm = comm.strip()
            run, wait = (int(x) for x in sched.split()[:2])
            m = re.search(r"nonvoluntary_ctxt_switches:\s*(\d+)", status)
            threads[int(tid)] = ("vcpu" if VCPU.match(comm) else comm.replace(" ", "_"),
                                 run, wait, int(m.group(1)) if m else 0)
    return threads


def report(label, test, wall, before, after):
    groups = {}
    for tid, (group, run, wait, invol) in after.items():
        _, run0, wait0, invol0 = before.get(tid, (group, 0, 0, 0))
        g = groups.setdefault(group, [0, 0, 0])
        g[0] += run - run0
        g[1] += wait - wait0
        g[2] += invol - invol0
    cores = sum(g[0] for g in groups.values()) / 1e9 / wall if wall > 0 else 0
    for group, (run, wait, invol) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        if run < 1e6 and wait < 1e6:   # under 1 ms either way: not worth a line
            continue
        print(f"sched {label} {test} wall={wall:.2f} cores={cores:.2f} {group} "
              f"run={run / 1e9:.3f} wait={wait / 1e9:.3f} preempt={invol}", flush=True)


def median(values):
    values = sorted(values)
    return values[(len(values) - 1) // 2] if values else 0.0


def summary(path):
    """Medians over the rounds of the "sched" lines in PATH, per side, mode and test."""
    runs = {}   # (who, mode, test) -> {round: (wall, cores, {group: (run, wait)})}
    line_re = re.compile(r"^sched (\S+) (\S+) (\S+) (\S+) wall=(\S+) cores=(\S+) (\S+) "
                         r"run=(\S+) wait=(\S+) preempt=\d+$")
    with open(path) as f:
        for line in f:
            m = line_re.match(line.strip())
            if not m:
                continue
            rnd, who, mode, test, wall, cores, group, run, wait = m.groups()
            entry = runs.setdefault((who, mode, test), {}).setdefault(
                rnd, (float(wall), float(cores), {}))
            entry[2][group] = (float(run), float(wait))
    print("where the host's cores went (SCHED=1), medians over the rounds: cores = CPU time of "
          "every thread of the run / wall time of the test; per thread group, run and run-queue "
          "wait (runnable, no core) as % of the test's wall time (groups under 3 % left out)")
    for (who, mode, test), rounds in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        groups = sorted({g for _, _, gs in rounds.values() for g in gs})
        shares = {}
        for g in groups:
            run = median([gs.get(g, (0, 0))[0] / wall for wall, _, gs in rounds.values() if wall > 0])
            wait = median([gs.get(g, (0, 0))[1] / wall for wall, _, gs in rounds.values() if wall > 0])
            if run >= 0.03 or wait >= 0.03:
                shares[g] = (run, wait)
        cores = median([c for _, c, _ in rounds.values()])
        parts = " ".join(f"{g}={100 * r:.0f}/{100 * w:.0f}"
                         for g, (r, w) in sorted(shares.items(), key=lambda kv: -kv[1][0]))
        print(f"{mode:7} {test:8} {who:10} cores={cores:.2f} run/wait%: {parts}")


def alive(pid):
    """Whether process PID still runs (a zombie, which its parent has yet to reap, does not)."""
    stat = read(f"/proc/{pid}/stat")
    return stat is not None and stat[stat.rfind(")") + 2:].split()[0] != "Z"


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summary(sys.argv[2])
        return
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    root, console, label = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    offset, pending, started = 0, "", {}
    while alive(root):
        try:
            with open(console, errors="replace") as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
        except OSError:
            chunk = ""
        pending += chunk
        *lines, pending = pending.split("\n")
        for line in lines:
            if m := START.search(line):
                started[m.group(1)] = (time.monotonic(), snapshot(root))
            elif (m := END.search(line)) and m.group(1) in started:
                t0, before = started.pop(m.group(1))
                report(label, m.group(1), time.monotonic() - t0, before, snapshot(root))
        time.sleep(0.02)


if __name__ == "__main__":
    main()
