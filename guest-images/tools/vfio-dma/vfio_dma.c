// SPDX-License-Identifier: Apache-2.0
/*
 * vfio-dma: takes Sluice's DMA engine (PCI 5c1c:0002) away from its kernel driver, hands it to
 * userspace through VFIO (type1), runs DMAs into a user buffer, and gives it back, writing a
 * marker line at every ownership step so Sluice's timeline shows what userspace believes it
 * owns and when.
 *
 *   vfio-dma BDF [--loops N] [--len N] [--iova X] [--hold STEP:MS]... [--keep]
 *                [--remove-at STEP[:MS]]
 *
 * Steps, in order (each marked "own <step> <bdf>"): unbind, bind-vfio, open-group,
 * set-container (the kernel's claim of the group for userspace happens here), set-iommu,
 * get-device, map, user-dma (per loop), unmap, close-device, unset-container, close-group,
 * rebind (skipped with --keep). --hold STEP:MS sleeps MS milliseconds after STEP (repeatable).
 * --remove-at STEP:MS removes the function (its sysfs "remove") from a child process MS ms after
 * STEP, marked "own remove-begin" and "own remove-done", while this program carries on: a removal
 * that finds the device open waits in vfio-pci until the device fd is closed. From the removal
 * on, a failing step is reported ("... after removal") and the program tears down what it holds
 * (device, container, group) instead of stopping there.
 * Exit status 0 when every DMA completed with the expected data (with --remove-at: every DMA
 * issued before a step failed), 1 otherwise, 2 on usage errors.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>

#define R_SRC 0x08
#define R_DST 0x10
#define R_LEN 0x18
#define R_FLAGS 0x1c
#define R_PATTERN 0x20
#define R_DOORBELL 0x24
#define R_STATUS 0x28
#define R_DONE 0x2c
#define FLAG_FILL 0x2
#define MAX_HOLDS 16

static const char *bdf;
static char marker_path[PATH_MAX];
static struct { char step[32]; unsigned ms; } holds[MAX_HOLDS];
static int nholds;
static char remove_step[32];
static unsigned remove_ms;
static pid_t remover = -1;
/* What a failing step must tear down once the removal has begun. */
static int fd_container = -1, fd_group = -1, fd_device = -1;
static int container_set;
static unsigned dmas_ok, dmas_failed;

static void start_removal(void);

/*
 * Sends one marker line (ending in a newline) to Sluice: through the marker device, or, when
 * there is none (s390: no I/O space, and a memory BAR's sysfs resource file cannot be written),
 * as a "SLUICE-MARK: " line on the console, which Sluice reads live.
 */
static void emit_marker(const char *line, int n)
{
	int fd;

	if (n <= 0 || n >= 160)
		return;
	if (!marker_path[0]) {
		char out[200];
		int m = snprintf(out, sizeof(out), "SLUICE-MARK: %s", line);

		fd = open("/dev/console", O_WRONLY | O_NOCTTY);
		if (fd < 0)
			return;
		if (m > 0 && write(fd, out, (size_t)m) != m)
			perror("vfio-dma: console marker");
		close(fd);
		return;
	}
	fd = open(marker_path, O_WRONLY);
	if (fd < 0)
		return;
	/* sysfs resource files of an I/O BAR take 1-, 2- or 4-byte accesses; the marker device
	 * appends every byte written at any offset, so write the line a byte at a time. */
	for (int i = 0; i < n; i++) {
		if (pwrite(fd, &line[i], 1, 0) != 1) {
			perror("vfio-dma: marker write");
			break;
		}
	}
	close(fd);
}

/* Appends "own STEP BDF" to Sluice's timeline. */
static void write_marker(const char *step)
{
	char line[160];

	emit_marker(line, snprintf(line, sizeof(line), "own %s %s\n", step, bdf));
}

/* A step is done: say so on stdout and to the marker device, start the removal if it is due
 * here (before any hold at the same step, so it lands inside the hold), then hold. */
static void mark(const char *step)
{
	printf("vfio-dma: %s %s\n", step, bdf);
	fflush(stdout);
	write_marker(step);
	if (remover < 0 && remove_step[0] && strcmp(step, remove_step) == 0)
		start_removal();
	for (int i = 0; i < nholds; i++) {
		if (strcmp(holds[i].step, step) == 0) {
			struct timespec ts = { holds[i].ms / 1000, (long)(holds[i].ms % 1000) * 1000000L };
			nanosleep(&ts, NULL);
		}
	}
}

