//! Each escape class fires in a focused test that drives the device models directly (no guest),
//! and a clean sequence produces none.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_devapi::{
    Bdf, DeviceState, DmaFault, DmaResolution, DmaTranslate, Endpoint, EndpointIommu, Hooks,
    PointCtx, SmmuState, StateChange, StateEvent, SteConfig, SteMode, ViommuState,
};
use sluice_oracle::{
    ConfigProbe, EscapeClass, EventKind, IommuTopo, Oracle, OracleConfig, OracleReport, Topology,
    Verdict,
};
use sluice_virtio_iommu::device::OFFERED_FEATURES;
use sluice_virtio_iommu::request::{Request, encode, writable_len};
use sluice_virtio_iommu::{ViommuConfig, VirtioIommu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory, Iotlb, Permissions};

const VIOMMU: Bdf = Bdf::new(0, 2, 0);
const DISK: Bdf = Bdf::new(0, 3, 0);
const RAM: usize = 16 << 20;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-oracle-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn ram() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap()
}

struct Viommu {
    oracle: Arc<Oracle>,
    dev: VirtioIommu,
    ram: GuestMemoryMmap,
    mem: IommuMemory<GuestMemoryMmap, EndpointIommu>,
}

impl Viommu {
    fn new() -> Self {
        Self::with_boot_bypass(ViommuConfig::default().boot_bypass)
    }

    fn with_boot_bypass(boot_bypass: bool) -> Self {
        let oracle = Oracle::new(
            Topology::virtio(VIOMMU, vec![DISK]),
            OracleConfig::default(),
        );
        let cfg = ViommuConfig {
            endpoints: vec![u32::from(DISK.0)],
            boot_bypass,
            ..ViommuConfig::default()
        };
        let dev = VirtioIommu::new("viommu0", cfg, oracle.clone());
        dev.set_acked_features(OFFERED_FEATURES | (1 << 32));
        let ram = ram();
        let seam = dev.endpoint_iommu(u32::from(DISK.0)).unwrap();
        let mem = IommuMemory::new(ram.clone(), seam, true, ());
        Viommu {
            oracle,
            dev,
            ram,
            mem,
        }
    }

    /// What the virtio-pci transport announces when the IOMMU's driver sets DRIVER_OK.
    fn driver_ok(&self) {
        self.oracle.state(&StateEvent {
            source: "virtio-pci",
            endpoint: Some(Endpoint::Pci(VIOMMU)),
            change: DeviceState::DriverOk { usable: true }.into(),
        });
    }

    fn req(&self, r: Request) {
        let w = writable_len(r.kind(), self.dev.config().probe_size);
        let status = self
            .dev
            .handle_request(&encode(&r), w, Some(&self.ram))
            .status();
        assert_eq!(status, Some(0), "{r:?}");
    }

    fn attach(&self, domain: u32, flags: u32) {
        self.req(Request::Attach {
            domain,
            endpoint: u32::from(DISK.0),
            flags,
        });
    }

    fn map(&self, domain: u32, iova: u64, phys: u64) {
        self.req(Request::Map {
            domain,
            virt_start: iova,
            virt_end: iova + 0xfff,
            phys_start: phys,
            flags: 3,
        });
    }

    fn read(&self, iova: u64) -> bool {
        let mut buf = [0u8; 512];
        self.mem.read_slice(&mut buf, GuestAddress(iova)).is_ok()
    }

    fn write(&self, iova: u64) -> bool {
        self.mem
            .write_slice(&[0xa5; 64], GuestAddress(iova))
            .is_ok()
    }

    fn finish(&self, name: &str) -> OracleReport {
        self.oracle.finish(&scratch(name)).unwrap()
    }
}

fn only_escape(r: &OracleReport, class: EscapeClass, needles: &[&str]) {
    assert_eq!(r.escape_count, 1, "{:#?}", r.escapes);
    let e = &r.escapes[0];
    assert_eq!(e.class, class, "{}", e.message);
    for n in needles {
        assert!(e.message.contains(n), "{n:?} missing from {:?}", e.message);
    }
    assert!(
        e.message.starts_with(class.name()),
        "message names the rule: {}",
        e.message
    );
    assert!(!e.preceding.is_empty(), "the escape comes with its history");
}

