// SPDX-License-Identifier: GPL-2.0
/*
 * sluice_dma: drives Sluice's DMA engine (PCI 5c1c:0002, devices/dma-engine) through the
 * kernel's DMA API, so the kernel's own IOMMU domain for the device holds live mappings:
 *
 *  - one coherent buffer stays mapped for as long as the driver is bound (its IOVA is printed
 *    as "sluice_dma: kernel-iova 0x..." so a scenario can aim a rogue DMA at it);
 *  - worker threads, one per online CPU up to `threads`, each run `loops` operations: map two
 *    streaming buffers, program a copy, ring the doorbell, poll for completion, check the data,
 *    unmap. The engine has one register file, so the threads take turns on it (a mutex); their
 *    mappings overlap in time, which is what matters to the IOMMU.
 *
 * Parameters: loops (per thread, default 32), len (bytes per copy, default 4096, at most 64 KiB),
 * threads (default 2), pause_ms (between operations, default 0).
 * Results go to the kernel log: "sluice_dma: <bdf> done ops=N errors=M".
 */
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/dma-mapping.h>
#include <linux/kthread.h>
#include <linux/delay.h>
#include <linux/slab.h>
#include <linux/mutex.h>
#include <linux/io.h>

#define SDMA_VENDOR 0x5c1c
#define SDMA_DEVICE 0x0002

/* Register offsets (devices/dma-engine/src/regs.rs). */
#define R_MAGIC   0x00
#define R_SRC     0x08
#define R_DST     0x10
#define R_LEN     0x18
#define R_FLAGS   0x1c
#define R_PATTERN 0x20
#define R_DOORBELL 0x24
#define R_STATUS  0x28
#define R_DONE    0x2c
#define SDMA_MAGIC 0x414d4453u
#define SDMA_MAX_LEN (64u * 1024)
#define SDMA_MAX_THREADS 8

static unsigned int loops = 32;
module_param(loops, uint, 0444);
static unsigned int len = 4096;
module_param(len, uint, 0444);
static unsigned int threads = 2;
module_param(threads, uint, 0444);
static unsigned int pause_ms;
module_param(pause_ms, uint, 0444);

struct sdma {
	struct pci_dev *pdev;
	void __iomem *regs;
	struct mutex lock;		/* one operation at a time on the register file */
	void *coherent;
	dma_addr_t coherent_iova;
	struct task_struct *workers[SDMA_MAX_THREADS];
	int nworkers;
	atomic_t ops, errors, running;
};

static void sdma_w64(struct sdma *s, unsigned int off, u64 v)
{
	writel(lower_32_bits(v), s->regs + off);
	writel(upper_32_bits(v), s->regs + off + 4);
}

/* One copy src -> dst of n bytes, polled to completion. Returns the engine's status, or -1. */
static int sdma_copy(struct sdma *s, dma_addr_t src, dma_addr_t dst, u32 n)
{
	u32 done, status;
	int i;

	mutex_lock(&s->lock);
	done = readl(s->regs + R_DONE);
	sdma_w64(s, R_SRC, src);
	sdma_w64(s, R_DST, dst);
	writel(n, s->regs + R_LEN);
	writel(0, s->regs + R_FLAGS);
	writel(1, s->regs + R_DOORBELL);
	/* The doorbell runs the copy synchronously; poll anyway, bounded, as a real driver would. */
	for (i = 0; i < 1000 && readl(s->regs + R_DONE) == done; i++)
		usleep_range(100, 200);
	status = readl(s->regs + R_DONE) == done ? (u32)-1 : readl(s->regs + R_STATUS);
	mutex_unlock(&s->lock);
	return (int)status;
}

