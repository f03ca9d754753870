//! `sluice report RUN_DIR`: the per-endpoint table and one SVG timeline around each escape.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::oracle::TIMELINE_FILE;
use crate::report::{ClassCounts, EndpointReport};
use crate::timeline::{EscapeClass, EventKind, TimelineEvent, Verdict};

/// Most SVGs written for one run (the first escape of each class and endpoint comes first).
pub const MAX_SVGS: usize = 20;
/// Events shown before an escape.
const SVG_CONTEXT: usize = 60;

/// Reading a run directory failed.
#[derive(Debug, Error)]
pub enum RenderError {
    /// `timeline.jsonl` is missing or unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An SVG cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Reads `RUN_DIR/timeline.jsonl`; returns its records and how many lines did not parse.
pub fn read_timeline(run_dir: &Path) -> Result<(Vec<TimelineEvent>, usize), RenderError> {
    let path = run_dir.join(TIMELINE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| RenderError::Read {
        path: path.clone(),
        source,
    })?;
    let mut bad = 0;
    let events = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| match serde_json::from_str(l) {
            Ok(e) => Some(e),
            Err(_) => {
                bad += 1;
                None
            }
        })
        .collect();
    Ok((events, bad))
}

/// Per-endpoint counters: `report.json`'s `endpoints` if present, else the timeline's summary
/// record, else counted from the timeline itself (sampled DMAs weighted by their period).
fn endpoint_rows(run_dir: &Path, events: &[TimelineEvent]) -> Vec<EndpointReport> {
    let from_report = std::fs::read_to_string(run_dir.join("report.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("endpoints").cloned())
        .and_then(|v| serde_json::from_value::<Vec<EndpointReport>>(v).ok());
    if let Some(rows) = from_report {
        return rows;
    }
    if let Some(s) = events.iter().rev().find_map(|e| match &e.kind {
        EventKind::Summary(s) => Some(s.endpoints.clone()),
        _ => None,
    }) {
        return s;
    }
    let mut rows: BTreeMap<String, (EndpointReport, [u64; 5])> = BTreeMap::new();
    for e in events {
        let EventKind::Dma(d) = &e.kind else { continue };
        let (row, esc) = rows.entry(d.endpoint.clone()).or_insert_with(|| {
            (
                EndpointReport {
                    endpoint: d.endpoint.clone(),
                    ..Default::default()
                },
                [0; 5],
            )
        });
        let n = d.sampled.unwrap_or(1);
        match d.outcome.as_str() {
            "translated" => row.translated += n,
            "faulted" => row.faulted += n,
            _ => row.bypassed += n,
        }
        if let Some(c) = d.class
            && let Some(x) = esc.get_mut(c.index())
        {
            *x += 1;
        }
    }
    rows.into_values()
        .map(|(mut r, esc)| {
            r.escapes = ClassCounts::from_array(esc);
            r
        })
        .collect()
}

/// The per-endpoint summary table.
pub fn summary_table(rows: &[EndpointReport]) -> String {
    let mut head = vec![
        "endpoint".to_string(),
        "iommu".into(),
        "translated".into(),
        "bypassed".into(),
        "faulted".into(),
    ];
    head.extend(EscapeClass::ALL.iter().map(|c| c.name().to_string()));
    let mut table = vec![head];
    for r in rows {
        let mut row = vec![
            r.endpoint.clone(),
            r.iommu.clone().unwrap_or_else(|| "-".into()),
            r.translated.to_string(),
            r.bypassed.to_string(),
            r.faulted.to_string(),
        ];
        row.extend(
            EscapeClass::ALL
                .iter()
                .map(|c| r.escapes.get(*c).to_string()),
        );
        table.push(row);
    }
    let cols = table.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            table
                .iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i < 2 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Reads a run directory, returns the summary text and writes `escape-N-CLASS.svg` next to the
/// timeline for the escapes found (at most [`MAX_SVGS`]).
pub fn render_report(run_dir: &Path) -> Result<(String, Vec<PathBuf>), RenderError> {
    let (events, bad) = read_timeline(run_dir)?;
    let rows = endpoint_rows(run_dir, &events);
    let mut text = summary_table(&rows);
    let escapes: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(&e.kind, EventKind::Dma(d) if d.verdict == Verdict::Escape))
        .map(|(i, _)| i)
        .collect();
    let faults = events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::Dma(d) if d.verdict == Verdict::Fault))
        .count();
    let _ = writeln!(
        text,
        "\n{} escape(s), {} fault(s) logged{}",
        escapes.len(),
        faults,
        if bad > 0 {
            format!(", {bad} unreadable timeline line(s)")
        } else {
            String::new()
        }
    );
    // The first escape of each (class, endpoint) first, then the rest in time order.
    let mut seen = std::collections::HashSet::new();
    let (mut first, mut rest): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for &i in &escapes {
        if let Some(EventKind::Dma(d)) = events.get(i).map(|e| &e.kind) {
            if seen.insert((d.class, d.endpoint.clone())) {
                first.push(i);
            } else {
                rest.push(i);
            }
        }
    }
    first.extend(rest);
    first.truncate(MAX_SVGS);
    first.sort_unstable();
    let mut svgs = Vec::new();
    for (n, &i) in first.iter().enumerate() {
        let Some(EventKind::Dma(d)) = events.get(i).map(|e| &e.kind) else {
            continue;
        };
        let class = d.class.map_or("escape", EscapeClass::name);
        let path = run_dir.join(format!("escape-{}-{class}.svg", n + 1));
        let svg = escape_svg(&events, i);
        std::fs::write(&path, svg).map_err(|source| RenderError::Write {
            path: path.clone(),
            source,
        })?;
        let t = events.get(i).map_or(0, |e| e.t);
        let _ = writeln!(
            text,
            "  #{} t={} {}\n      -> {}",
            n + 1,
            crate::shadow::secs(t),
            d.message.as_deref().unwrap_or(class),
            path.display()
        );
        svgs.push(path);
    }
    Ok((text, svgs))
}

