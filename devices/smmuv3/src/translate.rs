//! The translation entry point: stream table → STE → CD → stage 1 → stage 2, with the config
//! cache and the IOTLB, producing the architected event for every way it can fail.

use crate::cd::{Cd, CdError, cd_address};
use crate::device::SmmuV3;
use crate::evtq::{Delivery, Event, EventType, FaultClass};
use crate::exec::canonical;
use crate::guest::{read_dwords, read_u64};
use crate::iotlb::{ASID_NONE, Tag, TlbEntry};
use crate::provenance::{Trace, cd_slot, first_divergence, tlb_context};
use crate::regs::Snapshot;
use crate::ste::{S1Ste, S2Ste, Ste, SteError, ste_address};
use crate::walk::{Leaf, WalkCfg, WalkFault, attr, perm, s1_perms, s2_perms, walk};
use sluice_devapi::{
    CacheKind, CacheUse, CachedTranslation, DmaDirection, DmaOutcome, DmaRecord, Endpoint,
};
use std::sync::atomic::Ordering;
use vm_memory::GuestMemoryBackend;

/// The kind of a DMA access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    /// Write (else read).
    pub write: bool,
    /// Privileged (PnU=0).
    pub privileged: bool,
    /// Instruction fetch.
    pub instruction: bool,
}

impl Access {
    /// A privileged data read.
    pub const READ: Access = Access {
        write: false,
        privileged: true,
        instruction: false,
    };
    /// A privileged data write.
    pub const WRITE: Access = Access {
        write: true,
        privileged: true,
        instruction: false,
    };

    fn needed(self) -> u8 {
        match (self.instruction, self.write, self.privileged) {
            (true, _, true) => perm::X_PRIV,
            (true, _, false) => perm::X_USER,
            (false, true, true) => perm::W_PRIV,
            (false, true, false) => perm::W_USER,
            (false, false, true) => perm::R_PRIV,
            (false, false, false) => perm::R_USER,
        }
    }
}

/// One physically contiguous piece of a translated range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Input address of the first byte.
    pub iova: u64,
    /// Output (guest-physical) address of the first byte.
    pub pa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Effective permissions (`walk::perm` bits, stage 1 ∧ stage 2).
    pub perms: u8,
}

/// A successful translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    /// The pieces, in input order; adjacent pages that are also adjacent in output are merged.
    pub segments: Vec<Segment>,
    /// No translation stage applied (SMMUEN=0 with GBPA bypass, or STE bypass).
    pub bypassed: bool,
}

/// Why a transaction was terminated without an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortCause {
    /// SMMUEN=0 and GBPA.ABORT=1.
    Gbpa,
    /// STE.Config = abort.
    SteAbort,
}

/// A terminated transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Aborted with no event.
    Abort(AbortCause),
    /// Aborted with an event; `delivery` says whether it reached the event queue.
    Event {
        /// The record (written, or that would have been).
        event: Event,
        /// What became of it.
        delivery: Delivery,
    },
}

impl Fault {
    /// The event type, if any.
    pub fn event_type(&self) -> Option<EventType> {
        match self {
            Fault::Abort(_) => None,
            Fault::Event { event, .. } => Some(event.kind),
        }
    }
}

/// Internal stop reason before the event is posted.
pub(crate) enum Stop {
    Abort(AbortCause),
    Event { ev: Event, record: bool },
}

/// The resolved context of one transaction.
#[derive(Debug, Clone, Copy)]
struct Ctx {
    sid: u32,
    ssid: Option<u32>,
    vmid: u16,
    cd: Option<Cd>,
    s2: Option<S2Ste>,
}

/// A stage-2 result for one IPA.
#[derive(Debug, Clone, Copy)]
struct S2Out {
    /// PA of the IPA's byte.
    pa: u64,
    /// log2 of the stage-2 mapping size.
    size_log2: u32,
    perm: u8,
}

fn low_mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

