//! virtio-blk driven the way a guest driver would: queues laid out in real guest memory with
//! virtio-queue's mock, requests built descriptor by descriptor, results checked in guest
//! memory and in the image file on the host.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    virtio_blk_config,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::QueueT;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, Permissions};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::virtio::DmaSpace;
use crate::virtio::dma::{DmaIommu, PhysMemory};
use crate::virtio::features;
use crate::virtio::testutil::{Desc, RecordingInterrupt, TestDriver, XorShift, test_memory};

const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

/// Where test requests keep their header, status byte and data in guest memory.
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x8100;
const DATA: u64 = 0x10000;
/// An address in the hole between the two test memory regions.
const HOLE: u64 = 0x18_0000;

const DISK_SECTORS: u64 = 2048; // 1 MiB

struct Disk {
    file: TempFile,
}

impl Disk {
    fn new(sectors: u64) -> Self {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(sectors * SECTOR_SIZE).unwrap();
        Self { file }
    }

    fn device(&self, opts: &BlockOptions) -> Block {
        Block::new(BlockBackend::open(self.file.as_path(), opts).unwrap())
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.file.as_file().read_exact_at(&mut v, offset).unwrap();
        v
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.file.as_file().write_all_at(data, offset).unwrap();
    }
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Activate with every offered feature accepted.
fn activate(dev: &mut Block, drv: &TestDriver, mem: &PhysMemory) -> Arc<RecordingInterrupt> {
    activate_with(dev, drv, mem, dev.offered_features())
}

fn activate_with(
    dev: &mut Block,
    drv: &TestDriver,
    mem: &PhysMemory,
    features: u64,
) -> Arc<RecordingInterrupt> {
    let irq = Arc::new(RecordingInterrupt::default());
    dev.ack_features(features);
    dev.activate(
        vec![drv.queue()],
        irq.clone(),
        DmaSpace::identity(mem.clone()),
    )
    .unwrap();
    irq
}

/// Submit one request with its header at HDR, status at STATUS and `data` between; process
/// it; return (status byte, used length).
fn run(dev: &mut Block, drv: &mut TestDriver, kind: u32, sector: u64, data: &[Desc]) -> (u8, u32) {
    drv.write(HDR, &header(kind, sector));
    drv.write(STATUS, &[0xee]);
    let mut descs = vec![Desc::r(HDR, 16)];
    descs.extend_from_slice(data);
    descs.push(Desc::w(STATUS, 1));
    submit(dev, drv, &descs)
}

/// Submit a chain as given; return (byte at STATUS, used length).
fn submit(dev: &mut Block, drv: &mut TestDriver, descs: &[Desc]) -> (u8, u32) {
    let before = drv.used_idx();
    drv.add(descs);
    dev.process_queue(0);
    assert_eq!(drv.used_idx(), before.wrapping_add(1), "request returned");
    let (_, len) = drv.used(before);
    (drv.read(STATUS, 1)[0], len)
}

#[test]
fn config_space_and_features() {
    let disk = Disk::new(DISK_SECTORS);
    // A trailing partial sector is not part of the disk.
    disk.file
        .as_file()
        .set_len(DISK_SECTORS * SECTOR_SIZE + 100)
        .unwrap();
    let mut dev = disk.device(&BlockOptions::default());
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE]);
    let f = dev.offered_features();
    assert_eq!(f & features::COMMON, features::COMMON);
    assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
    let read = |dev: &Block, field: usize, len: usize| {
        let mut b = vec![0u8; len];
        dev.read_config(field as u64, &mut b);
        let mut v = [0u8; 8];
        v[..len].copy_from_slice(&b);
        u64::from_le_bytes(v)
    };
    assert_eq!(
        read(&dev, offset_of!(virtio_blk_config, capacity), 8),
        DISK_SECTORS
    );
    assert_eq!(read(&dev, offset_of!(virtio_blk_config, seg_max), 4), 254);
    assert_eq!(read(&dev, offset_of!(virtio_blk_config, blk_size), 4), 512);
    assert_eq!(
        read(&dev, offset_of!(virtio_blk_config, max_discard_seg), 4),
        u64::from(MAX_DWZ_SEGMENTS)
    );
    assert_eq!(
        read(
            &dev,
            offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            1
        ),
        1
    );
    // Byte-wise reads agree with wide ones; past the end reads zero.
    let mut b = [0u8; 1];
    dev.read_config(1, &mut b);
    assert_eq!(b[0], ((DISK_SECTORS >> 8) & 0xff) as u8);
    let mut far = [0xffu8; 4];
    dev.read_config(CONFIG_LEN as u64, &mut far);
    assert_eq!(far, [0; 4]);
    // Every field is read-only.
    dev.write_config(0, &[9; 8]);
    assert_eq!(read(&dev, 0, 8), DISK_SECTORS);

    let ro = disk.device(&BlockOptions {
        read_only: true,
        ..Default::default()
    });
    assert_ne!(ro.offered_features() & bit(VIRTIO_BLK_F_RO), 0);
}

