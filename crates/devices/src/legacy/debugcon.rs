//! QEMU's debug console (`isa-debugcon`) at one port: firmware writes its debug log there a
//! byte at a time. SeaBIOS first reads the port and only logs if it reads back 0xE9, so the
//! builder maps this device only when the log would be shown: otherwise each byte would cost
//! an exit for nothing.

use crate::bus::BusDevice;

/// What a read returns: QEMU's default `readback`, which tells SeaBIOS the port is there.
pub const READBACK: u8 = 0xe9;
/// Longest line kept; a guest that never writes a newline cannot grow the buffer past this.
const LINE_MAX: usize = 512;

/// Logs each line written at debug level. Insert with length 1.
#[derive(Default)]
pub struct DebugCon {
    line: Vec<u8>,
}

impl DebugCon {
    pub fn new() -> Self {
        Self::default()
    }

    fn flush(&mut self) {
        if !self.line.is_empty() {
            tracing::debug!("firmware: {}", String::from_utf8_lossy(&self.line));
            self.line.clear();
        }
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let (0, Some(b)) = (offset, data.first_mut()) {
            *b = READBACK;
        }
    }

    /// Only the low byte counts, as in QEMU.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&b)) = (offset, data.first()) else {
            return;
        };
        match b {
            b'\n' => self.flush(),
            b'\r' => {}
            _ => {
                self.line.push(b);
                if self.line.len() >= LINE_MAX {
                    self.flush();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::testutil::{fuzz, read1};

    #[test]
    fn reads_back_and_buffers_lines() {
        let mut d = DebugCon::new();
        assert_eq!(read1(&mut d, 0), READBACK);
        let mut w = [0u8; 2];
        d.read(0, &mut w);
        assert_eq!(w, [READBACK, 0xff]);
        for &b in b"ab\r" {
            d.write(0, &[b]);
        }
        assert_eq!(d.line, b"ab");
        d.write(1, b"x");
        assert_eq!(d.line, b"ab");
        d.write(0, b"\n");
        assert!(d.line.is_empty());
        for _ in 0..LINE_MAX + 10 {
            d.write(0, b"y");
        }
        assert_eq!(d.line.len(), 10);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        fuzz(&mut DebugCon::new(), 0xe9, 2, 10_000);
    }
}