/* An ownership line for the oracle: "owner BDF user 0xA-0xB" or "owner BDF kernel". */
static void owner_line(const char *who, uint64_t iova, uint64_t size)
{
	char line[160];
	int n;

	if (size)
		n = snprintf(line, sizeof(line), "owner %s %s %#llx-%#llx\n", bdf, who,
			     (unsigned long long)iova, (unsigned long long)(iova + size));
	else
		n = snprintf(line, sizeof(line), "owner %s %s\n", bdf, who);
	emit_marker(line, n);
}

static void find_marker(void)
{
	glob_t g;

	if (glob("/sys/bus/pci/devices/*/vendor", 0, NULL, &g) != 0)
		return;
	for (size_t i = 0; i < g.gl_pathc; i++) {
		char v[16] = { 0 };
		FILE *f = fopen(g.gl_pathv[i], "r");

		if (!f)
			continue;
		if (fgets(v, sizeof(v), f) && strncmp(v, "0x5c1c", 6) == 0) {
			char dir[256], dev[16] = { 0 };
			FILE *d;

			snprintf(dir, sizeof(dir), "%s", g.gl_pathv[i]);
			*strrchr(dir, '/') = 0;
			snprintf(marker_path, sizeof(marker_path), "%s/device", dir);
			d = fopen(marker_path, "r");
			marker_path[0] = 0;
			if (d && fgets(dev, sizeof(dev), d) && strncmp(dev, "0x0001", 6) == 0)
				snprintf(marker_path, sizeof(marker_path), "%s/resource0", dir);
			if (d)
				fclose(d);
		}
		fclose(f);
		if (marker_path[0])
			break;
	}
	globfree(&g);
}

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY), ok;

	if (fd < 0)
		return -1;
	ok = write(fd, text, strlen(text)) == (ssize_t)strlen(text);
	close(fd);
	return ok ? 0 : -1;
}

/* The remover: sleeps, then writes the function's sysfs "remove" (which returns only when the
 * kernel has released the function: for a device open through VFIO, after its fd is closed). */
