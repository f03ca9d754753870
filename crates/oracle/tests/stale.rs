//! Mapping-level `stale-config` and re-derivation `unsynced-config`, driven through the real
//! device models (no guest). Each model is broken on purpose with its test-only fault-injection
//! switch, which skips exactly one cache removal and leaves every other step on its real path;
//! the same sequences on the unbroken models must stay silent.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_devapi::{Bdf, DeviceState, Endpoint, EndpointIommu, Hooks, StateEvent};
use sluice_oracle::{
    EscapeClass, EventKind, IommuTopo, Oracle, OracleConfig, OracleReport, Topology,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

const RAM: usize = 16 << 20;

fn ram() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-stale-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn finish(o: &Oracle, name: &str) -> OracleReport {
    o.finish(&scratch(name)).unwrap()
}

/// Exactly `n` escapes, all of `class`, each message naming the rule first and containing
/// every needle; returns the first.
fn escapes_of(r: &OracleReport, class: EscapeClass, n: u64, needles: &[&str]) {
    assert_eq!(r.escape_count, n, "{:#?}", r.escapes);
    for e in &r.escapes {
        assert_eq!(e.class, class, "{}", e.message);
        assert!(e.message.starts_with(class.name()), "{}", e.message);
        for needle in needles {
            assert!(
                e.message.contains(needle),
                "{needle:?} missing from {:?}",
                e.message
            );
        }
    }
}

/// The escape's preceding events hold the invalidation it contradicts.
fn cause_is_preceding(r: &OracleReport, what: &str) {
    let e = &r.escapes[0];
    assert!(
        e.preceding.iter().any(|p| matches!(&p.kind,
            EventKind::Invalidated { what: w, .. } if w == what)),
        "no {what} before the escape: {:#?}",
        e.preceding
    );
}

// ---- virtio-iommu ----

mod viommu {
    use super::*;
    use sluice_virtio_iommu::device::OFFERED_FEATURES;
    use sluice_virtio_iommu::model::FaultInjection;
    use sluice_virtio_iommu::request::{Request, encode, writable_len};
    use sluice_virtio_iommu::{ViommuConfig, VirtioIommu};

    pub const VIOMMU: Bdf = Bdf::new(0, 2, 0);
    pub const DISK: Bdf = Bdf::new(0, 3, 0);

    pub struct Bed {
        pub oracle: Arc<Oracle>,
        pub dev: VirtioIommu,
        pub ram: GuestMemoryMmap,
        pub mem: IommuMemory<GuestMemoryMmap, EndpointIommu>,
    }

    impl Bed {
        pub fn new(faults: FaultInjection) -> Bed {
            let oracle = Oracle::new(
                Topology::virtio(VIOMMU, vec![DISK]),
                OracleConfig::default(),
            );
            let cfg = ViommuConfig {
                endpoints: vec![u32::from(DISK.0)],
                ..ViommuConfig::default()
            };
            let dev = VirtioIommu::new("viommu0", cfg, oracle.clone());
            dev.set_acked_features(OFFERED_FEATURES | (1 << 32));
            dev.set_fault_injection(faults);
            let ram = ram();
            let seam = dev.endpoint_iommu(u32::from(DISK.0)).unwrap();
            let mem = IommuMemory::new(ram.clone(), seam, true, ());
            oracle.state(&StateEvent {
                source: "virtio-pci",
                endpoint: Some(Endpoint::Pci(VIOMMU)),
                change: DeviceState::DriverOk { usable: true }.into(),
            });
            let bed = Bed {
                oracle,
                dev,
                ram,
                mem,
            };
            bed.req(Request::Attach {
                domain: 1,
                endpoint: u32::from(DISK.0),
                flags: 0,
            });
            bed
        }

        pub fn req(&self, r: Request) {
            let w = writable_len(r.kind(), self.dev.config().probe_size);
            let status = self
                .dev
                .handle_request(&encode(&r), w, Some(&self.ram))
                .status();
            assert_eq!(status, Some(0), "{r:?}");
        }

        pub fn map(&self, iova: u64, phys: u64) {
            self.req(Request::Map {
                domain: 1,
                virt_start: iova,
                virt_end: iova + 0xfff,
                phys_start: phys,
                flags: 3,
            });
        }

        pub fn unmap(&self, iova: u64) {
            self.req(Request::Unmap {
                domain: 1,
                virt_start: iova,
                virt_end: iova + 0xfff,
            });
        }

        pub fn read(&self, iova: u64) -> bool {
            let mut buf = [0u8; 512];
            self.mem.read_slice(&mut buf, GuestAddress(iova)).is_ok()
        }
    }

    pub fn broken() -> FaultInjection {
        FaultInjection {
            skip_unmap_invalidation: true,
        }
    }
}

#[test]
fn stale_config_fires_when_a_virtio_iommu_unmap_leaves_the_translation_cached() {
    let b = viommu::Bed::new(viommu::broken());
    b.map(0x10_0000, 0x20_0000);
    assert!(b.read(0x10_0000), "fills the endpoint's cache");
    b.unmap(0x10_0000);
    assert!(b.read(0x10_0000), "the broken model still translates");
    let r = finish(&b.oracle, "viommu-broken");
    escapes_of(
        &r,
        EscapeClass::StaleConfig,
        1,
        &[
            "pci:0000:00:03.0",
            "iova 0x100000",
            "domain 1",
            "UNMAP of [0x100000, 0x100fff]",
        ],
    );
    cause_is_preceding(&r, "UNMAP");
}

#[test]
fn virtio_iommu_unmap_then_map_then_dma_is_not_stale() {
    let b = viommu::Bed::new(Default::default());
    b.map(0x10_0000, 0x20_0000);
    assert!(b.read(0x10_0000));
    b.unmap(0x10_0000);
    assert!(!b.read(0x10_0000), "unmapped: a fault, not an escape");
    b.map(0x10_0000, 0x30_0000);
    assert!(b.read(0x10_0800));
    let r = finish(&b.oracle, "viommu-remap");
    assert_eq!(r.escape_count, 0, "{:#?}", r.escapes);
    assert_eq!(r.endpoints[0].translated, 2);
}

#[test]
fn virtio_iommu_dma_of_an_unrelated_range_is_not_stale() {
    // Broken model: the UNMAP of one page leaves it cached, but only that page is accused.
    let b = viommu::Bed::new(viommu::broken());
    b.map(0x10_0000, 0x20_0000);
    b.map(0x50_0000, 0x60_0000);
    assert!(b.read(0x10_0000) && b.read(0x50_0000));
    b.unmap(0x10_0000);
    for _ in 0..10 {
        assert!(b.read(0x50_0000));
    }
    let r = finish(&b.oracle, "viommu-unrelated");
    assert_eq!(r.escape_count, 0, "{:#?}", r.escapes);
}

// ---- SMMUv3 ----

mod smmu {
    use super::*;
    use sluice_devapi::RecordingInterrupts;
    use sluice_smmuv3::regs::off;
    use sluice_smmuv3::{Access, FaultInjection, SmmuConfig, SmmuV3};

    pub const SID: u32 = 3;
    pub const ASID: u64 = 1;
    pub const STRTAB: u64 = 0x10_0000;
    pub const CMDQ: u64 = 0x20_0000;
    pub const CMDQ_LOG2: u64 = 8;
    pub const EVTQ: u64 = 0x21_0000;
    pub const CD: u64 = 0x30_0000;
    /// Level-1, -2 and -3 tables of a 39-bit, 4 KiB-granule stage 1 (start level 1).
    pub const L1: u64 = 0x40_0000;
    pub const L2: u64 = 0x40_1000;
    pub const L3: u64 = 0x40_2000;
    /// Two pages mapped by the one level-3 table.
    pub const VA: u64 = 0x1000_0000;
    pub const VA2: u64 = 0x1000_1000;
    pub const PA: u64 = 0x50_0000;
    pub const PA2: u64 = 0x60_0000;
    const AF: u64 = 1 << 10;

    pub struct Bed {
        pub oracle: Arc<Oracle>,
        pub mem: GuestMemoryMmap,
        pub smmu: SmmuV3,
    }

    impl Bed {
        pub fn new(faults: FaultInjection, cfg: OracleConfig) -> Bed {
            Self::with(faults, cfg, None)
        }

        /// With `first` called before the oracle for every hook.
        pub fn with(
            faults: FaultInjection,
            cfg: OracleConfig,
            first: Option<Arc<dyn Hooks>>,
        ) -> Bed {
            let topo = Topology {
                iommus: vec![IommuTopo::Smmu {
                    source: "smmuv3".into(),
                    sids: vec![SID],
                }],
            };
            let oracle = Oracle::new(topo, cfg);
            let hooks: Arc<dyn Hooks> = match first {
                Some(h) => Arc::new(sluice_devapi::Fanout(vec![h, oracle.clone()])),
                None => oracle.clone(),
            };
            let smmu = SmmuV3::new(
                SmmuConfig::default(),
                Arc::new(RecordingInterrupts::default()),
                hooks,
            );
            smmu.set_fault_injection(faults);
            let b = Bed {
                oracle,
                mem: ram(),
                smmu,
            };
            b.w64(off::STRTAB_BASE, STRTAB);
            b.w32(off::STRTAB_BASE_CFG, 6);
            b.w64(off::CMDQ_BASE, CMDQ | CMDQ_LOG2);
            b.w64(off::EVENTQ_BASE, EVTQ | 5);
            b.w32(off::CR0, 0xd);
            // Stage 1 through one CD: T0SZ 25 (39-bit VA), 4 KiB granule, IPS 48 bits.
            let cd0 = 25 | (1 << 30) | (1 << 31) | (5 << 32) | (1 << 41) | (1 << 45) | (1 << 46);
            b.put(CD, cd0 | (ASID << 48));
            b.put(CD + 8, L1);
            b.put(STRTAB + u64::from(SID) * 64, 1 | (5 << 1) | CD);
            b.put(L1, L2 | 3);
            b.put(L2 + 8 * ((VA >> 21) & 511), L3 | 3);
            b.set_pte(VA, Some(PA));
            b.set_pte(VA2, Some(PA2));
            b.cmd(0x03 | (u64::from(SID) << 32), 1); // CFGI_STE
            b.sync();
            b
        }

        fn w32(&self, o: u64, v: u64) {
            self.smmu.mmio_write(&self.mem, o, 4, v);
        }
        fn w64(&self, o: u64, v: u64) {
            self.smmu.mmio_write(&self.mem, o, 8, v);
        }
        pub fn put(&self, addr: u64, v: u64) {
            self.mem.write_obj(v, GuestAddress(addr)).unwrap();
        }

        /// Writes the level-3 descriptor of `va`: a page at `pa`, or invalid.
        pub fn set_pte(&self, va: u64, pa: Option<u64>) {
            self.put(L3 + 8 * ((va >> 12) & 511), pa.map_or(0, |pa| pa | AF | 3));
        }

        pub fn cmd(&self, d0: u64, d1: u64) {
            let prod = self.smmu.mmio_read(off::CMDQ_PROD, 4);
            let idx = prod & ((1 << CMDQ_LOG2) - 1);
            self.put(CMDQ + idx * 16, d0);
            self.put(CMDQ + idx * 16 + 8, d1);
            self.w32(off::CMDQ_PROD, (prod + 1) & ((2 << CMDQ_LOG2) - 1));
        }

        pub fn sync(&self) {
            self.cmd(0x46, 0);
        }

        /// TLBI_NH_VA of one page of ASID 1 (no range: every entry containing `va`).
        pub fn tlbi_va(&self, va: u64) {
            self.cmd(0x12 | (ASID << 48), va);
        }

        /// A 64-byte read by the stream; the output address, or None when refused.
        pub fn dma(&self, va: u64) -> Option<u64> {
            self.smmu
                .translate(&self.mem, SID, None, va, 64, Access::READ)
                .ok()
                .and_then(|t| t.segments.first().map(|s| s.pa))
        }
    }

    pub fn broken_tlb() -> FaultInjection {
        FaultInjection {
            skip_tlb_invalidation: true,
            ..FaultInjection::default()
        }
    }

    pub fn paranoid() -> OracleConfig {
        OracleConfig {
            paranoid: true,
            ..OracleConfig::default()
        }
    }
}

#[test]
fn stale_config_fires_when_an_smmu_tlbi_leaves_the_iotlb_entry() {
    use smmu::*;
    let b = Bed::new(broken_tlb(), OracleConfig::default());
    assert_eq!(b.dma(VA), Some(PA), "walk and fill");
    b.set_pte(VA, Some(PA2));
    b.tlbi_va(VA);
    // Executed but not yet completed: the old entry may still be used.
    assert_eq!(b.dma(VA), Some(PA));
    b.sync();
    assert_eq!(
        b.dma(VA),
        Some(PA),
        "the broken model still uses the old entry"
    );
    let r = finish(&b.oracle, "smmu-broken");
    escapes_of(
        &r,
        EscapeClass::StaleConfig,
        1,
        &[
            "sid:0x3",
            "iova 0x10000000",
            "domain 1",
            "TLBI_NH_VA of [0x10000000, 0x10000000]",
            "context 0x1",
        ],
    );
    cause_is_preceding(&r, "TLBI_NH_VA");
}

#[test]
fn smmu_invalidate_then_fresh_walk_is_not_stale() {
    use smmu::*;
    let b = Bed::new(Default::default(), paranoid());
    assert_eq!(b.dma(VA), Some(PA));
    assert_eq!(b.dma(VA), Some(PA), "a cached hit that memory agrees with");
    b.set_pte(VA, Some(PA2));
    b.tlbi_va(VA);
    b.sync();
    assert_eq!(b.dma(VA), Some(PA2), "fresh walk after the invalidation");
    assert_eq!(
        b.dma(VA),
        Some(PA2),
        "its entry, filled after the invalidation"
    );
    // Unmap: the next access faults, which is not an escape.
    b.set_pte(VA, None);
    b.tlbi_va(VA);
    b.sync();
    assert_eq!(b.dma(VA), None);
    let r = finish(&b.oracle, "smmu-fresh");
    assert_eq!(r.escape_count, 0, "{:#?}", r.escapes);
    assert_eq!(r.endpoints[0].faulted, 1);
}

/// Parks the next DMA served from the caches (at `recheck_cached`, after its lookups and before
/// its report) until the test lets it go.
struct Gate {
    armed: std::sync::atomic::AtomicBool,
    arrived: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Hooks for Gate {
    fn recheck_cached(&self, _: Endpoint) -> bool {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.arrived.lock().unwrap().send(()).unwrap();
            self.go.lock().unwrap().recv().unwrap();
        }
        false
    }
}

#[test]
fn smmu_dma_that_began_before_the_sync_is_not_stale() {
    use smmu::*;
    let (arrived_tx, arrived) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let gate = Arc::new(Gate {
        armed: Default::default(),
        arrived: std::sync::Mutex::new(arrived_tx),
        go: std::sync::Mutex::new(go_rx),
    });
    let b = Bed::with(
        Default::default(),
        OracleConfig::default(),
        Some(gate.clone()),
    );
    assert_eq!(b.dma(VA), Some(PA), "walk and fill");
    gate.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    std::thread::scope(|s| {
        let dma = s.spawn(|| b.dma(VA));
        // The DMA has looked its entry up and is parked before reporting; the guest now
        // remaps the page, invalidates and syncs.
        arrived.recv().unwrap();
        b.set_pte(VA, Some(PA2));
        b.tlbi_va(VA);
        b.sync();
        go.send(()).unwrap();
        assert_eq!(
            dma.join().unwrap(),
            Some(PA),
            "it used the translation it began with"
        );
    });
    assert_eq!(b.dma(VA), Some(PA2));
    let r = finish(&b.oracle, "smmu-inflight");
    assert_eq!(r.escape_count, 0, "{:#?}", r.escapes);
}

#[test]
fn smmu_dma_of_an_unrelated_range_is_not_stale() {
    use smmu::*;
    let b = Bed::new(broken_tlb(), OracleConfig::default());
    assert_eq!(b.dma(VA), Some(PA));
    assert_eq!(b.dma(VA2), Some(PA2));
    b.tlbi_va(VA);
    b.sync();
    for _ in 0..10 {
        assert_eq!(b.dma(VA2), Some(PA2), "not covered by the TLBI");
    }
    let r = finish(&b.oracle, "smmu-unrelated");
    assert_eq!(r.escape_count, 0, "{:#?}", r.escapes);
}

#[test]
fn stale_config_fires_when_an_smmu_cfgi_leaves_the_cd_cached() {
    use smmu::*;
    let b = Bed::new(
        sluice_smmuv3::FaultInjection {
            skip_config_invalidation: true,
            ..Default::default()
        },
        OracleConfig::default(),
    );
    assert_eq!(b.dma(VA), Some(PA));
    // The guest moves the context to ASID 2 (its TLB entries untouched), invalidates the CD
    // (CFGI_CD, SSID 0) and syncs; the broken model keeps serving the old CD.
    let cd0: u64 = b.mem.read_obj(GuestAddress(CD)).unwrap();
    b.put(CD, (cd0 & !(0xffff << 48)) | (2 << 48));
    b.cmd(0x05 | (u64::from(SID) << 32), 1);
    b.sync();
    assert_eq!(b.dma(VA), Some(PA));
    let r = finish(&b.oracle, "smmu-cfgi");
    escapes_of(
        &r,
        EscapeClass::StaleConfig,
        1,
        &[
            "sid:0x3",
            "iova 0x10000000",
            "CFGI_CD",
            "config slot 1 (CD)",
        ],
    );
    cause_is_preceding(&r, "CFGI_CD");
}

#[test]
fn unsynced_config_fires_when_a_pte_is_rewritten_without_tlbi() {
    use smmu::*;
    let b = Bed::new(Default::default(), paranoid());
    assert_eq!(b.dma(VA), Some(PA));
    b.set_pte(VA, Some(PA2));
    assert_eq!(
        b.dma(VA),
        Some(PA),
        "the IOTLB still holds the old translation"
    );
    b.tlbi_va(VA);
    b.sync();
    assert_eq!(b.dma(VA), Some(PA2));
    let r = finish(&b.oracle, "smmu-unsynced");
    escapes_of(
        &r,
        EscapeClass::UnsyncedConfig,
        1,
        &[
            "sid:0x3",
            "iova 0x10000000",
            "domain 1",
            "gpa 0x500000",
            "gpa 0x600000",
        ],
    );
}

#[test]
fn unsynced_config_is_sampled_outside_paranoid_mode() {
    use smmu::*;
    let cfg = OracleConfig {
        recheck_every: 4,
        ..OracleConfig::default()
    };
    let b = Bed::new(Default::default(), cfg);
    assert_eq!(
        b.dma(VA),
        Some(PA),
        "walk: nothing cached, nothing to recheck"
    );
    b.set_pte(VA, Some(PA2));
    for _ in 0..8 {
        assert_eq!(b.dma(VA), Some(PA));
    }
    // The 4th and 8th cached translations of the endpoint are re-derived.
    let r = finish(&b.oracle, "smmu-sampled");
    escapes_of(&r, EscapeClass::UnsyncedConfig, 2, &["gpa 0x600000"]);
}

// ---- zPCI ----

mod zpci {
    use super::*;
    use sluice_zpci::clp::SetPciFnOp;
    use sluice_zpci::guest::GuestTables;
    use sluice_zpci::{
        FaultInjection, Fib, FunctionConfig, InsnStatus, MpcifcOp, Zpci, ZpciOptions,
    };

    pub const FID: u32 = 0x42;
    pub const IOVA: u64 = 0x1_0000_5000;
    pub const ARENA: u64 = 0x40_0000;

    pub struct Bed {
        pub oracle: Arc<Oracle>,
        pub z: Zpci,
        pub mem: GuestMemoryMmap,
        pub tables: GuestTables,
        pub fh: u32,
    }

    impl Bed {
        pub fn new(faults: FaultInjection) -> Bed {
            let oracle = Oracle::new(
                Topology {
                    iommus: vec![IommuTopo::Zpci { indexes: vec![0] }],
                },
                OracleConfig::default(),
            );
            let z = Zpci::new(
                vec![FunctionConfig {
                    fid: FID,
                    ..FunctionConfig::default()
                }],
                ZpciOptions {
                    fault_injection: faults,
                    ..ZpciOptions::default()
                },
                oracle.clone(),
            )
            .unwrap();
            let mem = ram();
            z.configure(FID).unwrap();
            let fh = z.fh_of(FID).unwrap();
            assert_eq!(fh & 0xffff, 0, "the topology's function index");
            let fh = z
                .clp_set_pci_fn(fh, SetPciFnOp::Enable { ndas: 1 })
                .unwrap();
            let tables = GuestTables::new(&mem, ARENA, ARENA + 0x40_0000).unwrap();
            let fib = Fib {
                pba: 0x1_0000_0000,
                pal: 0x1_ffff_ffff,
                iota: tables.iota(),
                ..Fib::default()
            };
            assert_eq!(
                z.mpcifc_with_fib(&mem, fh, 0, MpcifcOp::RegIoat, &fib),
                Ok(InsnStatus::OK)
            );
            Bed {
                oracle,
                z,
                mem,
                tables,
                fh,
            }
        }

        pub fn map(&mut self, gpa: u64) {
            self.tables.map(&self.mem, IOVA, gpa, true).unwrap();
            self.refresh();
        }

        pub fn unmap(&mut self) {
            self.tables.unmap(&self.mem, IOVA).unwrap();
            self.refresh();
        }

        pub fn refresh(&self) {
            assert_eq!(
                self.z.rpcit(&self.mem, self.fh, IOVA, 0x1000),
                InsnStatus::OK
            );
        }

        pub fn dma(&self) -> Option<u64> {
            self.z
                .translate(&self.mem, self.fh, IOVA, 64, false)
                .ok()
                .map(|t| t.pieces[0].gpa)
        }
    }
}

#[test]
fn stale_config_fires_when_a_zpci_rpcit_keeps_an_unmapped_frame() {
    let mut b = zpci::Bed::new(sluice_zpci::FaultInjection {
        skip_rpcit_invalidation: true,
    });
    b.map(0x20_0000);
    assert_eq!(b.dma(), Some(0x20_0000));
    b.unmap();
    assert_eq!(b.dma(), Some(0x20_0000), "the broken model kept the frame");
    let r = finish(&b.oracle, "zpci-broken");
    escapes_of(
        &r,
        EscapeClass::StaleConfig,
        1,
        &[
            "zpci:0x0000",
            "iova 0x100005000",
            "RPCIT of [0x100005000, 0x100005fff]",
        ],
    );
    cause_is_preceding(&r, "RPCIT");
}

#[test]
fn zpci_unmap_then_map_then_dma_is_not_stale() {
    let mut b = zpci::Bed::new(Default::default());
    b.map(0x20_0000);
    assert_eq!(b.dma(), Some(0x20_0000));
    b.map(0x30_0000);
    assert_eq!(b.dma(), Some(0x30_0000), "a refresh that changed the frame");
    b.refresh();
    assert_eq!(b.dma(), Some(0x30_0000), "a refresh that confirmed it");
    b.unmap();
    b.map(0x20_0000);
    assert_eq!(b.dma(), Some(0x20_0000));
    let r = finish(&b.oracle, "zpci-remap");
    assert_eq!(r.escape_count, 0, "{:#?}", r.escapes);
    assert_eq!(r.endpoints[0].translated, 4);
}
