# Sluice bare-metal test guest (x86-64, GNU as, Intel syntax).
#
# Entered by the kvm backend in 64-bit long mode (identity-mapped first 4 GiB, flat GDT),
# like a non-PVH ELF kernel. It:
#   1. writes to COM1 (0x3f8);
#   2. enumerates PCI bus 0 through configuration mechanism #1 (0xCF8/0xCFC);
#   3. reads the virtio-blk's BAR 0 (common config: num_queues);
#   4. on the test device (5105:7e57): programs MSI-X entry 0 to the boot LAPIC, vector 0x40,
#      enables MSI-X, installs an IDT gate, enables the LAPIC, rings the doorbell (BAR0+0),
#      and waits with STI;HLT for the interrupt;
#   5. drives the virtio-blk as a virtio 1.x driver would (reset, features with VERSION_1,
#      queue 0 with MSI-X entry 0 -> vector 0x41, DRIVER_OK), reads sector 0 through the
#      virtqueue, rings queue 0's doorbell and waits for the used-buffer interrupt;
#   6. calls the labelled function sluice_tg_probe three times (a guest.sym injection point:
#      build.rs lists its address in a System.map-style file);
#   7. powers off through ACPI PM1a_CNT (SLP_TYP=5, SLP_EN) at port 0x604.
# Every result line starts with "SLUICE-TG:"; failures print "SLUICE-TG: FAIL ...".
# Only simple instructions are used (PVM runs supervisor code through KVM's emulator).

        .intel_syntax noprefix
        .code64
        .text
        .globl _start

        .set COM1, 0x3f8
        .set BLK_ID, 0x10421af4
        .set TEST_ID, 0x7e575105
        .set VECTOR, 0x40
        .set BLK_VECTOR, 0x41
        .set QSIZE, 8
        .set CAP_MSIX, 0x11
        .set CAP_VENDOR, 0x09
        .set VIRTIO_COMMON_CFG, 1
        .set VIRTIO_NOTIFY_CFG, 2
        .set LAPIC, 0xfee00000

_start:
        cli
        lea     rsp, [rip + stack_top]
        # Mask both 8259s: only the MSI may interrupt us.
        mov     al, 0xff
        out     0x21, al
        out     0xa1, al
        lea     rsi, [rip + msg_hello]
        call    puts

        # --- 2. enumerate bus 0 --------------------------------------------------------
        xor     ebx, ebx
enum_loop:
        mov     edi, ebx
        xor     esi, esi
        call    cfg_read32
        cmp     eax, 0xffffffff
        je      enum_next
        mov     r12d, eax
        lea     rsi, [rip + msg_pci]
        call    puts
        mov     eax, ebx
        mov     ecx, 2
        call    puthex
        lea     rsi, [rip + msg_id]
        call    puts
        mov     eax, r12d
        mov     ecx, 8
        call    puthex
        call    newline
        lea     eax, [rbx + 1]
        cmp     r12d, BLK_ID
        jne     1f
        mov     [rip + blk_dev], eax
1:      cmp     r12d, TEST_ID
        jne     enum_next
        mov     [rip + tst_dev], eax
enum_next:
        inc     ebx
        cmp     ebx, 32
        jb      enum_loop

        # --- 3. virtio-blk BAR read ----------------------------------------------------
        mov     edi, [rip + blk_dev]
        test    edi, edi
        jz      fail_noblk
        dec     edi
        mov     esi, 0x10
        call    cfg_read32
        and     eax, 0xfffffff0
        mov     r13d, eax
        lea     rsi, [rip + msg_blk]
        call    puts
        mov     eax, r13d
        mov     ecx, 8
        call    puthex
        lea     rsi, [rip + msg_nq]
        call    puts
        movzx   eax, word ptr [r13 + 0x12]
        mov     ecx, 4
        call    puthex
        call    newline

        # --- 4. MSI-X on the test device -----------------------------------------------
        mov     edi, [rip + tst_dev]
        test    edi, edi
        jz      fail_notst
        dec     edi
        mov     r15d, edi                   # r15 = device number
        mov     esi, 0x10
        call    cfg_read32
        and     eax, 0xfffffff0
        mov     r14d, eax                   # r14 = BAR 0
        mov     edi, r15d
        mov     esi, CAP_MSIX
        call    find_cap
        test    eax, eax
        jz      fail_nocap
        mov     ebx, eax
        mov     r12d, ebx                   # r12 = MSI-X capability offset
        mov     edi, r15d
        lea     esi, [rbx + 4]
        call    cfg_read32                  # table offset | BIR (BIR 0 assumed)
        and     eax, 0xfffffff8
        lea     r13, [r14 + rax]            # r13 = table entry 0
        mov     dword ptr [r13], LAPIC      # address: boot CPU (APIC ID 0)
        mov     dword ptr [r13 + 4], 0
        mov     dword ptr [r13 + 8], VECTOR # data: fixed, edge, vector 0x40
        mov     dword ptr [r13 + 12], 0     # unmasked
        mov     edi, r15d
        mov     esi, r12d
        call    cfg_read32
        or      eax, 0x80000000             # Message Control: MSI-X Enable
        mov     ecx, eax
        mov     edi, r15d
        mov     esi, r12d
        call    cfg_write32
        # IDT gate for VECTOR.
        lea     rax, [rip + msix_handler]
        lea     rdi, [rip + idt + VECTOR * 16]
        call    set_gate
        lidt    [rip + idtr]
        # LAPIC: software enable (SVR bit 8, spurious vector 0xff), TPR 0.
        mov     rax, LAPIC
        mov     dword ptr [rax + 0xf0], 0x1ff
        mov     dword ptr [rax + 0x80], 0
        lea     rsi, [rip + msg_ring]
        call    puts
        # Ring the doorbell, then wait for the interrupt.
        mov     dword ptr [r14], 1
        mov     ebx, 16
wait_loop:
        mov     eax, [rip + irq_count]
        test    eax, eax
        jnz     got_irq
        sti
        hlt
        cli
        dec     ebx
        jnz     wait_loop
        jmp     fail_noirq
