//! Replays of the Linux arm-smmu-v3 driver: `arm_smmu_device_reset()`, then attach / map /
//! unmap of a stage-1 domain, checking register and memory effects.

mod common;
use common::*;
use sluice_devapi::{DmaOutcome, RecordedInterrupt};
use sluice_smmuv3::regs::off;
use sluice_smmuv3::walk::Granule;
use sluice_smmuv3::{Access, EventType, Fault};

const P1: u64 = 0x1_0000;
const L1TAB: u64 = STRTAB;

/// `arm_smmu_device_reset()` for an SMMU with MSI, no PRI/ATS/HYP, 2-level stream table.
fn linux_reset(rig: &Rig) {
    // CR0 = 0 and wait for ACK.
    rig.w32(off::CR0, 0);
    assert_eq!(rig.r32(off::CR0ACK), 0);
    // CR1: tables and queues inner-shareable write-back.
    let cr1 = (3 << 10) | (1 << 8) | (1 << 6) | (3 << 4) | (1 << 2) | 1;
    rig.w32(off::CR1, cr1);
    // CR2: PTM | RECINVSID.
    rig.w32(off::CR2, 6);
    // Stream table: RA | base; 2-level, SPLIT=8, LOG2SIZE=16.
    rig.w64(off::STRTAB_BASE, (1 << 62) | L1TAB);
    rig.w32(off::STRTAB_BASE_CFG, (1 << 16) | (8 << 6) | 16);
    // Command queue.
    rig.w64(off::CMDQ_BASE, (1 << 62) | CMDQ | CMDQ_LOG2);
    rig.w32(off::CMDQ_PROD, 0);
    rig.w32(off::CMDQ_CONS, 0);
    rig.w32(off::CR0, 1 << 3);
    assert_eq!(rig.r32(off::CR0ACK), 1 << 3);
    // CFGI_ALL + SYNC, TLBI_NSNH_ALL + SYNC.
    rig.cmd(0x04, 31);
    rig.sync();
    rig.cmd(0x30, 0);
    rig.sync();
    // Event queue through page 1.
    rig.w64(off::EVENTQ_BASE, (1 << 62) | EVTQ | EVTQ_LOG2);
    rig.w32(P1 + off::EVENTQ_PROD, 0);
    rig.w32(P1 + off::EVENTQ_CONS, 0);
    rig.w32(off::CR0, (1 << 3) | (1 << 2));
    assert_eq!(rig.r32(off::CR0ACK), 0xc);
    // IRQs: disable, program MSIs, enable EVTQ|GERROR.
    rig.w32(off::IRQ_CTRL, 0);
    assert_eq!(rig.r32(off::IRQ_CTRLACK), 0);
    rig.w64(off::GERROR_IRQ_CFG0, 0xfee0_0000);
    rig.w32(off::GERROR_IRQ_CFG1, 0x41);
    rig.w32(off::GERROR_IRQ_CFG2, 0x1);
    rig.w64(off::EVENTQ_IRQ_CFG0, 0xfee0_1000);
    rig.w32(off::EVENTQ_IRQ_CFG1, 0x42);
    rig.w32(off::EVENTQ_IRQ_CFG2, 0x1);
    rig.w32(off::IRQ_CTRL, 5);
    assert_eq!(rig.r32(off::IRQ_CTRLACK), 5);
    // SMMUEN.
    rig.w32(off::CR0, 0xd);
    assert_eq!(rig.r32(off::CR0ACK), 0xd);
}

#[test]
fn reset_sequence_register_and_memory_effects() {
    let rig = Rig::new();
    // Probe reads.
    let idr0 = rig.r32(off::IDR0);
    assert_eq!(idr0 & 3, 3, "S1P and S2P");
    assert_eq!((idr0 >> 2) & 3, 2, "AArch64 tables");
    assert_eq!((idr0 >> 21) & 3, 2, "little-endian");
    let idr1 = rig.r32(off::IDR1);
    assert_eq!(idr1 & (7 << 28), 0, "no presets / REL");
    assert!((idr1 >> 21) & 0x1f > 6, "CMDQS > 64 entries");
    linux_reset(&rig);
    assert_eq!(rig.r32(off::CR1), 0xd75);
    assert_eq!(rig.r32(off::CR2), 6);
    assert_eq!(rig.r64(off::STRTAB_BASE), (1 << 62) | L1TAB);
    assert_eq!(rig.r32(off::STRTAB_BASE_CFG), (1 << 16) | (8 << 6) | 16);
    assert_eq!(rig.r64(off::CMDQ_BASE), (1 << 62) | CMDQ | CMDQ_LOG2);
    assert_eq!(rig.r32(off::CMDQ_PROD), 4);
    assert_eq!(rig.r32(off::CMDQ_CONS), 4, "all four commands consumed");
    assert_eq!(rig.r32(off::GERROR), 0);
    assert_eq!(rig.r64(off::EVENTQ_IRQ_CFG0), 0xfee0_1000);
    assert_eq!(rig.r32(P1 + off::EVENTQ_PROD), 0);
    assert_eq!(rig.r32(off::GBPA), 0, "GBPA untouched");
    // 32-bit halves of a 64-bit register.
    assert_eq!(rig.r32(off::STRTAB_BASE + 4), 1 << 30);
    // Hooks: every register write was announced, and the commands at completion.
    let points: Vec<String> = rig.hooks.point_names();
    for p in [
        "smmuv3.mmio.write.CR0",
        "smmuv3.mmio.write.STRTAB_BASE",
        "smmuv3.mmio.write.CMDQ_PROD",
    ] {
        assert!(points.iter().any(|x| x == p), "{p}");
    }
    assert_eq!(
        points
            .iter()
            .filter(|p| *p == "smmuv3.cmd.CMD_SYNC")
            .count(),
        2
    );
    assert!(points.iter().any(|p| p == "smmuv3.cmd.CFGI_STE_RANGE"));
    assert!(points.iter().any(|p| p == "smmuv3.cmd.TLBI_NSNH_ALL"));
    assert!(
        rig.hooks
            .state_values()
            .iter()
            .any(|(w, v)| w == "smmuen" && *v == 1)
    );
    // Nothing in the stream table yet: C_BAD_STREAMID, recorded (RECINVSID), MSI sent.
    let f = rig
        .smmu
        .translate(&rig.mem, 0x10, None, 0x1000, 4, Access::READ);
    assert!(matches!(f, Err(Fault::Event { event, .. }) if event.kind == EventType::CBadStreamid));
    assert_eq!(rig.events().len(), 1);
    assert!(rig.irq.take().contains(&RecordedInterrupt::Msi {
        address: 0xfee0_1000,
        data: 0x42
    }));
}

