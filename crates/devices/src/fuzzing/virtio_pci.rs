//! The virtio-pci transport with virtio-blk behind it, driven through the `PciDevice` API as a
//! guest reaches it: config accesses within a dword (what the root passes on), BAR 0 accesses
//! of any width anywhere, common-config writes aimed at the state machine, guest memory written
//! by the input (rings, requests), queue kicks, and a "bring-up" op that performs a proper
//! driver initialisation so that DRIVER_OK, queue processing and reset are reached quickly.
//!
//! Checks after every step, from what a driver can read back:
//! - DRIVER_OK is never set without FEATURES_OK, and an active device means DRIVER_OK;
//! - FEATURES_OK means the device accepted VERSION_1 and only offered features;
//! - `num_queues` is 1; queue 0's size is a power of two up to the maximum; a `queue_select`
//!   past it reads zeros;
//! - `msix_config` and `queue_msix_vector` hold NO_VECTOR or a vector of the table;
//! - a status write of 0 leaves status 0 and the device inactive;
//! - MSI-X updates and triggers name only vectors of the table;
//! - a read-only disk keeps its bytes.

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::virtio_blk::memfd;
use super::virtq::guest_memory;
use super::{Input, le};
use crate::pci::PciDevice;
use crate::pci::msix::{MsiEvent, RecordingMsi};
use crate::virtio::block::{Block, BlockBackend, BlockOptions, QUEUE_SIZE};
use crate::virtio::pci::{
    BAR_SIZE, COMMON_CFG_LEN, COMMON_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_OFFSET,
    VIRTIO_MSI_NO_VECTOR, VirtioPciDevice,
};
use crate::virtio::{DmaSpace, VirtioDevice, features, status};

const DISK_LEN: u64 = 16 << 10;
/// One queue plus the configuration.
const VECTORS: u16 = 2;

const DFSEL: u64 = 0x00;
const DF: u64 = 0x04;
const GFSEL: u64 = 0x08;
const GF: u64 = 0x0c;
const MSIX_CONFIG: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const STATUS: u64 = 0x14;
const QSEL: u64 = 0x16;
const QSIZE: u64 = 0x18;
const QVEC: u64 = 0x1a;
const QENABLE: u64 = 0x1c;
const QNOTIFY: u64 = 0x1e;