got_irq:
        lea     rsi, [rip + msg_irq]
        call    puts
        mov     eax, [rip + irq_count]
        mov     ecx, 8
        call    puthex
        lea     rsi, [rip + msg_rings]
        call    puts
        mov     eax, [r14 + 4]              # the device counts doorbells at BAR0+4
        mov     ecx, 8
        call    puthex
        call    newline

        # --- 5. one virtio-blk read through a real virtqueue -------------------------------
        mov     r15d, [rip + blk_dev]
        dec     r15d                        # r15 = virtio-blk device number
        # MSI-X entry 0 -> BLK_VECTOR on APIC 0, then MSI-X Enable.
        mov     edi, r15d
        mov     esi, CAP_MSIX
        call    find_cap
        test    eax, eax
        jz      fail_nocap
        mov     r12d, eax                   # r12 = MSI-X capability offset
        mov     edi, r15d
        lea     esi, [r12 + 4]
        call    cfg_read32                  # table offset | BIR
        mov     r13d, eax
        and     r13d, 0xfffffff8
        and     eax, 7
        lea     esi, [rax * 4 + 0x10]
        mov     edi, r15d
        call    cfg_read32                  # the BAR holding the table
        and     eax, 0xfffffff0
        add     r13, rax                    # r13 = table entry 0
        mov     dword ptr [r13], LAPIC
        mov     dword ptr [r13 + 4], 0
        mov     dword ptr [r13 + 8], BLK_VECTOR
        mov     dword ptr [r13 + 12], 0
        mov     edi, r15d
        mov     esi, r12d
        call    cfg_read32
        or      eax, 0x80000000
        mov     ecx, eax
        mov     edi, r15d
        mov     esi, r12d
        call    cfg_write32
        lea     rax, [rip + blk_handler]
        lea     rdi, [rip + idt + BLK_VECTOR * 16]
        call    set_gate
        # The common configuration and the notify structure, from the vendor capabilities.
        mov     edi, r15d
        mov     esi, VIRTIO_COMMON_CFG
        call    virtio_struct
        test    rax, rax
        jz      fail_nocommon
        mov     r14, rax                    # r14 = common configuration
        mov     edi, r15d
        mov     esi, VIRTIO_NOTIFY_CFG
        call    virtio_struct
        test    rax, rax
        jz      fail_nocommon
        mov     r12, rax                    # r12 = notify structure
        mov     edi, r15d
        lea     esi, [rbx + 16]
        call    cfg_read32
        mov     ebp, eax                    # rbp = notify_off_multiplier
        # Driver initialization (virtio 1.x 3.1.1).
        mov     byte ptr [r14 + 0x14], 0    # device_status: reset
        mov     byte ptr [r14 + 0x14], 1    # ACKNOWLEDGE
        mov     byte ptr [r14 + 0x14], 3    # DRIVER
        mov     dword ptr [r14 + 0x08], 1   # driver_feature_select: bits 32..63
        mov     dword ptr [r14 + 0x0c], 1   # VIRTIO_F_VERSION_1
        mov     byte ptr [r14 + 0x14], 0x0b # FEATURES_OK
        mov     al, [r14 + 0x14]
        test    al, 8
        jz      fail_features
        mov     word ptr [r14 + 0x10], 0xffff   # msix_config: no vector
        mov     word ptr [r14 + 0x16], 0    # queue_select
        mov     word ptr [r14 + 0x18], QSIZE
        mov     word ptr [r14 + 0x1a], 0    # queue_msix_vector: entry 0
        lea     rax, [rip + vq_desc]
        mov     [r14 + 0x20], eax
        mov     dword ptr [r14 + 0x24], 0
        lea     rax, [rip + vq_avail]
        mov     [r14 + 0x28], eax
        mov     dword ptr [r14 + 0x2c], 0
        lea     rax, [rip + vq_used]
        mov     [r14 + 0x30], eax
        mov     dword ptr [r14 + 0x34], 0
        movzx   eax, word ptr [r14 + 0x1e]  # queue_notify_off
        imul    eax, ebp
        add     r12, rax                    # r12 = queue 0's doorbell
        mov     word ptr [r14 + 0x1c], 1    # queue_enable
        mov     byte ptr [r14 + 0x14], 0x0f # DRIVER_OK
        # Request: header (VIRTIO_BLK_T_IN, sector 0), 512-byte buffer, status byte.
        lea     rdi, [rip + vq_desc]
        lea     rax, [rip + blk_hdr]
        mov     [rdi], rax
        mov     dword ptr [rdi + 8], 16
        mov     word ptr [rdi + 12], 1      # NEXT
        mov     word ptr [rdi + 14], 1
        lea     rax, [rip + blk_data]
        mov     [rdi + 16], rax
        mov     dword ptr [rdi + 24], 512
        mov     word ptr [rdi + 28], 3      # NEXT | WRITE
        mov     word ptr [rdi + 30], 2
        lea     rax, [rip + blk_status]
        mov     [rdi + 32], rax
        mov     dword ptr [rdi + 40], 1
        mov     word ptr [rdi + 44], 2      # WRITE
        mov     word ptr [rdi + 46], 0
        lea     rdi, [rip + vq_avail]
        mov     word ptr [rdi + 4], 0       # ring[0] = descriptor 0
        mov     word ptr [rdi + 2], 1       # idx = 1
        lea     rsi, [rip + msg_blk_ring]
        call    puts
        mov     word ptr [r12], 0           # the doorbell: queue index 0
        mov     ebx, 16
blk_wait:
        mov     eax, [rip + blk_irq_count]
        test    eax, eax
        jnz     blk_done
        sti
        hlt
        cli
        dec     ebx
        jnz     blk_wait
        jmp     fail_blkirq
blk_done:
        lea     rsi, [rip + msg_blk_done]
        call    puts
        lea     rdi, [rip + vq_used]
        movzx   eax, word ptr [rdi + 2]
        mov     ecx, 4
        call    puthex
        lea     rsi, [rip + msg_status]
        call    puts
        movzx   eax, byte ptr [rip + blk_status]
        mov     ecx, 2
        call    puthex
        lea     rsi, [rip + msg_data]
        call    puts
        mov     eax, [rip + blk_data]
        mov     ecx, 8
        call    puthex
        call    newline

        # --- 6. a guest-code injection point: sluice_tg_probe, called three times ---------
        mov     r12d, 3
probe_loop:
        call    sluice_tg_probe
        dec     r12d
        jnz     probe_loop
        lea     rsi, [rip + msg_probe]
        call    puts
        mov     eax, [rip + probe_calls]
        mov     ecx, 8
        call    puthex
        call    newline
        lea     rsi, [rip + msg_done]
        call    puts
        jmp     poweroff