static int sdma_worker(void *arg)
{
	struct sdma *s = arg;
	struct device *dev = &s->pdev->dev;
	u8 *a = kmalloc(len, GFP_KERNEL), *b = kmalloc(len, GFP_KERNEL);
	unsigned int i;

	if (!a || !b)
		goto out;
	for (i = 0; i < loops && !kthread_should_stop(); i++) {
		dma_addr_t ia, ib;
		int st;

		memset(a, (int)(i + smp_processor_id()) & 0xff, len);
		memset(b, 0, len);
		ia = dma_map_single(dev, a, len, DMA_TO_DEVICE);
		if (dma_mapping_error(dev, ia)) {
			atomic_inc(&s->errors);
			continue;
		}
		ib = dma_map_single(dev, b, len, DMA_FROM_DEVICE);
		if (dma_mapping_error(dev, ib)) {
			dma_unmap_single(dev, ia, len, DMA_TO_DEVICE);
			atomic_inc(&s->errors);
			continue;
		}
		st = sdma_copy(s, ia, ib, len);
		dma_unmap_single(dev, ib, len, DMA_FROM_DEVICE);
		dma_unmap_single(dev, ia, len, DMA_TO_DEVICE);
		if (st != 0 || memcmp(a, b, len)) {
			atomic_inc(&s->errors);
			dev_warn(dev, "sluice_dma: op %u status %d%s\n", i, st,
				 st == 0 ? " (data mismatch)" : "");
		}
		atomic_inc(&s->ops);
		if (pause_ms)
			msleep(pause_ms);
	}
out:
	kfree(a);
	kfree(b);
	if (atomic_dec_and_test(&s->running))
		dev_info(dev, "sluice_dma: %s done ops=%d errors=%d\n", pci_name(s->pdev),
			 atomic_read(&s->ops), atomic_read(&s->errors));
	/* kthread_stop() may still be called on us: wait for it rather than exit early. */
	while (!kthread_should_stop())
		msleep(20);
	return 0;
}

static int sdma_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct sdma *s;
	int err, cpu, n = 0;

	if (len == 0 || len > SDMA_MAX_LEN || threads == 0 || threads > SDMA_MAX_THREADS)
		return -EINVAL;
	s = devm_kzalloc(&pdev->dev, sizeof(*s), GFP_KERNEL);
	if (!s)
		return -ENOMEM;
	s->pdev = pdev;
	mutex_init(&s->lock);
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = pcim_iomap_regions(pdev, BIT(0), "sluice_dma");
	if (err)
		return err;
	s->regs = pcim_iomap_table(pdev)[0];
	if (readl(s->regs + R_MAGIC) != SDMA_MAGIC)
		return -ENODEV;
	err = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (err)
		return err;
	pci_set_master(pdev);
	s->coherent = dma_alloc_coherent(&pdev->dev, PAGE_SIZE, &s->coherent_iova, GFP_KERNEL);
	if (!s->coherent)
		return -ENOMEM;
	memset(s->coherent, 0xc5, PAGE_SIZE);
	pci_set_drvdata(pdev, s);
	dev_info(&pdev->dev, "sluice_dma: kernel-iova %pad\n", &s->coherent_iova);
	atomic_set(&s->running, 1);	/* held until every worker has started */
	for_each_online_cpu(cpu) {
		struct task_struct *t;

		if (n >= threads)
			break;
		t = kthread_create(sdma_worker, s, "sluice_dma/%d", cpu);
		if (IS_ERR(t))
			break;
		kthread_bind(t, cpu);
		atomic_inc(&s->running);
		s->workers[n++] = t;
		wake_up_process(t);
	}
	s->nworkers = n;
	if (atomic_dec_and_test(&s->running))
		dev_info(&pdev->dev, "sluice_dma: %s done ops=0 errors=0\n", pci_name(pdev));
	return 0;
}

static void sdma_remove(struct pci_dev *pdev)
{
	struct sdma *s = pci_get_drvdata(pdev);
	int i;

	for (i = 0; i < s->nworkers; i++)
		kthread_stop(s->workers[i]);
	dma_free_coherent(&pdev->dev, PAGE_SIZE, s->coherent, s->coherent_iova);
	pci_clear_master(pdev);
	dev_info(&pdev->dev, "sluice_dma: %s released\n", pci_name(pdev));
}

static const struct pci_device_id sdma_ids[] = {
	{ PCI_DEVICE(SDMA_VENDOR, SDMA_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, sdma_ids);

static struct pci_driver sdma_driver = {
	.name = "sluice_dma",
	.id_table = sdma_ids,
	.probe = sdma_probe,
	.remove = sdma_remove,
};
module_pci_driver(sdma_driver);

MODULE_DESCRIPTION("Drives Sluice's DMA test engine through the DMA API");
MODULE_LICENSE("GPL");
