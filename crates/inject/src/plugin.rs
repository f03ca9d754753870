//! Host side of the `sluice-stall` QEMU TCG plugin (`guest-images/qemu/plugin/`): the Unix
//! socket it connects to, the watch list it gets at start, and one decision per hit through
//! the same rules as every other point (vCPU filter included).
//!
//! Protocol (text lines): the plugin's control connection sends `HELLO 1 <max_vcpus>` and
//! receives `WATCH <hex addr>`... `END`; it stays open until QEMU exits. Each vCPU thread opens
//! its own connection at its first hit and sends `HIT <vcpu> <hex addr> <tb counts>`; the
//! server answers `GO` after the planned delay (at once when no rule fires), and the plugin
//! then sends `LEFT <vcpu> <hex addr> <tb counts>` (TB counts: translation blocks executed
//! by every vCPU so far, comma separated; how the other vCPUs progressed during a stall).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sluice_devapi::PointCtx;

use crate::engine::Injector;
use crate::plan::Mode;

/// Hits kept in [`PluginServer::hits`]; later hits are only counted.
pub const MAX_HITS_KEPT: usize = 10_000;

/// One execution of a watched guest address.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestHit {
    /// vCPU index.
    pub vcpu: u32,
    /// Guest virtual address.
    pub addr: u64,
    /// Point name (`guest.sym.<symbol>[+off]`).
    pub point: String,
    /// Delay applied (None: no rule fired, released at once).
    pub delay: Option<Duration>,
    /// When the hit arrived.
    pub arrived: Instant,
    /// When the plugin said the vCPU runs on again.
    pub left: Option<Instant>,
    /// TBs executed per vCPU at the hit.
    pub tb_before: Vec<u64>,
    /// TBs executed per vCPU when released.
    pub tb_after: Vec<u64>,
}

impl GuestHit {
    /// Translation blocks each vCPU executed while this one was held (empty until `LEFT`).
    pub fn progress(&self) -> Vec<u64> {
        self.tb_after
            .iter()
            .zip(&self.tb_before)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect()
    }
}

#[derive(Default)]
struct Shared {
    hits: Vec<GuestHit>,
    total_hits: u64,
    handshakes: u32,
    errors: Vec<String>,
}

/// The socket server the plugin talks to. Dropping it stops accepting and removes the socket.
pub struct PluginServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PluginServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginServer")
            .field("path", &self.path)
            .finish()
    }
}

/// The QEMU arguments that load the plugin and point it at `sock`.
pub fn qemu_args(plugin_so: &Path, sock: &Path) -> Vec<String> {
    vec![
        "-plugin".into(),
        format!("{},sock={}", plugin_so.display(), sock.display()),
    ]
}

/// The plugin built by `guest-images/qemu/build-qemu.sh`, if `SLUICE_QEMU_PLUGIN` names one
/// or it sits in the cache next to `qemu` (`<qemu dir>/plugin-*/libsluice-stall.so`).
pub fn find_plugin(qemu: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_QEMU_PLUGIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let dir = qemu?.parent()?;
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("plugin-"))
        .map(|e| e.path().join("libsluice-stall.so"))
        .filter(|p| p.is_file())
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

impl PluginServer {
    /// Listens on `sock` (replacing a stale file) and serves the plugin with `injector`'s
    /// guest.sym rules. Start it before QEMU.
    pub fn start(sock: &Path, injector: Arc<Injector>) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(sock);
        let listener = UnixListener::bind(sock)?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let watch: Arc<HashMap<u64, String>> =
            Arc::new(injector.guest_watch().into_iter().collect());
        let (st, sh) = (stop.clone(), shared.clone());
        let accept = std::thread::Builder::new()
            .name("inject-plugin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (inj, w, sh) = (injector.clone(), watch.clone(), sh.clone());
                    let _ = std::thread::Builder::new()
                        .name("inject-vcpu".into())
                        .spawn(move || {
                            if let Err(e) = serve(conn, &inj, &w, &sh) {
                                lock(&sh).errors.push(e.to_string());
                            }
                        });
                }
            })?;
        Ok(PluginServer {
            path: sock.to_path_buf(),
            stop,
            shared,
            accept: Some(accept),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// QEMU arguments for `plugin_so` talking to this server.
    pub fn qemu_args(&self, plugin_so: &Path) -> Vec<String> {
        qemu_args(plugin_so, &self.path)
    }

    /// Hits so far (at most [`MAX_HITS_KEPT`]).
    pub fn hits(&self) -> Vec<GuestHit> {
        lock(&self.shared).hits.clone()
    }

    /// All hits, including those not kept.
    pub fn total_hits(&self) -> u64 {
        lock(&self.shared).total_hits
    }

    /// Plugin instances that completed the handshake.
    pub fn handshakes(&self) -> u32 {
        lock(&self.shared).handshakes
    }

    /// Protocol or I/O errors seen.
    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared).errors.clone()
    }
}

impl Drop for PluginServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop with a connection of our own. If the socket file is already
        // gone that is impossible: the thread is left blocked in accept() (it holds only the
        // listener) rather than hanging this drop.
        if UnixStream::connect(&self.path).is_ok()
            && let Some(h) = self.accept.take()
        {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn counts(s: Option<&str>) -> Vec<u64> {
    s.map(|s| s.split(',').filter_map(|c| c.parse().ok()).collect())
        .unwrap_or_default()
}

fn bad(line: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("plugin sent `{line}`"),
    )
}

