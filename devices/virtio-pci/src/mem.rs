//! Guest memory shared by a device host and device workers, replaceable at run time (QEMU
//! re-sends its memory map whenever the guest's address-space layout changes).

use std::sync::{Arc, RwLock};

use vm_memory::GuestMemoryMmap;

/// A swappable snapshot of guest memory. Workers take a snapshot per batch of work, so a
/// re-map never pulls memory from under an access in progress.
#[derive(Clone, Default)]
pub struct SharedMemory {
    inner: Arc<RwLock<Arc<GuestMemoryMmap>>>,
}

impl SharedMemory {
    /// Wraps an initial memory map.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        SharedMemory {
            inner: Arc::new(RwLock::new(Arc::new(mem))),
        }
    }

    /// The current memory map.
    pub fn snapshot(&self) -> Arc<GuestMemoryMmap> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Installs a new memory map.
    pub fn replace(&self, mem: GuestMemoryMmap) {
        let new = Arc::new(mem);
        match self.inner.write() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
    }
}
