//! The common configuration structure (virtio 1.2, 4.1.4.3): features, status, MSI-X vectors
//! and queue registers. Every field is accessed at its natural width (64-bit queue addresses
//! also as two 32-bit halves or one 64-bit access); anything else reads as zero and is
//! dropped on write, with a debug log, as are writes to read-only fields.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};

use super::{Shared, VIRTIO_MSI_NO_VECTOR};
use crate::bus::lock;
use crate::pci::put_le;
use crate::virtio::{DmaSpace, VirtioDevice, VirtioInterrupt, features, status};

/// Length of `struct virtio_pci_common_cfg` (without the 1.2 fields for features not offered:
/// NOTIF_CONFIG_DATA and RING_RESET).
pub const COMMON_CFG_LEN: u64 = 0x38;

mod reg {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Which ring a queue address register sets.
#[derive(Clone, Copy, Debug)]
enum Ring {
    Desc,
    Driver,
    Device,
}

/// What a write may need beyond the registers: the device, its DMA space, the vector count,
/// and a maker of interrupt handles (for activation).
pub(super) struct WriteContext<'a> {
    pub shared: &'a Shared,
    pub device: &'a Arc<Mutex<dyn VirtioDevice>>,
    pub dma: &'a DmaSpace,
    pub msix_vectors: u16,
    pub interrupt: &'a dyn Fn() -> Arc<dyn VirtioInterrupt>,
}

#[derive(Debug)]
pub(super) struct CommonConfig {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    /// What the driver wrote and the device accepted (DEVICE_NEEDS_RESET lives in `Shared`).
    status: u8,
    queue_select: u16,
    /// The driver's queue registers, handed to the device (cloned) at DRIVER_OK.
    queues: Vec<Queue>,
    /// Behind an IOMMU: FEATURES_OK needs ACCESS_PLATFORM, or the driver would hand out guest
    /// physical addresses that the device translates as IOVAs.
    pub require_access_platform: bool,
}

