//! The injector: a [`Hooks`] implementation that applies a validated plan.
//!
//! Cost of a point with no rule: one relaxed load of a 64-bit mask (one bit per hash bucket
//! of ruled point names, see [`bucket`]) and a bit test. Only a name whose bucket holds a rule
//! goes on to the exact-name table. The mask is also the kill switch ([`Injector::disarm`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use sluice_devapi::{Endpoint, Hooks, PointCtx};

use crate::delay::Rng;
use crate::plan::{EndpointFilter, Mode};
use crate::registry::{Rule, ValidPlan};

/// One firing: a rule delayed one arrival at its point.
#[derive(Debug, Clone)]
pub struct Firing {
    /// Index of the rule in the plan.
    pub rule: usize,
    /// The rule as written.
    pub rule_text: Arc<str>,
    /// The point.
    pub point: String,
    /// Stall or defer.
    pub mode: Mode,
    /// The delay drawn.
    pub delay: Duration,
    /// Which matching arrival this was for the rule (1-based, counted after its marker).
    pub occurrence: u64,
    /// Endpoint of the arrival.
    pub endpoint: Option<Endpoint>,
    /// Domain of the arrival.
    pub domain: Option<u32>,
    /// The point's value (register value, status; the address for guest.sym).
    pub value: u64,
    /// vCPU (guest.sym points only).
    pub vcpu: Option<u32>,
    /// When the arrival was seen (the delay starts here).
    pub at: Instant,
}

/// Where firings go (the lead wires it to the timeline).
pub type FiringSink = Arc<dyn Fn(&Firing) + Send + Sync>;

/// The mask bucket of a point name: cheap, stable, no hashing of the whole string.
#[inline]
pub fn bucket(name: &str) -> u32 {
    let b = name.as_bytes();
    let n = b.len();
    let last = b.last().copied().unwrap_or(0) as usize;
    let mid = b.get(n / 2).copied().unwrap_or(0) as usize;
    ((n.wrapping_mul(7) ^ last.wrapping_mul(31) ^ mid.wrapping_mul(13)) & 63) as u32
}

#[derive(Debug)]
struct RuleRt {
    seen: u64,
    fired: u64,
    rng: Rng,
}

struct RuleState {
    rule: Rule,
    text: Arc<str>,
    armed: AtomicBool,
    rt: Mutex<RuleRt>,
}

/// Applies a plan at the points models announce, and at guest-code hits the plugin reports.
pub struct Injector {
    mask: AtomicU64,
    armed_mask: u64,
    by_point: HashMap<String, Vec<usize>>,
    rules: Vec<RuleState>,
    sink: RwLock<Option<FiringSink>>,
    markers: Mutex<Vec<String>>,
    warnings: Vec<String>,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("rules", &self.rules.len())
            .field("mask", &self.mask)
            .finish()
    }
}

impl Injector {
    /// An injector for `plan`. Rules with `after=` start disarmed.
    pub fn new(plan: ValidPlan) -> Self {
        let mut by_point: HashMap<String, Vec<usize>> = HashMap::new();
        let mut mask = 0u64;
        let mut rules = Vec::new();
        for (i, rule) in plan.rules.into_iter().enumerate() {
            mask |= 1 << bucket(&rule.spec.point);
            by_point.entry(rule.spec.point.clone()).or_default().push(i);
            rules.push(RuleState {
                text: Arc::from(rule.spec.text.as_str()),
                armed: AtomicBool::new(rule.spec.after.is_none()),
                rt: Mutex::new(RuleRt {
                    seen: 0,
                    fired: 0,
                    rng: Rng::new(plan.seed, rule.index as u64),
                }),
                rule,
            });
        }
        Injector {
            mask: AtomicU64::new(mask),
            armed_mask: mask,
            by_point,
            rules,
            sink: RwLock::new(None),
            markers: Mutex::new(Vec::new()),
            warnings: plan.warnings,
        }
    }

    /// An injector with no rules (every point costs one relaxed load).
    pub fn empty() -> Self {
        Self::new(ValidPlan::default())
    }