#[test]
fn clean_sequence_has_no_escape() {
    let v = Viommu::new();
    // Firmware era: bypass before the IOMMU driver's DRIVER_OK is legitimate.
    assert!(v.read(0x8000));
    v.driver_ok();
    v.attach(1, 0);
    v.map(1, 0x10_0000, 0x20_0000);
    for _ in 0..1000 {
        assert!(v.read(0x10_0000));
        assert!(v.write(0x10_0800));
    }
    v.req(Request::Unmap {
        domain: 1,
        virt_start: 0x10_0000,
        virt_end: 0x10_0fff,
    });
    assert!(!v.read(0x10_0000), "unmapped: faults, not an escape");
    v.req(Request::Detach {
        domain: 1,
        endpoint: u32::from(DISK.0),
    });
    let r = v.finish("clean");
    assert_eq!(r.escape_count, 0, "{:#?}", r.escapes);
    let ep = &r.endpoints[0];
    assert_eq!(ep.endpoint, "pci:0000:00:03.0");
    assert_eq!((ep.translated, ep.bypassed, ep.faulted), (2000, 1, 1));
    assert_eq!(ep.iommu.as_deref(), Some("virtio-iommu 0000:00:02.0"));
}

#[test]
fn bypass_after_takeover_fires_for_a_never_attached_endpoint() {
    let v = Viommu::new();
    v.driver_ok();
    assert!(v.read(0x5000), "boot bypass lets it through");
    let r = v.finish("bat");
    only_escape(
        &r,
        EscapeClass::BypassAfterTakeover,
        &[
            "pci:0000:00:03.0",
            "iova 0x5000",
            "never attached",
            "DRIVER_OK",
        ],
    );
    let e = &r.escapes[0];
    assert_eq!((e.gpa, e.len, e.reached_memory), (Some(0x5000), 512, true));
    assert_eq!(e.direction, "read");
}

#[test]
fn explicit_bypass_domain_is_not_an_escape() {
    let v = Viommu::new();
    v.driver_ok();
    v.attach(7, 1); // ATTACH_F_BYPASS: an identity domain on purpose.
    assert!(v.read(0x5000));
    assert!(v.write(0x6000));
    let r = v.finish("identity");
    assert_eq!(r.escape_count, 0, "{:#?}", r.escapes);
    assert_eq!(r.endpoints[0].bypassed, 2);
}

#[test]
fn after_release_fires_after_detach() {
    let v = Viommu::new();
    v.driver_ok();
    v.attach(1, 0);
    v.map(1, 0x10_0000, 0x20_0000);
    assert!(v.read(0x10_0000));
    v.req(Request::Detach {
        domain: 1,
        endpoint: u32::from(DISK.0),
    });
    assert!(v.write(0x20_0000), "boot bypass again after DETACH");
    let r = v.finish("release");
    only_escape(
        &r,
        EscapeClass::AfterRelease,
        &["pci:0000:00:03.0", "write", "iova 0x200000", "DETACH"],
    );
}

/// What the DMA engine announces around a host-armed probe DMA (`--rogue`).
fn probe(v: &Viommu, change: DeviceState) {
    v.oracle.state(&StateEvent {
        source: "dma-engine",
        endpoint: Some(Endpoint::Pci(DISK)),
        change: change.into(),
    });
}

const PROBE_BEGIN: DeviceState = DeviceState::RogueDma { iova: 0 };
const PROBE_END: DeviceState = DeviceState::RogueDmaDone { moved: 0 };