/// XML-escapes text for SVG.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut o: String = s.chars().take(n.saturating_sub(1)).collect();
        o.push('…');
        o
    }
}

/// Lane of an event, label of its mark, colour, and the tooltip.
fn lane_of(
    e: &TimelineEvent,
    threads: &BTreeMap<u32, String>,
) -> Option<(String, String, &'static str)> {
    let thread = || {
        format!(
            "thread {}",
            threads
                .get(&e.tid)
                .cloned()
                .unwrap_or_else(|| e.tid.to_string())
        )
    };
    Some(match &e.kind {
        EventKind::Point { name, .. } => (thread(), name.clone(), "#4a6fa5"),
        EventKind::Delay { point, .. } => (thread(), format!("delay {point}"), "#e08a00"),
        EventKind::Console { line } => ("guest console".into(), line.clone(), "#777777"),
        EventKind::Marker { line, .. } => ("guest markers".into(), line.clone(), "#7a3fa0"),
        EventKind::State {
            source,
            what,
            endpoint,
            value,
        } => (
            match endpoint {
                Some(ep) => format!("device {ep}"),
                None => format!("device {source}"),
            },
            format!("{what} {value:#x}"),
            "#2e8b57",
        ),
        EventKind::Invalidated {
            source,
            what,
            first,
            last,
            ..
        } => (
            format!("device {source}"),
            format!("{what} [{first:#x}, {last:#x}]"),
            "#b8860b",
        ),
        EventKind::Mapped {
            source,
            context,
            first,
            last,
        } => (
            format!("device {source}"),
            format!("MAP {context} [{first:#x}, {last:#x}]"),
            "#2e8b57",
        ),
        EventKind::Dma(d) => (
            format!("device {}", d.endpoint),
            format!("{} {} {:#x}", d.dir, d.outcome, d.iova),
            match d.verdict {
                Verdict::Escape => "#d00000",
                Verdict::Fault => "#c06000",
                Verdict::Ok => "#9aa5b1",
            },
        ),
        EventKind::Meta { .. } | EventKind::Thread { .. } | EventKind::Summary(_) => return None,
    })
}

fn tooltip(e: &TimelineEvent) -> String {
    let body = serde_json::to_string(&e.kind).unwrap_or_default();
    format!("t={} {}", crate::shadow::secs(e.t), body)
}

