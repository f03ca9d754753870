#!/usr/bin/env bash
# Interleaved A/B comparison of one criterion bench target between two revisions of this repo.
#
# usage: benches/ab.sh [--rounds N] [--measure SECS] [--out FILE] <rev-A> <rev-B> <bench-target> [criterion filter]
#   --rounds N      rounds of A and B (default 5)
#   --measure SECS  criterion --measurement-time of every run (default 2; warm-up is 1 s)
#   --out FILE      also write the result table (markdown) to FILE
#
# Builds the bench binary of each revision once (a revision in a temporary `git worktree` under
# /tmp, removed on exit; `.` or WORKTREE means the current working tree, uncommitted changes
# included), each with its own CARGO_TARGET_DIR under /tmp/sluice-ab/<hash>/ so repeated calls
# reuse the build (a committed revision's binary is kept there and not rebuilt). Then it runs the
# two binaries alternately for N rounds (A B, B A, A B, ...: each round's pair is adjacent in time,
# and swapping the order every round cancels a linear drift within the pairs), each run with its
# own fresh CRITERION_HOME so no run compares itself to another. Per bench id and run it reads the
# median point estimate (criterion's `new/estimates.json`; the mean if there is no median) and
# prints a markdown table: A and B median over the rounds, their ratio B/A, and the min–max of the
# per-round ratios B/A (the noise one comparison carries), with the revisions, date, nproc and
# load average at start and end. Run it under `nice`; see docs/benchmarks.md, "A/B comparisons".
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}
die() {
    echo "ab.sh: $*" >&2
    exit 2
}

