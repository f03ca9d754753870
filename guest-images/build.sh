#!/usr/bin/env bash
# Build a Sluice guest image (kernel + modules + busybox initramfs) for one
# variant under guest-images/variants/<name>/.
#
#   guest-images/build.sh [--arch ARCH] [VARIANT]   (default: 6.12, arm64-6.12 for aarch64)
#
# A variant's architecture is its variants/<name>/arch file (x86_64 if
# absent); --arch (or SLUICE_ARCH) must agree with it, and picks the default
# variant (x86_64 and aarch64 have one). Other architectures cross-compile
# (lib/common.sh, arch_setup).
#
# Everything is built outside the work tree, under
#   ${SLUICE_CACHE:-$HOME/.cache/sluice}/{src,build,guest}/
# and the kernel is only rebuilt when its inputs change (see README.md,
# "Cache"). Progress goes to stderr; the last lines of stdout are
#   KERNEL=... VMLINUX=... SYSTEM_MAP=... INITRD=... IMAGE_DIR=...
set -euo pipefail
export LC_ALL=C

SCRIPT_NAME=build.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib/common.sh
. "$HERE/lib/common.sh"

case "${1:-}" in
    -h|--help)
        sed -n '2,16p' "$HERE/build.sh" | sed 's/^# \{0,1\}//'
        echo "variants: $(cd "$HERE/variants" && echo *)"
        exit 0 ;;
