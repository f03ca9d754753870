#!/usr/bin/env bash
# Builds every cargo-fuzz target as a plain binary (stable toolchain, no libFuzzer) and replays
# its committed corpus, plus the recorded findings in fuzz/artifacts-found (every one fixed: a
# finding that fails again is a regression). Exits non-zero on any build or replay failure.
#
#   tests/fuzz-replay.sh            # all targets
#   tests/fuzz-replay.sh marker_ops # only the named targets
#
# Debug builds, so overflow checks are on. All targets share one target directory.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/fuzz-replay}"

# fuzz project directory : target
targets=(
  devices/smmuv3/fuzz:smmuv3_ops
  devices/zpci/fuzz:zpci_ops
  devices/virtio-iommu/fuzz:viommu_requests
  devices/virtio-pci/fuzz:virtio_pci_transport
  devices/virtio-blk/fuzz:virtio_blk_requests
  devices/marker/fuzz:marker_ops
  crates/qemu-backend/fuzz:mpqemu_server
)

failed=()
for spec in "${targets[@]}"; do
  dir=${spec%%:*}
  bin=${spec##*:}
  if [ $# -gt 0 ] && [[ " $* " != *" $bin "* ]]; then
    continue
  fi
  corpus="$root/$dir/corpus/$bin"
  found="$root/$dir/artifacts-found/$bin"
  inputs=("$corpus")
  [ -d "$found" ] && inputs+=("$found")
  if [ ! -d "$corpus" ] || [ -z "$(ls -A "$corpus")" ]; then
    echo "fuzz-replay: $bin: no corpus in $dir/corpus/$bin" >&2
    failed+=("$bin")
    continue
  fi
  echo "fuzz-replay: $bin"
  if ! cargo build --quiet --manifest-path "$root/$dir/Cargo.toml" --bin "$bin"; then
    echo "fuzz-replay: $bin: build failed" >&2
    failed+=("$bin")
    continue
  fi
  start=$(date +%s)
  if ! timeout 120 "$CARGO_TARGET_DIR/debug/$bin" "${inputs[@]}"; then
    echo "fuzz-replay: $bin: replay failed" >&2
    failed+=("$bin")
    continue
  fi
  echo "fuzz-replay: $bin: ok in $(( $(date +%s) - start )) s"
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz-replay: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz-replay: all targets replayed"
