/*
 * sluice-stall: a QEMU (7.2 plugin API, TCG) plugin that stalls exactly the
 * vCPU executing a watched guest address, steered by Sluice over a Unix socket.
 *
 *   -plugin /path/libsluice-stall.so,sock=/path/to/socket[,progress=on|off]
 *
 * Protocol (text lines, see crates/inject/src/plugin.rs for the other end):
 *   control connection, opened in qemu_plugin_install (before any vCPU runs):
 *     plugin -> sluice   HELLO 1 <max_vcpus>
 *     sluice -> plugin   WATCH <hex guest virtual address>     (0..n lines)
 *     sluice -> plugin   END
 *   the connection then stays open until QEMU exits (EOF tells Sluice).
 *   one connection per vCPU thread, opened at that vCPU's first hit:
 *     plugin -> sluice   HIT <vcpu> <hex addr> <tb counts of every vCPU, comma separated>
 *     sluice -> plugin   GO                        (after the planned delay, or at once)
 *     plugin -> sluice   LEFT <vcpu> <hex addr> <tb counts ...>
 *
 * An instruction-execution callback is registered, at translation time, only
 * for instructions whose address is watched; it runs on the vCPU thread before
 * the instruction executes and blocks that thread in read() until GO. Under
 * multi-threaded TCG the other vCPU threads keep executing (this thread holds
 * no BQL while in translated code). With progress=on (default) every vCPU
 * counts the translation blocks it executes, so Sluice can show the other
 * vCPUs' progress during a stall.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define MAX_WATCH 4096
#define LINE 4096

static char sock_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
static uint64_t watch[MAX_WATCH];
static size_t n_watch;
static int ctrl_fd = -1;
static int max_vcpus;
static int *vcpu_fd;          /* per-vCPU hit connection, -1 until first hit */
static uint64_t *tb_count;    /* per-vCPU executed TBs (written by the owner only) */
static bool progress = true;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    qemu_plugin_outs(buf);
}

static int connect_sock(void)
{
    struct sockaddr_un sa;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, sock_path, sizeof(sa.sun_path) - 1);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static bool write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return false;
        }
        p += w;
        n -= (size_t)w;
    }
    return true;
}

/* Reads one '\n'-terminated line (byte by byte: replies are tiny). */
static bool read_line(int fd, char *buf, size_t cap)
{
    size_t n = 0;
    for (;;) {
        char c;
        ssize_t r = read(fd, &c, 1);
        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            return false;
        }
        if (c == '\n') {
            buf[n] = 0;
            return true;
        }
        if (n + 1 < cap) {
            buf[n++] = c;
        }
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static bool watched(uint64_t vaddr)
{
    return bsearch(&vaddr, watch, n_watch, sizeof(uint64_t), cmp_u64) != NULL;
}

static size_t put_counts(char *buf, size_t cap)
{
    size_t n = 0;
    for (int i = 0; i < max_vcpus && n < cap; i++) {
        uint64_t c = __atomic_load_n(&tb_count[i], __ATOMIC_RELAXED);
        n += (size_t)snprintf(buf + n, cap - n, "%s%" PRIu64, i ? "," : "", c);
    }
    return n < cap ? n : cap;
}

static void on_tb_exec(unsigned int vcpu, void *udata)
{
    (void)udata;
    if ((int)vcpu < max_vcpus) {
        __atomic_store_n(&tb_count[vcpu], tb_count[vcpu] + 1, __ATOMIC_RELAXED);
    }
}

static void on_hit(unsigned int vcpu, void *udata)
{
    uint64_t addr = (uint64_t)(uintptr_t)udata;
    char line[LINE];
    int n;

    if ((int)vcpu >= max_vcpus) {
        return;
    }
    if (vcpu_fd[vcpu] < 0) {
        vcpu_fd[vcpu] = connect_sock();
        if (vcpu_fd[vcpu] < 0) {
            say("sluice-stall: vCPU %u cannot connect to %s: %s; not stalled\n", vcpu,
                sock_path, strerror(errno));
            return;
        }
    }
    n = snprintf(line, sizeof(line), "HIT %u %" PRIx64 " ", vcpu, addr);
    n += (int)put_counts(line + n, sizeof(line) - (size_t)n - 1);
    line[n++] = '\n';
    if (!write_all(vcpu_fd[vcpu], line, (size_t)n) ||
        !read_line(vcpu_fd[vcpu], line, sizeof(line))) {
        say("sluice-stall: vCPU %u lost the connection to Sluice\n", vcpu);
        close(vcpu_fd[vcpu]);
        vcpu_fd[vcpu] = -1;
        return;
    }
    /* line == "GO": resume; tell Sluice when this vCPU really runs on. */
    n = snprintf(line, sizeof(line), "LEFT %u %" PRIx64 " ", vcpu, addr);
    n += (int)put_counts(line + n, sizeof(line) - (size_t)n - 1);
    line[n++] = '\n';
    (void)write_all(vcpu_fd[vcpu], line, (size_t)n);
}

static void on_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    (void)id;
    if (progress) {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_tb_exec, QEMU_PLUGIN_CB_NO_REGS, NULL);
    }
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t va = qemu_plugin_insn_vaddr(insn);
        if (watched(va)) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_hit, QEMU_PLUGIN_CB_NO_REGS,
                                                   (void *)(uintptr_t)va);
        }
    }
}

