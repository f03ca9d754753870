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
#   5. powers off through ACPI PM1a_CNT (SLP_TYP=5, SLP_EN) at port 0x604.
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
        # Walk the capability list for MSI-X (ID 0x11).
        mov     edi, r15d
        mov     esi, 0x34
        call    cfg_read32
        movzx   ebx, al
cap_loop:
        test    ebx, ebx
        jz      fail_nocap
        mov     edi, r15d
        mov     esi, ebx
        call    cfg_read32
        cmp     al, 0x11
        je      cap_found
        movzx   ebx, ah
        jmp     cap_loop
cap_found:
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
        mov     word ptr [rdi], ax
        mov     word ptr [rdi + 2], 0x10    # kernel code selector (the VMM's GDT)
        mov     word ptr [rdi + 4], 0x8e00  # present, DPL 0, 64-bit interrupt gate
        shr     rax, 16
        mov     word ptr [rdi + 6], ax
        shr     rax, 16
        mov     dword ptr [rdi + 8], eax
        mov     dword ptr [rdi + 12], 0
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

msix_handler:
        push    rax
        mov     eax, [rip + irq_count]
        inc     eax
        mov     [rip + irq_count], eax
        mov     rax, LAPIC
        mov     dword ptr [rax + 0xb0], 0   # EOI
        pop     rax
        iretq

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
        .balign 4
blk_dev:        .long 0
tst_dev:        .long 0
irq_count:      .long 0
        .balign 16
idtr:           .word 4095
                .quad idt
        .balign 16
idt:            .fill 4096, 1, 0
                .fill 4096, 1, 0
stack_top:
