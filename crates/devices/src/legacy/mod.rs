//! Legacy PC devices on the port I/O bus.
//!
//! All of them are 8-bit ISA devices. On a PC the chipset splits a wider port access into byte
//! cycles at consecutive ports (an `inw` from 0x70 reads 0x70 then 0x71), so the devices here do
//! the same through [`read_bytes`] and [`write_bytes`]: byte `i` of the access goes to port
//! `offset + i`, and bytes that fall outside the device read as all-ones and are dropped on write,
//! as an unclaimed ISA cycle would be. The exceptions take whole accesses, as their QEMU
//! counterparts do: the debug-exit port (a 1, 2 or 4 byte write is the value) and fw_cfg (a
//! 16-bit selector, 32-bit halves of the DMA address).

mod acpi_sleep;
mod cmos;
mod debug_exit;
mod debugcon;
pub mod fw_cfg;
mod i8042;
mod post;
mod serial;

pub use acpi_sleep::AcpiSleep;
pub use cmos::{Clock, Cmos};
pub use debug_exit::DebugExit;
pub use debugcon::DebugCon;
pub use fw_cfg::FwCfg;
pub use i8042::{I8042, I8042Port, I8042PortDevice};
pub use post::PostCode;
pub use serial::{SERIAL_FIFO_SIZE, Serial};

/// Serve a read of `data.len()` bytes at `offset` of a `len`-port device one byte at a time.
fn read_bytes(offset: u64, len: u64, data: &mut [u8], mut read: impl FnMut(u64) -> u8) {
    let mut port = Some(offset);
    for b in data.iter_mut() {
        *b = match port {
            Some(p) if p < len => read(p),
            _ => 0xff,
        };
        port = port.and_then(|p| p.checked_add(1));
    }
}

/// Serve a write of `data` at `offset` of a `len`-port device one byte at a time.
fn write_bytes(offset: u64, len: u64, data: &[u8], mut write: impl FnMut(u64, u8)) {
    let mut port = Some(offset);
    for &b in data {
        match port {
            Some(p) if p < len => write(p, b),
            _ => break,
        }
        port = port.and_then(|p| p.checked_add(1));
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::sync::Mutex;

    use crate::bus::{BusDevice, lock};
    use crate::{VmEvent, VmEvents};

    /// Records every event a device requests.
    #[derive(Default)]
    pub struct RecordingEvents(Mutex<Vec<VmEvent>>);

    impl RecordingEvents {
        pub fn take(&self) -> Vec<VmEvent> {
            std::mem::take(&mut *lock(&self.0))
        }
    }

    impl VmEvents for RecordingEvents {
        fn request(&self, event: VmEvent) {
            lock(&self.0).push(event);
        }
    }

    /// xorshift64: reproducible randomness without a crate.
    pub struct XorShift(pub u64);

    impl XorShift {
        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Throw `rounds` random accesses at `dev`: offsets mostly in `0..span` (sometimes anywhere),
    /// sizes 0, 1, 2, 3, 4 or 8, random values. The test passes if nothing panics.
    pub fn fuzz(dev: &mut dyn BusDevice, seed: u64, span: u64, rounds: usize) {
        let mut rng = XorShift(seed);
        for _ in 0..rounds {
            let offset = if rng.below(16) == 0 {
                rng.next()
            } else {
                rng.below(span)
            };
            let size = [0, 1, 2, 3, 4, 8][rng.below(6) as usize];
            let mut data = rng.next().to_le_bytes();
            if rng.below(2) == 0 {
                dev.read(offset, &mut data[..size]);
            } else {
                dev.write(offset, &data[..size]);
            }
        }
    }

    pub fn read1(dev: &mut dyn BusDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_accesses() {
        let mut seen = Vec::new();
        let mut data = [0u8; 4];
        read_bytes(1, 3, &mut data, |p| {
            seen.push(p);
            0x10 + p as u8
        });
        assert_eq!(data, [0x11, 0x12, 0xff, 0xff]);
        assert_eq!(seen, [1, 2]);
        read_bytes(u64::MAX, u64::MAX, &mut data, |_| 0);
        assert_eq!(data, [0xff; 4]);

        let mut written = Vec::new();
        write_bytes(2, 4, &[1, 2, 3], |p, b| written.push((p, b)));
        assert_eq!(written, [(2, 1), (3, 2)]);
        write_bytes(u64::MAX - 1, u64::MAX, &[1, 2, 3], |p, b| {
            written.push((p, b))
        });
        assert_eq!(written.last(), Some(&(u64::MAX - 1, 1)));
    }
}