fail_noblk:
        lea     rsi, [rip + msg_fail_blk]
        jmp     fail
fail_notst:
        lea     rsi, [rip + msg_fail_tst]
        jmp     fail
fail_nocap:
        lea     rsi, [rip + msg_fail_cap]
        jmp     fail
fail_noirq:
        lea     rsi, [rip + msg_fail_irq]
        jmp     fail
fail_nocommon:
        lea     rsi, [rip + msg_fail_common]
        jmp     fail
fail_features:
        lea     rsi, [rip + msg_fail_features]
        jmp     fail
fail_blkirq:
        lea     rsi, [rip + msg_fail_blkirq]
fail:
        call    puts
poweroff:
        mov     dx, 0x604
        mov     ax, 0x3400                  # SLP_TYP = 5, SLP_EN
        out     dx, ax
halt:
        cli
        hlt
        jmp     halt

        .globl  sluice_tg_probe
        .type   sluice_tg_probe, @function
sluice_tg_probe:
        mov     eax, [rip + probe_calls]
        inc     eax
        mov     [rip + probe_calls], eax
        ret
        .size   sluice_tg_probe, . - sluice_tg_probe

blk_handler:
        push    rax
        mov     eax, [rip + blk_irq_count]
        inc     eax
        mov     [rip + blk_irq_count], eax
        mov     rax, LAPIC
        mov     dword ptr [rax + 0xb0], 0   # EOI
        pop     rax
        iretq

msix_handler:
        push    rax
        mov     eax, [rip + irq_count]
        inc     eax
        mov     [rip + irq_count], eax
        mov     rax, LAPIC
        mov     dword ptr [rax + 0xb0], 0   # EOI
        pop     rax
        iretq

# set_gate: rax = handler, rdi = its IDT entry. Clobbers rax.
set_gate:
        mov     word ptr [rdi], ax
        mov     word ptr [rdi + 2], 0x10    # kernel code selector (the VMM's GDT)
        mov     word ptr [rdi + 4], 0x8e00  # present, DPL 0, 64-bit interrupt gate
        shr     rax, 16
        mov     word ptr [rdi + 6], ax
        shr     rax, 16
        mov     dword ptr [rdi + 8], eax
        mov     dword ptr [rdi + 12], 0
        ret

# find_cap: edi = device, esi = capability ID -> eax = its config offset (0: none).
# Clobbers ecx, edx, r8, r9.
find_cap:
        mov     r8d, esi
        mov     r9d, edi
        mov     esi, 0x34
        call    cfg_read32
        movzx   ecx, al
5:      test    ecx, ecx
        jz      6f
        mov     edi, r9d
        mov     esi, ecx
        call    cfg_read32
        cmp     al, r8b
        je      7f
        movzx   ecx, ah
        jmp     5b
6:      xor     ecx, ecx
7:      mov     eax, ecx
        mov     edi, r9d
        ret

# virtio_struct: edi = device, esi = virtio structure type (cfg_type) -> rax = its guest
# address (BAR base + offset; 0: no such capability), ebx = the capability's offset.
# Clobbers ecx, edx, esi, r8-r10.
virtio_struct:
        mov     r10d, esi
        mov     r9d, edi
        mov     esi, 0x34
        call    cfg_read32
        movzx   ebx, al
5:      test    ebx, ebx
        jz      6f
        mov     edi, r9d
        mov     esi, ebx
        call    cfg_read32                  # ID | next << 8 | cap_len << 16 | cfg_type << 24
        mov     r8d, eax
        shr     r8d, 24
        cmp     al, CAP_VENDOR
        jne     8f
        cmp     r8d, r10d
        je      7f
8:      movzx   ebx, ah
        jmp     5b
6:      xor     eax, eax
        mov     edi, r9d
        ret
7:      mov     edi, r9d
        lea     esi, [rbx + 4]
        call    cfg_read32                  # BAR index in the low byte
        and     eax, 7
        lea     esi, [rax * 4 + 0x10]
        call    cfg_read32
        and     eax, 0xfffffff0
        mov     r10d, eax
        lea     esi, [rbx + 8]
        call    cfg_read32                  # offset in the BAR
        add     rax, r10
        ret