#[test]
fn serial_is_bounded() {
    let disk = Disk::new(8);
    let long = BlockOptions {
        serial: Some("x".repeat(21)),
        ..Default::default()
    };
    assert!(matches!(
        BlockBackend::open(disk.file.as_path(), &long),
        Err(BlockError::SerialTooLong(21))
    ));
    assert!(matches!(
        BlockBackend::open(
            std::path::Path::new("/nonexistent/disk.img"),
            &BlockOptions::default()
        ),
        Err(BlockError::Open { .. })
    ));
    // Default serial: non-empty, stable for the same file.
    let a = BlockBackend::open(disk.file.as_path(), &BlockOptions::default()).unwrap();
    let b = BlockBackend::open(disk.file.as_path(), &BlockOptions::default()).unwrap();
    assert_ne!(a.serial(), &[0; SERIAL_LEN]);
    assert_eq!(a.serial(), b.serial());
}

#[test]
fn write_read_flush_get_id() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    let mut dev = disk.device(&BlockOptions {
        serial: Some("manifold-disk-0".into()),
        ..Default::default()
    });
    let irq = activate(&mut dev, &drv, &mem);

    // OUT: 3 sectors from two buffers (one in each memory region) at sector 5.
    let data = pattern(1536, 7);
    drv.write(DATA, &data[..1024]);
    drv.write(0x20_0000, &data[1024..]);
    let (st, len) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_OUT,
        5,
        &[Desc::r(DATA, 1024), Desc::r(0x20_0000, 512)],
    );
    assert_eq!((st, len), (OK, 1));
    assert_eq!(disk.read(5 * 512, 1536), data);
    assert_eq!(irq.take_queues(), vec![0]);

    // IN: read it back into one buffer.
    let (st, len) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_IN,
        5,
        &[Desc::w(DATA + 0x4000, 1536)],
    );
    assert_eq!((st, len), (OK, 1537));
    assert_eq!(drv.read(DATA + 0x4000, 1536), data);

    // The host changes the image; the guest sees it.
    disk.write(0, &[0x5a; 512]);
    let (st, _) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_IN,
        0,
        &[Desc::w(DATA, 512)],
    );
    assert_eq!(st, OK);
    assert_eq!(drv.read(DATA, 512), vec![0x5a; 512]);

    // The last sector is reachable.
    let (st, _) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_OUT,
        DISK_SECTORS - 1,
        &[Desc::r(DATA, 512)],
    );
    assert_eq!(st, OK);

    let (st, len) = run(&mut dev, &mut drv, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((st, len), (OK, 1));

    let (st, len) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[Desc::w(DATA, 20)],
    );
    assert_eq!((st, len), (OK, 21));
    let mut want = b"manifold-disk-0".to_vec();
    want.resize(20, 0);
    assert_eq!(drv.read(DATA, 20), want);
    // A shorter ID buffer gets a prefix.
    let (st, len) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[Desc::w(DATA + 100, 8)],
    );
    assert_eq!((st, len), (OK, 9));
    assert_eq!(drv.read(DATA + 100, 8), b"manifold");
}

#[test]
fn header_and_data_may_share_descriptors() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    let mut dev = disk.device(&BlockOptions::default());
    activate(&mut dev, &drv, &mem);
    // One readable descriptor holds header and data; the header itself is split 10 + 6.
    let data = pattern(512, 3);
    drv.write(HDR, &header(VIRTIO_BLK_T_OUT, 9)[..10]);
    drv.write(DATA, &header(VIRTIO_BLK_T_OUT, 9)[10..]);
    drv.write(DATA + 6, &data);
    // Data and status share one writable descriptor on the way back.
    let (st, len) = submit(
        &mut dev,
        &mut drv,
        &[Desc::r(HDR, 10), Desc::r(DATA, 6 + 512), Desc::w(STATUS, 1)],
    );
    assert_eq!((st, len), (OK, 1));
    assert_eq!(disk.read(9 * 512, 512), data);
    drv.write(HDR, &header(VIRTIO_BLK_T_IN, 9));
    drv.add(&[Desc::r(HDR, 16), Desc::w(0x20_0000, 513)]);
    dev.process_queue(0);
    assert_eq!(drv.read(0x20_0000, 512), data);
    assert_eq!(drv.read(0x20_0200, 1), [OK]);
}

