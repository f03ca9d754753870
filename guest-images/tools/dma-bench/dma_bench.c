// SPDX-License-Identifier: Apache-2.0
/*
 * dma-bench: timed O_DIRECT reads or writes of a block device from a buffer whose physical
 * layout is chosen, so that every boot makes the same DMA mappings.
 *
 *   dma-bench read|write DEVICE OFFSET_MIB MIB BLOCK_BYTES LAYOUT
 *
 * Why: Linux's virtio ring maps every scatter-gather segment of a request on its own, and the
 * block layer merges physically adjacent pages into one segment. A 1 MiB request from dd's
 * malloc'd buffer therefore costs 1 to 256 IOMMU mappings depending on where the guest's page
 * allocator happened to put the buffer in that boot (measured: benchmark rows were bimodal by
 * boot). LAYOUT fixes it:
 *   scattered   no two pages of the buffer physically adjacent: one segment per page
 *   contiguous  the buffer is one physically contiguous run: one segment per request
 *   any         whatever the allocator gives (what dd does)
 * The chosen pages are found through /proc/self/pagemap (needs root) in a pool of anonymous
 * pages and moved into place with mremap, which keeps the physical page. The layout is read
 * back after the transfer too, and the run fails if it changed.
 *
 * Prints one line: "moved=BYTES ns=ELAPSED segments=N" (N: physically contiguous runs in the
 * buffer). Exit 0 when every block moved, 1 on a failure (said on stderr), 2 on usage errors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PFN_MASK ((UINT64_C(1) << 55) - 1)
#define PAGE_PRESENT (UINT64_C(1) << 63)
/* The pool grows to this many times the buffer before a layout is declared unavailable. */
#define POOL_GROWTH_LIMIT 64

enum layout { LAYOUT_ANY, LAYOUT_SCATTERED, LAYOUT_CONTIGUOUS };

static size_t page_size;

static int fail(const char *what)
{
	fprintf(stderr, "dma-bench: %s: %s\n", what, strerror(errno));
	return -1;
}

/* The page frame numbers of `pages` pages from `addr`; -1 when one is absent or hidden. */
static int read_pfns(int pagemap, const void *addr, size_t pages, uint64_t *pfns)
{
	off_t at = (off_t)((uintptr_t)addr / page_size * sizeof(uint64_t));
	size_t want = pages * sizeof(uint64_t);
	ssize_t got = pread(pagemap, pfns, want, at);
	if (got != (ssize_t)want)
		return fail("reading /proc/self/pagemap");
	for (size_t i = 0; i < pages; i++) {
		if (!(pfns[i] & PAGE_PRESENT) || !(pfns[i] & PFN_MASK)) {
			fprintf(stderr, "dma-bench: pagemap gives no frame number (not root?)\n");
			return -1;
		}
		pfns[i] &= PFN_MASK;
	}
	return 0;
}

static size_t count_segments(const uint64_t *pfns, size_t pages)
{
	size_t runs = pages ? 1 : 0;
	for (size_t i = 1; i < pages; i++)
		runs += pfns[i] != pfns[i - 1] + 1;
	return runs;
}

struct pool_page {
	uint64_t pfn;
	size_t index;
};

static int by_pfn(const void *a, const void *b)
{
	uint64_t x = ((const struct pool_page *)a)->pfn, y = ((const struct pool_page *)b)->pfn;
	return (x > y) - (x < y);
}

/*
 * Picks `pages` pool pages for the layout, in the order they are to appear in the buffer;
 * 0 when found. Scattered: ascending frames with a gap after each. Contiguous: a run.
 */
static int pick(struct pool_page *pool, size_t n, size_t pages, enum layout layout, size_t *chosen)
{
	qsort(pool, n, sizeof(*pool), by_pfn);
	if (layout == LAYOUT_SCATTERED) {
		size_t k = 0;
		for (size_t i = 0; i < n && k < pages; i++)
			if (k == 0 || pool[i].pfn > pool[chosen[k - 1]].pfn + 1)
				chosen[k++] = i;
		for (size_t i = 0; i < k; i++)
			chosen[i] = pool[chosen[i]].index;
		return k == pages ? 0 : -1;
	}
	size_t start = 0;
	for (size_t i = 1; i <= n; i++) {
		if (i - start == pages) {
			for (size_t j = 0; j < pages; j++)
				chosen[j] = pool[start + j].index;
			return 0;
		}
		if (i < n && pool[i].pfn != pool[i - 1].pfn + 1)
			start = i;
	}
	return -1;
}