esac
WANT_ARCH=${SLUICE_ARCH:-}
if [ "${1:-}" = --arch ]; then
    [ $# -ge 2 ] || die "usage: build.sh [--arch ARCH] [VARIANT]"
    WANT_ARCH=$2
    shift 2
fi
[ $# -le 1 ] || die "usage: build.sh [--arch ARCH] [VARIANT]"
if [ -n "$WANT_ARCH" ]; then arch_setup "$WANT_ARCH"; WANT_ARCH=$ARCH; fi

if [ $# -eq 1 ]; then
    VARIANT=$1
elif [ -z "$WANT_ARCH" ] || [ "$WANT_ARCH" = x86_64 ]; then
    VARIANT=6.12
elif [ "$WANT_ARCH" = aarch64 ]; then
    VARIANT=arm64-6.12
else
    die "no default variant for $WANT_ARCH: name one (none exists yet)"
fi
VDIR=$HERE/variants/$VARIANT
[ -f "$VDIR/variant.conf" ] || die "unknown variant '$VARIANT' (known: $(cd "$HERE/variants" && echo *))"
[ -f "$VDIR/fragment.config" ] || die "$VDIR/fragment.config is missing"
# The variant -> architecture mapping lives in this one file (sluice's image.rs
# reads it too).
VARIANT_ARCH=x86_64 ARCH_SOURCE="no variants/$VARIANT/arch file"
if [ -f "$VDIR/arch" ]; then
    VARIANT_ARCH=$(tr -d '[:space:]' < "$VDIR/arch") ARCH_SOURCE="variants/$VARIANT/arch"
fi
arch_setup "$VARIANT_ARCH"
if [ -n "$WANT_ARCH" ] && [ "$WANT_ARCH" != "$ARCH" ]; then
    die "variant $VARIANT is an $ARCH guest ($ARCH_SOURCE), not $WANT_ARCH"
fi

SOURCE_PKG='' TARBALL='' DESCRIPTION='' EXPECTED_OBJS=1400
# shellcheck source=/dev/null
. "$VDIR/variant.conf"
[ -n "$SOURCE_PKG" ] && [ -n "$TARBALL" ] || die "$VDIR/variant.conf must set SOURCE_PKG and TARBALL"

JOBS=$(nproc)
STAGES=8
HB_PID=
trap 'if [ -n "${HB_PID:-}" ]; then kill "$HB_PID" 2>/dev/null || true; fi' EXIT
T_START=$(now)

if [ "$ARCH" = x86_64 ]; then
    log "build.sh: variant $VARIANT: $DESCRIPTION"
else
    log "build.sh: variant $VARIANT ($ARCH): $DESCRIPTION"
fi

# ---------------------------------------------------------------------------
stage 1 $STAGES "host packages"
# fragments/common.config and verify-only.config hold the shared options and
# x86 ones (PVH, KVM_GUEST, ACPI, 8250); another architecture adds its own
# common fragment on top, which switches the x86-only ones off.
if [ "$ARCH" = x86_64 ]; then
    COMMON_FRAGMENT=$HERE/fragments/common.config
    COMMON_VERIFY=$HERE/fragments/verify-only.config
else
    COMMON_FRAGMENT=$HERE/fragments/common-$ARCH.config
    COMMON_VERIFY=$HERE/fragments/verify-only-$ARCH.config
    [ -f "$COMMON_FRAGMENT" ] || die "fragments/common-$ARCH.config is missing: $ARCH guests have no kernel configuration yet"
fi
# shellcheck disable=SC2086  # ARCH_CC_PKG: no word for x86_64
need_packages "$SOURCE_PKG" build-essential flex bison bc libelf-dev libssl-dev \
    cpio xz-utils kmod busybox-static gzip $ARCH_CC_PKG
[ -f "$TARBALL" ] || die "$TARBALL not found although $SOURCE_PKG is installed"
[ -x /bin/busybox ] || die "/bin/busybox missing (busybox-static)"
SRCVER=$(dpkg-query -W -f='${Version}' "$SOURCE_PKG")

FRAGMENTS=("$COMMON_FRAGMENT" "$VDIR/fragment.config")
VERIFY_ONLY=()
if [ "$ARCH" != x86_64 ]; then
    # Another architecture's common fragment is an overlay on the shared one (the IOMMU, VFIO,
    # virtio and module choices are the same everywhere); it switches off what is x86-only.
    FRAGMENTS=("$HERE/fragments/common.config" "${FRAGMENTS[@]}")
    VERIFY_ONLY+=("$HERE/fragments/verify-only.config")
fi
[ -f "$COMMON_VERIFY" ] && VERIFY_ONLY+=("$COMMON_VERIFY")
[ -f "$VDIR/verify-only.config" ] && VERIFY_ONLY+=("$VDIR/verify-only.config")
shopt -s nullglob
PATCHES=("$VDIR"/patches/*.patch)
shopt -u nullglob

#@@ kernel-key begin -------------------------------------------------------
# Everything between the two kernel-key markers is part of the cache key:
# editing it forces a kernel rebuild. Code outside it (progress, initramfs,
# manifest) can change freely without invalidating cached kernels.
KERNEL_ARCH=x86_64
KERNEL_BASE_CONFIG=tinyconfig
KERNEL_TARGETS=(bzImage modules)
# module name -> shipped as modules/<name>.ko and /lib/modules/<name>.ko
GUEST_MODULES=(virtio_iommu virtio_blk)

kmake() { make -C "$SRC" O="$OUT" ARCH="$KERNEL_ARCH" "$@"; }

kernel_configure() {
    mkdir -p "$OUT"
    kmake -s "$KERNEL_BASE_CONFIG"
    "$SRC/scripts/kconfig/merge_config.sh" -m -O "$OUT" "$OUT/.config" "${FRAGMENTS[@]}"
    kmake -s olddefconfig
}

# kernel_verify FILE... : every "CONFIG_X=value" line must be in .config
# verbatim; every "# CONFIG_X is not set" line must not be =y/=m there.
kernel_verify() {
    local cfg=$OUT/.config line sym have bad=()
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*)
                sym=${line%%=*}
                if ! grep -qxF -- "$line" "$cfg"; then
                    have=$(grep -E "^(# )?$sym[= ]" "$cfg" || true)
                    bad+=("want '$line', have '${have:-<absent>}'")
                fi ;;
            "# CONFIG_"*" is not set")
                sym=${line#\# }; sym=${sym%% *}
                if grep -qE "^$sym=[ym]\$" "$cfg"; then
                    bad+=("want '$sym' off, have '$(grep -E "^$sym=" "$cfg")'")
                fi ;;
        esac
    done < <(cat "$@")
    # insmod of busybox cannot handle signed or compressed modules
    for sym in CONFIG_MODULE_SIG CONFIG_MODULE_COMPRESS_GZIP CONFIG_MODULE_COMPRESS_XZ CONFIG_MODULE_COMPRESS_ZSTD; do
        if grep -qE "^$sym=y\$" "$cfg"; then bad+=("$sym must be off"); fi
    done
    if [ ${#bad[@]} -ne 0 ]; then
        log "config verification FAILED for $VARIANT (${#bad[@]} problem(s)):"
        printf '    %s\n' "${bad[@]}" >&2
        return 1
    fi
}

kernel_build() { kmake -j"$JOBS" "${KERNEL_TARGETS[@]}"; }

# kernel_find_module NAME : path of NAME.ko in the build tree (the file may
# use '-' where the module name has '_', e.g. drivers/iommu/virtio-iommu.ko)
kernel_find_module() {
    local name=$1 alt=${1//_/-}
    find "$OUT" -path "$OUT/source" -prune -o \( -name "$name.ko" -o -name "$alt.ko" \) -print | head -n1
}
#@@ kernel-key end ---------------------------------------------------------

# Another architecture: its kernel ARCH, cross compiler and boot image. Set
# here, outside the key block, and mixed into the key below only for those
# architectures, so that x86_64 keys (and cached kernels) stay what they were.
if [ "$ARCH" != x86_64 ]; then
    KERNEL_ARCH=$ARCH_KERNEL
    KERNEL_TARGETS=("$ARCH_IMAGE" modules)
    export CROSS_COMPILE=$ARCH_CROSS
fi
# arm64 ships its SMMUv3 driver as a module too (fragments/common-aarch64.config).
if [ "$ARCH" = aarch64 ]; then
    GUEST_MODULES=(arm_smmu_v3 "${GUEST_MODULES[@]}")
fi
# s390 has no virtio-iommu (ARM64 || X86 only): its translation is zPCI, built in.
if [ "$ARCH" = s390x ]; then
    GUEST_MODULES=(virtio_blk)
fi

# A variant may ship another module list: variants/<name>/variant.conf sets
# VARIANT_MODULES="a b", or "" for none (6.12-pvm builds every driver in).
# Outside the kernel key on purpose: which .ko files are shipped does not
# change the kernel, and the other variants keep their cached builds.
if [ -n "${VARIANT_MODULES+set}" ]; then
    read -r -a GUEST_MODULES <<< "$VARIANT_MODULES"
fi

# effective_fragment FILE... : the fragment lines in force after merging, one
# per symbol, a later file winning as in merge_config.sh, so that a variant may
# override an option of fragments/common.config (e.g. =m -> =y).
effective_fragment() {
    awk '
        /^CONFIG_[A-Za-z0-9_]+=/ { sym = $0; sub(/=.*/, "", sym) }
        /^# CONFIG_[A-Za-z0-9_]+ is not set$/ { sym = $2 }
        sym != "" { if (!(sym in line)) order[++n] = sym; line[sym] = $0; sym = "" }
        END { for (i = 1; i <= n; i++) print line[order[i]] }
    ' "$@"
}

KEY=$( {
    echo "source $SOURCE_PKG $SRCVER"
    for f in "${FRAGMENTS[@]}" "${VERIFY_ONLY[@]}" "${PATCHES[@]}"; do
        echo "file ${f#"$HERE"/}"
        cat "$f"
    done
    sed -n '/^#@@ kernel-key begin/,/^#@@ kernel-key end/p' "$HERE/build.sh"
    if [ "$ARCH" != x86_64 ]; then
        echo "arch $ARCH kernel $KERNEL_ARCH cross $ARCH_CROSS targets ${KERNEL_TARGETS[*]} image $ARCH_IMAGE_PATH"
    fi
} | short_hash )

SRCTAG=$SOURCE_PKG-${SRCVER//[:\/]/_}
if [ ${#PATCHES[@]} -gt 0 ]; then
    SRCTAG=$SRCTAG-p$(cat "${PATCHES[@]}" | short_hash)
fi
SRC=$SLUICE_CACHE/src/$SRCTAG
OUT=$SLUICE_CACHE/build/$VARIANT-$KEY
IMAGE_DIR=$SLUICE_CACHE/guest/$VARIANT-$KEY
STATS=$SLUICE_CACHE/guest/.stats
mkdir -p "$SLUICE_CACHE/src" "$SLUICE_CACHE/build" "$IMAGE_DIR" "$STATS"
log "      source $SOURCE_PKG $SRCVER, key $KEY"
log "      image dir $IMAGE_DIR"

# One build per variant+key at a time: concurrent runs (e.g. two test
# harnesses) would otherwise compile into the same tree and clobber each
# other. The second one waits, then finds the kernel cached.
exec 9>"$OUT.lock"
if ! flock -n 9; then
    log "      another build of $VARIANT-$KEY is running; waiting for its lock ($OUT.lock)"
    flock 9
fi

KERNEL_FILES=("$ARCH_IMAGE" vmlinux System.map config)
for m in "${GUEST_MODULES[@]}"; do KERNEL_FILES+=("modules/$m.ko"); done
kernel_cached() {
    local f
    [ -f "$IMAGE_DIR/.kernel-complete" ] || return 1
    for f in "${KERNEL_FILES[@]}"; do [ -s "$IMAGE_DIR/$f" ] || return 1; done
}

KBUILD_SECS=''
if kernel_cached; then
    stage 2 $STAGES "unpack source: skipped"
    stage 3 $STAGES "configure: skipped"
    stage 4 $STAGES "kernel: cached ($IMAGE_DIR)"
    stage 5 $STAGES "collect kernel artifacts: skipped"
    log "cached"
else
    # -----------------------------------------------------------------------
    stage 2 $STAGES "unpack source ($TARBALL -> $SRC)"
    if [ -f "$SRC/.sluice-unpacked" ]; then
        log "      already unpacked"
    else
        rm -rf "$SRC" "$SRC.tmp"
        mkdir -p "$SRC.tmp"
        unpack_progress() { echo "unpacking, $(du -sm "$SRC.tmp" 2>/dev/null | cut -f1) MiB so far"; }
        run_with_heartbeat "$SLUICE_CACHE/src/$SRCTAG.unpack.log" unpack_progress -- \
            tar -C "$SRC.tmp" -xf "$TARBALL" || die "unpacking $TARBALL failed"
        top=$(find "$SRC.tmp" -mindepth 1 -maxdepth 1 -type d | head -n1)
        [ -n "$top" ] && [ -f "$top/Makefile" ] || die "$TARBALL does not contain a kernel tree"
        mv "$top" "$SRC"
        rmdir "$SRC.tmp"
        rm -f "$SLUICE_CACHE/src/$SRCTAG.unpack.log"
        for p in "${PATCHES[@]}"; do
            log "      applying ${p#"$HERE"/}"
            patch -d "$SRC" -p1 --batch --forward -s < "$p" || die "patch $p does not apply to $SOURCE_PKG $SRCVER"
        done
        touch "$SRC/.sluice-unpacked"
    fi

    # -----------------------------------------------------------------------
    stage 3 $STAGES "configure ($KERNEL_BASE_CONFIG + $(for f in "${FRAGMENTS[@]}"; do printf '%s ' "${f#"$HERE"/}"; done)+ olddefconfig + verify)"
    mkdir -p "$OUT"
    if ! kernel_configure >"$OUT/configure.log" 2>&1; then
        tail -n 30 "$OUT/configure.log" >&2
        die "kernel configuration failed (log: $OUT/configure.log)"
    fi
    kernel_verify <(effective_fragment "${FRAGMENTS[@]}" "${VERIFY_ONLY[@]}") \
        || die "the merged fragments did not survive olddefconfig (see above); fix variants/$VARIANT or fragments/"
    log "      config OK: $(grep -cE '^CONFIG_[A-Z0-9_]+=y$' "$OUT/.config") =y, $(grep -cE '^CONFIG_[A-Z0-9_]+=m$' "$OUT/.config") =m; every fragment line verified"

    # -----------------------------------------------------------------------
    EXP=$EXPECTED_OBJS
    [ -s "$STATS/$VARIANT.objs" ] && EXP=$(cat "$STATS/$VARIANT.objs")
    kernel_progress() {
        local n pct
        n=$(find "$OUT" -name '*.o' 2>/dev/null | wc -l)
        pct=$(( n * 100 / EXP ))
        [ "$pct" -gt 99 ] && pct=99
        echo "$n objects built (~$pct% of ~$EXP)"
    }
    stage 4 $STAGES "build kernel: make -j$JOBS ${KERNEL_TARGETS[*]} (log: $OUT/make.log)"
    t0=$(now)
    run_with_heartbeat "$OUT/make.log" kernel_progress -- kernel_build \
        || die "kernel build failed (log: $OUT/make.log)"
    KBUILD_SECS=$(( $(now) - t0 ))
    find "$OUT" -name '*.o' | wc -l > "$STATS/$VARIANT.objs"
    log "      kernel built in ${KBUILD_SECS}s ($(cat "$STATS/$VARIANT.objs") objects)"

    # -----------------------------------------------------------------------
    stage 5 $STAGES "collect kernel artifacts"
    rm -f "$IMAGE_DIR/.kernel-complete"
    rm -rf "$IMAGE_DIR/modules"
    mkdir -p "$IMAGE_DIR/modules"
    cp "$OUT/$ARCH_IMAGE_PATH" "$IMAGE_DIR/$ARCH_IMAGE"
    cp "$OUT/vmlinux" "$IMAGE_DIR/vmlinux"
    cp "$OUT/System.map" "$IMAGE_DIR/System.map"
    cp "$OUT/.config" "$IMAGE_DIR/config"
    for m in "${GUEST_MODULES[@]}"; do
        ko=$(kernel_find_module "$m")
        [ -n "$ko" ] || die "module $m (.ko) not found in $OUT; is it =m in the fragment?"
        cp "$ko" "$IMAGE_DIR/modules/$m.ko"
        log "      modules/$m.ko <- ${ko#"$OUT"/}"
    done
    cat "$OUT/include/config/kernel.release" > "$IMAGE_DIR/kernel.release"
    echo "$KBUILD_SECS" > "$IMAGE_DIR/kernel-build-seconds"
    touch "$IMAGE_DIR/.kernel-complete"
fi

# ---------------------------------------------------------------------------
# Guest tools (tools/): the sluice_dma module, built against this kernel's
# tree, and the static vfio-dma and dma-bench programs. A few seconds; cached per kernel key
# and tool sources, outside the kernel key so editing a tool never rebuilds a
# kernel.
TOOLS_KEY=$(cat "$HERE"/tools/sluice_dma/* "$HERE"/tools/vfio-dma/* "$HERE"/tools/dma-bench/* | short_hash)
TOOLS=$IMAGE_DIR/tools-$TOOLS_KEY
if [ -s "$TOOLS/sluice_dma.ko" ] && [ -s "$TOOLS/vfio-dma" ] && [ -s "$TOOLS/dma-bench" ]; then
    stage 6 $STAGES "guest tools: cached ($TOOLS)"
else
    stage 6 $STAGES "guest tools (sluice_dma.ko against $VARIANT, static vfio-dma and dma-bench)"
    [ -s "$OUT/Module.symvers" ] || die "$OUT has no Module.symvers: the kernel tree is gone; remove $IMAGE_DIR/.kernel-complete to rebuild it"
    rm -rf "$TOOLS.tmp"
    mkdir -p "$TOOLS.tmp/sluice_dma"
    cp "$HERE"/tools/sluice_dma/* "$TOOLS.tmp/sluice_dma/"
    kmake M="$TOOLS.tmp/sluice_dma" modules >"$TOOLS.tmp/build.log" 2>&1 \
        || { tail -n 30 "$TOOLS.tmp/build.log" >&2; die "sluice_dma module build failed (log: $TOOLS.tmp/build.log)"; }
    cp "$TOOLS.tmp/sluice_dma/sluice_dma.ko" "$TOOLS.tmp/sluice_dma.ko"
    "${ARCH_CROSS}gcc" -static -O2 -Wall -Wextra -Werror -o "$TOOLS.tmp/vfio-dma" "$HERE/tools/vfio-dma/vfio_dma.c" \
        >>"$TOOLS.tmp/build.log" 2>&1 \
        || { tail -n 30 "$TOOLS.tmp/build.log" >&2; die "vfio-dma build failed"; }
    "${ARCH_CROSS}gcc" -static -O2 -Wall -Wextra -Werror -o "$TOOLS.tmp/dma-bench" "$HERE/tools/dma-bench/dma_bench.c" \
        >>"$TOOLS.tmp/build.log" 2>&1 \
        || { tail -n 30 "$TOOLS.tmp/build.log" >&2; die "dma-bench build failed"; }
    rm -rf "$TOOLS"
    mv "$TOOLS.tmp" "$TOOLS"
    log "      sluice_dma.ko, vfio-dma and dma-bench built in $TOOLS"
fi

# ---------------------------------------------------------------------------
# busybox for the guest: the host's for x86_64; for another architecture the
# static busybox of Debian's package for it, unpacked into the cache (not
# installed: busybox-static:<arch> would replace the host's busybox-static).
BUSYBOX=/bin/busybox
BUSYBOX_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)
if [ "$ARCH" != x86_64 ]; then
    BB_DIR=$SLUICE_CACHE/busybox/$ARCH_DEB-$BUSYBOX_VERSION
    BUSYBOX=$BB_DIR/bin/busybox
    if [ ! -x "$BUSYBOX" ]; then
        # Adding a foreign architecture only adds package indexes; nothing is installed or
        # removed (the package is downloaded and unpacked below, not installed).
        if ! dpkg --print-foreign-architectures | grep -qx "$ARCH_DEB"; then
            [ "$(id -u)" = 0 ] \
                || die "busybox-static:$ARCH_DEB needs the $ARCH_DEB Debian architecture: dpkg --add-architecture $ARCH_DEB && apt-get update (as root)"
            log "adding the $ARCH_DEB Debian architecture (package indexes only) for busybox-static:$ARCH_DEB"
            dpkg --add-architecture "$ARCH_DEB" && apt-get update -q >&2 \
                || die "dpkg --add-architecture $ARCH_DEB / apt-get update failed"
        fi
        rm -rf "$BB_DIR.tmp"
        mkdir -p "$BB_DIR.tmp"
        ( cd "$BB_DIR.tmp" && apt-get download -q "busybox-static:$ARCH_DEB=$BUSYBOX_VERSION" ) >&2 \
            || die "apt-get download busybox-static:$ARCH_DEB=$BUSYBOX_VERSION failed"
        dpkg-deb -x "$BB_DIR.tmp"/busybox-static_*.deb "$BB_DIR.tmp/root" \
            || die "cannot unpack busybox-static:$ARCH_DEB"
        rm -rf "$BB_DIR"
        mv "$BB_DIR.tmp/root" "$BB_DIR"
        rm -rf "$BB_DIR.tmp"
        [ -x "$BUSYBOX" ] || die "busybox-static:$ARCH_DEB has no bin/busybox"
    fi
fi

# ---------------------------------------------------------------------------
# The initramfs is cheap (~2 s); it is rebuilt every time, reproducibly
# (fixed mtimes, sorted names, gzip -n), and only replaces the cached file
# when its bytes differ.
stage 7 $STAGES "initramfs (busybox $BUSYBOX_VERSION + init/init + ${GUEST_MODULES[*]} + sluice_dma, vfio-dma, dma-bench)"
STAGE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sluice-initramfs.XXXXXX")
trap 'rm -rf "$STAGE_DIR"; if [ -n "${HB_PID:-}" ]; then kill "$HB_PID" 2>/dev/null || true; fi' EXIT
R=$STAGE_DIR/root
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,mnt,run,lib/modules,sys/kernel/debug,usr/bin,usr/sbin}
cp "$BUSYBOX" "$R/bin/busybox"
# The applet list from the host's busybox: the same Debian version, and a
# foreign one would not run here.
for a in $(/bin/busybox --list); do
    # busybox lists itself as an applet: a symlink would replace the binary
    [ "$a" = busybox ] || ln -s busybox "$R/bin/$a"
done
install -m 0755 "$HERE/init/init" "$R/init"
for m in "${GUEST_MODULES[@]}"; do
    install -m 0644 "$IMAGE_DIR/modules/$m.ko" "$R/lib/modules/$m.ko"
done
install -m 0644 "$TOOLS/sluice_dma.ko" "$R/lib/modules/sluice_dma.ko"
install -m 0755 "$TOOLS/vfio-dma" "$R/bin/vfio-dma"
install -m 0755 "$TOOLS/dma-bench" "$R/bin/dma-bench"
find "$R" -exec touch -h -d @0 {} +
( cd "$R" && find . -mindepth 1 -print0 | sort -z | cpio --null -o -H newc --quiet --reproducible -R 0:0 ) \
    | gzip -9 -n > "$STAGE_DIR/initramfs.cpio.gz"
if cmp -s "$STAGE_DIR/initramfs.cpio.gz" "$IMAGE_DIR/initramfs.cpio.gz" 2>/dev/null; then
    log "      initramfs unchanged"
else
    mv "$STAGE_DIR/initramfs.cpio.gz" "$IMAGE_DIR/initramfs.cpio.gz"
    log "      initramfs written ($(stat -c %s "$IMAGE_DIR/initramfs.cpio.gz") bytes)"
fi

# ---------------------------------------------------------------------------
stage 8 $STAGES "manifest"
{
    echo "variant: $VARIANT"
    if [ "$ARCH" != x86_64 ]; then echo "arch: $ARCH"; fi
    echo "description: $DESCRIPTION"
    echo "key: $KEY"
    echo "source_package: $SOURCE_PKG $SRCVER"
    echo "kernel_release: $(cat "$IMAGE_DIR/kernel.release")"
    echo "kernel_build_seconds: $(cat "$IMAGE_DIR/kernel-build-seconds") (make -j$JOBS, when it was built)"
    echo "fragments: $(for f in "${FRAGMENTS[@]}"; do printf '%s ' "${f#"$HERE"/}"; done)"
    echo "verify_only: $(for f in "${VERIFY_ONLY[@]}"; do printf '%s ' "${f#"$HERE"/}"; done)"
    echo "patches: ${PATCHES[*]:-none}"
    echo "busybox: $BUSYBOX_VERSION"
    echo "modules: ${GUEST_MODULES[*]}"
    echo "tools: $TOOLS (sluice_dma.ko, vfio-dma, dma-bench)"
    echo "build_tree: $OUT"
    echo "source_tree: $SRC"
    echo "files:"
    ( cd "$IMAGE_DIR" && for f in "${KERNEL_FILES[@]}" initramfs.cpio.gz; do
        printf '  %s %s %s\n' "$(sha256sum "$f" | cut -c1-64)" "$(stat -c %s "$f")" "$f"
    done )
} > "$IMAGE_DIR/manifest.txt.new"
# keep the file (and its mtime) when nothing changed
if cmp -s "$IMAGE_DIR/manifest.txt.new" "$IMAGE_DIR/manifest.txt" 2>/dev/null; then
    rm -f "$IMAGE_DIR/manifest.txt.new"
else
    mv "$IMAGE_DIR/manifest.txt.new" "$IMAGE_DIR/manifest.txt"
fi

log "build.sh: $VARIANT done in $(( $(now) - T_START ))s"
echo "KERNEL=$IMAGE_DIR/$ARCH_IMAGE"
echo "VMLINUX=$IMAGE_DIR/vmlinux"
echo "SYSTEM_MAP=$IMAGE_DIR/System.map"
echo "INITRD=$IMAGE_DIR/initramfs.cpio.gz"
echo "IMAGE_DIR=$IMAGE_DIR"
