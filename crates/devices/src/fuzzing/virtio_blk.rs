//! virtio-blk on a few pages of guest memory and a small in-memory disk: the input lays out
//! descriptors (direct and indirect), request headers, discard segments and ring entries, and
//! kicks the queue.
//!
//! Checks after every kick: the disk keeps its size (and its bytes, if read-only); under the
//! shadow of [`super::virtq`], the heads come back in order with lengths that fit their
//! chains, the reset request and the interrupt are the predicted ones, and the device wrote
//! only into writable buffers and the used ring.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

use super::Input;
use super::virtq::{Driver, Interrupts, Ring, address, driver_op, guest_memory};
use crate::virtio::block::{Block, BlockBackend, BlockOptions, QUEUE_SIZE};
use crate::virtio::{DmaSpace, VirtioDevice, features};

/// Where buffers usually go (rings at 0, 0x1000, 0x2000).
const DATA: u64 = 0x3000;

/// A memfd of `len` bytes filled with a pattern: a disk with no file system underneath.
pub(crate) fn memfd(len: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new descriptor
    // or -1, checked below.
    let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + i / 512) as u8).collect();
    file.write_all_at(&pattern, 0).expect("memfd write");
    file
}

/// What does not change during one input.
struct Fixed {
    read_only: bool,
    disk_len: u64,
    disk: Vec<u8>,
    features: u64,
    size: u16,
}

fn activate(dev: &mut Block, drv: &mut Driver, irq: &Arc<Interrupts>, fixed: &Fixed) {
    dev.ack_features(fixed.features);
    let q = drv.rings[0].queue(QUEUE_SIZE, fixed.size);
    let dma = DmaSpace::identity(drv.mem.clone());
    let _ = dev.activate(vec![q], irq.clone(), dma);
    drv.rings[0].event_idx = dev.acked_features() & features::RING_EVENT_IDX != 0;
}

/// Kick the queue and check; returns the requests served under the shadow.
fn kick(dev: &mut Block, drv: &mut Driver, irq: &Interrupts, file: &File, fixed: &Fixed) -> usize {
    let before = drv.before(0, dev.is_active());
    dev.process_queue(0);
    let (signalled, needs_reset) = irq.take();
    assert_eq!(
        file.metadata().map(|m| m.len()).ok(),
        Some(fixed.disk_len),
        "disk size changed"
    );
    if fixed.read_only {
        let mut now = vec![0u8; fixed.disk.len()];
        let _ = file.read_exact_at(&mut now, 0);
        assert!(now == fixed.disk, "read-only disk changed");
    }
    drv.check_in_order(0, &before, signalled != 0, needs_reset)
        .len()
}

/// Drive virtio-blk from the input: device options and queue set-up first, then descriptor,
/// header, segment and ring writes interleaved with kicks.
pub fn virtio_blk(data: &[u8]) {
    run(data);
}

/// The harness; returns the number of requests served with the shadow's checks on.
fn run(data: &[u8]) -> usize {
    let mut input = Input::new(data);
    let opts = input.u8();
    let read_only = opts & 1 != 0;
    let disk_len = u64::from(input.u8() % 65) * 512 + if opts & 2 != 0 { 100 } else { 0 };
    let size = match input.u8() % 16 {
        0 => 0,
        1 => 3,
        2 => 512,
        n => 1 << (n % 9),
    };
    let features = if opts & 4 != 0 { input.u64() } else { u64::MAX };
    // Now and then rings somewhere odd: misaligned, overlapping, outside memory.
    let ring = if opts & 0x18 == 0x18 {
        Ring::at(
            address(&mut input, DATA),
            address(&mut input, DATA),
            address(&mut input, DATA),
            false,
        )
    } else {
        Ring::at(0, 0x1000, 0x2000, true)
    };
    let mut drv = Driver {
        mem: guest_memory(),
        rings: vec![ring],
    };
    let file = memfd(disk_len);
    let mut disk = vec![0u8; disk_len as usize];
    let _ = file.read_exact_at(&mut disk, 0);
    let fixed = Fixed {
        read_only,
        disk_len,
        disk,
        features,
        size,
    };
    let serial = (opts & 0x20 != 0).then(|| "fuzz-serial-0123456".to_string());
    let opened = file.try_clone().ok().and_then(|f| {
        // "Direct" on a memfd: the device applies O_DIRECT's alignment rules and bounces
        // unaligned buffers (the memfd itself would refuse O_DIRECT).
        let options = BlockOptions {
            read_only,
            direct: opts & 0x40 != 0,
            serial,
        };
        BlockBackend::from_file(f, &options).ok()
    });
    let Some(backend) = opened else {
        return 0;
    };
    let mut dev = Block::new(backend);
    let irq = Arc::new(Interrupts::default());
    activate(&mut dev, &mut drv, &irq, &fixed);

    let mut served = 0;
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let op = input.u8() % 14;
        if driver_op(&mut drv, 0, op, &mut input, DATA) {
            continue;
        }
        match op {
            8 | 9 => {
                let kind = input.pick(&[
                    VIRTIO_BLK_T_IN,
                    VIRTIO_BLK_T_OUT,
                    VIRTIO_BLK_T_IN,
                    VIRTIO_BLK_T_OUT,
                    VIRTIO_BLK_T_FLUSH,
                    VIRTIO_BLK_T_GET_ID,
                    VIRTIO_BLK_T_DISCARD,
                    VIRTIO_BLK_T_WRITE_ZEROES,
                    5,
                    0xffff_ffff,
                ]);
                let sector = if input.u8() % 8 == 0 {
                    input.u64()
                } else {
                    u64::from(input.u8() % 70)
                };
                let at = address(&mut input, DATA);
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&kind.to_le_bytes());
                h[8..16].copy_from_slice(&sector.to_le_bytes());
                drv.write(at, &h);
            }
            10 => {
                // A DISCARD / WRITE_ZEROES segment.
                let at = address(&mut input, DATA);
                let sector = u64::from(input.u8() % 70);
                let num = if input.bool() {
                    u32::from(input.u8() % 70)
                } else {
                    input.u32()
                };
                let flags = u32::from(input.u8() % 4);
                let mut s = [0u8; 16];
                s[0..8].copy_from_slice(&sector.to_le_bytes());
                s[8..12].copy_from_slice(&num.to_le_bytes());
                s[12..16].copy_from_slice(&flags.to_le_bytes());
                drv.write(at, &s);
            }
            11 | 12 => served += kick(&mut dev, &mut drv, &irq, &file, &fixed),
            _ => {
                // Reset and set up again on zeroed rings.
                dev.reset();
                let r = &drv.rings[0];
                for (at, len) in [r.avail_range(), r.used_range()] {
                    drv.write(at, &vec![0u8; len as usize]);
                }
                activate(&mut dev, &mut drv, &irq, &fixed);
                let _ = irq.take();
            }
        }
    }
    served + kick(&mut dev, &mut drv, &irq, &file, &fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_inputs() {
        crate::fuzzing::tests::run(virtio_blk, 0xb10c_0000_0000_0001, 600, 700);
    }

    /// The shadow is not vacuous: random inputs get requests through with its checks on.
    #[test]
    fn requests_served_under_the_shadow() {
        let mut served = 0;
        for data in crate::fuzzing::tests::inputs(0x5eed, 400, 400) {
            served += run(&data);
        }
        assert!(served > 100, "{served} requests served under the shadow");
    }
}
