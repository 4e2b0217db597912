//! Virtio devices, independent of their transport.
//!
//! Three layers (DESIGN.md): the transport ([`pci`], virtio-pci) owns the common
//! configuration, device status, notifications and MSI-X; a device ([`VirtioDevice`]) owns its
//! configuration space and queue processing; a backend is a plain struct (an image file, a tap).
//!
//! How a transport drives a device:
//!
//! 1. Feature negotiation: it shows [`VirtioDevice::offered_features`] 32 bits at a time and
//!    passes the driver's choice to [`VirtioDevice::ack_features`] (bits not offered are dropped).
//!    At FEATURES_OK it refuses a driver that did not accept [`features::VERSION_1`] (modern
//!    transport only).
//! 2. Queue setup: it keeps one `virtio_queue::Queue` per entry of
//!    [`VirtioDevice::queue_max_sizes`] (`Queue::new(max)`, then `try_set_size`, addresses,
//!    ready) and hands them over at DRIVER_OK with [`VirtioDevice::activate`], together with an
//!    interrupt handle and the device's [`DmaSpace`]. If that fails, it sets DEVICE_NEEDS_RESET.
//! 3. Notifications: the VMM registers one ioeventfd per queue with KVM and watches it in the
//!    device event loop; when one fires it reads it and calls
//!    [`VirtioDevice::process_queue`]. Devices never see file descriptors or threads.
//! 4. A device that cannot go on (a ring it cannot reach) calls
//!    [`VirtioInterrupt::set_needs_reset`] and stops serving queues until
//!    [`VirtioDevice::reset`], which the transport calls when the driver writes 0 to the status.

pub mod block;
pub mod console;
pub mod dma;
pub mod iommu;
pub mod net;
pub mod pci;
pub mod queue;
pub mod rng;
#[cfg(test)]
pub(crate) mod testutil;
pub mod vsock;

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

pub use dma::{DmaError, DmaSnapshot, DmaSpace};

/// Feature bits, as masks.
pub mod features {
    use virtio_bindings::bindings::virtio_config::{
        VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_SR_IOV, VIRTIO_F_VERSION_1,
    };
    use virtio_bindings::bindings::virtio_ring::{
        VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    };

    /// The mask of feature bit `bit` (a `VIRTIO_*_F_*` number from virtio-bindings).
    pub const fn bit(bit: u32) -> u64 {
        1 << bit
    }

    pub const VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
    pub const ACCESS_PLATFORM: u64 = bit(VIRTIO_F_ACCESS_PLATFORM);
    pub const RING_EVENT_IDX: u64 = bit(VIRTIO_RING_F_EVENT_IDX);
    pub const RING_INDIRECT_DESC: u64 = bit(VIRTIO_RING_F_INDIRECT_DESC);
    /// The function is an SR-IOV PF (offered only by PFs, which carry the capability).
    pub const SR_IOV: u64 = bit(VIRTIO_F_SR_IOV);

    /// Offered by every device. ACCESS_PLATFORM is offered even with an identity [`DmaSpace`]
    /// (the driver then uses its DMA API, which maps 1:1 without an IOMMU), so that a device
    /// can be put behind the virtual IOMMU without renegotiating anything but the mapping.
    ///
    /// [`DmaSpace`]: super::DmaSpace
    pub const COMMON: u64 = VERSION_1 | ACCESS_PLATFORM | RING_EVENT_IDX | RING_INDIRECT_DESC;
}

/// Device status register bits (virtio 1.2, 2.1), as the transport's `u8` register holds them.
pub mod status {
    use virtio_bindings::bindings::virtio_config as c;

    pub const ACKNOWLEDGE: u8 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    pub const DRIVER: u8 = c::VIRTIO_CONFIG_S_DRIVER as u8;
    pub const DRIVER_OK: u8 = c::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    pub const FEATURES_OK: u8 = c::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    pub const DEVICE_NEEDS_RESET: u8 = c::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    pub const FAILED: u8 = c::VIRTIO_CONFIG_S_FAILED as u8;
}