    /// Sends every firing to `sink`.
    pub fn set_sink(&self, sink: FiringSink) {
        *self.sink.write().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// The plan's warnings (watchdog budget).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The rules, in plan order.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|r| &r.rule)
    }

    /// Firings so far per rule.
    pub fn fired(&self) -> Vec<u64> {
        self.rules
            .iter()
            .map(|r| r.rt.lock().map(|g| g.fired).unwrap_or(0))
            .collect()
    }

    /// Guest addresses to watch and the point name each stands for.
    pub fn guest_watch(&self) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = self
            .rules
            .iter()
            .filter_map(|r| r.rule.guest_addr.map(|a| (a, r.rule.spec.point.clone())))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// A guest marker was seen (e.g. a `SLUICE: insmod virtio_iommu ...` console line): arms
    /// every rule whose `after=` text it contains.
    pub fn marker(&self, text: &str) {
        for r in &self.rules {
            if let Some(a) = &r.rule.spec.after
                && text.contains(a.as_str())
            {
                r.armed.store(true, Ordering::Release);
            }
        }
        if let Ok(mut m) = self.markers.lock()
            && m.len() < 4096
        {
            m.push(text.to_string());
        }
    }

    /// Markers fed so far.
    pub fn markers(&self) -> Vec<String> {
        self.markers.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Stops injecting (e.g. while the run shuts down); arrivals cost one load again.
    pub fn disarm(&self) {
        self.mask.store(0, Ordering::Relaxed);
    }

    /// Resumes after [`Injector::disarm`].
    pub fn rearm(&self) {
        self.mask.store(self.armed_mask, Ordering::Relaxed);
    }

    /// The fast path: could a rule exist for `point`?
    #[inline]
    fn maybe(&self, point: &str) -> bool {
        let m = self.mask.load(Ordering::Relaxed);
        m != 0 && m & (1 << bucket(point)) != 0
    }

    /// Evaluates every rule of `ctx.point` with mode `mode` for one arrival. Each matching
    /// rule counts the arrival; each that fires is reported; the longest delay is returned.
    pub fn decide(&self, ctx: &PointCtx<'_>, vcpu: Option<u32>, mode: Mode) -> Option<Duration> {
        if !self.maybe(ctx.point) {
            return None;
        }
        let ids = self.by_point.get(ctx.point)?;
        let at = Instant::now();
        let mut best: Option<Duration> = None;
        for &i in ids {
            let Some(r) = self.rules.get(i) else { continue };
            if let Some(f) = r.consider(ctx, vcpu, mode, at) {
                best = best.max(Some(f.delay));
                self.emit(&f);
            }
        }
        best
    }

    fn emit(&self, f: &Firing) {
        log::info!(
            "inject: rule {} `{}` fired at {} ({}, {:?}, arrival {})",
            f.rule,
            f.rule_text,
            f.point,
            f.mode,
            f.delay,
            f.occurrence
        );
        let sink = self.sink.read().ok().and_then(|s| s.clone());
        if let Some(s) = sink {
            s(f);
        }
    }
}

impl RuleState {
    fn matches(&self, ctx: &PointCtx<'_>, vcpu: Option<u32>, mode: Mode) -> bool {
        let s = &self.rule.spec;
        if s.mode != mode || !self.armed.load(Ordering::Acquire) {
            return false;
        }
        if let Some(want) = s.vcpu
            && vcpu != Some(want)
        {
            return false;
        }
        if let Some(want) = s.domain
            && ctx.domain != Some(want)
        {
            return false;
        }
        match s.endpoint {
            None => true,
            Some(EndpointFilter::Pci(b)) => ctx.endpoint == Some(Endpoint::Pci(b)),
            Some(EndpointFilter::Fh(fh)) => ctx.endpoint == Some(Endpoint::Zpci { fh }),
            Some(EndpointFilter::Sid(sid)) => match ctx.endpoint {
                Some(Endpoint::Stream { sid: s, .. }) => s == sid,
                // SMMUv3 command points carry no endpoint; CFGI_STE/CFGI_CD(_ALL)/CFGI_STE_RANGE
                // hold the StreamID in bits 63:32 of the command's first word (the value).
                None => {
                    ctx.point.starts_with("smmuv3.cmd.CFGI_") && (ctx.value >> 32) as u32 == sid
                }
                Some(_) => false,
            },
        }
    }