#[test]
fn a_refused_probe_after_release_is_a_fault_and_one_that_reaches_memory_is_an_escape() {
    let v = Viommu::with_boot_bypass(false);
    v.driver_ok();
    v.attach(1, 0);
    v.map(1, 0x10_0000, 0x20_0000);
    v.req(Request::Detach {
        domain: 1,
        endpoint: u32::from(DISK.0),
    });
    probe(&v, PROBE_BEGIN);
    assert!(!v.read(0x10_0000), "detached, bypass off: refused");
    probe(&v, PROBE_END);
    let r = v.finish("probe-refused");
    assert_eq!(r.escape_count, 0, "{:#?}", r.escapes);
    assert_eq!(r.endpoints[0].faulted, 1);

    let v = Viommu::with_boot_bypass(true);
    v.driver_ok();
    v.attach(1, 0);
    v.req(Request::Detach {
        domain: 1,
        endpoint: u32::from(DISK.0),
    });
    probe(&v, PROBE_BEGIN);
    assert!(v.read(0x10_0000), "detached, bypass on: reaches memory");
    probe(&v, PROBE_END);
    // outside a probe, the device's own refused DMA after release is still reported
    let v2 = Viommu::with_boot_bypass(false);
    v2.driver_ok();
    v2.attach(1, 0);
    v2.req(Request::Detach {
        domain: 1,
        endpoint: u32::from(DISK.0),
    });
    probe(&v2, PROBE_BEGIN);
    probe(&v2, PROBE_END);
    assert!(!v2.read(0x10_0000));
    only_escape(
        &v.finish("probe-reached"),
        EscapeClass::AfterRelease,
        &["iova 0x100000", "untranslated (bypass)", "DETACH"],
    );
    only_escape(
        &v2.finish("own-dma-refused"),
        EscapeClass::AfterRelease,
        &["iova 0x100000", "refused"],
    );
}

#[test]
fn wrong_domain_fires_outside_the_window_a_marker_declared() {
    let v = Viommu::new();
    v.driver_ok();
    v.attach(1, 0);
    v.map(1, 0x10_0000, 0x20_0000);
    v.map(1, 0x40_0000, 0x30_0000);
    v.oracle
        .marker("owner 0000:00:03.0 user [0x400000,0x401000)");
    assert!(v.read(0x40_0000), "inside the user window");
    assert!(v.read(0x10_0000), "the kernel's mapping is still live");
    v.oracle.marker("owner 0000:00:03.0 kernel");
    assert!(v.read(0x10_0000));
    let r = v.finish("owner");
    only_escape(
        &r,
        EscapeClass::WrongDomain,
        &["pci:0000:00:03.0", "iova 0x100000", "[0x400000, 0x401000)"],
    );
}

/// A broken translator: it keeps serving what it served first, whatever the state events say.
#[derive(Debug)]
struct Stale(DmaResolution);

impl DmaTranslate for Stale {
    fn resolve(
        &self,
        iova: u64,
        _len: u64,
        _access: Permissions,
        fill: &mut Iotlb,
    ) -> Result<DmaResolution, DmaFault> {
        fill.set_mapping(
            GuestAddress(iova & !0xfff),
            GuestAddress(iova & !0xfff),
            0x1000,
            Permissions::ReadWrite,
        )
        .map_err(|e| DmaFault::new(1, e.to_string()))?;
        Ok(self.0)
    }
}

/// The virtio-iommu driver sets DRIVER_OK on the IOMMU function: from now on it owns translation.
fn viommu_driver_takes_over(oracle: &Oracle) {
    state(
        oracle,
        "virtio-pci",
        DeviceState::DriverOk { usable: true },
        Some(Endpoint::Pci(VIOMMU)),
    );
}

/// An oracle for the usual platform: the virtio-iommu in front of the disk.
fn disk_oracle() -> Arc<Oracle> {
    Oracle::new(
        Topology::virtio(VIOMMU, vec![DISK]),
        OracleConfig::default(),
    )
}

fn seam_with(
    oracle: &Arc<Oracle>,
    ep: Endpoint,
    res: DmaResolution,
) -> IommuMemory<GuestMemoryMmap, EndpointIommu> {
    let seam = EndpointIommu::new(ep, Arc::new(Stale(res)), oracle.clone());
    IommuMemory::new(ram(), seam, true, ())
}

fn state(o: &Oracle, source: &str, change: impl Into<StateChange>, ep: Option<Endpoint>) {
    o.state(&StateEvent {
        source,
        endpoint: ep,
        change: change.into(),
    });
}

