#!/usr/bin/env bash
# Smoke test of the patched QEMU's x-pci-proxy-dev under TCG, independent of
# Sluice's own devices: a second instance of GUEST_QEMU as `-machine x-remote`
# serves QEMU's own virtio-blk-pci; the guest QEMU attaches it through
# x-pci-proxy-dev over a socketpair; the guest runs the disk workload.
#
#   guest-images/qemu/proxy-smoke.sh GUEST_QEMU IMAGE_DIR [SEED]
#
# Exit 0 when the guest prints "SLUICE: RESULT PASS" and the pattern is on
# the disk image. With the stock QEMU as GUEST_QEMU the guest hangs at the
# first disk request (no INTx under TCG) and this fails on its timeout.
# Env: TIMEOUT (default 120 s), KEEP=1 keeps the scratch dir.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 GUEST_QEMU IMAGE_DIR [SEED]" >&2; exit 2; }
GUEST_QEMU=$1 IMAGE_DIR=$2 SEED=${3:-1}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/sluice-proxy-smoke.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$SCRATCH"' EXIT
truncate -s 64M "$SCRATCH/disk.img"

python3 - "$GUEST_QEMU" "$IMAGE_DIR" "$SEED" "$SCRATCH" "${TIMEOUT:-120}" <<'EOF'
import os, socket, subprocess, sys, time
guest_qemu, image_dir, seed, scratch, tmo = sys.argv[1:6]
guest_sock, remote_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
remote = subprocess.Popen(
    [guest_qemu, '-machine', 'x-remote,vfio-user=off',
     '-nodefaults', '-display', 'none',
     '-device', 'virtio-blk-pci,id=vblk0,drive=d0,disable-legacy=on',
     '-drive', f'id=d0,file={scratch}/disk.img,format=raw,if=none',
     '-object', f'x-remote-object,id=robj0,devid=vblk0,fd={remote_sock.fileno()}'],
    pass_fds=[remote_sock.fileno()],
    stdout=open(f'{scratch}/remote.log', 'w'), stderr=subprocess.STDOUT)
remote_sock.close()
t0 = time.time()
guest = subprocess.Popen(
    ['timeout', tmo, guest_qemu, '-accel', 'tcg,thread=multi', '-cpu', 'max',
     '-M', 'q35,memory-backend=mem', '-smp', '2', '-m', '512',
     # the remote process maps guest RAM: it must be a shared memfd
     '-object', 'memory-backend-memfd,id=mem,size=512M,share=on',
     '-nodefaults', '-no-user-config', '-display', 'none', '-serial', 'stdio', '-no-reboot',
     '-kernel', f'{image_dir}/bzImage', '-initrd', f'{image_dir}/initramfs.cpio.gz',
     '-append', f'console=ttyS0 panic=-1 quiet sluice.seed={seed}',
     '-device', f'x-pci-proxy-dev,id=vblk0,fd={guest_sock.fileno()}'],
    pass_fds=[guest_sock.fileno()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
ok = False
for raw in guest.stdout:
    line = raw.decode(errors='replace').rstrip()
    print(f'[{time.time() - t0:7.2f}] {line}', flush=True)
    ok = ok or line.startswith('SLUICE: RESULT PASS')
guest.wait()
remote.kill()   # the remote does not exit by itself when the guest goes away
remote.wait()
print(f'proxy-smoke: guest exit {guest.returncode} after {time.time() - t0:.2f}s', flush=True)
sys.exit(0 if ok and guest.returncode == 0 else 1)
EOF
"$HERE/../check-pattern.sh" "$SCRATCH/disk.img" "$SEED" vda
echo "proxy-smoke: PASS"
