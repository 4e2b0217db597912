//! QEMU `isa-debug-exit` at one port: a write of V ends the VM with status `(V << 1) | 1`, which
//! test guests use to report their result.

use std::sync::Arc;

use tracing::debug;

use crate::bus::BusDevice;
use crate::{VmEvent, VmEvents};

/// The debug-exit port. Insert with length 1.
pub struct DebugExit {
    events: Arc<dyn VmEvents>,
}

impl DebugExit {
    pub fn new(events: Arc<dyn VmEvents>) -> Self {
        Self { events }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// The whole access is the value (little-endian), as in QEMU: 1 to 4 bytes at offset 0.
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() || data.len() > 4 {
            debug!(
                "debug-exit: {}-byte write at offset {offset} ignored",
                data.len()
            );
            return;
        }
        let mut v = [0u8; 4];
        v[..data.len()].copy_from_slice(data);
        self.events
            .request(VmEvent::DebugExit(u32::from_le_bytes(v)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::testutil::{RecordingEvents, fuzz};

    #[test]
    fn writes_exit_with_value() {
        let ev = Arc::new(RecordingEvents::default());
        let mut d = DebugExit::new(ev.clone());
        d.write(0, &[0x01]);
        d.write(0, &[0x34, 0x12]);
        d.write(0, &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(
            ev.take(),
            [
                VmEvent::DebugExit(1),
                VmEvent::DebugExit(0x1234),
                VmEvent::DebugExit(0x1234_5678)
            ]
        );
        d.write(0, &[]);
        d.write(0, &[1; 8]);
        d.write(1, &[1]);
        assert!(ev.take().is_empty());
        let mut b = [0u8; 4];
        d.read(0, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn random_accesses_do_not_panic() {
        let mut d = DebugExit::new(Arc::new(RecordingEvents::default()));
        fuzz(&mut d, 0xdeb6, 4, 10_000);
    }
}