/// What a CFGI_STE of a valid STE in `mode` announces (the SMMUv3 model decodes the STE).
fn cfgi_ste(mode: SteMode, raw: u8) -> SmmuState {
    SmmuState::CfgiSte {
        config: Some(SteConfig {
            valid: true,
            mode,
            raw,
        }),
    }
}

#[test]
fn stale_config_fires_when_a_model_serves_bypass_after_a_completed_attach() {
    let oracle = disk_oracle();
    let mem = seam_with(&oracle, Endpoint::Pci(DISK), DmaResolution::Bypassed);
    viommu_driver_takes_over(&oracle);
    // The ATTACH completes as the model announces it...
    state(
        &oracle,
        "viommu0",
        ViommuState::AttachBegin {
            domain: 3,
            bypass: false,
        },
        Some(Endpoint::Pci(DISK)),
    );
    state(
        &oracle,
        "viommu0",
        ViommuState::Attach { domain: 3 },
        Some(Endpoint::Pci(DISK)),
    );
    // ...but the broken model still lets the endpoint bypass.
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x7000)).unwrap();
    let r = oracle.finish(&scratch("stale-virtio")).unwrap();
    only_escape(
        &r,
        EscapeClass::StaleConfig,
        &["pci:0000:00:03.0", "iova 0x7000", "translating domain 3"],
    );
}

#[test]
fn stale_config_fires_when_an_smmu_serves_a_translation_after_cfgi_and_sync() {
    let topo = Topology {
        iommus: vec![IommuTopo::Smmu {
            source: "smmuv3".into(),
            sids: vec![8],
        }],
    };
    let oracle = Oracle::new(topo, OracleConfig::default());
    let ep = Endpoint::Stream { sid: 8, ssid: None };
    let mem = seam_with(&oracle, ep, DmaResolution::Translated { domain: 1 });
    state(&oracle, "smmuv3", SmmuState::SmmuEn { enabled: true }, None);
    state(&oracle, "smmuv3", cfgi_ste(SteMode::Stage1, 0xb), Some(ep));
    state(&oracle, "smmuv3", SmmuState::SyncCompleted, None);
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x3000)).unwrap();
    // The guest writes an abort STE, invalidates it and syncs: the old translation is dead.
    state(&oracle, "smmuv3", cfgi_ste(SteMode::Abort, 1), Some(ep));
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x3008)).unwrap(); // before the SYNC: allowed
    state(&oracle, "smmuv3", SmmuState::SyncCompleted, None);
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x3010)).unwrap();
    let r = oracle.finish(&scratch("stale-smmu")).unwrap();
    only_escape(
        &r,
        EscapeClass::StaleConfig,
        &["sid:0x8", "iova 0x3010", "abort (0x1)"],
    );
}

