//! The timeline's writer side: draining the bounded queue into JSON lines, the ring of recent
//! events, and the escapes kept in full with what preceded them.

use std::collections::{HashMap, VecDeque};
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Oracle, lock};
use crate::report::EscapeReport;
use crate::timeline::{DmaEvent, EscapeClass, EventKind, TimelineEvent, Verdict};

/// The writer's state: serialized lines, the context ring, escapes in full.
#[derive(Default)]
pub(super) struct Drain {
    pub(super) out: Vec<u8>,
    pub(super) events: u64,
    pub(super) over_budget: u64,
    ring: VecDeque<TimelineEvent>,
    threads: HashMap<u32, String>,
    pub(super) escapes: Vec<EscapeReport>,
}

impl Oracle {
    pub(super) fn drain_into(&self, d: &mut Drain) {
        while let Some(ev) = self.queue.pop() {
            self.handle_drained(d, ev);
        }
    }

    fn handle_drained(&self, d: &mut Drain, ev: TimelineEvent) {
        if d.out.len() < self.cfg.max_timeline_bytes {
            write_line(&mut d.out, &ev);
            d.events += 1;
        } else {
            d.over_budget += 1;
        }
        match &ev.kind {
            EventKind::Thread { name } => {
                d.threads.insert(ev.tid, name.clone());
                return;
            }
            EventKind::Meta { .. } | EventKind::Summary(_) => return,
            EventKind::Dma(dma) if dma.sampled.is_some() => return,
            EventKind::Dma(dma)
                if dma.verdict == Verdict::Escape
                    && d.escapes.len() < self.cfg.max_escape_reports =>
            {
                let rep = escape_report(&ev, dma, d);
                d.escapes.push(rep);
            }
            _ => {}
        }
        if self.cfg.context_events > 0 {
            if d.ring.len() >= self.cfg.context_events {
                d.ring.pop_front();
            }
            d.ring.push_back(ev);
        }
    }
}

fn escape_report(ev: &TimelineEvent, dma: &DmaEvent, d: &Drain) -> EscapeReport {
    let reached = dma.outcome != "faulted";
    EscapeReport {
        class: dma.class.unwrap_or(EscapeClass::StaleConfig),
        endpoint: dma.endpoint.clone(),
        iova: dma.iova,
        gpa: match dma.outcome.as_str() {
            "translated" => dma.gpa,
            "bypassed" | "direct" => Some(dma.iova),
            _ => None,
        },
        len: dma.len,
        direction: dma.dir.clone(),
        outcome: dma.outcome.clone(),
        reached_memory: reached,
        t_ns: ev.t,
        thread: d
            .threads
            .get(&ev.tid)
            .cloned()
            .unwrap_or_else(|| format!("tid {}", ev.tid)),
        message: dma.message.clone().unwrap_or_default(),
        preceding: preceding(dma, d),
    }
}

/// The events kept before an escape, with the invalidation it contradicts in its place by time
/// when that one is older than the ring.
fn preceding(dma: &DmaEvent, d: &Drain) -> Vec<TimelineEvent> {
    let mut out: Vec<TimelineEvent> = d.ring.iter().cloned().collect();
    if let Some(cause) = &dma.cause
        && !out.contains(cause)
    {
        let at = out.partition_point(|e| e.t <= cause.t);
        out.insert(at, (**cause).clone());
    }
    out
}

pub(super) fn write_line(out: &mut Vec<u8>, ev: &TimelineEvent) {
    if serde_json::to_writer(&mut *out, ev).is_ok() {
        out.push(b'\n');
    }
}

pub(super) fn writer_loop(weak: Weak<Oracle>) {
    loop {
        let Some(o) = weak.upgrade() else { return };
        {
            let mut d = lock(&o.drain);
            o.drain_into(&mut d);
        }
        if o.stop.load(Ordering::Acquire) {
            return;
        }
        drop(o);
        std::thread::park_timeout(Duration::from_millis(10));
    }
}