impl SmmuV3 {
    /// Translates `[iova, iova+len)` for stream `sid` (substream `ssid`). Callable from
    /// several threads at once. On failure the event is written to the event queue (if the
    /// configuration records it and the queue accepts it) and returned in the [`Fault`].
    pub fn translate<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let snap = self.snapshot();
        // Read before any cache lookup: a CMD_SYNC counted here completed before them.
        let completions_seen = self.provenance.syncs.load(Ordering::Acquire);
        let trace = Trace::cached();
        let res = self.translate_inner(mem, &snap, sid, ssid, iova, len, access, &trace);
        let endpoint = Endpoint::Stream { sid, ssid };
        let recheck = match &res {
            Ok((t, _)) if trace.used_cache() && self.hooks.recheck_cached(endpoint) => {
                let fresh = Trace::fresh();
                let again = self.translate_inner(mem, &snap, sid, ssid, iova, len, access, &fresh);
                Some(first_divergence(iova, t, &again))
            }
            _ => None,
        };
        let (res, domain) = match res {
            Ok((t, d)) => (Ok(t), d),
            Err(Stop::Abort(c)) => (Err(Fault::Abort(c)), 0),
            Err(Stop::Event { ev, record }) => {
                let delivery = if record {
                    self.post_event(mem, &ev)
                } else {
                    Delivery::Suppressed
                };
                (
                    Err(Fault::Event {
                        event: ev,
                        delivery,
                    }),
                    0,
                )
            }
        };
        let outcome = match &res {
            Ok(t) if t.bypassed => DmaOutcome::Bypassed,
            Ok(t) => DmaOutcome::Translated {
                gpa: t.segments.first().map_or(0, |s| s.pa),
                domain,
            },
            Err(f) => DmaOutcome::Faulted {
                reason: f.event_type().map_or(0, |k| u32::from(k.code())),
            },
        };
        let rec = DmaRecord {
            endpoint,
            iova,
            len,
            direction: if access.write {
                DmaDirection::Write
            } else {
                DmaDirection::Read
            },
            outcome,
        };
        if trace.used_cache() {
            let uses = trace.uses();
            self.hooks.dma_cached(
                &rec,
                &CachedTranslation {
                    source: crate::provenance::SOURCE,
                    uses: uses.as_slice(),
                    completions_seen,
                    divergence: recheck.flatten(),
                    rechecked: recheck.is_some(),
                },
            );
        } else {
            self.hooks.dma(&rec);
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    fn translate_inner<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        snap: &Snapshot,
        sid: u32,
        ssid: Option<u32>,
        iova: u64,
        len: u64,
        access: Access,
        trace: &Trace,
    ) -> Result<(Translation, u32), Stop> {
        let bypass = || {
            let segments = if len == 0 {
                Vec::new()
            } else {
                vec![Segment {
                    iova,
                    pa: iova,
                    len,
                    perms: perm::ALL,
                }]
            };
            Ok((
                Translation {
                    segments,
                    bypassed: true,
                },
                0,
            ))
        };
        if !snap.smmuen {
            return if snap.gbpa_abort {
                Err(Stop::Abort(AbortCause::Gbpa))
            } else {
                bypass()
            };
        }
        let ev = |kind| Event::new(kind, sid, ssid);
        let ste = self.stream(mem, snap, sid, trace).map_err(|e| {
            let mut ev = ev(e.event_type());
            if let SteError::Fetch { addr } = e {
                ev.addr2 = addr;
            }
            // CR2.RECINVSID gates C_BAD_STREAMID.
            let record = !matches!(e, SteError::BadStreamId { .. }) || snap_recinvsid(self);
            Stop::Event { ev, record }
        })?;
        let (s1, s2, vmid) = match ste {
            Ste::Abort => return Err(Stop::Abort(AbortCause::SteAbort)),
            Ste::Bypass if ssid.is_some() => {
                return Err(Stop::Event {
                    ev: ev(EventType::CBadSubstreamid),
                    record: true,
                });
            }
            Ste::Bypass => return bypass(),
            Ste::Translate { s1, s2, vmid } => (s1, s2, vmid),
        };
        let mut ctx = Ctx {
            sid,
            ssid,
            vmid,
            cd: None,
            s2,
        };
        if let Some(s1) = s1 {
            ctx.cd = self.context(mem, &ctx, &s1, iova, trace)?;
        } else if ssid.is_some() {
            return Err(Stop::Event {
                ev: ev(EventType::CBadSubstreamid),
                record: true,
            });
        }
        if ctx.cd.is_none() && ctx.s2.is_none() {
            return bypass();
        }
        let domain = match ctx.cd {
            Some(cd) => (u32::from(vmid) << 16) | u32::from(cd.asid),
            None => u32::from(vmid) << 16 | 0xffff,
        };
        let mut segments: Vec<Segment> = Vec::new();
        // A zero-length access is checked like a one-byte access but yields no segment.
        let end = iova.saturating_add(len.max(1));
        let mut cur = iova;
        while cur < end {
            let e = self.entry(mem, &ctx, cur, access, trace)?;
            self.check_perms(&ctx, &e, cur, access)?;
            let off = canonical_if(&ctx, cur).wrapping_sub(e.iova);
            let chunk = (end - cur)
                .min((1u64 << e.size_log2.min(63)).saturating_sub(off))
                .max(1);
            if len != 0 {
                let seg = Segment {
                    iova: cur,
                    pa: e.oa + off,
                    len: chunk,
                    perms: e.s1perm & e.s2perm,
                };
                match segments.last_mut() {
                    Some(l) if l.pa.wrapping_add(l.len) == seg.pa && l.perms == seg.perms => {
                        l.len += chunk;
                    }
                    _ => segments.push(seg),
                }
            }
            cur = cur.saturating_add(chunk);
        }
        Ok((
            Translation {
                segments,
                bypassed: false,
            },
            domain,
        ))
    }

