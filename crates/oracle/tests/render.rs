//! `render_report`: the table, and SVG timelines that parse as SVG, contain the escape, and
//! render in headless Chromium when it is installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_devapi::{
    Bdf, DeviceState, DmaDirection, DmaOutcome, DmaRecord, Endpoint, Hooks, PointCtx, StateChange,
    StateEvent, ViommuState,
};
use sluice_oracle::{Oracle, OracleConfig, Topology, render_report};

const VIOMMU: Bdf = Bdf::new(0, 2, 0);
const DISK: Bdf = Bdf::new(0, 3, 0);

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-render-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn dma(o: &Oracle, iova: u64, outcome: DmaOutcome) {
    o.dma(&DmaRecord {
        endpoint: Endpoint::Pci(DISK),
        iova,
        len: 4096,
        direction: DmaDirection::Write,
        outcome,
    });
}

/// A run with a late IOMMU: legitimate bypass, takeover, a delay, an escape, then an attach and
/// dma-direct faults.
fn run(dir: &Path) -> Arc<Oracle> {
    let o = Oracle::new(
        Topology::virtio(VIOMMU, vec![DISK]),
        OracleConfig::default(),
    );
    o.console_line("[    1.0] virtio_blk virtio1: [vda] 65536 512-byte logical blocks");
    for i in 0..5 {
        dma(&o, 0x10_0000 + i * 0x1000, DmaOutcome::Bypassed);
    }
    o.marker("phase load-virtio-iommu");
    o.point(&PointCtx::new("virtio.viommu0.status", 0xf));
    std::thread::sleep(Duration::from_millis(2));
    o.record_delay(
        "virtio.viommu0.status",
        Some(Endpoint::Pci(VIOMMU)),
        Duration::from_millis(1),
    );
    o.state(&StateEvent {
        source: "virtio-pci",
        endpoint: Some(Endpoint::Pci(VIOMMU)),
        change: DeviceState::DriverOk { usable: true }.into(),
    });
    let o2 = o.clone();
    std::thread::Builder::new()
        .name("vcpu1-blk0".into())
        .spawn(move || dma(&o2, 0x10_5000, DmaOutcome::Bypassed))
        .unwrap()
        .join()
        .unwrap();
    let attach: [StateChange; 2] = [
        ViommuState::AttachBegin {
            domain: 1,
            bypass: false,
        }
        .into(),
        ViommuState::Attach { domain: 1 }.into(),
    ];
    for change in attach {
        o.state(&StateEvent {
            source: "viommu0",
            endpoint: Some(Endpoint::Pci(DISK)),
            change,
        });
    }
    dma(&o, 0x10_6000, DmaOutcome::Faulted { reason: 2 });
    dma(
        &o,
        0xffff_f000,
        DmaOutcome::Translated {
            gpa: 0x20_0000,
            domain: 1,
        },
    );
    let r = o.finish(dir).unwrap();
    assert_eq!(r.escape_count, 1);
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "escapes": r.escapes,
            "endpoints": r.endpoints,
        }))
        .unwrap(),
    )
    .unwrap();
    o
}

#[test]
fn report_table_and_svg_timeline() {
    let dir = scratch("svg");
    run(&dir);
    let (text, svgs) = render_report(&dir).unwrap();
    println!("{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("pci:0000:00:03.0"))
        .expect("a row for the disk");
    let cells: Vec<&str> = row.split_whitespace().collect();
    // endpoint, "virtio-iommu", "0000:00:02.0", translated, bypassed, faulted, 5 classes
    assert_eq!(
        &cells[3..],
        ["1", "6", "1", "1", "0", "0", "0", "0"],
        "{row}"
    );
    assert!(text.contains("bypass-after-takeover"));
    assert!(text.contains("1 escape(s), 1 fault(s)"));
    assert_eq!(svgs.len(), 1);
    let svg = std::fs::read_to_string(&svgs[0]).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    assert!(
        doc.descendants()
            .any(|n| n.attribute("id") == Some("escape")),
        "the escape is marked"
    );
    let texts: String = doc
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect();
    for needle in [
        "ESCAPE bypass-after-takeover",
        "pci:0000:00:03.0",
        "(thread vcpu1-blk0)",
        "guest markers",
        "iova 0x105000",
    ] {
        assert!(texts.contains(needle), "{needle:?} not in the SVG");
    }
    // The delay is a bar.
    assert!(doc.descendants().any(|n| {
        n.tag_name().name() == "rect"
            && n.children()
                .any(|c| c.text().is_some_and(|t| t.contains("\"delay\"")))
    }));
}

#[test]
fn report_without_report_json_uses_the_timeline_summary() {
    let dir = scratch("nojson");
    run(&dir);
    std::fs::remove_file(dir.join("report.json")).unwrap();
    let (text, _) = render_report(&dir).unwrap();
    assert!(text.contains("pci:0000:00:03.0"), "{text}");
    assert!(render_report(&scratch("missing")).is_err());
}

#[test]
fn svg_renders_in_headless_chromium() {
    let Some(chromium) = ["chromium", "chromium-browser"]
        .iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .copied()
    else {
        println!("SKIPPED: no chromium");
        return;
    };
    let dir = scratch("chromium");
    run(&dir);
    let (_, svgs) = render_report(&dir).unwrap();
    let png = dir.join("escape.png");
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,700",
        ])
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", svgs[0].display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("error on line"),
        "SVG parse error: {stderr}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG was written");
    assert!(bytes.len() > 5_000, "not blank ({} bytes)", bytes.len());
}