    fn consider(
        &self,
        ctx: &PointCtx<'_>,
        vcpu: Option<u32>,
        mode: Mode,
        at: Instant,
    ) -> Option<Firing> {
        if !self.matches(ctx, vcpu, mode) {
            return None;
        }
        let s = &self.rule.spec;
        let mut rt = self.rt.lock().unwrap_or_else(|p| p.into_inner());
        rt.seen += 1;
        if s.nth.is_some_and(|n| rt.seen < n) || s.limit().is_some_and(|l| rt.fired >= l) {
            return None;
        }
        if let Some(p) = s.prob
            && rt.rng.unit() >= p
        {
            return None;
        }
        rt.fired += 1;
        let delay = s.delay.sample(&mut rt.rng);
        Some(Firing {
            rule: self.rule.index,
            rule_text: self.text.clone(),
            point: ctx.point.to_string(),
            mode,
            delay,
            occurrence: rt.seen,
            endpoint: ctx.endpoint,
            domain: ctx.domain,
            value: ctx.value,
            vcpu,
            at,
        })
    }
}

impl Hooks for Injector {
    /// Stall rules: blocks the calling thread for the drawn delay.
    #[inline]
    fn point(&self, ctx: &PointCtx<'_>) {
        if !self.maybe(ctx.point) {
            return;
        }
        if let Some(d) = self.decide(ctx, None, Mode::Stall) {
            std::thread::sleep(d);
        }
    }