/// Guest tools name the PCI function (`owner 0000:00:05.0 ...`); the SMMU reports the same
/// function as StreamID = RID. Found by the arm64 ownership scenario: a rogue read through the
/// kernel's identity domain after the claim was not flagged until markers were resolved.
#[test]
fn owner_windows_and_releases_named_by_pci_address_apply_to_the_smmu_stream() {
    const RID: u32 = 0x28; // 00:05.0
    let topo = Topology {
        iommus: vec![IommuTopo::Smmu {
            source: "smmuv3".into(),
            sids: vec![RID],
        }],
    };
    let oracle = Oracle::new(topo, OracleConfig::default());
    let ep = Endpoint::Stream {
        sid: RID,
        ssid: None,
    };
    let mem = seam_with(&oracle, ep, DmaResolution::Bypassed);
    // The device model reports its own state under its PCI address (the oracle's shadow then
    // holds an entry for it too; that must not hide the stream from the markers).
    state(
        &oracle,
        "dma-engine",
        DeviceState::BusMasterEnable { enabled: true },
        Some(Endpoint::Pci(Bdf::new(0, 5, 0))),
    );
    state(&oracle, "smmuv3", SmmuState::SmmuEn { enabled: true }, None);
    state(&oracle, "smmuv3", cfgi_ste(SteMode::Bypass, 0x9), Some(ep));
    state(&oracle, "smmuv3", SmmuState::SyncCompleted, None);
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x6000)).unwrap(); // identity domain: fine
    oracle.marker("owner 0000:00:05.0 user 0x100000-0x102000");
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x6000)).unwrap();
    // A host-armed probe DMA, announced by the device under its PCI address: it is the stream's.
    let engine = Some(Endpoint::Pci(Bdf::new(0, 5, 0)));
    state(
        &oracle,
        "dma-engine",
        DeviceState::RogueDma { iova: 0x7000 },
        engine,
    );
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x7000)).unwrap();
    state(
        &oracle,
        "dma-engine",
        DeviceState::RogueDmaDone { moved: 8 },
        engine,
    );
    oracle.marker("owner 0000:00:05.0 kernel");
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x6008)).unwrap(); // the kernel's again
    let r = oracle.finish(&scratch("owner-smmu")).unwrap();
    // The two reads while user-owned are escapes; the one after the group went back is not.
    assert_eq!(r.escape_count, 2, "{:#?}", r.escapes);
    for (e, iova) in r.escapes.iter().zip(["iova 0x6000", "iova 0x7000"]) {
        assert_eq!(e.class, EscapeClass::WrongDomain, "{}", e.message);
        for n in ["sid:0x28", iova, "[0x100000, 0x102000)"] {
            assert!(e.message.contains(n), "{n:?} missing from {:?}", e.message);
        }
    }
}

#[test]
fn wrong_domain_fires_when_a_model_translates_in_the_domain_the_endpoint_left() {
    let oracle = disk_oracle();
    let mem = seam_with(
        &oracle,
        Endpoint::Pci(DISK),
        DmaResolution::Translated { domain: 1 },
    );
    viommu_driver_takes_over(&oracle);
    let disk = Some(Endpoint::Pci(DISK));
    let begin = |domain| ViommuState::AttachBegin {
        domain,
        bypass: false,
    };
    state(&oracle, "viommu0", begin(1), disk);
    state(&oracle, "viommu0", ViommuState::Attach { domain: 1 }, disk);
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x9000)).unwrap();
    state(&oracle, "viommu0", begin(2), disk);
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x9000)).unwrap(); // in flight: allowed
    state(&oracle, "viommu0", ViommuState::Attach { domain: 2 }, disk);
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x9000)).unwrap();
    let r = oracle.finish(&scratch("wrong-model")).unwrap();
    only_escape(
        &r,
        EscapeClass::WrongDomain,
        &[
            "pci:0000:00:03.0",
            "iova 0x9000",
            "left domain 1",
            "domain 2",
        ],
    );
}

// ---- SMMUv3: an STE changed in memory without CFGI_STE ----

mod smmu {
    use super::*;
    use sluice_devapi::RecordingInterrupts;
    use sluice_smmuv3::Access;
    use sluice_smmuv3::regs::off;
    use sluice_smmuv3::{SmmuConfig, SmmuV3};

    pub const STRTAB: u64 = 0x10_0000;
    pub const CMDQ: u64 = 0x20_0000;
    pub const CMDQ_LOG2: u64 = 8;
    pub const EVTQ: u64 = 0x21_0000;

    pub struct Rig {
        pub mem: GuestMemoryMmap,
        pub smmu: SmmuV3,
    }

