#!/usr/bin/env bash
# Runs every Sluice test on this machine, installing and building what they need first:
# Debian packages, the patched QEMU and both guest kernels (cached outside the work tree in
# ${SLUICE_CACHE:-~/.cache/sluice}), then format, lint, unit and end-to-end tests.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
stage() { printf '\n==== %s (%s)\n' "$1" "$(date +%T)"; }

stage "toolchain"
cargo --version
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "cargo-nextest missing: installing"
    cargo install --locked cargo-nextest
fi
command -v python3 >/dev/null || { apt-get update -q && apt-get install -y -q python3; }
# Headless Chromium renders the oracle's SVG timelines in a test (it prints SKIPPED without it).
command -v chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } || echo "chromium unavailable: the SVG render test will say SKIPPED"

stage "build sluice"
cargo build --release -p sluice

CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}
mkdir -p "$CACHE"
stage "patched QEMU (cached)"
bash guest-images/qemu/build-qemu.sh
for v in 6.12 6.1 6.12-regwin 6.12-regwin-nofix 6.12-ownership-nofix; do
    stage "guest image $v (cached)"
    ./target/release/sluice image build "$v"
done
# arm64 under Sluice's SMMUv3: qemu-system-aarch64 with the SMMUv3 proxy, and two cross-built
# guests, the stock kernel and its registration-race control (about 8 + 2 x 7 minutes the first
# time on 2 cores).
stage "patched QEMU, aarch64 (cached)"
bash guest-images/qemu/build-qemu.sh --arch aarch64
for v in arm64-6.12 arm64-6.12-regfix; do
    stage "guest image $v (cached)"
    ./target/release/sluice image build "$v"
done

# s390x under Sluice's zPCI model: qemu-system-s390x with the zPCI forwarding patch, and both
# cross-built kernels (about 2 + 2 x 3 minutes the first time here).
stage "patched QEMU, s390x (cached)"
bash guest-images/qemu/build-qemu.sh --arch s390x
for v in s390x-6.12 s390x-6.1; do
    stage "guest image $v (cached)"
    ./target/release/sluice image build "$v"
done

stage "format"
cargo fmt --all -- --check
stage "clippy"
cargo clippy --workspace --all-targets -- -D warnings
stage "tests"
# Every SKIPPED test and its reason, printed last whatever happens after this point.
rm -f target/nextest/default/junit.xml
trap 'stage "skipped tests"; python3 tests/skip-summary.py target/nextest/default/junit.xml || true' EXIT
cargo nextest run --workspace --no-fail-fast
stage "fuzz targets (stable replay of committed corpora and recorded findings)"
tests/fuzz-replay.sh

stage "scenario suite (CI-sized: clean boots once per variant and mode, arm64 on the SMMUv3 too, its registration race over 2 seeds; s390x on zPCI with its release scenarios over 3; the registration window over 5 seeds, race 1 and ownership over 3, release on stock kernels over 2)"
./target/release/sluice harness run scenarios/clean-boot.toml scenarios/clean-boot-strict.toml \
    --out target/ci-harness/clean --junit target/ci-harness/clean.xml
./target/release/sluice harness run scenarios/arm64-clean-boot.toml scenarios/arm64-clean-boot-strict.toml \
    --out target/ci-harness/arm64 --junit target/ci-harness/arm64.xml
# The SMMUv3 registration race on the stock kernel and its fixed control, 2 seeds (a reproduced
# run waits for its 30 s timeout: the guest hangs on its dead disk).
./target/release/sluice harness run scenarios/arm64-registration-window.toml --seeds 2 \
    --filter='--arm64-6\.12(-regfix)?--' \
    --out target/ci-harness/arm64-race --junit target/ci-harness/arm64-race.xml
# DMA ownership on the SMMUv3, stock kernel (the claim's blocking domain refuses the rogue read;
# the positive control on arm64-6.12-ownership-nofix is in the full suite: one more kernel).
./target/release/sluice harness run scenarios/arm64-ownership.toml --seeds 2 --filter='--arm64-6\.12--' \
    --out target/ci-harness/arm64-own --junit target/ci-harness/arm64-own.xml
# s390x: clean boots on both kernels (lazy and strict), the zPCI release under DMA, the VFIO
# release race with the rogue reads, and the oracle's positive control on a deliberately broken
# zPCI model (3 seeds each, about 1.5 minutes in all) on the stock
# kernels (the s390x-6.12-release-nofix control is in the full suite: one more kernel).
./target/release/sluice harness run scenarios/s390x-clean-boot.toml scenarios/s390x-clean-boot-strict.toml \
    scenarios/s390x-release.toml scenarios/s390x-release-vfio.toml scenarios/s390x-stale-rpcit.toml \
    --filter='--s390x-6\.1(2)?--' \
    --out target/ci-harness/s390x --junit target/ci-harness/s390x.xml
./target/release/sluice harness run scenarios/registration-window.toml --seeds 5 \
    --out target/ci-harness/race --junit target/ci-harness/race.xml
./target/release/sluice harness run scenarios/race1-probe-phases.toml --seeds 3 \
    --out target/ci-harness/race1 --junit target/ci-harness/race1.xml
./target/release/sluice harness run scenarios/ownership.toml --seeds 3 \
    --out target/ci-harness/ownership --junit target/ci-harness/ownership.xml
# The release scenarios on the stock kernels (the 6.12-release-nofix control is in the full suite:
# its kernel would add a build to a cold CI run), and the bypass-on positive control.
./target/release/sluice harness run scenarios/release.toml scenarios/release-setup.toml \
    scenarios/release-probe.toml scenarios/release-bypass.toml --seeds 2 --filter='--6\.1(2)?--' \
    --out target/ci-harness/release --junit target/ci-harness/release.xml
# A two-cell sweep (baseline vs the stall), bounded: proves the sweep driver end to end. Three
# seeds: the judgement fails only if no run of the stall cell reproduces, and on a host loaded
# with other builds one run in a few misses the window (seen once in CI at load 10).
./target/release/sluice harness sweep scenarios/registration-window.toml --variant 6.12 \
    --point guest.sym.bus_iommu_probe --delays 0ms,300ms --seeds 3 --replace --budget 3m \
    --out target/ci-harness/sweep --junit target/ci-harness/sweep.xml

# The hunt at cluster scale: a private single-node Slurm cluster (installed from Debian, torn
# down at the end) runs 4 shards of a small explore as an array job; merged, they must show the
# signatures the unsharded explore with the same seed shows (about 3 minutes; the self-test of
# the cluster alone first, 15 s).
stage "slurm: 4 explore shards on a private cluster vs the unsharded explore"
SLUICE_SLURM_SELFTEST=1 tests/slurm-shards.sh
tests/slurm-shards.sh
