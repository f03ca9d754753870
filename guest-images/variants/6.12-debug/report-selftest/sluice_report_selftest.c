// SPDX-License-Identifier: GPL-2.0
/*
 * sluice_report_selftest: makes each checker of the *-debug guest kernels report once, so that
 * run.sh can check that every report reaches the serial console with its first line intact.
 * Never load it into a guest whose report is a test result: it taints the log on purpose.
 *
 * In order (lockdep switches itself off after its first report, KASAN goes on reporting):
 *   1. WARN_ON            ------------[ cut here ]------------
 *   2. might_sleep() under a spinlock
 *                         BUG: sleeping function called from invalid context
 *   3. A->B then B->A     WARNING: possible circular locking dependency detected
 *   4. use after kfree()  BUG: KASAN: slab-use-after-free (6.1: BUG: KASAN: use-after-free)
 *   5. timer freed while active (DEBUG_OBJECTS)
 *                         ODEBUG: free active (active state 0) object: ... object type: timer_list
 */
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/mutex.h>
#include <linux/timer.h>
#include <linux/jiffies.h>

static DEFINE_SPINLOCK(selftest_spin);
static DEFINE_MUTEX(selftest_a);
static DEFINE_MUTEX(selftest_b);

struct selftest_timer {
	struct timer_list t;
};

static void selftest_timer_fn(struct timer_list *t)
{
}

static noinline void selftest_uaf(void)
{
	char *p = kmalloc(64, GFP_KERNEL);

	if (!p)
		return;
	kfree(p);
	OPTIMIZER_HIDE_VAR(p);
	pr_info("sluice_report_selftest: read after free: %d\n", READ_ONCE(p[8]));
}

static int __init selftest_init(void)
{
	struct selftest_timer *st;

	pr_info("sluice_report_selftest: 1 WARN_ON\n");
	WARN_ON(1);

	pr_info("sluice_report_selftest: 2 might_sleep under a spinlock\n");
	spin_lock(&selftest_spin);
	might_sleep();
	spin_unlock(&selftest_spin);

	pr_info("sluice_report_selftest: 3 lock order A->B then B->A\n");
	mutex_lock(&selftest_a);
	mutex_lock(&selftest_b);
	mutex_unlock(&selftest_b);
	mutex_unlock(&selftest_a);
	mutex_lock(&selftest_b);
	mutex_lock(&selftest_a);
	mutex_unlock(&selftest_a);
	mutex_unlock(&selftest_b);

	pr_info("sluice_report_selftest: 4 use after free\n");
	selftest_uaf();

	pr_info("sluice_report_selftest: 5 active timer freed\n");
	st = kmalloc(sizeof(*st), GFP_KERNEL);
	if (st) {
		timer_setup(&st->t, selftest_timer_fn, 0);
		mod_timer(&st->t, jiffies + 3600 * HZ);
		kfree(st);	/* ODEBUG reports and deactivates the timer */
	}

	pr_info("sluice_report_selftest: done\n");
	return 0;
}

static void __exit selftest_exit(void)
{
}

module_init(selftest_init);
module_exit(selftest_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Sluice: trigger one report of each debug checker");
