//! The request engine shared by the device, its worker, tests, benches and the fuzzer:
//! readable bytes + writable length in, reply bytes out, with counters and hook points.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sluice_devapi::{Bdf, Endpoint, Hooks, PointCtx, StateEvent, ViommuRequest, ViommuState};
use vm_memory::GuestMemoryMmap;

use crate::config::ViommuConfig;
use crate::model::{ApplyCtx, Endpoints, Model};
use crate::request::{self, MAX_WRITABLE, Request};
use crate::spec::{Status, T_ATTACH, T_DETACH, T_MAP, T_PROBE, T_UNMAP, TAIL_LEN};
use crate::translate::Shared;
use crate::{POINT_ATTACH, POINT_DETACH, POINT_MAP, POINT_PROBE, POINT_UNMAP};

/// Per-device counters.
#[derive(Debug, Default)]
pub struct ViommuCounters {
    /// Requests by type (ATTACH, DETACH, MAP, UNMAP, PROBE).
    pub requests: [AtomicU64; 5],
    /// Requests returned unwritten (no head/tail, unknown type, malformed chain).
    pub unparsed: AtomicU64,
    /// Replies by status, indexed by wire value.
    pub statuses: [AtomicU64; 9],
    /// Fault records written to the event queue.
    pub events_written: AtomicU64,
    /// Event buffers returned unused (too small or malformed).
    pub event_buffers_bad: AtomicU64,
    /// Used-buffer interrupts raised.
    pub interrupts: AtomicU64,
    /// Doorbells received.
    pub notifies: AtomicU64,
    /// Live domains (gauge).
    pub domains: AtomicU64,
    /// Live mappings (gauge).
    pub mappings: AtomicU64,
}

/// Counter names of [`ViommuCounters::statuses`].
pub const STATUS_COUNTERS: [&str; 9] = [
    "status_ok",
    "status_ioerr",
    "status_unsupp",
    "status_deverr",
    "status_inval",
    "status_range",
    "status_noent",
    "status_fault",
    "status_nomem",
];

/// Counter names of [`ViommuCounters::requests`].
pub const REQUEST_COUNTERS: [&str; 5] = [
    "requests_attach",
    "requests_detach",
    "requests_map",
    "requests_unmap",
    "requests_probe",
];

/// Everything request processing needs; shared between the device and its worker.
pub struct Engine {
    pub(crate) name: String,
    pub(crate) cfg: Arc<ViommuConfig>,
    pub(crate) hooks: Arc<dyn Hooks>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) endpoints: Arc<Endpoints>,
    pub(crate) model: Mutex<Model>,
    pub(crate) counters: ViommuCounters,
    pub(crate) acked: AtomicU64,
    pub(crate) activated: AtomicBool,
}

/// How a request chain is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Return the buffers unwritten, used length 0.
    Unwritten,
    /// Write these bytes (the whole writable part: PROBE properties or zeros, then the tail).
    Write(Vec<u8>),
}

impl Reply {
    /// The status in the tail, if any.
    pub fn status(&self) -> Option<u8> {
        match self {
            Reply::Unwritten => None,
            Reply::Write(b) => b
                .len()
                .checked_sub(TAIL_LEN)
                .and_then(|i| b.get(i))
                .copied(),
        }
    }
}

fn point_of(kind: u8) -> Option<(&'static str, usize)> {
    match kind {
        T_ATTACH => Some((POINT_ATTACH, 0)),
        T_DETACH => Some((POINT_DETACH, 1)),
        T_MAP => Some((POINT_MAP, 2)),
        T_UNMAP => Some((POINT_UNMAP, 3)),
        T_PROBE => Some((POINT_PROBE, 4)),
        _ => None,
    }
}

fn reply(writable_len: u64, status: Status, body: Option<Vec<u8>>) -> Reply {
    let n = usize::try_from(writable_len).unwrap_or(TAIL_LEN);
    let mut out = body.unwrap_or_default();
    out.resize(n.saturating_sub(TAIL_LEN), 0);
    out.extend_from_slice(&[status.code(), 0, 0, 0]);
    Reply::Write(out)
}

