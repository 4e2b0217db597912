//! virtio-rng (virtio 1.2, 5.4): one request queue whose device-writable buffers are filled
//! with bytes from the host's `getrandom`.
//!
//! A chain gets at most [`MAX_BYTES_PER_CHAIN`] bytes, so one huge buffer cannot hold the device
//! event loop; the driver asks again for more. Readable descriptors carry nothing for this
//! device and are ignored; a chain that is malformed (loop, readable after writable, over-long)
//! is returned with length 0 and a debug log. A host failure returns length 0 with a warning.

use std::io;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::dma::{Access, DmaSnapshot};
use super::queue::{Chain, parse_chain};
use super::{VirtioCommon, VirtioDevice};

/// Largest request queue the driver may set up.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes one chain receives: bounds the time one request holds the event loop (drivers
/// ask for far less; one that wants more asks again).
pub const MAX_BYTES_PER_CHAIN: usize = 64 * 1024;
/// Most descriptors a chain may have.
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Random bytes are drawn and copied this many at a time.
const CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("Host getrandom failed")]
    GetRandom(#[source] io::Error),
    #[error("Host getrandom returned no bytes")]
    NoBytes,
    #[error("Cannot read the random source")]
    Read(#[source] io::Error),
}

/// Where random bytes come from: the backend of a virtio-rng device.
pub trait EntropySource: Send {
    /// Fill `buf` completely, or fail.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError>;
}

/// The host kernel's random pool through `getrandom(2)` (the same source as `/dev/urandom`,
/// without a file descriptor). It blocks only before the host pool is first initialised.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostRandom;

impl EntropySource for HostRandom {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: the kernel writes at most `rest.len()` bytes at `rest`, which we borrow
            // mutably for the duration of the call.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            match usize::try_from(n) {
                // Never happens for a non-empty buffer; refusing it keeps the loop finite.
                Ok(0) => return Err(RngError::NoBytes),
                Ok(n) => done += n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(RngError::GetRandom(e));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A file of random bytes (`/dev/urandom`, `/dev/hwrng`, ...), read as the guest asks.
#[derive(Debug)]
pub struct FileRandom(pub std::fs::File);

impl EntropySource for FileRandom {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        // read_exact retries on EINTR; a source at its end fails the request (length 0).
        io::Read::read_exact(&mut self.0, buf).map_err(RngError::Read)
    }
}

pub struct Rng {
    common: VirtioCommon,
    source: Box<dyn EntropySource>,
    /// Reused between requests; allocated on first use.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng").field("common", &self.common).finish()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A device fed by the host's `getrandom`.
    pub fn new() -> Self {
        Self::with_source(Box::new(HostRandom))
    }

    pub fn with_source(source: Box<dyn EntropySource>) -> Self {
        Self {
            // No device-specific features and no configuration space.
            common: VirtioCommon::new(VIRTIO_ID_RNG, vec![QUEUE_SIZE], 0),
            source,
            scratch: Vec::new(),
        }
    }
}

/// Serve one chain: returns the number of random bytes written into it.
fn handle_chain(
    source: &mut dyn EntropySource,
    scratch: &mut Vec<u8>,
    dma: &DmaSnapshot,
    chain: Chain<'_>,
) -> u32 {
    let head = chain.head_index();
    let buffers = match parse_chain(chain, MAX_DESCRIPTORS) {
        Ok(b) => b,
        Err(fault) => {
            tracing::debug!(head, "virtio-rng: {}", fault.error);
            return 0;
        }
    };
    if !buffers.readable.is_empty() {
        tracing::debug!(
            head,
            len = buffers.readable.len(),
            "virtio-rng: readable bytes ignored"
        );
    }
    let want = usize::try_from(buffers.writable.len())
        .unwrap_or(usize::MAX)
        .min(MAX_BYTES_PER_CHAIN);
    if want == 0 {
        tracing::debug!(head, "virtio-rng: request has no writable buffer");
        return 0;
    }
    if scratch.len() < CHUNK {
        scratch.resize(CHUNK, 0);
    }
    // Buffer by buffer and chunk by chunk (a small scratch buffer, not one as big as the cap),
    // so that the used length counts exactly what reached the guest when a later buffer is
    // unreachable or the host source fails.
    let mut done = 0usize;
    'buffers: for r in buffers.writable.ranges() {
        let len = r.len.min((want - done) as u64);
        if len == 0 {
            break;
        }
        if let Err(e) = dma.check(r.addr, len, Access::Write) {
            tracing::debug!(head, "virtio-rng: {e}");
            break;
        }
        let mut off = 0u64;
        while off < len {
            // Checked above: r.addr + len does not wrap; a chunk fits a usize.
            let n = (len - off).min(CHUNK as u64);
            let chunk = &mut scratch[..usize::try_from(n).unwrap_or(CHUNK)];
            if let Err(e) = source.fill(chunk) {
                tracing::warn!(head, "virtio-rng: {e}");
                break 'buffers;
            }
            if let Err(e) = dma.write(r.addr + off, chunk) {
                // Only a concurrent IOMMU change gets here.
                tracing::debug!(head, "virtio-rng: {e}");
                break 'buffers;
            }
            off += n;
            done += chunk.len();
        }
    }
    // done <= MAX_BYTES_PER_CHAIN.
    u32::try_from(done).unwrap_or(0)
}