static void start_removal(void)
{
	char path[PATH_MAX];
	struct timespec t0, t1;

	fflush(stdout);
	remover = fork();
	if (remover < 0) {
		perror("vfio-dma: fork");
		return;
	}
	if (remover > 0)
		return;
	/* The child must not keep the device open: vfio-pci's remove waits for the last fd. */
	if (fd_device >= 0)
		close(fd_device);
	if (fd_group >= 0)
		close(fd_group);
	if (fd_container >= 0)
		close(fd_container);
	nholds = 0;
	struct timespec ts = { remove_ms / 1000, (long)(remove_ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/remove", bdf);
	remove_step[0] = 0;
	mark("remove-begin");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	int rc = write_file(path, "1");
	int err = errno;
	clock_gettime(CLOCK_MONOTONIC, &t1);
	mark("remove-done");
	printf("vfio-dma: remove %s after %ld ms\n", rc ? strerror(err) : "ok",
	       (long)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000));
	fflush(stdout);
	_exit(rc ? 1 : 0);
}

/* Waits for the remover (if any); returns its exit status, -1 when there was none. */
static int reap_remover(void)
{
	int st;

	if (remover <= 0)
		return -1;
	if (waitpid(remover, &st, 0) != remover)
		return 1;
	remover = 0;
	return WIFEXITED(st) ? WEXITSTATUS(st) : 1;
}

/* Best-effort release of everything still held, each step marked and its result printed. */
static void teardown(void)
{
	if (fd_device >= 0) {
		close(fd_device);
		fd_device = -1;
		mark("close-device");
	}
	if (fd_group >= 0) {
		if (container_set) {
			int rc = ioctl(fd_group, VFIO_GROUP_UNSET_CONTAINER);

			container_set = 0;
			printf("vfio-dma: unset-container %s\n", rc ? strerror(errno) : "ok");
			owner_line("kernel", 0, 0);
			mark("unset-container");
		}
		close(fd_group);
		fd_group = -1;
	}
	if (fd_container >= 0) {
		close(fd_container);
		fd_container = -1;
	}
	mark("close-group");
}

/* A step failed (WHY says how). Before any removal that ends the program; once the removal has
 * begun it is part of what is observed: report it, release what is held, and wait for the
 * remover. */
static void stop(const char *what, const char *why)
{
	if (remover < 0) {
		fprintf(stderr, "vfio-dma: %s: %s\n", what, why);
		exit(1);
	}
	printf("vfio-dma: %s failed after removal: %s\n", what, why);
	teardown();
	int rrc = reap_remover();
	printf("vfio-dma: REMOVED %u DMAs ok, %u failed, remover rc=%d\n", dmas_ok, dmas_failed, rrc);
	exit(dmas_failed || rrc ? 1 : 0);
}

static void die(const char *what)
{
	stop(what, strerror(errno));
}

int main(int argc, char **argv)
{
	unsigned loops = 4, len = 4096, keep = 0;
	unsigned long long iova = 0x100000;
	char path[PATH_MAX], link[PATH_MAX];
	int container, group, device;

	if (argc < 2) {
		fprintf(stderr, "usage: vfio-dma BDF [--loops N] [--len N] [--iova X] [--hold STEP:MS]... [--keep]\n");
		return 2;
	}
	bdf = argv[1];
	for (int i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "--loops") && i + 1 < argc)
			loops = (unsigned)strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--len") && i + 1 < argc)
			len = (unsigned)strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--iova") && i + 1 < argc)
			iova = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--keep"))
			keep = 1;
		else if (!strcmp(argv[i], "--hold") && i + 1 < argc && nholds < MAX_HOLDS) {
			char *colon = strchr(argv[++i], ':');

			if (!colon || colon - argv[i] >= (long)sizeof(holds[0].step))
				return 2;
			memcpy(holds[nholds].step, argv[i], (size_t)(colon - argv[i]));
			holds[nholds++].ms = (unsigned)strtoul(colon + 1, NULL, 0);
		} else if (!strcmp(argv[i], "--remove-at") && i + 1 < argc) {
			char *colon = strchr(argv[++i], ':');
			size_t n = colon ? (size_t)(colon - argv[i]) : strlen(argv[i]);

			if (n == 0 || n >= sizeof(remove_step))
				return 2;
			memcpy(remove_step, argv[i], n);
			remove_ms = colon ? (unsigned)strtoul(colon + 1, NULL, 0) : 0;
		} else {
			fprintf(stderr, "vfio-dma: bad argument %s\n", argv[i]);
			return 2;
		}
	}
	if (len == 0 || len > (1u << 20) || (len & 4095)) {
		fprintf(stderr, "vfio-dma: --len must be a multiple of 4096 up to 1 MiB\n");
		return 2;
	}
	find_marker();

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver/unbind", bdf);
	write_file(path, bdf);	/* no driver bound is fine */
	mark("unbind");
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", bdf);
	if (write_file(path, "vfio-pci"))
		die("driver_override");
	if (write_file("/sys/bus/pci/drivers_probe", bdf))
		die("drivers_probe");
	mark("bind-vfio");

	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		die("iommu_group (is the device behind an IOMMU?)");
	link[n] = 0;
	snprintf(path, sizeof(path), "/dev/vfio/%s", strrchr(link, '/') + 1);
	container = fd_container = open("/dev/vfio/vfio", O_RDWR);
	if (container < 0)
		die("/dev/vfio/vfio");
	if (ioctl(container, VFIO_GET_API_VERSION) != VFIO_API_VERSION ||
	    !ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU)) {
		stop("VFIO_CHECK_EXTENSION", "no VFIO type1 support");
	}
	group = fd_group = open(path, O_RDWR);
	if (group < 0)
		die(path);
	mark("open-group");
	struct vfio_group_status gs = { .argsz = sizeof(gs) };
	if (ioctl(group, VFIO_GROUP_GET_STATUS, &gs))
		die("VFIO_GROUP_GET_STATUS");
	if (!(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
		stop("VFIO_GROUP_GET_STATUS", "group not viable");
	if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
		die("VFIO_GROUP_SET_CONTAINER");
	container_set = 1;
	/* From the claim on, only the window userspace maps is legitimate for this device: tell the
	 * oracle (docs/escape-oracle.md, "owner EP user RANGES"). */
	owner_line("user", iova, (uint64_t)len * 2);
	mark("set-container");
	if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU))
		die("VFIO_SET_IOMMU");
	mark("set-iommu");
	device = fd_device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
	if (device < 0)
		die("VFIO_GROUP_GET_DEVICE_FD");
	mark("get-device");

	uint8_t *buf = mmap(NULL, (size_t)len * 2, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		die("mmap");
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)buf, .iova = iova, .size = (uint64_t)len * 2,
	};
	if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map))
		die("VFIO_IOMMU_MAP_DMA");
	mark("map");

	struct vfio_region_info cfg = { .argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX };
	struct vfio_region_info bar = { .argsz = sizeof(bar), .index = VFIO_PCI_BAR0_REGION_INDEX };
	if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &cfg) ||
	    ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &bar))
		die("VFIO_DEVICE_GET_REGION_INFO");
	/* VFIO regions hold the device's bytes: PCI is little-endian (s390x is not). */
	uint16_t cmd, cmd_le;
	if (pread(device, &cmd_le, 2, (off_t)cfg.offset + 4) != 2)
		die("read command");
	cmd = le16toh(cmd_le);
	cmd |= 0x6;	/* memory space + bus master */
	cmd_le = htole16(cmd);
	if (pwrite(device, &cmd_le, 2, (off_t)cfg.offset + 4) != 2)
		die("write command");