    /// Defer rules: the model publishes the completion after the drawn delay.
    #[inline]
    fn defer(&self, ctx: &PointCtx<'_>) -> Option<Duration> {
        if !self.maybe(ctx.point) {
            return None;
        }
        self.decide(ctx, None, Mode::Defer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;
    use crate::registry::{SymbolMap, fixture};
    use sluice_devapi::Bdf;

    fn injector(plan: &str) -> (Arc<Injector>, Arc<Mutex<Vec<Firing>>>) {
        let mut r = fixture::with_blk0();
        r.set_symbols(SymbolMap::parse("ffffffff81000010 T bus_iommu_probe\n"));
        let inj = Arc::new(Injector::new(
            r.validate(&Plan::parse_cli(plan).unwrap()).unwrap(),
        ));
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        inj.set_sink(Arc::new(move |f: &Firing| {
            l.lock().unwrap().push(f.clone())
        }));
        (inj, log)
    }

    fn attach(ep: u16, dom: u32) -> PointCtx<'static> {
        PointCtx {
            point: "virtio-iommu.req.attach",
            endpoint: Some(Endpoint::Pci(Bdf(ep))),
            domain: Some(dom),
            value: 0,
        }
    }

    #[test]
    fn nth_count_and_mode() {
        let (inj, log) = injector("virtio-iommu.req.attach:delay=1ms,nth=3,count=2,mode=defer");
        let got: Vec<_> = (0..6).map(|_| inj.defer(&attach(0x18, 1))).collect();
        let d = Some(Duration::from_millis(1));
        assert_eq!(got, vec![None, None, d, d, None, None]);
        // A stall-mode arrival does not count for a defer rule.
        inj.point(&attach(0x18, 1));
        let log = log.lock().unwrap();
        assert_eq!(
            log.iter().map(|f| f.occurrence).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert!(log.iter().all(|f| f.rule == 0 && f.mode == Mode::Defer));
        assert_eq!(inj.fired(), vec![2]);
    }

    #[test]
    fn endpoint_domain_and_marker_filters() {
        let (inj, log) = injector(
            "virtio-iommu.req.attach:delay=1ms,mode=defer,endpoint=00:03.0,domain=2,\
             after=insmod virtio_iommu",
        );
        let ep = Bdf::new(0, 3, 0).0;
        assert_eq!(inj.defer(&attach(ep, 2)), None, "not armed yet");
        inj.marker("SLUICE: insmod virtio_blk rc=0");
        assert_eq!(inj.defer(&attach(ep, 2)), None);
        inj.marker("SLUICE: insmod virtio_iommu rc=0 t=1.2");
        assert_eq!(inj.defer(&attach(ep + 8, 2)), None, "other endpoint");
        assert_eq!(inj.defer(&attach(ep, 1)), None, "other domain");
        assert!(inj.defer(&attach(ep, 2)).is_some());
        assert!(
            inj.defer(&PointCtx::new("virtio-iommu.req.attach", 0))
                .is_none()
        );
        assert_eq!(
            log.lock().unwrap()[0].occurrence,
            1,
            "counted after the marker"
        );
        assert_eq!(inj.markers().len(), 2);
    }

    #[test]
    fn sid_filter_reads_cfgi_commands() {
        let (inj, _) = injector("smmuv3.cmd.CFGI_STE:delay=1us,sid=0x10");
        let c = |sid: u64| PointCtx::new("smmuv3.cmd.CFGI_STE", (sid << 32) | 0x03);
        assert_eq!(inj.decide(&c(0x11), None, Mode::Stall), None);
        assert!(inj.decide(&c(0x10), None, Mode::Stall).is_some());
        let s = PointCtx {
            endpoint: Some(Endpoint::Stream {
                sid: 0x10,
                ssid: None,
            }),
            ..PointCtx::new("smmuv3.cmd.CFGI_STE", 0)
        };
        assert!(inj.decide(&s, None, Mode::Stall).is_some());
    }

    #[test]
    fn vcpu_filter_on_guest_points() {
        let (inj, log) = injector("guest.sym.bus_iommu_probe:delay=1us,vcpu=1");
        assert_eq!(
            inj.guest_watch(),
            vec![(0xffff_ffff_8100_0010, "guest.sym.bus_iommu_probe".into())]
        );
        let c = PointCtx::new("guest.sym.bus_iommu_probe", 0xffff_ffff_8100_0010);
        assert_eq!(inj.decide(&c, Some(0), Mode::Stall), None);
        assert!(inj.decide(&c, Some(1), Mode::Stall).is_some());
        assert_eq!(log.lock().unwrap()[0].vcpu, Some(1));
    }

    fn run(seed: u64) -> Vec<(u64, Duration)> {
        let (inj, log) = injector(&format!(
            "seed={seed};virtio-iommu.req.map:delay=uniform(1us..900us),prob=0.3,mode=defer;\
             virtio-iommu.req.map:delay=exp(50us),prob=0.5,count=20,mode=defer"
        ));
        let c = PointCtx::new("virtio-iommu.req.map", 0);
        for _ in 0..500 {
            inj.defer(&c);
        }
        let log = log.lock().unwrap();
        log.iter()
            .map(|f| (f.occurrence * 2 + f.rule as u64, f.delay))
            .collect()
    }

    #[test]
    fn same_seed_same_firings() {
        let a = run(1234);
        assert_eq!(a, run(1234));
        assert_ne!(a, run(1235));
        let n = a.len();
        // ~150 from the first rule, 20 from the second.
        assert!((120..200).contains(&n), "{n}");
    }

    #[test]
    fn unruled_points_pass_and_disarm_stops_everything() {
        let (inj, log) = injector("virtio-iommu.req.attach:delay=1ms,mode=defer");
        assert_eq!(
            inj.defer(&PointCtx::new("virtio-iommu.req.detach", 0)),
            None
        );
        assert_eq!(inj.defer(&PointCtx::new("no.such.point", 0)), None);
        inj.disarm();
        assert_eq!(inj.defer(&attach(1, 1)), None);
        inj.rearm();
        assert!(inj.defer(&attach(1, 1)).is_some());
        assert_eq!(log.lock().unwrap().len(), 1);
        let e = Injector::empty();
        assert_eq!(e.defer(&attach(1, 1)), None);
        e.point(&attach(1, 1));
    }
}