#[test]
fn indirect_descriptors() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    let mut dev = disk.device(&BlockOptions::default());
    activate(&mut dev, &drv, &mem);
    let data = pattern(4096, 11);
    drv.write(DATA, &data);
    drv.write(HDR, &header(VIRTIO_BLK_T_OUT, 100));
    let table = 0x9000;
    let entries = [
        Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        Descriptor::new(DATA, 4096, VRING_DESC_F_NEXT as u16, 2),
        Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    for (i, d) in entries.iter().enumerate() {
        mem.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let h = drv.next_free();
    drv.write_raw(
        h,
        Descriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0),
    );
    drv.publish(h);
    dev.process_queue(0);
    assert_eq!(drv.used(0), (u32::from(h), 1));
    assert_eq!(drv.read(STATUS, 1), [OK]);
    assert_eq!(disk.read(100 * 512, 4096), data);
}

#[test]
fn discard_and_write_zeroes_leave_zeros() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    disk.write(0, &vec![0xff; (DISK_SECTORS * SECTOR_SIZE) as usize]);
    let mut dev = disk.device(&BlockOptions::default());
    activate(&mut dev, &drv, &mem);
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    let ones = vec![0xff; 512];
    // DISCARD of two ranges: sectors 8..24 and 64..72.
    drv.write(DATA, &seg(8, 16, 0));
    drv.write(DATA + 16, &seg(64, 8, 0));
    let (st, _) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[Desc::r(DATA, 32)],
    );
    assert_eq!(st, OK);
    assert_eq!(disk.read(8 * 512, 16 * 512), vec![0; 16 * 512]);
    assert_eq!(disk.read(64 * 512, 8 * 512), vec![0; 8 * 512]);
    assert_eq!(disk.read(7 * 512, 512), ones);
    assert_eq!(disk.read(24 * 512, 512), ones);
    // WRITE_ZEROES with UNMAP (punch hole), then without (zero range); one unaligned sector.
    for (sector, n, flags) in [(200u64, 9u32, 1u32), (300, 3, 0), (1001, 1, 0)] {
        drv.write(DATA, &seg(sector, n, flags));
        let (st, _) = run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[Desc::r(DATA, 16)],
        );
        assert_eq!(st, OK, "write zeroes at {sector}");
        let len = n as usize * 512;
        assert_eq!(disk.read(sector * 512, len), vec![0; len]);
        assert_eq!(disk.read((sector - 1) * 512, 512), ones);
        assert_eq!(disk.read((sector + u64::from(n)) * 512, 512), ones);
    }
    // An empty segment is a no-op, not a host error.
    drv.write(DATA, &seg(10, 0, 0));
    let (st, _) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[Desc::r(DATA, 16)],
    );
    assert_eq!(st, OK);
    let (st, _) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[Desc::r(DATA, 16)],
    );
    assert_eq!(st, OK);
    // The file keeps its size.
    assert_eq!(
        disk.file.as_file().metadata().unwrap().len(),
        DISK_SECTORS * SECTOR_SIZE
    );

    // Refusals: UNMAP on a discard and unknown flags are UNSUPP; a range past the end, too
    // many sectors or segments, and a partial segment are IOERR. Nothing changes on disk.
    drv.write(DATA, &seg(500, 1, 1));
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[Desc::r(DATA, 16)]
        )
        .0,
        UNSUPP
    );
    drv.write(DATA, &seg(500, 1, 4));
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[Desc::r(DATA, 16)]
        )
        .0,
        UNSUPP
    );
    drv.write(DATA, &seg(DISK_SECTORS - 1, 2, 0));
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[Desc::r(DATA, 16)]
        )
        .0,
        IOERR
    );
    drv.write(DATA, &seg(u64::MAX / 256, 1, 0));
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[Desc::r(DATA, 16)]
        )
        .0,
        IOERR
    );
    drv.write(DATA, &seg(0, MAX_WRITE_ZEROES_SECTORS + 1, 0));
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[Desc::r(DATA, 16)]
        )
        .0,
        IOERR
    );
    // A good segment then a bad one: the good one is not carried out either.
    drv.write(DATA, &seg(500, 1, 0));
    drv.write(DATA + 16, &seg(DISK_SECTORS, 1, 0));
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[Desc::r(DATA, 32)]
        )
        .0,
        IOERR
    );
    assert_eq!(disk.read(500 * 512, 512), ones);
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[Desc::r(DATA, 24)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(&mut dev, &mut drv, VIRTIO_BLK_T_DISCARD, 0, &[]).0,
        IOERR
    );
    let many = (MAX_DWZ_SEGMENTS + 1) * 16;
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[Desc::r(DATA, many)]
        )
        .0,
        IOERR
    );
    assert_eq!(disk.read(500 * 512, 512), ones);
}