fn rd(pci: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    pci.bar_read(0, COMMON_OFFSET + off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn wr(pci: &mut VirtioPciDevice, off: u64, len: usize, value: u64) {
    pci.bar_write(0, COMMON_OFFSET + off, &le(value, len));
}

/// A driver's initialisation with the input's features (plus VERSION_1) and queue size, the
/// rings where the input may have written them, vector 0 for the queue.
fn bring_up(pci: &mut VirtioPciDevice, input: &mut Input<'_>) {
    wr(pci, STATUS, 1, 0);
    wr(
        pci,
        STATUS,
        1,
        u64::from(status::ACKNOWLEDGE | status::DRIVER),
    );
    let extra = input.u64();
    for (sel, word) in [(0, extra as u32), (1, (extra >> 32) as u32 | 1)] {
        wr(pci, GFSEL, 4, sel);
        wr(pci, GF, 4, u64::from(word));
    }
    let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    wr(pci, STATUS, 1, u64::from(ok));
    wr(pci, QSEL, 2, 0);
    wr(pci, QSIZE, 2, u64::from(input.pick(&[4u16, 8, 16, 256, 3])));
    wr(pci, 0x20, 8, 0);
    wr(pci, 0x28, 8, 0x1000);
    wr(pci, 0x30, 8, 0x2000);
    wr(pci, QVEC, 2, 0);
    wr(pci, MSIX_CONFIG, 2, 1);
    wr(pci, QENABLE, 2, 1);
    pci.bar_write(0, MSIX_TABLE_OFFSET, &0xfee0_0000u32.to_le_bytes());
    pci.bar_write(0, MSIX_TABLE_OFFSET + 12, &0u32.to_le_bytes());
    let _ = pci.config_write(0x04, &[0x06, 0]);
    wr(pci, STATUS, 1, u64::from(ok | status::DRIVER_OK));
}

fn check(pci: &mut VirtioPciDevice, device: &Mutex<Block>, offered: u64) {
    let s = rd(pci, STATUS, 1) as u8;
    if s & status::DRIVER_OK != 0 {
        assert_ne!(
            s & status::FEATURES_OK,
            0,
            "DRIVER_OK without FEATURES_OK: {s:#x}"
        );
    }
    let (active, acked) = {
        let d = device.lock().expect("device lock");
        (d.is_active(), d.acked_features())
    };
    if active {
        assert_ne!(s & status::DRIVER_OK, 0, "active without DRIVER_OK: {s:#x}");
    }
    if s & status::FEATURES_OK != 0 {
        assert_ne!(
            acked & features::VERSION_1,
            0,
            "FEATURES_OK without VERSION_1"
        );
        assert_eq!(acked & !offered, 0, "accepted features not offered");
    }
    assert_eq!(rd(pci, NUM_QUEUES, 2), 1);
    let vector_ok = |v: u64| v == u64::from(VIRTIO_MSI_NO_VECTOR) || v < u64::from(VECTORS);
    let config_vector = rd(pci, MSIX_CONFIG, 2);
    assert!(vector_ok(config_vector), "msix_config {config_vector:#x}");
    let sel = rd(pci, QSEL, 2);
    let size = rd(pci, QSIZE, 2);
    let vector = rd(pci, QVEC, 2);
    if sel == 0 {
        assert!(
            size.is_power_of_two() && size <= u64::from(QUEUE_SIZE),
            "queue size {size}"
        );
        assert!(vector_ok(vector), "queue vector {vector:#x}");
        assert_eq!(rd(pci, QNOTIFY, 2), 0);
    } else {
        let enable = rd(pci, QENABLE, 2);
        assert_eq!((size, vector, enable), (0, 0, 0), "queue {sel} exists");
    }
}

pub fn virtio_pci(data: &[u8]) {
    let mut input = Input::new(data);
    let read_only = input.bool();
    let file = memfd(DISK_LEN);
    let opts = BlockOptions {
        read_only,
        ..Default::default()
    };
    let backend = BlockBackend::from_file(file.try_clone().expect("memfd dup"), &opts)
        .expect("memfd backend");
    let mut disk_before = vec![0u8; DISK_LEN as usize];
    file.read_exact_at(&mut disk_before, 0).expect("memfd read");
    let block = Arc::new(Mutex::new(Block::new(backend)));
    let offered = block.lock().expect("device lock").offered_features();
    let mem = guest_memory();
    let msi = RecordingMsi::new();
    let device: Arc<Mutex<dyn VirtioDevice>> = block.clone();
    let mut pci = VirtioPciDevice::new(device, DmaSpace::identity(mem.clone()), msi.clone())
        .expect("transport");

    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let mut reset = false;
        match input.u8() % 10 {
            0 => {
                let off = input.u16() & 0xfff;
                let len = input.access_len(false);
                let len = len.min(4 - usize::from(off & 3));
                let _ = pci.config_write(off, &le(input.u32().into(), len));
            }
            1 => {
                let off = input.u16() & 0xfff;
                let len = input.access_len(false).min(4 - usize::from(off & 3));
                let mut b = [0u8; 4];
                pci.config_read(off, &mut b[..len]);
            }
            2 => {
                let off = u64::from(input.u16()) % (BAR_SIZE + 8);
                let len = input.access_len(true);
                pci.bar_write(0, off, &le(input.u64(), len));
            }
            3 => {
                let off = u64::from(input.u16()) % (BAR_SIZE + 8);
                let len = input.access_len(true);
                let mut b = [0u8; 8];
                pci.bar_read(0, off, &mut b[..len]);
            }
            4 | 5 => {
                let off = u64::from(input.u8()) % (COMMON_CFG_LEN + 4);
                let len = input.access_len(true);
                let value = input.u64();
                reset = off == STATUS && len == 1 && value as u8 == 0;
                wr(&mut pci, off, len, value);
            }
            6 => {
                // Guest memory: descriptors, rings and request headers near the rings.
                let at = u64::from(input.u16()) % 0x4000;
                let bytes = input.bytes(64);
                let _ = mem.write_slice(bytes, GuestAddress(at));
            }
            7 => {
                let q = input.pick(&[0u16, 0, 0, 1]);
                pci.bar_write(0, NOTIFY_OFFSET + 4 * u64::from(q), &q.to_le_bytes());
            }
            8 => {
                wr(&mut pci, DFSEL, 4, u64::from(input.u8() % 3));
                let _ = rd(&mut pci, DF, 4);
            }
            _ => bring_up(&mut pci, &mut input),
        }
        check(&mut pci, &block, offered);
        if reset {
            assert_eq!(rd(&mut pci, STATUS, 1), 0, "status after reset");
            assert!(!block.lock().expect("device lock").is_active());
        }
        for e in msi.take() {
            let v = match e {
                MsiEvent::Update(v, _) | MsiEvent::Trigger(v) => v,
            };
            assert!(v < VECTORS, "MSI-X event for vector {v}: {e:?}");
        }
    }
    if read_only {
        let mut after = vec![0u8; DISK_LEN as usize];
        file.read_exact_at(&mut after, 0).expect("memfd read");
        assert!(after == disk_before, "a read-only disk changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_inputs() {
        crate::fuzzing::tests::run(virtio_pci, 0x0b1e_c7ed_0000_0001, 800, 600);
    }

    /// The checks are not vacuous: a bring-up op reaches DRIVER_OK with the device active.
    #[test]
    fn bring_up_reaches_the_device() {
        let mut data = vec![1u8]; // read-only
        data.extend_from_slice(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 2]); // bring-up, size 16
        data.extend_from_slice(&[7, 0]); // kick queue 0
        virtio_pci(&data);
        let mem = guest_memory();
        let msi = RecordingMsi::new();
        let block = Arc::new(Mutex::new(Block::new(
            BlockBackend::from_file(memfd(DISK_LEN), &BlockOptions::default()).expect("backend"),
        )));
        let device: Arc<Mutex<dyn VirtioDevice>> = block.clone();
        let mut pci = VirtioPciDevice::new(device, DmaSpace::identity(mem), msi).expect("pci");
        bring_up(&mut pci, &mut Input::new(&[0, 0, 0, 0, 0, 0, 0, 0, 2]));
        assert_eq!(
            rd(&mut pci, STATUS, 1) as u8,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
        );
        assert!(block.lock().expect("device lock").is_active());
    }
}