    fn stream<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        snap: &Snapshot,
        sid: u32,
        trace: &Trace,
    ) -> Result<Ste, SteError> {
        let caching = trace.caching(self);
        // Not even looked up when not caching (NeverCache, a fresh re-derivation): the lookup
        // costs two atomic operations and a probe, and its answer would be thrown away.
        if let Some(s) = caching.then(|| self.cfg_cache.ste(sid)).flatten() {
            trace.record(CacheUse {
                cache: CacheKind::Config,
                context: u64::from(sid),
                first: 0,
                last: 0,
                filled: s.filled,
            });
            return Ok(s.value);
        }
        let epoch = self.cfg_cache.generation();
        let addr = ste_address(mem, &snap.strtab, sid)?;
        let words = read_dwords::<M, 8>(mem, addr).map_err(|_| SteError::Fetch { addr })?;
        let ste = Ste::parse(&words, &self.idr)?;
        if caching {
            self.cfg_cache.put_ste(sid, ste, epoch);
        }
        Ok(ste)
    }

    /// Resolves the CD for the transaction (`None`: stage 1 bypassed by S1DSS).
    fn context<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        ctx: &Ctx,
        s1: &S1Ste,
        iova: u64,
        trace: &Trace,
    ) -> Result<Option<Cd>, Stop> {
        let ev = |kind| Event::new(kind, ctx.sid, ctx.ssid);
        let ssid = match ctx.ssid {
            Some(_) if s1.cd_max == 0 => {
                return Err(Stop::Event {
                    ev: ev(EventType::CBadSubstreamid),
                    record: true,
                });
            }
            Some(x) => x,
            None if s1.cd_max == 0 => 0,
            None => match s1.dss {
                0 => {
                    return Err(Stop::Event {
                        ev: ev(EventType::FStreamDisabled),
                        record: true,
                    });
                }
                1 => return Ok(None),
                _ => 0,
            },
        };
        let caching = trace.caching(self);
        if let Some(cd) = caching.then(|| self.cfg_cache.cd(ctx.sid, ssid)).flatten() {
            let slot = cd_slot(ssid);
            trace.record(CacheUse {
                cache: CacheKind::Config,
                context: u64::from(ctx.sid),
                first: slot,
                last: slot,
                filled: cd.filled,
            });
            return Ok(Some(cd.value));
        }
        let epoch = self.cfg_cache.generation();
        // Reads a CD-table word, through stage 2 when it is enabled.
        let mut read = |addr: u64| -> Result<u64, Stop> {
            let pa = match &ctx.s2 {
                Some(s2) => self.s2_fetch_addr(mem, ctx, s2, addr, iova, FaultClass::Cd, trace)?,
                None => addr,
            };
            read_u64(mem, pa).map_err(|_| {
                let mut e = ev(EventType::FCdFetch);
                e.addr2 = addr;
                Stop::Event {
                    ev: e,
                    record: true,
                }
            })
        };
        let cd_addr = cd_address(s1, ssid, &mut read).map_err(|e| match e {
            CdError::Fetch { err, .. } => err,
            other => Stop::Event {
                ev: ev(other.event_type()),
                record: true,
            },
        })?;
        let mut words = [0u64; 8];
        for (i, w) in words.iter_mut().enumerate().take(3) {
            *w = read(cd_addr + 8 * i as u64)?;
        }
        let cd = Cd::parse(&words, &self.idr).map_err(|e| Stop::Event {
            ev: ev(e.event_type()),
            record: true,
        })?;
        if caching {
            self.cfg_cache.put_cd(ctx.sid, ssid, cd, epoch);
        }
        Ok(Some(cd))
    }

    /// Stage-2 translation of an address the SMMU itself reads (CD or table descriptor):
    /// needs stage-2 read permission; faults are reported with `class`.
    #[allow(clippy::too_many_arguments)]
    fn s2_fetch_addr<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        ctx: &Ctx,
        s2: &S2Ste,
        ipa: u64,
        iova: u64,
        class: FaultClass,
        trace: &Trace,
    ) -> Result<u64, Stop> {
        let out = self.s2_translate(mem, ctx, s2, ipa, iova, class, trace)?;
        if out.perm & perm::R_PRIV == 0 {
            return Err(self.s2_fault(
                ctx,
                s2,
                EventType::FPermission,
                ipa,
                iova,
                class,
                Access::READ,
            ));
        }
        Ok(out.pa)
    }

    #[allow(clippy::too_many_arguments)]
    fn s2_fault(
        &self,
        ctx: &Ctx,
        s2: &S2Ste,
        kind: EventType,
        ipa: u64,
        iova: u64,
        class: FaultClass,
        access: Access,
    ) -> Stop {
        let mut ev = Event::new(kind, ctx.sid, ctx.ssid);
        ev.input_addr = iova;
        ev.s2 = true;
        ev.class = class;
        ev.addr2 = ipa;
        ev.rnw = !access.write || class != FaultClass::In;
        ev.pnu = !access.privileged;
        ev.ind = access.instruction;
        ev.tt_read = class != FaultClass::In;
        let record = s2.record || kind == EventType::FWalkEabt;
        Stop::Event { ev, record }
    }

    /// Stage-2 translation of one IPA, through the IOTLB's stage-2-only entries.
    #[allow(clippy::too_many_arguments)]
    fn s2_translate<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        ctx: &Ctx,
        s2: &S2Ste,
        ipa: u64,
        iova: u64,
        class: FaultClass,
        trace: &Trace,
    ) -> Result<S2Out, Stop> {
        let tag = Tag {
            vmid: s2.vmid,
            asid: ASID_NONE,
        };
        let caching = trace.caching(self);
        if let Some((e, filled)) = caching
            .then(|| self.iotlb.lookup_filled(tag, ipa))
            .flatten()
        {
            trace.record_tlb(tlb_context(tag), &e, filled);
            return Ok(S2Out {
                pa: e.oa + (ipa - e.iova),
                size_log2: e.size_log2,
                perm: e.s2perm,
            });
        }
        let fault = |kind| self.s2_fault(ctx, s2, kind, ipa, iova, class, Access::READ);
        if ipa >> s2.walk.input_bits != 0 {
            return Err(fault(EventType::FTranslation));
        }
        let epoch = self.iotlb.epoch();
        let leaf = walk(&s2.walk, ipa, &mut |a, _| read_u64(mem, a)).map_err(|e| match e {
            WalkFault::Translation { .. } => fault(EventType::FTranslation),
            WalkFault::AddrSize { .. } => fault(EventType::FAddrSize),
            WalkFault::Fetch { addr, .. } => {
                let mut st = fault(EventType::FWalkEabt);
                if let Stop::Event { ev, .. } = &mut st {
                    ev.addr2 = addr;
                }
                st
            }
        })?;
        if leaf.desc & attr::AF == 0 && !s2.affd {
            return Err(fault(EventType::FAccess));
        }
        let size_log2 = leaf.size_log2;
        let base = ipa & !low_mask(size_log2);
        let p = s2_perms(leaf.desc);
        if caching {
            let e = TlbEntry {
                iova: base,
                size_log2,
                oa: leaf.oa,
                s1perm: perm::ALL,
                s2perm: p,
                ipa: base,
                granule: s2.walk.granule,
                level: leaf.level,
            };
            self.iotlb.insert(tag, e, epoch);
        }
        Ok(S2Out {
            pa: leaf.oa + (ipa - base),
            size_log2,
            perm: p,
        })
    }

    /// The IOTLB entry covering `va` for this context: a hit, or a walk and a fill.
    fn entry<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        ctx: &Ctx,
        va: u64,
        access: Access,
        trace: &Trace,
    ) -> Result<TlbEntry, Stop> {
        let Some(cd) = ctx.cd else {
            // Stage 2 only.
            let Some(s2) = ctx.s2 else {
                return Ok(identity(va));
            };
            let out = self.s2_translate(mem, ctx, &s2, va, va, FaultClass::In, trace)?;
            let base = va & !low_mask(out.size_log2);
            return Ok(TlbEntry {
                iova: base,
                size_log2: out.size_log2,
                oa: out.pa - (va - base),
                s1perm: perm::ALL,
                s2perm: out.perm,
                ipa: base,
                granule: s2.walk.granule,
                level: 3,
            });
        };
        let s1_fault = |kind| {
            let mut ev = Event::new(kind, ctx.sid, ctx.ssid);
            ev.input_addr = va;
            ev.rnw = !access.write;
            ev.pnu = !access.privileged;
            ev.ind = access.instruction;
            Stop::Event {
                ev,
                record: cd.record || kind == EventType::FWalkEabt,
            }
        };
        // The region and top-byte check come before the IOTLB: entries are keyed by the
        // canonical VA (tag stripped), so a tagged VA whose half has TBI clear would otherwise
        // hit the entry of its untagged form and translate where the walk must fault.
        let Some((region, walk_addr)) = cd.select(va) else {
            return Err(s1_fault(EventType::FTranslation));
        };
        let key = canonical(va);
        let tag = Tag {
            vmid: ctx.vmid,
            asid: u32::from(cd.asid),
        };
        let caching = trace.caching(self);
        if let Some((e, filled)) = caching
            .then(|| self.iotlb.lookup_filled(tag, key))
            .flatten()
        {
            trace.record_tlb(tlb_context(tag), &e, filled);
            return Ok(e);
        }
        let epoch = self.iotlb.epoch();
        let leaf = self.s1_walk(mem, ctx, &region.walk, walk_addr, va, &s1_fault, trace)?;
        if leaf.desc & attr::AF == 0 && !cd.affd {
            return Err(s1_fault(EventType::FAccess));
        }
        let (mut size_log2, mut oa) = (leaf.size_log2, leaf.oa);
        if leaf.desc & attr::CONTIG != 0 {
            let n = region.walk.granule.contig_count(leaf.level);
            let big = leaf.size_log2 + n.trailing_zeros();
            let within = key & low_mask(big) & !low_mask(leaf.size_log2);
            if let Some(base_oa) = leaf
                .oa
                .checked_sub(within)
                .filter(|b| b & low_mask(big) == 0)
            {
                size_log2 = big;
                oa = base_oa;
            }
        }
        let s1perm = s1_perms(&leaf);
        let mut e = TlbEntry {
            iova: key & !low_mask(size_log2),
            size_log2,
            oa,
            s1perm,
            s2perm: perm::ALL,
            ipa: oa,
            granule: region.walk.granule,
            level: leaf.level,
        };
        if let Some(s2) = &ctx.s2 {
            let ipa = oa + (key & low_mask(size_log2));
            let out = self.s2_translate(mem, ctx, s2, ipa, va, FaultClass::In, trace)?;
            let size = size_log2.min(out.size_log2);
            let off = key & low_mask(size);
            e.iova = key - off;
            e.size_log2 = size;
            e.ipa = ipa - off;
            e.oa = out.pa - off;
            e.s2perm = out.perm;
        }
        if caching {
            self.iotlb.insert(tag, e, epoch);
        }
        Ok(e)
    }

    #[allow(clippy::too_many_arguments)]
    fn s1_walk<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        ctx: &Ctx,
        cfg: &WalkCfg,
        walk_addr: u64,
        va: u64,
        s1_fault: &dyn Fn(EventType) -> Stop,
        trace: &Trace,
    ) -> Result<Leaf, Stop> {
        let mut fetch = |desc_addr: u64, _level: u32| -> Result<u64, Stop> {
            let pa = match &ctx.s2 {
                Some(s2) => {
                    self.s2_fetch_addr(mem, ctx, s2, desc_addr, va, FaultClass::Tt, trace)?
                }
                None => desc_addr,
            };
            read_u64(mem, pa).map_err(|_| {
                let mut st = s1_fault(EventType::FWalkEabt);
                if let Stop::Event { ev, .. } = &mut st {
                    ev.addr2 = pa;
                }
                st
            })
        };
        walk(cfg, walk_addr, &mut fetch).map_err(|e| match e {
            WalkFault::Translation { .. } => s1_fault(EventType::FTranslation),
            WalkFault::AddrSize { .. } => s1_fault(EventType::FAddrSize),
            WalkFault::Fetch { err, .. } => err,
        })
    }

    fn check_perms(&self, ctx: &Ctx, e: &TlbEntry, va: u64, access: Access) -> Result<(), Stop> {
        let need = access.needed();
        if e.s1perm & need == 0 {
            let mut ev = Event::new(EventType::FPermission, ctx.sid, ctx.ssid);
            ev.input_addr = va;
            ev.rnw = !access.write;
            ev.pnu = !access.privileged;
            ev.ind = access.instruction;
            let record = ctx.cd.is_some_and(|cd| cd.record);
            return Err(Stop::Event { ev, record });
        }
        if let Some(s2) = ctx.s2.as_ref().filter(|_| e.s2perm & need == 0) {
            let ipa = e.ipa + (canonical_if(ctx, va) - e.iova);
            return Err(self.s2_fault(
                ctx,
                s2,
                EventType::FPermission,
                ipa,
                va,
                FaultClass::In,
                access,
            ));
        }
        Ok(())
    }
}

fn canonical_if(ctx: &Ctx, va: u64) -> u64 {
    if ctx.cd.is_some() { canonical(va) } else { va }
}

fn identity(va: u64) -> TlbEntry {
    TlbEntry {
        iova: va & !0xfff,
        size_log2: 12,
        oa: va & !0xfff,
        s1perm: perm::ALL,
        s2perm: perm::ALL,
        ipa: va & !0xfff,
        granule: crate::walk::Granule::G4K,
        level: 3,
    }
}

fn snap_recinvsid(smmu: &SmmuV3) -> bool {
    smmu.lock().cr2 & 2 != 0
}