impl Engine {
    /// Handles one request. `readable` holds its first readable bytes (up to
    /// [`request::MAX_READABLE`]), `readable_ok` says whether they could all be read from
    /// guest memory, `mem` is the guest RAM MAP targets are checked against.
    pub fn handle(
        &self,
        readable: &[u8],
        readable_len: u64,
        readable_ok: bool,
        writable_len: u64,
        mem: Option<&GuestMemoryMmap>,
    ) -> Reply {
        if !(TAIL_LEN as u64..=MAX_WRITABLE).contains(&writable_len) {
            self.counters.unparsed.fetch_add(1, Ordering::Relaxed);
            return Reply::Unwritten;
        }
        if !readable_ok {
            // The request itself could not be fetched: a virtio communication error.
            return self.finish(None, writable_len, Status::IoErr, None);
        }
        let req = match request::parse(readable, readable_len, writable_len, self.cfg.probe_size) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("virtio-iommu {}: {e}", self.name);
                return match (e.status(), e.kind()) {
                    (Some(status), kind) => {
                        self.count_kind(kind);
                        self.finish(None, writable_len, status, None)
                    }
                    (None, _) => {
                        self.counters.unparsed.fetch_add(1, Ordering::Relaxed);
                        Reply::Unwritten
                    }
                };
            }
        };
        self.count_kind(Some(req.kind()));
        let ctx = ApplyCtx {
            acked: self.acked.load(Ordering::Acquire),
            mem,
        };
        let applied = match self.model.lock() {
            Ok(mut m) => {
                let a = m.apply(&req, &ctx);
                self.counters
                    .domains
                    .store(m.domain_count() as u64, Ordering::Relaxed);
                self.counters
                    .mappings
                    .store(m.mapping_count() as u64, Ordering::Relaxed);
                a
            }
            // A panic elsewhere left the model in an unknown state.
            Err(_) => Status::DevErr.into(),
        };
        self.finish(Some(&req), writable_len, applied.status, applied.probe)
    }

    fn count_kind(&self, kind: Option<u8>) {
        if let Some((_, i)) = kind.and_then(point_of)
            && let Some(c) = self.counters.requests.get(i)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts the status, announces the completion point (no lock held) and, for ATTACH and
    /// DETACH, the typed completion an observer keys its "in progress" state on; builds the
    /// reply.
    fn finish(
        &self,
        req: Option<&Request>,
        writable_len: u64,
        status: Status,
        body: Option<Vec<u8>>,
    ) -> Reply {
        if let Some(c) = self.counters.statuses.get(usize::from(status.code())) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(req) = req
            && let Some(ctx) = point_ctx(req, u64::from(status.code()))
        {
            self.hooks.point(&ctx);
            // After the point: a stall injected there keeps the request in progress.
            if let Some((request, domain, endpoint)) = context_change(req) {
                self.hooks.state(&StateEvent {
                    source: &self.name,
                    endpoint: Some(Endpoint::Pci(Bdf(endpoint as u16))),
                    change: ViommuState::RequestDone {
                        request,
                        domain,
                        status: status.code(),
                    }
                    .into(),
                });
            }
        }
        reply(writable_len, status, body)
    }

    /// Asks the hooks whether the completion of this request (bytes as for
    /// [`Engine::handle`]) is to be deferred. Requests that do not parse are never deferred.
    pub fn defer_for(
        &self,
        readable: &[u8],
        readable_len: u64,
        writable_len: u64,
    ) -> Option<std::time::Duration> {
        let req = request::parse(readable, readable_len, writable_len, self.cfg.probe_size).ok()?;
        self.hooks.defer(&point_ctx(&req, 0)?)
    }
}

/// The request kind, domain and endpoint of an ATTACH or DETACH.
fn context_change(req: &Request) -> Option<(ViommuRequest, u32, u32)> {
    match *req {
        Request::Attach {
            domain, endpoint, ..
        } => Some((ViommuRequest::Attach, domain, endpoint)),
        Request::Detach { domain, endpoint } => Some((ViommuRequest::Detach, domain, endpoint)),
        _ => None,
    }
}

/// The completion point of `req` with its endpoint and domain.
fn point_ctx(req: &Request, value: u64) -> Option<PointCtx<'static>> {
    let (point, _) = point_of(req.kind())?;
    let (endpoint, domain) = match *req {
        Request::Attach {
            domain, endpoint, ..
        }
        | Request::Detach { domain, endpoint } => (Some(endpoint), Some(domain)),
        Request::Map { domain, .. } | Request::Unmap { domain, .. } => (None, Some(domain)),
        Request::Probe { endpoint } => (Some(endpoint), None),
    };
    Some(PointCtx {
        point,
        endpoint: endpoint.map(|e| Endpoint::Pci(Bdf(e as u16))),
        domain,
        value,
    })
}