/// One connection: the control handshake, or a vCPU's hits.
fn serve(
    conn: UnixStream,
    inj: &Injector,
    watch: &HashMap<u64, String>,
    shared: &Mutex<Shared>,
) -> std::io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut lines = BufReader::new(conn).lines();
    let mut pending: Option<usize> = None;
    while let Some(line) = lines.next().transpose()? {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("HELLO") => {
                let mut msg = String::new();
                let mut addrs: Vec<&u64> = watch.keys().collect();
                addrs.sort();
                for a in addrs {
                    msg.push_str(&format!("WATCH {a:x}\n"));
                }
                msg.push_str("END\n");
                out.write_all(msg.as_bytes())?;
                lock(shared).handshakes += 1;
                // Keep the connection until QEMU closes it.
            }
            Some("HIT") => {
                let vcpu: u32 = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad(&line))?;
                let addr = it
                    .next()
                    .and_then(|a| u64::from_str_radix(a, 16).ok())
                    .ok_or_else(|| bad(&line))?;
                let arrived = Instant::now();
                let point = watch
                    .get(&addr)
                    .cloned()
                    .unwrap_or_else(|| format!("guest.addr.{addr:x}"));
                let delay = inj.decide(&PointCtx::new(&point, addr), Some(vcpu), Mode::Stall);
                {
                    let mut s = lock(shared);
                    s.total_hits += 1;
                    if s.hits.len() < MAX_HITS_KEPT {
                        s.hits.push(GuestHit {
                            vcpu,
                            addr,
                            point,
                            delay,
                            arrived,
                            left: None,
                            tb_before: counts(it.next()),
                            tb_after: Vec::new(),
                        });
                        pending = Some(s.hits.len() - 1);
                    }
                }
                if let Some(d) = delay {
                    std::thread::sleep(d.saturating_sub(arrived.elapsed()));
                }
                out.write_all(b"GO\n")?;
            }
            Some("LEFT") => {
                let (_, _) = (it.next(), it.next());
                let after = counts(it.next());
                if let Some(i) = pending.take()
                    && let Some(h) = lock(shared).hits.get_mut(i)
                {
                    h.left = Some(Instant::now());
                    h.tb_after = after;
                }
            }
            _ => return Err(bad(&line)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Plan;
    use crate::registry::{PointRegistry, SymbolMap};

    /// Plays the plugin's side of the protocol against a real server.
    #[test]
    fn protocol_round_trip_with_vcpu_filter() {
        let mut r = PointRegistry::new();
        r.set_symbols(SymbolMap::parse("ffffffff81000010 T bus_iommu_probe\n"));
        let plan = r
            .validate(
                &Plan::parse_cli("guest.sym.bus_iommu_probe:delay=50ms,vcpu=1,count=1").unwrap(),
            )
            .unwrap();
        let inj = Arc::new(Injector::new(plan));
        let dir = std::env::temp_dir().join(format!("inject-plugin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s");
        let srv = PluginServer::start(&sock, inj).unwrap();
        let ctl = UnixStream::connect(&sock).unwrap();
        (&ctl).write_all(b"HELLO 1 2\n").unwrap();
        let mut rd = BufReader::new(ctl.try_clone().unwrap());
        let mut l = String::new();
        rd.read_line(&mut l).unwrap();
        assert_eq!(l, "WATCH ffffffff81000010\n");
        l.clear();
        rd.read_line(&mut l).unwrap();
        assert_eq!(l, "END\n");
        let hit = |vcpu: u32| {
            let c = UnixStream::connect(&sock).unwrap();
            let t = Instant::now();
            (&c).write_all(format!("HIT {vcpu} ffffffff81000010 5,7\n").as_bytes())
                .unwrap();
            let mut rd = BufReader::new(c.try_clone().unwrap());
            let mut l = String::new();
            rd.read_line(&mut l).unwrap();
            assert_eq!(l, "GO\n");
            let held = t.elapsed();
            (&c).write_all(format!("LEFT {vcpu} ffffffff81000010 9,70\n").as_bytes())
                .unwrap();
            held
        };
        // Order and counts, not short wall times (the host may be loaded): only the second HIT
        // (vCPU 1, first match) is held, and a sleep never returns early.
        hit(0);
        assert!(hit(1) >= Duration::from_millis(50));
        hit(1);
        // The server records LEFT asynchronously: poll for it, bounded.
        let deadline = Instant::now() + Duration::from_secs(10);
        let hits = loop {
            let hits = srv.hits();
            if hits.len() == 3 && hits.iter().all(|h| h.left.is_some()) {
                break hits;
            }
            assert!(Instant::now() < deadline, "LEFT not recorded: {hits:?}");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(hits[0].delay, None, "vCPU 0 is not filtered in");
        assert_eq!(hits[2].delay, None, "count=1");
        assert_eq!(srv.handshakes(), 1);
        assert_eq!(hits[1].delay, Some(Duration::from_millis(50)));
        assert_eq!(hits[1].progress(), vec![4, 63]);
        assert!(srv.errors().is_empty(), "{:?}", srv.errors());
        drop(srv);
        assert!(!sock.exists());
    }
}
