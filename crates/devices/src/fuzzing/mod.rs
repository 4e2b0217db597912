//! Fuzz harnesses: each takes arbitrary bytes and drives one guest-facing device in-process the
//! way a malicious guest would, checking the device against a shadow model after every step. A
//! wrong answer panics, so libFuzzer reports it like a crash.
//!
//! The cargo-fuzz targets in `fuzz/` are one line each around these functions; the unit tests
//! below run every harness over a few thousand pseudo-random inputs so that the harnesses build
//! and pass in the normal test run without cargo-fuzz.
//!
//! Compiled for tests and with the `fuzzing` feature only.

mod dma;
mod legacy;
mod msix;
pub(crate) mod net_switch;
mod pci_config;
mod sriov;
mod sriov_topology;
mod virtio_blk;
mod virtio_iommu;
mod virtio_net;
mod virtio_pci;
mod virtq;

pub use dma::dma;
pub use legacy::{cmos, fw_cfg, serial};
pub use msix::msix_table;
pub use net_switch::net_switch;
pub use pci_config::pci_config;
pub use sriov::sriov;
pub use sriov_topology::sriov_topology;
pub use virtio_blk::virtio_blk;
pub use virtio_iommu::virtio_iommu;
pub use virtio_net::virtio_net;
pub use virtio_pci::virtio_pci;

/// Reads fuzz bytes as a stream of small integers. Past the end every read is zero, so any
/// input decodes to some sequence of operations.
pub(crate) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// One of `choices` (not empty).
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[usize::from(self.u8()) % choices.len()]
    }

    /// An access size: mostly 1, 2, 4 (and 8 where `wide`), sometimes 0 or 3.
    pub fn access_len(&mut self, wide: bool) -> usize {
        let sizes: &[usize] = if wide {
            &[1, 2, 4, 8, 1, 2, 4, 8, 4, 4, 0, 3]
        } else {
            &[1, 2, 4, 1, 2, 4, 4, 4, 0, 3, 8]
        };
        self.pick(sizes)
    }

    /// Up to `max` bytes taken straight from the input.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u8()).min(max).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
}

/// Little-endian bytes of `value`, `len` of them (at most 8).
pub(crate) fn le(value: u64, len: usize) -> Vec<u8> {
    value.to_le_bytes()[..len.min(8)].to_vec()
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::legacy::testutil::XorShift;

    /// xorshift64 inputs of 0..`max_len` bytes, `count` of them, fed to `harness`.
    pub fn run(harness: fn(&[u8]), seed: u64, count: usize, max_len: usize) {
        let mut rng = XorShift(seed);
        for _ in 0..count {
            let len = rng.below(max_len as u64) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            harness(&data);
        }
    }

    /// `count` xorshift64 inputs of exactly `len` bytes, all from one generator seeded `seed`.
    pub fn inputs(seed: u64, count: usize, len: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut rng = XorShift(seed);
        (0..count).map(move |_| (0..len).map(|_| rng.next() as u8).collect())
    }

    #[test]
    fn input_reads_past_the_end_as_zero() {
        let mut i = super::Input::new(&[1, 2, 3]);
        assert_eq!(i.u16(), 0x0201);
        assert_eq!(i.u32(), 3);
        assert!(i.is_empty());
        assert_eq!(i.u64(), 0);
        assert_eq!(i.bytes(10), &[] as &[u8]);
    }
}