impl CommonConfig {
    pub fn new(max_sizes: &[u16]) -> Self {
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: fresh_queues(max_sizes),
            require_access_platform: false,
        }
    }

    pub fn status(&self, shared: &Shared) -> u8 {
        let reset = if shared.needs_reset.load(Ordering::SeqCst) {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.status | reset
    }

    pub fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    pub fn read(
        &self,
        offset: u64,
        data: &mut [u8],
        shared: &Shared,
        device: &Arc<Mutex<dyn VirtioDevice>>,
    ) {
        data.fill(0);
        let q = self.selected();
        let sel = usize::from(self.queue_select);
        let value: u64 = match (offset, data.len()) {
            (reg::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select.into(),
            (reg::DEVICE_FEATURE, 4) => {
                half(lock(device).offered_features(), self.device_feature_select)
            }
            (reg::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select.into(),
            (reg::DRIVER_FEATURE, 4) => half(self.driver_features, self.driver_feature_select),
            (reg::MSIX_CONFIG, 2) => shared.config_vector.load(Ordering::SeqCst).into(),
            (reg::NUM_QUEUES, 2) => self.queues.len() as u64,
            (reg::DEVICE_STATUS, 1) => self.status(shared).into(),
            (reg::CONFIG_GENERATION, 1) => shared.config_generation.load(Ordering::SeqCst).into(),
            (reg::QUEUE_SELECT, 2) => self.queue_select.into(),
            // A queue_select past the last queue reads zeros: size 0 says "no such queue".
            (reg::QUEUE_SIZE, 2) => q.map_or(0, |q| q.size().into()),
            (reg::QUEUE_MSIX_VECTOR, 2) => shared
                .queue_vectors
                .get(sel)
                .map_or(0, |v| v.load(Ordering::SeqCst).into()),
            (reg::QUEUE_ENABLE, 2) => q.map_or(0, |q| q.ready().into()),
            (reg::QUEUE_NOTIFY_OFF, 2) => {
                if q.is_some() {
                    self.queue_select.into()
                } else {
                    0
                }
            }
            (o, len) => match ring_field(o, len) {
                Some((ring, shift)) => q.map_or(0, |q| ring_address(q, ring) >> shift),
                None => {
                    tracing::debug!(offset, len, "virtio-pci: odd common config read");
                    0
                }
            },
        };
        put_le(data, value);
    }

    pub fn write(&mut self, offset: u64, data: &[u8], ctx: &WriteContext<'_>) {
        let value = crate::pci::le_value(data);
        match (offset, data.len()) {
            (reg::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (reg::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (reg::DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (reg::MSIX_CONFIG, 2) => {
                let v = checked_vector(value as u16, ctx.msix_vectors);
                ctx.shared.config_vector.store(v, Ordering::SeqCst);
            }
            (reg::DEVICE_STATUS, 1) => self.write_status(value as u8, ctx),
            (reg::QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (reg::QUEUE_SIZE, 2) => {
                if let Some(q) = self.configurable_queue("queue_size") {
                    if let Err(e) = q.try_set_size(value as u16) {
                        tracing::debug!(
                            size = value,
                            max = q.max_size(),
                            "virtio-pci: queue size refused: {e}"
                        );
                    }
                }
            }
            (reg::QUEUE_MSIX_VECTOR, 2) => {
                let sel = usize::from(self.queue_select);
                match ctx.shared.queue_vectors.get(sel) {
                    // Reading it back tells the driver whether the vector was taken.
                    Some(slot) => {
                        slot.store(
                            checked_vector(value as u16, ctx.msix_vectors),
                            Ordering::SeqCst,
                        );
                    }
                    None => tracing::debug!(sel, "virtio-pci: vector for a missing queue"),
                }
            }
            (reg::QUEUE_ENABLE, 2) => {
                if value != 1 {
                    // The driver may only write 1 (queue reset is a feature not offered).
                    tracing::debug!(value, "virtio-pci: queue_enable write ignored");
                } else if let Some(q) = self.configurable_queue("queue_enable") {
                    q.set_ready(true);
                }
            }
            (
                reg::DEVICE_FEATURE
                | reg::NUM_QUEUES
                | reg::CONFIG_GENERATION
                | reg::QUEUE_NOTIFY_OFF,
                _,
            ) => {
                tracing::debug!(offset, "virtio-pci: write to a read-only field ignored");
            }
            (o, len) => match ring_field(o, len) {
                Some((ring, shift)) => {
                    if let Some(q) = self.configurable_queue("queue address") {
                        set_ring_address(q, ring, shift, len, value);
                    }
                }
                None => tracing::debug!(offset, len, "virtio-pci: odd common config write"),
            },
        }
    }

    /// The selected queue, if it exists and may still be configured (not enabled, device not
    /// live): the driver must not change a queue after enabling it.
    fn configurable_queue(&mut self, what: &str) -> Option<&mut Queue> {
        let live = self.driver_ok();
        let sel = self.queue_select;
        match self.queues.get_mut(usize::from(sel)) {
            None => {
                tracing::debug!(sel, what, "virtio-pci: write for a missing queue ignored");
                None
            }
            Some(q) if q.ready() || live => {
                tracing::debug!(sel, what, "virtio-pci: write to an enabled queue ignored");
                None
            }
            Some(q) => Some(q),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            tracing::debug!("virtio-pci: driver_feature write after FEATURES_OK ignored");
            return;
        }
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            sel => {
                tracing::debug!(sel, "virtio-pci: driver_feature write to a missing word");
                return;
            }
        };
        self.driver_features =
            (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
    }

    fn write_status(&mut self, value: u8, ctx: &WriteContext<'_>) {
        if value == 0 {
            self.reset(ctx);
            return;
        }
        // The driver may write back what it read; DEVICE_NEEDS_RESET is the device's to set.
        let mut value = value & !status::DEVICE_NEEDS_RESET;
        let old = self.status;
        if old & !value != 0 {
            tracing::debug!(
                old,
                value,
                "virtio-pci: status write clearing bits ignored (only a reset may)"
            );
            return;
        }
        let new = value & !old;
        if new & status::FEATURES_OK != 0 && !self.accept_features(ctx) {
            value &= !status::FEATURES_OK;
        }
        if new & status::DRIVER_OK != 0 {
            if value & status::FEATURES_OK == 0 {
                tracing::debug!("virtio-pci: DRIVER_OK without FEATURES_OK refused");
                value &= !status::DRIVER_OK;
            } else {
                self.status = value;
                self.activate(ctx);
                return;
            }
        }
        self.status = value;
    }

    /// FEATURES_OK: the driver's features must be offered ones and include VERSION_1 (this is
    /// a modern-only transport). If so the device records them.
    fn accept_features(&self, ctx: &WriteContext<'_>) -> bool {
        let mut dev = lock(ctx.device);
        let unknown = self.driver_features & !dev.offered_features();
        if unknown != 0 {
            tracing::info!(
                unknown = format_args!("{unknown:#x}"),
                "virtio-pci: FEATURES_OK refused: features not offered"
            );
            return false;
        }
        if self.driver_features & features::VERSION_1 == 0 {
            tracing::info!("virtio-pci: FEATURES_OK refused: no VIRTIO_F_VERSION_1");
            return false;
        }
        if self.require_access_platform && self.driver_features & features::ACCESS_PLATFORM == 0 {
            tracing::info!(
                "virtio-pci: FEATURES_OK refused: behind the IOMMU without VIRTIO_F_ACCESS_PLATFORM"
            );
            return false;
        }
        dev.ack_features(self.driver_features);
        true
    }

    fn activate(&mut self, ctx: &WriteContext<'_>) {
        let interrupt = (ctx.interrupt)();
        // The device gets copies: the registers stay readable here (Queue is not Clone).
        let queues = self.queues.iter().map(copy_queue).collect();
        let result = lock(ctx.device).activate(queues, interrupt.clone(), ctx.dma.clone());
        if let Err(e) = result {
            tracing::warn!("virtio-pci: device activation failed, it needs a reset: {e}");
            interrupt.set_needs_reset();
        }
    }

    fn reset(&mut self, ctx: &WriteContext<'_>) {
        let max_sizes = {
            let mut dev = lock(ctx.device);
            dev.reset();
            dev.queue_max_sizes().to_vec()
        };
        *self = Self::new(&max_sizes);
        for v in &ctx.shared.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
        ctx.shared
            .config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        ctx.shared.isr.store(0, Ordering::SeqCst);
        ctx.shared.needs_reset.store(false, Ordering::SeqCst);
    }
}

fn fresh_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&max| {
            // Queue::new refuses only sizes that are not powers of two up to 32768; a device
            // declaring one is a bug, and a queue of 1 keeps the transport usable.
            Queue::new(max).unwrap_or_else(|e| {
                tracing::error!(max, "virtio-pci: device declares a bad queue size: {e}");
                Queue::new(1).unwrap_or_else(|_| unreachable!("1 is a valid queue size"))
            })
        })
        .collect()
}

/// A queue with the same registers as `q`.
fn copy_queue(q: &Queue) -> Queue {
    let mut c = fresh_queues(&[q.max_size()]).remove(0);
    // Both were accepted by the same checks on `q`, so neither can fail here.
    let _ = c.try_set_size(q.size());
    for ring in [Ring::Desc, Ring::Driver, Ring::Device] {
        set_ring_address(&mut c, ring, 0, 8, ring_address(q, ring));
    }
    c.set_ready(q.ready());
    c
}

/// Word `select` (0 or 1) of a 64-bit feature set; others read zero.
fn half(features: u64, select: u32) -> u64 {
    match select {
        0 => features & 0xffff_ffff,
        1 => features >> 32,
        _ => 0,
    }
}

/// A vector the driver may use: one in the table, or NO_VECTOR. Anything else is refused by
/// storing NO_VECTOR, which the driver reads back (virtio 1.2, 4.1.5.1.2).
fn checked_vector(v: u16, vectors: u16) -> u16 {
    if v == VIRTIO_MSI_NO_VECTOR || v < vectors {
        v
    } else {
        tracing::debug!(v, vectors, "virtio-pci: MSI-X vector out of range refused");
        VIRTIO_MSI_NO_VECTOR
    }
}

/// Which ring address an access hits, and the bit shift of its first byte: the low half, the
/// high half, or the whole 64 bits.
fn ring_field(offset: u64, len: usize) -> Option<(Ring, u32)> {
    let (ring, base) = match offset {
        reg::QUEUE_DESC..reg::QUEUE_DRIVER => (Ring::Desc, reg::QUEUE_DESC),
        reg::QUEUE_DRIVER..reg::QUEUE_DEVICE => (Ring::Driver, reg::QUEUE_DRIVER),
        reg::QUEUE_DEVICE..super::COMMON_CFG_LEN => (Ring::Device, reg::QUEUE_DEVICE),
        _ => return None,
    };
    match (offset - base, len) {
        (0, 4 | 8) => Some((ring, 0)),
        (4, 4) => Some((ring, 32)),
        _ => None,
    }
}

fn ring_address(q: &Queue, ring: Ring) -> u64 {
    match ring {
        Ring::Desc => q.desc_table(),
        Ring::Driver => q.avail_ring(),
        Ring::Device => q.used_ring(),
    }
}

fn set_ring_address(q: &mut Queue, ring: Ring, shift: u32, len: usize, value: u64) {
    let (low, high) = match (shift, len) {
        (0, 8) => (Some(value as u32), Some((value >> 32) as u32)),
        (0, _) => (Some(value as u32), None),
        _ => (None, Some(value as u32)),
    };
    // virtio-queue refuses (and logs) a misaligned address, keeping the old one.
    match ring {
        Ring::Desc => q.set_desc_table_address(low, high),
        Ring::Driver => q.set_avail_ring_address(low, high),
        Ring::Device => q.set_used_ring_address(low, high),
    }
}