/* A buffer of `pages` pages laid out as asked; NULL on failure (said on stderr). */
static void *laid_out_buffer(int pagemap, size_t pages, enum layout layout)
{
	size_t len = pages * page_size;
	void *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED) {
		fail("mmap buffer");
		return NULL;
	}
	if (layout == LAYOUT_ANY || pages == 1) {
		memset(buf, 0, len);
		return buf;
	}
	size_t *chosen = calloc(pages, sizeof(*chosen));
	if (!chosen) {
		fail("calloc");
		return NULL;
	}
	for (size_t growth = 2; growth <= POOL_GROWTH_LIMIT; growth *= 2) {
		size_t n = pages * growth;
		char *pool = mmap(NULL, n * page_size, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		struct pool_page *pp = calloc(n, sizeof(*pp));
		uint64_t *pfns = calloc(n, sizeof(*pfns));
		if (pool == MAP_FAILED || !pp || !pfns) {
			fail("allocating the page pool");
			return NULL;
		}
		/* touched in address order: what a fresh buffer gets from the allocator */
		for (size_t i = 0; i < n; i++)
			pool[i * page_size] = 0;
		if (read_pfns(pagemap, pool, n, pfns))
			return NULL;
		for (size_t i = 0; i < n; i++)
			pp[i] = (struct pool_page){ .pfn = pfns[i], .index = i };
		int found = pick(pp, n, pages, layout, chosen) == 0;
		for (size_t i = 0; found && i < pages; i++) {
			void *to = (char *)buf + i * page_size;
			if (mremap(pool + chosen[i] * page_size, page_size, page_size,
				   MREMAP_MAYMOVE | MREMAP_FIXED, to) != to) {
				fail("mremap a pool page into the buffer");
				return NULL;
			}
		}
		/* the pages not taken go back to the allocator */
		munmap(pool, n * page_size);
		free(pp);
		free(pfns);
		if (found) {
			free(chosen);
			return buf;
		}
	}
	fprintf(stderr, "dma-bench: no %s layout of %zu pages in a pool of %d times that\n",
		layout == LAYOUT_SCATTERED ? "scattered" : "contiguous", pages, POOL_GROWTH_LIMIT);
	return NULL;
}

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int usage(void)
{
	fprintf(stderr, "usage: dma-bench read|write DEVICE OFFSET_MIB MIB BLOCK_BYTES "
			"scattered|contiguous|any\n");
	return 2;
}

static int parse_size(const char *s, size_t *out)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s || *end || v > SIZE_MAX / 2)
		return -1;
	*out = (size_t)v;
	return 0;
}

int main(int argc, char **argv)
{
	size_t offset_mib, mib, block;
	enum layout layout;
	if (argc != 7 || parse_size(argv[3], &offset_mib) || parse_size(argv[4], &mib) ||
	    parse_size(argv[5], &block))
		return usage();
	int writing = !strcmp(argv[1], "write");
	if (!writing && strcmp(argv[1], "read"))
		return usage();
	if (!strcmp(argv[6], "scattered"))
		layout = LAYOUT_SCATTERED;
	else if (!strcmp(argv[6], "contiguous"))
		layout = LAYOUT_CONTIGUOUS;
	else if (!strcmp(argv[6], "any"))
		layout = LAYOUT_ANY;
	else
		return usage();
	page_size = (size_t)sysconf(_SC_PAGESIZE);
	if (!block || block % page_size || !mib || (mib << 20) % block) {
		fprintf(stderr, "dma-bench: BLOCK_BYTES must be whole pages and divide MIB MiB\n");
		return 2;
	}
	size_t pages = block / page_size, blocks = (mib << 20) / block;

	int pagemap = open("/proc/self/pagemap", O_RDONLY);
	if (pagemap < 0)
		return fail("open /proc/self/pagemap"), 1;
	char *buf = laid_out_buffer(pagemap, pages, layout);
	uint64_t *before = calloc(pages, sizeof(*before)), *after = calloc(pages, sizeof(*after));
	if (!buf || !before || !after || read_pfns(pagemap, buf, pages, before))
		return 1;
	size_t segments = count_segments(before, pages);
	if ((layout == LAYOUT_SCATTERED && segments != pages) ||
	    (layout == LAYOUT_CONTIGUOUS && segments != 1)) {
		fprintf(stderr, "dma-bench: the buffer has %zu segments, not the layout's\n", segments);
		return 1;
	}

	int fd = open(argv[2], (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0)
		return fail(argv[2]), 1;
	off_t at = (off_t)(offset_mib << 20);
	uint64_t moved = 0, start = now_ns();
	for (size_t i = 0; i < blocks; i++, at += (off_t)block) {
		ssize_t n = writing ? pwrite(fd, buf, block, at) : pread(fd, buf, block, at);
		if (n < 0)
			return fail(writing ? "pwrite" : "pread"), 1;
		moved += (uint64_t)n;
		if ((size_t)n != block)
			break; /* the end of the device: reported as a short run */
	}
	uint64_t elapsed = now_ns() - start;
	close(fd);

	if (read_pfns(pagemap, buf, pages, after))
		return 1;
	if (memcmp(before, after, pages * sizeof(*before))) {
		fprintf(stderr, "dma-bench: the buffer's pages moved during the run\n");
		return 1;
	}
	printf("moved=%" PRIu64 " ns=%" PRIu64 " segments=%zu\n", moved, elapsed, segments);
	return moved == (uint64_t)blocks * block ? 0 : 1;
}
