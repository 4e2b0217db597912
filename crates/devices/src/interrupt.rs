//! Interrupts as seen by a device: a line it can raise. In production an eventfd bound to a GSI
//! through KVM's irqfd; in tests a counter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// An edge-triggered interrupt line (ISA IRQ, or one MSI vector).
pub trait IrqLine: Send + Sync {
    /// Raise the interrupt once.
    fn trigger(&self) -> std::io::Result<()>;
}

/// A line that counts how often it was raised: for unit tests and fuzzing.
#[derive(Default, Debug)]
pub struct CountingIrq(AtomicU64);

impl CountingIrq {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl IrqLine for CountingIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl IrqLine for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}