#[test]
fn discard_needs_negotiation() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    let mut dev = disk.device(&BlockOptions::default());
    let f = dev.offered_features() & !bit(VIRTIO_BLK_F_DISCARD);
    activate_with(&mut dev, &drv, &mem, f);
    drv.write(DATA, &[0; 16]);
    let (st, _) = run(
        &mut dev,
        &mut drv,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[Desc::r(DATA, 16)],
    );
    assert_eq!(st, UNSUPP);
}

#[test]
fn read_only_refuses_writes() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    disk.write(0, &[0x77; 4096]);
    let mut dev = disk.device(&BlockOptions {
        read_only: true,
        ..Default::default()
    });
    activate(&mut dev, &drv, &mem);
    drv.write(DATA, &[0; 4096]);
    let seg = [0u8; 16]; // sector 0, 0 sectors
    drv.write(DATA + 0x2000, &seg);
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_OUT,
            0,
            &[Desc::r(DATA, 4096)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[Desc::r(DATA + 0x2000, 16)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[Desc::r(DATA + 0x2000, 16)]
        )
        .0,
        IOERR
    );
    assert_eq!(disk.read(0, 4096), vec![0x77; 4096]);
    // Reads and flushes still work.
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_IN,
            0,
            &[Desc::w(DATA, 4096)]
        )
        .0,
        OK
    );
    assert_eq!(drv.read(DATA, 4096), vec![0x77; 4096]);
    assert_eq!(run(&mut dev, &mut drv, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
}

#[test]
fn malformed_requests_get_errors_not_panics() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    disk.write(0, &[0x33; 512]);
    let mut dev = disk.device(&BlockOptions::default());
    let irq = activate(&mut dev, &drv, &mem);

    // Short header.
    drv.write(HDR, &header(VIRTIO_BLK_T_IN, 0));
    assert_eq!(
        submit(&mut dev, &mut drv, &[Desc::r(HDR, 8), Desc::w(STATUS, 1)]),
        (IOERR, 1)
    );
    // Header out of guest memory.
    assert_eq!(
        submit(&mut dev, &mut drv, &[Desc::r(HOLE, 16), Desc::w(STATUS, 1)]),
        (IOERR, 1)
    );
    // Wrong directions: IN with readable data, OUT with writable data, FLUSH with data.
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_IN,
            0,
            &[Desc::r(DATA, 512)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_OUT,
            0,
            &[Desc::w(DATA, 512)]
        ),
        (IOERR, 1)
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_FLUSH,
            0,
            &[Desc::w(DATA, 512)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[Desc::r(DATA, 20)]
        )
        .0,
        IOERR
    );
    // Data not in whole sectors.
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_IN,
            0,
            &[Desc::w(DATA, 511)]
        )
        .0,
        IOERR
    );
    // Sectors outside the disk, and a sector number whose byte offset overflows.
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_IN,
            DISK_SECTORS,
            &[Desc::w(DATA, 512)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_IN,
            DISK_SECTORS - 1,
            &[Desc::w(DATA, 1024)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_OUT,
            u64::MAX,
            &[Desc::r(DATA, 512)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_OUT,
            u64::MAX / 512,
            &[Desc::r(DATA, 512)]
        )
        .0,
        IOERR
    );
    // Data buffers outside guest memory, or straddling its end.
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_IN,
            0,
            &[Desc::w(HOLE, 512)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_OUT,
            0,
            &[Desc::r(0xffe00 + 256, 512)]
        )
        .0,
        IOERR
    );
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_IN,
            0,
            &[Desc::w(u64::MAX - 255, 512)]
        )
        .0,
        IOERR
    );
    // An unknown request type.
    assert_eq!(run(&mut dev, &mut drv, 0x1234, 0, &[]).0, UNSUPP);
    // Readable after writable: an error in the final status byte.
    drv.write(HDR, &header(VIRTIO_BLK_T_IN, 0));
    assert_eq!(
        submit(
            &mut dev,
            &mut drv,
            &[
                Desc::r(HDR, 16),
                Desc::w(DATA, 512),
                Desc::r(DATA + 512, 512),
                Desc::w(STATUS, 1)
            ]
        ),
        (IOERR, 1)
    );
    assert_eq!(disk.read(0, 512), vec![0x33; 512]);

    // No status byte at all, or one outside guest memory: returned unanswered.
    drv.write(STATUS, &[0xee]);
    assert_eq!(submit(&mut dev, &mut drv, &[Desc::r(HDR, 16)]), (0xee, 0));
    assert_eq!(
        submit(&mut dev, &mut drv, &[Desc::r(HDR, 16), Desc::w(HOLE, 1)]),
        (0xee, 0)
    );
    // A zero-length "status" descriptor does not count as a status byte.
    assert_eq!(
        submit(&mut dev, &mut drv, &[Desc::r(HDR, 16), Desc::w(STATUS, 0)]),
        (0xee, 0)
    );

    // A looping chain: 0 -> 1 -> 0 (in fresh slots).
    let h = drv.next_free();
    drv.write_raw(h, Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, h + 1));
    drv.write_raw(
        h + 1,
        Descriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            h,
        ),
    );
    let before = drv.used_idx();
    drv.publish(h);
    dev.process_queue(0);
    assert_eq!(drv.used(before), (u32::from(h), 0));

    // A chain longer than the queue, through an indirect table of 300 descriptors.
    let table = 0x40000;
    for i in 0..300u16 {
        let d = Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, i + 1);
        mem.write_obj(
            RawDescriptor::from(d),
            GuestAddress(table + 16 * u64::from(i)),
        )
        .unwrap();
    }
    let h = drv.next_free();
    drv.write_raw(
        h,
        Descriptor::new(table, 300 * 16, VRING_DESC_F_INDIRECT as u16, 0),
    );
    let before = drv.used_idx();
    drv.publish(h);
    dev.process_queue(0);
    assert_eq!(drv.used(before), (u32::from(h), 0));
    // An indirect table outside guest memory.
    let h = drv.next_free();
    drv.write_raw(
        h,
        Descriptor::new(HOLE, 64, VRING_DESC_F_INDIRECT as u16, 0),
    );
    drv.publish(h);
    dev.process_queue(0);
    assert_eq!(drv.used(before + 1), (u32::from(h), 0));

    // None of this needed a reset, and the device still works.
    assert!(!irq.needs_reset());
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_IN,
            0,
            &[Desc::w(DATA, 512)]
        )
        .0,
        OK
    );
    assert_eq!(drv.read(DATA, 512), vec![0x33; 512]);
}