#define REG(off, v) do { uint32_t x_ = htole32((uint32_t)(v)); \
	if (pwrite(device, &x_, 4, (off_t)bar.offset + (off)) != 4) die("BAR write"); } while (0)
	for (unsigned i = 0; i < loops; i++) {
		uint32_t done0, done1, status;
		uint8_t want = (uint8_t)(0x30 + i);

		memset(buf + len, 0, len);
		if (pread(device, &done0, 4, (off_t)bar.offset + R_DONE) != 4)
			die("BAR read");
		REG(R_DST, iova + len);
		REG(R_DST + 4, (iova + len) >> 32);
		REG(R_LEN, len);
		REG(R_FLAGS, FLAG_FILL);
		REG(R_PATTERN, want);
		REG(R_DOORBELL, 1);
		if (pread(device, &done1, 4, (off_t)bar.offset + R_DONE) != 4 ||
		    pread(device, &status, 4, (off_t)bar.offset + R_STATUS) != 4)
			die("BAR read");
		done0 = le32toh(done0);
		done1 = le32toh(done1);
		status = le32toh(status);
		int ok = done1 != done0 && status == 0;
		for (unsigned j = 0; ok && j < len; j++)
			ok = buf[len + j] == want;
		printf("vfio-dma: user-dma %u status %u %s\n", i, status, ok ? "ok" : "FAILED");
		if (ok)
			dmas_ok++;
		else
			dmas_failed++;
		mark("user-dma");
	}
	cmd &= (uint16_t)~0x4;
	cmd_le = htole16(cmd);
	if (pwrite(device, &cmd_le, 2, (off_t)cfg.offset + 4) != 2)
		die("write command");

	struct vfio_iommu_type1_dma_unmap unmap = {
		.argsz = sizeof(unmap), .iova = iova, .size = (uint64_t)len * 2,
	};
	if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap))
		die("VFIO_IOMMU_UNMAP_DMA");
	mark("unmap");
	close(device);
	fd_device = -1;
	mark("close-device");
	container_set = 0;
	if (ioctl(group, VFIO_GROUP_UNSET_CONTAINER)) {
		owner_line("kernel", 0, 0);
		die("VFIO_GROUP_UNSET_CONTAINER");
	}
	owner_line("kernel", 0, 0);
	mark("unset-container");
	close(group);
	fd_group = -1;
	close(container);
	fd_container = -1;
	mark("close-group");
	if (remover >= 0) {
		int rrc = reap_remover();

		printf("vfio-dma: REMOVED %u DMAs ok, %u failed, remover rc=%d\n", dmas_ok,
		       dmas_failed, rrc);
		return dmas_failed || rrc ? 1 : 0;
	}
	if (!keep) {
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver/unbind", bdf);
		write_file(path, bdf);
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", bdf);
		write_file(path, "\n");
		write_file("/sys/bus/pci/drivers_probe", bdf);
		mark("rebind");
	}
	printf("vfio-dma: %s %u DMAs, %u failed\n", dmas_failed ? "FAIL" : "PASS", loops, dmas_failed);
	return dmas_failed ? 1 : 0;
}