/// How a device talks back to its transport. The transport maps queues and the configuration
/// change to MSI-X vectors (irqfds); tests record.
pub trait VirtioInterrupt: Send + Sync {
    /// Buffers were returned on `queue` and the driver wants to hear about it.
    fn signal_queue(&self, queue: u16);
    /// The device configuration space changed.
    fn signal_config(&self);
    /// The device hit an error it cannot recover from without a reset (a ring it cannot
    /// reach, a driver breaking the ring protocol). The transport sets DEVICE_NEEDS_RESET in
    /// the device status and, if DRIVER_OK is set, signals a configuration change.
    fn set_needs_reset(&self);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("Device is already active")]
    AlreadyActive,
    #[error("Device has {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("Queue {index} has size {size}, not a power of two up to {max}")]
    QueueSize { index: u16, size: u16, max: u16 },
    #[error("Driver did not accept VIRTIO_F_VERSION_1")]
    NotVersion1,
    #[error("Rings of queue {0} are not reachable")]
    QueueUnreachable(u16),
}

/// A virtio device as its transport sees it. Every method takes guest-controlled input and
/// must not panic on it.
pub trait VirtioDevice: Send {
    /// The state every device shares (type, queue sizes, features, activation); the methods
    /// below that only report it are answered from here.
    fn common(&self) -> &VirtioCommon;

    fn common_mut(&mut self) -> &mut VirtioCommon;

    /// Virtio device id (`virtio_ids::VIRTIO_ID_*`).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }

    /// Maximum size of each queue; the number of queues is the length.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_max_sizes()
    }

    /// Features offered: the device's own plus [`features::COMMON`].
    fn offered_features(&self) -> u64 {
        self.common().offered_features()
    }

    /// Features the driver accepted (a subset of the offered ones).
    fn acked_features(&self) -> u64 {
        self.common().acked_features()
    }

    /// Record the driver's features. Bits not offered are dropped; ignored once active.
    fn ack_features(&mut self, features: u64) {
        self.common_mut().ack_features(features);
    }

    /// Read the device configuration space at `offset`. Bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write the device configuration space. Read-only fields and bytes past the end ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Start serving: the queues as the driver set them up (one per `queue_max_sizes` entry,
    /// ready or not), the interrupt handle, and the DMA space every queue and buffer address
    /// is taken in. A device with state of its own to start overrides this and calls
    /// [`VirtioCommon::activate`] first.
    fn activate(
        &mut self,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        dma: DmaSpace,
    ) -> Result<(), ActivateError> {
        self.common_mut().activate(queues, interrupt, dma)
    }

    /// Back to the state before feature negotiation: queues, interrupt and DMA space dropped.
    /// A device with state of its own overrides this and calls [`VirtioCommon::reset`] too.
    fn reset(&mut self) {
        self.common_mut().reset();
    }

    /// The driver notified `queue`: serve what it made available. Errors are logged and end in
    /// [`VirtioInterrupt::set_needs_reset`]; an unknown or idle queue is ignored.
    fn process_queue(&mut self, queue: u16);

    /// Whether the device is active (between a successful activate and a reset).
    fn is_active(&self) -> bool {
        self.common().is_active()
    }
}

/// What an active device holds.
struct Active {
    queues: Vec<Queue>,
    interrupt: Arc<dyn VirtioInterrupt>,
    dma: DmaSpace,
    /// A queue fault happened: nothing more is served until reset.
    broken: bool,
}

/// The transport-facing state every device shares: features and activation. A device embeds
/// one and forwards the trait methods that are not its own business.
pub struct VirtioCommon {
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    offered: u64,
    acked: u64,
    active: Option<Active>,
}