#[test]
fn chain_longer_than_the_queue() {
    // A direct chain that never ends: every descriptor of a small queue points to the next,
    // the last back to the first.
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, 16);
    let disk = Disk::new(DISK_SECTORS);
    let mut dev = disk.device(&BlockOptions::default());
    let irq = Arc::new(RecordingInterrupt::default());
    dev.ack_features(dev.offered_features());
    dev.activate(
        vec![drv.queue()],
        irq.clone(),
        DmaSpace::identity(mem.clone()),
    )
    .unwrap();
    for i in 0..16u16 {
        drv.write_raw(
            i,
            Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, (i + 1) % 16),
        );
    }
    drv.publish(0);
    dev.process_queue(0);
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used(0), (0, 0));
    assert!(!irq.needs_reset());
}

/// Found by the virtio_blk fuzz target: a writable buffer that wraps around the address space
/// put the status byte at a wrapped address (u64::MAX + 15 = 0xe, inside the descriptor
/// table). Such a buffer has no reachable status byte: the chain goes back with length 0 and
/// guest memory is untouched.
#[test]
fn buffers_wrapping_around_the_address_space() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, 16);
    let disk = Disk::new(DISK_SECTORS);
    let mut dev = disk.device(&BlockOptions::default());
    let _irq = activate(&mut dev, &drv, &mem);
    drv.write(HDR, &header(VIRTIO_BLK_T_GET_ID, 0));
    let chains: [&[Desc]; 3] = [
        &[Desc::w(u64::MAX, 16)],
        &[Desc::r(HDR, 16), Desc::w(u64::MAX - 3, 16)],
        // Readable after writable: the status would be the last writable byte.
        &[
            Desc::w(DATA, 4),
            Desc::r(HDR, 16),
            Desc::w(u64::MAX - 3, 16),
        ],
    ];
    let (_, _, used) = drv.ring_addresses();
    for (k, descs) in chains.into_iter().enumerate() {
        drv.add(descs);
        let before = drv.read(0, used as usize);
        dev.process_queue(0);
        assert_eq!(drv.used(k as u16).1, 0);
        // Nothing below the used ring moved (the descriptor table and available ring).
        let now = drv.read(0, used as usize);
        let changed: Vec<usize> = (0..now.len()).filter(|&i| before[i] != now[i]).collect();
        assert!(changed.is_empty(), "guest memory written at {changed:x?}");
    }
    assert_eq!(drv.used_idx(), 3);
}

