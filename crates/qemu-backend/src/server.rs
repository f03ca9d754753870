//! Serving one device over its proxy socket: the remote half of `x-pci-proxy-dev`.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sluice_host::HostedDevice;
use sluice_virtio_pci::SharedMemory;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::channel::{Channel, ChannelError};
use crate::memory::{MemoryMapError, map_regions};
use crate::protocol::{FAILED, Request};

const CONFIG_SPACE: u32 = 256;
const RESAMPLE_POLL: Duration = Duration::from_millis(100);

/// Why serving a device stopped abnormally.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The connection broke or carried a malformed message.
    #[error("device {device}: {source}")]
    Channel {
        /// Device name.
        device: String,
        /// Cause.
        #[source]
        source: ChannelError,
    },
    /// Guest memory could not be mapped.
    #[error("device {device}: {source}")]
    Memory {
        /// Device name.
        device: String,
        /// Cause.
        #[source]
        source: MemoryMapError,
    },
}

/// Counters of one connection.
#[derive(Debug, Default)]
pub struct ServeStats {
    /// Config-space accesses.
    pub config_accesses: AtomicU64,
    /// BAR accesses.
    pub bar_accesses: AtomicU64,
    /// Accesses answered with all-ones because they were out of range or malformed.
    pub rejected_accesses: AtomicU64,
    /// Memory-map updates.
    pub memory_syncs: AtomicU64,
    /// INTx resamples seen.
    pub resamples: AtomicU64,
}

/// The remote end of one proxy device.
pub struct DeviceServer {
    channel: Channel,
    device: HostedDevice,
    mem: SharedMemory,
    stats: Arc<ServeStats>,
    stop: Arc<AtomicBool>,
}

fn valid_access(size: u32) -> bool {
    matches!(size, 1 | 2 | 4 | 8)
}

impl DeviceServer {
    /// Serves `device` on `sock`.
    pub fn new(
        sock: UnixStream,
        device: HostedDevice,
        mem: SharedMemory,
        stop: Arc<AtomicBool>,
    ) -> Self {
        DeviceServer {
            channel: Channel::new(sock),
            device,
            mem,
            stats: Arc::new(ServeStats::default()),
            stop,
        }
    }

    /// Shared counters.
    pub fn stats(&self) -> Arc<ServeStats> {
        self.stats.clone()
    }

    fn err(&self, source: ChannelError) -> ServeError {
        ServeError::Channel {
            device: self.device.name.clone(),
            source,
        }
    }

    /// Handles messages until QEMU closes the connection.
    pub fn run(mut self) -> Result<(), ServeError> {
        loop {
            let request = match self.channel.recv() {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.err(e)),
            };
            if let Some(value) = self.handle(request)? {
                self.channel
                    .reply(value)
                    .map_err(|e| self.err(ChannelError::Io(e)))?;
            }
        }
    }

    /// Executes one request; returns the reply value for commands that get one.
    fn handle(&mut self, request: Request) -> Result<Option<u64>, ServeError> {
        let f = self.device.function.as_ref();
        Ok(Some(match request {
            Request::SyncSysmem(regions) => {
                let mem = map_regions(regions).map_err(|source| ServeError::Memory {
                    device: self.device.name.clone(),
                    source,
                })?;
                self.mem.replace(mem);
                self.stats.memory_syncs.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Request::SetIrqfd { intr, resample } => {
                self.connect_intx(intr, resample);
                return Ok(None);
            }
            Request::ConfigRead { addr, len } => {
                self.stats.config_accesses.fetch_add(1, Ordering::Relaxed);
                if !matches!(len, 1 | 2 | 4) || addr.saturating_add(len) > CONFIG_SPACE {
                    self.stats.rejected_accesses.fetch_add(1, Ordering::Relaxed);
                    FAILED
                } else {
                    let mut b = vec![0u8; len as usize];
                    f.config_read(addr as u16, &mut b);
                    sluice_pci::le_value(&b)
                }
            }
            Request::ConfigWrite { addr, value, len } => {
                self.stats.config_accesses.fetch_add(1, Ordering::Relaxed);
                if !matches!(len, 1 | 2 | 4) || addr.saturating_add(len) > CONFIG_SPACE {
                    self.stats.rejected_accesses.fetch_add(1, Ordering::Relaxed);
                    FAILED
                } else {
                    f.config_write(addr as u16, &value.to_le_bytes()[..len as usize]);
                    0
                }
            }
            Request::BarRead { addr, size, memory } => {
                self.stats.bar_accesses.fetch_add(1, Ordering::Relaxed);
                match f.decode_bar(addr, memory) {
                    Some((bar, off)) if valid_access(size) => {
                        let mut b = vec![0u8; size as usize];
                        f.bar_read(bar, off, &mut b);
                        sluice_pci::le_value(&b)
                    }
                    _ => {
                        self.stats.rejected_accesses.fetch_add(1, Ordering::Relaxed);
                        log::warn!(
                            "{}: BAR read {addr:#x}/{size} decodes to nothing",
                            self.device.name
                        );
                        FAILED
                    }
                }
            }
            Request::BarWrite {
                addr,
                value,
                size,
                memory,
            } => {
                self.stats.bar_accesses.fetch_add(1, Ordering::Relaxed);
                match f.decode_bar(addr, memory) {
                    Some((bar, off)) if valid_access(size) => {
                        f.bar_write(bar, off, &value.to_le_bytes()[..size as usize]);
                        0
                    }
                    _ => {
                        self.stats.rejected_accesses.fetch_add(1, Ordering::Relaxed);
                        log::warn!(
                            "{}: BAR write {addr:#x}/{size} decodes to nothing",
                            self.device.name
                        );
                        FAILED
                    }
                }
            }
            Request::DeviceReset => {
                f.reset();
                0
            }
        }))
    }

    fn connect_intx(&self, intr: OwnedFd, resample: OwnedFd) {
        // SAFETY: `intr` is an owned descriptor QEMU sent us; ownership moves into the EventFd.
        let intr = unsafe { EventFd::from_raw_fd(intr.into_raw_fd()) };
        self.device.intx.connect(intr);
        let relay = self.device.intx.clone();
        let stop = self.stop.clone();
        let stats = self.stats.clone();
        let name = format!("{}-resample", self.device.name);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            // SAFETY: as above, for the resample descriptor.
            let resample = unsafe { EventFd::from_raw_fd(resample.into_raw_fd()) };
            while !stop.load(Ordering::Acquire) {
                if wait_readable(resample.as_raw_fd(), RESAMPLE_POLL) && resample.read().is_ok() {
                    stats.resamples.fetch_add(1, Ordering::Relaxed);
                    relay.resample();
                }
            }
        });
        if let Err(e) = spawned {
            log::error!(
                "{}: cannot start the INTx resample thread: {e}",
                self.device.name
            );
        }
    }
}

fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, length 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Command, encode_message};
    use sluice_devapi::NoHooks;
    use sluice_host::{DeviceSet, DiskSpec};
    use std::io::{Read, Write};

    fn bar_msg(cmd: Command, addr: u64, val: u64, size: u32) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&addr.to_ne_bytes());
        p[8..16].copy_from_slice(&val.to_ne_bytes());
        p[16..20].copy_from_slice(&size.to_ne_bytes());
        p[20] = 1;
        encode_message(cmd, &p)
    }

    fn cfg_msg(cmd: Command, addr: u32, val: u32, len: u32) -> Vec<u8> {
        let mut p = vec![0u8; 12];
        p[0..4].copy_from_slice(&addr.to_ne_bytes());
        p[4..8].copy_from_slice(&val.to_ne_bytes());
        p[8..12].copy_from_slice(&len.to_ne_bytes());
        encode_message(cmd, &p)
    }

    fn ask(sock: &mut UnixStream, msg: &[u8]) -> u64 {
        sock.write_all(msg).unwrap();
        let mut r = [0u8; 24];
        sock.read_exact(&mut r).unwrap();
        u64::from_ne_bytes(r[16..24].try_into().unwrap())
    }

    #[test]
    fn serves_probe_sequence_like_qemus_proxy_then_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("sluice-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("d.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let set = DeviceSet::new(
            &[DiskSpec {
                path: img,
                read_only: false,
                iommu: false,
            }],
            Arc::new(NoHooks),
        )
        .unwrap();
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let server = DeviceServer::new(
            ours,
            set.devices[0].clone(),
            set.mem.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        let stats = server.stats();
        let t = std::thread::spawn(move || server.run());
        // probe_pci_info(): IDs, then BAR sizing with 32-bit probes.
        assert_eq!(
            ask(&mut qemu, &cfg_msg(Command::PciConfigRead, 0, 0, 2)),
            0x1af4
        );
        assert_eq!(
            ask(&mut qemu, &cfg_msg(Command::PciConfigRead, 2, 0, 2)),
            0x1042
        );
        ask(
            &mut qemu,
            &cfg_msg(Command::PciConfigWrite, 0x10, 0xffff_ffff, 4),
        );
        assert_eq!(
            ask(&mut qemu, &cfg_msg(Command::PciConfigRead, 0x10, 0, 4)),
            0xffff_c000
        );
        ask(
            &mut qemu,
            &cfg_msg(Command::PciConfigWrite, 0x10, 0xfe00_0000, 4),
        );
        ask(&mut qemu, &cfg_msg(Command::PciConfigWrite, 0x04, 0x6, 2));
        // num_queues through the BAR, at its absolute address.
        assert_eq!(
            ask(&mut qemu, &bar_msg(Command::BarRead, 0xfe00_0012, 0, 2)),
            1
        );
        // Out-of-range accesses answer all-ones instead of touching anything.
        assert_eq!(
            ask(&mut qemu, &bar_msg(Command::BarRead, 0xfd00_0000, 0, 4)),
            FAILED
        );
        assert_eq!(
            ask(&mut qemu, &bar_msg(Command::BarRead, 0xfe00_0012, 0, 3)),
            FAILED
        );
        assert_eq!(
            ask(&mut qemu, &cfg_msg(Command::PciConfigRead, 0xfe, 0, 4)),
            FAILED
        );
        assert_eq!(
            ask(&mut qemu, &encode_message(Command::DeviceReset, &[])),
            0
        );
        assert_eq!(stats.rejected_accesses.load(Ordering::Relaxed), 3);
        // A malformed message ends the connection with a clear error.
        qemu.write_all(&encode_message(Command::BarRead, &[0u8; 5]))
            .unwrap();
        let err = t.join().unwrap().unwrap_err();
        assert!(
            err.to_string().contains("malformed protocol message"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