impl std::fmt::Debug for VirtioCommon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioCommon")
            .field("device_type", &self.device_type)
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl VirtioCommon {
    pub fn new(device_type: u32, queue_max_sizes: Vec<u16>, device_features: u64) -> Self {
        Self {
            device_type,
            queue_max_sizes,
            offered: device_features | features::COMMON,
            acked: 0,
            active: None,
        }
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Offer `mask` too (a transport feature such as [`features::SR_IOV`], which the VMM
    /// decides when it gives a device the SR-IOV capability). Before the driver sees the
    /// device only.
    pub fn offer(&mut self, mask: u64) {
        self.offered |= mask;
    }

    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    pub fn has_feature(&self, mask: u64) -> bool {
        self.acked & mask == mask
    }

    pub fn ack_features(&mut self, features: u64) {
        if self.active.is_some() {
            tracing::debug!(features, "feature write after activation ignored");
            return;
        }
        let unknown = features & !self.offered;
        if unknown != 0 {
            tracing::debug!(unknown, "driver accepted features that were not offered");
        }
        self.acked = features & self.offered;
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub fn activate(
        &mut self,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
        dma: DmaSpace,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if !self.has_feature(features::VERSION_1) {
            return Err(ActivateError::NotVersion1);
        }
        if queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            });
        }
        let event_idx = self.has_feature(features::RING_EVENT_IDX);
        let snapshot = dma.snapshot();
        for (i, (q, &max)) in queues.iter_mut().zip(&self.queue_max_sizes).enumerate() {
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            let size = q.size();
            if size == 0 || size > max || !size.is_power_of_two() {
                return Err(ActivateError::QueueSize { index, size, max });
            }
            if q.ready() && !q.is_valid(snapshot.memory()) {
                return Err(ActivateError::QueueUnreachable(index));
            }
            q.set_event_idx(event_idx);
        }
        self.active = Some(Active {
            queues,
            interrupt,
            dma,
            broken: false,
        });
        Ok(())
    }

    pub fn reset(&mut self) {
        self.acked = 0;
        self.active = None;
    }

    /// The interrupt handle, while active.
    pub fn interrupt(&self) -> Option<&Arc<dyn VirtioInterrupt>> {
        self.active.as_ref().map(|a| &a.interrupt)
    }

    /// Serve queue `index` with `handle`, which gets each available chain and returns the
    /// number of bytes it wrote into the chain (the used length).
    pub fn process_queue(
        &mut self,
        index: u16,
        mut handle: impl FnMut(&DmaSnapshot, queue::Chain<'_>) -> u32,
    ) {
        self.serve(index, |queue, snapshot| {
            queue::drain(queue, snapshot, |chain| handle(snapshot, chain))
        });
    }

    /// Run `serve` on queue `index` if the device is active, not broken and the queue ready;
    /// `serve` returns whether it put any chain in the used ring. Interrupts the driver if it
    /// asked for it; a queue fault marks the device broken and asks for a reset. The one place
    /// these rules live, for queues served on a notification and those served when the host has
    /// something for the guest (receive queues, events).
    pub fn serve(
        &mut self,
        index: u16,
        serve: impl FnOnce(&mut Queue, &DmaSnapshot) -> Result<bool, queue::QueueError>,
    ) {
        let Some(active) = self.active.as_mut() else {
            tracing::debug!(index, "queue of an inactive device not served");
            return;
        };
        if active.broken {
            return;
        }
        let Some(queue) = active.queues.get_mut(usize::from(index)) else {
            tracing::debug!(index, "queue that does not exist not served");
            return;
        };
        if !queue.ready() {
            tracing::debug!(index, "queue that is not ready not served");
            return;
        }
        let snapshot = active.dma.snapshot();
        // Where the used ring stood: the driver's used_event is looked for from here.
        let old_used = queue.next_used();
        let result = serve(queue, &snapshot).and_then(|used| {
            if used {
                queue::needs_notification(queue, &snapshot, old_used)
            } else {
                Ok(false)
            }
        });
        match result {
            Ok(true) => active.interrupt.signal_queue(index),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(
                    device = self.device_type,
                    queue = index,
                    "virtio queue fault, device needs reset: {e}"
                );
                active.broken = true;
                active.interrupt.set_needs_reset();
            }
        }
    }
}

