//! The POST code register at port 0x80: firmware writes progress codes there, and benchmark
//! guests use it as the cheapest possible exit, so a write only stores a byte.

use crate::bus::BusDevice;

/// Keeps the last byte written; reads return it. Insert with length 1.
#[derive(Default)]
pub struct PostCode {
    last: u8,
}

impl PostCode {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last code the guest wrote.
    pub fn last(&self) -> u8 {
        self.last
    }
}

impl BusDevice for PostCode {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Bytes past the first belong to the ports after 0x80, which are not ours.
        data.fill(0xff);
        if let (0, Some(b)) = (offset, data.first_mut()) {
            *b = self.last;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&b)) = (offset, data.first()) {
            self.last = b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::testutil::{fuzz, read1};

    #[test]
    fn keeps_last_byte() {
        let mut p = PostCode::new();
        assert_eq!(read1(&mut p, 0), 0);
        p.write(0, &[0x42]);
        assert_eq!(read1(&mut p, 0), 0x42);
        assert_eq!(p.last(), 0x42);
        p.write(0, &[0x11, 0x22]);
        let mut b = [0u8; 2];
        p.read(0, &mut b);
        assert_eq!(b, [0x11, 0xff]);
        p.write(1, &[0x33]);
        assert_eq!(p.last(), 0x11);
        assert_eq!(read1(&mut p, 1), 0xff);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        fuzz(&mut PostCode::new(), 0x80, 4, 10_000);
    }
}
