#!/usr/bin/env python3
"""Smoke test of x-smmuv3-proxy (smmuv3-proxy.patch) without Sluice.

The guest is the patched qemu-system-aarch64 with
-M virt,iommu=smmuv3,x-smmuv3-proxy-fd=N. Its disk is a virtio-blk-pci that a second
QEMU serves (-M x-remote, through x-pci-proxy-dev). The SMMU end is this script: a stub
speaking mpqemu with a minimal SMMUv3 register file. The stub mirrors CR0 to CR0ACK and
IRQ_CTRL to IRQ_CTRLACK, clears GBPA.UPDATE, consumes the command queue at once and has no
MSIs. It does NOT translate, so the guest must run with iommu.passthrough=1 (bypass STEs).
Translation is Sluice's job.

Environment (defaults in brackets):
  QEMU          patched qemu-system-aarch64 (required)
  REMOTE_QEMU   a qemu-system-x86_64 with multiprocess (x-remote machine) (required)
  KERNEL        arm64 Image (required)
  INITRD        initramfs (required)
  DISK          raw disk image, written by sluice.workload=disk (required)
  APPEND        extra kernel arguments [iommu.passthrough=1]
  TMO           guest timeout, seconds [180]
  LOGDIR        stub + remote logs [.]
  STUB_CLOSE_AFTER=N   close the SMMU socket after N register accesses (error path test)
  STUB_PULSE=N         once the driver enables the wired interrupts (IRQ_CTRL), signal the
                       eventq and gerror eventfds N times each, 50 ms apart (interrupt path
                       test: /proc/interrupts in the guest counts them)
  STUB_RESET_AT=S      S seconds after the start, send "system_reset" on a monitor socket
                       (the guest runs without -no-reboot then, so it boots twice; the stub
                       must see a second DEVICE_RESET and a second driver probe)
Prints the guest console with timestamps, then one summary line with the stub's counts.
"""
import array
import collections
import os
import socket
import struct
import subprocess
import sys
import threading
import time

env = os.environ
QEMU, REMOTE, KERNEL, INITRD, DISK = (env[k] for k in ('QEMU', 'REMOTE_QEMU', 'KERNEL', 'INITRD', 'DISK'))
APPEND = env.get('APPEND', 'iommu.passthrough=1')
TMO = env.get('TMO', '180')
LOGDIR = env.get('LOGDIR', '.')
CLOSE_AFTER = int(env.get('STUB_CLOSE_AFTER', '0'))
PULSE = int(env.get('STUB_PULSE', '0'))
RESET_AT = float(env.get('STUB_RESET_AT', '0'))

BASE = 0x09050000          # VIRT_SMMU in QEMU 7.2's virt memory map
HDR = 16                   # int32 cmd, pad, uint64 size
SYNC_SYSMEM, RET, BAR_WRITE, BAR_READ, SET_IRQFD, DEVICE_RESET = 0, 1, 4, 5, 6, 7
LINES = ('eventq', 'priq', 'cmdq-sync', 'gerror')

# IDR0: S1P, TTF=AArch64, COHACC, ASID16, STALL_MODEL=1, TERM_MODEL
IDR0 = (1 << 1) | (2 << 2) | (1 << 4) | (1 << 12) | (1 << 24) | (1 << 26)
IDR1 = (8 << 21) | (8 << 16) | 16   # CMDQS=8, EVTQS=8, SIDSIZE=16 (linear stream table)
IDR5 = 0x55                         # OAS 48 bits, 4K/16K/64K granules
RESET_REGS = {0x00: IDR0, 0x04: IDR1, 0x14: IDR5}

stats = collections.Counter()
regs = collections.defaultdict(int, RESET_REGS)
log = open(os.path.join(LOGDIR, 'smmu-stub.log'), 'w')


def reg_read(off, size):
    v = regs[off]
    if size == 8:
        v |= regs[off + 4] << 32
    return v


def reg_write(off, val, size):
    regs[off] = val & 0xffffffff
    if size == 8:
        regs[off + 4] = val >> 32
    if off == 0x20:                       # CR0 -> CR0ACK
        regs[0x24] = regs[0x20]
    elif off == 0x50:                     # IRQ_CTRL -> IRQ_CTRLACK
        regs[0x54] = regs[0x50]
    elif off == 0x44:                     # GBPA: the update completes at once
        regs[0x44] &= ~(1 << 31)
    elif off == 0x98:                     # CMDQ_PROD: consume everything, no errors
        n = (regs[0x98] - regs[0x9c]) & 0xfff
        stats['commands'] += n if n < 0x800 else 0
        regs[0x9c] = regs[0x98] & 0x000fffff


def pulse_lines(irqfds):
    """Signal eventq (line 0) and gerror (line 3) PULSE times each."""
    time.sleep(0.2)
    for _ in range(PULSE):
        for line in (0, 3):
            os.write(irqfds[line][0], struct.pack('<Q', 1))
            stats[f'signalled-{LINES[line]}'] += 1
        time.sleep(0.05)


def recv_exact(sock, n):
    b = b''
    while len(b) < n:
        chunk = sock.recv(n - len(b))
        if not chunk:
            return None
        b += chunk
    return b


def reply(sock, value):
    sock.sendall(struct.pack('<i4xQQ', RET, 8, value & 0xffffffffffffffff))