    impl Rig {
        pub fn new(hooks: Arc<dyn Hooks>) -> Rig {
            let mem = ram();
            let smmu = SmmuV3::new(
                SmmuConfig::default(),
                Arc::new(RecordingInterrupts::default()),
                hooks,
            );
            let r = Rig { mem, smmu };
            r.w64(off::STRTAB_BASE, STRTAB);
            r.w32(off::STRTAB_BASE_CFG, 6);
            r.w64(off::CMDQ_BASE, CMDQ | CMDQ_LOG2);
            r.w64(off::EVENTQ_BASE, EVTQ | 5);
            r.w32(off::CR0, 0xd);
            r
        }
        pub fn w32(&self, o: u64, v: u64) {
            self.smmu.mmio_write(&self.mem, o, 4, v);
        }
        pub fn w64(&self, o: u64, v: u64) {
            self.smmu.mmio_write(&self.mem, o, 8, v);
        }
        pub fn cmd(&self, d0: u64, d1: u64) {
            let prod = self.smmu.mmio_read(off::CMDQ_PROD, 4);
            let idx = prod & ((1 << CMDQ_LOG2) - 1);
            self.mem
                .write_obj(d0, GuestAddress(CMDQ + idx * 16))
                .unwrap();
            self.mem
                .write_obj(d1, GuestAddress(CMDQ + idx * 16 + 8))
                .unwrap();
            self.w32(off::CMDQ_PROD, (prod + 1) & ((2 << CMDQ_LOG2) - 1));
        }
        pub fn cfgi_ste_and_sync(&self, sid: u32) {
            self.cmd(0x03 | (u64::from(sid) << 32), 1);
            self.cmd(0x46, 0);
        }
        pub fn set_ste_word0(&self, sid: u32, w0: u64) {
            self.mem
                .write_obj(w0, GuestAddress(STRTAB + u64::from(sid) * 64))
                .unwrap();
        }
        pub fn dma(&self, sid: u32, iova: u64) -> bool {
            self.smmu
                .translate(&self.mem, sid, None, iova, 64, Access::READ)
                .is_ok()
        }
    }

    /// Reads STE word 0 from guest memory, as the oracle's unsynced-config check needs.
    pub struct SteProbe(pub GuestMemoryMmap);

    impl ConfigProbe for SteProbe {
        fn config_now(&self, ep: Endpoint) -> Option<SteConfig> {
            let Endpoint::Stream { sid, .. } = ep else {
                return None;
            };
            self.0
                .read_obj::<u64>(GuestAddress(STRTAB + u64::from(sid) * 64))
                .ok()
                .map(sluice_smmuv3::ste::ste_config)
        }
    }
}

#[test]
fn unsynced_config_fires_when_an_ste_changes_in_memory_without_cfgi() {
    const SID: u32 = 5;
    let topo = Topology {
        iommus: vec![IommuTopo::Smmu {
            source: "smmuv3".into(),
            sids: vec![SID],
        }],
    };
    let oracle = Oracle::new(topo, OracleConfig::default());
    let rig = smmu::Rig::new(oracle.clone());
    oracle.add_config_probe(Arc::new(smmu::SteProbe(rig.mem.clone())));
    // A bypass STE, installed properly.
    rig.set_ste_word0(SID, 1 | (4 << 1));
    rig.cfgi_ste_and_sync(SID);
    assert!(rig.dma(SID, 0x4000));
    // The guest writes an abort STE and forgets CFGI_STE: the cached bypass STE is still used.
    rig.set_ste_word0(SID, 1);
    assert!(rig.dma(SID, 0x4040), "the model honours its STE cache");
    // Invalidated and synced: the abort takes effect; the refusal is a fault, not an escape.
    rig.cfgi_ste_and_sync(SID);
    assert!(!rig.dma(SID, 0x4080));
    let r = oracle.finish(&scratch("unsynced")).unwrap();
    only_escape(
        &r,
        EscapeClass::UnsyncedConfig,
        &[
            "sid:0x5",
            "iova 0x4040",
            "bypass (0x9)",
            "abort (0x1)",
            "CFGI_STE",
        ],
    );
    assert_eq!(r.endpoints[0].faulted, 1);
}

// ---- zPCI: DMA after deconfigure ----