#[test]
fn unreachable_rings_need_reset() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    let mut dev = disk.device(&BlockOptions::default());
    let iommu = DmaIommu::new();
    // Rings and buffers at IOVA 0x1_0000_0000 + GPA.
    const IOVA: u64 = 0x1_0000_0000;
    iommu
        .map(IOVA, 0, 0x10_0000, Permissions::ReadWrite)
        .unwrap();
    let mut q = drv.queue();
    q.set_desc_table_address(Some(q.desc_table() as u32), Some(1));
    q.set_avail_ring_address(Some(q.avail_ring() as u32), Some(1));
    q.set_used_ring_address(Some(q.used_ring() as u32), Some(1));
    let irq = Arc::new(RecordingInterrupt::default());
    dev.ack_features(dev.offered_features());
    let dma = DmaSpace::with_iommu(mem.clone(), iommu.clone());
    dev.activate(vec![q], irq.clone(), dma).unwrap();

    let data = pattern(1024, 42);
    drv.write(DATA, &data);
    drv.write(HDR, &header(VIRTIO_BLK_T_OUT, 0));
    drv.add(&[
        Desc::r(IOVA + HDR, 16),
        Desc::r(IOVA + DATA, 1024),
        Desc::w(IOVA + STATUS, 1),
    ]);
    dev.process_queue(0);
    assert_eq!(drv.read(STATUS, 1), [OK]);
    assert_eq!(disk.read(0, 1024), data);
    // A guest physical address is not an IOVA here: the data buffer is refused.
    drv.add(&[
        Desc::r(IOVA + HDR, 16),
        Desc::r(DATA, 1024),
        Desc::w(IOVA + STATUS, 1),
    ]);
    dev.process_queue(0);
    assert_eq!(drv.read(STATUS, 1), [IOERR]);
    // A read-only mapping refuses the device's write into it.
    iommu
        .map(IOVA + 0x8_0000, 0x8_0000, 0x1000, Permissions::Read)
        .unwrap();
    drv.write(HDR, &header(VIRTIO_BLK_T_IN, 0));
    drv.add(&[
        Desc::r(IOVA + HDR, 16),
        Desc::w(IOVA + 0x8_0000, 512),
        Desc::w(IOVA + STATUS, 1),
    ]);
    dev.process_queue(0);
    assert_eq!(drv.read(STATUS, 1), [IOERR]);
    assert!(!irq.needs_reset());
    // The guest unmaps the rings: the next notification asks for a reset.
    iommu.unmap(IOVA, 0x2000).unwrap();
    drv.add(&[
        Desc::r(IOVA + HDR, 16),
        Desc::w(IOVA + DATA, 512),
        Desc::w(IOVA + STATUS, 1),
    ]);
    dev.process_queue(0);
    assert!(irq.needs_reset());
    // After a reset the device can be activated again.
    dev.reset();
    assert!(!dev.is_active());
}