def serve(sock):
    irqfds = []
    while True:
        fds = array.array('i')
        msg, anc, _, _ = sock.recvmsg(HDR, socket.CMSG_SPACE(8 * fds.itemsize))
        if not msg:
            print('EOF from QEMU', file=log, flush=True)
            return
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if len(msg) < HDR:
            msg += recv_exact(sock, HDR - len(msg))
        cmd, size = struct.unpack('<i4xQ', msg)
        data = recv_exact(sock, size) if size else b''
        stats[f'cmd{cmd}'] += 1
        if cmd in (BAR_WRITE, BAR_READ):
            addr, val, sz, mem = struct.unpack('<QQIB3x', data)
            off = addr - BASE
            if cmd == BAR_WRITE:
                if PULSE and off == 0x50 and val and not stats['pulse-started']:
                    stats['pulse-started'] = 1
                    threading.Thread(target=pulse_lines, args=(irqfds,), daemon=True).start()
                reg_write(off, val, sz)
                print(f'W {off:#07x} {val:#x} /{sz}', file=log)
                ret = 0
            else:
                ret = reg_read(off, sz)
                print(f'R {off:#07x} -> {ret:#x} /{sz}', file=log)
            stats['accesses'] += 1
            if CLOSE_AFTER and stats['accesses'] >= CLOSE_AFTER:
                print(f'closing the socket after {CLOSE_AFTER} accesses (no reply)', file=log, flush=True)
                sock.close()
                return
            reply(sock, ret)
        elif cmd == SET_IRQFD:
            name = LINES[len(irqfds)] if len(irqfds) < len(LINES) else '?'
            irqfds.append(list(fds))
            print(f'SET_IRQFD #{len(irqfds)} ({name}) fds {list(fds)} size {size}', file=log)
        elif cmd == SYNC_SYSMEM:
            gpas = struct.unpack('<8Q', data[0:64])
            sizes = struct.unpack('<8Q', data[64:128])
            regions = ', '.join(f'{gpas[i]:#x}+{sizes[i]:#x}' for i in range(len(fds)))
            print(f'SYNC_SYSMEM {len(fds)} fds: {regions}', file=log)
            for f in fds:
                os.close(f)
        elif cmd == DEVICE_RESET:
            regs.clear()
            regs.update(RESET_REGS)
            print(f'DEVICE_RESET size {size}', file=log)
            reply(sock, 0)
        else:
            print(f'unexpected cmd {cmd} size {size}', file=log)
        log.flush()


def reset_later(path):
    time.sleep(RESET_AT)
    mon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mon.connect(path)
    mon.sendall(b'system_reset\n')
    stats['system_reset-sent'] += 1
    time.sleep(1)
    mon.close()


def main():
    gs, rs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)     # PCI proxy
    gsm, rsm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)   # SMMU proxy
    remote = subprocess.Popen(
        [REMOTE, '-machine', 'x-remote,vfio-user=off', '-nodefaults', '-display', 'none',
         '-device', 'virtio-blk-pci,id=vblk0,drive=d0,disable-legacy=on,iommu_platform=on',
         '-drive', f'id=d0,file={DISK},format=raw,if=none',
         '-object', f'x-remote-object,id=robj0,devid=vblk0,fd={rs.fileno()}'],
        pass_fds=[rs.fileno()], stdout=open(os.path.join(LOGDIR, 'remote.log'), 'w'),
        stderr=subprocess.STDOUT)
    rs.close()
    threading.Thread(target=serve, args=(rsm,), daemon=True).start()
    monitor = os.path.join(LOGDIR, 'monitor.sock')
    if RESET_AT:
        if os.path.exists(monitor):
            os.unlink(monitor)
        threading.Thread(target=reset_later, args=(monitor,), daemon=True).start()
    t0 = time.time()
    guest = subprocess.Popen(
        ['timeout', TMO, QEMU, '-accel', 'tcg,thread=multi', '-cpu', 'max', '-smp', '2',
         '-m', '512', '-object', 'memory-backend-memfd,id=mem,size=512M,share=on',
         '-M', 'virt,gic-version=3,highmem=off,memory-backend=mem,iommu=smmuv3,'
               f'x-smmuv3-proxy-fd={gsm.fileno()}',
         '-nodefaults', '-no-user-config', '-display', 'none', '-serial', 'stdio']
        + (['-monitor', f'unix:{monitor},server=on,wait=off'] if RESET_AT else ['-no-reboot'])
        + ['-kernel', KERNEL, '-initrd', INITRD,
         '-append', f'console=ttyAMA0 panic=-1 pci=nomsi {APPEND}',
         '-device', f'x-pci-proxy-dev,id=vblk0,fd={gs.fileno()}'],
        pass_fds=[gs.fileno(), gsm.fileno()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    gs.close()
    gsm.close()
    for raw in guest.stdout:
        print(f'[{time.time() - t0:7.2f}] {raw.decode(errors="replace").rstrip()}', flush=True)
    guest.wait()
    remote.kill()
    remote.wait()
    log.flush()
    print(f'guest exit {guest.returncode} after {time.time() - t0:.2f}s; '
          f'smmu stub stats {dict(stats)}', flush=True)
    return 0 if guest.returncode == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