#[test]
fn after_release_fires_for_zpci_dma_after_deconfigure() {
    use sluice_zpci::clp::SetPciFnOp;
    use sluice_zpci::{FunctionConfig, Zpci, ZpciOptions};
    const FID: u32 = 0x42;
    let hooks = Arc::new(sluice_devapi::Fanout(Vec::new()));
    // The function index is known once the model exists; build it once to learn it.
    let probe = Zpci::new(
        vec![FunctionConfig {
            fid: FID,
            ..FunctionConfig::default()
        }],
        ZpciOptions::default(),
        hooks,
    )
    .unwrap();
    probe.configure(FID).unwrap();
    let index = (probe.fh_of(FID).unwrap() & 0xffff) as u16;
    let oracle = Oracle::new(
        Topology {
            iommus: vec![IommuTopo::Zpci {
                indexes: vec![index],
            }],
        },
        OracleConfig::default(),
    );
    let z = Zpci::new(
        vec![FunctionConfig {
            fid: FID,
            ..FunctionConfig::default()
        }],
        ZpciOptions::default(),
        oracle.clone(),
    )
    .unwrap();
    let m = ram();
    z.configure(FID).unwrap();
    let fh = z.fh_of(FID).unwrap();
    let fh = z
        .clp_set_pci_fn(fh, SetPciFnOp::Enable { ndas: 1 })
        .unwrap();
    assert!(
        z.translate(&m, fh, 0x1_0000_0000, 8, false).is_err(),
        "no IOAT: a fault"
    );
    z.deconfigure(FID).unwrap();
    assert!(z.translate(&m, fh, 0x1_0000_0000, 8, true).is_err());
    let r = oracle.finish(&scratch("zpci")).unwrap();
    only_escape(
        &r,
        EscapeClass::AfterRelease,
        &[
            &format!("zpci:{index:#06x}"),
            "iova 0x100000000",
            "released",
        ],
    );
    assert!(!r.escapes[0].reached_memory);
    assert_eq!(r.endpoints[0].faulted, 2);
}

// ---- The marker device feeds the timeline and the rules ----

#[test]
fn marker_device_lines_reach_the_oracle() {
    use sluice_pci::PciFunction;
    let v = Viommu::new();
    let o = v.oracle.clone();
    let dev = sluice_marker::MarkerDevice::new(Arc::new(move |l: &str| o.marker(l))).unwrap();
    v.driver_ok();
    v.attach(1, 0);
    v.map(1, 0x10_0000, 0x20_0000);
    for (i, b) in b"phase vfio-claim 0000:00:03.0\nrelease 0000:00:03.0\n"
        .iter()
        .enumerate()
    {
        dev.bar_write(0, i as u64 % 256, &[*b]);
    }
    assert!(v.read(0x10_0000));
    let dir = scratch("marker");
    let r = v.oracle.finish(&dir).unwrap();
    only_escape(
        &r,
        EscapeClass::AfterRelease,
        &["marker \"release 0000:00:03.0\""],
    );
    let text = std::fs::read_to_string(dir.join("timeline.jsonl")).unwrap();
    let events: Vec<sluice_oracle::TimelineEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.iter().any(|e| matches!(&e.kind,
        EventKind::Marker { line, effect } if line == "phase vfio-claim 0000:00:03.0" && effect == "phase")));
    assert!(matches!(
        events.first().map(|e| &e.kind),
        Some(EventKind::Meta { .. })
    ));
    assert!(matches!(
        events.last().map(|e| &e.kind),
        Some(EventKind::Summary(_))
    ));
    // Timestamps never go backwards within a thread.
    let mut last = std::collections::HashMap::new();
    for e in &events[..events.len() - 1] {
        let prev = last.insert(e.tid, e.t).unwrap_or(0);
        assert!(e.t >= prev, "{e:?}");
    }
    assert!(events.iter().any(|e| matches!(&e.kind,
        EventKind::Dma(d) if d.verdict == Verdict::Escape)));
}

#[test]
fn legitimate_dma_is_sampled_and_a_full_buffer_drops_without_blocking() {
    let oracle = Oracle::new(
        Topology::virtio(VIOMMU, vec![DISK]),
        OracleConfig {
            queue_capacity: 16,
            sample_every: 10,
            ..OracleConfig::default()
        },
    );
    let mem = seam_with(&oracle, Endpoint::Pci(DISK), DmaResolution::Bypassed);
    for i in 0..100u64 {
        mem.read_slice(&mut [0u8; 8], GuestAddress(i * 8)).unwrap();
    }
    for i in 0..100 {
        oracle.console_line(&format!("line {i}"));
    }
    let r = oracle.finish(&scratch("sampling")).unwrap();
    assert_eq!(r.endpoints[0].bypassed, 100);
    assert_eq!(r.timeline.unsampled_dmas, 90);
    assert_eq!(r.timeline.sample_every, 10);
    assert!(
        r.timeline.dropped + r.timeline.events >= 100,
        "{:?}",
        r.timeline
    );
    assert!(oracle.finish(&scratch("again")).is_err());
}