#[test]
fn direct_io_with_aligned_and_unaligned_buffers() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    let opts = BlockOptions {
        direct: true,
        ..Default::default()
    };
    let backend = match BlockBackend::open(disk.file.as_path(), &opts) {
        Ok(b) => b,
        Err(BlockError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("O_DIRECT not supported here; skipping");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let mut dev = Block::new(backend);
    assert!(dev.backend().direct());
    activate(&mut dev, &drv, &mem);
    let data = pattern(8192, 5);
    // Aligned: straight to the file.
    drv.write(DATA, &data);
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_OUT,
            16,
            &[Desc::r(DATA, 8192)]
        )
        .0,
        OK
    );
    assert_eq!(disk.read(16 * 512, 8192), data);
    // Unaligned guest buffers go through a bounce buffer.
    drv.write(DATA + 0x3001, &data[..4096]);
    drv.write(DATA + 0x5003, &data[4096..]);
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_OUT,
            40,
            &[Desc::r(DATA + 0x3001, 4096), Desc::r(DATA + 0x5003, 4096)]
        )
        .0,
        OK
    );
    assert_eq!(disk.read(40 * 512, 8192), data);
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_IN,
            40,
            &[Desc::w(DATA + 0x8007, 8192)]
        )
        .0,
        OK
    );
    assert_eq!(drv.read(DATA + 0x8007, 8192), data);
    // Write zeroes and flush with O_DIRECT.
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&40u64.to_le_bytes());
    seg[8..12].copy_from_slice(&16u32.to_le_bytes());
    drv.write(DATA, &seg);
    assert_eq!(
        run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[Desc::r(DATA, 16)]
        )
        .0,
        OK
    );
    assert_eq!(disk.read(40 * 512, 8192), vec![0; 8192]);
    assert_eq!(run(&mut dev, &mut drv, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
    let disk = Disk::new(DISK_SECTORS);
    let mut dev = disk.device(&BlockOptions::default());
    let irq = activate(&mut dev, &drv, &mem);
    assert_ne!(dev.acked_features() & features::RING_EVENT_IDX, 0);
    // used_event (after the avail ring) = 5: the driver wants an interrupt once entry 5 is used.
    let used_event_addr = drv.queue().avail_ring() + 4 + 2 * u64::from(QUEUE_SIZE);
    mem.write_obj(5u16, GuestAddress(used_event_addr)).unwrap();
    for _ in 0..3 {
        run(&mut dev, &mut drv, VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    assert!(irq.take_queues().is_empty());
    for _ in 0..3 {
        run(&mut dev, &mut drv, VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    assert_eq!(irq.take_queues(), vec![0]);
    // The device re-armed notifications: avail_event (after the used ring) = next avail.
    let avail_event_addr = drv.queue().used_ring() + 4 + 8 * u64::from(QUEUE_SIZE);
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(avail_event_addr)).unwrap(),
        6
    );
}

/// Random valid reads and writes against a shadow copy of the disk.
#[test]
fn random_io_matches_a_shadow_disk() {
    let mem = test_memory();
    let mut drv = TestDriver::new(&mem, 64);
    let sectors = 256u64;
    let disk = Disk::new(sectors);
    let mut shadow = vec![0u8; (sectors * SECTOR_SIZE) as usize];
    let mut dev = disk.device(&BlockOptions::default());
    let irq = Arc::new(RecordingInterrupt::default());
    dev.ack_features(dev.offered_features());
    dev.activate(
        vec![drv.queue()],
        irq.clone(),
        DmaSpace::identity(mem.clone()),
    )
    .unwrap();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..400u64 {
        let n = 1 + rng.below(16);
        let sector = rng.below(sectors - n + 1);
        let len = (n * SECTOR_SIZE) as usize;
        // Split the data into 1..4 buffers at random sector boundaries, scattered in memory.
        let parts = 1 + rng.below(n.min(4));
        let mut cuts: Vec<u64> = (0..parts - 1).map(|_| 1 + rng.below(n - 1)).collect();
        cuts.push(0);
        cuts.push(n);
        cuts.sort_unstable();
        cuts.dedup();
        let write = rng.below(2) == 0;
        let data = pattern(len, round as u8);
        let mut descs = Vec::new();
        for (i, w) in cuts.windows(2).enumerate() {
            let addr = DATA + i as u64 * 0x2_0000 + rng.below(64) * 8;
            let bytes = (w[1] - w[0]) * SECTOR_SIZE;
            let part = &data[(w[0] * SECTOR_SIZE) as usize..(w[1] * SECTOR_SIZE) as usize];
            if write {
                drv.write(addr, part);
                descs.push(Desc::r(addr, bytes as u32));
            } else {
                descs.push(Desc::w(addr, bytes as u32));
            }
        }
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let (st, used) = run(&mut dev, &mut drv, kind, sector, &descs);
        assert_eq!(st, OK);
        let off = (sector * SECTOR_SIZE) as usize;
        if write {
            shadow[off..off + len].copy_from_slice(&data);
            assert_eq!(used, 1);
        } else {
            assert_eq!(used as usize, len + 1);
            let mut got = Vec::new();
            for d in &descs {
                got.extend(drv.read(d.addr, d.len as usize));
            }
            assert_eq!(got, &shadow[off..off + len], "round {round}");
        }
    }
    assert_eq!(disk.read(0, shadow.len()), shadow);
    assert!(!irq.needs_reset());
}

/// Random garbage chains: random addresses (in memory, in the hole, near the top of the
/// address space), lengths, flags and next indexes, random headers. The device must never
/// panic, never touch the disk outside it, and return every chain it pops.
#[test]
fn random_chains_never_panic() {
    let mem = test_memory();
    let size = 32u16;
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let sectors = 64u64;
    let disk = Disk::new(sectors);
    let mut dev = disk.device(&BlockOptions::default());
    let mut drv = TestDriver::new(&mem, size);
    let irq = Arc::new(RecordingInterrupt::default());
    dev.ack_features(dev.offered_features());
    dev.activate(
        vec![drv.queue()],
        irq.clone(),
        DmaSpace::identity(mem.clone()),
    )
    .unwrap();
    let addrs = [
        DATA,
        HDR,
        STATUS,
        HOLE,
        0x20_0000,
        0xf_fff0,
        u64::MAX - 8,
        0x1f_fff8,
    ];
    let kinds = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        7,
    ];
    let mut returned = 0u16;
    let (mut answered, mut dropped) = (0, 0);
    for _ in 0..3000 {
        // Random header and segment data at the usual places.
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let sector = match rng.below(4) {
            0 => rng.below(sectors),
            1 => sectors - 1,
            2 => rng.next(),
            _ => u64::MAX - rng.below(4),
        };
        drv.write(HDR, &header(kind, sector));
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&rng.below(sectors + 2).to_le_bytes());
        seg[8..12].copy_from_slice(&(rng.below(8) as u32).to_le_bytes());
        seg[12..16].copy_from_slice(&(rng.below(3) as u32).to_le_bytes());
        drv.write(DATA, &seg);
        // Random descriptors in random slots.
        let count = 1 + rng.below(6) as u16;
        let head = rng.below(u64::from(size)) as u16;
        for i in 0..count {
            let addr =
                addrs[rng.below(addrs.len() as u64) as usize].wrapping_add(rng.below(4) * 512);
            let len = match rng.below(5) {
                0 => 16,
                1 => 1,
                2 => 512 * (1 + rng.below(4) as u32),
                3 => rng.next() as u32,
                _ => rng.below(2000) as u32,
            };
            let mut flags = 0u16;
            if i + 1 < count || rng.below(8) == 0 {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            if rng.below(2) == 0 {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if rng.below(16) == 0 {
                flags |= VRING_DESC_F_INDIRECT as u16;
            }
            let next = if rng.below(8) == 0 {
                rng.below(64) as u16
            } else {
                (head + i + 1) % size
            };
            drv.write_raw((head + i) % size, Descriptor::new(addr, len, flags, next));
        }
        drv.publish(head);
        dev.process_queue(0);
        assert_eq!(drv.used_idx(), returned.wrapping_add(1));
        if drv.used(returned).1 == 0 {
            dropped += 1;
        } else {
            answered += 1;
        }
        returned = returned.wrapping_add(1);
        assert!(!irq.needs_reset());
    }
    assert_eq!(
        disk.file.as_file().metadata().unwrap().len(),
        sectors * SECTOR_SIZE
    );
    // Both outcomes were exercised.
    assert!(
        answered > 300 && dropped > 300,
        "{answered} answered, {dropped} dropped"
    );
}

#[test]
fn regions_are_whole_disks_of_their_own() {
    // 1 MiB + 3 sectors split in 3: 340 KiB each (1 MiB / 3 rounded down to 4 KiB), the rest
    // belongs to no region.
    let disk = Disk::new(DISK_SECTORS + 3);
    let whole = BlockBackend::open(disk.file.as_path(), &BlockOptions::default()).unwrap();
    let part = BlockBackend::region_size(whole.size(), 3).unwrap();
    assert_eq!(part, 340 * 1024);
    assert!(whole.region(3, 3, "x").is_none());
    assert!(whole.region(0, 0, "x").is_none());
    assert!(whole.region(0, 1, "an-id-much-longer-than-20").is_none());
    assert_eq!(BlockBackend::region_size(4096, 2), None);

    let mem = test_memory();
    for vf in 0..3u16 {
        let region = whole.region(vf, 3, &format!("vf{vf}")).unwrap();
        assert_eq!((region.base(), region.size()), (u64::from(vf) * part, part));
        let mut dev = Block::new(region);
        let mut drv = TestDriver::new(&mem, QUEUE_SIZE);
        activate(&mut dev, &drv, &mem);
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), part / SECTOR_SIZE, "capacity");
        // Sector 0 and the last sector land at the region's start and end.
        let data = pattern(512, vf as u8);
        drv.write(DATA, &data);
        let last = part / SECTOR_SIZE - 1;
        for sector in [0, last] {
            let (st, _) = run(
                &mut dev,
                &mut drv,
                VIRTIO_BLK_T_OUT,
                sector,
                &[Desc::r(DATA, 512)],
            );
            assert_eq!(st, OK);
            assert_eq!(disk.read(u64::from(vf) * part + sector * 512, 512), data);
        }
        // One sector past the region is refused, not written into the neighbour.
        let (st, _) = run(
            &mut dev,
            &mut drv,
            VIRTIO_BLK_T_OUT,
            last + 1,
            &[Desc::r(DATA, 512)],
        );
        assert_eq!(st, IOERR);
        assert_ne!(disk.read(u64::from(vf + 1) * part, 512), data);
    }
}