ROUNDS=5
MEASURE=2
OUT=
POS=()
while [ $# -gt 0 ]; do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --rounds)
        [ $# -ge 2 ] || die "--rounds needs a value"
        ROUNDS=$2
        shift 2
        ;;
    --rounds=*) ROUNDS=${1#*=}; shift ;;
    --measure)
        [ $# -ge 2 ] || die "--measure needs a value"
        MEASURE=$2
        shift 2
        ;;
    --measure=*) MEASURE=${1#*=}; shift ;;
    --out)
        [ $# -ge 2 ] || die "--out needs a value"
        OUT=$2
        shift 2
        ;;
    --out=*) OUT=${1#*=}; shift ;;
    --)
        shift
        POS+=("$@")
        break
        ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
        POS+=("$1")
        shift
        ;;
    esac
done
[ ${#POS[@]} -ge 3 ] && [ ${#POS[@]} -le 4 ] ||
    die "expected <rev-A> <rev-B> <bench-target> [criterion filter] (see --help)"
REV_A=${POS[0]}
REV_B=${POS[1]}
TARGET=${POS[2]}
FILTER=${POS[3]:-}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer, not '$ROUNDS'"
[[ $MEASURE =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--measure must be a number of seconds, not '$MEASURE'"

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(git -C "$HERE" rev-parse --show-toplevel)
[ -f "$HERE/$TARGET.rs" ] && grep -q "^name = \"$TARGET\"" "$HERE/Cargo.toml" ||
    die "no bench target '$TARGET' in benches/ (one of: $(sed -n 's/^name = "\(.*\)"/\1/p' "$HERE/Cargo.toml" | grep -v sluice-benches | tr '\n' ' '))"
command -v python3 >/dev/null || die "python3 is needed to read criterion's estimates"

# Resolve a revision to "<hash> <label>"; WORKTREE for the current working tree.
resolve() {
    local rev=$1 h
    if [ "$rev" = . ] || [ "$rev" = WORKTREE ]; then
        h=$(git -C "$REPO" rev-parse HEAD)
        if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
            echo "WORKTREE worktree(${h:0:12}+changes)"
        else
            echo "WORKTREE worktree(${h:0:12})"
        fi
        return
    fi
    h=$(git -C "$REPO" rev-parse --verify --quiet "$rev^{commit}") ||
        die "'$rev' is not a revision of $REPO"
    echo "$h $rev"
}
read -r HASH_A LABEL_A <<<"$(resolve "$REV_A")" || exit 2
read -r HASH_B LABEL_B <<<"$(resolve "$REV_B")" || exit 2
[ -n "$HASH_A" ] && [ -n "$HASH_B" ] || exit 2

AB=/tmp/sluice-ab
mkdir -p "$AB"
RUN=$(mktemp -d "$AB/run.XXXXXX")
WORKTREES=()
cleanup() {
    local wt
    for wt in "${WORKTREES[@]}"; do
        git -C "$REPO" worktree remove --force "$wt" >/dev/null 2>&1 || rm -rf "$wt"
    done
    git -C "$REPO" worktree prune >/dev/null 2>&1 || true
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# cargo bench --no-run in directory $1 with target dir $2, for every bench target if $3 is "all"
# (else for $TARGET only); records "<name> <executable>" lines in $RUN/built.
build_in() {
    local dir=$1 tdir=$2 which=$3 log=$RUN/build.json
    local sel=(--bench "$TARGET")
    [ "$which" = all ] && sel=(--benches)
    echo "ab.sh: building ${sel[*]} in $dir (CARGO_TARGET_DIR=$tdir)" >&2
    (cd "$dir" && CARGO_TARGET_DIR=$tdir cargo bench -p sluice-benches "${sel[@]}" \
        --no-run --message-format=json-render-diagnostics >"$log") || die "build failed in $dir"
    python3 - "$log" >"$RUN/built" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target") or {}
    if m.get("reason") == "compiler-artifact" and "bench" in t.get("kind", []) \
            and m.get("executable"):
        print(t["name"], m["executable"])
EOF
    grep -q "^$TARGET " "$RUN/built" || die "no executable for bench $TARGET in cargo's output"
}

# Sets BIN to the path of the bench binary of "<hash>", building it if needed (not in a
# subshell: the temporary worktree must reach WORKTREES for the exit trap).
binary_for() {
    local hash=$1 dir bin wt name exe
    if [ "$hash" = WORKTREE ]; then
        dir=$AB/worktree-$(printf %s "$REPO" | cksum | cut -d' ' -f1)
        build_in "$REPO" "$dir/target" one
        BIN=$(sed -n "s/^$TARGET //p" "$RUN/built")
        return
    fi
    dir=$AB/$hash
    bin=$dir/bin/$TARGET
    if [ -x "$bin" ]; then
        echo "ab.sh: reusing $bin" >&2
        BIN=$bin
        return
    fi
    wt=$(mktemp -d "/tmp/sluice-ab-wt.XXXXXX")
    WORKTREES+=("$wt")
    git -C "$REPO" worktree add --detach --quiet "$wt" "$hash" || die "git worktree add $hash failed"
    # Every bench target at once: they share all the (dev-)dependencies, so the others cost only
    # their link, and a later call for another target of this revision builds nothing.
    build_in "$wt" "$dir/target" all
    mkdir -p "$dir/bin"
    while read -r name exe; do
        cp "$exe" "$dir/bin/$name.tmp.$$" && mv "$dir/bin/$name.tmp.$$" "$dir/bin/$name"
    done <"$RUN/built"
    BIN=$bin
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
DATE_START=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
binary_for "$HASH_A"
BIN_A=$BIN
binary_for "$HASH_B"
BIN_B=$BIN

# The criterion arguments of every run: the filter, then the timing the brief's runs use.
CARGS=(--bench)
[ -n "$FILTER" ] && CARGS+=("$FILTER")
CARGS+=(--warm-up-time 1 --measurement-time "$MEASURE" --noplot)

run_one() { # side round
    local side=$1 r=$2 bin
    [ "$side" = A ] && bin=$BIN_A || bin=$BIN_B
    local home=$RUN/crit/$side-$r
    mkdir -p "$home"
    echo "ab.sh: round $r/$ROUNDS $side ($(date -u +%T), load $(cut -d' ' -f1 /proc/loadavg))" >&2
    CRITERION_HOME=$home CARGO_TARGET_DIR=$RUN/target-$side-$r "$bin" "${CARGS[@]}" \
        --save-baseline "ab-$side-$r" >"$RUN/log-$side-$r.txt" 2>&1 ||
        { tail -20 "$RUN/log-$side-$r.txt" >&2; die "bench run $side round $r failed"; }
}

BENCH_START=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then
        run_one A "$r"
        run_one B "$r"
    else
        run_one B "$r"
        run_one A "$r"
    fi
done
ELAPSED=$(($(date +%s) - BENCH_START))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
DATE_END=$(date -u '+%H:%M:%S UTC')

TABLE=$RUN/table.md
python3 - "$RUN/crit" "$ROUNDS" >"$RUN/rows.md" <<'EOF'
import json, os, statistics, sys
root, rounds = sys.argv[1], int(sys.argv[2])
# values[id][side][round] = ns per iteration
values = {}
for run in sorted(os.listdir(root)):
    side, r = run.split("-")
    for dirpath, dirs, files in os.walk(os.path.join(root, run)):
        if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
            continue
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bid = json.load(f)["full_id"]
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)
        point = (est.get("median") or est["mean"])["point_estimate"]
        values.setdefault(bid, {"A": {}, "B": {}})[side][int(r)] = point

def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return "%.2f %s" % (ns / scale, unit)
    return "%.1f ns" % ns

if not values:
    sys.exit("ab.sh: no criterion estimates found (does the filter match any bench?)")
print("| bench | A (median of rounds) | B (median of rounds) | B/A | per-round B/A min–max | rounds |")
print("|---|---|---|---|---|---|")
for bid in sorted(values):
    a, b = values[bid]["A"], values[bid]["B"]
    both = sorted(set(a) & set(b))
    if not both:
        print("| `%s` | %s | %s | – | – | 0 |" % (bid, fmt(statistics.median(a.values())) if a else "–",
                                                  fmt(statistics.median(b.values())) if b else "–"))
        continue
    ma, mb = statistics.median(a[r] for r in both), statistics.median(b[r] for r in both)
    ratios = [b[r] / a[r] for r in both]
    print("| `%s` | %s | %s | %.3f | %.3f–%.3f | %d |" % (
        bid, fmt(ma), fmt(mb), mb / ma, min(ratios), max(ratios), len(both)))
EOF
{
    echo "A = \`$LABEL_A\` ($HASH_A), B = \`$LABEL_B\` ($HASH_B)"
    echo
    echo "bench target \`$TARGET\`${FILTER:+, filter \`$FILTER\`}; $ROUNDS rounds, A and B alternating" \
        "(A B, B A, ...); criterion \`--warm-up-time 1 --measurement-time $MEASURE --noplot\`;" \
        "values: criterion's median point estimate of thread CPU time per iteration"
    echo
    echo "$DATE_START – $DATE_END (${ELAPSED} s of runs); nproc $(nproc);" \
        "load average at start $LOAD_START, at end $LOAD_END"
    echo
    cat "$RUN/rows.md"
} >"$TABLE"
cat "$TABLE"
if [ -n "$OUT" ]; then
    cp "$TABLE" "$OUT"
    echo "ab.sh: table written to $OUT" >&2
fi