impl VirtioDevice for Rng {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&[], offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "virtio-rng: config write ignored");
    }

    fn process_queue(&mut self, queue: u16) {
        let Self {
            common,
            source,
            scratch,
        } = self;
        common.process_queue(queue, |dma, chain| {
            handle_chain(source.as_mut(), scratch, dma, chain)
        });
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::split::Descriptor;

    use std::sync::Arc;

    use super::*;
    use crate::virtio::dma::PhysMemory;
    use crate::virtio::testutil::{Desc, RecordingInterrupt, TestDriver, XorShift, test_memory};
    use crate::virtio::{DmaSpace, features};

    const BUF: u64 = 0x10000;
    const HOLE: u64 = 0x18_0000;

    fn activate(dev: &mut Rng, drv: &TestDriver, mem: &PhysMemory) -> Arc<RecordingInterrupt> {
        let irq = Arc::new(RecordingInterrupt::default());
        dev.ack_features(dev.offered_features());
        dev.activate(
            vec![drv.queue()],
            irq.clone(),
            DmaSpace::identity(mem.clone()),
        )
        .unwrap();
        irq
    }

    /// Submit a chain, process it, return the used length.
    fn submit(dev: &mut Rng, drv: &mut TestDriver, descs: &[Desc]) -> u32 {
        let before = drv.used_idx();
        drv.add(descs);
        dev.process_queue(0);
        assert_eq!(drv.used_idx(), before.wrapping_add(1), "chain returned");
        drv.used(before).1
    }

    /// A source that counts up, or fails.
    struct Counter(u8, bool);

    impl EntropySource for Counter {
        fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
            if self.1 {
                return Err(RngError::NoBytes);
            }
            for b in buf {
                *b = self.0;
                self.0 = self.0.wrapping_add(1);
            }
            Ok(())
        }
    }

    /// A source that fills `n` requests, then fails.
    struct FailAfter(usize);

    impl EntropySource for FailAfter {
        fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
            self.0 = self.0.checked_sub(1).ok_or(RngError::NoBytes)?;
            buf.fill(0x11);
            Ok(())
        }
    }

    #[test]
    fn identity_and_features() {
        let dev = Rng::new();
        assert_eq!(dev.device_type(), 4);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE]);
        assert_eq!(dev.offered_features(), features::COMMON);
        let mut b = [0xffu8; 4];
        dev.read_config(0, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn host_random_fills_and_differs() {
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        HostRandom.fill(&mut a).unwrap();
        HostRandom.fill(&mut b).unwrap();
        assert_ne!(a, b);
        HostRandom.fill(&mut []).unwrap();
    }

    #[test]
    fn requests_get_fresh_bytes_and_the_right_length() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let mut dev = Rng::new();
        let irq = activate(&mut dev, &drv, &mem);

        drv.write(BUF, &[0; 64]);
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::w(BUF, 64)]), 64);
        let first = drv.read(BUF, 64);
        assert_eq!(irq.take_queues(), vec![0]);
        drv.write(BUF, &[0; 64]);
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::w(BUF, 64)]), 64);
        let second = drv.read(BUF, 64);
        assert_ne!(first, second);
        assert_ne!(first, vec![0; 64]);

        // Several buffers, across the two memory regions; the bytes around stay untouched.
        drv.write(0x20_0000, &[0; 0x300]);
        let used = submit(
            &mut dev,
            &mut drv,
            &[
                Desc::w(BUF, 3),
                Desc::w(0x20_0100, 0x100),
                Desc::w(BUF + 0x100, 1),
            ],
        );
        assert_eq!(used, 0x104);
        assert_eq!(drv.read(0x20_0000, 0x100), vec![0; 0x100]);
        assert_eq!(drv.read(0x20_0200, 0x100), vec![0; 0x100]);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn one_chain_gets_at_most_the_cap() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let mut dev = Rng::with_source(Box::new(Counter(1, false)));
        activate(&mut dev, &drv, &mem);
        let len = u32::try_from(MAX_BYTES_PER_CHAIN).unwrap();
        drv.write(BUF + u64::from(len), &[0xee; 16]);
        let used = submit(
            &mut dev,
            &mut drv,
            &[
                Desc::w(BUF, len - 8),
                Desc::w(BUF + u64::from(len) - 8, 0x1000),
            ],
        );
        assert_eq!(used, len);
        let got = drv.read(BUF, MAX_BYTES_PER_CHAIN + 16);
        assert_eq!(got[0], 1);
        assert_eq!(got[MAX_BYTES_PER_CHAIN - 1], (len % 256) as u8);
        assert_eq!(&got[MAX_BYTES_PER_CHAIN..], &[0xee; 16]);
    }

    #[test]
    fn malformed_chains_and_failures() {
        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let mut dev = Rng::with_source(Box::new(Counter(7, false)));
        let irq = activate(&mut dev, &drv, &mem);

        // Readable only: nothing to fill.
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::r(BUF, 64)]), 0);
        // Readable then writable: the readable part is ignored.
        drv.write(BUF, &[0xaa; 16]);
        assert_eq!(
            submit(
                &mut dev,
                &mut drv,
                &[Desc::r(BUF, 16), Desc::w(BUF + 0x100, 4)]
            ),
            4
        );
        assert_eq!(drv.read(BUF, 16), vec![0xaa; 16]);
        assert_eq!(drv.read(BUF + 0x100, 4), vec![7, 8, 9, 10]);
        // Writable then readable: refused.
        assert_eq!(
            submit(&mut dev, &mut drv, &[Desc::w(BUF, 4), Desc::r(BUF, 4)]),
            0
        );
        // Zero-length writable buffer.
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::w(BUF, 0)]), 0);
        // A buffer in the hole: what came before it counts, the rest does not.
        assert_eq!(
            submit(&mut dev, &mut drv, &[Desc::w(BUF, 8), Desc::w(HOLE, 8)]),
            8
        );
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::w(HOLE, 8)]), 0);
        // Straddling the end of memory.
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::w(0xf_fff8, 16)]), 0);
        // A loop.
        let h = drv.next_free();
        let (w, n) = (VRING_DESC_F_WRITE as u16, VRING_DESC_F_NEXT as u16);
        drv.write_raw(h, Descriptor::new(BUF, 8, w | n, h + 1));
        drv.write_raw(h + 1, Descriptor::new(BUF, 8, w | n, h));
        let before = drv.used_idx();
        drv.publish(h);
        dev.process_queue(0);
        assert_eq!(drv.used(before), (u32::from(h), 0));
        // An empty indirect table.
        let h = drv.next_free();
        drv.write_raw(h, Descriptor::new(BUF, 0, VRING_DESC_F_INDIRECT as u16, 0));
        let before = drv.used_idx();
        drv.publish(h);
        dev.process_queue(0);
        assert_eq!(drv.used(before), (u32::from(h), 0));
        assert!(!irq.needs_reset());

        // The host source fails: length 0, the device goes on.
        let mut drv = TestDriver::new(&mem, 16);
        let mut dev = Rng::with_source(Box::new(Counter(0, true)));
        let irq = activate(&mut dev, &drv, &mem);
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::w(BUF, 8)]), 0);
        assert!(!irq.needs_reset());

        // It fails after one chunk: what was written counts.
        let mut drv = TestDriver::new(&mem, 16);
        let mut dev = Rng::with_source(Box::new(FailAfter(1)));
        let irq = activate(&mut dev, &drv, &mem);
        let chunk = CHUNK as u32;
        assert_eq!(
            submit(&mut dev, &mut drv, &[Desc::w(BUF, chunk), Desc::w(BUF, 8)]),
            chunk
        );
        assert!(!irq.needs_reset());

        // A broken ring: reset requested, then silence until reset.
        drv.set_avail_idx(100);
        dev.process_queue(0);
        assert!(irq.needs_reset());
        dev.reset();
        assert!(!dev.is_active());
    }

    /// Behind an IOMMU: buffers are I/O virtual addresses and a read-only mapping gets nothing.
    #[test]
    fn buffers_through_an_iommu() {
        use crate::virtio::dma::DmaIommu;
        use vm_memory::Permissions;

        let mem = test_memory();
        let mut drv = TestDriver::new(&mem, 16);
        let iommu = DmaIommu::new();
        // The rings at IOVA = GPA (the test driver puts them at 0).
        iommu.map(0, 0, 0x2000, Permissions::ReadWrite).unwrap();
        iommu
            .map(0x1000_0000, BUF, 0x1000, Permissions::Write)
            .unwrap();
        iommu
            .map(0x2000_0000, BUF + 0x1000, 0x1000, Permissions::Read)
            .unwrap();
        let mut dev = Rng::with_source(Box::new(Counter(1, false)));
        let irq = Arc::new(RecordingInterrupt::default());
        dev.ack_features(dev.offered_features());
        dev.activate(
            vec![drv.queue()],
            irq.clone(),
            DmaSpace::with_iommu(mem.clone(), iommu),
        )
        .unwrap();
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::w(0x1000_0000, 4)]), 4);
        assert_eq!(drv.read(BUF, 4), vec![1, 2, 3, 4]);
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::w(0x2000_0000, 4)]), 0);
        assert_eq!(submit(&mut dev, &mut drv, &[Desc::w(BUF + 8, 4)]), 0);
        assert_eq!(drv.read(BUF + 0x1000, 4), vec![0; 4]);
        assert!(!irq.needs_reset());
    }

    /// Random garbage chains: the device never panics, returns every chain it pops, never
    /// reports more bytes than the cap, and writes nothing outside the buffers it was given.
    #[test]
    fn random_chains_never_panic() {
        let mem = test_memory();
        let size = 32u16;
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let mut dev = Rng::with_source(Box::new(Counter(1, false)));
        let mut drv = TestDriver::new(&mem, size);
        let irq = activate(&mut dev, &drv, &mem);
        // A sentinel page no descriptor points at.
        let sentinel = 0x8_0000;
        drv.write(sentinel, &[0x5a; 0x1000]);
        let addrs = [
            BUF,
            0x4_0000,
            HOLE,
            0x20_0000,
            0xf_fff0,
            u64::MAX - 8,
            0x1f_fff8,
        ];
        let mut returned = 0u16;
        let (mut filled, mut empty) = (0, 0);
        for _ in 0..3000 {
            let count = 1 + rng.below(6) as u16;
            let head = rng.below(u64::from(size)) as u16;
            for i in 0..count {
                let addr = addrs[rng.below(addrs.len() as u64) as usize]
                    .saturating_add(rng.below(4) * 512);
                let len = match rng.below(4) {
                    0 => 16,
                    1 => rng.next() as u32,
                    2 => 0x1_8000,
                    _ => rng.below(2000) as u32,
                };
                let mut flags = 0u16;
                if i + 1 < count || rng.below(8) == 0 {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                if rng.below(4) != 0 {
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
            let (id, len) = drv.used(returned);
            assert_eq!(id, u32::from(head));
            // The chain the device followed may differ from the one written (random next
            // indexes reach older descriptors), so only the cap bounds the length.
            assert!(len as usize <= MAX_BYTES_PER_CHAIN);
            if len == 0 {
                empty += 1;
            } else {
                filled += 1;
            }
            returned = returned.wrapping_add(1);
            assert!(!irq.needs_reset());
        }
        assert_eq!(drv.read(sentinel, 0x1000), vec![0x5a; 0x1000]);
        assert!(
            filled > 300 && empty > 300,
            "{filled} filled, {empty} empty"
        );
    }

    /// A full queue with EVENT_IDX: every chain comes back, and the used ring (laid out by
    /// hand, not by virtio-queue's mock) leaves the available ring and its `used_event` alone.
    #[test]
    fn full_queue_with_event_idx() {
        let mem = test_memory();
        let size = 32u16;
        let mut dev = Rng::with_source(Box::new(Counter(0, false)));
        let mut drv = TestDriver::new(&mem, size);
        assert_eq!(
            drv.ring_addresses().2 + 6 + 8 * u64::from(size),
            TestDriver::rings_len(size)
        );
        let irq = activate(&mut dev, &drv, &mem);
        assert!(dev.acked_features() & features::RING_EVENT_IDX != 0);
        drv.set_used_event(size - 1);
        for i in 0..size {
            drv.add(&[Desc::w(BUF + 64 * u64::from(i), 16)]);
        }
        dev.process_queue(0);
        assert_eq!(drv.used_idx(), size);
        for i in 0..size {
            assert_eq!(drv.used(i), (u32::from(i), 16), "used entry {i}");
            // Available ring slot i still holds head i.
            let slot = drv.ring_addresses().1 + 4 + 2 * u64::from(i);
            assert_eq!(drv.read(slot, 2), i.to_le_bytes(), "avail slot {i}");
        }
        // used_event (31) was passed once: one interrupt, and the device asks for the next kick.
        assert_eq!(irq.take_queues(), [0]);
        assert_eq!(drv.avail_event(), size);
        let first: Vec<u8> = (0..16).collect();
        assert_eq!(drv.read(BUF, 16), first);
    }

    #[test]
    fn file_source() {
        let dir = std::env::temp_dir().join(format!("manifold-rng-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bytes");
        std::fs::write(&path, (0u8..100).collect::<Vec<_>>()).unwrap();
        let mut src = FileRandom(std::fs::File::open(&path).unwrap());
        let mut buf = [0u8; 60];
        src.fill(&mut buf).unwrap();
        assert_eq!(buf[59], 59);
        // 40 bytes left: a 60-byte request fails rather than returning short.
        assert!(matches!(src.fill(&mut buf), Err(RngError::Read(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