#[test]
fn attach_map_unmap_like_linux() {
    let rig = Rig::new();
    linux_reset(&rig);
    let sid = 0x0108u32; // L1 index 1, L2 index 8.
    // arm_smmu_init_l2_strtab: L2 of 256 STEs, L1 Span = SPLIT + 1.
    let l2 = rig.alloc(256 * 64, 256 * 64);
    rig.write_u64(L1TAB + 8, l2 | 9);
    rig.cfgi_ste(sid);
    rig.sync();
    // Context descriptor, 4K granule, 48-bit VA, ASID 3.
    let pt = Pt::s1(&rig, Granule::G4K, 48);
    let cdaddr = rig.alloc(64, 64);
    rig.write_words(cdaddr, &cd(3, 16, Granule::G4K, pt.root));
    // STE install: V | S1 translate | S1DSS=SSID0 | ctx ptr; CFGI_STE + SYNC.
    rig.write_words(l2 + 8 * 64, &ste_s1(cdaddr, 0, 0, 2));
    rig.cfgi_ste(sid);
    rig.sync();
    let st = rig.hooks.state_values();
    assert!(
        st.iter().any(|(w, v)| w == "cfgi_ste" && *v == 0xb),
        "{st:?}"
    );

    // Map 8 pages at IOVA 0x1_0000_0000.
    let iova = 0x1_0000_0000u64;
    for i in 0..8 {
        pt.map(iova + i * 0x1000, 0x8000_0000 + i * 0x1000, 3, AF);
    }
    let t = rig
        .smmu
        .translate(&rig.mem, sid, None, iova + 0x10, 0x2000, Access::WRITE)
        .unwrap();
    assert_eq!(t.segments.len(), 1, "contiguous pages merge");
    assert_eq!(t.segments[0].pa, 0x8000_0010);
    assert_eq!(t.segments[0].len, 0x2000);
    let dma = *rig.hooks.dmas().last().unwrap();
    assert!(matches!(
        dma.outcome,
        DmaOutcome::Translated {
            gpa: 0x8000_0010,
            ..
        }
    ));
    assert!(rig.smmu.iotlb_len() >= 3);

    // Unmap: clear the PTEs. Without TLBI the old translation is still visible (cached).
    for i in 0..8 {
        rig.write_u64(pt.desc_addr(iova + i * 0x1000, 3), 0);
    }
    assert!(
        rig.smmu
            .translate(&rig.mem, sid, None, iova, 8, Access::READ)
            .is_ok()
    );
    // TLBI_NH_VA range (8 pages: NUM=7, SCALE=0) + CMD_SYNC with MSI completion into the
    // sync entry itself, the way Linux polls.
    let prod = rig.r32(off::CMDQ_PROD);
    let sync_slot = CMDQ + ((prod + 1) & 0xff) * 16;
    rig.cmds(&[
        tlbi_va_range(3, iova, Granule::G4K, 7, 0),
        [0x46 | (1 << 12), sync_slot],
    ]);
    assert_eq!(
        rig.read_u32(sync_slot),
        0,
        "MSI completion wrote MSIDATA=0 over the opcode"
    );
    assert!(rig.irq.take().contains(&RecordedInterrupt::Msi {
        address: sync_slot,
        data: 0
    }));
    for i in 0..8 {
        let r = rig
            .smmu
            .translate(&rig.mem, sid, None, iova + i * 0x1000, 8, Access::READ);
        assert!(
            matches!(r, Err(Fault::Event { event, .. }) if event.kind == EventType::FTranslation)
        );
    }
    let evs = rig.events();
    assert_eq!(evs.len(), 8);
    assert_eq!(evs[0].input_addr, iova);
    assert_eq!(evs[0].sid, sid);

    // Detach to abort (Config=0): stale STE until CFGI + SYNC.
    rig.write_words(l2 + 8 * 64, &[1, 0, 0, 0, 0, 0, 0, 0]);
    pt.map(iova, 0x8000_0000, 3, AF);
    assert!(
        rig.smmu
            .translate(&rig.mem, sid, None, iova, 8, Access::READ)
            .is_ok(),
        "stale STE"
    );
    rig.cfgi_ste(sid);
    rig.sync();
    assert_eq!(
        rig.smmu
            .translate(&rig.mem, sid, None, iova, 8, Access::READ),
        Err(Fault::Abort(sluice_smmuv3::AbortCause::SteAbort))
    );
}