# cfg_read32: edi = device, esi = register -> eax. Clobbers edx.
cfg_read32:
        mov     eax, edi
        shl     eax, 11
        or      eax, esi
        or      eax, 0x80000000
        mov     dx, 0xcf8
        out     dx, eax
        mov     dx, 0xcfc
        in      eax, dx
        ret

# cfg_write32: edi = device, esi = register, ecx = value. Clobbers eax, edx.
cfg_write32:
        mov     eax, edi
        shl     eax, 11
        or      eax, esi
        or      eax, 0x80000000
        mov     dx, 0xcf8
        out     dx, eax
        mov     eax, ecx
        mov     dx, 0xcfc
        out     dx, eax
        ret

# putc: al = byte. Waits for THR empty. Clobbers edx.
putc:
        push    rax
        mov     dx, COM1 + 5
2:      in      al, dx
        test    al, 0x20
        jz      2b
        pop     rax
        mov     dx, COM1
        out     dx, al
        ret

# puts: rsi = NUL-terminated string. Clobbers eax, edx, rsi.
puts:
        mov     al, [rsi]
        test    al, al
        jz      3f
        call    putc
        inc     rsi
        jmp     puts
3:      ret

newline:
        mov     al, 10
        jmp     putc

# puthex: eax = value, ecx = digits (from the low end). Clobbers eax, ecx, edx, r8, r9.
puthex:
        mov     r8d, eax
        mov     r9d, ecx
4:      dec     r9d
        mov     ecx, r9d
        shl     ecx, 2
        mov     eax, r8d
        shr     eax, cl
        and     eax, 0xf
        lea     rdx, [rip + hexdigits]
        mov     al, [rdx + rax]
        call    putc
        test    r9d, r9d
        jnz     4b
        ret

        .data
hexdigits:      .ascii "0123456789abcdef"
msg_hello:      .asciz "SLUICE-TG: hello from the bare-metal test guest (long mode)\n"
msg_pci:        .asciz "SLUICE-TG: pci 00:"
msg_id:         .asciz ".0 id="
msg_blk:        .asciz "SLUICE-TG: virtio-blk bar0="
msg_nq:         .asciz " num_queues="
msg_ring:       .asciz "SLUICE-TG: msi-x armed, ringing doorbell\n"
msg_irq:        .asciz "SLUICE-TG: msi-x vector 0x40 received, count="
msg_rings:      .asciz " doorbells="
msg_done:       .asciz "SLUICE-TG: done\n"
msg_fail_blk:   .asciz "SLUICE-TG: FAIL no virtio-blk on bus 0\n"
msg_fail_tst:   .asciz "SLUICE-TG: FAIL no test device on bus 0\n"
msg_fail_cap:   .asciz "SLUICE-TG: FAIL no MSI-X capability\n"
msg_fail_irq:   .asciz "SLUICE-TG: FAIL no interrupt after 16 wake-ups\n"
msg_fail_common: .asciz "SLUICE-TG: FAIL no virtio common/notify capability\n"
msg_fail_features: .asciz "SLUICE-TG: FAIL FEATURES_OK refused\n"
msg_fail_blkirq: .asciz "SLUICE-TG: FAIL no virtio-blk interrupt after 16 wake-ups\n"
msg_blk_ring:   .asciz "SLUICE-TG: virtio-blk request queued, ringing queue 0\n"
msg_blk_done:   .asciz "SLUICE-TG: virtio-blk read done, used_idx="
msg_status:     .asciz " status="
msg_data:       .asciz " data="
msg_probe:      .asciz "SLUICE-TG: sluice_tg_probe calls="
        .balign 4
blk_dev:        .long 0
tst_dev:        .long 0
irq_count:      .long 0
blk_irq_count:  .long 0
probe_calls:    .long 0
        .balign 16
idtr:           .word 4095
                .quad idt
        .balign 16
idt:            .fill 4096, 1, 0
                .fill 4096, 1, 0
stack_top:
        .balign 4096
vq_desc:        .fill 16 * QSIZE, 1, 0
vq_avail:       .fill 6 + 2 * QSIZE, 1, 0
        .balign 4
vq_used:        .fill 6 + 8 * QSIZE, 1, 0
        .balign 16
blk_hdr:        .long 0, 0                  # VIRTIO_BLK_T_IN, reserved
                .quad 0                     # sector
blk_data:       .fill 512, 1, 0
blk_status:     .byte 0xff