#[test]
fn console_lines_can_carry_markers() {
    let v = Viommu::new();
    v.driver_ok();
    v.attach(1, 0);
    v.map(1, 0x10_0000, 0x20_0000);
    v.oracle
        .console_line("[   12.5] sluice-marker: owner 00:03.0 user 0x500000+0x1000\r\n");
    assert!(v.read(0x10_0000));
    let r = v.finish("console");
    only_escape(&r, EscapeClass::WrongDomain, &["0x500000"]);
}

#[test]
fn only_the_callers_hot_points_are_sampled() {
    let hot = ["virtio.blk0.notify", "virtio.blk0.complete"];
    let oracle = Oracle::new(
        Topology::virtio(VIOMMU, vec![DISK]),
        OracleConfig {
            sample_every: 10,
            hot_points: hot.iter().map(|p| p.to_string()).collect(),
            ..OracleConfig::default()
        },
    );
    for _ in 0..50 {
        for p in hot {
            oracle.point(&PointCtx::new(p, 0));
        }
        // a point whose name looks hot, but the caller did not list it: written in full
        oracle.point(&PointCtx::new("virtio.viommu0.notify", 0));
    }
    let dir = scratch("hot-points");
    let r = oracle.finish(&dir).unwrap();
    assert_eq!(
        r.timeline.unsampled_points, 90,
        "one in 10 of the 100 hot arrivals kept"
    );
    let text = std::fs::read_to_string(dir.join("timeline.jsonl")).unwrap();
    let events: Vec<sluice_oracle::TimelineEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |name: &str| {
        events
            .iter()
            .filter(|e| matches!(&e.kind, EventKind::Point { name: n, .. } if n == name))
            .count()
    };
    assert_eq!(count("virtio.viommu0.notify"), 50);
    assert_eq!(
        count("virtio.blk0.notify") + count("virtio.blk0.complete"),
        10
    );
}

#[test]
fn a_completed_request_ends_the_window_of_its_change_and_stays_off_the_timeline() {
    let oracle = disk_oracle();
    let mem = seam_with(
        &oracle,
        Endpoint::Pci(DISK),
        DmaResolution::Translated { domain: 4 },
    );
    let disk = Some(Endpoint::Pci(DISK));
    viommu_driver_takes_over(&oracle);
    state(
        &oracle,
        "viommu0",
        ViommuState::AttachBegin {
            domain: 4,
            bypass: false,
        },
        disk,
    );
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x5000)).unwrap(); // in progress: allowed
    // The request completes without its `attach` (a model that gave up half-way): nothing is
    // in progress any more, and the endpoint was never attached to domain 4.
    oracle.point(&PointCtx::new("virtio-iommu.req.attach", 1));
    state(
        &oracle,
        "viommu0",
        ViommuState::RequestDone {
            request: sluice_devapi::ViommuRequest::Attach,
            domain: 4,
            status: 1,
        },
        disk,
    );
    mem.read_slice(&mut [0u8; 8], GuestAddress(0x5008)).unwrap();
    let dir = scratch("request-done");
    let r = oracle.finish(&dir).unwrap();
    only_escape(
        &r,
        EscapeClass::WrongDomain,
        &["iova 0x5008", "not attached (domain 4)"],
    );
    let text = std::fs::read_to_string(dir.join("timeline.jsonl")).unwrap();
    let events: Vec<sluice_oracle::TimelineEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let states: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::State { what, .. } => Some(what.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        ["driver-ok", "attach-begin"],
        "the point says it already"
    );
    assert!(events.iter().any(|e| matches!(&e.kind,
        EventKind::Point { name, .. } if name == "virtio-iommu.req.attach")));
}