static bool handshake(void)
{
    char line[256];
    int n;
    ctrl_fd = connect_sock();
    if (ctrl_fd < 0) {
        say("sluice-stall: cannot connect to %s: %s\n", sock_path, strerror(errno));
        return false;
    }
    n = snprintf(line, sizeof(line), "HELLO 1 %d\n", max_vcpus);
    if (!write_all(ctrl_fd, line, (size_t)n)) {
        return false;
    }
    for (;;) {
        if (!read_line(ctrl_fd, line, sizeof(line))) {
            say("sluice-stall: Sluice closed the control connection during the handshake\n");
            return false;
        }
        if (strcmp(line, "END") == 0) {
            break;
        }
        if (strncmp(line, "WATCH ", 6) == 0 && n_watch < MAX_WATCH) {
            watch[n_watch++] = strtoull(line + 6, NULL, 16);
            continue;
        }
        say("sluice-stall: bad line from Sluice: %s\n", line);
        return false;
    }
    qsort(watch, n_watch, sizeof(uint64_t), cmp_u64);
    return true;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    bool have_sock = false;
    if (!info->system_emulation) {
        say("sluice-stall: system emulation only\n");
        return -1;
    }
    for (int i = 0; i < argc; i++) {
        const char *eq = strchr(argv[i], '=');
        if (eq && strncmp(argv[i], "sock", (size_t)(eq - argv[i])) == 0 && eq - argv[i] == 4) {
            if (strlen(eq + 1) >= sizeof(sock_path)) {
                say("sluice-stall: socket path too long\n");
                return -1;
            }
            strcpy(sock_path, eq + 1);
            have_sock = true;
        } else if (eq && eq - argv[i] == 8 && strncmp(argv[i], "progress", 8) == 0) {
            if (!qemu_plugin_bool_parse("progress", eq + 1, &progress)) {
                say("sluice-stall: progress= takes on|off\n");
                return -1;
            }
        } else {
            say("sluice-stall: unknown argument (valid: sock=PATH, progress=on|off)\n");
            return -1;
        }
    }
    if (!have_sock) {
        say("sluice-stall: sock=PATH is required\n");
        return -1;
    }
    max_vcpus = info->system.max_vcpus > 0 ? info->system.max_vcpus : 1;
    vcpu_fd = calloc((size_t)max_vcpus, sizeof(int));
    tb_count = calloc((size_t)max_vcpus, sizeof(uint64_t));
    if (!vcpu_fd || !tb_count) {
        return -1;
    }
    for (int i = 0; i < max_vcpus; i++) {
        vcpu_fd[i] = -1;
    }
    if (!handshake()) {
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_trans);
    return 0;
}
