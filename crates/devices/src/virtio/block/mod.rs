//! virtio-blk (virtio 1.2, 5.2) on a raw image: IN, OUT, FLUSH, GET_ID, DISCARD and
//! WRITE_ZEROES on one request queue, served synchronously in the device event loop.

mod backend;
mod request;
#[cfg(test)]
mod tests;

use std::mem::offset_of;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, virtio_blk_config,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

pub use backend::{BlockBackend, BlockError, BlockOptions, SECTOR_SIZE, SERIAL_LEN};

use super::features::bit;
use super::{VirtioCommon, VirtioDevice};

/// Largest request queue the driver may set up.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request: a whole queue minus header and status, as QEMU advertises.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Sectors one DISCARD / WRITE_ZEROES segment may cover (1 GiB): bounds the time one
/// request holds the event loop when the host falls back to writing zeros.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// Segments per DISCARD / WRITE_ZEROES request.
pub const MAX_DWZ_SEGMENTS: u32 = 32;
/// Discard granularity hint, in sectors: a host file system block.
const DISCARD_ALIGNMENT: u32 = 8;

/// Config space through `write_zeroes_may_unmap` and its padding (the secure-erase and zoned
/// fields are for features not offered).
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

pub struct Block {
    common: VirtioCommon,
    backend: BlockBackend,
    config: [u8; CONFIG_LEN],
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("common", &self.common)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Block {
    pub fn new(backend: BlockBackend) -> Self {
        let mut features = bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_DISCARD)
            | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        if backend.read_only() {
            features |= bit(VIRTIO_BLK_F_RO);
        }
        let config = build_config(backend.capacity_sectors());
        Self {
            common: VirtioCommon::new(VIRTIO_ID_BLOCK, vec![QUEUE_SIZE], features),
            backend,
            config,
        }
    }

    pub fn backend(&self) -> &BlockBackend {
        &self.backend
    }
}

fn build_config(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    // blk_size is the logical block size the guest uses; 512 like the sector unit.
    put(
        offset_of!(virtio_blk_config, blk_size),
        &512u32.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_sectors),
        &MAX_DISCARD_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_seg),
        &MAX_DWZ_SEGMENTS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &DISCARD_ALIGNMENT.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_sectors),
        &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
        &MAX_DWZ_SEGMENTS.to_le_bytes(),
    );
    // WRITE_ZEROES with UNMAP punches a hole when the host file can.
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    c
}

impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only without VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        tracing::debug!(offset, len = data.len(), "virtio-blk: config write ignored");
    }

    fn process_queue(&mut self, queue: u16) {
        let Self {
            common, backend, ..
        } = self;
        let ctx = request::Context {
            backend,
            discard: common.has_feature(bit(VIRTIO_BLK_F_DISCARD)),
            write_zeroes: common.has_feature(bit(VIRTIO_BLK_F_WRITE_ZEROES)),
        };
        common.process_queue(queue, |dma, chain| request::handle_chain(&ctx, dma, chain));
    }
}