/// The SVG timeline around the escape at `events[at]`.
pub fn escape_svg(events: &[TimelineEvent], at: usize) -> String {
    let threads: BTreeMap<u32, String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Thread { name } => Some((e.tid, name.clone())),
            _ => None,
        })
        .collect();
    let Some(x_ev) = events.get(at) else {
        return String::new();
    };
    let t_esc = x_ev.t;
    // Context: the last SVG_CONTEXT shown events up to the escape, and a little after.
    let mut shown: Vec<&TimelineEvent> = events
        .get(..at)
        .unwrap_or(&[])
        .iter()
        .filter(|e| lane_of(e, &threads).is_some())
        .rev()
        .take(SVG_CONTEXT)
        .collect();
    shown.reverse();
    let delay_start = |e: &TimelineEvent| match &e.kind {
        EventKind::Delay { dur_ns, .. } => e.t.saturating_sub(*dur_ns),
        _ => e.t,
    };
    let t0 = shown
        .iter()
        .map(|e| delay_start(e))
        .min()
        .unwrap_or(t_esc)
        .min(t_esc);
    let span = (t_esc - t0).max(1_000);
    let t1 = t_esc + span / 6 + 500;
    let after: Vec<&TimelineEvent> = events
        .get(at..)
        .unwrap_or(&[])
        .iter()
        .filter(|e| e.t <= t1 && lane_of(e, &threads).is_some())
        .take(20)
        .collect();
    shown.extend(after);
    // Lanes: threads (vCPUs / device servers) first, then the guest, then devices.
    let mut lanes: Vec<String> = Vec::new();
    for e in &shown {
        if let Some((lane, _, _)) = lane_of(e, &threads)
            && !lanes.contains(&lane)
        {
            lanes.push(lane);
        }
    }
    let rank = |l: &String| match l.split(' ').next() {
        Some("thread") => 0,
        Some("guest") => 1,
        _ => 2,
    };
    lanes.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.cmp(b)));
    let (class, message) = match &x_ev.kind {
        EventKind::Dma(d) => (
            d.class.map_or("escape", EscapeClass::name).to_string(),
            d.message.clone().unwrap_or_default(),
        ),
        _ => ("escape".into(), String::new()),
    };
    let msg_rows = message.chars().count().div_ceil(180).clamp(1, 3);
    let (left, width, lane_h) = (260.0_f64, 1400.0_f64, 34.0_f64);
    let top = 56.0 + 14.0 * msg_rows as f64;
    let plot = width - left - 60.0;
    let height = top + lane_h * lanes.len() as f64 + 90.0;
    let x = |t: u64| left + (t.saturating_sub(t0) as f64 / (t1 - t0) as f64) * plot;
    let y = |lane: &str| top + lane_h * lanes.iter().position(|l| l == lane).unwrap_or(0) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">"##
    );
    let _ = writeln!(
        s,
        r##"<title>escape {} at {}</title>"##,
        esc(&class),
        crate::shadow::secs(t_esc)
    );
    let _ = writeln!(
        s,
        r##"<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="22" font-size="15" font-weight="bold" fill="#d00000">ESCAPE {} at t={} (thread {})</text>"##,
        esc(&class),
        esc(&crate::shadow::secs(t_esc)),
        esc(&threads
            .get(&x_ev.tid)
            .cloned()
            .unwrap_or_else(|| x_ev.tid.to_string()))
    );
    let msg_lines: Vec<String> = message
        .chars()
        .collect::<Vec<_>>()
        .chunks(180)
        .take(3)
        .map(|c| c.iter().collect())
        .collect();
    for (i, l) in msg_lines.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<text x="10" y="{}" fill="#333">{}</text>"##,
            42 + 14 * i,
            esc(l)
        );
    }
    for (i, lane) in lanes.iter().enumerate() {
        let ly = top + lane_h * i as f64;
        let fill = if i % 2 == 0 { "#f4f6f8" } else { "#ffffff" };
        let _ = writeln!(
            s,
            r##"<rect x="0" y="{ly}" width="{width}" height="{lane_h}" fill="{fill}"/><text x="8" y="{}" fill="#222">{}</text>"##,
            ly + lane_h / 2.0 + 4.0,
            esc(&short(lane, 36))
        );
    }
    // Time axis, relative to the escape.
    let axis_y = top + lane_h * lanes.len() as f64 + 18.0;
    for k in 0..=8u64 {
        let t = t0 + (t1 - t0) * k / 8;
        let rel = t as f64 - t_esc as f64;
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{top}" x2="{x0}" y2="{axis_y}" stroke="#ddd"/><text x="{x0}" y="{}" text-anchor="middle" fill="#555">{:+.3} ms</text>"##,
            axis_y + 14.0,
            rel / 1e6,
            x0 = x(t)
        );
    }
    let mut labels: BTreeMap<String, usize> = BTreeMap::new();
    for e in &shown {
        let Some((lane, label, colour)) = lane_of(e, &threads) else {
            continue;
        };
        let ly = y(&lane);
        let tip = esc(&tooltip(e));
        if let EventKind::Delay { .. } = &e.kind {
            let (a, b) = (x(delay_start(e)), x(e.t));
            let _ = writeln!(
                s,
                r##"<rect x="{a}" y="{}" width="{}" height="{}" fill="{colour}" opacity="0.7"><title>{tip}</title></rect>"##,
                ly + 6.0,
                (b - a).max(2.0),
                lane_h - 12.0
            );
            continue;
        }
        let ex = x(e.t);
        let _ = writeln!(
            s,
            r##"<circle cx="{ex}" cy="{}" r="4" fill="{colour}"><title>{tip}</title></circle>"##,
            ly + lane_h / 2.0
        );
        let labelled = matches!(
            &e.kind,
            EventKind::State { .. }
                | EventKind::Marker { .. }
                | EventKind::Delay { .. }
                | EventKind::Invalidated { .. }
        ) || matches!(&e.kind, EventKind::Dma(d) if d.verdict == Verdict::Fault);
        if labelled {
            // Alternate above / below the mark so neighbours do not overprint each other.
            let n = labels.entry(lane.clone()).or_insert(0usize);
            let dy = if n.is_multiple_of(2) {
                10.0
            } else {
                lane_h - 3.0
            };
            *n += 1;
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" fill="{colour}" font-size="9">{}</text>"##,
                ex + 5.0,
                ly + dy,
                esc(&short(&label, 28))
            );
        }
    }
    // The escape itself.
    let ex = x(t_esc);
    let esc_lane = lane_of(x_ev, &threads).map(|l| l.0).unwrap_or_default();
    let ey = y(&esc_lane) + lane_h / 2.0;
    let _ = writeln!(
        s,
        r##"<line id="escape-line" x1="{ex}" y1="{}" x2="{ex}" y2="{axis_y}" stroke="#d00000" stroke-width="2" stroke-dasharray="5,3"/>"##,
        top - 8.0
    );
    let _ = writeln!(
        s,
        r##"<path id="escape" d="M {ex} {} L {} {ey} L {ex} {} L {} {ey} Z" fill="#d00000"><title>{}</title></path>"##,
        ey - 9.0,
        ex + 9.0,
        ey + 9.0,
        ex - 9.0,
        esc(&tooltip(x_ev))
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" fill="#d00000" font-weight="bold">{}</text>"##,
        ex + 6.0,
        top - 10.0,
        esc(&class)
    );
    let ly = axis_y + 36.0;
    let legend = [
        ("#4a6fa5", "point"),
        ("#2e8b57", "state"),
        ("#9aa5b1", "DMA ok (sampled)"),
        ("#c06000", "DMA fault"),
        ("#d00000", "escape"),
        ("#e08a00", "injected delay"),
        ("#7a3fa0", "marker"),
        ("#777777", "console"),
    ];
    for (i, (c, name)) in legend.iter().enumerate() {
        let lx = 10.0 + 150.0 * i as f64;
        let _ = writeln!(
            s,
            r##"<circle cx="{lx}" cy="{ly}" r="5" fill="{c}"/><text x="{}" y="{}" fill="#333">{name}</text>"##,
            lx + 9.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}