/// Serve a read of a device configuration space held as bytes: out-of-range bytes read zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{Desc, RecordingInterrupt, TestDriver, test_memory};
    use super::*;

    #[test]
    fn config_bytes_bounds() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 9, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn features_and_activation() {
        let mem = test_memory();
        let drv = TestDriver::new(&mem, 16);
        let irq = Arc::new(RecordingInterrupt::default());
        let dma = DmaSpace::identity(mem.clone());
        let mut c = VirtioCommon::new(2, vec![16], 1 << 9);
        assert_eq!(c.offered_features(), (1 << 9) | features::COMMON);
        c.ack_features(u64::MAX);
        assert_eq!(c.acked_features(), c.offered_features());
        c.ack_features(features::RING_EVENT_IDX);
        assert_eq!(
            c.activate(vec![drv.queue()], irq.clone(), dma.clone()),
            Err(ActivateError::NotVersion1)
        );
        c.ack_features(features::VERSION_1 | features::RING_EVENT_IDX);
        assert_eq!(
            c.activate(vec![], irq.clone(), dma.clone()),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        );
        let big = TestDriver::new(&mem, 32);
        assert!(matches!(
            c.activate(vec![big.queue()], irq.clone(), dma.clone()),
            Err(ActivateError::QueueSize { size: 32, .. })
        ));
        let mut far = Queue::new(16).unwrap();
        far.set_desc_table_address(Some(0x18_0000), Some(0));
        far.set_avail_ring_address(Some(0x18_1000), Some(0));
        far.set_used_ring_address(Some(0x18_2000), Some(0));
        far.set_ready(true);
        assert_eq!(
            c.activate(vec![far], irq.clone(), dma.clone()),
            Err(ActivateError::QueueUnreachable(0))
        );
        c.activate(vec![drv.queue()], irq.clone(), dma.clone())
            .unwrap();
        assert!(c.is_active());
        assert_eq!(
            c.activate(vec![drv.queue()], irq.clone(), dma.clone()),
            Err(ActivateError::AlreadyActive)
        );
        c.ack_features(0);
        assert!(c.has_feature(features::RING_EVENT_IDX));
        c.reset();
        assert!(!c.is_active());
        assert_eq!(c.acked_features(), 0);
    }

    #[test]
    fn processing_interrupts_and_faults() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let irq = Arc::new(RecordingInterrupt::default());
        let dma = DmaSpace::identity(mem.clone());
        let mut c = VirtioCommon::new(2, vec![16, 16], 0);
        c.ack_features(features::VERSION_1);
        let idle = Queue::new(16).unwrap();
        c.activate(vec![drv.queue(), idle], irq.clone(), dma)
            .unwrap();

        drv.add(&[Desc::w(0x10000, 8)]);
        drv.add(&[Desc::w(0x10008, 8)]);
        let mut seen = 0;
        c.process_queue(0, |_, _| {
            seen += 1;
            3
        });
        assert_eq!(seen, 2);
        assert_eq!(drv.used_idx(), 2);
        assert_eq!(drv.used(1), (1, 3));
        assert_eq!(irq.take_queues(), vec![0]);
        // Unknown and idle queues are ignored.
        c.process_queue(1, |_, _| unreachable!());
        c.process_queue(7, |_, _| unreachable!());
        assert!(irq.take_queues().is_empty());

        // The driver breaks the ring: the device asks for a reset and then stays quiet.
        drv.set_avail_idx(100);
        c.process_queue(0, |_, _| 0);
        assert!(irq.needs_reset());
        drv.set_avail_idx(3);
        c.process_queue(0, |_, _| unreachable!());
    }
}
