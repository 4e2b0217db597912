//! Device models. Nothing here knows about KVM file descriptors or threads: every device is
//! driven through [`bus::BusDevice`] and talks back through the small traits in [`interrupt`]
//! and [`VmEvents`], so each one is unit-tested and fuzzed in-process without `/dev/kvm`.

pub mod bus;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod virtio;

/// Something a device asks of the VM as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest asked for a platform reset (i8042 command 0xFE, ...).
    Reset,
    /// The guest powered the machine off.
    Shutdown,
    /// The guest wrote this value to the debug-exit port.
    DebugExit(u32),
}

/// Where devices send [`VmEvent`]s. The VMM implements it; tests record.
pub trait VmEvents: Send + Sync {
    fn request(&self, event: VmEvent);
}
